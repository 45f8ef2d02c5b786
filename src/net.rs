//! Socket plumbing through socket2: listeners, outbound connects, and the errno -> reply table.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mio::net::{TcpListener, TcpStream, UdpSocket};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::proto::Failure;

/// Sets SO_RCVBUF and SO_SNDBUF to `bytes` (`--socket-buffer`), or leaves the kernel's autotuning alone on `None`.
/// Set before listen/connect so the window advertised in the SYN is already small; an accepted socket inherits
/// the listener's values.
pub fn set_socket_buffer(socket: &Socket, bytes: Option<usize>) -> io::Result<()> {
    if let Some(n) = bytes {
        socket.set_recv_buffer_size(n)?;
        socket.set_send_buffer_size(n)?;
    }
    Ok(())
}

/// Per-connection TCP options of both legs (`--tcp-keepalive`, `--tcp-user-timeout`) and of the listeners
/// (`--tcp-fastopen`). Linux copies a listener's options to every socket it accepts, so the client leg gets them
/// from the listener at no cost per connection; the target leg sets them on each outbound socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpOptions {
    /// SO_KEEPALIVE with this idle time (TCP_KEEPIDLE); interval and count from [`keepalive_params`].
    pub keepalive: Option<Duration>,
    /// TCP_USER_TIMEOUT: how long sent data may stay unacknowledged before the connection is dropped.
    pub user_timeout: Option<Duration>,
    /// TCP_FASTOPEN on the listeners, with this queue length.
    pub fastopen: Option<i32>,
}

/// The TCP_FASTOPEN queue length `--tcp-fastopen` asks for (the kernel also caps it by net.core.somaxconn).
pub const FASTOPEN_QUEUE: i32 = 1024;

/// Keepalive for an idle time of `idle`: probes every idle/3 (1 s to 75 s, the kernel's default interval), three
/// of them, so a dead peer is noticed about twice the idle time after the last traffic.
pub fn keepalive_params(idle: Duration) -> socket2::TcpKeepalive {
    let interval = (idle / 3).clamp(Duration::from_secs(1), Duration::from_secs(75));
    socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(3)
}

impl TcpOptions {
    /// Sets the connection options (keepalive, user timeout) on a connection or a listener.
    pub fn apply(&self, socket: &Socket) -> io::Result<()> {
        if let Some(idle) = self.keepalive {
            socket.set_keepalive(true)?;
            socket.set_tcp_keepalive(&keepalive_params(idle))?;
        }
        if let Some(t) = self.user_timeout {
            socket.set_tcp_user_timeout(Some(t))?;
        }
        Ok(())
    }

    /// Sets what a listener hands on to the connections it accepts (TCP_NODELAY, keepalive, user timeout) and
    /// the TCP Fast Open queue. Works on a listening socket too (systemd's, or one inherited in an upgrade).
    /// Options left off are switched off, as a socket inherited from an upgrade may carry the old process's.
    pub fn apply_listener(&self, socket: &Socket) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // Inherited by every accepted socket: one setsockopt per listener instead of one per connection.
        socket.set_tcp_nodelay(true)?;
        socket.set_keepalive(self.keepalive.is_some())?;
        socket.set_tcp_user_timeout(None)?;
        self.apply(socket)?;
        match self.fastopen {
            Some(queue) => crate::sys::set_tcp_fastopen(socket.as_raw_fd(), queue)?,
            // A listener that never had TFO needs nothing; one that had it gets an empty queue.
            None => {
                if crate::sys::tcp_fastopen(socket.as_raw_fd()).unwrap_or(0) != 0 {
                    crate::sys::set_tcp_fastopen(socket.as_raw_fd(), 0)?;
                }
            }
        }
        Ok(())
    }
}

/// A nonblocking listener with SO_REUSEPORT, so every worker can bind the same address and the kernel spreads
/// incoming connections across them. `socket_buffer` is inherited by every accepted connection. Call
/// [`probe_exclusive`] first: SO_REUSEPORT alone would let a second socksgate (same user) join the port silently.
pub fn reuseport_listener(
    addr: SocketAddr,
    backlog: i32,
    socket_buffer: Option<usize>,
) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // Keep [::]:p and 0.0.0.0:p independent, so both can be listed with -l.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    set_socket_buffer(&socket, socket_buffer)?;
    // Accepted sockets inherit TCP_NODELAY: the worker does not set it per connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(backlog)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Binds `addr` without SO_REUSEPORT (with SO_REUSEADDR, so TIME_WAIT leftovers do not count): this fails with
