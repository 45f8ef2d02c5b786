use super::super::testcerts::{self, Pki};
use super::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use std::collections::VecDeque;

/// Both directions of a TCP connection in memory, with a bounded server send buffer.
#[derive(Default)]
struct Wire {
    c2s: VecDeque<u8>,
    s2c: VecDeque<u8>,
    /// Bytes the server may still write before `WouldBlock`.
    s2c_room: usize,
    client_fin: bool,
    server_fin: bool,
    server_reads: usize,
    server_writes: usize,
}

impl Wire {
    /// An empty wire on which the server may write `room` bytes before `WouldBlock`.
    fn with_room(room: usize) -> Wire {
        Wire {
            s2c_room: room,
            ..Wire::default()
        }
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.server_reads += 1;
        if self.c2s.is_empty() {
            return if self.client_fin {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(self.c2s.len());
        for (d, s) in buf.iter_mut().zip(self.c2s.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.server_writes += 1;
        assert!(!self.server_fin, "write after shutdown");
        let n = buf.len().min(self.s2c_room);
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.s2c_room -= n;
        self.s2c.extend(&buf[..n]);
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut total = 0;
        for b in bufs {
            match self.write(b) {
                Ok(n) => {
                    total += n;
                    if n < b.len() {
                        break;
                    }
                }
                Err(e) if total == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(total)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for Wire {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.server_fin = true;
        Ok(())
    }
}

struct Pair {
    wire: Wire,
    server: TlsSession,
    client: ClientConnection,
    /// Plaintext the client received.
    got: Vec<u8>,
    client_eof: bool,
}

fn server_config(pki: &Pki, client_ca: Option<&str>) -> Arc<ServerConfig> {
    let dir = std::env::temp_dir().join(format!(
        "socksgate-tls-session-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let w = |n: &str, t: &str| {
        let p = dir.join(n);
        std::fs::write(&p, t).expect("write");
        p
    };
    let files = super::super::TlsFiles {
        cert: w("c.pem", &pki.leaf_pem),
        key: w("k.pem", &pki.leaf_key_pem),
        client_ca: client_ca.map(|ca| w("ca.pem", ca)),
    };
    let cfg = super::super::load(&files).expect("load").0;
    let _ = std::fs::remove_dir_all(&dir);
    cfg
}

fn client_config(ca_pem: &str, client_cert: Option<(&str, &str)>) -> Arc<ClientConfig> {
    client_config_v(ca_pem, client_cert, rustls::DEFAULT_VERSIONS)
}

fn client_config_v(
    ca_pem: &str,
    client_cert: Option<(&str, &str)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("ca"))
        .expect("add");
    let b = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots);
    let mut cfg = match client_cert {
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
            )
            .expect("client auth"),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// A server session whose socket is writable and has nothing to read yet, as after accept.
fn fresh_server(cfg: Arc<ServerConfig>) -> TlsSession {
    let mut s = TlsSession::new(cfg).expect("server");
    s.set_ready(false, true, false);
    s
}

impl Pair {
    fn new(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Pair {
        let name = ServerName::try_from("localhost").expect("name");
        Pair {
            wire: Wire::with_room(1 << 20),
            server: fresh_server(server),
            client: ClientConnection::new(client, name).expect("client"),
            got: Vec::new(),
            client_eof: false,
        }
    }

    /// A pair with the test PKI's server and client configurations, past the handshake.
    fn established() -> Pair {
        let pki = pki();
        let mut p = Pair::new(server_config(&pki, None), client_config(&pki.ca_pem, None));
        p.handshake();
        p
    }

    /// Client side: send what rustls wants to send, receive what the server wrote. Returns a client error.
    fn client_io(&mut self) -> Result<(), rustls::Error> {
        let mut out = Vec::new();
        while self.client.wants_write() {
            self.client.write_tls(&mut out).expect("client write");
        }
        if !out.is_empty() {
            self.wire.c2s.extend(out);
            // The server sees a readable edge for new bytes.
            self.server.mark(true, false, false);
        }
        let had = !self.wire.s2c.is_empty();
        let bytes: Vec<u8> = self.wire.s2c.drain(..).collect();
        if had {
            self.wire.s2c_room += bytes.len();
            self.server.mark(false, true, false);
            let mut rd = &bytes[..];
            while !rd.is_empty() {
                self.client.read_tls(&mut rd).expect("client read_tls");
                self.client.process_new_packets()?;
                self.client_drain();
            }
        }
        if self.wire.server_fin && self.wire.s2c.is_empty() && !self.client_eof {
            self.client_eof = true;
            let _ = self.client.read_tls(&mut &[][..]);
            self.client.process_new_packets()?;
        }
        self.client_drain();
        Ok(())
    }

    fn client_drain(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.client.reader().read(&mut buf) {
            if n == 0 {
                break;
            }
            self.got.extend_from_slice(&buf[..n]);
        }
    }

    /// Server side as the worker drives it after an event: flush, then read everything available.
    fn server_read_all(&mut self) -> io::Result<(Vec<u8>, bool)> {
        self.server.on_ready(&mut self.wire)?;
        let mut got = Vec::new();
        let mut eof = false;
        let mut buf = [0u8; 1000];
        while self.server.readable() {
            match self.server.read(&mut self.wire, &mut buf)? {
                Some(0) => {
                    eof = true;
                    break;
                }
                Some(n) => got.extend_from_slice(&buf[..n]),
                None => break,
            }
        }
        Ok((got, eof))
    }

    fn handshake(&mut self) {
        for _ in 0..10 {
            self.client_io().expect("client");
            self.server_read_all().expect("server");
            if !self.client.is_handshaking() && !self.server.is_handshaking() {
                self.client_io().expect("client");
                return;
            }
        }
        panic!("handshake did not complete");
    }
}

fn pki() -> Pki {
    testcerts::pki(&rcgen::PKCS_ECDSA_P256_SHA256)
}

#[test]
fn handshake_and_data_both_ways() {
    let mut p = Pair::established();
    let est = p.server.take_established().expect("established");
    assert_eq!(est.version, TlsVersion::Tls13);
    assert_eq!(est.sni.as_deref(), Some("localhost"));
    assert!(est.alpn, "http/1.1 chosen");
    assert_eq!(p.client.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(est.identity, None);
    assert!(p.server.take_established().is_none(), "reported once");

    // Client -> server, larger than one record and than the server's read buffer.
    let up: Vec<u8> = (0..60_000u32).map(|i| (i * 7 % 251) as u8).collect();
    p.client.writer().write_all(&up).expect("write");
    p.client_io().expect("client");
    let (got, eof) = p.server_read_all().expect("read");
    assert!(!eof);
    assert_eq!(got, up);
    assert!(!p.server.readable(), "drained to WouldBlock");

    // Server -> client.
    let down: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    let mut off = 0;
    while off < down.len() {
        off += p.server.write_some(&mut p.wire, &down[off..]).expect("w");
        p.client_io().expect("client");
    }
    assert_eq!(p.got, down);
}

#[test]
fn tls12_works_too() {
    let pki = pki();
    let c = client_config_v(&pki.ca_pem, None, &[&rustls::version::TLS12]);
    let mut p = Pair::new(server_config(&pki, None), c);
    p.handshake();
    assert_eq!(
        p.server.take_established().map(|e| e.version),
        Some(TlsVersion::Tls12)
    );
    p.client.writer().write_all(b"ping").expect("w");
    p.client_io().expect("c");
    assert_eq!(p.server_read_all().expect("r").0, b"ping");
}

#[test]
fn partial_writes_keep_bytes_in_order_and_memory_bounded() {
    let mut p = Pair::established();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 13 % 256) as u8).collect();
    let mut off = 0;
    let mut rounds = 0;
    while off < data.len() {
        rounds += 1;
        assert!(rounds < 10_000);
        // A tiny send buffer: every write comes up short.
        p.wire.s2c_room = 1000;
        let before = off;
        if p.server.writable() {
            off += p.server.write_some(&mut p.wire, &data[off..]).expect("w");
        }
        // Never more than one buffer's worth taken while the socket refuses bytes.
        assert!(off - before <= super::super::BUFFER_LIMIT + 1000);
        if !p.server.flushed() {
            assert!(!p.server.writable(), "short write clears writable");
        }
        // The socket drains: the client reads, the server sees a writable edge and flushes on its own.
        let moved: Vec<u8> = p.wire.s2c.drain(..).collect();
        p.wire.s2c_room = 0;
        let mut rd = &moved[..];
        while !rd.is_empty() {
            p.client.read_tls(&mut rd).expect("read_tls");
            p.client.process_new_packets().expect("process");
        }
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = p.client.reader().read(&mut buf) {
            if n == 0 {
                break;
            }
            p.got.extend_from_slice(&buf[..n]);
        }
        p.wire.s2c_room = 1000;
        p.server.mark(false, true, false);
        p.server.on_ready(&mut p.wire).expect("flush");
    }
    for _ in 0..1000 {
        if p.server.flushed() {
            break;
        }
        p.client_io().expect("c");
        p.server.on_ready(&mut p.wire).expect("flush");
    }
    p.client_io().expect("c");
    assert!(p.server.flushed());
    assert_eq!(p.got.len(), data.len());
    assert!(p.got == data, "bytes in order");
}

#[test]
fn plaintext_left_in_rustls_keeps_readable() {
    let mut p = Pair::established();
    p.client.writer().write_all(&[7u8; 3000]).expect("w");
    p.client_io().expect("c");
    let mut small = [0u8; 100];
    let mut total = 0;
    // All 3000 bytes arrived in one edge; read in small pieces without any further event.
    while p.server.readable() {
        match p.server.read(&mut p.wire, &mut small).expect("r") {
            Some(n) if n > 0 => total += n,
            _ => break,
        }
    }
    assert_eq!(total, 3000);
    assert!(!p.server.readable());
}

#[test]
fn close_notify_and_bare_eof_end_the_stream() {
    // close_notify: data before it arrives, then Some(0), not truncated.
    let mut p = Pair::established();
    p.client.writer().write_all(b"last words").expect("w");
    p.client.send_close_notify();
    p.client_io().expect("c");
    let (got, eof) = p.server_read_all().expect("r");
    assert_eq!(got, b"last words");
    assert!(eof);
    assert!(!p.server.truncated());
    // Our side: close_notify, then the TCP FIN once it is written.
    p.server.shutdown_write(&mut p.wire).expect("shut");
    assert!(p.wire.server_fin);
    p.client_io().expect("c");
    assert!(p.client_eof);

    // Bare EOF: still an end, flagged as truncated.
    let mut p = Pair::established();
    p.client.writer().write_all(b"abc").expect("w");
    p.client_io().expect("c");
    p.wire.client_fin = true;
    p.server.mark(true, false, true);
    let (got, eof) = p.server_read_all().expect("r");
    assert_eq!(got, b"abc");
    assert!(eof);
    assert!(p.server.truncated());
}

#[test]
fn shutdown_waits_for_queued_records() {
    let mut p = Pair::established();
    p.wire.s2c_room = 10;
    let n = p.server.write_some(&mut p.wire, &[1u8; 5000]).expect("w");
    assert_eq!(n, 5000, "taken into one record");
    assert!(!p.server.flushed());
    p.server.shutdown_write(&mut p.wire).expect("shut");
    assert!(!p.wire.server_fin, "FIN must not overtake queued records");
    assert!(p.server.write_some(&mut p.wire, b"x").is_err());
    p.wire.s2c_room = 1 << 20;
    for _ in 0..100 {
        p.client_io().expect("c");
        p.server.on_ready(&mut p.wire).expect("flush");
        if p.wire.server_fin {
            break;
        }
    }
    assert!(p.wire.server_fin);
    p.client_io().expect("c");
    assert_eq!(p.got, vec![1u8; 5000]);
    assert!(p.client_eof);
}

#[test]
fn garbage_gets_an_alert_and_an_error() {
    let pki = pki();
    let cfg = server_config(&pki, None);
    // Not TLS at all after the first byte.
    let mut s = fresh_server(Arc::clone(&cfg));
    let mut wire = Wire::with_room(1 << 16);
    // A ClientHello whose body is not one.
    let e = s
        .feed(&mut wire, b"\x16\x03\x01\x00\x08\x01\x00\x00\x04abcd")
        .expect_err("garbage");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert_eq!(s.failure(), Some(TlsFailure::Protocol));
    let alert: Vec<u8> = wire.s2c.drain(..).collect();
    assert_eq!(alert.first(), Some(&0x15), "an alert record went out");
    let mut b = [0u8; 10];
    assert!(s.read(&mut wire, &mut b).is_err(), "stays failed");

    // A handshake message announcing 6 MB: refused at once, not buffered.
    let mut s = fresh_server(Arc::clone(&cfg));
    assert!(s.feed(&mut wire, b"\x16\x03\x01\x00\x05hello").is_err());
    assert_eq!(s.failure(), Some(TlsFailure::Protocol));

    // A record after the handshake that does not decrypt.
    let mut p = Pair::new(Arc::clone(&cfg), client_config(&pki.ca_pem, None));
    p.handshake();
    p.wire
        .c2s
        .extend(b"\x17\x03\x03\x00\x20aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
    p.server.mark(true, false, false);
    assert!(p.server_read_all().is_err());
    assert_eq!(p.server.failure(), Some(TlsFailure::Protocol));
    // TLS 1.3 encrypts the alert: the client is the one to read it.
    match p.client_io() {
        Err(rustls::Error::AlertReceived(a)) => {
            assert_eq!(a, rustls::AlertDescription::BadRecordMac)
        }
        other => panic!("client saw {other:?}"),
    }
}

#[test]
fn truncated_record_then_eof_is_an_end_not_a_hang() {
    let mut p = Pair::established();
    p.client.writer().write_all(b"hello").expect("w");
    let mut rec = Vec::new();
    p.client.write_tls(&mut rec).expect("w");
    // Half a record: nothing to read yet, and no busy loop.
    p.wire.c2s.extend(&rec[..rec.len() / 2]);
    p.server.mark(true, false, false);
    let reads = p.wire.server_reads;
    let (got, eof) = p.server_read_all().expect("r");
    assert!(got.is_empty() && !eof);
    assert!(p.wire.server_reads - reads <= 2);
    assert!(!p.server.readable());
    // Then the peer closes: the half record is dropped and the stream ends.
    p.wire.client_fin = true;
    p.server.mark(true, false, true);
    let r = p.server_read_all();
    match r {
        Ok((got, eof)) => assert!(got.is_empty() && eof),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidData),
    }
}

#[test]
fn handshake_prefix_split_anywhere() {
    let pki = pki();
    let cfg = server_config(&pki, None);
    let client_cfg = client_config(&pki.ca_pem, None);
    let mut hello = Vec::new();
    let mut c = ClientConnection::new(
        Arc::clone(&client_cfg),
        ServerName::try_from("localhost").expect("n"),
    )
    .expect("c");
    c.write_tls(&mut hello).expect("hello");
    for split in [1, 2, 5, hello.len() / 2, hello.len()] {
        let mut s = TlsSession::new(Arc::clone(&cfg)).expect("s");
        let mut wire = Wire::with_room(1 << 16);
        s.set_ready(true, true, false);
        s.feed(&mut wire, &hello[..split]).expect("feed");
        wire.c2s.extend(&hello[split..]);
        let mut b = [0u8; 16];
        assert_eq!(s.read(&mut wire, &mut b).expect("r"), None);
        assert_eq!(
            wire.s2c.front(),
            Some(&0x16),
            "server flight sent at split {split}"
        );
    }
}

#[test]
fn client_certificates() {
    let pki = pki();
    let cfg = server_config(&pki, Some(&pki.ca_pem));
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    // Accepted: the identity is the first DNS SAN.
    let (cert, key) = testcerts::leaf(&pki.ca, &["alice.clients"], Some("Alice"), alg);
    let mut p = Pair::new(
        Arc::clone(&cfg),
        client_config(&pki.ca_pem, Some((&cert, &key))),
    );
    p.handshake();
    let est = p.server.take_established().expect("est");
    assert_eq!(
        est.identity.map(|i| i.name().to_string()),
        Some("alice.clients".into())
    );

    // No certificate: refused with an alert.
    let mut p = Pair::new(Arc::clone(&cfg), client_config(&pki.ca_pem, None));
    let r = drive_until_error(&mut p);
    assert_eq!(r, Some(TlsFailure::ClientCert));

    // A certificate from another CA.
    let other = testcerts::ca("other CA");
    let (cert, key) = testcerts::leaf(&other, &["mallory"], None, alg);
    let mut p = Pair::new(
        Arc::clone(&cfg),
        client_config(&pki.ca_pem, Some((&cert, &key))),
    );
    assert_eq!(drive_until_error(&mut p), Some(TlsFailure::ClientCert));

    // Verified but without a usable name.
    let (cert, key) = testcerts::leaf(&pki.ca, &[], Some("two words"), alg);
    let mut p = Pair::new(cfg, client_config(&pki.ca_pem, Some((&cert, &key))));
    assert_eq!(drive_until_error(&mut p), Some(TlsFailure::ClientCert));
}

fn drive_until_error(p: &mut Pair) -> Option<TlsFailure> {
    for _ in 0..10 {
        let _ = p.client_io();
        if p.server_read_all().is_err() {
            // The alert reaches the client.
            let _ = p.client_io();
            return p.server.failure();
        }
    }
    None
}

/// The client's view of a `Wire`.
struct Flip<'a>(&'a mut Wire);

impl Read for Flip<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.0.s2c.is_empty() {
            return if self.0.server_fin {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(self.0.s2c.len());
        for (d, s) in buf.iter_mut().zip(self.0.s2c.drain(..n)) {
            *d = s;
        }
        self.0.s2c_room += n;
        Ok(n)
    }
}

impl Write for Flip<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.c2s.extend(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for Flip<'_> {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.0.client_fin = true;
        Ok(())
    }
}

/// A server session and a client session that expects the upstream `name`, both writable, on one wire.
fn upstream_sessions(pki: &Pki, name: &'static str) -> (TlsSession, TlsSession, Wire) {
    let name = ServerName::try_from(name).expect("n");
    let mut client = TlsSession::client(client_config(&pki.ca_pem, None), name).expect("client");
    client.set_ready(false, true, false);
    (
        fresh_server(server_config(pki, None)),
        client,
        Wire::with_room(1 << 20),
    )
}

#[test]
fn client_session_against_server_session() {
    let pki = pki();
    let (mut server, mut client, mut wire) = upstream_sessions(&pki, "localhost");
    // The client's first bytes (an upstream handshake) are held until the TLS handshake completes.
    assert_eq!(
        client
            .write_some(&mut Flip(&mut wire), b"\x05\x01\x00")
            .expect("w"),
        3
    );
    assert_eq!(wire.c2s.front(), Some(&0x16), "ClientHello sent");
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    for _ in 0..10 {
        server.mark(true, true, false);
        while let Some(n) = server.read(&mut wire, &mut buf).expect("server read") {
            got.extend_from_slice(&buf[..n]);
        }
        client.mark(true, true, false);
        client.on_ready(&mut Flip(&mut wire)).expect("flush");
        assert_eq!(
            client.read(&mut Flip(&mut wire), &mut buf).expect("cr"),
            None
        );
        if got.len() == 3 {
            break;
        }
    }
    assert_eq!(got, b"\x05\x01\x00");
    assert_eq!(
        client.take_established().map(|e| (e.version, e.identity)),
        Some((TlsVersion::Tls13, None))
    );

    // The wrong name for the upstream: the client refuses the certificate.
    let (mut server, mut client, mut wire) = upstream_sessions(&pki, "not-localhost");
    client.on_ready(&mut Flip(&mut wire)).expect("hello");
    server.mark(true, false, false);
    let _ = server.read(&mut wire, &mut buf);
    client.mark(true, false, false);
    assert!(client.read(&mut Flip(&mut wire), &mut buf).is_err());
    assert_eq!(client.failure(), Some(TlsFailure::UpstreamCert));
}

#[test]
fn buffered_plaintext_before_handshake_is_bounded() {
    let pki = pki();
    let mut s = fresh_server(server_config(&pki, None));
    let mut wire = Wire::with_room(1 << 16);
    let n = s.write_some(&mut wire, &[0u8; 100_000]).expect("w");
    assert!(n <= super::super::BUFFER_LIMIT, "took {n}");
    assert!(wire.s2c.is_empty(), "nothing goes out before the handshake");
}
