//! Routing through policy upstream groups (`[upstreams.NAME]`, `action = "via:NAME"`) against the real binary: the
//! members are other socksgate instances (SOCKS5 with and without auth, HTTP CONNECT, HTTP forwarding), and what
//! each one carried is read from its own /metrics or from the gateway's per-member counters.

use crate::common;

use common::origin::Origin;
use common::*;
use std::io::{Read, Write};
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

/// A member proxy with its own /metrics (to count the sessions it carried).
fn member(extra: &[&str]) -> Proxy {
    let mut args = vec!["--metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

/// The gateway with `policy` as its policy file and /metrics.
fn gateway(policy: &str, name: &str) -> (Proxy, std::path::PathBuf) {
    let path = temp_path(name);
    std::fs::write(&path, policy).unwrap();
    let p = Proxy::start(&[
        "--metrics",
        "127.0.0.1:0",
        "--policy",
        path.to_str().unwrap(),
    ]);
    (p, path)
}

fn series(kind: &str, server: &str) -> String {
    format!("socksgate_upstream_{kind}{{group=\"corp\",server=\"{server}\"}}")
}

const ACCEPTED: &str = "socksgate_connections_accepted_total";

/// One SOCKS5 CONNECT through the gateway to the echo server, with bytes checked end to end.
fn echo_session(gw: SocketAddr, echo: SocketAddr, seed: u64) {
    let mut s = socks5_connect(gw, echo).expect("CONNECT through the group");
    assert_echo(&mut s, &pseudo_random(seed, 4096));
}

/// The first member is a port with nothing listening: the session goes on to the second (which wants SOCKS5
/// credentials) and succeeds; the dead member's attempt and failure are counted.
#[test]
fn failover_skips_a_dead_member_within_the_session() {
    let echo = TestServer::echo();
    let up = member(&["--user", "u:p%w"]);
    let dead = closed_port();
    let policy = format!(
        "[upstreams.corp]\nservers = [\"socks5://127.0.0.1:{dead}\", \"socks5://u:p%25w@{}\"]\nstrategy = \"failover\"\n\n[[rules]]\naction = \"via:corp\"\n",
        up.addr()
    );
    let (gw, _) = gateway(&policy, "failover.toml");
    echo_session(gw.addr(), echo.addr, 1);
    let dead_label = format!("socks5://127.0.0.1:{dead}");
    let live_label = format!("socks5://u@{}", up.addr());
    wait_metric(&gw, &series("attempts_total", &dead_label), 1);
    wait_metric(&gw, &series("failures_total", &dead_label), 1);
    wait_metric(&gw, &series("attempts_total", &live_label), 1);
    wait_metric(&gw, &series("failures_total", &live_label), 0);
    wait_metric(&gw, &series("up", &live_label), 1);
    wait_metric(&up, ACCEPTED, 1);
}

/// An HTTP member carries SOCKS CONNECT (as HTTP CONNECT) and plain forwarded HTTP (absolute-form); BIND through a
/// group is refused with 0x07.
#[test]
fn http_member_carries_connect_and_forwarding_and_bind_is_refused() {
    let echo = TestServer::echo();
    let origin = Origin::start();
    let up = member(&[]);
    let policy = format!(
        "[upstreams.corp]\nservers = [\"http://{}\"]\n\n[[rules]]\naction = \"via:corp\"\n",
        up.addr()
    );
    let (gw, _) = gateway(&policy, "httpmember.toml");
    echo_session(gw.addr(), echo.addr, 2);
    wait_metric(&up, ACCEPTED, 1);

    let mut s = connect(gw.addr());
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        origin.url("/via-group"),
        origin.authority()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let seen = origin
        .wait_request("/via-group", IO_TIMEOUT)
        .expect("the origin got the request");
    assert_eq!(seen.request_line(), "GET /via-group HTTP/1.1");
    wait_metric(&up, ACCEPTED, 2);

    let mut s = connect(gw.addr());
    s.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_n(&mut s, 2), vec![5, 0]);
    s.write_all(&socks5_request(2, "127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let (rep, _) = read_socks5_reply(&mut s);
    assert_eq!(rep, 0x07, "BIND through a group");
}

/// Round-robin spreads sessions evenly over two members, as each member's own accept counter shows.
#[test]
fn round_robin_spreads_sessions() {
    let echo = TestServer::echo();
    let (a, b) = (member(&[]), member(&[]));
    let policy = format!(
        "[upstreams.corp]\nservers = [\"socks5://{}\", \"socks5://{}\"]\nstrategy = \"round-robin\"\n\n[[rules]]\ndest = [\"{}\"]\naction = \"via:corp\"\n",
        a.addr(),
        b.addr(),
        echo.addr
    );
    let (gw, _) = gateway(&policy, "rr.toml");
    for i in 0..10 {
        echo_session(gw.addr(), echo.addr, 10 + i);
    }
    wait_metric(&a, ACCEPTED, 5);
    wait_metric(&b, ACCEPTED, 5);
}

/// Hash keeps each client address on one member over many sessions.
#[test]
fn hash_is_sticky_by_client_address() {
    let echo = TestServer::echo();
    let (a, b) = (member(&[]), member(&[]));
    let policy = format!(
        "[upstreams.corp]\nservers = [\"socks5://{}\", \"socks5://{}\"]\nstrategy = \"hash\"\n\n[[rules]]\naction = \"via:corp\"\n",
        a.addr(),
        b.addr()
    );
    let (gw, _) = gateway(&policy, "hash.toml");
    let (la, lb) = (
        format!("socks5://{}", a.addr()),
        format!("socks5://{}", b.addr()),
    );
    let mut before = (0, 0);
    for (k, ip) in [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)]
        .into_iter()
        .enumerate()
    {
        for i in 0..8 {
            let s = connect_from(ip, gw.addr());
            let mut s = socks5_connect_on(s, echo.addr).expect("CONNECT");
            assert_echo(&mut s, &pseudo_random(100 + i, 512));
        }
        let got = (
            gw.metric(&series("attempts_total", &la)),
            gw.metric(&series("attempts_total", &lb)),
        );
        let delta = (got.0 - before.0, got.1 - before.1);
        assert!(
            delta == (8, 0) || delta == (0, 8),
            "client {k}: sessions went to both members: {delta:?}"
        );
        before = got;
    }
}

/// After `max_fails` failures in a row the dead member is skipped (its attempts stop growing while sessions go
/// on); after `fail_timeout` it is tried again, and once something listens there it is up again.
#[test]
fn passive_ejection_and_return() {
    let echo = TestServer::echo();
    let live = member(&[]);
    let dead = free_port();
    let policy = format!(
        "[upstreams.corp]\nservers = [\"socks5://127.0.0.1:{dead}\", \"socks5://{}\"]\nmax_fails = 2\nfail_timeout = \"1s\"\n\n[[rules]]\naction = \"via:corp\"\n",
        live.addr()
    );
    let (gw, _) = gateway(&policy, "eject.toml");
    let label = format!("socks5://127.0.0.1:{dead}");
    // Quick sessions: the 1 s cool-down outlasts them (each is a loopback round trip).
    for i in 0..6 {
        echo_session(gw.addr(), echo.addr, 200 + i);
        if i == 1 {
            wait_metric(&gw, &series("up", &label), 0);
        }
    }
    let attempts = gw.metric(&series("attempts_total", &label));
    assert!(
        (2..=3).contains(&attempts),
        "the dead member was tried {attempts} times in 6 sessions"
    );
    assert!(
        gw.wait_for(IO_TIMEOUT, || gw.log().contains("is down after 2 failures")),
        "{}",
        gw.log()
    );
    // Bring the member to life on its port; sessions after the cool-down find it again.
    let revived = member(&["-l", &format!("127.0.0.1:{dead}")]);
    let mut n = 0;
    let back = gw.wait_for(Duration::from_secs(15), || {
        n += 1;
        echo_session(gw.addr(), echo.addr, 300 + n);
        gw.metric(&series("up", &label)) == 1
    });
    assert!(back, "the member did not come back:\n{}", gw.log());
    assert!(gw.log().contains("is up again"), "{}", gw.log());
    assert!(revived.metric(ACCEPTED) >= 1);
}

/// SIGHUP swaps the group's members: new sessions go to the new member, a tunnel opened before keeps relaying
/// through the old one.
#[test]
fn reload_swaps_a_group() {
    let echo = TestServer::echo();
    let (a, b) = (member(&[]), member(&[]));
    let text = |m: &Proxy| {
        format!(
            "[upstreams.corp]\nservers = [\"socks5://{}\"]\n\n[[rules]]\naction = \"via:corp\"\n",
            m.addr()
        )
    };
    let (gw, path) = gateway(&text(&a), "reload.toml");
    let mut kept = socks5_connect(gw.addr(), echo.addr).expect("first tunnel");
    assert_echo(&mut kept, b"before");
    wait_metric(&a, ACCEPTED, 1);
    std::fs::write(&path, text(&b)).unwrap();
    gw.reload();
    assert!(
        gw.wait_for(IO_TIMEOUT, || gw.log().contains("SIGHUP: reloaded")),
        "{}",
        gw.log()
    );
    // The worker applies the swap from its command channel: wait until a new session lands on b.
    let mut n = 0;
    assert!(gw.wait_for(IO_TIMEOUT, || {
        n += 1;
        echo_session(gw.addr(), echo.addr, 400 + n);
        b.metric(ACCEPTED) >= 1
    }));
    let a_before = a.metric(ACCEPTED);
    echo_session(gw.addr(), echo.addr, 500);
    wait_metric(&b, ACCEPTED, b.metric(ACCEPTED));
    assert_eq!(
        a.metric(ACCEPTED),
        a_before,
        "new sessions avoid the old member"
    );
    assert_echo(&mut kept, &pseudo_random(7, 64 * 1024));
    assert!(gw
        .metrics_text()
        .contains(&series("up", &format!("socks5://{}", b.addr()))));
}

/// `--check-config` refuses a rule naming a group that does not exist, with file, line and key.
#[test]
fn check_config_refuses_an_unknown_group() {
    let path = temp_path("unknown.toml");
    std::fs::write(
        &path,
        "[upstreams.corp]\nservers = [\"socks5://127.0.0.1:1081\"]\n\n[[rules]]\naction = \"via:nope\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_socksgate"))
        .args(["--check-config", "--policy", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{}:5: rules[1].action: no [upstreams.nope] group is defined",
            path.display()
        )),
        "{err}"
    );
    let ok = temp_path("known.toml");
    std::fs::write(
        &ok,
        "[upstreams.corp]\nservers = [\"socks5://127.0.0.1:1081\"]\nmax_fails = 3\nfail_timeout = \"10s\"\n\n[[rules]]\naction = \"via:corp\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_socksgate"))
        .args(["--check-config", "--policy", ok.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The README's corp recipe, run live: staff (bob) reach `*.corp.test` through the group, by name (the gateway has
/// no way to resolve it: the member does, with its `--resolve`); others get only 80 and 443; 10.0.0.0/8 is refused
/// to everyone.
#[test]
fn readme_corp_recipe_routes_staff_through_the_group() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let recipe = readme
        .split("```toml\n")
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains("action = \"via:corp\""))
        .expect("the corp recipe is in the README");
    let echo = TestServer::echo();
    let up = member(&["--resolve", "app.corp.test=127.0.0.1"]);
    let servers_line = recipe
        .lines()
        .find(|l| l.starts_with("servers = "))
        .unwrap();
    let policy = recipe.replace(
        servers_line,
        &format!("servers = [\"socks5://{}\"]", up.addr()),
    );
    let users = temp_path("recipe-users");
    std::fs::write(&users, "bob:bob-pw\ncarol:carol-pw\n").unwrap();
    let path = temp_path("recipe.toml");
    std::fs::write(&path, policy).unwrap();
    let gw = Proxy::start(&[
        "--metrics",
        "127.0.0.1:0",
        "--users",
        users.to_str().unwrap(),
        "--policy",
        path.to_str().unwrap(),
    ]);

    let (mut s, st) = socks5_login(gw.addr(), "bob", "bob-pw");
    assert_eq!(st, 0);
    s.write_all(&socks5_request_domain(1, "app.corp.test", echo.addr.port()))
        .unwrap();
    let (rep, _) = read_socks5_reply(&mut s);
    assert_eq!(rep, 0, "bob through the corp group");
    assert_echo(&mut s, &pseudo_random(9, 8192));
    wait_metric(&up, ACCEPTED, 1);

    let ten: SocketAddr = "10.1.2.3:443".parse().unwrap();
    for (user, pass) in [("bob", "bob-pw"), ("carol", "carol-pw")] {
        assert_eq!(
            socks5_connect_auth(gw.addr(), user, pass, ten).err(),
            Some(0x02),
            "{user} to 10.0.0.0/8"
        );
    }
    assert_eq!(
        socks5_connect_auth(gw.addr(), "carol", "carol-pw", echo.addr).err(),
        Some(0x02),
        "carol to a port other than 80 and 443"
    );
    assert_eq!(
        up.metric(ACCEPTED),
        1,
        "only bob's corp session used the group"
    );
}

