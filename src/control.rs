//! The control thread: starts workers, handles signals, serves `/metrics`, and fans out reload and drain.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::auth::Users;
use crate::config::{self, Config};
use crate::metrics::{self, Stats};
use crate::net;
use crate::resolve::ResolverPool;
use crate::worker::{self, Command, Shared, Worker};

struct WorkerHandle {
    thread: Option<JoinHandle<()>>,
    commands: Sender<Command>,
    waker: Arc<Waker>,
}

/// A running server: its workers, their stats, and the addresses it listens on.
pub struct Server {
    addrs: Vec<SocketAddr>,
    workers: Vec<WorkerHandle>,
    stats: Vec<Arc<Stats>>,
    resolver: Option<ResolverPool>,
    cfg: Arc<Config>,
}

impl Server {
    /// Binds every listener on every worker and starts the threads. Port 0 in a listen address is resolved once
    /// (by the first worker's bind) and reused by the others, so all workers share one port.
    pub fn start(cfg: Config) -> io::Result<Server> {
        let cfg = Arc::new(cfg);
        let threads = cfg.threads.max(1);
        let mut addrs: Vec<SocketAddr> = cfg.listen.clone();
        let mut per_worker: Vec<Vec<TcpListener>> = Vec::with_capacity(threads);
        for _ in 0..threads {
            let mut ls = Vec::with_capacity(addrs.len());
            for a in addrs.iter_mut() {
                let l = net::reuseport_listener(*a, 1024)
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
                *a = l.local_addr()?;
                ls.push(l);
            }
            per_worker.push(ls);
        }
        let resolver = ResolverPool::start(cfg.resolver_threads, cfg.resolver.clone())?;
        let shared = Shared {
            cfg: Arc::clone(&cfg),
            open: Arc::new(AtomicUsize::new(0)),
            user_counts: Arc::new(Mutex::new(Default::default())),
            resolve_tx: resolver.sender(),
        };
        let mut workers = Vec::with_capacity(threads);
        let mut stats = Vec::with_capacity(threads);
        for (id, listeners) in per_worker.into_iter().enumerate() {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), worker::token::WAKER)?);
            let (cmd_tx, cmd_rx) = mpsc::channel();
            let (reply_tx, reply_rx) = mpsc::channel();
            let st = Arc::new(Stats::default());
            let w = Worker::new(
                id,
                poll,
                listeners,
                &shared,
                Arc::clone(&st),
                worker::Channels {
                    commands: cmd_rx,
                    replies: reply_rx,
                    reply_tx,
                    waker: Arc::clone(&waker),
                },
            )?;
            let thread = thread::Builder::new()
                .name(format!("worker-{id}"))
                .spawn(move || w.run())?;
            workers.push(WorkerHandle {
                thread: Some(thread),
                commands: cmd_tx,
                waker,
            });
            stats.push(st);
        }
        Ok(Server {
            addrs,
            workers,
            stats,
            resolver: Some(resolver),
            cfg,
        })
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Every worker's counters.
    pub fn stats(&self) -> &[Arc<Stats>] {
        &self.stats
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn send(&self, make: impl Fn() -> Command) {
        for w in &self.workers {
            if w.commands.send(make()).is_ok() {
                let _ = w.waker.wake();
            }
        }
    }

    /// Swaps in a new users table on every worker; established sessions are unaffected.
    pub fn reload_users(&self, users: Arc<Users>) {
        self.send(|| Command::ReloadUsers(Arc::clone(&users)));
    }

    /// Stops accepting and lets established tunnels run until `deadline`.
    pub fn drain(&self, deadline: Instant) {
        self.send(|| Command::Drain(deadline));
    }

    /// True once every worker thread has exited.
    pub fn finished(&self) -> bool {
        self.workers
            .iter()
            .all(|w| w.thread.as_ref().map(|t| t.is_finished()).unwrap_or(true))
    }

    /// Stops every worker now and waits for them.
    pub fn stop(mut self) {
        self.send(|| Command::Stop);
        self.join();
    }

    fn join(&mut self) {
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                if t.join().is_err() {
                    error!("a worker thread panicked");
                }
            }
        }
        self.workers.clear();
        if let Some(r) = self.resolver.take() {
            r.shutdown();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.workers.is_empty() {
            self.send(|| Command::Stop);
            self.join();
        }
    }
}

