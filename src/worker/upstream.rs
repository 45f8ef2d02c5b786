//! Chaining through `--upstream`: the client side of SOCKS5 or HTTP CONNECT, spoken on the outbound socket.
//!
//! The upstream's replies are peer input like any other: they are parsed by the sans-IO parsers in
//! `proto::upstream`, and its failures map back onto the client's reply codes.

use log::debug;

use super::close::CloseReason;
use super::conn::{Conn, Dest, Phase, ReplyKind};
use super::connect::{self, drop_upstream, fail};
use super::{Ctx, Next};
use crate::net::{self, ConnectState};
use crate::proto::upstream as up;
use crate::proto::{socks5, Failure, Parse};
use crate::upstream::UpstreamKind;

/// Where the upstream conversation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
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
}

/// The upstream handshake of one connection.
pub struct UpstreamHandshake {
    /// How to answer our client once the chain is up.
    pub reply: ReplyKind,
    state: State,
    next_addr: usize,
}

/// Starts connecting to the upstream proxy.
pub fn start_connect(key: usize, conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind) -> Next {
    conn.phase = Phase::Upstream(Box::new(UpstreamHandshake {
        reply,
        state: State::Connecting,
        next_addr: 0,
    }));
    try_next(key, conn, ctx)
}

fn try_next(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let Some(upstream) = ctx.cfg.upstream.clone() else {
        return Next::Close(CloseReason::Internal);
    };
    let Phase::Upstream(hs) = &mut conn.phase else {
        return Next::Wait;
    };
    let reply = hs.reply;
    while let Some(addr) = upstream.addrs.get(hs.next_addr).copied() {
        hs.next_addr += 1;
        debug!("{}: connecting to upstream proxy {addr}", conn.peer);
        match connect::open(key, ctx, addr) {
            Ok(sock) => {
                conn.upstream = Some(sock);
                return Next::Wait;
            }
            Err(e) => debug!("{}: upstream {addr}: {e}", conn.peer),
        }
    }
    fail(
        conn,
        ctx,
        reply,
        CloseReason::UpstreamProxy(Failure::General),
    )
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
    let (state, reply) = (hs.state, hs.reply);
    let Some(sock) = conn.upstream.as_mut() else {
        return Next::Wait;
    };
    if state == State::Connecting {
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
                    return connect::established(key, conn, ctx, reply);
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
            advance(key, conn, ctx, reply, then)
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

fn parse_step(state: State, data: &[u8]) -> Step {
    match state {
        State::Connecting => Step::More,
        State::Method => match up::parse_method_choice(data) {
            Ok(Parse::Incomplete) => Step::More,
            Ok(Parse::Done(socks5::METHOD_NO_AUTH, n)) => Step::Ok(n, Then::SendRequest),
            Ok(Parse::Done(socks5::METHOD_USER_PASS, n)) => Step::Ok(n, Then::SendAuth),
            Ok(Parse::Done(_, _)) => Step::Refused(Failure::NotAllowed),
            Err(_) => Step::Bad,
        },
        State::Auth => match up::parse_auth_status(data) {
            Ok(Parse::Incomplete) => Step::More,
            Ok(Parse::Done(true, n)) => Step::Ok(n, Then::SendRequest),
            Ok(Parse::Done(false, _)) => Step::Refused(Failure::NotAllowed),
            Err(_) => Step::Bad,
        },
        State::Reply => match up::parse_socks5_reply(data) {
            Ok(Parse::Incomplete) => Step::More,
            Ok(Parse::Done(r, n)) if r.rep == 0 => Step::Ok(n, Then::Established),
            Ok(Parse::Done(r, _)) => Step::Failed(up::failure_from_socks5_reply(r.rep)),
            Err(_) => Step::Bad,
        },
        State::HttpReply => match up::parse_http_connect_reply(data) {
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

fn set_state(conn: &mut Conn, state: State) {
    if let Phase::Upstream(hs) = &mut conn.phase {
        hs.state = state;
    }
}

/// The TCP connection to the upstream is up: open the conversation.
fn greet(conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind) -> Next {
    let Some(upstream) = ctx.cfg.upstream.as_ref() else {
        return Next::Close(CloseReason::Internal);
    };
    let Some(target) = conn.target.as_ref().and_then(Dest::to_target) else {
        return Next::Close(CloseReason::Internal);
    };
    let mut out = [0u8; up::MAX_HTTP_CONNECT_LEN];
    let (len, state) = match upstream.kind {
        UpstreamKind::Socks5 => {
            let methods: &[u8] = if upstream.credentials.is_some() {
                &[socks5::METHOD_NO_AUTH, socks5::METHOD_USER_PASS]
            } else {
                &[socks5::METHOD_NO_AUTH]
            };
            (socks5::encode_greeting(methods, &mut out), State::Method)
        }
        UpstreamKind::Http => {
            let creds = upstream
                .credentials
                .as_ref()
                .map(|(u, p)| (u.as_bytes(), p.as_bytes()));
            (
                up::encode_http_connect(&target, creds, &mut out),
                State::HttpReply,
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

fn advance(key: usize, conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind, then: Then) -> Next {
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
            set_state(conn, State::Auth);
            if let Err(r) = send(conn, &out[..len]) {
                return Next::Close(r);
            }
            Next::Again
        }
        Then::SendRequest => {
            let Some(target) = conn.target.as_ref().and_then(Dest::to_target) else {
                return Next::Close(CloseReason::Internal);
            };
            let len = socks5::encode_request(socks5::Command::Connect, &target, &mut out);
            if len == 0 {
                return fail(
                    conn,
                    ctx,
                    reply,
                    CloseReason::Failed(Failure::AddressNotSupported),
                );
            }
            set_state(conn, State::Reply);
            if let Err(r) = send(conn, &out[..len]) {
                return Next::Close(r);
            }
            Next::Again
        }
        Then::Established => connect::established(key, conn, ctx, reply),
    }
}
