//! One client connection and everything it owns.
//!
//! ```text
//!            accept
//!              |
//!      [ProxyHeader] --(--proxy-protocol)--+
//!              |                            |
//!           [Detect] <---------------------+
//!        /     |      \
//!  Socks5    Socks4     HttpHead --------------------------+
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

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use log::debug;
use mio::net::TcpStream;
use mio::Interest;

use crate::acl::DestAllowed;
use crate::auth::Authorized;
use crate::buffer::{Buffer, BufferPool};
use crate::metrics::Proto;
use crate::net;
use crate::proto::TargetAddr;
use crate::resolve::{Job, Work};

use super::close::CloseReason;
use super::ctx::{Ctx, Next, ReplyKind};
pub use super::phase::{Answer, Half, Handshake, HttpState, PendingAuth, Phase, RequestLog};
pub use super::sock::Sock;
use super::token;

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

/// One client connection.
pub struct Conn {
    /// Generation: distinguishes this connection from earlier users of the same slab slot.
    pub gen: u32,
    /// The client socket.
    pub client: Sock,
    /// Lifecycle phase.
    pub phase: Phase,
    /// Client bytes the handshake has not consumed: its input, then what follows it, which the next phase (relay,
    /// forwarded HTTP, UDP) takes by value.
    pub c2u: Option<Buffer>,
    /// Bytes we generated for the client (replies, rewritten heads), flushed before anything relayed.
    pub to_client: Vec<u8>,
    /// Bytes we generated for the upstream (rewritten heads, upstream handshakes), flushed before anything relayed.
    pub to_upstream: Vec<u8>,
    /// The client sent EOF (before the relay, which tracks it per direction).
    pub client_eof: bool,
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
    /// The source address picked from the user's policy egress list for this session (boxed: only sessions of users
    /// with an egress list pay for it, and `Conn` stays under its size budget).
    pub egress: Option<Box<std::net::IpAddr>>,
    /// The user's (or anonymous client's) token buckets, when she has rates: `None` costs the relay nothing.
    pub limits: Option<Arc<crate::policy::UserLimits>>,
    /// Forwarded HTTP: a bucket ran dry and the throttle timer is armed (one timer per dry spell).
    pub throttled: bool,
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
            phase,
            c2u: Some(c2u),
            to_client: Vec::new(),
            to_upstream: Vec::new(),
            client_eof: false,
            peer,
            proto: Proto::Unknown,
            user: None,
            target: None,
            started: now,
            last_active: now,
            bytes_up: 0,
            bytes_down: 0,
            queued: false,
            request: None,
            request_lines: false,
            user_counted: false,
            egress: None,
            limits: None,
            throttled: false,
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
        flush_to(&mut self.client, &mut self.to_client)
    }

    /// Writes pending generated bytes to the outbound socket; true when none remain.
    pub fn flush_upstream(&mut self) -> io::Result<bool> {
        let outbound = match &mut self.phase {
            Phase::Relay(t) => Some(&mut t.outbound),
            Phase::Http(st) => st.exchange.origin_mut(),
            Phase::Upstream(hs) => Some(&mut hs.sock),
            _ => None,
        };
        match outbound {
            Some(up) => flush_to(up, &mut self.to_upstream),
            None => Ok(self.to_upstream.is_empty()),
        }
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

    /// The outbound socket, wherever the current phase keeps it.
    pub fn outbound(&self) -> Option<&Sock> {
        match &self.phase {
            Phase::Relay(t) => Some(&t.outbound),
            Phase::Http(st) => st.exchange.origin(),
            Phase::Upstream(hs) => Some(&hs.sock),
            _ => None,
        }
    }

    /// The outbound socket, mutably.
    pub fn outbound_mut(&mut self) -> Option<&mut Sock> {
        match &mut self.phase {
            Phase::Relay(t) => Some(&mut t.outbound),
            Phase::Http(st) => st.exchange.origin_mut(),
            Phase::Upstream(hs) => Some(&mut hs.sock),
            _ => None,
        }
    }

    /// The authenticated user name, or "-".
    pub fn user_name(&self) -> &str {
        self.user.as_ref().map(|u| u.user()).unwrap_or("-")
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Verbs every phase uses on a connection.
// ---------------------------------------------------------------------------------------------------------------

/// Moves a connection in its handshake to the next step (the handshake deadline stays).
pub fn set_step(conn: &mut Conn, next: Handshake) {
    if let Phase::Handshake { step, .. } = &mut conn.phase {
        *step = next;
    }
}

/// Bytes a connection starts with for its handshake: every SOCKS message (at most 520 bytes) fits, so SOCKS never
/// needs more; HTTP heads and long PROXY v2 headers grow it. Not a pool buffer: a 2 KiB allocation touches half a
/// page, where a 16 KiB pool buffer touched a whole one and kept it resident in the pool.
pub const HANDSHAKE_BUFFER: usize = 2048;

/// Reads what the client has sent into its buffer (until `WouldBlock`, EOF or a full buffer).
pub fn fill_client(conn: &mut Conn, ctx: &mut Ctx) -> std::io::Result<()> {
    let buf = conn.c2u.get_or_insert_with(|| ctx.pool.take());
    read_client(&mut conn.client, &mut conn.client_eof, buf)
}

/// Reads what `client` has sent into `buf` (until `WouldBlock`, EOF, which sets `eof`, or a full buffer): for
/// whichever buffer the phase keeps the client's bytes in.
pub fn read_client(client: &mut Sock, eof: &mut bool, buf: &mut Buffer) -> std::io::Result<()> {
    while client.readable && !*eof && !buf.is_full() {
        match client.read(buf.space())? {
            Some(0) => *eof = true,
            Some(n) => buf.fill(n),
            None => break,
        }
    }
    Ok(())
}

/// Swaps the buffer in `slot` for one four times as large (at most `limit`), keeping its bytes. False at the limit.
pub fn grow(slot: &mut Option<Buffer>, limit: usize, pool: &mut BufferPool) -> bool {
    let Some(old) = slot.as_ref() else {
        return false;
    };
    if old.capacity() >= limit {
        return false;
    }
    let mut big = Buffer::new((old.capacity() * 4).min(limit));
    big.push(old.data());
    if let Some(old) = slot.replace(big) {
        pool.give(old);
    }
    true
}

/// Gives the session its user's shared buckets and quota counter when she has any (or per-user metrics are on);
/// at admission, and again after a reload for sessions that had none (a rate or quota added by the reload then
/// applies to them at once).
pub fn attach_limits(conn: &mut Conn, ctx: &Ctx) {
    if conn.limits.is_some() {
        return;
    }
    let user = conn.user.as_ref().map(|u| u.user());
    let rates = ctx.policy.rates(user);
    let quota = ctx.policy.quota(user);
    // Per-user metrics need the entry of every authenticated user, limited or not (opt-in: it costs an
    // atomic add per relay turn).
    let track = ctx.cfg.metrics_per_user && conn.user.is_some();
    if !rates.is_unlimited() || quota.is_some() || track {
        conn.limits = ctx.limits.session(&session_key(conn), rates, quota, track);
    }
}

/// True when the session's user has a quota and it is used up.
pub fn quota_exhausted(conn: &Conn) -> bool {
    conn.limits.as_ref().is_some_and(|l| l.quota.exhausted())
}

/// Counts the session against its user's session limit (`max_connections` of the policy file, else
/// `--user-max-connections`), or an anonymous client's against `[defaults] max_connections` per client address,
/// and checks her quota; the reason to refuse, if any (`UserLimit`, `Quota`).
pub fn user_admit(conn: &mut Conn, ctx: &mut Ctx) -> Result<(), CloseReason> {
    attach_limits(conn, ctx);
    if quota_exhausted(conn) {
        debug!(
            "{}: user {} has used up her quota",
            conn.peer,
            conn.user_name()
        );
        return Err(CloseReason::Quota);
    }
    let max = match conn.user.as_ref() {
        Some(user) => ctx
            .policy
            .max_connections(user.user(), ctx.cfg.user_max_connections),
        None => ctx.policy.anonymous_max_connections(),
    };
    let Some(max) = max else {
        return Ok(());
    };
    if conn.user_counted {
        return Ok(());
    }
    let Ok(mut counts) = ctx.user_counts.lock() else {
        return Err(CloseReason::UserLimit);
    };
    let n = counts.entry(session_key(conn)).or_insert(0);
    if *n >= max {
        debug!(
            "{}: user {} at the session limit {max}",
            conn.peer,
            conn.user_name()
        );
        return Err(CloseReason::UserLimit);
    }
    *n += 1;
    conn.user_counted = true;
    Ok(())
}

/// The key a session is counted under for session limits: the user's name, or for an anonymous client its
/// address behind a NUL (user names never contain control characters, so the two kinds cannot collide).
pub fn session_key(conn: &Conn) -> String {
    match &conn.user {
        Some(u) => u.user().to_string(),
        None => format!("\0{}", conn.peer.ip()),
    }
}

/// Sends a slow password check to the blocking pool and parks the connection until it answers.
pub fn verify_off_loop(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    work: Work,
    then: PendingAuth,
) -> Next {
    let job = Job {
        key,
        gen: conn.gen,
        tag: 0,
        work,
        reply: ctx.reply_to.clone(),
    };
    if ctx.resolve_tx.send(job).is_err() {
        return Next::Close(CloseReason::Internal);
    }
    // A kept-alive HTTP connection verifies its next request's credentials here too; no handshake timer is armed
    // for it (the idle timer covers it), so its deadline is only nominal.
    let deadline = match conn.phase {
        Phase::Handshake { deadline, .. } => deadline,
        _ => ctx.now + ctx.cfg.handshake_timeout,
    };
    conn.phase = Phase::Handshake {
        step: Handshake::Verifying(Box::new(then)),
        deadline,
    };
    Next::Wait
}

/// Opens and registers a nonblocking outbound socket to a client's destination, as connect attempt `slot` of
/// connection `key` (its events carry that slot). Only a [`DestAllowed`] from the destination rules opens one,
/// and it dials the address that passed: a path that skips the rules does not compile.
pub fn open_attempt(
    key: usize,
    slot: usize,
    ctx: &mut Ctx,
    allowed: DestAllowed,
    source: Source,
) -> io::Result<Sock> {
    open(token::attempt(key, slot), ctx, allowed.addr(), source)
}

/// Opens Happy Eyeballs attempt `slot` to an address of the `--upstream` proxy given by name (the operator's own
/// choice, like [`open_upstream`]: the destination rules do not apply to it).
pub fn open_proxy_attempt(
    key: usize,
    slot: usize,
    ctx: &mut Ctx,
    (addr, source): (SocketAddr, Source),
) -> io::Result<Sock> {
    open(token::attempt(key, slot), ctx, addr, source)
}

/// Opens a connection to an upstream proxy: an address of `--upstream` or of a policy group member (the operator's
/// own choice, not a client's destination: the rules are for what clients ask for).
pub fn open_upstream(
    key: usize,
    ctx: &mut Ctx,
    addr: SocketAddr,
    source: Source,
) -> io::Result<Sock> {
    open(token::conn(key, token::Role::Upstream), ctx, addr, source)
}

/// The source of an outbound connection: a user's policy egress address (with IP_FREEBIND when it was picked
/// from a block), or `None` for `--bind` / the kernel's choice.
pub type Source = Option<(std::net::IpAddr, bool)>;

fn open(tok: mio::Token, ctx: &mut Ctx, addr: SocketAddr, source: Source) -> io::Result<Sock> {
    let opts = (ctx.cfg.socket_buffer, &ctx.cfg.tcp);
    let mut stream = match source {
        Some((ip, freebind)) => net::connect_from(addr, ip, freebind, opts)?,
        None => net::connect(addr, ctx.cfg.outbound_bind, opts)?,
    };
    ctx.registry
        .register(&mut stream, tok, Interest::READABLE | Interest::WRITABLE)?;
    Ok(Sock::new(stream))
}

/// Writes `out` (generated bytes) to `sock` as far as it takes them; true when none remain.
pub fn flush_to(sock: &mut Sock, out: &mut Vec<u8>) -> io::Result<bool> {
    if !out.is_empty() {
        let n = sock.write_some(out)?;
        out.drain(..n);
        if out.is_empty() {
            // Generated bytes are rare and small: don't keep their allocation around for an idle tunnel.
            *out = Vec::new();
        }
    }
    Ok(out.is_empty())
}

/// Resolving or connecting failed: count it and let the dispatcher answer the client. (The outbound socket, if
/// any, goes with the phase that owned it.)
pub fn path_failed(ctx: &mut Ctx, reply: ReplyKind, reason: CloseReason) -> Next {
    ctx.stats.connect_error(reason.failure());
    Next::Failed(reply, reason)
}

#[cfg(test)]
mod tests {
    /// Every idle tunnel pays for a `Conn`: keep it small (the idle-memory target is under 1 KiB per tunnel).
    #[test]
    fn conn_stays_small() {
        let size = std::mem::size_of::<super::Conn>();
        assert!(size <= 400, "Conn grew to {size} bytes");
        // An idle tunnel holds its Conn (in the slab) and its boxed Tunnel, no buffer.
        let tunnel = std::mem::size_of::<super::super::phase::Tunnel>();
        eprintln!("Conn {size} bytes, Tunnel {tunnel} bytes");
        assert!(
            size + tunnel < 1024,
            "idle tunnel is {} bytes",
            size + tunnel
        );
    }
}
