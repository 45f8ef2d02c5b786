//! A recording HTTP/1.1 origin server and a byte-exact HTTP/1.1 client, for the HTTP proxy tests.
//!
//! The origin ([`Origin`]) runs one thread per connection, keeps connections alive like a real HTTP/1.1 server,
//! and records every request it receives ([`Recorded`]: method, target, headers, decoded body and the id of the TCP
//! connection it came on), so tests can assert exactly what the proxy forwarded and whether it reused a
//! connection. The client side ([`HttpConn`]) reads responses with its own framing rules and keeps whatever
//! follows a response, so a test can check that no body byte leaked into the next response.
//!
//! Neither side shares code with the proxy's parser: they are an independent oracle.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::{pseudo_random, TestServer, IO_TIMEOUT};

/// Size of `GET /big` when the path gives none.
pub const BIG_DEFAULT: usize = 8 << 20;

/// Body of `GET /big/N` (and the length announced for `HEAD /big/N`): N pseudo-random bytes, cached.
pub fn big_body(n: usize) -> Arc<Vec<u8>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Vec<u8>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = cache.lock().unwrap();
    Arc::clone(
        map.entry(n)
            .or_insert_with(|| Arc::new(pseudo_random(0xB16 + n as u64, n))),
    )
}

/// The decoded body of `GET /chunked`.
pub fn chunked_body() -> Vec<u8> {
    pseudo_random(0xC4, CHUNK_SIZES.iter().sum())
}

const CHUNK_SIZES: [usize; 7] = [1, 15, 16, 4096, 65_536, 100_000, 7];

/// The exact bytes of the `GET /chunked` body as sent on the wire: uneven chunk sizes, upper- and lower-case
/// hex, a chunk extension, and a trailer field.
pub fn chunked_wire() -> Vec<u8> {
    let body = chunked_body();
    let mut out = Vec::new();
    let mut pos = 0;
    for (i, n) in CHUNK_SIZES.iter().enumerate() {
        let size = if i % 2 == 0 {
            format!("{n:x}")
        } else {
            format!("{n:X}")
        };
        out.extend_from_slice(size.as_bytes());
        if i == 2 {
            out.extend_from_slice(b";name=value");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body[pos..pos + n]);
        out.extend_from_slice(b"\r\n");
        pos += n;
    }
    out.extend_from_slice(b"0\r\nX-Trailer: done\r\n\r\n");
    out
}

/// The body of `GET /close` (sent HTTP/1.0-style: no length, ended by closing the connection).
pub fn close_body() -> Vec<u8> {
    pseudo_random(0xC105E, 300_000)
}

/// One request as the origin received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Which accepted TCP connection it came on (0, 1, 2, ... in accept order).
    pub conn: u64,
    /// Its position on that connection (0 = first request).
    pub seq: usize,
    pub method: String,
    pub target: String,
    pub version: String,
    /// Header fields in order, names as received.
    pub headers: Vec<(String, String)>,
    /// The head exactly as received, including the final CRLF CRLF.
    pub raw_head: Vec<u8>,
    /// The body, decoded when chunked.
    pub body: Vec<u8>,
    /// The body came with chunked framing.
    pub chunked: bool,
    /// The origin answered `Expect: 100-continue` with a 100 before reading the body.
    pub sent_continue: bool,
}

impl Recorded {
    /// Every value of a header field (case-insensitive name).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The single value of a header field; panics if it appears more than once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let all = self.header_all(name);
        assert!(
            all.len() <= 1,
            "{name} appears {} times: {self:?}",
            all.len()
        );
        all.first().copied()
    }

    /// The request line, e.g. "GET /x HTTP/1.1".
    pub fn request_line(&self) -> String {
        format!("{} {} {}", self.method, self.target, self.version)
    }
}

struct Shared {
    requests: Mutex<Vec<Recorded>>,
    next_conn: AtomicU64,
    /// Connections whose handler has finished (the peer closed, or the origin did).
    ended: Mutex<Vec<u64>>,
}

