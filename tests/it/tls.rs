//! TLS on the proxy port against the release binary: curl as an HTTPS-proxy client (forwarding, CONNECT,
//! --proxy-user, --proxy-insecure, client certificates), python-socks with `proxy_ssl`, and a rustls client for
//! the byte-level cases (SOCKS5 inside TLS next to clear text on one port, --tls-only, reload, garbage and
//! truncated records, a stalled handshake, close_notify versus a bare EOF).
//!
//! Certificates are made fresh by rcgen for every test in a temp directory; no key is committed.

use crate::common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::origin::Origin;
use common::{Proxy, TestServer, IO_TIMEOUT};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// A CA and a server certificate for 127.0.0.1 / localhost, written to a temp directory.
struct Pki {
    dir: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, KeyPair>,
    ca_pem: String,
    ca_path: PathBuf,
    cert_path: PathBuf,
    key_path: PathBuf,
    leaf_der: Vec<u8>,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn new_ca(name: &str) -> rcgen::CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rcgen::CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf signed by `ca`: (cert PEM, key PEM, cert DER).
fn new_leaf(
    ca: &rcgen::CertifiedIssuer<'static, KeyPair>,
    dns: &[&str],
    cn: &str,
    ip: bool,
) -> (String, String, Vec<u8>) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = dns
        .iter()
        .map(|d| SanType::DnsName((*d).try_into().unwrap()))
        .collect();
    if ip {
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    }
    p.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().to_vec())
}

