//! `target`: run the built-in targets as a standalone process on fixed (or free) ports.
//!
//! Benchmarks of plain TCP forwarders (haproxy `mode tcp`) need a target at an address
//! known before the load starts, and comparisons are fairer when every proxy talks to the
//! same target process. This subcommand serves the same sink/source/echo/echo-close/HTTP
//! targets and the UDP echo the load modes start in-process, on 127.0.0.1 only, until it
//! is killed or its lifetime (bounded, default one hour) runs out.

use std::io::Write;
use std::time::{Duration, Instant};

use getopts::Options;

use crate::target::{Kind, TcpTarget, UdpEcho};

/// Help for the subcommand.
pub(crate) const USAGE: &str = "\
Usage: socksgate-load target [--sink PORT] [--source PORT] [--echo PORT]
                             [--echo-close PORT] [--close-after N] [--http PORT]
                             [--udp PORT] [--lifetime S]

Serves the built-in targets on 127.0.0.1 (port 0 picks a free one) until killed or
until --lifetime seconds (default 3600) have passed. Prints one line per target on
stdout, `target KIND 127.0.0.1:PORT`, then `target ready`.

  --sink PORT         read and discard (throughput up)
  --source PORT       write as fast as the peer reads (throughput down)
  --echo PORT         echo, keep the connection (latency, idle)
  --echo-close PORT   echo, close after --close-after bytes (default 32, as connrate)
  --http PORT         keep-alive HTTP/1.1 origin with a 64-byte body (http mode)
  --udp PORT          UDP echo (udp mode)
";

/// Run the subcommand with its arguments (after `target`); returns the exit code.
pub(crate) fn run(args: &[String]) -> i32 {
    let mut o = Options::new();
    for name in ["sink", "source", "echo", "echo-close", "http", "udp"] {
        o.optopt("", name, "serve this target on PORT", "PORT");
    }
    o.optopt("", "close-after", "echo-close closes after N bytes", "N");
    o.optopt("", "lifetime", "exit after S seconds", "S");
    o.optflag("h", "help", "show help");
    let m = match o.parse(args) {
        Ok(m) => m,
        Err(e) => return usage_error(&e.to_string()),
    };
    if m.opt_present("help") {
        print!("{USAGE}");
        return 0;
    }
    if !m.free.is_empty() {
        return usage_error(&format!("unexpected arguments {:?}", m.free));
    }
    let close_after: usize = match m.opt_str("close-after").map(|s| s.parse()) {
        None => 32,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => return usage_error("--close-after must be a positive integer"),
    };
    let lifetime: f64 = match m.opt_str("lifetime").map(|s| s.parse::<f64>()) {
        None => 3600.0,
        Some(Ok(s)) if s > 0.0 && s <= 86_400.0 => s,
        Some(_) => return usage_error("--lifetime must be between 0 and 86400 seconds"),
    };
    let kinds = [
        ("sink", Kind::Sink),
        ("source", Kind::Source),
        ("echo", Kind::Echo),
        ("echo-close", Kind::EchoClose(close_after)),
        ("http", Kind::Http),
    ];
    let mut tcp = Vec::new();
    let mut lines = Vec::new();
    for (name, kind) in kinds {
        let Some(p) = m.opt_str(name) else { continue };
        let Ok(port) = p.parse::<u16>() else {
            return usage_error(&format!("--{name}: bad port {p:?}"));
        };
        match TcpTarget::start_on(kind, port) {
            Ok(t) => {
                lines.push(format!("target {name} {}", t.addr()));
                tcp.push(t);
            }
            Err(e) => return crate::fatal(&format!("{name} target on port {port}: {e}")),
        }
    }
    let mut udp = None;
    if let Some(p) = m.opt_str("udp") {
        let Ok(port) = p.parse::<u16>() else {
            return usage_error(&format!("--udp: bad port {p:?}"));
        };
        match UdpEcho::start_on(port) {
            Ok(u) => {
                lines.push(format!("target udp {}", u.addr()));
                udp = Some(u);
            }
            Err(e) => return crate::fatal(&format!("udp target on port {port}: {e}")),
        }
    }
    if lines.is_empty() {
        return usage_error("name at least one target");
    }
    {
        let mut out = std::io::stdout().lock();
        for l in &lines {
            let _ = writeln!(out, "{l}");
        }
        let _ = writeln!(out, "target ready");
        let _ = out.flush();
    }
    let end = Instant::now() + Duration::from_secs_f64(lifetime);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(udp);
    drop(tcp);
    0
}

/// Print a usage error; exit code 2.
fn usage_error(msg: &str) -> i32 {
    eprintln!("socksgate-load target: {msg}\nTry 'socksgate-load target --help'.");
    2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn rejects_bad_usage() {
        for bad in [
            "",
            "--sink",
            "--sink 70000",
            "--echo x",
            "--udp 0 extra",
            "--echo 0 --close-after 0",
            "--echo 0 --lifetime -1",
        ] {
            assert_eq!(run(&args(bad)), 2, "{bad:?} should be a usage error");
        }
        assert_eq!(run(&args("--help")), 0);
    }

    #[test]
    fn serves_for_its_lifetime_then_exits() {
        let t = Instant::now();
        assert_eq!(run(&args("--echo 0 --udp 0 --lifetime 0.3")), 0);
        assert!(t.elapsed() >= Duration::from_millis(300));
    }
}
