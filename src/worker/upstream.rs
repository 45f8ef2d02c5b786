//! Chaining through `--upstream`: the client side of SOCKS5 or HTTP CONNECT, spoken on the outbound socket.
//!
//! The upstream's replies are peer input like any other: they are parsed by the sans-IO parsers in
//! `proto::upstream`, and its failures map back onto the client's reply codes.

use std::time::Instant;

use log::debug;

use super::close::CloseReason;
use super::conn::{drop_upstream, open_upstream_proxy, path_failed, Conn, Phase};
use super::ctx::{Ctx, Next, ReplyKind};
use super::gate;
use super::phase::{Answer, UpstreamHandshake, UpstreamState};
use crate::net::{self, ConnectState};
use crate::proto::upstream as up;
use crate::proto::{socks5, Failure, Parse, TargetAddr};
use crate::upstream::UpstreamKind;

/// Starts connecting to the upstream proxy.
pub fn start_connect(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    (answer, target): (Answer, TargetAddr),
    deadline: Instant,
) -> Next {
    conn.phase = Phase::Upstream(Box::new(UpstreamHandshake {
        answer,
        state: UpstreamState::Connecting,
        next_addr: 0,
        deadline,
        target,
    }));
    try_next(key, conn, ctx)
}

fn try_next(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let Phase::Upstream(hs) = &conn.phase else {
        return Next::Wait;
    };
    let reply = hs.answer.kind();
    // The user's egress address is the source of the connection to the upstream proxy too.
    let v4 = ctx
        .cfg
        .upstream
        .as_ref()
        .and_then(|u| u.addrs.first())
        .is_none_or(|a| a.is_ipv4());
    let source = match gate::egress(conn, ctx, v4) {
        Ok(source) => source,
        Err(_) => return fail(conn, ctx, reply, CloseReason::Failed(Failure::General)),
    };
    loop {
        let Phase::Upstream(hs) = &mut conn.phase else {
            return Next::Wait;
        };
        let index = hs.next_addr;
        hs.next_addr += 1;
        match open_upstream_proxy(key, ctx, index, source) {
            Some((addr, Ok(sock))) => {
                debug!("{}: connecting to upstream proxy {addr}", conn.peer);
                conn.upstream = Some(sock);
                return Next::Wait;
            }
            // An egress address that cannot be bound is our configuration's fault: say so where operators look.
            Some((addr, Err(e))) if e.kind() == std::io::ErrorKind::Other => log::warn!(
                "{}: user {}: upstream {addr}: {e}",
                conn.peer,
                conn.user_name()
            ),
            Some((addr, Err(e))) => debug!("{}: upstream {addr}: {e}", conn.peer),
            None => break,
        }
    }
    fail(
        conn,
        ctx,
        reply,
        CloseReason::UpstreamProxy(Failure::General),
    )
}

fn fail(conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind, reason: CloseReason) -> Next {
    path_failed(conn, ctx, reply, reason)
}

fn send(conn: &mut Conn, bytes: &[u8]) -> Result<(), CloseReason> {
    conn.to_upstream.extend_from_slice(bytes);
    conn.flush_upstream()
        .map(|_| ())
        .map_err(|_| CloseReason::UpstreamReset)
}

