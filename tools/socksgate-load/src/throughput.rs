//! `throughput`: N long-lived tunnels pushing (up) or pulling (down) bulk data.

use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use crate::client;
use crate::proxy::Endpoint;
use crate::stats::{drive, with_errors, Json, Run};
use crate::target::Kind;
use crate::{finish, Common};

/// Direction of the bulk data, seen from the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Client writes, the target is a sink.
    Up,
    /// Client reads, the target is a source.
    Down,
}

/// Size of each blocking write or read: large, so syscall cost does not dominate.
const BLOCK: usize = 256 * 1024;
/// Timeout for connect and handshake.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Blocking I/O wakes up at least this often to notice the end of the run.
const IO_TICK: Duration = Duration::from_millis(500);

/// Run the mode; returns the exit code.
pub(crate) fn run(c: &Common, streams: usize, dir: Dir) -> i32 {
    let kind = if dir == Dir::Up {
        Kind::Sink
    } else {
        Kind::Source
    };
    let (_target, ep) = match c.tcp_target(kind) {
        Ok(t) => t,
        Err(e) => return crate::fatal(&e),
    };
    let run = Arc::new(Run::new(0));
    let mut handles = Vec::new();
    for i in 0..streams {
        let (r, proxy, ep) = (run.clone(), c.proxy.clone(), ep.clone());
        let h = std::thread::Builder::new()
            .name(format!("stream-{i}"))
            .spawn(move || stream(&r, &proxy, &ep, dir));
        match h {
            Ok(h) => handles.push(h),
            Err(e) => run.error(format!("spawn: {e}")),
        }
    }
    let w = drive(&run, c.warmup, c.seconds, c.quiet, &|bytes_per_sec| {
        format!("{:.2} Gbit/s", bytes_per_sec * 8.0 / 1e9)
    });
    for h in handles {
        let _ = h.join();
    }
    let bytes = run.measured();
    let gbit = if w.elapsed > 0.0 {
        bytes as f64 * 8.0 / w.elapsed / 1e9
    } else {
        0.0
    };
    let j = Json::new()
        .str("mode", "throughput")
        .str("proxy", &c.proxy.to_string())
        .str("target", &c.target_name(&ep))
        .str("dir", if dir == Dir::Up { "up" } else { "down" })
        .int("streams", streams as u64)
        .float("seconds", c.seconds, 1)
        .float("warmup", c.warmup, 1)
        .float("elapsed", w.elapsed, 3)
        .int("bytes", bytes)
        .int("bytes_total", run.total())
        .float("gbit_per_sec", gbit, 3)
        .float(
            "mib_per_sec",
            bytes as f64 / w.elapsed.max(1e-9) / 1048576.0,
            1,
        );
    let j = with_errors(j, &run);
    // Each stream is one operation here: a stream that failed is an error.
    finish(j.finish(), streams as u64, run.errors_total(), bytes, &run)
}

/// One stream: open the tunnel, then move bytes until the run ends.
fn stream(run: &Run, proxy: &crate::proxy::ProxySpec, ep: &Endpoint, dir: Dir) {
    let t = match client::connect(proxy, ep, SETUP_TIMEOUT) {
        Ok(t) => t,
        Err(e) => return run.error(format!("tunnel: {e}")),
    };
    let mut s = t.stream;
    if s.set_read_timeout(Some(IO_TICK)).is_err() || s.set_write_timeout(Some(IO_TICK)).is_err() {
        return run.error("setsockopt failed");
    }
    if !t.leftover.is_empty() {
        run.complete(t.leftover.len() as u64);
    }
    let mut buf: Vec<u8> = (0..BLOCK).map(|i| (i % 253) as u8).collect();
    while run.running() {
        let r = match dir {
            Dir::Up => s.write(&buf),
            Dir::Down => s.read(&mut buf),
        };
        match r {
            Ok(0) => {
                if run.running() {
                    run.error("tunnel closed by peer");
                }
                return;
            }
            Ok(n) => {
                run.complete(n as u64);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                if run.running() {
                    run.error(format!("stream i/o: {e}"));
                }
                return;
            }
        }
    }
}
