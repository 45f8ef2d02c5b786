//! Client handshakes: feeds the client's bytes to the sans-IO machines of `proto::server` (SOCKS5, SOCKS4) and to
//! the PROXY header and HTTP head parsers, sends what they encode, checks passwords (slow hashes off the loop),
//! applies the session limits, and hands over to `connect`, `udp`, `bind` or `http`.

use std::net::SocketAddr;
use std::sync::Arc;

use log::debug;

use super::close::CloseReason;
use super::conn::{
    fill_client, grow, set_step, user_admit, verify_off_loop, Answer, Conn, Dest, Handshake,
    PendingAuth, Phase,
};
use super::ctx::{Ctx, Next, ReplyKind};
use super::reply::{self, enter_linger};
use super::{bind, connect, http, tls, udp};
use crate::auth::Authorized;
use crate::metrics::{self, Proto, Refusal};
use crate::proto::detect::{self, Protocol};
use crate::proto::server::{
    socks4_allowed, Socks4Event, Socks4Server, Socks5Event, Socks5Server, Socks5Stage,
    MAX_STEP_OUTPUT,
};
use crate::proto::{proxy_protocol, socks4, socks5, Failure, Parse, ProtoError};
use crate::resolve::Work;

fn data(conn: &Conn) -> &[u8] {
    conn.c2u.as_ref().map(|b| b.data()).unwrap_or(&[])
}

fn consume(conn: &mut Conn, n: usize) {
    if let Some(b) = conn.c2u.as_mut() {
        b.consume(n);
    }
}

/// Largest PROXY protocol v2 header (16-byte preamble plus a 16-bit length).
const MAX_PROXY_HEADER: usize = 16 + 65535;

/// The parser needs more bytes: wait for them, unless the client already closed. A full buffer grows (up to the
/// largest PROXY v2 header) so a message can always complete.
fn need_more(conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let full = conn.c2u.as_ref().is_some_and(|b| b.is_full());
    if full {
        return if grow(&mut conn.c2u, MAX_PROXY_HEADER, &mut ctx.pool) {
            Next::Again
        } else {
            Next::Close(CloseReason::OversizedMessage)
        };
    }
    if conn.client_eof {
        Next::Close(CloseReason::ClientEof)
    } else {
        Next::Wait
    }
}

/// Drives a connection in one of the client-handshake phases.
pub fn drive(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    match conn.flush_client() {
        Ok(true) => {}
        Ok(false) => return Next::Wait,
        Err(_) => return Next::Close(CloseReason::ClientError),
    }
    if fill_client(conn, ctx).is_err() {
        return Next::Close(tls::failure(conn).unwrap_or(CloseReason::ClientReset));
    }
    if let Some(next) = tls::on_established(conn, ctx) {
        return next;
    }
    let Phase::Handshake { step, .. } = &conn.phase else {
        return Next::Wait;
    };
    match step {
        Handshake::ProxyHeader => proxy_header(conn, ctx),
        Handshake::Detect => detect(conn, ctx),
        Handshake::Socks5(hs) => socks5(key, conn, ctx, *hs),
        Handshake::Socks4(hs) => socks4(key, conn, ctx, *hs),
        Handshake::HttpHead => http::on_head(key, conn, ctx),
        Handshake::Verifying(_) => Next::Wait,
    }
}

fn proxy_header(conn: &mut Conn, ctx: &mut Ctx) -> Next {
    match proxy_protocol::parse(data(conn)) {
        Ok(Parse::Incomplete) => need_more(conn, ctx),
        Ok(Parse::Done(header, n)) => {
            consume(conn, n);
            if let proxy_protocol::ProxyHeader::Proxy { src, .. } = header {
                conn.peer = SocketAddr::new(crate::proto::canonical_ip(src.ip()), src.port());
            }
            if !ctx.cfg.client_rules.allows(conn.peer.ip()) {
                metrics::inc(&ctx.stats.refused[Refusal::ClientAcl as usize]);
                super::access::log_refused(conn.peer, "client not allowed (PROXY header address)");
                return Next::Close(CloseReason::ClientNotAllowed);
            }
            debug!("{}: PROXY header accepted", conn.peer);
            set_step(conn, Handshake::Detect);
            Next::Again
        }
        Err(e) => {
            metrics::inc(&ctx.stats.refused[Refusal::ProxyHeader as usize]);
            debug!("{}: bad PROXY protocol header: {e}", conn.peer);
            Next::Close(CloseReason::BadProxyHeader)
        }
    }
}

