//! HTTP proxy behaviour end to end: the real binary between curl (or a raw client) and a recording origin.
//!
//! Each scenario is a function of the proxy address, so the fd-leak test can run all of them against one
//! process. Scenarios start their own origins and assert on bytes, status codes and digests.

use crate::common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::origin::{
    big_body, chunked_body, chunked_wire, close_body, Blackhole, ClosedPort, HttpConn, Origin,
    Response, BIG_DEFAULT,
};
use common::{digest, have_curl, pseudo_random, Proxy, TestServer, IO_TIMEOUT};

const CONNECT_OK: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

/// curl through the proxy (environment proxy settings neutralized).
fn curl_via(proxy: SocketAddr, args: &[&str]) -> (i32, Vec<u8>, String) {
    let p = format!("http://{proxy}");
    let mut a = vec!["--noproxy", "", "-x", p.as_str()];
    a.extend_from_slice(args);
    common::curl(&a)
}

/// True when curl is installed; otherwise says that the curl part of a test is skipped.
fn curl_available() -> bool {
    if have_curl() {
        return true;
    }
    eprintln!("skipping the curl part of this test: curl is not installed");
    false
}

/// A file with `data` in a per-process temp dir.
fn temp_file(name: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("socksgate-http-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// A GET in absolute form with a Host header and `extra` header lines (each ending in CRLF).
fn get(o: &Origin, path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n{extra}\r\n",
        o.url(path),
        o.authority()
    )
    .into_bytes()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts a proxy-generated error: status, `Connection: close`, a small body, then the connection closes.
fn assert_error_and_close(c: &mut HttpConn, status: u16, what: &str) -> Response {
    let r = c.read_response(false);
    assert_eq!(r.status, status, "{what}: got {}", r.head_text());
    assert!(
        r.connection_close(),
        "{what}: no Connection: close in {}",
        r.head_text()
    );
    assert!(
        c.is_closed(),
        "{what}: connection not closed after {status}"
    );
    r
}

/// Sends one request on a fresh connection and expects an error status followed by close.
fn expect_error(proxy: SocketAddr, request: &[u8], status: u16, what: &str) -> Response {
    let mut c = HttpConn::connect(proxy);
    c.send(request);
    assert_error_and_close(&mut c, status, what)
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    format!("Basic {token}")
}

fn ipv6_available() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

// ---------------------------------------------------------------------------------------------------------------
// Scenarios (each a function of the proxy address; used by the single tests and by the fd-leak test)
// ---------------------------------------------------------------------------------------------------------------

/// curl: a multi-MB download arrives intact; raw: same, with exact Content-Length, then a second request.
fn scenario_big_download(proxy: SocketAddr) {
    let o = Origin::start();
    let want = big_body(BIG_DEFAULT);
    if curl_available() {
        let (code, out, err) = curl_via(proxy, &["-f", &o.url("/big")]);
        assert_eq!(code, 0, "curl failed: {err}");
        assert_eq!(out.len(), want.len());
        assert_eq!(digest(&out), digest(&want), "curl download corrupted");
    }
    let n = 3_000_017;
    let mut c = HttpConn::connect(proxy);
    c.send(&get(&o, &format!("/big/{n}"), ""));
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head_text());
    assert_eq!(r.header("content-length"), Some(n.to_string().as_str()));
    assert_eq!(digest(&r.body), digest(&big_body(n)));
    c.send(&get(&o, "/after-big", "Connection: close\r\n"));
    let r = c.read_response(false);
    assert!(
        r.raw_head.starts_with(b"HTTP/1.1 200 "),
        "{}",
        r.head_text()
    );
    assert_eq!(r.body, b"path=/after-big\n");
    assert!(c.is_closed());
}

/// A chunked response is relayed byte for byte (extension and trailer included), and decodes intact in curl.
fn scenario_chunked_response(proxy: SocketAddr) {
    let o = Origin::start();
    let mut c = HttpConn::connect(proxy);
    c.send(&get(&o, "/chunked", ""));
    let r = c.read_response(false);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.header("content-length"), None);
    assert!(
        r.raw_body == chunked_wire(),
        "chunked wire bytes changed in transit ({} vs {} bytes)",
        r.raw_body.len(),
        chunked_wire().len()
    );
    // The connection is still usable: the framer stopped exactly at the end of the trailer section.
    c.send(&get(&o, "/after-chunked", "Connection: close\r\n"));
    let r = c.read_response(false);
    assert_eq!(r.body, b"path=/after-chunked\n", "{}", r.head_text());
    assert!(c.is_closed());
    if curl_available() {
        let (code, out, err) = curl_via(proxy, &["-f", &o.url("/chunked")]);
        assert_eq!(code, 0, "curl failed: {err}");
        assert_eq!(digest(&out), digest(&chunked_body()));
    }
}