/// Drives the upstream handshake.
pub fn drive(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let Phase::Upstream(hs) = &conn.phase else {
        return Next::Wait;
    };
    let (state, reply) = (hs.state, hs.answer.kind());
    let Some(sock) = conn.upstream.as_mut() else {
        return Next::Wait;
    };
    if state == UpstreamState::Connecting {
        if !sock.writable && !sock.readable {
            return Next::Wait;
        }
        return match net::connect_state(&sock.stream) {
            ConnectState::Pending => {
                sock.readable = false;
                sock.writable = false;
                Next::Wait
            }
            ConnectState::Failed(e) => {
                debug!("{}: upstream connect: {e}", conn.peer);
                drop_upstream(conn, ctx);
                try_next(key, conn, ctx)
            }
            ConnectState::Connected => {
                debug!("{}: connected to the upstream proxy", conn.peer);
                if !super::tls::start_upstream(conn, ctx) {
                    return fail(
                        conn,
                        ctx,
                        reply,
                        CloseReason::UpstreamProxy(Failure::General),
                    );
                }
                let http = ctx
                    .cfg
                    .upstream
                    .as_ref()
                    .is_some_and(|u| u.kind == UpstreamKind::Http);
                if http && reply == ReplyKind::HttpForward {
                    // Forwarded requests go to an HTTP upstream in absolute-form (as Squid's cache_peer sends
                    // them): no tunnel to set up, the request head is the first thing it gets.
                    return Next::Connected(reply);
                }
                greet(conn, ctx, reply)
            }
        };
    }
    if conn.flush_upstream().is_err() {
        return fail(
            conn,
            ctx,
            reply,
            CloseReason::UpstreamProxy(Failure::General),
        );
    }
    // Read the upstream's reply into the downstream buffer: whatever follows the reply is tunnel data.
    let buf = conn.u2c.get_or_insert_with(|| ctx.pool.take());
    let Some(sock) = conn.upstream.as_mut() else {
        return Next::Wait;
    };
    let mut eof = false;
    while sock.readable && !buf.is_full() {
        match sock.read(buf.space()) {
            Ok(Some(0)) => {
                eof = true;
                break;
            }
            Ok(Some(n)) => buf.fill(n),
            Ok(None) => break,
            Err(_) => {
                eof = true;
                break;
            }
        }
    }
    let step = parse_step(state, buf.data());
    match step {
        Step::More if eof || buf.is_full() => {
            debug!(
                "{}: upstream closed or overflowed during its handshake",
                conn.peer
            );
            fail(
                conn,
                ctx,
                reply,
                CloseReason::UpstreamProxy(Failure::General),
            )
        }
        Step::More => Next::Wait,
        Step::Bad => {
            debug!("{}: malformed answer from the upstream proxy", conn.peer);
            fail(
                conn,
                ctx,
                reply,
                CloseReason::UpstreamProxy(Failure::General),
            )
        }
        Step::Refused(f) => {
            debug!("{}: the upstream proxy refused us", conn.peer);
            fail(conn, ctx, reply, CloseReason::UpstreamProxy(f))
        }
        Step::Failed(f) => {
            debug!(
                "{}: the upstream proxy reports {}",
                conn.peer,
                CloseReason::Failed(f).describe()
            );
            fail(conn, ctx, reply, CloseReason::Failed(f))
        }
        Step::Ok(n, then) => {
            buf.consume(n);
            if buf.is_empty() {
                if let Some(b) = conn.u2c.take() {
                    ctx.pool.give(b);
                }
            }
            advance(conn, ctx, reply, then)
        }
    }
}

enum Then {
    SendAuth,
    SendRequest,
    Established,
}

enum Step {
    More,
    Bad,
    /// The upstream proxy itself refused (no acceptable method, our credentials).
    Refused(Failure),
    /// The upstream proxy reports the target's failure.
    Failed(Failure),
    Ok(usize, Then),
}

