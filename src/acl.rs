//! Access rules: which clients may use the gateway and which destinations they may reach. Pure functions over
//! addresses; no sockets and no DNS, so a domain target must be resolved first and each resulting address checked.
//!
//! Addresses are compared in canonical form ([`canonical_ip`]): an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
//! RFC 4291 §2.5.5.2) is the IPv4 address it carries. Without this a dual-stack socket would let
//! `::ffff:127.0.0.1` through a rule that denies `127.0.0.0/8`.

use crate::proto::canonical_ip;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// An address block: a network address and a prefix length, host bits always zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Builds a block, masking off host bits and turning an IPv4-mapped IPv6 block of /96 or longer into the
    /// IPv4 block it denotes (so it can match canonical addresses). `None` when the prefix is too long.
    fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let cidr = match addr {
            IpAddr::V4(v4) => {
                let mask = v4_mask(prefix)?;
                Cidr {
                    addr: IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask)),
                    prefix,
                }
            }
            IpAddr::V6(v6) => {
                let net = Ipv6Addr::from(u128::from(v6) & v6_mask(prefix)?);
                match (net.to_ipv4_mapped(), prefix.checked_sub(96)) {
                    (Some(v4), Some(p4)) => return Cidr::new(IpAddr::V4(v4), p4),
                    _ => Cidr {
                        addr: IpAddr::V6(net),
                        prefix,
                    },
                }
            }
        };
        Some(cidr)
    }

    /// The network address (host bits zero; IPv4 for mapped blocks).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// True when `ip` (in canonical form) lies in this block. An IPv6 block never matches an IPv4 address and
    /// vice versa; mapped addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical_ip(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                v4_mask(self.prefix).is_some_and(|m| u32::from(ip) & m == u32::from(net))
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                v6_mask(self.prefix).is_some_and(|m| u128::from(ip) & m == u128::from(net))
            }
            _ => false,
        }
    }
}

/// Netmask for an IPv4 prefix; `None` past /32.
pub fn v4_mask(prefix: u8) -> Option<u32> {
    match prefix {
        0 => Some(0),
        1..=32 => Some(u32::MAX << (32 - prefix)),
        _ => None,
    }
}

/// Netmask for an IPv6 prefix; `None` past /128.
pub fn v6_mask(prefix: u8) -> Option<u128> {
    match prefix {
        0 => Some(0),
        1..=128 => Some(u128::MAX << (128 - prefix)),
        _ => None,
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// Parses `ADDR/PREFIX` or a bare address (a single host: /32 or /128). Host bits below the prefix are
    /// accepted and cleared (`10.1.2.3/8` is `10.0.0.0/8`), as `ip route` does, since the intent is unambiguous.
    /// Zone ids (`fe80::1%eth0`) are not accepted: a rule cannot name an interface.
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| format!("invalid address {addr_text:?} in {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            None => max,
            Some(p) => {
                // Digits only: `u8::from_str` would also take "+8".
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("invalid prefix length {p:?} in {s:?}"));
                }
                p.parse::<u8>()
                    .ok()
                    .filter(|&n| n <= max)
                    .ok_or_else(|| format!("prefix length {p} out of range 0..={max} in {s:?}"))?
            }
        };
        Cidr::new(addr, prefix).ok_or_else(|| format!("invalid CIDR {s:?}"))
    }
}

impl fmt::Display for Cidr {
    /// `ADDR/PREFIX`, always with the prefix; mapped IPv6 blocks print as the IPv4 block they were turned into.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A destination rule: an address block and, optionally, an inclusive port range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestRule {
    /// The addresses the rule covers.
    pub cidr: Cidr,
    /// Inclusive `(low, high)` ports; `None` means every port.
    pub ports: Option<(u16, u16)>,
}

impl DestRule {
    /// True when `addr` falls in the block and the port range.
    fn matches(&self, addr: SocketAddr) -> bool {
        self.cidr.contains(addr.ip())
            && self
                .ports
                .is_none_or(|(lo, hi)| (lo..=hi).contains(&addr.port()))
    }
}

/// Blocks that `private` expands to: destinations that are this host, its LAN or the provider's network, which an
/// open proxy must not let the internet reach (server-side request forgery). IPv4-mapped IPv6 (`::ffff:0:0/96`)
/// needs no entry: mapped addresses are matched as the IPv4 address they carry.
const PRIVATE: &[&str] = &[
    "127.0.0.0/8",    // loopback, RFC 1122 §3.2.1.3
    "::1/128",        // loopback, RFC 4291 §2.5.3
    "10.0.0.0/8",     // RFC 1918
    "172.16.0.0/12",  // RFC 1918
    "192.168.0.0/16", // RFC 1918
    "169.254.0.0/16", // link-local, RFC 3927 (includes cloud metadata 169.254.169.254)
    "fe80::/10",      // link-local, RFC 4291 §2.5.6
    "fc00::/7",       // unique local, RFC 4193
    "0.0.0.0/8", // "this network", RFC 1122 §3.2.1.3 (Linux connects 0.0.0.0 to the local host)
    "::/128",    // unspecified, RFC 4291 §2.5.2 (connects to the local host)
    "100.64.0.0/10", // shared address space (carrier-grade NAT), RFC 6598
];

