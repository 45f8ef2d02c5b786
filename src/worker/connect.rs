//! Resolving -> Connecting -> (upstream handshake) -> success reply -> relay.
//!
//! Addresses are dialled per Happy Eyeballs (RFC 8305, the sans-IO scheduler in `crate::happy`): families
//! interleaved starting with the resolver's first (getaddrinfo sorts per RFC 6724; the built-in resolver puts IPv6
//! first), the next attempt `--connection-attempt-delay` after the previous while earlier ones stay in flight (at
//! once when one fails), the first to connect wins and the others are closed, all within `--connect-timeout`.
//! Every address is checked against the destination rules before anything is dialled, so a name cannot be used to
//! reach a denied address.
//!
//! The built-in resolver answers a lookup it has to send to DNS in up to two steps: `Outcome::Early` with the
//! family that answered first while the other is still out, then `Outcome::Resolved` with everything. The early
//! answer starts the Connecting phase with the other family pending, so the scheduler applies the resolution delay
//! of RFC 8305 §3 (IPv4 waits 50 ms for AAAA) or dials IPv6 at once. Answers known without a query (cache, hosts
//! file, `--resolve`) come whole and inline. Each lookup has its own resolver tag, so a full answer that arrives
//! after its connection moved on (to another origin over HTTP keep-alive) is not taken for a later lookup's.
//!
//! An `--upstream` proxy given by name goes the same way, as `Answer::Chain`: its name is resolved per session
//! (through the cache), its addresses are dialled with Happy Eyeballs without the destination rules (they are
//! the operator's, not a client's), and the connected socket is handed to the upstream handshake.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use log::debug;

use super::close::CloseReason;
use mio::Interest;

use super::conn::{open_attempt, open_proxy_attempt, path_failed, Conn, Dest, Phase, Sock};
use super::ctx::{Ctx, Next, ReplyKind};
use super::phase::{Answer, Attempts, Route, CONNECT_TAGS};
use super::relay::start_relay;
use super::reply;
use super::timers::TimerKind;
use super::{gate, token, upstream};
use crate::acl::DestAllowed;
use crate::buffer::Buffer;
use crate::happy::{Family, Scheduler, Step};
use crate::metrics;
use crate::net::{self, ConnectState};
use crate::proto::{self, Failure, TargetAddr};
use crate::resolve::{Job, Work};

/// Numbers the connect lookups of every worker (the tag space is shared by the pool's answers).
static NEXT_TAG: AtomicU32 = AtomicU32::new(0);

/// A fresh resolver tag for a connect lookup.
fn next_tag() -> u32 {
    CONNECT_TAGS | (NEXT_TAG.fetch_add(1, Relaxed) & !CONNECT_TAGS)
}

/// True for the resolver tags of connect lookups (UDP datagram lookups use the others).
pub fn is_connect_tag(tag: u32) -> bool {
    tag >= CONNECT_TAGS
}

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
    ctx.timers.arm(deadline, key, conn.gen, TimerKind::Connect);
    // A `via:NAME` rule picks a policy group instead of `--upstream`.
    let route = match gate::route(conn, ctx, gate::command_of(reply), &target) {
        Some(group) => Some(upstream::group_route(conn, ctx, group, deadline)),
        None => ctx.cfg.upstream.clone().map(Route::Flag),
    };
    if let Some(route) = route {
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
        let plan = upstream::plan(answer, target, route, deadline);
        if let Route::Flag(u) = &plan.route {
            if u.by_name() {
                // Given by name: resolved per session and dialled here, then the handshake takes over.
                let u = Arc::clone(u);
                let answer = Answer::Chain(Box::new(plan), Arc::clone(&u));
                return resolve(key, conn, ctx, (answer, deadline), (&u.host, u.port));
            }
        }
        return upstream::dial(key, conn, ctx, plan);
    }
    match target {
        TargetAddr::Ip(addr) => begin(key, conn, ctx, (answer, deadline), vec![addr]),
        TargetAddr::Domain(name, port) => {
            metrics::inc(&ctx.stats.dns_lookups);
            resolve(key, conn, ctx, (answer, deadline), (name.as_str(), port))
        }
    }
}

