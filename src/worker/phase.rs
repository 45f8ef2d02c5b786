//! Where a connection is in its life, and the data each phase owns. The behaviour of each phase lives in its own
//! module above `conn` (`handshake`, `connect`, `upstream`, `relay`, `http`, `udp`, `bind`); the types live here,
//! below `conn`, so that `Conn` can hold a `Phase` without importing the modules that drive it.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use mio::net::{TcpListener, UdpSocket};

use super::close::CloseReason;
use super::sock::Sock;
use crate::buffer::Buffer;
use crate::proto::http::exchange::AwaitingOrigin;
use crate::proto::http::Exchange;
use crate::proto::server::{Socks4Server, Socks5Server, Socks5Stage};
use crate::proto::{Name, TargetAddr};
use crate::sys::Pipe;

/// Resolver tags at and above this are connect lookups (one tag per lookup, see `connect`); UDP datagram lookups
/// use the tags below it.
pub const CONNECT_TAGS: u32 = 0x8000_0000;

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

/// Where a connection is in its life. Each variant holds only what that phase needs, its deadline included.
pub enum Phase {
    /// The client's handshake, until its request is complete.
    Handshake {
        /// Which message is awaited.
        step: Handshake,
        /// The handshake deadline (counted from accept).
        deadline: Instant,
    },
    /// A name lookup is out with the resolver pool.
    Resolving {
        /// Who gets the connection.
        answer: Answer,
        /// The connect deadline (resolving and connecting together).
        deadline: Instant,
        /// The lookup's resolver tag: answers with another tag are for an earlier lookup of this connection.
        tag: u32,
    },
    /// Nonblocking connects are in flight (Happy Eyeballs: possibly several at once).
    Connecting {
        /// Who gets the connection.
        answer: Answer,
        /// The connect deadline (all addresses together).
        deadline: Instant,
        /// The addresses, the scheduler and the attempts in flight (boxed: `Conn` stays small).
        attempts: Box<Attempts>,
    },
    /// Talking to an upstream proxy on the outbound socket.
    Upstream(Box<UpstreamHandshake>),
    /// Bytes flow both ways.
    Relay(Box<Tunnel>),
    /// Plain HTTP forwarding with request/response framing.
    Http(Box<HttpState>),
    /// A SOCKS5 UDP association; the TCP connection is only watched for EOF.
    Udp(Box<UdpState>),
    /// A BIND listener waits for its inbound connection.
    Bind(Box<BindState>),
    /// A placeholder while a transition moves the old phase's data by value; never driven.
    Closing,
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

/// The outbound attempts of one connect (RFC 8305): every address already passed by the destination rules, the
/// scheduler that says which to dial when, and one socket per attempt in flight, each in its own token slot.
pub struct Attempts {
    /// Which address to dial next, and when.
    pub sched: crate::happy::Scheduler,
    /// Every address the rules allowed and not dialled yet, as its proof (spent on the dial when the scheduler picks
    /// the address).
    pub allowed: Vec<crate::acl::DestAllowed>,
    /// The addresses of the operator's own upstream proxy given by name (`Answer::Chain`), which the rules are not
    /// for; taken out like `allowed` when dialled.
    pub proxy: Vec<SocketAddr>,
    /// The resolver tag whose full answer is still out after an early one (one family answered first).
    pub lookup: Option<u32>,
    /// Some address was refused by the destination rules (the failure to report if none was allowed).
    pub denied: bool,
    /// The attempts in flight, indexed by token slot (see `token::attempt`).
    pub socks: [Option<(SocketAddr, Sock)>; super::token::ATTEMPT_SLOTS],
    /// The most specific failure seen so far (what the client is told when every attempt fails).
    pub last: crate::proto::Failure,
    /// The attempt-delay wake-up already queued with the timers, so it is not pushed twice.
    pub wake: Option<Instant>,
}

/// Who gets the connection once the path to the target is up (or is told it failed).
pub enum Answer {
    /// A client waiting for this reply (SOCKS, HTTP CONNECT).
    Reply(ReplyKind),
    /// A forwarded HTTP request: its forwarding state, and the request waiting in it for its origin connection,
    /// travel with the connect phases and come back to `http`.
    Forward(Box<HttpState>, AwaitingOrigin),
    /// The connection is to the `--upstream` proxy given by name (the second field): once it is up, this handshake
    /// takes over (and holds who gets the connection in the end).
    Chain(Box<UpstreamPlan>, std::sync::Arc<crate::upstream::Upstream>),
}

impl Answer {
    /// The kind of reply owed to the client.
    pub fn kind(&self) -> ReplyKind {
        match self {
            Answer::Reply(k) => *k,
            Answer::Forward(..) => ReplyKind::HttpForward,
            Answer::Chain(plan, _) => plan.answer.kind(),
        }
    }

