//! Fuzz target bodies, shared by the cargo-fuzz binaries (`fuzz/fuzz_targets/*.rs`, nightly) and the corpus replay
//! test (`tests/corpus_replay.rs`, stable), which includes this file with `#[path]`.
//!
//! Each target feeds one input to one or more sans-IO parsers and asserts only what those parsers document
//! (`src/proto/mod.rs`: bytes in, `Incomplete` while a valid prefix, `Done` with the consumed length, an error as
//! soon as the prefix cannot become valid, never looking past the message):
//!
//! * no panic, and `0 < consumed <= input length` for `Done`;
//! * the result on the consumed bytes alone is the same `Done`, and one byte fewer is `Incomplete`;
//! * a prefix that is already `Done` or an error gives the same answer as the whole input (so appending bytes
//!   never changes a `Done` or an error, and an error never turns into `Incomplete`/`Done`);
//! * where an encoder exists, parse -> encode -> parse is the identity (modulo the documented canonicalization of
//!   IPv4-mapped IPv6 addresses) and consumes exactly what the encoder wrote.
//! * the SOCKS server handshake machines (`proto::server`) give the same transcript however the input is cut,
//!   never consume or write past their buffers, and end within a bounded number of steps.
//!
//! Panic messages never include the input (the users-file target carries passwords).

use socksgate::acl::{self, Cidr};
use socksgate::auth::Users;
use socksgate::policy::{self, name::normalize, rules::parse_pattern};
use socksgate::proto::http::{self, BodyFramer, BodyKind, ResponseContext, RewriteOptions};
use socksgate::proto::server::{self, Socks4Event, Socks4Server, Socks5Event, Socks5Server};
use socksgate::proto::{
    canonical_ip, proxy_protocol, socks4, socks5, upstream, Parse, ProtoError, TargetAddr,
};
use std::fmt::Debug;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// A fuzz target: one input, panics on a broken invariant.
pub type Target = fn(&[u8]);

/// Every target, by the name of its cargo-fuzz binary and corpus folder.
pub const TARGETS: &[(&str, Target)] = &[
    ("socks5", socks5_target),
    ("socks4", socks4_target),
    ("http_request", http_request_target),
    ("http_response", http_response_target),
    ("http_body", http_body_target),
    ("proxy_protocol", proxy_protocol_target),
    ("upstream_reply", upstream_reply_target),
    ("users_file", users_file_target),
    ("acl", acl_target),
    ("policy", policy_target),
    ("hostname", hostname_target),
];

type PResult<T> = Result<Parse<T>, ProtoError>;

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

/// Deterministic pseudo-random numbers seeded from the input, so split points and sampled prefixes are a
/// function of the input alone (a crash reproduces from the saved file).
struct Rng(u64);