/// POST/PUT with Content-Length and chunked bodies are echoed intact; the origin saw the same framing.
fn scenario_upload_bodies(proxy: SocketAddr) {
    let o = Origin::start();
    let data = pseudo_random(0x5EED, 2_500_003);
    let file = temp_file(&format!("upload-{}", o.addr.port()), &data);
    let at = format!("@{}", file.display());
    if curl_available() {
        // POST with Content-Length.
        let (code, out, err) = curl_via(
            proxy,
            &["-f", "--data-binary", &at, &o.url("/echo?case=post-cl")],
        );
        assert_eq!(code, 0, "curl failed: {err}");
        assert_eq!(digest(&out), digest(&data), "POST echo differs");
        let rec = o.request_to("/echo?case=post-cl");
        assert_eq!(rec.method, "POST");
        assert_eq!(
            rec.header("content-length"),
            Some(data.len().to_string().as_str())
        );
        assert!(!rec.chunked);
        assert_eq!(digest(&rec.body), digest(&data));

        // PUT with Content-Length (-T).
        let path = file.display().to_string();
        let (code, out, err) = curl_via(proxy, &["-f", "-T", &path, &o.url("/echo?case=put")]);
        assert_eq!(code, 0, "curl failed: {err}");
        assert_eq!(digest(&out), digest(&data), "PUT echo differs");
        let rec = o.request_to("/echo?case=put");
        assert_eq!(rec.method, "PUT");
        assert_eq!(digest(&rec.body), digest(&data));

        // POST with a chunked body.
        let (code, out, err) = curl_via(
            proxy,
            &[
                "-f",
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &at,
                &o.url("/echo?case=post-chunked"),
            ],
        );
        assert_eq!(code, 0, "curl failed: {err}");
        assert_eq!(digest(&out), digest(&data), "chunked POST echo differs");
        let rec = o.request_to("/echo?case=post-chunked");
        assert!(rec.chunked, "origin did not receive a chunked body");
        assert_eq!(rec.header("content-length"), None);
        assert_eq!(digest(&rec.body), digest(&data));

        // PUT with a chunked body.
        let (code, out, err) = curl_via(
            proxy,
            &[
                "-f",
                "-X",
                "PUT",
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &at,
                &o.url("/echo?case=put-chunked"),
            ],
        );
        assert_eq!(code, 0, "curl failed: {err}");
        assert_eq!(digest(&out), digest(&data), "chunked PUT echo differs");
        let rec = o.request_to("/echo?case=put-chunked");
        assert_eq!(rec.method, "PUT");
        assert!(rec.chunked);
    }
    // Raw: a chunked request body with extensions and a trailer, then a Content-Length body, on one connection.
    let mut c = HttpConn::connect(proxy);
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        o.url("/echo?case=raw-chunked")
    )
    .into_bytes();
    req.extend_from_slice(b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-T: 1\r\n\r\n");
    c.send(&req);
    let r = c.read_response(false);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello world");
    let rec = o.request_to("/echo?case=raw-chunked");
    assert!(rec.chunked);
    assert_eq!(rec.body, b"hello world");
    let mut req = format!(
        "PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\nConnection: close\r\n\r\n",
        o.url("/echo?case=raw-cl")
    )
    .into_bytes();
    req.extend_from_slice(b"abcdefg");
    c.send(&req);
    let r = c.read_response(false);
    assert_eq!(r.body, b"abcdefg");
    assert_eq!(r.header("x-method"), Some("PUT"));
    assert!(c.is_closed());
    let _ = std::fs::remove_file(file);
}

/// `Expect: 100-continue`: the origin's 100 reaches the client before it sends the body (raw), and curl's large
/// POST sees it too.
fn scenario_expect_continue(proxy: SocketAddr) {
    let o = Origin::start();
    let mut c = HttpConn::connect(proxy);
    c.send(
        format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
            o.url("/echo?case=expect")
        )
        .as_bytes(),
    );
    // The body is only sent after the 100 arrived: if the proxy swallowed it, this read times out.
    let r = c.read_response(false);
    assert_eq!(
        r.status,
        100,
        "expected 100 Continue, got {}",
        r.head_text()
    );
    assert!(r.raw_head.starts_with(b"HTTP/1.1 100 Continue\r\n"));
    c.send(b"0123456789");
    let r = c.read_response(false);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"0123456789");
    assert!(o.request_to("/echo?case=expect").sent_continue);

    // 1xx other than 100 are relayed too, and the final response follows on the same connection.
    c.send(&get(&o, "/interim", ""));
    let (interim, fin) = c.read_final(false);
    assert_eq!(interim.len(), 1, "expected one 103");
    assert_eq!(interim[0].status, 103);
    assert_eq!(interim[0].header("link"), Some("</style.css>; rel=preload"));
    assert_eq!(fin.status, 200);
    assert_eq!(fin.body, b"after interim\n");

    if curl_available() {
        let data = pseudo_random(0xE4, 3 << 20);
        let file = temp_file(&format!("expect-{}", o.addr.port()), &data);
        let at = format!("@{}", file.display());
        let (code, out, err) = curl_via(
            proxy,
            &[
                "-v",
                "-f",
                "-H",
                "Expect: 100-continue",
                "--data-binary",
                &at,
                &o.url("/echo?case=curl-expect"),
            ],
        );
        assert_eq!(code, 0, "curl failed: {err}");
        assert_eq!(digest(&out), digest(&data));
        assert!(
            err.contains("< HTTP/1.1 100 Continue"),
            "curl never saw the 100 Continue:\n{err}"
        );
        assert!(o.request_to("/echo?case=curl-expect").sent_continue);
        let _ = std::fs::remove_file(file);
    }
}

/// Two URLs on one kept-alive client connection: answered in order, and forwarded on one origin connection.
fn scenario_keep_alive_reuse(proxy: SocketAddr) {
    let o = Origin::start();
    if curl_available() {
        let (code, out, err) = curl_via(
            proxy,
            &[
                "-w",
                "|%{num_connects}|%{http_code}\n",
                &o.url("/ka-one"),
                &o.url("/ka-two"),
            ],
        );
        assert_eq!(code, 0, "curl failed: {err}");
        assert_eq!(
            text(&out),
            "path=/ka-one\n|1|200\npath=/ka-two\n|0|200\n",
            "curl did not reuse its proxy connection or got wrong answers"
        );
        let (a, b) = (o.request_to("/ka-one"), o.request_to("/ka-two"));
        assert_eq!(
            a.conn, b.conn,
            "proxy opened a second origin connection for a kept-alive client"
        );
        assert_eq!((a.seq, b.seq), (0, 1));
    }
    let mut c = HttpConn::connect(proxy);
    for i in 0..4 {
        c.send(&get(&o, &format!("/raw-ka-{i}"), ""));
        let r = c.read_response(false);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, format!("path=/raw-ka-{i}\n").as_bytes());
        assert!(r.header_all("connection").is_empty(), "{}", r.head_text());
    }
    let conns: Vec<u64> = (0..4)
        .map(|i| o.request_to(&format!("/raw-ka-{i}")).conn)
        .collect();
    assert!(
        conns.iter().all(|&c| c == conns[0]),
        "origin connections {conns:?}"
    );
}

