//! Responses the proxy writes itself.

use std::fmt::Write as _;

use super::rewrite::VecWriter;
use crate::proto::Writer;

/// RFC 9110 §15 reason phrases for the statuses the proxy generates itself.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        421 => "Misdirected Request",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// Writes a complete proxy-generated error response into `out`; returns its length (0 if `out` is too small).
pub fn canned_response(status: u16, out: &mut [u8]) -> usize {
    // Only statuses that can be sent on the wire as a final response; anything else becomes 500.
    let status = if (200..=599).contains(&status) {
        status
    } else {
        500
    };
    let reason = reason_phrase(status);
    let mut w = Writer::new(out);
    let head = write!(
        w,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason.len().saturating_add(1)
    );
    if head.is_err() {
        return 0;
    }
    if status == 407 {
        // RFC 9110 §15.5.8: a 407 MUST carry a Proxy-Authenticate challenge.
        w.put(b"Proxy-Authenticate: Basic realm=\"socksgate\"\r\n");
    }
    w.put(b"\r\n").put(reason.as_bytes()).put(b"\n");
    w.finish().unwrap_or(0)
}

/// Like [`canned_response`], but the body names what went wrong after the reason phrase (`detail`, one line for a
/// person to read; control characters are replaced so it cannot break the line). Appends to `out`.
pub fn error_response(status: u16, detail: &str, out: &mut Vec<u8>) {
    let status = if (200..=599).contains(&status) {
        status
    } else {
        500
    };
    let reason = reason_phrase(status);
    let clean: String = detail
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let body_len = reason.len() + 2 + clean.len() + 1;
    let _ = write!(
        VecWriter(out),
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {body_len}\r\nConnection: close\r\n"
    );
    if status == 407 {
        // RFC 9110 §15.5.8: a 407 MUST carry a Proxy-Authenticate challenge.
        out.extend_from_slice(b"Proxy-Authenticate: Basic realm=\"socksgate\"\r\n");
    }
    let _ = write!(VecWriter(out), "\r\n{reason}: {clean}\n");
}
