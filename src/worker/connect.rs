//! Resolving -> Connecting -> (upstream handshake) -> success reply -> relay.
//!
//! Addresses are dialled per Happy Eyeballs (RFC 8305, the sans-IO scheduler in `crate::happy`): families
//! interleaved starting with the resolver's first (getaddrinfo sorts per RFC 6724), the next attempt
//! `--connection-attempt-delay` after the previous while earlier ones stay in flight (at once when one fails), the
//! first to connect wins and the others are closed, all within `--connect-timeout`. Every address is checked
//! against the destination rules before anything is dialled, so a name cannot be used to reach a denied address.
//! Both families of a name arrive in one answer from the resolver, so the resolution delay of RFC 8305 §3 never
//! applies here.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use log::debug;

use super::close::CloseReason;
use mio::Interest;

use super::conn::{open_attempt, path_failed, Conn, Dest, Phase};
use super::ctx::{Ctx, Next, ReplyKind};
use super::phase::{Answer, Attempts};
use super::relay::start_relay;
use super::reply;
use super::timers::TimerKind;
use super::{gate, token, upstream};
use crate::acl::DestAllowed;
use crate::happy::{Family, Scheduler, Step};
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
            // A name known without a query (`--resolve`, hosts file, a live cache entry) is answered here: no
            // pool hop, no waker, no second loop iteration.
            if let Some(result) = ctx.quick.get(name.as_str(), port) {
                debug!("{}: {} answered without a lookup", conn.peer, name.as_str());
                conn.phase = Phase::Resolving { answer, deadline };
                return on_resolved(key, conn, ctx, result);
            }
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

/// Filters the addresses through the destination rules and starts the Happy Eyeballs attempts.
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
            Ok(proof) if gate::allows(conn, ctx, cmd, a) => Some(proof),
            _ => {
                debug!("{}: destination {a} denied by rules", conn.peer);
                None
            }
        })
        .collect();
    let Some(first) = allowed.first() else {
        debug!(
            "{}: every address of {} denied by rules",
            conn.peer,
            target_str(conn)
        );
        return fail(conn, ctx, reply, CloseReason::DestDenied);
    };
    // The resolver's order (RFC 6724 for getaddrinfo; --resolve as written) names the preferred family.
    let preferred = Family::of(&first.addr());
    let list: Vec<SocketAddr> = allowed.iter().map(DestAllowed::addr).collect();
    let sched = Scheduler::with_addrs(&list, preferred, ctx.cfg.connection_attempt_delay);
    conn.phase = Phase::Connecting {
        answer,
        deadline,
        attempts: Box::new(Attempts {
            sched,
            allowed,
            socks: Default::default(),
            last: Failure::General,
            wake: None,
        }),
    };
    pump(key, conn, ctx)
}

/// Keeps the more specific of two failures: a refusal or an unreachable route says more than "general failure".
fn record(last: &mut Failure, new: Failure) {
    if new != Failure::General || *last == Failure::General {
        *last = new;
    }
}

/// Asks the scheduler what to do now and does it: dial addresses (each in a free token slot), arm the
/// attempt-delay wake-up, or fail with the most specific failure once every address failed.
fn pump(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    loop {
        let Phase::Connecting {
            answer, attempts, ..
        } = &mut conn.phase
        else {
            return Next::Wait;
        };
        let Some(slot) = attempts.socks.iter().position(Option::is_none) else {
            // Every slot is busy: the next attempt waits for one of them to fail.
            return Next::Wait;
        };
        let addr = match attempts.sched.next(ctx.now) {
            Step::Dial(addr) => addr,
            Step::WaitUntil(at) => {
                if attempts.wake != Some(at) {
                    attempts.wake = Some(at);
                    ctx.timers.push(at, key, conn.gen, TimerKind::Connect);
                }
                return Next::Wait;
            }
            Step::Idle | Step::Done => return Next::Wait,
            Step::Exhausted => {
                let (reply, last) = (answer.kind(), attempts.last);
                return fail(conn, ctx, reply, CloseReason::Failed(last));
            }
        };
        // Each address is dialled once: its proof is spent on it.
        let Some(allowed) = attempts
            .allowed
            .iter()
            .position(|proof| proof.addr() == addr)
            .map(|i| attempts.allowed.swap_remove(i))
        else {
            // The scheduler only hands out addresses it was given, and it was given only allowed ones.
            attempts.sched.on_attempt_failed(addr);
            continue;
        };
        debug!("{}: connecting to {addr} (attempt slot {slot})", conn.peer);
        let opened = gate::egress(conn, ctx, addr.is_ipv4())
            .and_then(|source| open_attempt(key, slot, ctx, allowed, source));
        let Phase::Connecting { attempts, .. } = &mut conn.phase else {
            return Next::Wait;
        };
        match opened {
            Ok(sock) => attempts.socks[slot] = Some((addr, sock)),
            Err(e) => {
                record(&mut attempts.last, net::failure_of(&e));
                attempts.sched.on_attempt_failed(addr);
                if e.kind() == io::ErrorKind::Other {
                    gate::log_egress_error(conn, &e);
                } else {
                    debug!("{}: connect {addr}: {e}", conn.peer);
                }
            }
        }
    }
}