/// A member that accepts but never answers its handshake gets only its share of the connect timeout; the session
/// then goes on to the next member and succeeds, and the silent member's failure is counted.
#[test]
fn a_silent_member_costs_only_its_share_of_the_connect_timeout() {
    let echo = TestServer::echo();
    let silent = TestServer::start(|mut s| {
        let mut b = [0u8; 64];
        while let Ok(n) = s.read(&mut b) {
            if n == 0 {
                break;
            }
        }
    });
    let live = member(&[]);
    let policy = format!(
        "[upstreams.corp]\nservers = [\"socks5://{}\", \"socks5://{}\"]\n\n[[rules]]\naction = \"via:corp\"\n",
        silent.addr,
        live.addr()
    );
    let path = temp_path("silent.toml");
    std::fs::write(&path, policy).unwrap();
    let gw = Proxy::start(&[
        "--metrics",
        "127.0.0.1:0",
        "--connect-timeout",
        "6s",
        "--policy",
        path.to_str().unwrap(),
    ]);
    let started = std::time::Instant::now();
    echo_session(gw.addr(), echo.addr, 600);
    // The silent member's share is half of the 6 s: well under the whole timeout, at least the share.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
    let label = format!("socks5://{}", silent.addr);
    wait_metric(&gw, &series("failures_total", &label), 1);
    wait_metric(&live, ACCEPTED, 1);
}

