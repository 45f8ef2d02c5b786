//! HTTP proxy: CONNECT tunnels and plain forwarding of absolute-form requests with keep-alive.
//!
//! One request is in flight per client connection: the next request head stays in the client buffer until the
//! current response is complete, so pipelined requests are answered in order. Bodies pass through verbatim
//! (chunked stays chunked); `proto::http::BodyFramer` only says where each body ends. The origin connection is
//! reused for the next request when it goes to the same origin and both sides allow it.
//!
//! ```text
//! WaitHead --(request)--> [connect or reuse origin] --> Exchange --(response done)--> WaitHead | close
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use log::debug;

use super::access;
use super::close::CloseReason;
use super::conn::{
    drop_upstream, fill_client, grow, user_admit, verify_off_loop, Answer, Conn, Dest, PendingAuth,
    Phase, RequestLog, Sock,
};
use super::connect;
use super::ctx::{Ctx, Next, ReplyKind};
use super::gate;
use super::phase::{Download, Exchange, HttpState, InFlight, Upload};
use super::relay;
use super::reply::{self, graceful_end};
use super::timers::TimerKind;
use crate::auth::Authorized;
use crate::buffer::Buffer;
use crate::metrics;
use crate::policy::bucket::Bucket;
use crate::policy::rules::Command;
use crate::policy::UserLimits;
use crate::proto::http::{self as h, BodyFramer, RequestKind, ResponseContext, RewriteOptions};
use crate::proto::{upstream as chain, Failure, Parse, ProtoError};
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

impl HttpState {
    fn new() -> HttpState {
        HttpState {
            origin: None,
            origin_reusable: false,
            auth_token: None,
            pending_head: Vec::new(),
            exchange: Exchange::Idle,
        }
    }
}

/// Anything of the current response reached the client (after that, errors can only close).
fn response_started(st: &HttpState) -> bool {
    match &st.exchange {
        Exchange::InFlight(x) => match x.response {
            Download::Head { started } => started,
            Download::Body { .. } => true,
        },
        Exchange::Idle => false,
    }
}

/// True while an exchange is in flight, its origin connection included (a drain lets it finish).
pub fn busy(conn: &Conn) -> bool {
    match &conn.phase {
        Phase::Http(st) => matches!(st.exchange, Exchange::InFlight(_)),
        Phase::Resolving { answer, .. } | Phase::Connecting { answer, .. } => answer.forwards(),
        Phase::Upstream(u) => u.answer.forwards(),
        _ => false,
    }
}

