//! SOCKS4 and SOCKS4a against the real binary: CONNECT, 4a domains, the 0.0.0.0 corner, USERID caps, failures
//! (always CD 91 followed by a close), SOCKS4 with users configured, and --no-socks4.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use common::*;

/// CD answered to SOCKS4 BIND (CD 2): the first reply grants it (tests/it/udp_bind.rs covers the whole exchange).
const CD_FOR_BIND_TODAY: u8 = 90;

fn port_ip(a: SocketAddr) -> (u16, [u8; 4]) {
    match a {
        SocketAddr::V4(v4) => (v4.port(), v4.ip().octets()),
        SocketAddr::V6(_) => panic!("IPv4 only"),
    }
}

/// Sends `req` and returns the 8-byte reply.
fn request(proxy: SocketAddr, req: &[u8]) -> (TcpStream, [u8; 8]) {
    let mut s = connect(proxy);
    s.write_all(req).unwrap();
    let mut r = [0u8; 8];
    s.read_exact(&mut r).expect("SOCKS4 reply");
    (s, r)
}

/// Asserts a `VN=0 CD=91` reply followed by the server closing the connection.
fn expect_rejected_then_close(s: &mut TcpStream, reply: [u8; 8], what: &str) {
    assert_eq!(reply[0], 0, "{what}: reply VN must be 0");
    assert_eq!(reply[1], 91, "{what}: expected CD 91, reply {reply:?}");
    let (rest, closed) = read_until_closed(s);
    assert!(
        rest.is_empty(),
        "{what}: bytes after the failure reply: {rest:?}"
    );
    assert!(closed, "{what}: connection not closed after CD 91");
}

#[test]
fn socks4_connect_ipv4() {
    let echo = TestServer::echo();
    let proxy = Proxy::start(&[]);
    let (port, ip) = port_ip(echo.addr);
    let (mut s, r) = request(proxy.addr(), &socks4_request(1, port, ip, b"fred", None));
    assert_eq!(r[0], 0, "reply VN must be 0, not 4");
    assert_eq!(r[1], 90, "request granted");
    assert_echo(&mut s, b"socks4 tunnel");
    assert_echo(&mut s, &pseudo_random(40, 300_000));
}

#[test]
fn socks4a_domain_localhost() {
    let echo = TestServer::echo();
    let proxy = Proxy::start(&[]);
    let req = socks4_request(1, echo.addr.port(), [0; 4], b"", Some("localhost"));
    assert_eq!(&req[4..8], &[0, 0, 0, 1], "4a marker");
    let (mut s, r) = request(proxy.addr(), &req);
    assert_eq!(&r[..2], &[0, 90]);
    assert_echo(&mut s, b"socks4a tunnel");
    // A --resolve name works the same way.
    drop(proxy);
    let proxy = Proxy::start(&["--resolve", "target.test=127.0.0.1"]);
    let req = socks4_request(1, echo.addr.port(), [0; 4], b"id", Some("target.test"));
    let (mut s, r) = request(proxy.addr(), &req);
    assert_eq!(&r[..2], &[0, 90]);
    assert_echo(&mut s, b"resolved by --resolve");
}

#[test]
fn socks4a_pipelined_payload_and_fragmented_request() {
    let echo = TestServer::echo();
    let proxy = Proxy::start(&[]);
    // Request and payload in one write: the payload is forwarded, not lost or parsed.
    let payload = pseudo_random(41, 4000);
    let mut all = socks4_request(1, echo.addr.port(), [0; 4], b"user", Some("localhost"));
    all.extend_from_slice(&payload);
    let (mut s, r) = request(proxy.addr(), &all);
    assert_eq!(&r[..2], &[0, 90]);
    assert_eq!(read_n(&mut s, payload.len()), payload);
    // The same request one byte at a time.
    let req = socks4_request(1, echo.addr.port(), [0; 4], b"user", Some("localhost"));
    let mut s = connect(proxy.addr());
    for b in &req {
        s.write_all(&[*b]).unwrap();
        thread::sleep(Duration::from_millis(3));
    }
    let r = read_n(&mut s, 8);
    assert_eq!(&r[..2], &[0, 90]);
    assert_echo(&mut s, b"fragmented 4a");
}

