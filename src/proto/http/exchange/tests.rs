//! In-memory tests of the exchange machine: a driver plays the worker (buffers, partial writes, reads of a few
//! bytes at a time) between a scripted client and a scripted origin, without sockets. Every scenario must give the
//! same transcript however the bytes are cut and however little each write takes.

use super::*;
use crate::proto::http::DEFAULT_MAX_HEAD;

const OPTS: HeadOptions<'static> = HeadOptions {
    max_head: DEFAULT_MAX_HEAD,
    via: None,
    draining: false,
    http_upstream: false,
};

/// What the driver saw, in order; equal across every way of cutting the same input.
#[derive(Debug, PartialEq, Eq)]
struct Transcript {
    /// Bytes that reached the origin, per origin connection.
    origin: Vec<Vec<u8>>,
    /// Bytes that reached the client.
    client: Vec<u8>,
    /// Decisions: requests served, statuses, keep-alive outcomes, refusals.
    events: Vec<String>,
}

/// One scripted run: the client's bytes, one response per request the origin receives, and the driver's limits.
struct Run<'a> {
    client: &'a [u8],
    responses: &'a [&'a [u8]],
    /// Users configured: requests need `alice:secret` (Basic YWxpY2U6c2VjcmV0).
    users: bool,
    /// Bytes per read, either side.
    rate: usize,
    /// Bytes each write takes at most (partial writes).
    write: usize,
}

/// The driver's origin connection handle: its index in [`Transcript::origin`], so what the exchange hands back is
/// where the bytes go.
type Handle = usize;

/// Bound on driver turns: the scripts are a few hundred bytes, read one byte per turn at worst.
const MAX_TURNS: usize = 100_000;

