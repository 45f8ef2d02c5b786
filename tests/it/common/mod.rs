//! Shared helpers for integration tests: start the real binary, local target servers, raw clients.
//!
//! Every socket gets a generous timeout, every server binds port 0, and readiness is awaited by reading the
//! server's `listening on` line, never by sleeping.
// Each test module uses a different part of these helpers; `pub` marks what they may use
// (the workspace lint would have `pub(crate)` here, which means the same in a test crate).
#![allow(dead_code, unreachable_pub)]

pub mod origin;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Timeout for every test socket operation: generous, so a slow CI machine never flakes.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A socksgate process started for one test; killed on drop.
pub struct Proxy {
    pub child: Child,
    pub addrs: Vec<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    stdout: Option<BufReader<ChildStdout>>,
    pub stderr_path: PathBuf,
}

impl Proxy {
    /// Starts the binary with `args` (add `-l 127.0.0.1:0` yourself or use [`Proxy::start`]).
    pub fn spawn(args: &[&str]) -> Proxy {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_socksgate"));
        cmd.args(args);
        Proxy::spawn_command(cmd, args)
    }

    /// Starts on 127.0.0.1:0 with extra args.
    pub fn start(extra: &[&str]) -> Proxy {
        let mut args = vec!["-l", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Proxy::spawn(&args)
    }

    /// The first listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Number of open file descriptors of the proxy process.
    pub fn fd_count(&self) -> usize {
        fd_count(self.pid())
    }

    /// The proxy's descriptor count now, to prove later (with [`FdBaseline::assert_back`]) that everything opened
    /// since has been closed. Panics when /proc/PID/fd is unreadable: a leak check against 0 would prove nothing.
    pub fn fd_baseline(&self) -> FdBaseline {
        let count = self.fd_count();
        assert!(count > 0, "cannot read /proc/{}/fd", self.pid());
        FdBaseline {
            pid: self.pid(),
            count,
        }
    }

    /// Everything the proxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends SIGHUP and waits until the proxy logs `SIGHUP: done` (every worker has applied the reload).
    pub fn reload(&self) {
        let before = self.log().matches("SIGHUP: done").count();
        self.signal("HUP");
        let start = Instant::now();
        while self.log().matches("SIGHUP: done").count() <= before {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no 'SIGHUP: done' after a reload:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal to the proxy.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit (up to `limit`) and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st.code();
            }
            if start.elapsed() > limit {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fetches /metrics text.
    pub fn metrics_text(&self) -> String {
        let addr = self.metrics.expect("started with --metrics");
        let mut s = connect(addr);
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// Reads one metric value (exact series text, e.g. `socksgate_bytes_total{direction="up"}`).
    pub fn metric(&self, series: &str) -> u64 {
        let text = self.metrics_text();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(series) {
                if let Some(v) = rest.strip_prefix(' ') {
                    return v.trim().parse().expect("metric value");
                }
            }
        }
        panic!("series {series} not found in:\n{text}");
    }

    /// Waits until `cond` holds, polling (bounded by `limit`).
    pub fn wait_for(&self, limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
        wait_until(limit, &mut cond)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test unwinds through here: its proxy's log is the first thing one needs to read, and the
        // harness prints what a failing test wrote (and swallows what a passing one did).
        if thread::panicking() {
            let mut rest = String::new();
            if let Some(mut out) = self.stdout.take() {
                let _ = out.read_to_string(&mut rest);
            }
            eprintln!(
                "---- socksgate (pid {}) stderr, {} ----\n{}\n---- socksgate stdout (unread part) ----\n{rest}",
                self.child.id(),
                self.stderr_path.display(),
                self.log(),
            );
        }
        self.stdout.take();
    }
}

/// A proxy's descriptor count at one moment ([`Proxy::fd_baseline`]).
pub struct FdBaseline {
    pid: u32,
    /// The count when the baseline was taken.
    pub count: usize,
}

impl FdBaseline {
    /// Waits up to `limit` until the proxy holds at most the baseline's descriptors again; otherwise panics with
    /// `what`, both counts and what the descriptors point to.
    pub fn assert_back(&self, limit: Duration, what: &str) {
        self.wait_back(limit, what, |now, base| now <= base);
    }

    /// Like [`FdBaseline::assert_back`], but the count must be the baseline exactly.
    pub fn assert_exactly_back(&self, limit: Duration, what: &str) {
        self.wait_back(limit, what, |now, base| now == base);
    }

    fn wait_back(&self, limit: Duration, what: &str, ok: fn(usize, usize) -> bool) {
        let mut now = 0;
        let back = wait_until(limit, &mut || {
            now = fd_count(self.pid);
            ok(now, self.count)
        });
        assert!(
            back,
            "descriptor leak {what}: baseline {}, now {now} after {limit:?}; open: {:?}",
            self.count,
            fd_targets(self.pid)
        );
    }
}

/// Polls `cond` every 10 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, cond: &mut dyn FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn unique() -> u64 {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A TCP connection with read/write timeouts set.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Like [`connect`], with SO_RCVBUF and SO_SNDBUF set to `bytes` before the SYN (so the window is small from the
/// start): the test's own end of a backpressure path then holds a known amount, whatever the sysctls say.
pub fn connect_buffered(addr: SocketAddr, bytes: usize) -> TcpStream {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    sock.set_recv_buffer_size(bytes).unwrap();
    sock.set_send_buffer_size(bytes).unwrap();
    sock.connect_timeout(&addr.into(), IO_TIMEOUT)
        .expect("connect");
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// The largest receive and send buffers TCP autotuning may grow a socket to on this machine (the third field of
/// /proc/sys/net/ipv4/tcp_rmem and tcp_wmem; generous guesses when unreadable).
pub fn tcp_autotune_max() -> (usize, usize) {
    let max = |name: &str, fallback: usize| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .ok()
            .and_then(|t| t.split_whitespace().nth(2)?.parse().ok())
            .unwrap_or(fallback)
    };
    (max("tcp_rmem", 64 << 20), max("tcp_wmem", 16 << 20))
}

/// An upper bound on what a path through the proxy can hold before the writer blocks, when the proxy's sockets
/// autotune (no `--socket-buffer`) and the test's own sockets are small: `legs` proxy legs the bytes cross (an echo
/// crosses four: two receive queues, two send queues), each at its sysctl maximum, twice over for slack, plus
/// 32 MiB for the test's sockets, splice pipes and relay buffers. A safety valve, not the assertion: tests assert
/// that the writes stall.
pub fn stall_limit(legs: usize) -> usize {
    let (rmem, wmem) = tcp_autotune_max();
    2 * legs.div_ceil(2) * (rmem + wmem) + (32 << 20)
}

/// Reads exactly `n` bytes.
pub fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read_exact");
    buf
}

/// Reads until EOF (bounded by the socket timeout).
pub fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// True when the peer closed (EOF or reset) within the socket timeout.
pub fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// A background TCP server on 127.0.0.1:0 handling each connection on its own thread; stops on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl TestServer {
    /// Starts a server that runs `handler` for every accepted connection.
    pub fn start<F>(handler: F) -> TestServer
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        Self::start_on("127.0.0.1:0", handler)
    }

