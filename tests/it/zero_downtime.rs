//! Listening sockets that outlive a process: a port held by another socksgate is refused, systemd socket
//! activation, and the SIGUSR2 binary upgrade under load.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Output of a socksgate run that is expected to exit on its own (bounded by a kill after `limit`).
fn run_to_exit(args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_socksgate"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn socksgate");
    let start = std::time::Instant::now();
    let code = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (code, err)
}

#[test]
fn a_second_instance_on_a_used_port_refuses_to_start() {
    let echo = TestServer::echo();
    for threads in ["1", "4"] {
        let first = Proxy::start(&["--threads", threads]);
        let addr = first.addr();
        let a = addr.to_string();
        let (code, err) = run_to_exit(&["-l", &a, "--threads", threads], Duration::from_secs(20));
        assert_eq!(code, Some(2), "second instance on {a}: {err}");
        assert!(
            err.contains(&format!(
                "cannot listen on {a}: address in use by another process"
            )),
            "message: {err}"
        );
        // The wildcard overlaps the first instance's address: refused as well.
        let wild = format!("0.0.0.0:{}", addr.port());
        let (code, err) = run_to_exit(&["-l", &wild, "--open"], Duration::from_secs(20));
        assert_eq!(code, Some(2), "wildcard on a used port: {err}");
        assert!(err.contains("address in use by another process"), "{err}");
        // The first instance serves every connection (none went to a second listener).
        for i in 0..20u8 {
            let mut t = socks5_connect(addr, echo.addr).expect("first instance serves");
            assert_echo(&mut t, &[i; 64]);
        }
        assert!(first.log().contains("started"), "{}", first.log());
    }
}

#[test]
fn a_port_held_by_another_program_is_refused_with_the_same_message() {
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = other.local_addr().unwrap().to_string();
    let (code, err) = run_to_exit(&["-l", &a], Duration::from_secs(20));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "cannot listen on {a}: address in use by another process"
        )),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Socket activation
// ---------------------------------------------------------------------------------------------------------------

const ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

/// socksgate started by `systemd-socket-activate`, which binds the sockets, waits for the first connection and
/// execs socksgate in its own process (same pid) with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES.
struct Activated {
    child: std::process::Child,
    addrs: Vec<SocketAddr>,
    stderr_path: PathBuf,
}

