//! Chaining through `--upstream` or a policy upstream group: the client side of SOCKS5 or HTTP CONNECT, spoken on
//! the outbound socket.
//!
//! The upstream's replies are peer input like any other: they are parsed by the sans-IO parsers in
//! `proto::upstream`, and its failures map back onto the client's reply codes. Through a group, a member that
//! fails to connect or to complete its handshake is counted against its health (`crate::groups`) and the next
//! member is tried, within the session's connect deadline; each attempt gets a share of the time left, so a
//! blackholed member costs latency, not the session.

use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::close::CloseReason;
use super::conn::{
    drop_upstream, open_group_member, open_upstream_proxy, path_failed, Conn, Phase,
};
use super::ctx::{Ctx, Next, ReplyKind};
use super::gate;
use super::phase::{Answer, Route, UpstreamHandshake, UpstreamState};
use super::timers::TimerKind;
use crate::groups::{Change, Group};
use crate::net::ConnectState;
use crate::proto::upstream as up;
use crate::proto::{socks5, Failure, Parse, TargetAddr};
use crate::upstream::{Upstream, UpstreamKind};

/// Least time a group member's attempt gets before the next member is tried.
const MIN_ATTEMPT: Duration = Duration::from_secs(1);

/// Starts connecting to the upstream proxy: `group` when a `via:NAME` rule chose one, else `--upstream`.
pub fn start_connect(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    route: (Answer, TargetAddr, Option<Arc<Group>>),
    deadline: Instant,
) -> Next {
    conn.phase = Phase::Upstream(handshake(conn, ctx, route, deadline));
    try_next(key, conn, ctx)
}

/// The handshake with the upstream proxy, before its connection is opened. `connect` uses it on its own for an
/// `--upstream` given by name: it resolves and dials the name (Happy Eyeballs), then hands over the connected
/// socket in `conn.upstream` with this handshake as `Phase::Upstream`.
pub fn handshake(
    conn: &Conn,
    ctx: &Ctx,
    (answer, target, group): (Answer, TargetAddr, Option<Arc<Group>>),
    deadline: Instant,
) -> Box<UpstreamHandshake> {
    let route = match group {
        Some(group) => Route::Group {
            order: group.order(conn.peer.ip(), ctx.now),
            group,
            pos: 0,
            attempt_deadline: deadline,
        },
        None => Route::Flag,
    };
    Box::new(UpstreamHandshake {
        answer,
        state: UpstreamState::Connecting,
        next_addr: 0,
        deadline,
        target,
        route,
    })
}

/// The server the handshake talks to now.
fn server<'a>(hs: &'a UpstreamHandshake, ctx: &'a Ctx) -> Option<&'a Upstream> {
    match &hs.route {
        Route::Flag => ctx.cfg.upstream.as_ref(),
        Route::Group {
            group, order, pos, ..
        } => order
            .get(*pos)
            .and_then(|&i| group.member(usize::from(i)))
            .map(|m| &m.server),
    }
}

