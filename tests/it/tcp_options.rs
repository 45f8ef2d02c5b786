//! `--tcp-keepalive`, `--tcp-user-timeout` and `--tcp-fastopen` end to end: a proxy started with them still
//! relays (curl through SOCKS5h and the HTTP proxy), and where `ss` is installed its view of both legs shows the
//! keepalive timer. (The socket options themselves are checked with getsockopt in net.rs's unit tests.)

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::origin::Origin;
use common::*;

const FLAGS: &[&str] = &[
    "--tcp-keepalive",
    "45s",
    "--tcp-user-timeout",
    "20s",
    "--tcp-fastopen",
];

#[test]
fn curl_works_through_a_proxy_with_the_tcp_options() {
    if !have_curl() {
        eprintln!("note: curl not installed; skipped");
        return;
    }
    let origin = Origin::start();
    let proxy = Proxy::start(FLAGS);
    let url = origin.url("/tcp-options");
    let via_socks = format!("socks5h://{}", proxy.addr());
    let (code, body, err) = curl(&["-x", &via_socks, &url]);
    assert_eq!(code, 0, "curl via SOCKS5h: {err}");
    assert_eq!(body, b"path=/tcp-options\n");
    let via_http = format!("http://{}", proxy.addr());
    let (code, body, err) = curl(&["-x", &via_http, &url]);
    assert_eq!(code, 0, "curl via the HTTP proxy: {err}");
    assert_eq!(body, b"path=/tcp-options\n");
}

/// `ss -tnoH state established` lines for sockets matching `filter`.
fn ss(filter: &str) -> Option<String> {
    let out = Command::new("ss")
        .args(["-tnoH", "state", "established", filter])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn ss_shows_keepalive_timers_on_both_legs() {
    if ss("( sport = :1 )").is_none() {
        eprintln!("note: ss not installed; skipped");
        return;
    }
    let target = TestServer::echo();
    let proxy = Proxy::start(FLAGS);
    let tunnel = socks5_connect(proxy.addr(), target.addr).expect("tunnel up");
    let client_port = tunnel.local_addr().unwrap().port();
    // The proxy's end of the client leg: local port = the proxy's, peer = our socket.
    let client_leg = format!(
        "( sport = :{} and dport = :{client_port} )",
        proxy.addr().port()
    );
    // The proxy's end of the target leg: the only socket whose peer is the echo server, other than the echo
    // server's own accepted sockets (which have the server's port as local port and no keepalive).
    let target_leg = format!("( dport = :{} )", target.addr.port());
    for (leg, filter) in [("client", client_leg), ("target", target_leg)] {
        let mut seen = String::new();
        let ok = wait_until(Duration::from_secs(10), &mut || {
            seen = ss(&filter).unwrap_or_default();
            seen.contains("timer:(keepalive,")
        });
        assert!(ok, "{leg} leg shows no keepalive timer: {seen:?}");
    }
    drop(tunnel);
}

#[test]
fn without_the_flags_no_keepalive_timer() {
    if ss("( sport = :1 )").is_none() {
        eprintln!("note: ss not installed; skipped");
        return;
    }
    let target = TestServer::echo();
    let proxy = Proxy::start(&[]);
    let tunnel = socks5_connect(proxy.addr(), target.addr).expect("tunnel up");
    let seen = ss(&format!("( dport = :{} )", target.addr.port())).unwrap_or_default();
    assert!(!seen.trim().is_empty(), "ss shows the target leg");
    assert!(!seen.contains("keepalive"), "{seen:?}");
    drop(tunnel);
}

#[test]
fn bad_durations_exit_2() {
    for flag in ["--tcp-keepalive", "--tcp-user-timeout"] {
        let out = Command::new(env!("CARGO_BIN_EXE_socksgate"))
            .args(["-l", "127.0.0.1:0", flag, "0"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} 0");
        assert!(String::from_utf8_lossy(&out.stderr).contains(flag));
    }
}
