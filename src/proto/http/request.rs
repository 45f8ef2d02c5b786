//! Request heads: parse, check framing (RFC 9112 §6), rewrite for the origin.

use std::fmt::Write as _;

use super::fields::{
    analyze, complete_head, head_window, is_hop_by_hop, name_is, parse_decimal, trim_ows, Fields,
};
use super::rewrite::{put_content_length, put_header, put_via, VecWriter};
use super::target::{parse_absolute, parse_authority, parse_basic};
use super::{BodyKind, Request, RequestKind, RewriteOptions, MAX_HEADERS};
use crate::proto::{Parse, ProtoError};

/// Request fields never forwarded (RFC 9110 §7.6.1 hop-by-hop, §11.7 proxy authentication); Host is regenerated.
fn is_request_hop(name: &str) -> bool {
    is_hop_by_hop(name)
        || ["proxy-authorization", "proxy-authenticate", "host"]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h))
}

/// Parses a proxy request head from `buf`; for forwarded requests writes the rewritten head into `out`.
pub fn parse_request(
    buf: &[u8],
    max_head: usize,
    opts: &RewriteOptions<'_>,
    out: &mut Vec<u8>,
) -> Result<Parse<Request>, ProtoError> {
    out.clear();
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    // httparse skips leading empty lines (RFC 9112 §2.2) and counts them in the returned length; its default
    // config rejects whitespace before a colon, obs-fold and invalid tokens, which we want (RFC 9112 §5.1, §5.2).
    let Some(head_len) = complete_head(req.parse(head_window(buf, max_head)), buf, max_head)?
    else {
        return Ok(Parse::Incomplete);
    };
    let method = req.method.ok_or(ProtoError::Malformed)?;
    let target = req.path.ok_or(ProtoError::Malformed)?.as_bytes();
    let minor = match req.version {
        Some(v @ (0 | 1)) => v,
        _ => return Err(ProtoError::Malformed),
    };
    let hdrs: &[httparse::Header<'_>] = req.headers;
    let f = analyze(hdrs);

    // RFC 9112 §3.2: more than one Host is a 400.
    if f.host_count > 1 {
        return Err(ProtoError::Malformed);
    }
    let body = request_body(&f, minor)?;

    // RFC 9112 §9.3: 1.1 persists unless "close"; 1.0 only with "keep-alive" (RFC 9112 §C.2.2). Either "close"
    // wins, since closing is always safe.
    let close = f.conn_close || f.proxy_close;
    let keep_alive = !close && (minor == 1 || f.conn_keep_alive || f.proxy_keep_alive);

    let (credentials, auth_present) = match (f.auth_count, f.auth_value) {
        (0, _) => (None, false),
        // Several Proxy-Authorization lines are ambiguous: treat as present but undecodable.
        (1, Some(i)) => (hdrs.get(i).and_then(|h| parse_basic(h.value)), true),
        _ => (None, true),
    };

    // Methods are case-sensitive (RFC 9110 §9.1).
    let (kind, target, is_head) = if method == "CONNECT" {
        let target = parse_authority(target, None)?;
        // RFC 9110 §9.3.6: CONNECT has no content; bytes after the head are tunnel payload. A body announced
        // anyway leaves it unclear where the tunnel starts, so refuse it.
        if body != BodyKind::None {
            return Err(ProtoError::Malformed);
        }
        (RequestKind::Connect, target, false)
    } else {
        // A proxy is sent the absolute-form (RFC 9112 §3.2.2); origin-form means the client thinks we are the origin.
        let (addr, authority, path) = parse_absolute(target)?;

        // Request line in origin-form for the origin (RFC 9112 §3.2.1). The client's version is kept: we relay the
        // body verbatim, so claiming 1.1 for a 1.0 client would promise framing the client never agreed to.
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        match path.first() {
            // RFC 9112 §3.2.4: an OPTIONS with an empty path is forwarded as "*".
            None if method == "OPTIONS" => out.push(b'*'),
            None => out.push(b'/'),
            Some(b'?') => {
                out.push(b'/');
                out.extend_from_slice(path);
            }
            Some(_) => out.extend_from_slice(path),
        }
        out.extend_from_slice(if minor == 0 {
            b" HTTP/1.0\r\n"
        } else {
            b" HTTP/1.1\r\n"
        });
        // RFC 9112 §3.2.2: a proxy replaces Host with the authority of the target URI.
        put_header(out, b"Host", authority);
        let mut cl_written = false;
        for (i, h) in hdrs.iter().enumerate() {
            if is_request_hop(h.name) || f.listed.get(i).copied().unwrap_or(false) {
                continue;
            }
            if name_is(h, "content-length") {
                if let Ok(Some(n)) = f.content_length {
                    put_content_length(out, n, &mut cl_written);
                }
                continue;
            }
            // RFC 9110 §7.6.2: an intermediary MUST decrement Max-Forwards on TRACE and OPTIONS before forwarding.
            // (A received 0 asks the proxy to answer itself; that needs the event loop and is forwarded unchanged.)
            if (method == "TRACE" || method == "OPTIONS") && name_is(h, "max-forwards") {
                if let Some(n) = parse_decimal(trim_ows(h.value)).filter(|&n| n > 0) {
                    let _ = write!(VecWriter(out), "{}: {}\r\n", h.name, n.saturating_sub(1));
                    continue;
                }
            }
            put_header(out, h.name.as_bytes(), h.value);
        }
        if !keep_alive {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if minor == 0 {
            // A 1.0 message persists only with the option spelled out (RFC 9112 §C.2.2).
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        put_via(out, opts.via, minor);
        out.extend_from_slice(b"\r\n");
        (RequestKind::Forward, addr, method == "HEAD")
    };
    Ok(Parse::Done(
        Request {
            kind,
            target,
            is_head,
            minor_version: minor,
            body,
            keep_alive,
            credentials,
            auth_present,
            head_len,
        },
        head_len,
    ))
}

/// Request body framing (RFC 9112 §6.3 items 3-6).
fn request_body(f: &Fields, minor: u8) -> Result<BodyKind, ProtoError> {
    if f.te.present {
        // Item 3: both present "ought to be handled as an error"; it is the classic smuggling vector.
        if f.cl_present {
            return Err(ProtoError::Smuggling);
        }
        // RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing.
        if minor == 0 {
            return Err(ProtoError::Smuggling);
        }
        // Item 4: a request whose final coding is not chunked cannot be delimited: 400.
        if !f.te.chunked_final() {
            return Err(ProtoError::Malformed);
        }
        return Ok(BodyKind::Chunked);
    }
    match f.content_length {
        Err(e) => Err(e),
        Ok(None) | Ok(Some(0)) => Ok(BodyKind::None),
        Ok(Some(n)) => Ok(BodyKind::Length(n)),
    }
}
