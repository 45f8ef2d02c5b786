//! `idle`: memory and fd cost of many established but idle tunnels in the proxy process.
//!
//! All tunnels are driven by one mio loop in this thread (no thread per tunnel), using
//! the same sans-IO handshake as the blocking modes.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::client::{Command, Handshake, Progress};
use crate::proxy::{Endpoint, ProxySpec};
use crate::stats::Json;
use crate::target::Kind;
use crate::{finish_plain, Common};

/// Connections being set up at once, so the proxy's accept backlog is not flooded.
const MAX_PENDING: usize = 512;
/// One tunnel must be up within this time.
const CONN_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole opening phase is bounded too.
const OPEN_TIMEOUT: Duration = Duration::from_secs(120);
/// After closing, how long we wait for the proxy's fd count to return to baseline.
const FD_SETTLE: Duration = Duration::from_secs(10);
/// The small echo that proves a tunnel works end to end.
const PING: &[u8] = b"idleping";

/// Where one tunnel is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Connecting,
    Handshaking,
    Echoing,
    Up,
    Dead,
}

/// One nonblocking tunnel.
struct Tunnel {
    sock: TcpStream,
    st: St,
    hs: Option<Handshake>,
    out: Vec<u8>,
    got: usize,
    started: Instant,
}

/// Memory and fd numbers of a process at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sample {
    /// VmRSS in KiB.
    pub(crate) rss_kib: u64,
    /// Entries in /proc/PID/fd.
    pub(crate) fds: u64,
}

/// Read VmRSS and the fd count of `pid` from /proc.
pub(crate) fn sample(pid: u32) -> io::Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = parse_vmrss(&status).ok_or_else(|| {
        io::Error::new(ErrorKind::InvalidData, "no VmRSS line in /proc/PID/status")
    })?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(Sample { rss_kib, fds })
}

/// The `VmRSS:   1234 kB` value.
pub(crate) fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Run the mode; returns the exit code.
pub(crate) fn run(c: &Common, conns: usize, pid: Option<u32>, hold: f64) -> i32 {
    let pid = pid.unwrap_or_else(std::process::id);
    let (_target, ep) = match c.tcp_target(Kind::Echo) {
        Ok(t) => t,
        Err(e) => return crate::fatal(&e),
    };
    // Our side needs one fd per tunnel, and the built-in target another one.
    let per_tunnel = if c.target.is_none() { 2 } else { 1 };
    let need = (conns as u64) * per_tunnel + 256;
    if need > c.nofile {
        return crate::fatal(&format!(
            "{conns} tunnels need about {need} fds here but RLIMIT_NOFILE is {} \
             (raise the hard limit, or use an external --target to need half as many)",
            c.nofile
        ));
    }
    let before = match sample(pid) {
        Ok(s) => s,
        Err(e) => return crate::fatal(&format!("reading /proc/{pid}: {e}")),
    };
    let t0 = Instant::now();
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => return crate::fatal(&format!("poll: {e}")),
    };
    let mut tunnels: Vec<Tunnel> = Vec::with_capacity(conns);
    // Two batches: the cost per tunnel is the slope between the samples after each, so whatever the proxy
    // allocates or frees once (startup leftovers, the first pool and slab growth) is not charged to tunnels.
    let first = open_all(c, &ep, conns / 2, &mut poll, &mut tunnels);
    let mut dropped = hold_phase(&mut poll, &mut tunnels, hold / 2.0);
    let mid = sample(pid).unwrap_or_default();
    let second = open_all(c, &ep, conns - conns / 2, &mut poll, &mut tunnels);
    let up = first.up + second.up;
    let mut failed = first.failed + second.failed;
    let first_err = first.first_err.or(second.first_err);
    let open_secs = t0.elapsed().as_secs_f64();
    if !c.quiet {
        eprintln!("[idle] {up} tunnels up, {failed} failed in {open_secs:.2}s; holding {hold}s");
    }
    dropped += hold_phase(&mut poll, &mut tunnels, hold);
    let during = sample(pid).unwrap_or_default();
    failed += dropped;
    drop(tunnels);
    drop(poll);
    let settle = Instant::now();
    let mut after = sample(pid).unwrap_or_default();
    while after.fds > before.fds && settle.elapsed() < FD_SETTLE {
        std::thread::sleep(Duration::from_millis(100));
        after = sample(pid).unwrap_or(after);
    }
    let back = after.fds <= before.fds;
    if !c.quiet {
        eprintln!(
            "[idle] closed; fds {} -> {} -> {} ({:.1}s to settle)",
            before.fds,
            during.fds,
            after.fds,
            settle.elapsed().as_secs_f64()
        );
    }
    let per_tunnel = |from: Sample, n: usize| {
        if n > 0 {
            (during.rss_kib as f64 - from.rss_kib as f64) / n as f64
        } else {
            0.0
        }
    };
    let per = per_tunnel(mid, second.up);
    let per_from_start = per_tunnel(before, up);
    let errors: Vec<String> = first_err.into_iter().collect();
    let j = Json::new()
        .str("mode", "idle")
        .str("proxy", &c.proxy.to_string())
        .str("target", &c.target_name(&ep))
        .int("pid", u64::from(pid))
        .int("conns", conns as u64)
        .int("established", up as u64)
        .int("errors", failed as u64)
        .int("dropped_during_hold", dropped as u64)
        .strs("error_samples", &errors)
        .float("open_seconds", open_secs, 3)
        .float("hold_seconds", hold, 1)
        .int("rss_before_kib", before.rss_kib)
        .int("rss_mid_kib", mid.rss_kib)
        .int("rss_during_kib", during.rss_kib)
        .int("rss_after_kib", after.rss_kib)
        .float("kib_per_tunnel", per, 2)
        .float("kib_per_tunnel_from_start", per_from_start, 2)
        .int("fds_before", before.fds)
        .int("fds_during", during.fds)
        .int("fds_after", after.fds)
        .bool("fd_back_to_baseline", back);
    finish_plain(j.finish(), conns as u64, failed as u64, up as u64, &errors)
}