/// A recording HTTP/1.1 origin server on a loopback port; stops accepting on drop.
///
/// Routes (any method unless noted):
/// - `GET|HEAD /big[/N]`: N (default [`BIG_DEFAULT`]) bytes of [`big_body`] with Content-Length.
/// - `GET /chunked`: [`chunked_wire`] with Transfer-Encoding: chunked.
/// - `POST|PUT /echo`: the request body back, with Content-Length.
/// - `/204`, `/304` (with a Content-Length that describes no body), `/hop` (hop-by-hop response fields),
///   `/interim` (a 103 before the 200), `/big-header` (a 40 KB response head).
/// - `/close`: HTTP/1.0 response, [`close_body`] ended by closing the connection.
/// - `/slow-headers`: the response head written a few bytes at a time.
/// - `/hang`: no response; the connection is held until the proxy closes it.
/// - `/server-close`: a complete response with `Connection: close`, then close.
/// - `/bad-response`: an unparsable status line. `/hangup`: close without a response.
/// - `/truncated`: Content-Length 1000 but only 9 body bytes, then close.
/// - `/reject-upload`: a 413 sent right after the head, before the body is read; then close at once (a reset,
///   since the body is unread), or with `?hold` keep the connection open with the body unread for 5 s.
/// - anything else: 200 with body `path=TARGET\n`.
///
/// Every response carries `X-Origin-Port`. A request with `Expect: 100-continue` and a body gets an interim
/// `HTTP/1.1 100 Continue` before the origin reads the body.
pub struct Origin {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _server: TestServer,
}

impl Origin {
    /// An origin on 127.0.0.1:0.
    pub fn start() -> Origin {
        Origin::start_on("127.0.0.1:0")
    }

    /// An origin on the given address (e.g. "[::1]:0").
    pub fn start_on(bind: &str) -> Origin {
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(0),
            ended: Mutex::new(Vec::new()),
        });
        let s2 = Arc::clone(&shared);
        let server = TestServer::start_on(bind, move |s| serve(s, &s2));
        Origin {
            addr: server.addr,
            shared,
            _server: server,
        }
    }

    /// `host:port` as it appears in a URL (IPv6 in brackets).
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    /// `http://host:port` + path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The requests whose target is exactly `target`.
    pub fn requests_to(&self, target: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.target == target)
            .collect()
    }

    /// The one request to `target`; panics if there is not exactly one.
    pub fn request_to(&self, target: &str) -> Recorded {
        let mut r = self.requests_to(target);
        assert_eq!(
            r.len(),
            1,
            "expected exactly one request to {target}, origin saw {:?}",
            self.requests()
                .iter()
                .map(|r| r.request_line())
                .collect::<Vec<_>>()
        );
        r.remove(0)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.next_conn.load(Ordering::SeqCst)
    }

    /// Waits (up to `limit`) until a request to `target` has been received; returns it.
    pub fn wait_request(&self, target: &str, limit: Duration) -> Option<Recorded> {
        let mut found = None;
        super::wait_until(limit, &mut || {
            found = self.requests_to(target).pop();
            found.is_some()
        });
        found
    }

    /// Waits (up to `limit`) until connection `conn` has ended (the proxy closed it, or the origin did).
    pub fn wait_ended(&self, conn: u64, limit: Duration) -> bool {
        super::wait_until(limit, &mut || {
            self.shared.ended.lock().unwrap().contains(&conn)
        })
    }
}

/// Buffered reading of a TCP stream by HTTP/1 syntax units; bytes read past a unit stay in `buf`.
pub struct Wire {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    pub fn new(s: TcpStream) -> Wire {
        Wire { s, buf: Vec::new() }
    }

    /// Reads more into the buffer; Ok(false) at EOF.
    fn fill(&mut self) -> io::Result<bool> {
        let mut tmp = [0u8; 64 * 1024];
        let n = self.s.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n > 0)
    }

    /// A head up to and including CRLF CRLF. Ok(None) on EOF before its first byte.
    pub fn read_head(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                return Ok(Some(self.buf.drain(..i + 4).collect()));
            }
            if !self.fill()? {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "EOF inside a head: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
        }
    }

    /// Exactly `n` bytes.
    pub fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {} of {n} bytes", self.buf.len()),
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// One line including its CRLF.
    pub fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                return Ok(self.buf.drain(..i + 2).collect());
            }
            if !self.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "EOF inside a line",
                ));
            }
        }
    }

    /// Everything until EOF (buffered bytes first). Stops at the socket timeout too, with what it has.
    pub fn read_to_end(&mut self) -> Vec<u8> {
        self.read_until_eof().0
    }

    /// Everything until EOF, and whether the peer really closed (EOF or reset) rather than the read timing out.
    pub fn read_until_eof(&mut self) -> (Vec<u8>, bool) {
        let closed = loop {
            match self.fill() {
                Ok(true) => {}
                Ok(false) => break true,
                Err(e) => {
                    break !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    )
                }
            }
        };
        (std::mem::take(&mut self.buf), closed)
    }

    /// A chunked body: (wire bytes, decoded bytes).
    pub fn read_chunked(&mut self) -> io::Result<(Vec<u8>, Vec<u8>)> {
        let mut wire = Vec::new();
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            wire.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
            let hex = text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(hex, 16).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("chunk size {text:?}"))
            })?;
            if size == 0 {
                loop {
                    let t = self.read_line()?;
                    wire.extend_from_slice(&t);
                    if t == b"\r\n" {
                        return Ok((wire, body));
                    }
                }
            }
            let data = self.read_exact(size + 2)?;
            if &data[size..] != b"\r\n" {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "chunk data not followed by CRLF",
                ));
            }
            wire.extend_from_slice(&data);
            body.extend_from_slice(&data[..size]);
        }
    }

    /// Bytes received but not yet consumed.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A parsed head: start line and fields.
