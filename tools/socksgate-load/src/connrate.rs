//! `connrate`: short tunnels as fast as possible, each one full connection lifecycle.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client;
use crate::proxy::{Endpoint, ProxySpec};
use crate::stats::{with_errors, with_latency, Histogram, Json, Run};
use crate::target::Kind;
use crate::{finish, Common, THREAD_STACK};

/// Bytes echoed per operation.
const PAYLOAD: usize = 32;
/// Bound on every connect, handshake and read of one operation.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// Run the mode; returns the exit code.
pub(crate) fn run(c: &Common, concurrency: usize, max_ops: u64) -> i32 {
    let (_target, ep) = match c.tcp_target(Kind::EchoClose(PAYLOAD)) {
        Ok(t) => t,
        Err(e) => return crate::fatal(&e),
    };
    // An external echo server does not close first, so we half-close to end each op.
    let external = c.target.is_some();
    let run = Arc::new(Run::new(max_ops));
    let (r, proxy, ep2) = (run.clone(), c.proxy.clone(), ep.clone());
    let w = c.run_threads(
        &run,
        concurrency,
        "conn",
        Some(THREAD_STACK),
        &|r| format!("{r:.0} ops/s"),
        move |i| worker(&r, &proxy, &ep2, external, i),
    );
    let h = run.histogram();
    let ops = run.measured();
    let j = Json::new()
        .str("mode", "connrate")
        .str("proxy", &c.proxy.to_string())
        .str("target", &c.target_name(&ep))
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

/// One worker: back-to-back operations until the run ends.
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
