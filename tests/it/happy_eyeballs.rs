//! Happy Eyeballs (RFC 8305) end to end: a name with a black-holed address and a working one connects after one
//! attempt delay, not after the black-holed attempt's timeout; both failing gives the right SOCKS5 code within
//! `--connect-timeout`; the losing attempt's socket is closed. The same for an `--upstream` proxy given by name,
//! whose own addresses the destination rules do not cover.
//!
//! Black-holing on loopback without a network namespace: a listener with backlog 0 whose accept queue is already
//! full drops every further SYN silently (Linux counts them as ListenOverflows), so a connect to it neither
//! succeeds nor fails until the client gives up, exactly like a SYN-dropping path.

use crate::common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// A port on `ip` that swallows SYNs: a backlog-0 listener whose one queue place is taken and never accepted.
struct BlackHole {
    _listener: socket2::Socket,
    _filler: TcpStream,
    addr: SocketAddr,
}

impl BlackHole {
    fn on(addr: SocketAddr) -> Option<BlackHole> {
        let domain = socket2::Domain::for_address(addr);
        let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None).ok()?;
        if addr.is_ipv6() {
            sock.set_only_v6(true).ok()?;
        }
        sock.bind(&addr.into()).ok()?;
        sock.listen(0).ok()?;
        let addr = sock.local_addr().ok()?.as_socket()?;
        let filler = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
        let hole = BlackHole {
            _listener: sock,
            _filler: filler,
            addr,
        };
        // Proof that it swallows: a second connect must neither succeed nor fail quickly.
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Some(hole),
            _ => None,
        }
    }
}

/// An echo server on `ip:port` (port 0: any).
fn echo_on(ip: IpAddr, port: u16) -> Option<TestServer> {
    let bind = SocketAddr::new(ip, port).to_string();
    TcpListener::bind(&bind).ok()?;
    Some(TestServer::start_on(&bind, echo_handler))
}

/// A black hole on `bad` and an echo server on `good`, on the same port (a name carries no ports).
fn pair(bad: IpAddr, good: IpAddr) -> Option<(BlackHole, TestServer)> {
    for _ in 0..20 {
        let hole = BlackHole::on(SocketAddr::new(bad, 0))?;
        if let Some(server) = echo_on(good, hole.addr.port()) {
            return Some((hole, server));
        }
    }
    None
}

/// The two addresses to use: IPv6 and IPv4 loopback when IPv6 works here, else two IPv4 loopback addresses (the
/// scheduler's attempt delay applies within a family too).
fn families() -> (IpAddr, IpAddr) {
    if have_ipv6() {
        ("::1".parse().unwrap(), "127.0.0.1".parse().unwrap())
    } else {
        eprintln!("note: no IPv6 loopback here; using 127.0.0.2 in its place");
        ("127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap())
    }
}

/// SOCKS5h CONNECT to `name:port`; the reply code and how long it took.
fn connect_name(proxy: SocketAddr, name: &str, port: u16) -> (u8, Duration, TcpStream) {
    let mut s = connect(proxy);
    s.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_n(&mut s, 2), vec![5, 0]);
    let started = Instant::now();
    s.write_all(&socks5_request_domain(1, name, port)).unwrap();
    let (rep, _) = read_socks5_reply(&mut s);
    (rep, started.elapsed(), s)
}

fn assert_echo(s: &mut TcpStream) {
    s.write_all(b"happy eyeballs").unwrap();
    let mut buf = [0u8; 14];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"happy eyeballs");
}