/// `AddrInUse` when any process listens on the address, reuseport or not, which a reuseport bind would hide. The
/// returned socket is bound but not listening; while it is held, [`reuseport_listener`] binds to the same address
/// still succeed (two SO_REUSEADDR sockets conflict only when one listens), and port 0 is resolved once, here.
pub fn probe_exclusive(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&SockAddr::from(addr))?;
    Ok(socket)
}

/// Inodes of the TCP sockets listening on `addr` (or on an address overlapping it: the wildcard of its family).
/// Together with the inodes of our own sockets this tells whether another process shares the port: the check that
/// closes the window between two instances' probes and their listens. Asked of the kernel's sock_diag interface
/// (what `ss -lt` uses), which walks only listening sockets; /proc/net/tcp{,6}, which prints every TCP socket of the
/// host (a second or more on a gateway holding hundreds of thousands), is the fallback where netlink is refused.
pub fn listening_inodes(addr: SocketAddr) -> io::Result<Vec<u64>> {
    match diag_listening(addr) {
        Ok(inodes) => Ok(inodes),
        Err(e) => {
            log::debug!("sock_diag: {e}; reading /proc/net/tcp instead");
            proc_listening(addr)
        }
    }
}

/// [`listening_inodes`] through a NETLINK_SOCK_DIAG dump of the address family's listening TCP sockets.
fn diag_listening(addr: SocketAddr) -> io::Result<Vec<u64>> {
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
    };
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket as NlSocket, SocketAddr as NlAddr};

    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut sock = NlSocket::new(NETLINK_SOCK_DIAG)?;
    // The kernel answers a dump at once; the timeout only keeps a broken answer from stalling startup (then the
    // /proc fallback runs).
    socket2::SockRef::from(&sock).set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    sock.bind_auto()?;
    sock.connect(&NlAddr::new(0, 0))?;
    let (family, socket_id) = match addr {
        SocketAddr::V4(_) => (AF_INET, SocketId::new_v4()),
        SocketAddr::V6(_) => (AF_INET6, SocketId::new_v6()),
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::LISTEN,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut out = vec![0u8; request.buffer_len()];
    request.serialize(&mut out);
    sock.send(&out, 0)?;
    let mut inodes = Vec::new();
    // A dump arrives as datagrams of several messages each, at most a page or two apiece; 64 KiB never truncates.
    let mut buf = vec![0u8; 65536];
    loop {
        let n = sock.recv(&mut &mut buf[..], 0)?;
        let mut at = 0;
        while at < n {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[at..n])
                .map_err(|e| bad(format!("bad sock_diag message: {e}")))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let id = &r.header.socket_id;
                    if overlaps(addr, id.source_address, id.source_port) {
                        inodes.push(u64::from(r.header.inode));
                    }
                }
                NetlinkPayload::Done(_) => return Ok(inodes),
                NetlinkPayload::Error(e) => return Err(bad(format!("sock_diag refused: {e}"))),
                _ => {}
            }
            if len == 0 {
                return Err(bad("empty sock_diag message".into()));
            }
            at += len;
        }
    }
}

/// A listener on `ip`:`port` takes connections for `addr` (same port, same address, or a wildcard on either side).
fn overlaps(addr: SocketAddr, ip: IpAddr, port: u16) -> bool {
    port == addr.port() && (ip == addr.ip() || ip.is_unspecified() || addr.ip().is_unspecified())
}

/// [`listening_inodes`] from /proc/net/tcp{,6}.
fn proc_listening(addr: SocketAddr) -> io::Result<Vec<u64>> {
    let table = if addr.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let text = std::fs::read_to_string(table)?;
    Ok(parse_listening(&text, addr))
}

