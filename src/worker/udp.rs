//! SOCKS5 UDP ASSOCIATE (RFC 1928 §7).

use std::io;
use std::net::SocketAddr;

use super::conn::{Conn, ReplyKind};
use super::handshake::reply_failure;
use super::{Ctx, Next};
use crate::buffer::BufferPool;
use crate::proto::{Failure, TargetAddr};

/// State of one UDP association.
pub struct UdpState {}

/// Records readiness of the association's UDP sockets.
pub fn mark(_conn: &mut Conn, _ev: &mio::event::Event) {}

/// Starts an association.
pub fn start(_key: usize, conn: &mut Conn, ctx: &mut Ctx, _client_hint: TargetAddr) -> Next {
    reply_failure(conn, ctx, ReplyKind::Socks5, Failure::CommandNotSupported)
}

/// Drives the association.
pub fn drive(_key: usize, _conn: &mut Conn, _ctx: &mut Ctx) -> Next {
    Next::Wait
}

/// A resolver answer for a datagram's domain target.
pub fn on_resolved(
    _key: usize,
    _conn: &mut Conn,
    _ctx: &mut Ctx,
    _tag: u32,
    _r: io::Result<Vec<SocketAddr>>,
) -> Next {
    Next::Wait
}

/// Idle check.
pub fn on_idle_timer(_key: usize, _conn: &mut Conn, _ctx: &mut Ctx) -> Next {
    Next::Wait
}

/// Frees the association's sockets.
pub fn release(_u: &mut UdpState, _registry: &mio::Registry, _pool: &mut BufferPool) {}