/// Outcome of the opening phase.
#[derive(Debug, Default)]
struct Opened {
    up: usize,
    failed: usize,
    pending: usize,
    first_err: Option<String>,
}

impl Opened {
    /// Count a failed tunnel, keeping the first message for the report.
    fn fail(&mut self, msg: String) {
        self.failed += 1;
        self.first_err.get_or_insert(msg);
    }
}

/// Open `n` more tunnels with at most MAX_PENDING in setup at once.
fn open_all(
    c: &Common,
    ep: &Endpoint,
    n: usize,
    poll: &mut Poll,
    tunnels: &mut Vec<Tunnel>,
) -> Opened {
    let connect_to = c.proxy.addr.unwrap_or(ep.addr);
    let dest = ep.dest(c.proxy.scheme);
    let mut events = Events::with_capacity(1024);
    let mut o = Opened::default();
    let goal = tunnels.len() + n;
    let start = Instant::now();
    let mut next_tick = start + Duration::from_secs(1);
    while o.up + o.failed < n && start.elapsed() < OPEN_TIMEOUT {
        while o.pending < MAX_PENDING && tunnels.len() < goal {
            match start_one(poll, tunnels.len(), connect_to, &c.proxy, &dest) {
                Ok(t) => {
                    tunnels.push(t);
                    o.pending += 1;
                }
                Err(e) => {
                    // Typically out of fds or ports: more attempts would fail the same way.
                    o.fail(format!("connect: {e}"));
                    o.failed += goal - tunnels.len() - 1;
                    return o;
                }
            }
        }
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(100))) {
            if e.kind() != ErrorKind::Interrupted {
                o.fail(format!("poll: {e}"));
                break;
            }
        }
        for ev in events.iter() {
            let t = &mut tunnels[ev.token().0];
            if matches!(t.st, St::Up | St::Dead) {
                continue;
            }
            match advance(t) {
                Ok(()) if t.st == St::Up => {
                    o.up += 1;
                    o.pending -= 1;
                }
                Ok(()) => {}
                Err(e) => {
                    t.st = St::Dead;
                    o.pending -= 1;
                    o.fail(e);
                }
            }
        }
        let now = Instant::now();
        if now >= next_tick {
            next_tick = now + Duration::from_secs(1);
            for t in tunnels.iter_mut() {
                if !matches!(t.st, St::Up | St::Dead) && t.started.elapsed() > CONN_TIMEOUT {
                    t.st = St::Dead;
                    o.pending -= 1;
                    o.fail("tunnel setup timed out".into());
                }
            }
            if !c.quiet {
                let secs = start.elapsed().as_secs();
                eprintln!("[{secs}s] {}/{n} tunnels up, {} failed", o.up, o.failed);
            }
        }
    }
    // The phase timed out: whatever is unfinished or never started has failed.
    for t in tunnels.iter_mut() {
        if !matches!(t.st, St::Up | St::Dead) {
            t.st = St::Dead;
            o.fail("opening phase timed out".into());
        }
    }
    o.failed += goal - tunnels.len();
    o
}

