//! One event loop per core: poll, dispatch, timers, commands. Phases live in their own modules.

/// The worker's modules, bottom layer first. A module may use only modules of lower layers (checked by
/// `tests/it/worker_layers.rs`), so the files read bottom-up and no phase calls another: phases return a [`Next`]
/// and this module's dispatcher routes it. `accept` is an `impl Worker` block, the dispatcher's own part.
pub const LAYERS: &[&[&str]] = &[
    &["token", "timers", "close"],
    &["sock"],
    &["phase"],
    &["ctx"],
    &["conn"],
    &["tls"],
    &["reply", "access", "gate"],
    &["relay", "upstream"],
    &["connect"],
    &["http", "udp", "bind"],
    &["handshake"],
    &["accept"],
];

pub mod accept;
pub mod access;
pub mod bind;
pub mod close;
pub mod conn;
pub mod connect;
pub mod ctx;
pub mod gate;
pub mod handshake;
pub mod http;
pub mod phase;
pub mod relay;
pub mod reply;
pub mod sock;
pub mod timers;
pub mod tls;
pub mod token;
pub mod udp;
pub mod upstream;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, trace};
use mio::{Events, Poll};
use slab::Slab;

use crate::buffer::BufferPool;
use crate::config::Config;
use crate::metrics::{self, Stats};
use crate::resolve::{Outcome, Reply, ReplyTo};

use close::{CloseReason, ResetSide};
use conn::{Conn, Handshake, Phase};
pub use ctx::{Channels, Command, Ctx, Next, ReplyKind, Shared, UserCounts};
use phase::Connected;
use timers::{TimerKind, Timers};
use token::{Role, Target};

/// A worker: one thread, one poll, one slab.
pub struct Worker {
    id: usize,
    poll: Poll,
    events: Events,
    conns: Slab<Conn>,
    ctx: Ctx,
    listeners: Vec<Option<crate::net::Listener>>,
    commands: Receiver<Command>,
    replies: Receiver<Reply>,
    open: Arc<AtomicUsize>,
    accept_paused: bool,
    /// Accept failed for lack of descriptors (warned once until an accept succeeds again).
    exhausted: bool,
    next_gen: u32,
    drain_deadline: Option<Instant>,
}

/// Cap on phase transitions per drive, so one connection cannot monopolize the loop.
const MAX_DRIVES: usize = 16;

/// Most slab entries reserved up front per worker (virtual memory: untouched pages cost no RSS).
const MAX_SLAB_RESERVE: usize = 65_536;

/// Slab entries to reserve: this worker's share of the connections the descriptor limit (two per tunnel) or
/// `--max-connections` allows, with a margin for an uneven SO_REUSEPORT spread. Growing a large slab by doubling
/// copies it into a fresh block and leaves the old one resident in the heap: at 8,192 connections that cost 3.5 MB,
/// more than the tunnels themselves (0.5 KiB each).
fn slab_capacity(cfg: &Config) -> usize {
    let by_fds = crate::sys::nofile_limit().map_or(1024, |n| (n / 2) as usize);
    let total = cfg.max_connections.map_or(by_fds, |m| m.min(by_fds));
    let share = total / cfg.threads.max(1);
    (share + share / 4).clamp(1024, MAX_SLAB_RESERVE)
}

