//! One client connection and everything it owns.
//!
//! ```text
//!            accept
//!              |
//!      [ProxyHeader] --(--proxy-protocol)--+
//!              |                            |
//!           [Detect] <---------------------+
//!        /     |      \
//! Socks5*  Socks4Request  HttpHead ------------------------+
//!        \     |      /                                     |
//!   [Resolving] -> [Connecting] -> [UpstreamHandshake]      | (absolute-form)
//!                        |                |                 v
//!                     [Relay] <-----------+            [Http forwarding]
//!                        |
//!   any failure reply -> [Linger] -> close
//! ```
//!
//! Every socket a connection owns (client, upstream, UDP relay, BIND listener) is reached through its one slab
//! entry, so there is exactly one removal: `Worker::close`.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use crate::auth::Authorized;
use crate::buffer::Buffer;
use crate::metrics::Proto;
use crate::proto::TargetAddr;
use crate::tls::TlsSession;

use super::access::RequestLog;
use super::bind::BindState;
use super::close::CloseReason;
use super::http::HttpState;
use super::udp::UdpState;
use super::upstream::UpstreamHandshake;

/// A TCP socket and the readiness we have seen for it but not yet used up (edge-triggered: an event bit is cleared
/// only when an operation returns `WouldBlock`).
///
/// With TLS (`tls` set) the socket carries records and `read`/`write_some` move plaintext through the session;
/// `readable`/`writable` then mirror the session's view (plaintext held by rustls counts as readable), so the
/// phases above work unchanged whether the client speaks TLS or not.
pub struct Sock {
    /// The socket.
    pub stream: TcpStream,
    /// A read may make progress.
    pub readable: bool,
    /// A write may make progress.
    pub writable: bool,
    /// The kernel reported an error (typically a reset) on this socket.
    pub error: bool,
    /// The peer's FIN (or an error) was reported: keep reading until EOF even after short reads.
    pub read_closed: bool,
    /// The TLS session when this socket speaks TLS.
    pub tls: Option<Box<TlsSession>>,
}

impl Sock {
    /// Wraps a freshly registered socket; readiness arrives with the first events.
    pub fn new(stream: TcpStream) -> Sock {
        Sock {
            stream,
            readable: false,
            writable: false,
            error: false,
            read_closed: false,
            tls: None,
        }
    }

    /// Switches this socket to TLS: `prefix` is what was already read from it (the start of the ClientHello).
    /// On error the session stays attached, so its failure is logged and counted.
    pub fn start_tls(&mut self, session: TlsSession, prefix: &[u8]) -> io::Result<()> {
        let mut session = Box::new(session);
        session.set_ready(self.readable, self.writable, self.read_closed);
        let r = session.feed(&mut self.stream, prefix);
        self.tls = Some(session);
        self.sync_tls();
        r
    }

    /// True when this socket speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Everything written so far has reached the kernel (always, without TLS: rustls may still hold records).
    pub fn flushed(&self) -> bool {
        self.tls.as_ref().is_none_or(|t| t.flushed())
    }

