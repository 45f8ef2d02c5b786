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

use log::debug;

use super::access::{self, RequestLog};
use super::close::CloseReason;
use super::conn::{Conn, Dest, PendingAuth, Phase, ReplyKind, Sock};
use super::connect::{self, drop_upstream};
use super::handshake::{self, fill_client, grow, user_admit};
use super::reply::{self, graceful_end};
use super::{Ctx, Next};
use crate::auth::Authorized;
use crate::buffer::Buffer;
use crate::metrics;
use crate::proto::http::{self as h, BodyFramer, RequestKind, ResponseContext, RewriteOptions};
use crate::proto::{upstream as chain, Failure, Parse, ProtoError, TargetAddr};
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

/// Forwarding state of one client connection.
pub struct HttpState {
    /// The origin the current upstream socket is connected to.
    origin: Option<TargetAddr>,
    /// The origin allows another request on its connection.
    origin_reusable: bool,
    /// A request/response exchange is in progress.
    busy: bool,
    /// The current request is a HEAD request.
    is_head: bool,
    /// The client's HTTP minor version.
    minor: u8,
    /// The client wants to keep the connection.
    client_keep_alive: bool,
    /// The client connection stays open after the current response.
    keep_client: bool,
    /// Request body framing.
    req_body: BodyFramer,
    /// Bytes at the front of `c2u` that belong to the request body and may be forwarded.
    up_ready: usize,
    /// The whole request (head and body) went to the origin.
    req_done: bool,
    /// The final response head has been parsed.
    resp_head_done: bool,
    /// Response body framing.
    resp_body: BodyFramer,
    /// Bytes at the front of `u2c` that belong to the response body and may be forwarded.
    down_ready: usize,
    /// Anything of the response reached the client (after that, errors can only close).
    resp_started: bool,
    /// The origin reset while the request was still being sent: deliver whatever response it managed to send,
    /// then close the client connection.
    abandoned: bool,
    /// Credentials that passed verification on this connection (user NUL pass).
    auth_token: Option<Box<[u8]>>,
    /// The request head, held until the path to the origin is up (an upstream proxy's handshake goes first).
    pending_head: Vec<u8>,
}

impl HttpState {
    fn new() -> HttpState {
        HttpState {
            origin: None,
            origin_reusable: false,
            busy: false,
            is_head: false,
            minor: 1,
            client_keep_alive: false,
            keep_client: false,
            req_body: BodyFramer::new(h::BodyKind::None),
            up_ready: 0,
            req_done: false,
            resp_head_done: false,
            resp_body: BodyFramer::new(h::BodyKind::None),
            down_ready: 0,
            resp_started: false,
            abandoned: false,
            auth_token: None,
            pending_head: Vec::new(),
        }
    }
}

/// True while an exchange is in flight (a drain lets it finish).
pub fn busy(conn: &Conn) -> bool {
    conn.http.as_ref().map(|h| h.busy).unwrap_or(false)
}

