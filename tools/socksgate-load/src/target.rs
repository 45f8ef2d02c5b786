//! Built-in targets, run inside this process so a benchmark needs nothing else.
//!
//! The TCP targets are mio event loops, one per core, each with its own SO_REUSEPORT
//! listener, so tens of thousands of short connections per second (connrate) or
//! hundreds of thousands of idle ones (idle) never make the target the bottleneck.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

use crate::client::find;

/// What a TCP target does with each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Read and discard everything (throughput up).
    Sink,
    /// Write as fast as the peer reads (throughput down).
    Source,
    /// Echo everything, keep the connection open (latency, idle).
    Echo,
    /// Echo, and close as soon as this many bytes were echoed: the target closes first
    /// so TIME_WAIT stays on its side, not on the client's ephemeral ports (connrate).
    EchoClose(usize),
    /// Minimal keep-alive HTTP/1.1 origin answering every request with a 64-byte body.
    Http,
}

/// How long a target loop sleeps in poll before checking whether it should stop.
const POLL_TICK: Duration = Duration::from_millis(100);
/// Reads or writes per connection per wakeup, so one busy stream cannot starve others.
const BUDGET: usize = 16;
/// Size of reads and of the source's writes.
const CHUNK: usize = 256 * 1024;
/// Largest HTTP request head we buffer before answering 400.
const MAX_HEAD: usize = 64 * 1024;
/// Largest HTTP request body we are willing to skip.
const MAX_BODY: usize = 1024 * 1024;
/// Datagrams the UDP echo takes from one socket per readiness event before it serves the others.
const UDP_BUDGET: usize = 256;
/// Body of every HTTP response: exactly 64 bytes.
pub(crate) const HTTP_BODY: &[u8; 64] =
    b"socksgate-load origin: 64 byte body for http mode benchmarks..\r\n";

/// A running TCP target; stopped and joined on drop.
pub(crate) struct TcpTarget {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TcpTarget {
    /// Start `kind` on 127.0.0.1 (and ::1 on the same port when possible).
    pub(crate) fn start(kind: Kind) -> io::Result<Self> {
        Self::start_on(kind, 0)
    }

    /// Start `kind` on 127.0.0.1:`port` (0 picks a free port).
    pub(crate) fn start_on(kind: Kind, port: u16) -> io::Result<Self> {
        let n = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 4);
        let first = bind_listener(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))?;
        let addr = first.local_addr()?;
        let mut sets = vec![vec![first]];
        for _ in 1..n {
            sets.push(vec![bind_listener(addr)?]);
        }
        // socks5h/socks4a proxies resolve "localhost" themselves and may try ::1 first,
        // so listen there too when the port is free; the tunnel still works without it.
        let v6 = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port());
        let v6_listeners: io::Result<Vec<_>> = (0..n).map(|_| bind_listener(v6)).collect();
        if let Ok(v6_listeners) = v6_listeners {
            for (set, l) in sets.iter_mut().zip(v6_listeners) {
                set.push(l);
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (i, set) in sets.into_iter().enumerate() {
            let stop = stop.clone();
            // Set up the poll here, not in the thread, so every fd of the target exists
            // when start() returns (idle mode takes its fd baseline right after).
            let (poll, listeners) = prepare_tcp(set)?;
            let t = std::thread::Builder::new()
                .name(format!("target-{i}"))
                .spawn(move || {
                    if let Err(e) = serve_tcp(kind, poll, listeners, &stop) {
                        eprintln!("built-in target failed: {e}");
                    }
                })?;
            threads.push(t);
        }
        Ok(TcpTarget {
            addr,
            stop,
            threads,
        })
    }

    /// The IPv4 address clients should use.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TcpTarget {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Nonblocking listener with SO_REUSEPORT so every target thread can own one.
fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Per-connection state of a TCP target.
struct Conn {
    sock: TcpStream,
    out: Vec<u8>,
    out_pos: usize,
    inbuf: Vec<u8>,
    seen: usize,
    close_after_flush: bool,
}

/// What to do with a connection after servicing it.
enum Next {
    /// Wait for the next readiness event.
    Keep,
    /// Drop it (closes the socket).
    Close,
    /// Budget used up with work left: service again without waiting for an event.
    Retry,
}

/// Precomputed HTTP responses.
struct Responses {
    keep: Vec<u8>,
    close: Vec<u8>,
    bad: Vec<u8>,
}

impl Responses {
    /// Build the three responses once per thread instead of formatting per request.
    fn new() -> Self {
        let mk = |extra: &str| {
            let mut r = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}\r\n",
                HTTP_BODY.len()
            )
            .into_bytes();
            r.extend_from_slice(HTTP_BODY);
            r
        };
        Responses {
            keep: mk(""),
            close: mk("Connection: close\r\n"),
            bad: b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec(),
        }
    }
}

