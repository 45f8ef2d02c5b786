//! Operations against the real binary: client and destination rules, users files (plain and hashed) and their
//! SIGHUP reload, per-user limits, chaining through an upstream proxy, the PROXY protocol and /metrics.

use crate::common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use socksgate::proto::proxy_protocol::{encode_v1, encode_v2, ProxyHeader};

/// Bound for polling metrics, logs and reloads.
const POLL_LIMIT: Duration = Duration::from_secs(10);

fn refused_metric(reason: &str) -> String {
    format!("socksgate_connections_refused_total{{reason=\"{reason}\"}}")
}

fn connect_errors(kind: &str) -> String {
    format!("socksgate_connect_errors_total{{kind=\"{kind}\"}}")
}

fn with_metrics(extra: &[&str]) -> Proxy {
    let mut args = vec!["--metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

/// Sends `n` pseudo-random bytes through a tunnel to an echo server and checks they come back intact.
fn echo_check(s: &mut TcpStream, seed: u64, n: usize) {
    let data = pseudo_random(seed, n);
    let mut w = s.try_clone().unwrap();
    let d2 = data.clone();
    let writer = thread::spawn(move || w.write_all(&d2).unwrap());
    let back = read_n(s, n);
    writer.join().unwrap();
    assert_eq!(digest(&back), digest(&data), "echoed bytes differ");
}

/// The outcome of a SOCKS5 session attempt.
#[derive(Debug, PartialEq, Eq)]
enum Socks5Err {
    /// The proxy refused every offered method (0xFF).
    NoMethod,
    /// RFC 1929 status other than 0.
    AuthStatus(u8),
    /// REP other than 0.
    Rep(u8),
}

/// SOCKS5 CONNECT with RFC 1929 user/password, with an IP target.
fn socks5_auth_connect(
    proxy: SocketAddr,
    user: &str,
    pass: &str,
    target: SocketAddr,
) -> Result<TcpStream, Socks5Err> {
    socks5_auth_request(proxy, user, pass, &socks5_request(1, target))
}

fn socks5_auth_request(
    proxy: SocketAddr,
    user: &str,
    pass: &str,
    request: &[u8],
) -> Result<TcpStream, Socks5Err> {
    let mut s = connect(proxy);
    s.write_all(&[5, 1, 2]).unwrap();
    let m = read_n(&mut s, 2);
    if m == [5, 0xFF] {
        return Err(Socks5Err::NoMethod);
    }
    assert_eq!(m, vec![5, 2], "method choice");
    let mut a = vec![1, user.len() as u8];
    a.extend_from_slice(user.as_bytes());
    a.push(pass.len() as u8);
    a.extend_from_slice(pass.as_bytes());
    s.write_all(&a).unwrap();
    let st = read_n(&mut s, 2);
    assert_eq!(st[0], 1, "RFC 1929 reply version");
    if st[1] != 0 {
        let rest = read_all_until_closed(&mut s);
        assert!(
            rest.is_empty(),
            "bytes after a failed authentication: {rest:?}"
        );
        return Err(Socks5Err::AuthStatus(st[1]));
    }
    s.write_all(request).unwrap();
    let (rep, _) = read_socks5_reply(&mut s);
    if rep != 0 {
        return Err(Socks5Err::Rep(rep));
    }
    Ok(s)
}

/// SOCKS5 no-auth CONNECT with a domain target; Ok(stream) or Err(REP).
fn socks5_connect_domain(proxy: SocketAddr, host: &str, port: u16) -> Result<TcpStream, u8> {
    let mut s = connect(proxy);
    s.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_n(&mut s, 2), vec![5, 0]);
    s.write_all(&socks5_request_domain(1, host, port)).unwrap();
    let (rep, _) = read_socks5_reply(&mut s);
    if rep == 0 {
        Ok(s)
    } else {
        Err(rep)
    }
}

/// Standard base64 (RFC 4648 §4) with padding, for Basic credentials.
fn base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Reads an HTTP response head (through the blank line) byte by byte, so no tunnel byte is consumed.
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            other => panic!(
                "response head cut short ({other:?}): {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
        assert!(head.len() < 16 * 1024, "response head too long");
    }
    String::from_utf8(head).expect("ASCII head")
}

fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line {head:?}"))
}