impl Activated {
    /// Starts with `n` passed sockets; None (with a message) when systemd-socket-activate is not installed.
    fn start(n: usize, names: Option<&str>, args: &[&str]) -> Option<Activated> {
        if !std::path::Path::new(ACTIVATE).exists() {
            eprintln!("skipped: {ACTIVATE} not installed");
            return None;
        }
        // systemd-socket-activate cannot bind port 0: take free ports, retrying if one was taken meanwhile.
        for _ in 0..5 {
            let addrs: Vec<SocketAddr> = (0..n)
                .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
                .collect();
            let stderr_path = temp_path("activate.log");
            let mut cmd = Command::new(ACTIVATE);
            for a in &addrs {
                cmd.arg("-l").arg(a.to_string());
            }
            if let Some(names) = names {
                cmd.arg(format!("--fdname={names}"));
            }
            cmd.arg(env!("CARGO_BIN_EXE_socksgate"))
                .args(args)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(std::fs::File::create(&stderr_path).unwrap()));
            let mut child = cmd.spawn().expect("spawn systemd-socket-activate");
            let want = addrs.len();
            let mut listening = 0;
            let ok = wait_until(Duration::from_secs(10), &mut || {
                let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                listening = log.matches("Listening on ").count();
                listening == want || log.contains("Failed")
            });
            if ok && listening == want {
                return Some(Activated {
                    child,
                    addrs,
                    stderr_path,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("systemd-socket-activate did not start");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serves_socks5_and_http(addr: SocketAddr, echo: SocketAddr, origin: SocketAddr) {
    let mut t = socks5_connect(addr, echo).expect("SOCKS5 through the passed socket");
    assert_echo(&mut t, b"activated");
    drop(t);
    if !have_curl() {
        eprintln!("curl not installed: HTTP part skipped");
        return;
    }
    let url = format!("http://{origin}/x");
    let (code, body, err) = curl(&["-x", &format!("http://{addr}"), &url]);
    assert_eq!(
        (code, body.as_slice()),
        (0, &b"origin says hi"[..]),
        "{err}"
    );
    let (code, body, err) = curl(&["--socks5", &addr.to_string(), &url]);
    assert_eq!(
        (code, body.as_slice()),
        (0, &b"origin says hi"[..]),
        "{err}"
    );
}

fn socket_activation(threads: &str) {
    let echo = TestServer::echo();
    let origin = http_close_origin(b"origin says hi".to_vec());
    // The -l address must not be bound: the passed socket replaces it. The test holds that address itself, so a
    // proxy that tried to bind it would refuse to start (it will not share a port another process listens on),
    // and no other test can take the port meanwhile.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unused_addr = holder.local_addr().unwrap().to_string();
    let Some(a) = Activated::start(1, None, &["--threads", threads, "-l", &unused_addr]) else {
        return;
    };
    let addr = a.addrs[0];
    serves_socks5_and_http(addr, echo.addr, origin.addr);
    // Many at once: every worker shares the one socket, and none is lost between them.
    let handles: Vec<_> = (0..40u8)
        .map(|i| {
            let echo = echo.addr;
            thread::spawn(move || {
                let mut t = socks5_connect(addr, echo).expect("tunnel");
                assert_echo(&mut t, &[i; 1000]);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    let log = a.log();
    assert!(
        log.contains("socket activation: 1 sockets from systemd"),
        "{log}"
    );
    assert!(log.contains("ignoring --listen"), "{log}");
    // Still ours: the proxy never tried it (it would have refused to start).
    drop(holder);
}

#[test]
fn socket_activation_serves_socks5_and_http_one_thread() {
    socket_activation("1");
}

#[test]
fn socket_activation_serves_socks5_and_http_four_threads() {
    socket_activation("4");
}

#[test]
fn several_passed_sockets_are_all_served() {
    let echo = TestServer::echo();
    let origin = http_close_origin(b"origin says hi".to_vec());
    let Some(a) = Activated::start(2, Some("socks:web"), &["--threads", "2"]) else {
        return;
    };
    for &addr in &a.addrs {
        serves_socks5_and_http(addr, echo.addr, origin.addr);
    }
    let log = a.log();
    assert!(
        log.contains("socket activation: 2 sockets from systemd (names socks:web)"),
        "{log}"
    );
}

#[test]
fn listen_pid_of_another_process_is_ignored() {
    let echo = TestServer::echo();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_socksgate"));
    let args = ["-l", "127.0.0.1:0"];
    // Descriptor 3 is not even open: honouring these variables would fail the start.
    cmd.args(args)
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "stale");
    let proxy = Proxy::spawn_command(cmd, &args);
    let mut t = socks5_connect(proxy.addr(), echo.addr).expect("serves on -l");
    assert_echo(&mut t, b"own listener");
    let log = proxy.log();
    assert!(
        log.contains("ignoring LISTEN_FDS=1: LISTEN_PID=1 is not this process"),
        "{log}"
    );
}

#[test]
fn a_passed_descriptor_that_is_not_a_listening_socket_is_refused() {
    let out = Command::new("sh")
        .arg("-c")
        .arg("export LISTEN_PID=$$ LISTEN_FDS=1; exec \"$0\" 3</dev/null")
        .arg(env!("CARGO_BIN_EXE_socksgate"))
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("LISTEN_FDS: descriptor 3 is not a listening TCP socket"),
        "{err}"
    );
}

#[test]
fn sd_notify_ready_reloading_stopping() {
    use std::os::unix::net::UnixDatagram;
    let sock_path = temp_path("notify.sock");
    let rx = UnixDatagram::bind(&sock_path).unwrap();
    rx.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let users = temp_path("users");
    std::fs::write(&users, "alice:secret\n").unwrap();
    let args = ["-l", "127.0.0.1:0", "--users", users.to_str().unwrap()];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_socksgate"));
    cmd.args(args).env("NOTIFY_SOCKET", &sock_path);
    let mut proxy = Proxy::spawn_command(cmd, &args);
    let recv = || {
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(recv(), "READY=1");
    proxy.signal("HUP");
    let reloading = recv();
    let usec: u64 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{reloading:?}"));
    assert!(usec > 0);
    assert_eq!(recv(), "READY=1", "after the reload");
    proxy.signal("TERM");
    assert_eq!(recv(), "STOPPING=1");
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)), Some(0));
}

// ---------------------------------------------------------------------------------------------------------------
// Binary upgrade (SIGUSR2)
// ---------------------------------------------------------------------------------------------------------------

/// Stops a process that is not our child (the upgraded one) by pid when the test ends.
struct PidGuard(u32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.to_string()])
            .status();
        let gone = wait_until(Duration::from_secs(10), &mut || !alive(self.0));
        if !gone {
            let _ = Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn read_pid(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A directory with a `socksgate` symlink to the binary under test: the upgrade starts whatever the link names
/// at SIGUSR2 time, which lets a test swap in a broken "new binary".
fn binary_link() -> (PathBuf, PathBuf) {
    let dir = temp_path("upgrade");
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("socksgate");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_socksgate"), &link).unwrap();
    (dir, link)
}

fn replace_with_script(link: &std::path::Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(link);
    std::fs::write(link, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(link, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[derive(Default, Debug)]
struct LoopStats {
    ok: u64,
    refused: u64,
    reset: u64,
    failed: Vec<String>,
}

/// One short SOCKS5 session: connect, handshake, 32 bytes echoed, close.
fn round_trip(proxy: SocketAddr, echo: SocketAddr, n: u64, st: &mut LoopStats) {
    let classify = |st: &mut LoopStats, what: &str, e: std::io::Error| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => st.refused += 1,
        std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::UnexpectedEof => {
            st.reset += 1;
            st.failed.push(format!("#{n} {what}: {e}"));
        }
        _ => st.failed.push(format!("#{n} {what}: {e}")),
    };
    let mut s = match TcpStream::connect_timeout(&proxy, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => return classify(st, "connect", e),
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let payload = pseudo_random(n, 32);
    let mut hello = vec![5, 1, 0];
    hello.extend_from_slice(&socks5_request(1, echo));
    if let Err(e) = s.write_all(&hello) {
        return classify(st, "write", e);
    }
    let mut reply = [0u8; 12];
    if let Err(e) = s.read_exact(&mut reply) {
        return classify(st, "handshake", e);
    }
    if reply[..4] != [5, 0, 5, 0] {
        st.failed.push(format!("#{n} reply {reply:?}"));
        return;
    }
    if let Err(e) = s.write_all(&payload) {
        return classify(st, "payload", e);
    }
    let mut back = [0u8; 32];
    if let Err(e) = s.read_exact(&mut back) {
        return classify(st, "echo", e);
    }
    if back[..] != payload[..] {
        st.failed.push(format!("#{n} echo mismatch"));
        return;
    }
    st.ok += 1;
}

/// About 50 sessions per second until `stop` (bounded to 60 s); `done` counts successes as they happen.
fn client_loop(
    proxy: SocketAddr,
    echo: SocketAddr,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> thread::JoinHandle<LoopStats> {
    thread::spawn(move || {
        let mut st = LoopStats::default();
        let end = Instant::now() + Duration::from_secs(60);
        let mut next = Instant::now();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            round_trip(proxy, echo, n, &mut st);
            done.store(st.ok, Ordering::Relaxed);
            n += 1;
            next += Duration::from_millis(20);
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
        st
    })
}

/// Each connection: reads an 8-byte seed, then sends 1 MiB of `pseudo_random(seed)` in 16 chunks 100 ms apart and
/// closes: a download that stays in flight for a good second and a half.
fn slow_download_server() -> TestServer {
    TestServer::start(|mut s| {
        let mut seed = [0u8; 8];
        if s.read_exact(&mut seed).is_err() {
            return;
        }
        let data = pseudo_random(u64::from_be_bytes(seed), DOWNLOAD);
        for chunk in data.chunks(DOWNLOAD / 16) {
            if s.write_all(chunk).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    })
}

const DOWNLOAD: usize = 1 << 20;

fn upgrade_under_load(threads: &str) {
    let echo = TestServer::echo();
    let downloads = slow_download_server();
    let (dir, link) = binary_link();
    let pid_file = dir.join("socksgate.pid");
    let args = [
        "-l",
        "127.0.0.1:0",
        "--threads",
        threads,
        "--pid-file",
        pid_file.to_str().unwrap(),
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut cmd = Command::new(&link);
    cmd.args(args);
    let mut old = Proxy::spawn_command(cmd, &args);
    let proxy = old.addr();
    assert_eq!(read_pid(&pid_file), Some(old.pid()), "pid file at start");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let lp = client_loop(proxy, echo.addr, Arc::clone(&stop), Arc::clone(&done));
    let (started_tx, started_rx) = mpsc::channel();
    let dl: Vec<_> = (0..20u64)
        .map(|seed| {
            let tx = started_tx.clone();
            let target = downloads.addr;
            thread::spawn(move || {
                let mut t = socks5_connect(proxy, target).expect("download tunnel");
                t.write_all(&(seed + 1000).to_be_bytes()).unwrap();
                let mut got = read_n(&mut t, DOWNLOAD / 16);
                tx.send(()).unwrap();
                t.read_to_end(&mut got).expect("download");
                got.len() == DOWNLOAD
                    && digest(&got) == digest(&pseudo_random(seed + 1000, DOWNLOAD))
            })
        })
        .collect();
    for _ in 0..20 {
        started_rx
            .recv_timeout(IO_TIMEOUT)
            .expect("download started");
    }
    assert!(
        wait_until(IO_TIMEOUT, &mut || done.load(Ordering::Relaxed) >= 10),
        "the client loop did not get going"
    );

    // A client mid-handshake on the old process (greeting answered, request not sent yet) at the hand-over.
    let mut halfway = connect(proxy);
    halfway.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_n(&mut halfway, 2), vec![5, 0]);

    old.signal("USR2");
    let mut new_pid = None;
    let switched = wait_until(Duration::from_secs(30), &mut || {
        new_pid = read_pid(&pid_file).filter(|&p| p != old.pid());
        new_pid.is_some()
    });
    assert!(
        switched,
        "pid file never named a new process:\n{}",
        old.log()
    );
    let new_pid = new_pid.unwrap();
    let _guard = PidGuard(new_pid);
    assert!(alive(new_pid));
    assert!(
        old.wait_for(IO_TIMEOUT, || old.log().contains("handing over")),
        "{}",
        old.log()
    );
    halfway.write_all(&socks5_request(1, echo.addr)).unwrap();
    assert_eq!(
        read_socks5_reply(&mut halfway).0,
        0,
        "handshake finished after the hand-over"
    );
    assert_echo(&mut halfway, b"finished on the old process");
    drop(halfway);
    assert_eq!(
        old.wait_exit(Duration::from_secs(40)),
        Some(0),
        "old process exit status:\n{}",
        old.log()
    );
    for (i, h) in dl.into_iter().enumerate() {
        assert!(
            h.join().expect("download thread"),
            "download {i} was cut or corrupted"
        );
    }
    // The new process alone serves from here on: let the loop run on it for a while.
    let at_exit = done.load(Ordering::Relaxed);
    assert!(
        wait_until(Duration::from_secs(20), &mut || done
            .load(Ordering::Relaxed)
            >= at_exit + 25),
        "the client loop stalled after the old process exited"
    );
    stop.store(true, Ordering::Relaxed);
    let st = lp.join().expect("client loop");
    assert_eq!(
        (st.refused, st.reset, st.failed.len()),
        (0, 0, 0),
        "{st:?}\n{}",
        old.log()
    );
    assert!(st.ok >= 40, "{st:?}");

    let mut t = socks5_connect(proxy, echo.addr).expect("the new process serves");
    assert_echo(&mut t, b"after the upgrade");
    // The /metrics listener was handed over too.
    let text = old.metrics_text();
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("socksgate_connections_accepted_total"),
        "{text}"
    );
    let log = old.log();
    assert!(
        log.contains(&format!(
            "upgrade: new process {new_pid} is ready; handing over"
        )),
        "{log}"
    );
    assert!(log.contains("upgrade: took over"), "{log}");
}

#[test]
fn upgrade_under_load_loses_nothing_one_thread() {
    upgrade_under_load("1");
}

#[test]
fn upgrade_under_load_loses_nothing_four_threads() {
    upgrade_under_load("4");
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving() {
    let echo = TestServer::echo();
    let (dir, link) = binary_link();
    let pid_file = dir.join("socksgate.pid");
    let args = [
        "-l",
        "127.0.0.1:0",
        "--threads",
        "2",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "--upgrade-timeout",
        "2s",
    ];
    let mut cmd = Command::new(&link);
    cmd.args(args);
    let mut old = Proxy::spawn_command(cmd, &args);
    let proxy = old.addr();
    let serves = |what: &str| {
        let mut t = socks5_connect(proxy, echo.addr).unwrap_or_else(|r| panic!("{what}: {r}"));
        assert_echo(&mut t, what.as_bytes());
    };
    let link_name = link.display().to_string();

    // A new binary that fails at start.
    replace_with_script(&link, "echo 'new binary: broken' >&2\nexit 1");
    old.signal("USR2");
    let line = format!("upgrade failed: new process {link_name} (pid ");
    assert!(
        old.wait_for(IO_TIMEOUT, || old
            .log()
            .contains("it exited with status 1; still serving")),
        "{}",
        old.log()
    );
    assert!(old.log().contains(&line), "{}", old.log());
    serves("after a failed start");
    assert_eq!(read_pid(&pid_file), Some(old.pid()));

    // One that never becomes ready; a second SIGUSR2 meanwhile is refused.
    replace_with_script(&link, "exec sleep 30");
    old.signal("USR2");
    assert!(
        old.wait_for(IO_TIMEOUT, || old.log().matches("SIGUSR2: started").count()
            == 2)
    );
    old.signal("USR2");
    assert!(
        old.wait_for(IO_TIMEOUT, || old
            .log()
            .contains("an upgrade is already in progress")),
        "{}",
        old.log()
    );
    assert!(
        old.wait_for(IO_TIMEOUT, || old
            .log()
            .contains("was not ready in time; killed it; still serving")),
        "{}",
        old.log()
    );
    serves("after a timed-out start");
    assert_eq!(read_pid(&pid_file), Some(old.pid()));
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old process exited"
    );

    // The real binary again: this upgrade goes through.
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_socksgate"), &link).unwrap();
    old.signal("USR2");
    let mut new_pid = None;
    assert!(wait_until(Duration::from_secs(30), &mut || {
        new_pid = read_pid(&pid_file).filter(|&p| p != old.pid());
        new_pid.is_some()
    }));
    let _guard = PidGuard(new_pid.unwrap());
    assert_eq!(old.wait_exit(Duration::from_secs(40)), Some(0));
    serves("by the new process");
}

#[test]
fn an_upgrade_hands_on_the_sockets_systemd_passed() {
    let echo = TestServer::echo();
    let Some(mut a) = Activated::start(2, None, &["--threads", "3"]) else {
        return;
    };
    for &addr in &a.addrs {
        let mut t = socks5_connect(addr, echo.addr).expect("activated");
        assert_echo(&mut t, b"before");
    }
    let old_pid = a.child.id();
    let ok = Command::new("kill")
        .args(["-USR2", &old_pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut new_pid = None;
    assert!(
        wait_until(Duration::from_secs(30), &mut || {
            let log = a.log();
            new_pid = log
                .split("upgrade: new process ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .and_then(|p| p.parse::<u32>().ok());
            new_pid.is_some()
        }),
        "{}",
        a.log()
    );
    let _guard = PidGuard(new_pid.unwrap());
    let start = Instant::now();
    let code = loop {
        if let Some(st) = a.child.try_wait().unwrap() {
            break st.code();
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "old process still running"
        );
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0), "{}", a.log());
    for &addr in &a.addrs {
        let mut t = socks5_connect(addr, echo.addr).expect("served by the new process");
        assert_echo(&mut t, b"after");
    }
    assert!(
        a.log().contains("upgrade: took over 2 listening sockets"),
        "{}",
        a.log()
    );
}

#[test]
fn overlapping_listen_addresses_of_one_instance_are_not_a_conflict() {
    let echo = TestServer::echo();
    let port = free_port().to_string();
    let (specific, wild) = (format!("127.0.0.1:{port}"), format!("0.0.0.0:{port}"));
    let args = ["-l", &specific, "-l", &wild, "--open", "--threads", "2"];
    let proxy = Proxy::spawn(&args);
    assert_eq!(proxy.addrs.len(), 2, "{}", proxy.log());
    let mut t = socks5_connect(proxy.addr(), echo.addr).expect("serves");
    assert_echo(&mut t, b"both ours");
}

/// Connections waiting in the accept queue at the hand-over (the old process is at --max-connections, so it does
/// not accept them) are served by the new process, not reset: the queues are never closed.
fn queued_connections_survive(threads: &str) {
    let echo = TestServer::echo();
    let (dir, link) = binary_link();
    let pid_file = dir.join("socksgate.pid");
    let args = [
        "-l",
        "127.0.0.1:0",
        "--threads",
        threads,
        "--max-connections",
        "1",
        "--pid-file",
        pid_file.to_str().unwrap(),
    ];
    let mut cmd = Command::new(&link);
    cmd.args(args);
    let mut old = Proxy::spawn_command(cmd, &args);
    let proxy = old.addr();
    let mut hold = socks5_connect(proxy, echo.addr).expect("the one connection allowed");
    assert_echo(&mut hold, b"holding the only slot");
    // The kernel completes these handshakes and queues them; socksgate does not accept them while at its limit.
    let queued: Vec<(TcpStream, Vec<u8>)> = (0..6u64)
        .map(|i| {
            let mut s = connect(proxy);
            let payload = pseudo_random(i + 77, 100);
            let mut msg = vec![5, 1, 0];
            msg.extend_from_slice(&socks5_request(1, echo.addr));
            msg.extend_from_slice(&payload);
            s.write_all(&msg).unwrap();
            (s, payload)
        })
        .collect();
    old.signal("USR2");
    let mut new_pid = None;
    assert!(
        wait_until(Duration::from_secs(30), &mut || {
            new_pid = read_pid(&pid_file).filter(|&p| p != old.pid());
            new_pid.is_some()
        }),
        "{}",
        old.log()
    );
    let _guard = PidGuard(new_pid.unwrap());
    // With several workers the new process accepts them in no particular order, one at a time: read them all
    // at once, each freeing the single slot when done.
    let readers: Vec<_> = queued
        .into_iter()
        .enumerate()
        .map(|(i, (mut s, payload))| {
            thread::spawn(move || {
                let mut answer = vec![0u8; 12 + payload.len()];
                let got = s
                    .read_exact(&mut answer)
                    .map_err(|e| format!("queued client {i}: {e}"));
                let _ = s.shutdown(std::net::Shutdown::Both);
                got?;
                if answer[..4] != [5, 0, 5, 0] || answer[12..] != payload[..] {
                    return Err(format!(
                        "queued client {i}: wrong answer {:?}",
                        &answer[..12]
                    ));
                }
                Ok(())
            })
        })
        .collect();
    for r in readers {
        if let Err(e) = r.join().expect("reader") {
            panic!("{e}\n{}", old.log());
        }
    }
    assert_echo(&mut hold, b"the old process still relays");
    drop(hold);
    assert_eq!(
        old.wait_exit(Duration::from_secs(40)),
        Some(0),
        "{}",
        old.log()
    );
}

#[test]
fn queued_connections_survive_an_upgrade_one_thread() {
    queued_connections_survive("1");
}

#[test]
fn queued_connections_survive_an_upgrade_four_threads() {
    queued_connections_survive("4");
}

#[test]
fn a_passed_socket_named_metrics_serves_metrics() {
    let echo = TestServer::echo();
    let Some(a) = Activated::start(2, Some("socks:metrics"), &["--threads", "2"]) else {
        return;
    };
    let mut t = socks5_connect(a.addrs[0], echo.addr).expect("the proxy socket");
    assert_echo(&mut t, b"proxy");
    drop(t);
    let mut m = connect(a.addrs[1]);
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let text = String::from_utf8(read_to_end(&mut m)).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("socksgate_connections_accepted_total 1\n"),
        "{text}"
    );
    assert!(
        a.log()
            .contains("socket activation: 1 sockets from systemd"),
        "{}",
        a.log()
    );
}