/// Create the poll of one target thread with its listeners registered.
fn prepare_tcp(listeners: Vec<std::net::TcpListener>) -> io::Result<(Poll, Vec<TcpListener>)> {
    let poll = Poll::new()?;
    let mut listeners: Vec<TcpListener> =
        listeners.into_iter().map(TcpListener::from_std).collect();
    for (i, l) in listeners.iter_mut().enumerate() {
        poll.registry().register(l, Token(i), Interest::READABLE)?;
    }
    Ok((poll, listeners))
}

/// Event loop of one target thread.
fn serve_tcp(
    kind: Kind,
    mut poll: Poll,
    listeners: Vec<TcpListener>,
    stop: &AtomicBool,
) -> io::Result<()> {
    let base = listeners.len();
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; CHUNK];
    let pattern: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
    let responses = Responses::new();
    let mut retry: Vec<usize> = Vec::new();
    let mut now_retry: Vec<usize> = Vec::new();
    while !stop.load(Relaxed) {
        let timeout = if retry.is_empty() {
            POLL_TICK
        } else {
            Duration::ZERO
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        std::mem::swap(&mut retry, &mut now_retry);
        let tokens = events
            .iter()
            .map(|e| e.token().0)
            .chain(now_retry.drain(..));
        for t in tokens {
            if t < base {
                if !accept_all(&poll, &listeners[t], base, &mut conns, &mut free) {
                    retry.push(t);
                }
                continue;
            }
            let idx = t - base;
            let Some(Some(c)) = conns.get_mut(idx) else {
                continue;
            };
            match service(kind, c, &mut scratch, &pattern, &responses) {
                Next::Keep => {}
                Next::Retry => retry.push(t),
                Next::Close => {
                    conns[idx] = None;
                    free.push(idx);
                }
            }
        }
    }
    Ok(())
}

