//! Client side of the protocols we speak to an upstream proxy when chaining: SOCKS5 (RFC 1928, RFC 1929) replies
//! and HTTP CONNECT (RFC 9110 §9.3.6) with Basic proxy authentication (RFC 7617).
//!
//! The upstream is a peer like any other: its bytes are parsed with the same defensive rules as a client's.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::socks5::{parse_coded, AUTH_VERSION, VERSION as SOCKS5_VERSION};
use super::{base64, canonical_ip, Failure, Parse, ProtoError, Reader, TargetAddr, Writer};

/// Largest CONNECT response head we buffer; a longer one is `HeadTooLarge` (no proxy needs more than a few lines).
pub const MAX_HTTP_REPLY_HEAD: usize = 16 * 1024;

/// Most header fields a CONNECT response head may have; one more is `HeadTooLarge`.
const MAX_HTTP_REPLY_HEADERS: usize = 64;

/// Longest credential part accepted by [`encode_http_connect`]: the RFC 1929 limit, so one config serves both.
const MAX_CREDENTIAL: usize = 255;

/// Longest request [`encode_http_connect`] writes: a 255-byte name with port 65535 twice (request line and Host)
/// and Basic credentials of 255 + 1 + 255 bytes (684 base64 characters).
pub const MAX_HTTP_CONNECT_LEN: usize = b"CONNECT ".len()
    + MAX_AUTHORITY
    + b" HTTP/1.1\r\nHost: ".len()
    + MAX_AUTHORITY
    + b"\r\nProxy-Authorization: Basic ".len()
    + base64::encoded_len(2 * MAX_CREDENTIAL + 1)
    + b"\r\n\r\n".len();

/// Longest `host:port`: a 255-byte name (RFC 1928 §5, SOCKS4a cap), ':' and a 5-digit port.
const MAX_AUTHORITY: usize = 255 + 1 + 5;

/// Parses the upstream's method selection (RFC 1928 §3) `05 METHOD`; returns METHOD, X'FF' included (the caller
/// closes on X'FF' or on a method it did not offer).
pub fn parse_method_choice(buf: &[u8]) -> Result<Parse<u8>, ProtoError> {
    parse_version_and_byte(buf, &[SOCKS5_VERSION])
}

/// Parses the RFC 1929 §2 status `VER STATUS`; VER X'01' or, leniently, X'05'; true when STATUS is X'00' (any
/// other value is a failure, RFC 1929 §2).
pub fn parse_auth_status(buf: &[u8]) -> Result<Parse<bool>, ProtoError> {
    Ok(parse_version_and_byte(buf, &[AUTH_VERSION, SOCKS5_VERSION])?.map(|status| status == 0))
}

/// Parses a two-byte `VER VALUE` message whose VER is one of `versions`; returns VALUE.
fn parse_version_and_byte(buf: &[u8], versions: &[u8]) -> Result<Parse<u8>, ProtoError> {
    let mut r = Reader::new(buf);
    need!(r.version(versions)?);
    let value = need!(r.u8());
    Ok(Parse::Done(value, r.pos()))
}

/// An upstream's SOCKS5 reply (RFC 1928 §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socks5Reply {
    /// REP: X'00' succeeded; see [`failure_from_socks5_reply`] for the rest.
    pub rep: u8,
    /// BND.ADDR and BND.PORT; RFC 1928 §6 allows a domain here, so one is parsed, not rejected.
    pub bnd: TargetAddr,
}

/// Parses a reply (RFC 1928 §6) `05 REP RSV ATYP BND.ADDR BND.PORT`.
///
/// REP is returned unchecked and a non-zero RSV is tolerated (as in [`super::socks5::parse_request`]); an
/// unknown ATYP, or a domain BND.ADDR that is empty or has bytes [`super::Name::new`] refuses, is an error.
pub fn parse_socks5_reply(buf: &[u8]) -> Result<Parse<Socks5Reply>, ProtoError> {
    Ok(parse_coded(buf, Ok)?.map(|(rep, bnd)| Socks5Reply { rep, bnd }))
}

