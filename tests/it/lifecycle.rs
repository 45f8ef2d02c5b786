//! Process lifecycle: SIGTERM drain (with and without a deadline), a second signal, SIGHUP users reload (good and
//! broken files), --max-connections, and the command line (exit codes, help, version, the --open guard).

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// True when a new client is not served: the connect fails, or the connection is closed without an answer.
fn not_served(addr: SocketAddr) -> bool {
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(_) => return true,
        Ok(s) => s,
    };
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    if s.write_all(&[5, 1, 0]).is_err() {
        return true;
    }
    let (got, closed) = read_until_closed(&mut s);
    got.is_empty() && closed
}

#[test]
fn sigterm_drains_until_the_client_closes() {
    let echo = TestServer::echo();
    let mut proxy = Proxy::start(&["--threads", "2"]);
    let mut tunnel = socks5_connect(proxy.addr(), echo.addr).expect("tunnel");
    assert_echo(&mut tunnel, b"before SIGTERM");
    // A client still in its handshake (greeting answered, no request yet) is not an established session.
    let mut pending = connect(proxy.addr());
    pending.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_n(&mut pending, 2), vec![5, 0]);
    proxy.signal("TERM");
    let (got, closed) = read_until_closed(&mut pending);
    assert!(
        closed && got.is_empty(),
        "a client in its handshake must be closed by the drain ({got:?})"
    );
    // New connections are refused once every worker has closed its listener.
    let refused = wait_until(Duration::from_secs(15), &mut || {
        TcpStream::connect_timeout(&proxy.addr(), Duration::from_secs(2)).is_err()
    });
    assert!(refused, "new connections still accepted after SIGTERM");
    assert!(
        not_served(proxy.addr()),
        "a new client was served while draining"
    );
    // The established tunnel keeps working, and the process waits for it (the default drain timeout is 30s).
    assert_echo(&mut tunnel, b"during the drain");
    assert_echo(&mut tunnel, &pseudo_random(77, 500_000));
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "exited while a tunnel was open"
    );
    drop(tunnel);
    // wait_exit gives up after 15 s: Some(0) is "exited 0 within 15 s of the last tunnel closing".
    let code = proxy.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0), "exit status after the last tunnel closed");
}

#[test]
fn sigterm_with_drain_timeout_closes_open_tunnels() {
    let echo = TestServer::echo();
    // Long handshake/connect timeouts: their (stale) timer entries must not wake the worker inside the window
    // below and hide a drain deadline that nothing enforces.
    let mut proxy = Proxy::start(&[
        "--threads",
        "2",
        "--drain-timeout",
        "1s",
        "--handshake-timeout",
        "60s",
        "--connect-timeout",
        "60s",
    ]);
    let mut tunnel = socks5_connect(proxy.addr(), echo.addr).expect("tunnel");
    assert_echo(&mut tunnel, b"open and then left idle");
    tunnel
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let start = Instant::now();
    proxy.signal("TERM");
    // The tunnel is idle: nothing but the drain deadline can end it.
    let code = proxy.wait_exit(Duration::from_secs(6));
    let took = start.elapsed();
    assert_eq!(
        code,
        Some(0),
        "with --drain-timeout 1s the process must exit 0 within a few seconds (waited {took:?})"
    );
    assert!(
        took >= Duration::from_millis(900),
        "exited before the drain timeout: {took:?}"
    );
    let (_, closed) = read_until_closed(&mut tunnel);
    assert!(
        closed,
        "the open tunnel was not closed at the drain deadline"
    );
}

#[test]
fn second_sigterm_exits_at_once_with_status_1() {
    let echo = TestServer::echo();
    let mut proxy = Proxy::start(&[]);
    let mut tunnel = socks5_connect(proxy.addr(), echo.addr).expect("tunnel");
    assert_echo(&mut tunnel, b"keeps the drain going");
    proxy.signal("TERM");
    assert!(
        wait_until(Duration::from_secs(10), &mut || proxy
            .log()
            .contains("draining")),
        "no drain logged:\n{}",
        proxy.log()
    );
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "exited during the drain with a tunnel open"
    );
    proxy.signal("TERM");
    // wait_exit gives up after 5 s: Some(1) is "exited 1 within 5 s of the second SIGTERM", with a tunnel open.
    let code = proxy.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(1), "second SIGTERM: exit status");
}