/// Parses a /proc/net/tcp{,6} table: LISTEN rows on `addr`'s port whose address equals or overlaps it.
fn parse_listening(text: &str, addr: SocketAddr) -> Vec<u64> {
    const TCP_LISTEN: &str = "0A";
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
            continue;
        };
        if *state != TCP_LISTEN {
            continue;
        }
        let Some((ip_hex, port_hex)) = local.split_once(':') else {
            continue;
        };
        let (Ok(port), Ok(inode)) = (u16::from_str_radix(port_hex, 16), inode.parse::<u64>())
        else {
            continue;
        };
        let Some(ip) = parse_proc_ip(ip_hex) else {
            continue;
        };
        if overlaps(addr, ip, port) {
            out.push(inode);
        }
    }
    out
}

/// The kernel prints addresses as 32-bit words in host byte order.
fn parse_proc_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// The inode of a socket we hold (as listed in /proc/net/tcp), from /proc/self/fd.
pub fn socket_inode(fd: &impl std::os::fd::AsRawFd) -> io::Result<u64> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    link.to_str()
        .and_then(|l| l.strip_prefix("socket:["))
        .and_then(|l| l.strip_suffix(']'))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a socket"))
}

/// A worker's listening socket: its own SO_REUSEPORT socket, or one copy of a socket every worker shares (passed
/// by systemd), which is registered with EPOLLEXCLUSIVE so a connection wakes one loop, not all of them.
pub struct Listener {
    inner: TcpListener,
    exclusive: bool,
}

impl std::os::fd::AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl Listener {
    /// Wraps a nonblocking listening socket; `shared` when other workers poll the same socket.
    pub fn new(inner: TcpListener, shared: bool) -> Listener {
        Listener {
            inner,
            exclusive: shared,
        }
    }

    /// Adds it to `registry` for readable events with `token`.
    pub fn register(&mut self, registry: &mio::Registry, token: mio::Token) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        if self.exclusive {
            crate::sys::epoll_add_exclusive(
                registry.as_raw_fd(),
                self.inner.as_raw_fd(),
                token.0 as u64,
            )
        } else {
            registry.register(&mut self.inner, token, mio::Interest::READABLE)
        }
    }

    /// Removes it from `registry`. Needed before closing a shared copy: epoll forgets a socket only when its last
    /// descriptor closes, and other workers still hold one.
    pub fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        if self.exclusive {
            crate::sys::epoll_del(registry.as_raw_fd(), self.inner.as_raw_fd())
        } else {
            registry.deregister(&mut self.inner)
        }
    }

    /// Accepts one pending connection.
    pub fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        self.inner.accept()
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Starts a nonblocking connect to `addr`, from `bind` when given. The connect completes later: see
/// [`connect_state`]. `socket_buffer` as in [`set_socket_buffer`], `opts` as in [`TcpOptions::apply`].
pub fn connect(
    addr: SocketAddr,
    bind: Option<IpAddr>,
    (socket_buffer, opts): (Option<usize>, &TcpOptions),
) -> io::Result<TcpStream> {
    let socket = stream_socket(addr, socket_buffer, opts)?;
    if let Some(ip) = bind {
        if ip.is_ipv4() != addr.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "outbound --bind address is of the other IP family",
            ));
        }
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    start_connect(socket, addr)
}

/// A nonblocking TCP socket for an outbound connection to `addr`'s family, with TCP_NODELAY, `--socket-buffer`
/// and the connection options.
fn stream_socket(
    addr: SocketAddr,
    socket_buffer: Option<usize>,
    opts: &TcpOptions,
) -> io::Result<Socket> {
    // SOCK_NONBLOCK at creation: two fcntl calls fewer per outbound connection than set_nonblocking.
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    set_socket_buffer(&socket, socket_buffer)?;
    opts.apply(&socket)?;
    Ok(socket)
}

