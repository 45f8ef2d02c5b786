//! A TCP socket with the readiness seen for it but not yet used up.

use std::io::{self, Read, Write};

use mio::net::TcpStream;

use crate::net;
use crate::tls::TlsSession;

/// A TCP socket and the readiness we have seen for it but not yet used up (edge-triggered: an event bit is cleared
/// only when an operation returns `WouldBlock`).
///
/// With TLS (`tls` set) the socket carries records and `read`/`write_some` move plaintext through the session;
/// `readable`/`writable` then mirror the session's view (plaintext held by rustls counts as readable), so the
/// phases above work unchanged whether the client speaks TLS or not.
pub struct Sock {
    /// The socket.
    pub stream: TcpStream,
    /// A read may make progress.
    pub readable: bool,
    /// A write may make progress.
    pub writable: bool,
    /// The kernel reported an error (typically a reset) on this socket.
    pub error: bool,
    /// The peer's FIN (or an error) was reported: keep reading until EOF even after short reads.
    pub read_closed: bool,
    /// The TLS session when this socket speaks TLS.
    pub tls: Option<Box<TlsSession>>,
}

impl Sock {
    /// Wraps a freshly registered socket; readiness arrives with the first events.
    pub fn new(stream: TcpStream) -> Sock {
        Sock {
            stream,
            readable: false,
            writable: false,
            error: false,
            read_closed: false,
            tls: None,
        }
    }

    /// Switches this socket to TLS: `prefix` is what was already read from it (the start of the ClientHello).
    /// On error the session stays attached, so its failure is logged and counted.
    pub fn start_tls(&mut self, session: TlsSession, prefix: &[u8]) -> io::Result<()> {
        let mut session = Box::new(session);
        session.set_ready(self.readable, self.writable, self.read_closed);
        let r = session.feed(&mut self.stream, prefix);
        self.tls = Some(session);
        self.sync_tls();
        r
    }

    /// True when this socket speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Everything written so far has reached the kernel (always, without TLS: rustls may still hold records).
    pub fn flushed(&self) -> bool {
        self.tls.as_ref().is_none_or(|t| t.flushed())
    }

    /// Half-closes our direction: `shutdown(Write)`, or with TLS close_notify first (the FIN follows once every
    /// record is out).
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        match self.tls.as_mut() {
            Some(t) => {
                let r = t.shutdown_write(&mut self.stream);
                self.sync_tls();
                r
            }
            None => self.stream.shutdown(std::net::Shutdown::Write),
        }
    }

    /// Before the socket is dropped: with TLS a close_notify when `graceful`, and whatever records the kernel
    /// takes now.
    pub fn close_tls(&mut self, graceful: bool) {
        if let Some(t) = self.tls.as_mut() {
            t.close(&mut self.stream, graceful);
        }
    }

    fn sync_tls(&mut self) {
        if let Some(t) = self.tls.as_ref() {
            self.readable = t.readable();
            self.writable = t.writable();
        }
    }

    /// Where a nonblocking connect stands after an event. Linux's `tcp_poll` reports writable only once the
    /// handshake is over, and a failed connect raises an error: a writable edge with neither error nor hang-up is
    /// a connection, so the two confirming syscalls (`SO_ERROR`, `getpeername`) are spent only on the other cases.
    pub fn connect_state(&self) -> net::ConnectState {
        if cfg!(target_os = "linux") && self.writable && !self.error && !self.read_closed {
            return net::ConnectState::Connected;
        }
        net::connect_state(&self.stream)
    }

    /// Records an event's readiness. Errors and hang-ups count as both, so the next read or write reports them.
    pub fn mark(&mut self, ev: &mio::event::Event) {
        let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
        let writable = ev.is_writable() || ev.is_write_closed() || ev.is_error();
        if ev.is_error() {
            self.error = true;
        }
        if ev.is_read_closed() || ev.is_error() {
            self.read_closed = true;
        }
        let Some(t) = self.tls.as_mut() else {
            self.readable |= readable;
            self.writable |= writable;
            return;
        };
        t.mark(readable, writable, self.read_closed);
        // Records rustls holds go out on this edge: no phase may ask to write before they are gone.
        let flushed = t.on_ready(&mut self.stream);
        self.readable = t.readable();
        self.writable = t.writable();
        if flushed.is_err() {
            // The next read or write reports it.
            self.error = true;
            self.readable = true;
            self.writable = true;
        }
    }

    /// Reads once; `WouldBlock` clears the readable bit and returns `Ok(None)`. A short read clears it too: the
    /// receive queue was empty, and epoll reports every later arrival as a new edge, so the read that would only
    /// return `WouldBlock` is saved. The exception is a FIN that arrived together with the data (one edge for both):
    /// once the peer's close was reported, we read on until EOF.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if let Some(t) = self.tls.as_mut() {
            let r = t.read(&mut self.stream, buf);
            self.sync_tls();
            return r;
        }
        loop {
            match self.stream.read(buf) {
                Ok(n) => {
                    if n > 0 && n < buf.len() && !self.read_closed {
                        self.readable = false;
                    }
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(None);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes as much of `data` as the socket takes now; `WouldBlock` clears the writable bit, and so does a short
    /// write (the send buffer is full; the edge-triggered writable event comes when it drains).
    pub fn write_some(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(t) = self.tls.as_mut() {
            let r = t.write_some(&mut self.stream, data);
            self.sync_tls();
            return r;
        }
        let mut off = 0;
        while off < data.len() && self.writable {
            match self.stream.write(&data[off..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    off += n;
                    if off < data.len() {
                        self.writable = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(off)
    }
}
