//! TLS on the proxy port: loading certificates and keys, the shared server configuration (swapped on SIGHUP), and
//! client-certificate identities. The per-connection transport lives in [`session`].
//!
//! Everything here runs on the control thread (start, SIGHUP) except [`TlsAcceptor::session`], which a worker calls
//! once per TLS connection: it takes a read lock to clone an `Arc`, so a reload never blocks a loop for longer
//! than that swap.

pub mod session;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use session::{Established, TlsFailure, TlsSession, TlsVersion, Transport};

/// The only ALPN protocol offered: the proxy speaks HTTP/1.1 (and SOCKS, which has no ALPN id) inside TLS. A
/// client that would otherwise pick h2 falls back to HTTP/1.1 instead of sending frames we do not speak.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Outgoing bytes rustls may hold per connection (plaintext waiting for the handshake, or records waiting for the
/// socket). The transport hands rustls new plaintext only once earlier records reached the kernel, so a leg holds
/// at most one relay buffer's worth (`--buffer-size`) up to this cap. Above one record (16 KiB) so that a larger
/// relay buffer goes out as several records in one writev instead of one syscall per record.
pub const BUFFER_LIMIT: usize = 64 * 1024;

/// A certificate, key or CA file that could not be used. The message names the flag, the file and the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

fn err(flag: &str, path: &Path, problem: impl fmt::Display) -> TlsError {
    TlsError(format!("{flag} {}: {problem}", path.display()))
}

/// The files a TLS server configuration is built from; kept to re-read them on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first (`--tls-cert`).
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) (`--tls-key`).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to (`--tls-client-ca`).
    pub client_ca: Option<PathBuf>,
}

impl fmt::Display for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "certificate \"{}\" (chain of {}, valid until {})",
            self.subject, self.chain_len, self.not_after
        )?;
        if self.client_cas > 0 {
            write!(
                f,
                ", client certificates required ({} CA certificates)",
                self.client_cas
            )?;
        }
        Ok(())
    }
}

/// What a successful load found, for the start and reload log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// Certificates in the chain sent to clients.
    pub chain_len: usize,
    /// The leaf's subject, for the log.
    pub subject: String,
    /// The leaf's notAfter, for the log.
    pub not_after: String,
    /// Problems worth a warning that do not stop the load (expired or not yet valid leaf).
    pub warnings: Vec<String>,
    /// CA certificates loaded from `--tls-client-ca`.
    pub client_cas: usize,
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| err(flag, path, format!("cannot read: {e}")))
}

fn load_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(flag, path, format!("not a valid PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(err(flag, path, "no CERTIFICATE block found"));
    }
    for (i, c) in certs.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(c) {
            return Err(err(
                flag,
                path,
                format!("certificate {} does not parse: {e}", i + 1),
            ));
        }
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let flag = "--tls-key";
    let pem = read(flag, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => err(
            flag,
            path,
            "no private key found (expected a PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block)",
        ),
        e => err(flag, path, format!("not a valid PEM key file: {e}")),
    })
}

/// Subject, notAfter and validity warnings of a leaf certificate (already known to parse).
fn describe_leaf(der: &[u8]) -> (String, String, Vec<String>) {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return ("?".into(), "?".into(), Vec::new());
    };
    let validity = cert.validity();
    let mut warnings = Vec::new();
    let now = x509_parser::time::ASN1Time::now();
    if validity.not_after < now {
        warnings.push(format!("the certificate expired on {}", validity.not_after));
    } else if validity.not_before > now {
        warnings.push(format!(
            "the certificate is not valid before {}",
            validity.not_before
        ));
    }
    (
        cert.subject().to_string(),
        validity.not_after.to_string(),
        warnings,
    )
}