impl Worker {
    /// Builds a worker around already-bound listeners.
    pub fn new(
        id: usize,
        poll: Poll,
        listeners: Vec<crate::net::Listener>,
        shared: &Shared,
        stats: Arc<Stats>,
        ch: Channels,
    ) -> io::Result<Worker> {
        let Channels {
            commands,
            replies,
            reply_tx,
            waker,
        } = ch;
        let cfg = Arc::clone(&shared.cfg);
        let mut listeners: Vec<Option<crate::net::Listener>> =
            listeners.into_iter().map(Some).collect();
        for (i, l) in listeners.iter_mut().enumerate() {
            if let Some(l) = l {
                l.register(poll.registry(), token::listener(i))?;
            }
        }
        let pool_limit = (256 * 1024 * 1024 / cfg.buffer_size).max(64);
        let ctx = Ctx {
            registry: poll.registry().try_clone()?,
            users: Arc::clone(&cfg.users),
            policy: Arc::clone(&cfg.policy),
            stats,
            // Free buffers beyond a small reserve go back to the allocator: a burst of handshakes must not pin
            // its peak memory for the life of the process.
            pool: BufferPool::new(cfg.buffer_size, pool_limit, 64),
            scratch: vec![0u8; cfg.buffer_size].into_boxed_slice(),
            timers: Timers::default(),
            now: Instant::now(),
            resolve_tx: shared.resolve_tx.clone(),
            quick: shared.quick.clone(),
            reply_to: ReplyTo {
                tx: reply_tx,
                waker,
            },
            pending: Vec::new(),
            draining: false,
            user_counts: Arc::clone(&shared.user_counts),
            limits: Arc::clone(&shared.limits),
            head_out: Vec::new(),
            udp: Default::default(),
            pipes: Vec::new(),
            cfg,
        };
        Ok(Worker {
            id,
            poll,
            events: Events::with_capacity(1024),
            conns: Slab::with_capacity(slab_capacity(&shared.cfg)),
            ctx,
            listeners,
            commands,
            replies,
            open: Arc::clone(&shared.open),
            accept_paused: false,
            exhausted: false,
            next_gen: 0,
            drain_deadline: None,
        })
    }

    /// Runs until stopped, or until drained.
    pub fn run(mut self) {
        debug!("worker {} running", self.id);
        loop {
            let timeout = if self.ctx.pending.is_empty() {
                self.ctx.timers.next_timeout(Instant::now())
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut self.events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("worker {}: poll failed: {e}", self.id);
                break;
            }
            self.ctx.now = Instant::now();
            let mut wake = false;
            let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
            for ev in events.iter() {
                match token::decode(ev.token()) {
                    Target::Waker => wake = true,
                    Target::Listener(i) => self.accept(i),
                    Target::Conn { key, role } => self.on_event(key, role, ev),
                    Target::Attempt { key, slot } => self.on_attempt_event(key, slot, ev),
                }
            }
            self.events = events;
            if wake {
                self.on_replies();
                if !self.on_commands() {
                    break;
                }
            }
            self.run_pending();
            self.run_timers();
            self.publish_gauges();
            if let Some(deadline) = self.drain_deadline {
                if self.conns.is_empty() {
                    break;
                }
                if self.ctx.now >= deadline {
                    info!(
                        "worker {}: drain deadline reached, closing {} connections",
                        self.id,
                        self.conns.len()
                    );
                    self.close_all(CloseReason::DrainTimeout);
                    break;
                }
            }
        }
        self.close_all(CloseReason::Shutdown);
        self.publish_gauges();
        debug!("worker {} stopped", self.id);
    }

    fn publish_gauges(&self) {
        metrics::set(&self.ctx.stats.pool_in_use, self.ctx.pool.in_use() as u64);
        metrics::set(&self.ctx.stats.slab_len, self.conns.len() as u64);
    }

