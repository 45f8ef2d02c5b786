//! SOCKS5 UDP ASSOCIATE (RFC 1928 §7).
//!
//! An association owns two UDP sockets, both reached through the control connection's slab entry:
//! - the relay socket (role `Udp`), bound to the local IP the control connection arrived on and advertised in the
//!   reply, so the client can reach it and replies come from the address it sends to;
//! - the outbound socket (role `Upstream`), bound to `--bind` or the wildcard (dual-stack), which talks to targets.
//!
//! Datagrams are accepted only from the control connection's client IP; the port must match when the client named
//! one, otherwise it is learned from the first datagram (PySocks sends `0.0.0.0:<its port>`, others send zeros or
//! even the target, which we treat as "unknown"). Every datagram passes the destination rules; names are resolved
//! on the blocking pool and cached per association. The association ends with the control connection, or after
//! `--udp-idle-timeout` without datagrams.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use log::debug;
use mio::net::UdpSocket;
use mio::Interest;

use super::close::CloseReason;
use super::conn::{Conn, Phase, Source};
use super::ctx::{Ctx, Next, ReplyKind};
use super::gate;
use super::phase::UdpState;
use super::reply;
use super::timers::TimerKind;
use super::token::{self, Role};
use crate::config::Config;
use crate::metrics::{self, Stats, UdpDrop};
use crate::net;
use crate::policy::{rules::Command, Policy};
use crate::proto::{canonical_ip, socks5, Failure, Name, TargetAddr};
use crate::resolve::{Job, Work};

/// Room kept in front of a received answer for the SOCKS5 UDP header.
const HEADROOM: usize = socks5::MAX_UDP_HEADER_LEN;
/// Largest UDP payload plus headroom.
const DATAGRAM_BUF: usize = HEADROOM + 65536;
/// Datagrams processed per socket per turn before yielding.
const PER_TURN: usize = 64;
/// Names cached per association.
const CACHE_SIZE: usize = 16;
/// Datagrams held while their name resolves.
const MAX_QUEUED: usize = 16;

/// Distinct destinations counted per association; beyond this the access log says "at least".
const MAX_COUNTED_DESTS: usize = 4096;

/// What an association reached, for the access log's `target=`: distinct destinations and datagrams each way.
pub fn summary(u: &UdpState) -> String {
    let more = if u.dests.len() >= MAX_COUNTED_DESTS {
        "+"
    } else {
        ""
    };
    format!(
        "dests:{}{more},dgrams_up:{},dgrams_down:{}",
        u.dests.len(),
        u.dgrams_up,
        u.dgrams_down
    )
}

fn count_dest(u: &mut UdpState, target: &TargetAddr) {
    if u.dests.len() >= MAX_COUNTED_DESTS {
        return;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match target {
        TargetAddr::Ip(a) => SocketAddr::new(canonical_ip(a.ip()), a.port()).hash(&mut h),
        TargetAddr::Domain(n, p) => (n.as_str(), *p).hash(&mut h),
    }
    u.dests.insert(h.finish());
}

/// Records readiness of the association's sockets.
pub fn mark(conn: &mut Conn, role: Role, ev: &mio::event::Event) {
    if let Phase::Udp(u) = &mut conn.phase {
        let r = ev.is_readable() || ev.is_error();
        match role {
            Role::Udp => u.relay_readable |= r,
            Role::Upstream => u.out_readable |= r,
            _ => {}
        }
    }
}

fn open_out(ctx: &Ctx, egress: Source) -> io::Result<(UdpSocket, bool)> {
    if let Some((ip, freebind)) = egress {
        return Ok((net::udp_socket_from(ip, freebind)?, false));
    }
    match ctx.cfg.outbound_bind {
        Some(ip) => Ok((net::udp_socket(SocketAddr::new(ip, 0))?, false)),
        None => match net::udp_socket(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)) {
            Ok(s) => Ok((s, true)),
            // No IPv6 on this host: IPv4 only.
            Err(_) => Ok((net::udp_socket(SocketAddr::from(([0, 0, 0, 0], 0)))?, false)),
        },
    }
}

