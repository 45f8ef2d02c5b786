//! The control thread: starts workers, handles signals, serves `/metrics`, and fans out reload and drain.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::auth::Users;
use crate::config::{self, Config};
use crate::listen::{ListenError, ListenSet};
use crate::metrics::serve::Exporter;
use crate::metrics::Stats;
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
    /// Our own copy of every listening socket, to hand on in an upgrade; closed when the workers stop accepting,
    /// so a drained listener refuses connections instead of queueing them.
    listen_set: Option<ListenSet>,
    workers: Vec<WorkerHandle>,
    stats: Vec<Arc<Stats>>,
    resolver: Option<ResolverPool>,
    cfg: Arc<Config>,
}

/// The kernel silently clamps SO_RCVBUF/SO_SNDBUF to net.core.rmem_max/wmem_max (then doubles them): say so
/// once at startup rather than let `--socket-buffer 4MiB` quietly mean 208 KiB.
fn warn_if_capped(want: usize, listener: &crate::net::Listener) {
    let sock = socket2::SockRef::from(listener);
    let rcv = sock.recv_buffer_size().unwrap_or(0);
    let snd = sock.send_buffer_size().unwrap_or(0);
    // Linux reports twice what it granted (bookkeeping overhead included).
    if rcv < 2 * want || snd < 2 * want {
        warn!(
            "--socket-buffer {want}: the kernel granted SO_RCVBUF {} and SO_SNDBUF {} (capped by \
             net.core.rmem_max / net.core.wmem_max)",
            rcv / 2,
            snd / 2
        );
    }
}

impl Server {
    /// Binds every `-l` address on every worker (see [`ListenSet::bind`]) and starts the threads.
    pub fn start(cfg: Config) -> io::Result<Server> {
        let set =
            ListenSet::bind(&cfg.listen, cfg.threads, cfg.socket_buffer).map_err(|e| match e {
                ListenError::InUse(_) => io::Error::new(io::ErrorKind::AddrInUse, e.to_string()),
                ListenError::Other(s) => io::Error::other(s),
            })?;
        Server::start_with(cfg, set)
    }

    /// Starts the workers on listening sockets obtained elsewhere.
    pub fn start_with(cfg: Config, set: ListenSet) -> io::Result<Server> {
        let cfg = Arc::new(cfg);
        let threads = cfg.threads.max(1);
        let addrs = set.addrs();
        let per_worker = set.for_workers(threads)?;
        if let (Some(want), Some(l)) = (
            cfg.socket_buffer,
            per_worker.first().and_then(|l| l.first()),
        ) {
            warn_if_capped(want, l);
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
            listen_set: Some(set),
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
    pub fn drain(&mut self, deadline: Instant) {
        self.listen_set = None;
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

/// Why [`run`] ended other than by a completed drain.
#[derive(Debug)]
pub enum RunError {
    /// Startup refused (a listen address in use, bad passed sockets): exit status 2.
    Startup(String),
    /// A system error: exit status 1.
    Io(io::Error),
    /// A second SIGTERM/SIGINT while draining asked to exit at once: exit status 1.
    Forced,
}

impl RunError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Startup(_) => 2,
            RunError::Io(_) | RunError::Forced => 1,
        }
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Startup(s) => f.write_str(s),
            RunError::Io(e) => write!(f, "{e}"),
            RunError::Forced => f.write_str("second signal: exited without waiting for tunnels"),
        }
    }
}

impl From<io::Error> for RunError {
    fn from(e: io::Error) -> RunError {
        RunError::Io(e)
    }
}

/// Runs the server until SIGTERM/SIGINT and the drain that follows. Prints one `listening on ADDR` line per
/// listener (and `metrics on ADDR`) to stdout once ready, which scripts and tests wait for.
pub fn run(cfg: Config) -> Result<(), RunError> {
    let metrics_addr = cfg.metrics;
    let drain_timeout = cfg.drain_timeout;
    let mut poll = Poll::new()?;
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT])?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;
    let mut exporter = match metrics_addr {
        Some(a) => {
            let mut e = Exporter::bind(a)?;
            e.register(poll.registry(), METRICS)?;
            Some(e)
        }
        None => None,
    };
    let set = ListenSet::bind(&cfg.listen, cfg.threads, cfg.socket_buffer)
        .map_err(|e| RunError::Startup(e.to_string()))?;
    let mut server = Server::start_with(cfg, set)?;
    {
        let mut out = io::stdout().lock();
        for a in server.addrs() {
            let _ = writeln!(out, "socksgate: listening on {a}");
        }
        if let Some(e) = &exporter {
            if let Ok(a) = e.local_addr() {
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
    let mut draining = false;
    loop {
        match poll.poll(&mut events, Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        for ev in events.iter() {
            match ev.token() {
                SIGNALS => {
                    for sig in signals.pending() {
                        match sig {
                            SIGHUP => reload(&server),
                            _ if draining => {
                                warn!("second signal: exiting now");
                                return Err(RunError::Forced);
                            }
                            _ => {
                                draining = true;
                                info!("signal {sig}: draining for up to {drain_timeout:?}");
                                server.drain(Instant::now() + drain_timeout);
                            }
                        }
                    }
                }
                t => {
                    if let Some(e) = exporter.as_mut().filter(|e| e.owns(t)) {
                        let render = || {
                            let mut text = crate::metrics::render(server.stats());
                            server.config().resolver.stats().render(&mut text);
                            text
                        };
                        e.on_event(poll.registry(), t, &render);
                    }
                }
            }
        }
        if let Some(e) = exporter.as_mut() {
            e.tick(poll.registry(), Instant::now());
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
