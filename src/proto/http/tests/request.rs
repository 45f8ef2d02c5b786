//! Request heads.

use super::*;

#[test]
fn every_valid_request_is_incomplete_until_its_last_byte() {
    for raw in VALID_REQUESTS {
        req_split_everywhere(raw);
    }
}

#[test]
fn leading_empty_lines_are_skipped_and_counted() {
    let raw = b"\r\n\r\nGET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n";
    let (r, out) = req(raw, &NO_VIA);
    assert_eq!(r.head_len, raw.len());
    assert_eq!(text(&out), "GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n");
}

#[test]
fn two_requests_joined_stop_at_the_first() {
    let first = b"GET http://a.example/1 HTTP/1.1\r\nHost: a.example\r\n\r\n";
    let second = b"GET http://a.example/2 HTTP/1.1\r\nHost: a.example\r\n\r\n";
    let mut both = first.to_vec();
    both.extend_from_slice(second);
    let (r, out) = req(&both, &NO_VIA);
    assert_eq!(r.head_len, first.len());
    assert_eq!(text(&out), "GET /1 HTTP/1.1\r\nHost: a.example\r\n\r\n");
    let rest = both.get(r.head_len..).unwrap_or(&[]);
    let (r2, out2) = req(rest, &NO_VIA);
    assert_eq!(r2.head_len, second.len());
    assert_eq!(text(&out2), "GET /2 HTTP/1.1\r\nHost: a.example\r\n\r\n");
}

#[test]
fn forward_head_is_rewritten_byte_exact() {
    let raw = b"POST http://Example.com:8080/a/b?x=1&y=2 HTTP/1.1\r\n\
        Host: evil.example\r\n\
        User-Agent: t/1\r\n\
        Connection: keep-alive, X-Hop\r\n\
        X-Hop: secret\r\n\
        Proxy-Connection: keep-alive\r\n\
        Keep-Alive: timeout=5\r\n\
        TE: trailers\r\n\
        Trailer: X-Sum\r\n\
        Upgrade: h2c\r\n\
        Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
        Proxy-Authenticate: Basic\r\n\
        Content-Length: 3\r\n\
        Via: 1.1 upstream\r\n\
        Accept: */*\r\n\r\n";
    let (r, out) = req_split_everywhere(raw);
    assert_eq!(r.kind, RequestKind::Forward);
    assert_eq!(r.target, domain("Example.com", 8080));
    assert_eq!(r.body, BodyKind::Length(3));
    assert!(r.keep_alive);
    assert!(r.auth_present);
    assert_eq!(
        text(&out),
        "POST /a/b?x=1&y=2 HTTP/1.1\r\n\
         Host: Example.com:8080\r\n\
         User-Agent: t/1\r\n\
         Content-Length: 3\r\n\
         Via: 1.1 upstream\r\n\
         Accept: */*\r\n\
         Via: 1.1 socksgate\r\n\r\n"
    );
}

#[test]
fn default_path_query_only_and_options_asterisk() {
    let (r, out) = req(b"GET http://example.com HTTP/1.1\r\n\r\n", &NO_VIA);
    assert_eq!(r.target, domain("example.com", 80));
    assert_eq!(text(&out), "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n");
    let (_, out) = req(b"GET http://example.com?q=1 HTTP/1.1\r\n\r\n", &NO_VIA);
    assert_eq!(
        text(&out),
        "GET /?q=1 HTTP/1.1\r\nHost: example.com\r\n\r\n"
    );
    let (_, out) = req(b"OPTIONS http://example.com:81 HTTP/1.1\r\n\r\n", &NO_VIA);
    assert_eq!(
        text(&out),
        "OPTIONS * HTTP/1.1\r\nHost: example.com:81\r\n\r\n"
    );
    let (r, out) = req(b"GET HTTP://example.com:/p HTTP/1.1\r\n\r\n", &NO_VIA);
    assert_eq!(r.target, domain("example.com", 80));
    assert_eq!(text(&out), "GET /p HTTP/1.1\r\nHost: example.com:\r\n\r\n");
}

