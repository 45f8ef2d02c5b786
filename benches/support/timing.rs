//! The micro-benchmarks' one timing loop (benches/parse.rs, benches/rules.rs): calibrate, then best of batches.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// Length of one timed batch after calibration.
const BATCH: Duration = Duration::from_millis(20);
/// Batches per case; the fastest is reported.
const BATCHES: usize = 5;

/// Best-of-batches nanoseconds per call of `f`: the iteration count doubles until one batch takes about `BATCH`,
/// then the fastest of `BATCHES` batches wins (the least disturbed by other work on a shared machine).
pub(crate) fn ns_per_call<R>(mut f: impl FnMut() -> R) -> f64 {
    let mut iters: u64 = 1;
    loop {
        let t = Instant::now();
        for _ in 0..iters {
            black_box(f());
        }
        let el = t.elapsed();
        if el >= BATCH / 4 || iters >= 1 << 30 {
            let scale = BATCH.as_secs_f64() / el.as_secs_f64().max(1e-9);
            iters = ((iters as f64) * scale).clamp(1.0, (1u64 << 32) as f64) as u64;
            break;
        }
        iters *= 2;
    }
    let mut best = f64::INFINITY;
    for _ in 0..BATCHES {
        let t = Instant::now();
        for _ in 0..iters {
            black_box(f());
        }
        best = best.min(t.elapsed().as_nanos() as f64 / iters as f64);
    }
    best
}