/// HTTP CONNECT through `proxy`; returns the status and the stream (the tunnel when the status is 2xx).
fn http_connect(proxy: SocketAddr, target: &str, creds: Option<(&str, &str)>) -> (u16, TcpStream) {
    let mut s = connect(proxy);
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((u, p)) = creds {
        req.push_str(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64(format!("{u}:{p}").as_bytes())
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let head = read_head(&mut s);
    (status_of(&head), s)
}

/// A port on 127.0.0.1 that refuses connections: the socket is bound (so nobody else takes the port) but never
/// listens. Keep the returned socket alive for as long as the port must stay refused.
fn refusing_port() -> (socket2::Socket, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    (s, addr)
}

/// A scratch directory for users files.
fn scratch_dir() -> PathBuf {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "socksgate-ops-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Replaces a file atomically (write + rename), so a reload never reads half a file.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits until the proxy holds exactly `baseline` descriptors again (a failure path must not leak sockets).
fn assert_fds_back(baseline: &FdBaseline, what: &str) {
    baseline.assert_exactly_back(POLL_LIMIT, what);
}

/// An echo server that also counts its connections (to prove a denied target was never contacted).
fn counting_echo() -> (TestServer, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&count);
    let server = TestServer::start(move |s| {
        c2.fetch_add(1, Ordering::SeqCst);
        echo_handler(s)
    });
    (server, count)
}

// ---------------------------------------------------------------------------------------------------------------
// Client and destination rules
// ---------------------------------------------------------------------------------------------------------------

/// --allow-client 10.0.0.0/8: a client from 127.0.0.1 is closed at once without a single byte, and counted.
#[test]
fn allow_client_refuses_other_networks() {
    let proxy = with_metrics(&["--allow-client", "10.0.0.0/8"]);
    let baseline = proxy.fd_baseline();
    let mut s = connect(proxy.addr());
    let _ = s.write_all(&[5, 1, 0]);
    let got = read_all_until_closed(&mut s);
    assert!(got.is_empty(), "a refused client got bytes: {got:?}");
    assert!(wait_until(POLL_LIMIT, &mut || proxy
        .metric(&refused_metric("client_acl"))
        == 1));
    // Refusals hold nothing: 20 more and the descriptor count is back where it was.
    for _ in 0..20 {
        let mut s = connect(proxy.addr());
        assert!(read_all_until_closed(&mut s).is_empty());
    }
    wait_metric(&proxy, &refused_metric("client_acl"), 21);
    assert_fds_back(&baseline, "after refused clients");
    wait_metric(&proxy, "socksgate_connections_accepted_total", 21);
    wait_metric(
        &proxy,
        "socksgate_handshakes_total{protocol=\"socks5\",outcome=\"ok\"}",
        0,
    );
}

/// --deny-dest 127.0.0.0/8: a literal address and a name resolving into the block both get REP 0x02 (HTTP 403),
/// and the target never sees a connection.
#[test]
fn deny_dest_applies_to_ips_and_resolved_names() {
    let (echo, contacts) = counting_echo();
    let proxy = with_metrics(&[
        "--deny-dest",
        "127.0.0.0/8",
        "--resolve",
        "evil.test=127.0.0.1",
    ]);
    assert_eq!(socks5_connect(proxy.addr(), echo.addr).err(), Some(0x02));
    assert_eq!(
        socks5_connect_domain(proxy.addr(), "evil.test", echo.addr.port()).err(),
        Some(0x02)
    );
    let (status, _) = http_connect(
        proxy.addr(),
        &format!("evil.test:{}", echo.addr.port()),
        None,
    );
    assert_eq!(status, 403);
    wait_metric(&proxy, &connect_errors("not_allowed"), 3);
    wait_metric(&proxy, "socksgate_dns_lookups_total", 2);
    assert_eq!(
        contacts.load(Ordering::SeqCst),
        0,
        "a denied target was contacted"
    );
}

/// --allow-dest with port ranges: only the listed ports pass; a port outside is 0x02, a port inside is attempted.
#[test]
fn allow_dest_port_ranges() {
    let (echo, contacts) = counting_echo();
    let port = echo.addr.port();
    assert!(port > 1024);
    // 1-1024 only: the echo's (ephemeral) port is refused by policy; port 1 passes the rules and is refused by
    // the kernel instead (0x05), which shows the rule allowed it.
    let low = with_metrics(&["--allow-dest", "127.0.0.1:1-1024"]);
    assert_eq!(socks5_connect(low.addr(), echo.addr).err(), Some(0x02));
    assert_eq!(
        socks5_connect(low.addr(), "127.0.0.1:1".parse().unwrap()).err(),
        Some(0x05)
    );
    // Boundaries: a range ending just below the port denies it; a range of exactly the port allows it.
    let below = format!("127.0.0.1:1-{}", port - 1);
    let p = Proxy::start(&["--allow-dest", &below]);
    assert_eq!(socks5_connect(p.addr(), echo.addr).err(), Some(0x02));
    let exact = format!("127.0.0.1:{port}-{port}");
    let p = Proxy::start(&["--allow-dest", &exact]);
    let mut s = socks5_connect(p.addr(), echo.addr).expect("port inside the range");
    echo_check(&mut s, 1, 10_000);
    // Another address on an allowed port is still outside the rule.
    assert_eq!(
        socks5_connect(p.addr(), SocketAddr::from(([127, 0, 0, 2], port))).err(),
        Some(0x02)
    );
    assert_eq!(contacts.load(Ordering::SeqCst), 1);
}

/// --deny-dest private: loopback IPv4 and IPv6 and a name resolving to loopback are all refused.
#[test]
fn deny_dest_private_keyword() {
    let (echo, contacts) = counting_echo();
    let port = echo.addr.port();
    let proxy = Proxy::start(&["--deny-dest", "private"]);
    assert_eq!(socks5_connect(proxy.addr(), echo.addr).err(), Some(0x02));
    assert_eq!(
        socks5_connect(
            proxy.addr(),
            SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], port))
        )
        .err(),
        Some(0x02)
    );
    assert_eq!(
        socks5_connect_domain(proxy.addr(), "localhost", port).err(),
        Some(0x02)
    );
    // IPv4-mapped IPv6 loopback is loopback too.
    let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{port}").parse().unwrap();
    assert_eq!(socks5_connect(proxy.addr(), mapped).err(), Some(0x02));
    assert_eq!(contacts.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------------------------------
// Users: plain and hashed, reload, limits
// ---------------------------------------------------------------------------------------------------------------

fn sha512_crypt(pass: &str) -> String {
    use sha_crypt::{Algorithm, Params, PasswordHasher, ShaCrypt};
    let h = ShaCrypt::new(Algorithm::Sha512Crypt, Params::new(1000).unwrap())
        .hash_password_with_salt(pass.as_bytes(), b"opsTestSalt1")
        .unwrap()
        .to_string();
    assert!(h.starts_with("$6$"), "{h}");
    h
}

fn bcrypt_2b(pass: &str) -> String {
    let h = bcrypt::hash(pass, 4).unwrap();
    assert!(h.starts_with("$2b$04$"), "{h}");
    h
}

/// A users file with a plain, a `$6$` and a `$2b$` entry: each authenticates over SOCKS5 and over HTTP
/// Proxy-Authorization; a wrong password fails both ways and is counted.
#[test]
fn users_file_plain_sha512_bcrypt_over_socks5_and_http() {
    let echo = TestServer::echo();
    let dir = scratch_dir();
    let users = dir.join("users");
    std::fs::write(
        &users,
        format!(
            "# test users\nplain:plain-pw\nsha:{}\nbc:{}\n",
            sha512_crypt("sha-pw"),
            bcrypt_2b("bc-pw")
        ),
    )
    .unwrap();
    let proxy = with_metrics(&["--users", users.to_str().unwrap()]);
    let target = echo.addr.to_string();
    for (k, (user, pass)) in [("plain", "plain-pw"), ("sha", "sha-pw"), ("bc", "bc-pw")]
        .into_iter()
        .enumerate()
    {
        let mut s = socks5_auth_connect(proxy.addr(), user, pass, echo.addr)
            .unwrap_or_else(|e| panic!("SOCKS5 as {user}: {e:?}"));
        echo_check(&mut s, k as u64, 5000);
        let (status, mut t) = http_connect(proxy.addr(), &target, Some((user, pass)));
        assert_eq!(status, 200, "HTTP CONNECT as {user}");
        echo_check(&mut t, 10 + k as u64, 5000);
        // A wrong password, for the same user.
        assert_eq!(
            socks5_auth_connect(proxy.addr(), user, "wrong", echo.addr).err(),
            Some(Socks5Err::AuthStatus(1))
        );
        let (status, _) = http_connect(proxy.addr(), &target, Some((user, "wrong")));
        assert_eq!(status, 407, "wrong password over HTTP as {user}");
    }
    // No credentials at all over HTTP is a 407 too (not counted as a failure: nothing was tried).
    let (status, _s) = http_connect(proxy.addr(), &target, None);
    assert_eq!(status, 407);
    // A SOCKS5 client offering only "no authentication" is refused with 0xFF.
    let mut s = connect(proxy.addr());
    s.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_n(&mut s, 2), vec![5, 0xFF]);
    wait_metric(&proxy, "socksgate_auth_failures_total", 7);
    let _ = std::fs::remove_dir_all(dir);
}