/// Requests to two different origins on one client connection are each answered by the right origin.
fn scenario_two_origins(proxy: SocketAddr) {
    let a = Origin::start();
    let b = Origin::start();
    let mut c = HttpConn::connect(proxy);
    let plan = [
        (&a, "/to-a-1"),
        (&b, "/to-b-1"),
        (&a, "/to-a-2"),
        (&b, "/to-b-2"),
    ];
    for (o, path) in plan {
        c.send(&get(o, path, ""));
        let r = c.read_response(false);
        assert_eq!(r.status, 200, "{}", r.head_text());
        assert_eq!(r.body, format!("path={path}\n").as_bytes());
        assert_eq!(
            r.header("x-origin-port"),
            Some(o.addr.port().to_string().as_str()),
            "{path} answered by the wrong origin"
        );
    }
    assert_eq!(a.requests().len(), 2);
    assert_eq!(b.requests().len(), 2);
    c.send(&get(&a, "/to-a-last", "Connection: close\r\n"));
    assert_eq!(c.read_response(false).body, b"path=/to-a-last\n");
    assert!(c.is_closed());
}

/// Several requests (one with a body) in one write are answered in order, on one origin connection.
fn scenario_pipelined(proxy: SocketAddr) {
    let o = Origin::start();
    let mut batch = Vec::new();
    batch.extend_from_slice(&get(&o, "/pipe-1", ""));
    batch.extend_from_slice(
        format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nbody-2",
            o.url("/echo?pipe-2")
        )
        .as_bytes(),
    );
    batch.extend_from_slice(
        format!("HEAD {} HTTP/1.1\r\nHost: x\r\n\r\n", o.url("/big/1000")).as_bytes(),
    );
    batch.extend_from_slice(&get(&o, "/pipe-4", ""));
    batch.extend_from_slice(&get(&o, "/pipe-5", "Connection: close\r\n"));
    let mut c = HttpConn::connect(proxy);
    c.send(&batch);
    assert_eq!(c.read_response(false).body, b"path=/pipe-1\n");
    assert_eq!(c.read_response(false).body, b"body-2");
    let h = c.read_response(true);
    assert_eq!(h.header("content-length"), Some("1000"));
    assert_eq!(c.read_response(false).body, b"path=/pipe-4\n");
    let last = c.read_response(false);
    assert_eq!(last.body, b"path=/pipe-5\n");
    assert!(last.connection_close());
    assert!(c.is_closed());
    let reqs = o.requests();
    let order: Vec<String> = reqs.iter().map(|r| r.target.clone()).collect();
    assert_eq!(
        order,
        ["/pipe-1", "/echo?pipe-2", "/big/1000", "/pipe-4", "/pipe-5"]
    );
    assert!(reqs.iter().all(|r| r.conn == reqs[0].conn));

    // More pipelined requests than fit in a relay buffer, written while the responses are being read.
    let o = Origin::start();
    let n = 600;
    let mut batch = Vec::new();
    for i in 0..n {
        batch.extend_from_slice(&get(&o, &format!("/many-{i}"), ""));
    }
    batch.extend_from_slice(&get(&o, "/many-last", "Connection: close\r\n"));
    assert!(batch.len() > 32 * 1024);
    let mut c = HttpConn::connect(proxy);
    let mut writer = c.w.s.try_clone().unwrap();
    let t = std::thread::spawn(move || writer.write_all(&batch));
    for i in 0..n {
        let r = c.read_response(false);
        assert_eq!(r.body, format!("path=/many-{i}\n").as_bytes());
    }
    assert_eq!(c.read_response(false).body, b"path=/many-last\n");
    t.join().unwrap().unwrap();
    assert!(c.is_closed());
    assert_eq!(o.connections(), 1);
}

/// HEAD, 204 and 304 (whose Content-Length describes no body) are followed by another response on the same
/// connection with not a single stray byte in between.
fn scenario_bodyless_framing(proxy: SocketAddr) {
    let o = Origin::start();
    let mut c = HttpConn::connect(proxy);
    c.send(format!("HEAD {} HTTP/1.1\r\nHost: x\r\n\r\n", o.url("/big/5000")).as_bytes());
    let r = c.read_response(true);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("5000"));
    assert!(c.w.pending().is_empty());
    c.send(&get(&o, "/204", ""));
    let r = c.read_response(false);
    assert!(
        r.raw_head.starts_with(b"HTTP/1.1 204 No Content\r\n"),
        "{}",
        r.head_text()
    );
    assert_eq!(r.header("content-length"), None);
    assert_eq!(r.header("transfer-encoding"), None);
    c.send(&get(&o, "/304", ""));
    let r = c.read_response(false);
    assert!(
        r.raw_head.starts_with(b"HTTP/1.1 304 Not Modified\r\n"),
        "{}",
        r.head_text()
    );
    assert_eq!(r.header("etag"), Some("\"v1\""));
    c.send(&get(&o, "/after-bodyless", "Connection: close\r\n"));
    let r = c.read_response(false);
    assert!(
        r.raw_head.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{}",
        r.head_text()
    );
    assert_eq!(r.body, b"path=/after-bodyless\n");
    assert!(c.is_closed());

    // The same sequence in one write: the whole byte stream must be exactly four heads and one body.
    let mut c = HttpConn::connect(proxy);
    let mut batch = format!("HEAD {} HTTP/1.1\r\nHost: x\r\n\r\n", o.url("/big/5000")).into_bytes();
    batch.extend_from_slice(&get(&o, "/204", ""));
    batch.extend_from_slice(&get(&o, "/304", ""));
    batch.extend_from_slice(&get(&o, "/end", "Connection: close\r\n"));
    c.send(&batch);
    let (all, closed) = c.w.read_until_eof();
    assert!(closed);
    let t = text(&all);
    let heads: Vec<&str> = t.split("\r\n\r\n").collect();
    assert_eq!(heads.len(), 5, "{t:?}");
    assert!(heads[0].starts_with("HTTP/1.1 200 OK\r\n"), "{t:?}");
    assert!(heads[1].starts_with("HTTP/1.1 204 No Content\r\n"), "{t:?}");
    assert!(
        heads[2].starts_with("HTTP/1.1 304 Not Modified\r\n"),
        "{t:?}"
    );
    assert!(heads[3].starts_with("HTTP/1.1 200 OK\r\n"), "{t:?}");
    assert_eq!(heads[4], "path=/end\n");
}

