//! socksgate-load: load generator for socksgate (and any SOCKS5/SOCKS4/HTTP proxy).
//!
//! It speaks the proxy protocols itself (client side), runs its own targets in-process on
//! loopback, and prints one JSON line per run so benchmarks can be scripted and compared.
//! `--proxy direct` runs the same workload without a proxy: the baseline.

#![forbid(unsafe_code)]

mod client;
mod connrate;
mod http;
mod idle;
mod latency;
mod proxy;
mod serve;
mod stats;
mod target;
mod throughput;
mod udp;

use std::fmt::Display;
use std::str::FromStr;

use getopts::{Matches, Options};

use crate::proxy::{parse_proxy, Endpoint, ProxySpec};
use std::sync::Arc;

use crate::stats::{drive, Run, Window};
use crate::target::{Kind, TcpTarget};
use crate::throughput::Dir;

/// Stack of a client thread that holds one connection and small buffers: thousands of them stay cheap.
pub(crate) const THREAD_STACK: usize = 256 * 1024;

/// Settings shared by every mode.
#[derive(Debug)]
pub(crate) struct Common {
    /// Proxy to go through (or direct).
    pub(crate) proxy: ProxySpec,
    /// External target; None means start the built-in one.
    pub(crate) target: Option<Endpoint>,
    /// Length of the measured window.
    pub(crate) seconds: f64,
    /// Time before the measured window (connections warm up, caches fill).
    pub(crate) warmup: f64,
    /// `--json-only`: no progress lines.
    pub(crate) quiet: bool,
    /// RLIMIT_NOFILE soft limit after raising it.
    pub(crate) nofile: u64,
}

impl Common {
    /// Start the built-in TCP target of `kind` unless `--target` was given; keep the
    /// returned guard alive for the whole run.
    pub(crate) fn tcp_target(&self, kind: Kind) -> Result<(Option<TcpTarget>, Endpoint), String> {
        if let Some(t) = &self.target {
            return Ok((None, t.clone()));
        }
        let t = TcpTarget::start(kind).map_err(|e| format!("starting built-in target: {e}"))?;
        let ep = Endpoint::builtin(t.addr());
        if !self.quiet {
            eprintln!("built-in {kind:?} target on {}", ep.addr);
        }
        Ok((Some(t), ep))
    }

    /// Runs `work(i)` on `n` threads named `{name}-{i}` (with `stack` bytes of stack, or the default), drives the
    /// measured window with `rate` as the progress figure, and joins them all; returns the window.
    pub(crate) fn run_threads<F>(
        &self,
        run: &Run,
        n: usize,
        name: &str,
        stack: Option<usize>,
        rate: &dyn Fn(f64) -> String,
        work: F,
    ) -> Window
    where
        F: Fn(usize) + Send + Sync + 'static,
    {
        let work = Arc::new(work);
        let mut handles = Vec::new();
        for i in 0..n {
            let work = Arc::clone(&work);
            let mut builder = std::thread::Builder::new().name(format!("{name}-{i}"));
            if let Some(bytes) = stack {
                builder = builder.stack_size(bytes);
            }
            match builder.spawn(move || work(i)) {
                Ok(h) => handles.push(h),
                Err(e) => run.error(format!("spawn: {e}")),
            }
        }
        let w = drive(run, self.warmup, self.seconds, self.quiet, rate);
        for h in handles {
            let _ = h.join();
        }
        w
    }

    /// Target description for the JSON output.
    pub(crate) fn target_name(&self, ep: &Endpoint) -> String {
        if self.target.is_some() {
            ep.addr.to_string()
        } else {
            format!("builtin:{}", ep.addr)
        }
    }
}

/// Report a fatal runtime error; returns exit code 1.
pub(crate) fn fatal(msg: &dyn Display) -> i32 {
    eprintln!("socksgate-load: {msg}");
    1
}

/// Print the JSON line and decide the exit code from the run's error counters.
pub(crate) fn finish(line: String, attempts: u64, errors: u64, measured: u64, run: &Run) -> i32 {
    let samples: Vec<String> = run
        .error_samples()
        .into_iter()
        .map(|(m, n)| format!("{n}x {m}"))
        .collect();
    finish_plain(line, attempts, errors, measured, &samples)
}

