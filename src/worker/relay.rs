//! The bidirectional relay: the hot path.
//!
//! Reads go into the worker's scratch buffer and are written straight to the other socket. Only the bytes the sink
//! would not take are parked, in one fixed buffer from the pool that belongs to that direction; while it holds
//! bytes the direction reads nothing more (backpressure), and it goes back to the pool as soon as it drains. An idle
//! tunnel therefore holds its two sockets and its slab entry, and no buffer.
//!
//! EOF from one side becomes `shutdown(Write)` on the other once everything read before it was delivered
//! (half-close, RFC 9110 §9.3.6); the tunnel closes when both directions are finished.

use std::net::Shutdown;

use super::conn::{Conn, Half, Phase, Sock};
use super::timers::TimerKind;
use super::{Ctx, Next};
use crate::buffer::{Buffer, BufferPool};
use crate::metrics;

/// Reads per direction per turn before yielding to other connections.
const READS_PER_TURN: usize = 32;

/// Outcome of pumping one direction.
struct Pumped {
    progress: bool,
    more: bool,
    bytes: u64,
}

/// Moves bytes `src -> dst`, parking what `dst` would not take.
#[allow(clippy::too_many_arguments)]
fn pump(
    src: &mut Sock,
    dst: &mut Sock,
    parked: &mut Option<Buffer>,
    half: &mut Half,
    pool: &mut BufferPool,
    scratch: &mut [u8],
    other_done: bool,
    src_err: &'static str,
    dst_err: &'static str,
) -> Result<Pumped, &'static str> {
    let mut p = Pumped {
        progress: false,
        more: false,
        bytes: 0,
    };
    if let Some(buf) = parked.as_mut() {
        let n = dst.write_some(buf.data()).map_err(|_| dst_err)?;
        if n > 0 {
            buf.consume(n);
            p.progress = true;
        }
        if !buf.is_empty() {
            return Ok(p);
        }
        if let Some(b) = parked.take() {
            pool.give(b);
        }
    }
    let mut reads = 0;
    // Reading while the sink is blocked would only move bytes from the kernel into our memory.
    while !half.eof && src.readable && dst.writable {
        if reads == READS_PER_TURN {
            p.more = true;
            break;
        }
        reads += 1;
        match src.read(scratch) {
            Ok(Some(0)) => half.eof = true,
            Ok(Some(n)) => {
                p.progress = true;
                p.bytes += n as u64;
                let chunk = &scratch[..n];
                let w = dst.write_some(chunk).map_err(|_| dst_err)?;
                if w < n {
                    let mut b = pool.take();
                    b.push(&chunk[w..]);
                    *parked = Some(b);
                    return Ok(p);
                }
            }
            Ok(None) => break,
            Err(_) => return Err(src_err),
        }
    }
    if half.eof && !half.shut {
        half.shut = true;
        p.progress = true;
        // When the other direction is already finished the tunnel closes right away, and close sends the FIN:
        // the shutdown call would be redundant.
        if !other_done {
            let _ = dst.stream.shutdown(Shutdown::Write);
        }
    }
    Ok(p)
}

/// Drives a tunnel until neither direction can make progress.
pub fn drive(conn: &mut Conn, ctx: &mut Ctx) -> Next {
    if conn.upstream.is_none() {
        return Next::Close("no_upstream");
    }
    // A partial success reply (or an HTTP error head) goes out before any upstream byte.
    if !conn.to_client.is_empty() {
        match conn.flush_client() {
            Ok(true) => {}
            Ok(false) => return Next::Wait,
            Err(_) => return Next::Close("client_error"),
        }
    }
    let mut more = false;
    let mut any = false;
    for _ in 0..4 {
        let Some(up) = conn.upstream.as_mut() else {
            break;
        };
        let a = pump(
            &mut conn.client,
            up,
            &mut conn.c2u,
            &mut conn.up,
            &mut ctx.pool,
            &mut ctx.scratch,
            conn.down.shut,
            "client_reset",
            "upstream_reset",
        );
        let a = match a {
            Ok(a) => a,
            Err(reason) => return Next::Close(reason),
        };
        let b = pump(
            up,
            &mut conn.client,
            &mut conn.u2c,
            &mut conn.down,
            &mut ctx.pool,
            &mut ctx.scratch,
            conn.up.shut,
            "upstream_reset",
            "client_reset",
        );
        let b = match b {
            Ok(b) => b,
            Err(reason) => return Next::Close(reason),
        };
        conn.bytes_up += a.bytes;
        conn.bytes_down += b.bytes;
        metrics::add(&ctx.stats.bytes_up, a.bytes);
        metrics::add(&ctx.stats.bytes_down, b.bytes);
        any |= a.progress || b.progress;
        more = a.more || b.more;
        if !(a.progress || b.progress) || more {
            break;
        }
    }
    if any {
        conn.last_active = ctx.now;
    }
    if conn.up.shut && conn.down.shut {
        return Next::Close("done");
    }
    // A reset peer is gone: what could be delivered was delivered above. Without this check a reset client whose
    // target is not reading (so the client is not being read) would hold the tunnel until the idle timeout.
    if conn.client.error {
        return Next::Close("client_reset");
    }
    if conn.upstream.as_ref().is_some_and(|u| u.error) {
        return Next::Close("upstream_reset");
    }
    if more {
        Next::Yield
    } else {
        Next::Wait
    }
}

/// The idle timer of a tunnel popped: close it, or re-arm for the remaining time (lazy re-arm: activity never
/// touches the timer heap).
pub fn on_idle_timer(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    if !matches!(conn.phase, Phase::Relay | Phase::Http) {
        return Next::Wait;
    }
    let due = conn.last_active + ctx.cfg.idle_timeout;
    if due <= ctx.now {
        Next::Close("idle_timeout")
    } else {
        ctx.timers.push(due, key, conn.gen, TimerKind::Idle);
        Next::Wait
    }
}