#[derive(Debug, Clone)]
pub struct Head {
    pub start: String,
    pub headers: Vec<(String, String)>,
}

/// Splits a head into its start line and fields (panics on syntax the tests never send).
pub fn parse_head(raw: &[u8]) -> Head {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split("\r\n");
    let start = lines.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    for l in lines.filter(|l| !l.is_empty()) {
        let (n, v) = l
            .split_once(':')
            .unwrap_or_else(|| panic!("bad header line {l:?} in {text:?}"));
        headers.push((n.to_string(), v.trim().to_string()));
    }
    Head { start, headers }
}

fn field<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Serves one connection until the client closes or a response ends it.
fn serve(s: TcpStream, shared: &Shared) {
    let conn = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    serve_conn(s, shared, conn);
    shared.ended.lock().unwrap().push(conn);
}

fn serve_conn(s: TcpStream, shared: &Shared, conn: u64) {
    let _ = s.set_nodelay(true);
    let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut w = Wire::new(s);
    for seq in 0.. {
        let raw_head = match w.read_head() {
            Ok(Some(h)) => h,
            _ => return,
        };
        let head = parse_head(&raw_head);
        let mut parts = head.start.splitn(3, ' ');
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let version = parts.next().unwrap_or("").to_string();
        let chunked = has_token(&head.headers, "transfer-encoding", "chunked");
        let length: usize = field(&head.headers, "content-length")
            .map(|v| v.parse().expect("origin: bad Content-Length"))
            .unwrap_or(0);
        let has_body = chunked || length > 0;
        let expect = field(&head.headers, "expect")
            .map(|v| v.eq_ignore_ascii_case("100-continue"))
            .unwrap_or(false);
        if target.starts_with("/reject-upload") {
            // Answer before reading the body. "?hold": leave the body unread and keep the connection open for a
            // while; otherwise close at once with the body unread (the kernel then resets the connection).
            let out = format!(
                "HTTP/1.1 413 Content Too Large\r\nX-Origin-Port: {port}\r\nConnection: close\r\nContent-Length: 9\r\n\r\ntoo large"
            );
            let _ = w.s.write_all(out.as_bytes());
            shared.requests.lock().unwrap().push(Recorded {
                conn,
                seq,
                method,
                target: target.clone(),
                version,
                headers: head.headers.clone(),
                raw_head,
                body: Vec::new(),
                chunked,
                sent_continue: false,
            });
            if target.ends_with("?hold") {
                // Not synchronization: just keeps the socket open (unread) while the test runs.
                std::thread::sleep(Duration::from_secs(5));
            }
            return;
        }
        let sent_continue = expect && has_body && version == "HTTP/1.1";
        if sent_continue && w.s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return;
        }
        let body = if chunked {
            match w.read_chunked() {
                Ok((_, b)) => b,
                Err(_) => return,
            }
        } else {
            match w.read_exact(length) {
                Ok(b) => b,
                Err(_) => return,
            }
        };
        let close_requested = has_token(&head.headers, "connection", "close")
            || (version == "HTTP/1.0" && !has_token(&head.headers, "connection", "keep-alive"));
        shared.requests.lock().unwrap().push(Recorded {
            conn,
            seq,
            method: method.clone(),
            target: target.clone(),
            version,
            headers: head.headers.clone(),
            raw_head,
            body: body.clone(),
            chunked,
            sent_continue,
        });
        let keep = respond(&mut w.s, port, &method, &target, &body, close_requested);
        if !keep.unwrap_or(false) {
            let _ = w.s.shutdown(Shutdown::Write);
            // Drain until the peer closes, so our close never turns into a reset that eats the response.
            let _ = w.s.set_read_timeout(Some(IO_TIMEOUT));
            let _ = w.read_to_end();
            return;
        }
    }
}