/// SIGHUP: a user added to the file works, a removed one fails with status 0x01, and a tunnel opened before the
/// reload keeps working.
#[test]
fn sighup_reload_adds_and_removes_users_and_keeps_tunnels() {
    let echo = TestServer::echo();
    let dir = scratch_dir();
    let users = dir.join("users");
    write_atomic(&users, "alice:alice-pw\nbob:bob-pw\n");
    let proxy = Proxy::start(&["--users", users.to_str().unwrap()]);
    let mut tunnel =
        socks5_auth_connect(proxy.addr(), "alice", "alice-pw", echo.addr).expect("alice before");
    echo_check(&mut tunnel, 1, 3000);
    assert!(socks5_auth_connect(proxy.addr(), "bob", "bob-pw", echo.addr).is_ok());
    assert_eq!(
        socks5_auth_connect(proxy.addr(), "carol", "carol-pw", echo.addr).err(),
        Some(Socks5Err::AuthStatus(1))
    );

    write_atomic(
        &users,
        "alice:alice-pw\ncarol:$CAROL\n"
            .replace("$CAROL", &bcrypt_2b("carol-pw"))
            .as_str(),
    );
    proxy.reload();
    assert!(
        wait_until(POLL_LIMIT, &mut || proxy
            .log()
            .contains("SIGHUP: reloaded 2 users")),
        "no reload line in the log:\n{}",
        proxy.log()
    );
    // Each worker picks the new table up from its command channel right after the control thread logs it; a
    // connection may land on either worker, so every check polls.
    assert!(
        wait_until(POLL_LIMIT, &mut || {
            socks5_auth_connect(proxy.addr(), "bob", "bob-pw", echo.addr).err()
                == Some(Socks5Err::AuthStatus(1))
        }),
        "removed user still authenticates"
    );
    let mut carol = None;
    assert!(
        wait_until(POLL_LIMIT, &mut || {
            carol = socks5_auth_connect(proxy.addr(), "carol", "carol-pw", echo.addr).ok();
            carol.is_some()
        }),
        "added user cannot authenticate"
    );
    echo_check(carol.as_mut().unwrap(), 2, 3000);
    echo_check(&mut tunnel, 3, 3000);
    assert!(socks5_auth_connect(proxy.addr(), "alice", "alice-pw", echo.addr).is_ok());
    let _ = std::fs::remove_dir_all(dir);
}

/// A bad users file on SIGHUP keeps the old table, and the log has exactly one error line naming the line number
/// (and no password).
#[test]
fn sighup_with_bad_users_file_keeps_old_table() {
    let echo = TestServer::echo();
    let dir = scratch_dir();
    let users = dir.join("users");
    write_atomic(&users, "alice:OldSecret-1\n");
    let proxy = Proxy::start(&["--users", users.to_str().unwrap()]);
    assert!(socks5_auth_connect(proxy.addr(), "alice", "OldSecret-1", echo.addr).is_ok());
    write_atomic(
        &users,
        "alice:NewSecret-2\nbob:BobSecret-3\nthis line has no colon\n",
    );
    proxy.reload();
    assert!(
        wait_until(POLL_LIMIT, &mut || proxy
            .log()
            .contains("keeping the old users table")),
        "no error logged:\n{}",
        proxy.log()
    );
    let log = proxy.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{log}");
    assert!(
        errors[0].contains("line 3"),
        "error line does not name line 3: {}",
        errors[0]
    );
    for secret in ["OldSecret-1", "NewSecret-2", "BobSecret-3"] {
        assert!(!log.contains(secret), "the log shows a password");
    }
    let mut s =
        socks5_auth_connect(proxy.addr(), "alice", "OldSecret-1", echo.addr).expect("old password");
    echo_check(&mut s, 4, 1000);
    assert_eq!(
        socks5_auth_connect(proxy.addr(), "alice", "NewSecret-2", echo.addr).err(),
        Some(Socks5Err::AuthStatus(1))
    );
    assert_eq!(
        socks5_auth_connect(proxy.addr(), "bob", "BobSecret-3", echo.addr).err(),
        Some(Socks5Err::AuthStatus(1))
    );
    // A missing file is an error too: still the old table.
    std::fs::remove_file(&users).unwrap();
    proxy.reload();
    assert!(
        wait_until(POLL_LIMIT, &mut || proxy
            .log()
            .matches("keeping the old users table")
            .count()
            == 2),
        "no error for a missing file:\n{}",
        proxy.log()
    );
    assert!(socks5_auth_connect(proxy.addr(), "alice", "OldSecret-1", echo.addr).is_ok());
    // Once the file is fixed, the next SIGHUP applies it.
    write_atomic(&users, "alice:NewSecret-2\nbob:BobSecret-3\n");
    proxy.reload();
    assert!(wait_until(POLL_LIMIT, &mut || proxy
        .log()
        .contains("SIGHUP: reloaded 2 users")));
    assert!(wait_until(POLL_LIMIT, &mut || {
        socks5_auth_connect(proxy.addr(), "bob", "BobSecret-3", echo.addr).is_ok()
    }));
    assert!(wait_until(POLL_LIMIT, &mut || {
        socks5_auth_connect(proxy.addr(), "alice", "NewSecret-2", echo.addr).is_ok()
    }));
    assert!(wait_until(POLL_LIMIT, &mut || {
        socks5_auth_connect(proxy.addr(), "alice", "OldSecret-1", echo.addr).err()
            == Some(Socks5Err::AuthStatus(1))
    }));
    let _ = std::fs::remove_dir_all(dir);
}

