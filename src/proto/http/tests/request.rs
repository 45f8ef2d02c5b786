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
    for (raw, target, want) in [
        (
            &b"GET http://example.com HTTP/1.1\r\n\r\n"[..],
            domain("example.com", 80),
            "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        ),
        (
            b"GET http://example.com?q=1 HTTP/1.1\r\n\r\n",
            domain("example.com", 80),
            "GET /?q=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
        ),
        (
            b"OPTIONS http://example.com:81 HTTP/1.1\r\n\r\n",
            domain("example.com", 81),
            "OPTIONS * HTTP/1.1\r\nHost: example.com:81\r\n\r\n",
        ),
        (
            b"GET HTTP://example.com:/p HTTP/1.1\r\n\r\n",
            domain("example.com", 80),
            "GET /p HTTP/1.1\r\nHost: example.com:\r\n\r\n",
        ),
    ] {
        let (r, out) = req(raw, &NO_VIA);
        assert_eq!(r.target, target, "{}", text(raw));
        assert_eq!(text(&out), want);
    }
}

#[test]
fn forward_targets_with_literal_addresses() {
    for (raw, target) in [
        (
            &b"GET http://[::1]:8080/ HTTP/1.1\r\n\r\n"[..],
            "[::1]:8080",
        ),
        (b"GET http://192.0.2.1/ HTTP/1.1\r\n\r\n", "192.0.2.1:80"),
        // IPv4-mapped IPv6 is reported in its canonical IPv4 form.
        (
            b"GET http://[::ffff:192.0.2.1]/ HTTP/1.1\r\n\r\n",
            "192.0.2.1:80",
        ),
    ] {
        let (r, _) = req(raw, &NO_VIA);
        assert_eq!(r.target, ip(target), "{}", text(raw));
    }
    let (_, out) = req(b"GET http://[::1]:8080/ HTTP/1.1\r\n\r\n", &NO_VIA);
    assert_eq!(text(&out), "GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n");
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
    // (HTTP/1.x minor version, the connection fields, keep-alive)
    for (minor, fields, keep) in [
        (1, "", true),
        (1, "Connection: Close\r\n", false),
        (1, "Connection: foo, close\r\n", false),
        (1, "Proxy-Connection: close\r\n", false),
        (0, "", false),
        (0, "Connection: Keep-Alive\r\n", true),
        (0, "Proxy-Connection: keep-alive\r\n", true),
        (0, "Connection: keep-alive, close\r\n", false),
    ] {
        let raw = format!("GET http://e.x/ HTTP/1.{minor}\r\n{fields}\r\n");
        let (r, out) = req(raw.as_bytes(), &NO_VIA);
        assert_eq!(r.keep_alive, keep, "{raw}");
        let closes = text(&out).contains("Connection: close\r\n");
        assert_eq!(closes, !keep, "{raw}");
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
    for (raw, want) in [
        (
            &b"OPTIONS http://e.x/ HTTP/1.1\r\nMax-Forwards: 3\r\n\r\n"[..],
            "OPTIONS / HTTP/1.1\r\nHost: e.x\r\nMax-Forwards: 2\r\n\r\n",
        ),
        (
            b"TRACE http://e.x/t HTTP/1.1\r\nmax-forwards: 1\r\n\r\n",
            "TRACE /t HTTP/1.1\r\nHost: e.x\r\nmax-forwards: 0\r\n\r\n",
        ),
    ] {
        let (_, out) = req(raw, &NO_VIA);
        assert_eq!(text(&out), want);
    }
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
    assert!(out.is_empty());
    for (raw, target) in [
        (
            &b"CONNECT 192.0.2.7:443 HTTP/1.1\r\n\r\n"[..],
            ip("192.0.2.7:443"),
        ),
        (b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n", ip("[::1]:443")),
        (
            b"CONNECT www.example.com:8443 HTTP/1.1\r\nHost: www.example.com:8443\r\n\r\n",
            domain("www.example.com", 8443),
        ),
        // An explicit zero length is the same as no body.
        (
            b"CONNECT a.example:1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            domain("a.example", 1),
        ),
    ] {
        let (r, _) = req(raw, &VIA);
        assert_eq!(
            (r.target, r.body),
            (target, BodyKind::None),
            "{}",
            text(raw)
        );
    }
}

#[test]
fn bad_targets_and_syntax_errors_are_malformed() {
    for raw in [
        // CONNECT targets
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
        // forward targets
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"GET https://example.com/ HTTP/1.1\r\n\r\n",
        b"GET ftp://example.com/ HTTP/1.1\r\n\r\n",
        b"GET example.com:80 HTTP/1.1\r\n\r\n",
        b"GET http://user:pw@example.com/ HTTP/1.1\r\n\r\n",
        b"GET http:///path HTTP/1.1\r\n\r\n",
        b"GET http://exa%6dple.com/ HTTP/1.1\r\n\r\n",
        b"GET http://example.com/#frag HTTP/1.1\r\n\r\n",
        b"GET http://example.com:99999/ HTTP/1.1\r\n\r\n",
        b"GET * HTTP/1.1\r\n\r\n",
        // syntax
        b"GET http://e.x/ HTTP/2.0\r\n\r\n",
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
    use ProtoError::{Malformed, Smuggling};
    let cases: &[(Result<BodyKind, ProtoError>, &[&str])] = &[
        (
            Ok(BodyKind::Length(5)),
            &[
                "Content-Length: 5",
                "Content-Length: 005",
                "Content-Length: 5, 5",
                "Content-Length: 5\r\nContent-Length: 5",
            ],
        ),
        (Ok(BodyKind::None), &["Content-Length: 0"]),
        (
            Ok(BodyKind::Chunked),
            &[
                "Transfer-Encoding: chunked",
                "Transfer-Encoding: Chunked",
                "Transfer-Encoding: gzip, chunked",
                "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
            ],
        ),
        (
            Err(Malformed),
            &[
                "Content-Length: abc",
                "Content-Length: -1",
                "Content-Length: +5",
                "Content-Length: ",
                "Content-Length: 5,",
                "Content-Length: 99999999999999999999999",
                "Transfer-Encoding: gzip",
                "Transfer-Encoding: chunked, gzip",
                "Transfer-Encoding: chunked, chunked",
                "Transfer-Encoding: chunked;x=1",
                "Transfer-Encoding: ",
                "Transfer-Encoding: xchunked",
            ],
        ),
        (
            Err(Smuggling),
            &[
                "Content-Length: 5, 6",
                "Content-Length: 5\r\nContent-Length: 6",
                "Transfer-Encoding: chunked\r\nContent-Length: 5",
                "Content-Length: 5\r\nTransfer-Encoding: chunked",
                "Content-Length: 0\r\nTransfer-Encoding: gzip",
            ],
        ),
    ];
    for (want, all_fields) in cases {
        for fields in *all_fields {
            let raw = format!("POST http://e.x/ HTTP/1.1\r\n{fields}\r\n\r\n");
            let mut out = Vec::new();
            let got =
                parse_request(raw.as_bytes(), DEFAULT_MAX_HEAD, &NO_VIA, &mut out).map(
                    |p| match p {
                        Parse::Done(r, _) => r.body,
                        Parse::Incomplete => panic!("incomplete {raw}"),
                    },
                );
            assert_eq!(&got, want, "{raw}");
        }
    }
    // HTTP/1.0 does not know Transfer-Encoding: its framing is faulty (RFC 9112 §6.1).
    assert_eq!(
        req_err(b"POST http://e.x/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        Smuggling
    );
}

#[test]
fn framing_fields_are_forwarded_and_duplicates_normalized() {
    for (fields, body, want) in [
        (
            "Content-Length: 5, 5\r\nX: 1\r\nContent-Length: 5\r\n",
            BodyKind::Length(5),
            "Content-Length: 5\r\nX: 1\r\n",
        ),
        (
            "Transfer-Encoding: gzip, chunked\r\n",
            BodyKind::Chunked,
            "Transfer-Encoding: gzip, chunked\r\n",
        ),
        // Listing a framing field as a connection option must not strip it (that would desync the origin).
        (
            "Connection: Content-Length, Transfer-Encoding\r\nContent-Length: 2\r\n",
            BodyKind::Length(2),
            "Content-Length: 2\r\n",
        ),
    ] {
        let raw = format!("POST http://e.x/ HTTP/1.1\r\n{fields}\r\n");
        let (r, out) = req(raw.as_bytes(), &NO_VIA);
        assert_eq!(r.body, body, "{raw}");
        assert_eq!(
            text(&out),
            format!("POST / HTTP/1.1\r\nHost: e.x\r\n{want}\r\n")
        );
    }
}

#[test]
fn head_too_large() {
    use ProtoError::HeadTooLarge;
    let raw =
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nX-Pad: aaaaaaaaaaaaaaaa\r\n\r\n";
    let mut out = Vec::new();
    // Exactly max_head: accepted.
    assert!(matches!(
        parse_request(raw, raw.len(), &NO_VIA, &mut out),
        Ok(Parse::Done(_, n)) if n == raw.len()
    ));
    let partial = prefix(raw, 40);
    for (input, max_head, want) in [
        // Complete but one byte longer than allowed.
        (&raw[..], raw.len() - 1, Err(HeadTooLarge)),
        // Incomplete and already at the limit.
        (partial, 40, Err(HeadTooLarge)),
        (partial, 41, Ok(Parse::Incomplete)),
        (b"", 0, Err(HeadTooLarge)),
        // Endless empty lines hit the limit too.
        (&[b'\n'; 100], 100, Err(HeadTooLarge)),
    ] {
        let got = parse_request(input, max_head, &NO_VIA, &mut out);
        assert_eq!(got, want, "{max_head} {}", text(input));
    }
    // The same limit applies to responses.
    let r = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    let c = ctx(false, true, 1);
    for (input, max_head) in [(&r[..], r.len() - 1), (prefix(r, 10), 10)] {
        let got = parse_response(input, max_head, &c, &mut out);
        assert_eq!(got, Err(HeadTooLarge), "{max_head}");
    }
}

#[test]
fn is_head_flag() {
    for (method, is_head) in [("HEAD", true), ("GET", false)] {
        let (r, _) = req(
            format!("{method} http://e.x/ HTTP/1.1\r\n\r\n").as_bytes(),
            &NO_VIA,
        );
        assert_eq!(r.is_head, is_head, "{method}");
    }
}
