//! Resolving -> Connecting -> (upstream handshake) -> success reply -> relay.
//!
//! Every resolved address is tried in turn (the resolver's order, which getaddrinfo sorts per RFC 6724), each one
//! checked against the destination rules first, so a name cannot be used to reach a denied address.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use log::debug;

use super::close::CloseReason;
use super::conn::{drop_upstream, open_target, path_failed, Conn, Dest, Phase};
use super::ctx::{Ctx, Next, ReplyKind};
use super::phase::Answer;
use super::relay::start_relay;
use super::reply;
use super::timers::TimerKind;
use super::{gate, upstream};
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
    answer: Answer,
) -> Next {
    let reply = answer.kind();
    conn.target = Some(Dest::from(&target));
    if let Err(reason) = gate::check_target(conn, ctx, gate::command_of(reply), &target) {
        debug!(
            "{}: target {} refused by the policy file",
            conn.peer,
            target_str(conn)
        );
        return fail(conn, ctx, reply, reason);
    }
    let deadline = ctx.now + ctx.cfg.connect_timeout;
    ctx.timers.push(deadline, key, conn.gen, TimerKind::Connect);
    // A `via:NAME` rule picks a policy group instead of `--upstream`.
    let group = gate::route(conn, ctx, gate::command_of(reply), &target);
    if group.is_some() || ctx.cfg.upstream.is_some() {
        // Through an upstream proxy the target is the upstream's business: connect to the proxy itself, but
        // still apply the destination rules when the target is a literal address.
        if let TargetAddr::Ip(addr) = &target {
            if ctx.cfg.dest_rules.check(*addr).is_err()
                || !gate::allows(conn, ctx, gate::command_of(reply), *addr)
            {
                debug!("{}: destination {addr} denied by rules", conn.peer);
                return fail(conn, ctx, reply, CloseReason::DestDenied);
            }
        }
        return upstream::start_connect(key, conn, ctx, (answer, target, group), deadline);
    }
    match target {
        TargetAddr::Ip(addr) => begin(key, conn, ctx, (answer, deadline), vec![addr]),
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
            conn.phase = Phase::Resolving { answer, deadline };
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
    if !matches!(conn.phase, Phase::Resolving { .. }) {
        return Next::Wait;
    }
    let Phase::Resolving { answer, deadline } = std::mem::replace(&mut conn.phase, Phase::Closing)
    else {
        return Next::Wait;
    };
    let reply = answer.kind();
    match result {
        Ok(addrs) if !addrs.is_empty() => begin(key, conn, ctx, (answer, deadline), addrs),
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
    (answer, deadline): (Answer, Instant),
    addrs: Vec<SocketAddr>,
) -> Next {
    let reply = answer.kind();
    let cmd = gate::command_of(reply);
    let allowed: Vec<_> = addrs
        .into_iter()
        .map(|a| SocketAddr::new(proto::canonical_ip(a.ip()), a.port()))
        .filter_map(|a| match ctx.cfg.dest_rules.check(a) {
            Ok(proof) if gate::allows(conn, ctx, cmd, a) => Some((a, proof)),
            _ => {
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
        answer,
        addrs: allowed,
        next: 0,
        last: Failure::General,
        attempt_deadline: ctx.now,
        deadline,
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
    loop {
        let (addr, allowed, left) = {
            let Phase::Connecting {
                answer,
                addrs,
                next,
                last,
                ..
            } = &mut conn.phase
            else {
                return Next::Wait;
            };
            let Some((addr, allowed)) = addrs.get(*next).copied() else {
                let (reply, last) = (answer.kind(), *last);
                return fail(conn, ctx, reply, CloseReason::Failed(last));
            };
            *next += 1;
            (addr, allowed, (addrs.len() - *next) as u32)
        };
        debug!("{}: connecting to {addr}", conn.peer);
        let opened = gate::egress(conn, ctx, addr.is_ipv4())
            .and_then(|source| open_target(key, ctx, addr, source, allowed));
        let Phase::Connecting {
            last,
            attempt_deadline,
            deadline: overall,
            ..
        } = &mut conn.phase
        else {
            return Next::Wait;
        };
        let overall = *overall;
        match opened {
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
                *last = net::failure_of(&e);
                if e.kind() == io::ErrorKind::Other {
                    gate::log_egress_error(conn, &e);
                } else {
                    debug!("{}: connect {addr}: {e}", conn.peer);
                }
            }
        }
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
            connected(conn)
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
fn connected(conn: &Conn) -> Next {
    let reply = match &conn.phase {
        Phase::Connecting { answer, .. } => answer.kind(),
        _ => return Next::Wait,
    };
    Next::Connected(reply)
}

/// The path to the target is ready (directly, or through the upstream proxy): answer the client and relay.
/// (Forwarded HTTP goes to `http` instead: the dispatcher routes `Next::Connected` by reply kind.)
pub fn established(key: usize, conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind) -> Next {
    let local = conn
        .upstream
        .as_ref()
        .and_then(|u| u.stream.local_addr().ok())
        .unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    // SOCKS4 reports an IPv6 outbound socket as 0.0.0.0:0 (its reply has no room for it).
    let local = match (reply, local) {
        (ReplyKind::Socks4, SocketAddr::V6(_)) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        _ => local,
    };
    // Connecting and the upstream handshake leave the outbound socket here; it cannot be missing.
    let Some(outbound) = conn.upstream.take() else {
        return Next::Close(CloseReason::Internal);
    };
    if reply::granted(conn, reply, local).is_err() {
        return Next::Close(CloseReason::ClientError);
    }
    metrics::inc(&ctx.stats.handshakes_ok[conn.proto as usize]);
    start_relay(key, conn, ctx, outbound);
    Next::Again
}

/// Reports a failure to resolve or connect.
fn fail(conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind, reason: CloseReason) -> Next {
    path_failed(conn, ctx, reply, reason)
}

/// A connect timer popped: move on to the next address when this attempt's share is used up, or fail when the
/// whole connect deadline has passed.
pub fn on_timer(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let overall_due = conn.phase.connect_deadline().is_some_and(|d| d <= ctx.now);
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
        Phase::Resolving { answer, .. } | Phase::Connecting { answer, .. } => answer.kind(),
        Phase::Upstream(u) => u.answer.kind(),
        _ => return Next::Wait,
    };
    debug!("{}: connect to {} timed out", conn.peer, target_str(conn));
    fail(conn, ctx, reply, CloseReason::Failed(Failure::TimedOut))
}
