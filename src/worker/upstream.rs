//! Chaining through `--upstream` or a policy upstream group: the client side of SOCKS5 or HTTP CONNECT, spoken on
//! the outbound socket.
//!
//! The upstream's replies are peer input like any other: they are parsed by the sans-IO parsers in
//! `proto::upstream`, and its failures map back onto the client's reply codes. Through a group, a member that
//! fails to connect or to complete its handshake is counted against its health (`crate::groups`) and the next
//! member is tried, within the session's connect deadline; each attempt gets a share of the time left, so a
//! blackholed member costs latency, not the session.
//!
//! The phase goes by value: `dial` turns an [`UpstreamPlan`] and a freshly opened socket into the
//! [`UpstreamHandshake`] that owns both, and a failed server gives its plan back to `dial` for the next one.
//! While a step runs, the handshake is out of `conn.phase`, and every path out of a step either puts it back
//! (`park`) or moves it on (to the relay or forwarded HTTP, or into the failure reply).

use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::close::CloseReason;
use super::conn::{flush_to, open_upstream, path_failed, Conn, Phase, Sock};
use super::ctx::{Ctx, Next, ReplyKind};
use super::gate;
use super::phase::{Answer, Route, UpstreamHandshake, UpstreamPlan, UpstreamState};
use super::timers::TimerKind;
use crate::groups::{Change, Group};
use crate::net::ConnectState;
use crate::proto::upstream as up;
use crate::proto::{socks5, Failure, Parse, TargetAddr};
use crate::upstream::{Upstream, UpstreamKind};

/// Least time a group member's attempt gets before the next member is tried.
const MIN_ATTEMPT: Duration = Duration::from_secs(1);

/// The route through a policy group a `via:NAME` rule chose: its members in this session's order.
pub fn group_route(conn: &Conn, ctx: &Ctx, group: Arc<Group>, deadline: Instant) -> Route {
    Route::Group {
        order: group.order(conn.peer.ip(), ctx.now),
        group,
        pos: 0,
        attempt_deadline: deadline,
    }
}

/// The chain to `target` through `route`, before any connection is open.
pub fn plan(answer: Answer, target: TargetAddr, route: Route, deadline: Instant) -> UpstreamPlan {
    UpstreamPlan {
        answer,
        next_addr: 0,
        deadline,
        target,
        route,
    }
}

/// The `--upstream` proxy given by name was reached by the connect phases (resolved and dialled with Happy
/// Eyeballs): its handshake takes the socket.
pub fn reached_by_name(
    conn: &mut Conn,
    ctx: &mut Ctx,
    plan: UpstreamPlan,
    server: Arc<Upstream>,
    sock: Sock,
) -> Next {
    conn.phase = Phase::Upstream(Box::new(UpstreamHandshake {
        plan,
        server,
        tls: ctx.cfg.upstream_tls.clone(),
        member: None,
        state: UpstreamState::Connecting,
        sock,
        inbox: None,
    }));
    Next::Again
}

/// Opens a connection to the next server of the plan (`--upstream`'s next address, or the group's next member)
/// and starts its handshake; answers the client when none is left.
pub fn dial(key: usize, conn: &mut Conn, ctx: &mut Ctx, plan: UpstreamPlan) -> Next {
    match &plan.route {
        Route::Flag(server) => {
            let server = Arc::clone(server);
            dial_flag(key, conn, ctx, plan, server)
        }
        Route::Group { .. } => dial_member(key, conn, ctx, plan),
    }
}

fn dial_flag(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    mut plan: UpstreamPlan,
    server: Arc<Upstream>,
) -> Next {
    let reply = plan.answer.kind();
    // The user's egress address is the source of the connection to the upstream proxy too.
    let v4 = server.addrs.first().is_none_or(|a| a.is_ipv4());
    let Ok(source) = gate::egress(conn, ctx, v4) else {
        return path_failed(ctx, reply, CloseReason::Failed(Failure::General));
    };
    while let Some(&addr) = server.addrs.get(plan.next_addr) {
        plan.next_addr += 1;
        match open_upstream(key, ctx, addr, source) {
            Ok(sock) => {
                debug!("{}: connecting to upstream proxy {addr}", conn.peer);
                let tls = ctx.cfg.upstream_tls.clone();
                return start(conn, plan, (server, tls, None), sock);
            }
            // An egress address that cannot be bound is our configuration's fault: say so where operators look.
            Err(e) if e.kind() == std::io::ErrorKind::Other => warn!(
                "{}: user {}: upstream {addr}: {e}",
                conn.peer,
                conn.user_name()
            ),
            Err(e) => debug!("{}: upstream {addr}: {e}", conn.peer),
        }
    }
    path_failed(ctx, reply, CloseReason::UpstreamProxy(Failure::General))
}

