//! `latency`: N tunnels each doing 64-byte ping-pong round trips, one at a time.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client;
use crate::proxy::{Endpoint, ProxySpec};
use crate::stats::{drive, with_errors, with_latency, Histogram, Json, Run};
use crate::target::Kind;
use crate::{finish, Common};

/// Bytes per ping.
const PING: usize = 64;
/// Bound on connect/handshake and on each round trip.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Run the mode; returns the exit code.
pub(crate) fn run(c: &Common, conns: usize) -> i32 {
    let (_target, ep) = match c.tcp_target(Kind::Echo) {
        Ok(t) => t,
        Err(e) => return crate::fatal(&e),
    };
    let run = Arc::new(Run::new(0));
    let mut handles = Vec::new();
    for i in 0..conns {
        let (r, proxy, ep) = (run.clone(), c.proxy.clone(), ep.clone());
        let h = std::thread::Builder::new()
            .name(format!("ping-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || worker(&r, &proxy, &ep));
        match h {
            Ok(h) => handles.push(h),
            Err(e) => run.error(format!("spawn: {e}")),
        }
    }
    let w = drive(&run, c.warmup, c.seconds, c.quiet, &|r| {
        format!("{r:.0} rtt/s")
    });
    for h in handles {
        let _ = h.join();
    }
    let h = run.histogram();
    let rtts = run.measured();
    let j = Json::new()
        .str("mode", "latency")
        .str("proxy", &c.proxy.to_string())
        .str("target", &c.target_name(&ep))
        .int("conns", conns as u64)
        .float("seconds", c.seconds, 1)
        .float("elapsed", w.elapsed, 3)
        .int("round_trips", rtts)
        .float("round_trips_per_sec", rtts as f64 / w.elapsed.max(1e-9), 1);
    let pcts = [
        ("p50_us", 50.0),
        ("p90_us", 90.0),
        ("p99_us", 99.0),
        ("p999_us", 99.9),
    ];
    let j = with_latency(with_errors(j, &run), &h, &pcts);
    let attempts = run.total() + run.errors_total();
    finish(j.finish(), attempts, run.errors_total(), rtts, &run)
}

/// One connection: ping-pong until the run ends, reconnecting after an error.
fn worker(run: &Run, proxy: &ProxySpec, ep: &Endpoint) {
    let mut hist = Histogram::new();
    let mut ping = [0u8; PING];
    let mut pong = [0u8; PING];
    let mut seq = 0u64;
    while run.running() {
        let t = match client::connect(proxy, ep, TIMEOUT) {
            Ok(t) if t.leftover.is_empty() => t,
            Ok(_) => {
                run.error("unexpected bytes before the first ping");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => {
                if run.running() {
                    run.error(format!("tunnel: {e}"));
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let mut s = t.stream;
        while run.running() {
            seq += 1;
            ping[..8].copy_from_slice(&seq.to_be_bytes());
            let t0 = Instant::now();
            let r = s.write_all(&ping).and_then(|_| s.read_exact(&mut pong));
            let rtt = t0.elapsed();
            if let Err(e) = r {
                if run.running() {
                    run.error(format!("round trip: {e}"));
                }
                break;
            }
            if pong != ping {
                run.error("echo mismatch");
                break;
            }
            if run.complete(1) {
                hist.record_duration(rtt);
            }
        }
    }
    run.merge(&hist);
}
