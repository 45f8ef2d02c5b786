//! Fault tests against the real binary on loopback: misbehaving peers (resets, stalls, vanishing clients,
//! half-closes, pipelining), descriptor exhaustion, session churn, a byte-exact soak, and garbage input.
//!
//! The default `cargo test` runs reduced versions. The full-size versions are `#[ignore]`d; run them with:
//!
//! ```text
//! cargo test --release --test it -- --ignored faults::
//! ```
//!
//! Every test asserts outcomes (bytes, reply codes, gauges, descriptor counts), never timings: waits are
//! `wait_until` polls with generous limits, sockets have generous timeouts, and every loop is bounded in count and
//! in time. Each test starts its own proxy (two workers and `--metrics`, or one worker under `ulimit -n` for the
//! descriptor-exhaustion tests) and its own target servers on port 0.

use crate::common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
/// SO_RCVBUF/SO_SNDBUF of the test's own sockets in backpressure tests, so that only the proxy's sockets can be
/// large (and those are bounded from /proc, see [`stall_limit`]).
const TEST_SOCKET_BUFFER: usize = 64 * KIB;

// ---------------------------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------------------------

/// Starts a proxy with two workers and a metrics endpoint, plus `extra` flags.
fn start_proxy(extra: &[&str]) -> Proxy {
    let mut args = vec!["-t", "2", "--metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

/// The gauges that must return to zero once every session is over.
#[derive(Debug, Default, Clone)]
struct Gauges {
    /// `sessions_active`, summed over all protocols.
    sessions: u64,
    /// `pool_buffers_in_use`.
    pool: u64,
    /// `worker_connections`, one per worker.
    workers: Vec<u64>,
}

impl Gauges {
    fn idle(&self) -> bool {
        self.sessions == 0
            && self.pool == 0
            && !self.workers.is_empty()
            && self.workers.iter().all(|&w| w == 0)
    }
}

fn gauges(p: &Proxy) -> Gauges {
    let text = p.metrics_text();
    let mut g = Gauges::default();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<u64>() else {
            continue;
        };
        if series.starts_with("socksgate_sessions_active{") {
            g.sessions += v;
        } else if series == "socksgate_pool_buffers_in_use" {
            g.pool = v;
        } else if series.starts_with("socksgate_worker_connections{") {
            g.workers.push(v);
        }
    }
    g
}

/// The last `n` lines of the proxy's log, for failure messages.
fn log_tail(p: &Proxy, n: usize) -> String {
    let log = p.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits (up to a minute) until the proxy holds no session, no pool buffer, no slab entry, and exactly `fd_base`
/// descriptors; panics with everything useful for a diagnosis otherwise.
fn assert_settled(p: &Proxy, fd_base: usize, what: &str) {
    let mut last = (Gauges::default(), 0);
    let ok = wait_until(Duration::from_secs(60), &mut || {
        let g = gauges(p);
        let fds = p.fd_count();
        let done = g.idle() && fds == fd_base;
        last = (g, fds);
        done
    });
    assert!(
        ok,
        "{what}: the proxy did not return to idle: {:?}, {} fds (baseline {fd_base})\nfds: {:?}\nlog tail:\n{}",
        last.0,
        last.1,
        fd_targets(p.pid()),
        log_tail(p, 30)
    );
}

/// Runs one warm-up tunnel (so lazily allocated state exists), waits for idle, and returns the descriptor count.
fn baseline(p: &Proxy, echo: SocketAddr) -> usize {
    let mut s = socks5_connect(p.addr(), echo).expect("warm-up CONNECT");
    roundtrip(&mut s, 1, 256 * KIB);
    drop(s);
    let ok = wait_until(Duration::from_secs(60), &mut || gauges(p).idle());
    assert!(ok, "warm-up tunnel never closed: {:?}", gauges(p));
    p.fd_count()
}

/// Sends `n` pseudo-random bytes through an echoing tunnel and checks that exactly they come back.
fn roundtrip(s: &mut TcpStream, seed: u64, n: usize) {
    let data = pseudo_random(seed, n);
    let want = digest(&data);
    let mut w = s.try_clone().expect("clone");
    let writer = thread::spawn(move || w.write_all(&data));
    let got = read_n(s, n);
    writer
        .join()
        .expect("writer thread")
        .expect("write through the tunnel");
    assert_eq!(
        digest(&got),
        want,
        "echoed bytes differ (seed {seed}, {n} bytes)"
    );
}

/// A fresh client is served normally: SOCKS5 CONNECT to the echo target and a 64 KiB round trip.
fn assert_serves(p: &Proxy, echo: SocketAddr) {
    let mut s = socks5_connect(p.addr(), echo)
        .unwrap_or_else(|rep| panic!("fresh client refused: REP {rep:#04x}"));
    roundtrip(&mut s, 99, 64 * KIB);
}

/// How a read loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Orderly EOF.
    Eof,
    /// Reset or another error: the connection is gone.
    Reset,
    /// The socket timeout passed with the connection still open.
    TimedOut,
}

/// Reads until EOF, an error, or the socket timeout; at most `limit` bytes are kept (the rest is counted).
fn read_until_end(s: &mut TcpStream, limit: usize) -> (Vec<u8>, End) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * KIB];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, End::Eof),
            Ok(n) => {
                let keep = n.min(limit.saturating_sub(out.len()));
                out.extend_from_slice(&buf[..keep]);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                return (out, End::TimedOut)
            }
            Err(_) => return (out, End::Reset),
        }
    }
}

/// Writes up to `limit` bytes without blocking for as long as the peer takes them. Returns the total and `true` once
/// no byte was accepted for 200 consecutive polls 10 ms apart (the writes block: backpressure), or `false` when
/// `limit` went through or two minutes passed (no backpressure).
fn write_until_stalled(s: &mut TcpStream, limit: usize) -> (usize, bool) {
    match try_write_until_stalled(s, limit) {
        (total, Ok(stalled)) => (total, stalled),
        (total, Err(e)) => panic!("write failed after {total} bytes: {e}"),
    }
}

/// [`write_until_stalled`], returning a write error instead of panicking on it.
fn try_write_until_stalled(s: &mut TcpStream, limit: usize) -> (usize, std::io::Result<bool>) {
    s.set_nonblocking(true).expect("nonblocking");
    let chunk = vec![0xA5u8; 256 * KIB];
    let start = Instant::now();
    let (mut total, mut idle) = (0usize, 0u32);
    while total < limit && idle < 200 && start.elapsed() < Duration::from_secs(120) {
        let n = (limit - total).min(chunk.len());
        match s.write(&chunk[..n]) {
            Ok(0) => break,
            Ok(k) => {
                total += k;
                idle = 0;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                idle += 1;
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (total, Err(e)),
        }
    }
    s.set_nonblocking(false).expect("blocking");
    (total, Ok(idle >= 200))
}

/// A SOCKS5 CONNECT from a client socket with small kernel buffers (see [`TEST_SOCKET_BUFFER`]).
fn socks5_connect_small(proxy: SocketAddr, target: SocketAddr) -> TcpStream {
    socks5_connect_on(connect_buffered(proxy, TEST_SOCKET_BUFFER), target).expect("CONNECT")
}

/// A client socket with the usual generous timeouts, as a `Result` (for worker threads that report, not panic).
fn try_connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(s)
}

/// SOCKS5 no-auth CONNECT to an IPv4 target, either step by step or with greeting and request in one write.
fn try_socks5(proxy: SocketAddr, target: SocketAddr, pipelined: bool) -> Result<TcpStream, String> {
    let mut s = try_connect(proxy)?;
    let mut head = [0u8; 12];
    if pipelined {
        let mut msg = vec![5, 1, 0];
        msg.extend_from_slice(&socks5_request(1, target));
        s.write_all(&msg)
            .map_err(|e| format!("write greeting+request: {e}"))?;
        s.read_exact(&mut head)
            .map_err(|e| format!("read replies: {e}"))?;
    } else {
        s.write_all(&[5, 1, 0])
            .map_err(|e| format!("write greeting: {e}"))?;
        s.read_exact(&mut head[..2])
            .map_err(|e| format!("read method: {e}"))?;
        s.write_all(&socks5_request(1, target))
            .map_err(|e| format!("write request: {e}"))?;
        s.read_exact(&mut head[2..])
            .map_err(|e| format!("read reply: {e}"))?;
    }
    if head[..2] != [5, 0] || head[2] != 5 || head[3] != 0 || head[5] != 1 {
        return Err(format!("unexpected replies {head:02x?}"));
    }
    Ok(s)
}

/// The generator of `common::pseudo_random`, as a stream, so big payloads are produced chunk by chunk.
struct Xorshift(u64);

impl Xorshift {
    fn new(seed: u64) -> Xorshift {
        Xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = (self.0 >> 24) as u8;
        }
    }

    fn below(&mut self, n: u64) -> u64 {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        u64::from_le_bytes(b) % n.max(1)
    }
}

/// `common::digest` (FNV-1a 64), as a stream.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[test]
fn stream_helpers_match_common() {
    let mut g = Xorshift::new(42);
    let mut a = vec![0u8; 1000];
    g.fill(&mut a[..300]);
    g.fill(&mut a[300..]);
    assert_eq!(a, pseudo_random(42, 1000));
    let mut f = Fnv::new();
    f.update(&a[..10]);
    f.update(&a[10..]);
    assert_eq!(f.0, digest(&a));
}

