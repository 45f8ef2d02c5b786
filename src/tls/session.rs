//! One TLS connection driven sans-IO: rustls never touches the socket itself; this type moves records between
//! the socket and rustls with `read_tls` / `process_new_packets` / `reader` and `writer` / `write_tls`, and keeps
//! the same readiness contract as the worker's plain `Sock`:
//!
//! - `read` returns `Ok(Some(n))` with plaintext (`Some(0)` at the end: close_notify or a bare EOF), or
//!   `Ok(None)` when nothing can be had now (and `readable()` turns false);
//! - `write_some` returns how many plaintext bytes it took; fewer than offered means the socket is full and
//!   `writable()` turns false until the next writable edge.
//!
//! Edge-triggered epoll reports an arrival once, so nothing may stay stuck inside rustls: `readable()` stays true
//! while rustls holds decrypted plaintext or the socket may hold more, and records rustls produces (handshake
//! flights, alerts, tickets, key updates) are written out at once or on the next writable edge ([`on_ready`]).
//! New plaintext is handed to rustls only after all earlier records reached the kernel, so rustls never holds more
//! than one write's worth (at most [`BUFFER_LIMIT`](super::BUFFER_LIMIT)) and backpressure works as on a plain
//! socket.
//!
//! [`on_ready`]: TlsSession::on_ready

use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use super::CertIdentity;

/// A byte stream the session reads records from and writes records to (the client's TCP socket, or an in-memory
/// pipe in tests). `write_vectored` must write across slices as writev(2) does: a short write of any kind is
/// taken to mean that the send buffer is full, and the next write waits for a writable edge.
pub trait Transport: Read + Write {
    /// Half-closes the write side (after our close_notify went out).
    fn shutdown_write(&mut self) -> io::Result<()>;
}

impl Transport for mio::net::TcpStream {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// The negotiated protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2.
    Tls12 = 0,
    /// TLS 1.3.
    Tls13 = 1,
}

impl TlsVersion {
    /// `1.2` or `1.3`, as in the access log and metrics.
    pub fn label(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        }
    }
}

/// Why a TLS connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// The client presented no certificate, or one that did not verify against `--tls-client-ca`, or one without
    /// a usable identity.
    ClientCert,
    /// An upstream proxy's certificate did not verify against the trusted roots, or not for its name.
    UpstreamCert,
    /// Anything else the peer got wrong: garbage or truncated records, a bad handshake, a protocol violation.
    Protocol,
}

impl TlsFailure {
    /// A short label for the access log's `end=` and the metrics.
    pub fn label(self) -> &'static str {
        match self {
            TlsFailure::ClientCert => "tls_client_cert",
            TlsFailure::UpstreamCert => "tls_upstream_cert",
            TlsFailure::Protocol => "tls_error",
        }
    }
}

/// What a completed handshake established, reported once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    /// Protocol version.
    pub version: TlsVersion,
    /// The server name the client asked for (SNI), if any.
    pub sni: Option<Box<str>>,
    /// True when ALPN selected `http/1.1` (false: the client offered no ALPN).
    pub alpn: bool,
    /// The verified client certificate's identity (with `--tls-client-ca`).
    pub identity: Option<CertIdentity>,
}

/// Wraps the socket so the session learns whether a read or write came up short (the kernel queue ran dry, or the
/// send buffer filled): the same signal the plain `Sock` uses to stop before a read that would only say
/// `WouldBlock`.
struct Counted<'a, S> {
    inner: &'a mut S,
    short: bool,
}

impl<S: Read> Read for Counted<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.short = n < buf.len();
        Ok(n)
    }
}

impl<S: Write> Write for Counted<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.short = n < buf.len();
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        let n = self.inner.write_vectored(bufs)?;
        self.short = n < want;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// One TLS connection over a nonblocking transport: the server side of a client's connection, or the client side
/// of a connection to a TLS upstream proxy.
pub struct TlsSession {
    conn: Connection,
    /// The socket may have bytes to read (cleared on `WouldBlock` or a short read).
    raw_readable: bool,
    /// The socket may take bytes (cleared on `WouldBlock` or a short write).
    raw_writable: bool,
    /// The peer's FIN was reported: read on until EOF even after short reads.
    read_closed: bool,
    /// Decrypted plaintext rustls holds.
    plain: usize,
    /// The peer's close_notify or a TCP EOF was seen: reads end with `Some(0)`.
    closed: bool,
    /// The TCP EOF came without close_notify.
    truncated: bool,
    /// Our close_notify is queued; the TCP write side is shut once it is written.
    shutting: bool,
    shut: bool,
    failure: Option<TlsFailure>,
    /// The handshake completed (and `established` was filled once).
    done: bool,
    established: Option<Established>,
    version: Option<TlsVersion>,
    identity: Option<CertIdentity>,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn failure_of(e: &rustls::Error, server: bool) -> TlsFailure {
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::InvalidCertRevocationList(_) => {
            if server {
                TlsFailure::ClientCert
            } else {
                TlsFailure::UpstreamCert
            }
        }
        _ => TlsFailure::Protocol,
    }
}