/// Starts an association for a UDP ASSOCIATE request whose DST names the client's sending address (`hint`).
pub fn start(key: usize, conn: &mut Conn, ctx: &mut Ctx, hint: TargetAddr) -> Next {
    if ctx.cfg.upstream.is_some() {
        // Relaying UDP through an upstream proxy is not supported: say so with the protocol's own code.
        return reply::fail(
            conn,
            ctx,
            ReplyKind::Socks5,
            CloseReason::Failed(Failure::CommandNotSupported),
        );
    }
    let client_ip = canonical_ip(conn.peer.ip());
    let client_port = match &hint {
        TargetAddr::Ip(a) if a.port() != 0 => {
            let ip = canonical_ip(a.ip());
            // Only a port paired with the client's own (or an unspecified) address describes the client; some
            // clients put the target here instead.
            (ip.is_unspecified() || ip == client_ip).then_some(a.port())
        }
        _ => None,
    };
    let Some(local_ip) = conn.local_ip() else {
        return reply::fail(
            conn,
            ctx,
            ReplyKind::Socks5,
            CloseReason::Failed(Failure::General),
        );
    };
    // One outbound socket serves every target: a user's egress list gives it the family of its first entry.
    let first_v4 = ctx
        .policy
        .egress(conn.user.as_ref().map(|u| u.user()))
        .first()
        .map(|e| match e {
            crate::policy::Egress::Ip(ip) => ip.is_ipv4(),
            crate::policy::Egress::Prefix(c) => c.addr().is_ipv4(),
        });
    let egress = match first_v4 {
        Some(v4) => gate::egress(conn, ctx, v4),
        None => Ok(None),
    };
    let opened = egress.and_then(|egress| {
        let relay = net::udp_socket(SocketAddr::new(local_ip, 0))?;
        let (out, dual) = open_out(ctx, egress)?;
        Ok((relay, out, dual))
    });
    let (mut relay, mut out, out_dual) = match opened {
        Ok(x) => x,
        Err(e) => {
            if e.kind() == io::ErrorKind::Other {
                gate::log_egress_error(conn, &e);
            }
            debug!("{}: UDP ASSOCIATE: cannot open sockets: {e}", conn.peer);
            return reply::fail(
                conn,
                ctx,
                ReplyKind::Socks5,
                CloseReason::Failed(Failure::General),
            );
        }
    };
    let reg = ctx
        .registry
        .register(&mut relay, token::conn(key, Role::Udp), Interest::READABLE)
        .and_then(|_| {
            ctx.registry.register(
                &mut out,
                token::conn(key, Role::Upstream),
                Interest::READABLE,
            )
        });
    let bound = relay.local_addr();
    let (Ok(()), Ok(bound)) = (reg, bound) else {
        let _ = ctx.registry.deregister(&mut relay);
        let _ = ctx.registry.deregister(&mut out);
        return reply::fail(
            conn,
            ctx,
            ReplyKind::Socks5,
            CloseReason::Failed(Failure::General),
        );
    };
    let advertised = SocketAddr::new(ctx.cfg.udp_advertise.unwrap_or(bound.ip()), bound.port());
    debug!("{}: UDP relay on {advertised}", conn.peer);
    if reply::granted(conn, ReplyKind::Socks5, advertised).is_err() {
        let _ = ctx.registry.deregister(&mut relay);
        let _ = ctx.registry.deregister(&mut out);
        return Next::Close(CloseReason::ClientError);
    }
    metrics::inc(&ctx.stats.handshakes_ok[conn.proto as usize]);
    if let Some(b) = conn.c2u.take() {
        ctx.pool.give(b);
    }
    if ctx.udp_buf.len() < DATAGRAM_BUF {
        ctx.udp_buf = vec![0u8; DATAGRAM_BUF];
    }
    conn.phase = Phase::Udp(Box::new(UdpState {
        relay,
        out,
        relay_readable: true,
        out_readable: true,
        client_ip,
        client_port,
        out_dual,
        cache: Vec::new(),
        queued: Vec::new(),
        next_tag: 0,
        last_active: ctx.now,
        dgrams_up: 0,
        dgrams_down: 0,
        dests: HashSet::new(),
    }));
    ctx.timers.push(
        ctx.now + ctx.cfg.udp_idle_timeout,
        key,
        conn.gen,
        TimerKind::UdpIdle,
    );
    Next::Again
}

/// Who sent a datagram, for the policy file's rules: the user and the client address.
#[derive(Clone, Copy)]
struct Sender<'a> {
    user: Option<&'a str>,
    client: IpAddr,
}

/// Sends `payload` to `dest` from the outbound socket, after the destination rules (checked per datagram): the
/// flags first, then the policy file's rules (with the name the datagram named, if any).
#[allow(clippy::too_many_arguments)]
fn send_out(
    u: &mut UdpState,
    cfg: &Config,
    policy: &Policy,
    from: Sender<'_>,
    stats: &Stats,
    name: Option<&str>,
    dest: SocketAddr,
    payload: &[u8],
) -> bool {
    let dest = SocketAddr::new(canonical_ip(dest.ip()), dest.port());
    if cfg.dest_rules.check(dest).is_err() {
        metrics::inc(&stats.udp_drops[UdpDrop::Denied as usize]);
        return false;
    }
    if !policy.allows_addr(from.user, from.client, Command::Udp, name, dest) {
        metrics::inc(&stats.udp_drops[UdpDrop::Rule as usize]);
        return false;
    }
    let wire = match (dest.ip(), u.out_dual) {
        (IpAddr::V4(v4), true) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), dest.port()),
        _ => dest,
    };
    match u.out.send_to(payload, wire) {
        Ok(_) => {
            metrics::inc(&stats.udp_up);
            u.dgrams_up += 1;
            true
        }
        Err(_) => {
            metrics::inc(&stats.udp_drops[UdpDrop::SendFailed as usize]);
            false
        }
    }
}

