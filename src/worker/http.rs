//! HTTP proxy: CONNECT tunnels and plain forwarding of absolute-form requests with keep-alive.
//!
//! The sequencing and framing decisions are `proto::http::Exchange`'s (sans-IO, tested in memory): where heads and
//! bodies end, one request in flight at a time (pipelined requests wait in the client buffer and are answered in
//! order), whether the client and origin connections carry another request. This module does the reads, the
//! writes, the timers, the origin socket and the password checks. Bodies pass through verbatim from the buffers.
//!
//! ```text
//! idle --(head, credentials)--> [connect or reuse origin] --> in flight --(response done)--> idle | close
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use log::debug;

use super::access;
use super::close::CloseReason;
use super::conn::{
    flush_to, grow, read_client, user_admit, verify_off_loop, Answer, Conn, Dest, PendingAuth,
    Phase, RequestLog, Sock,
};
use super::connect;
use super::ctx::{Ctx, Next, ReplyKind};
use super::gate;
use super::phase::HttpState;
use super::relay;
use super::reply::{self, graceful_end};
use super::timers::TimerKind;
use crate::auth::Authorized;
use crate::buffer::Buffer;
use crate::metrics;
use crate::policy::bucket::Bucket;
use crate::policy::rules::Command;
use crate::policy::UserLimits;
use crate::proto::http::exchange::{
    proxy_auth, After, AwaitingOrigin, Begin, HeadEvent, HeadOptions, OriginEvent, ProxyAuth,
    UploadEvent,
};
use crate::proto::http::{self as h, Exchange, RequestKind};
use crate::proto::{upstream as chain, Failure, ProtoError};
use crate::resolve::Work;
use crate::upstream::UpstreamKind;

/// The credential bytes that passed verification, kept to recognise them on the next request.
fn auth_token(user: &[u8], pass: &[u8]) -> Box<[u8]> {
    let mut t = Vec::with_capacity(user.len() + 1 + pass.len());
    t.extend_from_slice(user);
    t.push(0);
    t.extend_from_slice(pass);
    t.into_boxed_slice()
}

/// Body reads per direction in one drive of a forwarding connection, before the loop moves on.
const BODY_READS: usize = 32;

impl HttpState {
    fn new() -> HttpState {
        HttpState {
            exchange: Exchange::new(),
            from_client: None,
            from_origin: None,
            auth_token: None,
            pending_head: Vec::new(),
        }
    }
}

/// What the exchange machine needs from the configuration (and whether the worker is draining).
fn head_options(cfg: &crate::config::Config, draining: bool) -> HeadOptions<'_> {
    HeadOptions {
        max_head: cfg.max_head,
        via: cfg.via.as_deref(),
        draining,
        http_upstream: cfg
            .upstream
            .as_ref()
            .is_some_and(|u| u.kind == UpstreamKind::Http),
    }
}

/// True while an exchange is in flight, its origin connection included (a drain lets it finish).
pub fn busy(conn: &Conn) -> bool {
    match &conn.phase {
        Phase::Http(st) => st.exchange.in_flight(),
        Phase::Resolving { answer, .. } | Phase::Connecting { answer, .. } => answer.forwards(),
        Phase::Upstream(u) => u.plan.answer.forwards(),
        _ => false,
    }
}