/// Resolves `host`: inline when the answer is known without a query, else through the resolver pool.
fn resolve(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    (answer, deadline): (Answer, Instant),
    (host, port): (&str, u16),
) -> Next {
    // A name known without a query (`--resolve`, hosts file, a live cache entry) is answered here: no pool hop, no
    // waker, no second loop iteration.
    if let Some(result) = ctx.quick.get(host, port) {
        debug!("{}: {host} answered without a lookup", conn.peer);
        return resolved(key, conn, ctx, (answer, deadline), result);
    }
    let tag = next_tag();
    let job = Job {
        key,
        gen: conn.gen,
        tag,
        work: Work::Resolve {
            host: host.to_string(),
            port,
            early: true,
        },
        reply: ctx.reply_to.clone(),
    };
    debug!("{}: resolving {host}", conn.peer);
    if ctx.resolve_tx.send(job).is_err() {
        return fail(conn, ctx, answer.kind(), CloseReason::Internal);
    }
    conn.phase = Phase::Resolving {
        answer,
        deadline,
        tag,
    };
    Next::Wait
}

/// The full resolver answer for lookup `tag` arrived for `conn`.
pub fn on_resolved(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    tag: u32,
    result: io::Result<Vec<SocketAddr>>,
) -> Next {
    match &mut conn.phase {
        Phase::Resolving { tag: t, .. } if *t == tag => {
            let Phase::Resolving {
                answer, deadline, ..
            } = std::mem::replace(&mut conn.phase, Phase::Closing)
            else {
                return Next::Wait;
            };
            resolved(key, conn, ctx, (answer, deadline), result)
        }
        Phase::Connecting { attempts, .. } if attempts.lookup == Some(tag) => {
            // The rest of an answer whose first family is already being dialled.
            attempts.lookup = None;
            let addrs = result.unwrap_or_default();
            add_answer(conn, ctx, &[Family::V6, Family::V4], addrs);
            pump(key, conn, ctx)
        }
        _ => Next::Wait,
    }
}

/// One family of lookup `tag` answered while the other is still out: start Connecting with it (RFC 8305 §3).
pub fn on_early(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    tag: u32,
    addrs: Vec<SocketAddr>,
) -> Next {
    if !matches!(&conn.phase, Phase::Resolving { tag: t, .. } if *t == tag) {
        return Next::Wait;
    }
    let Some(family) = addrs.first().map(Family::of) else {
        return Next::Wait;
    };
    let Phase::Resolving {
        answer, deadline, ..
    } = std::mem::replace(&mut conn.phase, Phase::Closing)
    else {
        return Next::Wait;
    };
    debug!(
        "{}: {} answered for {family:?} first",
        conn.peer,
        target_str(conn)
    );
    // The built-in resolver prefers IPv6 (RFC 6724's default precedence), as it orders its full answers; an IPv4
    // `--bind` cannot dial IPv6, so A is not kept waiting for AAAA then.
    let preferred = match ctx.cfg.outbound_bind {
        Some(ip) if ip.is_ipv4() => Family::V4,
        _ => Family::V6,
    };
    let sched = Scheduler::new(
        &[Family::V6, Family::V4],
        preferred,
        ctx.cfg.connection_attempt_delay,
    );
    conn.phase = Phase::Connecting {
        answer,
        deadline,
        attempts: Box::new(Attempts {
            sched,
            allowed: Vec::new(),
            proxy: Vec::new(),
            lookup: Some(tag),
            denied: false,
            socks: Default::default(),
            last: Failure::General,
            wake: None,
        }),
    };
    add_answer(conn, ctx, &[family], addrs);
    pump(key, conn, ctx)
}

