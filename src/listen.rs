//! Where the listening sockets come from (bound here from `-l`, passed by systemd, or inherited from the process
//! this one replaces) and how the workers share them.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use mio::net::TcpListener;
use socket2::Socket;

use crate::net;

/// How the listening sockets were obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Bound by this process from the `-l` addresses.
    Bound,
    /// Passed by systemd (sd_listen_fds protocol).
    Systemd,
    /// Inherited from the socksgate this process replaces (SIGUSR2 upgrade).
    Upgrade,
}

/// Why the listeners could not be set up. Every case is a startup failure with exit status 2.
#[derive(Debug)]
pub enum ListenError {
    /// Another process (perhaps another socksgate) listens on this address.
    InUse(SocketAddr),
    /// Anything else, as one line.
    Other(String),
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenError::InUse(a) => {
                write!(f, "cannot listen on {a}: address in use by another process")
            }
            ListenError::Other(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for ListenError {}

/// Every distinct listening socket this process serves, with the address each listens on.
pub struct ListenSet {
    sockets: Vec<(SocketAddr, Socket)>,
    /// Where they came from.
    pub origin: Origin,
}

/// Listen backlog of every socket bound here (the kernel caps it at net.core.somaxconn).
const BACKLOG: i32 = 1024;

impl ListenSet {
    /// Applies the listener options to every socket, bound here or handed to us (systemd, upgrade):
    /// `--socket-buffer` (accepted connections copy the listener's buffer sizes, so setting them after `listen` still
    /// covers every later accept; [`ListenSet::bind`] also sets them before `listen`, for the SYN's window), and
    /// TCP_NODELAY, `--tcp-keepalive`, `--tcp-user-timeout`, `--tcp-fastopen` (accepted connections inherit the
    /// first three).
    pub fn configure(
        &self,
        socket_buffer: Option<usize>,
        opts: &net::TcpOptions,
    ) -> io::Result<()> {
        for (_, s) in &self.sockets {
            net::set_socket_buffer(s, socket_buffer)?;
            opts.apply_listener(s)?;
        }
        Ok(())
    }

    /// Binds one SO_REUSEPORT socket per worker for every address. Refuses (with [`ListenError::InUse`]) an address
    /// another process listens on, even another socksgate that SO_REUSEPORT alone would let us share it with
    /// silently; port 0 is resolved once and used by every worker.
    pub fn bind(
        addrs: &[SocketAddr],
        threads: usize,
        socket_buffer: Option<usize>,
    ) -> Result<ListenSet, ListenError> {
        let threads = threads.max(1);
        // Every probe before any listen: two -l addresses that overlap (0.0.0.0:p and 127.0.0.1:p) are both ours,
        // and a probe conflicts only with a socket that listens.
        let mut probes = Vec::with_capacity(addrs.len());
        for &want in addrs {
            let probe = net::probe_exclusive(want).map_err(|e| bind_error(want, e))?;
            let addr = probe
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| {
                    ListenError::Other(format!("cannot listen on {want}: no local address"))
                })?;
            // Held until every address is bound, so a port-0 choice cannot be taken by someone else meanwhile.
            probes.push((addr, probe));
        }
        let mut sockets = Vec::with_capacity(addrs.len() * threads);
        for &(addr, _) in &probes {
            for _ in 0..threads {
                let l = net::reuseport_listener(addr, BACKLOG, socket_buffer)
                    .map_err(|e| bind_error(addr, e))?;
                sockets.push((
                    addr,
                    Socket::from(OwnedFd::from(std::net::TcpListener::from(l))),
                ));
            }
        }
        drop(probes);
        let set = ListenSet {
            sockets,
            origin: Origin::Bound,
        };
        set.check_not_shared()?;
        Ok(set)
    }

    /// Two instances started at the same instant could both pass their probes before either listens; once ours
    /// listen, any other listener on the address is someone else's (both instances then refuse, rather than
    /// splitting the traffic).
    fn check_not_shared(&self) -> Result<(), ListenError> {
        let mut own = Vec::with_capacity(self.sockets.len());
        for (_, s) in &self.sockets {
            if let Ok(i) = net::socket_inode(s) {
                own.push(i);
            }
        }
        for addr in self.addrs() {
            // Without /proc (unusual) the probe alone has to do.
            let Ok(listening) = net::listening_inodes(addr) else {
                continue;
            };
            if listening.iter().any(|i| !own.contains(i)) {
                return Err(ListenError::InUse(addr));
            }
        }
        Ok(())
    }

    /// The distinct addresses, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for (a, _) in &self.sockets {
            if !out.contains(a) {
                out.push(*a);
            }
        }
        out
    }

    /// Every socket's descriptor, for handing them to a new process.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.sockets.iter().map(|(_, s)| s.as_raw_fd()).collect()
    }

    /// The listeners of each of `threads` workers. An address with at least one socket per worker gives each worker
    /// its own (SO_REUSEPORT: the kernel picks the socket, so no wakeup is wasted); an address with fewer sockets
    /// (systemd passes one) is shared by every worker through a copy registered with EPOLLEXCLUSIVE. The set keeps
    /// its own descriptors, to hand them on in an upgrade: drop it when the workers' listeners close.
    pub fn for_workers(&self, threads: usize) -> io::Result<Vec<Vec<net::Listener>>> {
        let threads = threads.max(1);
        let mut out: Vec<Vec<net::Listener>> = (0..threads).map(|_| Vec::new()).collect();
        for addr in self.addrs() {
            let group: Vec<&Socket> = self
                .sockets
                .iter()
                .filter(|(a, _)| *a == addr)
                .map(|(_, s)| s)
                .collect();
            if group.len() >= threads {
                for (i, s) in group.iter().enumerate() {
                    out[i % threads].push(net::Listener::new(copy(s)?, false));
                }
            } else {
                for w in out.iter_mut() {
                    for s in &group {
                        w.push(net::Listener::new(copy(s)?, threads > 1));
                    }
                }
            }
        }
        Ok(out)
    }
}