impl Rng {
    fn from_input(data: &[u8]) -> Rng {
        // FNV-1a, then never zero (xorshift would stay at zero).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Rng(h | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n` (0 when n is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Maps the value of a `Parse` (keeps `Incomplete` and the consumed length).
fn map_parse<T, U>(r: PResult<T>, f: impl FnOnce(T) -> U) -> PResult<U> {
    match r {
        Ok(Parse::Done(v, n)) => Ok(Parse::Done(f(v), n)),
        Ok(Parse::Incomplete) => Ok(Parse::Incomplete),
        Err(e) => Err(e),
    }
}

/// Checks the streaming contract of `parse` on `buf` and returns the result for the whole input.
///
/// Prefixes: all of them when `buf` is at most `all_prefixes` long, otherwise a sample (0, 1, the middle, the last
/// and a few input-derived ones), because some parsers are linear in the input and libFuzzer inputs can be long.
fn check_stream<T: PartialEq + Debug>(
    what: &str,
    buf: &[u8],
    all_prefixes: usize,
    parse: impl Fn(&[u8]) -> PResult<T>,
) -> PResult<T> {
    let whole = parse(buf);
    if let Ok(Parse::Done(_, n)) = &whole {
        let n = *n;
        assert!(
            n > 0 && n <= buf.len(),
            "{what}: Done consumed {n} of {} bytes",
            buf.len()
        );
        assert_eq!(
            parse(&buf[..n]),
            whole,
            "{what}: the consumed bytes alone parse differently"
        );
        assert_eq!(
            parse(&buf[..n - 1]),
            Ok(Parse::Incomplete),
            "{what}: one byte short of a Done message is not Incomplete"
        );
    }
    if let Err(_) | Ok(Parse::Done(..)) = &whole {
        // Appending bytes never changes a final answer.
        let mut longer = buf.to_vec();
        longer.extend_from_slice(b"\0\xff\r\n\r\nPROXY \x05\x01");
        assert_eq!(
            parse(&longer),
            whole,
            "{what}: appending bytes changed a final answer"
        );
    }
    let check_prefix = |k: usize| {
        let prefix = parse(&buf[..k]);
        if prefix != Ok(Parse::Incomplete) {
            assert_eq!(
                prefix,
                whole,
                "{what}: prefix of {k} bytes is final but differs from the whole input ({} bytes)",
                buf.len()
            );
        }
    };
    if buf.len() <= all_prefixes {
        (0..buf.len()).for_each(check_prefix);
    } else {
        let mut rng = Rng::from_input(buf);
        for k in [0, 1, buf.len() / 2, buf.len() - 1] {
            check_prefix(k);
        }
        for _ in 0..8 {
            check_prefix(rng.below(buf.len()));
        }
    }
    whole
}

/// The target with IPv4-mapped IPv6 literals written as IPv4, as every encoder does.
fn canonical_target(t: &TargetAddr) -> TargetAddr {
    match t {
        TargetAddr::Ip(sa) => TargetAddr::Ip(SocketAddr::new(canonical_ip(sa.ip()), sa.port())),
        TargetAddr::Domain(..) => t.clone(),
    }
}

fn canonical_sa(sa: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(sa.ip()), sa.port())
}

// ---------------------------------------------------------------------------------------------------------------
// SOCKS5 (RFC 1928, RFC 1929)
// ---------------------------------------------------------------------------------------------------------------

/// Greeting, username/password, request and UDP header, all on the same input.
pub fn socks5_target(data: &[u8]) {
    let _ = check_stream("socks5 greeting", data, 600, socks5::parse_greeting);

    let up = check_stream("socks5 user/pass", data, 600, |b| {
        map_parse(socks5::parse_user_pass(b), |c| {
            (c.user.to_vec(), c.pass.to_vec())
        })
    });
    if let Ok(Parse::Done((user, pass), n)) = up {
        let mut out = [0u8; socks5::MAX_USER_PASS_LEN];
        let m = socks5::encode_user_pass(&user, &pass, &mut out);
        assert_eq!(m, n, "socks5 user/pass: re-encoded length differs");
        // The encoder always writes VER 1; the parser also accepts 5.
        assert_eq!(
            out[1..m],
            data[1..n],
            "socks5 user/pass: re-encoding differs"
        );
    }

    let req = check_stream("socks5 request", data, 600, socks5::parse_request);
    if let Ok(Parse::Done(req, n)) = req {
        let mut out = [0u8; socks5::MAX_REQUEST_LEN];
        let m = socks5::encode_request(req.command, &req.target, &mut out);
        assert!(m > 0, "socks5 request: a parsed request cannot be encoded");
        let expected = socks5::Request {
            command: req.command,
            target: canonical_target(&req.target),
        };
        assert_eq!(
            socks5::parse_request(&out[..m]),
            Ok(Parse::Done(expected.clone(), m)),
            "socks5 request: round trip"
        );
        if expected == req {
            // Same bytes except RSV, which the parser tolerates and the encoder writes as 0.
            assert_eq!(m, n, "socks5 request: re-encoded length differs");
            assert_eq!(out[..2], data[..2]);
            assert_eq!(out[3..m], data[3..n], "socks5 request: re-encoding differs");
        }
    }

    if let Ok((h, off)) = socks5::parse_udp_header(data) {
        assert!(off <= data.len(), "socks5 udp: DATA offset past the end");
        assert_eq!(
            socks5::parse_udp_header(&data[..off]),
            Ok((h.clone(), off)),
            "socks5 udp: the header alone parses differently"
        );
        assert!(
            socks5::parse_udp_header(&data[..off - 1]).is_err(),
            "socks5 udp: a truncated header parsed"
        );
        let mut out = [0u8; socks5::MAX_UDP_HEADER_LEN];
        let m = socks5::encode_udp_header(&h.target, &mut out);
        assert!(m > 0, "socks5 udp: a parsed header cannot be encoded");
        let expected = socks5::UdpHeader {
            frag: 0,
            target: canonical_target(&h.target),
        };
        assert_eq!(
            socks5::parse_udp_header(&out[..m]),
            Ok((expected.clone(), m)),
            "socks5 udp: round trip"
        );
        if expected == h {
            assert_eq!(out[..m], data[..off], "socks5 udp: re-encoding differs");
        }
    }

    socks5_server_target(data);
}

/// Steps a handshake may take on one input: one per message, plus a NeedMore per piece.
const MAX_SERVER_STEPS: usize = 16;

/// The server handshake on `data` given whole and cut in two at a point the input picks: the same transcript
/// (output bytes, final event, bytes consumed), no step consuming past the input or writing past
/// `MAX_STEP_OUTPUT`, and an end within `MAX_SERVER_STEPS`. Credentials pass when user == password.
fn socks5_server_target(data: &[u8]) {
    let cut = usize::from(data.last().copied().unwrap_or(0)) % (data.len() + 1);
    for users in [false, true] {
        let whole = socks5_server_run(users, data, data.len());
        assert_eq!(
            socks5_server_run(users, data, cut),
            whole,
            "socks5 server: the transcript depends on how the input was cut"
        );
    }
}

fn socks5_server_run(users: bool, data: &[u8], first: usize) -> (Vec<u8>, String, usize) {
    let mut hs = Socks5Server::new(users);
    let mut out = [0u8; server::MAX_STEP_OUTPUT];
    let (mut sent, mut consumed, mut fed) = (Vec::new(), 0usize, first);
    for _ in 0..MAX_SERVER_STEPS {
        let input = &data[consumed..fed];
        let step = hs.step(input, &mut out);
        assert!(
            step.consumed <= input.len(),
            "socks5 server: consumed past the input"
        );
        assert!(
            step.written <= out.len(),
            "socks5 server: wrote past the buffer"
        );
        sent.extend_from_slice(&out[..step.written]);
        consumed += step.consumed;
        match step.event {
            Socks5Event::Continue => {}
            Socks5Event::NeedMore if fed < data.len() => fed = data.len(),
            Socks5Event::Credentials(c) => {
                let ok = c.user == c.pass;
                let n = hs.auth_result(ok, &mut out);
                sent.extend_from_slice(&out[..n]);
                if !ok {
                    return (sent, String::from("auth failed"), consumed);
                }
            }
            event => return (sent, format!("{event:?}"), consumed),
        }
    }
    panic!("socks5 server: no end after {MAX_SERVER_STEPS} steps");
}

// ---------------------------------------------------------------------------------------------------------------
// SOCKS4 / SOCKS4a
// ---------------------------------------------------------------------------------------------------------------

/// Request (with round trip through the encoder) and reply, on the same input.
pub fn socks4_target(data: &[u8]) {
    let req = check_stream("socks4 request", data, 600, |b| {
        map_parse(socks4::parse_request(b), |r| {
            (r.command, r.target, r.userid.to_vec())
        })
    });
    if let Ok(Parse::Done((command, target, userid), n)) = req {
        // Every parsed request is representable: the USERID has no NUL and fits, an IP target is IPv4 and not a
        // 4a marker (those always carry a DOMAIN).
        let mut out = [0u8; socks4::MAX_REQUEST_LEN];
        let m = socks4::encode_request(command, &target, &userid, &mut out);
        assert!(m > 0, "socks4 request: a parsed request cannot be encoded");
        assert_eq!(m, n, "socks4 request: re-encoded length differs");
        let back = map_parse(socks4::parse_request(&out[..m]), |r| {
            (r.command, r.target, r.userid.to_vec())
        });
        assert_eq!(
            back,
            Ok(Parse::Done((command, target.clone(), userid), m)),
            "socks4 request: round trip"
        );
        // Same bytes, except that any 0.0.0.x (x != 0) 4a marker is written as 0.0.0.1.
        let same = match target {
            TargetAddr::Domain(..) => out[..4] == data[..4] && out[8..m] == data[8..n],
            TargetAddr::Ip(_) => out[..m] == data[..n],
        };
        assert!(same, "socks4 request: re-encoding differs");
    }

    let reply = check_stream("socks4 reply", data, 64, socks4::parse_reply);
    if let Ok(Parse::Done((cd, addr), n)) = reply {
        let mut out = [0u8; socks4::REPLY_LEN];
        let m = socks4::encode_reply(cd, addr, &mut out);
        assert_eq!(out[..m], data[..n], "socks4 reply: re-encoding differs");
    }

    socks4_server_target(data);
}

/// The SOCKS4 server handshake on `data`, allowed and refused, whole and cut in two: one transcript per policy,
/// a refusal only once the request is complete or invalid, and a served request never consumes past it.
fn socks4_server_target(data: &[u8]) {
    let cut = usize::from(data.last().copied().unwrap_or(0)) % (data.len() + 1);
    for allowed in [true, false] {
        let whole = socks4_server_run(allowed, data, data.len());
        assert_eq!(
            socks4_server_run(allowed, data, cut),
            whole,
            "socks4 server: the transcript depends on how the input was cut"
        );
    }
}

fn socks4_server_run(allowed: bool, data: &[u8], first: usize) -> (Vec<u8>, String, usize) {
    let mut hs = Socks4Server::new(allowed);
    let mut out = [0u8; server::MAX_STEP_OUTPUT];
    let mut fed = first;
    for _ in 0..MAX_SERVER_STEPS {
        let step = hs.step(&data[..fed], &mut out);
        assert!(
            step.consumed <= fed,
            "socks4 server: consumed past the input"
        );
        match step.event {
            Socks4Event::NeedMore if fed < data.len() => fed = data.len(),
            event => {
                let sent = out[..step.written].to_vec();
                return (sent, format!("{event:?}"), step.consumed);
            }
        }
    }
    panic!("socks4 server: no end after {MAX_SERVER_STEPS} steps");
}

// ---------------------------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------------------------

const NO_VIA: RewriteOptions<'static> = RewriteOptions { via: None };

/// Head limits tried on every input: tiny, small, the upstream CONNECT cap and the default.
const MAX_HEADS: [usize; 4] = [16, 200, 4096, http::DEFAULT_MAX_HEAD];

/// True when the result can still change with a larger head limit.
fn limit_bound<T>(r: &PResult<T>) -> bool {
    matches!(r, Ok(Parse::Incomplete) | Err(ProtoError::HeadTooLarge))
}

/// The number of header lines in a head we wrote (CRLF line ends), request/status line excluded.
fn header_lines(head: &[u8]) -> usize {
    head.windows(2)
        .filter(|w| w == b"\r\n")
        .count()
        .saturating_sub(2)
}

/// parse_request under several head limits and both Via settings, plus two round trips: a forwarded head's
/// rewrite, put back into absolute-form, parses to the same request and rewrites to the same bytes; a CONNECT
/// target re-encoded by the upstream client encoder parses to the same target.
pub fn http_request_target(data: &[u8]) {
    let mut results = Vec::with_capacity(MAX_HEADS.len());
    for max_head in MAX_HEADS {
        let r = check_stream("http request", data, 0, |b| {
            let mut out = Vec::new();
            map_parse(http::parse_request(b, max_head, &NO_VIA, &mut out), |r| {
                (r, out)
            })
        });
        if let Ok(Parse::Done((req, _), n)) = &r {
            assert_eq!(req.head_len, *n, "http request: head_len != consumed");
            assert!(*n <= max_head, "http request: head longer than the limit");
        }
        results.push(r);
    }
    // A larger limit never changes an answer that did not depend on the limit.
    for (i, small) in results.iter().enumerate() {
        if limit_bound(small) {
            continue;
        }
        for large in &results[i + 1..] {
            assert_eq!(
                large, small,
                "http request: answer changed with a larger limit"
            );
        }
    }
    let Some(Ok(Parse::Done((req, out), _))) = results.last() else {
        return;
    };

    // With a Via pseudonym the request is the same and the head gains exactly one line at the end.
    let mut via_out = Vec::new();
    let via = http::parse_request(
        data,
        http::DEFAULT_MAX_HEAD,
        &RewriteOptions { via: Some("fuzz") },
        &mut via_out,
    );
    assert_eq!(via, Ok(Parse::Done(req.clone(), req.head_len)));
    if !out.is_empty() {
        let mut expected = out[..out.len() - 2].to_vec();
        expected.extend_from_slice(if req.minor_version == 0 {
            b"Via: 1.0 fuzz\r\n\r\n"
        } else {
            b"Via: 1.1 fuzz\r\n\r\n"
        });
        assert_eq!(
            via_out, expected,
            "http request: Via changed more than one line"
        );
    }

    match req.kind {
        http::RequestKind::Connect => {
            assert!(out.is_empty(), "http request: CONNECT wrote a head");
            let mut enc = vec![0u8; upstream::MAX_HTTP_CONNECT_LEN];
            let m = upstream::encode_http_connect(&req.target, None, &mut enc);
            assert!(m > 0, "http CONNECT: a parsed target cannot be re-encoded");
            let mut out2 = Vec::new();
            match http::parse_request(&enc[..m], http::DEFAULT_MAX_HEAD, &NO_VIA, &mut out2) {
                Ok(Parse::Done(r2, n2)) => {
                    assert_eq!(n2, m);
                    assert_eq!(r2.kind, http::RequestKind::Connect);
                    assert_eq!(r2.target, req.target, "http CONNECT: target round trip");
                }
                other => panic!("http CONNECT: re-encoded request does not parse: {other:?}"),
            }
        }
        http::RequestKind::Forward => forward_round_trip(req, out),
    }
}

/// Puts a rewritten origin-form head back into absolute-form (using its Host line) and parses it again.
fn forward_round_trip(req: &http::Request, out: &[u8]) {
    assert!(
        out.ends_with(b"\r\n\r\n"),
        "http request: rewritten head not terminated"
    );
    // An origin with the same 128-field limit could refuse a head we grew (Host and Connection are added); that is
    // the origin's limit, not a framing disagreement.
    if header_lines(out) > http::MAX_HEADERS {
        return;
    }
    let line_end = out.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
    let line = &out[..line_end];
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        panic!("http request: rewritten request line is not METHOD SP PATH SP VERSION");
    };
    let rest = &out[line_end + 2..];
    let Some(authority) = rest
        .strip_prefix(b"Host: ")
        .and_then(|r| r.split(|&b| b == b'\r').next())
    else {
        panic!("http request: rewritten head does not start with Host");
    };
    let host_line_len = b"Host: ".len() + authority.len() + 2;
    let mut again = Vec::new();
    again.extend_from_slice(method);
    again.extend_from_slice(b" http://");
    again.extend_from_slice(authority);
    // "*" is how an OPTIONS with an empty path was written; the empty path produces it again.
    if path != b"*" {
        again.extend_from_slice(path);
    }
    again.push(b' ');
    again.extend_from_slice(version);
    again.extend_from_slice(b"\r\n");
    again.extend_from_slice(&rest[host_line_len..]);
    let mut out2 = Vec::new();
    let limit = again.len() + 1;
    match http::parse_request(&again, limit, &NO_VIA, &mut out2) {
        Ok(Parse::Done(r2, n2)) => {
            assert_eq!(n2, again.len(), "http request: rewritten head length");
            assert_eq!(r2.kind, req.kind);
            assert_eq!(r2.target, req.target, "http request: target changed");
            assert_eq!(r2.is_head, req.is_head);
            assert_eq!(r2.minor_version, req.minor_version);
            assert_eq!(r2.body, req.body, "http request: body framing changed");
            assert_eq!(
                r2.keep_alive, req.keep_alive,
                "http request: persistence changed"
            );
            assert!(
                !r2.auth_present,
                "http request: Proxy-Authorization forwarded"
            );
            assert_eq!(out2, out, "http request: rewriting is not idempotent");
        }
        other => panic!("http request: rewritten head does not parse again: {other:?}"),
    }
}

