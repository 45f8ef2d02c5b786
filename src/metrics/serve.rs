//! The `/metrics` HTTP endpoint: a tiny nonblocking HTTP/1.1 server on the control thread's poll, answering
//! `GET /metrics` (and `GET /`) with the Prometheus text rendering of every worker's [`Stats`](super::Stats).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::net;

/// A scrape connection that has not finished within this time is closed.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent scrapes; more are accepted and closed at once.
const MAX_SCRAPES: usize = 64;
/// Largest request head read from a scraper.
const MAX_REQUEST: usize = 16 * 1024;

struct Scrape {
    stream: TcpStream,
    request: Vec<u8>,
    response: Vec<u8>,
    written: usize,
    started: Instant,
}

/// The endpoint: its listener and the scrapes in progress. Scrape connections use tokens `0..MAX_SCRAPES`; the
/// listener uses the token given to [`Exporter::register`].
pub struct Exporter {
    listener: TcpListener,
    token: Token,
    scrapes: Slab<Scrape>,
    /// The last accept stopped for lack of descriptors with connections possibly still queued.
    backlog: bool,
}

impl Exporter {
    /// Binds the endpoint's listener.
    pub fn bind(addr: SocketAddr) -> io::Result<Exporter> {
        let l = TcpListener::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("--metrics {addr}: {e}")))?;
        Ok(Exporter::from_listener(l))
    }

    /// Serves on a listener obtained elsewhere (inherited in an upgrade); it must be nonblocking.
    pub fn from_listener(listener: TcpListener) -> Exporter {
        Exporter {
            listener,
            token: Token(usize::MAX),
            scrapes: Slab::new(),
            backlog: false,
        }
    }

    /// Registers the listener with `token`, which must lie outside `0..64`.
    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        self.token = token;
        registry.register(&mut self.listener, token, Interest::READABLE)
    }

    /// Removes the listener and every scrape from `registry` (before closing our copy of a listener that another
    /// process keeps open: epoll forgets a socket only when its last descriptor closes).
    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.listener);
        for (_, s) in self.scrapes.iter_mut() {
            let _ = registry.deregister(&mut s.stream);
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The listener, to hand to a new process.
    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }

    /// True when `token` is the listener's or a scrape's.
    pub fn owns(&self, token: Token) -> bool {
        token == self.token || token.0 < MAX_SCRAPES
    }

    /// Handles a readiness event for one of its tokens; `render` produces the exposition text when a scrape
    /// asks for it (the caller adds what lives outside the workers' [`Stats`](super::Stats), such as the resolver's).
    pub fn on_event(&mut self, registry: &Registry, token: Token, render: &dyn Fn() -> String) {
        if token == self.token {
            self.accept(registry);
        } else if self.serve(token.0, render) {
            if let Some(mut s) = self.scrapes.try_remove(token.0) {
                let _ = registry.deregister(&mut s.stream);
            }
        }
    }

    /// Periodic work (call every control-loop turn): retries accepts held back by descriptor exhaustion (the
    /// edge-triggered listener raises no new event for connections already queued) and closes stale scrapes.
    pub fn tick(&mut self, registry: &Registry, now: Instant) {
        if self.backlog {
            self.accept(registry);
        }
        let stale: Vec<usize> = self
            .scrapes
            .iter()
            .filter(|(_, s)| now.duration_since(s.started) > SCRAPE_TIMEOUT)
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            if let Some(mut s) = self.scrapes.try_remove(k) {
                let _ = registry.deregister(&mut s.stream);
            }
        }
    }

    fn accept(&mut self, registry: &Registry) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.scrapes.len() >= MAX_SCRAPES {
                        continue;
                    }
                    let entry = self.scrapes.vacant_entry();
                    if registry
                        .register(
                            &mut stream,
                            Token(entry.key()),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_ok()
                    {
                        entry.insert(Scrape {
                            stream,
                            request: Vec::new(),
                            response: Vec::new(),
                            written: 0,
                            started: Instant::now(),
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.backlog = false;
                    return;
                }
                Err(e) if net::is_resource_exhaustion(&e) => {
                    if !self.backlog {
                        log::warn!("metrics: accept: {e}; scrapes wait until descriptors free up");
                    }
                    self.backlog = true;
                    return;
                }
                Err(_) => continue,
            }
        }
    }

    /// Advances one scrape; true when it is finished and should be closed.
    fn serve(&mut self, key: usize, render: &dyn Fn() -> String) -> bool {
        let Some(s) = self.scrapes.get_mut(key) else {
            return false;
        };
        if s.response.is_empty() {
            let mut buf = [0u8; 2048];
            loop {
                match s.stream.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(n) => {
                        s.request.extend_from_slice(&buf[..n]);
                        if s.request.len() > MAX_REQUEST {
                            return true;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return true,
                }
            }
            if !s.request.windows(4).any(|w| w == b"\r\n\r\n") {
                return false;
            }
            s.response = respond(&s.request, render);
        }
        while s.written < s.response.len() {
            match s.stream.write(&s.response[s.written..]) {
                Ok(n) => s.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
        true
    }
}

/// The whole response to one request head.
fn respond(request: &[u8], render: &dyn Fn() -> String) -> Vec<u8> {
    let line_end = request.iter().position(|&b| b == b'\r').unwrap_or(0);
    let line = &request[..line_end];
    let (status, ctype, body) = if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET / ")
    {
        ("200 OK", "text/plain; version=0.0.4", render())
    } else {
        (
            "404 Not Found",
            "text/plain",
            "not found; try /metrics\n".to_string(),
        )
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Stats;
    use std::sync::Arc;

    #[test]
    fn routes() {
        let stats = vec![Arc::new(Stats::default())];
        let render = || crate::metrics::render(&stats);
        let ok = String::from_utf8(respond(b"GET /metrics HTTP/1.1\r\n\r\n", &render)).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("socksgate_"), "{ok}");
        let missing = String::from_utf8(respond(b"GET /x HTTP/1.1\r\n\r\n", &render)).unwrap();
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
    }
}