fn copy(s: &Socket) -> io::Result<TcpListener> {
    let c = s.try_clone()?;
    c.set_nonblocking(true)?;
    Ok(TcpListener::from_std(std::net::TcpListener::from(c)))
}

fn bind_error(addr: SocketAddr, e: io::Error) -> ListenError {
    if e.kind() == io::ErrorKind::AddrInUse {
        ListenError::InUse(addr)
    } else {
        ListenError::Other(format!("cannot listen on {addr}: {e}"))
    }
}

/// Environment variables of the upgrade hand-off (set by the old process for the new one only).
pub mod upgrade_env {
    /// Comma-separated descriptors of every listening socket.
    pub const FDS: &str = "SOCKSGATE_UPGRADE_FDS";
    /// The `/metrics` listener's descriptor.
    pub const METRICS_FD: &str = "SOCKSGATE_UPGRADE_METRICS_FD";
    /// A Unix stream socket on which the new process writes `READY\n` once it serves.
    pub const READY_FD: &str = "SOCKSGATE_UPGRADE_READY_FD";
    /// The old process's pid (for the log).
    pub const FROM: &str = "SOCKSGATE_UPGRADE_FROM";
}

/// The `LISTEN_FDNAMES` name of a passed socket that serves `/metrics` rather than the proxy.
pub const METRICS_FDNAME: &str = "metrics";

/// What a process was handed at startup instead of binding its own listeners.
pub struct Handed {
    /// The listening sockets.
    pub set: ListenSet,
    /// `LISTEN_FDNAMES` (systemd), one per socket when given.
    pub names: Vec<String>,
    /// The `/metrics` listener (upgrade, or a systemd socket named [`METRICS_FDNAME`]).
    pub metrics: Option<std::net::TcpListener>,
    /// Where to report readiness to the old process (upgrade).
    pub ready: Option<std::os::unix::net::UnixStream>,
    /// The old process (upgrade).
    pub from_pid: Option<u32>,
}

