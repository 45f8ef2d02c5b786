//! The control thread: starts workers, handles signals, serves `/metrics`, and fans out reload and drain.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use signal_hook_mio::v1_0::Signals;

use crate::auth::Users;
use crate::config::Config;
use crate::listen::{Handed, ListenError, ListenSet, Origin};
use crate::metrics::serve::Exporter;
use crate::metrics::Stats;
use crate::policy::quota::{self, Saved};
use crate::resolve::ResolverPool;
use crate::supervisor::{self, Upgrade, UpgradeState};
use crate::sys;
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
    /// The policy the workers use now (its upstream groups feed /metrics, and a reload adopts their health).
    policy: Mutex<Arc<crate::policy::Policy>>,
    limits: Arc<crate::policy::Limits>,
    /// The quota counters as last written to `--state-dir` (a write is skipped when nothing changed).
    saved_quotas: Mutex<BTreeMap<String, Saved>>,
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
        set.configure(cfg.socket_buffer, &cfg.tcp)?;
        let addrs = set.addrs();
        let per_worker = set.for_workers(threads)?;
        if let (Some(want), Some(l)) = (
            cfg.socket_buffer,
            per_worker.first().and_then(|l| l.first()),
        ) {
            warn_if_capped(want, l);
        }
        let resolver = ResolverPool::start(cfg.resolver_threads, cfg.resolver.clone())?;
        if let Some(u) = cfg.upstream.as_ref().filter(|u| u.by_name()) {
            crate::resolve::check_upstream(&resolver, &u.host, u.port)?;
        }
        let limits = Arc::new(crate::policy::Limits::default());
        let saved_quotas = match &cfg.state_dir {
            Some(dir) => restore_quotas(dir, &limits, &cfg.policy),
            None => BTreeMap::new(),
        };
        let shared = Shared {
            cfg: Arc::clone(&cfg),
            open: Arc::new(AtomicUsize::new(0)),
            user_counts: Arc::new(Mutex::new(Default::default())),
            limits,
            resolve_tx: resolver.sender(),
            quick: resolver.quick_answers(),
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
            policy: Mutex::new(Arc::clone(&cfg.policy)),
            cfg,
            limits: Arc::clone(&shared.limits),
            saved_quotas: Mutex::new(saved_quotas),
        })
    }

    /// Writes the quota counters to `--state-dir` if they changed since the last write (off the event loops:
    /// called by the control thread every few seconds and on exit). A failed write is logged; the counters live
    /// on in memory and the next write tries again.
    pub fn save_quotas(&self) {
        let Some(dir) = &self.cfg.state_dir else {
            return;
        };
        let now = self.limits.snapshot();
        let Ok(mut last) = self.saved_quotas.lock() else {
            return;
        };
        if *last == now {
            return;
        }
        match quota::save(dir, &now) {
            Ok(_) => *last = now,
            Err(e) => error!(
                "--state-dir {}: cannot write {}: {e}",
                dir.display(),
                quota::STATE_FILE
            ),
        }
    }

    /// The control thread's quota duties, each loop turn: have the workers close the sessions of users whose
    /// quota ran out, and (when `roll`) start counters whose period is over again.
    fn quota_tick(&self, roll: bool) {
        if self.limits.take_exhausted() {
            self.send(|| Command::QuotaSweep);
        }
        if !roll {
            return;
        }
        let rolled = self.limits.roll_periods(quota::unix_ms());
        if !rolled.is_empty() {
            let shown: Vec<&str> = rolled.iter().take(10).map(|s| s.as_str()).collect();
            info!(
                "quota period started again for {} users: {}{}",
                rolled.len(),
                shown.join(", "),
                if rolled.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            );
        }
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

    /// Waits (up to `limit`) until every worker has processed the commands sent before this call.
    pub fn barrier(&self, limit: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(|| Command::Barrier(tx.clone()));
        drop(tx);
        let deadline = Instant::now() + limit;
        for _ in &self.workers {
            let left = deadline.saturating_duration_since(Instant::now());
            if rx.recv_timeout(left).is_err() {
                warn!("a worker did not confirm within {limit:?}");
                return;
            }
        }
    }

    /// Swaps in a new users table on every worker; established sessions are unaffected.
    pub fn reload_users(&self, users: Arc<Users>) {
        self.send(|| Command::ReloadUsers(Arc::clone(&users)));
    }

    /// Swaps in a new users table and policy together on every worker (SIGHUP); sessions of users that were removed
    /// or whose password changed are closed (`end=revoked`), the others keep running.
    pub fn reload_tables(&self, users: Arc<Users>, policy: Arc<crate::policy::Policy>) {
        if let Ok(mut p) = self.policy.lock() {
            *p = Arc::clone(&policy);
        }
        self.send(|| Command::ReloadPolicy(Arc::clone(&users), Arc::clone(&policy)));
    }

    /// The policy in use (the last one sent to the workers).
    pub fn policy(&self) -> Arc<crate::policy::Policy> {
        self.policy
            .lock()
            .map(|p| Arc::clone(&p))
            .unwrap_or_else(|e| Arc::clone(&e.into_inner()))
    }

    /// Stops accepting and lets established tunnels run until `deadline`.
    pub fn drain(&mut self, deadline: Instant) {
        self.listen_set = None;
        self.send(|| Command::Drain(deadline));
    }

    /// After a new process took over the listening sockets: stop accepting (our copies close, the sockets and
    /// their queues live on in the new process) and drain, letting connections mid-handshake finish.
    pub fn handover(&mut self, deadline: Instant) {
        self.listen_set = None;
        self.send(|| Command::Handover(deadline));
    }

    /// Descriptors of every listening socket, while we still hold them (until a drain or hand-over).
    pub fn listen_fds(&self) -> Option<Vec<std::os::fd::RawFd>> {
        self.listen_set.as_ref().map(|s| s.raw_fds())
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
const UPGRADE: Token = Token(usize::MAX - 2);

/// Reads the saved quota counters at startup; a missing or corrupt file is logged and the counters start at zero.
fn restore_quotas(
    dir: &std::path::Path,
    limits: &crate::policy::Limits,
    policy: &crate::policy::Policy,
) -> BTreeMap<String, Saved> {
    let path = dir.join(quota::STATE_FILE);
    if !path.exists() {
        info!(
            "--state-dir: {} does not exist yet; quota counters start at zero",
            path.display()
        );
        return BTreeMap::new();
    }
    match quota::load(dir) {
        Ok(saved) => {
            let n = limits.restore(&saved, policy);
            info!(
                "--state-dir: restored the quota counters of {n} users from {}",
                path.display()
            );
            // What the file holds is what was last written: nothing to write until a counter moves.
            limits.snapshot()
        }
        Err(m) => {
            warn!("--state-dir: cannot use the saved quota counters ({m}); they start at zero");
            BTreeMap::new()
        }
    }
}

/// How often the quota counters are written to `--state-dir` (when they changed).
const STATE_SAVE_EVERY: Duration = Duration::from_secs(2);

/// How often quota periods are checked for their end.
const QUOTA_ROLL_EVERY: Duration = Duration::from_millis(250);

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

/// What `main` gathered before any thread started.
#[derive(Default)]
pub struct Startup {
    /// Listening sockets passed by systemd or by the process this one replaces.
    pub handed: Option<Handed>,
    /// The arguments (without `argv[0]`) as given, before `-U` passwords were hidden: SIGUSR2 starts the new
    /// binary with them.
    pub args: Vec<OsString>,
    /// The binary's path for SIGUSR2, resolved at startup ([`supervisor::resolve_exe`]).
    pub exe: Option<PathBuf>,
}

/// Runs the server until SIGTERM/SIGINT and the drain that follows, or until a SIGUSR2 upgrade handed over and
/// drained. Prints one `listening on ADDR` line per listener (and `metrics on ADDR`) to stdout once ready, which
/// scripts and tests wait for.
pub fn run(cfg: Config, start: Startup) -> Result<(), RunError> {
    let drain_timeout = cfg.drain_timeout;
    let upgrade_timeout = cfg.upgrade_timeout;
    let pid_file = cfg.pid_file.clone();
    let mut poll = Poll::new()?;
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT, SIGUSR2])?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;
    let Startup { handed, args, exe } = start;
    let (set, handed_metrics, ready_to, from_pid) = match handed {
        Some(h) => {
            if h.set.origin == Origin::Systemd {
                if cfg.listen != Config::default().listen {
                    warn!(
                        "ignoring --listen {:?}: serving the sockets systemd passed instead",
                        cfg.listen
                    );
                }
                info!(
                    "socket activation: {} sockets from systemd{}{}",
                    h.set.raw_fds().len(),
                    if h.names.is_empty() {
                        String::new()
                    } else {
                        format!(" (names {})", h.names.join(":"))
                    },
                    if h.metrics.is_some() {
                        ", and the /metrics socket"
                    } else {
                        ""
                    }
                );
            }
            (h.set, h.metrics, h.ready, h.from_pid)
        }
        None => (
            ListenSet::bind(&cfg.listen, cfg.threads, cfg.socket_buffer)
                .map_err(|e| RunError::Startup(e.to_string()))?,
            None,
            None,
            None,
        ),
    };
    if set.origin == Origin::Systemd {
        // The same guard as for -l addresses, applied to the sockets systemd chose.
        let exposed = set.addrs().into_iter().find(|a| !a.ip().is_loopback());
        if let Some(a) = exposed {
            if cfg.users.is_empty() && cfg.client_rules.is_empty() && !cfg.open {
                return Err(RunError::Startup(format!(
                    "refusing to run an open proxy on non-loopback address {a} (passed by systemd): configure \
                     --user/--users or --allow-client, or pass --open if that is really what you want"
                )));
            }
        }
    }
    // A handed /metrics listener wins over --metrics: the old process served it, or systemd passed it by name.
    let mut exporter = match (cfg.metrics, handed_metrics) {
        (_, Some(l)) => {
            l.set_nonblocking(true)?;
            Some(Exporter::from_listener(mio::net::TcpListener::from_std(l)))
        }
        (Some(a), None) => Some(Exporter::bind(a)?),
        (None, _) => None,
    };
    if let Some(e) = exporter.as_mut() {
        e.register(poll.registry(), METRICS)?;
    }
    let mut server = Server::start_with(cfg, set)?;
    // Before the `listening on` lines, so whoever waits for them finds the file.
    if let Some(p) = &pid_file {
        supervisor::write_pid_file(p)
            .map_err(|e| RunError::Startup(format!("--pid-file {}: {e}", p.display())))?;
    }
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
    match ready_to {
        Some(to) => {
            // The old process may be gone (killed, crashed): then we are the only one serving, so carry on.
            if let Err(e) = supervisor::report_ready(to) {
                warn!("upgrade: cannot report readiness to the old process: {e}; serving anyway");
            }
            info!(
                "upgrade: took over {} listening sockets from pid {}",
                server.listen_fds().map(|f| f.len()).unwrap_or(0),
                from_pid
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "?".into())
            );
        }
        None => supervisor::notify_or_log("READY=1"),
    }
    info!(
        "socksgate {} started: {}, listening on {:?}, users: {}",
        env!("CARGO_PKG_VERSION"),
        workers_phrase(server.workers.len()),
        server.addrs(),
        server.config().users.len()
    );
    log_tls_setup(server.config());
    let mut events = Events::with_capacity(64);
    let mut draining = false;
    let mut handed_over = false;
    let mut upgrade: Option<Upgrade> = None;
    let mut last_save = Instant::now();
    let mut last_roll = Instant::now();
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
                            // After a hand-over the new process speaks for the service.
                            SIGHUP if handed_over => reload(&server),
                            SIGHUP => {
                                supervisor::notify_or_log(&format!(
                                    "RELOADING=1\nMONOTONIC_USEC={}",
                                    sys::monotonic_usec()
                                ));
                                reload(&server);
                                supervisor::notify_or_log("READY=1");
                            }
                            SIGUSR2 if draining => {
                                warn!("SIGUSR2: draining, not upgrading");
                            }
                            SIGUSR2 => match &upgrade {
                                Some(u) => warn!(
                                    "SIGUSR2: an upgrade is already in progress (new process pid {}); ignored",
                                    u.pid()
                                ),
                                None => {
                                    // The new process starts from the counters as they are now.
                                    server.save_quotas();
                                    upgrade = start_upgrade(
                                        &server,
                                        exporter.as_ref(),
                                        exe.as_deref(),
                                        &args,
                                        upgrade_timeout,
                                        &poll,
                                    )
                                }
                            },
                            _ if draining => {
                                warn!("second signal: exiting now");
                                if !handed_over {
                                    server.save_quotas();
                                }
                                if let (Some(p), false) = (&pid_file, handed_over) {
                                    supervisor::remove_pid_file(p);
                                }
                                return Err(RunError::Forced);
                            }
                            _ => {
                                if let Some(mut u) = upgrade.take() {
                                    warn!(
                                        "signal {sig}: stopping the upgrade's new process (pid {})",
                                        u.pid()
                                    );
                                    let _ = poll.registry().deregister(u.source());
                                    u.abort();
                                }
                                supervisor::notify_or_log("STOPPING=1");
                                draining = true;
                                info!("signal {sig}: draining for up to {drain_timeout:?}");
                                server.drain(Instant::now() + drain_timeout);
                            }
                        }
                    }
                }
                UPGRADE => {}
                t => {
                    if let Some(e) = exporter.as_mut().filter(|e| e.owns(t)) {
                        let render = || {
                            let mut text = crate::metrics::render(server.stats());
                            server.config().resolver.stats().render(&mut text);
                            crate::groups::render(server.policy().groups(), &mut text);
                            if server.config().metrics_per_user {
                                server.limits.render(&mut text);
                            }
                            text
                        };
                        e.on_event(poll.registry(), t, &render);
                    }
                }
            }
        }
        let now = Instant::now();
        if let Some(u) = upgrade.as_mut() {
            match u.check(now) {
                UpgradeState::Pending => {}
                UpgradeState::Ready(pid) => {
                    info!(
                        "upgrade: new process {pid} is ready; handing over and draining for up to \
                         {drain_timeout:?}"
                    );
                    let _ = poll.registry().deregister(u.source());
                    upgrade = None;
                    supervisor::notify_or_log(&format!("MAINPID={pid}"));
                    if let Some(mut e) = exporter.take() {
                        e.deregister(poll.registry());
                    }
                    server.handover(now + drain_timeout);
                    draining = true;
                    handed_over = true;
                }
                UpgradeState::Failed(why) => {
                    error!("upgrade failed: {why}; still serving");
                    let _ = poll.registry().deregister(u.source());
                    upgrade = None;
                }
            }
        }
        if let Some(e) = exporter.as_mut() {
            e.tick(poll.registry(), now);
        }
        // Rolling periods walks every user's entry under the registry lock: a few times a second is enough.
        let roll = now >= last_roll + QUOTA_ROLL_EVERY;
        if roll {
            last_roll = now;
        }
        server.quota_tick(roll);
        // After a hand-over the new process keeps the file: ours would overwrite its newer counts.
        if !handed_over && now >= last_save + STATE_SAVE_EVERY {
            last_save = now;
            server.save_quotas();
        }
        if draining && server.finished() {
            break;
        }
    }
    info!("drained; exiting");
    // Every worker has exited: the counters are final.
    if !handed_over {
        server.save_quotas();
    }
    server.stop();
    if let (Some(p), false) = (&pid_file, handed_over) {
        supervisor::remove_pid_file(p);
    }
    Ok(())
}

