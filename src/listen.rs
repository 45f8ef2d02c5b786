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
    /// Binds one SO_REUSEPORT socket per worker for every address. Refuses (with [`ListenError::InUse`]) an address
    /// another process listens on, even another socksgate that SO_REUSEPORT alone would let us share it with
    /// silently; port 0 is resolved once and used by every worker.
    pub fn bind(
        addrs: &[SocketAddr],
        threads: usize,
        socket_buffer: Option<usize>,
    ) -> Result<ListenSet, ListenError> {
        let threads = threads.max(1);
        let mut probes = Vec::with_capacity(addrs.len());
        let mut sockets = Vec::with_capacity(addrs.len() * threads);
        for &want in addrs {
            let probe = net::probe_exclusive(want).map_err(|e| bind_error(want, e))?;
            let addr = probe
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| {
                    ListenError::Other(format!("cannot listen on {want}: no local address"))
                })?;
            for _ in 0..threads {
                let l = net::reuseport_listener(addr, BACKLOG, socket_buffer)
                    .map_err(|e| bind_error(addr, e))?;
                sockets.push((
                    addr,
                    Socket::from(OwnedFd::from(std::net::TcpListener::from(l))),
                ));
            }
            // Held until every address is bound, so a port-0 choice cannot be taken by someone else meanwhile.
            probes.push(probe);
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
