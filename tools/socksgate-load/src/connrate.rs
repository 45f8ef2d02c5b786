//! `connrate`: short tunnels as fast as possible, each one full connection lifecycle.
//!
//! Two engines run the same operation. The default keeps every operation of a thread on nonblocking sockets in
//! one mio loop (one loop per core the process may run on), as wrk or h2load do: a sleeping thread per
//! connection would make every segment the proxy sends to the client wake a thread on the client's core, and on
//! loopback part of that wake-up is charged to the proxy's core. `--blocking` keeps the earlier engine (one
//! blocking thread per concurrent operation), so figures measured with it can still be reproduced.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::client::{self, Command, Handshake, Progress};
use crate::proxy::{Dest, Endpoint, ProxySpec};
use crate::stats::{with_errors, with_latency, Histogram, Json, Run};
use crate::target::Kind;
use crate::{finish, Common, THREAD_STACK};

/// Bytes echoed per operation.
const PAYLOAD: usize = 32;
/// Bound on every connect, handshake and read of one operation.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the event loops look for operations past their deadline.
const DEADLINE_SCAN: Duration = Duration::from_millis(100);
/// A failed operation's slot waits this long before the next attempt, so a failing proxy is not spun on.
const RETRY_PAUSE: Duration = Duration::from_millis(1);

/// Run the mode; returns the exit code.
pub(crate) fn run(c: &Common, concurrency: usize, max_ops: u64, blocking: bool) -> i32 {
    let (_target, ep) = match c.tcp_target(Kind::EchoClose(PAYLOAD)) {
        Ok(t) => t,
        Err(e) => return crate::fatal(&e),
    };
    // An external echo server does not close first, so we half-close to end each op.
    let external = c.target.is_some();
    let run = Arc::new(Run::new(max_ops));
    let (r, proxy, ep2) = (run.clone(), c.proxy.clone(), ep.clone());
    let rate = |r: f64| format!("{r:.0} ops/s");
    let w = if blocking {
        c.run_threads(
            &run,
            concurrency,
            "conn",
            Some(THREAD_STACK),
            &rate,
            move |i| worker(&r, &proxy, &ep2, external, i),
        )
    } else {
        // available_parallelism honours the CPU affinity mask, so a run pinned to one core gets one loop.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let loops = cores.min(concurrency);
        c.run_threads(&run, loops, "loop", None, &rate, move |i| {
            // Operations are dealt out to the loops as evenly as they go.
            let first = concurrency * i / loops;
            let n = concurrency * (i + 1) / loops - first;
            event_loop(&r, &proxy, &ep2, external, first, n)
        })
    };
    let h = run.histogram();
    let ops = run.measured();
    let j = Json::new()
        .str("mode", "connrate")
        .str("proxy", &c.proxy.to_string())
        .str("target", &c.target_name(&ep))
        .str("engine", if blocking { "blocking" } else { "events" })
        .int("concurrency", concurrency as u64)
        .float("seconds", c.seconds, 1)
        .float("elapsed", w.elapsed, 3)
        .int("ops", ops)
        .float("ops_per_sec", ops as f64 / w.elapsed.max(1e-9), 1);
    let j = with_latency(
        with_errors(j, &run),
        &h,
        &[("p50_us", 50.0), ("p99_us", 99.0)],
    );
    let attempts = run.total() + run.errors_total();
    finish(j.finish(), attempts, run.errors_total(), ops, &run)
}

/// One blocking worker: back-to-back operations until the run ends.
fn worker(run: &Run, proxy: &ProxySpec, ep: &Endpoint, external: bool, id: usize) {
    let mut hist = Histogram::new();
    let mut payload = [0u8; PAYLOAD];
    for (i, b) in payload.iter_mut().enumerate() {
        *b = (id + i) as u8;
    }
    let mut seq = 0u32;
    while run.running() {
        // Vary the payload per op so a stale echo from a previous op cannot pass.
        seq = seq.wrapping_add(1);
        payload[..4].copy_from_slice(&seq.to_be_bytes());
        let t0 = Instant::now();
        run.record(&mut hist, t0, one_op(proxy, ep, &payload, external));
    }
    run.merge(&hist);
}