/// A target that accepts and holds every connection (never reading, never writing) until dropped.
struct Holder {
    server: TestServer,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl Holder {
    fn start() -> Holder {
        let held = Arc::new(Mutex::new(Vec::new()));
        let h = Arc::clone(&held);
        let server =
            TestServer::start_buffered(TEST_SOCKET_BUFFER, move |s| h.lock().unwrap().push(s));
        Holder { server, held }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Closes every held connection (with a reset when unread bytes are queued, as the kernel does).
    fn close_all(&self) {
        self.held.lock().unwrap().clear();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Misbehaving peers
// ---------------------------------------------------------------------------------------------------------------

/// A target that resets (SO_LINGER 0 close) in the middle of a transfer: in each case the client's tunnel closes
/// (it never hangs), what arrived is an exact prefix of what the target sent, the proxy keeps serving, and its
/// descriptors return to the baseline.
#[test]
fn target_reset_mid_transfer_closes_tunnel() {
    let p = start_proxy(&[]);
    let echo = TestServer::echo();
    let fd_base = baseline(&p, echo.addr);

    // (a) The target sends 512 KiB to a reading client, then resets.
    let sent = pseudo_random(11, 512 * KIB);
    let payload = sent.clone();
    let resetter = TestServer::start(move |mut s| {
        let _ = s.write_all(&payload);
        abort_close(s);
    });
    let mut c = socks5_connect(p.addr(), resetter.addr).expect("CONNECT to the resetting target");
    let (got, end) = read_until_end(&mut c, usize::MAX);
    eprintln!(
        "(a) the client read {} of {} bytes, then {end:?}",
        got.len(),
        sent.len()
    );
    assert_ne!(
        end,
        End::TimedOut,
        "(a) tunnel still open {IO_TIMEOUT:?} after the target reset"
    );
    assert!(
        got.len() <= sent.len() && got[..] == sent[..got.len()],
        "(a) received bytes are not a prefix of the sent ones"
    );
    drop(c);

    // (b) The target reads 64 KiB of an upload, then resets while the client keeps writing: the client's writes
    // must fail with a reset or broken pipe (not block until the timeout), and its reads see the close.
    let reader = TestServer::start(|mut s| {
        let mut buf = vec![0u8; 64 * KIB];
        let _ = s.read_exact(&mut buf);
        abort_close(s);
    });
    let mut c = socks5_connect(p.addr(), reader.addr).expect("CONNECT to the reading target");
    let mut r = c.try_clone().unwrap();
    let read_side = thread::spawn(move || read_until_end(&mut r, 0).1);
    let chunk = pseudo_random(12, 64 * KIB);
    let mut written = 0usize;
    let write_err = loop {
        if written >= 1024 * MIB {
            break None;
        }
        match c.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Some(e),
        }
    };
    let write_err = write_err
        .unwrap_or_else(|| panic!("(b) wrote {written} bytes into a tunnel whose target reset"));
    assert!(
        !matches!(write_err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "(b) client writes blocked ({write_err}) after {written} bytes instead of failing: the tunnel was not closed"
    );
    assert_ne!(
        read_side.join().unwrap(),
        End::TimedOut,
        "(b) client reads never saw the tunnel close"
    );
    drop(c);

    // (c) The target fills the path to a client that is not reading yet, then resets; the proxy has bytes parked
    // for the client when the reset comes. Once the client reads, it gets a prefix and then the close.
    let (tx, rx) = mpsc::channel();
    let limit = stall_limit(2);
    let flood = TestServer::start_buffered(TEST_SOCKET_BUFFER, move |mut s| {
        let sent = write_until_stalled(&mut s, limit);
        abort_close(s);
        let _ = tx.send(sent);
    });
    let mut c = socks5_connect_small(p.addr(), flood.addr);
    let (flooded, stalled) = rx
        .recv_timeout(Duration::from_secs(180))
        .expect("flooding target finished");
    eprintln!("(c) the target wrote {flooded} bytes before resetting");
    assert!(
        stalled,
        "(c) {flooded} bytes went into a tunnel whose client is not reading: no backpressure"
    );
    let (got, end) = read_until_end(&mut c, usize::MAX);
    eprintln!("(c) the client read {} bytes, then {end:?}", got.len());
    assert_ne!(
        end,
        End::TimedOut,
        "(c) tunnel still open {IO_TIMEOUT:?} after the target reset"
    );
    assert!(
        got.len() <= flooded && got.iter().all(|&b| b == 0xA5),
        "(c) the client got {} bytes that are not a prefix of the target's {flooded}",
        got.len()
    );
    drop(c);

    assert_serves(&p, echo.addr);
    assert_settled(&p, fd_base, "after target resets");
}

/// Backpressure both ways, through a SOCKS5 tunnel and through HTTP forwarding: a target that accepts and never
/// reads while the client writes up to 64 MiB, and a target that writes up to 64 MiB to a client that never reads.
/// The writers must block long before 64 MiB, the proxy's resident memory must stay within 8 MiB of its baseline
/// (the kernel buffers, not the proxy, hold the backlog), and closing everything returns the descriptors to the
/// baseline.
#[test]
fn stalled_peers_backpressure_bounds_memory() {
    let limit = stall_limit(2);
    let p = start_proxy(&[]);
    let echo = TestServer::echo();
    let fd_base = baseline(&p, echo.addr);
    // One more big tunnel so allocator and pool steady states are part of the baseline.
    let mut warm = socks5_connect(p.addr(), echo.addr).unwrap();
    roundtrip(&mut warm, 2, 4 * MIB);
    drop(warm);
    assert_settled(&p, fd_base, "after warm-up");
    let rss0 = rss_kib(p.pid());

    // Targets: one that never reads, one that floods (after reading an HTTP head when it gets one).
    let sink = Holder::start();
    let (tx, rx) = mpsc::channel();
    let held = Arc::new(Mutex::new(Vec::new()));
    let held2 = Arc::clone(&held);
    let flood = TestServer::start_buffered(TEST_SOCKET_BUFFER, move |mut s| {
        let mut first = [0u8; 1];
        if s.peek(&mut first).is_ok() && first[0] == b'G' {
            read_http_head(&mut s);
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {limit}\r\n\r\n");
            s.write_all(head.as_bytes()).unwrap();
        }
        let n = write_until_stalled(&mut s, limit);
        held2.lock().unwrap().push(s);
        let _ = tx.send(n);
    });
    let mut clients = Vec::new();
    let mut report = Vec::new();

    // SOCKS5: client -> target that never reads.
    let mut c = socks5_connect_small(p.addr(), sink.addr());
    let (n, stalled) = write_until_stalled(&mut c, limit);
    assert!(
        stalled,
        "SOCKS5: the client wrote {n} bytes to a target that never reads without blocking"
    );
    report.push(format!("socks5 up {n}"));
    clients.push(c);

    // SOCKS5: target -> client that never reads (the flooding target speaks first).
    let mut c = socks5_connect_small(p.addr(), flood.addr);
    c.write_all(b"x").unwrap();
    let (n, stalled) = rx
        .recv_timeout(Duration::from_secs(180))
        .expect("flooding target finished");
    assert!(
        stalled,
        "SOCKS5: the target wrote {n} bytes to a client that never reads without blocking"
    );
    report.push(format!("socks5 down {n}"));
    clients.push(c);

    // HTTP forwarding: a request body to an origin that never reads.
    let mut c = connect_buffered(p.addr(), TEST_SOCKET_BUFFER);
    let port = sink.addr().port();
    let head = format!(
        "POST http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {limit}\r\n\r\n"
    );
    c.write_all(head.as_bytes()).unwrap();
    let (n, stalled) = write_until_stalled(&mut c, limit);
    assert!(
        stalled,
        "HTTP: the client uploaded {n} bytes to an origin that never reads without blocking"
    );
    report.push(format!("http up {n}"));
    clients.push(c);

    // HTTP forwarding: a response body to a client that never reads.
    let mut c = connect_buffered(p.addr(), TEST_SOCKET_BUFFER);
    let port = flood.addr.port();
    let head = format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    c.write_all(head.as_bytes()).unwrap();
    let (n, stalled) = rx
        .recv_timeout(Duration::from_secs(180))
        .expect("flooding origin finished");
    assert!(
        stalled,
        "HTTP: the origin sent {n} bytes to a client that never reads without blocking"
    );
    report.push(format!("http down {n}"));
    clients.push(c);

    let rss1 = rss_kib(p.pid());
    let g = gauges(&p);
    eprintln!(
        "stalled tunnels ({}): proxy RSS {rss0} -> {rss1} KiB; {g:?}",
        report.join(", ")
    );
    assert!(
        rss1 < rss0 + 8 * 1024,
        "proxy RSS grew from {rss0} KiB to {rss1} KiB with four stalled sessions ({})",
        report.join(", ")
    );
    assert_eq!(g.sessions, 4, "{g:?}");
    assert!(
        g.pool <= 8,
        "a stalled session holds at most two pool buffers: {g:?}"
    );

    clients.clear();
    sink.close_all();
    held.lock().unwrap().clear();
    assert_serves(&p, echo.addr);
    assert_settled(&p, fd_base, "after closing the stalled sessions");
}

/// A client that resets in the middle of a two-way transfer: the tunnel closes and everything is freed. A client
/// that resets while the target is stalled (never reading) cannot be noticed by the relay until the parked bytes
/// move; the idle timeout (3 s here) must still release the tunnel, its socket to the target and its buffer.
#[test]
fn client_reset_mid_transfer_frees_tunnel() {
    // (a) runs on a proxy with the default idle timeout: while the kernel still trickles the client's bytes into the
    // proxy's full receive queue, the proxy itself moves nothing, and a 3 s idle timeout could close the tunnel
    // before the client's writes have blocked for the 2 s that count as a stall.
    let p = start_proxy(&[]);
    let echo = TestServer::start_buffered(TEST_SOCKET_BUFFER, echo_handler);
    let fd_base = baseline(&p, echo.addr);

    // (a) Reset in the middle of an echo, with bytes parked both ways (the client stops reading and writes until
    // its writes block, so the echo backs up): the proxy's writes to the client fail, the tunnel closes. The echo
    // crosses four proxy legs, each of which may autotune up to the sysctl maximum.
    let mut c = socks5_connect_small(p.addr(), echo.addr);
    roundtrip(&mut c, 80, 256 * KIB);
    let (pushed, stalled) = write_until_stalled(&mut c, stall_limit(4));
    eprintln!("(a) {pushed} bytes went into the echo before the client's writes blocked");
    assert!(stalled, "no backpressure through the echo ({pushed} bytes)");
    abort_close(c);
    assert_settled(&p, fd_base, "after a client reset mid-echo");
    assert_serves(&p, echo.addr);
    drop(p);

    // (b) Reset while the target never reads: released by the idle timeout at the latest. If the proxy's idle
    // timeout closes the stalled tunnel before the client has seen its writes block for 2 s, the client's write
    // fails with a reset: the proxy had moved nothing for 3 s, which is the backpressure being checked.
    let p = start_proxy(&["--idle-timeout", "3s"]);
    let fd_base = baseline(&p, echo.addr);
    let sink = Holder::start();
    let mut c = socks5_connect_small(p.addr(), sink.addr());
    match try_write_until_stalled(&mut c, stall_limit(2)) {
        (n, Ok(stalled)) => assert!(stalled, "no backpressure towards the sink ({n} bytes)"),
        (n, Err(e)) => {
            assert!(
                matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
                "write towards the sink failed after {n} bytes: {e}"
            );
            eprintln!("(b) the idle timeout closed the stalled tunnel first ({n} bytes, {e})");
        }
    }
    abort_close(c);
    assert_settled(&p, fd_base, "after a client reset towards a stalled target");
    assert_eq!(
        sink.held.lock().unwrap().len(),
        1,
        "the target saw one connection"
    );
    sink.close_all();
    assert_serves(&p, echo.addr);
    assert_settled(&p, fd_base, "at the end");
}

/// Bytes a stalled SOCKS5 tunnel absorbs before the writer blocks: `upload` = client writes to a target that never
/// reads; otherwise the target writes to a client that never reads. The test's own sockets are small either way.
fn absorbed(p: &Proxy, upload: bool) -> usize {
    let limit = stall_limit(2);
    let (n, stalled) = if upload {
        let sink = Holder::start();
        let mut c = socks5_connect_small(p.addr(), sink.addr());
        let r = write_until_stalled(&mut c, limit);
        sink.close_all();
        r
    } else {
        let (tx, rx) = mpsc::channel();
        let flood = TestServer::start_buffered(TEST_SOCKET_BUFFER, move |mut s| {
            let _ = tx.send(write_until_stalled(&mut s, limit));
        });
        let mut c = socks5_connect_small(p.addr(), flood.addr);
        c.write_all(b"x").unwrap();
        rx.recv_timeout(Duration::from_secs(180))
            .expect("flooding target finished")
    };
    let way = if upload { "upload" } else { "download" };
    assert!(
        stalled,
        "{way}: {n} bytes went in without the writes blocking"
    );
    n
}

/// `--socket-buffer 64KiB`: a tunnel whose far end never reads holds at most about twice the cap per socket on the
/// path (the kernel doubles SO_RCVBUF/SO_SNDBUF for its bookkeeping), plus the relay's splice pipe and buffer: four
/// sockets (the test's own sending one and receiving one, set to the same 64 KiB, and the proxy's two legs), each
/// allowed 2 x 64 KiB plus one 64 KiB loopback segment of overshoot, plus a 256 KiB pipe (src/sys.rs) and the
/// 16 KiB relay buffer: 1040 KiB. Without the flag the proxy's sockets autotune (up to tcp_rmem/tcp_wmem's maximum)
/// and only "the writes block" is asserted; both figures are printed.
#[test]
fn socket_buffer_caps_what_a_stalled_tunnel_absorbs() {
    const CAP: usize = 64 * KIB;
    const PIPE: usize = 256 * KIB;
    const RELAY_BUFFER: usize = 16 * KIB;
    const SEGMENT: usize = 64 * KIB;
    let bound = 4 * (2 * CAP + SEGMENT) + PIPE + RELAY_BUFFER;
    let capped = start_proxy(&["--socket-buffer", "64KiB"]);
    let free = start_proxy(&[]);
    for upload in [true, false] {
        let way = if upload { "upload" } else { "download" };
        let with_cap = absorbed(&capped, upload);
        let autotuned = absorbed(&free, upload);
        eprintln!(
            "{way}: a stalled tunnel absorbed {with_cap} bytes with --socket-buffer 64KiB (bound {bound}), \
             {autotuned} bytes with kernel autotuning (tcp_rmem/tcp_wmem maxima {:?})",
            tcp_autotune_max()
        );
        assert!(
            with_cap <= bound,
            "{way}: {with_cap} bytes went into a stalled tunnel with --socket-buffer 64KiB (bound {bound})"
        );
    }
}

/// A listener whose accept queue is full, so connects to it hang in SYN_SENT until their timeout.
fn blackhole() -> (TcpListener, Vec<TcpStream>) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    sock.listen(0).unwrap();
    let l: TcpListener = sock.into();
    let addr = l.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => fillers.push(s),
            Err(e) => {
                assert_eq!(
                    e.kind(),
                    ErrorKind::TimedOut,
                    "connect to the full listener: {e}"
                );
                return (l, fillers);
            }
        }
    }
    panic!("the listener's accept queue never filled up");
}

/// Clients that vanish mid-handshake, with a FIN or a reset, in every handshake phase of every protocol, while the
/// outbound connect is still in flight, before reading the CONNECT reply, and with a UDP association or a BIND
/// open: the proxy frees each slab entry, session, buffer and socket, and its descriptors return to the baseline.
#[test]
fn client_vanishing_mid_handshake_frees_everything() {
    let (hole, _fillers) = blackhole();
    let hole_addr = hole.local_addr().unwrap();
    let p = start_proxy(&[
        "--user",
        "alice:secret",
        "--socks4-with-users",
        "--connect-timeout",
        "2s",
    ]);
    let echo = TestServer::echo();
    let udp_echo = UdpEcho::start();
    // The warm-up needs authentication here.
    let auth = |s: &mut TcpStream| {
        s.write_all(&[5, 1, 2]).unwrap();
        assert_eq!(read_n(s, 2), vec![5, 2]);
        let mut m = vec![1, 5];
        m.extend_from_slice(b"alice");
        m.push(6);
        m.extend_from_slice(b"secret");
        s.write_all(&m).unwrap();
        assert_eq!(read_n(s, 2), vec![1, 0]);
    };
    let mut s = connect(p.addr());
    auth(&mut s);
    s.write_all(&socks5_request(1, echo.addr)).unwrap();
    assert_eq!(read_socks5_reply(&mut s).0, 0);
    roundtrip(&mut s, 3, 64 * KIB);
    drop(s);
    assert!(wait_until(Duration::from_secs(60), &mut || gauges(&p).idle()));
    let fd_base = p.fd_count();

    let mut half_request = socks5_request(1, echo.addr);
    half_request.truncate(5);
    let mut auth_msg = vec![1, 5];
    auth_msg.extend_from_slice(b"alice");
    // (name, bytes before vanishing, whether to authenticate first)
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("nothing", vec![], false),
        ("socks5 version byte", vec![5], false),
        ("half greeting", vec![5, 2, 0], false),
        ("full greeting", vec![5, 1, 2], false),
        ("half auth", auth_msg[..4].to_vec(), false),
        ("half request", half_request.clone(), true),
        ("socks4 half fixed part", vec![4, 1, 0, 80, 127, 0], false),
        (
            "socks4 userid without NUL",
            vec![4, 1, 0, 80, 127, 0, 0, 1, b'u', b's'],
            false,
        ),
        (
            "socks4a half domain",
            b"\x04\x01\x00\x50\x00\x00\x00\x01u\x00exam".to_vec(),
            false,
        ),
        (
            "http half request line",
            b"CONNECT 127.0.0.1:80 HT".to_vec(),
            false,
        ),
        (
            "http half headers",
            b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\nProxy-Auth".to_vec(),
            false,
        ),
    ];
    let mut clients = 0;
    for reset in [false, true] {
        for (name, bytes, authenticate) in &cases {
            let mut s = connect(p.addr());
            if *authenticate {
                auth(&mut s);
            }
            if name.starts_with("half auth") {
                s.write_all(&[5, 1, 2]).unwrap();
                assert_eq!(read_n(&mut s, 2), vec![5, 2], "{name}");
            }
            s.write_all(bytes).unwrap();
            vanish(s, reset);
            clients += 1;
        }
        // Vanishing while the outbound connect is in flight (the target never answers the SYN): the proxy only
        // learns it when the connect times out and the reply cannot be delivered.
        let mut s = connect(p.addr());
        auth(&mut s);
        s.write_all(&socks5_request(1, hole_addr)).unwrap();
        vanish(s, reset);
        clients += 1;
        // A complete CONNECT, gone before reading the reply.
        let mut s = connect(p.addr());
        auth(&mut s);
        s.write_all(&socks5_request(1, echo.addr)).unwrap();
        vanish(s, reset);
        // A UDP association that relayed one datagram: its two UDP sockets must go with the control connection.
        let mut s = connect(p.addr());
        auth(&mut s);
        s.write_all(&socks5_request(3, SocketAddr::from(([0, 0, 0, 0], 0))))
            .unwrap();
        let (rep, relay) = read_socks5_reply(&mut s);
        assert_eq!(rep, 0, "UDP ASSOCIATE");
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        u.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut dgram = vec![0, 0, 0, 1, 127, 0, 0, 1];
        dgram.extend_from_slice(&udp_echo.addr.port().to_be_bytes());
        dgram.extend_from_slice(b"ping");
        u.send_to(&dgram, relay).unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = u
            .recv_from(&mut buf)
            .expect("UDP echo through the association");
        assert!(buf[..n].ends_with(b"ping"));
        vanish(s, reset);
        // A BIND whose listener is still waiting.
        let mut s = connect(p.addr());
        auth(&mut s);
        s.write_all(&socks5_request(2, SocketAddr::from(([0, 0, 0, 0], 0))))
            .unwrap();
        assert_eq!(read_socks5_reply(&mut s).0, 0, "BIND first reply");
        vanish(s, reset);
        // A BIND whose inbound peer connected: the peer must see the close.
        let mut s = connect(p.addr());
        auth(&mut s);
        s.write_all(&socks5_request(2, SocketAddr::from(([0, 0, 0, 0], 0))))
            .unwrap();
        let (rep, bound) = read_socks5_reply(&mut s);
        assert_eq!(rep, 0, "BIND first reply");
        let mut peer = connect(bound);
        assert_eq!(read_socks5_reply(&mut s).0, 0, "BIND second reply");
        peer.write_all(b"hello").unwrap();
        assert_eq!(read_n(&mut s, 5), b"hello");
        vanish(s, reset);
        assert!(
            closed(&mut peer),
            "the BIND peer's connection stayed open after the client left"
        );
        clients += 5;
    }
    assert!(clients > 20);
    assert_serves_auth(&p, echo.addr, auth);
    assert_settled(&p, fd_base, "after clients vanished mid-handshake");
    drop(hole);
}