impl TlsSession {
    /// The server side of a client's connection, handshaking with `config`.
    pub fn new(config: Arc<ServerConfig>) -> Result<TlsSession, rustls::Error> {
        Ok(Self::wrap(ServerConnection::new(config)?.into()))
    }

    /// The client side of a connection to `name` (its certificate is checked for that name); the ClientHello
    /// goes out with the first writable edge.
    pub fn client(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<TlsSession, rustls::Error> {
        Ok(Self::wrap(ClientConnection::new(config, name)?.into()))
    }

    fn wrap(mut conn: Connection) -> TlsSession {
        conn.set_buffer_limit(Some(super::BUFFER_LIMIT));
        TlsSession {
            conn,
            raw_readable: false,
            raw_writable: false,
            read_closed: false,
            plain: 0,
            closed: false,
            truncated: false,
            shutting: false,
            shut: false,
            failure: None,
            done: false,
            established: None,
            version: None,
            identity: None,
        }
    }

    /// Hands over the socket's readiness as the plain socket saw it when TLS was detected (the first bytes were
    /// already read from it: feed them with [`feed`](Self::feed)).
    pub fn set_ready(&mut self, readable: bool, writable: bool, read_closed: bool) {
        self.raw_readable = readable;
        self.raw_writable = writable;
        self.read_closed = read_closed;
    }

    /// Records a readiness event of the socket (the same rules as the plain `Sock::mark`).
    pub fn mark(&mut self, readable: bool, writable: bool, read_closed: bool) {
        self.raw_readable |= readable;
        self.raw_writable |= writable;
        self.read_closed |= read_closed;
    }

    /// After an event: writes records rustls still holds (a handshake flight, an alert, or application data the
    /// socket refused earlier), since no caller may ask to write again before they are out.
    pub fn on_ready<S: Transport>(&mut self, io: &mut S) -> io::Result<()> {
        self.flush(io)
    }

    /// Feeds bytes that were already read from the socket (the start of the ClientHello read while detecting the
    /// protocol), then writes whatever rustls answers.
    pub fn feed<S: Transport>(&mut self, io: &mut S, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.conn.read_tls(&mut bytes) {
                Ok(0) => return Err(self.fail(io, TlsFailure::Protocol, "record buffer full")),
                Ok(_) => self.process(io)?,
                Err(e) => return Err(self.fail(io, TlsFailure::Protocol, e)),
            }
        }
        self.flush(io)
    }

    /// A read may make progress: the socket may have bytes, rustls holds plaintext, or the end or an error is
    /// still to be reported.
    pub fn readable(&self) -> bool {
        self.raw_readable || self.plain > 0 || self.closed || self.failure.is_some()
    }

    /// A write may make progress.
    pub fn writable(&self) -> bool {
        self.raw_writable
    }

    /// Every record rustls produced has been written to the socket.
    pub fn flushed(&self) -> bool {
        !self.conn.wants_write()
    }

    /// The handshake has not completed yet.
    pub fn is_handshaking(&self) -> bool {
        !self.done
    }

    /// Why the session failed, once it did.
    pub fn failure(&self) -> Option<TlsFailure> {
        self.failure
    }

    /// The negotiated version, once known.
    pub fn version(&self) -> Option<TlsVersion> {
        self.version
    }

    /// The peer's TCP EOF came without a close_notify.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// The verified client certificate's identity, once the handshake completed with one.
    pub fn identity(&self) -> Option<&CertIdentity> {
        self.identity.as_ref()
    }

    /// What the completed handshake established; `Some` exactly once, right after completion.
    pub fn take_established(&mut self) -> Option<Established> {
        self.established.take()
    }