    /// True when the connection is for a forwarded HTTP request (directly or through an upstream by name).
    pub fn forwards(&self) -> bool {
        match self {
            Answer::Forward(..) => true,
            Answer::Reply(_) => false,
            Answer::Chain(plan, _) => plan.answer.forwards(),
        }
    }
}

impl Answer {
    /// The path is up on `outbound`, with `early` the bytes that came from it before the client was answered (an
    /// upstream proxy's first tunnel bytes): the hand-off to whoever gets the connection. (A chain's answer is
    /// reached through its handshake, which the connect phases run before they get here.)
    pub fn connected(self, outbound: Sock, early: Option<Buffer>) -> Connected {
        match self {
            Answer::Reply(kind) => Connected::Reply(kind, outbound, early),
            Answer::Forward(mut st, pending) => {
                // `take_state` emptied the origin's buffer when the state left `Phase::Http`.
                st.from_origin = early;
                Connected::Forward(st, pending, outbound)
            }
            Answer::Chain(plan, _) => plan.answer.connected(outbound, early),
        }
    }
}

/// The path to the target is up: the outbound socket and who gets it, handed over by value (so neither can be
/// missing when the next phase starts).
pub enum Connected {
    /// A client waiting for its success reply (SOCKS, HTTP CONNECT), then the relay; with the bytes the outbound
    /// side sent already (after an upstream proxy's reply), which the relay delivers first.
    Reply(ReplyKind, Sock, Option<Buffer>),
    /// A forwarded HTTP request: its forwarding state takes the socket as the origin connection of the request
    /// that waits for it.
    Forward(Box<HttpState>, AwaitingOrigin, Sock),
}

/// An established tunnel: the outbound socket (target, chained proxy or BIND peer) and both directions.
pub struct Tunnel {
    /// The outbound socket.
    pub outbound: Sock,
    /// Client -> outbound.
    pub up: Way,
    /// Outbound -> client.
    pub down: Way,
}

/// One direction of a tunnel: bytes parked in user space, bytes held in a pipe (splice mode), EOF bookkeeping.
pub struct Way {
    /// Bytes read from the source that the sink would not take yet (backpressure: nothing more is read meanwhile).
    pub parked: Option<Buffer>,
    /// Splice mode: bytes held in a pipe because the sink would not take them yet.
    pub pipe: Option<Pipe>,
    /// EOF and half-close state.
    pub half: Half,
}

/// The steps of a client handshake.
pub enum Handshake {
    /// Waiting for the PROXY protocol header.
    ProxyHeader,
    /// Waiting for the first byte.
    Detect,
    /// A SOCKS5 handshake (greeting, RFC 1929 credentials, request), sequenced by its sans-IO machine.
    Socks5(Socks5Server),
    /// A SOCKS4/4a request, sequenced by its sans-IO machine.
    Socks4(Socks4Server),
    /// An HTTP request head (first request of the connection).
    HttpHead,
    /// A password is being checked against a slow hash on the blocking pool.
    Verifying(Box<PendingAuth>),
}

impl Handshake {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Handshake::ProxyHeader => "proxy_header",
            Handshake::Detect => "detect",
            Handshake::Socks5(hs) => match hs.stage() {
                Socks5Stage::Greeting => "socks5_greeting",
                Socks5Stage::Auth | Socks5Stage::Verifying => "socks5_auth",
                Socks5Stage::Request => "socks5_request",
                Socks5Stage::Over => "socks5_done",
            },
            Handshake::Socks4(_) => "socks4_request",
            Handshake::HttpHead => "http_head",
            Handshake::Verifying(_) => "verifying",
        }
    }
}