/// Connect, handshake, echo 32 bytes, wait for the target to close, close.
fn one_op(proxy: &ProxySpec, ep: &Endpoint, payload: &[u8], external: bool) -> Result<(), String> {
    let t = client::connect(proxy, ep, OP_TIMEOUT).map_err(|e| format!("tunnel: {e}"))?;
    let mut s = t.stream;
    s.write_all(payload).map_err(|e| format!("send: {e}"))?;
    let mut got = [0u8; PAYLOAD + 1];
    let mut n = t.leftover.len().min(got.len());
    got[..n].copy_from_slice(&t.leftover[..n]);
    while n < payload.len() {
        match s.read(&mut got[n..payload.len()]) {
            Ok(0) => return Err(format!("closed after {n} of {} echo bytes", payload.len())),
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("echo read: {e}")),
        }
    }
    if &got[..payload.len()] != payload {
        return Err("echo mismatch".into());
    }
    if external {
        let _ = s.shutdown(Shutdown::Write);
    }
    // The target closes first; reading to EOF makes us the passive closer.
    loop {
        match s.read(&mut got) {
            Ok(0) => return Ok(()),
            Ok(_) => return Err("unexpected bytes after the echo".into()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("waiting for close: {e}")),
        }
    }
}

/// Where a nonblocking operation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    /// Sending the handshake and reading the proxy's replies (a connect still in progress shows as a write that
    /// would block, so it needs no state of its own).
    Handshake,
    /// Sending the payload and reading its echo.
    Echo,
    /// Waiting for the target's close to come through.
    Closing,
}

impl St {
    /// The step's name in error messages, as the blocking engine words them.
    fn step(self) -> &'static str {
        match self {
            St::Handshake => "tunnel",
            St::Echo => "echo read",
            St::Closing => "waiting for close",
        }
    }
}

/// One operation in flight on a nonblocking socket.
struct Op {
    sock: TcpStream,
    st: St,
    hs: Handshake,
    /// Payload bytes written so far.
    sent: usize,
    /// Echo bytes received so far.
    got: usize,
    echo: [u8; PAYLOAD],
    started: Instant,
}

/// A slot of the loop: an operation, or a pause after a failed one.
enum Slot {
    Busy(Box<Op>),
    Waiting(Instant),
}

/// What the operations of one event loop share.
struct Loop<'a> {
    run: &'a Run,
    poll: Poll,
    proxy: &'a ProxySpec,
    /// Where every operation connects: the proxy, or the target for `direct`.
    addr: SocketAddr,
    dest: Dest,
    external: bool,
    hist: Histogram,
    buf: [u8; 4096],
    /// One payload per slot; its first 4 bytes carry the operation's sequence number.
    payloads: Vec<[u8; PAYLOAD]>,
    seq: u32,
}

/// One event loop running `n` concurrent operations (payload ids from `first`) back to back until the run ends.
fn event_loop(run: &Run, proxy: &ProxySpec, ep: &Endpoint, external: bool, first: usize, n: usize) {
    let poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => return run.error(format!("poll: {e}")),
    };
    let payloads = (0..n)
        .map(|k| {
            let mut p = [0u8; PAYLOAD];
            for (i, b) in p.iter_mut().enumerate() {
                *b = (first + k + i) as u8;
            }
            p
        })
        .collect();
    let mut lp = Loop {
        run,
        poll,
        proxy,
        addr: proxy.addr.unwrap_or(ep.addr),
        dest: ep.dest(proxy.scheme),
        external,
        hist: Histogram::new(),
        buf: [0; 4096],
        payloads,
        seq: 0,
    };
    let now = Instant::now();
    let mut slots: Vec<Slot> = (0..n).map(|_| Slot::Waiting(now)).collect();
    let mut events = Events::with_capacity(1024);
    let mut next_scan = now;
    while run.running() {
        let now = Instant::now();
        let waiting = slots.iter().any(|s| matches!(s, Slot::Waiting(_)));
        if now >= next_scan || waiting {
            if now >= next_scan {
                next_scan = now + DEADLINE_SCAN;
            }
            for (i, slot) in slots.iter_mut().enumerate() {
                match slot {
                    Slot::Busy(op) if now.duration_since(op.started) > OP_TIMEOUT => {
                        let msg = format!("{}: timed out", op.st.step());
                        fail(run, slot, msg, now);
                    }
                    Slot::Waiting(at) if now >= *at => lp.restart(slot, i),
                    _ => {}
                }
            }
        }
        // A pause after a failure ends within a millisecond; otherwise the deadline scan sets the pace.
        let wait = if slots.iter().any(|s| matches!(s, Slot::Waiting(_))) {
            RETRY_PAUSE
        } else {
            next_scan.saturating_duration_since(now)
        };
        if let Err(e) = lp.poll.poll(&mut events, Some(wait)) {
            if e.kind() != ErrorKind::Interrupted {
                run.error(format!("poll: {e}"));
                break;
            }
        }
        for ev in events.iter() {
            let i = ev.token().0;
            // An event can belong to the socket of an operation that already ended in this batch; pumping the
            // slot's new operation then only finds nothing to do.
            let Some(Slot::Busy(op)) = slots.get_mut(i) else {
                continue;
            };
            if let Some(outcome) = pump(op, &lp.payloads[i], external, &mut lp.buf) {
                let slot = &mut slots[i];
                lp.finish(slot, outcome);
                if matches!(slot, Slot::Waiting(at) if *at <= Instant::now()) {
                    lp.restart(slot, i);
                }
            }
        }
    }
    run.merge(&lp.hist);
}

