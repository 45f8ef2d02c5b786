//! Security properties visible from outside the process.

mod common;

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
