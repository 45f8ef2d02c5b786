//! `--upstream` URLs: the proxy every outbound connection is chained through.
//!
//! A host given by name is not resolved here: sessions resolve it through the resolver (its cache and TTLs) when
//! they need it and dial its addresses with Happy Eyeballs (src/worker/connect.rs), so the proxy follows the
//! upstream's DNS changes and a dead address of a dual-stack upstream costs one attempt delay. Parsing never waits
//! on DNS; the start-up check that the name resolves ([`crate::resolve::check_upstream`]) only warns, as Squid
//! does for a `cache_peer` name, so the proxy comes up while DNS is not reachable yet.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// The protocol spoken to the upstream proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    /// SOCKS5 CONNECT (RFC 1928), with RFC 1929 auth when credentials are given.
    Socks5,
    /// HTTP CONNECT (RFC 9110 §9.3.6), with Basic auth when credentials are given.
    Http,
}

/// A parsed `--upstream` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Protocol.
    pub kind: UpstreamKind,
    /// Host as written (for logs).
    pub host: String,
    /// Port.
    pub port: u16,
    /// The address when the host is an IP literal; empty for a name, which each session resolves.
    pub addrs: Vec<SocketAddr>,
    /// Credentials.
    pub credentials: Option<(String, String)>,
    /// The protocol runs inside TLS (`https://`, `socks5s://`).
    pub tls: bool,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        write!(f, "{self}")
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match (self.kind, self.tls) {
            (UpstreamKind::Socks5, false) => "socks5",
            (UpstreamKind::Socks5, true) => "socks5s",
            (UpstreamKind::Http, false) => "http",
            (UpstreamKind::Http, true) => "https",
        };
        let user = match &self.credentials {
            Some((u, _)) => format!("{u}:***@"),
            None => String::new(),
        };
        write!(f, "{scheme}://{user}{}:{}", self.host, self.port)
    }
}

/// A host name as DNS can carry it (RFC 1123 labels, the hosts file's names): the resolver checks it again.
fn valid_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl Upstream {
    /// True when the host is a name (resolved per session) rather than an IP address.
    pub fn by_name(&self) -> bool {
        self.addrs.is_empty()
    }
}

fn unescape(s: &str) -> Result<String, String> {
    // Percent-decoding, so passwords can contain ':' and '@' (RFC 3986 §2.1).
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("bad percent escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad percent escape")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "credentials are not UTF-8".to_string())
}

impl FromStr for Upstream {
    type Err = String;

    fn from_str(s: &str) -> Result<Upstream, String> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or("expected socks5://[user:pass@]host:port or http://[user:pass@]host:port")?;
        let (kind, tls) = match scheme.to_ascii_lowercase().as_str() {
            "socks5" | "socks5h" => (UpstreamKind::Socks5, false),
            "socks5s" => (UpstreamKind::Socks5, true),
            "http" => (UpstreamKind::Http, false),
            "https" => (UpstreamKind::Http, true),
            other => {
                return Err(format!(
                    "unsupported scheme {other:?} (socks5, socks5s, http or https)"
                ))
            }
        };
        let rest = rest.trim_end_matches('/');
        let (creds, hostport) = match rest.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, rest),
        };
        let credentials = match creds {
            Some(c) => {
                let (u, p) = c.split_once(':').ok_or("credentials must be user:pass")?;
                let (u, p) = (unescape(u)?, unescape(p)?);
                if u.is_empty() || u.len() > 255 || p.len() > 255 {
                    return Err("user must be 1..255 bytes and password at most 255".to_string());
                }
                Some((u, p))
            }
            None => None,
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6.split_once("]:").ok_or("expected [IPv6]:port")?;
            (h.to_string(), p)
        } else {
            let (h, p) = hostport.rsplit_once(':').ok_or("a port is required")?;
            (h.to_string(), p)
        };
        let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
        if host.is_empty() || port == 0 {
            return Err("host and a non-zero port are required".to_string());
        }
        let addrs = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) if valid_name(&host) => Vec::new(),
            Err(_) => return Err(format!("{host:?} is neither an IP address nor a host name")),
        };
        Ok(Upstream {
            kind,
            host,
            port,
            addrs,
            credentials,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let u: Upstream = "socks5://127.0.0.1:1080".parse().unwrap();
        assert_eq!(u.kind, UpstreamKind::Socks5);
        assert_eq!(u.addrs, vec!["127.0.0.1:1080".parse().unwrap()]);
        assert!(u.credentials.is_none());
        let u: Upstream = "http://al%40ce:p%3Ass@[::1]:3128".parse().unwrap();
        assert_eq!(u.kind, UpstreamKind::Http);
        assert_eq!(
            u.credentials,
            Some(("al@ce".to_string(), "p:ss".to_string()))
        );
        assert_eq!(u.to_string(), "http://al@ce:***@::1:3128");
        assert!(!format!("{u:?}").contains("p:ss"));
        assert!("ftp://x:1".parse::<Upstream>().is_err());
        let u: Upstream = "https://127.0.0.1:8443".parse().unwrap();
        assert!(u.tls && u.kind == UpstreamKind::Http);
        assert_eq!(u.to_string(), "https://127.0.0.1:8443");
        let u: Upstream = "socks5s://a:b@127.0.0.1:1443".parse().unwrap();
        assert!(u.tls && u.kind == UpstreamKind::Socks5);
        assert!(!"socks5://127.0.0.1:1".parse::<Upstream>().unwrap().tls);
        assert!("socks5://127.0.0.1".parse::<Upstream>().is_err());
        assert!("socks5://127.0.0.1:0".parse::<Upstream>().is_err());
        assert!("socks5://127.0.0.1:99999".parse::<Upstream>().is_err());
        // Names are kept for the sessions to resolve: nothing is looked up here.
        let u: Upstream = "socks5://proxy.example.test:1080".parse().unwrap();
        assert!(u.by_name() && u.addrs.is_empty());
        assert_eq!(u.host, "proxy.example.test");
        assert!(!"socks5://[::1]:1080".parse::<Upstream>().unwrap().by_name());
        for bad in ["socks5://a..b:1", "socks5://a b:1", "socks5://-:1:2"] {
            assert!(bad.parse::<Upstream>().is_err(), "{bad}");
        }
    }
}