impl Loop<'_> {
    /// Starts the next operation in `slot` (token `i`), with the next sequence number in its payload, and takes it
    /// as far as it goes at once.
    fn restart(&mut self, slot: &mut Slot, i: usize) {
        self.seq = self.seq.wrapping_add(1);
        self.payloads[i][..4].copy_from_slice(&self.seq.to_be_bytes());
        let opened = Handshake::new(self.proxy, &self.dest, Command::Connect).and_then(|hs| {
            let mut sock = TcpStream::connect(self.addr)?;
            sock.set_nodelay(true)?;
            self.poll.registry().register(
                &mut sock,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(Op {
                st: if hs.is_done() {
                    St::Echo
                } else {
                    St::Handshake
                },
                sock,
                hs,
                sent: 0,
                got: 0,
                echo: [0; PAYLOAD],
                started: Instant::now(),
            })
        });
        let mut op = match opened {
            Ok(op) => Box::new(op),
            Err(e) => return fail(self.run, slot, format!("tunnel: {e}"), Instant::now()),
        };
        // On loopback the connect has usually completed already; a write that finds it still in progress would
        // block.
        let done = pump(&mut op, &self.payloads[i], self.external, &mut self.buf);
        *slot = Slot::Busy(op);
        if let Some(outcome) = done {
            self.finish(slot, outcome);
        }
    }

    /// Records the end of the operation in `slot`: its latency, or its error and a pause.
    fn finish(&mut self, slot: &mut Slot, outcome: Result<(), String>) {
        let Slot::Busy(op) = &*slot else {
            return;
        };
        match outcome {
            Ok(()) => {
                if self.run.complete(1) {
                    self.hist.record_duration(op.started.elapsed());
                }
                // The socket closes when the operation is dropped, which also takes it out of the epoll set.
                *slot = Slot::Waiting(Instant::now());
            }
            Err(e) => fail(self.run, slot, e, Instant::now()),
        }
    }
}

/// Counts an error (unless the run is stopping) and parks the slot for a pause.
fn fail(run: &Run, slot: &mut Slot, msg: String, now: Instant) {
    if run.running() {
        run.error(msg);
    }
    *slot = Slot::Waiting(now + RETRY_PAUSE);
}

/// Moves an operation on as far as its socket allows without blocking: `None` while it waits, the outcome once
/// it ended. The steps and their checks are the blocking engine's.
fn pump(
    op: &mut Op,
    payload: &[u8; PAYLOAD],
    external: bool,
    buf: &mut [u8],
) -> Option<Result<(), String>> {
    loop {
        let wrote = match op.st {
            St::Handshake => {
                let out = op.hs.output();
                if out.is_empty() {
                    None
                } else {
                    Some(op.sock.write(out).map(|n| op.hs.consume_output(n)))
                }
            }
            St::Echo if op.sent < PAYLOAD => {
                Some(op.sock.write(&payload[op.sent..]).map(|n| op.sent += n))
            }
            _ => None,
        };
        match wrote {
            Some(Ok(())) => continue,
            Some(Err(e)) if e.kind() == ErrorKind::Interrupted => continue,
            // Still connecting, or the send buffer is full: the writable edge comes back here.
            Some(Err(e)) if e.kind() == ErrorKind::WouldBlock => return None,
            Some(Err(e)) => {
                let what = if op.st == St::Handshake {
                    "tunnel"
                } else {
                    "send"
                };
                return Some(Err(format!("{what}: {e}")));
            }
            None => {}
        }
        let n = match op.sock.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
            // Not yet connected: reads fail this way until the handshake of TCP completes.
            Err(e) if e.kind() == ErrorKind::NotConnected => return None,
            Err(e) => return Some(Err(read_error(op, &e))),
        };
        let data = &buf[..n];
        match op.st {
            St::Handshake => {
                if n == 0 {
                    return Some(Err(
                        "tunnel: proxy closed the connection during the handshake".into(),
                    ));
                }
                match op.hs.input(data) {
                    Ok(Progress::NeedMore) => {}
                    Ok(Progress::Done(est)) => {
                        op.st = St::Echo;
                        if let Some(r) = take_echo(op, &est.leftover, payload, external) {
                            return Some(r);
                        }
                    }
                    Err(e) => return Some(Err(format!("tunnel: {e}"))),
                }
            }
            St::Echo => {
                if n == 0 {
                    return Some(Err(format!(
                        "closed after {} of {PAYLOAD} echo bytes",
                        op.got
                    )));
                }
                if let Some(r) = take_echo(op, data, payload, external) {
                    return Some(r);
                }
            }
            St::Closing if n == 0 => return Some(Ok(())),
            St::Closing => return Some(Err("unexpected bytes after the echo".into())),
        }
    }
}

