//! The access log (info level, target "access"): one line per SOCKS session, CONNECT tunnel, UDP association or
//! BIND, and one line per forwarded HTTP request.
//!
//! ```text
//! client=ADDR user=NAME proto=P target=T tls=V up=N down=N ms=N end=REASON
//! client=ADDR user=NAME proto=http method=M url=http://HOST:PORT/PATH status=S tls=V up=N down=N ms=N end=REASON
//! ```
//!
//! The query string is not logged (Squid's `strip_query_terms` default): it often carries tokens and passwords.

use std::time::Instant;

use log::info;

use super::close::CloseReason;
use super::conn::Conn;
use crate::metrics;

/// One forwarded HTTP request, from its head to the end of its response.
#[derive(Debug)]
pub struct RequestLog {
    /// The method and the URL without its query: `GET http://host:port/path`.
    pub line: Box<str>,
    /// When its head was parsed.
    pub started: Instant,
    /// The connection's client -> target byte count when the request started.
    pub up_before: u64,
    /// The connection's target -> client byte count when the request started.
    pub down_before: u64,
    /// The final response status (the origin's or our own), 0 while none was sent.
    pub status: u16,
}

impl RequestLog {
    /// A request whose rewritten head is `head` (our own output: `METHOD SP origin-form SP version CRLF ...`).
    pub fn new(conn: &Conn, head: &[u8], authority: &str, now: Instant) -> RequestLog {
        let first = head.split(|&b| b == b'\r').next().unwrap_or(&[]);
        let mut parts = first.split(|&b| b == b' ');
        let method = String::from_utf8_lossy(parts.next().unwrap_or(b"-")).into_owned();
        let target = parts.next().unwrap_or(b"/");
        let path = target.split(|&b| b == b'?').next().unwrap_or(b"/");
        let path = String::from_utf8_lossy(path);
        let line = if path == "*" {
            format!("{method} http://{authority}")
        } else {
            format!("{method} http://{authority}{path}")
        };
        RequestLog {
            line: line.into_boxed_str(),
            started: now,
            up_before: conn.bytes_up,
            down_before: conn.bytes_down,
            status: 0,
        }
    }
}

/// Writes the line of one forwarded request.
pub fn request_line(conn: &Conn, req: &RequestLog, reason: CloseReason, now: Instant) {
    if !log::log_enabled!(target: "access", log::Level::Info) {
        return;
    }
    let (method, url) = req.line.split_once(' ').unwrap_or(("-", "-"));
    let status = if req.status == 0 {
        "-".to_string()
    } else {
        req.status.to_string()
    };
    info!(
        target: "access",
        "client={} user={} proto=http method={method} url={url} status={status} tls={} up={} down={} ms={} end={}",
        conn.peer,
        conn.user_name(),
        super::tls::log_label(conn),
        conn.bytes_up.saturating_sub(req.up_before),
        conn.bytes_down.saturating_sub(req.down_before),
        now.saturating_duration_since(req.started).as_millis(),
        reason.label()
    );
}

/// Writes the line of a finished session; `target` is what the session reached (see the README).
pub fn session_line(conn: &Conn, target: &str, reason: CloseReason, now: Instant) {
    if !log::log_enabled!(target: "access", log::Level::Info) {
        return;
    }
    info!(
        target: "access",
        "client={} user={} proto={} target={} tls={} up={} down={} ms={} end={}",
        conn.peer,
        conn.user_name(),
        metrics::PROTO_LABELS[conn.proto as usize],
        target,
        super::tls::log_label(conn),
        conn.bytes_up,
        conn.bytes_down,
        now.saturating_duration_since(conn.started).as_millis(),
        reason.label()
    );
}
