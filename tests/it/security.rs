//! Security properties visible from outside the process.

use crate::common;

use common::Proxy;

/// `--user NAME:PASS` must not leave the password readable in /proc/PID/cmdline (what `ps` shows).
#[test]
fn user_passwords_are_hidden_from_ps() {
    let proxy = Proxy::start(&["-U", "alice:s3cr3t-one", "--user=bob:s3cr3t-two", "-q"]);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", proxy.pid())).expect("cmdline");
    let text = String::from_utf8_lossy(&cmdline);
    assert!(!text.contains("s3cr3t"), "password visible: {text:?}");
    assert!(text.contains("alice:"), "user name kept: {text:?}");
    // The hidden password still works.
    let echo = common::TestServer::echo();
    let mut s = common::connect(proxy.addr());
    use std::io::Write;
    s.write_all(&[5, 1, 2]).unwrap();
    assert_eq!(common::read_n(&mut s, 2), vec![5, 2]);
    let mut auth = vec![1, 5];
    auth.extend_from_slice(b"alice");
    auth.push(10);
    auth.extend_from_slice(b"s3cr3t-one");
    s.write_all(&auth).unwrap();
    assert_eq!(common::read_n(&mut s, 2), vec![1, 0]);
    s.write_all(&common::socks5_request(1, echo.addr)).unwrap();
    assert_eq!(common::read_socks5_reply(&mut s).0, 0);
}

/// Passwords never reach the log, even at trace level, and even when authentication fails.
#[test]
fn passwords_are_never_logged() {
    let proxy = Proxy::start(&["-U", "alice:pw-in-flag", "-vv"]);
    use std::io::Write;
    let mut s = common::connect(proxy.addr());
    s.write_all(&[5, 1, 2]).unwrap();
    assert_eq!(common::read_n(&mut s, 2), vec![5, 2]);
    let mut auth = vec![1, 5];
    auth.extend_from_slice(b"alice");
    auth.push(11);
    auth.extend_from_slice(b"wrong-guess");
    s.write_all(&auth).unwrap();
    assert_eq!(common::read_n(&mut s, 2), vec![1, 1]);
    assert!(common::closed(&mut s));
    let mut h = common::connect(proxy.addr());
    // "alice:http-guess" in Basic.
    h.write_all(b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic YWxpY2U6aHR0cC1ndWVzcw==\r\n\r\n")
        .unwrap();
    let resp = common::read_to_end(&mut h);
    assert!(
        resp.starts_with(b"HTTP/1.1 407"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    assert!(proxy.wait_for(common::IO_TIMEOUT, || proxy.log().contains("end=")));
    let log = proxy.log();
    for secret in [
        "pw-in-flag",
        "wrong-guess",
        "http-guess",
        "YWxpY2U6aHR0cC1ndWVzcw",
    ] {
        assert!(!log.contains(secret), "{secret} appears in the log");
    }
}

/// Basic credentials are per request (RFC 9110 §11.7.1): a kept-alive connection that authenticated once does not
/// carry later requests without valid credentials.
#[test]
fn http_proxy_auth_is_checked_on_every_request() {
    use std::io::Write;
    let origin = common::TestServer::start(|mut s| {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        let mut seen = Vec::new();
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                seen.drain(..end + 4);
                if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    let proxy = Proxy::start(&["-U", "alice:pw"]);
    let mut c = common::connect(proxy.addr());
    let url = format!("http://{}/", origin.addr);
    // "alice:pw" and "alice:no".
    let good =
        format!("GET {url} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic YWxpY2U6cHc=\r\n\r\n");
    let bad =
        format!("GET {url} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic YWxpY2U6bm8=\r\n\r\n");
    let none = format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n");
    let ok = b"HTTP/1.1 200 OK\r\n";
    c.write_all(good.as_bytes()).unwrap();
    let r = common::read_n(&mut c, ok.len());
    assert_eq!(r, ok);
    // Read the rest of the first response (headers + 2-byte body).
    let mut rest = Vec::new();
    while !rest.ends_with(b"\r\n\r\nok") {
        rest.extend(common::read_n(&mut c, 1));
    }
    c.write_all(good.as_bytes()).unwrap();
    assert_eq!(
        common::read_n(&mut c, ok.len()),
        ok,
        "same credentials again"
    );
    let mut rest = Vec::new();
    while !rest.ends_with(b"\r\n\r\nok") {
        rest.extend(common::read_n(&mut c, 1));
    }
    c.write_all(bad.as_bytes()).unwrap();
    let r = common::read_to_end(&mut c);
    assert!(
        r.starts_with(b"HTTP/1.1 407"),
        "{}",
        String::from_utf8_lossy(&r)
    );
    let mut c = common::connect(proxy.addr());
    c.write_all(good.as_bytes()).unwrap();
    assert_eq!(common::read_n(&mut c, ok.len()), ok);
    let mut rest = Vec::new();
    while !rest.ends_with(b"\r\n\r\nok") {
        rest.extend(common::read_n(&mut c, 1));
    }
    c.write_all(none.as_bytes()).unwrap();
    let r = common::read_to_end(&mut c);
    assert!(
        r.starts_with(b"HTTP/1.1 407"),
        "{}",
        String::from_utf8_lossy(&r)
    );
}

/// A target that resets mid-stream makes the client see a reset too, not a clean EOF that would pass a truncated
/// stream off as complete.
#[test]
fn target_reset_reaches_the_client_as_a_reset() {
    use std::io::{Read, Write};
    let target = common::TestServer::start(|mut s| {
        let _ = s.write_all(&[7u8; 1000]);
        let mut b = [0u8; 1];
        let _ = s.read(&mut b); // wait for the client's go
        common::abort_close(s);
    });
    let proxy = Proxy::start(&[]);
    let mut c = common::socks5_connect(proxy.addr(), target.addr).expect("connect");
    assert_eq!(common::read_n(&mut c, 1000), vec![7u8; 1000]);
    c.write_all(b"go").unwrap();
    let mut buf = [0u8; 16];
    let outcome = c.read(&mut buf);
    assert!(
        matches!(&outcome, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected a reset, got {outcome:?}"
    );
}
