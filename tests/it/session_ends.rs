//! How sessions end and what the access log says about them (issue 10): HTTP forwarding through `--upstream`,
//! end reasons per path, bytes that arrive with the handshake, one line per forwarded HTTP request, 408 on a
//! stalled request head, the UDP and BIND `target=`, and the 502 body that says what went wrong.

use crate::common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};

use common::origin::{ClosedPort, HttpConn, Origin};
use common::*;

/// The access-log lines written so far.
fn access_lines(p: &Proxy) -> Vec<String> {
    p.log()
        .lines()
        .filter(|l| l.contains(" access] "))
        .map(str::to_string)
        .collect()
}

/// Waits for the `n`th (1-based) access-log line that contains every one of `parts`; returns it.
fn wait_line(p: &Proxy, parts: &[&str]) -> String {
    let mut found = None;
    let ok = p.wait_for(IO_TIMEOUT, || {
        found = access_lines(p)
            .into_iter()
            .find(|l| parts.iter().all(|s| l.contains(s)));
        found.is_some()
    });
    assert!(
        ok,
        "no access line with {parts:?}; log:\n{}",
        access_lines(p).join("\n")
    );
    found.unwrap_or_default()
}

/// The value of `key=` in an access-log line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let pat = format!(" {key}=");
    let start = line
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        + pat.len();
    line[start..].split(' ').next().unwrap_or("")
}