#[test]
fn sigint_without_sessions_exits_0() {
    let mut proxy = Proxy::start(&[]);
    proxy.signal("INT");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn sighup_reloads_the_users_file() {
    let echo = TestServer::echo();
    let file = temp_path("users");
    std::fs::write(&file, "alice:secret\n").unwrap();
    // One worker: each worker applies a reload when it next polls, so with two, one login that succeeded says
    // nothing about the connection after it (seen failing under a loaded machine). With one, it says all.
    let proxy = Proxy::start(&["--users", file.to_str().unwrap(), "--threads", "1"]);
    let mut tunnel =
        socks5_connect_auth(proxy.addr(), "alice", "secret", echo.addr).expect("alice");
    assert_echo(&mut tunnel, b"alice's tunnel");
    assert_eq!(
        socks5_login(proxy.addr(), "bob", "pw2").1,
        1,
        "bob is unknown before the reload"
    );
    // Add bob.
    std::fs::write(&file, "alice:secret\nbob:pw2\n").unwrap();
    proxy.reload();
    let bob_ok = wait_until(Duration::from_secs(10), &mut || {
        socks5_login(proxy.addr(), "bob", "pw2").1 == 0
    });
    assert!(bob_ok, "bob cannot log in after SIGHUP:\n{}", proxy.log());
    let mut t = socks5_connect_auth(proxy.addr(), "bob", "pw2", echo.addr).expect("bob's tunnel");
    assert_echo(&mut t, b"bob");
    assert_echo(&mut tunnel, b"alice's tunnel survived the reload");
    // Remove alice: new logins fail, her established tunnel stays up.
    std::fs::write(&file, "bob:pw2\n").unwrap();
    proxy.reload();
    let alice_gone = wait_until(Duration::from_secs(10), &mut || {
        socks5_login(proxy.addr(), "alice", "secret").1 == 1
    });
    assert!(alice_gone, "alice can still log in after being removed");
    assert_echo(&mut tunnel, b"still up after removal");
}

#[test]
fn sighup_with_a_broken_file_keeps_the_old_table() {
    let echo = TestServer::echo();
    let file = temp_path("users");
    std::fs::write(&file, "alice:secret\n").unwrap();
    let proxy = Proxy::start(&["--users", file.to_str().unwrap()]);
    let mut tunnel =
        socks5_connect_auth(proxy.addr(), "alice", "secret", echo.addr).expect("alice");
    std::fs::write(&file, "carol:pw\nthis line has no colon\n").unwrap();
    proxy.reload();
    let logged = wait_until(Duration::from_secs(10), &mut || {
        proxy.log().contains("keeping the old users table")
    });
    assert!(
        logged,
        "no error logged for a broken users file:\n{}",
        proxy.log()
    );
    let log = proxy.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line expected:\n{log}");
    assert!(
        errors[0].contains("line 2"),
        "the error must name the line: {}",
        errors[0]
    );
    assert!(
        !errors[0].contains("pw"),
        "the error must not show a password: {}",
        errors[0]
    );
    // The old table is in force: alice works, carol (from the broken file) does not.
    assert_eq!(
        socks5_login(proxy.addr(), "alice", "secret").1,
        0,
        "old user after a failed reload"
    );
    assert_eq!(
        socks5_login(proxy.addr(), "carol", "pw").1,
        1,
        "user from the rejected file"
    );
    assert_echo(&mut tunnel, b"tunnel unaffected");
}

#[test]
fn max_connections_holds_back_the_third_client() {
    let echo = TestServer::echo();
    let proxy = Proxy::start(&["--max-connections", "2", "--threads", "2"]);
    let mut first = socks5_connect(proxy.addr(), echo.addr).expect("first");
    let mut second = socks5_connect(proxy.addr(), echo.addr).expect("second");
    assert_echo(&mut first, b"1");
    assert_echo(&mut second, b"2");
    // The third TCP connect completes in the kernel backlog, but the proxy does not serve it.
    let mut third = connect(proxy.addr());
    third.write_all(&[5, 1, 0]).unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut b = [0u8; 2];
    // A signal to this process (SO_RCVTIMEO reads are not restarted) is not an answer: read again.
    let answer = loop {
        match third.read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    match answer {
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("third client was answered while two were open: {other:?} {b:?}"),
    }
    // One closes: the third is served.
    drop(first);
    third.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert_eq!(
        read_n(&mut third, 2),
        vec![5, 0],
        "third client served after one closed"
    );
    third.write_all(&socks5_request(1, echo.addr)).unwrap();
    assert_eq!(read_socks5_reply(&mut third).0, 0);
    assert_echo(&mut third, b"3");
    assert_echo(&mut second, b"2 again");
}

// ---------------------------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------------------------

/// Runs the binary with `args`; kills it if it has not exited within 10 s (a bug must not hang the suite).
fn run_cli(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_socksgate"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.and_then(|s| s.code()), out, err)
}

#[test]
fn cli_bad_flags_exit_2_with_one_line() {
    for (args, needle) in [
        (&["--bogus"][..], "bogus"),
        (&["--threads", "0"][..], "--threads"),
        (&["--handshake-timeout", "soon"][..], "--handshake-timeout"),
        (&["-l", "nonsense"][..], "--listen"),
        (&["--user", "nocolon"][..], "--user"),
        (&["--socket-buffer", "1k2"][..], "--socket-buffer"),
        (&["--deny-dest", "300.0.0.0/8"][..], "--deny-dest"),
        (
            &["--users", "/nonexistent/socksgate-users"][..],
            "/nonexistent/socksgate-users",
        ),
        (&["stray-argument"][..], "stray-argument"),
    ] {
        let (code, out, err) = run_cli(args);
        assert_eq!(code, Some(2), "{args:?}: exit status (stderr {err:?})");
        assert!(out.is_empty(), "{args:?}: nothing on stdout, got {out:?}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line expected, got {err:?}"
        );
        assert!(
            err.contains(needle),
            "{args:?}: message should name {needle:?}: {err:?}"
        );
    }
}

#[test]
fn cli_help_lists_every_flag() {
    for flag in ["-h", "--help"] {
        let (code, out, _) = run_cli(&[flag]);
        assert_eq!(code, Some(0), "{flag}");
        for name in [
            "--listen",
            "--threads",
            "--user",
            "--users",
            "--buffer-size",
            "--socket-buffer",
            "--handshake-timeout",
            "--connect-timeout",
            "--idle-timeout",
            "--drain-timeout",
            "--max-connections",
            "--user-max-connections",
            "--no-socks4",
            "--socks4-with-users",
            "--no-http",
            "--no-udp",
            "--no-bind",
            "--allow-client",
            "--allow-dest",
            "--deny-dest",
            "--bind",
            "--upstream",
            "--proxy-protocol",
            "--metrics",
            "--resolve",
            "--open",
            "--version",
            "--help",
        ] {
            assert!(out.contains(name), "{flag}: help lacks {name}:\n{out}");
        }
    }
}

#[test]
fn cli_version() {
    for flag in ["-V", "--version"] {
        let (code, out, _) = run_cli(&[flag]);
        assert_eq!(code, Some(0));
        assert_eq!(out, format!("socksgate {}\n", env!("CARGO_PKG_VERSION")));
    }
}

#[test]
fn cli_public_listener_without_users_needs_open() {
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let (code, out, err) = run_cli(&["-l", addr]);
        assert_eq!(
            code,
            Some(2),
            "-l {addr} without users must be refused (stdout {out:?})"
        );
        assert!(
            err.contains("--open"),
            "-l {addr}: message should mention --open: {err:?}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    }
}

#[test]
fn sighup_keeps_inline_users_and_survives_a_missing_file() {
    let echo = TestServer::echo();
    let file = temp_path("users");
    std::fs::write(&file, "alice:secret\n").unwrap();
    let proxy = Proxy::start(&["-U", "carol:inline", "--users", file.to_str().unwrap()]);
    assert_eq!(socks5_login(proxy.addr(), "carol", "inline").1, 0);
    // Replace alice by bob in the file: carol (from --user) must survive the reload.
    std::fs::write(&file, "bob:pw2\n").unwrap();
    proxy.reload();
    let reloaded = wait_until(Duration::from_secs(10), &mut || {
        socks5_login(proxy.addr(), "bob", "pw2").1 == 0
    });
    assert!(reloaded, "bob cannot log in after SIGHUP");
    assert_eq!(
        socks5_login(proxy.addr(), "alice", "secret").1,
        1,
        "alice was removed from the file"
    );
    assert_eq!(
        socks5_login(proxy.addr(), "carol", "inline").1,
        0,
        "--user entries survive a reload"
    );
    // The file disappears: one error, the table stays.
    std::fs::remove_file(&file).unwrap();
    proxy.reload();
    let logged = wait_until(Duration::from_secs(10), &mut || {
        proxy.log().contains("keeping the old users table")
    });
    assert!(
        logged,
        "no error logged for a missing users file:\n{}",
        proxy.log()
    );
    let mut t = socks5_connect_auth(proxy.addr(), "bob", "pw2", echo.addr)
        .expect("bob after failed reload");
    assert_echo(&mut t, b"bob");
}

#[test]
fn sighup_with_an_empty_users_file_must_not_disable_authentication() {
    // A users file that is empty at reload time (all users commented out, or caught half-written by a
    // non-atomic editor) must not turn a password-protected proxy into an open one.
    let echo = TestServer::echo();
    let file = temp_path("users");
    std::fs::write(&file, "alice:secret\n").unwrap();
    let proxy = Proxy::start(&["--users", file.to_str().unwrap()]);
    let mut s = connect(proxy.addr());
    s.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(
        read_n(&mut s, 2),
        vec![5, 0xFF],
        "authentication required before the reload"
    );
    std::fs::write(&file, "# nobody for now\n").unwrap();
    proxy.reload();
    assert!(
        wait_until(Duration::from_secs(10), &mut || proxy
            .log()
            .contains("SIGHUP")),
        "reload not logged:\n{}",
        proxy.log()
    );
    // Give the workers the same chance to apply the new table as the positive reload tests do.
    let mut answer = Vec::new();
    let opened = wait_until(Duration::from_secs(3), &mut || {
        let mut s = connect(proxy.addr());
        s.write_all(&[5, 1, 0]).unwrap();
        answer = read_n(&mut s, 2);
        answer == [5, 0]
    });
    assert!(
        !opened,
        "after reloading an empty users file the proxy accepts clients without authentication \
         (greeting 05 01 00 answered {answer:?}); log:\n{}",
        proxy.log()
    );
    // SOCKS4 (no password at all) must stay refused as well.
    let (port, ip) = match echo.addr {
        SocketAddr::V4(a) => (a.port(), a.ip().octets()),
        _ => unreachable!(),
    };
    let mut s = connect(proxy.addr());
    s.write_all(&socks4_request(1, port, ip, b"", None))
        .unwrap();
    let r = read_n(&mut s, 8);
    assert_eq!(
        r[1], 91,
        "SOCKS4 served without authentication after reloading an empty users file"
    );
}

/// A `--socket-buffer` above net.core.rmem_max/wmem_max is clamped by the kernel: the proxy says so at startup
/// (instead of silently running with a smaller buffer) and serves as usual.
#[test]
fn socket_buffer_clamped_by_the_kernel_is_reported() {
    let core_max = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    let (Some(r), Some(w)) = (core_max("rmem_max"), core_max("wmem_max")) else {
        eprintln!("no /proc/sys/net/core: skipping");
        return;
    };
    if r.min(w) >= 1 << 30 {
        eprintln!("rmem_max/wmem_max allow 1 GiB buffers here: nothing is clamped, skipping");
        return;
    }
    let echo = TestServer::echo();
    let proxy = Proxy::start(&["--socket-buffer", "1GiB"]);
    assert!(
        proxy.wait_for(Duration::from_secs(10), || proxy
            .log()
            .contains("--socket-buffer 1073741824: the kernel granted")),
        "no clamping warning:\n{}",
        proxy.log()
    );
    let mut s = socks5_connect(proxy.addr(), echo.addr).expect("CONNECT");
    assert_echo(&mut s, &pseudo_random(5, 300_000));
}