/// parse_response for every request context and two head limits; the rewritten head parses again to the same
/// status, framing and persistence, and rewrites to the same bytes.
pub fn http_response_target(data: &[u8]) {
    for bits in 0..8u8 {
        let ctx = ResponseContext {
            request_is_head: bits & 1 != 0,
            client_keep_alive: bits & 2 != 0,
            client_minor_version: (bits >> 2) & 1,
            via: None,
        };
        let parse_with = |max_head: usize| {
            move |b: &[u8]| {
                let mut out = Vec::new();
                map_parse(http::parse_response(b, max_head, &ctx, &mut out), |r| {
                    (r, out)
                })
            }
        };
        let small = check_stream("http response", data, 0, parse_with(64));
        let whole = check_stream("http response", data, 0, parse_with(http::DEFAULT_MAX_HEAD));
        if !limit_bound(&small) {
            assert_eq!(
                small, whole,
                "http response: answer changed with a larger limit"
            );
        }
        let Ok(Parse::Done((resp, out), n)) = whole else {
            continue;
        };
        assert_eq!(resp.head_len, n, "http response: head_len != consumed");
        assert!((100..=599).contains(&resp.status));
        assert_eq!(
            resp.interim,
            (100..200).contains(&resp.status) && resp.status != 101
        );
        if out.is_empty() {
            // Only an interim response to an HTTP/1.0 client is swallowed.
            assert!(resp.interim && ctx.client_minor_version == 0);
            continue;
        }
        assert!(
            out.ends_with(b"\r\n\r\n"),
            "http response: rewritten head not terminated"
        );
        if header_lines(&out) > http::MAX_HEADERS {
            continue;
        }
        let mut out2 = Vec::new();
        match http::parse_response(&out, out.len() + 1, &ctx, &mut out2) {
            Ok(Parse::Done(r2, n2)) => {
                assert_eq!(n2, out.len(), "http response: rewritten head length");
                assert_eq!(r2.status, resp.status);
                assert_eq!(r2.body, resp.body, "http response: body framing changed");
                assert_eq!(r2.interim, resp.interim);
                assert_eq!(
                    r2.keep_client, resp.keep_client,
                    "http response: persistence changed"
                );
                assert_eq!(out2, out, "http response: rewriting is not idempotent");
            }
            other => panic!("http response: rewritten head does not parse again: {other:?}"),
        }
    }
}