/// Parses the next request head from the client buffer (phase HttpHead, or Http between requests).
pub fn on_head(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let max = ctx.cfg.max_head;
    let opts = RewriteOptions {
        via: ctx.cfg.via.as_deref(),
    };
    let data = conn.c2u.as_ref().map(|b| b.data()).unwrap_or(&[]);
    if data.is_empty() {
        if conn.up.eof {
            return Next::Close(if conn.http.is_some() {
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
            return if conn.up.eof {
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
        let log = RequestLog::new(conn, &head, &authority, ctx.now);
        debug!("{}: HTTP {}", conn.peer, log.line);
        conn.request = Some(Box::new(log));
    } else {
        debug!("{}: HTTP CONNECT {}", conn.peer, Dest::from(&req.target));
    }
    // Proxy authentication (RFC 9110 §11.7), on every request of a kept-alive connection (Basic credentials are
    // per request); the credentials are consumed here and never forwarded. Credentials equal to the ones that
    // already passed on this connection are accepted without verifying a slow hash again.
    if !ctx.users.is_empty() && !super::tls::cert_user(conn) {
        if let (Some(c), Some(token)) = (
            req.credentials.as_ref(),
            conn.http.as_ref().and_then(|h| h.auth_token.as_deref()),
        ) {
            if conn.user.is_some() && crate::auth::ct_eq(&auth_token(c.user(), c.pass()), token) {
                return proceed(key, conn, ctx, req, head);
            }
        }
        let verdict = match req.credentials.as_ref() {
            Some(c) if ctx.users.needs_slow_verify(c.user()) => {
                let work = Work::Verify {
                    users: Arc::clone(&ctx.users),
                    user: c.user().to_vec(),
                    pass: c.pass().to_vec(),
                };
                return handshake::verify_off_loop(
                    key,
                    conn,
                    ctx,
                    work,
                    PendingAuth::Http(req, head),
                );
            }
            Some(c) => ctx.users.verify(c.user(), c.pass()),
            None => None,
        };
        return on_verified(key, conn, ctx, verdict, req, head);
    }
    proceed(key, conn, ctx, req, head)
}

/// The proxy credentials of `req` were checked (on the loop, or on the blocking pool for hashes).
pub fn on_verified(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    verdict: Option<Authorized>,
    req: h::Request,
    head: Vec<u8>,
) -> Next {
    match verdict {
        Some(user) => {
            if let Some(c) = req.credentials.as_ref() {
                let st = conn.http.get_or_insert_with(|| Box::new(HttpState::new()));
                st.auth_token = Some(auth_token(c.user(), c.pass()));
            }
            // Sessions are counted against the user that first authenticated on the connection.
            if conn.user.is_none() {
                conn.user = Some(user);
            }
            proceed(key, conn, ctx, req, head)
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
fn proceed(key: usize, conn: &mut Conn, ctx: &mut Ctx, req: h::Request, head: Vec<u8>) -> Next {
    conn.target = Some(Dest::from(&req.target));
    let reply = match req.kind {
        RequestKind::Connect => ReplyKind::HttpConnect,
        RequestKind::Forward => ReplyKind::HttpForward,
    };
    if !user_admit(conn, ctx) {
        return reply::fail(conn, ctx, reply, CloseReason::UserLimit);
    }
    if req.kind == RequestKind::Connect {
        if conn.http.is_some() {
            // CONNECT after forwarded requests: the old origin connection is not the tunnel's, and the tunnel
            // gets its own session line.
            drop_upstream(conn, ctx);
            conn.http = None;
            conn.request_lines = false;
        }
        return connect::start(key, conn, ctx, req.target, ReplyKind::HttpConnect);
    }
    metrics::inc(&ctx.stats.http_requests);
    let st = conn.http.get_or_insert_with(|| Box::new(HttpState::new()));
    st.busy = true;
    st.is_head = req.is_head;
    st.minor = req.minor_version;
    st.client_keep_alive = req.keep_alive;
    st.keep_client = false;
    st.req_body = BodyFramer::new(req.body);
    st.up_ready = 0;
    st.req_done = false;
    st.resp_head_done = false;
    st.resp_body = BodyFramer::new(h::BodyKind::None);
    st.down_ready = 0;
    st.resp_started = false;
    st.abandoned = false;
    conn.to_upstream.clear();
    let upstream = ctx.cfg.upstream.as_ref();
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
    let reuse = conn.upstream.is_some()
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
        conn.phase = Phase::Http;
        return Next::Again;
    }
    st.pending_head = head;
    drop_upstream(conn, ctx);
    if let Some(st) = conn.http.as_mut() {
        st.origin = Some(req.target.clone());
        st.origin_reusable = false;
    }
    if let Some(b) = conn.u2c.take() {
        ctx.pool.give(b);
    }
    connect::start(key, conn, ctx, req.target, ReplyKind::HttpForward)
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
    conn.deadline = None;
    if let Some(st) = conn.http.as_mut() {
        st.origin_reusable = true;
        // Whatever an upstream proxy's handshake queued has gone out first: the request follows it.
        conn.to_upstream.append(&mut st.pending_head);
        st.pending_head = Vec::new();
    }
    if conn.proto as usize != 0 {
        metrics::inc(&ctx.stats.handshakes_ok[conn.proto as usize]);
    }
    conn.phase = Phase::Http;
    conn.last_active = ctx.now;
    super::relay::arm_idle(key, conn, ctx);
    Next::Again
}

/// The origin could not be reached: 502/504/403, then close.
pub fn on_origin_failed(conn: &mut Conn, ctx: &mut Ctx, reason: CloseReason) -> Next {
    if let Some(st) = conn.http.as_mut() {
        st.busy = false;
        st.origin = None;
        st.pending_head = Vec::new();
    }
    reply::fail(conn, ctx, ReplyKind::HttpForward, reason)
}

/// Drives a forwarding exchange (or waits for the next request).
pub fn drive(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let busy = conn.http.as_ref().map(|s| s.busy).unwrap_or(false);
    if !busy {
        return between_requests(key, conn, ctx);
    }
    let mut progress = false;
    match upward(conn, ctx) {
        Ok(p) => progress |= p,
        Err(CloseReason::UpstreamReset) => {
            // The origin stopped taking the request (say it answered 413 and reset): what it sent before the
            // reset is still readable, so deliver that response, then close.
            if let Some(st) = conn.http.as_mut() {
                st.req_done = true;
                st.abandoned = true;
                st.up_ready = 0;
            }
            conn.to_upstream.clear();
        }
        Err(CloseReason::BadRequestBody) if !conn.http.as_ref().is_some_and(|s| s.resp_started) => {
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
    match downward(conn, ctx) {
        Ok(p) => progress |= p,
        Err(next) => return next,
    }
    if progress {
        conn.last_active = ctx.now;
    }
    let Some(st) = conn.http.as_ref() else {
        return Next::Close(CloseReason::Internal);
    };
    let resp_done = st.resp_head_done
        && st.resp_body.is_done()
        && st.down_ready == 0
        && conn.to_client.is_empty();
    if !resp_done {
        return if progress { Next::Again } else { Next::Wait };
    }
    // The response is complete and delivered.
    if let Some(req) = conn.request.take() {
        access::request_line(conn, &req, CloseReason::Done, ctx.now);
        conn.request_lines = true;
    }
    let Some(st) = conn.http.as_ref() else {
        return Next::Close(CloseReason::Internal);
    };
    if !st.req_done || st.abandoned || !st.keep_client || ctx.draining || conn.up.eof {
        // The client still sends a body we will not read, or asked to close: end gracefully.
        return finish(conn, ctx);
    }
    let reuse = st.origin_reusable && conn.u2c.as_ref().map(|b| b.is_empty()).unwrap_or(true);
    if !reuse {
        drop_upstream(conn, ctx);
        if let Some(st) = conn.http.as_mut() {
            st.origin = None;
        }
    }
    if let Some(b) = conn.u2c.take() {
        ctx.pool.give(b);
    }
    if let Some(st) = conn.http.as_mut() {
        st.busy = false;
    }
    let _ = key;
    Next::Again
}

/// Graceful end of a forwarding connection: shut down our side and wait briefly for the client's EOF.
fn finish(conn: &mut Conn, ctx: &mut Ctx) -> Next {
    if let Some(st) = conn.http.as_mut() {
        st.busy = false;
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
                    if let Some(st) = conn.http.as_mut() {
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
fn upward(conn: &mut Conn, ctx: &mut Ctx) -> Result<bool, CloseReason> {
    let mut progress = false;
    let before = conn.to_upstream.len();
    conn.flush_upstream()
        .map_err(|_| CloseReason::UpstreamReset)?;
    let sent = before - conn.to_upstream.len();
    if sent > 0 {
        progress = true;
        conn.bytes_up += sent as u64;
        metrics::add(&ctx.stats.bytes_up, sent as u64);
    }
    if !conn.to_upstream.is_empty() {
        return Ok(progress);
    }
    let Some(st) = conn.http.as_mut() else {
        return Ok(progress);
    };
    if conn.client.error {
        return Err(CloseReason::ClientReset);
    }
    if st.req_done {
        // Keep watching the client while the response is awaited: a reset (or close) must not leave both sockets
        // open until the idle timeout. Bytes it sends now are its next (pipelined) request: keep them.
        let buf = conn.c2u.get_or_insert_with(|| ctx.pool.take());
        while conn.client.readable && !conn.up.eof && !buf.is_full() {
            match conn.client.read(buf.space()) {
                Ok(Some(0)) => conn.up.eof = true,
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
        let n = match forward_framed(&mut st.req_body, &mut st.up_ready, buf, up) {
            Ok(n) => n,
            Err(Framed::Body) => return Err(CloseReason::BadRequestBody),
            Err(Framed::Sink) => return Err(CloseReason::UpstreamReset),
        };
        if n > 0 {
            progress = true;
            conn.bytes_up += n as u64;
            metrics::add(&ctx.stats.bytes_up, n as u64);
        }
        if st.up_ready > 0 {
            return Ok(progress);
        }
        if st.req_body.is_done() {
            st.req_done = true;
            return Ok(progress);
        }
        if conn.up.eof {
            return Err(CloseReason::ClientEofInBody);
        }
        if !conn.client.readable || buf.is_full() {
            return Ok(progress);
        }
        match conn.client.read(buf.space()) {
            Ok(Some(0)) => conn.up.eof = true,
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
fn downward(conn: &mut Conn, ctx: &mut Ctx) -> Result<bool, Next> {
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
        let Some(st) = conn.http.as_mut() else {
            return Ok(progress);
        };
        let buf = conn.u2c.get_or_insert_with(|| ctx.pool.take());
        if !st.resp_head_done {
            if !buf.is_empty() {
                let rctx = ResponseContext {
                    request_is_head: st.is_head,
                    // A response that arrives before the request is complete ends the connection (we will not
                    // read the rest of that body), so it must say `Connection: close`.
                    client_keep_alive: st.client_keep_alive
                        && !ctx.draining
                        && st.req_done
                        && !st.abandoned,
                    client_minor_version: st.minor,
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
                        st.resp_started = true;
                        progress = true;
                        if !resp.interim {
                            st.resp_head_done = true;
                            st.keep_client = resp.keep_client;
                            st.origin_reusable = resp.keep_origin;
                            st.resp_body = BodyFramer::new(resp.body);
                        }
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
        } else {
            let n = match forward_framed(
                &mut st.resp_body,
                &mut st.down_ready,
                buf,
                &mut conn.client,
            ) {
                Ok(n) => n,
                Err(Framed::Body) => return Err(Next::Close(CloseReason::BadResponseBody)),
                Err(Framed::Sink) => return Err(Next::Close(CloseReason::ClientReset)),
            };
            if n > 0 {
                progress = true;
                conn.bytes_down += n as u64;
                metrics::add(&ctx.stats.bytes_down, n as u64);
            }
            if st.down_ready > 0 {
                return Ok(progress);
            }
            if st.resp_body.is_done() {
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
        match up.read(buf.space()) {
            Ok(Some(0)) => {
                if st.resp_head_done && !st.resp_body.is_done() && st.down_ready == 0 {
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
    let started = conn.http.as_ref().map(|s| s.resp_started).unwrap_or(true);
    drop_upstream(conn, ctx);
    if started {
        return Next::Close(reason);
    }
    if let Some(st) = conn.http.as_mut() {
        st.busy = false;
    }
    ctx.stats.connect_error(Failure::General);
    reply::fail(conn, ctx, ReplyKind::HttpForward, reason)
}