/// Accept until the backlog is empty; false if accepting failed (e.g. out of fds) and
/// should be retried later.
fn accept_all(
    poll: &Poll,
    l: &TcpListener,
    base: usize,
    conns: &mut Vec<Option<Conn>>,
    free: &mut Vec<usize>,
) -> bool {
    loop {
        match l.accept() {
            Ok((mut sock, _)) => {
                let _ = sock.set_nodelay(true);
                let idx = free.pop().unwrap_or_else(|| {
                    conns.push(None);
                    conns.len() - 1
                });
                let interest = Interest::READABLE | Interest::WRITABLE;
                if poll
                    .registry()
                    .register(&mut sock, Token(base + idx), interest)
                    .is_err()
                {
                    free.push(idx);
                    continue;
                }
                conns[idx] = Some(Conn {
                    sock,
                    out: Vec::new(),
                    out_pos: 0,
                    inbuf: Vec::new(),
                    seen: 0,
                    close_after_flush: false,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                // Typically EMFILE: back off a little instead of spinning on the error.
                std::thread::sleep(Duration::from_millis(1));
                return false;
            }
        }
    }
}

/// Do as much work on one connection as its budget allows.
fn service(
    kind: Kind,
    c: &mut Conn,
    scratch: &mut [u8],
    pattern: &[u8],
    responses: &Responses,
) -> Next {
    match kind {
        Kind::Sink => {
            for _ in 0..BUDGET {
                match c.sock.read(scratch) {
                    Ok(0) => return Next::Close,
                    Ok(_) => {}
                    Err(e) => return io_next(&e),
                }
            }
            Next::Retry
        }
        Kind::Source => {
            // Read too, to notice the client leaving even while our writes still succeed.
            loop {
                match c.sock.read(scratch) {
                    Ok(0) => return Next::Close,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return io_next(&e),
                }
            }
            for _ in 0..BUDGET {
                match c.sock.write(pattern) {
                    Ok(0) => return Next::Close,
                    Ok(_) => {}
                    Err(e) => return io_next(&e),
                }
            }
            Next::Retry
        }
        Kind::Echo | Kind::EchoClose(_) | Kind::Http => {
            for _ in 0..BUDGET {
                while c.out_pos < c.out.len() {
                    match c.sock.write(&c.out[c.out_pos..]) {
                        Ok(0) => return Next::Close,
                        Ok(n) => c.out_pos += n,
                        Err(e) => return io_next(&e),
                    }
                }
                c.out.clear();
                c.out_pos = 0;
                if c.close_after_flush {
                    return Next::Close;
                }
                match c.sock.read(scratch) {
                    Ok(0) => return Next::Close,
                    Ok(n) => process(kind, c, &scratch[..n], responses),
                    Err(e) => return io_next(&e),
                }
            }
            Next::Retry
        }
    }
}

/// Map an I/O error to the next step: wait on WouldBlock, retry on EINTR, else close.
fn io_next(e: &io::Error) -> Next {
    match e.kind() {
        io::ErrorKind::WouldBlock => Next::Keep,
        io::ErrorKind::Interrupted => Next::Retry,
        _ => Next::Close,
    }
}

/// Turn received bytes into output for the echo and HTTP kinds.
fn process(kind: Kind, c: &mut Conn, data: &[u8], responses: &Responses) {
    match kind {
        Kind::Echo => c.out.extend_from_slice(data),
        Kind::EchoClose(limit) => {
            c.out.extend_from_slice(data);
            c.seen += data.len();
            if c.seen >= limit {
                c.close_after_flush = true;
            }
        }
        Kind::Http => {
            c.inbuf.extend_from_slice(data);
            http_answer(c, responses);
        }
        Kind::Sink | Kind::Source => {}
    }
}

/// Answer every complete request in the buffer (pipelining works as a side effect).
fn http_answer(c: &mut Conn, responses: &Responses) {
    while !c.close_after_flush {
        let Some(end) = find(&c.inbuf, b"\r\n\r\n") else {
            if c.inbuf.len() > MAX_HEAD {
                c.out.extend_from_slice(&responses.bad);
                c.close_after_flush = true;
            }
            return;
        };
        let Some(req) = parse_request_head(&c.inbuf[..end]) else {
            c.out.extend_from_slice(&responses.bad);
            c.close_after_flush = true;
            return;
        };
        if req.content_length > MAX_BODY {
            c.out.extend_from_slice(&responses.bad);
            c.close_after_flush = true;
            return;
        }
        let total = end + 4 + req.content_length;
        if c.inbuf.len() < total {
            return;
        }
        c.inbuf.drain(..total);
        if req.close {
            c.out.extend_from_slice(&responses.close);
            c.close_after_flush = true;
        } else {
            c.out.extend_from_slice(&responses.keep);
        }
    }
}

/// The parts of a request head the origin needs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RequestHead {
    /// Body bytes to skip before the next request.
    pub(crate) content_length: usize,
    /// Whether the client asked to close after this response.
    pub(crate) close: bool,
}

/// Parse a request head (without the final CRLFCRLF); None means 400.
pub(crate) fn parse_request_head(head: &[u8]) -> Option<RequestHead> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let (_method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || target.is_empty() || !version.starts_with("HTTP/1.") {
        return None;
    }
    let mut req = RequestHead {
        content_length: 0,
        close: version == "HTTP/1.0",
    };
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            req.content_length = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked request bodies are out of scope for a benchmark origin.
            return None;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    req.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    req.close = false;
                }
            }
        }
    }
    Some(req)
}

