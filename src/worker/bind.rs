//! SOCKS BIND (RFC 1928 §4 and SOCKS4): one inbound connection, two replies, then the shared relay.
//!
//! The listener is bound to `--bind` or to the local IP the control connection arrived on (port chosen by the
//! kernel). The first reply carries its address; when the expected peer connects (the address named in the
//! request, when it named one), the second reply carries the peer's address and the relay starts. Bytes the client
//! sent meanwhile stay in its buffer and are relayed first.

use std::net::SocketAddr;
use std::time::Duration;

use log::{debug, warn};
use mio::Interest;

use super::close::CloseReason;
use super::conn::{fill_client, Conn, Dest, Phase, Sock};
use super::ctx::{Ctx, Next, ReplyKind};
use super::gate;
use super::phase::BindState;
use super::relay::start_relay;
use super::reply;
use super::timers::TimerKind;
use super::token::{self, Role};
use crate::metrics;
use crate::net;
use crate::proto::{canonical_ip, Failure, TargetAddr};

/// Records readiness of the BIND listener.
pub fn mark(conn: &mut Conn, ev: &mio::event::Event) {
    if let Phase::Bind(b) = &mut conn.phase {
        b.readable |= ev.is_readable() || ev.is_error();
    }
}

/// Starts a BIND; `peer` is the address the client expects to connect.
pub fn start(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    peer: TargetAddr,
    reply: ReplyKind,
) -> Next {
    // The access log's target is the peer that connects, once one has.
    conn.target = None;
    // BIND cannot be carried by an upstream proxy, neither `--upstream` nor a group a `via:NAME` rule names.
    if ctx.cfg.upstream.is_some()
        || gate::route(conn, ctx, crate::policy::rules::Command::Bind, &peer).is_some()
    {
        return reply::fail(
            conn,
            ctx,
            reply,
            CloseReason::Failed(Failure::CommandNotSupported),
        );
    }
    let expected = match &peer {
        TargetAddr::Ip(a) if !a.ip().is_unspecified() => Some(canonical_ip(a.ip())),
        // A name or 0.0.0.0 names no particular peer: accept the first connection.
        _ => None,
    };
    // The expected peer is the other end of the tunnel, so it passes the destination rules like a CONNECT target
    // (the inbound peer is checked again when it arrives, in `accepted`).
    if let (Some(ip), TargetAddr::Ip(a)) = (expected, &peer) {
        let expected = SocketAddr::new(ip, a.port());
        if ctx.cfg.dest_rules.check(expected).is_err()
            || !gate::allows_bind_peer(conn, ctx, expected)
        {
            debug!("{}: BIND expecting {a}: denied by rules", conn.peer);
            return reply::fail(conn, ctx, reply, CloseReason::DestDenied);
        }
    }
    let local = conn.local_ip();
    // A user's egress address (of the control connection's family) is where her BIND listens.
    let listening = match gate::egress(conn, ctx, local.is_none_or(|ip| ip.is_ipv4())) {
        Ok(Some((ip, freebind))) => net::bind_listener_from(ip, freebind, ctx.cfg.socket_buffer),
        Ok(None) => match ctx.cfg.outbound_bind.or(local) {
            Some(ip) => net::bind_listener(SocketAddr::new(ip, 0), ctx.cfg.socket_buffer),
            None => return reply::fail(conn, ctx, reply, CloseReason::Failed(Failure::General)),
        },
        Err(e) => Err(e),
    };
    let mut listener = match listening {
        Ok(l) => l,
        Err(e) => {
            if e.kind() == std::io::ErrorKind::Other {
                gate::log_egress_error(conn, &e);
            }
            debug!("{}: BIND listener: {e}", conn.peer);
            return reply::fail(conn, ctx, reply, CloseReason::Failed(Failure::General));
        }
    };
    let bound = match listener.local_addr() {
        Ok(a) => a,
        Err(_) => return reply::fail(conn, ctx, reply, CloseReason::Failed(Failure::General)),
    };
    if ctx
        .registry
        .register(
            &mut listener,
            token::conn(key, Role::BindListener),
            Interest::READABLE,
        )
        .is_err()
    {
        return reply::fail(conn, ctx, reply, CloseReason::Failed(Failure::General));
    }
    debug!("{}: BIND listening on {bound}", conn.peer);
    if reply::granted(conn, reply, bound).is_err() {
        let _ = ctx.registry.deregister(&mut listener);
        return Next::Close(CloseReason::ClientError);
    }
    conn.phase = Phase::Bind(Box::new(BindState {
        listener,
        readable: true,
        deadline: ctx.now + ctx.cfg.bind_timeout,
        expected,
        reply,
        starved: false,
    }));
    ctx.timers.arm(
        ctx.now + ctx.cfg.bind_timeout,
        key,
        conn.gen,
        TimerKind::Bind,
    );
    Next::Again
}

