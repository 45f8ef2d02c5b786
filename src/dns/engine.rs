//! The resolver thread: one mio poll loop that owns every query socket, drives the [`Lookup`] machines, fills the
//! shared cache and answers the workers. Concurrent lookups of one name share one [`Lookup`] (coalescing).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::conf::{ResolvConf, Watch};
use super::lookup::{Lookup, Outcome, Send, Servers, Transport, SLOTS};
use super::{answer_early, answer_job, log_conf, servers_of, Shared};
use crate::resolve::{Job, Work};

const WAKER: Token = Token(usize::MAX);
/// Lookups in flight at once (each holds up to two sockets); more wait in a queue.
pub const MAX_FLIGHTS: usize = 512;
/// Largest DNS message over TCP (two-byte length prefix).
const MAX_TCP_MESSAGE: usize = 65_535;

/// The handle the pool keeps: a queue into the resolver thread and the way to stop it.
pub struct Handle {
    tx: Sender<Job>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    /// Hands a job (a cache miss) to the resolver thread.
    pub fn submit(&self, job: Job) {
        if self.tx.send(job).is_ok() {
            let _ = self.waker.wake();
        }
    }

    /// Stops the thread; lookups still in flight are dropped (their workers are gone by now).
    pub fn shutdown(&mut self) {
        self.stop.store(true, Relaxed);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts the resolver thread with settings `conf`, re-read through `watch` when the file changes, sending queries
/// from `source` where its family matches the server's.
pub fn start(
    shared: Arc<Shared>,
    (conf, source): (ResolvConf, Option<IpAddr>),
    watch: Option<Watch>,
) -> io::Result<Handle> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let mut engine = Engine {
        poll,
        shared,
        servers: servers_of(&conf),
        conf,
        source,
        watch,
        rx,
        stop: Arc::clone(&stop),
        flights: Slab::new(),
        by_name: HashMap::new(),
        queue: VecDeque::new(),
        buf: vec![0; 65_536],
    };
    let thread = thread::Builder::new()
        .name("dns".into())
        .spawn(move || engine.run())?;
    Ok(Handle {
        tx,
        waker,
        stop,
        thread: Some(thread),
    })
}

enum Sock {
    Udp(UdpSocket),
    Tcp(TcpConn),
}

struct TcpConn {
    stream: TcpStream,
    out: Vec<u8>,
    written: usize,
    input: Vec<u8>,
}

struct Flight {
    name: String,
    lookup: Lookup,
    socks: [Option<Sock>; SLOTS],
    waiters: Vec<Job>,
    /// The waiters were sent the first family's addresses (`Lookup::early`); later waiters get them on joining.
    early_sent: bool,
    started: Instant,
}

struct Engine {
    poll: Poll,
    shared: Arc<Shared>,
    /// Search list and options; lookups in flight keep the `servers` they started with.
    conf: ResolvConf,
    servers: Arc<Servers>,
    /// `--bind`: queries leave from the address outbound connections leave from.
    source: Option<IpAddr>,
    watch: Option<Watch>,
    rx: Receiver<Job>,
    stop: Arc<AtomicBool>,
    flights: Slab<Flight>,
    by_name: HashMap<String, usize>,
    queue: VecDeque<Job>,
    buf: Vec<u8>,
}

impl Engine {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        while !self.stop.load(Relaxed) {
            let timeout = self.next_deadline().map(|d| {
                // Round up to a whole millisecond so a deadline is never polled for just short of it.
                d.saturating_duration_since(Instant::now()) + Duration::from_micros(999)
            });
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("dns: poll failed: {e}");
                    return;
                }
            }
            let now = Instant::now();
            for ev in events.iter() {
                if ev.token() == WAKER {
                    continue;
                }
                let (key, slot) = (ev.token().0 / SLOTS, ev.token().0 % SLOTS);
                self.on_socket(key, slot, ev.is_writable(), ev.is_error(), now);
            }
            self.tick(now);
            // Last, so lookups that finished above make room for queued jobs in the same turn.
            if !self.take_jobs(now) {
                return;
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.flights
            .iter()
            .filter_map(|(_, f)| f.lookup.deadline())
            .min()
    }