/// Closes with a reset or a FIN.
fn vanish(s: TcpStream, reset: bool) {
    if reset {
        abort_close(s);
    } else {
        drop(s);
    }
}

fn assert_serves_auth(p: &Proxy, echo: SocketAddr, auth: impl Fn(&mut TcpStream)) {
    let mut s = connect(p.addr());
    auth(&mut s);
    s.write_all(&socks5_request(1, echo)).unwrap();
    assert_eq!(
        read_socks5_reply(&mut s).0,
        0,
        "fresh authenticated client refused"
    );
    roundtrip(&mut s, 98, 64 * KIB);
}

/// Half-close, client first: the client sends 1 MiB and shuts down writing while the echo is still in flight; it
/// must receive all 1 MiB back, then EOF, and the tunnel must close.
#[test]
fn half_close_client_first_delivers_everything() {
    let p = start_proxy(&[]);
    let echo = TestServer::echo();
    let fd_base = baseline(&p, echo.addr);
    for (i, pipelined) in [(0u64, false), (1, true)] {
        let mut c = try_socks5(p.addr(), echo.addr, pipelined).unwrap();
        let data = pseudo_random(30 + i, MIB);
        let want = digest(&data);
        let mut w = c.try_clone().unwrap();
        let writer = thread::spawn(move || {
            w.write_all(&data)?;
            w.shutdown(Shutdown::Write)
        });
        let (got, end) = read_until_end(&mut c, 2 * MIB);
        writer
            .join()
            .unwrap()
            .expect("write 1 MiB, then shut down writing");
        assert_eq!(end, End::Eof, "expected EOF after the echo");
        assert_eq!(got.len(), MIB, "echoed length");
        assert_eq!(digest(&got), want, "echoed bytes differ");
    }
    assert_settled(&p, fd_base, "after client-first half-closes");
}