fn try_next(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let Phase::Upstream(hs) = &conn.phase else {
        return Next::Wait;
    };
    let reply = hs.answer.kind();
    if matches!(hs.route, Route::Group { .. }) {
        return try_member(key, conn, ctx, reply);
    }
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

/// Opens a connection to the next member of the group in this session's order.
fn try_member(key: usize, conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind) -> Next {
    loop {
        let Phase::Upstream(hs) = &conn.phase else {
            return Next::Wait;
        };
        let Route::Group {
            group, order, pos, ..
        } = &hs.route
        else {
            return Next::Wait;
        };
        let Some(index) = order.get(*pos).map(|&i| usize::from(i)) else {
            break;
        };
        let (group, left) = (Arc::clone(group), (order.len() - *pos - 1) as u32);
        let overall = hs.deadline;
        let Some(member) = group.member(index) else {
            advance_member(conn);
            continue;
        };
        let v4 = member.server.addrs.first().is_none_or(|a| a.is_ipv4());
        // The user's egress address is the source of the connection to the upstream proxy too; a family she
        // has no address of is not the member's fault.
        let Ok(source) = gate::egress(conn, ctx, v4) else {
            advance_member(conn);
            continue;
        };
        group.attempt(index);
        match open_group_member(key, ctx, member, source) {
            Some((addr, Ok(sock))) => {
                debug!(
                    "{}: connecting to {} of upstream group {} at {addr}",
                    conn.peer, member.label, group.name
                );
                conn.upstream = Some(sock);
                let remaining = overall.saturating_duration_since(ctx.now);
                let share = if left > 0 {
                    (remaining / (left + 1)).max(MIN_ATTEMPT).min(remaining)
                } else {
                    remaining
                };
                let at = ctx.now + share;
                if let Phase::Upstream(hs) = &mut conn.phase {
                    if let Route::Group {
                        attempt_deadline, ..
                    } = &mut hs.route
                    {
                        *attempt_deadline = at;
                    }
                }
                if left > 0 {
                    ctx.timers.arm(at, key, conn.gen, TimerKind::Attempt);
                }
                return Next::Wait;
            }
            Some((addr, Err(e))) if e.kind() == std::io::ErrorKind::Other => {
                // An egress address that cannot be bound is our configuration's fault, not the member's.
                warn!(
                    "{}: user {}: upstream {addr}: {e}",
                    conn.peer,
                    conn.user_name()
                );
                advance_member(conn);
            }
            Some((addr, Err(e))) => {
                debug!("{}: upstream {addr}: {e}", conn.peer);
                note(&group, group.failure(index, ctx.now), index);
                advance_member(conn);
            }
            None => advance_member(conn),
        }
    }
    debug!("{}: no member of the upstream group answered", conn.peer);
    fail(
        conn,
        ctx,
        reply,
        CloseReason::UpstreamProxy(Failure::General),
    )
}

/// Moves the session on to the next member of its order, with a fresh handshake.
fn advance_member(conn: &mut Conn) {
    if let Phase::Upstream(hs) = &mut conn.phase {
        hs.state = UpstreamState::Connecting;
        if let Route::Group { pos, .. } = &mut hs.route {
            *pos += 1;
        }
    }
}

/// Logs a member's change of health (once per transition, by whichever worker saw it).
fn note(group: &Group, change: Option<Change>, index: usize) {
    let Some(m) = group.member(index) else {
        return;
    };
    match change {
        Some(Change::Down) => warn!(
            "upstream group {}: {} is down after {} failures in a row; skipping it for {:?}",
            group.name, m.label, group.max_fails, group.fail_timeout
        ),
        Some(Change::Up) => info!("upstream group {}: {} is up again", group.name, m.label),
        None => {}
    }
}

/// The current group member (if the route is a group) and its index.
fn current(conn: &Conn) -> Option<(Arc<Group>, usize)> {
    let Phase::Upstream(hs) = &conn.phase else {
        return None;
    };
    match &hs.route {
        Route::Group {
            group, order, pos, ..
        } => order
            .get(*pos)
            .map(|&i| (Arc::clone(group), usize::from(i))),
        Route::Flag => None,
    }
}

/// The current member answered its handshake (or, for forwarded HTTP through an HTTP member, accepted the
/// connection): it is healthy, whatever it says about the target.
fn member_ok(conn: &Conn) {
    if let Some((group, index)) = current(conn) {
        note(&group, group.success(index), index);
    }
}

/// The upstream's connect or handshake failed: through a group, count it against the member and try the next one;
/// through `--upstream`, answer with `reason`.
fn upstream_failed(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    reply: ReplyKind,
    reason: CloseReason,
) -> Next {
    let Some((group, index)) = current(conn) else {
        return fail(conn, ctx, reply, reason);
    };
    note(&group, group.failure(index, ctx.now), index);
    drop_upstream(conn, ctx);
    conn.to_upstream.clear();
    if let Some(b) = conn.u2c.take() {
        ctx.pool.give(b);
    }
    advance_member(conn);
    try_next(key, conn, ctx)
}

/// The upstream proxy (or group member) failed in itself, not for the target: the general upstream failure.
fn member_failed(key: usize, conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind) -> Next {
    upstream_failed(
        key,
        conn,
        ctx,
        reply,
        CloseReason::UpstreamProxy(Failure::General),
    )
}

/// A connect timer popped during the upstream phase: the session's deadline (answer "timed out"), or the current
/// member's share of it (try the next member).
pub fn on_timer(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let Phase::Upstream(hs) = &conn.phase else {
        return Next::Wait;
    };
    let reply = hs.answer.kind();
    if hs.deadline <= ctx.now {
        debug!("{}: upstream connect timed out", conn.peer);
        return fail(conn, ctx, reply, CloseReason::Failed(Failure::TimedOut));
    }
    if let Route::Group {
        attempt_deadline,
        order,
        pos,
        ..
    } = &hs.route
    {
        if *attempt_deadline <= ctx.now && *pos + 1 < order.len() {
            debug!(
                "{}: upstream group member did not answer in time; trying the next",
                conn.peer
            );
            return upstream_failed(
                key,
                conn,
                ctx,
                reply,
                CloseReason::Failed(Failure::TimedOut),
            );
        }
    }
    Next::Wait
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
        return match sock.connect_state() {
            ConnectState::Pending => {
                sock.readable = false;
                sock.writable = false;
                Next::Wait
            }
            ConnectState::Failed(e) => {
                debug!("{}: upstream connect: {e}", conn.peer);
                if current(conn).is_some() {
                    return member_failed(key, conn, ctx, reply);
                }
                drop_upstream(conn, ctx);
                try_next(key, conn, ctx)
            }
            ConnectState::Connected => {
                debug!("{}: connected to the upstream proxy", conn.peer);
                let Phase::Upstream(hs) = &conn.phase else {
                    return Next::Wait;
                };
                let http = server(hs, ctx).is_some_and(|u| u.kind == UpstreamKind::Http);
                let group_route = matches!(hs.route, Route::Group { .. });
                // TLS to the upstream when its URL asks for it; a TLS failure later shows up as a failed read
                // or write of the handshake below, and so counts against a group member like any other.
                let started = match &hs.route {
                    Route::Flag => ctx.cfg.upstream.as_ref().is_none_or(|u| {
                        super::tls::start_upstream(conn, u, ctx.cfg.upstream_tls.as_ref())
                    }),
                    Route::Group {
                        group, order, pos, ..
                    } => {
                        let group = Arc::clone(group);
                        order
                            .get(*pos)
                            .and_then(|&i| group.member(usize::from(i)))
                            .is_some_and(|m| {
                                super::tls::start_upstream(conn, &m.server, m.tls.as_ref())
                            })
                    }
                };
                if !started {
                    return member_failed(key, conn, ctx, reply);
                }
                let tls_member = group_route && conn.upstream.as_ref().is_some_and(|s| s.is_tls());
                if http && reply == ReplyKind::HttpForward && tls_member {
                    set_state(conn, UpstreamState::TlsForward);
                    return Next::Again;
                }
                if http && reply == ReplyKind::HttpForward {
                    // Forwarded requests go to an HTTP upstream in absolute-form (as Squid's cache_peer sends
                    // them): no tunnel to set up, the request head is the first thing it gets.
                    member_ok(conn);
                    return forward_head_for_member(conn, ctx, reply);
                }
                greet(conn, ctx, reply)
            }
        };
    }
    if conn.flush_upstream().is_err() {
        // Through TLS this is also where a refused certificate surfaces: a member failure in a group.
        return member_failed(key, conn, ctx, reply);
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
    if state == UpstreamState::TlsForward {
        let established = sock.tls.as_ref().is_some_and(|t| !t.is_handshaking());
        // An HTTP server speaks only when spoken to: anything before our request is not HTTP.
        let early = !buf.is_empty();
        if buf.is_empty() {
            if let Some(b) = conn.u2c.take() {
                ctx.pool.give(b);
            }
        }
        if established && !early {
            member_ok(conn);
            return forward_head_for_member(conn, ctx, reply);
        }
        if eof || early {
            debug!("{}: TLS to the upstream group member failed", conn.peer);
            return member_failed(key, conn, ctx, reply);
        }
        return Next::Wait;
    }
    let step = parse_step(state, buf.data());
    match step {
        Step::More if eof || buf.is_full() => {
            debug!(
                "{}: upstream closed or overflowed during its handshake",
                conn.peer
            );
            member_failed(key, conn, ctx, reply)
        }
        Step::More => Next::Wait,
        Step::Bad => {
            debug!("{}: malformed answer from the upstream proxy", conn.peer);
            member_failed(key, conn, ctx, reply)
        }
        Step::Refused(f) => {
            debug!("{}: the upstream proxy refused us", conn.peer);
            upstream_failed(key, conn, ctx, reply, CloseReason::UpstreamProxy(f))
        }
        Step::Failed(f) => {
            // The member works; the target is what failed.
            member_ok(conn);
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
        UpstreamState::Connecting | UpstreamState::TlsForward => Step::More,
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

/// Forwarded HTTP through a group's HTTP member: the request head (kept in origin-form while the member was not
/// known) becomes absolute-form with the member's credentials. Through `--upstream` it already is.
fn forward_head_for_member(conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind) -> Next {
    let Phase::Upstream(hs) = &mut conn.phase else {
        return Next::Wait;
    };
    let Route::Group {
        group, order, pos, ..
    } = &hs.route
    else {
        return hand_off(conn);
    };
    let Some(member) = order.get(*pos).and_then(|&i| group.member(usize::from(i))) else {
        return Next::Close(CloseReason::Internal);
    };
    let creds = member
        .server
        .credentials
        .as_ref()
        .map(|(u, p)| (u.as_bytes(), p.as_bytes()));
    let Answer::Forward(st) = &mut hs.answer else {
        return hand_off(conn);
    };
    let mut abs = Vec::with_capacity(st.pending_head.len() + 64);
    if !up::encode_forward_head(&st.pending_head, &hs.target, creds, &mut abs) {
        return fail(
            conn,
            ctx,
            reply,
            CloseReason::Failed(Failure::AddressNotSupported),
        );
    }
    st.pending_head = abs;
    hand_off(conn)
}

/// The path through the upstream proxy is up: its socket and the handshake's answer go, by value, to whoever
/// gets the connection.
fn hand_off(conn: &mut Conn) -> Next {
    // The handshake ran on this socket (`drive` waits while there is none).
    let Some(sock) = conn.upstream.take() else {
        return Next::Close(CloseReason::Internal);
    };
    match std::mem::replace(&mut conn.phase, Phase::Closing) {
        Phase::Upstream(hs) => Next::Connected(hs.answer.connected(sock)),
        other => {
            conn.phase = other;
            conn.upstream = Some(sock);
            Next::Wait
        }
    }
}

/// The TCP connection to the upstream is up: open the conversation.
fn greet(conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind) -> Next {
    let Phase::Upstream(hs) = &conn.phase else {
        return Next::Wait;
    };
    let Some(upstream) = server(hs, ctx) else {
        return Next::Close(CloseReason::Internal);
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
    say(conn, ctx, reply, &out[..len], state)
}

/// Sends the next handshake message and awaits its answer in `state`. An empty message is a target the message
/// cannot carry.
fn say(conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind, msg: &[u8], state: UpstreamState) -> Next {
    if msg.is_empty() {
        return fail(
            conn,
            ctx,
            reply,
            CloseReason::Failed(Failure::AddressNotSupported),
        );
    }
    set_state(conn, state);
    if let Err(r) = send(conn, msg) {
        return Next::Close(r);
    }
    Next::Again
}

fn advance(conn: &mut Conn, ctx: &mut Ctx, reply: ReplyKind, then: Then) -> Next {
    let mut out = [0u8; socks5::MAX_USER_PASS_LEN];
    match then {
        Then::SendAuth => {
            let creds = match &conn.phase {
                Phase::Upstream(hs) => server(hs, ctx).and_then(|u| u.credentials.clone()),
                _ => None,
            };
            let Some((u, p)) = creds else {
                return fail(
                    conn,
                    ctx,
                    reply,
                    CloseReason::UpstreamProxy(Failure::NotAllowed),
                );
            };
            let len = socks5::encode_user_pass(u.as_bytes(), p.as_bytes(), &mut out);
            say(conn, ctx, reply, &out[..len], UpstreamState::Auth)
        }
        Then::SendRequest => {
            let Phase::Upstream(hs) = &conn.phase else {
                return Next::Wait;
            };
            let len = socks5::encode_request(socks5::Command::Connect, &hs.target, &mut out);
            say(conn, ctx, reply, &out[..len], UpstreamState::Reply)
        }
        Then::Established => {
            member_ok(conn);
            hand_off(conn)
        }
    }
}