/// Parses the next request head from the client's bytes (the handshake's buffer in phase HttpHead, the phase's own
/// in Http between requests).
pub fn on_head(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let max = ctx.cfg.max_head;
    let opts = head_options(&ctx.cfg, ctx.draining);
    let forwarding = matches!(conn.phase, Phase::Http(_));
    // The first request of a connection has no forwarding state yet: a fresh machine is idle all the same.
    let fresh: Exchange<Sock> = Exchange::new();
    let (input, exchange) = match &mut conn.phase {
        Phase::Http(st) => (&mut st.from_client, &st.exchange),
        _ => (&mut conn.c2u, &fresh),
    };
    let data = input.as_ref().map(|b| b.data()).unwrap_or(&[]);
    if data.is_empty() {
        if conn.client_eof {
            return Next::Close(if forwarding {
                CloseReason::Done
            } else {
                CloseReason::ClientEof
            });
        }
        // A kept-alive connection between requests holds no buffer.
        if let Some(b) = input.take() {
            ctx.pool.give(b);
        }
        return Next::Wait;
    }
    let req = match exchange.read_head(data, &opts, &mut ctx.head_out) {
        HeadEvent::NeedHead => {
            let full = input.as_ref().is_some_and(|b| b.is_full());
            if full && !grow(input, max, &mut ctx.pool) {
                return bad_request(conn, ctx, ProtoError::HeadTooLarge);
            }
            if full {
                return Next::Again;
            }
            return if conn.client_eof {
                Next::Close(CloseReason::ClientEof)
            } else {
                Next::Wait
            };
        }
        HeadEvent::Request { request, consumed } => {
            if let Some(b) = input.as_mut() {
                b.consume(consumed);
            }
            request
        }
        HeadEvent::Bad(e) => return bad_request(conn, ctx, e),
        // The drive only reads heads between requests; a successor waits in the buffer.
        HeadEvent::Held => return Next::Wait,
    };
    let head = std::mem::take(&mut ctx.head_out);
    if req.kind == RequestKind::Forward {
        let authority = Dest::from(&req.target).to_string();
        let log = RequestLog::new(&head, &authority, ctx.now, (conn.bytes_up, conn.bytes_down));
        debug!("{}: HTTP {}", conn.peer, log.line);
        conn.request = Some(Box::new(log));
    } else {
        debug!("{}: HTTP CONNECT {}", conn.peer, Dest::from(&req.target));
    }
    // The forwarding state travels with the request from here (through a slow-hash check, or a connect).
    let st = take_state(conn, ctx);
    // Proxy authentication (RFC 9110 §11.7), on every request of a kept-alive connection (Basic credentials are
    // per request); the credentials are consumed here and never forwarded. Credentials equal to the ones that
    // already passed on this connection are accepted without verifying a slow hash again.
    let users_required = !ctx.users.is_empty() && !super::tls::cert_user(conn);
    let remembered = st.as_ref().and_then(|h| h.auth_token.as_deref());
    let check = match proxy_auth(users_required, &req) {
        ProxyAuth::Open => Check::Pass,
        ProxyAuth::Verify(c)
            if conn.user.is_some()
                && remembered
                    .is_some_and(|t| crate::auth::ct_eq(&auth_token(c.user(), c.pass()), t)) =>
        {
            Check::Pass
        }
        ProxyAuth::Verify(c) if ctx.users.needs_slow_verify(c.user()) => {
            Check::Slow(Work::Verify {
                users: Arc::clone(&ctx.users),
                user: c.user().to_vec(),
                pass: c.pass().to_vec(),
            })
        }
        ProxyAuth::Verify(c) => Check::Verdict(ctx.users.verify(c.user(), c.pass())),
        ProxyAuth::Refuse => Check::Verdict(None),
    };
    match check {
        Check::Pass => proceed(key, conn, ctx, (req, head, st)),
        Check::Slow(work) => {
            verify_off_loop(key, conn, ctx, work, PendingAuth::Http(req, head, st))
        }
        Check::Verdict(verdict) => on_verified(key, conn, ctx, verdict, (req, head, st)),
    }
}

/// What a request's credentials call for, decided before the request moves on.
enum Check {
    /// Serve it (no users, or the credentials that already passed on this connection).
    Pass,
    /// A hashed password: check it on the blocking pool.
    Slow(Work),
    /// Checked on the loop (None: missing or wrong, 407).
    Verdict(Option<Authorized>),
}

/// A request with its rewritten head and the connection's forwarding state (none before its first request).
type Pending = (h::Request, Vec<u8>, Option<Box<HttpState>>);

fn state(phase: &Phase) -> Option<&HttpState> {
    match phase {
        Phase::Http(st) => Some(st),
        _ => None,
    }
}

fn state_mut(phase: &mut Phase) -> Option<&mut HttpState> {
    match phase {
        Phase::Http(st) => Some(st),
        _ => None,
    }
}

