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
    /// A short read drained the queue after the peer's FIN was reported: the next read is EOF.
    eof_next: bool,
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
            eof_next: false,
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
    /// once the peer's close was reported, the next read is EOF. That read is not made either: the FIN was queued
    /// behind every byte the peer sent before the event was reported, so a short read after it emptied the queue
    /// up to the FIN (haproxy relies on the same), and the `recv` that would return 0 is saved. After an error the
    /// socket is read for real, so a reset is reported as one.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if let Some(t) = self.tls.as_mut() {
            let r = t.read(&mut self.stream, buf);
            self.sync_tls();
            return r;
        }
        if self.eof_next && !self.error {
            return Ok(Some(0));
        }
        loop {
            match self.stream.read(buf) {
                Ok(n) => {
                    if n > 0 && n < buf.len() {
                        if !self.read_closed {
                            self.readable = false;
                        } else {
                            self.eof_next = true;
                        }
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
        self.write_loop(data.len(), |s, off| s.write(&data[off..]))
    }

    /// Writes as much of `a` then `b` as the socket takes now, as one `writev` (one segment where both fit) on a
    /// clear-text socket; returns how many bytes of the two went, counting `a` first. Writable bits as `write_some`.
    pub fn write_two(&mut self, a: &[u8], b: &[u8]) -> io::Result<usize> {
        if self.tls.is_some() {
            // TLS gathers its records itself: two writes cost no more segments.
            let w = self.write_some(a)?;
            if w < a.len() {
                return Ok(w);
            }
            return Ok(w + self.write_some(b)?);
        }
        self.write_loop(a.len() + b.len(), |s, off| {
            let parts = if off < a.len() {
                [io::IoSlice::new(&a[off..]), io::IoSlice::new(b)]
            } else {
                [io::IoSlice::new(&b[off - a.len()..]), io::IoSlice::new(&[])]
            };
            s.write_vectored(&parts)
        })
    }

    /// The clear-text write loop of `write_some` and `write_two`: `write(stream, offset)` writes from `offset` of
    /// `total` bytes, until all went or the socket is full (`WouldBlock` or a short write clears `writable`).
    fn write_loop(
        &mut self,
        total: usize,
        mut write: impl FnMut(&mut TcpStream, usize) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut off = 0;
        while off < total && self.writable {
            match write(&mut self.stream, off) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    off += n;
                    if off < total {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Shutdown, TcpListener};
    use std::time::{Duration, Instant};

    /// A connected pair: our nonblocking side and the peer's blocking std side.
    fn pair() -> (Sock, std::net::TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let peer = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (ours, _) = l.accept().expect("accept");
        ours.set_nonblocking(true).expect("nonblocking");
        (Sock::new(TcpStream::from_std(ours)), peer)
    }

    /// Waits until the peer's bytes and FIN are all in our receive queue (peeked, not consumed).
    fn wait_queued(s: &Sock, len: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut b = vec![0u8; len + 1];
        while s.stream.peek(&mut b).map_or(true, |n| n < len) {
            assert!(Instant::now() < deadline, "peer bytes never arrived");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_short_read_after_the_peers_fin_makes_the_next_read_eof() {
        let (mut s, mut peer) = pair();
        peer.write_all(b"abc").expect("write");
        peer.shutdown(Shutdown::Write).expect("shutdown");
        wait_queued(&s, 3);
        s.readable = true;
        s.read_closed = true;
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).expect("read"), Some(3));
        assert_eq!(&buf[..3], b"abc");
        assert!(s.eof_next, "the short read after the FIN should mark EOF");
        assert_eq!(s.read(&mut buf).expect("read"), Some(0));
    }

    #[test]
    fn a_full_read_after_the_fin_reads_on_and_a_short_read_without_it_clears_readable() {
        let (mut s, mut peer) = pair();
        peer.write_all(b"abcdef").expect("write");
        wait_queued(&s, 6);
        s.readable = true;
        let mut small = [0u8; 3];
        // Exactly full: more may be queued, so nothing is concluded.
        assert_eq!(s.read(&mut small).expect("read"), Some(3));
        assert!(s.readable && !s.eof_next);
        let mut buf = [0u8; 16];
        // Short without a reported FIN: the queue is empty for now, not closed.
        assert_eq!(s.read(&mut buf).expect("read"), Some(3));
        assert!(!s.readable && !s.eof_next);
        peer.shutdown(Shutdown::Write).expect("shutdown");
    }

    #[test]
    fn write_two_sends_both_in_order_and_resumes_after_a_short_write() {
        let (mut s, mut peer) = pair();
        s.writable = true;
        assert_eq!(s.write_two(b"head:", b"body").expect("write"), 9);
        let mut got = [0u8; 9];
        peer.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"head:body");
        // Far more than the socket takes at once: the write stops short and clears `writable`; resuming at the
        // offset it reported (inside the head or the body) delivers every byte once, in order.
        let head: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let body: Vec<u8> = (0..8_000_000u32).map(|i| (i % 241) as u8).collect();
        let want: Vec<u8> = head.iter().chain(body.iter()).copied().collect();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).expect("read");
            all
        });
        let mut off = 0;
        let mut short = false;
        while off < want.len() {
            s.writable = true;
            let n = if off < head.len() {
                s.write_two(&head[off..], &body).expect("write")
            } else {
                s.write_two(&[], &body[off - head.len()..]).expect("write")
            };
            short |= !s.writable;
            off += n;
            if n == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        s.stream.shutdown(Shutdown::Write).expect("shutdown");
        let all = reader.join().expect("reader");
        assert!(short, "8 MB should not fit in one write");
        assert_eq!(all.len(), want.len());
        assert!(all == want, "bytes lost or reordered");
    }
}