/// Parses a list of destination rules separated by commas and/or whitespace. Each item is `CIDR`, `CIDR:PORT`
/// or `CIDR:LO-HI`; an IPv6 block with ports must be bracketed (`[2001:db8::/32]:443`), since an unbracketed
/// IPv6 block with a port cannot be told apart from an address (so an unbracketed IPv6 item never has one).
/// The keyword `private` expands to loopback, RFC 1918, link-local, unique-local, unspecified and CGNAT blocks.
/// Ports must be 1..=65535 and LO <= HI.
pub fn parse_dest_rules(s: &str) -> Result<Vec<DestRule>, String> {
    let mut rules = Vec::new();
    for item in s
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|i| !i.is_empty())
    {
        if item.eq_ignore_ascii_case("private") {
            for block in PRIVATE {
                rules.push(DestRule {
                    cidr: block.parse()?,
                    ports: None,
                });
            }
            continue;
        }
        let (cidr_text, port_text) = if let Some(rest) = item.strip_prefix('[') {
            let (inner, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("missing ']' in {item:?}"))?;
            match after {
                "" => (inner, None),
                _ => match after.strip_prefix(':') {
                    Some(p) => (inner, Some(p)),
                    None => return Err(format!("expected ':PORT' after ']' in {item:?}")),
                },
            }
        } else if item.matches(':').count() == 1 {
            match item.split_once(':') {
                Some((c, p)) => (c, Some(p)),
                None => (item, None),
            }
        } else {
            (item, None)
        };
        let cidr = cidr_text
            .parse()
            .map_err(|e| format!("destination rule {item:?}: {e}"))?;
        let ports = match port_text {
            None => None,
            Some(p) => {
                Some(parse_port_range(p).map_err(|e| format!("destination rule {item:?}: {e}"))?)
            }
        };
        rules.push(DestRule { cidr, ports });
    }
    Ok(rules)
}

/// `PORT` or `LO-HI`, each 1..=65535 (port 0 cannot be connected to).
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (parse_port(lo)?, parse_port(hi)?),
        None => {
            let p = parse_port(s)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!("port range {s:?} is empty (low > high)"));
    }
    Ok((lo, hi))
}

/// One port, 1..=65535, digits only.
fn parse_port(s: &str) -> Result<u16, String> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid port {s:?}"));
    }
    match s.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("port {s} out of range 1..=65535")),
    }
}

/// Which client addresses may use the gateway.
#[derive(Debug, Clone, Default)]
pub struct ClientRules {
    allow: Vec<Cidr>,
}

impl ClientRules {
    /// Rules allowing exactly the given blocks (none: every client).
    pub fn new(allow: Vec<Cidr>) -> Self {
        ClientRules { allow }
    }

    /// True when `ip` may connect: no rules at all, or `ip` in one of the blocks.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip))
    }

    /// True when no client rule is configured (every client is allowed).
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty()
    }
}

/// Which destinations clients may reach: an allow list (empty: everything) and a deny list that always wins.
#[derive(Debug, Clone, Default)]
pub struct DestRules {
    allow: Vec<DestRule>,
    deny: Vec<DestRule>,
}

/// Proof that [`DestRules::check`] passed. Only this module can create one (the field is private), so code that
/// opens outbound connections should take a `DestAllowed` argument: a connect path that skipped the check does not
/// compile. It holds the address that passed and is consumed by the connect, so it cannot be spent on another
/// address or twice.
#[derive(Debug, PartialEq, Eq)]
pub struct DestAllowed(SocketAddr);

impl DestAllowed {
    /// The address that passed the rules.
    pub fn addr(&self) -> SocketAddr {
        self.0
    }
}

/// The destination is refused by policy (reported as SOCKS5 0x02 / HTTP 403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied;

impl DestRules {
    /// Rules from an allow list (empty: everything not denied) and a deny list.
    pub fn new(allow: Vec<DestRule>, deny: Vec<DestRule>) -> Self {
        DestRules { allow, deny }
    }