fn black_holed_first_then_working(bad: IpAddr, good: IpAddr) {
    let Some((hole, server)) = pair(bad, good) else {
        eprintln!(
            "note: cannot black-hole {bad} here (backlog-0 listener does not drop SYNs); skipped"
        );
        return;
    };
    let spec = format!("dual.test={bad},{good}");
    let proxy = Proxy::start(&["--resolve", &spec, "--connect-timeout", "10s"]);
    let before = proxy.fd_count();
    let (rep, took, mut s) = connect_name(proxy.addr(), "dual.test", hole.addr.port());
    assert_eq!(rep, 0, "connected through {good}");
    // One attempt delay (250 ms) plus scheduling; the old serial path waited half the connect timeout (5 s).
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_echo(&mut s);
    drop(server);
    // The losing attempt was closed: the proxy holds the client and outbound sockets of this session only.
    assert!(
        proxy.wait_for(Duration::from_secs(5), || proxy.fd_count() <= before + 2),
        "fds: {} before, {} now",
        before,
        proxy.fd_count()
    );
    drop(s);
    assert!(
        proxy.wait_for(Duration::from_secs(5), || proxy.fd_count() <= before),
        "fds: {} before, {} after the session",
        before,
        proxy.fd_count()
    );
}

#[test]
fn black_holed_ipv6_then_working_ipv4_connects_fast() {
    let (v6, v4) = families();
    black_holed_first_then_working(v6, v4);
}

#[test]
fn black_holed_ipv4_then_working_ipv6_connects_fast() {
    let (v6, v4) = families();
    black_holed_first_then_working(v4, v6);
}

#[test]
fn working_address_first_needs_no_second_attempt() {
    let (v6, v4) = families();
    let Some((hole, _server)) = pair(v6, v4) else {
        eprintln!("note: cannot black-hole {v6} here; skipped");
        return;
    };
    let spec = format!("first.test={v4},{v6}");
    let proxy = Proxy::start(&["--resolve", &spec]);
    let (rep, took, mut s) = connect_name(proxy.addr(), "first.test", hole.addr.port());
    assert_eq!(rep, 0);
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_echo(&mut s);
}

#[test]
fn both_black_holed_times_out_within_the_connect_timeout() {
    let (v6, v4) = families();
    let Some(a) = BlackHole::on(SocketAddr::new(v6, 0)) else {
        eprintln!("note: cannot black-hole {v6} here; skipped");
        return;
    };
    let Some(b) = BlackHole::on(SocketAddr::new(v4, a.addr.port())) else {
        eprintln!(
            "note: cannot black-hole {v4}:{} here; skipped",
            a.addr.port()
        );
        return;
    };
    let spec = format!("dead.test={v6},{v4}");
    let proxy = Proxy::start(&["--resolve", &spec, "--connect-timeout", "1500ms"]);
    let before = proxy.fd_count();
    let (rep, took, _s) = connect_name(proxy.addr(), "dead.test", b.addr.port());
    assert_eq!(rep, 0x06, "TTL expired (connect timed out)");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "took {took:?} for a 1.5 s connect timeout"
    );
    // Both attempts were closed.
    assert!(
        proxy.wait_for(Duration::from_secs(5), || proxy.fd_count() <= before + 1),
        "fds: {} before, {} now",
        before,
        proxy.fd_count()
    );
}