/// Maps an upstream's REP (RFC 1928 §6) onto our [`Failure`], so our client sees the upstream's reason; X'00'
/// (not a failure) and unassigned codes map to `General`.
pub fn failure_from_socks5_reply(rep: u8) -> Failure {
    match rep {
        0x02 => Failure::NotAllowed,
        0x03 => Failure::NetworkUnreachable,
        0x04 => Failure::HostUnreachable,
        0x05 => Failure::ConnectionRefused,
        0x06 => Failure::TimedOut,
        0x07 => Failure::CommandNotSupported,
        0x08 => Failure::AddressNotSupported,
        _ => Failure::General,
    }
}

/// True for bytes allowed in an RFC 3986 §3.2.2 reg-name (unreserved, sub-delims, '%'): anything else (':', '@',
/// '[', '?', '#', quotes...) would change how the upstream splits the authority.
fn is_reg_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b)
}

/// Writes `host:port` for the request line and Host header (RFC 9110 §9.3.6, authority-form of RFC 9112 §3.2.3):
/// IPv6 in brackets, IPv4-mapped IPv6 as IPv4, no zone id; `None` if a name is not a valid reg-name.
fn put_authority(w: &mut Writer<'_>, target: &TargetAddr) -> Option<()> {
    let port = target.port();
    let written = match target {
        TargetAddr::Ip(sa) => match canonical_ip(sa.ip()) {
            IpAddr::V4(v4) => write!(w, "{v4}:{port}"),
            IpAddr::V6(v6) => write!(w, "[{v6}]:{port}"),
        },
        TargetAddr::Domain(name, _) => {
            if !name.as_bytes().iter().all(|&b| is_reg_name_byte(b)) {
                return None;
            }
            write!(w, "{name}:{port}")
        }
    };
    written.ok()
}

/// Client side: encodes an HTTP/1.1 CONNECT request (RFC 9110 §9.3.6) with an optional Basic
/// `Proxy-Authorization` (RFC 9110 §11.7.2, RFC 7617 §2).
///
/// Returns 0 when the request cannot be expressed safely: a domain with a byte outside RFC 3986 reg-name, a user
/// or password over 255 bytes, a user containing ':' (RFC 7617 §2: the server splits at the first colon), control
/// characters in either (RFC 7617 §2), or `out` too short ([`MAX_HTTP_CONNECT_LEN`] always suffices).
pub fn encode_http_connect(
    target: &TargetAddr,
    basic_auth: Option<(&[u8], &[u8])>,
    out: &mut [u8],
) -> usize {
    let mut w = Writer::new(out);
    w.put(b"CONNECT ");
    if put_authority(&mut w, target).is_none() {
        return 0;
    }
    w.put(b" HTTP/1.1\r\nHost: ");
    if put_authority(&mut w, target).is_none() {
        return 0;
    }
    w.put(b"\r\n");
    if let Some((user, pass)) = basic_auth {
        if put_basic_auth(&mut w, user, pass).is_none() {
            return 0;
        }
    }
    w.put(b"\r\n");
    w.finish().unwrap_or(0)
}

/// Writes a `Proxy-Authorization: Basic` line (RFC 7617 §2); None when the credentials cannot be sent safely.
fn put_basic_auth(w: &mut Writer<'_>, user: &[u8], pass: &[u8]) -> Option<()> {
    if user.len() > MAX_CREDENTIAL
        || pass.len() > MAX_CREDENTIAL
        || user.contains(&b':')
        || user.iter().chain(pass).any(|b| b.is_ascii_control())
    {
        return None;
    }
    // user ":" pass, assembled on the stack (no allocation), then base64-encoded.
    let mut plain = [0u8; 2 * MAX_CREDENTIAL + 1];
    let mut pw = Writer::new(&mut plain);
    pw.put(user).u8(b':').put(pass);
    let plain_len = pw.finish()?;
    let mut encoded = [0u8; base64::encoded_len(2 * MAX_CREDENTIAL + 1)];
    let n = base64::encode(plain.get(..plain_len).unwrap_or(&[]), &mut encoded);
    w.put(b"Proxy-Authorization: Basic ")
        .put(encoded.get(..n).unwrap_or(&[]))
        .put(b"\r\n");
    Some(())
}