/// Half-close, target first: the target sends 1 MiB and shuts down writing at once; the client must receive all of
/// it, then EOF, and can still send 1 MiB the other way, which the target receives in full before its EOF.
#[test]
fn half_close_target_first_keeps_the_other_direction() {
    let p = start_proxy(&[]);
    let echo = TestServer::echo();
    let fd_base = baseline(&p, echo.addr);
    let (tx, rx) = mpsc::channel();
    let target = TestServer::start(move |mut s| {
        let data = pseudo_random(40, MIB);
        let sent = s.write_all(&data).and_then(|_| s.shutdown(Shutdown::Write));
        let (got, end) = read_until_end(&mut s, 2 * MIB);
        let _ = tx.send((sent.is_ok(), got, end));
    });
    let mut c = socks5_connect(p.addr(), target.addr).unwrap();
    let (got, end) = read_until_end(&mut c, 2 * MIB);
    assert_eq!(end, End::Eof, "expected EOF after the target's 1 MiB");
    assert_eq!(got.len(), MIB);
    assert_eq!(
        digest(&got),
        digest(&pseudo_random(40, MIB)),
        "bytes from the target differ"
    );
    // The tunnel is half-closed; the client -> target direction still works.
    let data = pseudo_random(41, MIB);
    c.write_all(&data)
        .expect("write after the target's half-close");
    c.shutdown(Shutdown::Write).unwrap();
    let (sent_ok, at_target, target_end) = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("target finished");
    assert!(sent_ok, "the target could not send its 1 MiB");
    assert_eq!(
        target_end,
        End::Eof,
        "the target expected EOF after the client's 1 MiB"
    );
    assert_eq!(at_target.len(), MIB);
    assert_eq!(
        digest(&at_target),
        digest(&data),
        "bytes at the target differ"
    );
    assert!(
        closed(&mut c),
        "tunnel still open after both directions finished"
    );
    drop(c);
    assert_settled(&p, fd_base, "after target-first half-close");
}

/// Reads an HTTP response head (up to the blank line) byte by byte, leaving what follows in the socket.
fn read_http_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(
            head.len() < 8192,
            "HTTP head too long: {:?}",
            String::from_utf8_lossy(&head)
        );
        s.read_exact(&mut b).expect("read HTTP head");
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The success reply a pipelined client waits for.
enum Granted {
    Socks5,
    Socks4,
    Http,
}

/// Clients that send their payload right behind the request, before any reply (and, in one case, their FIN too):
/// everything must be relayed, for SOCKS5 (IP and name), SOCKS4, SOCKS4a and HTTP CONNECT.
#[test]
fn pipelined_payload_is_relayed() {
    let echo = TestServer::echo();
    let p = start_proxy(&["--resolve", "echo.test=127.0.0.1"]);
    let fd_base = baseline(&p, echo.addr);
    let port = echo.addr.port();
    let payload_len = 200 * KIB;

    // (name, request bytes, kind of reply, shut down writing right after the payload)
    let mut s5 = vec![5, 1, 0];
    s5.extend_from_slice(&socks5_request(1, echo.addr));
    let mut s5_name = vec![5, 1, 0];
    s5_name.extend_from_slice(&socks5_request_domain(1, "echo.test", port));
    let mut s4 = vec![4, 1];
    s4.extend_from_slice(&port.to_be_bytes());
    s4.extend_from_slice(&[127, 0, 0, 1]);
    s4.extend_from_slice(b"user\0");
    let mut s4a = vec![4, 1];
    s4a.extend_from_slice(&port.to_be_bytes());
    s4a.extend_from_slice(&[0, 0, 0, 1]);
    s4a.extend_from_slice(b"user\0echo.test\0");
    let http =
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").into_bytes();
    let cases = vec![
        ("socks5", s5.clone(), Granted::Socks5, false),
        ("socks5 + FIN", s5, Granted::Socks5, true),
        ("socks5 name", s5_name.clone(), Granted::Socks5, false),
        ("socks5 name + FIN", s5_name, Granted::Socks5, true),
        ("socks4", s4.clone(), Granted::Socks4, false),
        ("socks4 + FIN", s4, Granted::Socks4, true),
        ("socks4a", s4a, Granted::Socks4, false),
        ("http connect", http.clone(), Granted::Http, false),
        ("http connect + FIN", http, Granted::Http, true),
    ];
    for (i, (name, request, granted, fin)) in cases.into_iter().enumerate() {
        let mut c = connect(p.addr());
        let payload = pseudo_random(50 + i as u64, payload_len);
        let mut msg = request.clone();
        msg.extend_from_slice(&payload);
        let mut w = c.try_clone().unwrap();
        let writer = thread::spawn(move || {
            w.write_all(&msg)?;
            if fin {
                w.shutdown(Shutdown::Write)?;
            }
            Ok::<_, std::io::Error>(w)
        });
        match granted {
            Granted::Socks5 => {
                let r = read_n(&mut c, 12);
                assert_eq!(r[..6], [5, 0, 5, 0, 0, 1], "{name}: replies {r:02x?}");
            }
            Granted::Socks4 => {
                let r = read_n(&mut c, 8);
                assert_eq!(r[..2], [0, 90], "{name}: reply {r:02x?}");
            }
            Granted::Http => {
                let head = read_http_head(&mut c);
                assert!(head.starts_with("HTTP/1.1 200"), "{name}: {head:?}");
            }
        }
        let got = read_n(&mut c, payload_len);
        assert_eq!(
            digest(&got),
            digest(&payload),
            "{name}: pipelined payload differs"
        );
        let w = writer.join().unwrap().expect("write");
        if fin {
            assert!(
                closed(&mut c),
                "{name}: no EOF after the echo of a half-closed pipelined session"
            );
        }
        drop(w);
        drop(c);
    }
    assert_settled(&p, fd_base, "after pipelined sessions");
}