/// The forwarding state while a request is in flight (on its origin connection: in `Phase::Http` it never waits
/// for one).
fn in_flight(phase: &mut Phase) -> Option<&mut HttpState> {
    match phase {
        Phase::Http(st) if st.exchange.in_flight() => Some(&mut **st),
        _ => None,
    }
}

/// Takes the forwarding state out of `Phase::Http` (leaving `Phase::Closing` for the caller to replace). The
/// buffers stay behind: the client's unread bytes go back to the connection's input buffer, which a password
/// check or a connect leaves as the handshake does (and `Worker::close` and the linger return to the pool), and
/// the origin's buffer, empty between requests, to the pool.
fn take_state(conn: &mut Conn, ctx: &mut Ctx) -> Option<Box<HttpState>> {
    if !matches!(conn.phase, Phase::Http(_)) {
        return None;
    }
    match std::mem::replace(&mut conn.phase, Phase::Closing) {
        Phase::Http(mut st) => {
            put(&mut conn.c2u, st.from_client.take(), ctx);
            put(&mut st.from_origin, None, ctx);
            Some(st)
        }
        _ => None,
    }
}

/// Enters `Phase::Http` with `st`, which takes the client's unread bytes by value (the handshake's leftover, or
/// what came while a password check or a connect had the state). What the origin's side sent before the request
/// (after an upstream proxy's reply) is already in `from_origin` (`Answer::connected`).
fn enter(conn: &mut Conn, ctx: &mut Ctx, mut st: Box<HttpState>) {
    put(&mut st.from_client, conn.c2u.take(), ctx);
    conn.phase = Phase::Http(st);
}

/// Puts `buf` into `slot`, returning what was there to the pool.
fn put(slot: &mut Option<Buffer>, buf: Option<Buffer>, ctx: &mut Ctx) {
    if let Some(old) = std::mem::replace(slot, buf) {
        ctx.pool.give(old);
    }
}

/// The proxy credentials of `req` were checked (on the loop, or on the blocking pool for hashes).
pub fn on_verified(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    verdict: Option<Authorized>,
    (req, head, st): Pending,
) -> Next {
    match verdict {
        Some(user) => {
            let mut st = st;
            if let Some(c) = req.credentials.as_ref() {
                let st = st.get_or_insert_with(|| Box::new(HttpState::new()));
                st.auth_token = Some(auth_token(c.user(), c.pass()));
            }
            // Sessions are counted against the user that first authenticated on the connection.
            if conn.user.is_none() {
                conn.user = Some(user);
            }
            proceed(key, conn, ctx, (req, head, st))
        }
        None => {
            if req.auth_present {
                metrics::inc(&ctx.stats.auth_failures);
            }
            debug!("{}: HTTP proxy authentication required", conn.peer);
            reply::fail(conn, ctx, ReplyKind::HttpForward, CloseReason::AuthRequired)
        }
    }
}