#[test]
fn forward_targets_with_literal_addresses() {
    let (r, out) = req(b"GET http://[::1]:8080/ HTTP/1.1\r\n\r\n", &NO_VIA);
    assert_eq!(r.target, ip("[::1]:8080"));
    assert_eq!(text(&out), "GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n");
    let (r, _) = req(b"GET http://192.0.2.1/ HTTP/1.1\r\n\r\n", &NO_VIA);
    assert_eq!(r.target, ip("192.0.2.1:80"));
    // IPv4-mapped IPv6 is reported in its canonical IPv4 form.
    let (r, _) = req(b"GET http://[::ffff:192.0.2.1]/ HTTP/1.1\r\n\r\n", &NO_VIA);
    assert_eq!(r.target, ip("192.0.2.1:80"));
}

#[test]
fn http10_keeps_its_version_and_gets_connection_close() {
    let (r, out) = req(
        b"GET http://example.com/ HTTP/1.0\r\nUser-Agent: old\r\n\r\n",
        &VIA,
    );
    assert_eq!(r.minor_version, 0);
    assert!(!r.keep_alive);
    assert_eq!(
        text(&out),
        "GET / HTTP/1.0\r\nHost: example.com\r\nUser-Agent: old\r\nConnection: close\r\nVia: 1.0 socksgate\r\n\r\n"
    );
}

#[test]
fn keep_alive_rules() {
    let cases: &[(&[u8], bool)] = &[
        (b"GET http://e.x/ HTTP/1.1\r\n\r\n", true),
        (
            b"GET http://e.x/ HTTP/1.1\r\nConnection: Close\r\n\r\n",
            false,
        ),
        (
            b"GET http://e.x/ HTTP/1.1\r\nConnection: foo, close\r\n\r\n",
            false,
        ),
        (
            b"GET http://e.x/ HTTP/1.1\r\nProxy-Connection: close\r\n\r\n",
            false,
        ),
        (b"GET http://e.x/ HTTP/1.0\r\n\r\n", false),
        (
            b"GET http://e.x/ HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
            true,
        ),
        (
            b"GET http://e.x/ HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n",
            true,
        ),
        (
            b"GET http://e.x/ HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
            false,
        ),
    ];
    for (raw, keep) in cases {
        let (r, out) = req(raw, &NO_VIA);
        assert_eq!(r.keep_alive, *keep, "{}", text(raw));
        assert_eq!(
            text(&out).contains("Connection: close\r\n"),
            !keep,
            "{}",
            text(raw)
        );
    }
    let (_, out) = req(
        b"GET http://e.x/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        &NO_VIA,
    );
    assert_eq!(
        text(&out),
        "GET / HTTP/1.0\r\nHost: e.x\r\nConnection: keep-alive\r\n\r\n"
    );
}

#[test]
fn max_forwards_is_decremented_on_trace_and_options_only() {
    let (_, out) = req(
        b"OPTIONS http://e.x/ HTTP/1.1\r\nMax-Forwards: 3\r\n\r\n",
        &NO_VIA,
    );
    assert_eq!(
        text(&out),
        "OPTIONS / HTTP/1.1\r\nHost: e.x\r\nMax-Forwards: 2\r\n\r\n"
    );
    let (_, out) = req(
        b"TRACE http://e.x/t HTTP/1.1\r\nmax-forwards: 1\r\n\r\n",
        &NO_VIA,
    );
    assert_eq!(
        text(&out),
        "TRACE /t HTTP/1.1\r\nHost: e.x\r\nmax-forwards: 0\r\n\r\n"
    );
    // Other methods, and values that are not a positive number, pass unchanged.
    for raw in [
        &b"GET http://e.x/ HTTP/1.1\r\nMax-Forwards: 3\r\n\r\n"[..],
        b"OPTIONS http://e.x/ HTTP/1.1\r\nMax-Forwards: 0\r\n\r\n",
        b"OPTIONS http://e.x/ HTTP/1.1\r\nMax-Forwards: x1\r\n\r\n",
    ] {
        let (_, out) = req(raw, &NO_VIA);
        let want = text(raw).split("\r\n").nth(1).unwrap_or("").to_string();
        assert!(text(&out).contains(&format!("{want}\r\n")), "{}", text(raw));
    }
}

