//! SOCKS BIND (RFC 1928 §4, SOCKS4).

use super::conn::{Conn, ReplyKind};
use super::handshake::reply_failure;
use super::{Ctx, Next};
use crate::proto::{Failure, TargetAddr};

/// State of one BIND request.
pub struct BindState {}

/// Records readiness of the BIND listener or the accepted peer.
pub fn mark(_conn: &mut Conn, _ev: &mio::event::Event) {}

/// Starts a BIND.
pub fn start(
    _key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    _peer: TargetAddr,
    reply: ReplyKind,
) -> Next {
    reply_failure(conn, ctx, reply, Failure::CommandNotSupported)
}

/// Drives the BIND.
pub fn drive(_key: usize, _conn: &mut Conn, _ctx: &mut Ctx) -> Next {
    Next::Wait
}

/// The BIND timer popped.
pub fn on_timeout(_conn: &mut Conn, _ctx: &mut Ctx) -> Next {
    Next::Wait
}

/// Frees the listener.
pub fn release(_b: &mut BindState, _registry: &mio::Registry) {}
