//! `http`: plain HTTP forwarding (absolute-form GET) over kept-alive connections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socksgate::proto::http::{self, BodyKind, ResponseContext};
use socksgate::proto::Parse;

use crate::client::proxy_authorization;
use crate::proxy::{ProxySpec, Scheme};
use crate::stats::{with_errors, with_latency, Histogram, Json, Run};
use crate::target::Kind;
use crate::{finish, Common, THREAD_STACK};

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
    let (r, cnt) = (run.clone(), counters.clone());
    let w = c.run_threads(
        &run,
        concurrency,
        "http",
        Some(THREAD_STACK),
        &|r| format!("{r:.0} req/s"),
        move |_| worker(&r, connect_to, request.as_bytes(), &cnt),
    );
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
        run.record(&mut hist, t0, outcome);
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
        let head = loop {
            match parse_response_head(&self.buf)? {
                Some(head) => break head,
                None => self.fill()?,
            }
        };
        if head.status != 200 {
            return Err(format!("HTTP response status {}", head.status).into());
        }
        let total = head.head_len + head.content_length;
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
    /// Length of the head, blank line included.
    pub(crate) head_len: usize,
    /// Body length (we require Content-Length; the origin always sends it).
    pub(crate) content_length: usize,
    /// Whether the server closes after this response.
    pub(crate) close: bool,
}

/// Parses a response head at the start of `buf` with the proxy's own parser; `Ok(None)` while incomplete.
pub(crate) fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, String> {
    let ctx = ResponseContext {
        request_is_head: false,
        client_keep_alive: true,
        client_minor_version: 1,
        via: None,
    };
    let r = match http::parse_response(buf, MAX_HEAD, &ctx, &mut Vec::new()) {
        Ok(Parse::Incomplete) => return Ok(None),
        Ok(Parse::Done(r, _)) => r,
        Err(e) => return Err(format!("bad response head: {e:?}")),
    };
    let content_length = match r.body {
        BodyKind::None => 0,
        BodyKind::Length(n) => usize::try_from(n).unwrap_or(usize::MAX),
        BodyKind::Chunked => return Err("chunked responses are not supported".into()),
        BodyKind::UntilClose => {
            return Err(format!("HTTP {} response without Content-Length", r.status))
        }
    };
    if content_length > MAX_BODY {
        return Err(format!(
            "response body of {content_length} bytes is too large"
        ));
    }
    Ok(Some(ResponseHead {
        status: r.status,
        head_len: r.head_len,
        content_length,
        // keep_origin: whether the sender of this response keeps the connection (we are its client).
        close: !r.keep_origin,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads() {
        let head = |raw: &[u8]| parse_response_head(raw).unwrap().unwrap();
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n";
        assert_eq!(
            head(ok),
            ResponseHead {
                status: 200,
                head_len: ok.len(),
                content_length: 64,
                close: false
            }
        );
        assert_eq!(parse_response_head(&ok[..ok.len() - 1]).unwrap(), None);
        let r = head(b"HTTP/1.0 502 Bad\r\ncontent-length: 0\r\n\r\n");
        assert!(r.close);
        assert_eq!(r.status, 502);
        assert!(head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n").close);
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err()
        );
        assert!(parse_response_head(b"SSH-2.0\r\n\r\n").is_err());
    }
}