/// --user-max-connections 1: alice's second session is refused with REP 0x02 while bob works; after alice's first
/// session ends she can connect again.
#[test]
fn user_max_connections_per_user() {
    let echo = TestServer::echo();
    let proxy = Proxy::start(&[
        "-U",
        "alice:a-pw",
        "-U",
        "bob:b-pw",
        "--user-max-connections",
        "1",
    ]);
    let mut first =
        socks5_auth_connect(proxy.addr(), "alice", "a-pw", echo.addr).expect("alice #1");
    echo_check(&mut first, 1, 1000);
    assert_eq!(
        socks5_auth_connect(proxy.addr(), "alice", "a-pw", echo.addr).err(),
        Some(Socks5Err::Rep(0x02))
    );
    let mut bob = socks5_auth_connect(proxy.addr(), "bob", "b-pw", echo.addr).expect("bob");
    echo_check(&mut bob, 2, 1000);
    // Over HTTP the same limit applies (403).
    let (status, _) = http_connect(
        proxy.addr(),
        &echo.addr.to_string(),
        Some(("alice", "a-pw")),
    );
    assert_eq!(status, 403);
    drop(first);
    let mut again = None;
    assert!(
        wait_until(POLL_LIMIT, &mut || {
            match socks5_auth_connect(proxy.addr(), "alice", "a-pw", echo.addr) {
                Ok(s) => {
                    again = Some(s);
                    true
                }
                Err(Socks5Err::Rep(0x02)) => false,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }),
        "alice's slot was not released after her session closed"
    );
    echo_check(again.as_mut().unwrap(), 3, 1000);
    drop(again);
    // A session that fails (refused target) gives its slot back too.
    let (_hold, closed) = refusing_port();
    let r = wait_until(POLL_LIMIT, &mut || match socks5_auth_connect(
        proxy.addr(),
        "alice",
        "a-pw",
        closed,
    ) {
        Err(Socks5Err::Rep(0x05)) => true,
        Err(Socks5Err::Rep(0x02)) => false,
        other => panic!("unexpected {other:?}"),
    });
    assert!(r, "slot not released");
    assert!(
        wait_until(POLL_LIMIT, &mut || socks5_auth_connect(
            proxy.addr(),
            "alice",
            "a-pw",
            echo.addr
        )
        .is_ok()),
        "alice's slot leaked by a failed session"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Chaining through --upstream
// ---------------------------------------------------------------------------------------------------------------

/// socks5 upstream: CONNECT through the chain echoes data, for an IP and for a name the upstream resolves.
#[test]
fn chain_through_socks5_upstream() {
    let echo = TestServer::echo();
    let b = with_metrics(&["--resolve", "echo.test=127.0.0.1"]);
    let up = format!("socks5://{}", b.addr());
    let a = Proxy::start(&["--upstream", &up]);
    let mut s = socks5_connect(a.addr(), echo.addr).expect("through the chain");
    echo_check(&mut s, 1, 100_000);
    let mut s = socks5_connect_domain(a.addr(), "echo.test", echo.addr.port())
        .expect("name through the chain");
    echo_check(&mut s, 2, 10_000);
    // The name was resolved by the upstream, not by the first hop.
    wait_metric(&b, "socksgate_dns_lookups_total", 1);
    // SOCKS4 and HTTP CONNECT clients are chained the same way.
    let (status, mut t) = http_connect(a.addr(), &echo.addr.to_string(), None);
    assert_eq!(status, 200);
    echo_check(&mut t, 3, 10_000);
    wait_metric(
        &b,
        "socksgate_handshakes_total{protocol=\"socks5\",outcome=\"ok\"}",
        3,
    );
}

/// socks5 upstream that requires user/password: the right credentials work, wrong ones give the client 0x02.
#[test]
fn chain_through_socks5_upstream_with_auth() {
    let echo = TestServer::echo();
    let b = Proxy::start(&["-U", "up:up-pw"]);
    let good = format!("socks5://up:up-pw@{}", b.addr());
    let a = Proxy::start(&["--upstream", &good]);
    let mut s = socks5_connect(a.addr(), echo.addr).expect("through the authenticated chain");
    echo_check(&mut s, 1, 50_000);
    let bad = format!("socks5://up:wrong@{}", b.addr());
    let a2 = Proxy::start(&["--upstream", &bad]);
    assert_eq!(socks5_connect(a2.addr(), echo.addr).err(), Some(0x02));
    let none = format!("socks5://{}", b.addr());
    let a3 = Proxy::start(&["--upstream", &none]);
    assert_eq!(socks5_connect(a3.addr(), echo.addr).err(), Some(0x02));
}

/// http upstream (a socksgate HTTP proxy): CONNECT through the chain echoes, with and without Basic credentials.
#[test]
fn chain_through_http_upstream() {
    let echo = TestServer::echo();
    let b = with_metrics(&[]);
    let up = format!("http://{}", b.addr());
    let a = Proxy::start(&["--upstream", &up]);
    let mut s = socks5_connect(a.addr(), echo.addr).expect("through the HTTP chain");
    echo_check(&mut s, 1, 100_000);
    wait_metric(
        &b,
        "socksgate_handshakes_total{protocol=\"http\",outcome=\"ok\"}",
        1,
    );

    let b2 = Proxy::start(&["-U", "up:up-pw"]);
    let up2 = format!("http://up:up-pw@{}", b2.addr());
    let a2 = Proxy::start(&["--upstream", &up2]);
    let mut s = socks5_connect(a2.addr(), echo.addr).expect("through the authenticated HTTP chain");
    echo_check(&mut s, 2, 10_000);
    // A name is passed to the HTTP upstream as is and resolved there.
    let b3 = with_metrics(&["--resolve", "echo.test=127.0.0.1"]);
    let a4 = Proxy::start(&["--upstream", &format!("http://{}", b3.addr())]);
    let mut s =
        socks5_connect_domain(a4.addr(), "echo.test", echo.addr.port()).expect("name via HTTP");
    echo_check(&mut s, 3, 10_000);
    wait_metric(&b3, "socksgate_dns_lookups_total", 1);
    let bad = format!("http://up:wrong@{}", b2.addr());
    let a3 = Proxy::start(&["--upstream", &bad]);
    assert_eq!(
        socks5_connect(a3.addr(), echo.addr).err(),
        Some(0x02),
        "407 from the upstream"
    );
}

/// The upstream's failure becomes the client's reply code: a refused target through a socks5 upstream is 0x05;
/// an upstream that is down is 0x01.
#[test]
fn chain_failures_map_to_client_reply_codes() {
    let (_hold, closed) = refusing_port();
    let b = with_metrics(&[]);
    let a = with_metrics(&["--upstream", &format!("socks5://{}", b.addr())]);
    let (a_base, b_base) = (a.fd_baseline(), b.fd_baseline());
    assert_eq!(socks5_connect(a.addr(), closed).err(), Some(0x05));
    wait_metric(&b, &connect_errors("refused"), 1);
    wait_metric(&a, &connect_errors("refused"), 1);
    // SOCKS4 client through the same chain: CD 91.
    let mut s = connect(a.addr());
    let mut req = vec![4, 1];
    req.extend_from_slice(&closed.port().to_be_bytes());
    req.extend_from_slice(&[127, 0, 0, 1, 0]);
    s.write_all(&req).unwrap();
    assert_eq!(&read_n(&mut s, 8)[..2], &[0, 91]);
    drop(s);
    assert_fds_back(&a_base, "first hop after upstream failures");
    assert_fds_back(&b_base, "upstream after refused targets");

    let (_hold2, dead) = refusing_port();
    let a2 = with_metrics(&["--upstream", &format!("socks5://{dead}")]);
    let a2_base = a2.fd_baseline();
    let echo = TestServer::echo();
    assert_eq!(socks5_connect(a2.addr(), echo.addr).err(), Some(0x01));
    wait_metric(&a2, &connect_errors("general"), 1);
    assert_fds_back(&a2_base, "after an unreachable upstream");
    let a3 = Proxy::start(&["--upstream", &format!("http://{dead}")]);
    assert_eq!(socks5_connect(a3.addr(), echo.addr).err(), Some(0x01));
}

/// UDP ASSOCIATE and BIND cannot be chained through --upstream: both get REP 0x07 (command not supported), and
/// SOCKS4 BIND gets CD 91.
#[test]
fn chain_refuses_udp_and_bind() {
    let b = Proxy::start(&[]);
    let a = Proxy::start(&["--upstream", &format!("socks5://{}", b.addr())]);
    for cmd in [2u8, 3] {
        let mut s = connect(a.addr());
        s.write_all(&[5, 1, 0]).unwrap();
        assert_eq!(read_n(&mut s, 2), vec![5, 0]);
        s.write_all(&socks5_request(cmd, "0.0.0.0:0".parse().unwrap()))
            .unwrap();
        let (rep, _) = read_socks5_reply(&mut s);
        assert_eq!(rep, 0x07, "command {cmd}");
        assert!(read_all_until_closed(&mut s).is_empty());
    }
    let mut s = connect(a.addr());
    s.write_all(&[4, 2, 0, 0, 127, 0, 0, 1, 0]).unwrap();
    assert_eq!(&read_n(&mut s, 8)[..2], &[0, 91]);
}

/// A scripted SOCKS5 upstream: answers the no-auth greeting, reads a CONNECT for an IPv4 target, writes `reply`
/// in a single write (so anything after the reply arrives in the same segment), then echoes.
fn fake_socks5_upstream(reply: Vec<u8>) -> TestServer {
    TestServer::start(move |mut s| {
        let g = read_n(&mut s, 3);
        assert_eq!(g, vec![5, 1, 0], "greeting sent upstream");
        s.write_all(&[5, 0]).unwrap();
        let req = read_n(&mut s, 10);
        assert_eq!(&req[..4], &[5, 1, 0, 1], "CONNECT sent upstream");
        s.write_all(&reply).unwrap();
        echo_handler(s);
    })
}

/// A scripted HTTP upstream: reads the CONNECT head, writes `reply` in one write, then echoes.
fn fake_http_upstream(reply: Vec<u8>) -> TestServer {
    TestServer::start(move |mut s| {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).unwrap_or(0) == 0 {
                return;
            }
            head.push(b[0]);
        }
        assert!(
            head.starts_with(b"CONNECT "),
            "{:?}",
            String::from_utf8_lossy(&head)
        );
        s.write_all(&reply).unwrap();
        echo_handler(s);
    })
}

/// Bytes the upstream sends right behind its success reply (a server that speaks first) reach the client, after
/// the client's own success reply; then the tunnel works both ways. SOCKS5 and HTTP upstreams.
#[test]
fn chain_upstream_data_right_after_reply_is_kept() {
    let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut socks_reply = vec![5, 0, 0, 1, 127, 0, 0, 1, 0x30, 0x39];
    socks_reply.extend_from_slice(b"BANNER-1\n");
    let http_reply =
        b"HTTP/1.1 200 Connection established\r\nX-Extra: 1\r\n\r\nBANNER-2\n".to_vec();
    let s5 = fake_socks5_upstream(socks_reply);
    let h = fake_http_upstream(http_reply);
    for (up, banner) in [
        (format!("socks5://{}", s5.addr), b"BANNER-1\n"),
        (format!("http://{}", h.addr), b"BANNER-2\n"),
    ] {
        let a = Proxy::start(&["--upstream", &up]);
        let mut s =
            socks5_connect(a.addr(), target).unwrap_or_else(|rep| panic!("{up}: REP {rep}"));
        assert_eq!(
            read_n(&mut s, banner.len()),
            banner.to_vec(),
            "{up}: banner lost or mangled"
        );
        echo_check(&mut s, 5, 20_000);
    }
}

/// Failure codes from an upstream map onto the client's codes: SOCKS5 REP passes through; HTTP statuses map to
/// the closest SOCKS5 code.
#[test]
fn chain_upstream_failure_codes_map() {
    let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for rep in [0x02u8, 0x03, 0x04, 0x05, 0x06] {
        let up = fake_socks5_upstream(vec![5, rep, 0, 1, 0, 0, 0, 0, 0, 0]);
        let a = Proxy::start(&["--upstream", &format!("socks5://{}", up.addr)]);
        assert_eq!(
            socks5_connect(a.addr(), target).err(),
            Some(rep),
            "upstream REP {rep:#04x}"
        );
    }
    for (status, rep) in [(403u16, 0x02u8), (407, 0x02), (504, 0x06), (502, 0x01)] {
        let up = fake_http_upstream(
            format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").into_bytes(),
        );
        let a = Proxy::start(&["--upstream", &format!("http://{}", up.addr)]);
        assert_eq!(
            socks5_connect(a.addr(), target).err(),
            Some(rep),
            "upstream HTTP {status}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------------
// PROXY protocol
// ---------------------------------------------------------------------------------------------------------------

fn v2(header: ProxyHeader, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = vec![0u8; 1024];
    let n = encode_v2(&header, tlvs, &mut out);
    assert!(n > 0);
    out.truncate(n);
    out
}

fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = [0u8; 107];
    let n = encode_v1(src, dst, &mut out);
    assert!(n > 0);
    out[..n].to_vec()
}

fn pp(src: &str, dst: &str) -> ProxyHeader {
    ProxyHeader::Proxy {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
    }
}

/// After the PROXY header has been written: a SOCKS5 CONNECT to the echo with a data check, then close.
/// `prefix_greeting` sends the header and the greeting in one write (the bytes after the header must survive).
fn socks5_after_header(mut s: TcpStream, header: &[u8], echo: SocketAddr, seed: u64) {
    let mut first = header.to_vec();
    first.extend_from_slice(&[5, 1, 0]);
    s.write_all(&first).unwrap();
    assert_eq!(read_n(&mut s, 2), vec![5, 0]);
    s.write_all(&socks5_request(1, echo)).unwrap();
    let (rep, _) = read_socks5_reply(&mut s);
    assert_eq!(rep, 0);
    echo_check(&mut s, seed, 2000);
}

fn log_has(proxy: &Proxy, needle: &str) -> bool {
    wait_until(POLL_LIMIT, &mut || proxy.log().contains(needle))
}

/// v1 header written by hand, then SOCKS5: the access log shows the header's source address.
#[test]
fn proxy_protocol_v1_raw() {
    let echo = TestServer::echo();
    let proxy = Proxy::start(&["--proxy-protocol"]);
    let h = v1("203.0.113.7:4242".parse().unwrap(), proxy.addr());
    assert!(h.starts_with(b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 "));
    socks5_after_header(connect(proxy.addr()), &h, echo.addr, 1);
    assert!(
        log_has(&proxy, "client=203.0.113.7:4242 "),
        "access log:\n{}",
        proxy.log()
    );
    // TCP6 too.
    let h6 = v1(
        "[2001:db8::99]:6000".parse().unwrap(),
        "[::1]:1080".parse().unwrap(),
    );
    socks5_after_header(connect(proxy.addr()), &h6, echo.addr, 2);
    assert!(
        log_has(&proxy, "client=[2001:db8::99]:6000 "),
        "access log:\n{}",
        proxy.log()
    );
}

/// v1 `PROXY UNKNOWN`: the real socket address is used.
#[test]
fn proxy_protocol_v1_unknown_uses_real_address() {
    let echo = TestServer::echo();
    let proxy = Proxy::start(&["--proxy-protocol"]);
    let s = connect(proxy.addr());
    let real = s.local_addr().unwrap();
    socks5_after_header(s, b"PROXY UNKNOWN\r\n", echo.addr, 1);
    assert!(
        log_has(&proxy, &format!("client={real} ")),
        "access log:\n{}",
        proxy.log()
    );
}

/// A header that never completes is not waited for forever: the connection is closed at the handshake deadline
/// (1 s here), without a byte sent.
#[test]
fn proxy_protocol_incomplete_header_times_out() {
    let proxy = Proxy::start(&["--proxy-protocol", "--handshake-timeout", "1s"]);
    let mut s = connect(proxy.addr());
    let started = std::time::Instant::now();
    s.write_all(b"PROXY TCP4 192.0.2.1 127.0.0.1 5").unwrap();
    let got = read_all_until_closed(&mut s);
    let waited = started.elapsed();
    assert!(got.is_empty(), "{got:?}");
    assert!(
        waited >= Duration::from_millis(800),
        "closed after only {waited:?}"
    );
    assert!(
        waited <= Duration::from_secs(8),
        "closed only after {waited:?}"
    );
}

/// curl --haproxy-protocol with an HTTP proxy sends the v1 header to the proxy (checked: with -x socks5h:// it
/// sends the SOCKS greeting first, so it cannot drive this listener). The request is forwarded and answered.
#[test]
fn proxy_protocol_v1_from_curl_http_proxy() {
    if !have_curl() {
        eprintln!("curl not installed: skipping");
        return;
    }
    let origin = TestServer::start(|mut s| {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut b) {
                Ok(1) => head.push(b[0]),
                _ => return,
            }
        }
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello curl\n",
        );
    });
    let proxy = Proxy::start(&["--proxy-protocol"]);
    let (code, body, err) = curl(&[
        "--haproxy-protocol",
        "-x",
        &format!("http://{}", proxy.addr()),
        &format!("http://{}/pp", origin.addr),
    ]);
    assert_eq!(code, 0, "curl failed: {err}");
    assert_eq!(body, b"hello curl\n");
    assert!(
        log_has(&proxy, "client=127.0.0.1:"),
        "access log:\n{}",
        proxy.log()
    );
}

/// v2 PROXY over IPv4 and IPv6, LOCAL (the real address is used) and PROXY with TLVs.
#[test]
fn proxy_protocol_v2_variants() {
    let echo = TestServer::echo();
    let proxy = Proxy::start(&["--proxy-protocol"]);
    let dst = proxy.addr().to_string();
    socks5_after_header(
        connect(proxy.addr()),
        &v2(pp("198.51.100.7:5555", &dst), &[]),
        echo.addr,
        1,
    );
    assert!(
        log_has(&proxy, "client=198.51.100.7:5555 "),
        "v4:\n{}",
        proxy.log()
    );

    socks5_after_header(
        connect(proxy.addr()),
        &v2(pp("[2001:db8::7]:6666", "[::1]:1080"), &[]),
        echo.addr,
        2,
    );
    assert!(
        log_has(&proxy, "client=[2001:db8::7]:6666 "),
        "v6:\n{}",
        proxy.log()
    );

    let s = connect(proxy.addr());
    let real = s.local_addr().unwrap();
    let local = v2(ProxyHeader::Local, &[(0x04, b"noop padding")]);
    socks5_after_header(s, &local, echo.addr, 3);
    assert!(
        log_has(&proxy, &format!("client={real} ")),
        "LOCAL must log the real address:\n{}",
        proxy.log()
    );
    // LOCAL with a TCP4 family and an address block (built by hand): the block is skipped, not used.
    let s = connect(proxy.addr());
    let real = s.local_addr().unwrap();
    let mut local4 = vec![
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
    ];
    local4.extend_from_slice(&[
        0x20, 0x11, 0, 12, 10, 9, 9, 9, 127, 0, 0, 1, 0x12, 0x34, 0x04, 0x38,
    ]);
    socks5_after_header(s, &local4, echo.addr, 5);
    assert!(
        log_has(&proxy, &format!("client={real} ")),
        "LOCAL with addresses must log the real address:\n{}",
        proxy.log()
    );
    assert!(!proxy.log().contains("10.9.9.9"));

    let tlvs: &[(u8, &[u8])] = &[
        (0x01, b"h2"),
        (0x02, b"example.test"),
        (0x04, &[0u8; 100]),
        (0x05, b"unique-id-0123456789"),
        (0x20, &[0x01, 0, 0, 0, 0]),
    ];
    socks5_after_header(
        connect(proxy.addr()),
        &v2(pp("192.0.2.44:7777", &dst), tlvs),
        echo.addr,
        4,
    );
    assert!(
        log_has(&proxy, "client=192.0.2.44:7777 "),
        "TLVs:\n{}",
        proxy.log()
    );
}

/// A header split across several writes with pauses in between is reassembled (v2 with TLVs, and v1).
#[test]
fn proxy_protocol_header_split_across_writes() {
    let echo = TestServer::echo();
    let proxy = Proxy::start(&["--proxy-protocol"]);
    let h2 = v2(
        pp("192.0.2.10:1010", &proxy.addr().to_string()),
        &[(0x02, b"split.example"), (0x04, &[0; 40])],
    );
    let h1 = v1("192.0.2.11:1111".parse().unwrap(), proxy.addr());
    for (k, h) in [h2, h1].into_iter().enumerate() {
        let mut s = connect(proxy.addr());
        // Cuts inside the signature, the length field and the address block.
        let cuts = [0, 3, 13, 15, 21, h.len()];
        for w in cuts.windows(2) {
            s.write_all(&h[w[0]..w[1]]).unwrap();
            s.flush().unwrap();
            thread::sleep(Duration::from_millis(40));
        }
        socks5_after_header(s, &[], echo.addr, k as u64);
    }
    assert!(
        log_has(&proxy, "client=192.0.2.10:1010 "),
        "{}",
        proxy.log()
    );
    assert!(
        log_has(&proxy, "client=192.0.2.11:1111 "),
        "{}",
        proxy.log()
    );
}

/// No header (a plain SOCKS5 greeting) on a --proxy-protocol listener: closed without a byte and counted.
#[test]
fn proxy_protocol_missing_header_is_refused() {
    let proxy = with_metrics(&["--proxy-protocol"]);
    let baseline = proxy.fd_baseline();
    let mut s = connect(proxy.addr());
    s.write_all(&[5, 1, 0]).unwrap();
    let got = read_all_until_closed(&mut s);
    assert!(got.is_empty(), "bytes sent without a PROXY header: {got:?}");
    assert!(wait_until(POLL_LIMIT, &mut || proxy
        .metric(&refused_metric("proxy_header"))
        == 1));
    // An HTTP request without a header likewise.
    let mut s = connect(proxy.addr());
    s.write_all(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n")
        .unwrap();
    assert!(read_all_until_closed(&mut s).is_empty());
    assert!(wait_until(POLL_LIMIT, &mut || proxy
        .metric(&refused_metric("proxy_header"))
        == 2));
    drop(s);
    assert_fds_back(&baseline, "after refused headers");
}

/// --allow-client is checked against the PROXY source: a spoofed 10.1.2.3 is refused, 127.0.0.5 is served.
#[test]
fn proxy_protocol_source_is_subject_to_allow_client() {
    let echo = TestServer::echo();
    let proxy = with_metrics(&["--proxy-protocol", "--allow-client", "127.0.0.0/8"]);
    let dst = proxy.addr().to_string();
    let mut s = connect(proxy.addr());
    let mut first = v2(pp("10.1.2.3:4444", &dst), &[]);
    first.extend_from_slice(&[5, 1, 0]);
    s.write_all(&first).unwrap();
    assert!(
        read_all_until_closed(&mut s).is_empty(),
        "the spoofed source got an answer"
    );
    assert!(wait_until(POLL_LIMIT, &mut || proxy
        .metric(&refused_metric("client_acl"))
        == 1));

    socks5_after_header(
        connect(proxy.addr()),
        &v2(pp("127.0.0.5:5555", &dst), &[]),
        echo.addr,
        1,
    );
    assert!(log_has(&proxy, "client=127.0.0.5:5555 "), "{}", proxy.log());
    wait_metric(&proxy, &refused_metric("client_acl"), 1);
}

// ---------------------------------------------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------------------------------------------

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = connect(addr);
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Counters move by exactly what the test did; gauges return to zero; per-worker series exist; other paths 404.
#[test]
fn metrics_counters_and_gauges() {
    let echo = TestServer::echo();
    let udp_echo = UdpEcho::start();
    let (_hold, closed) = refusing_port();
    let proxy = with_metrics(&[
        "-t",
        "2",
        "-U",
        "u:u-pw",
        "--socks4-with-users",
        "--resolve",
        "good.test=127.0.0.1",
    ]);
    let m = |s: &str| proxy.metric(s);
    wait_metric(&proxy, "socksgate_connections_accepted_total", 0);
    let mut accepted = 0;
    let (mut up, mut down) = (0u64, 0u64);

    // SOCKS5 with a name: 12,345 bytes each way.
    let mut s = socks5_auth_request(
        proxy.addr(),
        "u",
        "u-pw",
        &socks5_request_domain(1, "good.test", echo.addr.port()),
    )
    .expect("socks5");
    accepted += 1;
    echo_check(&mut s, 1, 12_345);
    up += 12_345;
    down += 12_345;
    // While it is open, the gauges see it.
    wait_metric(&proxy, "socksgate_sessions_active{protocol=\"socks5\"}", 1);
    // The slab gauges are published once per loop turn, so poll.
    let slab_sum = || -> u64 {
        (0..2)
            .map(|w| m(&format!("socksgate_worker_connections{{worker=\"{w}\"}}")))
            .sum()
    };
    assert!(
        wait_until(POLL_LIMIT, &mut || slab_sum() == 1),
        "one slab entry in use across the workers, got {}",
        slab_sum()
    );
    drop(s);
    // SOCKS4: 1,000 bytes.
    let mut s = socks::Socks4Stream::connect(proxy.addr(), echo.addr, "u")
        .expect("socks4")
        .into_inner();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    accepted += 1;
    echo_check(&mut s, 2, 1000);
    up += 1000;
    down += 1000;
    drop(s);
    // HTTP CONNECT: 777 bytes up, and the echo sends them back.
    let (status, mut s) = http_connect(proxy.addr(), &echo.addr.to_string(), Some(("u", "u-pw")));
    assert_eq!(status, 200);
    accepted += 1;
    echo_check(&mut s, 3, 777);
    up += 777;
    down += 777;
    drop(s);
    // One UDP datagram each way.
    let mut ctl = connect(proxy.addr());
    accepted += 1;
    ctl.write_all(&[5, 1, 2, 1, 1, b'u', 4, b'u', b'-', b'p', b'w'])
        .unwrap();
    assert_eq!(read_n(&mut ctl, 4), vec![5, 2, 1, 0]);
    ctl.write_all(&socks5_request(3, "0.0.0.0:0".parse().unwrap()))
        .unwrap();
    let (rep, relay) = read_socks5_reply(&mut ctl);
    assert_eq!(rep, 0);
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut d = vec![0, 0, 0, 1, 127, 0, 0, 1];
    d.extend_from_slice(&udp_echo.addr.port().to_be_bytes());
    d.extend_from_slice(b"datagram");
    u.send_to(&d, relay).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = u.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[10..n], b"datagram");
    drop(ctl);
    // Failures: wrong password; refused port; a name that does not resolve.
    assert_eq!(
        socks5_auth_connect(proxy.addr(), "u", "bad", echo.addr).err(),
        Some(Socks5Err::AuthStatus(1))
    );
    accepted += 1;
    assert_eq!(
        socks5_auth_connect(proxy.addr(), "u", "u-pw", closed).err(),
        Some(Socks5Err::Rep(0x05))
    );
    accepted += 1;
    assert_eq!(
        socks5_auth_request(
            proxy.addr(),
            "u",
            "u-pw",
            &socks5_request_domain(1, "nowhere.invalid", 80)
        )
        .err(),
        Some(Socks5Err::Rep(0x04))
    );
    accepted += 1;

    assert!(
        wait_until(POLL_LIMIT, &mut || {
            let t = proxy.metrics_text();
            t.contains("socksgate_sessions_active{protocol=\"socks5\"} 0\n")
                && t.contains("socksgate_sessions_active{protocol=\"socks4\"} 0\n")
                && t.contains("socksgate_sessions_active{protocol=\"http\"} 0\n")
                && t.contains("socksgate_sessions_active{protocol=\"unknown\"} 0\n")
                && t.contains("socksgate_worker_connections{worker=\"0\"} 0\n")
                && t.contains("socksgate_worker_connections{worker=\"1\"} 0\n")
        }),
        "gauges did not return to zero:\n{}",
        proxy.metrics_text()
    );
    wait_metric(&proxy, "socksgate_connections_accepted_total", accepted);
    wait_metric(&proxy, "socksgate_bytes_total{direction=\"up\"}", up);
    wait_metric(&proxy, "socksgate_bytes_total{direction=\"down\"}", down);
    wait_metric(
        &proxy,
        "socksgate_handshakes_total{protocol=\"socks5\",outcome=\"ok\"}",
        2,
    );
    wait_metric(
        &proxy,
        "socksgate_handshakes_total{protocol=\"socks5\",outcome=\"failed\"}",
        3,
    );
    wait_metric(
        &proxy,
        "socksgate_handshakes_total{protocol=\"socks4\",outcome=\"ok\"}",
        1,
    );
    wait_metric(
        &proxy,
        "socksgate_handshakes_total{protocol=\"http\",outcome=\"ok\"}",
        1,
    );
    wait_metric(&proxy, "socksgate_auth_failures_total", 1);
    wait_metric(&proxy, &connect_errors("refused"), 1);
    wait_metric(&proxy, &connect_errors("host_unreachable"), 1);
    wait_metric(&proxy, &connect_errors("general"), 0);
    wait_metric(&proxy, "socksgate_dns_lookups_total", 2);
    wait_metric(&proxy, "socksgate_dns_failures_total", 1);
    wait_metric(&proxy, "socksgate_udp_datagrams_total{direction=\"up\"}", 1);
    wait_metric(
        &proxy,
        "socksgate_udp_datagrams_total{direction=\"down\"}",
        1,
    );
    wait_metric(&proxy, &refused_metric("client_acl"), 0);

    let text = http_get(proxy.metrics.unwrap(), "/metrics");
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text.contains("# TYPE socksgate_sessions_active gauge"));
    assert!(text.contains("# TYPE socksgate_bytes_total counter"));
    let nf = http_get(proxy.metrics.unwrap(), "/nope");
    assert!(nf.starts_with("HTTP/1.1 404 "), "{nf}");
    assert!(!nf.contains("socksgate_"), "404 body leaks metrics");
    // Sanity: the address type of the metrics listener is what was asked for.
    assert_eq!(proxy.metrics.unwrap().ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
}