/// The CA certificates of `path` (`flag` names it in errors), each one checked as a trust anchor.
fn load_roots(flag: &str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(flag, path)? {
        roots
            .add(c)
            .map_err(|e| err(flag, path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the files and builds a server configuration: TLS 1.3 and 1.2, ALPN `http/1.1`, the whole chain sent, and
/// client certificates required when a client CA is given.
pub fn load(files: &TlsFiles) -> Result<(Arc<ServerConfig>, Loaded), TlsError> {
    let chain = load_certs("--tls-cert", &files.cert)?;
    let key = load_key(&files.key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS setup failed: {e}")))?;
    let mut client_cas = 0;
    let builder = match &files.client_ca {
        Some(path) => {
            let flag = "--tls-client-ca";
            let roots = load_roots(flag, path)?;
            client_cas = roots.len();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| err(flag, path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let (subject, not_after, warnings) = describe_leaf(&chain[0]);
    let chain_len = chain.len();
    let mut cfg = builder.with_single_cert(chain, key).map_err(|e| {
        TlsError(format!(
            "--tls-cert {} / --tls-key {}: {}",
            files.cert.display(),
            files.key.display(),
            match e {
                rustls::Error::InconsistentKeys(_) => {
                    "the key does not belong to the certificate".to_string()
                }
                e => format!("unusable certificate or key: {e}"),
            }
        ))
    })?;
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok((
        Arc::new(cfg),
        Loaded {
            chain_len,
            subject,
            not_after,
            warnings,
            client_cas,
        },
    ))
}

/// How the certificates of TLS upstreams (`https://`, `socks5s://`) are checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UpstreamTrust {
    /// The system's CA certificates (`/etc/ssl/certs` and the like).
    System,
    /// Only CAs from this PEM file (`--upstream-ca`).
    Ca(PathBuf),
    /// No chain or name check, only the handshake signatures (`--upstream-insecure`).
    Insecure,
}

/// A client configuration for TLS upstreams: TLS 1.3 and 1.2, the upstream's name checked against its
/// certificate (unless [`UpstreamTrust::Insecure`]), ALPN `http/1.1` for `https://` upstreams.
pub fn upstream_client_config(
    trust: &UpstreamTrust,
    http: bool,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS setup failed: {e}")))?;
    let mut cfg = match trust {
        UpstreamTrust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoChainCheck(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth(),
        UpstreamTrust::System => {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError(
                    "--upstream: no system CA certificates found (install ca-certificates, or name a CA with \
                     --upstream-ca FILE)"
                        .to_string(),
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        UpstreamTrust::Ca(path) => builder
            .with_root_certificates(load_roots("--upstream-ca", path)?)
            .with_no_client_auth(),
    };
    if http {
        cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    }
    Ok(Arc::new(cfg))
}

/// `--upstream-insecure`: any certificate and name are accepted, but the handshake signatures are still checked,
/// so the session keys at least belong to the key in the certificate presented.
#[derive(Debug)]
struct NoChainCheck(rustls::crypto::WebPkiSupportedAlgorithms);

/// The signature checks' argument and result, named once for the two methods the trait wants (one per version).
type Dss = rustls::DigitallySignedStruct;
type Valid = Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>;

impl rustls::client::danger::ServerCertVerifier for NoChainCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, msg: &[u8], cert: &CertificateDer<'_>, dss: &Dss) -> Valid {
        rustls::crypto::verify_tls12_signature(msg, cert, dss, &self.0)
    }

    fn verify_tls13_signature(&self, msg: &[u8], cert: &CertificateDer<'_>, dss: &Dss) -> Valid {
        rustls::crypto::verify_tls13_signature(msg, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// The TLS side of the listeners: the current server configuration, swapped whole on reload.
pub struct TlsAcceptor {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    loaded: RwLock<Loaded>,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Loads the files once (at start: an error here exits 2).
    pub fn load(files: TlsFiles) -> Result<(TlsAcceptor, Loaded), TlsError> {
        let (cfg, loaded) = load(&files)?;
        Ok((
            TlsAcceptor {
                files,
                current: RwLock::new(cfg),
                loaded: RwLock::new(loaded.clone()),
            },
            loaded,
        ))
    }

    /// Re-reads the files (SIGHUP, on the control thread). On error the old configuration stays in use; on success
    /// new handshakes use the new one and running sessions keep theirs.
    pub fn reload(&self) -> Result<Loaded, TlsError> {
        let (cfg, loaded) = load(&self.files)?;
        match self.current.write() {
            Ok(mut cur) => *cur = cfg,
            Err(poisoned) => *poisoned.into_inner() = cfg,
        }
        match self.loaded.write() {
            Ok(mut l) => *l = loaded.clone(),
            Err(poisoned) => *poisoned.into_inner() = loaded.clone(),
        }
        Ok(loaded)
    }

    /// What the last successful load found.
    pub fn loaded(&self) -> Loaded {
        match self.loaded.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The files this acceptor reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// True when clients must present a certificate from `--tls-client-ca`.
    pub fn requires_client_cert(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration new handshakes use.
    pub fn config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// A server session for a new TLS connection.
    pub fn session(&self) -> Result<TlsSession, rustls::Error> {
        TlsSession::new(self.config())
    }
}

/// The identity a verified client certificate carries: its first DNS subjectAltName, else its subject CN. Only
/// this module creates one, from a certificate rustls verified against `--tls-client-ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity(Arc<str>);

impl CertIdentity {
    /// The identity as a user name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Reads the identity of a (verified) end-entity certificate. `None` when it has neither a DNS SAN nor a CN,
    /// or when the name is not a printable ASCII token of 1 to 255 bytes (it becomes a user name in logs,
    /// limits and policy, where spaces and control characters would be ambiguous or dangerous).
    pub(crate) fn from_verified_cert(der: &[u8]) -> Option<CertIdentity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut name: Option<String> = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            name = san.value.general_names.iter().find_map(|g| match g {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            });
        }
        if name.is_none() {
            name = cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_string);
        }
        let name = name?;
        let ok = !name.is_empty()
            && name.len() <= 255
            && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        ok.then(|| CertIdentity(name.into()))
    }
}

#[cfg(test)]
pub(crate) mod testcerts {
    //! Throwaway certificates for unit tests, made fresh by rcgen on every run (no key is ever committed).

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

    /// A CA and a leaf it signed, as PEM.
    pub(crate) struct Pki {
        pub(crate) ca_pem: String,
        pub(crate) leaf_pem: String,
        pub(crate) leaf_key_pem: String,
        pub(crate) ca: rcgen::CertifiedIssuer<'static, KeyPair>,
    }

    pub(crate) fn ca(name: &str) -> rcgen::CertifiedIssuer<'static, KeyPair> {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("key");
        rcgen::CertifiedIssuer::self_signed(p, key).expect("ca")
    }

    /// A leaf signed by `ca`, with these DNS SANs and CN; returns (cert PEM, key PEM).
    pub(crate) fn leaf(
        ca: &rcgen::CertifiedIssuer<'static, KeyPair>,
        sans: &[&str],
        cn: Option<&str>,
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> (String, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.subject_alt_names = sans
            .iter()
            .map(|s| SanType::DnsName((*s).try_into().expect("dns name")))
            .collect();
        if let Some(cn) = cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate_for(alg).expect("key");
        let cert = p.signed_by(&key, ca).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    pub(crate) fn pki(alg: &'static rcgen::SignatureAlgorithm) -> Pki {
        let ca = ca("socksgate test CA");
        let (leaf_pem, leaf_key_pem) = leaf(&ca, &["localhost"], Some("localhost"), alg);
        Pki {
            ca_pem: ca.pem(),
            leaf_pem,
            leaf_key_pem,
            ca,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testcerts::*;
    use super::*;
    use std::io::Write as _;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tmpdir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("socksgate-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        Dir(d)
    }
    fn write(dir: &Dir, name: &str, text: &str) -> PathBuf {
        let p = dir.0.join(name);
        std::fs::File::create(&p)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .expect("write");
        p
    }

    #[test]
    fn loads_ecdsa_ed25519_and_full_chain() {
        for (tag, alg) in [
            ("p256", &rcgen::PKCS_ECDSA_P256_SHA256),
            ("p384", &rcgen::PKCS_ECDSA_P384_SHA384),
            ("ed25519", &rcgen::PKCS_ED25519),
        ] {
            let d = tmpdir(tag);
            let pki = pki(alg);
            let chain = format!("{}{}", pki.leaf_pem, pki.ca_pem);
            let files = TlsFiles {
                cert: write(&d, "cert.pem", &chain),
                key: write(&d, "key.pem", &pki.leaf_key_pem),
                client_ca: Some(write(&d, "ca.pem", &pki.ca_pem)),
            };
            let (acc, loaded) = TlsAcceptor::load(files).expect(tag);
            assert_eq!(loaded.chain_len, 2, "{tag}");
            assert_eq!(loaded.client_cas, 1);
            assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
            assert!(acc.requires_client_cert());
            assert_eq!(acc.config().alpn_protocols, vec![b"http/1.1".to_vec()]);
        }
    }

    /// Runs `openssl ARGS FILE -out OUT` (ARGS split at spaces); false when it fails or is not installed.
    fn openssl(args: &str, file: &Path, out: &Path) -> bool {
        std::process::Command::new("openssl")
            .args(args.split(' '))
            .arg(file)
            .arg("-out")
            .arg(out)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    #[test]
    fn loads_rsa_keys_in_pkcs1_and_pkcs8() {
        // ring cannot generate RSA keys: the openssl CLI makes them (skipped where it is missing).
        let d = tmpdir("rsa");
        let key8 = d.0.join("k8.pem");
        let key1 = d.0.join("k1.pem");
        let cert = d.0.join("c.pem");
        let req = "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost -keyout";
        if !openssl(req, &key8, &cert) {
            eprintln!("openssl unavailable: skipping the RSA test");
            return;
        }
        let ok = openssl("rsa -traditional -in", &key8, &key1);
        assert!(ok, "openssl rsa -traditional");
        let k1 = std::fs::read_to_string(&key1).expect("k1");
        assert!(k1.contains("BEGIN RSA PRIVATE KEY"), "a PKCS#1 key");
        for key in [&key8, &key1] {
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: None,
            };
            let (_, loaded) = load(&files).expect("rsa");
            assert_eq!(loaded.chain_len, 1);
            assert!(loaded.subject.contains("localhost"), "{}", loaded.subject);
        }
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let d = tmpdir("errors");
        let pki = pki(&rcgen::PKCS_ECDSA_P256_SHA256);
        let other = pki_other();
        let cert = write(&d, "cert.pem", &pki.leaf_pem);
        let key = write(&d, "key.pem", &pki.leaf_key_pem);
        let garbage = write(&d, "garbage.pem", "hello\n");
        let missing = d.0.join("missing.pem");
        let wrong_key = write(&d, "wrong.pem", &other);
        let files = |cert: &Path, key: &Path, ca: Option<&Path>| TlsFiles {
            cert: cert.into(),
            key: key.into(),
            client_ca: ca.map(Into::into),
        };
        let e = load(&files(&missing, &key, None)).unwrap_err().0;
        assert!(
            e.starts_with("--tls-cert ") && e.contains("missing.pem: cannot read"),
            "{e}"
        );
        let e = load(&files(&garbage, &key, None)).unwrap_err().0;
        assert!(e.contains("garbage.pem: no CERTIFICATE block found"), "{e}");
        let e = load(&files(&cert, &garbage, None)).unwrap_err().0;
        assert!(
            e.starts_with("--tls-key ") && e.contains("no private key found"),
            "{e}"
        );
        let e = load(&files(&cert, &wrong_key, None)).unwrap_err().0;
        assert!(
            e.contains("the key does not belong to the certificate"),
            "{e}"
        );
        let e = load(&files(&cert, &key, Some(&garbage))).unwrap_err().0;
        assert!(e.starts_with("--tls-client-ca "), "{e}");
        // A key file where the certificate should be: no certificate in it.
        let e = load(&files(&key, &key, None)).unwrap_err().0;
        assert!(e.contains("no CERTIFICATE block"), "{e}");
        // Secrets never end up in a message.
        assert!(!e.contains("BEGIN"));
    }

    fn pki_other() -> String {
        rcgen::KeyPair::generate().expect("key").serialize_pem()
    }

    #[test]
    fn reload_swaps_and_keeps_old_on_error() {
        let d = tmpdir("reload");
        let a = pki(&rcgen::PKCS_ECDSA_P256_SHA256);
        let files = TlsFiles {
            cert: write(&d, "cert.pem", &a.leaf_pem),
            key: write(&d, "key.pem", &a.leaf_key_pem),
            client_ca: None,
        };
        let (acc, _) = TlsAcceptor::load(files).expect("load");
        let first = acc.config();
        write(&d, "cert.pem", "broken");
        assert!(acc.reload().is_err());
        assert!(Arc::ptr_eq(&first, &acc.config()), "old config kept");
        let b = pki(&rcgen::PKCS_ED25519);
        write(&d, "cert.pem", &b.leaf_pem);
        write(&d, "key.pem", &b.leaf_key_pem);
        acc.reload().expect("reload");
        assert!(!Arc::ptr_eq(&first, &acc.config()));
    }

    #[test]
    fn identity_prefers_dns_san_then_cn() {
        let ca = ca("id CA");
        let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
        let der = |pem: &str| {
            CertificateDer::from_pem_slice(pem.as_bytes())
                .expect("pem")
                .to_vec()
        };
        let (c, _) = leaf(&ca, &["alice.example", "b.example"], Some("Alice"), alg);
        let id = CertIdentity::from_verified_cert(&der(&c)).expect("id");
        assert_eq!(id.name(), "alice.example");
        let (c, _) = leaf(&ca, &[], Some("bob"), alg);
        assert_eq!(
            CertIdentity::from_verified_cert(&der(&c)).map(|i| i.name().to_string()),
            Some("bob".into())
        );
        let (c, _) = leaf(&ca, &[], Some("has space"), alg);
        assert_eq!(CertIdentity::from_verified_cert(&der(&c)), None);
        let (c, _) = leaf(&ca, &[], None, alg);
        assert_eq!(CertIdentity::from_verified_cert(&der(&c)), None);
        assert_eq!(CertIdentity::from_verified_cert(b"garbage"), None);
    }
}