    /// Half-closes our direction: `shutdown(Write)`, or with TLS close_notify first (the FIN follows once every
    /// record is out).
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        match self.tls.as_mut() {
            Some(t) => {
                let r = t.shutdown_write(&mut self.stream);
                self.sync_tls();
                r
            }
            None => self.stream.shutdown(std::net::Shutdown::Write),
        }
    }

    /// Before the socket is dropped: with TLS a close_notify when `graceful`, and whatever records the kernel
    /// takes now.
    pub fn close_tls(&mut self, graceful: bool) {
        if let Some(t) = self.tls.as_mut() {
            t.close(&mut self.stream, graceful);
        }
    }

    fn sync_tls(&mut self) {
        if let Some(t) = self.tls.as_ref() {
            self.readable = t.readable();
            self.writable = t.writable();
        }
    }

    /// Records an event's readiness. Errors and hang-ups count as both, so the next read or write reports them.
    pub fn mark(&mut self, ev: &mio::event::Event) {
        let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
        let writable = ev.is_writable() || ev.is_write_closed() || ev.is_error();
        if ev.is_error() {
            self.error = true;
        }
        if ev.is_read_closed() || ev.is_error() {
            self.read_closed = true;
        }
        let Some(t) = self.tls.as_mut() else {
            self.readable |= readable;
            self.writable |= writable;
            return;
        };
        t.mark(readable, writable, self.read_closed);
        // Records rustls holds go out on this edge: no phase may ask to write before they are gone.
        let flushed = t.on_ready(&mut self.stream);
        self.readable = t.readable();
        self.writable = t.writable();
        if flushed.is_err() {
            // The next read or write reports it.
            self.error = true;
            self.readable = true;
            self.writable = true;
        }
    }

    /// Reads once; `WouldBlock` clears the readable bit and returns `Ok(None)`. A short read clears it too: the
    /// receive queue was empty, and epoll reports every later arrival as a new edge, so the read that would only
    /// return `WouldBlock` is saved. The exception is a FIN that arrived together with the data (one edge for both):
    /// once the peer's close was reported, we read on until EOF.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if let Some(t) = self.tls.as_mut() {
            let r = t.read(&mut self.stream, buf);
            self.sync_tls();
            return r;
        }
        loop {
            match self.stream.read(buf) {
                Ok(n) => {
                    if n > 0 && n < buf.len() && !self.read_closed {
                        self.readable = false;
                    }
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(None);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes as much of `data` as the socket takes now; `WouldBlock` clears the writable bit, and so does a short
    /// write (the send buffer is full; the edge-triggered writable event comes when it drains).
    pub fn write_some(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(t) = self.tls.as_mut() {
            let r = t.write_some(&mut self.stream, data);
            self.sync_tls();
            return r;
        }
        let mut off = 0;
        while off < data.len() && self.writable {
            match self.stream.write(&data[off..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    off += n;
                    if off < data.len() {
                        self.writable = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(off)
    }
}

/// How to answer the client once the outbound connection succeeds or fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// RFC 1928 §6 reply.
    Socks5,
    /// SOCKS4 reply (VN 0, CD 90/91).
    Socks4,
    /// `200 Connection established` or an error status.
    HttpConnect,
    /// Plain HTTP forwarding: on success send the rewritten request head.
    HttpForward,
}

/// Where a connection is in its life. Each variant holds only what that phase needs.
pub enum Phase {
    /// Waiting for the PROXY protocol header.
    ProxyHeader,
    /// Waiting for the first byte.
    Detect,
    /// SOCKS5 method negotiation.
    Socks5Greeting,
    /// RFC 1929 sub-negotiation.
    Socks5Auth,
    /// SOCKS5 request.
    Socks5Request,
    /// A SOCKS4/4a request.
    Socks4Request,
    /// An HTTP request head (first request of the connection).
    HttpHead,
    /// A password is being checked against a slow hash on the blocking pool.
    Verifying(Box<PendingAuth>),
    /// A name lookup is out with the resolver pool.
    Resolving {
        /// How to answer.
        reply: ReplyKind,
    },
    /// A nonblocking connect is in flight.
    Connecting {
        /// How to answer.
        reply: ReplyKind,
        /// Addresses still to try, each already passed by the destination rules.
        addrs: Vec<(SocketAddr, crate::acl::DestAllowed)>,
        /// Index of the next address to try.
        next: usize,
        /// The failure of the last attempt.
        last: crate::proto::Failure,
        /// When the current attempt gives way to the next address.
        attempt_deadline: Instant,
    },
    /// Talking to an upstream proxy on the outbound socket.
    Upstream(Box<UpstreamHandshake>),
    /// Bytes flow both ways.
    Relay,
    /// Plain HTTP forwarding with request/response framing (state in `Conn::http`).
    Http,
    /// A SOCKS5 UDP association; the TCP connection is only watched for EOF.
    Udp(Box<UdpState>),
    /// A BIND listener waits for its inbound connection.
    Bind(Box<BindState>),
    /// An error reply is flushing; then the client side is shut down and read until EOF or the linger deadline, so
    /// the reply is not destroyed by a reset.
    Linger {
        /// Whether the linger deadline is scheduled.
        armed: bool,
        /// Whether our write side is already shut down.
        shut: bool,
        /// What the access log will say.
        reason: CloseReason,
    },
}

impl Phase {
    /// True while the client has not finished its handshake (the handshake deadline applies).
    pub fn in_client_handshake(&self) -> bool {
        matches!(
            self,
            Phase::ProxyHeader
                | Phase::Detect
                | Phase::Socks5Greeting
                | Phase::Socks5Auth
                | Phase::Socks5Request
                | Phase::Socks4Request
                | Phase::HttpHead
                | Phase::Verifying(_)
        )
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::ProxyHeader => "proxy_header",
            Phase::Detect => "detect",
            Phase::Socks5Greeting => "socks5_greeting",
            Phase::Socks5Auth => "socks5_auth",
            Phase::Socks5Request => "socks5_request",
            Phase::Socks4Request => "socks4_request",
            Phase::HttpHead => "http_head",
            Phase::Verifying(_) => "verifying",
            Phase::Resolving { .. } => "resolving",
            Phase::Connecting { .. } => "connecting",
            Phase::Upstream(_) => "upstream_handshake",
            Phase::Relay => "relay",
            Phase::Http => "http",
            Phase::Udp(_) => "udp",
            Phase::Bind(_) => "bind",
            Phase::Linger { .. } => "linger",
        }
    }
}

/// What to resume once a slow password check answers. It is boxed inside `Phase::Verifying`, so the size gap
/// between variants costs nothing on other connections.
#[allow(clippy::large_enum_variant)]
pub enum PendingAuth {
    /// Send the RFC 1929 status, then read the SOCKS5 request.
    Socks5,
    /// Carry on with this HTTP request (its rewritten head is kept alongside).
    Http(crate::proto::http::Request, Vec<u8>),
}

/// A destination as kept for the whole life of a connection: an address, or a boxed name. `TargetAddr` keeps
/// names inline (255 bytes) so parsers never allocate; a long-lived connection should not carry that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// A literal address.
    Ip(SocketAddr),
    /// A name and port.
    Name(Box<str>, u16),
}

impl From<&TargetAddr> for Dest {
    fn from(t: &TargetAddr) -> Dest {
        match t {
            TargetAddr::Ip(a) => Dest::Ip(*a),
            TargetAddr::Domain(n, p) => Dest::Name(n.as_str().into(), *p),
        }
    }
}

impl Dest {
    /// Back to the parser type (for encoding requests to an upstream proxy).
    pub fn to_target(&self) -> Option<TargetAddr> {
        match self {
            Dest::Ip(a) => Some(TargetAddr::Ip(*a)),
            Dest::Name(n, p) => {
                crate::proto::Name::new(n.as_bytes()).map(|n| TargetAddr::Domain(n, *p))
            }
        }
    }
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Ip(a) => write!(f, "{a}"),
            Dest::Name(n, p) => write!(f, "{n}:{p}"),
        }
    }
}

/// Per-direction relay state.
#[derive(Default, Clone, Copy)]
pub struct Half {
    /// The source reported EOF.
    pub eof: bool,
    /// We shut down writing on the sink.
    pub shut: bool,
    /// The current burst is bulk: relay it with splice (when enabled).
    pub bulk: bool,
}

/// One client connection.
pub struct Conn {
    /// Generation: distinguishes this connection from earlier users of the same slab slot.
    pub gen: u32,
    /// The client socket.
    pub client: Sock,
    /// The outbound socket, once connecting.
    pub upstream: Option<Sock>,
    /// Lifecycle phase.
    pub phase: Phase,
    /// Bytes from the client not yet consumed: handshake input, then relay payload parked for the upstream.
    pub c2u: Option<Buffer>,
    /// Bytes from the upstream parked for the client.
    pub u2c: Option<Buffer>,
    /// Splice mode: client -> upstream bytes held in a pipe because the upstream would not take them yet.
    pub up_pipe: Option<crate::sys::Pipe>,
    /// Splice mode: upstream -> client bytes held in a pipe.
    pub down_pipe: Option<crate::sys::Pipe>,
    /// Bytes we generated for the client (replies, rewritten heads), flushed before `u2c`.
    pub to_client: Vec<u8>,
    /// Bytes we generated for the upstream (rewritten heads, upstream handshakes), flushed before `c2u`.
    pub to_upstream: Vec<u8>,
    /// Client -> upstream direction.
    pub up: Half,
    /// Upstream -> client direction.
    pub down: Half,
    /// The client's address (from the PROXY header when one was received).
    pub peer: SocketAddr,
    /// Protocol, once detected.
    pub proto: Proto,
    /// The authenticated user.
    pub user: Option<Authorized>,
    /// Where the client asked to go (compact: a name is boxed at its own length rather than inline).
    pub target: Option<Dest>,
    /// When the connection was accepted.
    pub started: Instant,
    /// Last relay activity (for the idle timeout).
    pub last_active: Instant,
    /// The deadline of the current phase: the handshake deadline while in a client-handshake phase, the connect
    /// deadline while resolving or connecting (never both at once, so one field serves).
    pub deadline: Option<Instant>,
    /// Bytes relayed client -> target.
    pub bytes_up: u64,
    /// Bytes relayed target -> client.
    pub bytes_down: u64,
    /// Already in the worker's "drive again" list.
    pub queued: bool,
    /// The forwarded HTTP request being answered (its access-log line is written when it ends).
    pub request: Option<Box<RequestLog>>,
    /// Forwarded requests were logged one line each: the connection itself gets no session line.
    pub request_lines: bool,
    /// Counted against `--user-max-connections`.
    pub user_counted: bool,
    /// HTTP forwarding state, for connections that forward plain HTTP requests.
    pub http: Option<Box<HttpState>>,
}

impl Conn {
    /// A connection just accepted.
    pub fn new(
        gen: u32,
        stream: TcpStream,
        peer: SocketAddr,
        phase: Phase,
        now: Instant,
        c2u: Buffer,
    ) -> Conn {
        Conn {
            gen,
            client: Sock::new(stream),
            upstream: None,
            phase,
            c2u: Some(c2u),
            u2c: None,
            up_pipe: None,
            down_pipe: None,
            to_client: Vec::new(),
            to_upstream: Vec::new(),
            up: Half::default(),
            down: Half::default(),
            peer,
            proto: Proto::Unknown,
            user: None,
            target: None,
            started: now,
            last_active: now,
            deadline: None,
            bytes_up: 0,
            bytes_down: 0,
            queued: false,
            request: None,
            request_lines: false,
            user_counted: false,
            http: None,
        }
    }

    /// Queues generated bytes for the client and writes what the socket takes now. Pending generated bytes keep
    /// their order: new ones never overtake old ones.
    pub fn send_client(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.to_client.is_empty() {
            let n = self.client.write_some(bytes)?;
            if n < bytes.len() {
                self.to_client.extend_from_slice(&bytes[n..]);
            }
        } else {
            self.to_client.extend_from_slice(bytes);
            self.flush_client()?;
        }
        Ok(())
    }

    /// Writes pending generated bytes to the client; true when none remain.
    pub fn flush_client(&mut self) -> io::Result<bool> {
        if !self.to_client.is_empty() {
            let n = self.client.write_some(&self.to_client)?;
            self.to_client.drain(..n);
            if self.to_client.is_empty() {
                // Generated bytes are rare and small: don't keep their allocation around for an idle tunnel.
                self.to_client = Vec::new();
            }
        }
        Ok(self.to_client.is_empty())
    }

    /// Writes pending generated bytes to the upstream; true when none remain.
    pub fn flush_upstream(&mut self) -> io::Result<bool> {
        if let Some(up) = self.upstream.as_mut() {
            if !self.to_upstream.is_empty() {
                let n = up.write_some(&self.to_upstream)?;
                self.to_upstream.drain(..n);
                if self.to_upstream.is_empty() {
                    self.to_upstream = Vec::new();
                }
            }
        }
        Ok(self.to_upstream.is_empty())
    }

    /// The local IP the client connected to (asked of the kernel only by UDP ASSOCIATE and BIND, which bind there:
    /// most connections never need it, so accept does not pay a getsockname for it).
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        self.client
            .stream
            .local_addr()
            .ok()
            .map(|a| crate::proto::canonical_ip(a.ip()))
    }

    /// The authenticated user name, or "-".
    pub fn user_name(&self) -> &str {
        self.user.as_ref().map(|u| u.user()).unwrap_or("-")
    }
}

#[cfg(test)]
mod tests {
    /// Every idle tunnel pays for a `Conn`: keep it small (the idle-memory target is under 1 KiB per tunnel).
    #[test]
    fn conn_stays_small() {
        let size = std::mem::size_of::<super::Conn>();
        // 400 before TLS; each of the two sockets gained one pointer for its TLS session (None in clear text).
        assert!(size <= 416, "Conn grew to {size} bytes");
    }
}
