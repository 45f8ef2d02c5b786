//! Socket plumbing through socket2: listeners, outbound connects, and the errno -> reply table.

use std::io;
use std::net::{IpAddr, SocketAddr};

use mio::net::{TcpListener, TcpStream, UdpSocket};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::proto::Failure;

/// A nonblocking listener with SO_REUSEPORT, so every worker can bind the same address and the kernel spreads
/// incoming connections across them.
pub fn reuseport_listener(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // Keep [::]:p and 0.0.0.0:p independent, so both can be listed with -l.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(backlog)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Starts a nonblocking connect to `addr`, from `bind` when given. The connect completes later: see
/// [`connect_state`].
pub fn connect(addr: SocketAddr, bind: Option<IpAddr>) -> io::Result<TcpStream> {
    // SOCK_NONBLOCK at creation: two fcntl calls fewer per outbound connection than set_nonblocking.
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = bind {
        if ip.is_ipv4() != addr.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "outbound --bind address is of the other IP family",
            ));
        }
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        Err(e)
            if e.raw_os_error() == Some(EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// Starts a nonblocking connect to `addr` from the egress address `source` of a user's policy. With `freebind`
/// (an address picked from a block) the address need not be configured on an interface (IP_FREEBIND). A source
/// that cannot be bound is an `Other` error, which [`failure_of`] reports as a general failure: the gateway's
/// configuration failed, not the target.
pub fn connect_from(addr: SocketAddr, source: IpAddr, freebind: bool) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    bind_source(&socket, SocketAddr::new(source, 0), freebind)?;
    match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        Err(e)
            if e.raw_os_error() == Some(EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
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
pub fn bind_listener_from(source: IpAddr, freebind: bool) -> io::Result<TcpListener> {
    let addr = SocketAddr::new(source, 0);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    bind_source(&socket, addr, freebind)?;
    socket.listen(1)?;
    Ok(TcpListener::from_std(socket.into()))
}

const EINPROGRESS: i32 = 115;
const ENFILE: i32 = 23;
const EMFILE: i32 = 24;
const ENOBUFS: i32 = 105;
const ENOMEM: i32 = 12;

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
    matches!(err.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
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

/// A nonblocking single-use listener for SOCKS BIND.
pub fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(1)?;
    Ok(TcpListener::from_std(socket.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_table() {
        let e = |k| io::Error::from(k);
        assert_eq!(
            failure_of(&e(io::ErrorKind::ConnectionRefused)),
            Failure::ConnectionRefused
        );
        assert_eq!(failure_of(&e(io::ErrorKind::TimedOut)), Failure::TimedOut);
        assert_eq!(
            failure_of(&io::Error::from_raw_os_error(101)),
            Failure::NetworkUnreachable
        );
        assert_eq!(
            failure_of(&io::Error::from_raw_os_error(113)),
            Failure::HostUnreachable
        );
        assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(24)));
        assert!(!is_resource_exhaustion(&e(
            io::ErrorKind::ConnectionRefused
        )));
    }

    #[test]
    fn reuseport_allows_many_binds() {
        let a = reuseport_listener("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = a.local_addr().unwrap();
        let b = reuseport_listener(addr, 16).unwrap();
        assert_eq!(b.local_addr().unwrap(), addr);
    }
}