/// A close-delimited (HTTP/1.0-style) response reaches the client whole, and the proxy then closes.
fn scenario_close_delimited(proxy: SocketAddr) {
    let o = Origin::start();
    let mut c = HttpConn::connect(proxy);
    c.send(&get(&o, "/close", ""));
    let r = c.read_response(false);
    assert_eq!(r.status, 200);
    assert!(
        r.connection_close(),
        "a close-delimited body must come with Connection: close: {}",
        r.head_text()
    );
    assert_eq!(r.header("content-length"), None);
    assert_eq!(digest(&r.body), digest(&close_body()));
    assert_eq!(r.body.len(), close_body().len());
    // read_response read until EOF, so the connection is closed.
}

/// A response head written a few bytes at a time, and one larger than a relay buffer, are relayed intact.
fn scenario_awkward_response_heads(proxy: SocketAddr) {
    let o = Origin::start();
    let mut c = HttpConn::connect(proxy);
    c.send(&get(&o, "/slow-headers", ""));
    let r = c.read_response(false);
    assert_eq!(r.header("x-slow"), Some("yes"));
    assert_eq!(r.body, b"slow\n");
    c.send(&get(&o, "/big-header", ""));
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head_text());
    assert_eq!(r.header("x-big").map(str::len), Some(40 * 1024));
    assert_eq!(r.body, b"big header\n");
    // A request head larger than a relay buffer (but under the 64 KB default limit) is forwarded too.
    let cookie = "c".repeat(40 * 1024);
    c.send(&get(
        &o,
        "/big-request-head",
        &format!("Cookie: {cookie}\r\n"),
    ));
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head_text());
    assert_eq!(
        o.request_to("/big-request-head")
            .header("cookie")
            .map(str::len),
        Some(cookie.len())
    );
}

/// What the origin receives: origin-form, Host from the URI, hop-by-hop fields removed, Via added (or not).
fn scenario_forwarded_head(proxy: SocketAddr, via: Option<&str>) {
    let o = Origin::start();
    let mut c = HttpConn::connect(proxy);
    let req = format!(
        "GET {} HTTP/1.1\r\n\
         Host: wrong.example:81\r\n\
         User-Agent: raw-test\r\n\
         Connection: keep-alive, X-Listed-Hop\r\n\
         X-Listed-Hop: secret\r\n\
         Proxy-Connection: keep-alive\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         Trailer: X-Checksum\r\n\
         Upgrade: websocket\r\n\
         Proxy-Authorization: {}\r\n\
         X-End-To-End: kept\r\n\
         Accept: */*\r\n\r\n",
        o.url("/inspect?q=1&r=%20"),
        basic("alice", "secret")
    );
    c.send(req.as_bytes());
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head_text());
    let rec = o.request_to("/inspect?q=1&r=%20");
    assert_eq!(rec.request_line(), "GET /inspect?q=1&r=%20 HTTP/1.1");
    assert_eq!(rec.header("host"), Some(o.authority().as_str()));
    for hop in [
        "connection",
        "x-listed-hop",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(
            rec.header_all(hop).is_empty(),
            "hop-by-hop {hop} reached the origin: {}",
            text(&rec.raw_head)
        );
    }
    assert_eq!(rec.header("user-agent"), Some("raw-test"));
    assert_eq!(rec.header("x-end-to-end"), Some("kept"));
    assert_eq!(rec.header("accept"), Some("*/*"));
    let want_via = via.map(|v| format!("1.1 {v}"));
    assert_eq!(rec.header("via"), want_via.as_deref(), "request Via");
    assert_eq!(r.header("via"), want_via.as_deref(), "response Via");

    // Response side: hop-by-hop fields from the origin are removed too.
    c.send(&get(&o, "/hop", "Connection: close\r\n"));
    let r = c.read_response(false);
    assert_eq!(r.body, b"hop\n");
    for hop in ["x-hop-secret", "keep-alive", "proxy-connection"] {
        assert!(
            r.header_all(hop).is_empty(),
            "hop-by-hop {hop} reached the client: {}",
            r.head_text()
        );
    }
    assert_eq!(r.header("x-end-to-end"), Some("kept"));
    assert_eq!(r.header_all("connection"), vec!["close"]);
    assert!(c.is_closed());

    // An HTTP/1.0 request keeps its version and gets Via "1.0".
    let mut c = HttpConn::connect(proxy);
    c.send(format!("GET {} HTTP/1.0\r\n\r\n", o.url("/inspect-10")).as_bytes());
    let r = c.read_response(false);
    assert_eq!(r.status, 200);
    let rec = o.request_to("/inspect-10");
    assert_eq!(rec.request_line(), "GET /inspect-10 HTTP/1.0");
    assert_eq!(rec.header("host"), Some(o.authority().as_str()));
    assert_eq!(
        rec.header("via"),
        via.map(|v| format!("1.0 {v}")).as_deref()
    );
}

/// A names given with --resolve is looked up by the proxy and reaches the right origin; Host keeps the name.
fn scenario_named_origin(proxy: SocketAddr) {
    let o = Origin::start();
    let mut c = HttpConn::connect(proxy);
    let port = o.addr.port();
    c.send(
        format!(
            "GET http://origin.test:{port}/named HTTP/1.1\r\nHost: origin.test:{port}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head_text());
    assert_eq!(r.body, b"path=/named\n");
    let host = format!("origin.test:{port}");
    assert_eq!(o.request_to("/named").header("host"), Some(host.as_str()));
    assert!(c.is_closed());
}

/// An HTTP/1.0 client without keep-alive gets its response and then the connection is closed.
fn scenario_http10_close(proxy: SocketAddr) {
    let o = Origin::start();
    let mut c = HttpConn::connect(proxy);
    c.send(format!("GET {} HTTP/1.0\r\nUser-Agent: old\r\n\r\n", o.url("/old")).as_bytes());
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head_text());
    assert_eq!(r.body, b"path=/old\n");
    assert!(r.connection_close(), "{}", r.head_text());
    assert!(c.is_closed(), "HTTP/1.0 client connection not closed");
    let rec = o.request_to("/old");
    assert_eq!(rec.header("connection"), Some("close"));

    // No 1xx may be sent to an HTTP/1.0 client (RFC 9110 §15.2): the 103 is dropped, the 200 relayed.
    let mut c = HttpConn::connect(proxy);
    c.send(format!("GET {} HTTP/1.0\r\n\r\n", o.url("/interim")).as_bytes());
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head_text());
    assert_eq!(r.body, b"after interim\n");
    assert!(c.is_closed());
}