/// Carries out an authorized request: open a tunnel, or forward (reusing the origin connection when possible).
fn proceed(key: usize, conn: &mut Conn, ctx: &mut Ctx, (req, head, st): Pending) -> Next {
    conn.target = Some(Dest::from(&req.target));
    let reply = match req.kind {
        RequestKind::Connect => ReplyKind::HttpConnect,
        RequestKind::Forward => ReplyKind::HttpForward,
    };
    if let Err(why) = user_admit(conn, ctx) {
        return reply::fail(conn, ctx, reply, why);
    }
    if req.kind == RequestKind::Connect {
        if let Some(mut st) = st {
            // CONNECT after forwarded requests: the old origin connection is not the tunnel's, and the tunnel
            // gets its own session line.
            release(st.exchange.take_origin(), ctx);
            conn.request_lines = false;
        }
        let answer = Answer::Reply(ReplyKind::HttpConnect);
        return connect::start(key, conn, ctx, req.target, answer);
    }
    // Hook for per-user limits on forwarded requests: a refusal (say 403 with a body) is answered here with
    // reply::fail before anything is forwarded; a decision to end the connection after this request's response
    // is `st.exchange.close_after_response()` once `st` is at hand below.
    metrics::inc(&ctx.stats.http_requests);
    let mut st = st.unwrap_or_else(|| Box::new(HttpState::new()));
    conn.to_upstream.clear();
    // Through a policy group the member (and so the head's form) is chosen when connecting: `upstream` rewrites it.
    let via_group = gate::route(conn, ctx, Command::Http, &req.target).is_some();
    let upstream = ctx.cfg.upstream.as_ref().filter(|_| !via_group);
    let via_http_proxy = upstream.is_some_and(|u| u.kind == UpstreamKind::Http);
    let head = if let Some(u) = upstream.filter(|_| via_http_proxy) {
        let creds = u
            .credentials
            .as_ref()
            .map(|(u, p)| (u.as_bytes(), p.as_bytes()));
        let mut abs = Vec::with_capacity(head.len() + 64);
        if !chain::encode_forward_head(&head, &req.target, creds, &mut abs) {
            return reply::fail(
                conn,
                ctx,
                ReplyKind::HttpForward,
                CloseReason::Failed(Failure::AddressNotSupported),
            );
        }
        abs
    } else {
        head
    };
    if via_group {
        // Through a group the kept connection's member and head form are not known here: a new one per request.
        release(st.exchange.take_origin(), ctx);
    }
    // An HTTP upstream proxy takes requests for any origin on one connection.
    let pending = match st.exchange.begin(&req, via_http_proxy) {
        Begin::Connect(unwanted, pending) => {
            release(unwanted, ctx);
            pending
        }
        Begin::Reused => {
            conn.to_upstream.extend_from_slice(&head);
            if ctx.head_out.capacity() == 0 {
                // Give the allocation back for the next head.
                let mut head = head;
                head.clear();
                ctx.head_out = head;
            }
            enter(conn, ctx, st);
            return Next::Again;
        }
    };
    st.pending_head = head;
    connect::start(key, conn, ctx, req.target, Answer::Forward(st, pending))
}

fn bad_request(conn: &mut Conn, ctx: &mut Ctx, e: ProtoError) -> Next {
    debug!("{}: bad HTTP request: {e}", conn.peer);
    let reason = match e {
        ProtoError::HeadTooLarge => CloseReason::HeaderTooLarge,
        _ => CloseReason::BadRequest,
    };
    // Between requests the reply replaces the forwarding phase.
    end_phase(conn, ctx);
    reply::fail(conn, ctx, ReplyKind::HttpForward, reason)
}

/// The origin connection for a forwarded request is up: the connect phases hand back the forwarding state they
/// carried and the socket they made, and the request in flight owns the socket from here.
pub fn on_origin_connected(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    mut st: Box<HttpState>,
    pending: AwaitingOrigin,
    origin: Sock,
) -> Next {
    st.exchange.connected(pending, origin);
    // Whatever an upstream proxy's handshake queued has gone out first: the request follows it.
    conn.to_upstream.append(&mut st.pending_head);
    st.pending_head = Vec::new();
    if conn.proto as usize != 0 {
        metrics::inc(&ctx.stats.handshakes_ok[conn.proto as usize]);
    }
    enter(conn, ctx, st);
    conn.last_active = ctx.now;
    relay::arm_idle(key, conn, ctx);
    Next::Again
}

/// The origin could not be reached: 502/504/403, then close.
pub fn on_origin_failed(conn: &mut Conn, ctx: &mut Ctx, reason: CloseReason) -> Next {
    // The forwarding state ends with the connect phase that carried it: the connection closes after the reply.
    reply::fail(conn, ctx, ReplyKind::HttpForward, reason)
}