/// Opens a connection to the next member of the group in this session's order.
fn dial_member(key: usize, conn: &mut Conn, ctx: &mut Ctx, mut plan: UpstreamPlan) -> Next {
    let reply = plan.answer.kind();
    let overall = plan.deadline;
    while let Route::Group {
        group,
        order,
        pos,
        attempt_deadline,
    } = &mut plan.route
    {
        let Some(index) = order.get(*pos).map(|&i| usize::from(i)) else {
            break;
        };
        let left = (order.len() - *pos - 1) as u32;
        *pos += 1;
        let group = Arc::clone(group);
        // An index from the group's own order always names a member; skipping is still the safe answer.
        let Some(member) = group.member(index) else {
            continue;
        };
        let Some(&addr) = member.server.addrs.first() else {
            continue;
        };
        // The user's egress address is the source of the connection to the upstream proxy too; a family she
        // has no address of is not the member's fault.
        let Ok(source) = gate::egress(conn, ctx, addr.is_ipv4()) else {
            continue;
        };
        group.attempt(index);
        match open_upstream(key, ctx, addr, source) {
            Ok(sock) => {
                debug!(
                    "{}: connecting to {} of upstream group {} at {addr}",
                    conn.peer, member.label, group.name
                );
                let remaining = overall.saturating_duration_since(ctx.now);
                let share = if left > 0 {
                    (remaining / (left + 1)).max(MIN_ATTEMPT).min(remaining)
                } else {
                    remaining
                };
                *attempt_deadline = ctx.now + share;
                if left > 0 {
                    ctx.timers
                        .arm(*attempt_deadline, key, conn.gen, TimerKind::Attempt);
                }
                let server = (Arc::clone(&member.server), member.tls.clone(), Some(index));
                return start(conn, plan, server, sock);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Other => {
                // An egress address that cannot be bound is our configuration's fault, not the member's.
                warn!(
                    "{}: user {}: upstream {addr}: {e}",
                    conn.peer,
                    conn.user_name()
                );
            }
            Err(e) => {
                debug!("{}: upstream {addr}: {e}", conn.peer);
                note(&group, group.failure(index, ctx.now), index);
            }
        }
    }
    debug!("{}: no member of the upstream group answered", conn.peer);
    path_failed(ctx, reply, CloseReason::UpstreamProxy(Failure::General))
}

/// The server the handshake talks to: its URL, its TLS configuration, its index in the group (`None` for
/// `--upstream`).
type Server = (
    Arc<Upstream>,
    Option<Arc<rustls::ClientConfig>>,
    Option<usize>,
);

/// A connection to `server` is being opened: the handshake takes it and waits for it to complete.
fn start(conn: &mut Conn, plan: UpstreamPlan, (server, tls, member): Server, sock: Sock) -> Next {
    conn.phase = Phase::Upstream(Box::new(UpstreamHandshake {
        plan,
        server,
        tls,
        member,
        state: UpstreamState::Connecting,
        sock,
        inbox: None,
    }));
    Next::Wait
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

/// The group member being talked to, with its group; `None` through `--upstream`.
fn current(hs: &UpstreamHandshake) -> Option<(&Group, usize)> {
    match (&hs.plan.route, hs.member) {
        (Route::Group { group, .. }, Some(index)) => Some((group, index)),
        _ => None,
    }
}

/// The current member answered its handshake (or, for forwarded HTTP through an HTTP member, accepted the
/// connection): it is healthy, whatever it says about the target.
fn member_ok(hs: &UpstreamHandshake) {
    if let Some((group, index)) = current(hs) {
        note(group, group.success(index), index);
    }
}

/// The upstream's connect or handshake failed: through a group, count it against the member and try the next one;
/// through `--upstream`, answer with `reason`.
fn upstream_failed(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    hs: Box<UpstreamHandshake>,
    reason: CloseReason,
) -> Next {
    let Some((group, index)) = current(&hs) else {
        return path_failed(ctx, hs.plan.answer.kind(), reason);
    };
    note(group, group.failure(index, ctx.now), index);
    next_server(key, conn, ctx, hs)
}

/// The upstream proxy (or group member) failed in itself, not for the target: the general upstream failure.
fn member_failed(key: usize, conn: &mut Conn, ctx: &mut Ctx, hs: Box<UpstreamHandshake>) -> Next {
    upstream_failed(
        key,
        conn,
        ctx,
        hs,
        CloseReason::UpstreamProxy(Failure::General),
    )
}

/// Gives up on the server being talked to (closing its connection, dropping what it sent and what was queued for
/// it) and dials the next one of the plan.
fn next_server(key: usize, conn: &mut Conn, ctx: &mut Ctx, hs: Box<UpstreamHandshake>) -> Next {
    let UpstreamHandshake {
        plan,
        mut sock,
        inbox,
        ..
    } = *hs;
    // Deregistered before it closes: the next server's socket gets the same token.
    let _ = ctx.registry.deregister(&mut sock.stream);
    if let Some(b) = inbox {
        ctx.pool.give(b);
    }
    conn.to_upstream.clear();
    dial(key, conn, ctx, plan)
}

/// A connect timer popped during the upstream phase: the session's deadline (answer "timed out"), or the current
/// member's share of it (try the next member).
pub fn on_timer(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let Phase::Upstream(hs) = &conn.phase else {
        return Next::Wait;
    };
    let expired = hs.plan.deadline <= ctx.now;
    let share_over = match &hs.plan.route {
        // `pos` is already past the member being tried.
        Route::Group {
            attempt_deadline,
            order,
            pos,
            ..
        } => *attempt_deadline <= ctx.now && *pos < order.len(),
        Route::Flag(_) => false,
    };
    if !expired && !share_over {
        return Next::Wait;
    }
    let Some(hs) = take(conn) else {
        return Next::Wait;
    };
    if expired {
        debug!("{}: upstream connect timed out", conn.peer);
        return path_failed(
            ctx,
            hs.plan.answer.kind(),
            CloseReason::Failed(Failure::TimedOut),
        );
    }
    debug!(
        "{}: upstream group member did not answer in time; trying the next",
        conn.peer
    );
    upstream_failed(key, conn, ctx, hs, CloseReason::Failed(Failure::TimedOut))
}

/// Takes the handshake out of the connection for a step (see the module comment).
fn take(conn: &mut Conn) -> Option<Box<UpstreamHandshake>> {
    match std::mem::replace(&mut conn.phase, Phase::Closing) {
        Phase::Upstream(hs) => Some(hs),
        other => {
            conn.phase = other;
            None
        }
    }
}

/// Puts the handshake back: the step is over and the handshake goes on.
fn park(conn: &mut Conn, hs: Box<UpstreamHandshake>, next: Next) -> Next {
    conn.phase = Phase::Upstream(hs);
    next
}

/// Drives the upstream handshake.
pub fn drive(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    match take(conn) {
        Some(hs) => step(key, conn, ctx, hs),
        None => Next::Wait,
    }
}

fn step(key: usize, conn: &mut Conn, ctx: &mut Ctx, mut hs: Box<UpstreamHandshake>) -> Next {
    let reply = hs.plan.answer.kind();
    if hs.state == UpstreamState::Connecting {
        let sock = &mut hs.sock;
        if !sock.writable && !sock.readable {
            return park(conn, hs, Next::Wait);
        }
        return match sock.connect_state() {
            ConnectState::Pending => {
                sock.readable = false;
                sock.writable = false;
                park(conn, hs, Next::Wait)
            }
            ConnectState::Failed(e) => {
                debug!("{}: upstream connect: {e}", conn.peer);
                if current(&hs).is_some() {
                    return member_failed(key, conn, ctx, hs);
                }
                // `--upstream`'s next address: an unreachable address is not a failure of the proxy.
                next_server(key, conn, ctx, hs)
            }
            ConnectState::Connected => connected(key, conn, ctx, hs),
        };
    }
    if flush_to(&mut hs.sock, &mut conn.to_upstream).is_err() {
        // Through TLS this is also where a refused certificate surfaces: a member failure in a group.
        return member_failed(key, conn, ctx, hs);
    }
    // Read the upstream's reply: whatever follows it is tunnel data, which goes to the relay with the socket.
    let UpstreamHandshake { sock, inbox, .. } = &mut *hs;
    let buf = inbox.get_or_insert_with(|| ctx.pool.take());
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
    if hs.state == UpstreamState::TlsForward {
        let established = hs.sock.tls.as_ref().is_some_and(|t| !t.is_handshaking());
        // An HTTP server speaks only when spoken to: anything before our request is not HTTP.
        let early = hs.inbox.as_ref().is_some_and(|b| !b.is_empty());
        if !early {
            if let Some(b) = hs.inbox.take() {
                ctx.pool.give(b);
            }
        }
        if established && !early {
            member_ok(&hs);
            return forward_head_for_member(ctx, hs);
        }
        if eof || early {
            debug!("{}: TLS to the upstream group member failed", conn.peer);
            return member_failed(key, conn, ctx, hs);
        }
        return park(conn, hs, Next::Wait);
    }
    let (step, full) = match hs.inbox.as_ref() {
        Some(b) => (parse_step(hs.state, b.data()), b.is_full()),
        None => (Step::More, false),
    };
    match step {
        Step::More if eof || full => {
            debug!(
                "{}: upstream closed or overflowed during its handshake",
                conn.peer
            );
            member_failed(key, conn, ctx, hs)
        }
        Step::More => park(conn, hs, Next::Wait),
        Step::Bad => {
            debug!("{}: malformed answer from the upstream proxy", conn.peer);
            member_failed(key, conn, ctx, hs)
        }
        Step::Refused(f) => {
            debug!("{}: the upstream proxy refused us", conn.peer);
            upstream_failed(key, conn, ctx, hs, CloseReason::UpstreamProxy(f))
        }
        Step::Failed(f) => {
            // The member works; the target is what failed.
            member_ok(&hs);
            debug!(
                "{}: the upstream proxy reports {}",
                conn.peer,
                CloseReason::Failed(f).describe()
            );
            path_failed(ctx, reply, CloseReason::Failed(f))
        }
        Step::Ok(n, then) => {
            if let Some(b) = hs.inbox.as_mut() {
                b.consume(n);
                if b.is_empty() {
                    if let Some(b) = hs.inbox.take() {
                        ctx.pool.give(b);
                    }
                }
            }
            advance(conn, ctx, hs, then)
        }
    }
}

/// The TCP connection to the server is up: TLS under it if the server's URL asks for it, then the conversation
/// (or, for forwarded HTTP through an HTTP server, the request head itself).
fn connected(key: usize, conn: &mut Conn, ctx: &mut Ctx, mut hs: Box<UpstreamHandshake>) -> Next {
    debug!("{}: connected to the upstream proxy", conn.peer);
    let reply = hs.plan.answer.kind();
    let http = hs.server.kind == UpstreamKind::Http;
    // A TLS failure later shows up as a failed read or write of the handshake below, and so counts against a
    // group member like any other.
    let UpstreamHandshake {
        sock, server, tls, ..
    } = &mut *hs;
    if !super::tls::start_upstream(sock, conn.peer, server, tls.as_ref()) {
        return member_failed(key, conn, ctx, hs);
    }
    let tls_member = hs.member.is_some() && hs.sock.is_tls();
    if http && reply == ReplyKind::HttpForward && tls_member {
        hs.state = UpstreamState::TlsForward;
        return park(conn, hs, Next::Again);
    }
    if http && reply == ReplyKind::HttpForward {
        // Forwarded requests go to an HTTP upstream in absolute-form (as Squid's cache_peer sends them): no
        // tunnel to set up, the request head is the first thing it gets.
        member_ok(&hs);
        return forward_head_for_member(ctx, hs);
    }
    greet(conn, ctx, hs)
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

/// Forwarded HTTP through a group's HTTP member: the request head (kept in origin-form while the member was not
/// known) becomes absolute-form with the member's credentials. Through `--upstream` it already is.
fn forward_head_for_member(ctx: &mut Ctx, mut hs: Box<UpstreamHandshake>) -> Next {
    if hs.member.is_none() {
        return hand_off(ctx, hs);
    }
    let reply = hs.plan.answer.kind();
    let UpstreamHandshake { plan, server, .. } = &mut *hs;
    let creds = server
        .credentials
        .as_ref()
        .map(|(u, p)| (u.as_bytes(), p.as_bytes()));
    if let Answer::Forward(st, _) = &mut plan.answer {
        let mut abs = Vec::with_capacity(st.pending_head.len() + 64);
        if !up::encode_forward_head(&st.pending_head, &plan.target, creds, &mut abs) {
            return path_failed(
                ctx,
                reply,
                CloseReason::Failed(Failure::AddressNotSupported),
            );
        }
        st.pending_head = abs;
    }
    hand_off(ctx, hs)
}

/// The path through the upstream proxy is up: its socket, the bytes it sent after its reply and the handshake's
/// answer go, by value, to whoever gets the connection.
fn hand_off(ctx: &mut Ctx, hs: Box<UpstreamHandshake>) -> Next {
    let UpstreamHandshake {
        plan, sock, inbox, ..
    } = *hs;
    let early = match inbox {
        Some(b) if b.is_empty() => {
            ctx.pool.give(b);
            None
        }
        other => other,
    };
    Next::Connected(plan.answer.connected(sock, early))
}

/// The TCP connection to the upstream is up: open the conversation.
fn greet(conn: &mut Conn, ctx: &mut Ctx, hs: Box<UpstreamHandshake>) -> Next {
    let mut out = [0u8; up::MAX_HTTP_CONNECT_LEN];
    let upstream = &hs.server;
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
                up::encode_http_connect(&hs.plan.target, creds, &mut out),
                UpstreamState::HttpReply,
            )
        }
    };
    say(conn, ctx, hs, &out[..len], state)
}

