//! Random and mutated input: no panic, no overrun.

use super::*;

use crate::proto::testutil::{Rng, ROUNDS};

const DICT: &[&[u8]] = &[
    b"GET ",
    b"CONNECT ",
    b"HEAD ",
    b"OPTIONS ",
    b"http://",
    b"HTTP://",
    b"https://",
    b"example.com",
    b"[::1]",
    b"127.0.0.1",
    b":443",
    b":80",
    b":",
    b"/",
    b"?",
    b"#",
    b"@",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b"HTTP/1.1 ",
    b"HTTP/1.0 ",
    b"200 OK",
    b"100 Continue",
    b"101 ",
    b"204 ",
    b"304 ",
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b"Host: ",
    b"Content-Length: ",
    b"Transfer-Encoding: ",
    b"chunked",
    b"gzip",
    b"Connection: ",
    b"close",
    b"keep-alive",
    b"Proxy-Connection: ",
    b"Proxy-Authorization: Basic ",
    b"dXNlcjpwYXNz",
    b"==",
    b", ",
    b"0",
    b"5",
    b"ffff",
    b"99999999999999999999",
    b";ext=1",
    b"X-A: b",
    b" ",
    b"\t",
    b"\x00",
    b"\xff",
];

fn random_message(rng: &mut Rng, buf: &mut Vec<u8>) {
    buf.clear();
    let parts = rng.below(24);
    for _ in 0..parts {
        if rng.below(4) == 0 {
            for _ in 0..rng.below(8) {
                buf.push(rng.next() as u8);
            }
        } else if let Some(tok) = DICT.get(rng.below(DICT.len())) {
            buf.extend_from_slice(tok);
        }
    }
}

#[test]
fn fuzz_never_panics() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut done = [0usize; 3];
    let kinds = [
        BodyKind::None,
        BodyKind::Length(7),
        BodyKind::Chunked,
        BodyKind::UntilClose,
    ];
    for i in 0..ROUNDS {
        random_message(&mut rng, &mut buf);
        // Every so often mutate a known-good message so parsing gets past the first line.
        if i % 3 == 0 {
            let seeds = VALID_REQUESTS.len() + VALID_RESPONSES.len();
            let seed = VALID_REQUESTS
                .iter()
                .chain(VALID_RESPONSES)
                .nth(rng.below(seeds))
                .copied()
                .unwrap_or(b"");
            buf.clear();
            buf.extend_from_slice(seed);
            for _ in 0..=rng.below(3) {
                let at = rng.below(buf.len());
                if let Some(b) = buf.get_mut(at) {
                    *b = rng.next() as u8;
                }
            }
        }
        let max = 16 + rng.below(512);
        if let Ok(Parse::Done(r, n)) = parse_request(&buf, max, &VIA, &mut out) {
            assert!(n <= buf.len() && n <= max && n == r.head_len);
            done[0] += 1;
        }
        let c = ctx(rng.below(2) == 0, rng.below(2) == 0, (rng.below(2)) as u8);
        if let Ok(Parse::Done(r, n)) = parse_response(&buf, max, &c, &mut out) {
            assert!(n <= buf.len() && n == r.head_len);
            done[1] += 1;
        }
        let kind = kinds
            .get(rng.below(kinds.len()))
            .copied()
            .unwrap_or(BodyKind::Chunked);
        let mut f = BodyFramer::new(kind);
        let mut rest: &[u8] = &buf;
        while !rest.is_empty() {
            let step = 1 + rng.below(rest.len());
            let (a, b) = rest.split_at(step);
            match f.advance(a) {
                Ok(n) => {
                    assert!(n <= a.len());
                    if n < a.len() {
                        assert!(f.is_done());
                        done[2] += 1;
                        break;
                    }
                }
                Err(_) => break,
            }
            rest = b;
        }
        let _ = crate::proto::base64::decode(&buf, &mut [0u8; 64]);
    }
    // The generator must actually reach the interesting paths.
    assert!(done.iter().all(|&d| d > 0), "{done:?}");
}