/// Drives the association: watches the control connection, relays both ways.
pub fn drive(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    // The control connection: EOF (or an error) ends the association; anything the client sends is ignored.
    while conn.client.readable {
        match conn.client.read(&mut ctx.scratch) {
            Ok(Some(0)) | Err(_) => return Next::Close(CloseReason::UdpControlClosed),
            Ok(Some(_)) => {}
            Ok(None) => break,
        }
    }
    if conn.flush_client().is_err() {
        return Next::Close(CloseReason::ClientError);
    }
    let gen = conn.gen;
    let sender = Sender {
        user: conn.user.as_ref().map(|u| u.user()),
        client: conn.peer.ip(),
    };
    // A datagram is all or nothing: one over the user's rate is dropped, as a router would.
    let limits = conn.limits.as_deref();
    let Phase::Udp(u) = &mut conn.phase else {
        return Next::Wait;
    };
    let mut more = false;
    let buf = &mut ctx.udp_buf;
    // Client -> targets.
    for i in 0..=PER_TURN {
        if !u.relay_readable {
            break;
        }
        if i == PER_TURN {
            more = true;
            break;
        }
        let (n, from) = match u.relay.recv_from(buf) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                u.relay_readable = false;
                break;
            }
            Err(_) => continue,
        };
        if canonical_ip(from.ip()) != u.client_ip || u.client_port.is_some_and(|p| p != from.port())
        {
            metrics::inc(&ctx.stats.udp_drops[UdpDrop::ForeignSource as usize]);
            continue;
        }
        u.client_port.get_or_insert(from.port());
        let dgram = &buf[..n];
        let (header, off) = match socks5::parse_udp_header(dgram) {
            Ok(x) => x,
            Err(_) => {
                metrics::inc(&ctx.stats.udp_drops[UdpDrop::Malformed as usize]);
                continue;
            }
        };
        if header.frag != 0 {
            // RFC 1928 §7: without fragmentation support, drop any datagram whose FRAG is not zero.
            metrics::inc(&ctx.stats.udp_drops[UdpDrop::Fragmented as usize]);
            continue;
        }
        let payload = &dgram[off..];
        if limits.is_some_and(|l| !l.up.take_exact(ctx.now, payload.len())) {
            metrics::inc(&ctx.stats.udp_drops[UdpDrop::Rate as usize]);
            continue;
        }
        if limits.is_some_and(|l| !l.quota.take_exact(payload.len())) {
            // A datagram that no longer fits the quota ends the association (and her other sessions).
            ctx.limits.note_exhausted();
            return Next::Close(CloseReason::Quota);
        }
        count_dest(u, &header.target);
        u.last_active = ctx.now;
        conn.bytes_up += payload.len() as u64;
        match header.target {
            TargetAddr::Ip(dest) => {
                let policy = &ctx.policy;
                send_out(u, &ctx.cfg, policy, sender, &ctx.stats, None, dest, payload);
            }
            TargetAddr::Domain(name, port) => {
                // A name that is invalid or denied by name is dropped before any lookup.
                if ctx
                    .policy
                    .check_name(
                        sender.user,
                        sender.client,
                        Command::Udp,
                        name.as_str(),
                        port,
                    )
                    .is_err()
                {
                    metrics::inc(&ctx.stats.udp_drops[UdpDrop::Rule as usize]);
                    continue;
                }
                if let Some((_, ip)) = u.cache.iter().find(|(n, _)| *n == name) {
                    let dest = SocketAddr::new(*ip, port);
                    let (policy, n) = (&ctx.policy, Some(name.as_str()));
                    send_out(u, &ctx.cfg, policy, sender, &ctx.stats, n, dest, payload);
                    continue;
                }
                if u.queued.len() >= MAX_QUEUED {
                    metrics::inc(&ctx.stats.udp_drops[UdpDrop::Unresolved as usize]);
                    continue;
                }
                let in_flight = u.queued.iter().find(|q| q.1 == name).map(|q| q.0);
                let tag = match in_flight {
                    Some(tag) => tag,
                    None => {
                        // Tags stay below the TCP connect tag (u32::MAX).
                        u.next_tag = (u.next_tag + 1) % (u32::MAX - 1);
                        metrics::inc(&ctx.stats.dns_lookups);
                        let _ = ctx.resolve_tx.send(Job {
                            key,
                            gen,
                            tag: u.next_tag,
                            work: Work::Resolve {
                                host: name.as_str().to_string(),
                                port,
                            },
                            reply: ctx.reply_to.clone(),
                        });
                        u.next_tag
                    }
                };
                u.queued.push((tag, name.clone(), port, payload.to_vec()));
            }
        }
    }
    // Targets -> client, from the relay socket, with the answering remote's address in the header.
    for i in 0..=PER_TURN {
        if !u.out_readable {
            break;
        }
        if i == PER_TURN {
            more = true;
            break;
        }
        let (n, from) = match u.out.recv_from(&mut buf[HEADROOM..]) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                u.out_readable = false;
                break;
            }
            Err(_) => continue,
        };
        let Some(port) = u.client_port else {
            // Nothing came from the client yet, so there is nowhere to send this.
            metrics::inc(&ctx.stats.udp_drops[UdpDrop::SendFailed as usize]);
            continue;
        };
        if limits.is_some_and(|l| !l.down.take_exact(ctx.now, n)) {
            metrics::inc(&ctx.stats.udp_drops[UdpDrop::Rate as usize]);
            continue;
        }
        if limits.is_some_and(|l| !l.quota.take_exact(n)) {
            ctx.limits.note_exhausted();
            return Next::Close(CloseReason::Quota);
        }
        let src = TargetAddr::Ip(SocketAddr::new(canonical_ip(from.ip()), from.port()));
        let mut head = [0u8; HEADROOM];
        let hl = socks5::encode_udp_header(&src, &mut head);
        let start = HEADROOM - hl;
        buf[start..HEADROOM].copy_from_slice(&head[..hl]);
        u.last_active = ctx.now;
        conn.bytes_down += n as u64;
        match u.relay.send_to(
            &buf[start..HEADROOM + n],
            SocketAddr::new(u.client_ip, port),
        ) {
            Ok(_) => {
                metrics::inc(&ctx.stats.udp_down);
                u.dgrams_down += 1;
            }
            Err(_) => metrics::inc(&ctx.stats.udp_drops[UdpDrop::SendFailed as usize]),
        }
    }
    if more {
        Next::Yield
    } else {
        Next::Wait
    }
}