/// Drives a forwarding exchange (or waits for the next request).
pub fn drive(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    if !busy(conn) {
        return between_requests(key, conn, ctx);
    }
    let mut progress = false;
    // Cloned once per drive, and only for a rate-limited user: the reads below then need no lookup.
    let limits = conn.limits.clone();
    let mut lim = Lim {
        user: limits.as_deref(),
        wake: None,
        quota_hit: false,
    };
    match upward(conn, ctx, &mut lim) {
        Ok(p) => progress |= p,
        Err(CloseReason::UpstreamReset) => {
            // The origin stopped taking the request (say it answered 413 and reset): what it sent before the
            // reset is still readable, so deliver that response, then close.
            if let Some(st) = state_mut(&mut conn.phase) {
                st.exchange.abandon_upload();
            }
            conn.to_upstream.clear();
        }
        Err(CloseReason::BadRequestBody)
            if !state(&conn.phase).is_some_and(|s| s.exchange.response_started()) =>
        {
            end_phase(conn, ctx);
            return reply::fail(
                conn,
                ctx,
                ReplyKind::HttpForward,
                CloseReason::BadRequestBody,
            );
        }
        Err(r) => return Next::Close(r),
    }
    match downward(conn, ctx, &mut lim) {
        Ok(p) => progress |= p,
        Err(next) => return next,
    }
    if lim.quota_hit {
        // The response is cut where the quota ran out; the connection closes (her other sessions follow).
        ctx.limits.note_exhausted();
        return Next::Close(CloseReason::Quota);
    }
    if let Some(wait) = lim.wake {
        if !conn.throttled {
            conn.throttled = true;
            if let Some(l) = limits.as_deref() {
                l.throttled_ns
                    .fetch_add(wait.as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            ctx.timers
                .arm_by(ctx.now + wait, key, conn.gen, TimerKind::Throttle);
        }
    }
    if progress {
        conn.last_active = ctx.now;
    }
    // upward/downward return early when they change the phase: it is still Http here.
    let resp_done = state(&conn.phase).is_some_and(|s| s.exchange.response_complete())
        && conn.to_client.is_empty();
    if !resp_done {
        return if progress { Next::Again } else { Next::Wait };
    }
    // The response is complete and delivered.
    if let Some(req) = conn.request.take() {
        access::request_line(conn, &req, CloseReason::Done, ctx.now);
        conn.request_lines = true;
    }
    let leftover = state(&conn.phase)
        .and_then(|s| s.from_origin.as_ref())
        .is_some_and(|b| !b.is_empty());
    // The exchange is over: the origin connection is kept for the next request, or handed back to be closed.
    let (after, unwanted) = match state_mut(&mut conn.phase) {
        Some(st) => st.exchange.finish(conn.client_eof, ctx.draining, leftover),
        None => (After::Close, None),
    };
    release(unwanted, ctx);
    match after {
        // The client still sends a body we will not read, or asked to close: end gracefully.
        After::Close => finish(conn, ctx),
        After::Next { .. } => {
            if let Some(st) = state_mut(&mut conn.phase) {
                put(&mut st.from_origin, None, ctx);
            }
            Next::Again
        }
    }
}

/// Graceful end of a forwarding connection: shut down our side and wait briefly for the client's EOF.
fn finish(conn: &mut Conn, ctx: &mut Ctx) -> Next {
    end_phase(conn, ctx);
    graceful_end(conn, CloseReason::Done)
}

/// Between requests: watch the idle origin connection and parse the next request.
fn between_requests(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let Some(st) = state_mut(&mut conn.phase) else {
        return Next::Wait;
    };
    if let Some(up) = st.exchange.origin_mut().filter(|o| o.readable) {
        // An idle origin that speaks or closes is no longer reusable.
        if !matches!(up.read(&mut ctx.scratch), Ok(None)) {
            release(st.exchange.take_origin(), ctx);
        }
    }
    if ctx.draining {
        return Next::Close(CloseReason::Draining);
    }
    let buf = st.from_client.get_or_insert_with(|| ctx.pool.take());
    if read_client(&mut conn.client, &mut conn.client_eof, buf).is_err() {
        return Next::Close(CloseReason::ClientReset);
    }
    on_head(key, conn, ctx)
}

/// Deregisters and closes an origin connection that is no longer wanted.
fn release(origin: Option<Sock>, ctx: &mut Ctx) {
    if let Some(mut o) = origin {
        let _ = ctx.registry.deregister(&mut o.stream);
    }
}

/// The forwarding phase ends (a reply or a graceful end replaces it, or the connection closes): its origin
/// connection is closed, with the exchange in flight if any, and its buffers go back to the pool.
fn end_phase(conn: &mut Conn, ctx: &mut Ctx) {
    if let Some(st) = state_mut(&mut conn.phase) {
        release(st.exchange.take_origin(), ctx);
        put(&mut st.from_client, None, ctx);
        put(&mut st.from_origin, None, ctx);
    }
}

/// Writes the first `n` bytes of `buf` (body the exchange framed) to `sink` and drops what it took.
fn pass(sink: &mut Sock, buf: &mut Buffer, n: usize) -> std::io::Result<usize> {
    let w = sink.write_some(buf.data().get(..n).unwrap_or(&[]))?;
    buf.consume(w);
    Ok(w)
}

/// Writes what waits in `to_client` (response heads) to the client, counted as downloaded; true if any went.
/// (Fields, not the connection: the caller may hold the exchange in its phase.)
fn flush_down(
    client: &mut Sock,
    to_client: &mut Vec<u8>,
    bytes_down: &mut u64,
    counter: &std::sync::atomic::AtomicU64,
) -> Result<bool, Next> {
    let before = to_client.len();
    flush_to(client, to_client).map_err(|_| Next::Close(CloseReason::ClientReset))?;
    Ok(count(bytes_down, counter, before - to_client.len()))
}

/// Writes the queued bytes `head` (usually none) and the first `n` bytes of `buf` to `sink`, in one write where both
/// fit, and removes what went from each. Returns (head bytes, buffer bytes) written.
fn pass_after(
    sink: &mut Sock,
    head: &mut Vec<u8>,
    buf: &mut Buffer,
    n: usize,
) -> std::io::Result<(usize, usize)> {
    if head.is_empty() {
        return pass(sink, buf, n).map(|w| (0, w));
    }
    let sent = sink.write_two(head, buf.data().get(..n).unwrap_or(&[]))?;
    let from_head = sent.min(head.len());
    head.drain(..from_head);
    buf.consume(sent - from_head);
    Ok((from_head, sent - from_head))
}

/// Counts `n` bytes relayed one way on the connection and the worker's counter; true if there were any.
fn count(total: &mut u64, counter: &std::sync::atomic::AtomicU64, n: usize) -> bool {
    *total += n as u64;
    metrics::add(counter, n as u64);
    n > 0
}

/// The user's buckets during one drive of a forwarding connection, and when a dry one wants to be asked again.
struct Lim<'a> {
    user: Option<&'a UserLimits>,
    wake: Option<Duration>,
    /// Her quota is used up: the exchange is cut and the connection closes.
    quota_hit: bool,
}

/// Reads within the user's rate and quota (`up`: her upload bucket): `Ok(None)` (as for "nothing to read") also
/// when that direction's bucket is dry or her quota is used up; the throttle timer drives it again. Each direction
/// asks its own bucket, so a dry download bucket does not hold back the request body, nor a dry upload bucket the
/// response.
fn read_limited(
    sock: &mut Sock,
    buf: &mut [u8],
    lim: &mut Lim<'_>,
    up: bool,
    now: Instant,
) -> std::io::Result<Option<usize>> {
    let Some(l) = lim.user else {
        return sock.read(buf);
    };
    let bucket: &Bucket = if up { &l.up } else { &l.down };
    let quota = Some(&l.quota).filter(|q| q.is_set());
    let grant = match relay::ask(Some(bucket), quota, now, buf.len()) {
        relay::Ask::Go(g) => g.min(buf.len()),
        relay::Ask::Throttle(w) => {
            lim.wake = Some(lim.wake.map_or(w, |t| t.min(w)));
            return Ok(None);
        }
        relay::Ask::Quota => {
            lim.quota_hit = true;
            return Ok(None);
        }
    };
    let r = sock.read(&mut buf[..grant]);
    let used = match r {
        Ok(Some(n)) => n,
        _ => 0,
    };
    relay::unask(Some(bucket), quota, grant, used);
    r
}

/// Request head and body toward the origin. Ok(progress) or Err(close reason).
fn upward(conn: &mut Conn, ctx: &mut Ctx, lim: &mut Lim<'_>) -> Result<bool, CloseReason> {
    let mut progress = false;
    let before = conn.to_upstream.len();
    conn.flush_upstream()
        .map_err(|_| CloseReason::UpstreamReset)?;
    let sent = before - conn.to_upstream.len();
    if sent > 0 {
        // The request head was read before any bucket was asked: it is charged as it goes out.
        if let Some(l) = lim.user {
            l.up.charge(ctx.now, sent);
            l.quota.charge(sent);
        }
    }
    progress |= count(&mut conn.bytes_up, &ctx.stats.bytes_up, sent);
    if !conn.to_upstream.is_empty() {
        return Ok(progress);
    }
    let Some(st) = in_flight(&mut conn.phase) else {
        return Ok(progress);
    };
    if conn.client.error {
        return Err(CloseReason::ClientReset);
    }
    let exchange = &mut st.exchange;
    for _ in 0..BODY_READS {
        // Frame what we have, forward it, read more.
        let buf = st.from_client.get_or_insert_with(|| ctx.pool.take());
        let mut event = exchange.request_step(buf.data());
        if let UploadEvent::Body(n) = event {
            let Some(origin) = exchange.origin_mut() else {
                return Ok(progress);
            };
            let w = pass(origin, buf, n).map_err(|_| CloseReason::UpstreamReset)?;
            exchange.sent_to_origin(w);
            progress |= count(&mut conn.bytes_up, &ctx.stats.bytes_up, w);
            if w < n {
                return Ok(progress);
            }
            event = exchange.request_step(buf.data());
        }
        match event {
            UploadEvent::Body(_) => continue,
            UploadEvent::BadBody => return Err(CloseReason::BadRequestBody),
            UploadEvent::Complete => return Ok(progress),
            UploadEvent::Sent => {
                // Keep watching the client while the response is awaited: a reset (or close) must not leave both
                // sockets open until the idle timeout. Bytes it sends now are its next (pipelined) request: keep
                // them.
                return read_client(&mut conn.client, &mut conn.client_eof, buf)
                    .map(|()| progress)
                    .map_err(|_| CloseReason::ClientReset);
            }
            UploadEvent::NeedBody => {}
        }
        if conn.client_eof {
            return Err(CloseReason::ClientEofInBody);
        }
        if !conn.client.readable || buf.is_full() {
            return Ok(progress);
        }
        match read_limited(&mut conn.client, buf.space(), lim, true, ctx.now) {
            Ok(Some(0)) => conn.client_eof = true,
            Ok(Some(n)) => {
                buf.fill(n);
                progress = true;
            }
            Ok(None) => return Ok(progress),
            Err(_) => return Err(CloseReason::ClientReset),
        }
    }
    Ok(progress)
}

/// Response heads and body toward the client. Ok(progress) or Err(what to do instead).
fn downward(conn: &mut Conn, ctx: &mut Ctx, lim: &mut Lim<'_>) -> Result<bool, Next> {
    let mut progress = false;
    let opts = head_options(&ctx.cfg, ctx.draining);
    // A response head was just queued: it waits for the body bytes that may follow it in the origin's buffer, so
    // both leave in one write (one segment, one wake-up of the client) instead of two.
    let mut head_queued = false;
    for _ in 0..BODY_READS {
        let head_waits = std::mem::take(&mut head_queued);
        if !conn.to_client.is_empty() && !head_waits {
            progress |= flush_down(
                &mut conn.client,
                &mut conn.to_client,
                &mut conn.bytes_down,
                &ctx.stats.bytes_down,
            )?;
            if !conn.to_client.is_empty() {
                return Ok(progress);
            }
        }
        // The origin was dropped only on the way out (the phase ends with it): nothing more to read then.
        let Some(st) = in_flight(&mut conn.phase) else {
            return Ok(progress);
        };
        let exchange = &mut st.exchange;
        let buf = st.from_origin.get_or_insert_with(|| ctx.pool.take());
        let event = exchange.origin_step(buf.data(), &opts, &mut ctx.head_out);
        if head_waits && !matches!(event, OriginEvent::Body(_) | OriginEvent::Head { .. }) {
            // No body bytes to go with the head: it leaves alone, before whatever this event leads to.
            progress |= flush_down(
                &mut conn.client,
                &mut conn.to_client,
                &mut conn.bytes_down,
                &ctx.stats.bytes_down,
            )?;
        }
        match event {
            OriginEvent::Head {
                consumed,
                status,
                interim,
            } => {
                buf.consume(consumed);
                if !interim {
                    if let Some(r) = conn.request.as_mut() {
                        r.status = status;
                    }
                }
                conn.to_client.extend_from_slice(&ctx.head_out);
                progress = true;
                head_queued = true;
                continue;
            }
            OriginEvent::UpstreamRefused => {
                // The upstream proxy refused our credentials: that is not the client's to answer.
                return Err(origin_error(
                    conn,
                    ctx,
                    CloseReason::UpstreamProxy(Failure::NotAllowed),
                ));
            }
            OriginEvent::Bad(e) => {
                debug!("{}: bad response from origin: {e}", conn.peer);
                return Err(origin_error(conn, ctx, CloseReason::BadResponse));
            }
            OriginEvent::NeedHead => {
                if buf.is_full() {
                    if grow(&mut st.from_origin, ctx.cfg.max_head, &mut ctx.pool) {
                        continue;
                    }
                    return Err(origin_error(conn, ctx, CloseReason::ResponseHeadTooLarge));
                }
            }
            OriginEvent::Body(n) => {
                // A head queued just before goes in the same write.
                let (head, w) = pass_after(&mut conn.client, &mut conn.to_client, buf, n)
                    .map_err(|_| Next::Close(CloseReason::ClientReset))?;
                exchange.sent_to_client(w);
                progress |= count(&mut conn.bytes_down, &ctx.stats.bytes_down, head + w);
                if w < n || exchange.response_complete() {
                    return Ok(progress);
                }
            }
            OriginEvent::BadBody => return Err(Next::Close(CloseReason::BadResponseBody)),
            OriginEvent::Complete | OriginEvent::Idle => return Ok(progress),
            OriginEvent::NeedBody => {}
        }
        // Need more bytes from the origin.
        let Some(up) = exchange.origin_mut() else {
            return Ok(progress);
        };
        if !up.readable || buf.is_full() {
            return Ok(progress);
        }
        // Response heads and bodies alike come out of the user's download bucket.
        match read_limited(up, buf.space(), lim, false, ctx.now) {
            Ok(Some(0)) => {
                if exchange.origin_closed() {
                    // Read-until-close body (or a truncated one): the client learns the end from our close.
                    if let Some(req) = conn.request.take() {
                        access::request_line(conn, &req, CloseReason::Done, ctx.now);
                        conn.request_lines = true;
                    }
                    return Err(finish(conn, ctx));
                }
                return Err(origin_error(conn, ctx, CloseReason::OriginClosed));
            }
            Ok(Some(n)) => {
                buf.fill(n);
                progress = true;
            }
            Ok(None) => return Ok(progress),
            Err(_) => return Err(origin_error(conn, ctx, CloseReason::OriginReset)),
        }
    }
    Ok(progress)
}

/// The origin failed mid-exchange: a 502 if the client has seen nothing yet, otherwise just close.
fn origin_error(conn: &mut Conn, ctx: &mut Ctx, reason: CloseReason) -> Next {
    let started = state(&conn.phase)
        .map(|s| s.exchange.response_started())
        .unwrap_or(true);
    // The exchange in flight ends with its origin connection.
    end_phase(conn, ctx);
    if started {
        return Next::Close(reason);
    }
    ctx.stats.connect_error(Failure::General);
    reply::fail(conn, ctx, ReplyKind::HttpForward, reason)
}
