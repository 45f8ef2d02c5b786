//! Socket plumbing through socket2: listeners, outbound connects, and the errno -> reply table.

use std::io;
use std::net::{IpAddr, SocketAddr};

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

/// A nonblocking listener with SO_REUSEPORT, so every worker can bind the same address and the kernel spreads
/// incoming connections across them. `socket_buffer` is inherited by every accepted connection.
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
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(backlog)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Starts a nonblocking connect to `addr`, from `bind` when given. The connect completes later: see
/// [`connect_state`]. `socket_buffer` as in [`set_socket_buffer`].
pub fn connect(
    addr: SocketAddr,
    bind: Option<IpAddr>,
    socket_buffer: Option<usize>,
) -> io::Result<TcpStream> {
    // SOCK_NONBLOCK at creation: two fcntl calls fewer per outbound connection than set_nonblocking.
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    set_socket_buffer(&socket, socket_buffer)?;
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
            if e.raw_os_error() == Some(libc::EINPROGRESS)
                || e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
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
        let out = connect(l.local_addr().unwrap(), None, Some(want)).unwrap();
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