impl Phase {
    /// True while the client has not finished its handshake (the handshake deadline applies).
    pub fn in_client_handshake(&self) -> bool {
        matches!(self, Phase::Handshake { .. })
    }

    /// The connect deadline while resolving, connecting or talking to the upstream proxy.
    pub fn connect_deadline(&self) -> Option<Instant> {
        match self {
            Phase::Resolving { deadline, .. } | Phase::Connecting { deadline, .. } => {
                Some(*deadline)
            }
            Phase::Upstream(u) => Some(u.plan.deadline),
            _ => None,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Handshake { step, .. } => step.name(),
            Phase::Resolving { .. } => "resolving",
            Phase::Connecting { .. } => "connecting",
            Phase::Upstream(_) => "upstream_handshake",
            Phase::Relay(_) => "relay",
            Phase::Closing => "closing",
            Phase::Http(_) => "http",
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
    /// Send the RFC 1929 status (this handshake's machine encodes it), then read the SOCKS5 request.
    Socks5(Socks5Server),
    /// Carry on with this HTTP request (its rewritten head is kept alongside, and the connection's forwarding state
    /// when it is not its first request).
    Http(crate::proto::http::Request, Vec<u8>, Option<Box<HttpState>>),
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
    /// The user's bucket for this direction ran dry: nothing is read until the throttle timer fires.
    pub throttled: bool,
}

/// State of one BIND request.
pub struct BindState {
    pub(super) listener: TcpListener,
    pub(super) readable: bool,
    /// When nobody connecting means failure.
    pub(super) deadline: Instant,
    pub(super) expected: Option<IpAddr>,
    pub(super) reply: ReplyKind,
    /// An accept has failed for lack of descriptors (logged once, not at every retry).
    pub(super) starved: bool,
}

/// State of one UDP association.
pub struct UdpState {
    pub(super) relay: UdpSocket,
    pub(super) out: UdpSocket,
    pub(super) relay_readable: bool,
    pub(super) out_readable: bool,
    pub(super) client_ip: IpAddr,
    pub(super) client_port: Option<u16>,
    /// The outbound socket is IPv6 dual-stack: IPv4 targets are sent to as mapped addresses.
    pub(super) out_dual: bool,
    pub(super) cache: Vec<(Name, IpAddr)>,
    /// Datagrams waiting for their name: (lookup tag, name, port, payload). One lookup (tag) per name in flight;
    /// answers come back in any order (the pool has several threads), so they are matched by tag.
    pub(super) queued: Vec<(u32, Name, u16, Vec<u8>)>,
    pub(super) next_tag: u32,
    pub(super) last_active: Instant,
    /// Datagrams relayed client -> targets and targets -> client, for the access log.
    pub(super) dgrams_up: u64,
    pub(super) dgrams_down: u64,
    /// Hashes of the distinct destinations the client addressed (capped at [`MAX_COUNTED_DESTS`]).
    pub(super) dests: HashSet<u64>,
}

/// Forwarding state of one client connection: the exchange machine (framing, keep-alive, the kept origin's
/// target; `proto::http::Exchange`) holding the origin connection, and what only the worker keeps.
pub struct HttpState {
    /// Where the exchanges stand, with the connection to the origin (or to the HTTP upstream proxy) each state has:
    /// idle with the one kept from the last exchange or none, a request waiting for a new one (which the connect
    /// phases are making), or a request and its response in flight on theirs.
    pub(super) exchange: Exchange<Sock>,
    /// The client's bytes not yet forwarded (request heads and bodies, and a pipelined successor): taken by value
    /// from the connection's input buffer on entry into `Phase::Http`, given back to it when the state leaves for a
    /// password check or a connect (so only `Phase::Http` holds buffers here).
    pub(super) from_client: Option<Buffer>,
    /// The origin's bytes not yet forwarded (response heads and bodies).
    pub(super) from_origin: Option<Buffer>,
    /// Credentials that passed verification on this connection (user NUL pass).
    pub(super) auth_token: Option<Box<[u8]>>,
    /// The request head, held until the path to the origin is up (an upstream proxy's handshake goes first).
    pub(super) pending_head: Vec<u8>,
}

/// Where the upstream conversation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamState {
    /// TCP connect to the upstream in flight.
    Connecting,
    /// Waiting for the SOCKS5 method choice.
    Method,
    /// Waiting for the RFC 1929 status.
    Auth,
    /// Waiting for the SOCKS5 reply.
    Reply,
    /// Waiting for the HTTP CONNECT response head.
    HttpReply,
    /// Forwarded HTTP to a TLS group member: waiting for its TLS handshake before the request head goes out, so
    /// that a refused certificate counts against the member and the next one is tried.
    TlsForward,
}

/// A chain through an upstream proxy before a connection to it is open: who gets the path, where it leads, and
/// which upstreams to try. It goes by value from one connection attempt to the next.
pub struct UpstreamPlan {
    /// Who gets the connection once the chain is up.
    pub answer: Answer,
    /// The next of `--upstream`'s addresses to dial.
    pub(super) next_addr: usize,
    /// The connect deadline (reaching the upstream and its handshake together).
    pub(super) deadline: Instant,
    /// Where the upstream proxy is asked to connect.
    pub(super) target: TargetAddr,
    /// Which upstream: `--upstream` or a member of a policy group.
    pub(super) route: Route,
}

/// The upstream handshake of one connection: the plan, the server it is talking to, and the connection it talks
/// on (so a handshake without its connection cannot be built).
pub struct UpstreamHandshake {
    /// What is left to try if this server fails, and who gets the path.
    pub(super) plan: UpstreamPlan,
    /// The server being talked to: `--upstream` or the group member being tried.
    pub(super) server: std::sync::Arc<crate::upstream::Upstream>,
    /// Its TLS client configuration (`https://`, `socks5s://`).
    pub(super) tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The group member's index, for its health; `None` through `--upstream`.
    pub(super) member: Option<usize>,
    pub(super) state: UpstreamState,
    /// The connection to the server.
    pub(super) sock: Sock,
    /// What the server sent: its replies, then any tunnel bytes that came with the last one (they go to the
    /// relay with the socket).
    pub(super) inbox: Option<Buffer>,
}

/// The upstream a handshake talks to.
pub enum Route {
    /// The `--upstream` proxy (its addresses in turn).
    Flag(std::sync::Arc<crate::upstream::Upstream>),
    /// A policy group's members, in the order this session tries them.
    Group {
        /// The group (the session keeps it across reloads).
        group: std::sync::Arc<crate::groups::Group>,
        /// Member indexes in the order to try.
        order: Vec<u16>,
        /// The position in `order` being tried.
        pos: usize,
        /// When the current attempt gives way to the next member.
        attempt_deadline: Instant,
    },
}

/// One forwarded HTTP request, from its head to the end of its response.
#[derive(Debug)]
pub struct RequestLog {
    /// The method and the URL without its query: `GET http://host:port/path`.
    pub line: Box<str>,
    /// When its head was parsed.
    pub started: Instant,
    /// The connection's client -> target byte count when the request started.
    pub up_before: u64,
    /// The connection's target -> client byte count when the request started.
    pub down_before: u64,
    /// The final response status (the origin's or our own), 0 while none was sent.
    pub status: u16,
}

impl RequestLog {
    /// A request whose rewritten head is `head` (our own output: `METHOD SP origin-form SP version CRLF ...`).
    /// `up_before`/`down_before` are the connection's byte counts so far.
    pub fn new(
        head: &[u8],
        authority: &str,
        now: Instant,
        (up_before, down_before): (u64, u64),
    ) -> RequestLog {
        let first = head.split(|&b| b == b'\r').next().unwrap_or(&[]);
        let mut parts = first.split(|&b| b == b' ');
        let method = String::from_utf8_lossy(parts.next().unwrap_or(b"-")).into_owned();
        let target = parts.next().unwrap_or(b"/");
        let path = target.split(|&b| b == b'?').next().unwrap_or(b"/");
        let path = String::from_utf8_lossy(path);
        let line = if path == "*" {
            format!("{method} http://{authority}")
        } else {
            format!("{method} http://{authority}{path}")
        };
        RequestLog {
            line: line.into_boxed_str(),
            started: now,
            up_before,
            down_before,
            status: 0,
        }
    }
}