    fn on_event(&mut self, key: usize, role: Role, ev: &mio::event::Event) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        trace!(
            "{}: event {role:?} in {}: readable={} writable={} closed={} error={}",
            conn.peer,
            conn.phase.name(),
            ev.is_readable(),
            ev.is_writable(),
            ev.is_read_closed() || ev.is_write_closed(),
            ev.is_error()
        );
        match role {
            Role::Client => conn.client.mark(ev),
            Role::Upstream => {
                if let Some(up) = conn.outbound_mut() {
                    up.mark(ev);
                } else if !connect::mark(conn, 0, ev) {
                    udp::mark(conn, role, ev);
                }
            }
            Role::Udp => udp::mark(conn, role, ev),
            Role::BindListener => bind::mark(conn, ev),
        }
        self.drive(key);
    }

    /// An event for an extra Happy Eyeballs connect attempt (slot 0 arrives as the plain upstream token).
    fn on_attempt_event(&mut self, key: usize, slot: usize, ev: &mio::event::Event) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if connect::mark(conn, slot, ev) {
            self.drive(key);
        }
    }

    /// Runs the connection's phase handlers until they have nothing more to do.
    fn drive(&mut self, key: usize) {
        for _ in 0..MAX_DRIVES {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            let next = step(key, conn, &mut self.ctx);
            match settle(key, conn, &mut self.ctx, next) {
                Next::Wait => return,
                Next::Again | Next::Connected(_) | Next::Failed(..) => continue,
                Next::Yield => break,
                Next::Close(reason) => {
                    self.close(key, reason);
                    return;
                }
            }
        }
        // Work remains: come back after everyone else has had a turn.
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.queued {
                conn.queued = true;
                self.ctx.pending.push(key);
                metrics::inc(&self.ctx.stats.loop_yields);
            }
        }
    }

    fn run_pending(&mut self) {
        if self.ctx.pending.is_empty() {
            return;
        }
        let keys = std::mem::take(&mut self.ctx.pending);
        for key in keys {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.queued = false;
                self.drive(key);
            }
        }
    }

    fn on_replies(&mut self) {
        loop {
            match self.replies.try_recv() {
                Ok(reply) => {
                    let Some(conn) = self.conns.get_mut(reply.key) else {
                        continue;
                    };
                    if conn.gen != reply.gen {
                        continue;
                    }
                    let next = match reply.outcome {
                        Outcome::Verified(v) => {
                            handshake::on_verified(reply.key, conn, &mut self.ctx, v)
                        }
                        Outcome::Resolved(r) if connect::is_connect_tag(reply.tag) => {
                            connect::on_resolved(reply.key, conn, &mut self.ctx, reply.tag, r)
                        }
                        Outcome::Early(a) => {
                            connect::on_early(reply.key, conn, &mut self.ctx, reply.tag, a)
                        }
                        Outcome::Resolved(r) => {
                            udp::on_resolved(reply.key, conn, &mut self.ctx, reply.tag, r)
                        }
                    };
                    self.after(reply.key, next);
                }
                Err(_) => return,
            }
        }
    }

    fn after(&mut self, key: usize, next: Next) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match settle(key, conn, &mut self.ctx, next) {
            Next::Wait => {}
            Next::Close(reason) => self.close(key, reason),
            Next::Again | Next::Yield | Next::Connected(_) | Next::Failed(..) => self.drive(key),
        }
    }

    /// Returns false when the worker must exit now.
    fn on_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::ReloadUsers(users)) => {
                    self.ctx.users = users;
                    debug!("worker {}: users reloaded", self.id);
                }
                Ok(Command::ReloadPolicy(users, policy)) => {
                    // Sessions that authenticated with credentials that are no longer valid end now.
                    let old = Arc::clone(&self.ctx.users);
                    let revoked: Vec<usize> = self
                        .conns
                        .iter()
                        .filter(|(_, c)| {
                            c.user
                                .as_ref()
                                .is_some_and(|u| !users.same_secret(&old, u.user()))
                        })
                        .map(|(k, _)| k)
                        .collect();
                    for key in revoked {
                        self.close(key, CloseReason::Revoked);
                    }
                    // Lowered (or raised) rates reach running sessions at once: they hold the shared buckets.
                    self.ctx.limits.apply(&policy);
                    self.ctx.users = users;
                    self.ctx.policy = policy;
                    // Sessions admitted without limits get them if the reload gave their user a rate or quota.
                    for (_, c) in self.conns.iter_mut() {
                        conn::attach_limits(c, &self.ctx);
                    }
                    // A quota lowered below what was used ends her running sessions.
                    self.quota_sweep();
                    debug!("worker {}: users and policy reloaded", self.id);
                }
                Ok(Command::QuotaSweep) => self.quota_sweep(),
                Ok(Command::Drain(deadline)) => self.start_drain(deadline, false),
                Ok(Command::Handover(deadline)) => self.start_drain(deadline, true),
                Ok(Command::Barrier(done)) => {
                    let _ = done.send(());
                }
                Ok(Command::Stop) | Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    /// Closes every session whose user's quota is used up.
    fn quota_sweep(&mut self) {
        let over: Vec<usize> = self
            .conns
            .iter()
            // A session already answering (a refusal lingering) keeps its reply; the others end.
            .filter(|(_, c)| !matches!(c.phase, Phase::Linger { .. } | Phase::Closing))
            .filter(|(_, c)| conn::quota_exhausted(c))
            .map(|(k, _)| k)
            .collect();
        for key in over {
            self.close(key, CloseReason::Quota);
        }
    }

    fn start_drain(&mut self, deadline: Instant, handover: bool) {
        if self.drain_deadline.is_some() {
            return;
        }
        if handover {
            // Once out of our epoll set, new connections wake only the new process; but one that arrived before
            // and woke only us (EPOLLEXCLUSIVE picks one waiter) would sit in the queue unnoticed: take what is
            // queued now and serve it here.
            for l in self.listeners.iter_mut().flatten() {
                let _ = l.deregister(self.poll.registry());
            }
            for i in 0..self.listeners.len() {
                self.accept(i);
            }
            self.listeners.clear();
        }
        self.drain_deadline = Some(deadline);
        self.ctx.draining = true;
        // Idle tunnels raise no events: without this entry nothing would wake the loop at the deadline.
        self.ctx.timers.arm_worker(deadline, TimerKind::Drain);
        for l in self.listeners.iter_mut() {
            if let Some(mut l) = l.take() {
                let _ = l.deregister(self.poll.registry());
            }
        }
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                if handover {
                    matches!(c.phase, Phase::Http(_)) && !http::busy(c)
                } else {
                    !matches!(c.phase, Phase::Relay(_) | Phase::Udp(_) | Phase::Bind(_))
                        && !http::busy(c)
                }
            })
            .map(|(k, _)| k)
            .collect();
        for key in idle {
            self.close(key, CloseReason::Draining);
        }
        info!("worker {}: draining {} sessions", self.id, self.conns.len());
    }

    fn run_timers(&mut self) {
        let now = self.ctx.now;
        while let Some((key, gen, kind)) = self.ctx.timers.pop_due(now) {
            match kind {
                TimerKind::AcceptRetry => {
                    self.resume_accept();
                    continue;
                }
                TimerKind::Drain => continue,
                _ => {}
            }
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.gen != gen {
                continue;
            }
            let next = match kind {
                TimerKind::Handshake => match &conn.phase {
                    Phase::Handshake {
                        step: Handshake::HttpHead,
                        deadline,
                    } if *deadline <= now => {
                        // An HTTP client that stopped in the middle of its request head is told so (as Squid and
                        // HAProxy do); SOCKS has no reply for it (RFC 1928) and is closed silently.
                        debug!("{}: request head timeout", conn.peer);
                        reply::fail(
                            conn,
                            &mut self.ctx,
                            ReplyKind::HttpForward,
                            CloseReason::HandshakeTimeout,
                        )
                    }
                    Phase::Handshake { deadline, .. } if *deadline <= now => {
                        debug!("{}: handshake timeout in {}", conn.peer, conn.phase.name());
                        metrics::inc(&self.ctx.stats.handshakes_failed[conn.proto as usize]);
                        Next::Close(CloseReason::HandshakeTimeout)
                    }
                    _ => Next::Wait,
                },
                TimerKind::Connect | TimerKind::Attempt
                    if matches!(conn.phase, Phase::Upstream(_)) =>
                {
                    upstream::on_timer(key, conn, &mut self.ctx)
                }
                TimerKind::Connect | TimerKind::Attempt => {
                    connect::on_timer(key, conn, &mut self.ctx)
                }
                TimerKind::Idle => relay::on_idle_timer(key, conn, &mut self.ctx),
                TimerKind::Linger => match conn.phase {
                    Phase::Linger { reason, .. } => Next::Close(reason),
                    _ => Next::Wait,
                },
                TimerKind::Bind | TimerKind::BindRetry => bind::on_timeout(conn, &mut self.ctx),
                TimerKind::UdpIdle => udp::on_idle_timer(key, conn, &mut self.ctx),
                TimerKind::Throttle => relay::on_throttle_timer(conn),
                TimerKind::AcceptRetry | TimerKind::Drain => Next::Wait,
            };
            self.after(key, next);
        }
    }

    fn close_all(&mut self, reason: CloseReason) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, reason);
        }
    }

    /// The one way a connection ends: deregister, return buffers, fix gauges, write the access-log line.
    fn close(&mut self, key: usize, reason: CloseReason) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        // Its deadlines go with it: the timers hold entries for live connections only.
        self.ctx.timers.cancel(key);
        // The client and upstream sockets are not deregistered: they were never dup'd, so closing them (when
        // `conn` drops below) removes them from the epoll set, and two epoll_ctl calls per connection are saved.
        let abort = match reason.reset() {
            Some(ResetSide::Client) => Some(&conn.client.stream),
            Some(ResetSide::Outbound) => conn.outbound().map(|u| &u.stream),
            None => None,
        };
        if let Some(s) = abort {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
        let registry = self.poll.registry();
        match &mut conn.phase {
            Phase::Udp(u) => udp::release(u, registry),
            Phase::Bind(b) => bind::release(b, registry),
            Phase::Relay(t) => {
                for b in [t.up.parked.take(), t.down.parked.take()]
                    .into_iter()
                    .flatten()
                {
                    self.ctx.pool.give(b);
                }
            }
            Phase::Http(st) => {
                for b in [st.from_client.take(), st.from_origin.take()]
                    .into_iter()
                    .flatten()
                {
                    self.ctx.pool.give(b);
                }
            }
            _ => {}
        }
        if let Some(b) = conn.c2u.take() {
            self.ctx.pool.give(b);
        }
        metrics::dec(&self.ctx.stats.active[conn.proto as usize]);
        self.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(l) = conn.limits.take() {
            // The relay counts its bytes as it goes; forwarded HTTP and UDP sessions are counted when they end.
            if !matches!(conn.phase, Phase::Relay(_)) {
                l.bytes_up.fetch_add(conn.bytes_up, Ordering::Relaxed);
                l.bytes_down.fetch_add(conn.bytes_down, Ordering::Relaxed);
            }
            self.ctx.limits.release(&conn::session_key(&conn), l);
        }
        if conn.user_counted {
            let key = conn::session_key(&conn);
            if let Ok(mut counts) = self.ctx.user_counts.lock() {
                if let Some(n) = counts.get_mut(&key) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        counts.remove(&key);
                    }
                }
            }
        }
        tls::on_close(&mut conn, reason, &self.ctx.stats);
        let fault = reason.fault();
        log::log!(
            fault.level(),
            "{}: {} session ended: {} (fault: {})",
            conn.peer,
            conn.proto.label(),
            reason.label(),
            fault.label()
        );
        if let Some(req) = conn.request.take() {
            access::request_line(&conn, &req, reason, self.ctx.now);
        } else if !conn.request_lines {
            let target = match &conn.phase {
                Phase::Udp(u) => udp::summary(u),
                _ => conn
                    .target
                    .as_ref()
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "-".to_string()),
            };
            access::session_line(&conn, &target, reason, self.ctx.now);
        }
        drop(conn);
        if self.conns.is_empty() {
            // Idle pipes cost two descriptors each: a worker with no connections keeps none.
            self.ctx.pipes.clear();
        }
        if self.accept_paused {
            self.resume_accept();
        }
    }
}