/// Takes echo bytes in; once all arrived they are checked and the operation waits for the close. Returns the
/// outcome if the operation failed.
fn take_echo(
    op: &mut Op,
    data: &[u8],
    payload: &[u8; PAYLOAD],
    external: bool,
) -> Option<Result<(), String>> {
    let room = PAYLOAD - op.got;
    if data.len() > room {
        return Some(Err("unexpected bytes after the echo".into()));
    }
    op.echo[op.got..op.got + data.len()].copy_from_slice(data);
    op.got += data.len();
    if op.got < PAYLOAD {
        return None;
    }
    if op.sent < PAYLOAD || op.echo != *payload {
        return Some(Err("echo mismatch".into()));
    }
    if external {
        let _ = op.sock.shutdown(Shutdown::Write);
    }
    op.st = St::Closing;
    None
}

/// The message for a failed read, named after the step it failed in.
fn read_error(op: &Op, e: &io::Error) -> String {
    format!("{}: {e}", op.st.step())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::parse_proxy;
    use crate::stats::drive;
    use crate::target::TcpTarget;
    use std::net::{TcpListener, TcpStream as StdStream};

    /// A minimal SOCKS5 proxy, a blocking thread per connection: it answers CONNECT with `rep` and, when that is
    /// success, relays the payload to the target and the target's answer back until the target closes.
    fn fake_socks5(rep: u8) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || serve(c, rep));
            }
        });
        addr
    }

    fn serve(mut c: StdStream, rep: u8) -> io::Result<()> {
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut greeting = [0u8; 3];
        c.read_exact(&mut greeting)?;
        assert_eq!(greeting, [5, 1, 0], "no-auth greeting");
        c.write_all(&[5, 0])?;
        let mut req = [0u8; 10];
        c.read_exact(&mut req)?;
        assert_eq!(req[..4], [5, 1, 0, 1], "CONNECT to an IPv4 address");
        let port = u16::from_be_bytes([req[8], req[9]]);
        let dst = SocketAddr::from(([req[4], req[5], req[6], req[7]], port));
        c.write_all(&[5, rep, 0, 1, 127, 0, 0, 1, 0, 0])?;
        if rep != 0 {
            return Ok(());
        }
        let mut t = StdStream::connect(dst)?;
        t.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut p = [0u8; PAYLOAD];
        c.read_exact(&mut p)?;
        t.write_all(&p)?;
        io::copy(&mut t, &mut c)?;
        Ok(())
    }

    /// Runs the event engine with `slots` operations through `proxy` to the built-in close-after-echo target
    /// until `ops` were measured or `seconds` passed.
    fn events(proxy: &str, ops: u64, slots: usize, seconds: f64) -> Arc<Run> {
        let target = TcpTarget::start(Kind::EchoClose(PAYLOAD)).unwrap();
        let ep = Endpoint::builtin(target.addr());
        let proxy = parse_proxy(proxy).unwrap();
        let run = Arc::new(Run::new(ops));
        let r = run.clone();
        let h = std::thread::spawn(move || event_loop(&r, &proxy, &ep, false, 0, slots));
        drive(&run, 0.0, seconds, true, &|_| String::new());
        h.join().unwrap();
        run
    }

    #[test]
    fn event_engine_runs_whole_operations_through_a_socks5_proxy() {
        let proxy = format!("socks5://{}", fake_socks5(0));
        let run = events(&proxy, 300, 8, 60.0);
        assert_eq!(run.errors_total(), 0, "{:?}", run.error_samples());
        assert!(run.measured() >= 300, "stopped at the goal, not the clock");
        assert_eq!(run.histogram().count(), run.measured());
    }

    #[test]
    fn event_engine_runs_direct_operations() {
        let run = events("direct", 300, 3, 60.0);
        assert_eq!(run.errors_total(), 0, "{:?}", run.error_samples());
        assert!(run.measured() >= 300);
    }

    #[test]
    fn event_engine_counts_a_refused_connect_and_keeps_going() {
        // rep 5: connection refused.
        let proxy = format!("socks5://{}", fake_socks5(5));
        let run = events(&proxy, 1, 2, 0.5);
        assert_eq!(run.measured(), 0);
        assert!(
            run.errors_total() >= 2,
            "both slots failed and were retried"
        );
        let samples = run.error_samples();
        assert_eq!(samples.len(), 1, "{samples:?}");
        assert!(
            samples[0].0.starts_with("tunnel: SOCKS5 reply:"),
            "{samples:?}"
        );
    }
}
