//! docs/deploy.md end to end: two socksgate instances with --proxy-protocol behind a real HAProxy in TCP mode with
//! `send-proxy-v2` and the documented SOCKS5 health check. Skipped (with a message) when haproxy is not installed;
//! `.ci/run` installs it.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, Proxy, TestServer};

struct Haproxy(std::process::Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_instances_behind_haproxy_send_proxy_v2() {
    if Command::new("haproxy").arg("-v").output().is_err() {
        eprintln!("haproxy not installed: skipping");
        return;
    }
    let echo = TestServer::echo();
    let gw1 = Proxy::start(&[
        "--proxy-protocol",
        "-U",
        "alice:pw",
        "--allow-client",
        "127.0.0.0/8",
    ]);
    let gw2 = Proxy::start(&[
        "--proxy-protocol",
        "-U",
        "alice:pw",
        "--allow-client",
        "127.0.0.0/8",
    ]);
    let front = free_port();
    let dir = std::env::temp_dir().join(format!("socksgate-haproxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    maxconn 1000\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1m\n    timeout server 1m\n\
             frontend socks\n    bind 127.0.0.1:{front}\n    default_backend gws\n\
             backend gws\n    balance roundrobin\n    option tcp-check\n    tcp-check connect send-proxy\n\
             \x20   tcp-check send-binary 050102\n    tcp-check expect binary 0502\n\
             \x20   server gw1 {} send-proxy-v2 check inter 200ms\n\
             \x20   server gw2 {} send-proxy-v2 check inter 200ms\n",
            gw1.addr(),
            gw2.addr()
        ),
    )
    .unwrap();
    let mut child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start haproxy");
    let stderr = child.stderr.take().unwrap();
    let _h = Haproxy(child);
    // Wait until HAProxy listens (it may log warnings; read them in the background).
    std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {});
    assert!(common::wait_until(common::IO_TIMEOUT, &mut || {
        std::net::TcpStream::connect(("127.0.0.1", front)).is_ok()
    }));
    // Health checks with send-proxy (v1) reached both gateways and were answered 05 02.
    assert!(common::wait_until(common::IO_TIMEOUT, &mut || gw1
        .log()
        .contains("proto=socks5")
        && gw2.log().contains("proto=socks5")));

    for i in 0..4 {
        let mut s = common::connect(format!("127.0.0.1:{front}").parse().unwrap());
        s.write_all(&[5, 1, 2]).unwrap();
        assert_eq!(common::read_n(&mut s, 2), vec![5, 2]);
        s.write_all(b"\x01\x05alice\x02pw").unwrap();
        assert_eq!(common::read_n(&mut s, 2), vec![1, 0]);
        s.write_all(&common::socks5_request(1, echo.addr)).unwrap();
        assert_eq!(common::read_socks5_reply(&mut s).0, 0);
        let msg = format!("through haproxy {i}");
        s.write_all(msg.as_bytes()).unwrap();
        assert_eq!(common::read_n(&mut s, msg.len()), msg.as_bytes());
    }
    // Round robin: both gateways carried tunnels for alice, and logged the real client (127.0.0.1), not HAProxy's
    // health-check identity.
    for gw in [&gw1, &gw2] {
        assert!(
            common::wait_until(Duration::from_secs(20), &mut || gw
                .log()
                .contains("user=alice")),
            "no tunnel through {}: {}",
            gw.addr(),
            gw.log()
        );
    }
    // A direct connection without a PROXY header is refused by the gateway.
    let mut direct = common::connect(gw1.addr());
    direct.write_all(&[5, 1, 0]).unwrap();
    assert!(common::closed(&mut direct));
    assert!(common::read_to_end(&mut direct).is_empty());
}
