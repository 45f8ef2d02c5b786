//! Where the worker asks the policy file (`crate::policy`): the destination rules of a session's target and of each
//! address dialled, the per-user egress address. The decisions live in `crate::policy`; this module only maps a
//! connection onto them and a refusal onto the protocol's answer.

use std::io;
use std::net::SocketAddr;

use log::warn;

use super::close::CloseReason;
use super::conn::{Conn, Dest, Source};
use super::ctx::{Ctx, ReplyKind};
use crate::policy::rules::Command;
use crate::policy::{self, Refusal};
use crate::proto::{Failure, TargetAddr};

/// The rule command a reply kind stands for (BIND and UDP check with their own commands).
pub fn command_of(reply: ReplyKind) -> Command {
    match reply {
        ReplyKind::HttpForward => Command::Http,
        _ => Command::Connect,
    }
}

/// The name a connection's target was given by, if it was a name.
fn target_name(conn: &Conn) -> Option<&str> {
    match &conn.target {
        Some(Dest::Name(n, _)) => Some(n),
        _ => None,
    }
}

/// Checks a target before anything is resolved or dialled: an invalid host name is refused with the "address
/// type" answer (HTTP: 400), a name that a rule denies with "not allowed". Addresses are checked per address
/// dialled ([`allows`]), after resolution.
pub fn check_target(
    conn: &Conn,
    ctx: &Ctx,
    cmd: Command,
    target: &TargetAddr,
) -> Result<(), CloseReason> {
    let TargetAddr::Domain(name, port) = target else {
        return Ok(());
    };
    ctx.policy
        .check_name(
            conn.user.as_ref().map(|u| u.user()),
            conn.peer.ip(),
            cmd,
            name.as_str(),
            *port,
        )
        .map_err(|r| match r {
            Refusal::BadName => CloseReason::Failed(Failure::AddressNotSupported),
            Refusal::Denied => CloseReason::DestDenied,
        })
}

/// The upstream group the first matching rule sends this target through (`action = "via:NAME"`), if any.
pub fn route(
    conn: &Conn,
    ctx: &Ctx,
    cmd: Command,
    target: &TargetAddr,
) -> Option<std::sync::Arc<crate::groups::Group>> {
    ctx.policy.route(
        conn.user.as_ref().map(|u| u.user()),
        conn.peer.ip(),
        cmd,
        target,
    )
}

/// True when the policy file's rules allow dialling `addr` for this connection's target.
pub fn allows(conn: &Conn, ctx: &Ctx, cmd: Command, addr: SocketAddr) -> bool {
    ctx.policy.allows_addr(
        conn.user.as_ref().map(|u| u.user()),
        conn.peer.ip(),
        cmd,
        target_name(conn),
        addr,
    )
}

/// True when the rules allow a BIND peer address (expected or inbound) for this connection.
pub fn allows_bind_peer(conn: &Conn, ctx: &Ctx, addr: SocketAddr) -> bool {
    ctx.policy.allows_addr(
        conn.user.as_ref().map(|u| u.user()),
        conn.peer.ip(),
        Command::Bind,
        None,
        addr,
    )
}

/// The egress address for an outbound socket of this connection's user in the family of `v4`: the one already
/// chosen for the session when it fits, else a fresh pick (kept in `conn.egress`). `Ok(None)`: the user has no
/// egress, so `--bind` (or the kernel) decides. `Err`: she has egress addresses, but none of this family.
pub fn egress(conn: &mut Conn, ctx: &Ctx, v4: bool) -> io::Result<Source> {
    let list = ctx.policy.egress(conn.user.as_ref().map(|u| u.user()));
    if list.is_empty() {
        return Ok(None);
    }
    if let Some(ip) = conn
        .egress
        .as_deref()
        .copied()
        .filter(|ip| ip.is_ipv4() == v4)
    {
        let freebind = !list.contains(&policy::Egress::Ip(ip));
        return Ok(Some((ip, freebind)));
    }
    let picked = match conn
        .user
        .as_ref()
        .and_then(|u| u.session().map(|s| (u.user(), s)))
    {
        Some((user, session)) => policy::pick_sticky_egress(list, v4, user, session),
        None => policy::pick_egress(list, v4),
    };
    match picked {
        Some((ip, freebind)) => {
            conn.egress = Some(Box::new(ip));
            Ok(Some((ip, freebind)))
        }
        None => {
            warn!(
                "{}: user {}: no egress address of the target's IP family",
                conn.peer,
                conn.user_name()
            );
            Err(io::Error::other("no egress address of this family"))
        }
    }
}

/// Logs an egress address that could not be bound (once per failed socket, at warn: it is a configuration
/// problem on our side, and the session fails with the general failure code).
pub fn log_egress_error(conn: &Conn, e: &io::Error) {
    warn!("{}: user {}: {e}", conn.peer, conn.user_name());
}