    /// Reads decrypted bytes: `Ok(Some(n))`, `Ok(Some(0))` at the end of the stream, `Ok(None)` when nothing is
    /// available now. An error means the connection is broken (a TLS alert has been sent where one applies).
    pub fn read<S: Transport>(&mut self, io: &mut S, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if buf.is_empty() {
            return Ok(None);
        }
        if let Some(f) = self.failure {
            return Err(io::Error::new(io::ErrorKind::InvalidData, f.label()));
        }
        loop {
            if self.plain > 0 || self.closed {
                match self.conn.reader().read(buf) {
                    Ok(n) => {
                        self.plain = self.plain.saturating_sub(n);
                        if n < buf.len() {
                            self.plain = 0;
                        }
                        return Ok(Some(n));
                    }
                    Err(e) if would_block(&e) => self.plain = 0,
                    // A TCP EOF without close_notify. For a tunnel it ends the stream all the same: the bytes
                    // before it were authenticated, and what the peer meant by closing is passed on as a FIN.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        self.truncated = true;
                        return Ok(Some(0));
                    }
                    Err(e) => return Err(e),
                }
                if self.closed {
                    return Ok(Some(0));
                }
            }
            if !self.raw_readable {
                return Ok(None);
            }
            self.pull(io)?;
        }
    }

    /// One `read_tls` from the socket, then processing and writing whatever rustls answers.
    fn pull<S: Transport>(&mut self, io: &mut S) -> io::Result<()> {
        let mut src = Counted {
            inner: io,
            short: false,
        };
        match self.conn.read_tls(&mut src) {
            Ok(0) => {
                self.raw_readable = false;
                self.closed = true;
            }
            Ok(_) => {
                if src.short && !self.read_closed {
                    self.raw_readable = false;
                }
            }
            Err(e) if would_block(&e) => {
                self.raw_readable = false;
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            // rustls refuses to buffer more (an oversized handshake message): the peer is misbehaving.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(self.fail(io, TlsFailure::Protocol, e))
            }
            Err(e) => return Err(e),
        }
        self.process(io)?;
        self.flush(io)
    }

    fn process<S: Transport>(&mut self, io: &mut S) -> io::Result<()> {
        match self.conn.process_new_packets() {
            Ok(state) => {
                self.plain = state.plaintext_bytes_to_read();
                if state.peer_has_closed() {
                    self.closed = true;
                }
            }
            Err(e) => {
                let kind = failure_of(&e, matches!(self.conn, Connection::Server(_)));
                return Err(self.fail(io, kind, e));
            }
        }
        if !self.done && !self.conn.is_handshaking() {
            if let Err(e) = self.complete() {
                let _ = self.flush(io);
                return Err(e);
            }
        }
        Ok(())
    }

    fn complete(&mut self) -> io::Result<()> {
        let version = match self.conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_2) => TlsVersion::Tls12,
            _ => TlsVersion::Tls13,
        };
        let client_leaf = match &self.conn {
            Connection::Server(s) => s.peer_certificates().and_then(|c| c.first()),
            Connection::Client(_) => None,
        };
        let identity = match client_leaf {
            Some(leaf) => match CertIdentity::from_verified_cert(leaf) {
                Some(id) => Some(id),
                None => {
                    // Verified, but the certificate names nobody we could use as a user: refuse it like an
                    // unverifiable one. The handshake counts as failed (`done` stays false).
                    self.failure = Some(TlsFailure::ClientCert);
                    self.conn.send_close_notify();
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "client certificate has no usable identity (DNS SAN or CN)",
                    ));
                }
            },
            None => None,
        };
        self.done = true;
        self.version = Some(version);
        self.identity.clone_from(&identity);
        self.established = Some(Established {
            version,
            sni: match &self.conn {
                Connection::Server(s) => s.server_name().map(Into::into),
                Connection::Client(_) => None,
            },
            alpn: self.conn.alpn_protocol().is_some(),
            identity,
        });
        Ok(())
    }

    /// Marks the session failed and pushes out the alert rustls queued for it.
    fn fail<S: Transport>(
        &mut self,
        io: &mut S,
        kind: TlsFailure,
        e: impl std::fmt::Display,
    ) -> io::Error {
        self.failure.get_or_insert(kind);
        let _ = self.flush(io);
        io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
    }

    /// Writes queued records while the socket takes them; completes a pending shutdown once all are out.
    fn flush<S: Transport>(&mut self, io: &mut S) -> io::Result<()> {
        while self.conn.wants_write() && self.raw_writable {
            let mut dst = Counted {
                inner: io,
                short: false,
            };
            match self.conn.write_tls(&mut dst) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {
                    if dst.short {
                        self.raw_writable = false;
                    }
                }
                Err(e) if would_block(&e) => self.raw_writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.shutting && !self.shut && !self.conn.wants_write() {
            self.shut = true;
            let _ = io.shutdown_write();
        }
        Ok(())
    }

    /// Encrypts as much of `data` as the socket takes now and returns how many bytes were taken.
    pub fn write_some<S: Transport>(&mut self, io: &mut S, data: &[u8]) -> io::Result<usize> {
        if self.failure.is_some() || self.shutting {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut off = 0;
        loop {
            self.flush(io)?;
            if off == data.len() || !self.raw_writable || self.conn.wants_write() {
                break;
            }
            let n = self.conn.writer().write(&data[off..])?;
            if n == 0 {
                // Only before the handshake completes: rustls holds plaintext until then.
                break;
            }
            off += n;
        }
        Ok(off)
    }

    /// Ends our direction: close_notify, then `shutdown(Write)` on the socket once it is written.
    pub fn shutdown_write<S: Transport>(&mut self, io: &mut S) -> io::Result<()> {
        if !self.shutting {
            self.shutting = true;
            self.conn.send_close_notify();
        }
        self.flush(io)
    }

    /// Before the socket is closed: a close_notify when `graceful` (not after a failure or when passing on a reset),
    /// and whatever records the socket takes now.
    pub fn close<S: Transport>(&mut self, io: &mut S, graceful: bool) {
        if graceful && self.failure.is_none() && !self.shutting && self.done {
            self.shutting = true;
            self.conn.send_close_notify();
        }
        let _ = self.flush(io);
    }
}

#[cfg(test)]
mod tests;
