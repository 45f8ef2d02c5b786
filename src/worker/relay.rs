//! The bidirectional relay: the hot path.
//!
//! Reads go into the worker's scratch buffer and are written straight to the other socket. Only the bytes the sink
//! would not take are parked, in one fixed buffer from the pool that belongs to that direction; while it holds
//! bytes the direction reads nothing more (backpressure), and it goes back to the pool as soon as it drains. An idle
//! tunnel therefore holds its two sockets and its slab entry, and no buffer.
//!
//! EOF from one side becomes `shutdown(Write)` on the other once everything read before it was delivered
//! (half-close, RFC 9110 §9.3.6); the tunnel closes when both directions are finished.

use super::close::CloseReason;
use super::conn::{Conn, Phase, Sock};
use super::ctx::{Ctx, Next};
use super::phase::{Half, Tunnel, Way};
use super::timers::TimerKind;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::buffer::{Buffer, BufferPool};
use crate::metrics;
use crate::policy::bucket::Bucket;
use crate::policy::quota::Quota;
use crate::sys::Pipe;

/// Reads per direction per turn before yielding to other connections.
const READS_PER_TURN: usize = 32;

/// Outcome of pumping one direction.
#[derive(Default)]
struct Pumped {
    progress: bool,
    more: bool,
    bytes: u64,
    /// The bucket ran dry: read again after this long.
    throttle: Option<Duration>,
    /// The user's quota is used up: the tunnel ends.
    quota: bool,
}

/// The worker resources a pump uses.
struct Res<'a> {
    pool: &'a mut BufferPool,
    pipes: &'a mut Vec<Pipe>,
    scratch: &'a mut [u8],
    splice: bool,
    now: std::time::Instant,
    /// The user's quota, when she has one: every read is capped by what is left of it.
    quota: Option<&'a Quota>,
}

/// What the limits allow one read.
pub enum Ask {
    /// Read up to this many bytes.
    Go(usize),
    /// The bucket is dry: ask again after this long.
    Throttle(Duration),
    /// The quota is used up.
    Quota,
}

/// Reserves up to `want` bytes of the quota and of the bucket (a grant of both, or neither).
pub fn ask(
    bucket: Option<&Bucket>,
    quota: Option<&Quota>,
    now: std::time::Instant,
    want: usize,
) -> Ask {
    let want = match quota {
        Some(q) => match q.take(want) {
            0 => return Ask::Quota,
            g => g,
        },
        None => want,
    };
    match bucket.map(|b| b.take(now, want)) {
        None => Ask::Go(want),
        Some(Ok(g)) => {
            if let Some(q) = quota {
                q.give_back(want - g.min(want));
            }
            Ask::Go(g.min(want))
        }
        Some(Err(wait)) => {
            if let Some(q) = quota {
                q.give_back(want);
            }
            Ask::Throttle(wait)
        }
    }
}

/// Returns what a read granted by [`ask`] did not use.
pub fn unask(bucket: Option<&Bucket>, quota: Option<&Quota>, granted: usize, used: usize) {
    let left = granted - used.min(granted);
    if let Some(b) = bucket {
        b.give_back(left);
    }
    if let Some(q) = quota {
        q.give_back(left);
    }
}

/// Pipes kept per worker for reuse.
const MAX_IDLE_PIPES: usize = 64;
/// Bytes moved per splice call (pipes are sized for it when the kernel allows).
const SPLICE_CHUNK: usize = 256 * 1024;

fn give_pipe(pipes: &mut Vec<Pipe>, pipe: Option<Pipe>) {
    if let Some(p) = pipe {
        if p.held == 0 && pipes.len() < MAX_IDLE_PIPES {
            pipes.push(p);
        }
    }
}

/// Result of one splice round trip socket -> pipe -> socket.
enum Spliced {
    /// The source reached EOF.
    Eof,
    /// Moved this many bytes; `true` when some are left in the pipe because the sink is full.
    Moved(usize, bool),
    /// Nothing to read now.
    WouldBlock,
    /// No pipe could be had (descriptors exhausted): use the copying path.
    NoPipe,
    /// Reading the source failed.
    SrcErr,
    /// Writing the sink failed.
    DstErr,
}