/// A resolver answer for a datagram's domain target: cache it and send what was waiting.
pub fn on_resolved(
    _key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    tag: u32,
    r: io::Result<Vec<SocketAddr>>,
) -> Next {
    let sender = Sender {
        user: conn.user.as_ref().map(|u| u.user()),
        client: conn.peer.ip(),
    };
    let Phase::Udp(u) = &mut conn.phase else {
        return Next::Wait;
    };
    let Some(name) = u.queued.iter().find(|q| q.0 == tag).map(|q| q.1.clone()) else {
        return Next::Wait;
    };
    let waiting: Vec<(u32, Name, u16, Vec<u8>)> = {
        let (mine, rest): (Vec<_>, Vec<_>) = u.queued.drain(..).partition(|q| q.0 == tag);
        u.queued = rest;
        mine
    };
    let ip = match r {
        Ok(addrs) => addrs.first().map(|a| a.ip()),
        Err(_) => None,
    };
    let Some(ip) = ip else {
        metrics::inc(&ctx.stats.dns_failures);
        for _ in &waiting {
            metrics::inc(&ctx.stats.udp_drops[UdpDrop::Unresolved as usize]);
        }
        return Next::Wait;
    };
    if u.cache.len() >= CACHE_SIZE {
        u.cache.remove(0);
    }
    u.cache.push((name.clone(), ip));
    for (_, _, port, payload) in waiting {
        let dest = SocketAddr::new(ip, port);
        let (policy, n) = (&ctx.policy, Some(name.as_str()));
        send_out(u, &ctx.cfg, policy, sender, &ctx.stats, n, dest, &payload);
    }
    Next::Wait
}

/// Idle check: close after `--udp-idle-timeout` without datagrams, else re-arm.
pub fn on_idle_timer(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let Phase::Udp(u) = &conn.phase else {
        return Next::Wait;
    };
    let due = u.last_active + ctx.cfg.udp_idle_timeout;
    if due <= ctx.now {
        Next::Close(CloseReason::UdpIdleTimeout)
    } else {
        ctx.timers.push(due, key, conn.gen, TimerKind::UdpIdle);
        Next::Wait
    }
}

/// Frees the association's sockets (closing them when the state drops).
pub fn release(u: &mut UdpState, registry: &mio::Registry) {
    let _ = registry.deregister(&mut u.relay);
    let _ = registry.deregister(&mut u.out);
}