fn get(origin: &Origin, path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n{extra}\r\n",
        origin.url(path),
        origin.authority()
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Plain HTTP forwarding through --upstream
// ---------------------------------------------------------------------------------------------------------------

/// Four requests on one client connection through `front`, each answered in order; the origin sees origin-form
/// targets with the right Host, and (the path to the origin being kept alive) one TCP connection.
fn forward_keep_alive_through(front: &Proxy, origin: &Origin) {
    let mut c = HttpConn::connect(front.addr());
    for i in 0..4 {
        c.send(&get(origin, &format!("/chain-{i}?q={i}"), ""));
        let r = c.read_response(false);
        assert_eq!(r.status, 200, "{}", r.head_text());
        assert_eq!(r.body, format!("path=/chain-{i}?q={i}\n").as_bytes());
        let rec = origin.request_to(&format!("/chain-{i}?q={i}"));
        assert_eq!(rec.header("host"), Some(origin.authority().as_str()));
        assert!(
            rec.header("proxy-authorization").is_none(),
            "upstream credentials must not reach the origin"
        );
    }
    assert_eq!(origin.connections(), 1, "kept-alive path to the origin");
    drop(c);
    for i in 0..4 {
        let line = wait_line(
            front,
            &[&format!("url=http://{}/chain-{i} ", origin.authority())],
        );
        assert_eq!(field(&line, "status"), "200");
        assert_eq!(field(&line, "end"), "done");
        assert!(
            !line.contains("q="),
            "the query string is not logged: {line}"
        );
    }
}

#[test]
fn http_forwarding_through_a_socks5_upstream() {
    let origin = Origin::start();
    let back = Proxy::start(&["-U", "chain:secret"]);
    let up = format!("socks5://chain:secret@{}", back.addr());
    let front = Proxy::start(&["--upstream", &up]);
    forward_keep_alive_through(&front, &origin);
    // The back proxy saw one SOCKS5 session for the whole keep-alive run.
    let line = wait_line(&back, &["proto=socks5", "user=chain"]);
    assert_eq!(field(&line, "target"), origin.authority());
}

#[test]
fn http_forwarding_through_an_http_upstream_in_absolute_form() {
    let origin = Origin::start();
    let back = Proxy::start(&["-U", "chain:secret"]);
    let up = format!("http://chain:secret@{}", back.addr());
    let front = Proxy::start(&["--upstream", &up]);
    forward_keep_alive_through(&front, &origin);
    // The back proxy got absolute-form requests with our credentials (it logs them one line each, as user chain).
    for i in 0..4 {
        let line = wait_line(&back, &[&format!("/chain-{i} "), "user=chain"]);
        assert_eq!(field(&line, "method"), "GET");
        assert_eq!(field(&line, "status"), "200");
    }
}

/// Wrong credentials for an HTTP upstream are the proxy's problem, not the client's: 502, never the upstream's 407.
#[test]
fn http_upstream_refusing_our_credentials_is_a_502() {
    let origin = Origin::start();
    let back = Proxy::start(&["-U", "chain:secret"]);
    let up = format!("http://chain:wrong@{}", back.addr());
    let front = Proxy::start(&["--upstream", &up]);
    let mut c = HttpConn::connect(front.addr());
    c.send(&get(&origin, "/x", ""));
    let r = c.read_response(false);
    assert_eq!(r.status, 502, "{}", r.head_text());
    assert!(r.header("proxy-authenticate").is_none());
    let line = wait_line(&front, &["url="]);
    assert_eq!(field(&line, "end"), "upstream_proxy_error");
}

#[test]
fn curl_through_two_chained_instances() {
    if !have_curl() {
        eprintln!("curl not installed: skipped");
        return;
    }
    let origin = Origin::start();
    for kind in ["socks5", "http"] {
        let back = Proxy::start(&[]);
        let up = format!("{kind}://{}", back.addr());
        let front = Proxy::start(&["--upstream", &up]);
        let proxy = format!("http://{}", front.addr());
        let (a, b) = (origin.url("/curl-a"), origin.url("/curl-b"));
        let (code, out, err) = curl(&["-sS", "-x", &proxy, &a, &b]);
        assert_eq!(code, 0, "{kind}: curl failed: {err}");
        assert_eq!(out, b"path=/curl-a\npath=/curl-b\n", "{kind}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 3. End reasons, 5. one line per forwarded request
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn http_exchanges_that_end_by_close_are_done() {
    let origin = Origin::start();
    let p = Proxy::start(&[]);
    let cases: [(&str, String); 4] = [
        (
            "/http10",
            format!("GET {} HTTP/1.0\r\n\r\n", origin.url("/http10")),
        ),
        (
            "/client-close",
            String::from_utf8(get(&origin, "/client-close", "Connection: close\r\n")).unwrap(),
        ),
        (
            "/server-close",
            String::from_utf8(get(&origin, "/server-close", "")).unwrap(),
        ),
        (
            "/close",
            String::from_utf8(get(&origin, "/close", "")).unwrap(),
        ),
    ];
    for (path, req) in &cases {
        let mut c = HttpConn::connect(p.addr());
        c.send(req.as_bytes());
        let r = c.read_response(false);
        assert_eq!(r.status, 200, "{path}: {}", r.head_text());
        if *path != "/server-close" {
            // (An origin's `Connection: close` is its own hop's business: the client connection stays.)
            assert!(c.is_closed(), "{path}: the proxy closes after the response");
        }
        let line = wait_line(&p, &[&format!("{path} ")]);
        assert_eq!(field(&line, "end"), "done", "{path}: {line}");
        assert_eq!(field(&line, "status"), "200", "{path}");
        assert_eq!(
            field(&line, "down"),
            r.raw_head
                .len()
                .saturating_add(r.raw_body.len())
                .to_string()
        );
    }
    // Only request lines: no session line for these connections.
    assert!(
        !access_lines(&p).iter().any(|l| l.contains(" target=")),
        "{:?}",
        access_lines(&p)
    );
}

#[test]
fn http_errors_are_logged_with_their_reason() {
    let origin = Origin::start();
    let p = Proxy::start(&["--max-header-size", "4096", "-U", "alice:pw"]);
    let auth = "Proxy-Authorization: Basic YWxpY2U6cHc=\r\n"; // alice:pw
    let closed = ClosedPort::new();
    let huge = format!("X-Big: {}\r\n", "a".repeat(8000));
    let cases: Vec<(Vec<u8>, u16, &str, &str)> = vec![
        (b"GET nonsense\r\n\r\n".to_vec(), 400, "bad_request", ""),
        (get(&origin, "/huge", &huge), 431, "header_too_large", ""),
        (get(&origin, "/noauth", ""), 407, "auth_required", "url="),
        (
            format!(
                "GET http://{}/ HTTP/1.1\r\nHost: x\r\n{auth}\r\n",
                closed.addr
            )
            .into_bytes(),
            502,
            "refused",
            "url=",
        ),
        (
            format!("GET http://nx.invalid/ HTTP/1.1\r\nHost: nx.invalid\r\n{auth}\r\n")
                .into_bytes(),
            502,
            "name_not_resolved",
            "url=",
        ),
        (
            format!("CONNECT {} HTTP/1.1\r\n{auth}\r\n", closed.addr).into_bytes(),
            502,
            "refused",
            "target=",
        ),
    ];
    for (req, status, end, kind) in cases {
        let before = access_lines(&p).len();
        let mut c = HttpConn::connect(p.addr());
        c.send(&req);
        let r = c.read_response(false);
        assert_eq!(r.status, status, "{end}: {}", r.head_text());
        let body = String::from_utf8_lossy(&r.body).to_string();
        match end {
            "refused" => assert!(body.contains("refused the connection"), "{body}"),
            "name_not_resolved" => assert!(body.contains("does not resolve"), "{body}"),
            _ => {}
        }
        assert!(c.is_closed(), "{end}");
        assert!(p.wait_for(IO_TIMEOUT, || access_lines(&p).len() > before));
        let line = access_lines(&p).pop().unwrap();
        assert_eq!(field(&line, "end"), end, "{line}");
        assert!(line.contains(kind), "{line}");
        if kind == "url=" {
            assert_eq!(field(&line, "status"), status.to_string(), "{line}");
        }
    }
}

#[test]
fn request_lines_name_method_url_status_user_and_bytes() {
    let origin = Origin::start();
    let p = Proxy::start(&["-U", "bob:pw"]);
    let auth = "Proxy-Authorization: Basic Ym9iOnB3\r\n"; // bob:pw
    let mut c = HttpConn::connect(p.addr());
    let body = b"0123456789";
    let post = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Length: {}\r\n\r\n",
        origin.url("/echo?token=secret"),
        origin.authority(),
        body.len()
    );
    c.send(post.as_bytes());
    c.send(body);
    let r1 = c.read_response(false);
    assert_eq!(r1.body, body);
    c.send(&get(&origin, "/second", auth));
    let r2 = c.read_response(false);
    assert_eq!(r2.status, 200);
    let l1 = wait_line(&p, &["method=POST"]);
    assert_eq!(
        field(&l1, "url"),
        format!("http://{}/echo", origin.authority())
    );
    assert!(!l1.contains("secret"), "{l1}");
    assert_eq!(field(&l1, "user"), "bob");
    assert_eq!(field(&l1, "status"), "200");
    assert_eq!(field(&l1, "proto"), "http");
    assert_eq!(
        field(&l1, "down"),
        (r1.raw_head.len() + r1.raw_body.len()).to_string()
    );
    let up: usize = field(&l1, "up").parse().unwrap();
    assert!(
        up > body.len(),
        "up counts the forwarded head and body: {l1}"
    );
    assert!(field(&l1, "ms").parse::<u64>().is_ok());
    assert!(field(&l1, "client").starts_with("127.0.0.1:"));
    let l2 = wait_line(&p, &["/second "]);
    assert_eq!(field(&l2, "method"), "GET");
    assert_eq!(
        field(&l2, "down"),
        (r2.raw_head.len() + r2.raw_body.len()).to_string()
    );
    // A client that goes away between requests adds no line.
    drop(c);
    let n = access_lines(&p).len();
    let mut probe = HttpConn::connect(p.addr());
    probe.send(&get(&origin, "/probe", auth));
    assert_eq!(probe.read_response(false).status, 200);
    wait_line(&p, &["/probe "]);
    assert_eq!(access_lines(&p).len(), n + 1, "{:?}", access_lines(&p));
}

#[test]
fn socks_and_connect_sessions_end_done_and_resets_are_named() {
    let echo = TestServer::echo();
    let p = Proxy::start(&[]);
    let mut s = socks5_connect(p.addr(), echo.addr).unwrap();
    assert_echo(&mut s, b"hello");
    s.shutdown(Shutdown::Write).unwrap();
    let _ = read_to_end(&mut s);
    let line = wait_line(&p, &["proto=socks5"]);
    assert_eq!(field(&line, "end"), "done");

    let closed = ClosedPort::new();
    assert_eq!(socks5_connect(p.addr(), closed.addr).err(), Some(5));
    let line = wait_line(&p, &["proto=socks5", &format!("target={}", closed.addr)]);
    assert_eq!(field(&line, "end"), "refused");

    // A client reset mid-tunnel.
    let mut s = socks5_connect(p.addr(), echo.addr).unwrap();
    assert_echo(&mut s, b"x");
    abort_close(s);
    let line = wait_line(&p, &["proto=socks5", "end=client_reset"]);
    assert_eq!(field(&line, "up"), "1");
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Bytes that arrive with the handshake are counted
// ---------------------------------------------------------------------------------------------------------------

const UP: &str = "socksgate_bytes_total{direction=\"up\"}";
const DOWN: &str = "socksgate_bytes_total{direction=\"down\"}";

/// Sends `hello` (the handshake with `payload` in the same write), reads `reply_len` reply bytes and the echoed
/// payload, then closes; returns the access-log line of the session.
fn pipelined(p: &Proxy, proto: &str, hello: &[u8], reply_len: usize, payload: &[u8]) -> String {
    let before = access_lines(p).len();
    let mut s = connect(p.addr());
    let mut all = hello.to_vec();
    all.extend_from_slice(payload);
    s.write_all(&all).unwrap();
    let reply = read_n(&mut s, reply_len);
    assert!(!reply.is_empty());
    assert_eq!(
        read_n(&mut s, payload.len()),
        payload,
        "{proto}: echoed payload"
    );
    s.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_end(&mut s).is_empty());
    assert!(p.wait_for(IO_TIMEOUT, || access_lines(p).len() > before));
    let line = access_lines(p).pop().unwrap();
    assert_eq!(field(&line, "proto"), proto, "{line}");
    assert_eq!(field(&line, "end"), "done", "{line}");
    line
}

#[test]
fn bytes_sent_with_the_handshake_are_counted() {
    let echo = TestServer::echo();
    let p = Proxy::start(&["--metrics", "127.0.0.1:0"]);
    let payload = pseudo_random(7, 1000);
    let mut total = 0u64;

    let mut s5 = vec![5, 1, 0];
    s5.extend_from_slice(&socks5_request(1, echo.addr));
    let line = pipelined(&p, "socks5", &s5, 2 + 10, &payload);
    assert_eq!(field(&line, "up"), "1000");
    assert_eq!(field(&line, "down"), "1000");
    total += 1000;

    let SocketAddr::V4(v4) = echo.addr else {
        panic!("IPv4 echo")
    };
    let s4 = socks4_request(1, v4.port(), v4.ip().octets(), b"", None);
    let line = pipelined(&p, "socks4", &s4, 8, &payload[..500]);
    assert_eq!(field(&line, "up"), "500");
    assert_eq!(field(&line, "down"), "500");
    total += 500;

    let head = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", echo.addr);
    let established = b"HTTP/1.1 200 Connection established\r\n\r\n".len();
    let line = pipelined(&p, "http", head.as_bytes(), established, &payload[..700]);
    assert_eq!(field(&line, "up"), "700");
    assert_eq!(field(&line, "down"), "700");
    total += 700;

    wait_metric(&p, UP, total);
    wait_metric(&p, DOWN, total);
}

/// Bytes the BIND client sends while waiting for its peer are relayed first, and counted.
#[test]
fn bind_logs_the_accepted_peer_and_counts_early_bytes() {
    let p = Proxy::start(&["--metrics", "127.0.0.1:0"]);
    let mut c = connect(p.addr());
    c.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_n(&mut c, 2), vec![5, 0]);
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    c.write_all(&socks5_request(2, any)).unwrap();
    let (rep, bound) = read_socks5_reply(&mut c);
    assert_eq!(rep, 0);
    c.write_all(b"early").unwrap();
    let mut peer = TcpStream::connect(bound).unwrap();
    peer.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (rep, from) = read_socks5_reply(&mut c);
    assert_eq!((rep, from), (0, peer_addr));
    let mut got = [0u8; 5];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"early");
    peer.write_all(b"back").unwrap();
    assert_eq!(read_n(&mut c, 4), b"back");
    drop(peer);
    c.shutdown(Shutdown::Write).unwrap();
    let _ = read_to_end(&mut c);
    let line = wait_line(&p, &["proto=socks5", "end="]);
    assert_eq!(field(&line, "target"), peer_addr.to_string(), "{line}");
    assert_eq!(field(&line, "up"), "5");
    assert_eq!(field(&line, "down"), "4");
    wait_metric(&p, UP, 5);
}

// ---------------------------------------------------------------------------------------------------------------
// 7. UDP target=
// ---------------------------------------------------------------------------------------------------------------

fn udp_dgram(target: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let SocketAddr::V4(a) = target else {
        panic!("IPv4 target")
    };
    let mut d = vec![0, 0, 0, 1];
    d.extend_from_slice(&a.ip().octets());
    d.extend_from_slice(&a.port().to_be_bytes());
    d.extend_from_slice(payload);
    d
}

#[test]
fn udp_logs_destinations_and_datagrams() {
    let (e1, e2) = (UdpEcho::start(), UdpEcho::start());
    let p = Proxy::start(&[]);
    let mut ctl = connect(p.addr());
    ctl.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_n(&mut ctl, 2), vec![5, 0]);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    ctl.write_all(&socks5_request(3, client.local_addr().unwrap()))
        .unwrap();
    let (rep, relay) = read_socks5_reply(&mut ctl);
    assert_eq!(rep, 0);
    let mut buf = [0u8; 2048];
    for (i, to) in [e1.addr, e2.addr, e1.addr].into_iter().enumerate() {
        client
            .send_to(&udp_dgram(to, format!("d{i}").as_bytes()), relay)
            .unwrap();
        let (n, _) = client.recv_from(&mut buf).expect("echoed datagram");
        assert!(buf[..n].ends_with(format!("d{i}").as_bytes()));
    }
    drop(ctl);
    let line = wait_line(&p, &["proto=socks5", "end=udp_control_closed"]);
    assert_eq!(
        field(&line, "target"),
        "dests:2,dgrams_up:3,dgrams_down:3",
        "{line}"
    );
    assert_eq!(field(&line, "up"), "6");
    assert_eq!(field(&line, "down"), "6");
}