fn pki(tag: &str) -> Pki {
    let dir = common::temp_path(&format!("tls-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = new_ca(&format!("socksgate test CA {tag}"));
    let (leaf_pem, key_pem, leaf_der) = new_leaf(&ca, &["localhost"], "localhost", true);
    let ca_pem = ca.pem();
    let ca_path = dir.join("ca.pem");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&ca_path, &ca_pem).unwrap();
    // The whole chain: clients that trust only the root still verify the leaf.
    std::fs::write(&cert_path, format!("{leaf_pem}{ca_pem}")).unwrap();
    std::fs::write(&key_path, key_pem).unwrap();
    Pki {
        dir,
        ca,
        ca_pem,
        ca_path,
        cert_path,
        key_path,
        leaf_der,
    }
}

impl Pki {
    fn cert(&self) -> &str {
        self.cert_path.to_str().unwrap()
    }
    fn key(&self) -> &str {
        self.key_path.to_str().unwrap()
    }
    fn ca(&self) -> &str {
        self.ca_path.to_str().unwrap()
    }
    /// A client certificate from this CA, written next to the others: (cert path, key path, cert PEM, key PEM).
    fn client(&self, name: &str, dns: &[&str]) -> (String, String, String, String) {
        let (c, k, _) = new_leaf(&self.ca, dns, name, false);
        let cp = self.dir.join(format!("client-{name}.pem"));
        let kp = self.dir.join(format!("client-{name}-key.pem"));
        std::fs::write(&cp, &c).unwrap();
        std::fs::write(&kp, &k).unwrap();
        (
            cp.to_str().unwrap().into(),
            kp.to_str().unwrap().into(),
            c,
            k,
        )
    }
}

fn tls_proxy(p: &Pki, extra: &[&str]) -> Proxy {
    let mut args = vec![
        "--tls-cert",
        p.cert(),
        "--tls-key",
        p.key(),
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

fn client_config(ca_pem: &str, client: Option<(&str, &str)>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let b = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match client {
        Some((c, k)) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(c.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(k.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    Arc::new(cfg)
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// Connects and completes the handshake; Err carries rustls' complaint (an alert from the proxy, a bad cert).
fn tls_connect(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Result<Tls, String> {
    let sock = common::connect(addr);
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(cfg, name).unwrap();
    let mut s = StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
    }
    Ok(s)
}

/// SOCKS5 no-auth CONNECT to `target` over an established stream; returns the reply code.
fn socks5_over(s: &mut impl ReadWrite, target: SocketAddr) -> u8 {
    s.write_all(&[5, 1, 0]).unwrap();
    s.flush().unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0], "no-auth chosen");
    s.write_all(&common::socks5_request(1, target)).unwrap();
    s.flush().unwrap();
    let mut head = [0u8; 10];
    s.read_exact(&mut head).unwrap();
    head[1]
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn echo_round(s: &mut impl ReadWrite, data: &[u8]) {
    s.write_all(data).unwrap();
    s.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).unwrap();
    assert!(back == data, "echo mismatch");
}

fn have_curl() -> bool {
    let ok = common::have_curl();
    if !ok {
        eprintln!("curl not installed: skipping");
    }
    ok
}

/// The access-log lines so far.
fn access_lines(p: &Proxy) -> Vec<String> {
    p.log()
        .lines()
        .filter(|l| l.contains(" access]"))
        .map(String::from)
        .collect()
}

fn wait_log(p: &Proxy, needle: &str) -> bool {
    p.wait_for(IO_TIMEOUT, || p.log().contains(needle))
}

const OK_13: &str = "socksgate_tls_handshakes_total{outcome=\"ok\",version=\"1.3\"}";

#[test]
fn curl_https_proxy_forwarding_connect_and_auth() {
    if !have_curl() {
        return;
    }
    let p = pki("curl");
    let origin = Origin::start();
    let proxy = tls_proxy(&p, &["-U", "alice:s3cret"]);
    let px = format!("https://127.0.0.1:{}", proxy.addr().port());
    // Forwarding (GET in absolute form inside TLS).
    let (code, body, err) = common::curl(&[
        "-x",
        &px,
        "--proxy-cacert",
        p.ca(),
        "--proxy-user",
        "alice:s3cret",
        &origin.url("/fwd"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, b"path=/fwd\n");
    let r = origin.request_to("/fwd");
    assert_eq!(
        r.header("proxy-authorization"),
        None,
        "credentials stop at the proxy"
    );
    // CONNECT inside TLS.
    let (code, body, err) = common::curl(&[
        "-p",
        "-x",
        &px,
        "--proxy-cacert",
        p.ca(),
        "--proxy-user",
        "alice:s3cret",
        &origin.url("/tunnel"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, b"path=/tunnel\n");
    // Without credentials: 407 inside TLS.
    let (_, status, _) = common::curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-x",
        &px,
        "--proxy-cacert",
        p.ca(),
        &origin.url("/noauth"),
    ]);
    assert_eq!(status, b"407");
    assert!(origin.requests_to("/noauth").is_empty());
    // The user, the protocol and TLS 1.3 in the access log.
    assert!(proxy.wait_for(IO_TIMEOUT, || access_lines(&proxy)
        .iter()
        .any(|l| l.contains("user=alice") && l.contains("tls=1.3"))));
    assert!(proxy.metric(OK_13) >= 3);
}

#[test]
fn curl_proxy_insecure_and_a_wrong_ca_is_refused_by_curl() {
    if !have_curl() {
        return;
    }
    let p = pki("insecure");
    let other = pki("insecure-other");
    let origin = Origin::start();
    let proxy = tls_proxy(&p, &[]);
    let px = format!("https://127.0.0.1:{}", proxy.addr().port());
    let (code, body, err) = common::curl(&["-x", &px, "--proxy-insecure", &origin.url("/i")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, b"path=/i\n");
    // Trusting another CA, curl must reject our certificate (60: peer certificate cannot be authenticated).
    let (code, _, _) = common::curl(&["-x", &px, "--proxy-cacert", other.ca(), &origin.url("/x")]);
    assert_eq!(code, 60);
    assert!(origin.requests_to("/x").is_empty());
}

#[test]
fn socks5_inside_tls_and_clear_text_on_the_same_port() {
    let p = pki("same-port");
    let echo = TestServer::echo();
    let proxy = tls_proxy(&p, &[]);
    let cfg = client_config(&p.ca_pem, None);
    let mut tls = tls_connect(proxy.addr(), Arc::clone(&cfg)).expect("handshake");
    assert_eq!(
        tls.conn.alpn_protocol(),
        None,
        "no ALPN offered, none chosen"
    );
    let mut clear = common::socks5_connect(proxy.addr(), echo.addr).expect("clear socks5");
    assert_eq!(socks5_over(&mut tls, echo.addr), 0);
    // Both at once, interleaved, with a bulk transfer through TLS (records larger than the relay buffer).
    let big = common::pseudo_random(7, 3 << 20);
    let mut tls2 = tls_connect(proxy.addr(), cfg).expect("handshake");
    assert_eq!(socks5_over(&mut tls2, echo.addr), 0);
    echo_round(&mut clear, b"clear text");
    echo_round(&mut tls, b"inside TLS");
    // A big echo: write in slices and read back, so neither side's buffers have to hold it all.
    let mut back = Vec::with_capacity(big.len());
    let mut buf = vec![0u8; 65536];
    for chunk in big.chunks(256 * 1024) {
        tls2.write_all(chunk).unwrap();
        tls2.flush().unwrap();
        let want = back.len() + chunk.len();
        while back.len() < want {
            let n = tls2.read(&mut buf).unwrap();
            assert!(n > 0, "EOF in the middle");
            back.extend_from_slice(&buf[..n]);
        }
    }
    assert_eq!(common::digest(&back), common::digest(&big));
    echo_round(&mut clear, b"still fine");
    // Clear SOCKS4 still works next to TLS.
    let mut s4 = common::connect(proxy.addr());
    s4.write_all(&common::socks4_request(
        1,
        echo.addr.port(),
        [127, 0, 0, 1],
        b"",
        None,
    ))
    .unwrap();
    let r = common::read_n(&mut s4, 8);
    assert_eq!(r[1], 90);
    echo_round(&mut s4, b"socks4");
    assert!(proxy.metric(OK_13) >= 2);
}

#[test]
fn tls_only_refuses_clear_text() {
    let p = pki("tls-only");
    let echo = TestServer::echo();
    let proxy = tls_proxy(&p, &["--tls-only"]);
    let mut clear = common::connect(proxy.addr());
    clear.write_all(&[5, 1, 0]).unwrap();
    let (got, closed) = common::read_until_closed(&mut clear);
    assert!(got.is_empty(), "no SOCKS reply in clear text: {got:?}");
    assert!(closed);
    common::wait_metric(
        &proxy,
        "socksgate_connections_refused_total{reason=\"tls_required\"}",
        1,
    );
    let mut tls = tls_connect(proxy.addr(), client_config(&p.ca_pem, None)).expect("tls");
    assert_eq!(socks5_over(&mut tls, echo.addr), 0);
    echo_round(&mut tls, b"ok");
}

#[test]
fn client_certificates_name_the_user_and_others_are_refused() {
    let p = pki("client-ca");
    let echo = TestServer::echo();
    // Users with passwords exist too: a password alone must not get in.
    let proxy = tls_proxy(&p, &["--tls-client-ca", p.ca(), "-U", "bob:pw"]);
    let (_, _, cert, key) = p.client("alice", &["alice.clients.test"]);
    let cfg = client_config(&p.ca_pem, Some((&cert, &key)));
    let mut tls = tls_connect(proxy.addr(), cfg).expect("handshake with a client cert");
    // Authenticated by the certificate: SOCKS5 without a password (users are configured, so a password-less
    // client would otherwise get 0xFF).
    assert_eq!(socks5_over(&mut tls, echo.addr), 0);
    echo_round(&mut tls, b"hello alice");
    drop(tls);
    assert!(proxy.wait_for(IO_TIMEOUT, || access_lines(&proxy)
        .iter()
        .any(|l| l.contains("user=alice.clients.test") && l.contains("tls=1.3"))));

    // No certificate, even with a password: the handshake fails with an alert.
    let e = tls_connect(proxy.addr(), client_config(&p.ca_pem, None))
        .and_then(|mut s| {
            // TLS 1.3: the client finishes first and learns of the refusal on its next read.
            s.write_all(&[5, 1, 2]).map_err(|e| e.to_string())?;
            s.flush().map_err(|e| e.to_string())?;
            let mut b = [0u8; 2];
            s.read_exact(&mut b).map_err(|e| e.to_string())?;
            Ok(s)
        })
        .map(|_| ())
        .expect_err("refused without a certificate");
    assert!(e.contains("CertificateRequired"), "{e}");

    // A certificate from another CA.
    let other = pki("client-ca-other");
    let (_, _, cert, key) = other.client("mallory", &["mallory.test"]);
    let e = tls_connect(proxy.addr(), client_config(&p.ca_pem, Some((&cert, &key))))
        .and_then(|mut s| {
            s.write_all(&[5, 1, 0]).map_err(|e| e.to_string())?;
            s.flush().map_err(|e| e.to_string())?;
            let mut b = [0u8; 2];
            s.read_exact(&mut b).map_err(|e| e.to_string())?;
            Ok(s)
        })
        .map(|_| ())
        .expect_err("refused with a foreign certificate");
    assert!(e.contains("UnknownCA"), "{e}");

    // Clear text: refused (--tls-client-ca implies --tls-only).
    let mut clear = common::connect(proxy.addr());
    clear.write_all(&[5, 1, 2]).unwrap();
    let (got, closed) = common::read_until_closed(&mut clear);
    assert!(got.is_empty() && closed);

    common::wait_metric(
        &proxy,
        "socksgate_tls_handshakes_total{outcome=\"client_cert\",version=\"unknown\"}",
        2,
    );
    if have_curl() {
        // curl with --proxy-cert: the identity is the first DNS SAN.
        let (cp, kp, _, _) = p.client("carol", &["carol.clients.test", "second.test"]);
        let origin = Origin::start();
        let (code, body, err) = common::curl(&[
            "-x",
            &format!("https://127.0.0.1:{}", proxy.addr().port()),
            "--proxy-cacert",
            p.ca(),
            "--proxy-cert",
            &cp,
            "--proxy-key",
            &kp,
            &origin.url("/cert"),
        ]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(body, b"path=/cert\n");
        assert!(proxy.wait_for(IO_TIMEOUT, || access_lines(&proxy)
            .iter()
            .any(|l| l.contains("user=carol.clients.test") && l.contains("proto=http"))));
    }
}

/// The leaf certificate the proxy presents.
fn presented_leaf(addr: SocketAddr, ca_pem: &str) -> Vec<u8> {
    let s = tls_connect(addr, client_config(ca_pem, None)).expect("handshake");
    s.conn.peer_certificates().unwrap()[0].to_vec()
}

#[test]
fn sighup_reloads_the_certificate_and_running_tunnels_survive() {
    let a = pki("reload-a");
    let b = pki("reload-b");
    let echo = TestServer::echo();
    // The proxy reads its files from a directory of its own, which the test rewrites.
    let dir = common::temp_path("tls-reload-live");
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::copy(&a.cert_path, &cert).unwrap();
    std::fs::copy(&a.key_path, &key).unwrap();
    let proxy = Proxy::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(presented_leaf(proxy.addr(), &a.ca_pem), a.leaf_der);
    let mut tunnel = tls_connect(proxy.addr(), client_config(&a.ca_pem, None)).unwrap();
    assert_eq!(socks5_over(&mut tunnel, echo.addr), 0);
    echo_round(&mut tunnel, b"before");

    // A broken file: the old certificate stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    proxy.reload();
    assert!(wait_log(&proxy, "keeping the old TLS certificate"));
    assert!(proxy.log().contains(cert.to_str().unwrap()));
    assert_eq!(presented_leaf(proxy.addr(), &a.ca_pem), a.leaf_der);

    // The new pair: the next handshake sees it.
    std::fs::copy(&b.cert_path, &cert).unwrap();
    std::fs::copy(&b.key_path, &key).unwrap();
    proxy.reload();
    assert!(wait_log(&proxy, "SIGHUP: reloaded TLS"));
    assert_eq!(presented_leaf(proxy.addr(), &b.ca_pem), b.leaf_der);
    // The tunnel made under the old certificate is untouched.
    echo_round(&mut tunnel, b"after reload");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn garbage_and_truncated_records_are_refused_and_counted() {
    let p = pki("garbage");
    let proxy = tls_proxy(&p, &[]);
    // A handshake record whose ClientHello is nonsense: an alert comes back, then the close.
    let mut s = common::connect(proxy.addr());
    s.write_all(b"\x16\x03\x01\x00\x08\x01\x00\x00\x04abcd")
        .unwrap();
    let (got, closed) = common::read_until_closed(&mut s);
    assert!(closed);
    assert_eq!(got.first(), Some(&0x15), "an alert record: {got:?}");
    // Half a ClientHello, then EOF: closed and counted, no hang.
    let hello = client_hello();
    let mut s = common::connect(proxy.addr());
    s.write_all(&hello[..hello.len() / 2]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (_, closed) = common::read_until_closed(&mut s);
    assert!(closed);
    // Records of an unknown type after the first byte.
    let mut s = common::connect(proxy.addr());
    s.write_all(b"\x16\x03\x03\x00\x01\x01\x63\x03\x03\x00\x05hello")
        .unwrap();
    let (_, closed) = common::read_until_closed(&mut s);
    assert!(closed);
    common::wait_metric(
        &proxy,
        "socksgate_tls_handshakes_total{outcome=\"error\",version=\"unknown\"}",
        2,
    );
    common::wait_metric(
        &proxy,
        "socksgate_tls_handshakes_total{outcome=\"aborted\",version=\"unknown\"}",
        1,
    );
    // The proxy is fine afterwards.
    assert!(tls_connect(proxy.addr(), client_config(&p.ca_pem, None)).is_ok());
    assert!(access_lines(&proxy)
        .iter()
        .any(|l| l.contains("end=tls_error")));
}

/// A ClientHello as a real client sends it.
fn client_hello() -> Vec<u8> {
    let p = pki("hello");
    let mut c = ClientConnection::new(
        client_config(&p.ca_pem, None),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    c.write_tls(&mut out).unwrap();
    out
}

#[test]
fn a_stalled_handshake_is_closed_at_the_deadline() {
    let p = pki("stall");
    let proxy = tls_proxy(&p, &["--handshake-timeout", "1s"]);
    let hello = client_hello();
    let mut s = common::connect(proxy.addr());
    let start = Instant::now();
    s.write_all(&hello[..hello.len() - 10]).unwrap();
    let (_, closed) = common::read_until_closed(&mut s);
    let took = start.elapsed();
    assert!(closed);
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    assert!(took < Duration::from_secs(8), "closed after {took:?}");
    common::wait_metric(
        &proxy,
        "socksgate_tls_handshakes_total{outcome=\"timeout\",version=\"unknown\"}",
        1,
    );
    // A client that completes TLS and then stalls in SOCKS is cut off by the same deadline.
    let mut t = tls_connect(proxy.addr(), client_config(&p.ca_pem, None)).unwrap();
    t.write_all(&[5]).unwrap();
    t.flush().unwrap();
    let mut b = [0u8; 1];
    let r = t.read(&mut b);
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
}

/// A target that reads until EOF and reports the bytes, then answers and closes.
fn sink_server() -> (TestServer, mpsc::Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let server = TestServer::start(move |mut s| {
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let _ = s.write_all(b"bye");
        let _ = tx.lock().unwrap().send(got);
    });
    (server, rx)
}

#[test]
fn close_notify_and_bare_eof_both_end_the_tunnel() {
    let p = pki("close");
    let (sink, got) = sink_server();
    let proxy = tls_proxy(&p, &[]);
    let cfg = client_config(&p.ca_pem, None);

    // close_notify: the target sees EOF after every byte; its answer and our close_notify come back.
    let mut t = tls_connect(proxy.addr(), Arc::clone(&cfg)).unwrap();
    assert_eq!(socks5_over(&mut t, sink.addr), 0);
    t.write_all(b"payload one").unwrap();
    t.conn.send_close_notify();
    t.flush().unwrap();
    assert_eq!(got.recv_timeout(IO_TIMEOUT).unwrap(), b"payload one");
    let mut back = Vec::new();
    let r = t.read_to_end(&mut back);
    assert!(r.is_ok(), "a clean close_notify from the proxy: {r:?}");
    assert_eq!(back, b"bye");

    // A bare TCP half-close (no close_notify): an end all the same.
    let mut t = tls_connect(proxy.addr(), cfg).unwrap();
    assert_eq!(socks5_over(&mut t, sink.addr), 0);
    t.write_all(b"payload two").unwrap();
    t.flush().unwrap();
    t.sock.shutdown(Shutdown::Write).unwrap();
    assert_eq!(got.recv_timeout(IO_TIMEOUT).unwrap(), b"payload two");
    let mut back = Vec::new();
    let _ = t.read_to_end(&mut back);
    assert_eq!(back, b"bye");
    assert!(proxy.wait_for(IO_TIMEOUT, || access_lines(&proxy)
        .iter()
        .filter(|l| l.contains("tls=1.3") && l.contains("end=done"))
        .count()
        >= 2));
}

fn python_socks_available() -> bool {
    Command::new("python3")
        .args(["-c", "import python_socks.sync.v2"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn python_socks_with_proxy_ssl() {
    if !python_socks_available() {
        eprintln!("python-socks not installed (pip install python-socks): skipping");
        return;
    }
    let p = pki("python");
    let echo = TestServer::echo();
    let origin = Origin::start();
    let proxy = tls_proxy(&p, &["-U", "alice:pw"]);
    let script = r#"
import ssl, sys
from python_socks import ProxyType
from python_socks.sync.v2 import Proxy
ca, port, echo_port, origin_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ctx = ssl.create_default_context(cafile=ca)
for kind in (ProxyType.SOCKS5, ProxyType.HTTP):
    proxy = Proxy(kind, "127.0.0.1", port, username="alice", password="pw", proxy_ssl=ctx)
    target = echo_port if kind == ProxyType.SOCKS5 else origin_port
    stream = proxy.connect("127.0.0.1", target, timeout=20)
    if kind == ProxyType.SOCKS5:
        stream.write(b"hello over tls")
        got = b""
        while len(got) < 14:
            got += stream.read(100)
        assert got == b"hello over tls", got
    else:
        stream.write(b"GET /py HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = b""
        while True:
            chunk = stream.read(4096)
            if not chunk:
                break
            got += chunk
        assert got.endswith(b"path=/py\n"), got
    stream.close()
print("ok")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(p.ca())
        .arg(proxy.addr().port().to_string())
        .arg(echo.addr.port().to_string())
        .arg(origin.addr.port().to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python-socks failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert!(proxy.wait_for(IO_TIMEOUT, || access_lines(&proxy)
        .iter()
        .any(|l| l.contains("user=alice")
            && l.contains("proto=socks5")
            && l.contains("tls=1.3"))));
}

#[test]
fn bad_files_at_start_exit_2_naming_the_file() {
    let p = pki("badstart");
    let garbage = p.dir.join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    for (args, needle) in [
        (
            vec![
                "--tls-cert",
                garbage.to_str().unwrap(),
                "--tls-key",
                p.key(),
            ],
            format!(
                "--tls-cert {}: no CERTIFICATE block found",
                garbage.display()
            ),
        ),
        (
            vec![
                "--tls-cert",
                p.cert(),
                "--tls-key",
                garbage.to_str().unwrap(),
            ],
            format!("--tls-key {}: no private key found", garbage.display()),
        ),
        (
            vec!["--tls-cert", p.cert()],
            "--tls-cert needs --tls-key".to_string(),
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_socksgate"))
            .args(["-l", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&needle), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn public_listener_with_passwords_in_clear_text_warns() {
    let p = pki("warn");
    // Bound on the wildcard address, but only ever connected to over loopback.
    let proxy = Proxy::spawn(&[
        "-l",
        "0.0.0.0:0",
        "-U",
        "a:b",
        "--tls-cert",
        p.cert(),
        "--tls-key",
        p.key(),
    ]);
    assert!(wait_log(&proxy, "passwords in clear text"));
    let quiet = Proxy::spawn(&[
        "-l",
        "0.0.0.0:0",
        "-U",
        "a:b",
        "--tls-cert",
        p.cert(),
        "--tls-key",
        p.key(),
        "--tls-only",
    ]);
    assert!(wait_log(&quiet, "TLS on every listener (TLS only)"));
    assert!(!quiet.log().contains("clear text"));
}

#[test]
fn http_forwarding_bulk_through_tls_both_ways() {
    let p = pki("bulk");
    let origin = Origin::start();
    let proxy = tls_proxy(&p, &[]);
    let mut t = tls_connect(proxy.addr(), client_config(&p.ca_pem, None)).unwrap();
    // Download 8 MiB, then upload 4 MiB and get it echoed, on one kept-alive connection.
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        origin.url("/big"),
        origin.authority()
    );
    t.write_all(req.as_bytes()).unwrap();
    t.flush().unwrap();
    let body = read_response_body(&mut t);
    assert_eq!(
        common::digest(&body),
        common::digest(&common::origin::big_body(common::origin::BIG_DEFAULT))
    );
    let up = common::pseudo_random(3, 4 << 20);
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
        origin.url("/echo"),
        origin.authority(),
        up.len()
    );
    t.write_all(req.as_bytes()).unwrap();
    // Upload and download at once would need two threads over one rustls stream; the origin reads the whole
    // body before answering, so writing it all first is fine.
    for c in up.chunks(64 * 1024) {
        t.write_all(c).unwrap();
    }
    t.flush().unwrap();
    let body = read_response_body(&mut t);
    assert_eq!(common::digest(&body), common::digest(&up));
}

/// Reads one Content-Length response and returns its body.
fn read_response_body(t: &mut Tls) -> Vec<u8> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        t.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .expect("content-length")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    t.read_exact(&mut body).unwrap();
    body
}

#[test]
fn tls_upstreams_through_a_second_socksgate() {
    let p = pki("upstream");
    let echo = TestServer::echo();
    // The upstream: a socksgate serving TLS, with a password.
    let gw2 = tls_proxy(&p, &["-U", "up:pw", "--tls-only"]);
    let port = gw2.addr().port();
    let big = common::pseudo_random(11, 2 << 20);
    for (scheme, proto) in [("socks5s", "proto=socks5"), ("https", "proto=http")] {
        let url = format!("{scheme}://up:pw@localhost:{port}");
        let gw1 = Proxy::start(&["--upstream", &url, "--upstream-ca", p.ca()]);
        let mut c = common::socks5_connect(gw1.addr(), echo.addr).expect("chained connect");
        echo_round(&mut c, b"through two gateways");
        echo_round(&mut c, &big);
        drop(c);
        // The second gateway saw TLS 1.3 and the upstream credentials (which never crossed in clear text).
        assert!(
            gw2.wait_for(IO_TIMEOUT, || access_lines(&gw2)
                .iter()
                .any(|l| l.contains("user=up")
                    && l.contains(proto)
                    && l.contains("tls=1.3"))),
            "{scheme}: {}",
            gw2.log()
        );
    }
    // An upstream whose certificate does not chain to --upstream-ca: the client gets a failure reply.
    let other = pki("upstream-other");
    let url = format!("socks5s://up:pw@localhost:{port}");
    let gw1 = Proxy::start(&["--upstream", &url, "--upstream-ca", other.ca()]);
    assert_eq!(common::socks5_connect(gw1.addr(), echo.addr).err(), Some(1));
    common::wait_metric(
        &gw2,
        "socksgate_tls_handshakes_total{outcome=\"error\",version=\"unknown\"}",
        1,
    );
    // --upstream-insecure accepts it (the operator's word).
    let gw1 = Proxy::start(&["--upstream", &url, "--upstream-insecure"]);
    let mut c = common::socks5_connect(gw1.addr(), echo.addr).expect("insecure upstream");
    echo_round(&mut c, b"insecure but encrypted");
    // Flags that make no sense without a TLS upstream are refused at start.
    let out = Command::new(env!("CARGO_BIN_EXE_socksgate"))
        .args(["-l", "127.0.0.1:0", "--upstream-insecure"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A user named by her client certificate has the policy's quota like any other (issue 12): SOCKS5 stops at it,
/// and then SOCKS4 (which such a user may speak) is refused with 91, SOCKS5 with 0x02.
#[test]
fn client_certificate_user_is_held_to_her_quota() {
    let p = pki("cert-quota");
    let echo = TestServer::echo();
    let policy = common::temp_path("cert-quota.toml");
    std::fs::write(
        &policy,
        "[users.\"alice.clients.test\"]\npassword = \"unused\"\nquota = \"1KiB\"\n",
    )
    .unwrap();
    let proxy = tls_proxy(
        &p,
        &[
            "--tls-client-ca",
            p.ca(),
            "--policy",
            policy.to_str().unwrap(),
        ],
    );
    let (_, _, cert, key) = p.client("alice", &["alice.clients.test"]);
    let cfg = client_config(&p.ca_pem, Some((&cert, &key)));
    let mut tls = tls_connect(proxy.addr(), Arc::clone(&cfg)).expect("handshake");
    assert_eq!(socks5_over(&mut tls, echo.addr), 0);
    echo_round(&mut tls, &[b'q'; 500]);
    // 1000 of 1024 bytes used: 24 more go up, nothing comes back, the tunnel closes.
    tls.write_all(&[b'r'; 100]).unwrap();
    tls.flush().unwrap();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "nothing beyond the quota: {} bytes",
        rest.len()
    );
    assert!(proxy.wait_for(IO_TIMEOUT, || access_lines(&proxy)
        .iter()
        .any(|l| l.contains("user=alice.clients.test") && l.contains("end=quota"))));

    let mut s4 = tls_connect(proxy.addr(), Arc::clone(&cfg)).expect("handshake");
    s4.write_all(&common::socks4_request(
        1,
        echo.addr.port(),
        [127, 0, 0, 1],
        b"",
        None,
    ))
    .unwrap();
    s4.flush().unwrap();
    let mut r = [0u8; 8];
    s4.read_exact(&mut r).unwrap();
    assert_eq!(r[1], 91, "SOCKS4 after the quota");
    let mut s5 = tls_connect(proxy.addr(), cfg).expect("handshake");
    assert_eq!(
        socks5_over(&mut s5, echo.addr),
        0x02,
        "SOCKS5 after the quota"
    );
}

/// A gateway with `policy` as its policy file, /metrics, and `extra` flags.
fn group_gateway(policy: &str, name: &str, extra: &[&str]) -> Proxy {
    let path = common::temp_path(name);
    std::fs::write(&path, policy).unwrap();
    let mut args = vec![
        "--metrics",
        "127.0.0.1:0",
        "--policy",
        path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

fn group_series(kind: &str, group: &str, server: &str) -> String {
    format!("socksgate_upstream_{kind}{{group=\"{group}\",server=\"{server}\"}}")
}

/// A failover group of TLS members: the first is down, the second's certificate does not chain to the group's
/// `ca`, the third carries the tunnel. Both failures count against their members; the carrying member saw TLS 1.3
/// and the credentials. A group with `insecure = true` accepts the unverifiable member.
#[test]
fn tls_group_fails_over_past_a_dead_and_an_unverified_member() {
    let p = pki("group");
    let other = pki("group-other");
    let echo = TestServer::echo();
    let good = tls_proxy(&p, &["-U", "up:pw", "--tls-only"]);
    let bad = tls_proxy(&other, &["--tls-only"]);
    let dead = common::closed_port();
    let (g, b) = (good.addr().port(), bad.addr().port());
    let policy = format!(
        "[upstreams.corp]\nservers = [\"socks5s://127.0.0.1:{dead}\", \"socks5s://127.0.0.1:{b}\", \
         \"socks5s://up:pw@127.0.0.1:{g}\"]\nca = \"{}\"\n\n[[rules]]\naction = \"via:corp\"\n",
        p.ca()
    );
    let gw = group_gateway(&policy, "tls-group.toml", &[]);
    let mut c = common::socks5_connect(gw.addr(), echo.addr).expect("CONNECT through the group");
    echo_round(&mut c, b"past two failed members");
    echo_round(&mut c, &common::pseudo_random(21, 1 << 20));
    drop(c);
    let dead_label = format!("socks5s://127.0.0.1:{dead}");
    let bad_label = format!("socks5s://127.0.0.1:{b}");
    let good_label = format!("socks5s://up@127.0.0.1:{g}");
    common::wait_metric(&gw, &group_series("failures_total", "corp", &dead_label), 1);
    common::wait_metric(&gw, &group_series("failures_total", "corp", &bad_label), 1);
    common::wait_metric(&gw, &group_series("attempts_total", "corp", &good_label), 1);
    common::wait_metric(&gw, &group_series("failures_total", "corp", &good_label), 0);
    // The unverified member got as far as a TLS handshake that our side refused, and carried nothing.
    common::wait_metric(
        &bad,
        "socksgate_tls_handshakes_total{outcome=\"error\",version=\"unknown\"}",
        1,
    );
    assert!(
        access_lines(&bad)
            .iter()
            .all(|l| l.contains("end=tls_error")),
        "{}",
        bad.log()
    );
    assert!(
        good.wait_for(IO_TIMEOUT, || access_lines(&good)
            .iter()
            .any(|l| l.contains("user=up")
                && l.contains("proto=socks5")
                && l.contains("tls=1.3"))),
        "{}",
        good.log()
    );
    // The operator's word for this group: its member's certificate is not checked.
    let policy = format!(
        "[upstreams.lax]\nservers = [\"socks5s://127.0.0.1:{b}\"]\ninsecure = true\n\n[[rules]]\naction = \"via:lax\"\n"
    );
    let gw = group_gateway(&policy, "tls-group-lax.toml", &[]);
    let mut c = common::socks5_connect(gw.addr(), echo.addr).expect("insecure member");
    echo_round(&mut c, b"insecure but encrypted");
}

/// A round-robin group of a clear SOCKS5 member and an `https://` member verified by `--upstream-ca` (the flag
/// is the default for groups): sessions alternate, the bytes arrive whole through both, and the TLS member saw
/// HTTP CONNECT inside TLS with its credentials. A bad group key is a start-up error naming file, line and key.
#[test]
fn a_group_mixing_clear_and_tls_members() {
    let p = pki("group-mixed");
    let echo = TestServer::echo();
    let clear = Proxy::start(&["--metrics", "127.0.0.1:0"]);
    let tls = tls_proxy(&p, &["-U", "up:pw", "--tls-only"]);
    let policy = format!(
        "[upstreams.mix]\nservers = [\"socks5://{}\", \"https://up:pw@127.0.0.1:{}\"]\nstrategy = \"round-robin\"\n\n\
         [[rules]]\naction = \"via:mix\"\n",
        clear.addr(),
        tls.addr().port()
    );
    let gw = group_gateway(&policy, "tls-group-mixed.toml", &["--upstream-ca", p.ca()]);
    for i in 0..4 {
        let mut c =
            common::socks5_connect(gw.addr(), echo.addr).expect("CONNECT through the group");
        echo_round(&mut c, &common::pseudo_random(30 + i, 256 << 10));
    }
    let tls_label = format!("https://up@127.0.0.1:{}", tls.addr().port());
    let clear_label = format!("socks5://{}", clear.addr());
    common::wait_metric(&gw, &group_series("attempts_total", "mix", &tls_label), 2);
    common::wait_metric(&gw, &group_series("attempts_total", "mix", &clear_label), 2);
    common::wait_metric(&gw, &group_series("failures_total", "mix", &tls_label), 0);
    common::wait_metric(&clear, "socksgate_connections_accepted_total", 2);
    assert!(
        tls.wait_for(IO_TIMEOUT, || access_lines(&tls)
            .iter()
            .filter(|l| l.contains("user=up") && l.contains("proto=http") && l.contains("tls=1.3"))
            .count()
            == 2),
        "{}",
        tls.log()
    );
    // Group keys are checked like any other: an unreadable CA names the file, the line and the key.
    let path = common::temp_path("tls-group-bad.toml");
    std::fs::write(
        &path,
        "[upstreams.mix]\nservers = [\"https://127.0.0.1:1\"]\nca = \"/nonexistent/ca.pem\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_socksgate"))
        .args(["-l", "127.0.0.1:0", "--policy", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls-group-bad.toml:3: upstreams.mix.ca:")
            && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );
}

/// Reads an HTTP/1.1 request head and answers it with `body` as text/html, then closes.
fn serve_page(s: &mut impl ReadWrite, body: &str) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return,
        }
    }
    let status = if head.starts_with(b"GET / ") {
        "200 OK"
    } else {
        "404 Not Found"
    };
    let body = if status.starts_with("200") { body } else { "" };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.flush();
}

/// Chrome's `--ignore-certificate-errors-spki-list` value for the test leaf: base64 of the SHA-256 of its
/// SubjectPublicKeyInfo. Pinning this one key keeps Chrome's verification on for everything else.
fn spki_pin(leaf_der: &[u8]) -> String {
    use base64::Engine;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf_der).unwrap();
    let sha256 = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .unwrap()
        .common
        .hash_provider;
    let digest = sha256.hash(cert.tbs_certificate.subject_pki.raw);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// Runs headless Chromium through `proxy` on `url` with `--dump-dom`, bounded in time; returns the DOM.
fn chromium_dump(proxy: &str, url: &str, pin: Option<&str>, dir: &std::path::Path) -> String {
    let profile = dir.join(format!("profile-{}", pin.is_some()));
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        // Chrome sends loopback targets around a proxy unless told not to.
        "--proxy-bypass-list=<-loopback>",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(format!("--proxy-server={proxy}"))
    .env("HOME", dir)
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    if let Some(pin) = pin {
        cmd.arg(format!("--ignore-certificate-errors-spki-list={pin}"));
    }
    cmd.args(["--dump-dom", url]);
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            // Only the browser we started, by its PID; its helpers exit with it.
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish {url} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap()
}

/// Chromium with `--proxy-server=https://...` loads a plain http:// page (forwarded inside TLS) and an https://
/// page (CONNECT inside TLS) through socksgate with `--tls-cert`; the proxy's certificate is verified (only its
/// key is pinned), and without the pin Chrome refuses the proxy.
#[test]
fn chromium_through_the_https_proxy() {
    if Command::new("chromium").arg("--version").output().is_err() {
        eprintln!("chromium not installed: skipping");
        return;
    }
    let p = pki("chrome");
    let dir = p.dir.join("chrome");
    std::fs::create_dir_all(&dir).unwrap();
    let nonce = format!("{:016x}", common::digest(&common::pseudo_random(7, 64)));
    let plain_body = format!("<html><body><p id=\"m\">plain page {nonce}</p></body></html>");
    let tls_body = format!("<html><body><p id=\"m\">tls page {nonce}</p></body></html>");
    let plain = {
        let body = plain_body.clone();
        TestServer::start(move |mut s| serve_page(&mut s, &body))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(p.cert())
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(p.key()).unwrap();
    let server_cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let secure = {
        let body = tls_body.clone();
        TestServer::start(move |s| {
            let Ok(conn) = rustls::ServerConnection::new(Arc::clone(&server_cfg)) else {
                return;
            };
            let mut t = StreamOwned::new(conn, s);
            serve_page(&mut t, &body);
            t.conn.send_close_notify();
            let _ = t.flush();
        })
    };
    // Chrome's own background requests reach the proxy too: a nameserver on a closed loopback port makes their
    // names fail at once, so no query leaves the machine.
    let dns = format!("127.0.0.1:{}", common::closed_port());
    let gw = tls_proxy(&p, &["--tls-only", "--dns", &dns]);
    let proxy = format!("https://127.0.0.1:{}", gw.addr().port());
    let pin = spki_pin(&p.leaf_der);

    let dom = chromium_dump(&proxy, &format!("http://{}/", plain.addr), Some(&pin), &dir);
    assert!(
        dom.contains(&format!("plain page {nonce}")),
        "DOM: {dom}\n{}",
        gw.log()
    );
    let dom = chromium_dump(
        &proxy,
        &format!("https://{}/", secure.addr),
        Some(&pin),
        &dir,
    );
    assert!(
        dom.contains(&format!("tls page {nonce}")),
        "DOM: {dom}\n{}",
        gw.log()
    );
    let lines = access_lines(&gw);
    let forwarded = format!("url=http://{}/ status=200 tls=1.3", plain.addr);
    assert!(lines.iter().any(|l| l.contains(&forwarded)), "{}", gw.log());
    let tunnel = format!("target={} tls=1.3", secure.addr);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("proto=http") && l.contains(&tunnel)),
        "{}",
        gw.log()
    );
    // Without the pin Chrome verifies the proxy's certificate against its roots and refuses it.
    let dom = chromium_dump(&proxy, &format!("http://{}/", plain.addr), None, &dir);
    assert!(!dom.contains(&nonce), "DOM: {dom}");
}

/// Forwarded plain HTTP through a group whose first `https://` member's certificate does not verify: the
/// request waits for the TLS handshake, the refusal counts against that member, and the second member forwards
/// the request (inside TLS) to the origin.
#[test]
fn http_forwarding_through_a_tls_group_skips_an_unverified_member() {
    let p = pki("group-forward");
    let other = pki("group-forward-other");
    let page = TestServer::start(|mut s| serve_page(&mut s, "forwarded through TLS"));
    let good = tls_proxy(&p, &["--tls-only"]);
    let bad = tls_proxy(&other, &["--tls-only"]);
    let (g, b) = (good.addr().port(), bad.addr().port());
    let policy = format!(
        "[upstreams.web]\nservers = [\"https://127.0.0.1:{b}\", \"https://127.0.0.1:{g}\"]\nca = \"{}\"\n\n\
         [[rules]]\naction = \"via:web\"\n",
        p.ca()
    );
    let gw = group_gateway(&policy, "tls-group-forward.toml", &[]);
    let mut s = common::connect(gw.addr());
    write!(
        s,
        "GET http://{0}/ HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
        page.addr
    )
    .unwrap();
    let (resp, _) = common::read_until_closed(&mut s);
    let resp = String::from_utf8_lossy(&resp);
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.ends_with("forwarded through TLS"),
        "{resp}\n{}",
        gw.log()
    );
    common::wait_metric(
        &gw,
        &group_series("failures_total", "web", &format!("https://127.0.0.1:{b}")),
        1,
    );
    common::wait_metric(
        &gw,
        &group_series("failures_total", "web", &format!("https://127.0.0.1:{g}")),
        0,
    );
    let forwarded = format!("url=http://{}/ status=200 tls=1.3", page.addr);
    assert!(
        good.wait_for(IO_TIMEOUT, || access_lines(&good)
            .iter()
            .any(|l| l.contains(&forwarded))),
        "{}",
        good.log()
    );
}