#[test]
fn via_can_be_disabled_and_is_never_injected() {
    let raw = b"GET http://e.x/ HTTP/1.1\r\n\r\n";
    let (_, out) = req(raw, &NO_VIA);
    assert!(!text(&out).contains("Via"));
    let evil = RewriteOptions {
        via: Some("x\r\nEvil: 1"),
    };
    let (_, out) = req(raw, &evil);
    assert_eq!(text(&out), "GET / HTTP/1.1\r\nHost: e.x\r\n\r\n");
}

#[test]
fn connect_targets() {
    let (r, out) = req(b"CONNECT 192.0.2.7:443 HTTP/1.1\r\n\r\n", &VIA);
    assert_eq!(r.kind, RequestKind::Connect);
    assert_eq!(r.target, ip("192.0.2.7:443"));
    assert!(out.is_empty());
    let (r, _) = req(b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n", &VIA);
    assert_eq!(r.target, ip("[::1]:443"));
    let (r, _) = req(
        b"CONNECT www.example.com:8443 HTTP/1.1\r\nHost: www.example.com:8443\r\n\r\n",
        &VIA,
    );
    assert_eq!(r.target, domain("www.example.com", 8443));
    assert_eq!(r.body, BodyKind::None);
    // An explicit zero length is the same as no body.
    let (r, _) = req(
        b"CONNECT a.example:1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        &VIA,
    );
    assert_eq!(r.body, BodyKind::None);
}

#[test]
fn bad_connect_targets_are_malformed() {
    for raw in [
        &b"CONNECT example.com HTTP/1.1\r\n\r\n"[..],
        b"CONNECT example.com: HTTP/1.1\r\n\r\n",
        b"CONNECT example.com:0 HTTP/1.1\r\n\r\n",
        b"CONNECT example.com:65536 HTTP/1.1\r\n\r\n",
        b"CONNECT example.com:+443 HTTP/1.1\r\n\r\n",
        b"CONNECT [::1] HTTP/1.1\r\n\r\n",
        b"CONNECT ::1:443 HTTP/1.1\r\n\r\n",
        b"CONNECT [::1 HTTP/1.1\r\n\r\n",
        b"CONNECT [fe80::1%25eth0]:443 HTTP/1.1\r\n\r\n",
        b"CONNECT :443 HTTP/1.1\r\n\r\n",
        b"CONNECT user@example.com:443 HTTP/1.1\r\n\r\n",
        b"CONNECT http://example.com:443/ HTTP/1.1\r\n\r\n",
        b"CONNECT 127.1:443 HTTP/1.1\r\n\r\n",
        b"CONNECT 0x7f.0.0.1:443 HTTP/1.1\r\n\r\n",
        b"CONNECT a.example:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
        b"CONNECT a.example:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        assert_eq!(req_err(raw), ProtoError::Malformed, "{}", text(raw));
    }
}

#[test]
fn bad_forward_targets_are_malformed() {
    for raw in [
        &b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"[..],
        b"GET https://example.com/ HTTP/1.1\r\n\r\n",
        b"GET ftp://example.com/ HTTP/1.1\r\n\r\n",
        b"GET example.com:80 HTTP/1.1\r\n\r\n",
        b"GET http://user:pw@example.com/ HTTP/1.1\r\n\r\n",
        b"GET http:///path HTTP/1.1\r\n\r\n",
        b"GET http://exa%6dple.com/ HTTP/1.1\r\n\r\n",
        b"GET http://example.com/#frag HTTP/1.1\r\n\r\n",
        b"GET http://example.com:99999/ HTTP/1.1\r\n\r\n",
        b"GET * HTTP/1.1\r\n\r\n",
    ] {
        assert_eq!(req_err(raw), ProtoError::Malformed, "{}", text(raw));
    }
}

#[test]
fn syntax_errors_are_malformed() {
    for raw in [
        &b"GET http://e.x/ HTTP/2.0\r\n\r\n"[..],
        b"GET http://e.x/ HTTP/1.1\r\nHost : e.x\r\n\r\n",
        b"GET http://e.x/ HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
        b"GET  http://e.x/ HTTP/1.1\r\n\r\n",
        b"G(T http://e.x/ HTTP/1.1\r\n\r\n",
        b"GET http://e.x/ HTTP/1.1\r\nBad\x00Name: 1\r\n\r\n",
        b"GET http://e.x/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET http://e.x/ HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
    ] {
        assert_eq!(req_err(raw), ProtoError::Malformed, "{}", text(raw));
    }
}

#[test]
fn header_count_limit() {
    let mut ok = b"GET http://e.x/ HTTP/1.1\r\n".to_vec();
    for i in 0..MAX_HEADERS {
        ok.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    let mut too_many = ok.clone();
    ok.extend_from_slice(b"\r\n");
    too_many.extend_from_slice(b"X-last: v\r\n\r\n");
    let (r, _) = req(&ok, &NO_VIA);
    assert_eq!(r.head_len, ok.len());
    assert_eq!(req_err(&too_many), ProtoError::Malformed);
}

#[test]
fn request_framing_and_smuggling() {
    let cases: &[(&[u8], Result<BodyKind, ProtoError>)] = &[
        (b"Content-Length: 5\r\n", Ok(BodyKind::Length(5))),
        (b"Content-Length: 0\r\n", Ok(BodyKind::None)),
        (b"Content-Length: 005\r\n", Ok(BodyKind::Length(5))),
        (b"Content-Length: 5, 5\r\n", Ok(BodyKind::Length(5))),
        (
            b"Content-Length: 5\r\nContent-Length: 5\r\n",
            Ok(BodyKind::Length(5)),
        ),
        (b"Content-Length: 5, 6\r\n", Err(ProtoError::Smuggling)),
        (
            b"Content-Length: 5\r\nContent-Length: 6\r\n",
            Err(ProtoError::Smuggling),
        ),
        (b"Content-Length: abc\r\n", Err(ProtoError::Malformed)),
        (b"Content-Length: -1\r\n", Err(ProtoError::Malformed)),
        (b"Content-Length: +5\r\n", Err(ProtoError::Malformed)),
        (b"Content-Length: \r\n", Err(ProtoError::Malformed)),
        (b"Content-Length: 5,\r\n", Err(ProtoError::Malformed)),
        (
            b"Content-Length: 99999999999999999999999\r\n",
            Err(ProtoError::Malformed),
        ),
        (b"Transfer-Encoding: chunked\r\n", Ok(BodyKind::Chunked)),
        (b"Transfer-Encoding: Chunked\r\n", Ok(BodyKind::Chunked)),
        (
            b"Transfer-Encoding: gzip, chunked\r\n",
            Ok(BodyKind::Chunked),
        ),
        (
            b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
            Ok(BodyKind::Chunked),
        ),
        (b"Transfer-Encoding: gzip\r\n", Err(ProtoError::Malformed)),
        (
            b"Transfer-Encoding: chunked, gzip\r\n",
            Err(ProtoError::Malformed),
        ),
        (
            b"Transfer-Encoding: chunked, chunked\r\n",
            Err(ProtoError::Malformed),
        ),
        (
            b"Transfer-Encoding: chunked;x=1\r\n",
            Err(ProtoError::Malformed),
        ),
        (b"Transfer-Encoding: \r\n", Err(ProtoError::Malformed)),
        (
            b"Transfer-Encoding: xchunked\r\n",
            Err(ProtoError::Malformed),
        ),
        (
            b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            Err(ProtoError::Smuggling),
        ),
        (
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            Err(ProtoError::Smuggling),
        ),
        (
            b"Content-Length: 0\r\nTransfer-Encoding: gzip\r\n",
            Err(ProtoError::Smuggling),
        ),
    ];
    for (fields, want) in cases {
        let mut raw = b"POST http://e.x/ HTTP/1.1\r\n".to_vec();
        raw.extend_from_slice(fields);
        raw.extend_from_slice(b"\r\n");
        let mut out = Vec::new();
        let got = parse_request(&raw, DEFAULT_MAX_HEAD, &NO_VIA, &mut out).map(|p| match p {
            Parse::Done(r, _) => r.body,
            Parse::Incomplete => panic!("incomplete {}", text(&raw)),
        });
        assert_eq!(&got, want, "{}", text(&raw));
    }
    // HTTP/1.0 does not know Transfer-Encoding: its framing is faulty (RFC 9112 §6.1).
    assert_eq!(
        req_err(b"POST http://e.x/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ProtoError::Smuggling
    );
}

#[test]
fn framing_fields_are_forwarded_and_duplicates_normalized() {
    let (_, out) = req(
        b"POST http://e.x/ HTTP/1.1\r\nContent-Length: 5, 5\r\nX: 1\r\nContent-Length: 5\r\n\r\n",
        &NO_VIA,
    );
    assert_eq!(
        text(&out),
        "POST / HTTP/1.1\r\nHost: e.x\r\nContent-Length: 5\r\nX: 1\r\n\r\n"
    );
    let (_, out) = req(
        b"POST http://e.x/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        &NO_VIA,
    );
    assert_eq!(
        text(&out),
        "POST / HTTP/1.1\r\nHost: e.x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    );
    // Listing a framing field as a connection option must not strip it (that would desync the origin).
    let (r, out) = req(
        b"POST http://e.x/ HTTP/1.1\r\nConnection: Content-Length, Transfer-Encoding\r\nContent-Length: 2\r\n\r\n",
        &NO_VIA,
    );
    assert_eq!(r.body, BodyKind::Length(2));
    assert_eq!(
        text(&out),
        "POST / HTTP/1.1\r\nHost: e.x\r\nContent-Length: 2\r\n\r\n"
    );
}

#[test]
fn head_too_large() {
    let raw =
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nX-Pad: aaaaaaaaaaaaaaaa\r\n\r\n";
    let mut out = Vec::new();
    // Exactly max_head: accepted.
    assert!(matches!(
        parse_request(raw, raw.len(), &NO_VIA, &mut out),
        Ok(Parse::Done(_, n)) if n == raw.len()
    ));
    // Complete but one byte longer than allowed.
    assert_eq!(
        parse_request(raw, raw.len() - 1, &NO_VIA, &mut out),
        Err(ProtoError::HeadTooLarge)
    );
    // Incomplete and already at the limit.
    let partial = prefix(raw, 40);
    assert_eq!(
        parse_request(partial, 40, &NO_VIA, &mut out),
        Err(ProtoError::HeadTooLarge)
    );
    assert_eq!(
        parse_request(partial, 41, &NO_VIA, &mut out),
        Ok(Parse::Incomplete)
    );
    assert_eq!(
        parse_request(b"", 0, &NO_VIA, &mut out),
        Err(ProtoError::HeadTooLarge)
    );
    // Endless empty lines hit the limit too.
    assert_eq!(
        parse_request(&[b'\n'; 100], 100, &NO_VIA, &mut out),
        Err(ProtoError::HeadTooLarge)
    );
    // The same limit applies to responses.
    let r = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    let c = ctx(false, true, 1);
    assert_eq!(
        parse_response(r, r.len() - 1, &c, &mut out),
        Err(ProtoError::HeadTooLarge)
    );
    assert_eq!(
        parse_response(prefix(r, 10), 10, &c, &mut out),
        Err(ProtoError::HeadTooLarge)
    );
}

#[test]
fn is_head_flag() {
    let (r, _) = req(b"HEAD http://e.x/ HTTP/1.1\r\n\r\n", &NO_VIA);
    assert!(r.is_head);
    let (r, _) = req(b"GET http://e.x/ HTTP/1.1\r\n\r\n", &NO_VIA);
    assert!(!r.is_head);
}
