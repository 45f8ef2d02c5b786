//! Listening sockets that outlive a process: a port held by another socksgate is refused, systemd socket
//! activation, and the SIGUSR2 binary upgrade under load.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

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
                .map(|_| SocketAddr::from(([127, 0, 0, 1], closed_port())))
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

/// An HTTP origin answering every request with `body` (Connection: close).
fn http_origin(body: &'static [u8]) -> TestServer {
    TestServer::start(move |mut s| {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut b) {
                Ok(1) => head.push(b[0]),
                _ => return,
            }
        }
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(body);
    })
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
    let origin = http_origin(b"origin says hi");
    // The -l address must not be bound: the passed socket replaces it.
    let unused = closed_port().to_string();
    let unused_addr = format!("127.0.0.1:{unused}");
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
    assert!(
        TcpStream::connect(&unused_addr).is_err(),
        "the -l address was bound as well"
    );
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
    let origin = http_origin(b"origin says hi");
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