/// Records readiness for connect attempt `slot`. False when the connection is not connecting (the caller marks
/// its usual outbound socket instead).
pub fn mark(conn: &mut Conn, slot: usize, ev: &mio::event::Event) -> bool {
    let Phase::Connecting { attempts, .. } = &mut conn.phase else {
        return false;
    };
    // A slot emptied earlier in this batch of events has no socket: its stale event is dropped.
    if let Some(Some((_, sock))) = attempts.socks.get_mut(slot) {
        sock.mark(ev);
    }
    true
}

/// Drives the Connecting phase: checks every attempt that saw readiness; the first connected one wins and the
/// others are closed; failed ones make room for the next address.
pub fn drive(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let Phase::Connecting { attempts, .. } = &mut conn.phase else {
        return Next::Wait;
    };
    let mut winner = None;
    let mut failed = false;
    for slot in 0..attempts.socks.len() {
        let Some((addr, sock)) = attempts.socks[slot].as_mut() else {
            continue;
        };
        if !sock.writable && !sock.readable {
            continue;
        }
        let addr = *addr;
        match sock.connect_state() {
            ConnectState::Pending => {
                sock.writable = false;
                sock.readable = false;
            }
            ConnectState::Connected => {
                winner = Some(slot);
                break;
            }
            ConnectState::Failed(e) => {
                debug!("{}: connect to {addr}: {e}", conn.peer);
                record(&mut attempts.last, net::failure_of(&e));
                attempts.sched.on_attempt_failed(addr);
                if let Some((_, mut sock)) = attempts.socks[slot].take() {
                    let _ = ctx.registry.deregister(&mut sock.stream);
                }
                failed = true;
            }
        }
    }
    if let Some(slot) = winner {
        return won(key, conn, ctx, slot);
    }
    if failed {
        return pump(key, conn, ctx);
    }
    Next::Wait
}

/// Attempt `slot` connected: it becomes the outbound socket (under the plain upstream token), the others close.
fn won(key: usize, conn: &mut Conn, ctx: &mut Ctx, slot: usize) -> Next {
    let Phase::Connecting { attempts, .. } = &mut conn.phase else {
        return Next::Wait;
    };
    let Some((addr, mut sock)) = attempts.socks[slot].take() else {
        return Next::Wait;
    };
    for other in attempts.sched.on_connected(addr) {
        debug!("{}: closing the attempt to {other}", conn.peer);
    }
    close_attempts(attempts, ctx);
    if slot != 0 {
        if let Err(e) = ctx.registry.reregister(
            &mut sock.stream,
            token::conn(key, token::Role::Upstream),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            debug!(
                "{}: re-registering the connection to {addr}: {e}",
                conn.peer
            );
            return Next::Close(CloseReason::Internal);
        }
    }
    debug!("{}: connected to {addr} ({})", conn.peer, target_str(conn));
    conn.upstream = Some(sock);
    connected(conn)
}

/// Deregisters and closes every attempt still in flight.
fn close_attempts(attempts: &mut Attempts, ctx: &mut Ctx) {
    for (_, mut sock) in attempts.socks.iter_mut().filter_map(Option::take) {
        let _ = ctx.registry.deregister(&mut sock.stream);
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

/// Reports a failure to resolve or connect (closing any attempts still in flight).
fn fail(conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind, reason: CloseReason) -> Next {
    if let Phase::Connecting { attempts, .. } = &mut conn.phase {
        close_attempts(attempts, ctx);
    }
    path_failed(conn, ctx, reply, reason)
}

/// A connect timer popped: the attempt delay ran out (dial the next address), or the whole connect deadline
/// passed.
pub fn on_timer(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    if conn.phase.connect_deadline().is_some_and(|d| d <= ctx.now) {
        return on_timeout(conn, ctx);
    }
    if let Phase::Connecting { attempts, .. } = &mut conn.phase {
        if attempts.wake.is_some_and(|at| at <= ctx.now) {
            attempts.wake = None;
            return pump(key, conn, ctx);
        }
    }
    Next::Wait
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_failure_is_kept() {
        let mut last = Failure::General;
        record(&mut last, Failure::ConnectionRefused);
        assert_eq!(last, Failure::ConnectionRefused);
        record(&mut last, Failure::General);
        assert_eq!(
            last,
            Failure::ConnectionRefused,
            "a general error says less"
        );
        record(&mut last, Failure::HostUnreachable);
        assert_eq!(
            last,
            Failure::HostUnreachable,
            "otherwise the last one counts"
        );
    }
}