/// CONNECT: curl tunnels through it; raw: exact 200 reply, early bytes relayed, half-close propagates.
fn scenario_connect(proxy: SocketAddr) {
    let echo = TestServer::echo();
    let mut c = HttpConn::connect(proxy);
    let mut req = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", echo.addr).into_bytes();
    // Bytes right behind the head (before the 200 was read): a pipelined TLS ClientHello in real life.
    req.extend_from_slice(b"early-bytes");
    c.send(&req);
    let reply = c.w.read_exact(CONNECT_OK.len()).expect("CONNECT reply");
    assert_eq!(text(&reply), text(CONNECT_OK));
    assert_eq!(
        c.w.read_exact(11).expect("early bytes echoed"),
        b"early-bytes",
        "bytes sent right after the CONNECT head were not relayed first"
    );
    let payload = pseudo_random(0xC0, 1 << 20);
    let reader = {
        let mut s = c.w.s.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut out);
            out
        })
    };
    c.w.s.write_all(&payload).unwrap();
    c.w.s.shutdown(std::net::Shutdown::Write).unwrap();
    let back = reader.join().unwrap();
    assert_eq!(
        back.len(),
        payload.len(),
        "tunnel lost bytes or did not close"
    );
    assert_eq!(digest(&back), digest(&payload));

    if curl_available() {
        let o = Origin::start();
        let (code, out, err) = curl_via(proxy, &["-f", "-p", &o.url("/through-tunnel")]);
        assert_eq!(code, 0, "curl failed: {err}");
        assert_eq!(out, b"path=/through-tunnel\n");
        let rec = o.request_to("/through-tunnel");
        // Inside a tunnel the proxy must not touch the bytes: no Via, curl's own origin-form request line.
        assert_eq!(rec.request_line(), "GET /through-tunnel HTTP/1.1");
        assert_eq!(rec.header("via"), None);
        let (code, out, err) = curl_via(proxy, &["-f", "-p", &o.url("/big/2000000")]);
        assert_eq!(code, 0, "curl failed: {err}");
        assert_eq!(digest(&out), digest(&big_body(2_000_000)));
    }
}

/// CONNECT to [::1]:port and a forwarded GET to http://[::1]:port/.
fn scenario_ipv6(proxy: SocketAddr) {
    if !ipv6_available() {
        eprintln!("skipping IPv6 checks: ::1 is not available");
        return;
    }
    let echo = TestServer::start_on("[::1]:0", common::echo_handler);
    let mut c = HttpConn::connect(proxy);
    let mut req = format!(
        "CONNECT [::1]:{0} HTTP/1.1\r\nHost: [::1]:{0}\r\n\r\n",
        echo.addr.port()
    )
    .into_bytes();
    req.extend_from_slice(b"v6-early");
    c.send(&req);
    assert_eq!(
        text(&c.w.read_exact(CONNECT_OK.len()).unwrap()),
        text(CONNECT_OK)
    );
    assert_eq!(c.w.read_exact(8).unwrap(), b"v6-early");
    c.send(b"more");
    assert_eq!(c.w.read_exact(4).unwrap(), b"more");

    let o = Origin::start_on("[::1]:0");
    let mut c = HttpConn::connect(proxy);
    c.send(&get(&o, "/v6", "Connection: close\r\n"));
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head_text());
    assert_eq!(r.body, b"path=/v6\n");
    let host = format!("[::1]:{}", o.addr.port());
    assert_eq!(o.request_to("/v6").header("host"), Some(host.as_str()));
    if curl_available() {
        let (code, out, err) = curl_via(proxy, &["-f", "-p", &o.url("/v6-curl-tunnel")]);
        assert_eq!(code, 0, "curl failed: {err}");
        assert_eq!(out, b"path=/v6-curl-tunnel\n");
    }
}