/// A whole answer (inline, or the pool's in one piece): connect, or report the failure.
fn resolved(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    (answer, deadline): (Answer, Instant),
    result: io::Result<Vec<SocketAddr>>,
) -> Next {
    let reply = answer.kind();
    let chain = matches!(answer, Answer::Chain(..));
    match result {
        Ok(addrs) if !addrs.is_empty() => begin(key, conn, ctx, (answer, deadline), addrs),
        Ok(_) | Err(_) if chain => {
            let u = ctx.cfg.upstream.as_ref().map(|u| u.host.as_str());
            debug!(
                "{}: cannot resolve the upstream proxy {}",
                conn.peer,
                u.unwrap_or("")
            );
            fail(
                conn,
                ctx,
                reply,
                CloseReason::UpstreamProxy(Failure::General),
            )
        }
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
    let Admitted {
        allowed,
        proxy,
        denied,
    } = admit(conn, ctx, &answer, addrs);
    let list: Vec<SocketAddr> = allowed
        .iter()
        .map(DestAllowed::addr)
        .chain(proxy.iter().copied())
        .collect();
    let Some(first) = list.first() else {
        debug!(
            "{}: every address of {} denied by rules",
            conn.peer,
            target_str(conn)
        );
        return fail(conn, ctx, reply, CloseReason::DestDenied);
    };
    // The resolver's order (RFC 6724 for getaddrinfo; --resolve as written) names the preferred family.
    let preferred = Family::of(first);
    let sched = Scheduler::with_addrs(&list, preferred, ctx.cfg.connection_attempt_delay);
    conn.phase = Phase::Connecting {
        answer,
        deadline,
        attempts: Box::new(Attempts {
            sched,
            allowed,
            proxy,
            lookup: None,
            denied,
            socks: Default::default(),
            last: Failure::General,
            wake: None,
        }),
    };
    pump(key, conn, ctx)
}

/// What may be dialled of an answer.
struct Admitted {
    /// A client's destination: the addresses the rules allow, as their proofs.
    allowed: Vec<DestAllowed>,
    /// The operator's upstream proxy (`Answer::Chain`): every address, which the rules are not for.
    proxy: Vec<SocketAddr>,
    /// Some address was refused by the rules.
    denied: bool,
}

/// Sorts an answer's addresses into what may be dialled: through the destination rules for a client's target, all
/// of them for the operator's upstream proxy.
fn admit(conn: &Conn, ctx: &Ctx, answer: &Answer, addrs: Vec<SocketAddr>) -> Admitted {
    let addrs = addrs
        .into_iter()
        .map(|a| SocketAddr::new(proto::canonical_ip(a.ip()), a.port()));
    if matches!(answer, Answer::Chain(..)) {
        return Admitted {
            allowed: Vec::new(),
            proxy: addrs.collect(),
            denied: false,
        };
    }
    let cmd = gate::command_of(answer.kind());
    let mut denied = false;
    let allowed = addrs
        .filter_map(|a| match ctx.cfg.dest_rules.check(a) {
            Ok(proof) if gate::allows(conn, ctx, cmd, a) => Some(proof),
            _ => {
                debug!("{}: destination {a} denied by rules", conn.peer);
                denied = true;
                None
            }
        })
        .collect();
    Admitted {
        allowed,
        proxy: Vec::new(),
        denied,
    }
}

/// Feeds a (further) answer to a connect in progress: the addresses of `families` still awaited pass the rules
/// and join the scheduler; each of `families` counts as answered.
fn add_answer(conn: &mut Conn, ctx: &mut Ctx, families: &[Family], addrs: Vec<SocketAddr>) {
    let Phase::Connecting {
        answer, attempts, ..
    } = &conn.phase
    else {
        return;
    };
    let fresh: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| families.contains(&Family::of(a)) && attempts.sched.pending(Family::of(a)))
        .collect();
    let Admitted {
        allowed,
        proxy,
        denied,
    } = admit(conn, ctx, answer, fresh);
    let Phase::Connecting { attempts, .. } = &mut conn.phase else {
        return;
    };
    attempts.denied |= denied;
    let list: Vec<SocketAddr> = allowed
        .iter()
        .map(DestAllowed::addr)
        .chain(proxy.iter().copied())
        .collect();
    attempts.allowed.extend(allowed);
    attempts.proxy.extend(proxy);
    for f in families {
        attempts.sched.on_answer(*f, &list, ctx.now);
    }
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
                    ctx.timers.arm(at, key, conn.gen, TimerKind::Attempt);
                }
                return Next::Wait;
            }
            Step::Idle | Step::Done => return Next::Wait,
            Step::Exhausted => {
                let reply = answer.kind();
                let reason = if matches!(answer, Answer::Chain(..)) {
                    CloseReason::UpstreamProxy(Failure::General)
                } else if !attempts.sched.started() && attempts.denied {
                    debug!(
                        "{}: every address of {} denied by rules",
                        conn.peer,
                        target_str(conn)
                    );
                    CloseReason::DestDenied
                } else if !attempts.sched.started() {
                    // Nothing dialable came of the answers.
                    metrics::inc(&ctx.stats.dns_failures);
                    CloseReason::Unresolved
                } else {
                    CloseReason::Failed(attempts.last)
                };
                return fail(conn, ctx, reply, reason);
            }
        };
        // Each address is dialled once: its proof (or, for the upstream proxy, its entry) is spent on it.
        let target = attempts
            .allowed
            .iter()
            .position(|proof| proof.addr() == addr)
            .map(|i| attempts.allowed.swap_remove(i));
        let proxy = attempts
            .proxy
            .iter()
            .position(|a| *a == addr)
            .map(|i| attempts.proxy.swap_remove(i));
        if target.is_none() && proxy.is_none() {
            // The scheduler only hands out addresses it was given, and it was given only allowed ones.
            attempts.sched.on_attempt_failed(addr);
            continue;
        }
        debug!("{}: connecting to {addr} (attempt slot {slot})", conn.peer);
        let opened = gate::egress(conn, ctx, addr.is_ipv4()).and_then(|source| match target {
            Some(allowed) => open_attempt(key, slot, ctx, allowed, source),
            None => open_proxy_attempt(key, slot, ctx, (addr, source)),
        });
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
    match std::mem::replace(&mut conn.phase, Phase::Closing) {
        Phase::Connecting {
            answer: Answer::Chain(plan, server),
            ..
        } => {
            // The upstream proxy given by name is reached: its handshake takes the socket (it sees it writable
            // and finds it connected).
            sock.writable = true;
            upstream::reached_by_name(conn, ctx, *plan, server, sock)
        }
        Phase::Connecting { answer, .. } => Next::Connected(answer.connected(sock, None)),
        other => {
            // `won` is only reached from a Connecting phase (checked above): nothing to hand over otherwise.
            conn.phase = other;
            Next::Wait
        }
    }
}

