//! A TCP socket with the readiness seen for it but not yet used up.

use std::io::{self, Read, Write};

use mio::net::TcpStream;

/// A TCP socket and the readiness we have seen for it but not yet used up (edge-triggered: an event bit is cleared
/// only when an operation returns `WouldBlock`).
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
        }
    }

    /// Records an event's readiness. Errors and hang-ups count as both, so the next read or write reports them.
    pub fn mark(&mut self, ev: &mio::event::Event) {
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            self.readable = true;
        }
        if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
            self.writable = true;
        }
        if ev.is_error() {
            self.error = true;
        }
        if ev.is_read_closed() || ev.is_error() {
            self.read_closed = true;
        }
    }

    /// Reads once; `WouldBlock` clears the readable bit and returns `Ok(None)`. A short read clears it too: the
    /// receive queue was empty, and epoll reports every later arrival as a new edge, so the read that would only
    /// return `WouldBlock` is saved. The exception is a FIN that arrived together with the data (one edge for both):
    /// once the peer's close was reported, we read on until EOF.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
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
