//! Destination policy against the real binary: `--deny-dest` on BIND, the policy file (`--policy`): rules by name,
//! address, port, command, user and client, per-user limits and egress addresses, `--check-config` and reload.
//! Names resolve through `--resolve`, never the machine's DNS.

use crate::common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Connects to `to` from source address `from_ip` (any 127/8 address is local on Linux).
fn connect_from(from_ip: Ipv4Addr, to: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((from_ip, 0)).into()).unwrap();
    s.connect_timeout(&to.into(), IO_TIMEOUT).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Sends a SOCKS5 no-auth greeting and checks the method answer.
fn greet(s: &mut TcpStream) {
    s.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_n(s, 2), vec![5, 0]);
}

/// True when the peer closed `s` (EOF or reset) without sending anything more.
fn peer_closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// BIND obeys --deny-dest (issue 13's first bug)
// ---------------------------------------------------------------------------------------------------------------

/// A BIND whose expected peer is denied is refused in the first reply: SOCKS5 0x02, SOCKS4 CD 91.
#[test]
fn bind_expecting_denied_peer_is_refused() {
    let proxy = Proxy::start(&["--deny-dest", "127.0.0.0/8"]);
    let mut s = connect(proxy.addr());
    greet(&mut s);
    s.write_all(&socks5_request(2, "127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let (rep, _) = read_socks5_reply(&mut s);
    assert_eq!(rep, 0x02, "SOCKS5 BIND expecting a denied peer");
    assert!(peer_closed(&mut s), "connection closed after the refusal");

    let mut s = connect(proxy.addr());
    s.write_all(&socks4_request(2, 0, [127, 0, 0, 1], b"u", None))
        .unwrap();
    let r = read_n(&mut s, 8);
    assert_eq!(&r[..2], &[0, 91], "SOCKS4 BIND expecting a denied peer");
    assert!(peer_closed(&mut s));
    // A CONNECT to the same address gets the same answer (the rules are one policy).
    assert_eq!(
        socks5_connect(proxy.addr(), "127.0.0.1:9".parse().unwrap()).err(),
        Some(0x02)
    );
}

/// A BIND naming no peer: an inbound peer from a denied address is closed without a byte of the tunnel, and the
/// client's second reply is 0x02 (SOCKS4: 91).
#[test]
fn bind_inbound_peer_denied_is_closed() {
    let proxy = Proxy::start(&["--deny-dest", "127.0.0.2/32"]);
    let mut ctl = connect(proxy.addr());
    greet(&mut ctl);
    ctl.write_all(&socks5_request(2, "0.0.0.0:0".parse().unwrap()))
        .unwrap();
    let (rep, listen) = read_socks5_reply(&mut ctl);
    assert_eq!(rep, 0, "first reply");
    let mut peer = connect_from(Ipv4Addr::new(127, 0, 0, 2), listen);
    let (rep2, _) = read_socks5_reply(&mut ctl);
    assert_eq!(rep2, 0x02, "second reply for a denied inbound peer");
    assert!(peer_closed(&mut peer), "denied peer is closed");
    assert!(peer_closed(&mut ctl), "control connection closed");

    let mut ctl = connect(proxy.addr());
    ctl.write_all(&socks4_request(2, 0, [0, 0, 0, 0], b"u", None))
        .unwrap();
    let r1 = read_n(&mut ctl, 8);
    assert_eq!(&r1[..2], &[0, 90]);
    let port = u16::from_be_bytes([r1[2], r1[3]]);
    let mut peer = connect_from(
        Ipv4Addr::new(127, 0, 0, 2),
        SocketAddr::from(([127, 0, 0, 1], port)),
    );
    let r2 = read_n(&mut ctl, 8);
    assert_eq!(&r2[..2], &[0, 91], "SOCKS4 second reply for a denied peer");
    assert!(peer_closed(&mut peer));

    // An allowed peer (127.0.0.3) is still served.
    let mut ctl = connect(proxy.addr());
    greet(&mut ctl);
    ctl.write_all(&socks5_request(2, "0.0.0.0:0".parse().unwrap()))
        .unwrap();
    let (_, listen) = read_socks5_reply(&mut ctl);
    let mut peer = connect_from(Ipv4Addr::new(127, 0, 0, 3), listen);
    let (rep2, from) = read_socks5_reply(&mut ctl);
    assert_eq!(rep2, 0);
    assert_eq!(from, peer.local_addr().unwrap());
    peer.write_all(b"hello").unwrap();
    assert_eq!(read_n(&mut ctl, 5), b"hello".to_vec());
}

// ---------------------------------------------------------------------------------------------------------------
// The policy file
// ---------------------------------------------------------------------------------------------------------------

/// Names every test may use; all resolve to 127.0.0.1 through --resolve (never the machine's DNS).
const NAMES: &[&str] = &[
    "a.blocked.test",
    "deep.a.blocked.test",
    "blocked.test",
    "notblocked.test",
    "exact.test",
    "sub.exact.test",
    "corp.test",
    "x.corp.test",
    "ok.test",
    "other.test",
];

/// Writes `text` to a fresh policy file and starts the proxy with it (plus `extra` flags and every `NAMES` entry).
fn with_policy(text: &str, extra: &[&str]) -> (Proxy, std::path::PathBuf) {
    let path = temp_path("policy.toml");
    std::fs::write(&path, text).unwrap();
    let resolves: Vec<String> = NAMES.iter().map(|n| format!("{n}=127.0.0.1")).collect();
    let mut args: Vec<&str> = vec![
        "-l",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--policy",
        path.to_str().unwrap(),
    ];
    for r in &resolves {
        args.push("--resolve");
        args.push(r);
    }
    args.extend_from_slice(extra);
    (Proxy::spawn(&args), path)
}

/// SOCKS5 CONNECT to `host:port` (a name), optionally after RFC 1929 login: the stream, or the REP code.
fn connect_name(
    proxy: SocketAddr,
    auth: Option<(&str, &str)>,
    host: &str,
    port: u16,
) -> Result<TcpStream, u8> {
    let mut s = match auth {
        Some((u, p)) => {
            let (s, st) = socks5_login(proxy, u, p);
            assert_eq!(st, 0, "login as {u}");
            s
        }
        None => {
            let mut s = connect(proxy);
            greet(&mut s);
            s
        }
    };
    s.write_all(&socks5_request_domain(1, host, port)).unwrap();
    let (rep, _) = read_socks5_reply(&mut s);
    if rep == 0 {
        Ok(s)
    } else {
        Err(rep)
    }
}

/// SOCKS5 CONNECT to an address target (optionally with login): the stream, or the REP code.
fn connect_ip(
    proxy: SocketAddr,
    auth: Option<(&str, &str)>,
    target: SocketAddr,
) -> Result<TcpStream, u8> {
    match auth {
        Some((u, p)) => socks5_connect_auth(proxy, u, p, target).map_err(|e| e as u8),
        None => socks5_connect(proxy, target),
    }
}

/// The REP code of a CONNECT to `host` (0 = allowed), checking that an allowed tunnel relays.
fn rep(proxy: &Proxy, host: &str, port: u16) -> u8 {
    match connect_name(proxy.addr(), None, host, port) {
        Ok(mut s) => {
            assert_echo(&mut s, host.as_bytes());
            0
        }
        Err(r) => r,
    }
}

#[test]
fn name_patterns_and_their_negatives() {
    let echo = TestServer::echo();
    let (proxy, _) = with_policy(
        r#"
[[rules]]
dest = ["*.blocked.test", "exact.test", ".corp.test"]
action = "deny"
"#,
        &[],
    );
    let p = echo.addr.port();
    for denied in [
        "a.blocked.test",
        "deep.a.blocked.test",
        "A.Blocked.TEST",
        "a.blocked.test.",
        "exact.test",
        "EXACT.test.",
        "corp.test",
        "x.corp.test",
        "X.CORP.TEST.",
    ] {
        assert_eq!(rep(&proxy, denied, p), 0x02, "{denied} must be denied");
    }
    for allowed in [
        "blocked.test",
        "notblocked.test",
        "sub.exact.test",
        "ok.test",
    ] {
        assert_eq!(rep(&proxy, allowed, p), 0, "{allowed} must be allowed");
    }
    // A name rule never matches an address target, even the address the name resolves to.
    assert!(connect_ip(proxy.addr(), None, echo.addr).is_ok());
    // An invalid host name is refused with "address type not supported", never matched loosely.
    for bad in ["a..blocked.test", "a_b.blocked.test", ".x.corp.test"] {
        assert_eq!(rep(&proxy, bad, p), 0x08, "{bad:?}");
    }
    // Names denied by a name rule and invalid names are never looked up: only the four allowed names were.
    wait_metric(&proxy, "socksgate_dns_lookups_total", 4);
}

#[test]
fn cidr_rules_apply_to_resolved_addresses_and_ports() {
    let echo = TestServer::echo();
    let p = echo.addr.port();
    let (proxy, _) = with_policy(
        &format!(
            r#"
[[rules]]
dest = ["ok.test"]
action = "allow"

[[rules]]
dest = ["127.0.0.1:{lo}-{p}"]
action = "deny"

[[rules]]
dest = [":{other}"]
action = "deny"
"#,
            lo = p.saturating_sub(5).max(1),
            other = p.wrapping_add(1).max(1)
        ),
        &[],
    );
    // First match: ok.test is allowed by rule 1 although its address is denied by rule 2.
    assert_eq!(rep(&proxy, "ok.test", p), 0);
    // Another name resolving to the denied block is denied by the address rule.
    assert_eq!(rep(&proxy, "other.test", p), 0x02);
    assert_eq!(connect_ip(proxy.addr(), None, echo.addr).err(), Some(0x02));
    // Outside the port range the address is allowed.
    let (echo2, _) = recording_echo("127.0.0.1:0");
    if echo2.addr.port() > p || echo2.addr.port() < p.saturating_sub(5) {
        let mut s = connect_ip(proxy.addr(), None, echo2.addr).expect("outside the range");
        assert_echo(&mut s, b"x");
    }
    // `:PORT` matches any host on that port.
    let target = SocketAddr::from(([127, 0, 0, 2], p.wrapping_add(1).max(1)));
    assert_eq!(connect_ip(proxy.addr(), None, target).err(), Some(0x02));
}

#[test]
fn users_groups_clients_and_commands() {
    let echo = TestServer::echo();
    let p = echo.addr.port();
    let (proxy, _) = with_policy(
        r#"
[users.alice]
password = "alice-pw"
groups = ["staff"]

[users.bob]
password = "bob-pw"

[[rules]]
groups = ["staff"]
dest = [".corp.test"]
action = "allow"

[[rules]]
dest = [".corp.test"]
action = "deny"

[[rules]]
users = ["bob"]
dest = ["other.test"]
action = "deny"

[[rules]]
clients = ["127.0.0.0/8"]
commands = ["http"]
dest = ["ok.test"]
action = "deny"
"#,
        &[],
    );
    let a = Some(("alice", "alice-pw"));
    let b = Some(("bob", "bob-pw"));
    assert!(
        connect_name(proxy.addr(), a, "x.corp.test", p).is_ok(),
        "staff reach corp"
    );
    assert_eq!(
        connect_name(proxy.addr(), b, "x.corp.test", p).err(),
        Some(0x02)
    );
    assert_eq!(
        connect_name(proxy.addr(), b, "other.test", p).err(),
        Some(0x02)
    );
    assert!(
        connect_name(proxy.addr(), a, "other.test", p).is_ok(),
        "the rule names bob only"
    );
    // The http-only rule does not touch CONNECT, but denies forwarding (403) for this client.
    assert!(connect_name(proxy.addr(), a, "ok.test", p).is_ok());
    if have_curl() {
        let origin = common::origin::Origin::start();
        let url = format!("http://ok.test:{}/x", origin.addr.port());
        let proxy_url = format!("http://alice:alice-pw@{}", proxy.addr());
        let (code, body, _) = curl(&["-o", "-", "-w", "%{http_code}", "-x", &proxy_url, &url]);
        assert_eq!(code, 0);
        let text = String::from_utf8_lossy(&body);
        assert!(text.ends_with("403"), "forwarding denied: {text}");
        assert!(
            !text.contains("ok.test") && !text.contains("rule"),
            "the body names neither rule nor config"
        );
        // CONNECT through HTTP is the "connect" command: allowed.
        let (code, body, err) = curl(&["-p", "-x", &proxy_url, &url]);
        assert_eq!(code, 0, "{err}");
        assert!(!body.is_empty());
    }
}

#[test]
fn deny_answer_per_protocol() {
    let echo = TestServer::echo();
    let p = echo.addr.port();
    let udp_echo = UdpEcho::start();
    let (proxy, _) = with_policy(
        &format!(
            r#"
[[rules]]
dest = ["*.blocked.test", "127.0.0.2", "127.0.0.1:{u}"]
action = "deny"
"#,
            u = udp_echo.addr.port()
        ),
        &[],
    );
    // SOCKS5: 0x02.
    assert_eq!(rep(&proxy, "a.blocked.test", p), 0x02);
    // SOCKS4a: 91.
    let mut s = connect(proxy.addr());
    s.write_all(&socks4_request(
        1,
        p,
        [0, 0, 0, 1],
        b"u",
        Some("a.blocked.test"),
    ))
    .unwrap();
    assert_eq!(&read_n(&mut s, 8)[..2], &[0, 91]);
    // SOCKS4a with a name that is not a host name: 91 as well (SOCKS4 has one failure code).
    let mut s = connect(proxy.addr());
    s.write_all(&socks4_request(
        1,
        p,
        [0, 0, 0, 1],
        b"u",
        Some("a..blocked.test"),
    ))
    .unwrap();
    assert_eq!(&read_n(&mut s, 8)[..2], &[0, 91]);
    // SOCKS4a to an allowed name works.
    let mut s = connect(proxy.addr());
    s.write_all(&socks4_request(1, p, [0, 0, 0, 1], b"u", Some("ok.test")))
        .unwrap();
    assert_eq!(&read_n(&mut s, 8)[..2], &[0, 90]);
    assert_echo(&mut s, b"socks4a");
    // HTTP forward and HTTP CONNECT: 403 with a body that names neither rule nor configuration.
    for req in [
        format!("GET http://a.blocked.test:{p}/ HTTP/1.1\r\nHost: a.blocked.test:{p}\r\n\r\n"),
        format!("CONNECT a.blocked.test:{p} HTTP/1.1\r\nHost: a.blocked.test:{p}\r\n\r\n"),
    ] {
        let mut s = connect(proxy.addr());
        s.write_all(req.as_bytes()).unwrap();
        let resp = String::from_utf8_lossy(&read_all_until_closed(&mut s)).into_owned();
        assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
        assert!(
            !resp.contains("blocked") && !resp.contains("rule") && !resp.contains("policy"),
            "{resp}"
        );
    }
    // An invalid name over HTTP is a bad request.
    let mut s = connect(proxy.addr());
    s.write_all(format!("CONNECT a..b:{p} HTTP/1.1\r\nHost: a..b:{p}\r\n\r\n").as_bytes())
        .unwrap();
    let resp = String::from_utf8_lossy(&read_all_until_closed(&mut s)).into_owned();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    // BIND expecting a denied peer: 0x02.
    let mut s = connect(proxy.addr());
    greet(&mut s);
    s.write_all(&socks5_request(2, "127.0.0.2:0".parse().unwrap()))
        .unwrap();
    assert_eq!(read_socks5_reply(&mut s).0, 0x02);
    // UDP: the denied datagrams are dropped and counted reason="rule"; an allowed one is echoed.
    let mut ctl = connect(proxy.addr());
    greet(&mut ctl);
    ctl.write_all(&socks5_request(3, "0.0.0.0:0".parse().unwrap()))
        .unwrap();
    let (r, relay) = read_socks5_reply(&mut ctl);
    assert_eq!(r, 0);
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let dgram = |host: &str, port: u16, data: &[u8]| {
        let mut d = vec![0, 0, 0, 3, host.len() as u8];
        d.extend_from_slice(host.as_bytes());
        d.extend_from_slice(&port.to_be_bytes());
        d.extend_from_slice(data);
        d
    };
    let u = udp_echo.addr.port();
    client
        .send_to(&dgram("a.blocked.test", u, b"no"), relay)
        .unwrap();
    client.send_to(&dgram("ok.test", u, b"no"), relay).unwrap(); // 127.0.0.1:{u} is denied
    let mut d = vec![0, 0, 0, 1, 127, 0, 0, 2];
    d.extend_from_slice(&u.to_be_bytes());
    d.extend_from_slice(b"no");
    client.send_to(&d, relay).unwrap();
    wait_metric(&proxy, "socksgate_udp_drops_total{reason=\"rule\"}", 3);
    assert_eq!(
        proxy.metric("socksgate_udp_datagrams_total{direction=\"up\"}"),
        0
    );
    drop(ctl);
}

#[test]
fn rules_default_deny() {
    let echo = TestServer::echo();
    let (proxy, _) = with_policy(
        r#"
[defaults]
rules_default = "deny"

[[rules]]
dest = ["ok.test"]
action = "allow"
"#,
        &[],
    );
    let p = echo.addr.port();
    assert_eq!(rep(&proxy, "ok.test", p), 0);
    assert_eq!(rep(&proxy, "other.test", p), 0x02);
    assert_eq!(connect_ip(proxy.addr(), None, echo.addr).err(), Some(0x02));
}

#[test]
fn deny_flags_win_over_file_rules() {
    let echo = TestServer::echo();
    let (proxy, _) = with_policy(
        "[[rules]]\ndest = [\"ok.test\"]\naction = \"allow\"\n",
        &["--deny-dest", "127.0.0.1/32"],
    );
    assert_eq!(rep(&proxy, "ok.test", echo.addr.port()), 0x02);
}

#[test]
fn egress_per_user_seen_by_the_target() {
    let (echo, peers) = recording_echo("127.0.0.1:0");
    let (proxy, _) = with_policy(
        r#"
[users.alice]
password = "alice-pw"
egress = ["127.0.0.2"]

[users.bob]
password = "bob-pw"
egress = ["127.0.1.0/24"]

[users.carol]
password = "carol-pw"
egress = ["10.255.255.1"]
"#,
        &[],
    );
    let mut s = connect_ip(proxy.addr(), Some(("alice", "alice-pw")), echo.addr).expect("alice");
    assert_echo(&mut s, b"alice");
    let seen = peers.recv_timeout(IO_TIMEOUT).unwrap();
    assert_eq!(seen.ip(), "127.0.0.2".parse::<std::net::IpAddr>().unwrap());
    let mut bobs = Vec::new();
    for _ in 0..3 {
        let mut s = connect_name(
            proxy.addr(),
            Some(("bob", "bob-pw")),
            "ok.test",
            echo.addr.port(),
        )
        .expect("bob");
        assert_echo(&mut s, b"bob");
        let seen = peers.recv_timeout(IO_TIMEOUT).unwrap();
        let std::net::IpAddr::V4(v4) = seen.ip() else {
            panic!("{seen}")
        };
        assert_eq!(&v4.octets()[..3], &[127, 0, 1], "bob's source {seen}");
        assert!(v4.octets()[3] != 0 && v4.octets()[3] != 255);
        bobs.push(v4);
    }
    // A single address that is not on this host cannot be bound: general failure and a log line.
    assert_eq!(
        connect_ip(proxy.addr(), Some(("carol", "carol-pw")), echo.addr).err(),
        Some(0x01)
    );
    assert!(proxy.wait_for(IO_TIMEOUT, || proxy
        .log()
        .contains("cannot bind egress address 10.255.255.1")));
    // The access log names the egress address.
    drop(s);
    assert!(
        proxy.wait_for(IO_TIMEOUT, || proxy.log().contains("user=alice")
            && proxy.log().contains("egress=127.0.0.2")),
        "{}",
        proxy.log()
    );
    // A UDP association of alice sends from her address.
    let udp_target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp_target.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (mut ctl, st) = socks5_login(proxy.addr(), "alice", "alice-pw");
    assert_eq!(st, 0);
    ctl.write_all(&socks5_request(3, "0.0.0.0:0".parse().unwrap()))
        .unwrap();
    let (r, relay) = read_socks5_reply(&mut ctl);
    assert_eq!(r, 0);
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut d = vec![0, 0, 0, 1, 127, 0, 0, 1];
    d.extend_from_slice(&udp_target.local_addr().unwrap().port().to_be_bytes());
    d.extend_from_slice(b"udp");
    client.send_to(&d, relay).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = udp_target.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"udp");
    assert_eq!(from.ip(), "127.0.0.2".parse::<std::net::IpAddr>().unwrap());
}

#[test]
fn max_connections_per_user() {
    let echo = TestServer::echo();
    let (proxy, _) = with_policy(
        r#"
[defaults]
max_connections = 2

[users.alice]
password = "alice-pw"
max_connections = 1

[users.bob]
password = "bob-pw"
"#,
        &[],
    );
    let a = Some(("alice", "alice-pw"));
    let b = Some(("bob", "bob-pw"));
    let first = connect_ip(proxy.addr(), a, echo.addr).expect("alice's first");
    assert_eq!(
        connect_ip(proxy.addr(), a, echo.addr).err(),
        Some(0x02),
        "alice's second"
    );
    let b1 = connect_ip(proxy.addr(), b, echo.addr).expect("bob 1");
    let b2 = connect_ip(proxy.addr(), b, echo.addr).expect("bob 2");
    assert_eq!(
        connect_ip(proxy.addr(), b, echo.addr).err(),
        Some(0x02),
        "bob's third"
    );
    // HTTP at the limit: 403.
    let mut s = connect(proxy.addr());
    let auth = base64_basic("alice", "alice-pw");
    s.write_all(
        format!(
            "CONNECT {a} HTTP/1.1\r\nHost: {a}\r\nProxy-Authorization: Basic {auth}\r\n\r\n",
            a = echo.addr
        )
        .as_bytes(),
    )
    .unwrap();
    let resp = String::from_utf8_lossy(&read_all_until_closed(&mut s)).into_owned();
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    drop((first, b1, b2));
    assert!(
        proxy.wait_for(IO_TIMEOUT, || connect_ip(proxy.addr(), a, echo.addr)
            .is_ok())
    );
}

#[test]
fn reload_swaps_a_rule_while_a_tunnel_relays() {
    let echo = TestServer::echo();
    let p = echo.addr.port();
    let (proxy, path) = with_policy(
        "[[rules]]\ndest = [\"other.test\"]\naction = \"deny\"\n",
        &[],
    );
    let mut tunnel = connect_name(proxy.addr(), None, "ok.test", p).expect("ok.test before");
    assert_eq!(rep(&proxy, "other.test", p), 0x02);
    std::fs::write(
        &path,
        "[[rules]]\ndest = [\"ok.test\"]\naction = \"deny\"\n",
    )
    .unwrap();
    proxy.reload();
    assert!(proxy.wait_for(IO_TIMEOUT, || proxy.log().contains("SIGHUP: reloaded")));
    assert!(
        proxy.wait_for(IO_TIMEOUT, || rep(&proxy, "ok.test", p) == 0x02),
        "new rule in force"
    );
    assert_eq!(rep(&proxy, "other.test", p), 0, "old rule gone");
    assert_echo(
        &mut tunnel,
        b"the tunnel opened before the reload keeps relaying",
    );
    // A typo on reload keeps the old policy and logs one error naming line and key.
    std::fs::write(
        &path,
        "[[rules]]\ndest = [\"other.test\"]\nactoin = \"deny\"\n",
    )
    .unwrap();
    proxy.reload();
    assert!(proxy.wait_for(IO_TIMEOUT, || proxy
        .log()
        .contains("keeping the old users table and policy")));
    let log = proxy.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains(":3: actoin: unknown field"),
        "{}",
        errors[0]
    );
    assert_eq!(rep(&proxy, "ok.test", p), 0x02, "the old policy is kept");
    assert_eq!(rep(&proxy, "other.test", p), 0);
    assert_echo(&mut tunnel, b"still relaying");
}