/// Waits for the inbound connection; watches the client for EOF meanwhile.
pub fn drive(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    if conn.flush_client().is_err() || fill_client(conn, ctx).is_err() {
        return Next::Close(CloseReason::ClientReset);
    }
    if conn.client_eof {
        return Next::Close(CloseReason::ClientEof);
    }
    let Phase::Bind(b) = &mut conn.phase else {
        return Next::Wait;
    };
    while b.readable {
        match b.listener.accept() {
            Ok((stream, from)) => {
                if b.expected.is_some_and(|ip| ip != canonical_ip(from.ip())) {
                    debug!(
                        "{}: BIND: refused connection from unexpected {from}",
                        conn.peer
                    );
                    continue;
                }
                return accepted(key, conn, ctx, stream, from);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => b.readable = false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if net::is_resource_exhaustion(&e) => {
                if !b.starved {
                    b.starved = true;
                    warn!(
                        "{}: BIND: accept: {e}; the inbound peer waits until descriptors free up",
                        conn.peer
                    );
                }
                // Out of descriptors: the peer stays queued, and no new event will come for it, so look again
                // shortly (`on_timeout` tells a retry from the deadline).
                ctx.timers
                    .arm(ctx.now + RETRY, key, conn.gen, TimerKind::BindRetry);
                return Next::Wait;
            }
            Err(_) => b.readable = false,
        }
    }
    Next::Wait
}

fn accepted(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    mut stream: mio::net::TcpStream,
    from: SocketAddr,
) -> Next {
    let Phase::Bind(mut b) = std::mem::replace(&mut conn.phase, Phase::Closing) else {
        return Next::Wait;
    };
    let _ = ctx.registry.deregister(&mut b.listener);
    let from = SocketAddr::new(canonical_ip(from.ip()), from.port());
    if ctx.cfg.dest_rules.check(from).is_err() || !gate::allows_bind_peer(conn, ctx, from) {
        // A denied peer never gets a byte of the tunnel: it is closed (dropping `stream`) and the client's second
        // reply says "not allowed".
        debug!("{}: BIND: inbound peer {from} denied by rules", conn.peer);
        drop(stream);
        return reply::fail(conn, ctx, b.reply, CloseReason::DestDenied);
    }
    let _ = stream.set_nodelay(true);
    if ctx
        .registry
        .register(
            &mut stream,
            token::conn(key, Role::Upstream),
            Interest::READABLE | Interest::WRITABLE,
        )
        .is_err()
    {
        return Next::Close(CloseReason::Internal);
    }
    let outbound = Sock::new(stream);
    debug!("{}: BIND accepted {from}", conn.peer);
    conn.target = Some(Dest::Ip(from));
    if reply::granted(conn, b.reply, from).is_err() {
        return Next::Close(CloseReason::ClientError);
    }
    metrics::inc(&ctx.stats.handshakes_ok[conn.proto as usize]);
    start_relay(key, conn, ctx, outbound, None);
    Next::Again
}

/// How soon to retry an accept that failed for lack of descriptors.
const RETRY: Duration = Duration::from_millis(50);

/// A BIND timer popped: retry a starved accept, or (at the deadline) send the failure as the second reply.
pub fn on_timeout(conn: &mut Conn, ctx: &mut Ctx) -> Next {
    let Phase::Bind(b) = &mut conn.phase else {
        return Next::Wait;
    };
    if ctx.now < b.deadline {
        b.readable = true;
        return Next::Again;
    }
    let reply = b.reply;
    ctx.stats.connect_error(Failure::TimedOut);
    reply::fail(conn, ctx, reply, CloseReason::Failed(Failure::TimedOut))
}

/// Frees the listener.
pub fn release(b: &mut BindState, registry: &mio::Registry) {
    let _ = registry.deregister(&mut b.listener);
}