// ---------------------------------------------------------------------------------------------------------------
// Resource exhaustion
// ---------------------------------------------------------------------------------------------------------------

/// Out of descriptors (`ulimit -n 64`, ~100 clients doing SOCKS5 handshakes): the proxy pauses accepting instead
/// of spinning (under 0.5 s of CPU over 2 s while exhausted, with new connections knocking), answers CONNECTs it
/// cannot open a socket for with 0x01, keeps relaying established tunnels, serves every waiting client once
/// descriptors free up, and then serves a fresh client normally with descriptors back at the baseline.
#[test]
fn fd_exhaustion_pauses_accept_without_spinning() {
    const LIMIT: usize = 64;
    let echo = TestServer::echo();
    let p = Proxy::spawn_in_shell(
        &format!("ulimit -n {LIMIT}"),
        &[
            "-l",
            "127.0.0.1:0",
            "-t",
            "2",
            "--metrics",
            "127.0.0.1:0",
            "--handshake-timeout",
            "600s",
        ],
    );
    let pid = p.pid();
    let fd_base = baseline(&p, echo.addr);
    // Descriptors inherited from the test harness may have numbers above the limit: they do not use up a slot.
    let low_base = fds_below(pid, LIMIT);
    assert!(
        low_base + 20 < LIMIT,
        "baseline of {low_base} fds leaves no room under {LIMIT}"
    );

    // Tunnels established before the exhaustion must keep working through it.
    let mut tunnels: Vec<TcpStream> = (0..4)
        .map(|i| {
            let mut s = socks5_connect(p.addr(), echo.addr).expect("tunnel before exhaustion");
            roundtrip(&mut s, 60 + i, 64 * KIB);
            s
        })
        .collect();
    let fds_with_tunnels = low_base + 2 * tunnels.len();

    // 100 clients send a SOCKS5 greeting. Those accepted get the method reply and wait in the request phase; the
    // rest wait in the listen backlog, because the proxy is out of descriptors.
    let mut waiting: Vec<Option<TcpStream>> = (0..100)
        .map(|_| {
            let mut s = connect(p.addr());
            s.write_all(&[5, 1, 0]).unwrap();
            Some(s)
        })
        .collect();
    assert!(
        p.wait_for(Duration::from_secs(60), || fds_below(pid, LIMIT) == LIMIT),
        "the proxy never reached its descriptor limit: {} fds below {LIMIT}",
        fds_below(pid, LIMIT)
    );
    let accepted = LIMIT - fds_with_tunnels;
    let mut served: Vec<TcpStream> = Vec::new();
    let got_all = wait_until(Duration::from_secs(60), &mut || {
        collect_method_replies(&mut waiting, &mut served);
        served.len() >= accepted
    });
    assert!(
        got_all,
        "{} of the {accepted} accepted clients got a method reply",
        served.len()
    );
    assert_eq!(
        served.len(),
        accepted,
        "more clients served than descriptors allow"
    );
    assert!(
        p.wait_for(Duration::from_secs(30), || p
            .log()
            .contains("pausing accepts")),
        "no 'pausing accepts' in the log"
    );

    // CPU while exhausted, with new connections knocking (each one is a listener event the proxy cannot act on).
    let ticks = clock_ticks_per_second();
    let t0 = cpu_ticks(pid);
    let wall = Instant::now();
    let mut knockers = Vec::new();
    for _ in 0..20 {
        knockers.push(connect(p.addr()));
        thread::sleep(Duration::from_millis(100));
    }
    let cpu = (cpu_ticks(pid) - t0) as f64 / ticks as f64;
    let wall = wall.elapsed();
    eprintln!(
        "exhausted at {LIMIT} fds ({accepted} clients accepted, {} waiting): {cpu:.2} s CPU in {wall:?}",
        waiting.iter().filter(|w| w.is_some()).count()
    );
    assert!(
        cpu < 0.5,
        "the proxy burned {cpu:.2} s of CPU in {wall:?} while out of descriptors: it spins"
    );
    drop(knockers);

    // A CONNECT needs a descriptor for the outbound socket: with none left the answer is a general failure.
    let mut s = served.pop().unwrap();
    s.write_all(&socks5_request(1, echo.addr)).unwrap();
    let (rep, _) = read_socks5_reply(&mut s);
    assert_eq!(rep, 0x01, "a CONNECT while out of descriptors");
    assert!(closed(&mut s), "no close after the failure reply");
    drop(s);

    // Every other served client sends its CONNECT at once. Each needs a descriptor; one freed by a failed client
    // may go to a waiting client or to a CONNECT, so each answer is a success or a general failure, never silence.
    for s in served.iter_mut() {
        s.write_all(&socks5_request(1, echo.addr)).unwrap();
    }
    let mut failed = 0;
    for mut s in served.drain(..) {
        match read_socks5_reply(&mut s).0 {
            0x00 => tunnels.push(s),
            0x01 => {
                failed += 1;
                assert!(closed(&mut s), "no close after the failure reply");
            }
            other => panic!("CONNECT while out of descriptors answered {other:#04x}"),
        }
    }
    assert!(
        failed > 0,
        "every CONNECT got a descriptor although none were free"
    );

    // Established tunnels (old and new) still relay.
    for (i, t) in tunnels.iter_mut().enumerate() {
        roundtrip(t, 70 + i as u64, 64 * KIB);
    }

    // Every waiting client is accepted and served in turn (each closed once served).
    let mut done = Vec::new();
    let all = wait_until(Duration::from_secs(120), &mut || {
        collect_method_replies(&mut waiting, &mut done);
        done.clear();
        waiting.iter().all(|w| w.is_none())
    });
    assert!(
        all,
        "{} clients never served after descriptors freed up",
        waiting.iter().filter(|w| w.is_some()).count()
    );

    tunnels.clear();
    assert_serves(&p, echo.addr);
    assert_settled(&p, fd_base, "after descriptor exhaustion");
}

/// Starts a one-worker proxy under `ulimit -n LIMIT` and exhausts its descriptors with clients that send a SOCKS5
/// greeting and wait (the surplus waits in the listen backlog). `before` runs first, with descriptors to spare.
fn exhausted_proxy<T>(
    extra: &[&str],
    before: impl FnOnce(&Proxy) -> T,
) -> (Proxy, usize, T, Vec<TcpStream>) {
    const LIMIT: usize = 32;
    let mut args = vec!["-l", "127.0.0.1:0", "-t", "1", "--metrics", "127.0.0.1:0"];
    args.extend_from_slice(&["--handshake-timeout", "600s"]);
    args.extend_from_slice(extra);
    let p = Proxy::spawn_in_shell(&format!("ulimit -n {LIMIT}"), &args);
    let echo = TestServer::echo();
    let fd_base = baseline(&p, echo.addr);
    let low_base = fds_below(p.pid(), LIMIT);
    assert!(
        low_base + 8 < LIMIT,
        "baseline of {low_base} fds leaves no room under {LIMIT}"
    );
    let state = before(&p);
    let hogs: Vec<TcpStream> = (0..LIMIT)
        .map(|_| {
            let mut s = connect(p.addr());
            s.write_all(&[5, 1, 0]).unwrap();
            s
        })
        .collect();
    let pid = p.pid();
    assert!(
        p.wait_for(Duration::from_secs(60), || fds_below(pid, LIMIT) == LIMIT),
        "the proxy never reached its descriptor limit"
    );
    assert!(
        p.wait_for(Duration::from_secs(30), || p
            .log()
            .contains("pausing accepts")),
        "no 'pausing accepts' in the log"
    );
    (p, fd_base, state, hogs)
}

/// Frees the descriptors taken by `hogs` and waits until the proxy is back to `fd_base` plus `extra` descriptors.
fn release_hogs(p: &Proxy, hogs: Vec<TcpStream>, fd_base: usize, extra: usize) {
    drop(hogs);
    assert!(
        p.wait_for(Duration::from_secs(60), || p.fd_count() <= fd_base + extra),
        "descriptors not freed: {} (baseline {fd_base} + {extra})",
        p.fd_count()
    );
}