/// Longest `Proxy-Authorization` line [`put_basic_auth`] writes.
const MAX_AUTH_LINE: usize =
    b"Proxy-Authorization: Basic \r\n".len() + base64::encoded_len(2 * MAX_CREDENTIAL + 1);

/// Client side, plain HTTP through an HTTP upstream (as Squid's `cache_peer` forwards): turns a request head in
/// origin-form (`METHOD SP path SP version CRLF fields CRLF`, as `http::parse_request` rewrites it) into the
/// absolute-form a proxy is sent (RFC 9112 §3.2.2; `OPTIONS *` becomes the bare authority, RFC 9112 §3.2.4), with a
/// Basic `Proxy-Authorization` for the upstream's credentials. Appends to `out`; false when the head or the
/// credentials cannot be expressed safely.
pub fn encode_forward_head(
    head: &[u8],
    target: &TargetAddr,
    basic_auth: Option<(&[u8], &[u8])>,
    out: &mut Vec<u8>,
) -> bool {
    let Some(eol) = head.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    let (line, fields) = head.split_at(eol);
    let (Some(sp1), Some(sp2)) = (
        line.iter().position(|&b| b == b' '),
        line.iter().rposition(|&b| b == b' '),
    ) else {
        return false;
    };
    let (Some(method), Some(path), Some(version)) =
        (line.get(..sp1), line.get(sp1 + 1..sp2), line.get(sp2..))
    else {
        return false;
    };
    if sp1 >= sp2 || path.is_empty() {
        return false;
    }
    let mut extra = [0u8; MAX_AUTHORITY + MAX_AUTH_LINE + 16];
    let mut w = Writer::new(&mut extra);
    w.put(b"http://");
    if put_authority(&mut w, target).is_none() {
        return false;
    }
    let Some(authority_len) = w.finish() else {
        return false;
    };
    let authority = extra.get(..authority_len).unwrap_or(&[]);
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(authority);
    if path != b"*" {
        out.extend_from_slice(path);
    }
    out.extend_from_slice(version);
    out.extend_from_slice(b"\r\n");
    if let Some((user, pass)) = basic_auth {
        let mut w = Writer::new(&mut extra);
        if put_basic_auth(&mut w, user, pass).is_none() {
            return false;
        }
        let Some(n) = w.finish() else {
            return false;
        };
        out.extend_from_slice(extra.get(..n).unwrap_or(&[]));
    }
    out.extend_from_slice(fields.get(2..).unwrap_or(&[]));
    true
}

/// The status of an upstream's CONNECT response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpConnectReply {
    /// Status code; any 2xx means the tunnel is open (RFC 9110 §9.3.6), anything else is a refusal.
    pub status: u16,
}

