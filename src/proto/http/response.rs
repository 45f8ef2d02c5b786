//! Response heads: parse, decide the body and persistence (RFC 9112 §6.3, §9.3), rewrite for the client.

use std::fmt::Write as _;

use super::fields::{analyze, complete_head, head_window, is_hop_by_hop, name_is};
use super::rewrite::{put_content_length, put_header, put_via, VecWriter};
use super::{BodyKind, Response, ResponseContext, MAX_HEADERS};
use crate::proto::{Parse, ProtoError};

/// Parses an origin response head from `buf` and writes the rewritten head for the client into `out`.
pub fn parse_response(
    buf: &[u8],
    max_head: usize,
    ctx: &ResponseContext<'_>,
    out: &mut Vec<u8>,
) -> Result<Parse<Response>, ProtoError> {
    out.clear();
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let Some(head_len) = complete_head(resp.parse(head_window(buf, max_head)), buf, max_head)?
    else {
        return Ok(Parse::Incomplete);
    };
    let status = resp.code.ok_or(ProtoError::Malformed)?;
    // RFC 9110 §15: values outside 100..=599 are invalid.
    if !(100..=599).contains(&status) {
        return Err(ProtoError::Malformed);
    }
    let minor = match resp.version {
        Some(v @ (0 | 1)) => v,
        _ => return Err(ProtoError::Malformed),
    };
    let hdrs: &[httparse::Header<'_>] = resp.headers;
    let f = analyze(hdrs);

    let switching = status == 101;
    let interim = (100..200).contains(&status) && !switching;
    // 1xx and 204 never have content (RFC 9110 §8.6 forbids Content-Length on them), so framing fields there are
    // dropped instead of forwarded: a client honouring them would wait for bytes that never come.
    let no_content = interim || status == 204;

    // RFC 9112 §6.3, in order.
    let body = if switching {
        // After 101 the connection speaks another protocol: relay everything until close.
        BodyKind::UntilClose
    } else if no_content || ctx.request_is_head || status == 304 {
        // Item 1. A HEAD/304 Content-Length describes the representation and is forwarded, so it must be sane.
        if !no_content && !f.te.present {
            f.content_length?;
        }
        BodyKind::None
    } else if f.te.present {
        // Item 3: Transfer-Encoding overrides Content-Length (which is removed below). Item 4: chunked must be
        // final, else read until close. RFC 9112 §6.1: in a 1.0 message the framing is faulty; close-delimit it.
        if minor == 1 && f.te.chunked_final() {
            BodyKind::Chunked
        } else {
            BodyKind::UntilClose
        }
    } else {
        // Item 5 (invalid or differing lengths: the proxy answers 502) and items 6-8.
        match f.content_length? {
            Some(0) => BodyKind::None,
            Some(n) => BodyKind::Length(n),
            None => BodyKind::UntilClose,
        }
    };
    let drop_cl = no_content || f.te.present;
    let drop_te = no_content;

    // RFC 9112 §9.3: persistence of the origin connection.
    let origin_persistent = !f.conn_close && (minor == 1 || f.conn_keep_alive);
    // Both CL and TE "might indicate an attempt at response splitting" (§6.3 item 3): do not reuse that origin.
    let keep_origin = origin_persistent
        && body != BodyKind::UntilClose
        && !switching
        && !(f.te.present && f.cl_present);
    let keep_client = if switching {
        false
    } else if interim {
        true
    } else {
        ctx.client_keep_alive && body != BodyKind::UntilClose
    };

    let response = Response {
        status,
        body,
        interim,
        keep_client,
        keep_origin,
        head_len,
    };

    // RFC 9110 §15.2: no 1xx may be sent to an HTTP/1.0 client; `out` stays empty so nothing is relayed.
    if interim && ctx.client_minor_version == 0 {
        return Ok(Parse::Done(response, head_len));
    }

    write_status_line(out, buf, head_len, minor, status);
    let mut cl_written = false;
    for (i, h) in hdrs.iter().enumerate() {
        if switching {
            // For 101 the Upgrade/Connection pair tells the client what it now speaks; keep it intact.
            if ["proxy-connection", "keep-alive", "te", "trailer"]
                .iter()
                .any(|n| h.name.eq_ignore_ascii_case(n))
            {
                continue;
            }
        } else if is_hop_by_hop(h.name) || f.listed.get(i).copied().unwrap_or(false) {
            continue;
        }
        if name_is(h, "content-length") {
            if !drop_cl {
                if let Ok(Some(n)) = f.content_length {
                    put_content_length(out, n, &mut cl_written);
                }
            }
            continue;
        }
        if drop_te && name_is(h, "transfer-encoding") {
            continue;
        }
        put_header(out, h.name.as_bytes(), h.value);
    }
    if !switching && !interim {
        if !keep_client {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if ctx.client_minor_version == 0 || minor == 0 {
            // The client judges persistence by the version it reads in our status line and by its own version
            // (RFC 9112 §9.3): 1.0 on either side needs the option spelled out.
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
    }
    put_via(out, ctx.via, minor);
    out.extend_from_slice(b"\r\n");
    Ok(Parse::Done(response, head_len))
}

/// Writes the status line as received, normalized to CRLF and to "SP reason-phrase" (RFC 9112 §4: the SP before
/// an empty reason is required). The reason bytes are copied raw because httparse hides obs-text reasons.
fn write_status_line(out: &mut Vec<u8>, buf: &[u8], head_len: usize, minor: u8, status: u16) {
    let head = buf.get(..head_len).unwrap_or(&[]);
    let start = head
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(head.len());
    let line = head.get(start..).unwrap_or(&[]);
    let line = line.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // "HTTP/1.x NNN" is 12 bytes; httparse guarantees what follows is empty or " reason".
    let reason = line.get(12..).unwrap_or(&[]);
    let _ = write!(VecWriter(out), "HTTP/1.{minor} {status:03}");
    if reason.is_empty() {
        out.push(b' ');
    } else {
        out.extend_from_slice(reason);
    }
    out.extend_from_slice(b"\r\n");
}