/// Parses the next request head from the client buffer (phase HttpHead, or Http between requests).
pub fn on_head(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let max = ctx.cfg.max_head;
    let opts = RewriteOptions {
        via: ctx.cfg.via.as_deref(),
    };
    let data = conn.c2u.as_ref().map(|b| b.data()).unwrap_or(&[]);
    if data.is_empty() {
        if conn.client_eof {
            return Next::Close(if matches!(conn.phase, Phase::Http(_)) {
                CloseReason::Done
            } else {
                CloseReason::ClientEof
            });
        }
        // A kept-alive connection between requests holds no buffer.
        if let Some(b) = conn.c2u.take() {
            ctx.pool.give(b);
        }
        return Next::Wait;
    }
    let req = match h::parse_request(data, max, &opts, &mut ctx.head_out) {
        Ok(Parse::Incomplete) => {
            let full = conn.c2u.as_ref().map(|b| b.is_full()).unwrap_or(false);
            if full && !grow(&mut conn.c2u, max, &mut ctx.pool) {
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
        Ok(Parse::Done(req, n)) => {
            if let Some(b) = conn.c2u.as_mut() {
                b.consume(n);
            }
            req
        }
        Err(e) => return bad_request(conn, ctx, e),
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
    let st = take_state(conn);
    // Proxy authentication (RFC 9110 §11.7), on every request of a kept-alive connection (Basic credentials are
    // per request); the credentials are consumed here and never forwarded. Credentials equal to the ones that
    // already passed on this connection are accepted without verifying a slow hash again.
    if !ctx.users.is_empty() && !super::tls::cert_user(conn) {
        if let (Some(c), Some(token)) = (
            req.credentials.as_ref(),
            st.as_ref().and_then(|h| h.auth_token.as_deref()),
        ) {
            if conn.user.is_some() && crate::auth::ct_eq(&auth_token(c.user(), c.pass()), token) {
                return proceed(key, conn, ctx, (req, head, st));
            }
        }
        let verdict = match req.credentials.as_ref() {
            Some(c) if ctx.users.needs_slow_verify(c.user()) => {
                let work = Work::Verify {
                    users: Arc::clone(&ctx.users),
                    user: c.user().to_vec(),
                    pass: c.pass().to_vec(),
                };
                return verify_off_loop(key, conn, ctx, work, PendingAuth::Http(req, head, st));
            }
            Some(c) => ctx.users.verify(c.user(), c.pass()),
            None => None,
        };
        return on_verified(key, conn, ctx, verdict, (req, head, st));
    }
    proceed(key, conn, ctx, (req, head, st))
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

/// Takes the forwarding state out of `Phase::Http` (leaving `Phase::Closing` for the caller to replace).
fn take_state(conn: &mut Conn) -> Option<Box<HttpState>> {
    if !matches!(conn.phase, Phase::Http(_)) {
        return None;
    }
    match std::mem::replace(&mut conn.phase, Phase::Closing) {
        Phase::Http(st) => Some(st),
        _ => None,
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
        if st.is_some() {
            // CONNECT after forwarded requests: the old origin connection is not the tunnel's, and the tunnel
            // gets its own session line.
            drop_upstream(conn, ctx);
            conn.request_lines = false;
        }
        let answer = Answer::Reply(ReplyKind::HttpConnect);
        return connect::start(key, conn, ctx, req.target, answer);
    }
    metrics::inc(&ctx.stats.http_requests);
    let mut st = st.unwrap_or_else(|| Box::new(HttpState::new()));
    st.exchange = Exchange::InFlight(InFlight {
        is_head: req.is_head,
        minor: req.minor_version,
        client_keep_alive: req.keep_alive,
        upload: Upload::Sending {
            body: BodyFramer::new(req.body),
            ready: 0,
        },
        response: Download::Head { started: false },
    });
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
    // An HTTP upstream proxy takes requests for any origin on one connection.
    // (Through a group the kept connection's member and head form are not known here: a new one per request.)
    let reuse = conn.upstream.is_some()
        && !via_group
        && st.origin_reusable
        && (via_http_proxy || st.origin.as_ref() == Some(&req.target));
    if reuse {
        conn.to_upstream.extend_from_slice(&head);
        if ctx.head_out.capacity() == 0 {
            // Give the allocation back for the next head.
            let mut head = head;
            head.clear();
            ctx.head_out = head;
        }
        conn.phase = Phase::Http(st);
        return Next::Again;
    }
    st.pending_head = head;
    drop_upstream(conn, ctx);
    st.origin = Some(req.target.clone());
    st.origin_reusable = false;
    if let Some(b) = conn.u2c.take() {
        ctx.pool.give(b);
    }
    connect::start(key, conn, ctx, req.target, Answer::Forward(st))
}

fn bad_request(conn: &mut Conn, ctx: &mut Ctx, e: ProtoError) -> Next {
    debug!("{}: bad HTTP request: {e}", conn.peer);
    let reason = match e {
        ProtoError::HeadTooLarge => CloseReason::HeaderTooLarge,
        _ => CloseReason::BadRequest,
    };
    reply::fail(conn, ctx, ReplyKind::HttpForward, reason)
}

/// The origin connection for a forwarded request is up.
pub fn on_origin_connected(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    // The connect phases carried the state for exactly this: it cannot be missing.
    let Some(mut st) = conn.phase.take_forward() else {
        return Next::Close(CloseReason::Internal);
    };
    st.origin_reusable = true;
    // Whatever an upstream proxy's handshake queued has gone out first: the request follows it.
    conn.to_upstream.append(&mut st.pending_head);
    st.pending_head = Vec::new();
    if conn.proto as usize != 0 {
        metrics::inc(&ctx.stats.handshakes_ok[conn.proto as usize]);
    }
    conn.phase = Phase::Http(st);
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
            if let Some(Exchange::InFlight(x)) = state_mut(&mut conn.phase).map(|s| &mut s.exchange)
            {
                x.upload = Upload::Abandoned;
            }
            conn.to_upstream.clear();
        }
        Err(CloseReason::BadRequestBody) if !state(&conn.phase).is_some_and(response_started) => {
            drop_upstream(conn, ctx);
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
                .push(ctx.now + wait, key, conn.gen, TimerKind::Throttle);
        }
    }
    if progress {
        conn.last_active = ctx.now;
    }
    let Some(Exchange::InFlight(x)) = state(&conn.phase).map(|s| &s.exchange) else {
        return Next::Close(CloseReason::Internal);
    };
    let resp_done = matches!(&x.response, Download::Body { body, ready: 0, .. } if body.is_done())
        && conn.to_client.is_empty();
    if !resp_done {
        return if progress { Next::Again } else { Next::Wait };
    }
    // The response is complete and delivered.
    if let Some(req) = conn.request.take() {
        access::request_line(conn, &req, CloseReason::Done, ctx.now);
        conn.request_lines = true;
    }
    let Some(st) = state(&conn.phase) else {
        return Next::Close(CloseReason::Internal);
    };
    let (sent, keep_client) = match &st.exchange {
        Exchange::InFlight(x) => (
            matches!(x.upload, Upload::Sent),
            matches!(
                x.response,
                Download::Body {
                    keep_client: true,
                    ..
                }
            ),
        ),
        Exchange::Idle => (false, false),
    };
    if !sent || !keep_client || ctx.draining || conn.client_eof {
        // The client still sends a body we will not read, or asked to close: end gracefully.
        return finish(conn, ctx);
    }
    let reuse = st.origin_reusable && conn.u2c.as_ref().map(|b| b.is_empty()).unwrap_or(true);
    if !reuse {
        drop_upstream(conn, ctx);
        if let Some(st) = state_mut(&mut conn.phase) {
            st.origin = None;
        }
    }
    if let Some(b) = conn.u2c.take() {
        ctx.pool.give(b);
    }
    if let Some(st) = state_mut(&mut conn.phase) {
        st.exchange = Exchange::Idle;
    }
    let _ = key;
    Next::Again
}

/// Graceful end of a forwarding connection: shut down our side and wait briefly for the client's EOF.
fn finish(conn: &mut Conn, ctx: &mut Ctx) -> Next {
    if let Some(st) = state_mut(&mut conn.phase) {
        st.exchange = Exchange::Idle;
    }
    drop_upstream(conn, ctx);
    graceful_end(conn, CloseReason::Done)
}

/// Between requests: watch the idle origin connection and parse the next request.
fn between_requests(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    if let Some(up) = conn.upstream.as_mut() {
        if up.readable {
            // An idle origin that speaks or closes is no longer reusable.
            match up.read(&mut ctx.scratch) {
                Ok(None) => {}
                _ => {
                    drop_upstream(conn, ctx);
                    if let Some(st) = state_mut(&mut conn.phase) {
                        st.origin = None;
                    }
                }
            }
        }
    }
    if ctx.draining {
        return Next::Close(CloseReason::Draining);
    }
    if fill_client(conn, ctx).is_err() {
        return Next::Close(CloseReason::ClientReset);
    }
    on_head(key, conn, ctx)
}

/// Why forwarding a framed body stopped.
enum Framed {
    /// The body's framing is invalid.
    Body,
    /// Writing to the sink failed.
    Sink,
}

/// Frames the newly buffered bytes of a body (`ready` counts the bytes at the front of `buf` already known to be
/// body) and writes the framed bytes to `sink`; returns how many were written. Bytes after the end of the body stay
/// in `buf`: they are the next message.
fn forward_framed(
    framer: &mut BodyFramer,
    ready: &mut usize,
    buf: &mut Buffer,
    sink: &mut Sock,
) -> Result<usize, Framed> {
    if !framer.is_done() {
        let fresh = buf.data().get(*ready..).unwrap_or(&[]);
        if !fresh.is_empty() {
            *ready += framer.advance(fresh).map_err(|_| Framed::Body)?;
        }
    }
    if *ready == 0 {
        return Ok(0);
    }
    let n = sink
        .write_some(&buf.data()[..*ready])
        .map_err(|_| Framed::Sink)?;
    buf.consume(n);
    *ready -= n;
    Ok(n)
}

/// Request head and body toward the origin. Ok(progress) or Err(close reason).
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
        progress = true;
        conn.bytes_up += sent as u64;
        metrics::add(&ctx.stats.bytes_up, sent as u64);
    }
    if !conn.to_upstream.is_empty() {
        return Ok(progress);
    }
    let Some(Exchange::InFlight(x)) = state_mut(&mut conn.phase).map(|s| &mut s.exchange) else {
        return Ok(progress);
    };
    if conn.client.error {
        return Err(CloseReason::ClientReset);
    }
    if !matches!(x.upload, Upload::Sending { .. }) {
        // Keep watching the client while the response is awaited: a reset (or close) must not leave both sockets
        // open until the idle timeout. Bytes it sends now are its next (pipelined) request: keep them.
        let buf = conn.c2u.get_or_insert_with(|| ctx.pool.take());
        while conn.client.readable && !conn.client_eof && !buf.is_full() {
            match conn.client.read(buf.space()) {
                Ok(Some(0)) => conn.client_eof = true,
                Ok(Some(n)) => buf.fill(n),
                Ok(None) => break,
                Err(_) => return Err(CloseReason::ClientReset),
            }
        }
        return Ok(progress);
    }
    for _ in 0..32 {
        // Frame what we have, forward it, read more.
        let buf = conn.c2u.get_or_insert_with(|| ctx.pool.take());
        let Some(up) = conn.upstream.as_mut() else {
            return Err(CloseReason::Internal);
        };
        let Upload::Sending { body, ready } = &mut x.upload else {
            return Ok(progress);
        };
        let n = match forward_framed(body, ready, buf, up) {
            Ok(n) => n,
            Err(Framed::Body) => return Err(CloseReason::BadRequestBody),
            Err(Framed::Sink) => return Err(CloseReason::UpstreamReset),
        };
        if n > 0 {
            progress = true;
            conn.bytes_up += n as u64;
            metrics::add(&ctx.stats.bytes_up, n as u64);
        }
        if *ready > 0 {
            return Ok(progress);
        }
        if body.is_done() {
            x.upload = Upload::Sent;
            return Ok(progress);
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
    for _ in 0..32 {
        if !conn.to_client.is_empty() {
            let before = conn.to_client.len();
            conn.flush_client()
                .map_err(|_| Next::Close(CloseReason::ClientReset))?;
            let sent = before - conn.to_client.len();
            conn.bytes_down += sent as u64;
            metrics::add(&ctx.stats.bytes_down, sent as u64);
            progress |= sent > 0;
            if !conn.to_client.is_empty() {
                return Ok(progress);
            }
        }
        let Some(st) = state_mut(&mut conn.phase) else {
            return Ok(progress);
        };
        let Exchange::InFlight(x) = &mut st.exchange else {
            return Ok(progress);
        };
        let buf = conn.u2c.get_or_insert_with(|| ctx.pool.take());
        if let Download::Head { .. } = x.response {
            if !buf.is_empty() {
                let rctx = ResponseContext {
                    request_is_head: x.is_head,
                    // A response that arrives before the request is complete ends the connection (we will not
                    // read the rest of that body), so it must say `Connection: close`.
                    client_keep_alive: x.client_keep_alive
                        && !ctx.draining
                        && matches!(x.upload, Upload::Sent),
                    client_minor_version: x.minor,
                    via: ctx.cfg.via.as_deref(),
                };
                match h::parse_response(buf.data(), ctx.cfg.max_head, &rctx, &mut ctx.head_out) {
                    Ok(Parse::Done(resp, _))
                        if resp.status == 407
                            && ctx
                                .cfg
                                .upstream
                                .as_ref()
                                .is_some_and(|u| u.kind == UpstreamKind::Http) =>
                    {
                        // The upstream proxy refused our credentials: that is not the client's to answer.
                        return Err(origin_error(
                            conn,
                            ctx,
                            CloseReason::UpstreamProxy(Failure::NotAllowed),
                        ));
                    }
                    Ok(Parse::Done(resp, n)) => {
                        buf.consume(n);
                        if !resp.interim {
                            if let Some(r) = conn.request.as_mut() {
                                r.status = resp.status;
                            }
                        }
                        conn.to_client.extend_from_slice(&ctx.head_out);
                        progress = true;
                        x.response = if resp.interim {
                            Download::Head { started: true }
                        } else {
                            st.origin_reusable = resp.keep_origin;
                            Download::Body {
                                body: BodyFramer::new(resp.body),
                                ready: 0,
                                keep_client: resp.keep_client,
                            }
                        };
                        continue;
                    }
                    Ok(Parse::Incomplete) => {
                        if buf.is_full() {
                            if grow(&mut conn.u2c, ctx.cfg.max_head, &mut ctx.pool) {
                                continue;
                            }
                            return Err(origin_error(conn, ctx, CloseReason::ResponseHeadTooLarge));
                        }
                    }
                    Err(e) => {
                        debug!("{}: bad response from origin: {e}", conn.peer);
                        return Err(origin_error(conn, ctx, CloseReason::BadResponse));
                    }
                }
            }
        } else if let Download::Body { body, ready, .. } = &mut x.response {
            let n = match forward_framed(body, ready, buf, &mut conn.client) {
                Ok(n) => n,
                Err(Framed::Body) => return Err(Next::Close(CloseReason::BadResponseBody)),
                Err(Framed::Sink) => return Err(Next::Close(CloseReason::ClientReset)),
            };
            if n > 0 {
                progress = true;
                conn.bytes_down += n as u64;
                metrics::add(&ctx.stats.bytes_down, n as u64);
            }
            if *ready > 0 || body.is_done() {
                return Ok(progress);
            }
        }
        // Need more bytes from the origin.
        let Some(up) = conn.upstream.as_mut() else {
            return Err(Next::Close(CloseReason::Internal));
        };
        if !up.readable || buf.is_full() {
            return Ok(progress);
        }
        // Response heads and bodies alike come out of the user's download bucket.
        match read_limited(up, buf.space(), lim, false, ctx.now) {
            Ok(Some(0)) => {
                if matches!(&x.response, Download::Body { body, ready: 0, .. } if !body.is_done()) {
                    // Read-until-close body (or a truncated one): the client learns the end from our close.
                    if let Some(b) = conn.u2c.take() {
                        ctx.pool.give(b);
                    }
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
    let started = state(&conn.phase).map(response_started).unwrap_or(true);
    drop_upstream(conn, ctx);
    if started {
        return Next::Close(reason);
    }
    if let Some(st) = state_mut(&mut conn.phase) {
        st.exchange = Exchange::Idle;
    }
    ctx.stats.connect_error(Failure::General);
    reply::fail(conn, ctx, ReplyKind::HttpForward, reason)
}