    /// Same, on a given address (e.g. "[::1]:0").
    pub fn start_on<F>(bind: &str, handler: F) -> TestServer
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        Self::serve(TcpListener::bind(bind).expect("bind test server"), handler)
    }

    /// Same as [`TestServer::start`], with SO_RCVBUF and SO_SNDBUF of every accepted connection set to `bytes`
    /// (set on the listener, which accepted sockets inherit, so the window is small from the SYN-ACK).
    pub fn start_buffered<F>(bytes: usize, handler: F) -> TestServer
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.set_recv_buffer_size(bytes).unwrap();
        sock.set_send_buffer_size(bytes).unwrap();
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind test server");
        sock.listen(128).unwrap();
        Self::serve(sock.into(), handler)
    }

    fn serve<F>(listener: TcpListener, handler: F) -> TestServer
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let handler = Arc::new(handler);
        thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                        let h = Arc::clone(&handler);
                        thread::spawn(move || h(s));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        TestServer { addr, stop }
    }

    /// An echo server: writes back everything, half-closes when the client does.
    pub fn echo() -> TestServer {
        TestServer::start(echo_handler)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Echoes until EOF, then shuts down writing.
pub fn echo_handler(mut s: TcpStream) {
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// A UDP echo server on `bind`; stops on drop of the returned flag holder.
pub struct UdpEcho {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl UdpEcho {
    /// Starts on 127.0.0.1:0.
    pub fn start() -> UdpEcho {
        UdpEcho::on(UdpSocket::bind("127.0.0.1:0").unwrap())
    }

    /// Echoes on an already bound socket (e.g. a dual-stack one).
    pub fn on(s: UdpSocket) -> UdpEcho {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = s.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
        UdpEcho { addr, stop }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Deterministic pseudo-random bytes (xorshift), so payloads are reproducible.
pub fn pseudo_random(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// FNV-1a 64-bit: a cheap, dependency-free digest for comparing payloads.
pub fn digest(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SOCKS5 no-auth CONNECT to `target` through `proxy`; returns the stream after a successful reply, or the REP
/// code on failure.
pub fn socks5_connect(proxy: SocketAddr, target: SocketAddr) -> Result<TcpStream, u8> {
    socks5_connect_on(connect(proxy), target)
}

/// SOCKS5 no-auth CONNECT over an already connected client socket (e.g. one from [`connect_buffered`]).
pub fn socks5_connect_on(mut s: TcpStream, target: SocketAddr) -> Result<TcpStream, u8> {
    s.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_n(&mut s, 2), vec![5, 0]);
    s.write_all(&socks5_request(1, target)).unwrap();
    let rep = read_socks5_reply(&mut s);
    if rep.0 == 0 {
        Ok(s)
    } else {
        Err(rep.0)
    }
}

/// A SOCKS5 request for an IP target.
pub fn socks5_request(cmd: u8, target: SocketAddr) -> Vec<u8> {
    let mut r = vec![5, cmd, 0];
    match target {
        SocketAddr::V4(a) => {
            r.push(1);
            r.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            r.push(4);
            r.extend_from_slice(&a.ip().octets());
        }
    }
    r.extend_from_slice(&target.port().to_be_bytes());
    r
}

/// A SOCKS5 request for a domain target.
pub fn socks5_request_domain(cmd: u8, host: &str, port: u16) -> Vec<u8> {
    let mut r = vec![5, cmd, 0, 3, host.len() as u8];
    r.extend_from_slice(host.as_bytes());
    r.extend_from_slice(&port.to_be_bytes());
    r
}

/// Reads a SOCKS5 reply: (REP, bound address).
pub fn read_socks5_reply(s: &mut TcpStream) -> (u8, SocketAddr) {
    let head = read_n(s, 4);
    assert_eq!(head[0], 5, "reply version");
    let addr = match head[3] {
        1 => {
            let b = read_n(s, 6);
            SocketAddr::from(([b[0], b[1], b[2], b[3]], u16::from_be_bytes([b[4], b[5]])))
        }
        4 => {
            let b = read_n(s, 18);
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&b[..16]);
            SocketAddr::from((ip, u16::from_be_bytes([b[16], b[17]])))
        }
        other => panic!("unexpected ATYP {other} in reply"),
    };
    (head[1], addr)
}

/// True when `curl` is installed (tests that need it are skipped with a message otherwise; `.ci/run` installs it).
pub fn have_curl() -> bool {
    Command::new("curl")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs curl with args and returns (exit code, stdout bytes, stderr text).
pub fn curl(args: &[&str]) -> (i32, Vec<u8>, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .output()
        .expect("run curl");
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ============================================================================================================
// Helpers added by the tests-socks branch (SOCKS5/SOCKS4, real clients, lifecycle). Append-only block.
// ============================================================================================================

/// True when an IPv6 loopback socket can be bound here (tests needing `[::1]` skip otherwise).
pub fn have_ipv6() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

/// A 127.0.0.1 port free now (bound, then released), for a listener the test starts on it later. Another test may take
/// it in between: callers that cannot tolerate that retry, or use [`closed_port`] when nothing is to listen there.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

/// A TCP port nothing listens on, for the rest of the test run: a connect to it on any loopback address is refused.
/// It stays bound (not listening) on the IPv4 wildcard and, where the host has IPv6, on the IPv6 wildcard, so no
/// other test running alongside can take it for a listener or an outgoing connection meanwhile (a port released
/// at once could be handed to one, and a "refused" case would then connect).
pub fn closed_port() -> u16 {
    use socket2::{Domain, Socket, Type};
    static HELD: std::sync::Mutex<Vec<Socket>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..50 {
        let v4 = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        v4.bind(&SocketAddr::from(([0, 0, 0, 0], 0)).into())
            .expect("bind");
        let port = v4.local_addr().unwrap().as_socket().unwrap().port();
        let v6 = match Socket::new(Domain::IPV6, Type::STREAM, None) {
            Err(_) => None, // no IPv6 on this host: nothing to hold there
            Ok(v6) => {
                v6.set_only_v6(true).expect("IPV6_V6ONLY");
                let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
                match v6.bind(&any6.into()) {
                    Ok(()) => Some(v6),
                    Err(_) => continue, // taken on IPv6: try another port
                }
            }
        };
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        held.push(v4);
        held.extend(v6);
        return port;
    }
    panic!("no port free on both families after 50 tries");
}

/// Reads until the peer closes (EOF or reset) or the socket's read timeout passes. Returns the bytes received and
/// whether the connection was closed (false: the timeout passed with the connection still open).
pub fn read_until_closed(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return (out, false)
            }
            Err(_) => return (out, true),
        }
    }
}

/// Writes `data` and reads back exactly as many bytes, asserting they are identical (an echo round trip).
pub fn assert_echo(s: &mut TcpStream, data: &[u8]) {
    // Written from a second thread while this one reads: writing everything first would need the whole round trip
    // to fit in the kernel's socket buffers, which is a sysctl, not a property of the proxy.
    let mut w = s.try_clone().expect("clone");
    let out = data.to_vec();
    let writer = thread::spawn(move || w.write_all(&out));
    let back = read_n(s, data.len());
    writer
        .join()
        .expect("writer thread")
        .expect("write through tunnel");
    assert!(
        back == data,
        "echo mismatch: sent {} bytes, got different bytes back",
        data.len()
    );
}

/// SOCKS5 greeting offering only username/password, then the RFC 1929 sub-negotiation. Returns the stream and
/// the status byte of the RFC 1929 reply (0 = success). Asserts the server chose method 02 and answered VER 1.
pub fn socks5_login(proxy: SocketAddr, user: &str, pass: &str) -> (TcpStream, u8) {
    let mut s = connect(proxy);
    s.write_all(&[5, 1, 2]).unwrap();
    assert_eq!(read_n(&mut s, 2), vec![5, 2], "method selection");
    s.write_all(&socks5_user_pass(user.as_bytes(), pass.as_bytes()))
        .unwrap();
    let st = read_n(&mut s, 2);
    assert_eq!(st[0], 1, "RFC 1929 reply VER must be 1");
    (s, st[1])
}

/// An RFC 1929 request `01 ULEN UNAME PLEN PASSWD`.
pub fn socks5_user_pass(user: &[u8], pass: &[u8]) -> Vec<u8> {
    let mut v = vec![1, user.len() as u8];
    v.extend_from_slice(user);
    v.push(pass.len() as u8);
    v.extend_from_slice(pass);
    v
}

/// SOCKS5 user/password login then CONNECT to `target`: the stream after success, or the REP code (or 0xFF00 +
/// auth status when authentication failed).
pub fn socks5_connect_auth(
    proxy: SocketAddr,
    user: &str,
    pass: &str,
    target: SocketAddr,
) -> Result<TcpStream, u16> {
    let (mut s, st) = socks5_login(proxy, user, pass);
    if st != 0 {
        return Err(0xFF00 | st as u16);
    }
    s.write_all(&socks5_request(1, target)).unwrap();
    let (rep, _) = read_socks5_reply(&mut s);
    if rep == 0 {
        Ok(s)
    } else {
        Err(rep as u16)
    }
}

/// A SOCKS4 (or, with `domain`, SOCKS4a: DSTIP 0.0.0.1) request `04 CD DSTPORT DSTIP USERID 00 [DOMAIN 00]`.
pub fn socks4_request(
    cmd: u8,
    port: u16,
    ip: [u8; 4],
    userid: &[u8],
    domain: Option<&str>,
) -> Vec<u8> {
    let mut v = vec![4, cmd];
    v.extend_from_slice(&port.to_be_bytes());
    match domain {
        Some(_) => v.extend_from_slice(&[0, 0, 0, 1]),
        None => v.extend_from_slice(&ip),
    }
    v.extend_from_slice(userid);
    v.push(0);
    if let Some(d) = domain {
        v.extend_from_slice(d.as_bytes());
        v.push(0);
    }
    v
}

/// An echo server that also reports the peer address of every connection it accepts (the proxy's outbound
/// socket), so a test can compare it with BND.ADDR/BND.PORT.
pub fn recording_echo(bind: &str) -> (TestServer, std::sync::mpsc::Receiver<SocketAddr>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let server = TestServer::start_on(bind, move |s| {
        if let Ok(peer) = s.peer_addr() {
            let _ = tx.lock().unwrap().send(peer);
        }
        echo_handler(s)
    });
    (server, rx)
}

/// A fresh path in this test process's temp directory (the file is not created).
pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("socksgate-test-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{}-{name}", unique()))
}

// ---------------------------------------------------------------------------------------------------------------
// tests-ops helpers (udp_bind.rs, operations.rs)
// ---------------------------------------------------------------------------------------------------------------

/// Reads until the peer closes (EOF or reset) and returns what arrived. Unlike [`read_to_end`], a connection that
/// stays open is a failure: panics if nothing closes it within 10 s.
pub fn read_all_until_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("connection still open after 10 s (received {out:?})")
            }
            Err(_) => return out,
        }
    }
}