/// A `/metrics` scrape that arrives while the proxy is out of descriptors cannot be accepted then, but must be
/// answered once descriptors are free again, without waiting for another connection to the metrics port.
#[test]
fn metrics_scrape_during_fd_exhaustion_is_answered_afterwards() {
    let (p, fd_base, (), hogs) = exhausted_proxy(&[], |_| ());
    let metrics = p.metrics.expect("metrics address");
    let scrape = thread::spawn(move || -> Result<String, String> {
        let mut s = TcpStream::connect_timeout(&metrics, IO_TIMEOUT).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .map_err(|e| format!("{e} after {} bytes", out.len()))?;
        Ok(out)
    });
    // The control thread sees the connection and fails to accept it while still exhausted (it logs that once).
    assert!(
        p.wait_for(Duration::from_secs(30), || p
            .log()
            .contains("metrics: accept:")),
        "the metrics thread never tried to accept the scrape while out of descriptors"
    );
    release_hogs(&p, hogs, fd_base, 0);
    // No other connection to the metrics port may be made meanwhile: it would trigger the accept.
    let answered = wait_until(Duration::from_secs(30), &mut || scrape.is_finished());
    assert!(
        answered,
        "a /metrics scrape made while out of descriptors is still unanswered 30 s after they were freed \
         (it stays in the metrics listener's accept queue until another connection arrives)"
    );
    let out = scrape.join().expect("scrape thread");
    assert!(
        out.as_ref().is_ok_and(|t| t.starts_with("HTTP/1.1 200")),
        "{out:?}"
    );
}

/// A BIND whose inbound peer connects while the proxy is out of descriptors: the peer cannot be accepted then, but
/// must be once descriptors are free again (second reply, relay), not only at `--bind-timeout`.
#[test]
fn bind_peer_arriving_during_fd_exhaustion_is_accepted_afterwards() {
    let (p, fd_base, (mut client, bound), hogs) =
        exhausted_proxy(&["--bind-timeout", "600s"], |p| {
            let mut s = connect(p.addr());
            s.write_all(&[5, 1, 0]).unwrap();
            assert_eq!(read_n(&mut s, 2), vec![5, 0]);
            s.write_all(&socks5_request(2, SocketAddr::from(([0, 0, 0, 0], 0))))
                .unwrap();
            let (rep, bound) = read_socks5_reply(&mut s);
            assert_eq!(rep, 0, "BIND first reply");
            (s, bound)
        });
    // The peer's connection completes in the kernel (the BIND listener's backlog); the proxy cannot accept it yet.
    let mut peer = connect(bound);
    // The worker sees the peer and fails to accept it while still exhausted (it logs that once per BIND).
    assert!(
        p.wait_for(Duration::from_secs(30), || p
            .log()
            .contains("BIND: accept:")),
        "the worker never tried to accept the BIND peer while out of descriptors"
    );
    release_hogs(&p, hogs, fd_base, 2);
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut second = [0u8; 10];
    let got = client.read_exact(&mut second);
    assert!(
        got.is_ok(),
        "no second BIND reply 30 s after descriptors were freed ({got:?}): the peer that connected during the \
         exhaustion is still in the BIND listener's accept queue"
    );
    assert_eq!(second[..2], [5, 0], "second BIND reply {second:02x?}");
    peer.write_all(b"through").unwrap();
    assert_eq!(read_n(&mut client, 7), b"through");
}

/// How many descriptors of a process have numbers below `limit` (the ones RLIMIT_NOFILE counts against).
fn fds_below(pid: u32, limit: usize) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.parse::<usize>().ok())
                        .is_some_and(|n| n < limit)
                })
                .count()
        })
        .unwrap_or(0)
}

/// Moves every waiting client that has its method reply (05 00) into `served`.
fn collect_method_replies(waiting: &mut [Option<TcpStream>], served: &mut Vec<TcpStream>) {
    for slot in waiting.iter_mut() {
        let Some(s) = slot.as_mut() else { continue };
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 2];
        let n = s.peek(&mut b).unwrap_or(0);
        s.set_nonblocking(false).unwrap();
        if n == 2 {
            let mut s = slot.take().unwrap();
            s.read_exact(&mut b).unwrap();
            assert_eq!(b, [5, 0], "method reply");
            served.push(s);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Churn
// ---------------------------------------------------------------------------------------------------------------

/// One short session: SOCKS5 CONNECT (step by step or pipelined), 1 KiB echoed, then a close (every tenth a reset).
fn churn_session(proxy: SocketAddr, target: SocketAddr, i: usize) -> Result<(), String> {
    let mut s = try_socks5(proxy, target, i % 2 == 1)?;
    let data = pseudo_random(1000 + i as u64, KIB);
    s.write_all(&data).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; KIB];
    s.read_exact(&mut got)
        .map_err(|e| format!("read echo: {e}"))?;
    if got != data {
        return Err("echo differs".into());
    }
    if i % 10 == 9 {
        abort_close(s);
    }
    Ok(())
}

fn churn(sessions: usize, threads: usize) {
    let p = start_proxy(&[]);
    let echo = TestServer::echo();
    let fd_base = baseline(&p, echo.addr);
    let ok_series = "socksgate_handshakes_total{protocol=\"socks5\",outcome=\"ok\"}";
    let ok_before = p.metric(ok_series);
    let rss0 = rss_kib(p.pid());
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let (proxy, target) = (p.addr(), echo.addr);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (next, ok, failures) = (Arc::clone(&next), Arc::clone(&ok), Arc::clone(&failures));
            thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= sessions {
                    return;
                }
                match churn_session(proxy, target, i) {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().unwrap().push(format!("session {i}: {e}")),
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("churn thread");
    }
    let failures = failures.lock().unwrap();
    assert_eq!(
        ok.load(Ordering::Relaxed),
        sessions,
        "{} of {sessions} sessions failed; first ones: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    eprintln!(
        "churn: {sessions} sessions from {threads} threads in {:?}; proxy RSS {rss0} -> {} KiB",
        started.elapsed(),
        rss_kib(p.pid())
    );
    assert_settled(&p, fd_base, "after churn");
    assert_eq!(
        p.metric(ok_series) - ok_before,
        sessions as u64,
        "successful SOCKS5 handshakes counted"
    );
}

/// 2,000 short sessions from 50 client threads (reduced; the full run is `churn_20000_sessions_200_threads`).
#[test]
fn churn_2000_sessions_50_threads() {
    churn(2_000, 50);
}

#[test]
#[ignore = "long: cargo test --release --test it -- --ignored faults::"]
fn churn_20000_sessions_200_threads() {
    churn(20_000, 200);
}

// ---------------------------------------------------------------------------------------------------------------
// Byte-exact soak
// ---------------------------------------------------------------------------------------------------------------

fn soak(tunnels: usize, bytes: usize) {
    let p = start_proxy(&[]);
    let echo = TestServer::echo();
    let fd_base = baseline(&p, echo.addr);
    let (proxy, target) = (p.addr(), echo.addr);
    // Everyone connects, the main thread checks that all tunnels are open at once, then the bytes flow.
    let connected = Arc::new(Barrier::new(tunnels + 1));
    let go = Arc::new(Barrier::new(tunnels + 1));
    let handles: Vec<_> = (0..tunnels)
        .map(|i| {
            let (connected, go) = (Arc::clone(&connected), Arc::clone(&go));
            thread::Builder::new()
                .stack_size(256 * KIB)
                .spawn(move || -> Result<(), String> {
                    let conn = try_socks5(proxy, target, i % 2 == 1);
                    connected.wait();
                    go.wait();
                    soak_tunnel(conn?, 5000 + i as u64, bytes)
                })
                .expect("spawn tunnel thread")
        })
        .collect();
    connected.wait();
    let g = gauges(&p);
    let started = Instant::now();
    go.wait();
    let mut failures = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        if let Err(e) = h.join().expect("tunnel thread") {
            failures.push(format!("tunnel {i}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {tunnels} tunnels failed; first ones: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    eprintln!(
        "soak: {tunnels} tunnels x {bytes} bytes each way in {:?}; proxy RSS {} KiB",
        started.elapsed(),
        rss_kib(p.pid())
    );
    assert_eq!(g.sessions, tunnels as u64, "tunnels open at once: {g:?}");
    assert_eq!(
        g.workers.iter().sum::<u64>(),
        tunnels as u64,
        "slab entries while all tunnels were open: {g:?}"
    );
    assert_settled(&p, fd_base, "after the soak");
}

/// Streams `bytes` pseudo-random bytes up while checking the echo byte by byte, then compares digests end to end.
fn soak_tunnel(mut s: TcpStream, seed: u64, bytes: usize) -> Result<(), String> {
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let writer = thread::Builder::new()
        .stack_size(128 * KIB)
        .spawn(move || -> std::io::Result<u64> {
            let mut g = Xorshift::new(seed);
            let mut f = Fnv::new();
            let mut chunk = vec![0u8; 16 * KIB];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len());
                g.fill(&mut chunk[..n]);
                f.update(&chunk[..n]);
                w.write_all(&chunk[..n])?;
                left -= n;
            }
            w.shutdown(Shutdown::Write)?;
            Ok(f.0)
        })
        .map_err(|e| e.to_string())?;
    let mut expect = Xorshift::new(seed);
    let mut f = Fnv::new();
    let mut buf = vec![0u8; 16 * KIB];
    let mut want = vec![0u8; 16 * KIB];
    let mut got = 0usize;
    let mut mismatch = None;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read after {got} bytes: {e}")),
        };
        if got + n > bytes {
            return Err(format!("more bytes echoed than sent ({})", got + n));
        }
        expect.fill(&mut want[..n]);
        if mismatch.is_none() && buf[..n] != want[..n] {
            let off = (0..n).find(|&k| buf[k] != want[k]).unwrap_or(0);
            mismatch = Some(got + off);
        }
        f.update(&buf[..n]);
        got += n;
    }
    let sent = writer
        .join()
        .map_err(|_| "writer panicked".to_string())?
        .map_err(|e| format!("write: {e}"))?;
    if let Some(off) = mismatch {
        return Err(format!("first differing byte at offset {off}"));
    }
    if got != bytes {
        return Err(format!("echoed {got} of {bytes} bytes"));
    }
    if f.0 != sent {
        return Err("digest of echoed bytes differs from digest of sent bytes".into());
    }
    Ok(())
}