/// SIGUSR2: starts the new binary with our listening sockets; `None` (logged) when that is impossible.
fn start_upgrade(
    server: &Server,
    exporter: Option<&Exporter>,
    exe: Option<&std::path::Path>,
    args: &[OsString],
    timeout: Duration,
    poll: &Poll,
) -> Option<Upgrade> {
    let Some(exe) = exe else {
        error!("SIGUSR2: cannot upgrade: the binary's path could not be resolved at startup; still serving");
        return None;
    };
    let Some(fds) = server.listen_fds() else {
        warn!("SIGUSR2: the listening sockets are already closed; not upgrading");
        return None;
    };
    let metrics_fd = exporter.map(|e| std::os::fd::AsRawFd::as_raw_fd(e.listener()));
    match Upgrade::start(exe, args, &fds, metrics_fd, timeout) {
        Ok(mut u) => {
            if let Err(e) = poll
                .registry()
                .register(u.source(), UPGRADE, Interest::READABLE)
            {
                // Checked every loop turn anyway; the event only makes it prompt.
                warn!("upgrade: cannot watch the readiness socket: {e}");
            }
            info!(
                "SIGUSR2: started {} (pid {}) with {} listening sockets; waiting up to {timeout:?} for it",
                exe.display(),
                u.pid(),
                fds.len()
            );
            Some(u)
        }
        Err(e) => {
            error!(
                "upgrade failed: cannot start {}: {e}; still serving",
                exe.display()
            );
            None
        }
    }
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

/// SIGHUP: re-reads the files, swaps them in on every worker, and logs `SIGHUP: done` once every worker has
/// applied the result (so whoever waits for the reload, sd_notify's READY=1 included, sees it in force everywhere).
fn reload(server: &Server) {
    reload_files(server);
    server.barrier(RELOAD_BARRIER_WAIT);
    info!("SIGHUP: done");
}

/// How long a reload waits for every worker to confirm it (a worker answers on its next loop turn; this bound
/// only matters if one is wedged, and then the reload still took effect everywhere else).
const RELOAD_BARRIER_WAIT: Duration = Duration::from_secs(2);

fn reload_files(server: &Server) {
    let cfg = server.config();
    reload_tls(cfg);
    if cfg.users_file.is_none() && cfg.policy_file.is_none() {
        if cfg.tls.is_none() {
            info!("SIGHUP: no --users or --policy file to reload");
        }
        return;
    }
    // Users and policy are one unit: a policy may name users of the users file (and add users), so either both
    // new tables go in or neither does.
    let loaded = crate::policy::load_all(
        &cfg.inline_users,
        cfg.users_file.as_deref(),
        cfg.policy_file.as_deref(),
        &cfg.upstream_trust,
    );
    match loaded {
        Ok((users, _)) if users.is_empty() && !cfg.users.is_empty() => {
            // An empty table would switch authentication off (and open the proxy): a file caught half-written or
            // emptied by mistake must not do that.
            error!("SIGHUP: the users file has no users; keeping the old table (authentication stays on)");
        }
        Ok((users, mut policy)) => {
            // Members that stay keep their health and counters: a reload must not revive a dead upstream.
            policy.adopt_health(&server.policy());
            info!(
                "SIGHUP: reloaded {} users, policy with {} rules and {} user sections",
                users.len(),
                policy.rule_count(),
                policy.user_count()
            );
            if cfg.policy_file.is_some() {
                server.reload_tables(Arc::new(users), Arc::new(policy));
            } else {
                // Without a policy file a reload keeps every established session, as it always has.
                server.reload_users(Arc::new(users));
            }
        }
        Err(e) => error!(
            "SIGHUP: keeping the old users table and policy: {}",
            e.join("; ")
        ),
    }
}

/// "1 worker", "4 workers": the start line is read by people.
fn workers_phrase(n: usize) -> String {
    if n == 1 {
        "1 worker".to_string()
    } else {
        format!("{n} workers")
    }
}

#[cfg(test)]
mod start_line_tests {
    use super::workers_phrase;

    #[test]
    fn worker_count_is_singular_for_one() {
        assert_eq!(workers_phrase(1), "1 worker");
        assert_eq!(workers_phrase(2), "2 workers");
    }
}