fn set_proto(conn: &mut Conn, ctx: &Ctx, proto: Proto) {
    metrics::dec(&ctx.stats.active[conn.proto as usize]);
    conn.proto = proto;
    metrics::inc(&ctx.stats.active[proto as usize]);
}

fn detect(conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let Some(&first) = data(conn).first() else {
        return need_more(conn, ctx);
    };
    if !conn.client.is_tls() {
        if let Some(next) = tls::detect(conn, ctx, first) {
            return next;
        }
    }
    // The handshake's policy is fixed here, when its machine is made: whether users are configured (the table of
    // this moment) and whether a client certificate authenticates the client.
    let users_required = !ctx.users.is_empty();
    let certified = tls::cert_user(conn);
    let (proto, phase) = match detect::detect(first) {
        Protocol::Socks5 => (
            Proto::Socks5,
            Handshake::Socks5(Socks5Server::new(users_required).certified(certified)),
        ),
        Protocol::Socks4 if ctx.cfg.socks4 => {
            let allowed = socks4_allowed(users_required && !certified, ctx.cfg.socks4_with_users);
            (Proto::Socks4, Handshake::Socks4(Socks4Server::new(allowed)))
        }
        Protocol::Http if ctx.cfg.http => (Proto::Http, Handshake::HttpHead),
        _ => {
            metrics::inc(&ctx.stats.refused[Refusal::UnknownProtocol as usize]);
            debug!(
                "{}: unknown or disabled protocol (first byte {first:#04x})",
                conn.peer
            );
            return Next::Close(CloseReason::UnknownProtocol);
        }
    };
    debug!("{}: {} handshake", conn.peer, proto.label());
    set_proto(conn, ctx, proto);
    set_step(conn, phase);
    Next::Again
}

/// What one step of the SOCKS5 machine asks the worker to do, with the client's bytes no longer borrowed (so the
/// step's input can be consumed before anything is sent).
// The request holds its target inline as the parser returns it; a turn lives for one call.
#[allow(clippy::large_enum_variant)]
enum Socks5Turn {
    NeedMore,
    Continue,
    /// The credentials were checked on the loop (or stood for by a client certificate).
    Checked(Option<Authorized>),
    /// The credentials need a slow hash check.
    Slow(Work),
    Request(socks5::Request),
    Reject(Failure),
    Malformed(ProtoError),
}