/// Print the JSON line; exit 1 when errors exceed 1% of operations or nothing was measured.
pub(crate) fn finish_plain(
    line: String,
    attempts: u64,
    errors: u64,
    measured: u64,
    samples: &[String],
) -> i32 {
    println!("{}", stats::with_cpu(line));
    if errors > 0 {
        eprintln!("socksgate-load: {errors} errors out of {attempts} operations:");
        for s in samples {
            eprintln!("  {s}");
        }
    }
    if measured == 0 {
        eprintln!("socksgate-load: nothing completed in the measured window");
        return 1;
    }
    if errors.saturating_mul(100) > attempts {
        eprintln!("socksgate-load: errors exceed 1% of operations");
        return 1;
    }
    0
}

/// Raises the soft open-file limit to the hard limit (the shared helper in the library).
fn raise_nofile_limit() -> std::io::Result<u64> {
    socksgate::sys::raise_nofile_limit()
}

/// One benchmark with its mode-specific parameters.
#[derive(Debug, PartialEq)]
enum Mode {
    Throughput {
        streams: usize,
        dir: Dir,
    },
    Connrate {
        concurrency: usize,
        ops: u64,
        /// One blocking thread per concurrent operation instead of the event loops.
        blocking: bool,
    },
    Latency {
        conns: usize,
    },
    Idle {
        conns: usize,
        pid: Option<u32>,
        hold: f64,
    },
    Udp {
        rate: Option<f64>,
    },
    Http {
        concurrency: usize,
    },
}

/// What the command line asks for.
#[derive(Debug)]
enum Action {
    Help,
    Run(Box<Common>, Mode),
}

/// Full help text.
const USAGE: &str = "\
Usage: socksgate-load MODE [options]

Load generator for socksgate. Traffic goes to loopback only. Prints a progress line per
second on stderr and exactly one JSON line on stdout. Exit 0 ok, 1 errors > 1%, 2 usage.

Modes:
  throughput --streams N --dir up|down   bulk data through N tunnels (Gbit/s)
  connrate --concurrency C [--ops MAX]   connect+handshake+32-byte echo+close per op
           [--blocking]                  (C operations in one nonblocking loop per core;
                                         --blocking: one blocking thread per operation)
  latency --conns N                      64-byte ping-pong round trips per tunnel
  idle --conns N [--pid PID] [--hold S]  RSS and fd cost of N idle tunnels in PID
                                         (KiB/tunnel: RSS slope from N/2 to N tunnels)
  udp [--rate R]                         SOCKS5 UDP ASSOCIATE echo, window of 64
  http --concurrency C                   absolute-form GET through an http:// proxy

Common options:
  --proxy URL     socks5://[user:pass@]host:port  (sends the target as an IP)
                  socks5h://...  (sends the target as the name \"localhost\")
                  socks4://[user@]host:port, socks4a://... (domain)
                  http://[user:pass@]host:port  (CONNECT; Basic auth)
                  direct  (no proxy, the baseline; default)
  --target ADDR   external target host:port instead of the built-in one
  --seconds S     measured time (default 10)
  --warmup S      time before measuring (default 1)
  --json-only     no progress output
  --cpu-pid PID   also report the CPU seconds (user+system) that PID and the processes
                  below it used in the measured window, from /proc/PID/stat:
                  \"cpu_pid\", \"cpu_seconds\"

Standalone targets (for proxies that forward to a fixed address, e.g. haproxy):
  socksgate-load target --help

Defaults: --streams 1 --dir up, --concurrency 50, --conns 1 (latency) or 1000 (idle),
--hold 3, --pid this process, --rate unlimited.
";

/// Options each mode accepts besides the common ones.
fn mode_options(mode: &str) -> Option<&'static [&'static str]> {
    Some(match mode {
        "throughput" => &["streams", "dir"],
        "connrate" => &["concurrency", "ops", "blocking"],
        "latency" => &["conns"],
        "idle" => &["conns", "pid", "hold"],
        "udp" => &["rate"],
        "http" => &["concurrency"],
        _ => return None,
    })
}

/// Every option that belongs to some mode.
const MODE_OPTIONS: &[&str] = &[
    "streams",
    "dir",
    "concurrency",
    "ops",
    "blocking",
    "conns",
    "pid",
    "hold",
    "rate",
];