/// Start a nonblocking connect for tunnel `idx`.
fn start_one(
    poll: &Poll,
    idx: usize,
    addr: SocketAddr,
    proxy: &ProxySpec,
    dest: &crate::proxy::Dest,
) -> io::Result<Tunnel> {
    let hs = Handshake::new(proxy, dest, Command::Connect)?;
    let mut sock = TcpStream::connect(addr)?;
    poll.registry().register(
        &mut sock,
        Token(idx),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    Ok(Tunnel {
        sock,
        st: St::Connecting,
        hs: (!hs.is_done()).then_some(hs),
        out: Vec::new(),
        got: 0,
        started: Instant::now(),
    })
}

/// Move a tunnel forward as far as its socket allows without blocking.
fn advance(t: &mut Tunnel) -> Result<(), String> {
    loop {
        // Flush whatever is queued (handshake messages or the ping) first.
        if let Some(hs) = &mut t.hs {
            if !hs.output().is_empty() {
                t.out.extend_from_slice(hs.output());
                let n = hs.output().len();
                hs.consume_output(n);
            }
        }
        while !t.out.is_empty() && t.st != St::Connecting {
            match t.sock.write(&t.out) {
                Ok(n) => {
                    t.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        match t.st {
            St::Connecting => {
                if let Some(e) = t.sock.take_error().map_err(|e| e.to_string())? {
                    return Err(format!("connect: {e}"));
                }
                match t.sock.peer_addr() {
                    Ok(_) => {
                        let _ = t.sock.set_nodelay(true);
                        if t.hs.is_some() {
                            t.st = St::Handshaking;
                        } else {
                            t.st = St::Echoing;
                            t.out.extend_from_slice(PING);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(()),
                    Err(e) => return Err(format!("connect: {e}")),
                }
            }
            St::Handshaking | St::Echoing => {
                let mut buf = [0u8; 1024];
                let n = match t.sock.read(&mut buf) {
                    Ok(0) => return Err(format!("closed while {:?}", t.st)),
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(format!("read: {e}")),
                };
                if t.st == St::Echoing {
                    t.got += n;
                } else if let Some(hs) = &mut t.hs {
                    if let Progress::Done(est) = hs.input(&buf[..n]).map_err(|e| e.to_string())? {
                        t.hs = None;
                        t.got = est.leftover.len();
                        t.st = St::Echoing;
                        t.out.extend_from_slice(PING);
                    }
                }
                if t.st == St::Echoing && t.got >= PING.len() {
                    t.st = St::Up;
                    return Ok(());
                }
            }
            St::Up | St::Dead => return Ok(()),
        }
    }
}

/// Keep the tunnels open for `hold` seconds, counting any the proxy closes meanwhile.
fn hold_phase(poll: &mut Poll, tunnels: &mut [Tunnel], hold: f64) -> usize {
    let end = Instant::now() + Duration::from_secs_f64(hold);
    let mut events = Events::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // Readiness is edge-triggered: an established tunnel closed while a later batch was opening had its event
    // consumed there, so every open tunnel is looked at once before waiting for new events.
    let mut dropped = 0;
    for t in tunnels.iter_mut() {
        if closed_by_peer(t, &mut buf) {
            dropped += 1;
        }
    }
    while Instant::now() < end {
        let left = end.saturating_duration_since(Instant::now());
        if let Err(e) = poll.poll(&mut events, Some(left.min(Duration::from_millis(100)))) {
            if e.kind() != ErrorKind::Interrupted {
                break;
            }
        }
        for ev in events.iter() {
            if closed_by_peer(&mut tunnels[ev.token().0], &mut buf) {
                dropped += 1;
            }
        }
    }
    dropped
}

/// Drain an established tunnel; true when that finds it closed (it is then marked dead).
fn closed_by_peer(t: &mut Tunnel, buf: &mut [u8]) -> bool {
    if t.st != St::Up {
        return false;
    }
    loop {
        match t.sock.read(buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    t.st = St::Dead;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmrss() {
        let s = "Name:\tx\nVmPeak:\t  100 kB\nVmRSS:\t    4321 kB\nThreads: 1\n";
        assert_eq!(parse_vmrss(s), Some(4321));
        assert_eq!(parse_vmrss("Name: x"), None);
        let me = sample(std::process::id()).unwrap();
        assert!(me.rss_kib > 0 && me.fds > 0);
    }
}
