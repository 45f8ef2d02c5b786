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
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;

use log::debug;
use mio::net::UdpSocket;
use mio::Interest;

use super::close::CloseReason;
use super::conn::{Conn, Phase, Source};
use super::ctx::{Ctx, Next, ReplyKind, UdpArena};
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
use crate::sys::{self, Outgoing, Received};

/// Room kept in front of a received answer for the SOCKS5 UDP header.
const HEADROOM: usize = socks5::MAX_UDP_HEADER_LEN;
/// One arena slot: the largest UDP payload plus headroom, so no datagram is ever cut.
const SLOT: usize = HEADROOM + 65536;
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

/// Answers the UDP ASSOCIATE request with `failure` and ends the control connection.
fn refuse(conn: &mut Conn, ctx: &mut Ctx, failure: Failure) -> Next {
    reply::fail(conn, ctx, ReplyKind::Socks5, CloseReason::Failed(failure))
}

/// Starts an association for a UDP ASSOCIATE request whose DST names the client's sending address (`hint`).
pub fn start(key: usize, conn: &mut Conn, ctx: &mut Ctx, hint: TargetAddr) -> Next {
    if ctx.cfg.upstream.is_some() {
        // Relaying UDP through an upstream proxy is not supported: say so with the protocol's own code.
        return refuse(conn, ctx, Failure::CommandNotSupported);
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
        return refuse(conn, ctx, Failure::General);
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
            return refuse(conn, ctx, Failure::General);
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
        return refuse(conn, ctx, Failure::General);
    };
    let advertised = SocketAddr::new(ctx.cfg.udp_advertise.unwrap_or(bound.ip()), bound.port());
    debug!("{}: UDP relay on {advertised}", conn.peer);
    if reply::granted(conn, ReplyKind::Socks5, advertised).is_err() {
        let _ = ctx.registry.deregister(&mut relay);
        let _ = ctx.registry.deregister(&mut out);
        return Next::Close(CloseReason::ClientError);
    }
    metrics::inc(&ctx.stats.handshakes_ok[conn.proto as usize]);
    if ctx.udp.gso.is_none() {
        ctx.udp.gso = Some(sys::udp_gso_supported(out.as_raw_fd()));
    }
    if let Some(b) = conn.c2u.take() {
        ctx.pool.give(b);
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
    ctx.timers.arm(
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

/// Whether a datagram for `dest` may leave, after the destination rules (checked per datagram): the flags first,
/// then the policy file's rules (with the name the datagram named, if any). Returns the address to send to on the
/// outbound socket; a refusal is counted.
fn admit_out(
    u: &UdpState,
    cfg: &Config,
    policy: &Policy,
    from: Sender<'_>,
    stats: &Stats,
    name: Option<&str>,
    dest: SocketAddr,
) -> Option<SocketAddr> {
    let dest = SocketAddr::new(canonical_ip(dest.ip()), dest.port());
    if cfg.dest_rules.check(dest).is_err() {
        metrics::inc(&stats.udp_drops[UdpDrop::Denied as usize]);
        return None;
    }
    if !policy.allows_addr(from.user, from.client, Command::Udp, name, dest) {
        metrics::inc(&stats.udp_drops[UdpDrop::Rule as usize]);
        return None;
    }
    Some(match (dest.ip(), u.out_dual) {
        (IpAddr::V4(v4), true) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), dest.port()),
        _ => dest,
    })
}

/// Hands `msgs` to `send` (one `sendmmsg` per call, which takes a prefix of what it is given) until every one
/// was sent or dropped, in order. Returns (sent, dropped).
///
/// A partial send means the first one not taken failed: the next call starts there and learns its error. An
/// error that belongs to one datagram (too big, unreachable, refused by a firewall) drops that one and the rest
/// go on. A full socket buffer (`WouldBlock`) drops the rest of the batch, as a router drops on a full queue:
/// waiting would mean holding the arena for one association, and retrying at once would spin.
fn send_in_order(
    msgs: &[Outgoing],
    mut send: impl FnMut(&[Outgoing]) -> io::Result<usize>,
) -> (usize, usize) {
    let (mut i, mut sent, mut dropped) = (0, 0, 0);
    while i < msgs.len() {
        match send(&msgs[i..]) {
            Ok(n) if n > 0 => {
                let n = n.min(msgs.len() - i);
                sent += n;
                i += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                dropped += msgs.len() - i;
                break;
            }
            // Ok(0) cannot happen for a non-empty batch; treating it as an error of the first keeps the loop
            // moving whatever the kernel says.
            Ok(_) | Err(_) => {
                dropped += 1;
                i += 1;
            }
        }
    }
    (sent, dropped)
}

/// Sends what the arena holds in `out` from `sock`, counts it, and empties the list. Returns how many were sent.
fn flush(sock: &UdpSocket, arena: &mut UdpArena, stats: &Stats, sent_counter: &AtomicU64) -> u64 {
    if arena.out.is_empty() {
        return 0;
    }
    let fd = sock.as_raw_fd();
    let (buf, gso) = (&arena.buf, arena.gso == Some(true));
    let (sent, dropped) = send_in_order(&arena.out, |m| sys::send_batch(fd, buf, m, gso));
    arena.out.clear();
    metrics::add(sent_counter, sent as u64);
    metrics::add(
        &stats.udp_drops[UdpDrop::SendFailed as usize],
        dropped as u64,
    );
    sent as u64
}

/// Makes sure the worker's arena is allocated (first association on this worker).
fn ensure_arena(a: &mut UdpArena) {
    if a.buf.len() < sys::MAX_BATCH * SLOT {
        // Zeroed allocation: the allocator maps fresh pages, which stay unbacked until a datagram lands there.
        a.buf = vec![0u8; sys::MAX_BATCH * SLOT];
    }
    let empty = Received {
        len: 0,
        from: None,
        truncated: false,
    };
    a.got.resize(sys::MAX_BATCH, empty);
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
    let from = Sender {
        user: conn.user.as_ref().map(|u| u.user()),
        client: conn.peer.ip(),
    };
    let Phase::Udp(u) = &mut conn.phase else {
        return Next::Wait;
    };
    let mut io = Pump {
        key,
        gen: conn.gen,
        from,
        limits: conn.limits.as_deref(),
        bytes_up: &mut conn.bytes_up,
        bytes_down: &mut conn.bytes_down,
        quota_hit: false,
    };
    // The arena is lent to this association for the turn (a move of three vectors, no copy of their contents).
    let mut arena = std::mem::take(&mut ctx.udp);
    ensure_arena(&mut arena);
    // One batch each way in turn, so while one direction is handled the other's queue fills: the batches, and
    // with them the GSO messages, grow instead of each socket being drained a few datagrams at a time.
    let (mut up, mut down) = (0, 0);
    let more = loop {
        let up_left = u.relay_readable && up < PER_TURN;
        let down_left = u.out_readable && down < PER_TURN;
        if !up_left && !down_left {
            break u.relay_readable || u.out_readable;
        }
        if up_left {
            up += io.up(u, &mut arena, ctx);
        }
        if down_left && !io.quota_hit {
            down += io.down(u, &mut arena, ctx);
        }
        if io.quota_hit {
            // The datagrams admitted before the one that did not fit have gone out; the association ends (and the
            // control thread ends her other sessions).
            ctx.udp = arena;
            ctx.limits.note_exhausted();
            return Next::Close(CloseReason::Quota);
        }
    };
    ctx.udp = arena;
    if more {
        Next::Yield
    } else {
        Next::Wait
    }
}

/// What a turn of [`drive`] needs from the connection besides the association.
struct Pump<'a> {
    key: usize,
    gen: u32,
    from: Sender<'a>,
    // A datagram is all or nothing: one over the user's rate is dropped, as a router would.
    limits: Option<&'a crate::policy::UserLimits>,
    bytes_up: &'a mut u64,
    bytes_down: &'a mut u64,
    /// A datagram no longer fit the user's quota: the batch stopped there.
    quota_hit: bool,
}

