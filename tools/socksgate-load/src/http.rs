//! `http`: plain HTTP forwarding (absolute-form GET) over kept-alive connections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{find, parse_status_code, proxy_authorization};
use crate::proxy::{ProxySpec, Scheme};
use crate::stats::{drive, with_errors, with_latency, Histogram, Json, Run};
use crate::target::Kind;
use crate::{finish, Common};

/// Bound on connect and on each request/response exchange.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response head we buffer.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body we accept (the built-in origin sends 64 bytes).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Run the mode; returns the exit code.
pub(crate) fn run(c: &Common, concurrency: usize) -> i32 {
    let (_target, ep) = match c.tcp_target(Kind::Http) {
        Ok(t) => t,
        Err(e) => return crate::fatal(&e),
    };
    let authority = ep.addr.to_string();
    // A proxy gets absolute-form (RFC 9112 §3.2.2); the origin itself gets origin-form.
    let request = if c.proxy.scheme == Scheme::Http {
        let auth = proxy_authorization(c.proxy.credentials()).unwrap_or_default();
        format!("GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n{auth}User-Agent: socksgate-load\r\n\r\n")
    } else {
        format!("GET / HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: socksgate-load\r\n\r\n")
    };
    let connect_to = c.proxy.addr.unwrap_or(ep.addr);
    let run = Arc::new(Run::new(0));
    let counters = Arc::new(Counters::default());
    let mut handles = Vec::new();
    for i in 0..concurrency {
        let (r, req, cnt) = (run.clone(), request.clone(), counters.clone());
        let h = std::thread::Builder::new()
            .name(format!("http-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || worker(&r, connect_to, req.as_bytes(), &cnt));
        match h {
            Ok(h) => handles.push(h),
            Err(e) => run.error(format!("spawn: {e}")),
        }
    }
    let w = drive(&run, c.warmup, c.seconds, c.quiet, &|r| {
        format!("{r:.0} req/s")
    });
    for h in handles {
        let _ = h.join();
    }
    let h = run.histogram();
    let reqs = run.measured();
    let j = Json::new()
        .str("mode", "http")
        .str("proxy", &c.proxy.to_string())
        .str("target", &c.target_name(&ep))
        .int("concurrency", concurrency as u64)
        .float("seconds", c.seconds, 1)
        .float("elapsed", w.elapsed, 3)
        .int("requests", reqs)
        .float("requests_per_sec", reqs as f64 / w.elapsed.max(1e-9), 1)
        .int("connections", counters.connections.load(Relaxed))
        .int("stale_retries", counters.stale_retries.load(Relaxed));
    let j = with_latency(
        with_errors(j, &run),
        &h,
        &[("p50_us", 50.0), ("p99_us", 99.0)],
    );
    let attempts = run.total() + run.errors_total();
    finish(j.finish(), attempts, run.errors_total(), reqs, &run)
}

/// Reject the proxy schemes this mode cannot use (it speaks HTTP to the proxy).
pub(crate) fn check_proxy(p: &ProxySpec) -> Result<(), String> {
    match p.scheme {
        Scheme::Direct | Scheme::Http => Ok(()),
        s => Err(format!(
            "http mode needs an http:// proxy or direct, not {}",
            s.name()
        )),
    }
}

/// One client connection: request after request, reconnecting when the server closes.
fn worker(run: &Run, addr: SocketAddr, request: &[u8], counters: &Counters) {
    let mut hist = Histogram::new();
    let mut conn: Option<HttpConn> = None;
    while run.running() {
        let t0 = Instant::now();
        let mut retried = false;
        // At most two attempts: the second only after a stale kept-alive connection.
        let outcome = loop {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match HttpConn::open(addr) {
                    Ok(c) => {
                        counters.connections.fetch_add(1, Relaxed);
                        conn.insert(c)
                    }
                    Err(e) => break Err(format!("connect: {e}")),
                },
            };
            match c.exchange(request) {
                Ok(keep) => {
                    if !keep {
                        conn = None;
                    }
                    break Ok(());
                }
                // A server may close an idle kept-alive connection at any time (some
                // proxies do so after every response without saying so); like any HTTP
                // client we retry the idempotent GET once on a fresh connection.
                Err(Failure::Stale) if !retried => {
                    retried = true;
                    conn = None;
                    counters.stale_retries.fetch_add(1, Relaxed);
                }
                Err(Failure::Stale) => {
                    conn = None;
                    break Err("connection closed before any response byte".into());
                }
                Err(Failure::Other(e)) => {
                    conn = None;
                    break Err(e);
                }
            }
        };
        match outcome {
            Ok(()) => {
                if run.complete(1) {
                    hist.record_duration(t0.elapsed());
                }
            }
            Err(e) => {
                if run.running() {
                    run.error(e);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    run.merge(&hist);
}

/// Connection counters shared by the workers.
#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    stale_retries: AtomicU64,
}

/// Why an exchange failed.
enum Failure {
    /// A reused connection was closed before any response byte: retry on a new one.
    Stale,
    /// Anything else.
    Other(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Other(s)
    }
}

/// A kept-alive HTTP/1.1 client connection with its read buffer.
struct HttpConn {
    s: TcpStream,
    buf: Vec<u8>,
    /// Responses completed on this connection (0 means a stale close cannot happen).
    served: u64,
}

impl HttpConn {
    /// Connect with the usual bounded timeouts and no Nagle delay.
    fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        Ok(HttpConn {
            s,
            buf: Vec::with_capacity(4096),
            served: 0,
        })
    }

    /// Send one request and read its whole response; Ok(false) if the server will close.
    fn exchange(&mut self, request: &[u8]) -> Result<bool, Failure> {
        if !self.buf.is_empty() {
            return Err("unsolicited bytes before the request".to_string().into());
        }
        if let Err(e) = self.s.write_all(request) {
            if self.served > 0 && is_reset(&e) {
                return Err(Failure::Stale);
            }
            return Err(format!("send: {e}").into());
        }
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p;
            }
            if self.buf.len() > MAX_HEAD {
                return Err("response head too large".to_string().into());
            }
            self.fill()?;
        };
        let status_line = String::from_utf8_lossy(&self.buf[..head_end]);
        let status_line = status_line.lines().next().unwrap_or("");
        if parse_status_code(status_line) != Some(200) {
            return Err(format!("HTTP response {status_line:?}").into());
        }
        let head = parse_response_head(&self.buf[..head_end])?;
        let total = head_end + 4 + head.content_length;
        while self.buf.len() < total {
            self.fill()?;
        }
        self.buf.drain(..total);
        self.served += 1;
        Ok(!head.close)
    }

    /// Read more bytes into the buffer; EOF is an error mid-response.
    fn fill(&mut self) -> Result<(), Failure> {
        let mut tmp = [0u8; 16 * 1024];
        let stale_possible = self.served > 0 && self.buf.is_empty();
        loop {
            match self.s.read(&mut tmp) {
                Ok(0) if stale_possible => return Err(Failure::Stale),
                Ok(0) => return Err("connection closed mid-response".to_string().into()),
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if stale_possible && is_reset(&e) => return Err(Failure::Stale),
                Err(e) => return Err(format!("read: {e}").into()),
            }
        }
    }
}

/// Errors that mean the peer had already closed the connection.
fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}