fn drain_pipe(pipe: &mut Pipe, dst: &mut Sock) -> Result<usize, ()> {
    let mut moved = 0;
    while pipe.held > 0 && dst.writable {
        let want = pipe.held;
        match pipe.drain_to(dst.stream.as_raw_fd()) {
            Ok(0) => return Err(()),
            Ok(n) => {
                moved += n;
                if n < want {
                    // The send buffer is full: wait for the writable edge.
                    dst.writable = false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable = false,
            Err(_) => return Err(()),
        }
    }
    Ok(moved)
}

fn splice_once(
    src: &mut Sock,
    dst: &mut Sock,
    slot: &mut Option<Pipe>,
    pipes: &mut Vec<Pipe>,
    len: usize,
) -> Spliced {
    if slot.is_none() {
        match pipes.pop().map(Ok).unwrap_or_else(Pipe::new) {
            Ok(p) => *slot = Some(p),
            Err(_) => return Spliced::NoPipe,
        }
    }
    let Some(pipe) = slot.as_mut() else {
        return Spliced::NoPipe;
    };
    match pipe.fill_from(src.stream.as_raw_fd(), len) {
        Ok(0) => {
            give_pipe(pipes, slot.take());
            Spliced::Eof
        }
        Ok(n) => match drain_pipe(pipe, dst) {
            Ok(_) if pipe.held > 0 => Spliced::Moved(n, true),
            Ok(_) => {
                give_pipe(pipes, slot.take());
                Spliced::Moved(n, false)
            }
            Err(()) => Spliced::DstErr,
        },
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            src.readable = false;
            give_pipe(pipes, slot.take());
            Spliced::WouldBlock
        }
        Err(_) => Spliced::SrcErr,
    }
}

/// The bytes a direction may read after asking its bucket and quota; None when it stops for now (throttled, with
/// its wake-up noted, or out of quota).
#[inline]
fn granted(asked: Ask, way: &mut Way, p: &mut Pumped) -> Option<usize> {
    match asked {
        Ask::Go(g) => Some(g),
        Ask::Throttle(wait) => {
            way.half.throttled = true;
            p.throttle = Some(wait);
            None
        }
        Ask::Quota => {
            p.quota = true;
            None
        }
    }
}

/// Moves bytes `src -> dst`, parking what `dst` would not take.
fn pump(
    src: &mut Sock,
    dst: &mut Sock,
    way: &mut Way,
    res: &mut Res<'_>,
    bucket: Option<&Bucket>,
    other_done: bool,
    (src_err, dst_err): (CloseReason, CloseReason),
) -> Result<Pumped, CloseReason> {
    let mut p = Pumped::default();
    if let Some(buf) = way.parked.as_mut() {
        let n = dst.write_some(buf.data()).map_err(|_| dst_err)?;
        if n > 0 {
            buf.consume(n);
            p.progress = true;
        }
        if !buf.is_empty() {
            return Ok(p);
        }
        if let Some(b) = way.parked.take() {
            res.pool.give(b);
        }
    }
    if let Some(pipe) = way.pipe.as_mut() {
        p.progress |= drain_pipe(pipe, dst).map_err(|_| dst_err)? > 0;
        if pipe.held > 0 {
            return Ok(p);
        }
        give_pipe(res.pipes, way.pipe.take());
    }
    let mut reads = 0;
    // Reading while the sink is blocked would only move bytes from the kernel into our memory.
    while !way.half.eof && !way.half.throttled && src.readable && dst.writable {
        if reads == READS_PER_TURN {
            p.more = true;
            break;
        }
        reads += 1;
        // Splice moves bytes the kernel holds; on a TLS leg those are records, not the plaintext to relay.
        let splicing = res.splice && way.half.bulk && !src.is_tls() && !dst.is_tls();
        let want = if splicing {
            SPLICE_CHUNK
        } else {
            res.scratch.len()
        };
        // Only a limited user's relay asks a bucket or quota; the others pay one branch per read.
        let limited = bucket.is_some() || res.quota.is_some();
        let grant = if limited {
            let Some(g) = granted(ask(bucket, res.quota, res.now, want), way, &mut p) else {
                break;
            };
            g
        } else {
            want
        };
        if splicing {
            let sp = splice_once(src, dst, &mut way.pipe, res.pipes, grant);
            if limited {
                let used = if let Spliced::Moved(n, _) = sp { n } else { 0 };
                unask(bucket, res.quota, grant, used);
            }
            match sp {
                Spliced::Eof => {
                    way.half.eof = true;
                    continue;
                }
                Spliced::Moved(n, blocked) => {
                    p.progress = true;
                    p.bytes += n as u64;
                    if blocked {
                        return Ok(p);
                    }
                    continue;
                }
                Spliced::WouldBlock => {
                    // The burst is over: the next one starts on the copying path again.
                    way.half.bulk = false;
                    break;
                }
                Spliced::SrcErr => return Err(src_err),
                Spliced::DstErr => return Err(dst_err),
                // Out of descriptors for a pipe: this read goes through the scratch buffer instead.
                Spliced::NoPipe => {}
            }
        }
        let grant = match limited {
            true if splicing => {
                let asked = ask(bucket, res.quota, res.now, res.scratch.len());
                let Some(g) = granted(asked, way, &mut p) else {
                    break;
                };
                g
            }
            true => grant,
            false => res.scratch.len(),
        };
        let len = grant.min(res.scratch.len());
        let buf = &mut res.scratch[..len];
        let read = src.read(buf);
        if limited {
            let used = match read {
                Ok(Some(n)) => n,
                _ => 0,
            };
            unask(bucket, res.quota, grant, used);
        }
        match read {
            Ok(Some(0)) => way.half.eof = true,
            Ok(Some(n)) => {
                p.progress = true;
                p.bytes += n as u64;
                // A read that fills the whole scratch buffer means a bulk flow: splice the rest of the burst.
                // Small messages (interactive traffic, handshakes) stay on read/write, which costs no pipe.
                way.half.bulk = n == res.scratch.len();
                let chunk = &res.scratch[..n];
                let w = dst.write_some(chunk).map_err(|_| dst_err)?;
                if w < n {
                    let mut b = res.pool.take();
                    b.push(&chunk[w..]);
                    way.parked = Some(b);
                    return Ok(p);
                }
            }
            Ok(None) => break,
            Err(_) => return Err(src_err),
        }
    }
    if way.half.eof && !way.half.shut {
        way.half.shut = true;
        p.progress = true;
        // When the other direction is already finished the tunnel closes right away, and close sends the FIN:
        // the shutdown call would be redundant.
        if !other_done || dst.is_tls() {
            // TLS: close_notify, then the FIN once every record is out (close would lose records still queued).
            let _ = dst.shutdown_write();
        }
    }
    Ok(p)
}

/// Drives a tunnel until neither direction can make progress.
pub fn drive(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    // A partial success reply (or an HTTP error head) goes out before any upstream byte.
    if !conn.to_client.is_empty() {
        match conn.flush_client() {
            Ok(true) => {}
            Ok(false) => return Next::Wait,
            Err(_) => return Next::Close(CloseReason::ClientError),
        }
    }
    let Conn {
        client,
        phase,
        bytes_up,
        bytes_down,
        last_active,
        limits,
        gen,
        ..
    } = conn;
    let (bucket_up, bucket_down) = match limits.as_deref() {
        Some(l) => (Some(&l.up), Some(&l.down)),
        None => (None, None),
    };
    let quota = limits.as_deref().map(|l| &l.quota).filter(|q| q.is_set());
    let mut quota_hit = false;
    let mut throttle: Option<Duration> = None;
    let Phase::Relay(t) = phase else {
        return Next::Wait;
    };
    let Tunnel { outbound, up, down } = &mut **t;
    let mut more = false;
    let mut any = false;
    for _ in 0..PUMPS_PER_TURN {
        let mut res = Res {
            pool: &mut ctx.pool,
            pipes: &mut ctx.pipes,
            scratch: &mut ctx.scratch,
            splice: ctx.cfg.splice,
            now: ctx.now,
            quota,
        };
        let pumped = pump(
            client,
            outbound,
            up,
            &mut res,
            bucket_up,
            down.half.shut,
            (CloseReason::ClientReset, CloseReason::UpstreamReset),
        )
        .and_then(|a| {
            let b = pump(
                outbound,
                client,
                down,
                &mut res,
                bucket_down,
                up.half.shut,
                (CloseReason::UpstreamReset, CloseReason::ClientReset),
            );
            b.map(|b| (a, b))
        });
        let (a, b) = match pumped {
            Ok(ab) => ab,
            Err(reason) => return Next::Close(reason),
        };
        quota_hit |= a.quota || b.quota;
        for w in [a.throttle, b.throttle].into_iter().flatten() {
            throttle = Some(throttle.map_or(w, |t| t.min(w)));
        }
        *bytes_up += a.bytes;
        *bytes_down += b.bytes;
        if let Some(l) = limits.as_deref() {
            // Shared by the user's sessions on every worker: a real read-modify-write, unlike the per-worker stats.
            l.bytes_up.fetch_add(a.bytes, Ordering::Relaxed);
            l.bytes_down.fetch_add(b.bytes, Ordering::Relaxed);
        }
        metrics::add(&ctx.stats.bytes_up, a.bytes);
        metrics::add(&ctx.stats.bytes_down, b.bytes);
        any |= a.progress || b.progress;
        more = a.more || b.more;
        if !(a.progress || b.progress) || more || quota_hit {
            break;
        }
    }
    if any {
        *last_active = ctx.now;
    }
    if quota_hit {
        // Her other sessions, on every worker, are closed too (the control thread passes this on).
        ctx.limits.note_exhausted();
        return Next::Close(CloseReason::Quota);
    }
    if let Some(wait) = throttle {
        if let Some(l) = limits.as_deref() {
            l.throttled_ns
                .fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
        }
        // One timer per dry spell: a throttled direction reads nothing, so it cannot ask again before it fires. The
        // other direction may run dry meanwhile with a different wait: the earlier wake-up stays, and serves both.
        ctx.timers
            .arm_by(ctx.now + wait, key, *gen, TimerKind::Throttle);
    }
    if up.half.shut && down.half.shut {
        // TLS records still queued inside rustls go out on the next writable edge first.
        let queued = !client.flushed() || !outbound.flushed();
        let broken = client.error || outbound.error;
        if queued && !broken {
            return Next::Wait;
        }
        return Next::Close(CloseReason::Done);
    }
    // A reset peer is gone: what could be delivered was delivered above. Without this check a reset client whose
    // target is not reading (so the client is not being read) would hold the tunnel until the idle timeout.
    if client.error {
        return Next::Close(CloseReason::ClientReset);
    }
    if outbound.error {
        return Next::Close(CloseReason::UpstreamReset);
    }
    if more {
        Next::Yield
    } else {
        Next::Wait
    }
}

/// Both directions are pumped this many times per turn at most, before yielding to other connections.
const PUMPS_PER_TURN: usize = 4;

/// Switches to the relay phase with the idle timer armed. The tunnel takes the outbound socket, the client's bytes
/// that arrived with its handshake and `early`, the outbound side's bytes that came with an upstream proxy's
/// reply, by value: they go out first.
pub fn start_relay(
    key: usize,
    conn: &mut Conn,
    ctx: &mut Ctx,
    outbound: Sock,
    early: Option<Buffer>,
) {
    let parked_up = conn.c2u.take();
    let parked_down = early;
    // Bytes that arrived together with the handshake (pipelined after a SOCKS request or a CONNECT head, sent
    // while a BIND waited, or after the upstream proxy's reply) are relayed first from the buffers: count them
    // here, since the relay counts only what it reads itself.
    let up = parked_up.as_ref().map_or(0, |b| b.len()) as u64;
    let down = parked_down.as_ref().map_or(0, |b| b.len()) as u64;
    conn.bytes_up += up;
    conn.bytes_down += down;
    metrics::add(&ctx.stats.bytes_up, up);
    metrics::add(&ctx.stats.bytes_down, down);
    if let Some(l) = conn.limits.as_deref() {
        l.bytes_up.fetch_add(up, Ordering::Relaxed);
        l.bytes_down.fetch_add(down, Ordering::Relaxed);
        // They arrived before any quota was asked: at most a buffer each, charged now.
        l.quota.charge((up + down) as usize);
    }
    conn.phase = Phase::Relay(Box::new(Tunnel {
        outbound,
        up: Way {
            parked: parked_up,
            pipe: None,
            half: Half {
                eof: conn.client_eof,
                ..Half::default()
            },
        },
        down: Way {
            parked: parked_down,
            pipe: None,
            half: Half::default(),
        },
    }));
    conn.last_active = ctx.now;
    arm_idle(key, conn, ctx);
}

/// The throttle timer popped: both directions may read again (the one that still finds its bucket dry re-arms).
pub fn on_throttle_timer(conn: &mut Conn) -> Next {
    conn.throttled = false;
    let t = match &mut conn.phase {
        Phase::Relay(t) => t,
        // Forwarded HTTP keeps its flag on the connection (cleared above).
        Phase::Http(_) => return Next::Again,
        _ => return Next::Wait,
    };
    t.up.half.throttled = false;
    t.down.half.throttled = false;
    Next::Again
}

/// Schedules the next idle check of a tunnel (replacing the one armed: a closed tunnel's entry is cancelled with
/// it, so nothing bounds how far ahead it may lie).
pub fn arm_idle(key: usize, conn: &Conn, ctx: &mut Ctx) {
    let due = conn.last_active + ctx.cfg.idle_timeout;
    ctx.timers.arm(due, key, conn.gen, TimerKind::Idle);
}

/// The idle timer of a tunnel popped: close it, or re-arm (lazy re-arm: activity never touches the timers).
pub fn on_idle_timer(key: usize, conn: &mut Conn, ctx: &mut Ctx) -> Next {
    if !matches!(conn.phase, Phase::Relay(_) | Phase::Http(_)) {
        return Next::Wait;
    }
    if conn.last_active + ctx.cfg.idle_timeout <= ctx.now {
        Next::Close(CloseReason::IdleTimeout)
    } else {
        arm_idle(key, conn, ctx);
        Next::Wait
    }
}