#[test]
fn reload_revokes_removed_and_changed_users() {
    let echo = TestServer::echo();
    let (proxy, path) = with_policy(
        "[users.alice]\npassword = \"a1\"\n[users.bob]\npassword = \"b1\"\n[users.carol]\npassword = \"c1\"\n",
        &[],
    );
    let mut a = connect_ip(proxy.addr(), Some(("alice", "a1")), echo.addr).unwrap();
    let mut b = connect_ip(proxy.addr(), Some(("bob", "b1")), echo.addr).unwrap();
    let mut c = connect_ip(proxy.addr(), Some(("carol", "c1")), echo.addr).unwrap();
    // bob is removed, carol's password changes, alice stays.
    std::fs::write(
        &path,
        "[users.alice]\npassword = \"a1\"\n[users.carol]\npassword = \"c2\"\n",
    )
    .unwrap();
    proxy.reload();
    assert!(peer_closed(&mut b), "bob's session is closed");
    assert!(peer_closed(&mut c), "carol's session is closed");
    assert_echo(&mut a, b"alice keeps hers");
    assert!(
        proxy.wait_for(IO_TIMEOUT, || proxy.log().matches("end=revoked").count()
            == 2),
        "{}",
        proxy.log()
    );
    let _ = c.write_all(b"x");
}