/// Routes the outcomes a phase cannot act on itself: the path to the target is up, or could not be made. The
/// connect path knows nothing of who asked; forwarded HTTP goes back to `http`, everything else gets its reply.
fn settle(key: usize, conn: &mut Conn, ctx: &mut Ctx, next: Next) -> Next {
    match next {
        Next::Connected(Connected::Forward(st, pending, origin)) => {
            http::on_origin_connected(key, conn, ctx, st, pending, origin)
        }
        Next::Connected(Connected::Reply(kind, outbound, early)) => {
            connect::established(key, conn, ctx, kind, (outbound, early))
        }
        Next::Failed(ReplyKind::HttpForward, reason) => http::on_origin_failed(conn, ctx, reason),
        Next::Failed(kind, reason) => reply::fail(conn, ctx, kind, reason),
        other => other,
    }
}

/// One step of a connection's current phase.
fn step(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    match conn.phase {
        Phase::Handshake {
            step: Handshake::Verifying(_),
            ..
        }
        | Phase::Resolving { .. } => Next::Wait,
        Phase::Handshake { .. } => handshake::drive(key, conn, ctx),
        Phase::Connecting { .. } => connect::drive(key, conn, ctx),
        Phase::Upstream(_) => upstream::drive(key, conn, ctx),
        Phase::Relay(_) => relay::drive(key, conn, ctx),
        Phase::Closing => Next::Close(CloseReason::Internal),
        Phase::Http(_) => http::drive(key, conn, ctx),
        Phase::Udp(_) => udp::drive(key, conn, ctx),
        Phase::Bind(_) => bind::drive(key, conn, ctx),
        Phase::Linger { .. } => reply::linger(key, conn, ctx),
    }
}