fn parse_step(state: UpstreamState, data: &[u8]) -> Step {
    match state {
        UpstreamState::Connecting => Step::More,
        UpstreamState::Method => match up::parse_method_choice(data) {
            Ok(Parse::Incomplete) => Step::More,
            Ok(Parse::Done(socks5::METHOD_NO_AUTH, n)) => Step::Ok(n, Then::SendRequest),
            Ok(Parse::Done(socks5::METHOD_USER_PASS, n)) => Step::Ok(n, Then::SendAuth),
            Ok(Parse::Done(_, _)) => Step::Refused(Failure::NotAllowed),
            Err(_) => Step::Bad,
        },
        UpstreamState::Auth => match up::parse_auth_status(data) {
            Ok(Parse::Incomplete) => Step::More,
            Ok(Parse::Done(true, n)) => Step::Ok(n, Then::SendRequest),
            Ok(Parse::Done(false, _)) => Step::Refused(Failure::NotAllowed),
            Err(_) => Step::Bad,
        },
        UpstreamState::Reply => match up::parse_socks5_reply(data) {
            Ok(Parse::Incomplete) => Step::More,
            Ok(Parse::Done(r, n)) if r.rep == 0 => Step::Ok(n, Then::Established),
            Ok(Parse::Done(r, _)) => Step::Failed(up::failure_from_socks5_reply(r.rep)),
            Err(_) => Step::Bad,
        },
        UpstreamState::HttpReply => match up::parse_http_connect_reply(data) {
            Ok(Parse::Incomplete) => Step::More,
            Ok(Parse::Done(r, n)) if (200..300).contains(&r.status) => {
                Step::Ok(n, Then::Established)
            }
            // RFC 9110 §15.5.8: 407 is the proxy's own refusal of our credentials.
            Ok(Parse::Done(r, _)) if r.status == 407 => Step::Refused(Failure::NotAllowed),
            Ok(Parse::Done(r, _)) => Step::Failed(up::failure_from_http_status(r.status)),
            Err(_) => Step::Bad,
        },
    }
}

fn set_state(conn: &mut Conn, state: UpstreamState) {
    if let Phase::Upstream(hs) = &mut conn.phase {
        hs.state = state;
    }
}

/// The TCP connection to the upstream is up: open the conversation.
fn greet(conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind) -> Next {
    let Some(upstream) = ctx.cfg.upstream.as_ref() else {
        return Next::Close(CloseReason::Internal);
    };
    let Phase::Upstream(hs) = &conn.phase else {
        return Next::Wait;
    };
    let target = &hs.target;
    let mut out = [0u8; up::MAX_HTTP_CONNECT_LEN];
    let (len, state) = match upstream.kind {
        UpstreamKind::Socks5 => {
            let methods: &[u8] = if upstream.credentials.is_some() {
                &[socks5::METHOD_NO_AUTH, socks5::METHOD_USER_PASS]
            } else {
                &[socks5::METHOD_NO_AUTH]
            };
            (
                socks5::encode_greeting(methods, &mut out),
                UpstreamState::Method,
            )
        }
        UpstreamKind::Http => {
            let creds = upstream
                .credentials
                .as_ref()
                .map(|(u, p)| (u.as_bytes(), p.as_bytes()));
            (
                up::encode_http_connect(target, creds, &mut out),
                UpstreamState::HttpReply,
            )
        }
    };
    if len == 0 {
        return fail(
            conn,
            ctx,
            reply,
            CloseReason::Failed(Failure::AddressNotSupported),
        );
    }
    set_state(conn, state);
    if let Err(r) = send(conn, &out[..len]) {
        return Next::Close(r);
    }
    Next::Again
}

fn advance(conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind, then: Then) -> Next {
    let mut out = [0u8; socks5::MAX_USER_PASS_LEN];
    match then {
        Then::SendAuth => {
            let Some((u, p)) = ctx
                .cfg
                .upstream
                .as_ref()
                .and_then(|u| u.credentials.clone())
            else {
                return fail(
                    conn,
                    ctx,
                    reply,
                    CloseReason::UpstreamProxy(Failure::NotAllowed),
                );
            };
            let len = socks5::encode_user_pass(u.as_bytes(), p.as_bytes(), &mut out);
            set_state(conn, UpstreamState::Auth);
            if let Err(r) = send(conn, &out[..len]) {
                return Next::Close(r);
            }
            Next::Again
        }
        Then::SendRequest => {
            let Phase::Upstream(hs) = &conn.phase else {
                return Next::Wait;
            };
            let len = socks5::encode_request(socks5::Command::Connect, &hs.target, &mut out);
            if len == 0 {
                return fail(
                    conn,
                    ctx,
                    reply,
                    CloseReason::Failed(Failure::AddressNotSupported),
                );
            }
            set_state(conn, UpstreamState::Reply);
            if let Err(r) = send(conn, &out[..len]) {
                return Next::Close(r);
            }
            Next::Again
        }
        Then::Established => Next::Connected(reply),
    }
}