/// Takes the sockets handed to this process: from the old process in an upgrade, or from systemd (sd_listen_fds:
/// `LISTEN_PID` must name this process, descriptors start at 3, `LISTEN_FDNAMES` optional). Removes the variables
/// either way, so nothing started later mistakes them for its own. Call before any thread starts (it edits the
/// environment).
pub fn take_from_env() -> Result<Option<Handed>, ListenError> {
    let take = |name: &str| {
        let v = std::env::var(name).ok();
        std::env::remove_var(name);
        v
    };
    let listen_pid = take("LISTEN_PID");
    let listen_fds = take("LISTEN_FDS");
    let listen_names = take("LISTEN_FDNAMES");
    let up_fds = take(upgrade_env::FDS);
    let up_metrics = take(upgrade_env::METRICS_FD);
    let up_ready = take(upgrade_env::READY_FD);
    let up_from = take(upgrade_env::FROM);
    if let Some(fds) = up_fds {
        let what = upgrade_env::FDS;
        let mut sockets = Vec::new();
        for f in fds.split(',').filter(|f| !f.is_empty()) {
            let fd = parse_fd(what, f)?;
            sockets.push(take_listener(fd, &format!("{what}: descriptor {fd}"))?);
        }
        let metrics = match up_metrics {
            Some(f) => {
                let fd = parse_fd(upgrade_env::METRICS_FD, &f)?;
                let (_, s) =
                    take_listener(fd, &format!("{}: descriptor {fd}", upgrade_env::METRICS_FD))?;
                Some(std::net::TcpListener::from(s))
            }
            None => None,
        };
        let ready = match up_ready {
            Some(f) => {
                let fd = parse_fd(upgrade_env::READY_FD, &f)?;
                let owned = crate::sys::take_inherited_fd(fd).map_err(|e| {
                    ListenError::Other(format!("{}: descriptor {fd}: {e}", upgrade_env::READY_FD))
                })?;
                Some(std::os::unix::net::UnixStream::from(owned))
            }
            None => None,
        };
        return Ok(Some(Handed {
            set: ListenSet {
                sockets,
                origin: Origin::Upgrade,
            },
            names: Vec::new(),
            metrics,
            ready,
            from_pid: up_from.and_then(|p| p.parse().ok()),
        }));
    }
    let Some(fds) = listen_fds else {
        return Ok(None);
    };
    let me = std::process::id();
    if listen_pid
        .as_deref()
        .and_then(|p| p.trim().parse::<u32>().ok())
        != Some(me)
    {
        log::info!(
            "ignoring LISTEN_FDS={fds}: LISTEN_PID={} is not this process ({me})",
            listen_pid.as_deref().unwrap_or("(unset)")
        );
        return Ok(None);
    }
    let n: i32 = fds
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=4096).contains(n))
        .ok_or_else(|| ListenError::Other(format!("LISTEN_FDS: expected a count, got {fds:?}")))?;
    if n == 0 {
        return Ok(None);
    }
    let names: Vec<String> = listen_names
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut sockets = Vec::with_capacity(n as usize);
    let mut metrics = None;
    for i in 0..n {
        // SD_LISTEN_FDS_START
        let fd = 3 + i;
        let name = names.get(i as usize).map(String::as_str);
        let what = match name {
            Some(name) => format!("LISTEN_FDS: descriptor {fd} ({name})"),
            None => format!("LISTEN_FDS: descriptor {fd}"),
        };
        let (addr, sock) = take_listener(fd, &what)?;
        if name == Some(METRICS_FDNAME) && metrics.is_none() {
            metrics = Some(std::net::TcpListener::from(sock));
        } else {
            sockets.push((addr, sock));
        }
    }
    if sockets.is_empty() {
        return Err(ListenError::Other(format!(
            "LISTEN_FDS: only a socket named {METRICS_FDNAME:?} was passed; no socket to serve the proxy on"
        )));
    }
    Ok(Some(Handed {
        set: ListenSet {
            sockets,
            origin: Origin::Systemd,
        },
        names,
        metrics,
        ready: None,
        from_pid: None,
    }))
}

fn parse_fd(var: &str, s: &str) -> Result<RawFd, ListenError> {
    s.trim()
        .parse::<RawFd>()
        .ok()
        .filter(|&fd| fd >= 3)
        .ok_or_else(|| {
            ListenError::Other(format!(
                "{var}: expected descriptor numbers >= 3, got {s:?}"
            ))
        })
}

/// Takes descriptor `fd` as a nonblocking listening TCP socket, or says what it is not.
fn take_listener(fd: RawFd, what: &str) -> Result<(SocketAddr, Socket), ListenError> {
    let owned = crate::sys::take_inherited_fd(fd)
        .map_err(|e| ListenError::Other(format!("{what}: {e}")))?;
    let s = Socket::from(owned);
    let tcp = matches!(s.r#type(), Ok(t) if t == socket2::Type::STREAM);
    let listening = s.is_listener().unwrap_or(false);
    let addr = s.local_addr().ok().and_then(|a| a.as_socket());
    match addr {
        Some(addr) if tcp && listening => {
            s.set_nonblocking(true)
                .map_err(|e| ListenError::Other(format!("{what}: {e}")))?;
            Ok((addr, s))
        }
        _ => Err(ListenError::Other(format!(
            "{what} is not a listening TCP socket (socksgate serves TCP sockets: ListenStream=ADDR:PORT)"
        ))),
    }
}