/// 100 concurrent tunnels x 256 KiB each way (reduced; the full run is `soak_1000_tunnels_1mib`).
#[test]
fn soak_100_tunnels_256kib() {
    soak(100, 256 * KIB);
}

#[test]
#[ignore = "long: cargo test --release --test it -- --ignored faults::"]
fn soak_1000_tunnels_1mib() {
    soak(1000, MIB);
}

// ---------------------------------------------------------------------------------------------------------------
// Garbage
// ---------------------------------------------------------------------------------------------------------------

/// What the proxy must answer to a garbage case before closing.
#[derive(Debug, Clone)]
enum Expect {
    /// Exactly these bytes, then a close (an empty vector: closed without a byte).
    Exact(Vec<u8>),
    /// The method reply 05 00, then nothing or a SOCKS5 failure reply (REP not 0), then a close.
    Socks5Failure,
    /// An HTTP response with one of these statuses, then a close.
    Http(&'static [u16]),
    /// Random input: anything consistent with the protocol its first byte selects, and never a success.
    Random,
}

struct Case {
    name: String,
    bytes: Vec<u8>,
    expect: Expect,
}

fn case(name: impl Into<String>, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        bytes,
        expect,
    }
}

/// The 10-byte SOCKS5 failure reply the proxy sends: `05 REP 00 01 0.0.0.0:0`.
fn s5_fail(rep: u8) -> Vec<u8> {
    vec![5, rep, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// A method reply 05 00 followed by a failure reply with `rep`.
fn after_greeting(rep: u8) -> Expect {
    let mut v = vec![5, 0];
    v.extend_from_slice(&s5_fail(rep));
    Expect::Exact(v)
}

const SOCKS4_REJECTED: [u8; 8] = [0, 91, 0, 0, 0, 0, 0, 0];

/// Every invalid value of every SOCKS version/command/address-type byte (`stride` 1), or every `stride`-th one.
fn enumerated_cases(stride: usize) -> Vec<Case> {
    let mut v = Vec::new();
    let sample = |range: std::ops::RangeInclusive<u8>, skip: &[u8]| -> Vec<u8> {
        let all: Vec<u8> = range.filter(|b| !skip.contains(b)).collect();
        let mut out: Vec<u8> = all.iter().copied().step_by(stride).collect();
        // Boundaries are always in.
        for b in [all[0], all[all.len() - 1]] {
            if !out.contains(&b) {
                out.push(b);
            }
        }
        out
    };
    // SOCKS5 request VER (the greeting's VER selects SOCKS5, so only the request's VER can be wrong): no code is
    // defined, the proxy answers a failure or closes.
    for ver in sample(0..=255, &[5]) {
        let b = vec![5, 1, 0, ver, 1, 0, 1, 127, 0, 0, 1, 0, 80];
        v.push(case(
            format!("socks5 request VER {ver:#04x}"),
            b,
            Expect::Socks5Failure,
        ));
    }
    // SOCKS5 CMD: everything but CONNECT is unsupported here (BIND and UDP ASSOCIATE are disabled): 0x07.
    for cmd in sample(0..=255, &[1]) {
        v.push(case(
            format!("socks5 CMD {cmd:#04x}"),
            vec![5, 1, 0, 5, cmd, 0, 1, 127, 0, 0, 1, 0, 80],
            after_greeting(0x07),
        ));
    }
    // SOCKS5 ATYP: 0x08, as soon as the byte arrives (nothing follows it).
    for atyp in sample(0..=255, &[1, 3, 4]) {
        v.push(case(
            format!("socks5 ATYP {atyp:#04x}"),
            vec![5, 1, 0, 5, 1, 0, atyp],
            after_greeting(0x08),
        ));
    }
    // SOCKS4 CD: everything but CONNECT (BIND is disabled) is rejected with 91.
    for cd in sample(0..=255, &[1]) {
        v.push(case(
            format!("socks4 CD {cd}"),
            vec![4, cd, 0, 80, 127, 0, 0, 1, 0],
            Expect::Exact(SOCKS4_REJECTED.to_vec()),
        ));
    }
    v
}

/// Oversized fields and other structural errors, each with its exact answer.
fn structural_cases(echo_port: u16) -> Vec<Case> {
    let mut v = Vec::new();
    let mut methods = vec![5, 255];
    methods.extend(std::iter::repeat_n(0x01, 255));
    v.push(case(
        "255 methods, none acceptable",
        methods.clone(),
        Expect::Exact(vec![5, 0xFF]),
    ));
    methods[200] = 0;
    v.push(case(
        "255 methods including no-auth, then EOF",
        methods,
        Expect::Exact(vec![5, 0]),
    ));
    v.push(case("NMETHODS 0", vec![5, 0], Expect::Exact(vec![])));
    v.push(case(
        "only user/pass offered without users",
        vec![5, 1, 2],
        Expect::Exact(vec![5, 0xFF]),
    ));
    let mut junk = vec![5, 1, 0];
    junk.extend(std::iter::repeat_n(0xEE, 10 * KIB));
    v.push(case(
        "10 KiB of junk after the greeting",
        junk,
        Expect::Socks5Failure,
    ));
    v.push(case(
        "empty domain",
        vec![5, 1, 0, 5, 1, 0, 3, 0, 0, 80],
        after_greeting(0x01),
    ));
    let mut long = vec![5, 1, 0, 5, 1, 0, 3, 255];
    long.extend(std::iter::repeat_n(b'a', 254));
    long.push(b' ');
    long.extend_from_slice(&[0, 80]);
    v.push(case(
        "255-byte domain with a space",
        long,
        after_greeting(0x01),
    ));
    v.push(case(
        "domain with a non-ASCII byte",
        vec![5, 1, 0, 5, 1, 0, 3, 3, b'a', 0xC3, b'b', 0, 80],
        after_greeting(0x01),
    ));
    v.push(case(
        "domain with a NUL",
        vec![5, 1, 0, 5, 1, 0, 3, 3, b'a', 0, b'b', 0, 80],
        after_greeting(0x01),
    ));
    let mut denied = vec![5, 1, 0];
    denied.extend_from_slice(&socks5_request(1, SocketAddr::from(([127, 0, 0, 1], 1))));
    v.push(case(
        "socks5 CONNECT to a denied port",
        denied,
        after_greeting(0x02),
    ));
    let mut v6 = vec![5, 1, 0];
    v6.extend_from_slice(&socks5_request(
        1,
        SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], echo_port)),
    ));
    v.push(case(
        "socks5 CONNECT to a denied IPv6 address",
        v6,
        after_greeting(0x02),
    ));
    let mut userid = vec![4, 1, 0, 80, 127, 0, 0, 1];
    userid.extend(std::iter::repeat_n(b'u', 300));
    v.push(case(
        "socks4 USERID of 300 bytes",
        userid,
        Expect::Exact(SOCKS4_REJECTED.to_vec()),
    ));
    let mut domain = vec![4, 1, 0, 80, 0, 0, 0, 1, b'u', 0];
    domain.extend(std::iter::repeat_n(b'a', 300));
    v.push(case(
        "socks4a DOMAIN of 300 bytes",
        domain,
        Expect::Exact(SOCKS4_REJECTED.to_vec()),
    ));
    v.push(case(
        "socks4a empty DOMAIN",
        vec![4, 1, 0, 80, 0, 0, 0, 1, b'u', 0, 0],
        Expect::Exact(SOCKS4_REJECTED.to_vec()),
    ));
    v.push(case(
        "socks4 CONNECT to a denied port",
        vec![4, 1, 0, 1, 127, 0, 0, 1, 0],
        Expect::Exact(SOCKS4_REJECTED.to_vec()),
    ));
    let mut big = b"GET http://127.0.0.1/ HTTP/1.1\r\nX-Pad: ".to_vec();
    big.extend(std::iter::repeat_n(b'p', 70 * KIB));
    v.push(case("HTTP head of 70 KiB", big, Expect::Http(&[431])));
    let mut many = b"GET http://127.0.0.1/ HTTP/1.1\r\n".to_vec();
    for i in 0..2000 {
        many.extend_from_slice(format!("X-H{i}: {}\r\n", "v".repeat(30)).as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    // Over the size limit and over the header-count limit at once: whichever is noticed first answers.
    v.push(case(
        "HTTP head of 2000 header lines",
        many,
        Expect::Http(&[400, 431]),
    ));
    let mut hundreds = b"GET http://127.0.0.1/ HTTP/1.1\r\n".to_vec();
    for i in 0..200 {
        hundreds.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    hundreds.extend_from_slice(b"\r\n");
    v.push(case(
        "HTTP head with 200 headers",
        hundreds,
        Expect::Http(&[400]),
    ));
    v.push(case(
        "HTTP control bytes in the target",
        b"GET \x01\x02 HTTP/1.1\r\n\r\n".to_vec(),
        Expect::Http(&[400]),
    ));
    v.push(case(
        "HTTP/2.0 request line",
        b"GET http://127.0.0.1/ HTTP/2.0\r\n\r\n".to_vec(),
        Expect::Http(&[400]),
    ));
    v.push(case(
        "HTTP CONNECT to a denied port",
        b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n".to_vec(),
        Expect::Http(&[403]),
    ));
    v.push(case(
        "HTTP partial request line, then EOF",
        b"G".to_vec(),
        Expect::Exact(vec![]),
    ));
    v.push(case(
        "PROXY header without --proxy-protocol",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
        Expect::Http(&[400]),
    ));
    v.push(case(
        "TLS ClientHello",
        vec![0x16, 3, 1, 0, 0x2f, 1, 0, 0, 0x2b, 3, 3],
        Expect::Exact(vec![]),
    ));
    v.push(case("a NUL byte", vec![0], Expect::Exact(vec![])));
    v
}

/// Seeded random input: fully random bytes (first byte spread over the protocols), and random requests after a valid
/// greeting. Names that would be resolved are made invalid, so nothing leaves loopback.
fn random_cases(n: usize, seed: u64) -> Vec<Case> {
    let mut g = Xorshift::new(seed);
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        if i % 5 == 4 {
            // A valid greeting, then a request with plausible leading bytes and a random rest.
            let mut head = [0u8; 3];
            g.fill(&mut head);
            let cmd = [1, 2, 3, head[0]][g.below(4) as usize];
            let atyp = [1, 3, 4, head[1]][g.below(4) as usize];
            let mut r = vec![5, 1, 0, 5, cmd, head[2], atyp];
            let mut tail = vec![0u8; g.below(40) as usize];
            g.fill(&mut tail);
            if atyp == 3 && tail.len() > 1 {
                // Domain: a space as its first byte makes it invalid, so nothing is ever resolved.
                tail[1] = b' ';
            }
            r.extend_from_slice(&tail);
            v.push(case(
                format!("random request {i}"),
                r,
                Expect::Socks5Failure,
            ));
            continue;
        }
        let len = 1 + g.below(2048) as usize;
        let mut b = vec![0u8; len];
        g.fill(&mut b);
        match i % 5 {
            1 => b[0] = 5,
            2 => b[0] = 4,
            3 => b[0] = b'A' + g.below(26) as u8,
            _ => {}
        }
        v.push(case(format!("random bytes {i}"), b, Expect::Random));
    }
    v
}

/// The method reply 05 00, then nothing or a failure reply `05 REP 00 01 0.0.0.0:0` with REP not 0.
fn socks5_failure(got: &[u8]) -> bool {
    got.len() >= 2
        && got[..2] == [5, 0]
        && (got.len() == 2
            || (got.len() == 12 && got[2] == 5 && got[3] != 0 && got[4..] == s5_fail(0)[2..]))
}

fn http_status(got: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(got.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.parse().ok()
}

/// Checks an answer against its expectation; `Err` describes the mismatch.
fn check(c: &Case, got: &[u8]) -> Result<(), String> {
    let ok = match &c.expect {
        Expect::Exact(want) => got == &want[..],
        Expect::Socks5Failure => socks5_failure(got),
        Expect::Http(codes) => http_status(got).is_some_and(|c| codes.contains(&c)),
        Expect::Random => match c.bytes[0] {
            5 => got.is_empty() || got == [5, 0xFF] || socks5_failure(got),
            4 => got.is_empty() || got == SOCKS4_REJECTED,
            b if b.is_ascii_alphabetic() => {
                got.is_empty() || matches!(http_status(got), Some(400..=599))
            }
            _ => got.is_empty(),
        },
    };
    if ok {
        Ok(())
    } else {
        let shown = &got[..got.len().min(64)];
        Err(format!(
            "{}: expected {:?}, got {} bytes {:02x?} ({:?})",
            c.name,
            c.expect,
            got.len(),
            shown,
            String::from_utf8_lossy(shown)
        ))
    }
}

/// Sends one case, shuts down writing, and reads the answer until the proxy closes.
fn run_case(proxy: SocketAddr, c: &Case) -> Result<(), String> {
    let mut s = try_connect(proxy)?;
    // The proxy may close early (that is a valid answer): write errors are not failures.
    let _ = s.write_all(&c.bytes);
    let _ = s.shutdown(Shutdown::Write);
    let (got, end) = read_until_end(&mut s, 64 * KIB);
    if end == End::TimedOut {
        return Err(format!(
            "{}: still open after {IO_TIMEOUT:?} (got {} bytes)",
            c.name,
            got.len()
        ));
    }
    check(c, &got)
}

/// Runs every case against `p` from 8 client threads; returns the failures.
fn run_cases(p: &Proxy, cases: Vec<Case>) -> Vec<String> {
    let cases = Arc::new(cases);
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let proxy = p.addr();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (cases, next, failures) =
                (Arc::clone(&cases), Arc::clone(&next), Arc::clone(&failures));
            thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = cases.get(i) else { return };
                if let Err(e) = run_case(proxy, c) {
                    failures.lock().unwrap().push(e);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("garbage thread");
    }
    let failures = Arc::try_unwrap(failures).expect("threads joined");
    failures.into_inner().unwrap()
}

/// RFC 1929 sub-negotiation garbage against a proxy with users: oversized and malformed fields.
fn auth_cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mut max = vec![5, 1, 2, 1, 255];
    max.extend(std::iter::repeat_n(b'u', 255));
    max.push(255);
    max.extend(std::iter::repeat_n(b'p', 255));
    v.push(case(
        "255-byte user and password",
        max,
        Expect::Exact(vec![5, 2, 1, 1]),
    ));
    v.push(case(
        "auth VER 3",
        vec![5, 1, 2, 3, 1, b'a', 1, b'b'],
        Expect::Exact(vec![5, 2]),
    ));
    v.push(case(
        "ULEN 0",
        vec![5, 1, 2, 1, 0, 1, b'b'],
        Expect::Exact(vec![5, 2]),
    ));
    v.push(case(
        "no-auth offered with users configured",
        vec![5, 1, 0],
        Expect::Exact(vec![5, 0xFF]),
    ));
    let mut junk = vec![5, 1, 2];
    junk.extend(std::iter::repeat_n(0x01, 5 * KIB));
    v.push(case(
        "5 KiB of 0x01 after the greeting",
        junk,
        Expect::Exact(vec![5, 2, 1, 1]),
    ));
    v
}

fn garbage(random: usize, stride: usize, seed: u64) {
    let echo = TestServer::echo();
    let allow = format!("127.0.0.1/32:{}", echo.addr.port());
    let p = start_proxy(&["--no-bind", "--no-udp", "--allow-dest", allow.as_str()]);
    let fd_base = baseline(&p, echo.addr);
    let mut cases = structural_cases(echo.addr.port());
    cases.extend(enumerated_cases(stride));
    cases.extend(random_cases(random, seed));
    let total = cases.len();
    let started = Instant::now();
    let failures = run_cases(&p, cases);
    eprintln!("garbage: {total} connections in {:?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} of {total} garbage cases failed; first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(10)].join("\n")
    );
    assert_eq!(
        p.metric("socksgate_dns_lookups_total"),
        0,
        "garbage reached the resolver"
    );
    assert_serves(&p, echo.addr);
    assert_settled(&p, fd_base, "after garbage");

    // The same with users configured, for the RFC 1929 sub-negotiation.
    let pa = start_proxy(&["--user", "alice:secret"]);
    let failures = run_cases(&pa, auth_cases());
    assert!(
        failures.is_empty(),
        "auth garbage:\n{}",
        failures.join("\n")
    );
    assert!(
        wait_until(Duration::from_secs(60), &mut || gauges(&pa).idle()),
        "{:?}",
        gauges(&pa)
    );
}

/// 300 garbage connections: every structural case, every 8th invalid version/command/address-type value (plus
/// boundaries), and seeded random input. The full run is `garbage_all_values_and_1000_random`.
#[test]
fn garbage_300_connections() {
    let structural = structural_cases(1).len();
    let enumerated = enumerated_cases(8).len();
    garbage(300usize.saturating_sub(structural + enumerated), 8, 7);
}

#[test]
#[ignore = "long: cargo test --release --test it -- --ignored faults::"]
fn garbage_all_values_and_1000_random() {
    garbage(1000, 1, 8);
}