#[test]
fn both_refused_reports_refused_at_once() {
    let (v6, v4) = families();
    let port = closed_port();
    let spec = format!("refused.test={v6},{v4}");
    let proxy = Proxy::start(&["--resolve", &spec, "--connect-timeout", "10s"]);
    let (rep, took, _s) = connect_name(proxy.addr(), "refused.test", port);
    assert_eq!(rep, 0x05, "connection refused");
    // A refusal frees the next attempt at once: no attempt delay, no timeout.
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn black_holed_then_refused_reports_the_timeout() {
    let (v6, v4) = families();
    let Some(hole) = BlackHole::on(SocketAddr::new(v6, 0)) else {
        eprintln!("note: cannot black-hole {v6} here; skipped");
        return;
    };
    // Nothing listens on the IPv4 side of this port (bind-probe it).
    if TcpListener::bind(SocketAddr::new(v4, hole.addr.port())).is_err() {
        eprintln!("note: {v4}:{} is in use; skipped", hole.addr.port());
        return;
    }
    let spec = format!("half.test={v6},{v4}");
    let proxy = Proxy::start(&["--resolve", &spec, "--connect-timeout", "1s"]);
    let (rep, took, _s) = connect_name(proxy.addr(), "half.test", hole.addr.port());
    // The refusal came first, but an attempt was still pending when the deadline passed: that is a timeout.
    assert_eq!(rep, 0x06);
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn attempt_delay_flag_is_validated() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_socksgate"))
        .args(["-l", "127.0.0.1:0", "--connection-attempt-delay", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--connection-attempt-delay"), "{err}");
}

/// SOCKS5h CONNECT through a proxy that chains to `--upstream`: the reply code and how long it took.
fn connect_via(front: SocketAddr, name: &str, port: u16) -> (u8, Duration, TcpStream) {
    connect_name(front, name, port)
}

#[test]
fn upstream_by_name_black_holed_first_then_working_connects_fast() {
    let (v6, v4) = families();
    let echo = TestServer::echo();
    // The upstream proxy listens on v4:P; the first address of its name black-holes on v6:P.
    let mut found = None;
    for _ in 0..10 {
        let upstream = Proxy::spawn(&[
            "-l",
            &SocketAddr::new(v4, 0).to_string(),
            "--resolve",
            &format!("target.test={}", echo.addr.ip()),
        ]);
        if let Some(hole) = BlackHole::on(SocketAddr::new(v6, upstream.addr().port())) {
            found = Some((upstream, hole));
            break;
        }
    }
    let Some((upstream, hole)) = found else {
        eprintln!("note: cannot black-hole {v6} here; skipped");
        return;
    };
    let port = hole.addr.port();
    // The destination rules deny loopback: they are for clients' targets, not for the operator's upstream.
    let front = Proxy::start(&[
        "--resolve",
        &format!("up.test={v6},{v4}"),
        "--upstream",
        &format!("socks5://up.test:{port}"),
        "--deny-dest",
        "127.0.0.0/8",
        "--deny-dest",
        "::1/128",
        "--dns",
        &format!("127.0.0.1:{}", closed_port()),
        "--connect-timeout",
        "10s",
    ]);
    assert!(
        front.wait_for(Duration::from_secs(10), || front
            .log()
            .contains("upstream proxy up.test resolves to")),
        "{}",
        front.log()
    );
    let base = front.fd_baseline();
    let (rep, took, mut s) = connect_via(front.addr(), "target.test", echo.addr.port());
    assert_eq!(rep, 0, "through the upstream at {v4}:{port}");
    // One attempt delay (250 ms); dialling the addresses in turn would have waited for the black hole.
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_echo(&mut s);
    drop(s);
    // The attempt to the black hole was closed with the session's sockets.
    base.assert_back(
        Duration::from_secs(5),
        "after a session through the upstream",
    );
    drop(upstream);
}

#[test]
fn upstream_name_that_does_not_resolve_is_a_warning_then_a_failure() {
    let front = Proxy::start(&["--upstream", "socks5://nowhere.invalid:1080"]);
    assert!(
        front.wait_for(Duration::from_secs(10), || front
            .log()
            .contains("upstream proxy nowhere.invalid does not resolve now")),
        "{}",
        front.log()
    );
    let (rep, took, _s) = connect_via(front.addr(), "target.test", 80);
    assert_eq!(
        rep, 0x01,
        "general failure: the upstream proxy is not reachable"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn forwarded_http_through_an_http_upstream_given_by_name() {
    use common::origin::{HttpConn, Origin};
    let origin = Origin::start();
    let upstream = Proxy::start(&[]);
    let front = Proxy::start(&[
        "--resolve",
        &format!("up.test={}", upstream.addr().ip()),
        "--upstream",
        &format!("http://up.test:{}", upstream.addr().port()),
    ]);
    let mut c = HttpConn::connect(front.addr());
    for path in ["/first", "/second"] {
        c.send(
            format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
                origin.url(path),
                origin.authority()
            )
            .as_bytes(),
        );
        let r = c.read_response(false);
        assert_eq!(r.status, 200, "{}", r.head_text());
        assert_eq!(r.body, format!("path={path}\n").into_bytes());
    }
    assert_eq!(origin.requests().len(), 2);
}