/// One step of a SOCKS5 handshake: the machine sequences the messages and encodes the answers; the worker reads,
/// writes, checks passwords and serves the request.
fn socks5(key: usize, conn: &mut Conn, ctx: &mut Ctx, mut hs: Socks5Server) -> Next {
    let certified = tls::cert_user(conn);
    let stage = hs.stage();
    let name = Handshake::Socks5(hs).name();
    let mut out = [0u8; MAX_STEP_OUTPUT];
    let (consumed, written, event) = hs.step(data(conn), &mut out).parts();
    let turn = match event {
        Socks5Event::NeedMore => Socks5Turn::NeedMore,
        Socks5Event::Continue => Socks5Turn::Continue,
        // A verified client certificate is the authentication: whatever credentials a client that offered only
        // user/password sends are accepted for the certificate's user.
        Socks5Event::Credentials(_) if certified => Socks5Turn::Checked(conn.user.clone()),
        Socks5Event::Credentials(c) if ctx.users.needs_slow_verify(c.user) => {
            Socks5Turn::Slow(Work::Verify {
                users: Arc::clone(&ctx.users),
                user: c.user.to_vec(),
                pass: c.pass.to_vec(),
            })
        }
        Socks5Event::Credentials(c) => Socks5Turn::Checked(ctx.users.verify(c.user, c.pass)),
        Socks5Event::Request(req) => Socks5Turn::Request(req),
        Socks5Event::Reject(f) => Socks5Turn::Reject(f),
        Socks5Event::Malformed(e) => Socks5Turn::Malformed(e),
    };
    consume(conn, consumed);
    set_step(conn, Handshake::Socks5(hs));
    let reply = out.get(..written).unwrap_or(&[]);
    if stage == Socks5Stage::Greeting && !reply.is_empty() {
        if conn.send_client(reply).is_err() {
            return Next::Close(CloseReason::ClientError);
        }
        if let Some(method) = hs.method() {
            debug!("{}: SOCKS5 method {method:#04x} chosen", conn.peer);
        }
    }
    match turn {
        Socks5Turn::NeedMore => need_more(conn, ctx),
        Socks5Turn::Continue => Next::Again,
        Socks5Turn::Checked(verdict) => socks5_auth_result(conn, ctx, hs, verdict),
        // A hashed password takes milliseconds to check: do it on the blocking pool, never on the loop.
        Socks5Turn::Slow(work) => verify_off_loop(key, conn, ctx, work, PendingAuth::Socks5(hs)),
        Socks5Turn::Request(req) => socks5_request(key, conn, ctx, req),
        Socks5Turn::Reject(_) if stage == Socks5Stage::Greeting => {
            metrics::inc(&ctx.stats.auth_failures);
            debug!("{}: SOCKS5: no acceptable method offered", conn.peer);
            enter_linger(conn, ctx, CloseReason::AuthFailed)
        }
        Socks5Turn::Reject(f) => {
            if let Some(e) = hs.error() {
                debug!("{}: bad SOCKS5 request: {e}", conn.peer);
            }
            reply::refuse(conn, ctx, reply, CloseReason::Failed(f))
        }
        Socks5Turn::Malformed(e) => bad_handshake(conn, ctx, name, e),
    }
}

/// A slow password check answered.
pub fn on_verified(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    verdict: Option<Authorized>,
) -> Next {
    let Phase::Handshake { step, .. } = &mut conn.phase else {
        return Next::Wait;
    };
    if !matches!(step, Handshake::Verifying(_)) {
        return Next::Wait;
    }
    let Handshake::Verifying(pending) = std::mem::replace(step, Handshake::HttpHead) else {
        return Next::Wait;
    };
    match *pending {
        PendingAuth::Socks5(hs) => socks5_auth_result(conn, ctx, hs, verdict),
        PendingAuth::Http(req, head, st) => {
            http::on_verified(key, conn, ctx, verdict, (req, head, st))
        }
    }
}

/// The verdict on RFC 1929 credentials: the machine encodes the status, the worker sends it and records the user.
fn socks5_auth_result(
    conn: &mut Conn,
    ctx: &mut Ctx,
    mut hs: Socks5Server,
    verdict: Option<Authorized>,
) -> Next {
    let mut out = [0u8; MAX_STEP_OUTPUT];
    let len = hs.auth_result(verdict.is_some(), &mut out);
    set_step(conn, Handshake::Socks5(hs));
    if conn.send_client(out.get(..len).unwrap_or(&[])).is_err() {
        return Next::Close(CloseReason::ClientError);
    }
    match verdict {
        Some(user) => {
            debug!("{}: SOCKS5 user {} authenticated", conn.peer, user.user());
            conn.user = Some(user);
            Next::Again
        }
        None => {
            // RFC 1929 §2: after a failure status the server MUST close the connection.
            metrics::inc(&ctx.stats.auth_failures);
            debug!("{}: SOCKS5 authentication failed", conn.peer);
            enter_linger(conn, ctx, CloseReason::AuthFailed)
        }
    }
}