/// Parse an optional numeric option with a default and an inclusive range.
fn num<T>(m: &Matches, name: &str, default: T, lo: T, hi: T) -> Result<T, String>
where
    T: FromStr + PartialOrd + Display + Copy,
{
    let Some(s) = m.opt_str(name) else {
        return Ok(default);
    };
    let v: T = s
        .parse()
        .map_err(|_| format!("--{name}: {s:?} is not a valid number"))?;
    // `!(v >= lo)` also rejects NaN for floats.
    if !(v >= lo && v <= hi) {
        return Err(format!("--{name} must be between {lo} and {hi}"));
    }
    Ok(v)
}

/// Parse the command line (without the program name).
fn parse_args(args: &[String], nofile: u64) -> Result<Action, String> {
    let mut o = Options::new();
    o.optopt("", "proxy", "proxy URL or direct", "URL");
    o.optopt("", "target", "external target host:port", "ADDR");
    o.optopt("", "seconds", "measured seconds", "S");
    o.optopt("", "warmup", "warmup seconds", "S");
    o.optflag("", "json-only", "suppress progress output");
    o.optopt("", "cpu-pid", "measure this process's CPU time", "PID");
    o.optopt("", "streams", "throughput streams", "N");
    o.optopt("", "dir", "throughput direction", "up|down");
    o.optopt("", "concurrency", "parallel workers", "C");
    o.optopt("", "ops", "stop after MAX measured operations", "MAX");
    o.optflag(
        "",
        "blocking",
        "connrate: one blocking thread per operation",
    );
    o.optopt("", "conns", "tunnels", "N");
    o.optopt("", "pid", "process to measure (idle)", "PID");
    o.optopt("", "hold", "idle hold seconds", "S");
    o.optopt("", "rate", "UDP datagrams per second", "R");
    o.optflag("h", "help", "show help");
    let m = o.parse(args).map_err(|e| e.to_string())?;
    if m.opt_present("help") {
        return Ok(Action::Help);
    }
    let mode_name = match m.free.as_slice() {
        [one] => one.as_str(),
        [] => return Err("missing MODE".into()),
        more => return Err(format!("expected one MODE, got {more:?}")),
    };
    let allowed = mode_options(mode_name).ok_or_else(|| format!("unknown mode {mode_name:?}"))?;
    for name in MODE_OPTIONS {
        if m.opt_present(name) && !allowed.contains(name) {
            return Err(format!("--{name} does not apply to {mode_name}"));
        }
    }
    if mode_name == "idle" && (m.opt_present("seconds") || m.opt_present("warmup")) {
        return Err("idle has no --seconds/--warmup; use --hold".into());
    }
    if let Some(p) = m.opt_str("cpu-pid") {
        let pid: u32 = p.parse().map_err(|_| format!("--cpu-pid: bad PID {p:?}"))?;
        if stats::cpu_ticks(pid).is_none() {
            return Err(format!("--cpu-pid {pid}: no such process"));
        }
        stats::set_cpu_pid(pid);
    }
    let proxy = match m.opt_str("proxy") {
        Some(p) => parse_proxy(&p)?,
        None => ProxySpec::direct(),
    };
    let target = m
        .opt_str("target")
        .map(|t| Endpoint::parse(&t))
        .transpose()?;
    let common = Common {
        proxy,
        target,
        seconds: num(&m, "seconds", 10.0, 0.1, 86_400.0)?,
        warmup: num(&m, "warmup", 1.0, 0.0, 3_600.0)?,
        quiet: m.opt_present("json-only"),
        nofile,
    };
    let mode = match mode_name {
        "throughput" => Mode::Throughput {
            streams: num(&m, "streams", 1, 1, 1024)?,
            dir: match m.opt_str("dir").as_deref() {
                None | Some("up") => Dir::Up,
                Some("down") => Dir::Down,
                Some(d) => return Err(format!("--dir must be up or down, not {d:?}")),
            },
        },
        "connrate" => Mode::Connrate {
            concurrency: num(&m, "concurrency", 50, 1, 10_000)?,
            ops: num(&m, "ops", 0, 1, u64::MAX)?,
            blocking: m.opt_present("blocking"),
        },
        "latency" => Mode::Latency {
            conns: num(&m, "conns", 1, 1, 10_000)?,
        },
        "idle" => {
            let pid = m
                .opt_str("pid")
                .map(|p| {
                    p.parse::<u32>()
                        .map_err(|_| format!("--pid: bad PID {p:?}"))
                })
                .transpose()?;
            if let Some(p) = pid {
                if !std::path::Path::new(&format!("/proc/{p}/status")).exists() {
                    return Err(format!("--pid {p}: no such process"));
                }
            }
            Mode::Idle {
                conns: num(&m, "conns", 1000, 1, 1_000_000)?,
                pid,
                hold: num(&m, "hold", 3.0, 0.0, 86_400.0)?,
            }
        }
        "udp" => {
            udp::check_proxy(&common.proxy)?;
            let rate = m
                .opt_present("rate")
                .then(|| num(&m, "rate", 0.0, 1.0, 10_000_000.0))
                .transpose()?;
            Mode::Udp { rate }
        }
        "http" => {
            http::check_proxy(&common.proxy)?;
            Mode::Http {
                concurrency: num(&m, "concurrency", 50, 1, 10_000)?,
            }
        }
        _ => unreachable!("mode_options accepted the name"),
    };
    Ok(Action::Run(Box::new(common), mode))
}