/// Sends the next handshake message and awaits its answer in `state`. An empty message is a target the message
/// cannot carry.
fn say(
    conn: &mut Conn,
    ctx: &mut Ctx,
    mut hs: Box<UpstreamHandshake>,
    msg: &[u8],
    state: UpstreamState,
) -> Next {
    if msg.is_empty() {
        let reply = hs.plan.answer.kind();
        return path_failed(
            ctx,
            reply,
            CloseReason::Failed(Failure::AddressNotSupported),
        );
    }
    hs.state = state;
    conn.to_upstream.extend_from_slice(msg);
    if flush_to(&mut hs.sock, &mut conn.to_upstream).is_err() {
        return Next::Close(CloseReason::UpstreamReset);
    }
    park(conn, hs, Next::Again)
}

fn advance(conn: &mut Conn, ctx: &mut Ctx, hs: Box<UpstreamHandshake>, then: Then) -> Next {
    let mut out = [0u8; socks5::MAX_USER_PASS_LEN];
    match then {
        Then::SendAuth => {
            // The server chose user/password though we offered it only with credentials: it is not following
            // the protocol.
            let Some((u, p)) = hs.server.credentials.as_ref() else {
                let reply = hs.plan.answer.kind();
                return path_failed(ctx, reply, CloseReason::UpstreamProxy(Failure::NotAllowed));
            };
            let len = socks5::encode_user_pass(u.as_bytes(), p.as_bytes(), &mut out);
            say(conn, ctx, hs, &out[..len], UpstreamState::Auth)
        }
        Then::SendRequest => {
            let len = socks5::encode_request(socks5::Command::Connect, &hs.plan.target, &mut out);
            say(conn, ctx, hs, &out[..len], UpstreamState::Reply)
        }
        Then::Established => {
            member_ok(&hs);
            hand_off(ctx, hs)
        }
    }
}