/// Client errors and origin failures: the right status, `Connection: close`, then the connection closes.
/// `max_head` is the proxy's --max-header-size.
fn scenario_errors(proxy: SocketAddr, max_head: usize) {
    let o = Origin::start();
    let url = o.url("/never");
    expect_error(proxy, b"GET /no-version\r\n\r\n", 400, "no HTTP version");
    expect_error(
        proxy,
        b"GET http://127.0.0.1:1/ HTTP/9.9\r\n\r\n",
        400,
        "bad version",
    );
    expect_error(
        proxy,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "origin-form",
    );
    expect_error(
        proxy,
        format!("GET {url} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").as_bytes(),
        400,
        "two Host fields",
    );
    expect_error(
        proxy,
        format!("GET {url} HTTP/1.1\r\nBad Header : x\r\n\r\n").as_bytes(),
        400,
        "whitespace before colon",
    );
    let fill = "a".repeat(max_head + 100);
    expect_error(
        proxy,
        format!("GET {url} HTTP/1.1\r\nHost: x\r\nX-Fill: {fill}\r\n\r\n").as_bytes(),
        431,
        "head over --max-header-size",
    );
    expect_error(
        proxy,
        format!(
            "POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        .as_bytes(),
        400,
        "Content-Length with Transfer-Encoding",
    );
    expect_error(
        proxy,
        format!(
            "POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
        )
        .as_bytes(),
        400,
        "two different Content-Length",
    );
    assert_eq!(
        o.connections(),
        0,
        "a rejected request reached the origin: {:?}",
        o.requests()
    );

    let closed = ClosedPort::new();
    expect_error(
        proxy,
        format!("GET http://{0}/ HTTP/1.1\r\nHost: {0}\r\n\r\n", closed.addr).as_bytes(),
        502,
        "origin refused",
    );
    expect_error(
        proxy,
        b"GET http://nx.invalid/ HTTP/1.1\r\nHost: nx.invalid\r\n\r\n",
        502,
        "DNS failure",
    );
    // CONNECT failures answer the same way.
    expect_error(
        proxy,
        format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", closed.addr).as_bytes(),
        502,
        "CONNECT refused",
    );
    expect_error(
        proxy,
        b"CONNECT nx.invalid:443 HTTP/1.1\r\nHost: nx.invalid:443\r\n\r\n",
        502,
        "CONNECT DNS failure",
    );

    if max_head < 40 * 1024 {
        // The origin's 40 KB response head is over the limit too: 502.
        expect_error(
            proxy,
            &get(&o, "/big-header", ""),
            502,
            "response head too large",
        );
    }

    // An error after successful requests on a kept-alive connection still answers, then closes.
    let mut c = HttpConn::connect(proxy);
    c.send(&get(&o, "/ok-before-error", ""));
    assert_eq!(c.read_response(false).status, 200);
    c.send(format!("GET http://{0}/ HTTP/1.1\r\nHost: {0}\r\n\r\n", closed.addr).as_bytes());
    assert_error_and_close(&mut c, 502, "refused after a good request");
}

/// `denied` is covered by a --deny-dest rule: 403, and nothing reaches it.
fn scenario_denied(proxy: SocketAddr, denied: SocketAddr) {
    expect_error(
        proxy,
        format!("GET http://{denied}/x HTTP/1.1\r\nHost: {denied}\r\n\r\n").as_bytes(),
        403,
        "denied destination",
    );
    expect_error(
        proxy,
        format!("CONNECT {denied} HTTP/1.1\r\nHost: {denied}\r\n\r\n").as_bytes(),
        403,
        "denied CONNECT destination",
    );
}

/// A connect that never completes: 504 after --connect-timeout.
fn scenario_connect_timeout(proxy: SocketAddr) -> bool {
    let Some(hole) = Blackhole::new() else {
        eprintln!("skipping 504 check: could not fill a listen queue to make connects hang");
        return false;
    };
    let start = Instant::now();
    expect_error(
        proxy,
        format!("GET http://{0}/ HTTP/1.1\r\nHost: {0}\r\n\r\n", hole.addr).as_bytes(),
        504,
        "connect timeout",
    );
    expect_error(
        proxy,
        format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", hole.addr).as_bytes(),
        504,
        "CONNECT connect timeout",
    );
    assert!(start.elapsed() < IO_TIMEOUT);
    true
}

/// With users configured: 407 with a Basic challenge without or with wrong credentials (forward and CONNECT);
/// with the right ones the request goes through and the credentials never reach the origin.
fn scenario_auth(proxy: SocketAddr) {
    let o = Origin::start();
    let echo = TestServer::echo();
    let good = basic("user", "pass");
    let bad = basic("user", "wrong");
    for (auth, what) in [
        (String::new(), "no credentials"),
        (format!("Proxy-Authorization: {bad}\r\n"), "wrong password"),
        (
            format!("Proxy-Authorization: {}\r\n", basic("nobody", "pass")),
            "unknown user",
        ),
        (
            "Proxy-Authorization: Bearer abc\r\n".to_string(),
            "not Basic",
        ),
    ] {
        let r = expect_error(proxy, &get(&o, "/secret", &auth), 407, what);
        assert_eq!(
            r.header("proxy-authenticate"),
            Some("Basic realm=\"socksgate\""),
            "{what}"
        );
        let r = expect_error(
            proxy,
            format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n{auth}\r\n", echo.addr).as_bytes(),
            407,
            what,
        );
        assert_eq!(
            r.header("proxy-authenticate"),
            Some("Basic realm=\"socksgate\"")
        );
    }
    assert_eq!(o.connections(), 0, "an unauthenticated request got through");

    // Raw with good credentials: forwarded without them.
    let mut c = HttpConn::connect(proxy);
    c.send(&get(
        &o,
        "/raw-authed",
        &format!("Proxy-Authorization: {good}\r\nConnection: close\r\n"),
    ));
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head_text());
    assert!(c.is_closed());
    let rec = o.request_to("/raw-authed");
    assert_eq!(rec.header("proxy-authorization"), None);
    assert!(!text(&rec.raw_head).contains(&good[6..]));

    // CONNECT with good credentials.
    let mut c = HttpConn::connect(proxy);
    c.send(
        format!(
            "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\nProxy-Authorization: {good}\r\n\r\nping",
            echo.addr
        )
        .as_bytes(),
    );
    assert_eq!(
        text(&c.w.read_exact(CONNECT_OK.len()).unwrap()),
        text(CONNECT_OK)
    );
    assert_eq!(c.w.read_exact(4).unwrap(), b"ping");

    if curl_available() {
        let (code, out, err) = curl_via(proxy, &["-w", "|%{http_code}", &o.url("/curl-no-auth")]);
        assert_eq!(code, 0, "curl failed: {err}");
        assert!(text(&out).ends_with("|407"), "{}", text(&out));
        let (code, out, err) = curl_via(
            proxy,
            &["-f", "--proxy-user", "user:pass", &o.url("/curl-authed")],
        );
        assert_eq!(code, 0, "curl failed: {err}");
        assert_eq!(out, b"path=/curl-authed\n");
        let rec = o.request_to("/curl-authed");
        assert_eq!(rec.header("proxy-authorization"), None);
        let (code, out, err) = curl_via(
            proxy,
            &[
                "-f",
                "-p",
                "--proxy-user",
                "user:pass",
                &o.url("/curl-authed-tunnel"),
            ],
        );
        assert_eq!(code, 0, "curl failed: {err}");
        assert_eq!(out, b"path=/curl-authed-tunnel\n");
        let rec = o.request_to("/curl-authed-tunnel");
        assert_eq!(rec.header("proxy-authorization"), None);
        let (code, _, err) = curl_via(
            proxy,
            &["-p", "--proxy-user", "user:bad", &o.url("/curl-bad-tunnel")],
        );
        assert_ne!(code, 0, "CONNECT with a wrong password succeeded: {err}");
        assert!(
            err.contains("407"),
            "expected curl to report the 407: {err}"
        );
        assert!(o.requests_to("/curl-bad-tunnel").is_empty());
    }
}