/// Starts the nonblocking connect; EINPROGRESS is the normal answer.
fn start_connect(socket: Socket, addr: SocketAddr) -> io::Result<TcpStream> {
    match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        Err(e)
            if e.raw_os_error() == Some(libc::EINPROGRESS)
                || e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// Starts a nonblocking connect to `addr` from the egress address `source` of a user's policy. With `freebind`
/// (an address picked from a block) the address need not be configured on an interface (IP_FREEBIND). A source
/// that cannot be bound is an `Other` error, which [`failure_of`] reports as a general failure: the gateway's
/// configuration failed, not the target.
pub fn connect_from(
    addr: SocketAddr,
    source: IpAddr,
    freebind: bool,
    (socket_buffer, opts): (Option<usize>, &TcpOptions),
) -> io::Result<TcpStream> {
    let socket = stream_socket(addr, socket_buffer, opts)?;
    bind_source(&socket, SocketAddr::new(source, 0), freebind)?;
    start_connect(socket, addr)
}

/// Binds `socket` to an egress address (see [`connect_from`]); failures become `Other` errors naming the address.
fn bind_source(socket: &Socket, source: SocketAddr, freebind: bool) -> io::Result<()> {
    let bound = (|| {
        if freebind {
            match source {
                SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
                SocketAddr::V6(_) => socket.set_freebind_v6(true)?,
            }
        }
        socket.bind(&SockAddr::from(source))
    })();
    bound.map_err(|e| io::Error::other(format!("cannot bind egress address {}: {e}", source.ip())))
}

/// A nonblocking UDP socket bound to a user's egress address (port chosen by the kernel).
pub fn udp_socket_from(source: IpAddr, freebind: bool) -> io::Result<UdpSocket> {
    let addr = SocketAddr::new(source, 0);
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    bind_source(&socket, addr, freebind)?;
    Ok(UdpSocket::from_std(socket.into()))
}

/// A nonblocking single-use BIND listener on a user's egress address.
pub fn bind_listener_from(
    source: IpAddr,
    freebind: bool,
    socket_buffer: Option<usize>,
) -> io::Result<TcpListener> {
    let addr = SocketAddr::new(source, 0);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    set_socket_buffer(&socket, socket_buffer)?;
    socket.set_nonblocking(true)?;
    bind_source(&socket, addr, freebind)?;
    socket.listen(1)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Where a nonblocking connect stands.
#[derive(Debug)]
pub enum ConnectState {
    /// Established.
    Connected,
    /// Not finished yet (a spurious wakeup).
    Pending,
    /// Failed with this error.
    Failed(io::Error),
}

/// mio's recipe for a nonblocking connect: on a writable (or error) event, `take_error`, then `peer_addr`.
pub fn connect_state(stream: &TcpStream) -> ConnectState {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) => return ConnectState::Failed(e),
        Ok(None) => {}
    }
    match stream.peer_addr() {
        Ok(_) => ConnectState::Connected,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => ConnectState::Pending,
        Err(e) => ConnectState::Failed(e),
    }
}

/// The one table from connect errors to reply codes (RFC 1928 §6 REP; HTTP status via [`Failure::http_status`]).
pub fn failure_of(err: &io::Error) -> Failure {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => Failure::ConnectionRefused,
        io::ErrorKind::NetworkUnreachable => Failure::NetworkUnreachable,
        io::ErrorKind::HostUnreachable
        | io::ErrorKind::NotFound
        | io::ErrorKind::AddrNotAvailable => Failure::HostUnreachable,
        io::ErrorKind::TimedOut => Failure::TimedOut,
        io::ErrorKind::PermissionDenied => Failure::NotAllowed,
        _ => Failure::General,
    }
}

/// True for errors that mean "out of file descriptors or kernel memory": pause accepting instead of spinning.
pub fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// A nonblocking UDP socket bound to `addr` (port 0 = kernel's choice).
pub fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::from(addr))?;
    Ok(UdpSocket::from_std(socket.into()))
}