/// Deregisters and closes every attempt still in flight.
fn close_attempts(attempts: &mut Attempts, ctx: &mut Ctx) {
    for (_, mut sock) in attempts.socks.iter_mut().filter_map(Option::take) {
        let _ = ctx.registry.deregister(&mut sock.stream);
    }
}

/// The path to the target is ready (directly, or through the upstream proxy): answer the client and relay.
/// (Forwarded HTTP goes to `http` instead: the dispatcher routes `Next::Connected` by reply kind.)
pub fn established(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    reply: ReplyKind,
    (outbound, early): (Sock, Option<Buffer>),
) -> Next {
    let local = outbound
        .stream
        .local_addr()
        .unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    // SOCKS4 reports an IPv6 outbound socket as 0.0.0.0:0 (its reply has no room for it).
    let local = match (reply, local) {
        (ReplyKind::Socks4, SocketAddr::V6(_)) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        _ => local,
    };
    if reply::granted(conn, reply, local).is_err() {
        return Next::Close(CloseReason::ClientError);
    }
    metrics::inc(&ctx.stats.handshakes_ok[conn.proto as usize]);
    start_relay(key, conn, ctx, outbound, early);
    Next::Again
}

/// Reports a failure to resolve or connect (closing any attempts still in flight).
fn fail(conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind, reason: CloseReason) -> Next {
    if let Phase::Connecting { attempts, .. } = &mut conn.phase {
        close_attempts(attempts, ctx);
    }
    path_failed(ctx, reply, reason)
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
        Phase::Upstream(u) => u.plan.answer.kind(),
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