/// A `via:NAME` rule takes precedence over `--upstream` for the sessions it matches; the others keep using
/// `--upstream`. An HTTP CONNECT client is carried through a SOCKS5 member like a SOCKS client.
#[test]
fn via_rules_override_the_upstream_flag() {
    let (echo1, echo2) = (TestServer::echo(), TestServer::echo());
    let (flag, grp) = (member(&[]), member(&[]));
    let policy = format!(
        "[upstreams.corp]\nservers = [\"socks5://{}\"]\n\n[[rules]]\ndest = [\"{}\"]\naction = \"via:corp\"\n",
        grp.addr(),
        echo2.addr
    );
    let path = temp_path("override.toml");
    std::fs::write(&path, policy).unwrap();
    let flag_url = format!("socks5://{}", flag.addr());
    let gw = Proxy::start(&[
        "--metrics",
        "127.0.0.1:0",
        "--upstream",
        &flag_url,
        "--policy",
        path.to_str().unwrap(),
    ]);
    echo_session(gw.addr(), echo1.addr, 700);
    wait_metric(&flag, ACCEPTED, 1);
    let mut s = connect(gw.addr());
    s.write_all(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", echo2.addr).as_bytes())
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 1, "reply head: {head:?}");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    assert_echo(&mut s, &pseudo_random(701, 4096));
    wait_metric(&grp, ACCEPTED, 1);
    assert_eq!(flag.metric(ACCEPTED), 1);
}