/// A nonblocking single-use listener for SOCKS BIND; its accepted connection inherits `socket_buffer`.
pub fn bind_listener(addr: SocketAddr, socket_buffer: Option<usize>) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    set_socket_buffer(&socket, socket_buffer)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(1)?;
    Ok(TcpListener::from_std(socket.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock_of(stream: &TcpStream) -> socket2::SockRef<'_> {
        socket2::SockRef::from(stream)
    }

    /// Accepts the one connection `client` made to `listener` (a nonblocking listener: loopback connects are
    /// already established when connect returns, so the wait is bounded and short).
    fn accept_one(listener: &TcpListener) -> TcpStream {
        for _ in 0..2000 {
            match listener.accept() {
                Ok((s, _)) => return s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        panic!("no connection to accept");
    }

    #[test]
    fn accepted_sockets_inherit_the_listener_options() {
        use std::os::fd::AsRawFd;
        let opts = TcpOptions {
            keepalive: Some(Duration::from_secs(30)),
            user_timeout: Some(Duration::from_millis(20_000)),
            fastopen: Some(FASTOPEN_QUEUE),
        };
        let listener = reuseport_listener(SocketAddr::from(([127, 0, 0, 1], 0)), 16, None).unwrap();
        opts.apply_listener(&socket2::SockRef::from(&listener))
            .unwrap();
        assert_eq!(
            crate::sys::tcp_fastopen(listener.as_raw_fd()).unwrap(),
            FASTOPEN_QUEUE
        );
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let accepted = accept_one(&listener);
        let s = sock_of(&accepted);
        assert!(s.tcp_nodelay().unwrap(), "TCP_NODELAY from the listener");
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(30));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(10));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 3);
        assert_eq!(
            s.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(20_000))
        );
        // Switched off again (as for a listener inherited from a process that had them on).
        TcpOptions::default()
            .apply_listener(&socket2::SockRef::from(&listener))
            .unwrap();
        assert_eq!(crate::sys::tcp_fastopen(listener.as_raw_fd()).unwrap(), 0);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let accepted = accept_one(&listener);
        let s = sock_of(&accepted);
        assert!(s.tcp_nodelay().unwrap(), "TCP_NODELAY always");
        assert!(!s.keepalive().unwrap());
        assert_eq!(s.tcp_user_timeout().unwrap(), None);
    }

    #[test]
    fn outbound_sockets_get_the_connection_options() {
        let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = target.local_addr().unwrap();
        let opts = TcpOptions {
            keepalive: Some(Duration::from_secs(600)),
            user_timeout: Some(Duration::from_secs(5)),
            fastopen: None,
        };
        for stream in [
            connect(addr, None, (None, &opts)).unwrap(),
            connect_from(addr, IpAddr::from([127, 0, 0, 1]), false, (None, &opts)).unwrap(),
        ] {
            let s = sock_of(&stream);
            assert!(s.tcp_nodelay().unwrap());
            assert!(s.keepalive().unwrap());
            assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(600));
            assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(75));
            assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(5)));
        }
        let plain = connect(addr, None, (None, &TcpOptions::default())).unwrap();
        assert!(!sock_of(&plain).keepalive().unwrap());
        assert_eq!(sock_of(&plain).tcp_user_timeout().unwrap(), None);
    }

    #[test]
    fn keepalive_interval_is_a_third_of_the_idle_time_within_bounds() {
        let params = |secs| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_tcp_keepalive(&keepalive_params(Duration::from_secs(secs)))
                .unwrap();
            s.tcp_keepalive_interval().unwrap()
        };
        assert_eq!(params(2), Duration::from_secs(1));
        assert_eq!(params(60), Duration::from_secs(20));
        assert_eq!(params(7200), Duration::from_secs(75));
    }

    #[test]
    fn error_table() {
        let e = |k| io::Error::from(k);
        assert_eq!(
            failure_of(&e(io::ErrorKind::ConnectionRefused)),
            Failure::ConnectionRefused
        );
        assert_eq!(failure_of(&e(io::ErrorKind::TimedOut)), Failure::TimedOut);
        assert_eq!(
            failure_of(&io::Error::from_raw_os_error(libc::ENETUNREACH)),
            Failure::NetworkUnreachable
        );
        assert_eq!(
            failure_of(&io::Error::from_raw_os_error(libc::EHOSTUNREACH)),
            Failure::HostUnreachable
        );
        assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(!is_resource_exhaustion(&e(
            io::ErrorKind::ConnectionRefused
        )));
    }

    #[test]
    fn probe_fails_on_a_reuseport_listener_and_holds_port_zero() {
        let probe = probe_exclusive("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = probe.local_addr().unwrap().as_socket().unwrap();
        assert_ne!(addr.port(), 0);
        // While the probe is held, our own reuseport set binds the same port.
        let l = reuseport_listener(addr, 16, None).unwrap();
        drop(probe);
        assert_eq!(
            probe_exclusive(addr).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        let inodes = listening_inodes(addr).unwrap();
        assert_eq!(inodes, vec![socket_inode(&l).unwrap()]);
    }

    #[test]
    fn sock_diag_and_proc_agree_on_listeners() {
        let v4 = reuseport_listener("127.0.0.1:0".parse().unwrap(), 16, None).unwrap();
        let a4 = v4.local_addr().unwrap();
        // A second listener of the same reuseport group, and a socket connected to the port, which is no listener.
        let v4b = reuseport_listener(a4, 16, None).unwrap();
        let _conn = std::net::TcpStream::connect(a4).unwrap();
        let mut want = vec![socket_inode(&v4).unwrap(), socket_inode(&v4b).unwrap()];
        want.sort();
        let mut diag = match diag_listening(a4) {
            Ok(d) => d,
            // A sandbox without NETLINK_SOCK_DIAG (gVisor, some containers): the /proc path below still runs.
            Err(e) if e.raw_os_error().is_some() => {
                eprintln!("no sock_diag here ({e}): only the /proc path is checked");
                let mut proc = proc_listening(a4).unwrap();
                proc.sort();
                assert_eq!(proc, want);
                return;
            }
            Err(e) => panic!("sock_diag answered something undecodable: {e}"),
        };
        diag.sort();
        assert_eq!(diag, want);
        let mut proc = proc_listening(a4).unwrap();
        proc.sort();
        assert_eq!(proc, want);
        // The wildcard of the family overlaps a specific address of it.
        let any: SocketAddr = format!("0.0.0.0:{}", a4.port()).parse().unwrap();
        assert_eq!(diag_listening(any).unwrap().len(), 2);
        if let Ok(v6) = reuseport_listener("[::1]:0".parse().unwrap(), 16, None) {
            let a6 = v6.local_addr().unwrap();
            assert_eq!(
                diag_listening(a6).unwrap(),
                vec![socket_inode(&v6).unwrap()]
            );
            assert_eq!(
                proc_listening(a6).unwrap(),
                vec![socket_inode(&v6).unwrap()]
            );
        }
    }

    #[test]
    fn proc_net_tcp_rows() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:0438 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0\n\
   1: 00000000:0438 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0\n\
   2: 0100007F:0438 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0\n\
   3: 0200007F:0438 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 444 1 0\n";
        let got = parse_listening(text, "127.0.0.1:1080".parse().unwrap());
        assert_eq!(got, vec![111, 222]);
        let six = "header\n 0: 00000000000000000000000001000000:0438 00000000000000000000000000000000:0000 0A 0 0 0 0 0 555 1\n";
        assert_eq!(
            parse_listening(six, "[::1]:1080".parse().unwrap()),
            vec![555]
        );
    }

    #[test]
    fn reuseport_allows_many_binds() {
        let a = reuseport_listener("127.0.0.1:0".parse().unwrap(), 16, None).unwrap();
        let addr = a.local_addr().unwrap();
        let b = reuseport_listener(addr, 16, None).unwrap();
        assert_eq!(b.local_addr().unwrap(), addr);
    }

    #[test]
    fn socket_buffer_reaches_accepted_and_outbound_sockets() {
        // Linux reports twice the value set (bookkeeping overhead); small values are below every rmem_max.
        let want = 16 * 1024;
        let l = reuseport_listener("127.0.0.1:0".parse().unwrap(), 16, Some(want)).unwrap();
        let out = connect(
            l.local_addr().unwrap(),
            None,
            (Some(want), &TcpOptions::default()),
        )
        .unwrap();
        let out = socket2::SockRef::from(&out);
        assert_eq!(out.recv_buffer_size().unwrap(), 2 * want);
        assert_eq!(out.send_buffer_size().unwrap(), 2 * want);
        let start = std::time::Instant::now();
        let accepted = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(start.elapsed().as_secs() < 20, "no connection to accept");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        let accepted = socket2::SockRef::from(&accepted);
        assert_eq!(accepted.recv_buffer_size().unwrap(), 2 * want);
        assert_eq!(accepted.send_buffer_size().unwrap(), 2 * want);
    }
}
