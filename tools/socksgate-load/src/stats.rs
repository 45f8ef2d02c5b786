//! Measurement: latency histogram, shared run counters, the warmup/measure clock with
//! progress lines, and a hand-written one-line JSON object.

use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Sub-buckets per power of two are 2^SUB_BITS: 32 keeps the error under ~3%.
const SUB_BITS: u32 = 5;
/// Values below this are counted exactly, one bucket each.
const LINEAR: u64 = 2 << SUB_BITS;
/// Half of the sub-buckets: the mantissa of a value above LINEAR lies in [HALF, 2*HALF).
const HALF: u64 = 1 << SUB_BITS;
/// Enough buckets for any u64.
const BUCKETS: usize = LINEAR as usize + (63 - SUB_BITS as usize) * HALF as usize;

/// Log-linear histogram of u64 samples (nanoseconds here): fixed memory, mergeable,
/// percentiles within ~3%, so workers never keep a Vec of every sample.
#[derive(Clone, Debug)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    min: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            min: u64::MAX,
            max: 0,
            sum: 0,
        }
    }
}

impl Histogram {
    /// Empty histogram.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Bucket index of a value.
    fn index(v: u64) -> usize {
        if v < LINEAR {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        let mantissa = v >> shift;
        (LINEAR + (u64::from(shift) - 1) * HALF + (mantissa - HALF)) as usize
    }

    /// Inclusive value range covered by bucket `i`.
    fn bounds(i: usize) -> (u64, u64) {
        let i = i as u64;
        if i < LINEAR {
            return (i, i);
        }
        let j = i - LINEAR;
        let shift = j / HALF + 1;
        let low = (j % HALF + HALF) << shift;
        (low, low + ((1u64 << shift) - 1))
    }

    /// Add one sample.
    pub(crate) fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += u128::from(v);
    }

    /// Add one duration sample in nanoseconds.
    pub(crate) fn record_duration(&mut self, d: Duration) {
        self.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Fold another histogram into this one (workers merge at the end).
    pub(crate) fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.sum += o.sum;
    }