    /// Takes every queued job; false once every sender is gone.
    fn take_jobs(&mut self, now: Instant) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(job) => self.queue.push_back(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
        self.start_queued(now);
        true
    }

    fn start_queued(&mut self, now: Instant) {
        while let Some(job) = self.queue.pop_front() {
            let Work::Resolve { host, .. } = &job.work else {
                continue;
            };
            let name = host.to_ascii_lowercase();
            if let Some(&key) = self.by_name.get(&name) {
                self.shared.stats.coalesced.fetch_add(1, Relaxed);
                let f = &mut self.flights[key];
                if let Some((_, ips)) = f.lookup.early().filter(|_| f.early_sent) {
                    answer_early(&job, ips);
                }
                f.waiters.push(job);
                continue;
            }
            // The cache may have been filled while this job was on its way here.
            if let Some(hit) = self.shared.cached(&name, now) {
                self.shared.stats.cache_hits.fetch_add(1, Relaxed);
                answer_job(job, &hit, &self.shared.stats);
                continue;
            }
            if self.flights.len() >= MAX_FLIGHTS {
                self.queue.push_front(job);
                return;
            }
            if let Some(c) = self.watch.as_mut().and_then(|w| w.poll(now)) {
                log_conf("resolv.conf changed: ", &c);
                self.servers = servers_of(&c);
                self.conf = c;
            }
            let lookup = Lookup::start(
                &self.conf.candidates(&name),
                Arc::clone(&self.servers),
                Box::new(rand::random::<u16>),
                now,
            );
            let key = self.flights.insert(Flight {
                name: name.clone(),
                lookup,
                socks: [None, None],
                waiters: vec![job],
                early_sent: false,
                started: now,
            });
            self.by_name.insert(name, key);
            self.pump(key, now);
        }
    }

    fn tick(&mut self, now: Instant) {
        let due: Vec<usize> = self
            .flights
            .iter()
            .filter(|(_, f)| f.lookup.deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| k)
            .collect();
        for key in due {
            self.flights[key].lookup.on_tick(now);
            self.pump(key, now);
        }
    }

    /// Carries out what the lookup asks for, closes sockets it no longer needs, and finishes it once it has an outcome.
    fn pump(&mut self, key: usize, now: Instant) {
        loop {
            let sends = self.flights[key].lookup.take_sends();
            if sends.is_empty() {
                break;
            }
            for s in sends {
                let slot = s.slot;
                if let Err(e) = self.open(key, s) {
                    debug!(
                        "dns: query for {} failed to go out: {e}",
                        self.flights[key].name
                    );
                    self.flights[key].socks[slot] = None;
                    self.flights[key].lookup.on_transport_error(slot, now);
                }
            }
        }
        let f = &mut self.flights[key];
        for slot in 0..SLOTS {
            if !f.lookup.slot_waiting(slot) {
                f.socks[slot] = None;
            }
        }
        if f.lookup.outcome().is_some() {
            self.finish(key, now);
            return;
        }
        if !f.early_sent {
            if let Some((slot, ips)) = f.lookup.early() {
                f.early_sent = true;
                debug!(
                    "dns: {} answered {} first",
                    f.name,
                    if slot == 0 { "A" } else { "AAAA" }
                );
                for job in &f.waiters {
                    answer_early(job, ips);
                }
            }
        }
    }

