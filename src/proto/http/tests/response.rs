//! Response heads.

use super::*;

#[test]
fn every_valid_response_is_incomplete_until_its_last_byte() {
    let c = ctx(false, true, 1);
    for raw in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"[..],
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
        b"HTTP/1.1 500\r\n\r\n",
        b"\r\nHTTP/1.1 200 OK\r\n\r\n",
    ] {
        resp_split_everywhere(raw, &c);
    }
}

#[test]
fn response_with_length_is_rewritten_byte_exact() {
    let raw = b"HTTP/1.1 200 OK\r\n\
        Content-Type: text/html\r\n\
        Connection: keep-alive, X-Hop\r\n\
        X-Hop: 1\r\n\
        Keep-Alive: timeout=5\r\n\
        Proxy-Connection: keep-alive\r\n\
        TE: trailers\r\n\
        Trailer: X-Sum\r\n\
        Upgrade: h2c\r\n\
        Content-Length: 12\r\n\r\n";
    let (r, out) = resp_split_everywhere(raw, &ctx(false, true, 1));
    assert_eq!(
        r,
        Response {
            status: 200,
            body: BodyKind::Length(12),
            interim: false,
            keep_client: true,
            keep_origin: true,
            head_len: raw.len(),
        }
    );
    assert_eq!(
        text(&out),
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 12\r\nVia: 1.1 socksgate\r\n\r\n"
    );
    // Two responses joined: head_len stops at the first.
    let mut both = raw.to_vec();
    both.extend_from_slice(b"hello world!HTTP/1.1 204 No Content\r\n\r\n");
    let (r2, _) = resp(&both, &ctx(false, true, 1));
    assert_eq!(r2.head_len, raw.len());
}

#[test]
fn response_to_head_has_no_body_but_keeps_length() {
    let (r, out) = resp(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
        &ctx(true, true, 1),
    );
    assert_eq!(r.body, BodyKind::None);
    assert!(r.keep_client && r.keep_origin);
    assert_eq!(
        text(&out),
        "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nVia: 1.1 socksgate\r\n\r\n"
    );
    // Even without any length a HEAD response ends at its head.
    let (r, _) = resp(b"HTTP/1.1 200 OK\r\n\r\n", &ctx(true, true, 1));
    assert_eq!(r.body, BodyKind::None);
    assert!(r.keep_client && r.keep_origin);
}

#[test]
fn response_204_and_304() {
    let (r, out) = resp(
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        &ctx(false, true, 1),
    );
    assert_eq!(r.body, BodyKind::None);
    assert!(r.keep_client && r.keep_origin);
    assert_eq!(
        text(&out),
        "HTTP/1.1 204 No Content\r\nVia: 1.1 socksgate\r\n\r\n"
    );
    let (r, out) = resp(
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        &ctx(false, true, 1),
    );
    assert_eq!(r.body, BodyKind::None);
    assert_eq!(
        text(&out),
        "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nVia: 1.1 socksgate\r\n\r\n"
    );
}

#[test]
fn interim_responses() {
    let raw = b"HTTP/1.1 100 Continue\r\n\r\n";
    let (r, out) = resp(raw, &ctx(false, false, 1));
    assert!(r.interim && r.keep_client);
    assert_eq!(r.body, BodyKind::None);
    assert_eq!(
        text(&out),
        "HTTP/1.1 100 Continue\r\nVia: 1.1 socksgate\r\n\r\n"
    );
    // The final response follows right after the interim head.
    let mut both = raw.to_vec();
    both.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    let (r, _) = resp(&both, &ctx(false, true, 1));
    assert_eq!(r.head_len, raw.len());
    let rest = both.get(raw.len()..).unwrap_or(&[]);
    let (r, _) = resp(rest, &ctx(false, true, 1));
    assert!(!r.interim && r.status == 200 && r.body == BodyKind::None);
    // 103 Early Hints is interim too; its framing fields are dropped.
    let (r, out) = resp(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\nContent-Length: 3\r\n\r\n",
        &ctx(false, true, 1),
    );
    assert!(r.interim);
    assert_eq!(
        text(&out),
        "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\nVia: 1.1 socksgate\r\n\r\n"
    );
    // HTTP/1.0 clients never see a 1xx.
    let (r, out) = resp(raw, &ctx(false, true, 0));
    assert!(r.interim);
    assert!(out.is_empty());
}

#[test]
fn switching_protocols_ends_http() {
    let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nKeep-Alive: 1\r\n\r\n";
    let (r, out) = resp(raw, &ctx(false, true, 1));
    assert_eq!(r.body, BodyKind::UntilClose);
    assert!(!r.interim && !r.keep_client && !r.keep_origin);
    assert_eq!(
        text(&out),
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nVia: 1.1 socksgate\r\n\r\n"
    );
}

#[test]
fn chunked_response_drops_content_length() {
    let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (r, out) = resp(raw, &ctx(false, true, 1));
    assert_eq!(r.body, BodyKind::Chunked);
    assert!(r.keep_client);
    // CL with TE is suspicious (RFC 9112 §6.3 item 3): do not reuse that origin connection.
    assert!(!r.keep_origin);
    assert_eq!(
        text(&out),
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nVia: 1.1 socksgate\r\n\r\n"
    );
    let (r, _) = resp(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        &ctx(false, true, 1),
    );
    assert!(r.keep_origin && r.keep_client);
}