/// Dispatch to the mode; returns the exit code.
fn run(c: &Common, mode: Mode) -> i32 {
    match mode {
        Mode::Throughput { streams, dir } => throughput::run(c, streams, dir),
        Mode::Connrate {
            concurrency,
            ops,
            blocking,
        } => connrate::run(c, concurrency, ops, blocking),
        Mode::Latency { conns } => latency::run(c, conns),
        Mode::Idle { conns, pid, hold } => idle::run(c, conns, pid, hold),
        Mode::Udp { rate } => udp::run(c, rate),
        Mode::Http { concurrency } => http::run(c, concurrency),
    }
}

fn main() {
    let nofile = match raise_nofile_limit() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("socksgate-load: cannot raise RLIMIT_NOFILE: {e}");
            1024
        }
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("target") {
        std::process::exit(serve::run(&args[1..]));
    }
    let code = match parse_args(&args, nofile) {
        Ok(Action::Help) => {
            print!("{USAGE}");
            0
        }
        Ok(Action::Run(c, mode)) => run(&c, mode),
        Err(e) => {
            eprintln!("socksgate-load: {e}\nTry 'socksgate-load --help'.");
            2
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Action, String> {
        let args: Vec<String> = s.split_whitespace().map(String::from).collect();
        parse_args(&args, 1 << 20)
    }

    #[test]
    fn parses_modes() {
        let Ok(Action::Run(c, m)) = parse("throughput --streams 4 --dir down --seconds 2") else {
            panic!("should parse");
        };
        assert_eq!(
            m,
            Mode::Throughput {
                streams: 4,
                dir: Dir::Down
            }
        );
        assert_eq!((c.seconds, c.warmup), (2.0, 1.0));
        assert_eq!(c.proxy, ProxySpec::direct());
        let Ok(Action::Run(_, m)) = parse("connrate --proxy socks5://127.0.0.1:1080 --ops 5")
        else {
            panic!("should parse");
        };
        assert_eq!(
            m,
            Mode::Connrate {
                concurrency: 50,
                ops: 5,
                blocking: false
            }
        );
        let Ok(Action::Run(_, m)) = parse("connrate --blocking --concurrency 7") else {
            panic!("should parse");
        };
        assert_eq!(
            m,
            Mode::Connrate {
                concurrency: 7,
                ops: 0,
                blocking: true
            }
        );
        assert!(parse("latency --blocking").is_err());
        assert!(matches!(parse("--help"), Ok(Action::Help)));
    }

    #[test]
    fn rejects_bad_usage() {
        for bad in [
            "",
            "bogus",
            "throughput --dir sideways",
            "throughput --conns 3",
            "latency --conns 0",
            "connrate --seconds nan",
            "udp --proxy http://127.0.0.1:8080",
            "http --proxy socks5://127.0.0.1:1080",
            "idle --seconds 3",
            "latency --proxy socks5://8.8.8.8:1080",
            "latency --unknown",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