/// Runs `socksgate --check-config` with `args`: (exit code, stdout, stderr).
fn check_config(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_socksgate"))
        .arg("--check-config")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_reports_file_line_and_key() {
    let good = temp_path("good.toml");
    std::fs::write(&good, "[users.alice]\npassword = \"x\"\n[[rules]]\nusers = [\"alice\"]\ndest = [\":443\"]\naction = \"allow\"\n").unwrap();
    let (code, out, err) = check_config(&["--policy", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration ok"));

    let typo = temp_path("typo.toml");
    std::fs::write(
        &typo,
        "[users.alice]\npassword = \"x\"\n\nrate_dwn = \"2MiB/s\"\n",
    )
    .unwrap();
    let (code, _, err) = check_config(&["--policy", typo.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with(&format!("{}:4: rate_dwn: unknown field", typo.display())),
        "{err}"
    );
    assert!(!err.contains("\"x\""), "no password in errors: {err}");

    let bad_rule = temp_path("badrule.toml");
    std::fs::write(
        &bad_rule,
        "[[rules]]\ndest = [\"ok.test\"]\naction = \"allow\"\n\n[[rules]]\ndest = [\"10.0.0.0/33\"]\naction = \"deny\"\n",
    )
    .unwrap();
    let (code, _, err) = check_config(&["--policy", bad_rule.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains(":6: rules[2].dest:"), "{err}");

    // Quota keys validate; a bad value is refused with its line and key, and a server does not start with it.
    let quota = temp_path("quota.toml");
    std::fs::write(
        &quota,
        "[users.alice]\npassword = \"x\"\nquota = \"100MiB\"\nquota_period = \"30d\"\n",
    )
    .unwrap();
    let (code, _, err) = check_config(&["--policy", quota.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let bad_quota = temp_path("bad_quota.toml");
    std::fs::write(
        &bad_quota,
        "[users.alice]\npassword = \"x\"\nquota = \"100 megs\"\nquota_period = \"monthly\"\n",
    )
    .unwrap();
    let (code, _, err) = check_config(&["--policy", bad_quota.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains(":3: users.alice.quota: "), "{err}");
    assert!(err.contains(":4: users.alice.quota_period: "), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_socksgate"))
        .args(["-l", "127.0.0.1:0", "--policy", bad_quota.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    // The users file is checked too.
    let users = temp_path("users");
    std::fs::write(&users, "alice:x\nno colon here\n").unwrap();
    let (code, _, err) = check_config(&[
        "--users",
        users.to_str().unwrap(),
        "--policy",
        good.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("line 2"), "{err}");
}

/// Every TOML example in the README passes --check-config (bob, who has no password in the example, comes from a
/// users file), so the documentation cannot drift from the parser.
#[test]
fn readme_examples_pass_check_config() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let users = temp_path("users");
    std::fs::write(&users, "bob:bob-pw\n").unwrap();
    let mut n = 0;
    for (i, block) in readme.split("```toml\n").skip(1).enumerate() {
        let text = block.split("```").next().unwrap();
        let path = temp_path(&format!("readme{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, out, err) = check_config(&[
            "--users",
            users.to_str().unwrap(),
            "--policy",
            path.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "README example {i}: {err}\n{text}");
        assert!(out.contains("configuration ok"));
        n += 1;
    }
    assert!(n >= 3, "the README has its policy examples");
}

/// Through `--upstream`, the user's egress address is the source of the connection to the upstream proxy (a
/// second socksgate, whose access log names the client address it saw).
#[test]
fn egress_applies_to_the_upstream_connection() {
    let echo = TestServer::echo();
    let upstream = Proxy::start(&[]);
    let url = format!("socks5://{}", upstream.addr());
    let (proxy, _) = with_policy(
        "[users.alice]\npassword = \"alice-pw\"\negress = [\"127.0.0.3\"]\n",
        &["--upstream", &url],
    );
    let mut s = connect_ip(proxy.addr(), Some(("alice", "alice-pw")), echo.addr)
        .expect("through the upstream");
    assert_echo(&mut s, b"chained");
    drop(s);
    assert!(
        upstream.wait_for(IO_TIMEOUT, || upstream.log().contains("client=127.0.0.3:")),
        "upstream log: {}",
        upstream.log()
    );
}

/// Without users, `[defaults] max_connections` limits each client address: SOCKS5 0x02, SOCKS4 91, HTTP 403, and a
/// closed session frees its slot.
#[test]
fn max_connections_for_anonymous_clients_per_address() {
    let echo = TestServer::echo();
    let (proxy, _) = with_policy("[defaults]\nmax_connections = 2\n", &[]);
    let s1 = connect_ip(proxy.addr(), None, echo.addr).expect("first");
    let mut s4 = connect(proxy.addr());
    let ip = [127, 0, 0, 1];
    s4.write_all(&socks4_request(1, echo.addr.port(), ip, b"u", None))
        .unwrap();
    assert_eq!(&read_n(&mut s4, 8)[..2], &[0, 90], "second (SOCKS4)");
    assert_eq!(
        connect_ip(proxy.addr(), None, echo.addr).err(),
        Some(0x02),
        "third (SOCKS5)"
    );
    let mut s = connect(proxy.addr());
    s.write_all(&socks4_request(1, echo.addr.port(), ip, b"u", None))
        .unwrap();
    assert_eq!(&read_n(&mut s, 8)[..2], &[0, 91], "third (SOCKS4)");
    let mut s = connect(proxy.addr());
    s.write_all(format!("CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n\r\n", a = echo.addr).as_bytes())
        .unwrap();
    let resp = String::from_utf8_lossy(&read_all_until_closed(&mut s)).into_owned();
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    // Another client address has its own count.
    let mut other = connect_from(Ipv4Addr::new(127, 0, 0, 5), proxy.addr());
    greet(&mut other);
    other.write_all(&socks5_request(1, echo.addr)).unwrap();
    assert_eq!(read_socks5_reply(&mut other).0, 0, "another address");
    drop(s1);
    assert!(
        proxy.wait_for(IO_TIMEOUT, || connect_ip(proxy.addr(), None, echo.addr)
            .is_ok())
    );
    drop(s4);
}

/// `clients` matches the client address only, and `commands = ["udp"]` denies datagrams but not CONNECT.
#[test]
fn per_client_and_udp_command_rules() {
    let echo = TestServer::echo();
    let udp_echo = UdpEcho::start();
    let (proxy, _) = with_policy(
        r#"
[[rules]]
clients = ["127.0.0.5/32"]
action = "deny"

[[rules]]
commands = ["udp"]
dest = ["ok.test"]
action = "deny"
"#,
        &[],
    );
    let mut from5 = connect_from(Ipv4Addr::new(127, 0, 0, 5), proxy.addr());
    greet(&mut from5);
    from5.write_all(&socks5_request(1, echo.addr)).unwrap();
    assert_eq!(
        read_socks5_reply(&mut from5).0,
        0x02,
        "client 127.0.0.5 is denied"
    );
    let mut from6 = connect_from(Ipv4Addr::new(127, 0, 0, 6), proxy.addr());
    greet(&mut from6);
    from6.write_all(&socks5_request(1, echo.addr)).unwrap();
    assert_eq!(
        read_socks5_reply(&mut from6).0,
        0,
        "client 127.0.0.6 is not"
    );
    assert_echo(&mut from6, b"six");
    // CONNECT to ok.test is allowed; a datagram to ok.test is dropped, one to the address is echoed.
    assert_eq!(rep(&proxy, "ok.test", echo.addr.port()), 0);
    let mut ctl = connect(proxy.addr());
    greet(&mut ctl);
    ctl.write_all(&socks5_request(3, "0.0.0.0:0".parse().unwrap()))
        .unwrap();
    let (r, relay) = read_socks5_reply(&mut ctl);
    assert_eq!(r, 0);
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let port = udp_echo.addr.port().to_be_bytes();
    let mut by_name = vec![0, 0, 0, 3, 7];
    by_name.extend_from_slice(b"ok.test");
    by_name.extend_from_slice(&port);
    by_name.extend_from_slice(b"named");
    client.send_to(&by_name, relay).unwrap();
    wait_metric(&proxy, "socksgate_udp_drops_total{reason=\"rule\"}", 1);
    let mut by_ip = vec![0, 0, 0, 1, 127, 0, 0, 1];
    by_ip.extend_from_slice(&port);
    by_ip.extend_from_slice(b"addressed");
    client.send_to(&by_ip, relay).unwrap();
    let mut buf = [0u8; 128];
    let (n, _) = client.recv_from(&mut buf).unwrap();
    assert!(buf[..n].ends_with(b"addressed"), "echoed: {:?}", &buf[..n]);
    drop(ctl);
}

/// `session_usernames = true`: `alice-session-ID` logs in as alice (SOCKS5 and HTTP Basic) and the same ID always
/// leaves from the same address of her block; different IDs spread over it.
#[test]
fn session_usernames_give_sticky_egress() {
    let (echo, peers) = recording_echo("127.0.0.1:0");
    let (proxy, _) = with_policy(
        "[defaults]\nsession_usernames = true\n\n[users.alice]\npassword = \"alice-pw\"\negress = [\"127.0.1.0/24\"]\n",
        &[],
    );
    let source = |id: &str| {
        let user = format!("alice-session-{id}");
        let mut s =
            connect_ip(proxy.addr(), Some((&user, "alice-pw")), echo.addr).expect("session login");
        assert_echo(&mut s, id.as_bytes());
        peers.recv_timeout(IO_TIMEOUT).unwrap().ip()
    };
    let first = source("7");
    assert_eq!(source("7"), first, "the same session ID keeps its address");
    let others: std::collections::HashSet<_> = (0..8).map(|i| source(&format!("s{i}"))).collect();
    assert!(others.len() >= 3, "IDs spread over the block: {others:?}");
    assert!(
        proxy.wait_for(IO_TIMEOUT, || proxy.log().contains("user=alice ")),
        "{}",
        proxy.log()
    );
    // HTTP Basic with a session name.
    let mut s = connect(proxy.addr());
    let auth = base64_basic("alice-session-7", "alice-pw");
    s.write_all(
        format!(
            "CONNECT {a} HTTP/1.1\r\nHost: {a}\r\nProxy-Authorization: Basic {auth}\r\n\r\n",
            a = echo.addr
        )
        .as_bytes(),
    )
    .unwrap();
    let head = read_n(&mut s, 39);
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    assert_eq!(
        peers.recv_timeout(IO_TIMEOUT).unwrap().ip(),
        first,
        "sticky over HTTP too"
    );
    // A wrong password or an unknown base user is refused.
    let (_, st) = socks5_login(proxy.addr(), "alice-session-7", "wrong");
    assert_ne!(st, 0);
    let (_, st) = socks5_login(proxy.addr(), "carol-session-7", "alice-pw");
    assert_ne!(st, 0);
}