    /// A fresh socket per query: the kernel picks a random source port for each (RFC 5452 §9.2).
    fn open(&mut self, key: usize, s: Send) -> io::Result<()> {
        let token = Token(key * SLOTS + s.slot);
        // A server of the other family than `--bind` is still asked, from the kernel's choice of source: DNS is
        // the proxy's own traffic, and failing every lookup over a family mismatch would help nobody.
        let source = self.source.filter(|ip| ip.is_ipv4() == s.server.is_ipv4());
        let local = match source {
            Some(ip) => SocketAddr::new(ip, 0),
            None if s.server.is_ipv4() => SocketAddr::from(([0, 0, 0, 0], 0)),
            None => SocketAddr::from(([0u16; 8], 0)),
        };
        debug!(
            "dns: asking {} for {} over {:?}",
            s.server, self.flights[key].name, s.transport
        );
        // Drop the slot's previous socket first, so its events can no longer be mistaken for the new one's.
        self.flights[key].socks[s.slot] = None;
        let sock = match s.transport {
            Transport::Udp => {
                let mut u = UdpSocket::bind(local)?;
                u.connect(s.server)?;
                self.poll
                    .registry()
                    .register(&mut u, token, Interest::READABLE)?;
                u.send(&s.packet)?;
                self.shared.stats.queries[0].fetch_add(1, Relaxed);
                Sock::Udp(u)
            }
            Transport::Tcp => {
                let mut t = crate::net::connect(s.server, source, (None, &Default::default()))?;
                self.poll.registry().register(
                    &mut t,
                    token,
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                let len = u16::try_from(s.packet.len())
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
                let mut out = len.to_be_bytes().to_vec();
                out.extend_from_slice(&s.packet);
                self.shared.stats.queries[1].fetch_add(1, Relaxed);
                Sock::Tcp(TcpConn {
                    stream: t,
                    out,
                    written: 0,
                    input: Vec::new(),
                })
            }
        };
        self.flights[key].socks[s.slot] = Some(sock);
        Ok(())
    }

    fn on_socket(&mut self, key: usize, slot: usize, writable: bool, error: bool, now: Instant) {
        let Some(f) = self.flights.get_mut(key) else {
            return;
        };
        let mut failed = false;
        match &mut f.socks[slot] {
            None => return,
            Some(Sock::Udp(u)) => loop {
                match u.recv_from(&mut self.buf) {
                    Ok((n, from)) => {
                        f.lookup.on_message(slot, from, &self.buf[..n], now);
                        if !f.lookup.slot_waiting(slot) {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        // ICMP port unreachable and friends: this server is not there.
                        failed = true;
                        break;
                    }
                }
            },
            Some(Sock::Tcp(t)) => {
                if error {
                    failed = true;
                } else {
                    match drive_tcp(t, writable, &mut self.buf) {
                        Ok(Some(msg)) => {
                            let from = t.stream.peer_addr().ok();
                            match from {
                                Some(from) => f.lookup.on_message(slot, from, &msg, now),
                                None => failed = true,
                            }
                            // One answer per connection: anything else is not for this question.
                            if f.lookup.slot_waiting(slot) {
                                failed = true;
                            }
                        }
                        Ok(None) => {}
                        Err(_) => failed = true,
                    }
                }
            }
        }
        if failed {
            f.socks[slot] = None;
            f.lookup.on_transport_error(slot, now);
        }
        self.pump(key, now);
    }

    fn finish(&mut self, key: usize, now: Instant) {
        let f = self.flights.remove(key);
        self.by_name.remove(&f.name);
        let stats = &self.shared.stats;
        stats.observe(now.saturating_duration_since(f.started));
        let Some(outcome) = f.lookup.outcome().cloned() else {
            return;
        };
        self.shared.store(&f.name, &outcome, now);
        if let Outcome::Failed(e, _) = &outcome {
            debug!("dns: {} failed: {e:?}", f.name);
        }
        for job in f.waiters {
            answer_job(job, &outcome, stats);
        }
        // Queued jobs start from the run loop, not from here: a lookup can finish inside start_queued (a bad name,
        // no socket to be had), and starting the next one from here would recurse once per queued job.
    }
}

/// Writes the query and reads the length-prefixed answer; `Some(message)` once it is complete.
fn drive_tcp(t: &mut TcpConn, writable: bool, buf: &mut [u8]) -> io::Result<Option<Vec<u8>>> {
    if writable || t.written < t.out.len() {
        while t.written < t.out.len() {
            match t.stream.write(&t.out[t.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => t.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // Not connected yet: the writable event will come.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
                Err(e) => return Err(e),
            }
        }
    }
    loop {
        match t.stream.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                t.input.extend_from_slice(&buf[..n]);
                if t.input.len() > MAX_TCP_MESSAGE + 2 {
                    return Err(io::ErrorKind::InvalidData.into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
            Err(e) => return Err(e),
        }
        if let [hi, lo, rest @ ..] = t.input.as_slice() {
            let len = usize::from(u16::from_be_bytes([*hi, *lo]));
            if rest.len() >= len {
                return Ok(Some(rest[..len].to_vec()));
            }
        }
    }
    Ok(None)
}