impl Pump<'_> {
    /// Client -> targets, one batch: every datagram is checked, then the admitted ones leave in one sendmmsg, in
    /// arrival order. Returns how much of the turn's budget it used.
    fn up(&mut self, u: &mut UdpState, arena: &mut UdpArena, ctx: &Ctx) -> usize {
        let fd = u.relay.as_raw_fd();
        let got = match sys::recv_batch(fd, &mut arena.buf, SLOT, 0, &mut arena.got) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                u.relay_readable = false;
                return 0;
            }
            // An error the socket had queued (it is consumed by reporting it): read on, within the turn's budget.
            Err(_) => return 1,
        };
        let sender = self.from;
        for i in 0..got {
            let r = arena.got[i];
            let base = i * SLOT;
            let from = match r.from {
                Some(f)
                    if canonical_ip(f.ip()) == u.client_ip
                        && u.client_port.is_none_or(|p| p == f.port()) =>
                {
                    f
                }
                _ => {
                    metrics::inc(&ctx.stats.udp_drops[UdpDrop::ForeignSource as usize]);
                    continue;
                }
            };
            u.client_port.get_or_insert(from.port());
            if r.truncated {
                metrics::inc(&ctx.stats.udp_drops[UdpDrop::Malformed as usize]);
                continue;
            }
            let dgram = &arena.buf[base..base + r.len];
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
            if self
                .limits
                .is_some_and(|l| !l.up.take_exact(ctx.now, payload.len()))
            {
                metrics::inc(&ctx.stats.udp_drops[UdpDrop::Rate as usize]);
                continue;
            }
            if self
                .limits
                .is_some_and(|l| !l.quota.take_exact(payload.len()))
            {
                self.quota_hit = true;
                break;
            }
            count_dest(u, &header.target);
            u.last_active = ctx.now;
            *self.bytes_up += payload.len() as u64;
            let (start, end) = (base + off, base + r.len);
            let (cfg, policy, stats) = (&ctx.cfg, &ctx.policy, &ctx.stats);
            match header.target {
                TargetAddr::Ip(dest) => {
                    if let Some(to) = admit_out(u, cfg, policy, sender, stats, None, dest) {
                        arena.out.push(Outgoing { start, end, to });
                    }
                }
                TargetAddr::Domain(name, port) => {
                    // A name that is invalid or denied by name is dropped before any lookup.
                    let (user, client) = (sender.user, sender.client);
                    if policy
                        .check_name(user, client, Command::Udp, name.as_str(), port)
                        .is_err()
                    {
                        metrics::inc(&stats.udp_drops[UdpDrop::Rule as usize]);
                        continue;
                    }
                    if let Some((_, ip)) = u.cache.iter().find(|(n, _)| *n == name) {
                        let dest = SocketAddr::new(*ip, port);
                        let n = Some(name.as_str());
                        if let Some(to) = admit_out(u, cfg, policy, sender, stats, n, dest) {
                            arena.out.push(Outgoing { start, end, to });
                        }
                        continue;
                    }
                    if u.queued.len() >= MAX_QUEUED {
                        metrics::inc(&stats.udp_drops[UdpDrop::Unresolved as usize]);
                        continue;
                    }
                    let in_flight = u.queued.iter().find(|q| q.1 == name).map(|q| q.0);
                    let tag = match in_flight {
                        Some(tag) => tag,
                        None => {
                            // Tags stay below the TCP connect tags.
                            u.next_tag = (u.next_tag + 1) % super::phase::CONNECT_TAGS;
                            metrics::inc(&stats.dns_lookups);
                            let _ = ctx.resolve_tx.send(Job {
                                key: self.key,
                                gen: self.gen,
                                tag: u.next_tag,
                                work: Work::Resolve {
                                    host: name.as_str().to_string(),
                                    port,
                                    early: false,
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
        u.dgrams_up += flush(&u.out, arena, &ctx.stats, &ctx.stats.udp_up);
        got.max(1)
    }

    /// Targets -> client, one batch, with the answering remote's address in the header: each datagram is received
    /// behind HEADROOM bytes of its slot, so the header is written in front of it in place. Returns how much of the
    /// turn's budget it used.
    fn down(&mut self, u: &mut UdpState, arena: &mut UdpArena, ctx: &Ctx) -> usize {
        let fd = u.out.as_raw_fd();
        let got = match sys::recv_batch(fd, &mut arena.buf, SLOT, HEADROOM, &mut arena.got) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                u.out_readable = false;
                return 0;
            }
            Err(_) => return 1,
        };
        for i in 0..got {
            let r = arena.got[i];
            let base = i * SLOT;
            let (Some(port), Some(from)) = (u.client_port, r.from) else {
                // Nothing came from the client yet, so there is nowhere to send this.
                metrics::inc(&ctx.stats.udp_drops[UdpDrop::SendFailed as usize]);
                continue;
            };
            if r.truncated {
                metrics::inc(&ctx.stats.udp_drops[UdpDrop::Malformed as usize]);
                continue;
            }
            let n = r.len;
            if self.limits.is_some_and(|l| !l.down.take_exact(ctx.now, n)) {
                metrics::inc(&ctx.stats.udp_drops[UdpDrop::Rate as usize]);
                continue;
            }
            if self.limits.is_some_and(|l| !l.quota.take_exact(n)) {
                self.quota_hit = true;
                break;
            }
            let src = TargetAddr::Ip(SocketAddr::new(canonical_ip(from.ip()), from.port()));
            let mut head = [0u8; HEADROOM];
            let hl = socks5::encode_udp_header(&src, &mut head);
            let start = base + HEADROOM - hl;
            arena.buf[start..base + HEADROOM].copy_from_slice(&head[..hl]);
            u.last_active = ctx.now;
            *self.bytes_down += n as u64;
            arena.out.push(Outgoing {
                start,
                end: base + HEADROOM + n,
                to: SocketAddr::new(u.client_ip, port),
            });
        }
        u.dgrams_down += flush(&u.relay, arena, &ctx.stats, &ctx.stats.udp_down);
        got.max(1)
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
        Ok(addrs) => udp_address(&addrs, u.out_dual, &u.out),
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
        let Some(to) = admit_out(u, &ctx.cfg, policy, sender, &ctx.stats, n, dest) else {
            continue;
        };
        match u.out.send_to(&payload, to) {
            Ok(_) => {
                metrics::inc(&ctx.stats.udp_up);
                u.dgrams_up += 1;
            }
            Err(_) => metrics::inc(&ctx.stats.udp_drops[UdpDrop::SendFailed as usize]),
        }
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
        ctx.timers.arm(due, key, conn.gen, TimerKind::UdpIdle);
        Next::Wait
    }
}

/// The address a name's datagrams go to: one the outbound socket can send to, IPv4 first. A datagram has no
/// Happy Eyeballs to fall back with, and IPv4 is the family a host can reach most often (the resolver's own
/// order, IPv6 first, is for TCP connects, which try the next address).
fn udp_address(addrs: &[SocketAddr], dual: bool, out: &UdpSocket) -> Option<IpAddr> {
    let out_v4 = out.local_addr().is_ok_and(|a| a.is_ipv4());
    let usable = |a: &&SocketAddr| dual || a.is_ipv4() == out_v4;
    addrs
        .iter()
        .filter(usable)
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.iter().find(usable))
        .map(|a| a.ip())
}

/// Frees the association's sockets (closing them when the state drops).
pub fn release(u: &mut UdpState, registry: &mio::Registry) {
    let _ = registry.deregister(&mut u.relay);
    let _ = registry.deregister(&mut u.out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_s_datagrams_go_to_an_address_the_socket_can_reach_ipv4_first() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let both = [a("[::1]:53"), a("127.0.0.1:53")];
        let v4 = UdpSocket::bind(a("127.0.0.1:0")).unwrap();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // The resolver puts IPv6 first; a datagram goes to IPv4 all the same.
        assert_eq!(udp_address(&both, true, &v4), ip("127.0.0.1"));
        assert_eq!(udp_address(&both, false, &v4), ip("127.0.0.1"));
        assert_eq!(udp_address(&both[..1], true, &v4), ip("::1"));
        assert_eq!(
            udp_address(&both[..1], false, &v4),
            None,
            "an IPv4 socket cannot send to IPv6"
        );
        if let Ok(v6) = UdpSocket::bind(a("[::1]:0")) {
            assert_eq!(udp_address(&both, false, &v6), ip("::1"));
        }
    }

    fn msgs(n: usize) -> Vec<Outgoing> {
        let to = SocketAddr::from(([127, 0, 0, 1], 9));
        (0..n)
            .map(|i| Outgoing {
                start: i * 10,
                end: i * 10 + 5,
                to,
            })
            .collect()
    }

    /// A fake sendmmsg: takes at most `cap` per call, fails the datagrams listed in `bad` (when they come first)
    /// and records the order in which datagrams left.
    fn fake<'a>(
        all: &'a [Outgoing],
        cap: usize,
        bad: &'a [usize],
        sent: &'a mut Vec<usize>,
        calls: &'a mut usize,
    ) -> impl FnMut(&[Outgoing]) -> io::Result<usize> + 'a {
        move |m: &[Outgoing]| {
            *calls += 1;
            assert!(*calls < 1000, "send_in_order spins");
            let first = all.iter().position(|x| x.start == m[0].start).unwrap();
            let mut n = 0;
            for i in first..all.len().min(first + cap) {
                if bad.contains(&i) {
                    break;
                }
                sent.push(i);
                n += 1;
            }
            if n == 0 {
                return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
            }
            Ok(n)
        }
    }

    #[test]
    fn partial_sends_resume_where_the_kernel_stopped() {
        let all = msgs(10);
        let (mut sent, mut calls) = (Vec::new(), 0);
        let r = send_in_order(&all, fake(&all, 3, &[], &mut sent, &mut calls));
        assert_eq!(r, (10, 0));
        assert_eq!(sent, (0..10).collect::<Vec<_>>());
        assert_eq!(calls, 4);
    }

    #[test]
    fn a_failing_datagram_is_dropped_alone_and_order_kept() {
        let all = msgs(8);
        let (mut sent, mut calls) = (Vec::new(), 0);
        let r = send_in_order(&all, fake(&all, 32, &[0, 3, 4, 7], &mut sent, &mut calls));
        assert_eq!(r, (4, 4));
        assert_eq!(sent, vec![1, 2, 5, 6]);
    }

    #[test]
    fn a_full_socket_drops_the_rest_without_spinning() {
        let all = msgs(6);
        let mut calls = 0;
        let mut first = true;
        let r = send_in_order(&all, |m| {
            calls += 1;
            if first {
                first = false;
                return Ok(2.min(m.len()));
            }
            Err(io::Error::from(io::ErrorKind::WouldBlock))
        });
        assert_eq!(r, (2, 4));
        assert_eq!(calls, 2);
    }

    #[test]
    fn zero_taken_still_advances() {
        let all = msgs(3);
        let mut calls = 0;
        let r = send_in_order(&all, |_| {
            calls += 1;
            Ok(0)
        });
        assert_eq!(r, (0, 3));
        assert_eq!(calls, 3);
    }

    /// Sends `sizes.len()` datagrams of these sizes (distinct contents) from one socket to another through
    /// send_batch, receives them through recv_batch, each in its own slot behind an offset, and checks that every
    /// one arrived alone, whole, in order, with its sender.
    fn round_trip(sizes: &[usize], gso: bool) {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_nonblocking(true).unwrap();
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut src = Vec::new();
        let mut out = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let start = src.len();
            src.extend((0..len).map(|j| (i * 31 + j) as u8));
            out.push(Outgoing {
                start,
                end: src.len(),
                to: b_addr,
            });
        }
        let (slot, off) = (4096, 40);
        let mut buf = vec![0u8; sys::MAX_BATCH * slot];
        let empty = Received {
            len: 0,
            from: None,
            truncated: false,
        };
        let mut got = vec![empty; sys::MAX_BATCH];
        let mut next = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // In chunks, so the receiver's default buffer never overflows.
        for (c, chunk) in out.chunks(24).enumerate() {
            let (sent, dropped) =
                send_in_order(chunk, |m| sys::send_batch(a.as_raw_fd(), &src, m, gso));
            assert_eq!((sent, dropped), (chunk.len(), 0));
            let end = c * 24 + chunk.len();
            while next < end {
                assert!(std::time::Instant::now() < deadline, "datagrams missing");
                let n = match sys::recv_batch(b.as_raw_fd(), &mut buf, slot, off, &mut got) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::yield_now();
                        continue;
                    }
                    Err(e) => panic!("recv_batch: {e}"),
                };
                for (i, r) in got.iter().take(n).enumerate() {
                    let want = &src[out[next].start..out[next].end];
                    assert_eq!(r.from, Some(a_addr));
                    assert!(!r.truncated);
                    assert_eq!(r.len, want.len(), "datagram {next} (gso {gso})");
                    let have = &buf[i * slot + off..i * slot + off + r.len];
                    assert_eq!(have, want, "datagram {next}");
                    next += 1;
                }
            }
        }
        assert!(matches!(
            sys::recv_batch(b.as_raw_fd(), &mut buf, slot, off, &mut got),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        ));
    }

    /// Runs of equal sizes (GSO groups, some cut by a shorter last one), singles, an empty datagram, datagrams
    /// too big to be segments, and more than one batch.
    fn mixed_sizes() -> Vec<usize> {
        let mut v = Vec::new();
        for run in 0..12 {
            let len = [100, 1452, 1453, 7, 0, 3000, 64][run % 7];
            v.extend(std::iter::repeat_n(len, run % 5 + 1));
            if run % 3 == 0 {
                v.push(len / 2);
            }
        }
        v.extend(std::iter::repeat_n(74, 70));
        v
    }

    #[test]
    fn batches_round_trip_through_real_sockets_in_order() {
        round_trip(&mixed_sizes(), false);
    }

    #[test]
    fn gso_batches_arrive_as_the_same_datagrams() {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        if !sys::udp_gso_supported(probe.as_raw_fd()) {
            eprintln!("no UDP GSO in this kernel: skipped");
            return;
        }
        round_trip(&mixed_sizes(), true);
    }

    #[test]
    fn a_refused_gso_message_falls_back_to_single_datagrams() {
        // Broadcast without SO_BROADCAST is refused before anything leaves, whether grouped or not: the group is
        // retried one by one, each is dropped alone, and the datagrams behind it still leave, in order.
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let gso = sys::udp_gso_supported(a.as_raw_fd());
        let bcast = SocketAddr::from(([255, 255, 255, 255], 9));
        let src: Vec<u8> = (0..50).collect();
        let mut out: Vec<Outgoing> = (0..3)
            .map(|i| Outgoing {
                start: i * 10,
                end: i * 10 + 10,
                to: bcast,
            })
            .collect();
        for i in 3..5 {
            out.push(Outgoing {
                start: i * 10,
                end: i * 10 + 10,
                to: b.local_addr().unwrap(),
            });
        }
        let r = send_in_order(&out, |m| sys::send_batch(a.as_raw_fd(), &src, m, gso));
        assert_eq!(r, (2, 3));
        let mut buf = [0u8; 64];
        for i in 3..5 {
            let (n, _) = b.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &src[i * 10..i * 10 + 10]);
        }
    }

    #[test]
    fn recv_batch_reports_truncation() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        a.send_to(&[7u8; 100], b.local_addr().unwrap()).unwrap();
        // Blocking socket: the datagram is there before recvmmsg returns.
        let mut buf = vec![0u8; 64];
        let mut got = vec![
            Received {
                len: 0,
                from: None,
                truncated: false
            };
            1
        ];
        let n = sys::recv_batch(b.as_raw_fd(), &mut buf, 64, 32, &mut got).unwrap();
        assert_eq!(n, 1);
        assert!(got[0].truncated);
        assert_eq!(&buf[32..64], &[7u8; 32]);
        assert!(sys::recv_batch(b.as_raw_fd(), &mut buf, 64, 64, &mut got).is_err());
        let bad = [Outgoing {
            start: 60,
            end: 65,
            to: b.local_addr().unwrap(),
        }];
        assert!(sys::send_batch(a.as_raw_fd(), &buf, &bad, false).is_err());
    }
}