#[test]
fn third_party_client_socks_crate_v4_and_v4a() {
    let echo = TestServer::echo();
    let proxy = Proxy::start(&[]);
    let mut s = socks::Socks4Stream::connect(proxy.addr(), echo.addr, "someone")
        .expect("socks4 via socks crate");
    s.get_ref().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(b"v4").unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"v4");
    // A domain makes the crate use SOCKS4a.
    let mut s = socks::Socks4Stream::connect(proxy.addr(), ("localhost", echo.addr.port()), "")
        .expect("socks4a via socks crate");
    s.get_ref().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(b"4a").unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"4a");
}

#[test]
fn socks4a_marker_needs_nonzero_last_octet() {
    // DSTIP 0.0.0.0 is plain SOCKS4, not 4a: the request ends at the USERID NUL and no DOMAIN is awaited.
    // With 0.0.0.0 denied, the refusal comes at once (a server waiting for a DOMAIN would answer nothing until its
    // 3s handshake timeout closes the connection, and read_exact would fail).
    let echo = TestServer::echo();
    let proxy = Proxy::start(&["--deny-dest", "0.0.0.0/32", "--handshake-timeout", "3s"]);
    let (mut s, r) = request(
        proxy.addr(),
        &socks4_request(1, echo.addr.port(), [0, 0, 0, 0], b"u", None),
    );
    expect_rejected_then_close(&mut s, r, "0.0.0.0 denied");
    drop(proxy);
    // Without rules the request is a CONNECT to 0.0.0.0, which Linux routes to the local host: granted, and the
    // "domain" bytes that follow are tunnel payload, echoed back verbatim.
    let proxy = Proxy::start(&["--handshake-timeout", "3s"]);
    let mut all = socks4_request(1, echo.addr.port(), [0, 0, 0, 0], b"u", None);
    all.extend_from_slice(b"localhost\0");
    let (mut s, r) = request(proxy.addr(), &all);
    assert_eq!(&r[..2], &[0, 90], "0.0.0.0 is a plain SOCKS4 address");
    assert_eq!(
        read_n(&mut s, 10),
        b"localhost\0",
        "bytes after USERID NUL must be payload, not a 4a DOMAIN"
    );
}

#[test]
fn socks4_userid_cap() {
    let echo = TestServer::echo();
    let proxy = Proxy::start(&[]);
    let (port, ip) = port_ip(echo.addr);
    // 255 bytes + NUL: the largest accepted USERID.
    let (mut s, r) = request(
        proxy.addr(),
        &socks4_request(1, port, ip, &[b'u'; 255], None),
    );
    assert_eq!(&r[..2], &[0, 90], "USERID of 255 bytes");
    assert_echo(&mut s, b"ok");
    // 300 bytes and no NUL: rejected as soon as the cap is passed.
    let mut req = vec![4, 1];
    req.extend_from_slice(&port.to_be_bytes());
    req.extend_from_slice(&ip);
    req.extend_from_slice(&[b'x'; 300]);
    let (mut s, r) = request(proxy.addr(), &req);
    expect_rejected_then_close(&mut s, r, "oversized USERID");
    // An oversized 4a DOMAIN (300 bytes, no NUL) too.
    let mut req = socks4_request(1, port, [0; 4], b"", Some("x"));
    req.truncate(req.len() - 2);
    req.extend_from_slice(&[b'd'; 300]);
    let (mut s, r) = request(proxy.addr(), &req);
    expect_rejected_then_close(&mut s, r, "oversized 4a DOMAIN");
}

