//! Listening sockets that outlive a process: a port held by another socksgate is refused, systemd socket
//! activation, and the SIGUSR2 binary upgrade under load.

mod common;

use std::process::{Command, Stdio};
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
        use std::io::Read;
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