/// What the client needs from a response head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ResponseHead {
    /// Status code.
    pub(crate) status: u16,
    /// Body length (we require Content-Length; the origin always sends it).
    pub(crate) content_length: usize,
    /// Whether the server closes after this response.
    pub(crate) close: bool,
}

/// Parse a response head (without the final CRLFCRLF).
pub(crate) fn parse_response_head(head: &[u8]) -> Result<ResponseHead, String> {
    let text = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status =
        parse_status_code(status_line).ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut close = status_line.starts_with("HTTP/1.0");
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked responses are not supported".into());
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
    }
    let content_length = match (content_length, status) {
        (Some(n), _) => n,
        (None, 204 | 304) => 0,
        (None, _) => return Err(format!("HTTP {status} response without Content-Length")),
    };
    if content_length > MAX_BODY {
        return Err(format!(
            "response body of {content_length} bytes is too large"
        ));
    }
    Ok(ResponseHead {
        status,
        content_length,
        close,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads() {
        assert_eq!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 64").unwrap(),
            ResponseHead {
                status: 200,
                content_length: 64,
                close: false
            }
        );
        let r = parse_response_head(b"HTTP/1.0 502 Bad\r\ncontent-length: 0").unwrap();
        assert!(r.close);
        assert_eq!(r.status, 502);
        let r = parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1");
        assert!(r.unwrap().close);
        assert!(parse_response_head(b"HTTP/1.1 200 OK").is_err());
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked").is_err());
        assert!(parse_response_head(b"SSH-2.0").is_err());
    }
}