/// Writes the response for one request; Ok(true) when the connection stays open.
fn respond(
    s: &mut TcpStream,
    port: u16,
    method: &str,
    target: &str,
    body: &[u8],
    close: bool,
) -> io::Result<bool> {
    let conn_field = if close { "Connection: close\r\n" } else { "" };
    let common = format!("X-Origin-Port: {port}\r\n{conn_field}");
    let head_only = method == "HEAD";
    let path = target.split('?').next().unwrap_or(target);
    let simple = |s: &mut TcpStream, status: &str, extra: &str, body: &[u8]| -> io::Result<()> {
        let head = format!(
            "HTTP/1.1 {status}\r\n{common}{extra}Content-Length: {}\r\n\r\n",
            body.len()
        );
        let mut out = head.into_bytes();
        if !head_only {
            out.extend_from_slice(body);
        }
        s.write_all(&out)
    };
    match path {
        p if p == "/big" || p.starts_with("/big/") => {
            let n = p
                .strip_prefix("/big/")
                .map(|n| n.parse().expect("/big/N"))
                .unwrap_or(BIG_DEFAULT);
            let data = big_body(n);
            simple(
                s,
                "200 OK",
                "Content-Type: application/octet-stream\r\n",
                &data,
            )?;
        }
        "/chunked" => {
            let mut out = format!(
                "HTTP/1.1 200 OK\r\n{common}Content-Type: application/octet-stream\r\n\
                 Transfer-Encoding: chunked\r\n\r\n"
            )
            .into_bytes();
            if !head_only {
                out.extend_from_slice(&chunked_wire());
            }
            s.write_all(&out)?;
        }
        "/echo" => simple(s, "200 OK", &format!("X-Method: {method}\r\n"), body)?,
        "/204" => s.write_all(format!("HTTP/1.1 204 No Content\r\n{common}\r\n").as_bytes())?,
        "/304" => s.write_all(
            format!(
                "HTTP/1.1 304 Not Modified\r\n{common}ETag: \"v1\"\r\nContent-Length: 5000\r\n\r\n"
            )
            .as_bytes(),
        )?,
        "/hop" => simple(
            s,
            "200 OK",
            "Connection: X-Hop-Secret\r\nX-Hop-Secret: 1\r\nKeep-Alive: timeout=5\r\n\
             Proxy-Connection: keep-alive\r\nX-End-To-End: kept\r\n",
            b"hop\n",
        )?,
        "/interim" => {
            s.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")?;
            simple(s, "200 OK", "", b"after interim\n")?;
        }
        "/big-header" => {
            let value = "v".repeat(40 * 1024);
            simple(s, "200 OK", &format!("X-Big: {value}\r\n"), b"big header\n")?;
        }
        "/close" => {
            let mut out = format!("HTTP/1.0 200 OK\r\nX-Origin-Port: {port}\r\n\r\n").into_bytes();
            if !head_only {
                out.extend_from_slice(&close_body());
            }
            s.write_all(&out)?;
            return Ok(false);
        }
        "/hang" => {
            // Never answer; hold the connection until the proxy closes it.
            let mut sink = [0u8; 4096];
            while let Ok(n) = s.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
            return Ok(false);
        }
        "/server-close" => {
            // Closes after the response although the client asked to keep the connection.
            let out = format!(
                "HTTP/1.1 200 OK\r\nX-Origin-Port: {port}\r\nConnection: close\r\nContent-Length: 13\r\n\r\nserver-close\n"
            );
            s.write_all(out.as_bytes())?;
            return Ok(false);
        }
        "/bad-response" => {
            s.write_all(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok")?;
            return Ok(false);
        }
        "/hangup" => return Ok(false),
        "/truncated" => {
            let out = format!(
                "HTTP/1.1 200 OK\r\nX-Origin-Port: {port}\r\nContent-Length: 1000\r\n\r\nonly-this"
            );
            s.write_all(out.as_bytes())?;
            return Ok(false);
        }
        "/slow-headers" => {
            let head =
                format!("HTTP/1.1 200 OK\r\n{common}X-Slow: yes\r\nContent-Length: 5\r\n\r\n");
            for piece in head.as_bytes().chunks(7) {
                s.write_all(piece)?;
                s.flush()?;
                std::thread::sleep(Duration::from_millis(2));
            }
            if !head_only {
                s.write_all(b"slow\n")?;
            }
        }
        _ => simple(
            s,
            "200 OK",
            "Content-Type: text/plain\r\n",
            format!("path={target}\n").as_bytes(),
        )?,
    }
    Ok(!close)
}

/// A response as the client received it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// The status line without CRLF.
    pub status_line: String,
    pub headers: Vec<(String, String)>,
    /// The head exactly as received.
    pub raw_head: Vec<u8>,
    /// The body as received (chunked framing included).
    pub raw_body: Vec<u8>,
    /// The body, decoded when chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// Every value of a header field.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The single value of a header field; panics if it appears more than once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let all = self.header_all(name);
        assert!(all.len() <= 1, "{name} appears {} times", all.len());
        all.first().copied()
    }

    /// The response asks to close the connection.
    pub fn connection_close(&self) -> bool {
        has_token(&self.headers, "connection", "close")
    }

    /// Head as text (for failure messages).
    pub fn head_text(&self) -> String {
        String::from_utf8_lossy(&self.raw_head).into_owned()
    }
}