/// The body kind is chosen by the first byte: `L` + 2-byte big-endian length, `N` none, `U` until close,
/// anything else chunked (the body then starts after that byte). The body is fed whole, then in input-derived
/// pieces (and byte by byte when short); every way must agree.
pub fn http_body_target(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (kind, body) = match sel {
        b'L' if rest.len() >= 2 => (
            BodyKind::Length(u64::from(u16::from_be_bytes([rest[0], rest[1]]))),
            &rest[2..],
        ),
        b'N' => (BodyKind::None, rest),
        b'U' => (BodyKind::UntilClose, rest),
        _ => (BodyKind::Chunked, rest),
    };

    let mut whole = BodyFramer::new(kind);
    let w = whole.advance(body);
    if let Ok(n) = w {
        assert!(n <= body.len(), "http body: consumed past the input");
        if n < body.len() {
            assert!(
                whole.is_done(),
                "http body: stopped early without being done"
            );
        }
        if kind == BodyKind::UntilClose {
            assert_eq!(n, body.len());
            assert!(!whole.is_done());
        }
        if whole.is_done() {
            assert_eq!(
                whole.advance(b"more"),
                Ok(0),
                "http body: a done framer took bytes"
            );
            // The consumed bytes alone end the body; one byte fewer does not.
            let mut f = BodyFramer::new(kind);
            assert_eq!(f.advance(&body[..n]), Ok(n));
            assert!(f.is_done());
            if n > 0 {
                let mut f = BodyFramer::new(kind);
                assert_eq!(f.advance(&body[..n - 1]), Ok(n - 1));
                assert!(!f.is_done(), "http body: done one byte early");
            }
        }
    } else {
        assert!(
            whole.advance(b"0\r\n\r\n").is_err(),
            "http body: recovered after an error"
        );
    }

    let mut rng = Rng::from_input(data);
    let rounds = if body.len() <= 512 { 3 } else { 2 };
    for round in 0..rounds {
        let mut f = BodyFramer::new(kind);
        let mut total = 0usize;
        let mut rest = body;
        let mut result = Ok(());
        while !rest.is_empty() {
            // Round 0 feeds byte by byte (short inputs only), the others in random pieces.
            let step = if round == 0 && body.len() <= 512 {
                1
            } else {
                let cap = 64 + rng.below(rest.len());
                1 + rng.below(rest.len().min(cap))
            };
            let (piece, tail) = rest.split_at(step);
            match f.advance(piece) {
                Ok(k) => {
                    assert!(k <= piece.len());
                    total += k;
                    if k < piece.len() {
                        assert!(f.is_done(), "http body: piece cut short without being done");
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            rest = tail;
        }
        match (&w, result) {
            (Ok(n), Ok(())) => {
                assert_eq!(total, *n, "http body: pieces consumed a different length");
                assert_eq!(
                    f.is_done(),
                    whole.is_done(),
                    "http body: pieces end differently"
                );
            }
            (Err(e), Err(e2)) => assert_eq!(*e, e2),
            (w, r) => panic!("http body: whole gave {w:?}, pieces gave {r:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// PROXY protocol v1/v2
// ---------------------------------------------------------------------------------------------------------------

fn canonical_header(h: proxy_protocol::ProxyHeader) -> proxy_protocol::ProxyHeader {
    match h {
        proxy_protocol::ProxyHeader::Proxy { src, dst } => proxy_protocol::ProxyHeader::Proxy {
            src: canonical_sa(src),
            dst: canonical_sa(dst),
        },
        local => local,
    }
}

/// parse, then re-encode as v1 and v2 and parse again.
pub fn proxy_protocol_target(data: &[u8]) {
    use proxy_protocol::ProxyHeader;
    let r = check_stream("proxy protocol", data, 300, proxy_protocol::parse);
    let Ok(Parse::Done(h, n)) = r else {
        return;
    };

    // v2, with the input's trailing bytes (up to 64) as a NOOP TLV.
    let tail = &data[n..data.len().min(n + 64)];
    let mut out = vec![0u8; proxy_protocol::MAX_V2_LEN];
    let m = proxy_protocol::encode_v2(&h, &[(0x04, tail)], &mut out);
    assert!(m > 0, "proxy v2: a parsed header cannot be encoded");
    match proxy_protocol::parse(&out[..m]) {
        Ok(Parse::Done(h2, m2)) => {
            assert_eq!(m2, m, "proxy v2: round trip length");
            assert_eq!(
                canonical_header(h2),
                canonical_header(h),
                "proxy v2: round trip"
            );
        }
        other => panic!("proxy v2: re-encoded header does not parse: {other:?}"),
    }
    // A plain TCP over IPv4 header without TLVs is re-encoded byte for byte.
    if data.get(12..16) == Some(&[0x21, 0x11, 0, 12]) {
        let m = proxy_protocol::encode_v2(&h, &[], &mut out);
        assert_eq!(out[..m], data[..n], "proxy v2: re-encoding differs");
    }

    let mut out = [0u8; proxy_protocol::MAX_V1_LEN];
    let (src, dst) = match h {
        ProxyHeader::Proxy { src, dst } => (src, dst),
        ProxyHeader::Local => return,
    };
    let m = proxy_protocol::encode_v1(src, dst, &mut out);
    assert!(m > 0, "proxy v1: a parsed header cannot be encoded");
    let (cs, cd) = (canonical_sa(src), canonical_sa(dst));
    let expected = if cs.is_ipv4() == cd.is_ipv4() {
        ProxyHeader::Proxy { src: cs, dst: cd }
    } else {
        ProxyHeader::Local
    };
    assert_eq!(
        proxy_protocol::parse(&out[..m]),
        Ok(Parse::Done(expected, m)),
        "proxy v1: round trip"
    );
    // TCP4 text has exactly one spelling, so it is re-encoded byte for byte.
    if data.starts_with(b"PROXY TCP4 ") {
        assert_eq!(out[..m], data[..n], "proxy v1: re-encoding differs");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Upstream replies (chaining)
// ---------------------------------------------------------------------------------------------------------------

/// Method choice, auth status, SOCKS5 reply and HTTP CONNECT reply, all on the same input.
pub fn upstream_reply_target(data: &[u8]) {
    if let Ok(Parse::Done(method, n)) =
        check_stream("upstream method", data, 64, upstream::parse_method_choice)
    {
        let mut out = [0u8; socks5::MAX_METHOD_LEN];
        let m = socks5::encode_method(method, &mut out);
        assert_eq!(out[..m], data[..n], "upstream method: re-encoding differs");
    }
    let _ = check_stream(
        "upstream auth status",
        data,
        64,
        upstream::parse_auth_status,
    );

    if let Ok(Parse::Done(reply, _)) = check_stream(
        "upstream socks5 reply",
        data,
        600,
        upstream::parse_socks5_reply,
    ) {
        if let TargetAddr::Ip(bnd) = reply.bnd {
            let mut out = [0u8; socks5::MAX_REPLY_LEN];
            let m = socks5::encode_reply(reply.rep, bnd, &mut out);
            assert!(m > 0);
            let expected = upstream::Socks5Reply {
                rep: reply.rep,
                bnd: TargetAddr::Ip(canonical_sa(bnd)),
            };
            assert_eq!(
                upstream::parse_socks5_reply(&out[..m]),
                Ok(Parse::Done(expected, m)),
                "upstream socks5 reply: round trip"
            );
        }
    }

    let _ = check_stream(
        "upstream http connect reply",
        data,
        0,
        upstream::parse_http_connect_reply,
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Users file
// ---------------------------------------------------------------------------------------------------------------

/// Users::parse on UTF-8 input. Every accepted line must log in with its own plain password (hashed ones are
/// not verified: a bcrypt cost of 31 would take hours); errors name a line of the file and never quote a password.
pub fn users_file_target(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The entries as Users::parse documents them: one NAME:PASS per non-blank, non-comment, trimmed line.
    let body = text.strip_prefix('\u{feff}').unwrap_or(text);
    let entries: Vec<(usize, Option<(&str, &str)>)> = body
        .lines()
        .enumerate()
        .map(|(i, raw)| (i + 1, raw.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(i, l)| (i, l.split_once(':')))
        .collect();
    let line_count = body.lines().count();
    match Users::parse(text) {
        Ok(users) => {
            assert_eq!(users.len(), entries.len(), "users: entry count differs");
            for (_, entry) in &entries {
                let Some((name, pass)) = entry else {
                    panic!("users: a line without ':' was accepted");
                };
                if users.needs_slow_verify(name.as_bytes()) {
                    continue;
                }
                assert!(
                    users.verify(name.as_bytes(), pass.as_bytes()).is_some(),
                    "users: an accepted plain-text user cannot log in"
                );
                let mut wrong = pass.as_bytes().to_vec();
                wrong.push(b'x');
                assert!(
                    users.verify(name.as_bytes(), &wrong).is_none(),
                    "users: a wrong password logged in"
                );
            }
        }
        Err(e) => {
            assert!(
                e.line >= 1 && e.line <= line_count,
                "users: error names line {} of {line_count}",
                e.line
            );
            // The failing line is an entry; its password must not appear in the message. A message that contains
            // the password's text by coincidence (e.g. a password spelled like part of "duplicate user name ...")
            // is told apart by changing the password: a message that does not change does not depend on it. The
            // "$id$" scheme tag of an unsupported hash is the one part of a secret a message may show.
            if let Some((_, Some((name, pass)))) = entries.iter().find(|(i, _)| *i == e.line) {
                let tag_only = pass.starts_with('$')
                    && pass.len() <= 34
                    && pass.ends_with('$')
                    && pass.matches('$').count() == 2;
                if pass.len() >= 4 && !name.contains(pass) && !tag_only && e.message.contains(pass)
                {
                    let changed = with_password_changed(text, e.line, pass);
                    let again = Users::parse(&changed).err().map(|e2| e2.message);
                    assert!(
                        again.as_deref() == Some(e.message.as_str()),
                        "users: an error message quotes the password"
                    );
                }
            }
        }
    }
}

/// `text` with the password of 1-based line `line` replaced by one of the same length and character classes.
fn with_password_changed(text: &str, line: usize, pass: &str) -> String {
    let rotate = |c: char| match c {
        'a'..='y' | 'A'..='Y' | '0'..='8' => char::from(c as u8 + 1),
        'z' => 'a',
        'Z' => 'A',
        '9' => '0',
        _ => c,
    };
    let other: String = pass.chars().map(rotate).collect();
    text.split('\n')
        .enumerate()
        .map(|(i, raw)| {
            if i + 1 != line {
                return raw.to_string();
            }
            match raw.split_once(':') {
                Some((before, after)) => format!("{before}:{}", after.replacen(pass, &other, 1)),
                None => raw.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------------------------
// ACL
// ---------------------------------------------------------------------------------------------------------------

/// Cidr::from_str on the whole input and parse_dest_rules on it; accepted values print and parse back to
/// themselves.
pub fn acl_target(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Cidr::from_str(text) {
        check_cidr(c);
    }
    if let Ok(rules) = acl::parse_dest_rules(text) {
        let mut all = Vec::with_capacity(rules.len());
        for rule in &rules {
            check_cidr(rule.cidr);
            let cidr = rule.cidr.to_string();
            let item = match (rule.ports, cidr.contains(':')) {
                (None, _) => cidr,
                (Some((lo, hi)), false) => format!("{cidr}:{lo}-{hi}"),
                (Some((lo, hi)), true) => format!("[{cidr}]:{lo}-{hi}"),
            };
            if let Some((lo, hi)) = rule.ports {
                assert!(lo >= 1 && lo <= hi, "acl: bad port range accepted");
            }
            assert_eq!(
                acl::parse_dest_rules(&item).as_deref(),
                Ok(std::slice::from_ref(rule)),
                "acl: rule round trip"
            );
            all.push(item);
        }
        assert_eq!(
            acl::parse_dest_rules(&all.join(", ")),
            Ok(rules),
            "acl: rule list round trip"
        );
    }
}

fn check_cidr(c: Cidr) {
    let text = c.to_string();
    assert_eq!(Cidr::from_str(&text), Ok(c), "acl: CIDR round trip");
    let (addr, prefix) = text.split_once('/').expect("CIDR text has a prefix");
    let ip: IpAddr = addr.parse().expect("CIDR text has an address");
    let prefix: u8 = prefix.parse().expect("CIDR text has a numeric prefix");
    assert!(prefix <= if ip.is_ipv4() { 32 } else { 128 });
    assert!(
        c.contains(ip),
        "acl: a block does not contain its own address"
    );
    // A mapped IPv6 block of /96 or longer must have been turned into its IPv4 form.
    if let IpAddr::V6(v6) = ip {
        assert!(
            v6.to_ipv4_mapped().is_none() || prefix < 96,
            "acl: mapped block kept in IPv6 form"
        );
    }
}

/// Policy file: every UTF-8 input either loads or gives errors, each of the form `FILE:LINE: KEY: problem` with a
/// line inside the file; a file that loads loads the same way twice. Every line is also tried as a `dest` pattern.
pub fn policy_target(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count().max(1);
    match policy::parse(text, "fuzz.toml", Users::default()) {
        Ok((users, p)) => {
            let again = policy::parse(text, "fuzz.toml", Users::default());
            let (users2, p2) = again
                .unwrap_or_else(|_| panic!("policy: a file that loaded fails the second time"));
            assert_eq!(
                users.len(),
                users2.len(),
                "policy: users differ between loads"
            );
            assert_eq!(
                p.rule_count(),
                p2.rule_count(),
                "policy: rules differ between loads"
            );
            // Every user's quota (and the defaults') is a positive byte count with a period of at least 1 s.
            assert_eq!(p.quota(None), None, "policy: a quota for anonymous clients");
            for user in ["alice", "bob", "u"] {
                if let Some(q) = p.quota(Some(user)) {
                    assert!(q.bytes >= 1, "policy: a zero quota");
                    assert!(
                        q.period.is_none_or(|d| d.as_secs() >= 1),
                        "policy: a quota period under 1 s"
                    );
                    assert_eq!(p2.quota(Some(user)), Some(q), "policy: quotas differ");
                }
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "policy: an error without a message");
            for e in &errors {
                let rest = e
                    .strip_prefix("fuzz.toml:")
                    .unwrap_or_else(|| panic!("policy: error without the file name"));
                let line: usize = rest
                    .split(':')
                    .next()
                    .and_then(|l| l.parse().ok())
                    .unwrap_or_else(|| panic!("policy: error without a line number"));
                assert!(
                    line >= 1 && line <= lines + 1,
                    "policy: line number outside the file"
                );
                assert!(!e.contains('\n'), "policy: an error spans lines");
            }
        }
    }
    for line in text.lines() {
        let _ = parse_pattern(line);
    }
}

/// Host-name normaliser: never panics; what it accepts is short, lower-case letters, digits, '-' and '.', without
/// empty labels, and normalising it again is the identity.
pub fn hostname_target(data: &[u8]) {
    if let Ok(n) = normalize(data) {
        assert!(
            !n.is_empty() && n.len() <= 253,
            "hostname: bad length accepted"
        );
        assert!(
            n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'),
            "hostname: bad byte accepted"
        );
        assert!(
            n.split('.').all(|l| !l.is_empty() && l.len() <= 63),
            "hostname: bad label accepted"
        );
        assert_eq!(
            normalize(n.as_bytes()).as_deref(),
            Ok(n.as_str()),
            "hostname: not idempotent"
        );
        let upper = n.to_ascii_uppercase() + ".";
        assert_eq!(
            normalize(upper.as_bytes()).as_deref(),
            Ok(n.as_str()),
            "hostname: case or dot changes it"
        );
    }
}
