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

use std::io;
use std::net::SocketAddr;

use log::{debug, info, warn};

use super::close::CloseReason;
use super::conn::{Conn, RequestLog};

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
        "client={} user={} proto=http method={method} url={url} status={status} tls={} up={} down={} ms={}{} end={}",
        conn.peer,
        conn.user_name(),
        super::tls::log_label(conn),
        conn.bytes_up.saturating_sub(req.up_before),
        conn.bytes_down.saturating_sub(req.down_before),
        now.saturating_duration_since(req.started).as_millis(),
        Egress(conn),
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
        "client={} user={} proto={} target={} tls={} up={} down={} ms={}{} end={}",
        conn.peer,
        conn.user_name(),
        conn.proto.label(),
        target,
        super::tls::log_label(conn),
        conn.bytes_up,
        conn.bytes_down,
        now.saturating_duration_since(conn.started).as_millis(),
        Egress(conn),
        reason.label()
    );
}

/// ` egress=IP` for sessions that used a policy egress address, nothing otherwise (other lines keep their shape).
struct Egress<'a>(&'a Conn);

impl std::fmt::Display for Egress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.egress.as_deref() {
            Some(ip) => write!(f, " egress={ip}"),
            None => Ok(()),
        }
    }
}

/// Logs a refused client at debug level (never at info: a scan would flood the log).
pub fn log_refused(peer: SocketAddr, why: &str) {
    debug!("{peer}: refused: {why}");
}

/// Warns once about an accept error that is neither WouldBlock nor exhaustion.
pub fn log_accept_error(e: &io::Error) {
    warn!("accept failed: {e}");
}
