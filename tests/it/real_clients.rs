//! curl as a real SOCKS client: --socks5, --socks5-hostname, --socks4, --socks4a, with and without --proxy-user,
//! downloading and uploading ~3 MB through the proxy to a small local HTTP/1.1 server, and curl's view of
//! failures (exit code 97, CURLE_PROXY, with the reply code in its message).

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;

const BODY_LEN: usize = 3 * 1024 * 1024 + 517;

/// A tiny HTTP/1.1 origin: `GET /data` serves `body` with Content-Length; `POST /upload` reads a Content-Length
/// body (answering `Expect: 100-continue`) and replies `len=N digest=HEX`. One request per connection.
fn http_origin(body: Arc<Vec<u8>>) -> TestServer {
    TestServer::start(move |s| {
        let _ = serve_one(s, &body);
    })
}

fn serve_one(s: TcpStream, body: &[u8]) -> std::io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut content_length = 0usize;
    let mut expect_continue = false;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(());
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "content-length" {
                content_length = value.parse().unwrap_or(0);
            } else if name == "expect" && value.eq_ignore_ascii_case("100-continue") {
                expect_continue = true;
            }
        }
    }
    match (method.as_str(), path.as_str()) {
        ("GET", "/data") => {
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            w.write_all(body)?;
        }
        ("POST", "/upload") => {
            if expect_continue {
                w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
            let mut got = vec![0u8; content_length];
            r.read_exact(&mut got)?;
            let answer = format!("len={} digest={:016x}\n", got.len(), digest(&got));
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            )?;
        }
        _ => w.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?,
    }
    w.flush()
}

struct Fixture {
    origin: TestServer,
    body: Arc<Vec<u8>>,
    upload: Vec<u8>,
    upload_file: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let body = Arc::new(pseudo_random(2024, BODY_LEN));
    let origin = http_origin(Arc::clone(&body));
    let upload = pseudo_random(4096, BODY_LEN - 1000);
    let upload_file = temp_path("upload.bin");
    std::fs::write(&upload_file, &upload).unwrap();
    Fixture {
        origin,
        body,
        upload,
        upload_file,
    }
}

/// Downloads and uploads through the proxy with curl `proxy_flag` (e.g. `--socks5`), using `host` in the URL, and
/// checks both payloads; then checks the proxy's access log names `expected_target` (and `user`).
fn round_trip(
    fx: &Fixture,
    proxy: &Proxy,
    proxy_flag: &str,
    host: &str,
    user: Option<&str>,
    log_user: &str,
) {
    let paddr = proxy.addr().to_string();
    let port = fx.origin.addr.port();
    let mut base = vec![proxy_flag.to_string(), paddr];
    if let Some(u) = user {
        base.push("--proxy-user".into());
        base.push(u.into());
    }
    // Download.
    let url = format!("http://{host}:{port}/data");
    let mut args: Vec<&str> = base.iter().map(|s| s.as_str()).collect();
    args.push(&url);
    let (code, out, err) = curl_via(&args);
    assert_eq!(code, 0, "curl {proxy_flag} download failed: {err}");
    assert_eq!(out.len(), fx.body.len(), "{proxy_flag}: downloaded length");
    assert!(out == *fx.body, "{proxy_flag}: downloaded bytes differ");
    // Upload.
    let url = format!("http://{host}:{port}/upload");
    let data = format!("@{}", fx.upload_file.display());
    let mut args: Vec<&str> = base.iter().map(|s| s.as_str()).collect();
    args.extend_from_slice(&[
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        &data,
        &url,
    ]);
    let (code, out, err) = curl_via(&args);
    assert_eq!(code, 0, "curl {proxy_flag} upload failed: {err}");
    let expected = format!(
        "len={} digest={:016x}\n",
        fx.upload.len(),
        digest(&fx.upload)
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        expected,
        "{proxy_flag}: what the origin received"
    );
    // The access log shows how the target was named (a hostname form must reach the proxy unresolved).
    let needle = format!(
        "user={log_user} proto={} target={host}:{port}",
        proto_of(proxy_flag)
    );
    let found = wait_until(Duration::from_secs(10), &mut || {
        proxy.log().matches(&needle).count() >= 2
    });
    assert!(
        found,
        "access log lacks two lines with {needle:?}:\n{}",
        proxy.log()
    );
}

fn proto_of(flag: &str) -> &'static str {
    if flag.starts_with("--socks5") {
        "socks5"
    } else {
        "socks4"
    }
}

/// curl through an explicit proxy; `--noproxy ""` keeps a NO_PROXY variable in the environment from bypassing it.
fn curl_via(args: &[&str]) -> (i32, Vec<u8>, String) {
    let mut all = vec!["--noproxy", ""];
    all.extend_from_slice(args);
    curl(&all)
}

macro_rules! need_curl {
    () => {
        if !have_curl() {
            eprintln!("skipped: curl is not installed");
            return;
        }
    };
}