const SIGNALS: Token = Token(usize::MAX);
const METRICS: Token = Token(usize::MAX - 1);
/// A scrape connection that has not finished within this time is closed.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

struct Scrape {
    stream: TcpStream,
    request: Vec<u8>,
    response: Vec<u8>,
    written: usize,
    started: Instant,
}

/// Runs the server until SIGTERM/SIGINT and the drain that follows. Prints one `listening on ADDR` line per
/// listener (and `metrics on ADDR`) to stdout once ready, which scripts and tests wait for.
pub fn run(cfg: Config) -> io::Result<()> {
    let metrics_addr = cfg.metrics;
    let drain_timeout = cfg.drain_timeout;
    let mut poll = Poll::new()?;
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT])?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;
    let mut metrics_listener = match metrics_addr {
        Some(a) => {
            let mut l = TcpListener::bind(a)
                .map_err(|e| io::Error::new(e.kind(), format!("--metrics {a}: {e}")))?;
            poll.registry()
                .register(&mut l, METRICS, Interest::READABLE)?;
            Some(l)
        }
        None => None,
    };
    let server = Server::start(cfg)?;
    {
        let mut out = io::stdout().lock();
        for a in server.addrs() {
            let _ = writeln!(out, "socksgate: listening on {a}");
        }
        if let Some(l) = &metrics_listener {
            if let Ok(a) = l.local_addr() {
                let _ = writeln!(out, "socksgate: metrics on http://{a}/metrics");
            }
        }
        let _ = out.flush();
    }
    info!(
        "socksgate {} started: {} workers, listening on {:?}, users: {}",
        env!("CARGO_PKG_VERSION"),
        server.workers.len(),
        server.addrs(),
        server.config().users.len()
    );
    log_tls_setup(server.config());
    let mut events = Events::with_capacity(64);
    let mut scrapes: Slab<Scrape> = Slab::new();
    let mut draining = false;
    let mut metrics_backlog = false;
    loop {
        match poll.poll(&mut events, Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            match ev.token() {
                SIGNALS => {
                    for sig in signals.pending() {
                        match sig {
                            SIGHUP => reload(&server),
                            _ if draining => {
                                warn!("second signal: exiting now");
                                std::process::exit(1);
                            }
                            _ => {
                                draining = true;
                                info!("signal {sig}: draining for up to {drain_timeout:?}");
                                server.drain(Instant::now() + drain_timeout);
                            }
                        }
                    }
                }
                METRICS => {
                    if let Some(l) = metrics_listener.as_mut() {
                        metrics_backlog = accept_scrapes(l, &mut poll, &mut scrapes);
                    }
                }
                Token(key) => {
                    if serve_scrape(&mut scrapes, key, &server) {
                        if let Some(mut s) = scrapes.try_remove(key) {
                            let _ = poll.registry().deregister(&mut s.stream);
                        }
                    }
                }
            }
        }
        // Out of descriptors at the last accept: the edge-triggered listener raises no new event for connections
        // already queued, so try again every loop turn (100 ms) until the backlog is drained.
        if metrics_backlog {
            if let Some(l) = metrics_listener.as_mut() {
                metrics_backlog = accept_scrapes(l, &mut poll, &mut scrapes);
            }
        }
        let now = Instant::now();
        let stale: Vec<usize> = scrapes
            .iter()
            .filter(|(_, s)| now.duration_since(s.started) > SCRAPE_TIMEOUT)
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            if let Some(mut s) = scrapes.try_remove(k) {
                let _ = poll.registry().deregister(&mut s.stream);
            }
        }
        if draining && server.finished() {
            break;
        }
    }
    info!("drained; exiting");
    server.stop();
    Ok(())
}