/// Waits (up to 10 s) until `series` reads exactly `want`, and fails with the last value otherwise. Counters may be
/// bumped just after the bytes a test observes (a reply is sent, then counted), so exact checks poll.
pub fn wait_metric(proxy: &Proxy, series: &str, want: u64) {
    let mut last = 0;
    let ok = wait_until(Duration::from_secs(10), &mut || {
        last = proxy.metric(series);
        last == want
    });
    assert!(ok, "{series} is {last}, expected {want}");
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers for tests/it/faults.rs: starting the proxy under resource limits, process accounting from /proc, resets.
// ---------------------------------------------------------------------------------------------------------------

impl Proxy {
    /// Like [`Proxy::spawn`], but runs `shell_prefix` (e.g. `ulimit -n 64`) in `sh -c` first, which then `exec`s the
    /// binary with `args`: the pid stays the same, so `pid()`, `fd_count()` and `signal()` reach the proxy itself.
    pub fn spawn_in_shell(shell_prefix: &str, args: &[&str]) -> Proxy {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("{shell_prefix}; exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_socksgate"))
            .args(args);
        Proxy::spawn_command(cmd, args)
    }

    /// Starts `cmd`, which must end up running the socksgate binary with `args`, and waits for its `listening on`
    /// lines (and the metrics line with `--metrics`), as [`Proxy::spawn`] does.
    pub fn spawn_command(mut cmd: Command, args: &[&str]) -> Proxy {
        let dir = std::env::temp_dir().join(format!("socksgate-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let stderr_path = dir.join(format!("stderr-cmd-{}.log", unique()));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut child = cmd
            .env(
                "RUST_LOG",
                std::env::var("SOCKSGATE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn socksgate");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut addrs = Vec::new();
        let mut metrics = None;
        let expected = args
            .iter()
            .filter(|a| **a == "-l" || **a == "--listen")
            .count()
            .max(1);
        let mut line = String::new();
        while addrs.len() < expected || (args.contains(&"--metrics") && metrics.is_none()) {
            line.clear();
            let n = stdout.read_line(&mut line).expect("read stdout");
            if n == 0 {
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                panic!("socksgate exited before listening: {err}");
            }
            if let Some(a) = line.trim().strip_prefix("socksgate: listening on ") {
                addrs.push(a.parse().expect("listen addr"));
            } else if let Some(a) = line.trim().strip_prefix("socksgate: metrics on http://") {
                metrics = Some(
                    a.trim_end_matches("/metrics")
                        .parse()
                        .expect("metrics addr"),
                );
            }
        }
        Proxy {
            child,
            addrs,
            metrics,
            stdout: Some(stdout),
            stderr_path,
        }
    }
}

/// Resident set size of a process in KiB (`VmRSS` in /proc/PID/status); 0 when unreadable.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Clock ticks per second for /proc/PID/stat times (`getconf CLK_TCK`, 100 when unavailable).
pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// CPU time a process has used so far (utime + stime from /proc/PID/stat, all threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // The command name may contain spaces and parentheses: fields are counted after the last ')'. There, index 0
    // is field 3 (state), so utime (field 14) is index 11 and stime (field 15) index 12.
    let rest = &stat[stat.rfind(')').expect("stat format") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    utime + stime
}

/// What each open descriptor of a process points to (`socket:[N]`, `anon_inode:[eventpoll]`, ...), for diagnostics.
pub fn fd_targets(pid: u32) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| {
                    std::fs::read_link(e.path())
                        .map(|t| t.display().to_string())
                        .unwrap_or_else(|_| "?".into())
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Closes a socket with a reset instead of a FIN (SO_LINGER 0), as a crashing or hostile peer would.
pub fn abort_close(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// `user:pass` in base64 for a Basic Proxy-Authorization header (written out here, independent of the
/// proxy's own decoder).
pub fn base64_basic(user: &str, pass: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let data = format!("{user}:{pass}").into_bytes();
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Reads an HTTP head through its blank line, byte by byte so nothing after it is consumed; `None` when the peer
/// closes or fails first, or the head passes 64 KiB.
pub fn read_http_head_bytes(s: &mut impl Read) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= 64 * 1024 {
            return None;
        }
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    Some(head)
}

/// An HTTP origin answering every request with `body` (`Connection: close`).
pub fn http_close_origin(body: Vec<u8>) -> TestServer {
    TestServer::start(move |mut s| {
        if read_http_head_bytes(&mut s).is_none() {
            return;
        }
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(&body);
    })
}

/// A target that reads an 8-byte big-endian length and sends that many pseudo-random bytes, or with length 0
/// counts what the client uploads until EOF and answers with the count.
pub fn blob_server() -> TestServer {
    TestServer::start(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut len = [0u8; 8];
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let n = u64::from_be_bytes(len) as usize;
        if n == 0 {
            let mut total = 0u64;
            let mut buf = vec![0u8; 65536];
            while let Ok(k) = s.read(&mut buf) {
                if k == 0 {
                    break;
                }
                total += k as u64;
            }
            let _ = s.write_all(&total.to_be_bytes());
            return;
        }
        let data = pseudo_random(n as u64, n);
        let _ = s.write_all(&data);
    })
}