#[test]
fn curl_socks5_local_dns() {
    need_curl!();
    let fx = fixture();
    let proxy = Proxy::start(&[]);
    round_trip(&fx, &proxy, "--socks5", "127.0.0.1", None, "-");
}

#[test]
fn curl_socks5_hostname() {
    need_curl!();
    let fx = fixture();
    let proxy = Proxy::start(&[]);
    round_trip(&fx, &proxy, "--socks5-hostname", "localhost", None, "-");
}

#[test]
fn curl_socks4() {
    need_curl!();
    let fx = fixture();
    let proxy = Proxy::start(&[]);
    round_trip(&fx, &proxy, "--socks4", "127.0.0.1", None, "-");
}

#[test]
fn curl_socks4a() {
    need_curl!();
    let fx = fixture();
    let proxy = Proxy::start(&[]);
    round_trip(&fx, &proxy, "--socks4a", "localhost", None, "-");
}

#[test]
fn curl_socks5_with_proxy_user() {
    need_curl!();
    let fx = fixture();
    let proxy = Proxy::start(&["-U", "alice:s3cret:with:colons"]);
    round_trip(
        &fx,
        &proxy,
        "--socks5",
        "127.0.0.1",
        Some("alice:s3cret:with:colons"),
        "alice",
    );
    round_trip(
        &fx,
        &proxy,
        "--socks5-hostname",
        "localhost",
        Some("alice:s3cret:with:colons"),
        "alice",
    );
}

#[test]
fn curl_socks4_with_proxy_user() {
    // curl sends the --proxy-user name as the SOCKS4 USERID; SOCKS4 needs --socks4-with-users when users exist.
    need_curl!();
    let fx = fixture();
    let proxy = Proxy::start(&["-U", "alice:secret", "--socks4-with-users"]);
    round_trip(
        &fx,
        &proxy,
        "--socks4",
        "127.0.0.1",
        Some("alice:secret"),
        "-",
    );
    round_trip(
        &fx,
        &proxy,
        "--socks4a",
        "localhost",
        Some("alice:secret"),
        "-",
    );
}

#[test]
fn curl_sees_refusals_as_proxy_errors() {
    need_curl!();
    let proxy = Proxy::start(&[]);
    let paddr = proxy.addr().to_string();
    let closed = format!("http://127.0.0.1:{}/", closed_port());
    // SOCKS5 REP 05: curl exits 97 (CURLE_PROXY) and prints the code in parentheses.
    let (code, _, err) = curl_via(&["--socks5", &paddr, &closed]);
    assert_ne!(code, 0, "refused connect must fail");
    assert_eq!(code, 97, "curl exit code for a SOCKS5 failure reply: {err}");
    assert!(
        err.contains("(5)"),
        "curl message should carry REP 5: {err}"
    );
    // REP 04 for a name that does not resolve.
    let (code, _, err) = curl_via(&["--socks5-hostname", &paddr, "http://nx.invalid/"]);
    assert_eq!(code, 97, "{err}");
    assert!(
        err.contains("(4)"),
        "curl message should carry REP 4: {err}"
    );
    // SOCKS4: CD 91.
    let (code, _, err) = curl_via(&["--socks4", &paddr, &closed]);
    assert_eq!(code, 97, "{err}");
    assert!(err.contains("91"), "curl message should carry CD 91: {err}");
}

#[test]
fn curl_sees_auth_failures() {
    need_curl!();
    let fx = fixture();
    let proxy = Proxy::start(&["-U", "alice:secret"]);
    let paddr = proxy.addr().to_string();
    let url = format!("http://127.0.0.1:{}/data", fx.origin.addr.port());
    // Wrong password: RFC 1929 status 1.
    let (code, out, err) = curl_via(&["--socks5", &paddr, "--proxy-user", "alice:wrong", &url]);
    assert_eq!(code, 97, "{err}");
    assert!(out.is_empty());
    assert!(
        err.contains("rejected"),
        "curl should report the rejected user: {err}"
    );
    // No credentials offered although required: 05 FF.
    let (code, _, err) = curl_via(&["--socks5", &paddr, &url]);
    assert_eq!(code, 97, "{err}");
    assert!(err.contains("No authentication method"), "{err}");
    // SOCKS4 is refused when users are configured.
    let (code, _, err) = curl_via(&["--socks4", &paddr, &url]);
    assert_eq!(code, 97, "{err}");
    // The right password still works afterwards.
    let (code, out, err) = curl_via(&["--socks5", &paddr, "--proxy-user", "alice:secret", &url]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(digest(&out), digest(&fx.body));
}

/// Sanity check of the origin itself, without a proxy, so a broken fixture is not mistaken for a proxy bug.
#[test]
fn origin_fixture_works_directly() {
    let fx = fixture();
    let mut s = connect(fx.origin.addr);
    s.write_all(b"GET /data HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let all = read_to_end(&mut s);
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    assert!(all.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert_eq!(&all[split..], &fx.body[..]);
}
