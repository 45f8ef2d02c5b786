//! Request targets (authority-form, absolute-form; RFC 9112 §3.2) and Basic credentials (RFC 7617).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::fields::{parse_decimal, trim_ows};
use super::{BasicCredentials, CRED_CAP};
use crate::proto::{canonical_ip, Name, ProtoError, TargetAddr};

/// RFC 3986 §2.3 unreserved characters: the only ones we accept in a reg-name. Percent-encoding and sub-delims
/// are legal in URIs but never in a resolvable DNS name, and letting them through would only reach the resolver.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// A name whose last label is numeric is meant as an IPv4 address (WHATWG URL, RFC 3696 §2: no all-numeric TLD).
/// When it is not a strict dotted quad (e.g. "127.1", "0x7f.1", "010.0.0.1") resolvers would still read it as an
/// address in some legacy form, sidestepping literal-address checks, so it is rejected.
fn looks_numeric(host: &[u8]) -> bool {
    let trimmed = host.strip_suffix(b".").unwrap_or(host);
    let last = trimmed.rsplit(|&b| b == b'.').next().unwrap_or(trimmed);
    if last.is_empty() {
        return false;
    }
    let hex = last
        .strip_prefix(b"0x")
        .or_else(|| last.strip_prefix(b"0X"))
        .map(|h| h.iter().all(u8::is_ascii_hexdigit));
    hex.unwrap_or(false) || last.iter().all(u8::is_ascii_digit)
}

/// port = 1*5DIGIT in 1..=65535 (port 0 cannot be connected to).
fn parse_port(p: &[u8]) -> Result<u16, ProtoError> {
    if p.len() > 5 {
        return Err(ProtoError::Malformed);
    }
    let n = parse_decimal(p).ok_or(ProtoError::Malformed)?;
    match u16::try_from(n) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(ProtoError::Malformed),
    }
}

/// Parses `host[:port]` (RFC 3986 §3.2.2, §3.2.3). With `default_port` = None the port is mandatory (CONNECT's
/// authority-form, RFC 9112 §3.2.3); otherwise an absent or empty port takes the scheme default.
pub(super) fn parse_authority(
    auth: &[u8],
    default_port: Option<u16>,
) -> Result<TargetAddr, ProtoError> {
    let (host, port) = if let Some(rest) = auth.strip_prefix(b"[") {
        let close = rest
            .iter()
            .position(|&b| b == b']')
            .ok_or(ProtoError::Malformed)?;
        let (inside, after) = rest.split_at(close);
        let port = match after.get(1..).unwrap_or(&[]) {
            [] => None,
            [b':', p @ ..] => Some(p),
            _ => return Err(ProtoError::Malformed),
        };
        (inside, port)
    } else {
        match auth.iter().position(|&b| b == b':') {
            Some(i) => {
                let (h, p) = auth.split_at(i);
                (h, Some(p.get(1..).unwrap_or(&[])))
            }
            None => (auth, None),
        }
    };
    let port = match (port, default_port) {
        (Some(p), _) if !p.is_empty() => parse_port(p)?,
        (_, Some(d)) => d,
        (_, None) => return Err(ProtoError::Malformed),
    };
    let text = std::str::from_utf8(host).map_err(|_| ProtoError::Malformed)?;
    if auth.starts_with(b"[") {
        // IPvFuture and zone identifiers do not parse here and are refused.
        let ip: Ipv6Addr = text.parse().map_err(|_| ProtoError::Malformed)?;
        return Ok(TargetAddr::Ip(SocketAddr::new(
            canonical_ip(IpAddr::V6(ip)),
            port,
        )));
    }
    if host.is_empty() || !host.iter().all(|&b| is_unreserved(b)) {
        return Err(ProtoError::Malformed);
    }
    if let Ok(v4) = text.parse::<Ipv4Addr>() {
        return Ok(TargetAddr::Ip(SocketAddr::new(IpAddr::V4(v4), port)));
    }
    if looks_numeric(host) {
        return Err(ProtoError::Malformed);
    }
    Ok(TargetAddr::Domain(
        Name::new(host).ok_or(ProtoError::Malformed)?,
        port,
    ))
}

/// Splits an absolute-form target "http://authority[path][?query]" (RFC 9112 §3.2.2, RFC 9110 §4.2.1) into the
/// target address, the raw authority (for Host) and the path-and-query (possibly empty).
pub(super) fn parse_absolute(target: &[u8]) -> Result<(TargetAddr, &[u8], &[u8]), ProtoError> {
    let sep = target
        .windows(3)
        .position(|w| w == b"://")
        .ok_or(ProtoError::Malformed)?;
    let (scheme, rest) = target.split_at(sep);
    // Only http: an https URI would need us to originate TLS, and other schemes are not HTTP at all.
    if !scheme.eq_ignore_ascii_case(b"http") {
        return Err(ProtoError::Malformed);
    }
    let rest = rest.get(3..).unwrap_or(&[]);
    // absolute-URI has no fragment (RFC 3986 §4.3); a '#' in a request target is a client bug.
    if rest.contains(&b'#') {
        return Err(ProtoError::Malformed);
    }
    let end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    // RFC 9110 §4.2.4: userinfo in an http URI is deprecated and a common phishing vector; refuse it.
    if authority.contains(&b'@') {
        return Err(ProtoError::Malformed);
    }
    let addr = parse_authority(authority, Some(80))?;
    Ok((addr, authority, path))
}

/// Parses a Proxy-Authorization value "Basic <token68>" (RFC 9110 §11.6.2, RFC 7617 §2).
pub(super) fn parse_basic(value: &[u8]) -> Option<BasicCredentials> {
    let value = trim_ows(value);
    let sp = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(sp);
    // Auth scheme names are case-insensitive (RFC 9110 §11.1); 1*SP separates them from the token68.
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let token = trim_ows(rest);
    if token.is_empty() {
        return None;
    }
    let mut buf = [0u8; CRED_CAP];
    let n = crate::proto::base64::decode(token, &mut buf)?;
    let decoded = buf.get(..n)?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let (user, pass) = decoded.split_at(colon);
    BasicCredentials::new(user, pass.get(1..)?)
}