/// The TLS certificate in use, and the warning the issue asks for: passwords on a public listener in clear text.
fn log_tls_setup(cfg: &Config) {
    if let Some(tls) = &cfg.tls {
        let loaded = tls.loaded();
        info!(
            "TLS on every listener{}: {loaded}",
            if cfg.tls_only { " (TLS only)" } else { "" }
        );
        for w in &loaded.warnings {
            warn!("--tls-cert {}: {w}", tls.files().cert.display());
        }
    }
    if cfg.users.is_empty() || cfg.tls_only {
        return;
    }
    if let Some(a) = cfg.listen.iter().find(|a| !a.ip().is_loopback()) {
        warn!(
            "listener {a} accepts passwords in clear text: serve it with --tls-cert/--tls-key and --tls-only \
             so credentials never cross the network unencrypted"
        );
    }
}

/// SIGHUP: certificate, key and client CA, re-read here on the control thread; the workers pick the new
/// configuration up at their next handshake.
fn reload_tls(cfg: &Config) {
    let Some(tls) = &cfg.tls else {
        return;
    };
    match tls.reload() {
        Ok(loaded) => {
            info!("SIGHUP: reloaded TLS {loaded}");
            for w in &loaded.warnings {
                warn!("--tls-cert {}: {w}", tls.files().cert.display());
            }
        }
        Err(e) => error!("SIGHUP: keeping the old TLS certificate and key: {e}"),
    }
}

fn reload(server: &Server) {
    let cfg = server.config();
    reload_tls(cfg);
    if cfg.users_file.is_none() {
        if cfg.tls.is_none() {
            info!("SIGHUP: no --users file to reload");
        }
        return;
    }
    match config::load_users(&cfg.inline_users, cfg.users_file.as_deref()) {
        Ok(users) if users.is_empty() && !cfg.users.is_empty() => {
            // An empty table would switch authentication off (and open the proxy): a file caught half-written or
            // emptied by mistake must not do that.
            error!("SIGHUP: the users file has no users; keeping the old table (authentication stays on)");
        }
        Ok(users) => {
            info!("SIGHUP: reloaded {} users", users.len());
            server.reload_users(Arc::new(users));
        }
        Err(e) => error!("SIGHUP: keeping the old users table: {e}"),
    }
}

/// Accepts pending scrapes; true when it stopped on resource exhaustion with connections possibly still queued.
fn accept_scrapes(l: &mut TcpListener, poll: &mut Poll, scrapes: &mut Slab<Scrape>) -> bool {
    loop {
        match l.accept() {
            Ok((mut stream, _)) => {
                if scrapes.len() >= 64 {
                    continue;
                }
                let entry = scrapes.vacant_entry();
                if poll
                    .registry()
                    .register(
                        &mut stream,
                        Token(entry.key()),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .is_ok()
                {
                    entry.insert(Scrape {
                        stream,
                        request: Vec::new(),
                        response: Vec::new(),
                        written: 0,
                        started: Instant::now(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if net::is_resource_exhaustion(&e) => return true,
            Err(_) => continue,
        }
    }
}

/// Advances one scrape; true when it is finished and should be closed.
fn serve_scrape(scrapes: &mut Slab<Scrape>, key: usize, server: &Server) -> bool {
    let Some(s) = scrapes.get_mut(key) else {
        return false;
    };
    if s.response.is_empty() {
        let mut buf = [0u8; 2048];
        loop {
            match s.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => {
                    s.request.extend_from_slice(&buf[..n]);
                    if s.request.len() > 16 * 1024 {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
        if !s.request.windows(4).any(|w| w == b"\r\n\r\n") {
            return false;
        }
        let line_end = s.request.iter().position(|&b| b == b'\r').unwrap_or(0);
        let line = &s.request[..line_end];
        let (status, ctype, body) =
            if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET / ") {
                (
                    "200 OK",
                    "text/plain; version=0.0.4",
                    metrics::render(server.stats()),
                )
            } else {
                (
                    "404 Not Found",
                    "text/plain",
                    "not found; try /metrics\n".to_string(),
                )
            };
        s.response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
    }
    while s.written < s.response.len() {
        match s.stream.write(&s.response[s.written..]) {
            Ok(n) => s.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
    true
}
