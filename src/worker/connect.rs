//! Resolving -> Connecting -> (upstream handshake) -> success reply -> relay.
//!
//! Every resolved address is tried in turn (the resolver's order, which getaddrinfo sorts per RFC 6724), each one
//! checked against the destination rules first, so a name cannot be used to reach a denied address.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use log::debug;
use mio::Interest;

use super::close::CloseReason;
use super::conn::{Conn, Dest, Phase, ReplyKind, Sock};
use super::reply;
use super::timers::TimerKind;
use super::{http, token, upstream, Ctx, Next};
use crate::metrics;
use crate::net::{self, ConnectState};
use crate::proto::{self, Failure, TargetAddr};
use crate::resolve::{Job, Work};

/// Resolver tag for TCP connects (UDP datagram lookups use other tags).
pub const RESOLVE_TAG: u32 = u32::MAX;

/// Starts connecting `conn` to `target`, answering with `reply` when done.
pub fn start(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    target: TargetAddr,
    reply: ReplyKind,
) -> Next {
    conn.target = Some(Dest::from(&target));
    conn.deadline = None;
    let deadline = ctx.now + ctx.cfg.connect_timeout;
    conn.deadline = Some(deadline);
    ctx.timers.push(deadline, key, conn.gen, TimerKind::Connect);
    if ctx.cfg.upstream.is_some() {
        // Through an upstream proxy the target is the upstream's business: connect to the proxy itself, but
        // still apply the destination rules when the target is a literal address.
        if let TargetAddr::Ip(addr) = &target {
            if ctx.cfg.dest_rules.check(*addr).is_err() {
                debug!("{}: destination {addr} denied by rules", conn.peer);
                return fail(conn, ctx, reply, CloseReason::DestDenied);
            }
        }
        return upstream::start_connect(key, conn, ctx, reply);
    }
    match target {
        TargetAddr::Ip(addr) => begin(key, conn, ctx, reply, vec![addr]),
        TargetAddr::Domain(name, port) => {
            metrics::inc(&ctx.stats.dns_lookups);
            let job = Job {
                key,
                gen: conn.gen,
                tag: RESOLVE_TAG,
                work: Work::Resolve {
                    host: name.as_str().to_string(),
                    port,
                },
                reply: ctx.reply_to.clone(),
            };
            debug!("{}: resolving {}", conn.peer, name.as_str());
            if ctx.resolve_tx.send(job).is_err() {
                return fail(conn, ctx, reply, CloseReason::Internal);
            }
            conn.phase = Phase::Resolving { reply };
            Next::Wait
        }
    }
}

/// A resolver answer arrived for `conn`.
pub fn on_resolved(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    result: io::Result<Vec<SocketAddr>>,
) -> Next {
    let reply = match conn.phase {
        Phase::Resolving { reply } => reply,
        _ => return Next::Wait,
    };
    match result {
        Ok(addrs) if !addrs.is_empty() => begin(key, conn, ctx, reply, addrs),
        Ok(_) | Err(_) => {
            metrics::inc(&ctx.stats.dns_failures);
            debug!("{}: cannot resolve {}", conn.peer, target_str(conn));
            fail(conn, ctx, reply, CloseReason::Unresolved)
        }
    }
}