/// The origin misbehaves or goes away mid-exchange: 502 while nothing was sent, a truncated body is ended by
/// closing the client connection, and an origin that closes after a complete response is simply replaced.
fn scenario_origin_failures(proxy: SocketAddr) {
    let o = Origin::start();
    expect_error(
        proxy,
        &get(&o, "/bad-response", ""),
        502,
        "unparsable response",
    );
    expect_error(
        proxy,
        &get(&o, "/hangup", ""),
        502,
        "origin closed without a response",
    );

    let mut c = HttpConn::connect(proxy);
    c.send(&get(&o, "/truncated", ""));
    let head = c.w.read_head().unwrap().expect("response head");
    assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", text(&head));
    let (rest, closed) = c.w.read_until_eof();
    assert_eq!(rest, b"only-this", "truncated body");
    assert!(
        closed,
        "client connection not closed after a truncated body"
    );

    let mut c = HttpConn::connect(proxy);
    c.send(&get(&o, "/server-close", ""));
    let r = c.read_response(false);
    assert_eq!(r.body, b"server-close\n");
    let first = o.request_to("/server-close").conn;
    c.send(&get(&o, "/after-server-close", "Connection: close\r\n"));
    let r = c.read_response(false);
    assert_eq!(r.status, 200, "{}", r.head_text());
    assert_eq!(r.body, b"path=/after-server-close\n");
    assert_ne!(o.request_to("/after-server-close").conn, first);
    assert!(c.is_closed());
}

/// A CONNECT after forwarded requests on the same client connection becomes a clean tunnel.
fn scenario_forward_then_connect(proxy: SocketAddr) {
    let o = Origin::start();
    let echo = TestServer::echo();
    let mut c = HttpConn::connect(proxy);
    c.send(&get(&o, "/before-connect", ""));
    assert_eq!(c.read_response(false).body, b"path=/before-connect\n");
    c.send(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\ntunnel", echo.addr).as_bytes());
    assert_eq!(
        text(&c.w.read_exact(CONNECT_OK.len()).unwrap()),
        text(CONNECT_OK)
    );
    assert_eq!(c.w.read_exact(6).unwrap(), b"tunnel");
    c.w.s.shutdown(std::net::Shutdown::Write).unwrap();
    let (rest, closed) = c.w.read_until_eof();
    assert!(rest.is_empty() && closed);
}

/// TRACE and OPTIONS have their Max-Forwards decremented (RFC 9110 §7.6.2); other methods do not.
fn scenario_max_forwards(proxy: SocketAddr) {
    let o = Origin::start();
    let mut c = HttpConn::connect(proxy);
    for (method, path, sent, want) in [
        ("OPTIONS", "/mf-options", "5", "4"),
        ("TRACE", "/mf-trace", "1", "0"),
        ("GET", "/mf-get", "5", "5"),
    ] {
        c.send(
            format!(
                "{method} {} HTTP/1.1\r\nHost: x\r\nMax-Forwards: {sent}\r\n\r\n",
                o.url(path)
            )
            .as_bytes(),
        );
        assert_eq!(c.read_response(false).status, 200);
        assert_eq!(
            o.request_to(path).header("max-forwards"),
            Some(want),
            "{method}"
        );
    }
}

/// Uploads `size` bytes to `path` with Content-Length (head and body written as one stream, like curl without
/// Expect) while reading; returns the first response.
fn upload_and_read(proxy: SocketAddr, o: &Origin, path: &str, size: usize) -> Response {
    let mut c = HttpConn::connect(proxy);
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n",
        o.url(path)
    )
    .into_bytes();
    req.resize(req.len() + size, b'u');
    let mut w = c.w.s.try_clone().unwrap();
    // The write may fail once the proxy gives up on the body: that is fine, the response is what matters.
    std::thread::spawn(move || {
        let _ = w.write_all(&req);
    });
    c.read_response(false)
}

/// The origin answers an upload before reading its body and keeps the connection: the answer reaches the client.
fn scenario_early_response(proxy: SocketAddr) {
    let o = Origin::start();
    let r = upload_and_read(proxy, &o, "/reject-upload?hold", 16 << 20);
    assert_eq!(r.status, 413, "{}", r.head_text());
    assert_eq!(r.body, b"too large");
}

// ---------------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn get_multi_mb_file_digest_and_reuse_after() {
    let p = Proxy::start(&[]);
    scenario_big_download(p.addr());
}

#[test]
fn chunked_response_relayed_byte_exact() {
    let p = Proxy::start(&[]);
    scenario_chunked_response(p.addr());
}

#[test]
fn post_and_put_bodies_content_length_and_chunked() {
    let p = Proxy::start(&[]);
    scenario_upload_bodies(p.addr());
}

#[test]
fn expect_100_continue_and_interim_responses() {
    let p = Proxy::start(&[]);
    scenario_expect_continue(p.addr());
}

#[test]
fn keep_alive_reuses_one_origin_connection() {
    let p = Proxy::start(&[]);
    scenario_keep_alive_reuse(p.addr());
}

#[test]
fn two_origins_on_one_client_connection() {
    let p = Proxy::start(&[]);
    scenario_two_origins(p.addr());
}

#[test]
fn pipelined_requests_answered_in_order() {
    let p = Proxy::start(&[]);
    scenario_pipelined(p.addr());
}

#[test]
fn head_204_304_leave_no_stray_bytes() {
    let p = Proxy::start(&[]);
    scenario_bodyless_framing(p.addr());
}

#[test]
fn close_delimited_response_then_close() {
    let p = Proxy::start(&[]);
    scenario_close_delimited(p.addr());
}

#[test]
fn split_and_large_heads_relayed() {
    let p = Proxy::start(&[]);
    scenario_awkward_response_heads(p.addr());
}

#[test]
fn origin_receives_rewritten_head_with_via() {
    let p = Proxy::start(&[]);
    scenario_forwarded_head(p.addr(), Some("socksgate"));
}

#[test]
fn no_via_and_custom_via() {
    let p = Proxy::start(&["--no-via"]);
    scenario_forwarded_head(p.addr(), None);
    let p = Proxy::start(&["--via", "gw-7"]);
    scenario_forwarded_head(p.addr(), Some("gw-7"));
}

#[test]
fn resolve_flag_names_reach_origin() {
    let p = Proxy::start(&["--resolve", "origin.test=127.0.0.1"]);
    scenario_named_origin(p.addr());
}

#[test]
fn http10_client_without_keep_alive_is_closed() {
    let p = Proxy::start(&[]);
    scenario_http10_close(p.addr());
}

#[test]
fn connect_tunnel_exact_reply_and_early_bytes() {
    let p = Proxy::start(&[]);
    scenario_connect(p.addr());
}

#[test]
fn ipv6_connect_and_forward() {
    let p = Proxy::start(&[]);
    scenario_ipv6(p.addr());
}