/// Serves a complete SOCKS5 request (the handshake machine is over).
fn socks5_request(key: usize, conn: &mut Conn, ctx: &mut Ctx, req: socks5::Request) -> Next {
    conn.target = Some(Dest::from(&req.target));
    debug!(
        "{}: SOCKS5 {:?} {}",
        conn.peer,
        req.command,
        Dest::from(&req.target)
    );
    if let Err(why) = user_admit(conn, ctx) {
        return reply::fail(conn, ctx, ReplyKind::Socks5, why);
    }
    match req.command {
        socks5::Command::Connect => {
            connect::start(key, conn, ctx, req.target, Answer::Reply(ReplyKind::Socks5))
        }
        socks5::Command::UdpAssociate if ctx.cfg.udp => udp::start(key, conn, ctx, req.target),
        socks5::Command::Bind if ctx.cfg.bind_cmd => {
            bind::start(key, conn, ctx, req.target, ReplyKind::Socks5)
        }
        _ => {
            debug!("{}: SOCKS5 command not supported or disabled", conn.peer);
            reply::fail(
                conn,
                ctx,
                ReplyKind::Socks5,
                CloseReason::Failed(Failure::CommandNotSupported),
            )
        }
    }
}

/// One step of a SOCKS4/4a handshake: the machine parses the request and makes the socks4-with-users decision.
fn socks4(key: usize, conn: &mut Conn, ctx: &mut Ctx, mut hs: Socks4Server) -> Next {
    let mut out = [0u8; MAX_STEP_OUTPUT];
    let (consumed, written, event) = hs.step(data(conn), &mut out).parts();
    let reply = out.get(..written).unwrap_or(&[]);
    let (request, allowed) = match event {
        Socks4Event::NeedMore => return need_more(conn, ctx),
        Socks4Event::Request(req) => ((req.command, req.target), true),
        Socks4Event::NotAllowed(req) => ((req.command, req.target), false),
        Socks4Event::Reject(f) => {
            if let Some(e) = hs.error() {
                debug!("{}: bad SOCKS4 request: {e}", conn.peer);
            }
            return reply::refuse(conn, ctx, reply, CloseReason::Failed(f));
        }
    };
    consume(conn, consumed);
    set_step(conn, Handshake::Socks4(hs));
    let (command, target) = request;
    conn.target = Some(Dest::from(&target));
    debug!("{}: SOCKS4 {command:?} {}", conn.peer, Dest::from(&target));
    if !allowed {
        // SOCKS4 carries no password: with users configured it would be a way around authentication.
        metrics::inc(&ctx.stats.auth_failures);
        debug!("{}: SOCKS4 refused: users are configured", conn.peer);
        return reply::refuse(conn, ctx, reply, CloseReason::Socks4NeedsAuth);
    }
    if let Err(why) = user_admit(conn, ctx) {
        return reply::fail(conn, ctx, ReplyKind::Socks4, why);
    }
    match command {
        socks4::Command::Connect => {
            connect::start(key, conn, ctx, target, Answer::Reply(ReplyKind::Socks4))
        }
        socks4::Command::Bind if ctx.cfg.bind_cmd => {
            bind::start(key, conn, ctx, target, ReplyKind::Socks4)
        }
        socks4::Command::Bind => reply::fail(
            conn,
            ctx,
            ReplyKind::Socks4,
            CloseReason::Failed(Failure::CommandNotSupported),
        ),
    }
}

fn bad_handshake(conn: &mut Conn, ctx: &mut Ctx, what: &str, e: ProtoError) -> Next {
    debug!("{}: malformed {what} message: {e}", conn.peer);
    metrics::inc(&ctx.stats.handshakes_failed[conn.proto as usize]);
    Next::Close(CloseReason::Malformed)
}
