//! Canned responses.

use super::*;

#[test]
fn error_responses_frame_their_detail() {
    let mut out = Vec::new();
    error_response(502, "refused\r\nX: y", &mut out);
    let mut head = Vec::new();
    let r = match parse_response(&out, DEFAULT_MAX_HEAD, &ctx(false, true, 1), &mut head) {
        Ok(Parse::Done(r, _)) => r,
        other => panic!("{other:?}"),
    };
    let body = out.get(r.head_len..).unwrap_or(&[]);
    assert_eq!(r.status, 502);
    assert_eq!(body, b"Bad Gateway: refused  X: y\n");
    assert_eq!(r.body, BodyKind::Length(body.len() as u64));
    out.clear();
    error_response(407, "proxy authentication required", &mut out);
    assert!(text(&out).contains("Proxy-Authenticate: Basic realm=\"socksgate\"\r\n"));
}

#[test]
fn canned_responses_are_valid_http() {
    for status in [
        400u16, 403, 404, 405, 407, 408, 411, 413, 414, 431, 500, 501, 502, 503, 504, 418, 0, 999,
    ] {
        let mut buf = [0u8; MAX_CANNED_LEN];
        let n = canned_response(status, &mut buf);
        assert!(n > 0 && n <= MAX_CANNED_LEN);
        let msg = prefix(&buf, n);
        let mut out = Vec::new();
        let (r, _) = match parse_response(msg, DEFAULT_MAX_HEAD, &ctx(false, true, 1), &mut out) {
            Ok(Parse::Done(r, h)) => (r, h),
            other => panic!("{status}: {other:?}"),
        };
        let want = if (200..=599).contains(&status) {
            status
        } else {
            500
        };
        assert_eq!(r.status, want);
        assert!(!r.keep_origin, "canned responses close");
        let body = msg.get(r.head_len..).unwrap_or(&[]);
        assert_eq!(r.body, BodyKind::Length(body.len() as u64));
        assert!(body.ends_with(b"\n"));
        assert_eq!(
            text(msg).contains("Proxy-Authenticate: Basic realm=\"socksgate\"\r\n"),
            status == 407
        );
    }
    let mut buf = [0u8; MAX_CANNED_LEN];
    let n = canned_response(502, &mut buf);
    assert_eq!(
        text(prefix(&buf, n)),
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nBad Gateway\n"
    );
    let mut small = [0u8; 20];
    assert_eq!(canned_response(400, &mut small), 0);
    let mut exact = [0u8; 512];
    let n = canned_response(407, &mut exact);
    let mut tight = vec![0u8; n];
    assert_eq!(canned_response(407, &mut tight), n);
    let mut short = vec![0u8; n - 1];
    assert_eq!(canned_response(407, &mut short), 0);
    assert!(CONNECT_ESTABLISHED.starts_with(b"HTTP/1.1 200 "));
}