/// A raw client connection to the proxy that reads responses by HTTP/1.1 framing rules.
pub struct HttpConn {
    pub w: Wire,
}

impl HttpConn {
    /// Connects (with the common timeouts) to the proxy.
    pub fn connect(addr: SocketAddr) -> HttpConn {
        HttpConn {
            w: Wire::new(super::connect(addr)),
        }
    }

    /// Writes bytes in one call.
    pub fn send(&mut self, bytes: &[u8]) {
        self.w.s.write_all(bytes).expect("write to proxy");
    }

    /// Reads one response (interim ones included; they have no body). `head_request`: the request was HEAD.
    pub fn read_response(&mut self, head_request: bool) -> Response {
        let raw_head = match self.w.read_head() {
            Ok(Some(h)) => h,
            Ok(None) => panic!("proxy closed the connection instead of sending a response"),
            Err(e) => panic!("reading a response head: {e}"),
        };
        let head = parse_head(&raw_head);
        let status: u16 = head
            .start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {:?}", head.start));
        let no_body =
            head_request || (100..200).contains(&status) || status == 204 || status == 304;
        let (raw_body, body) = if no_body {
            (Vec::new(), Vec::new())
        } else if has_token(&head.headers, "transfer-encoding", "chunked") {
            self.w.read_chunked().expect("reading a chunked body")
        } else if let Some(n) = field(&head.headers, "content-length") {
            let n: usize = n.parse().expect("Content-Length");
            let b = self.w.read_exact(n).expect("reading a Content-Length body");
            (b.clone(), b)
        } else {
            let b = self.w.read_to_end();
            (b.clone(), b)
        };
        Response {
            status,
            status_line: head.start,
            headers: head.headers,
            raw_head,
            raw_body,
            body,
        }
    }

    /// Reads interim responses until a final one: (interim responses, final response).
    pub fn read_final(&mut self, head_request: bool) -> (Vec<Response>, Response) {
        let mut interim = Vec::new();
        loop {
            let r = self.read_response(head_request);
            if (100..200).contains(&r.status) && r.status != 101 {
                interim.push(r);
            } else {
                return (interim, r);
            }
        }
    }

    /// True when the proxy closes the connection (EOF or reset, within the socket timeout) without sending
    /// anything more; panics if more bytes arrive.
    pub fn is_closed(&mut self) -> bool {
        let (rest, closed) = self.w.read_until_eof();
        assert!(
            rest.is_empty(),
            "unexpected bytes after the last response: {:?}",
            String::from_utf8_lossy(&rest[..rest.len().min(300)])
        );
        closed
    }
}

/// A port that is bound but not listening: connecting to it is refused, and no other socket can take it while
/// this value lives.
pub struct ClosedPort {
    _sock: socket2::Socket,
    pub addr: SocketAddr,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        use socket2::{Domain, Protocol, Socket, Type};
        let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        ClosedPort { _sock: sock, addr }
    }
}

/// A listener whose accept queue is full, so the kernel drops further SYNs and a connect to it hangs until the
/// connecting side gives up: a deterministic connect timeout on loopback (Linux).
pub struct Blackhole {
    _listener: socket2::Socket,
    _fillers: Vec<TcpStream>,
    pub addr: SocketAddr,
}

impl Blackhole {
    /// Returns None if the accept queue could not be shown to be full (then a timeout test cannot be trusted).
    pub fn new() -> Option<Blackhole> {
        use socket2::{Domain, Protocol, Socket, Type};
        let l = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).ok()?;
        l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).ok()?;
        l.listen(0).ok()?;
        let addr = l.local_addr().ok()?.as_socket()?;
        let mut fillers = Vec::new();
        // Fill the queue until a connect attempt hangs: that attempt proves SYNs are now being dropped.
        for _ in 0..8 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => fillers.push(s),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Some(Blackhole {
                        _listener: l,
                        _fillers: fillers,
                        addr,
                    })
                }
                Err(_) => return None,
            }
        }
        None
    }
}