fn target_str(conn: &Conn) -> String {
    conn.target
        .as_ref()
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Filters the addresses through the destination rules and starts on the first.
pub fn begin(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    reply: ReplyKind,
    addrs: Vec<SocketAddr>,
) -> Next {
    let allowed: Vec<_> = addrs
        .into_iter()
        .map(|a| SocketAddr::new(proto::canonical_ip(a.ip()), a.port()))
        .filter_map(|a| match ctx.cfg.dest_rules.check(a) {
            Ok(proof) => Some((a, proof)),
            Err(_) => {
                debug!("{}: destination {a} denied by rules", conn.peer);
                None
            }
        })
        .collect();
    if allowed.is_empty() {
        debug!(
            "{}: every address of {} denied by rules",
            conn.peer,
            target_str(conn)
        );
        return fail(conn, ctx, reply, CloseReason::DestDenied);
    }
    conn.phase = Phase::Connecting {
        reply,
        addrs: allowed,
        next: 0,
        last: Failure::General,
        attempt_deadline: ctx.now,
    };
    try_next(key, conn, ctx)
}

/// Least time an attempt gets before the next address is tried.
const MIN_ATTEMPT: Duration = Duration::from_secs(1);

/// Starts a connect to the next address; replies with the last failure when none are left.
///
/// Addresses are tried one after another, but an attempt that neither succeeds nor fails (a blackholed address)
/// gets only its share of the remaining connect time, so one dead address (typically IPv6) cannot eat the whole
/// `--connect-timeout` while a working one waits behind it.
fn try_next(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let overall = conn.deadline.unwrap_or(ctx.now + ctx.cfg.connect_timeout);
    loop {
        let Phase::Connecting {
            reply,
            addrs,
            next,
            last,
            attempt_deadline,
        } = &mut conn.phase
        else {
            return Next::Wait;
        };
        let Some((addr, _proof)) = addrs.get(*next).copied() else {
            let (reply, last) = (*reply, *last);
            return fail(conn, ctx, reply, CloseReason::Failed(last));
        };
        *next += 1;
        let left = (addrs.len() - *next) as u32;
        debug!("{}: connecting to {addr}", conn.peer);
        match open(key, ctx, addr) {
            Ok(sock) => {
                conn.upstream = Some(sock);
                if left > 0 {
                    let remaining = overall.saturating_duration_since(ctx.now);
                    let share = (remaining / (left + 1)).max(MIN_ATTEMPT).min(remaining);
                    *attempt_deadline = ctx.now + share;
                    ctx.timers
                        .push(*attempt_deadline, key, conn.gen, TimerKind::Connect);
                } else {
                    *attempt_deadline = overall;
                }
                return Next::Wait;
            }
            Err(e) => {
                debug!("{}: connect {addr}: {e}", conn.peer);
                *last = net::failure_of(&e);
            }
        }
    }
}

/// Opens and registers a nonblocking outbound socket for connection `key`.
pub fn open(key: usize, ctx: &mut Ctx, addr: SocketAddr) -> io::Result<Sock> {
    let mut stream = net::connect(addr, ctx.cfg.outbound_bind, ctx.cfg.socket_buffer)?;
    ctx.registry.register(
        &mut stream,
        token::conn(key, token::Role::Upstream),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    Ok(Sock::new(stream))
}

/// Drops the outbound socket (after a failed attempt).
pub fn drop_upstream(conn: &mut Conn, ctx: &mut Ctx) {
    if let Some(mut up) = conn.upstream.take() {
        let _ = ctx.registry.deregister(&mut up.stream);
    }
}

/// Drives the Connecting phase: on readiness of the outbound socket, checks whether the connect finished.
pub fn drive(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let Some(up) = conn.upstream.as_mut() else {
        return Next::Wait;
    };
    if !up.writable && !up.readable {
        return Next::Wait;
    }
    match net::connect_state(&up.stream) {
        ConnectState::Pending => {
            up.writable = false;
            up.readable = false;
            Next::Wait
        }
        ConnectState::Connected => {
            debug!("{}: connected to {}", conn.peer, target_str(conn));
            connected(key, conn, ctx)
        }
        ConnectState::Failed(e) => {
            debug!("{}: connect to {}: {e}", conn.peer, target_str(conn));
            drop_upstream(conn, ctx);
            if let Phase::Connecting { last, .. } = &mut conn.phase {
                *last = net::failure_of(&e);
            }
            try_next(key, conn, ctx)
        }
    }
}

/// The outbound TCP connection is up.
fn connected(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let reply = match conn.phase {
        Phase::Connecting { reply, .. } => reply,
        _ => return Next::Wait,
    };
    established(key, conn, ctx, reply)
}

/// The path to the target is ready (directly, or through the upstream proxy): answer the client and relay.
pub fn established(key: usize, conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind) -> Next {
    conn.deadline = None;
    let local = conn
        .upstream
        .as_ref()
        .and_then(|u| u.stream.local_addr().ok())
        .unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    if reply == ReplyKind::HttpForward {
        return http::on_origin_connected(key, conn, ctx);
    }
    // SOCKS4 reports an IPv6 outbound socket as 0.0.0.0:0 (its reply has no room for it).
    let local = match (reply, local) {
        (ReplyKind::Socks4, SocketAddr::V6(_)) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        _ => local,
    };
    if reply::granted(conn, reply, local).is_err() {
        return Next::Close(CloseReason::ClientError);
    }
    metrics::inc(&ctx.stats.handshakes_ok[conn.proto as usize]);
    start_relay(key, conn, ctx);
    Next::Again
}

/// Switches to the relay phase with the idle timer armed.
pub fn start_relay(key: usize, conn: &mut Conn, ctx: &mut Ctx) {
    // Bytes that arrived together with the handshake (pipelined after a SOCKS request or a CONNECT head, sent
    // while a BIND waited, or after the upstream proxy's reply) are relayed first from the buffers: count them
    // here, since the relay counts only what it reads itself.
    let up = conn.c2u.as_ref().map_or(0, |b| b.len()) as u64;
    let down = conn.u2c.as_ref().map_or(0, |b| b.len()) as u64;
    conn.bytes_up += up;
    conn.bytes_down += down;
    metrics::add(&ctx.stats.bytes_up, up);
    metrics::add(&ctx.stats.bytes_down, down);
    conn.phase = Phase::Relay;
    conn.last_active = ctx.now;
    super::relay::arm_idle(key, conn, ctx);
}

/// Reports a failure to resolve or connect.
pub fn fail(conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind, reason: CloseReason) -> Next {
    ctx.stats.connect_error(reason.failure());
    drop_upstream(conn, ctx);
    if reply == ReplyKind::HttpForward {
        return http::on_origin_failed(conn, ctx, reason);
    }
    reply::fail(conn, ctx, reply, reason)
}

/// A connect timer popped: move on to the next address when this attempt's share is used up, or fail when the
/// whole connect deadline has passed.
pub fn on_timer(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let overall_due = conn.deadline.is_some_and(|d| d <= ctx.now);
    if let Phase::Connecting {
        addrs,
        next,
        last,
        attempt_deadline,
        ..
    } = &mut conn.phase
    {
        if !overall_due && *attempt_deadline <= ctx.now && *next < addrs.len() {
            *last = Failure::TimedOut;
            debug!(
                "{}: connect attempt timed out; trying the next address",
                conn.peer
            );
            drop_upstream(conn, ctx);
            return try_next(key, conn, ctx);
        }
    }
    if overall_due {
        on_timeout(conn, ctx)
    } else {
        Next::Wait
    }
}

/// The connect deadline passed while resolving or connecting.
pub fn on_timeout(conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let reply = match &conn.phase {
        Phase::Resolving { reply } | Phase::Connecting { reply, .. } => *reply,
        Phase::Upstream(u) => u.reply,
        _ => return Next::Wait,
    };
    debug!("{}: connect to {} timed out", conn.peer, target_str(conn));
    fail(conn, ctx, reply, CloseReason::Failed(Failure::TimedOut))
}