    /// Number of samples (the tests check merges by it).
    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    /// Value at percentile `p` (0..=100): bucket midpoint clamped to the observed range.
    pub(crate) fn percentile(&self, p: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((p / 100.0 * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = Self::bounds(i);
                let mid = lo + (hi - lo) / 2;
                return Some(mid.clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// Mean sample value.
    pub(crate) fn mean(&self) -> Option<f64> {
        (self.total > 0).then(|| self.sum as f64 / self.total as f64)
    }

    /// Largest sample.
    pub(crate) fn max(&self) -> Option<u64> {
        (self.total > 0).then_some(self.max)
    }
}

/// Most distinct error messages kept for the final report.
const MAX_ERROR_SAMPLES: usize = 8;

/// State shared by the driver thread and the workers of one run.
#[derive(Debug, Default)]
pub(crate) struct Run {
    stop: AtomicBool,
    recording: AtomicBool,
    total: AtomicU64,
    measured: AtomicU64,
    errors_total: AtomicU64,
    errors_measured: AtomicU64,
    max_measured: u64,
    samples: Mutex<Vec<(String, u64)>>,
    hist: Mutex<Histogram>,
}

impl Run {
    /// New run; `max_measured` > 0 ends it once that many units were measured.
    pub(crate) fn new(max_measured: u64) -> Self {
        Run {
            max_measured,
            hist: Mutex::new(Histogram::new()),
            ..Default::default()
        }
    }

    /// Whether workers should keep going.
    pub(crate) fn running(&self) -> bool {
        !self.stop.load(Relaxed)
    }

    /// Whether the measured window is open right now.
    pub(crate) fn recording(&self) -> bool {
        self.recording.load(Relaxed)
    }

    /// Ask every worker to finish.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    /// Count `amount` completed units; true if they fall in the measured window (so the
    /// caller should record their latency).
    pub(crate) fn complete(&self, amount: u64) -> bool {
        self.total.fetch_add(amount, Relaxed);
        if !self.recording.load(Relaxed) {
            return false;
        }
        let m = self.measured.fetch_add(amount, Relaxed) + amount;
        if self.max_measured > 0 && m >= self.max_measured {
            self.stop();
        }
        true
    }

    /// Records one operation that started at `started`: its latency into `hist` when it completed inside the
    /// measured window, its error otherwise (after a 1 ms pause, so a failing proxy is not spun on; errors after
    /// the stop are the stop's, not the proxy's, and are not counted).
    pub(crate) fn record(
        &self,
        hist: &mut Histogram,
        started: Instant,
        outcome: Result<(), String>,
    ) {
        match outcome {
            Ok(()) => {
                if self.complete(1) {
                    hist.record_duration(started.elapsed());
                }
            }
            Err(e) => {
                if self.running() {
                    self.error(e);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Count an error and keep its message if it is one of the first distinct ones.
    pub(crate) fn error(&self, msg: impl Display) {
        self.errors_total.fetch_add(1, Relaxed);
        if self.recording.load(Relaxed) {
            self.errors_measured.fetch_add(1, Relaxed);
        }
        let msg = msg.to_string();
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = s.iter_mut().find(|(m, _)| *m == msg) {
            e.1 += 1;
        } else if s.len() < MAX_ERROR_SAMPLES {
            s.push((msg, 1));
        }
    }

    /// Merge a worker's histogram.
    pub(crate) fn merge(&self, h: &Histogram) {
        self.hist.lock().unwrap_or_else(|e| e.into_inner()).merge(h);
    }

    /// The merged histogram.
    pub(crate) fn histogram(&self) -> Histogram {
        self.hist.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Units completed in the measured window.
    pub(crate) fn measured(&self) -> u64 {
        self.measured.load(Relaxed)
    }

    /// Units completed including warmup.
    pub(crate) fn total(&self) -> u64 {
        self.total.load(Relaxed)
    }

    /// Errors in the measured window.
    pub(crate) fn errors_measured(&self) -> u64 {
        self.errors_measured.load(Relaxed)
    }

    /// Errors including warmup.
    pub(crate) fn errors_total(&self) -> u64 {
        self.errors_total.load(Relaxed)
    }

    /// The distinct error messages seen, with counts.
    pub(crate) fn error_samples(&self) -> Vec<(String, u64)> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Timing of the whole run, as the driver observed it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    /// Length of the measured window in seconds.
    pub(crate) elapsed: f64,
}

/// Process whose CPU time is measured over the measured window (`--cpu-pid`).
static CPU_PID: OnceLock<u32> = OnceLock::new();
/// CPU seconds that process used in the measured window, set when `drive` returns.
static CPU_USED: Mutex<Option<f64>> = Mutex::new(None);

/// Measure the CPU time (user + system, all threads) of `pid` over the measured window.
pub(crate) fn set_cpu_pid(pid: u32) {
    let _ = CPU_PID.set(pid);
}

/// CPU time of `pid` and of every process below it, in clock ticks: utime + stime of each,
/// plus cutime + cstime (children already reaped), so forking servers such as danted are
/// counted whole. Processes that exit without being reaped between two samples are missed.
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (own, reaped) = parse_cpu_ticks(&stat)?;
    let mut total = own + reaped;
    let mut stack = children(pid);
    let mut seen = 0;
    while let Some(c) = stack.pop() {
        // Bounded: a fork bomb under the proxy must not hang the load generator.
        seen += 1;
        if seen > 100_000 {
            break;
        }
        if let Some((o, r)) = std::fs::read_to_string(format!("/proc/{c}/stat"))
            .ok()
            .and_then(|s| parse_cpu_ticks(&s))
        {
            total += o + r;
        }
        stack.extend(children(c));
    }
    Some(total)
}

/// Direct children of `pid`, from /proc/PID/task/*/children.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// (utime + stime, cutime + cstime) of a /proc/PID/stat line; the command name may contain
/// spaces and parentheses, so fields are counted after the last ')'.
pub(crate) fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After the name: state(3) ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    // cmajflt utime(14) stime(15) cutime(16) cstime(17).
    let mut num = |skip: usize| -> Option<u64> { f.nth(skip)?.parse().ok() };
    let utime = num(11)?;
    let stime = num(0)?;
    // cutime/cstime are signed in proc(5); negative values never occur in practice.
    let cutime = num(0).unwrap_or(0);
    let cstime = num(0).unwrap_or(0);
    Some((utime + stime, cutime + cstime))
}

/// Clock ticks per second for /proc times.
fn clk_tck() -> f64 {
    socksgate::sys::clock_ticks_per_second().map_or(100.0, |t| t as f64)
}

/// Append `"cpu_pid"` and `"cpu_seconds"` to a finished JSON line when `--cpu-pid` was
/// given and the window was measured.
pub(crate) fn with_cpu(mut line: String) -> String {
    let (Some(pid), Some(secs)) = (
        CPU_PID.get(),
        *CPU_USED.lock().unwrap_or_else(|e| e.into_inner()),
    ) else {
        return line;
    };
    if line.ends_with('}') && line.len() > 2 {
        line.pop();
        let _ = write!(line, ",\"cpu_pid\":{pid},\"cpu_seconds\":{secs:.3}}}");
    }
    line
}

/// Run the warmup + measure clock on the calling thread, printing a progress line per
/// second; returns when the time is up or a worker stopped the run (then stops it).
///
/// `rate` turns units per second into the progress text, e.g. "1234 ops/s".
pub(crate) fn drive(
    run: &Run,
    warmup: f64,
    seconds: f64,
    quiet: bool,
    rate: &dyn Fn(f64) -> String,
) -> Window {
    let start = Instant::now();
    let measure_at = start + Duration::from_secs_f64(warmup);
    let end_at = measure_at + Duration::from_secs_f64(seconds);
    let mut next_tick = start + Duration::from_secs(1);
    let mut tick_no = 1u64;
    let mut last_total = run.total();
    let mut last_tick = start;
    let mut measure_start = None;
    let mut cpu_start = None;
    let mut now = start;
    loop {
        if measure_start.is_none() && now >= measure_at {
            run.recording.store(true, Relaxed);
            measure_start = Some(now);
            cpu_start = CPU_PID.get().and_then(|&p| cpu_ticks(p));
        }
        if now >= end_at || !run.running() {
            break;
        }
        if now >= next_tick {
            let total = run.total();
            let per_sec = (total - last_total) as f64 / (now - last_tick).as_secs_f64();
            if !quiet {
                // Label by where the interval that just ended started.
                let phase = if last_tick < measure_at {
                    " (warmup)"
                } else {
                    ""
                };
                let errs = run.errors_total();
                let errs = if errs > 0 {
                    format!(", {errs} errors")
                } else {
                    String::new()
                };
                eprintln!("[{tick_no}s] {}{errs}{phase}", rate(per_sec));
            }
            last_total = total;
            last_tick = now;
            tick_no += 1;
            next_tick += Duration::from_secs(1);
        }
        let mut wake = next_tick.min(end_at);
        if measure_start.is_none() {
            wake = wake.min(measure_at);
        }
        // Short naps so an early stop (--ops reached, all workers failed) ends promptly.
        let nap = wake
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(50));
        std::thread::sleep(nap);
        now = Instant::now();
    }
    run.recording.store(false, Relaxed);
    let end = Instant::now();
    if let (Some(t0), Some(t1)) = (cpu_start, CPU_PID.get().and_then(|&p| cpu_ticks(p))) {
        *CPU_USED.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(t1.saturating_sub(t0) as f64 / clk_tck());
    }
    run.stop();
    Window {
        elapsed: measure_start.map_or(0.0, |s| (end - s).as_secs_f64()),
    }
}

/// Builder for a single-line JSON object; values are numbers, strings, bools or null.
#[derive(Debug)]
pub(crate) struct Json {
    buf: String,
}

impl Default for Json {
    fn default() -> Self {
        Json {
            buf: String::from("{"),
        }
    }
}

impl Json {
    /// Empty object.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Write `"key":` with a separating comma when needed.
    fn key(&mut self, k: &str) {
        if self.buf.len() > 1 {
            self.buf.push(',');
        }
        push_json_str(&mut self.buf, k);
        self.buf.push(':');
    }

    /// String value.
    pub(crate) fn str(mut self, k: &str, v: &str) -> Self {
        self.key(k);
        push_json_str(&mut self.buf, v);
        self
    }

    /// Integer value.
    pub(crate) fn int(mut self, k: &str, v: u64) -> Self {
        self.key(k);
        let _ = write!(self.buf, "{v}");
        self
    }

    /// Float with a fixed number of decimals; NaN and infinities become null.
    pub(crate) fn float(mut self, k: &str, v: f64, decimals: usize) -> Self {
        self.key(k);
        if v.is_finite() {
            let _ = write!(self.buf, "{v:.decimals$}");
        } else {
            self.buf.push_str("null");
        }
        self
    }

    /// Optional float (null when absent, e.g. a percentile with no samples).
    pub(crate) fn opt_float(self, k: &str, v: Option<f64>, decimals: usize) -> Self {
        self.float(k, v.unwrap_or(f64::NAN), decimals)
    }

    /// Boolean value.
    pub(crate) fn bool(mut self, k: &str, v: bool) -> Self {
        self.key(k);
        self.buf.push_str(if v { "true" } else { "false" });
        self
    }

    /// Array of strings.
    pub(crate) fn strs(mut self, k: &str, v: &[String]) -> Self {
        self.key(k);
        self.buf.push('[');
        for (i, s) in v.iter().enumerate() {
            if i > 0 {
                self.buf.push(',');
            }
            push_json_str(&mut self.buf, s);
        }
        self.buf.push(']');
        self
    }

    /// Close the object and return the line.
    pub(crate) fn finish(mut self) -> String {
        self.buf.push('}');
        self.buf
    }
}

/// Append `s` as a JSON string literal.
fn push_json_str(buf: &mut String, s: &str) {
    buf.push('"');
    for c in s.chars() {
        match c {
            '"' => buf.push_str("\\\""),
            '\\' => buf.push_str("\\\\"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            '\t' => buf.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(buf, "\\u{:04x}", c as u32);
            }
            c => buf.push(c),
        }
    }
    buf.push('"');
}

/// Nanoseconds to microseconds for reporting.
pub(crate) fn us(ns: Option<u64>) -> Option<f64> {
    ns.map(|n| n as f64 / 1000.0)
}

/// Add the usual error fields and the percentiles requested to a JSON object.
pub(crate) fn with_latency(mut j: Json, h: &Histogram, pcts: &[(&str, f64)]) -> Json {
    for (name, p) in pcts {
        j = j.opt_float(name, us(h.percentile(*p)), 1);
    }
    j.opt_float("mean_us", h.mean().map(|m| m / 1000.0), 1)
        .opt_float("max_us", us(h.max()), 1)
}

/// Error fields: measured count, warmup count and a few distinct messages.
pub(crate) fn with_errors(j: Json, run: &Run) -> Json {
    let samples: Vec<String> = run
        .error_samples()
        .into_iter()
        .take(3)
        .map(|(m, n)| format!("{n}x {m}"))
        .collect();
    j.int("errors", run.errors_measured())
        .int("errors_warmup", run.errors_total() - run.errors_measured())
        .strs("error_samples", &samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_are_contiguous() {
        let mut expect = 0u64;
        for i in 0..BUCKETS {
            let (lo, hi) = Histogram::bounds(i);
            assert_eq!(lo, expect, "bucket {i}");
            assert_eq!(Histogram::index(lo), i);
            assert_eq!(Histogram::index(hi), i);
            if hi == u64::MAX {
                assert_eq!(i, BUCKETS - 1);
                return;
            }
            expect = hi + 1;
        }
        panic!("buckets do not reach u64::MAX");
    }

    #[test]
    fn percentiles_within_error_bound() {
        let mut h = Histogram::new();
        for us in 1..=10_000u64 {
            h.record(us * 1000);
        }
        for (p, want) in [
            (50.0, 5_000_000.0),
            (99.0, 9_900_000.0),
            (99.9, 9_990_000.0),
        ] {
            let got = h.percentile(p).unwrap() as f64;
            assert!((got - want).abs() / want < 0.035, "p{p}: {got} vs {want}");
        }
        assert_eq!(h.percentile(100.0), Some(10_000_000));
        assert_eq!(h.percentile(0.0), Some(1000));
        assert_eq!(h.count(), 10_000);
        assert!((h.mean().unwrap() - 5_000_500.0).abs() < 1.0);
    }

    #[test]
    fn small_values_are_exact_and_merge_works() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for v in 0..50 {
            a.record(v);
        }
        for _ in 0..50 {
            b.record(7);
        }
        a.merge(&b);
        assert_eq!(a.count(), 100);
        assert_eq!(a.percentile(50.0), Some(7));
        assert_eq!(a.percentile(75.0), Some(24));
        assert_eq!(Histogram::new().percentile(50.0), None);
    }

    #[test]
    fn proc_stat_cpu_fields() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 17 5 3 1 20 0 3 0";
        assert_eq!(parse_cpu_ticks(line), Some((22, 4)));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        assert!(cpu_ticks(std::process::id()).is_some());
    }

    #[test]
    fn json_line() {
        let j = Json::new()
            .str("mode", "a\"b\\c\n\u{1}")
            .int("n", 3)
            .float("x", 1.23456, 2)
            .float("nan", f64::NAN, 1)
            .bool("ok", true)
            .strs("e", &["x".into(), "y".into()])
            .finish();
        assert_eq!(
            j,
            r#"{"mode":"a\"b\\c\n\u0001","n":3,"x":1.23,"nan":null,"ok":true,"e":["x","y"]}"#
        );
    }

    #[test]
    fn run_counts_only_measured_window() {
        let r = Run::new(3);
        assert!(!r.complete(1));
        r.recording.store(true, Relaxed);
        assert!(r.complete(1));
        r.error("boom");
        r.error("boom");
        assert!(r.running());
        assert!(r.complete(2));
        assert!(!r.running(), "max reached stops the run");
        assert_eq!((r.total(), r.measured(), r.errors_measured()), (4, 3, 2));
        assert_eq!(r.error_samples(), vec![("boom".to_string(), 2)]);
    }
}