// ---------------------------------------------------------------------------------------------------------------
// 6. A stalled request head
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn stalled_http_head_gets_408_and_socks_stays_silent() {
    let p = Proxy::start(&["--handshake-timeout", "1s"]);
    let mut h = HttpConn::connect(p.addr());
    h.send(b"GET http://example.test/ HTTP/1.1\r\nHost: exa");
    let r = h.read_response(false);
    assert_eq!(r.status, 408, "{}", r.head_text());
    assert!(h.is_closed());
    let line = wait_line(&p, &["proto=http"]);
    assert_eq!(field(&line, "end"), "handshake_timeout");

    let mut s = connect(p.addr());
    s.write_all(&[5, 1]).unwrap();
    let (rest, closed) = read_until_closed(&mut s);
    assert!(closed, "SOCKS5 closed at the deadline");
    assert!(rest.is_empty(), "SOCKS5 gets no reply: {rest:?}");
    let line = wait_line(&p, &["proto=socks5"]);
    assert_eq!(field(&line, "end"), "handshake_timeout");
}

// ---------------------------------------------------------------------------------------------------------------
// 8. Debug logging an operator can use
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn debug_log_shows_handshake_rules_and_connects() {
    let echo = TestServer::echo();
    // RUST_LOG (which the test harness sets) would override -v.
    let p = Proxy::spawn_in_shell(
        "unset RUST_LOG",
        &["-l", "127.0.0.1:0", "-v", "--allow-dest", "127.0.0.1/32"],
    );
    let mut s = socks5_connect(p.addr(), echo.addr).unwrap();
    assert_echo(&mut s, b"x");
    drop(s);
    let denied: SocketAddr = "127.0.0.2:9".parse().unwrap();
    assert_eq!(socks5_connect(p.addr(), denied).err(), Some(2));
    wait_line(&p, &["end=not_allowed"]);
    let log = p.log();
    for want in [
        "socks5 handshake",
        "SOCKS5 method 0x00 chosen",
        &format!("SOCKS5 Connect {}", echo.addr),
        &format!("connecting to {}", echo.addr),
        &format!("connected to {}", echo.addr),
        "destination 127.0.0.2:9 denied by rules",
        "session ended: not_allowed (fault: client)",
    ] {
        assert!(log.contains(want), "no {want:?} in:\n{log}");
    }
    assert!(
        !log.contains(" TRACE "),
        "-v is debug level, per-event traces only with -vv"
    );
}
