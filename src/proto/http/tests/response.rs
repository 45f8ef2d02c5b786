//! Response heads.

use super::*;

/// The head `first` with `then` right behind it: the parse stops at the end of `first`.
fn stops_at_the_first_head(first: &[u8], then: &[u8]) {
    let mut both = first.to_vec();
    both.extend_from_slice(then);
    let (r, _) = resp(&both, &ctx(false, true, 1));
    assert_eq!(r.head_len, first.len());
}

#[test]
fn every_valid_response_is_incomplete_until_its_last_byte() {
    let c = ctx(false, true, 1);
    for raw in VALID_RESPONSES {
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
    stops_at_the_first_head(raw, b"hello world!HTTP/1.1 204 No Content\r\n\r\n");
}

#[test]
fn responses_without_a_body() {
    // (status, Content-Length, the request was HEAD, the length is forwarded); all keep both connections.
    for (status, length, head, forwarded) in [
        ("200 OK", Some(1234), true, true),
        // Even without any length a HEAD response ends at its head.
        ("200 OK", None, true, false),
        ("204 No Content", Some(5), false, false),
        ("304 Not Modified", Some(5), false, true),
    ] {
        let fields = length.map_or(String::new(), |n| format!("Content-Length: {n}\r\n"));
        let raw = format!("HTTP/1.1 {status}\r\n{fields}\r\n");
        let (r, out) = resp(raw.as_bytes(), &ctx(head, true, 1));
        assert_eq!(r.body, BodyKind::None, "{raw}");
        assert!(r.keep_client && r.keep_origin, "{raw}");
        let kept = if forwarded { fields.as_str() } else { "" };
        let want = format!("HTTP/1.1 {status}\r\n{kept}Via: 1.1 socksgate\r\n\r\n");
        assert_eq!(text(&out), want);
    }
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
    let rest = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    stops_at_the_first_head(raw, rest);
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
    // (the origin's HTTP/1.x minor version, its framing field)
    for (minor, field) in [
        (1, "Content-Type: text/plain"),
        (1, "Transfer-Encoding: gzip"),
        (1, "Transfer-Encoding: chunked, gzip"),
        (0, "Transfer-Encoding: chunked"),
    ] {
        let raw = format!("HTTP/1.{minor} 200 OK\r\n{field}\r\n\r\n");
        let (r, out) = resp(raw.as_bytes(), &ctx(false, true, 1));
        assert_eq!(r.body, BodyKind::UntilClose, "{raw}");
        assert!(!r.keep_client && !r.keep_origin, "{raw}");
        let end = format!("Connection: close\r\nVia: 1.{minor} socksgate\r\n\r\n");
        assert!(text(&out).ends_with(&end), "{raw}");
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