    /// True when neither list has a rule (every destination is allowed).
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Decides whether `addr` may be connected to: denied if any deny rule matches (deny wins, so `private` in
    /// the deny list cannot be undone by a broad allow), otherwise allowed if the allow list is empty or matches.
    pub fn check(&self, addr: SocketAddr) -> Result<DestAllowed, Denied> {
        if self.deny.iter().any(|r| r.matches(addr)) {
            return Err(Denied);
        }
        if self.allow.is_empty() || self.allow.iter().any(|r| r.matches(addr)) {
            Ok(DestAllowed(addr))
        } else {
            Err(Denied)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should panic
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_forms() {
        for (written, shown) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("192.168.1.1", "192.168.1.1/32"),
            ("::1/128", "::1/128"),
            ("::1", "::1/128"),
            ("fe80::/10", "fe80::/10"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("::/0", "::/0"),
            // Host bits are cleared.
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("fe80::1234/10", "fe80::/10"),
            ("10.1.2.3/0", "0.0.0.0/0"),
            // Mapped blocks become IPv4.
            ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
            ("::ffff:10.1.2.3", "10.1.2.3/32"),
            ("::ffff:0:0/95", "::fffe:0:0/95"),
        ] {
            assert_eq!(cidr(written).to_string(), shown, "{written}");
        }
        assert_eq!(cidr("10.1.2.3/8"), cidr("10.0.0.0/8"));
        assert!(!cidr("::ffff:0:0/95").contains(ip("::ffff:1.2.3.4")));
        assert!(cidr("::ffff:0:0/95").contains(ip("::fffe:1.2.3.4")));
    }

    #[test]
    fn cidr_rejects() {
        for bad in [
            "",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "10.0.0/8",
            "10.0.0.256",
            "fe80::1%eth0",
            "fe80::1%eth0/64",
            "host.example",
            "10.0.0.0/1000",
            " 10.0.0.0/8",
            "10.0.0.0 /8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cidr_contains() {
        for (block, addr, inside) in [
            ("10.0.0.0/8", "10.0.0.0", true),
            ("10.0.0.0/8", "10.255.255.255", true),
            ("10.0.0.0/8", "11.0.0.0", false),
            ("10.0.0.0/8", "9.255.255.255", false),
            // Mapped IPv6 is matched as IPv4; an IPv6 block never matches IPv4.
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("10.0.0.0/8", "::a01:203", false),
            ("::/0", "10.0.0.1", false),
            ("::/0", "::ffff:10.0.0.1", false),
            ("::/0", "2001:db8::1", true),
            ("0.0.0.0/0", "2001:db8::1", false),
            ("0.0.0.0/0", "::ffff:8.8.8.8", true),
            ("::ffff:0:0/96", "1.2.3.4", true),
            ("fe80::/10", "fe80::1", true),
            ("fe80::/10", "febf:ffff::1", true),
            ("fe80::/10", "fec0::1", false),
            ("192.168.1.1", "192.168.1.1", true),
            ("192.168.1.1", "192.168.1.2", false),
            ("::1", "::1", true),
            ("::1", "::2", false),
        ] {
            assert_eq!(cidr(block).contains(ip(addr)), inside, "{block} {addr}");
        }
    }

    #[test]
    fn dest_rule_forms() {
        let rules = parse_dest_rules(
            "10.0.0.0/8, 192.168.1.1:443 172.16.0.0/12:8000-8999,[2001:db8::/32]:443 [::1]:1-65535 fe80::/10 \
             ::1 [2001:db8::1] 2001:db8::1:443",
        )
        .unwrap();
        let expected = [
            ("10.0.0.0/8", None),
            ("192.168.1.1/32", Some((443, 443))),
            ("172.16.0.0/12", Some((8000, 8999))),
            ("2001:db8::/32", Some((443, 443))),
            ("::1/128", Some((1, 65535))),
            ("fe80::/10", None),
            ("::1/128", None),
            ("2001:db8::1/128", None),
            ("2001:db8::1:443/128", None),
        ];
        assert_eq!(rules.len(), expected.len());
        for (rule, (c, p)) in rules.iter().zip(expected) {
            assert_eq!((rule.cidr.to_string().as_str(), rule.ports), (c, p));
        }
        assert_eq!(parse_dest_rules("").unwrap(), vec![]);
        assert_eq!(parse_dest_rules(" , ,").unwrap(), vec![]);
    }

    #[test]
    fn dest_rule_rejects() {
        for bad in [
            "10.0.0.0/8:0",
            "10.0.0.0/8:65536",
            "10.0.0.0/8:443-80",
            "10.0.0.0/8:0-80",
            "10.0.0.0/8:",
            "10.0.0.0/8:-",
            "10.0.0.0/8:80-",
            "10.0.0.0/8:http",
            "10.0.0.0/8:+80",
            "10.0.0.0/33",
            "[2001:db8::/32",
            "[2001:db8::/32]443",
            "[2001:db8::/32]:",
            "[2001:db8::/32]:0",
            "[]:80",
            "example.com:80",
            "private:443",
            "10.0.0.0/8, bogus",
        ] {
            assert!(parse_dest_rules(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn private_keyword() {
        let rules = DestRules::new(vec![], parse_dest_rules("private").unwrap());
        for denied in [
            "127.0.0.1:80",
            "127.255.255.254:80",
            "[::1]:80",
            "10.1.2.3:80",
            "172.16.0.1:80",
            "172.31.255.255:80",
            "192.168.0.1:80",
            "169.254.169.254:80",
            "[fe80::1]:80",
            "[fd00::1]:80",
            "[fc00::1]:80",
            "0.0.0.0:80",
            "[::]:80",
            "100.64.0.1:80",
            "100.127.255.255:80",
            // The IPv4-mapped spellings are caught through canonicalization.
            "[::ffff:127.0.0.1]:80",
            "[::ffff:10.0.0.1]:80",
            "[::ffff:169.254.169.254]:80",
            "[::ffff:0.0.0.0]:80",
        ] {
            assert_eq!(rules.check(sa(denied)), Err(Denied), "{denied}");
        }
        for allowed in [
            "8.8.8.8:53",
            "172.32.0.1:80",
            "172.15.255.255:80",
            "100.128.0.1:80",
            "[2001:db8::1]:443",
            "[::ffff:8.8.8.8]:53",
            "[fec0::1]:80",
            "1.0.0.1:80",
        ] {
            assert!(rules.check(sa(allowed)).is_ok(), "{allowed}");
        }
        assert_eq!(
            parse_dest_rules("PRIVATE").unwrap(),
            parse_dest_rules("private").unwrap()
        );
    }

    /// Checks each address against `rules`: true where it must be allowed.
    fn check_all(rules: &DestRules, cases: &[(&str, bool)]) {
        for &(addr, allowed) in cases {
            let got = rules.check(sa(addr));
            assert_eq!(got.is_ok(), allowed, "{addr}");
            if !allowed {
                assert_eq!(got, Err(Denied), "{addr}");
            }
        }
    }

    #[test]
    fn dest_rules_ports_and_precedence() {
        let rules = DestRules::new(
            parse_dest_rules("0.0.0.0/0:443 0.0.0.0/0:8000-8080 [::/0]:443").unwrap(),
            parse_dest_rules("private 203.0.113.0/24:8080").unwrap(),
        );
        assert!(!rules.is_empty());
        check_all(
            &rules,
            &[
                ("8.8.8.8:443", true),
                ("8.8.8.8:8000", true),
                ("8.8.8.8:8080", true),
                ("8.8.8.8:7999", false),
                ("8.8.8.8:8081", false),
                ("8.8.8.8:80", false),
                ("[2001:db8::1]:443", true),
                ("[2001:db8::1]:8000", false),
                ("[::ffff:8.8.8.8]:443", true),
                // Deny wins over a matching allow.
                ("10.0.0.1:443", false),
                ("[::ffff:10.0.0.1]:443", false),
                ("[::1]:443", false),
                ("203.0.113.5:8000", true),
                ("203.0.113.5:8080", false),
            ],
        );
        // Empty rules allow everything.
        let none = DestRules::default();
        assert!(none.is_empty());
        check_all(&none, &[("127.0.0.1:22", true)]);
        assert!(DestRules::new(vec![], vec![]).is_empty());
        // Deny only: everything else allowed.
        let deny_only = DestRules::new(vec![], parse_dest_rules("10.0.0.0/8:22").unwrap());
        assert!(!deny_only.is_empty());
        check_all(&deny_only, &[("10.0.0.1:23", true), ("10.0.0.1:22", false)]);
    }

    #[test]
    fn client_rules() {
        let open = ClientRules::default();
        assert!(open.is_empty());
        assert!(open.allows(ip("203.0.113.9")));
        let rules = ClientRules::new(vec![cidr("192.168.0.0/16"), cidr("2001:db8::/32")]);
        assert!(!rules.is_empty());
        for (client, allowed) in [
            ("192.168.5.5", true),
            ("::ffff:192.168.5.5", true),
            ("2001:db8:1::1", true),
            ("192.169.0.1", false),
            ("2001:db9::1", false),
            ("::ffff:10.0.0.1", false),
        ] {
            assert_eq!(rules.allows(ip(client)), allowed, "{client}");
        }
    }
}