#[test]
fn socks4_failures_are_91_then_close() {
    let proxy = Proxy::start(&[]);
    // Unresolvable 4a name.
    let (mut s, r) = request(
        proxy.addr(),
        &socks4_request(1, 80, [0; 4], b"", Some("nx.invalid")),
    );
    expect_rejected_then_close(&mut s, r, "unresolvable 4a domain");
    // Refused port.
    let (mut s, r) = request(
        proxy.addr(),
        &socks4_request(1, closed_port(), [127, 0, 0, 1], b"", None),
    );
    expect_rejected_then_close(&mut s, r, "refused port");
    // Unknown command.
    let (mut s, r) = request(
        proxy.addr(),
        &socks4_request(3, 80, [127, 0, 0, 1], b"", None),
    );
    expect_rejected_then_close(&mut s, r, "CD 3");
    // An empty 4a DOMAIN.
    let (mut s, r) = request(proxy.addr(), &socks4_request(1, 80, [0; 4], b"", Some("")));
    expect_rejected_then_close(&mut s, r, "empty 4a domain");
    // BIND: granted (first reply).
    let (mut s, r) = request(
        proxy.addr(),
        &socks4_request(2, 80, [127, 0, 0, 1], b"", None),
    );
    assert_eq!(r[1], CD_FOR_BIND_TODAY, "SOCKS4 BIND");
    if CD_FOR_BIND_TODAY == 91 {
        expect_rejected_then_close(&mut s, r, "BIND");
    }
}

#[test]
fn socks4_denied_destination_is_91() {
    let echo = TestServer::echo();
    let proxy = Proxy::start(&["--deny-dest", "127.0.0.0/8"]);
    let (port, ip) = port_ip(echo.addr);
    let (mut s, r) = request(proxy.addr(), &socks4_request(1, port, ip, b"", None));
    expect_rejected_then_close(&mut s, r, "denied IPv4");
    let (mut s, r) = request(
        proxy.addr(),
        &socks4_request(1, port, [0; 4], b"", Some("localhost")),
    );
    expect_rejected_then_close(&mut s, r, "denied via 4a name");
}

#[test]
fn socks4_with_users_configured() {
    let echo = TestServer::echo();
    let (port, ip) = port_ip(echo.addr);
    // SOCKS4 carries no password: with users configured it is refused...
    let proxy = Proxy::start(&["-U", "alice:secret"]);
    let (mut s, r) = request(proxy.addr(), &socks4_request(1, port, ip, b"alice", None));
    expect_rejected_then_close(&mut s, r, "SOCKS4 with -U");
    let (mut s, r) = request(
        proxy.addr(),
        &socks4_request(1, port, [0; 4], b"alice", Some("localhost")),
    );
    expect_rejected_then_close(&mut s, r, "SOCKS4a with -U");
    // ...while SOCKS5 with the password works on the same server.
    let mut t = socks5_connect_auth(proxy.addr(), "alice", "secret", echo.addr)
        .expect("SOCKS5 with password");
    assert_echo(&mut t, b"socks5 still fine");
    drop(proxy);
    // ...unless --socks4-with-users lets it through.
    let proxy = Proxy::start(&["-U", "alice:secret", "--socks4-with-users"]);
    let (mut s, r) = request(proxy.addr(), &socks4_request(1, port, ip, b"", None));
    assert_eq!(&r[..2], &[0, 90], "SOCKS4 with --socks4-with-users");
    assert_echo(&mut s, b"allowed");
}

#[test]
fn no_socks4_closes_without_reply() {
    let echo = TestServer::echo();
    let proxy = Proxy::start(&["--no-socks4"]);
    let (port, ip) = port_ip(echo.addr);
    for req in [
        socks4_request(1, port, ip, b"", None),
        socks4_request(1, port, [0; 4], b"", Some("localhost")),
    ] {
        let mut s = connect(proxy.addr());
        s.write_all(&req).unwrap();
        let (got, closed) = read_until_closed(&mut s);
        assert!(closed, "--no-socks4: connection not closed");
        assert!(
            got.is_empty(),
            "--no-socks4: expected no reply, got {got:?}"
        );
    }
    // SOCKS5 is unaffected.
    let mut s = socks5_connect(proxy.addr(), echo.addr).expect("SOCKS5 with --no-socks4");
    assert_echo(&mut s, b"five");
}