fn run(r: &Run<'_>) -> Transcript {
    let mut x: Exchange<Handle> = Exchange::new();
    let mut t = Transcript {
        origin: Vec::new(),
        client: Vec::new(),
        events: Vec::new(),
    };
    let (mut client_fed, mut c_buf, mut o_buf) = (0, Vec::new(), Vec::new());
    let mut origin_queue: Vec<u8> = Vec::new();
    let mut responses = r.responses.iter();
    // Whether the origin's response for the current request was already queued.
    let mut answered = false;
    let mut out = Vec::new();
    for _ in 0..MAX_TURNS {
        let feed_client = |c_buf: &mut Vec<u8>, fed: &mut usize| {
            let n = r.rate.min(r.client.len() - *fed);
            c_buf.extend_from_slice(&r.client[*fed..*fed + n]);
            *fed += n;
            n > 0
        };
        if !x.in_flight() {
            match x.read_head(&c_buf, &OPTS, &mut out) {
                HeadEvent::NeedHead => {
                    if !feed_client(&mut c_buf, &mut client_fed) {
                        t.events.push(String::from("client done"));
                        return t;
                    }
                }
                HeadEvent::Request { request, consumed } => {
                    c_buf.drain(..consumed);
                    let ok = match proxy_auth(r.users, &request) {
                        ProxyAuth::Open => true,
                        ProxyAuth::Verify(c) => c.user() == b"alice" && c.pass() == b"secret",
                        ProxyAuth::Refuse => false,
                    };
                    if !ok {
                        t.events.push(String::from("407"));
                        return t;
                    }
                    if let Begin::Connect(old, waiting) = x.begin(&request, false) {
                        // A kept connection that cannot carry this request is the last one opened.
                        assert!(old.is_none_or(|o| o + 1 == t.origin.len()), "{old:?}");
                        t.origin.push(Vec::new());
                        o_buf.clear();
                        x.connected(waiting, t.origin.len() - 1);
                    }
                    t.events.push(format!("request {:?}", request.target));
                    let o = *x.origin().expect("in flight on its connection");
                    t.origin[o].extend_from_slice(&out);
                    answered = false;
                }
                other => {
                    t.events.push(format!("{other:?}"));
                    return t;
                }
            }
            continue;
        }
        // Request side: forward body bytes, a few at a time.
        match x.request_step(&c_buf) {
            UploadEvent::Body(n) => {
                let w = n.min(r.write);
                let o = *x.origin().expect("in flight on its connection");
                t.origin[o].extend_from_slice(&c_buf[..w]);
                c_buf.drain(..w);
                x.sent_to_origin(w);
            }
            UploadEvent::NeedBody => {
                feed_client(&mut c_buf, &mut client_fed);
            }
            UploadEvent::Complete | UploadEvent::Sent if !answered => {
                // The origin answers once it has the whole request.
                answered = true;
                match responses.next() {
                    Some(resp) => origin_queue.extend_from_slice(resp),
                    None => {
                        t.events.push(String::from("origin has no answer"));
                        return t;
                    }
                }
            }
            UploadEvent::Sent => {
                // Pipelined bytes are read while the response is awaited, but not parsed.
                feed_client(&mut c_buf, &mut client_fed);
            }
            other => {
                t.events.push(format!("{other:?}"));
                return t;
            }
        }
        // Response side.
        match x.origin_step(&o_buf, &OPTS, &mut out) {
            OriginEvent::NeedHead | OriginEvent::NeedBody => {
                let n = r.rate.min(origin_queue.len());
                o_buf.extend(origin_queue.drain(..n));
            }
            OriginEvent::Head {
                consumed, status, ..
            } => {
                o_buf.drain(..consumed);
                t.client.extend_from_slice(&out);
                t.events.push(format!("status {status}"));
            }
            OriginEvent::Body(n) => {
                let w = n.min(r.write);
                t.client.extend_from_slice(&o_buf[..w]);
                o_buf.drain(..w);
                x.sent_to_client(w);
            }
            OriginEvent::Complete => {
                assert!(x.response_complete());
                let leftover = !o_buf.is_empty() || !origin_queue.is_empty();
                let client_eof = client_fed == r.client.len() && c_buf.is_empty();
                let (after, closed) = x.finish(client_eof, false, leftover);
                match after {
                    After::Close => {
                        assert!(closed.is_some(), "the origin is handed back to be closed");
                        t.events.push(String::from("close"));
                        return t;
                    }
                    After::Next { keep_origin } => {
                        assert_eq!(closed.is_none(), keep_origin, "kept, or handed back");
                        assert_eq!(x.origin().is_some(), keep_origin);
                        t.events.push(format!("next, keep origin {keep_origin}"));
                    }
                }
            }
            other => {
                t.events.push(format!("{other:?}"));
                return t;
            }
        }
    }
    panic!("no end after {MAX_TURNS} turns: {t:?}");
}