/// Parses the head of the upstream's CONNECT response (status line and headers, RFC 9112 §4 and §5).
///
/// `Incomplete` until the blank line; `consumed` is the head length only: after a 2xx the next byte is tunnel data
/// (RFC 9110 §9.3.6: Content-Length and Transfer-Encoding are ignored in a 2xx CONNECT response). A head over
/// [`MAX_HTTP_REPLY_HEAD`] or with more than `MAX_HTTP_REPLY_HEADERS` (64) header fields is `HeadTooLarge`; bad
/// syntax is `Malformed`. A 1xx interim response is returned like any other status; callers treat every non-2xx as
/// a failure.
pub fn parse_http_connect_reply(buf: &[u8]) -> Result<Parse<HttpConnectReply>, ProtoError> {
    let window = buf.get(..MAX_HTTP_REPLY_HEAD).unwrap_or(buf);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HTTP_REPLY_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(window) {
        Ok(httparse::Status::Complete(len)) => {
            let status = response.code.ok_or(ProtoError::Malformed)?;
            Ok(Parse::Done(HttpConnectReply { status }, len))
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_HTTP_REPLY_HEAD => {
            Err(ProtoError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => Ok(Parse::Incomplete),
        Err(httparse::Error::TooManyHeaders) => Err(ProtoError::HeadTooLarge),
        Err(_) => Err(ProtoError::Malformed),
    }
}

/// Maps an upstream's CONNECT status onto our [`Failure`] (RFC 9110 §15).
///
/// 401/403/407 -> `NotAllowed` (policy or credentials; 401 from misconfigured proxies); 405/501 ->
/// `CommandNotSupported` (the upstream does not do CONNECT); 408/504 -> `TimedOut`; everything else, 502 and 503
/// included (they do not say whether the host, the network or the upstream itself failed), and 2xx (not a failure)
/// -> `General`.
pub fn failure_from_http_status(status: u16) -> Failure {
    match status {
        401 | 403 | 407 => Failure::NotAllowed,
        405 | 501 => Failure::CommandNotSupported,
        408 | 504 => Failure::TimedOut,
        _ => Failure::General,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::proto::socks5;
    use crate::proto::testutil::{cat, check_socks5_address_errors, dom, ip};
    use crate::proto::Name;
    use std::net::SocketAddr;

    // ---- SOCKS5 client replies ----

    #[test]
    fn method_choice() {
        for m in [
            socks5::METHOD_NO_AUTH,
            socks5::METHOD_USER_PASS,
            socks5::METHOD_NO_ACCEPTABLE,
        ] {
            check_valid!(parse_method_choice, &[5, m], m, &[1, 0]);
            let mut out = [0u8; socks5::MAX_METHOD_LEN];
            let n = socks5::encode_method(m, &mut out);
            assert_eq!(parse_method_choice(&out[..n]), Ok(Parse::Done(m, 2)));
        }
        #[rustfmt::skip]
        check_bad_bytes!(parse_method_choice,
            (&[0, 0], 0, [0u8, 1, 4, 0xff], ProtoError::BadVersion),
        );
    }

    #[test]
    fn auth_status() {
        check_valid!(parse_auth_status, &[1, 0], true, &[5, 0, 0, 1]);
        check_valid!(parse_auth_status, &[5, 0], true, &[5, 0, 0, 1]);
        check_valid!(parse_auth_status, &[1, 1], false, &[5, 0, 0, 1]);
        check_valid!(parse_auth_status, &[1, 0xff], false, &[5, 0, 0, 1]);
        #[rustfmt::skip]
        check_bad_bytes!(parse_auth_status,
            (&[0, 0], 0, [0u8, 2, 4, 0xff], ProtoError::BadVersion),
        );
        for ok in [true, false] {
            let mut out = [0u8; socks5::MAX_AUTH_STATUS_LEN];
            let n = socks5::encode_auth_status(ok, &mut out);
            assert_eq!(parse_auth_status(&out[..n]), Ok(Parse::Done(ok, 2)));
        }
    }

    #[test]
    fn socks5_reply_valid() {
        let next = b"tunnel bytes";
        let r = |rep, bnd| Socks5Reply { rep, bnd };
        check_valid!(
            parse_socks5_reply,
            &[5, 0, 0, 1, 10, 0, 0, 1, 0x04, 0x38],
            r(0, ip("10.0.0.1:1080")),
            next
        );
        let v6: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
        let msg = cat(&[&[5, 4, 0, 4], &v6.octets(), &[0, 80]]);
        check_valid!(parse_socks5_reply, &msg, r(4, ip("[2001:db8::7]:80")), next);
        // A domain BND.ADDR is legal (RFC 1928 §6) and parsed.
        let msg = cat(&[&[5, 0, 0, 3, 9], b"proxy.lan", &[0x1f, 0x90]]);
        check_valid!(
            parse_socks5_reply,
            &msg,
            r(0, dom(b"proxy.lan", 8080)),
            next
        );
        // Non-zero RSV tolerated.
        check_valid!(
            parse_socks5_reply,
            &[5, 1, 9, 1, 0, 0, 0, 0, 0, 0],
            r(1, ip("0.0.0.0:0")),
            next
        );
    }

    #[test]
    fn socks5_reply_malformed() {
        // REP is not judged: any value, X'00' included, gets the same checks.
        for rep in [0, 1, 0xff] {
            check_socks5_address_errors(parse_socks5_reply, rep);
        }
    }

    #[test]
    fn socks5_reply_round_trip() {
        for (rep, bnd) in [(0u8, "1.2.3.4:5"), (5, "[::1]:65535"), (1, "[fe80::1]:0")] {
            let sa: SocketAddr = bnd.parse().unwrap();
            let mut out = [0u8; socks5::MAX_REPLY_LEN];
            let n = socks5::encode_reply(rep, sa, &mut out);
            let expected = Socks5Reply {
                rep,
                bnd: TargetAddr::Ip(sa),
            };
            assert_eq!(parse_socks5_reply(&out[..n]), Ok(Parse::Done(expected, n)));
        }
        // IPv4-mapped BND comes back as IPv4.
        let mut out = [0u8; socks5::MAX_REPLY_LEN];
        let n = socks5::encode_reply(0, "[::ffff:9.8.7.6]:1".parse().unwrap(), &mut out);
        let expected = Socks5Reply {
            rep: 0,
            bnd: ip("9.8.7.6:1"),
        };
        assert_eq!(parse_socks5_reply(&out[..n]), Ok(Parse::Done(expected, n)));
    }

    #[test]
    fn socks5_failure_mapping() {
        let all = [
            Failure::General,
            Failure::NotAllowed,
            Failure::NetworkUnreachable,
            Failure::HostUnreachable,
            Failure::ConnectionRefused,
            Failure::TimedOut,
            Failure::CommandNotSupported,
            Failure::AddressNotSupported,
        ];
        // Our own REP table read back gives the same failure.
        for f in all {
            assert_eq!(failure_from_socks5_reply(f.socks5_reply()), f);
        }
        for rep in [0x00u8, 0x09, 0x80, 0xff] {
            assert_eq!(failure_from_socks5_reply(rep), Failure::General);
        }
    }

    #[test]
    fn forward_heads_become_absolute_form() {
        let target = TargetAddr::Domain(Name::new(b"example.com").unwrap(), 8080);
        let head = b"GET /a?b=1 HTTP/1.1\r\nHost: example.com:8080\r\n\r\n";
        let mut out = Vec::new();
        assert!(encode_forward_head(
            head,
            &target,
            Some((b"u", b"p")),
            &mut out
        ));
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "GET http://example.com:8080/a?b=1 HTTP/1.1\r\nProxy-Authorization: Basic dTpw\r\nHost: example.com:8080\r\n\r\n"
        );
        out.clear();
        let v6 = TargetAddr::Ip("[::1]:80".parse().unwrap());
        assert!(encode_forward_head(
            b"OPTIONS * HTTP/1.0\r\n\r\n",
            &v6,
            None,
            &mut out
        ));
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "OPTIONS http://[::1]:80 HTTP/1.0\r\n\r\n"
        );
        out.clear();
        assert!(!encode_forward_head(b"GET\r\n\r\n", &v6, None, &mut out));
        assert!(!encode_forward_head(
            b"GET / HTTP/1.1\r\n\r\n",
            &v6,
            Some((b"a:b", b"")),
            &mut out
        ));
    }

    // ---- HTTP CONNECT ----

    /// Parses an encoded CONNECT with httparse as a server would and returns (request-target, Host, auth).
    fn server_view(req: &[u8]) -> (String, String, Option<String>) {
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut r = httparse::Request::new(&mut headers);
        assert_eq!(r.parse(req), Ok(httparse::Status::Complete(req.len())));
        assert_eq!(r.method, Some("CONNECT"));
        assert_eq!(r.version, Some(1));
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8(h.value.to_vec()).unwrap())
        };
        (
            r.path.unwrap().to_string(),
            header("Host").unwrap(),
            header("Proxy-Authorization"),
        )
    }

    #[test]
    fn http_connect_encoding() {
        let mut out = [0u8; MAX_HTTP_CONNECT_LEN];
        let n = encode_http_connect(&dom(b"example.com", 443), None, &mut out);
        assert_eq!(
            &out[..n],
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
        );
        let n = encode_http_connect(
            &ip("192.0.2.1:22"),
            Some((b"Aladdin", b"open sesame")),
            &mut out,
        );
        assert_eq!(
            &out[..n],
            &b"CONNECT 192.0.2.1:22 HTTP/1.1\r\nHost: 192.0.2.1:22\r\n\
               Proxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n\r\n"[..]
        );
        let cases = [
            (ip("[2001:db8::1]:8443"), "[2001:db8::1]:8443"),
            (ip("[::ffff:10.0.0.1]:80"), "10.0.0.1:80"),
            (ip("[fe80::1%3]:80"), "[fe80::1]:80"),
            (
                dom(b"a-b_c.~x%41!$&'()*+,;=", 1),
                "a-b_c.~x%41!$&'()*+,;=:1",
            ),
        ];
        for (target, authority) in &cases {
            let n = encode_http_connect(target, None, &mut out);
            let (path, host, auth) = server_view(&out[..n]);
            assert_eq!(
                (path.as_str(), host.as_str(), auth),
                (*authority, *authority, None)
            );
        }
        // Empty user and password are legal in Basic (RFC 7617 §2).
        let n = encode_http_connect(&ip("1.2.3.4:5"), Some((b"", b"")), &mut out);
        assert_eq!(server_view(&out[..n]).2.as_deref(), Some("Basic Og=="));
    }

    #[test]
    fn http_connect_worst_case_fits() {
        let mut out = [0u8; MAX_HTTP_CONNECT_LEN];
        let target = dom(&[b'x'; 255], 65535);
        let (u, p) = ([0xffu8; 255], [b'p'; 255]);
        let n = encode_http_connect(&target, Some((&u, &p)), &mut out);
        assert_eq!(n, MAX_HTTP_CONNECT_LEN);
        let (path, host, auth) = server_view(&out[..n]);
        assert_eq!(path, host);
        assert_eq!(auth.map(|a| a.len()), Some(6 + base64::encoded_len(511)));
        assert_eq!(
            encode_http_connect(&target, Some((&u, &p)), &mut out[..n - 1]),
            0
        );
    }

    #[test]
    fn http_connect_refuses_unsafe_input() {
        let mut out = [0u8; MAX_HTTP_CONNECT_LEN];
        let t = dom(b"example.com", 443);
        assert_eq!(
            encode_http_connect(&t, Some((&[b'u'; 256], b"p")), &mut out),
            0
        );
        assert_eq!(
            encode_http_connect(&t, Some((b"u", &[b'p'; 256])), &mut out),
            0
        );
        assert_eq!(encode_http_connect(&t, Some((b"a:b", b"p")), &mut out), 0);
        assert_eq!(encode_http_connect(&t, Some((b"u", b"p\r\n")), &mut out), 0);
        assert_eq!(encode_http_connect(&t, Some((b"u\0", b"p")), &mut out), 0);
        // A colon in the password is fine: the server splits at the first one.
        assert!(encode_http_connect(&t, Some((b"u", b"a:b")), &mut out) > 0);
        // Each byte that would let the name change how the upstream splits the authority ("evil.com:80",
        // "user@host", "[::1]", a query or fragment, quotes or angles) makes the request inexpressible.
        for c in *b":@[]?#\"<" {
            let name = [b'h', c, b'x'];
            assert_eq!(
                encode_http_connect(&dom(&name, 80), None, &mut out),
                0,
                "{name:?}"
            );
        }
        assert_eq!(encode_http_connect(&t, None, &mut out[..20]), 0);
    }

    #[test]
    fn http_reply_valid() {
        let next = b"\x16\x03\x01tunnel";
        let st = |status| HttpConnectReply { status };
        check_valid!(
            parse_http_connect_reply,
            b"HTTP/1.1 200 Connection established\r\n\r\n",
            st(200),
            next
        );
        check_valid!(
            parse_http_connect_reply,
            b"HTTP/1.0 200\r\n\r\n",
            st(200),
            next
        );
        check_valid!(
            parse_http_connect_reply,
            b"HTTP/1.1 204 OK\nVia: x\n\n",
            st(204),
            next
        );
        let msg = b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"p\"\r\n\
                    Content-Length: 5\r\n\r\n";
        check_valid!(parse_http_connect_reply, msg, st(407), b"body!");
        // 64 header fields are accepted.
        let mut msg = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..MAX_HTTP_REPLY_HEADERS {
            msg.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        msg.extend_from_slice(b"\r\n");
        check_valid!(parse_http_connect_reply, &msg, st(200), next);
    }

    #[test]
    fn http_reply_malformed() {
        for (msg, at) in [
            (&b"SSH-2.0-OpenSSH\r\n\r\n"[..], 1),
            (b"HTTP/2 200\r\n\r\n", 6),
            // httparse checks the three status digits together.
            (b"HTTP/1.1 20x OK\r\n\r\n", 12),
            (b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n", 21),
            (b"\x05\x00", 1),
        ] {
            check_err!(parse_http_connect_reply, msg, ProtoError::Malformed, at);
        }
        // 65 header fields: too large.
        let mut msg = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HTTP_REPLY_HEADERS {
            msg.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        msg.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_http_connect_reply(&msg),
            Err(ProtoError::HeadTooLarge)
        );
    }

    #[test]
    fn http_reply_head_limit() {
        // A head of exactly MAX_HTTP_REPLY_HEAD bytes is accepted, one byte more is not.
        let build = |len: usize| {
            let mut m = b"HTTP/1.1 200 OK\r\nX-Pad: ".to_vec();
            m.resize(len - 4, b'a');
            m.extend_from_slice(b"\r\n\r\n");
            m
        };
        let exact = build(MAX_HTTP_REPLY_HEAD);
        let mut joined = exact.clone();
        joined.extend_from_slice(b"data");
        assert_eq!(
            parse_http_connect_reply(&joined),
            Ok(Parse::Done(
                HttpConnectReply { status: 200 },
                MAX_HTTP_REPLY_HEAD
            ))
        );
        let over = build(MAX_HTTP_REPLY_HEAD + 1);
        // An endless head fails as soon as it passes the limit.
        let endless = build(4 * MAX_HTTP_REPLY_HEAD);
        let endless = &endless[..endless.len() - 4];
        for (input, want) in [
            (&over[..MAX_HTTP_REPLY_HEAD], Ok(Parse::Incomplete)),
            (&over[..], Err(ProtoError::HeadTooLarge)),
            (&endless[..MAX_HTTP_REPLY_HEAD], Ok(Parse::Incomplete)),
            (
                &endless[..MAX_HTTP_REPLY_HEAD + 1],
                Err(ProtoError::HeadTooLarge),
            ),
            (endless, Err(ProtoError::HeadTooLarge)),
        ] {
            assert_eq!(
                parse_http_connect_reply(input),
                want,
                "{} bytes",
                input.len()
            );
        }
    }

    #[test]
    fn http_failure_mapping() {
        for (f, statuses) in [
            (Failure::NotAllowed, &[403, 407, 401][..]),
            (Failure::CommandNotSupported, &[405, 501]),
            (Failure::TimedOut, &[504, 408]),
            (Failure::General, &[502, 503, 400, 500, 200]),
        ] {
            for &status in statuses {
                assert_eq!(failure_from_http_status(status), f, "{status}");
            }
        }
    }

    // ---- never panic on arbitrary input ----

    /// Header-ish text makes HTTP heads complete.
    const HEAD_TEXT: &[u8] = b"\r\n\r\n: aZ-09\t";

    #[test]
    fn fuzz_socks5_client_parsers() {
        let shapes: [&[u8]; 4] = [&[5, 0, 0, 1], &[5, 0, 0, 2], &[5, 0, 0, 3], &[5, 0, 0, 4]];
        fuzz_contract!(
            0xa076_1d64_78bd_642f,
            shapes,
            HEAD_TEXT,
            parse_method_choice,
            parse_auth_status,
            parse_socks5_reply,
        );
    }

    #[test]
    fn fuzz_http_connect_reply() {
        let shape: &[u8] = b"HTTP/1.1 200 OK\r\n";
        fuzz_contract!(
            0xe703_7ed1_a0b4_28db,
            [shape],
            HEAD_TEXT,
            parse_http_connect_reply
        );
    }
}
