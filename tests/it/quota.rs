//! Per-user traffic quotas of the policy file (`quota`, `quota_period`) and their state file (`--state-dir`)
//! against the real binary: cut-off of running sessions (TCP, HTTP forwarding, UDP), refusal of new ones,
//! persistence across SIGHUP and restarts, period rollover, the metric, and reloads that change limits of
//! running sessions.

use crate::common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const KIB: usize = 1 << 10;

/// The proxy's arguments for `policy` (two workers, so one user's sessions can land on different threads).
/// Tests that read the per-user metric add `--metrics-per-user` (it gives every user's session shared counters
/// from the start, which the reload test must not have).
fn args_for(policy: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "-l",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--threads",
        "2",
        "--policy",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(policy.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn spawn(args: &[String]) -> Proxy {
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    Proxy::spawn(&refs)
}

/// Writes `text` to a fresh policy file and starts the proxy with it.
fn with_policy(text: &str, extra: &[&str]) -> (Proxy, PathBuf) {
    let path = temp_path("policy.toml");
    std::fs::write(&path, text).unwrap();
    (spawn(&args_for(&path, extra)), path)
}

/// A fresh, empty directory for `--state-dir`.
fn state_dir() -> PathBuf {
    let d = temp_path("state");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tunnel(proxy: SocketAddr, user: &str, target: SocketAddr) -> TcpStream {
    socks5_connect_auth(proxy, user, "pw", target)
        .unwrap_or_else(|e| panic!("{user}: CONNECT failed: {e:#x}"))
}

/// Asks the blob server for `n` bytes and reads until the proxy closes: what arrived, checked byte for byte.
fn download_until_closed(mut s: TcpStream, n: usize) -> usize {
    s.write_all(&(n as u64).to_be_bytes()).unwrap();
    let got = read_all_until_closed(&mut s);
    let want = pseudo_random(n as u64, n);
    assert_eq!(
        digest(&got),
        digest(&want[..got.len()]),
        "the bytes that arrived are the target's, in order"
    );
    got.len()
}

/// True when the peer closed `s` (EOF or reset) within 10 s.
fn peer_closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

/// Waits until the log holds `needle` (at most 20 s).
fn wait_log(p: &Proxy, needle: &str) {
    let ok = p.wait_for(IO_TIMEOUT, || p.log().contains(needle));
    assert!(ok, "no {needle:?} in the log:\n{}", p.log());
}

fn remaining(p: &Proxy, user: &str) -> u64 {
    p.metric(&format!(
        "socksgate_user_quota_remaining_bytes{{user=\"{user}\"}}"
    ))
}

fn refused(p: &Proxy, user: &str, target: SocketAddr) -> bool {
    socks5_connect_auth(p.addr(), user, "pw", target).err() == Some(0x02)
}

/// A running SOCKS5 download is cut at the quota (both directions counted, never more than the quota), the
/// user's other, idle session is closed too, and new sessions are refused: SOCKS5 0x02, HTTP 403 (CONNECT and
/// forwarding by curl) with a body naming the quota. Another user is not affected. A forwarded HTTP response
/// is cut where its user's quota runs out.
#[test]
fn quota_cuts_running_sessions_and_refuses_new_ones() {
    let blob = blob_server();
    let echo = TestServer::echo();
    let (proxy, _policy) = with_policy(
        r#"
[users.alice]
password = "pw"
quota = "1MiB"

[users.bob]
password = "pw"

[users.hank]
password = "pw"
quota = "256KiB"
"#,
        &["--metrics-per-user"],
    );
    let p = proxy.addr();
    let mut idle = tunnel(p, "alice", echo.addr);
    assert_echo(&mut idle, b"ping");
    let got = download_until_closed(tunnel(p, "alice", blob.addr), 8 * MIB);
    // The 4-byte echo went up and down, the 8-byte length went up: the rest of the quota is what can come down.
    assert!(got <= MIB - 16, "received {got} bytes with a 1 MiB quota");
    assert!(got >= MIB / 2, "received only {got} bytes");
    assert!(peer_closed(&mut idle), "alice's idle session is closed too");
    wait_log(&proxy, "user=alice proto=socks5");
    let ends: Vec<String> = proxy
        .log()
        .lines()
        .filter(|l| l.contains(" access] ") && l.contains("user=alice"))
        .map(String::from)
        .collect();
    assert!(
        proxy.wait_for(IO_TIMEOUT, || proxy
            .log()
            .lines()
            .filter(|l| l.contains("user=alice") && l.contains("end=quota"))
            .count()
            == 2),
        "both of alice's sessions end with end=quota: {ends:#?}"
    );
    assert!(refused(&proxy, "alice", echo.addr), "a new SOCKS5 session");
    assert_eq!(remaining(&proxy, "alice"), 0);
    // HTTP CONNECT: 403 with a body that says why.
    let mut s = connect(p);
    s.write_all(
        format!(
            "CONNECT {a} HTTP/1.1\r\nHost: {a}\r\nProxy-Authorization: Basic YWxpY2U6cHc=\r\n\r\n",
            a = echo.addr
        )
        .as_bytes(),
    )
    .unwrap();
    let resp = String::from_utf8_lossy(&read_all_until_closed(&mut s)).into_owned();
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("quota is used up"), "{resp}");
    // Bob has no quota.
    let mut b = tunnel(p, "bob", echo.addr);
    assert_echo(&mut b, b"bob still works");
    if !have_curl() {
        eprintln!("curl not found: skipping the HTTP forwarding part");
        return;
    }
    let origin = http_close_origin(vec![b'x'; 2 * MIB]);
    let url = format!("http://{}/blob", origin.addr);
    let (code, out, err) = curl(&["-x", &format!("http://alice:pw@{p}"), &url]);
    assert_eq!(code, 0, "curl: {err}");
    let body = String::from_utf8_lossy(&out);
    assert!(body.contains("quota is used up"), "403 body: {body}");
    let (code, out, _) = curl(&[
        "-x",
        &format!("http://alice:pw@{p}"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ]);
    assert_eq!((code, String::from_utf8_lossy(&out).as_ref()), (0, "403"));
    // Hank's forwarded 2 MiB response is cut at his 256 KiB (curl: 18, partial file), then he is refused.
    let (code, out, _) = curl(&[
        "-x",
        &format!("http://hank:pw@{p}"),
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &url,
    ]);
    assert_eq!(code, 18, "curl's partial-transfer exit code");
    let n: usize = String::from_utf8_lossy(&out).parse().unwrap();
    assert!(
        n < 256 * KIB,
        "hank got {n} bytes of body with a 256 KiB quota"
    );
    wait_log(&proxy, "user=hank proto=http");
    assert!(proxy
        .log()
        .lines()
        .any(|l| l.contains("user=hank") && l.contains("end=quota")));
    assert!(refused(&proxy, "hank", echo.addr));
}

/// SOCKS5 UDP: payloads both ways count; the datagram that no longer fits ends the association.
#[test]
fn udp_datagrams_count_against_the_quota() {
    let udp_echo = UdpEcho::start();
    let (proxy, _policy) = with_policy(
        "[users.alice]\npassword = \"pw\"\nquota = \"10KiB\"\n",
        &["--metrics-per-user"],
    );
    let (mut ctl, st) = socks5_login(proxy.addr(), "alice", "pw");
    assert_eq!(st, 0);
    ctl.write_all(&socks5_request(3, "0.0.0.0:0".parse().unwrap()))
        .unwrap();
    let (rep, relay) = read_socks5_reply(&mut ctl);
    assert_eq!(rep, 0);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut dgram = vec![0, 0, 0, 1, 127, 0, 0, 1];
    dgram.extend_from_slice(&udp_echo.addr.port().to_be_bytes());
    dgram.extend_from_slice(&[b'u'; 1000]);
    let mut echoed = 0;
    let mut buf = [0u8; 2048];
    // 10 KiB = 5 round trips of 1000 bytes each way (10,000 bytes); the 6th datagram does not fit.
    for i in 0..5 {
        client.send_to(&dgram, relay).unwrap();
        let (n, _) = client
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("echo {i}: {e}"));
        assert!(buf[..n].ends_with(&[b'u'; 1000]));
        echoed += 1;
    }
    assert_eq!(remaining(&proxy, "alice"), 10 * 1024 - 10_000);
    client.send_to(&dgram, relay).unwrap();
    assert!(peer_closed(&mut ctl), "the association ends at the quota");
    assert!(client.recv_from(&mut buf).is_err(), "no 6th echo");
    assert_eq!(echoed, 5);
    wait_log(&proxy, "end=quota");
}

/// With `--state-dir`, a used-up quota stays used up across SIGHUP and across a restart (SIGTERM, start again);
/// a corrupt state file is logged and the counters start at zero.
#[test]
fn quota_state_survives_reload_and_restart() {
    let blob = blob_server();
    let echo = TestServer::echo();
    let dir = state_dir();
    let policy = temp_path("policy.toml");
    std::fs::write(
        &policy,
        "[users.alice]\npassword = \"pw\"\nquota = \"512KiB\"\n\n[users.bob]\npassword = \"pw\"\nquota = \"10MiB\"\n",
    )
    .unwrap();
    let args = args_for(
        &policy,
        &["--metrics-per-user", "--state-dir", dir.to_str().unwrap()],
    );
    let mut proxy = spawn(&args);
    wait_log(&proxy, "quota counters start at zero");
    download_until_closed(tunnel(proxy.addr(), "alice", blob.addr), 2 * MIB);
    let mut b = tunnel(proxy.addr(), "bob", echo.addr);
    assert_echo(&mut b, &[b'b'; 1000]);
    drop(b);
    assert!(refused(&proxy, "alice", echo.addr));
    proxy.reload();
    assert!(refused(&proxy, "alice", echo.addr), "after SIGHUP");
    let bob_left = remaining(&proxy, "bob");
    assert_eq!(
        bob_left,
        10 * MIB as u64 - 2000,
        "bob's counter kept by the reload"
    );
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(IO_TIMEOUT), Some(0));
    let saved = std::fs::read_to_string(dir.join("quota.state")).unwrap();
    assert!(saved.contains("[users.\"alice\"]"), "{saved}");
    assert!(!dir.join("quota.state.tmp").exists());

    let proxy = spawn(&args);
    wait_log(&proxy, "restored the quota counters of 2 users");
    assert!(refused(&proxy, "alice", echo.addr), "after a restart");
    assert_eq!(remaining(&proxy, "bob"), bob_left);
    drop(proxy);

    std::fs::write(
        dir.join("quota.state"),
        b"version = 1\n[users.alice\nused = ",
    )
    .unwrap();
    let proxy = spawn(&args);
    wait_log(&proxy, "cannot use the saved quota counters");
    let mut a = tunnel(proxy.addr(), "alice", echo.addr);
    assert_echo(&mut a, b"back at zero");
}

/// `quota_period`: the counter starts again when the period is over, and the user is served again.
#[test]
fn quota_period_rolls_over() {
    let blob = blob_server();
    let echo = TestServer::echo();
    let (proxy, _policy) = with_policy(
        "[users.alice]\npassword = \"pw\"\nquota = \"64KiB\"\nquota_period = \"2s\"\n",
        &["--metrics-per-user"],
    );
    let t0 = Instant::now();
    let got = download_until_closed(tunnel(proxy.addr(), "alice", blob.addr), MIB);
    assert!(got <= 64 * KIB, "{got}");
    // The period may roll over between the download and this check; only a refusal inside one period counts.
    let before = proxy.log().matches("quota period started again").count();
    let refused_now = refused(&proxy, "alice", echo.addr);
    if proxy.log().matches("quota period started again").count() == before {
        assert!(refused_now || t0.elapsed() >= Duration::from_secs(2));
    }
    wait_log(&proxy, "quota period started again for 1 users: alice");
    assert_eq!(remaining(&proxy, "alice"), 64 * KIB as u64);
    let mut a = tunnel(proxy.addr(), "alice", echo.addr);
    assert_echo(&mut a, b"a new period");
}

/// A reload that lowers a quota below what was used closes the user's running sessions (`end=quota`); a rate
/// that a reload adds applies at once to a session that started without one.
#[test]
fn reload_applies_lowered_quota_and_new_rate_to_running_sessions() {
    let blob = blob_server();
    let echo = TestServer::echo();
    let (proxy, policy) = with_policy(
        "[users.alice]\npassword = \"pw\"\nquota = \"10MiB\"\n\n[users.bob]\npassword = \"pw\"\n",
        &[],
    );
    let p = proxy.addr();
    let mut a = tunnel(p, "alice", echo.addr);
    assert_echo(&mut a, &vec![b'a'; 300 * KIB]);
    let mut bob = tunnel(p, "bob", blob.addr);
    std::fs::write(
        &policy,
        "[users.alice]\npassword = \"pw\"\nquota = \"512KiB\"\n\n[users.bob]\npassword = \"pw\"\nrate_down = \"2MiB/s\"\n",
    )
    .unwrap();
    proxy.reload();
    assert!(
        peer_closed(&mut a),
        "alice's session ends: 600 KiB used of 512 KiB"
    );
    wait_log(&proxy, "end=quota");
    // 6 MiB at 2 MiB/s: about 3 s (less the quarter-second burst); unlimited it would take milliseconds.
    let t0 = Instant::now();
    bob.write_all(&(6 * MIB as u64).to_be_bytes()).unwrap();
    let mut got = vec![0u8; 6 * MIB];
    bob.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    bob.read_exact(&mut got).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        (2.5..4.0).contains(&secs),
        "6 MiB at a reloaded 2 MiB/s took {secs:.2} s"
    );
    assert_eq!(
        digest(&got),
        digest(&pseudo_random(6 * MIB as u64, 6 * MIB))
    );
}