/// The transcript of `client`/`responses`, checked equal for every read size and write size.
fn every_cut(client: &[u8], responses: &[&[u8]], users: bool) -> Transcript {
    let whole = run(&Run {
        client,
        responses,
        users,
        rate: usize::MAX,
        write: usize::MAX,
    });
    for rate in [1, 2, 7, 64] {
        for write in [1, 3, usize::MAX] {
            let t = run(&Run {
                client,
                responses,
                users,
                rate,
                write,
            });
            assert_eq!(t, whole, "rate {rate}, write {write}");
        }
    }
    whole
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Parses the request head `raw` and starts its exchange on a new origin connection.
fn begin(x: &mut Exchange<()>, raw: &[u8]) -> Request {
    let HeadEvent::Request { request, .. } = x.read_head(raw, &OPTS, &mut Vec::new()) else {
        panic!("no request in {:?}", text(raw));
    };
    let Begin::Connect(None, waiting) = x.begin(&request, false) else {
        panic!("not waiting for a new connection");
    };
    assert!(
        x.in_flight() && x.origin().is_none(),
        "waits for its connection"
    );
    x.connected(waiting, ());
    request
}

const OK_HELLO: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
const OK_CHUNKED: &[u8] =
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";

#[test]
fn pipelined_requests_are_answered_in_order_on_one_kept_origin() {
    let client = b"GET http://a.test/1 HTTP/1.1\r\nHost: a.test\r\n\r\n\
                   GET http://a.test/2 HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let t = every_cut(client, &[OK_HELLO, OK_CHUNKED], false);
    assert_eq!(t.origin.len(), 1, "one origin connection: {t:?}");
    let origin = text(&t.origin[0]);
    let (first, second) = (
        origin.find("GET /1 HTTP/1.1").unwrap(),
        origin.find("GET /2 HTTP/1.1").unwrap(),
    );
    assert!(first < second, "{origin}");
    let client = text(&t.client);
    assert!(client.find("hello").unwrap() < client.find("3\r\nabc\r\n0\r\n\r\n").unwrap());
    assert!(
        t.client.ends_with(b"3\r\nabc\r\n0\r\n\r\n"),
        "chunked passes verbatim"
    );
    assert_eq!(
        t.events[1..],
        [
            "status 200",
            "next, keep origin true",
            t.events[3].as_str(),
            "status 200",
            // The driver's client has said all it will: its connection ends after the last response.
            "close",
        ]
    );
    assert!(t.events[0].starts_with("request") && t.events[3].starts_with("request"));
}

#[test]
fn the_second_request_waits_for_the_first_response() {
    // The whole second request is in the client's first packet; the origin must not see it before the first
    // response is complete (one request in flight): the origin's answers arrive only after each full request.
    let client = b"POST http://a.test/up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n\r\nbody\
                   GET http://a.test/next HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let t = every_cut(client, &[OK_HELLO, OK_HELLO], false);
    let origin = text(&t.origin[0]);
    let body_end = origin.find("body").unwrap() + 4;
    assert!(
        origin[body_end..].starts_with("GET /next HTTP/1.1"),
        "the body ends where the next head begins: {origin}"
    );
    assert_eq!(t.client.len(), 2 * OK_HELLO.len(), "{:?}", text(&t.client));
}

#[test]
fn a_different_origin_gets_a_new_connection_and_close_ends_the_exchange() {
    let client = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n\
                   GET http://b.test/ HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n";
    let t = every_cut(client, &[OK_HELLO, OK_HELLO], false);
    assert_eq!(t.origin.len(), 2, "{t:?}");
    assert_eq!(t.events.last().map(String::as_str), Some("close"));
    // The response to a client that asked to close says so.
    assert!(text(&t.client).matches("Connection: close").count() >= 1);
    // An origin that closes after its response is not reused.
    let t = every_cut(
        b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\nGET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
        &[
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
            OK_HELLO,
        ],
        false,
    );
    assert_eq!(t.origin.len(), 2, "{t:?}");
    assert!(t.events.contains(&String::from("next, keep origin false")));
}

#[test]
fn a_second_request_without_credentials_gets_407() {
    let auth = "Proxy-Authorization: Basic YWxpY2U6c2VjcmV0\r\n";
    let first = format!("GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n{auth}\r\n");
    let second = "GET http://a.test/2 HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let t = every_cut(format!("{first}{second}").as_bytes(), &[OK_HELLO], true);
    assert_eq!(t.events.last().map(String::as_str), Some("407"), "{t:?}");
    assert_eq!(t.client, OK_HELLO, "the first response is delivered whole");
    assert!(
        !text(&t.origin[0]).contains("Proxy-Authorization"),
        "credentials are never forwarded"
    );
    // With credentials on both, both are served; wrong ones are refused.
    let t = every_cut(
        format!("{first}{first}").as_bytes(),
        &[OK_HELLO, OK_HELLO],
        true,
    );
    assert_eq!(t.client.len(), 2 * OK_HELLO.len());
    let wrong = first.replace("YWxpY2U6c2VjcmV0", "YWxpY2U6d3Jvbmc=");
    let t = every_cut(wrong.as_bytes(), &[], true);
    assert_eq!(t.events, ["407"]);
}

#[test]
fn interim_heads_head_requests_and_bad_framing() {
    // 100 Continue, then the final response; a HEAD response has no body despite its Content-Length.
    let client = b"HEAD http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let t = every_cut(
        client,
        &[b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"],
        false,
    );
    assert_eq!(t.events[1..3], ["status 100", "status 200"]);
    assert!(t.client.ends_with(b"\r\n\r\n"));
    // A request body with broken chunked framing, and a response with one.
    let t = every_cut(
        b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        &[],
        false,
    );
    assert_eq!(t.events.last().map(String::as_str), Some("BadBody"));
    let t = every_cut(
        b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
        &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
        false,
    );
    assert_eq!(t.events.last().map(String::as_str), Some("BadBody"));
    let t = every_cut(b"GET / HTTP/1.1\r\n\r\n", &[], false);
    assert!(t.events[0].starts_with("Bad("), "{t:?}");
}

#[test]
fn keep_alive_decisions() {
    let req = |x: &mut Exchange<()>, raw: &[u8]| {
        let mut out = Vec::new();
        let request = begin(x, raw);
        assert_eq!(x.request_step(&[]), UploadEvent::Complete);
        assert_eq!(
            x.request_step(b"GET"),
            UploadEvent::Sent,
            "the next request is held"
        );
        assert_eq!(
            x.read_head(
                b"GET http://a.test/ HTTP/1.1\r\n\r\n",
                &OPTS,
                &mut Vec::new()
            ),
            HeadEvent::Held
        );
        let ev = x.origin_step(OK_HELLO, &OPTS, &mut out);
        assert!(
            matches!(ev, OriginEvent::Head { status: 200, .. }),
            "{ev:?}"
        );
        assert_eq!(
            x.origin_step(b"hello", &OPTS, &mut out),
            OriginEvent::Body(5)
        );
        x.sent_to_client(5);
        assert_eq!(x.origin_step(&[], &OPTS, &mut out), OriginEvent::Complete);
        request
    };
    let get = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n";
    // (client EOF, draining, origin sent extra bytes, close hook) -> after.
    let table = [
        (
            (false, false, false, false),
            After::Next { keep_origin: true },
        ),
        (
            (false, false, true, false),
            After::Next { keep_origin: false },
        ),
        ((true, false, false, false), After::Close),
        ((false, true, false, false), After::Close),
        ((false, false, false, true), After::Close),
    ];
    for ((eof, draining, leftover, hook), want) in table {
        let mut x = Exchange::new();
        let r = req(&mut x, get);
        if hook {
            x.close_after_response();
        }
        let (after, closed) = x.finish(eof, draining, leftover);
        assert_eq!(after, want, "{eof} {draining} {leftover} {hook}");
        assert!(!x.in_flight());
        let keep = matches!(want, After::Next { keep_origin: true });
        assert_eq!(closed.is_none(), keep, "the origin is kept or handed back");
        assert_eq!(
            x.reuses_origin(&r.target, false),
            keep && x.target.is_some()
        );
    }
    // An upload the origin stopped taking ends the client connection after the response.
    let mut x = Exchange::new();
    let mut out = Vec::new();
    let raw = b"PUT http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 9\r\n\r\n";
    begin(&mut x, raw);
    x.abandon_upload();
    assert!(!x.response_started());
    assert!(matches!(
        x.origin_step(OK_HELLO, &OPTS, &mut out),
        OriginEvent::Head { .. }
    ));
    assert!(text(&out).contains("Connection: close"), "{}", text(&out));
    assert!(x.response_started());
    assert_eq!(
        x.origin_step(b"hello", &OPTS, &mut out),
        OriginEvent::Body(5)
    );
    x.sent_to_client(5);
    assert_eq!(x.finish(false, false, false), (After::Close, Some(())));
    // A close-delimited body ends with the origin's close; a missing head does not.
    let mut x = Exchange::new();
    let get10 = b"GET http://a.test/ HTTP/1.0\r\nHost: a.test\r\n\r\n";
    begin(&mut x, get10);
    assert!(!x.origin_closed());
    x.request_step(&[]);
    let ev = x.origin_step(b"HTTP/1.0 200 OK\r\n\r\nstream", &OPTS, &mut out);
    assert!(matches!(ev, OriginEvent::Head { .. }));
    assert_eq!(
        x.origin_step(b"stream", &OPTS, &mut out),
        OriginEvent::Body(6)
    );
    assert!(!x.origin_closed(), "bytes still to forward");
    x.sent_to_client(6);
    assert!(x.origin_closed());
}

#[test]
fn an_http_upstreams_407_is_not_the_clients() {
    let mut x = Exchange::new();
    let mut out = Vec::new();
    let get = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n";
    begin(&mut x, get);
    let resp = b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n";
    let upstream = HeadOptions {
        http_upstream: true,
        ..OPTS
    };
    assert_eq!(
        x.origin_step(resp, &upstream, &mut out),
        OriginEvent::UpstreamRefused
    );
    assert!(matches!(
        x.origin_step(resp, &OPTS, &mut out),
        OriginEvent::Head { status: 407, .. }
    ));
    assert_eq!(
        Exchange::<()>::new().origin_step(b"x", &OPTS, &mut out),
        OriginEvent::Idle
    );
}

#[test]
fn the_origin_connection_is_held_by_the_state_that_uses_it() {
    let get = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let HeadEvent::Request { request, .. } =
        Exchange::<u8>::new().read_head(get, &OPTS, &mut Vec::new())
    else {
        panic!("no request");
    };
    let mut x: Exchange<u8> = Exchange::new();
    // A connection can only be attached to a request waiting for one (`connected` takes what `begin` handed out,
    // once): the type system checks what a runtime refusal used to.
    let waiting = connect_none(x.begin(&request, false));
    assert_eq!(x.origin(), None);
    x.connected(waiting, 1);
    assert_eq!(x.origin(), Some(&1));
    // The caller closes the origin mid-exchange: the exchange ends with it.
    assert_eq!(x.take_origin(), Some(1));
    assert!(!x.in_flight());
    assert_eq!(
        x.origin_step(OK_HELLO, &OPTS, &mut Vec::new()),
        OriginEvent::Idle
    );
    // A kept connection carries the next request to the same origin (or to any, through an HTTP proxy).
    let waiting = connect_none(x.begin(&request, false));
    x.connected(waiting, 3);
    assert_eq!(x.request_step(&[]), UploadEvent::Complete);
    assert!(matches!(
        x.origin_step(OK_HELLO, &OPTS, &mut Vec::new()),
        OriginEvent::Head { .. }
    ));
    assert_eq!(
        x.origin_step(b"hello", &OPTS, &mut Vec::new()),
        OriginEvent::Body(5)
    );
    x.sent_to_client(5);
    assert_eq!(
        x.finish(false, false, false),
        (After::Next { keep_origin: true }, None)
    );
    assert_eq!(x.origin(), Some(&3), "kept, idle");
    assert!(matches!(x.begin(&request, false), Begin::Reused));
    assert_eq!(x.origin(), Some(&3));
    // Between requests, a kept connection that cannot carry the next request is handed back.
    let mut y = x.clone();
    assert_eq!(y.take_origin(), Some(3));
    assert_eq!(y.take_origin(), None);
    let other = b"GET http://b.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n";
    let HeadEvent::Request { request: to_b, .. } = y.read_head(other, &OPTS, &mut Vec::new())
    else {
        panic!("no request");
    };
    let mut z: Exchange<u8> = Exchange::new();
    let waiting = connect_none(z.begin(&request, false));
    z.connected(waiting, 4);
    z.request_step(&[]);
    z.origin_step(OK_HELLO, &OPTS, &mut Vec::new());
    z.origin_step(b"hello", &OPTS, &mut Vec::new());
    z.sent_to_client(5);
    assert_eq!(z.finish(false, false, false).1, None);
    assert!(z.reuses_origin(&to_b.target, true) && !z.reuses_origin(&to_b.target, false));
    assert!(matches!(z.begin(&to_b, false), Begin::Connect(Some(4), _)));
}

/// The request waits for a new connection and no kept one is handed back.
fn connect_none<O: std::fmt::Debug>(b: Begin<O>) -> AwaitingOrigin {
    match b {
        Begin::Connect(None, waiting) => waiting,
        other => panic!("expected to wait for a new connection: {other:?}"),
    }
}