/// A running UDP echo target; stopped and joined on drop.
pub(crate) struct UdpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    /// Start the echo on 127.0.0.1 (and ::1 on the same port when possible).
    pub(crate) fn start() -> io::Result<Self> {
        Self::start_on(0)
    }

    /// Start the echo on 127.0.0.1:`port` (0 picks a free port).
    pub(crate) fn start_on(port: u16) -> io::Result<Self> {
        let v4 = std::net::UdpSocket::bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))?;
        let addr = v4.local_addr()?;
        let mut socks = vec![v4];
        if let Ok(v6) = std::net::UdpSocket::bind(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            addr.port(),
        )) {
            socks.push(v6);
        }
        for s in &socks {
            s.set_nonblocking(true)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (poll, socks) = prepare_udp(socks)?;
        let thread = std::thread::Builder::new()
            .name("udp-echo".into())
            .spawn(move || {
                if let Err(e) = serve_udp(poll, socks, &stop2) {
                    eprintln!("built-in UDP echo failed: {e}");
                }
            })?;
        Ok(UdpEcho {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The IPv4 address clients should use.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Create the UDP echo's poll with its sockets registered (before its thread starts).
fn prepare_udp(socks: Vec<std::net::UdpSocket>) -> io::Result<(Poll, Vec<UdpSocket>)> {
    let poll = Poll::new()?;
    let mut socks: Vec<UdpSocket> = socks.into_iter().map(UdpSocket::from_std).collect();
    for (i, s) in socks.iter_mut().enumerate() {
        poll.registry().register(s, Token(i), Interest::READABLE)?;
    }
    Ok((poll, socks))
}

/// Event loop of the UDP echo.
fn serve_udp(mut poll: Poll, socks: Vec<UdpSocket>, stop: &AtomicBool) -> io::Result<()> {
    let mut events = Events::with_capacity(64);
    let mut buf = vec![0u8; 65536];
    let mut busy = vec![false; socks.len()];
    while !stop.load(Relaxed) {
        let timeout = if busy.iter().any(|&b| b) {
            Duration::ZERO
        } else {
            POLL_TICK
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in events.iter() {
            busy[ev.token().0] = true;
        }
        for (i, s) in socks.iter().enumerate() {
            if !busy[i] {
                continue;
            }
            busy[i] = false;
            let mut drained = false;
            for _ in 0..UDP_BUDGET {
                match s.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        // A full send buffer drops the echo, which the client counts as loss.
                        let _ = s.send_to(&buf[..n], from);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    Err(_) => {}
                }
            }
            busy[i] = !drained;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        assert_eq!(
            parse_request_head(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1"),
            Some(RequestHead {
                content_length: 0,
                close: false
            })
        );
        assert_eq!(
            parse_request_head(b"POST / HTTP/1.1\r\ncontent-length: 5\r\nConnection: close"),
            Some(RequestHead {
                content_length: 5,
                close: true
            })
        );
        assert!(parse_request_head(b"GET / HTTP/1.0").unwrap().close);
        assert!(
            !parse_request_head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive")
                .unwrap()
                .close
        );
        assert_eq!(parse_request_head(b"GARBAGE"), None);
        assert_eq!(parse_request_head(b"GET / HTTP/1.1\r\nbad header"), None);
    }

    #[test]
    fn echo_close_target_closes_first() {
        let t = TcpTarget::start(Kind::EchoClose(4)).unwrap();
        let mut s = std::net::TcpStream::connect(t.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"ping").unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ping");
    }

    #[test]
    fn http_origin_keeps_alive() {
        let t = TcpTarget::start(Kind::Http).unwrap();
        let mut s = std::net::TcpStream::connect(t.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        s.write_all(&[&req[..], &req[..]].concat()).unwrap();
        let one = Responses::new().keep;
        let mut got = vec![0u8; one.len() * 2];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got[..one.len()], &one[..]);
        assert_eq!(&got[one.len()..], &one[..]);
    }

    #[test]
    fn udp_echo_echoes() {
        let e = UdpEcho::start().unwrap();
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(b"hello", e.addr()).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = s.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"hello"[..], e.addr()));
    }
}
