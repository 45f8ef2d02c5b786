//! Body framing.

use super::*;

/// Feeds `input` one byte at a time and returns how many bytes belonged to the body.
fn feed_bytewise(f: &mut BodyFramer, input: &[u8]) -> Result<usize, ProtoError> {
    let mut total = 0;
    for b in input {
        let n = f.advance(std::slice::from_ref(b))?;
        total += n;
        if n == 0 {
            break;
        }
    }
    Ok(total)
}

#[test]
fn framer_none_and_length() {
    let mut f = BodyFramer::new(BodyKind::None);
    assert!(f.is_done());
    assert_eq!(f.advance(b"GET"), Ok(0));
    let f = BodyFramer::new(BodyKind::Length(0));
    assert!(f.is_done());
    let mut f = BodyFramer::new(BodyKind::Length(5));
    assert_eq!(f.advance(b"ab"), Ok(2));
    assert!(!f.is_done());
    assert_eq!(f.advance(b""), Ok(0));
    assert_eq!(f.advance(b"cdeGET /"), Ok(3));
    assert!(f.is_done());
    assert_eq!(f.advance(b"more"), Ok(0));
    let mut f = BodyFramer::new(BodyKind::Length(u64::MAX));
    assert_eq!(f.advance(&[0u8; 1000]), Ok(1000));
    assert!(!f.is_done());
    let mut f = BodyFramer::new(BodyKind::UntilClose);
    assert_eq!(f.advance(b"anything at all"), Ok(15));
    assert!(!f.is_done());
}

const CHUNKED: &[u8] = b"4;name=value;flag\r\nWiki\r\n5 ; ext=\"q s\"\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0;last\r\nX-Sum: abc\r\nX-Other:\t v \r\n\r\n";

#[test]
fn framer_chunked_whole_and_bytewise() {
    let mut f = BodyFramer::new(BodyKind::Chunked);
    assert_eq!(f.advance(CHUNKED), Ok(CHUNKED.len()));
    assert!(f.is_done());
    let mut f = BodyFramer::new(BodyKind::Chunked);
    assert_eq!(feed_bytewise(&mut f, CHUNKED), Ok(CHUNKED.len()));
    assert!(f.is_done());
    // Split at every boundary into two calls.
    for split in 0..=CHUNKED.len() {
        let (a, b) = CHUNKED.split_at(split);
        let mut f = BodyFramer::new(BodyKind::Chunked);
        assert_eq!(f.advance(a), Ok(a.len()));
        assert_eq!(f.is_done(), b.is_empty());
        assert_eq!(f.advance(b), Ok(b.len()));
        assert!(f.is_done());
    }
    let mut f = BodyFramer::new(BodyKind::Chunked);
    assert_eq!(f.advance(b"0\r\n\r\n"), Ok(5));
    assert!(f.is_done());
    let mut f = BodyFramer::new(BodyKind::Chunked);
    assert_eq!(f.advance(b"00000A\r\n0123456789\r\n0\r\n\r\n"), Ok(25));
    assert!(f.is_done());
}

#[test]
fn framer_chunked_stops_before_next_request() {
    let next = b"GET http://e.x/ HTTP/1.1\r\n\r\n";
    let mut input = CHUNKED.to_vec();
    input.extend_from_slice(next);
    let mut f = BodyFramer::new(BodyKind::Chunked);
    assert_eq!(f.advance(&input), Ok(CHUNKED.len()));
    assert!(f.is_done());
    assert_eq!(f.advance(next), Ok(0));
    let mut f = BodyFramer::new(BodyKind::Chunked);
    assert_eq!(feed_bytewise(&mut f, &input), Ok(CHUNKED.len()));
    let rest = input.get(CHUNKED.len()..).unwrap_or(&[]);
    let (r, _) = req(rest, &NO_VIA);
    assert_eq!(r.head_len, next.len());
}

#[test]
fn framer_chunked_errors() {
    let long_ext = format!("1;{}\r\na\r\n0\r\n\r\n", "x".repeat(MAX_CHUNK_LINE));
    let long_trailer = format!("0\r\nX: {}\r\n\r\n", "y".repeat(MAX_TRAILERS));
    let bad: &[&[u8]] = &[
        b"10000000000000000\r\n",
        b"00000000000000000\r\n",
        b"\r\n",
        b";ext\r\n",
        b"g\r\n",
        b"-1\r\n",
        b"5x\r\n",
        b"5 x\r\n",
        b"5\n",
        b"5\r\r",
        b"1\r\nab",
        b"1\r\na\n",
        b"1\r\na\rx",
        b"1;a\x01b\r\n",
        b"0\r\n\n",
        b"0\r\n X: folded\r\n",
        b"0\r\nX\r\n",
        b"0\r\nX : y\r\n",
        b"0\r\nX: a\x00b\r\n",
        b"0\r\nX: y\n",
        b"0\r\n\rx",
        long_ext.as_bytes(),
        long_trailer.as_bytes(),
    ];
    for input in bad {
        let mut f = BodyFramer::new(BodyKind::Chunked);
        assert_eq!(
            f.advance(input),
            Err(ProtoError::Malformed),
            "{}",
            text(input)
        );
        // Errors are sticky.
        assert_eq!(f.advance(b"0\r\n\r\n"), Err(ProtoError::Malformed));
        assert!(!f.is_done());
        let mut f = BodyFramer::new(BodyKind::Chunked);
        assert_eq!(
            feed_bytewise(&mut f, input),
            Err(ProtoError::Malformed),
            "{}",
            text(input)
        );
    }
    // 16 hex digits are the most accepted and fit exactly.
    let mut f = BodyFramer::new(BodyKind::Chunked);
    assert_eq!(f.advance(b"ffffffffffffffff\r\nabc"), Ok(21));
    assert!(!f.is_done());
    // Extensions up to the cap are fine.
    let ok_ext = format!("1;{}\r\na\r\n0\r\n\r\n", "x".repeat(MAX_CHUNK_LINE - 3));
    let mut f = BodyFramer::new(BodyKind::Chunked);
    assert_eq!(f.advance(ok_ext.as_bytes()), Ok(ok_ext.len()));
    assert!(f.is_done());
}
