//! Parsing of `--proxy` URLs and `--target` addresses.
//!
//! Only loopback addresses are accepted: this tool generates heavy load and must never
//! point it at another machine by accident.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Which protocol the client speaks to the proxy (or none for `direct`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// No proxy: connect to the target itself (the baseline).
    Direct,
    /// SOCKS5, the client sends the target as an IP address.
    Socks5,
    /// SOCKS5, the client sends the target as a domain name (proxy resolves).
    Socks5h,
    /// SOCKS4, IPv4 targets only.
    Socks4,
    /// SOCKS4a, the client sends the target as a domain name.
    Socks4a,
    /// HTTP proxy: CONNECT tunnels, or absolute-form forwarding in `http` mode.
    Http,
}

impl Scheme {
    /// The URL scheme name, used for display and JSON output.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scheme::Direct => "direct",
            Scheme::Socks5 => "socks5",
            Scheme::Socks5h => "socks5h",
            Scheme::Socks4 => "socks4",
            Scheme::Socks4a => "socks4a",
            Scheme::Http => "http",
        }
    }

    /// Whether the target goes to the proxy as a name rather than an address.
    pub(crate) fn sends_domain(self) -> bool {
        matches!(self, Scheme::Socks5h | Scheme::Socks4a)
    }

    /// Whether this is one of the SOCKS5 variants (needed for UDP ASSOCIATE).
    pub(crate) fn is_socks5(self) -> bool {
        matches!(self, Scheme::Socks5 | Scheme::Socks5h)
    }
}

/// A parsed `--proxy` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProxySpec {
    /// Protocol spoken to the proxy.
    pub(crate) scheme: Scheme,
    /// Proxy address; `None` for `direct`.
    pub(crate) addr: Option<SocketAddr>,
    /// Username (SOCKS5 user/pass auth, SOCKS4 user id, HTTP Basic).
    pub(crate) user: Option<String>,
    /// Password (SOCKS5 and HTTP only).
    pub(crate) pass: Option<String>,
}

impl ProxySpec {
    /// The no-proxy baseline.
    pub(crate) fn direct() -> Self {
        ProxySpec {
            scheme: Scheme::Direct,
            addr: None,
            user: None,
            pass: None,
        }
    }

    /// Username and password when both are needed by the protocol.
    pub(crate) fn credentials(&self) -> Option<(&str, &str)> {
        self.user
            .as_deref()
            .map(|u| (u, self.pass.as_deref().unwrap_or("")))
    }
}

/// Prints the URL with the password masked, so it can go into JSON and logs.
impl fmt::Display for ProxySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(addr) = self.addr else {
            return f.write_str("direct");
        };
        write!(f, "{}://", self.scheme.name())?;
        if let Some(user) = &self.user {
            f.write_str(user)?;
            if self.pass.is_some() {
                f.write_str(":***")?;
            }
            f.write_str("@")?;
        }
        write!(f, "{addr}")
    }
}

/// Parse `direct` or `scheme://[user[:pass]@]host[:port][/]`.
pub(crate) fn parse_proxy(s: &str) -> Result<ProxySpec, String> {
    if s == "direct" {
        return Ok(ProxySpec::direct());
    }
    let (scheme_str, rest) = s
        .split_once("://")
        .ok_or_else(|| format!("bad proxy URL {s:?}: expected scheme://host:port or direct"))?;
    let scheme = match scheme_str.to_ascii_lowercase().as_str() {
        "socks5" => Scheme::Socks5,
        "socks5h" => Scheme::Socks5h,
        "socks4" => Scheme::Socks4,
        "socks4a" => Scheme::Socks4a,
        "http" => Scheme::Http,
        other => return Err(format!("unsupported proxy scheme {other:?}")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('#') {
        return Err(format!("bad proxy URL {s:?}: no path allowed"));
    }
    // The last '@' separates userinfo, so an '@' inside a password works unescaped too.
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (user, pass) = match userinfo {
        None => (None, None),
        Some(u) => {
            let (user, pass) = match u.split_once(':') {
                Some((a, b)) => (a, Some(b)),
                None => (u, None),
            };
            (
                Some(percent_decode(user)?),
                pass.map(percent_decode).transpose()?,
            )
        }
    };
    if let Some(u) = &user {
        if u.is_empty() || u.len() > 255 || pass.as_ref().is_some_and(|p| p.len() > 255) {
            return Err("proxy username/password must be 1..=255 bytes".into());
        }
    }
    if matches!(scheme, Scheme::Socks4 | Scheme::Socks4a) && pass.is_some() {
        return Err("socks4 has no password, only a user id (socks4://user@host:port)".into());
    }
    let default_port = if scheme == Scheme::Http { 8080 } else { 1080 };
    let (ip, port) = parse_host_port(hostport, Some(default_port))?;
    Ok(ProxySpec {
        scheme,
        addr: Some(SocketAddr::new(ip, port)),
        user,
        pass,
    })
}

/// Decode `%XX` escapes in URL userinfo.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("userinfo {s:?} is not UTF-8"))
}

/// Parse `host:port`, `[v6]:port` or (with a default port) a bare host; loopback only.
fn parse_host_port(s: &str, default_port: Option<u16>) -> Result<(IpAddr, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("missing ']' in {s:?}"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("garbage after ']' in {s:?}")),
        };
        (h, port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return Err(format!("IPv6 address must be in brackets: {s:?}")),
            None => (s, None),
        }
    };
    let port = match (port, default_port) {
        (Some(p), _) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("bad port in {s:?}"))?,
        (None, Some(d)) => d,
        (None, None) => return Err(format!("missing port in {s:?}")),
    };
    let ip = resolve_loopback(host)?;
    Ok((ip, port))
}

