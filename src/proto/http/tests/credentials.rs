//! Proxy-Authorization: Basic.

use super::*;

fn creds(value: &str) -> (Option<BasicCredentials>, bool) {
    let raw = format!("GET http://e.x/ HTTP/1.1\r\nProxy-Authorization: {value}\r\n\r\n");
    let (r, out) = req(raw.as_bytes(), &NO_VIA);
    assert!(!text(&out).contains("Proxy-Authorization"));
    (r.credentials, r.auth_present)
}

#[test]
fn basic_credentials() {
    let (c, present) = creds("Basic dXNlcjpwYXNz");
    assert!(present);
    assert_eq!(
        c.as_ref().map(|c| (c.user(), c.pass())),
        Some((&b"user"[..], &b"pass"[..]))
    );
    assert_eq!(c, BasicCredentials::new(b"user", b"pass"));
    // Scheme is case-insensitive; padding optional; the password may contain ':'.
    let (c, _) = creds("basic   dXNlcjpwYTpzcw");
    assert_eq!(
        c.as_ref().map(|c| (c.user(), c.pass())),
        Some((&b"user"[..], &b"pa:ss"[..]))
    );
    // Empty user and password are representable (policy decides).
    let (c, _) = creds("Basic Og==");
    assert_eq!(
        c.as_ref().map(|c| (c.user(), c.pass())),
        Some((&b""[..], &b""[..]))
    );
    for bad in [
        "Basic dXNlcjpwYXNz!",
        "Basic dXNlcnBhc3M=",
        "Bearer dXNlcjpwYXNz",
        "Basic",
        "Basic ",
        "dXNlcjpwYXNz",
    ] {
        assert_eq!(creds(bad), (None, true), "{bad}");
    }
    let (r, _) = req(b"GET http://e.x/ HTTP/1.1\r\n\r\n", &NO_VIA);
    assert_eq!((r.credentials, r.auth_present), (None, false));
    // Two headers are ambiguous.
    let (r, _) = req(
        b"GET http://e.x/ HTTP/1.1\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\r\n",
        &NO_VIA,
    );
    assert_eq!((r.credentials, r.auth_present), (None, true));
    // Too long to store inline.
    let mut long = Vec::new();
    long.extend_from_slice(&[b'a'; 800]);
    long.push(b':');
    let mut enc = String::new();
    for chunk in long.chunks(3) {
        enc.push_str(&encode_for_test(chunk));
    }
    assert_eq!(creds(&format!("Basic {enc}")), (None, true));
}

fn encode_for_test(chunk: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = |i: usize| chunk.get(i).copied().map(u32::from).unwrap_or(0);
    let n = (b(0) << 16) | (b(1) << 8) | b(2);
    let ch = |shift: u32| char::from(A.get(((n >> shift) & 63) as usize).copied().unwrap_or(b'A'));
    let mut s: String = [ch(18), ch(12), ch(6), ch(0)].iter().collect();
    s.truncate(chunk.len() + 1);
    while s.len() < 4 {
        s.push('=');
    }
    s
}

#[test]
fn credentials_debug_redacts_password() {
    let c = BasicCredentials::new(b"alice", b"hunter2");
    let s = format!("{c:?}");
    assert!(s.contains("alice") && !s.contains("hunter2"), "{s}");
    assert!(BasicCredentials::new(b"a:b", b"c").is_none());
    assert!(BasicCredentials::new(&[b'a'; 700], &[b'b'; 67]).is_some());
    assert!(BasicCredentials::new(&[b'a'; 700], &[b'b'; 68]).is_none());
}
