//! Client handshakes: feeds the sans-IO parsers from the client buffer, applies policy (auth, limits), and hands
//! over to `connect`, `udp`, `bind` or `http`. Also the error path: reply, linger, close.

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
use crate::proto::{proxy_protocol, socks4, socks5, Failure, Parse};
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
    match conn.phase {
        Phase::Handshake {
            step: Handshake::ProxyHeader,
            ..
        } => proxy_header(conn, ctx),
        Phase::Handshake {
            step: Handshake::Detect,
            ..
        } => detect(conn, ctx),
        Phase::Handshake {
            step: Handshake::Socks5Greeting,
            ..
        } => socks5_greeting(conn, ctx),
        Phase::Handshake {
            step: Handshake::Socks5Auth,
            ..
        } => socks5_auth(key, conn, ctx),
        Phase::Handshake {
            step: Handshake::Socks5Request,
            ..
        } => socks5_request(key, conn, ctx),
        Phase::Handshake {
            step: Handshake::Socks4Request,
            ..
        } => socks4_request(key, conn, ctx),
        Phase::Handshake {
            step: Handshake::HttpHead,
            ..
        } => http::on_head(key, conn, ctx),
        _ => Next::Wait,
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
    let (proto, phase) = match detect::detect(first) {
        Protocol::Socks5 => (Proto::Socks5, Handshake::Socks5Greeting),
        Protocol::Socks4 if ctx.cfg.socks4 => (Proto::Socks4, Handshake::Socks4Request),
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
    debug!(
        "{}: {} handshake",
        conn.peer,
        metrics::PROTO_LABELS[proto as usize]
    );
    set_proto(conn, ctx, proto);
    set_step(conn, phase);
    Next::Again
}

fn socks5_greeting(conn: &mut Conn, ctx: &mut Ctx) -> Next {
    match socks5::parse_greeting(data(conn)) {
        Ok(Parse::Incomplete) => need_more(conn, ctx),
        Ok(Parse::Done(g, n)) => {
            consume(conn, n);
            // A verified client certificate is the authentication: no password is asked for (a client that
            // offers only user/password gets it, and whatever it sends is accepted for the certificate's user).
            let by_certificate = tls::cert_user(conn) && g.no_auth;
            let users_required = !ctx.users.is_empty() && !by_certificate;
            let method = crate::proto::server::choose_method(&g, users_required);
            let mut out = [0u8; 2];
            let len = socks5::encode_method(method, &mut out);
            if conn.send_client(&out[..len]).is_err() {
                return Next::Close(CloseReason::ClientError);
            }
            debug!("{}: SOCKS5 method {method:#04x} chosen", conn.peer);
            match method {
                socks5::METHOD_NO_AUTH => set_step(conn, Handshake::Socks5Request),
                socks5::METHOD_USER_PASS => set_step(conn, Handshake::Socks5Auth),
                _ => {
                    metrics::inc(&ctx.stats.auth_failures);
                    debug!("{}: SOCKS5: no acceptable method offered", conn.peer);
                    return enter_linger(conn, ctx, CloseReason::AuthFailed);
                }
            }
            Next::Again
        }
        Err(e) => bad_handshake(conn, ctx, e),
    }
}

fn socks5_auth(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let (verdict, n) = match socks5::parse_user_pass(data(conn)) {
        Ok(Parse::Incomplete) => return need_more(conn, ctx),
        Ok(Parse::Done(_, n)) if tls::cert_user(conn) => (conn.user.clone(), n),
        Ok(Parse::Done(creds, n)) if ctx.users.needs_slow_verify(creds.user) => {
            // A hashed password takes milliseconds to check: do it on the blocking pool, never on the loop.
            let work = Work::Verify {
                users: Arc::clone(&ctx.users),
                user: creds.user.to_vec(),
                pass: creds.pass.to_vec(),
            };
            consume(conn, n);
            return verify_off_loop(key, conn, ctx, work, PendingAuth::Socks5);
        }
        Ok(Parse::Done(creds, n)) => (ctx.users.verify(creds.user, creds.pass), n),
        Err(e) => return bad_handshake(conn, ctx, e),
    };
    consume(conn, n);
    socks5_auth_result(conn, ctx, verdict)
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
    let Handshake::Verifying(pending) = std::mem::replace(step, Handshake::Socks5Auth) else {
        return Next::Wait;
    };
    match *pending {
        PendingAuth::Socks5 => socks5_auth_result(conn, ctx, verdict),
        PendingAuth::Http(req, head, st) => {
            http::on_verified(key, conn, ctx, verdict, (req, head, st))
        }
    }
}

fn socks5_auth_result(conn: &mut Conn, ctx: &mut Ctx, verdict: Option<Authorized>) -> Next {
    let ok = verdict.is_some();
    let mut out = [0u8; 2];
    let len = socks5::encode_auth_status(ok, &mut out);
    if conn.send_client(&out[..len]).is_err() {
        return Next::Close(CloseReason::ClientError);
    }
    match verdict {
        Some(user) => {
            debug!("{}: SOCKS5 user {} authenticated", conn.peer, user.user());
            conn.user = Some(user);
            set_step(conn, Handshake::Socks5Request);
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

fn socks5_request(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    match socks5::parse_request(data(conn)) {
        Ok(Parse::Incomplete) => need_more(conn, ctx),
        Ok(Parse::Done(req, n)) => {
            consume(conn, n);
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
                socks5::Command::UdpAssociate if ctx.cfg.udp => {
                    udp::start(key, conn, ctx, req.target)
                }
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
        Err(e) => {
            debug!("{}: bad SOCKS5 request: {e}", conn.peer);
            reply::fail(
                conn,
                ctx,
                ReplyKind::Socks5,
                CloseReason::Failed(e.failure()),
            )
        }
    }
}

fn socks4_request(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let (command, target, n) = match socks4::parse_request(data(conn)) {
        Ok(Parse::Incomplete) => return need_more(conn, ctx),
        Ok(Parse::Done(req, n)) => (req.command, req.target, n),
        Err(e) => {
            debug!("{}: bad SOCKS4 request: {e}", conn.peer);
            return reply::fail(
                conn,
                ctx,
                ReplyKind::Socks4,
                CloseReason::Failed(e.failure()),
            );
        }
    };
    consume(conn, n);
    conn.target = Some(Dest::from(&target));
    debug!("{}: SOCKS4 {command:?} {}", conn.peer, Dest::from(&target));
    // SOCKS4 carries no password: with users configured it would be a way around authentication.
    let users_required = !ctx.users.is_empty() && !tls::cert_user(conn);
    if !crate::proto::server::socks4_allowed(users_required, ctx.cfg.socks4_with_users) {
        metrics::inc(&ctx.stats.auth_failures);
        debug!("{}: SOCKS4 refused: users are configured", conn.peer);
        return reply::fail(conn, ctx, ReplyKind::Socks4, CloseReason::Socks4NeedsAuth);
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

fn bad_handshake(conn: &mut Conn, ctx: &mut Ctx, e: crate::proto::ProtoError) -> Next {
    debug!(
        "{}: malformed {} message: {e}",
        conn.peer,
        conn.phase.name()
    );
    metrics::inc(&ctx.stats.handshakes_failed[conn.proto as usize]);
    Next::Close(CloseReason::Malformed)
}