#[test]
fn close_delimited_responses() {
    for raw in [
        &b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        let (r, out) = resp(raw, &ctx(false, true, 1));
        assert_eq!(r.body, BodyKind::UntilClose, "{}", text(raw));
        assert!(!r.keep_client && !r.keep_origin, "{}", text(raw));
        assert!(
            text(&out).ends_with("Connection: close\r\nVia: 1.1 socksgate\r\n\r\n")
                || text(&out).ends_with("Connection: close\r\nVia: 1.0 socksgate\r\n\r\n")
        );
    }
    let (_, out) = resp(b"HTTP/1.1 200 OK\r\nX: y\r\n\r\n", &ctx(false, true, 1));
    assert_eq!(
        text(&out),
        "HTTP/1.1 200 OK\r\nX: y\r\nConnection: close\r\nVia: 1.1 socksgate\r\n\r\n"
    );
}

#[test]
fn persistence_rules() {
    // (response, client keep-alive, client minor) -> (keep_client, keep_origin, added Connection line)
    type Case = (&'static [u8], bool, u8, bool, bool, Option<&'static str>);
    let cases: &[Case] = &[
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n",
            true,
            1,
            true,
            true,
            None,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n",
            false,
            1,
            false,
            true,
            Some("close"),
        ),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            true,
            1,
            true,
            false,
            None,
        ),
        (
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
            true,
            1,
            true,
            false,
            Some("keep-alive"),
        ),
        (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            true,
            1,
            true,
            true,
            Some("keep-alive"),
        ),
        (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 1\r\n\r\n",
            true,
            1,
            true,
            false,
            Some("keep-alive"),
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n",
            true,
            0,
            true,
            true,
            Some("keep-alive"),
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n",
            false,
            0,
            false,
            true,
            Some("close"),
        ),
        (
            b"HTTP/1.0 200 OK\r\n\r\n",
            true,
            0,
            false,
            false,
            Some("close"),
        ),
    ];
    for (raw, keep, minor, kc, ko, conn) in cases {
        let (r, out) = resp(raw, &ctx(false, *keep, *minor));
        assert_eq!((r.keep_client, r.keep_origin), (*kc, *ko), "{}", text(raw));
        let out = text(&out);
        let lines: Vec<&str> = out
            .split("\r\n")
            .filter(|l| l.starts_with("Connection:"))
            .collect();
        let want: Vec<String> = conn.iter().map(|c| format!("Connection: {c}")).collect();
        assert_eq!(lines, want, "{}", text(raw));
    }
}

#[test]
fn response_errors() {
    use ProtoError::{Malformed, Smuggling};
    let c = ctx(false, true, 1);
    for (raw, want) in [
        (
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            Smuggling,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            Smuggling,
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", Malformed),
        (
            b"HTTP/1.1 304 OK\r\nContent-Length: 1, 2\r\n\r\n",
            Smuggling,
        ),
        (b"HTTP/1.1 099 Odd\r\n\r\n", Malformed),
        (b"HTTP/1.1 600 Odd\r\n\r\n", Malformed),
        (b"HTTP/2.0 200 OK\r\n\r\n", Malformed),
        (b"HTTP/1.1 20 OK\r\n\r\n", Malformed),
        (b"HTTP/1.1 200 OK\r\nA : b\r\n\r\n", Malformed),
        (b"HTTP/1.1 200 OK\r\nA: b\r\n c\r\n\r\n", Malformed),
    ] {
        assert_eq!(resp_err(raw, &c), want, "{}", text(raw));
    }
    // Identical duplicates are fine and forwarded once.
    let (r, out) = resp(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\n",
        &c,
    );
    assert_eq!(r.body, BodyKind::Length(3));
    assert_eq!(
        text(&out),
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nVia: 1.1 socksgate\r\n\r\n"
    );
    // Content-Length: 0 is no body, and is still forwarded.
    let (r, out) = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", &c);
    assert_eq!(r.body, BodyKind::None);
    assert!(r.keep_client && r.keep_origin);
    assert_eq!(
        text(&out),
        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nVia: 1.1 socksgate\r\n\r\n"
    );
}

#[test]
fn status_line_is_kept_as_received() {
    let c = ResponseContext {
        via: None,
        ..ctx(false, true, 1)
    };
    let (_, out) = resp(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", &c);
    assert_eq!(text(&out), "HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n");
    let (_, out) = resp(
        b"HTTP/1.1 404 Nicht gefunden \xe2\x9c\x97\nContent-Length: 0\n\n",
        &c,
    );
    assert_eq!(
        out,
        b"HTTP/1.1 404 Nicht gefunden \xe2\x9c\x97\r\nContent-Length: 0\r\n\r\n".to_vec()
    );
    // A framing field named as a connection option is still forwarded.
    let (r, out) = resp(
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\n",
        &c,
    );
    assert_eq!(r.body, BodyKind::Length(2));
    assert_eq!(text(&out), "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n");
}