/// Accept IP literals and `localhost`, and only on loopback (never resolves via DNS).
fn resolve_loopback(host: &str) -> Result<IpAddr, String> {
    let ip = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse::<IpAddr>().map_err(|_| {
            format!("host {host:?} must be an IP literal or localhost (loopback only)")
        })?
    };
    if !ip.is_loopback() {
        return Err(format!(
            "{ip} is not a loopback address: this tool only sends traffic to 127.0.0.0/8 or ::1"
        ));
    }
    Ok(ip)
}

/// Where a tunnel should lead: the address, plus the name domain-form proxies receive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// Address used by `direct` and by IP-form proxy requests.
    pub(crate) addr: SocketAddr,
    /// Name sent by socks5h/socks4a (and HTTP CONNECT uses `addr`).
    pub(crate) host: String,
}

/// How the target is named on the wire to a proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Dest {
    /// An IP address and port.
    Ip(SocketAddr),
    /// A domain name and port, resolved by the proxy.
    Domain(String, u16),
}

impl Endpoint {
    /// A built-in target; domain-form proxies get `localhost` so they exercise their resolver.
    pub(crate) fn builtin(addr: SocketAddr) -> Self {
        Endpoint {
            addr,
            host: "localhost".into(),
        }
    }

    /// Parse `--target host:port` (loopback only).
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let (ip, port) = parse_host_port(s, None)?;
        let addr = SocketAddr::new(ip, port);
        // A name given by the user is sent as is; the two canonical loopback literals map
        // to localhost; any other loopback literal is sent as text so it still resolves.
        let bare = s.rsplit_once(':').map(|(h, _)| h).unwrap_or(s);
        let is_literal = bare
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok();
        let host = if !is_literal {
            bare.to_string()
        } else if ip == IpAddr::V4(Ipv4Addr::LOCALHOST) || ip == IpAddr::V6(Ipv6Addr::LOCALHOST) {
            "localhost".to_string()
        } else {
            ip.to_string()
        };
        Ok(Endpoint { addr, host })
    }

    /// The destination as the given proxy scheme should send it.
    pub(crate) fn dest(&self, scheme: Scheme) -> Dest {
        if scheme.sends_domain() {
            Dest::Domain(self.host.clone(), self.addr.port())
        } else {
            Dest::Ip(self.addr)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_direct_and_schemes() {
        assert_eq!(parse_proxy("direct").unwrap(), ProxySpec::direct());
        let p = parse_proxy("socks5://127.0.0.1:1080").unwrap();
        assert_eq!(p.scheme, Scheme::Socks5);
        assert_eq!(p.addr, Some("127.0.0.1:1080".parse().unwrap()));
        assert_eq!(p.user, None);
        assert_eq!(
            parse_proxy("socks5h://localhost:9").unwrap().scheme,
            Scheme::Socks5h
        );
        assert_eq!(
            parse_proxy("SOCKS4://127.0.0.1:1").unwrap().scheme,
            Scheme::Socks4
        );
        assert_eq!(
            parse_proxy("socks4a://127.0.0.1:1/").unwrap().scheme,
            Scheme::Socks4a
        );
        let h = parse_proxy("http://127.0.0.1").unwrap();
        assert_eq!(h.scheme, Scheme::Http);
        assert_eq!(h.addr.unwrap().port(), 8080);
    }

    #[test]
    fn parses_userinfo_and_ipv6() {
        let p = parse_proxy("socks5://al%40ice:p@ss:w@[::1]:1081").unwrap();
        assert_eq!(p.user.as_deref(), Some("al@ice"));
        assert_eq!(p.pass.as_deref(), Some("p@ss:w"));
        assert_eq!(p.addr, Some("[::1]:1081".parse().unwrap()));
        assert_eq!(p.to_string(), "socks5://al@ice:***@[::1]:1081");
        let s4 = parse_proxy("socks4://bob@127.0.0.2:1080").unwrap();
        assert_eq!(s4.user.as_deref(), Some("bob"));
        assert_eq!(s4.pass, None);
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "socks5://10.0.0.1:1080",
            "socks5://example.com:1080",
            "ftp://127.0.0.1:21",
            "127.0.0.1:1080",
            "socks5://127.0.0.1:0",
            "socks5://127.0.0.1:99999",
            "socks5://::1:1080",
            "socks4://u:p@127.0.0.1:1080",
            "http://127.0.0.1:80/path",
            "socks5://%zz@127.0.0.1:1",
        ] {
            assert!(parse_proxy(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn target_names() {
        let t = Endpoint::parse("127.0.0.1:7000").unwrap();
        assert_eq!(t.host, "localhost");
        assert_eq!(
            t.dest(Scheme::Socks5h),
            Dest::Domain("localhost".into(), 7000)
        );
        assert_eq!(
            t.dest(Scheme::Socks5),
            Dest::Ip("127.0.0.1:7000".parse().unwrap())
        );
        let t2 = Endpoint::parse("127.0.0.5:7000").unwrap();
        assert_eq!(t2.host, "127.0.0.5");
        let t3 = Endpoint::parse("localhost:7000").unwrap();
        assert_eq!(t3.host, "localhost");
        assert!(Endpoint::parse("127.0.0.1").is_err());
        assert!(Endpoint::parse("192.168.1.1:80").is_err());
    }
}