#[test]
fn origin_failures_mid_exchange() {
    let p = Proxy::start(&[]);
    scenario_origin_failures(p.addr());
}

#[test]
fn connect_after_forwarded_requests() {
    let p = Proxy::start(&[]);
    scenario_forward_then_connect(p.addr());
}

#[test]
fn max_forwards_decremented() {
    let p = Proxy::start(&[]);
    scenario_max_forwards(p.addr());
}

/// A client that resets its connection while the origin has not answered yet: the proxy must notice and close
/// the origin connection (and both descriptors) instead of holding them until the idle timeout (300 s).
#[test]
fn client_reset_while_origin_is_silent_releases_both_sides() {
    let o = Origin::start();
    let p = Proxy::start(&[]);
    let baseline = p.fd_baseline();
    let mut c = HttpConn::connect(p.addr());
    c.send(&get(&o, "/hang", ""));
    let rec = o
        .wait_request("/hang", IO_TIMEOUT)
        .expect("request never reached the origin");
    // SO_LINGER 0: close with a reset, so the client is unambiguously gone (not a half-close).
    socket2::SockRef::from(&c.w.s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    assert!(
        o.wait_ended(rec.conn, Duration::from_secs(5)),
        "5 s after the client reset, the proxy still holds the origin connection (proxy fds {} vs {})",
        p.fd_count(),
        baseline.count
    );
    baseline.assert_back(Duration::from_secs(5), "after the client reset");
}

#[test]
fn early_response_to_an_upload_is_relayed() {
    let p = Proxy::start(&[]);
    scenario_early_response(p.addr());
}

/// The origin answers an upload with 413 and closes at once, leaving the body unread (so its kernel resets the
/// connection). The 413 was sent before the reset and is readable from the proxy's socket; the client must get it.
#[test]
fn early_response_then_origin_reset_still_reaches_client() {
    let o = Origin::start();
    let p = Proxy::start(&[]);
    let r = upload_and_read(p.addr(), &o, "/reject-upload", 16 << 20);
    assert_eq!(r.status, 413, "{}", r.head_text());
    assert_eq!(r.body, b"too large");
}

#[test]
fn errors_answer_and_close() {
    let p = Proxy::start(&["--max-header-size", "4096"]);
    scenario_errors(p.addr(), 4096);
}

#[test]
fn deny_dest_loopback_is_403() {
    let o = Origin::start();
    let p = Proxy::start(&["--deny-dest", "127.0.0.0/8"]);
    scenario_denied(p.addr(), o.addr);
    assert_eq!(o.connections(), 0, "a denied destination was connected to");
}

#[test]
fn connect_timeout_is_504() {
    let p = Proxy::start(&["--connect-timeout", "500ms"]);
    scenario_connect_timeout(p.addr());
}

#[test]
fn proxy_auth_required_for_forward_and_connect() {
    let p = Proxy::start(&["-U", "user:pass"]);
    scenario_auth(p.addr());
}

#[test]
fn no_http_closes_without_response() {
    let o = Origin::start();
    let p = Proxy::start(&["--no-http"]);
    let mut c = HttpConn::connect(p.addr());
    c.send(&get(&o, "/refused", ""));
    assert!(c.is_closed(), "--no-http: connection not closed");
    let mut c = HttpConn::connect(p.addr());
    c.send(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", o.addr).as_bytes());
    assert!(c.is_closed(), "--no-http: CONNECT connection not closed");
    assert_eq!(o.connections(), 0);
    if curl_available() {
        let (code, _, _) = curl_via(p.addr(), &[&o.url("/refused-curl")]);
        assert_ne!(code, 0, "curl got an answer from a --no-http proxy");
    }
}

#[test]
fn curl_is_available_or_skipped() {
    // Makes a missing curl visible in the test output instead of silently weakening the suite.
    if !curl_available() {
        return;
    }
    let (code, out, _) = common::curl(&["--version"]);
    assert_eq!(code, 0);
    assert!(text(&out).starts_with("curl "));
}

/// Everything above against one proxy process; afterwards its descriptor count is back where it started.
#[test]
fn fd_count_back_to_baseline_after_everything() {
    let refused_and_denied = ClosedPort::new();
    let deny = format!("127.0.0.1/32:{}", refused_and_denied.addr.port());
    let p = Proxy::start(&[
        "--resolve",
        "origin.test=127.0.0.1",
        "--deny-dest",
        &deny,
        "--connect-timeout",
        "700ms",
    ]);
    let baseline = p.fd_baseline();
    assert!(baseline.count > 0);
    let a = p.addr();
    scenario_big_download(a);
    scenario_chunked_response(a);
    scenario_upload_bodies(a);
    scenario_expect_continue(a);
    scenario_keep_alive_reuse(a);
    scenario_two_origins(a);
    scenario_pipelined(a);
    scenario_bodyless_framing(a);
    scenario_close_delimited(a);
    scenario_awkward_response_heads(a);
    scenario_forwarded_head(a, Some("socksgate"));
    scenario_named_origin(a);
    scenario_http10_close(a);
    scenario_connect(a);
    scenario_ipv6(a);
    scenario_errors(a, 64 * 1024);
    scenario_denied(a, refused_and_denied.addr);
    scenario_connect_timeout(a);
    scenario_origin_failures(a);
    scenario_forward_then_connect(a);
    scenario_max_forwards(a);
    scenario_early_response(a);
    // Connections left open by the client side, then dropped mid-exchange.
    {
        let o = Origin::start();
        let mut idle = HttpConn::connect(a);
        idle.send(&get(&o, "/left-open", ""));
        assert_eq!(idle.read_response(false).status, 200);
        let mut mid = HttpConn::connect(a);
        mid.send(&get(&o, "/big", ""));
        let _ = mid.w.read_exact(1000).unwrap();
        let mut half = HttpConn::connect(a);
        half.send(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHo");
    }
    baseline.assert_back(Duration::from_secs(15), "after every scenario");

    // The same with authentication.
    let p = Proxy::start(&["-U", "user:pass"]);
    let baseline = p.fd_baseline();
    scenario_auth(p.addr());
    baseline.assert_back(Duration::from_secs(15), "after every scenario (with users)");
}
