//! Every reply the proxy sends a client about its request, success or failure, for every `ReplyKind`; and the
//! error path after a failure reply: flush, shut down our side, linger, close.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use log::debug;

use super::close::CloseReason;
use super::conn::{Conn, Phase};
use super::ctx::{Ctx, Next, ReplyKind};
use super::timers::TimerKind;
use crate::metrics;
use crate::proto::{self, socks4, socks5};

/// How long an error reply may take to flush and the client to close after it, before we close regardless.
pub const LINGER: Duration = Duration::from_secs(2);

/// Reads per linger turn before yielding to other connections.
const LINGER_READS: usize = 16;

/// Sends the success reply for `kind`; `bound` is the address SOCKS replies report (the outbound socket's local
/// address, the BIND listener, the accepted peer, the UDP relay). Plain HTTP forwarding has no reply of its own.
pub fn granted(conn: &mut Conn, kind: ReplyKind, bound: SocketAddr) -> std::io::Result<()> {
    let mut out = [0u8; socks5::MAX_REPLY_LEN];
    let len = match kind {
        ReplyKind::Socks5 => socks5::encode_reply(0, bound, &mut out),
        ReplyKind::Socks4 => {
            socks4::encode_reply(socks4::REPLY_GRANTED, socks4_addr(bound), &mut out)
        }
        ReplyKind::HttpConnect => return conn.send_client(proto::http::CONNECT_ESTABLISHED),
        ReplyKind::HttpForward => return Ok(()),
    };
    conn.send_client(&out[..len])
}

/// SOCKS4 replies carry IPv4 only: DSTIP 0.0.0.0 means "use the proxy's address".
fn socks4_addr(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, a.port()),
    }
}

/// Sends the protocol's failure reply for `reason`, then lingers and closes (RFC 1928 §6: close after a failure
/// reply). HTTP clients get a status and a body saying what went wrong.
pub fn fail(conn: &mut Conn, ctx: &mut Ctx, kind: ReplyKind, reason: CloseReason) -> Next {
    let failure = reason.failure();
    let mut out = [0u8; socks5::MAX_REPLY_LEN];
    match kind {
        ReplyKind::Socks5 => {
            let len = socks5::encode_reply(
                failure.socks5_reply(),
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
                &mut out,
            );
            refuse(conn, ctx, &out[..len], reason)
        }
        ReplyKind::Socks4 => {
            let len = socks4::encode_reply(
                failure.socks4_reply(),
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                &mut out,
            );
            refuse(conn, ctx, &out[..len], reason)
        }
        ReplyKind::HttpConnect | ReplyKind::HttpForward => {
            let status = reason.http_status();
            let detail = match &conn.target {
                // A denial names nothing (neither the target nor why): the client knows what it asked for.
                Some(t) if status == 502 || status == 504 => {
                    format!("{} ({t})", reason.describe())
                }
                _ => reason.describe().to_string(),
            };
            let mut resp = Vec::new();
            proto::http::error_response(status, &detail, &mut resp);
            if let Some(r) = conn.request.as_mut() {
                r.status = status;
            }
            debug!("{}: answering {status}: {detail}", conn.peer);
            refuse(conn, ctx, &resp, reason)
        }
    }
}

/// Sends a refusal already encoded (by [`fail`], or by a handshake machine in `proto::server`), then lingers and
/// closes with `reason`.
pub fn refuse(conn: &mut Conn, ctx: &mut Ctx, reply: &[u8], reason: CloseReason) -> Next {
    if conn.send_client(reply).is_err() {
        return Next::Close(CloseReason::ClientError);
    }
    enter_linger(conn, ctx, reason)
}

/// After an error reply: flush it, shut down our side, and wait briefly for the client to close, so unread input
/// does not turn our close into a reset that destroys the reply.
pub fn enter_linger(conn: &mut Conn, ctx: &mut Ctx, reason: CloseReason) -> Next {
    metrics::inc(&ctx.stats.handshakes_failed[conn.proto as usize]);
    graceful_end(conn, reason)
}

/// Ends a connection gracefully with `reason` (after a complete HTTP exchange, or an error reply): flush what is
/// queued for the client, shut down our side, read until the client's EOF or the linger deadline.
pub fn graceful_end(conn: &mut Conn, reason: CloseReason) -> Next {
    conn.phase = Phase::Linger {
        armed: false,
        shut: false,
        reason,
    };
    Next::Again
}

/// Drives the linger phase.
pub fn linger(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let Phase::Linger { armed, reason, .. } = &mut conn.phase else {
        return Next::Wait;
    };
    let reason = *reason;
    if !*armed {
        *armed = true;
        ctx.timers
            .arm(ctx.now + LINGER, key, conn.gen, TimerKind::Linger);
    }
    match conn.flush_client() {
        Ok(true) => {}
        Ok(false) => return Next::Wait,
        Err(_) => return Next::Close(reason),
    }
    if let Phase::Linger { shut, .. } = &mut conn.phase {
        if !*shut {
            *shut = true;
            let _ = conn.client.shutdown_write();
        }
    }
    if !conn.client.flushed() {
        // TLS: the reply and close_notify are still inside rustls; the writable edge pushes them out.
        return Next::Wait;
    }
    if let Some(b) = conn.c2u.take() {
        ctx.pool.give(b);
    }
    for _ in 0..LINGER_READS {
        match conn.client.read(&mut ctx.scratch) {
            Ok(Some(0)) | Err(_) => return Next::Close(reason),
            Ok(Some(_)) => {}
            Ok(None) => return Next::Wait,
        }
    }
    Next::Yield
}
