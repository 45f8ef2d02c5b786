//! Unit tests of the HTTP layer, by part; the helpers below are shared.

use std::fmt;
use std::net::SocketAddr;

use super::*;
use crate::proto::{Name, Parse, ProtoError, TargetAddr};

const VIA: RewriteOptions<'static> = RewriteOptions {
    via: Some("socksgate"),
};
const NO_VIA: RewriteOptions<'static> = RewriteOptions { via: None };

fn prefix(b: &[u8], n: usize) -> &[u8] {
    b.get(..n).unwrap_or(b)
}

/// The value of a parse of the whole of `raw`, which must be Done with `consumed == head_len`.
fn done<T: fmt::Debug>(
    raw: &[u8],
    parsed: Result<Parse<T>, ProtoError>,
    head_len: fn(&T) -> usize,
) -> T {
    match parsed {
        Ok(Parse::Done(v, n)) => {
            assert_eq!(n, head_len(&v));
            v
        }
        other => panic!("expected Done for {:?}, got {other:?}", text(raw)),
    }
}

/// The error of a parse of the whole of `raw`.
fn failed<T: fmt::Debug>(raw: &[u8], parsed: Result<Parse<T>, ProtoError>) -> ProtoError {
    match parsed {
        Err(e) => e,
        other => panic!("expected an error for {:?}, got {other:?}", text(raw)),
    }
}

/// Every strict prefix of `raw` is Incomplete.
fn incomplete_until_last_byte<T: fmt::Debug + PartialEq>(
    raw: &[u8],
    mut parse: impl FnMut(&[u8], &mut Vec<u8>) -> Result<Parse<T>, ProtoError>,
) {
    let mut out = Vec::new();
    for n in 0..raw.len() {
        let got = parse(prefix(raw, n), &mut out);
        assert_eq!(got, Ok(Parse::Incomplete), "prefix {n} of {:?}", text(raw));
    }
}

fn req(raw: &[u8], opts: &RewriteOptions<'_>) -> (Request, Vec<u8>) {
    let mut out = Vec::new();
    let parsed = parse_request(raw, DEFAULT_MAX_HEAD, opts, &mut out);
    (done(raw, parsed, |r| r.head_len), out)
}

fn req_err(raw: &[u8]) -> ProtoError {
    failed(
        raw,
        parse_request(raw, DEFAULT_MAX_HEAD, &VIA, &mut Vec::new()),
    )
}

/// Every strict prefix is Incomplete and the whole head is Done with head_len == its length.
fn req_split_everywhere(raw: &[u8]) -> (Request, Vec<u8>) {
    incomplete_until_last_byte(raw, |b, out| parse_request(b, DEFAULT_MAX_HEAD, &VIA, out));
    let (r, out) = req(raw, &VIA);
    assert_eq!(r.head_len, raw.len());
    (r, out)
}

fn ctx(head: bool, keep: bool, minor: u8) -> ResponseContext<'static> {
    ResponseContext {
        request_is_head: head,
        client_keep_alive: keep,
        client_minor_version: minor,
        via: Some("socksgate"),
    }
}

fn resp(raw: &[u8], c: &ResponseContext<'_>) -> (Response, Vec<u8>) {
    let mut out = Vec::new();
    let parsed = parse_response(raw, DEFAULT_MAX_HEAD, c, &mut out);
    (done(raw, parsed, |r| r.head_len), out)
}

fn resp_err(raw: &[u8], c: &ResponseContext<'_>) -> ProtoError {
    failed(
        raw,
        parse_response(raw, DEFAULT_MAX_HEAD, c, &mut Vec::new()),
    )
}

/// As [`req_split_everywhere`], for a response.
fn resp_split_everywhere(raw: &[u8], c: &ResponseContext<'_>) -> (Response, Vec<u8>) {
    incomplete_until_last_byte(raw, |b, out| parse_response(b, DEFAULT_MAX_HEAD, c, out));
    let (r, out) = resp(raw, c);
    assert_eq!(r.head_len, raw.len());
    (r, out)
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

fn domain(name: &str, port: u16) -> TargetAddr {
    match Name::new(name.as_bytes()) {
        Some(n) => TargetAddr::Domain(n, port),
        None => panic!("bad test name {name}"),
    }
}

fn ip(s: &str) -> TargetAddr {
    match s.parse::<SocketAddr>() {
        Ok(a) => TargetAddr::Ip(a),
        Err(e) => panic!("bad test address {s}: {e}"),
    }
}

/// Requests the parser must accept, one per shape; the fuzz loop mutates them.
const VALID_REQUESTS: &[&[u8]] = &[
    b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"GET http://example.com HTTP/1.0\r\n\r\n",
    b"\r\n\r\nGET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"POST http://10.0.0.1:8080/form?a=b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
    b"PUT http://[2001:db8::1]/up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HEAD http://example.com/ HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    b"CONNECT 192.0.2.7:22 HTTP/1.0\r\n\r\n",
    b"CONNECT [::1]:443 HTTP/1.1\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\r\n",
    b"OPTIONS http://example.com HTTP/1.1\r\nMax-Forwards: 3\r\n\r\n",
];

/// Responses the parser must accept, one per shape; the fuzz loop mutates them too.
const VALID_RESPONSES: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
    b"HTTP/1.1 500\r\n\r\n",
    b"\r\nHTTP/1.1 200 OK\r\n\r\n",
];

mod body;
mod canned;
mod credentials;
mod fuzz;
mod request;
mod response;
