//! The ordered rule list of the policy file, compiled into indexes so that a decision costs about the same with ten
//! rules as with ten thousand, while keeping exact first-match semantics.
//!
//! Every destination pattern of every rule goes into one index keyed by what it matches:
//! - name patterns into a hash map from the name (without `*.` or the leading dot) to `(rule index, kind, ports)`;
//!   a target name is looked up once for itself and once per parent suffix (`a.b.c` -> `a.b.c`, `b.c`, `c`);
//! - address blocks into one hash map per prefix length and family (the masked address is the key), so an address
//!   costs one lookup per distinct prefix length in use;
//! - port-only patterns (`:25`) and rules without `dest` into a short list checked for every target.
//!
//! Each bucket is sorted by rule index, and the smallest index whose rule applies (user, group, client, command,
//! port) across all buckets is the first matching rule: the same answer as walking the list in order.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::name::{normalize, parent_suffixes};
use crate::acl::{self, Cidr};
use crate::indexed::indexed_enum;
use crate::proto::canonical_ip;

indexed_enum! {
    /// What a session asks for, as rules name it.
    pub enum Command {
        /// SOCKS5/SOCKS4 CONNECT and HTTP CONNECT.
        Connect => "connect",
        /// HTTP forwarding (absolute-form requests).
        Http => "http",
        /// SOCKS5/SOCKS4 BIND.
        Bind => "bind",
        /// SOCKS5 UDP ASSOCIATE (checked per datagram).
        Udp => "udp",
    }
}

impl Command {
    /// The spelling in the policy file.
    pub fn parse(s: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.label() == s)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// What the first matching rule says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let the session through.
    Allow,
    /// Refuse it (SOCKS5 0x02, SOCKS4 91, HTTP 403, UDP datagram dropped).
    Deny,
    /// Let it through an upstream group (the index into the policy's groups).
    Via(u32),
}

/// Who is asking: the authenticated user (with her groups) and the client address.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    /// The authenticated user, if any.
    pub user: Option<&'a str>,
    /// The user's groups from the policy file.
    pub groups: &'a [Arc<str>],
    /// The client address (the PROXY-protocol source when one was received).
    pub client: IpAddr,
}

/// How a name pattern matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// `exact.test`: that name only.
    Exact,
    /// `*.corp.test`: proper subdomains only.
    Sub,
    /// `.corp.test`: the name and its subdomains.
    Both,
}

/// The host part of a destination pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// `:PORT`: any host.
    Any,
    /// A name pattern (normalised).
    Name(NameKind, Box<str>),
    /// An address block.
    Cidr(Cidr),
}

/// One destination pattern: a host and an optional inclusive port range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    host: Host,
    ports: Option<(u16, u16)>,
}

impl Pattern {
    /// True when the pattern names hosts (not `:PORT` alone) by name.
    pub fn is_name(&self) -> bool {
        matches!(self.host, Host::Name(..))
    }
}

/// Parses one `dest` item: `exact.test`, `*.corp.test`, `.corp.test`, `10.0.0.0/8`, `[2001:db8::/32]:443`,
/// `private`, each with an optional `:PORT` or `:LO-HI`, or `:PORT` alone (any host). `private` expands to
/// several blocks, hence the list.
pub fn parse_pattern(s: &str) -> Result<Vec<Pattern>, String> {
    if let Some(ports) = s.strip_prefix(':') {
        let ports = acl::parse_port_range(ports)?;
        return Ok(vec![Pattern {
            host: Host::Any,
            ports: Some(ports),
        }]);
    }
    let (host, ports) = match s.matches(':').count() {
        1 if !s.starts_with('[') => match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        },
        _ => (s, None),
    };
    let looks_like_address = s.starts_with('[')
        || s.matches(':').count() > 1
        || host.eq_ignore_ascii_case("private")
        || host.contains('/')
        || host.parse::<IpAddr>().is_ok();
    if looks_like_address {
        let rules = acl::parse_dest_rules(s)?;
        if rules.is_empty() {
            return Err("empty destination pattern".into());
        }
        return Ok(rules
            .into_iter()
            .map(|r| Pattern {
                host: Host::Cidr(r.cidr),
                ports: r.ports,
            })
            .collect());
    }
    let ports = ports.map(acl::parse_port_range).transpose()?;
    let (kind, base) = if let Some(rest) = host.strip_prefix("*.") {
        (NameKind::Sub, rest)
    } else if let Some(rest) = host.strip_prefix('.') {
        (NameKind::Both, rest)
    } else {
        (NameKind::Exact, host)
    };
    if base.contains('*') {
        return Err(format!(
            "{s:?}: '*' is only allowed as a whole first label (\"*.corp.test\")"
        ));
    }
    let name = normalize(base.as_bytes()).map_err(|e| format!("{s:?} is not a host name: {e}"))?;
    Ok(vec![Pattern {
        host: Host::Name(kind, name.into()),
        ports,
    }])
}

/// One compiled rule: who it applies to and what it decides (the destinations live in the indexes).
#[derive(Debug, Clone)]
pub struct Rule {
    /// User names (`None`: any user, or none).
    pub users: Option<Vec<Arc<str>>>,
    /// Group names.
    pub groups: Option<Vec<Arc<str>>>,
    /// Client address blocks.
    pub clients: Option<Vec<Cidr>>,
    /// Bit set of [`Command`]s (all four when the rule names none).
    pub commands: u8,
    /// The decision.
    pub action: Action,
}

impl Rule {
    /// A rule with no conditions.
    pub fn new(action: Action) -> Rule {
        Rule {
            users: None,
            groups: None,
            clients: None,
            commands: 0x0f,
            action,
        }
    }

    /// Restricts the rule to these commands.
    pub fn with_commands(mut self, cmds: &[Command]) -> Rule {
        self.commands = cmds.iter().fold(0, |acc, c| acc | c.bit());
        self
    }

    /// True when the rule's conditions other than the destination hold. A rule naming users and groups applies to
    /// a user named in either.
    fn applies(&self, who: &Who<'_>, cmd: Command) -> bool {
        if self.commands & cmd.bit() == 0 {
            return false;
        }
        if self.users.is_some() || self.groups.is_some() {
            let Some(user) = who.user else {
                return false;
            };
            let by_name = self
                .users
                .as_ref()
                .is_some_and(|us| us.iter().any(|u| &**u == user));
            let by_group = self
                .groups
                .as_ref()
                .is_some_and(|gs| gs.iter().any(|g| who.groups.contains(g)));
            if !(by_name || by_group) {
                return false;
            }
        }
        self.clients
            .as_ref()
            .is_none_or(|cs| cs.iter().any(|c| c.contains(who.client)))
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    rule: u32,
    ports: Option<(u16, u16)>,
}

#[derive(Debug, Clone, Copy)]
struct NameEntry {
    rule: u32,
    kind: NameKind,
    ports: Option<(u16, u16)>,
}

fn port_ok(ports: Option<(u16, u16)>, port: u16) -> bool {
    ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&port))
}

/// The compiled rule list.
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<Rule>,
    names: HashMap<Box<str>, Vec<NameEntry>>,
    v4: Vec<(u8, HashMap<u32, Vec<Entry>>)>,
    v6: Vec<(u8, HashMap<u128, Vec<Entry>>)>,
    any: Vec<Entry>,
    /// The smallest index of a rule with an address pattern (`usize::MAX`: none), so a name decided by an earlier
    /// rule needs no resolution to be sure.
    first_cidr: usize,
    default: Action,
}

impl Default for RuleSet {
    fn default() -> RuleSet {
        RuleSet::new(Vec::new(), Action::Allow)
    }
}

/// Whether a name could be decided before resolving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameVerdict {
    /// Decided: no rule with an address pattern comes before the deciding rule.
    Decided(Action),
    /// An address rule may decide: check each resolved address with [`RuleSet::check_addr`].
    NeedAddress,
}

impl RuleSet {
    /// Compiles `(rule, its destination patterns)` in order (an empty pattern list means any destination).
    pub fn new(list: Vec<(Rule, Vec<Pattern>)>, default: Action) -> RuleSet {
        let mut set = RuleSet {
            rules: Vec::with_capacity(list.len()),
            names: HashMap::new(),
            v4: Vec::new(),
            v6: Vec::new(),
            any: Vec::new(),
            first_cidr: usize::MAX,
            default,
        };
        for (i, (rule, patterns)) in list.into_iter().enumerate() {
            let idx = i as u32;
            set.rules.push(rule);
            if patterns.is_empty() {
                set.any.push(Entry {
                    rule: idx,
                    ports: None,
                });
            }
            for p in patterns {
                let entry = Entry {
                    rule: idx,
                    ports: p.ports,
                };
                match p.host {
                    Host::Any => set.any.push(entry),
                    Host::Name(kind, name) => set.names.entry(name).or_default().push(NameEntry {
                        rule: idx,
                        kind,
                        ports: p.ports,
                    }),
                    Host::Cidr(c) => {
                        set.first_cidr = set.first_cidr.min(i);
                        match c.addr() {
                            IpAddr::V4(a) => {
                                let map = bucket(&mut set.v4, c.prefix());
                                map.entry(u32::from(a)).or_default().push(entry);
                            }
                            IpAddr::V6(a) => {
                                let map = bucket(&mut set.v6, c.prefix());
                                map.entry(u128::from(a)).or_default().push(entry);
                            }
                        }
                    }
                }
            }
        }
        set
    }

    /// True when there are no rules (every destination is allowed, unless the default is deny).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.default == Action::Allow
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Decides for a name target before resolution, when the name rules (and port-only rules) settle it.
    /// `name` must be normalised.
    pub fn check_name(&self, who: &Who<'_>, cmd: Command, name: &str, port: u16) -> NameVerdict {
        let best = self.best(who, cmd, Some(name), None, port);
        match best {
            // Rule `i` itself may have address patterns too: it matched by name, and no address rule comes before it.
            Some(i) if i <= self.first_cidr => NameVerdict::Decided(self.action(i)),
            None if self.first_cidr == usize::MAX => NameVerdict::Decided(self.default),
            _ => NameVerdict::NeedAddress,
        }
    }

    /// Decides for one address actually dialled (with the name it was resolved from, if any; normalised).
    pub fn check_addr(
        &self,
        who: &Who<'_>,
        cmd: Command,
        name: Option<&str>,
        addr: SocketAddr,
    ) -> Action {
        match self.best(who, cmd, name, Some(addr.ip()), addr.port()) {
            Some(i) => self.action(i),
            None => self.default,
        }
    }

    /// The action of the first rule that matches by name (or by port alone), ignoring address rules: what routes a
    /// name target that goes through an upstream group without being resolved here. `name` must be normalised.
    pub fn by_name(&self, who: &Who<'_>, cmd: Command, name: &str, port: u16) -> Option<Action> {
        self.best(who, cmd, Some(name), None, port)
            .map(|i| self.action(i))
    }

    fn action(&self, i: usize) -> Action {
        self.rules.get(i).map(|r| r.action).unwrap_or(self.default)
    }

    /// The index of the first rule that matches.
    fn best(
        &self,
        who: &Who<'_>,
        cmd: Command,
        name: Option<&str>,
        ip: Option<IpAddr>,
        port: u16,
    ) -> Option<usize> {
        let mut best = u32::MAX;
        let applies = |rule: u32| {
            self.rules
                .get(rule as usize)
                .is_some_and(|r| r.applies(who, cmd))
        };
        let consider = |entries: &[Entry], best: &mut u32| {
            for e in entries {
                if e.rule >= *best {
                    break;
                }
                if port_ok(e.ports, port) && applies(e.rule) {
                    *best = e.rule;
                    break;
                }
            }
        };
        consider(&self.any, &mut best);
        if let Some(ip) = ip {
            match canonical_ip(ip) {
                IpAddr::V4(a) => prefix_hits(&self.v4, u32::from(a), acl::v4_mask)
                    .for_each(|v| consider(v, &mut best)),
                IpAddr::V6(a) => prefix_hits(&self.v6, u128::from(a), acl::v6_mask)
                    .for_each(|v| consider(v, &mut best)),
            }
        }
        if let Some(name) = name {
            let look = |key: &str, whole: bool, best: &mut u32| {
                let Some(v) = self.names.get(key) else {
                    return;
                };
                for e in v {
                    if e.rule >= *best {
                        break;
                    }
                    let kind_ok = match e.kind {
                        NameKind::Exact => whole,
                        NameKind::Sub => !whole,
                        NameKind::Both => true,
                    };
                    if kind_ok && port_ok(e.ports, port) && applies(e.rule) {
                        *best = e.rule;
                        break;
                    }
                }
            };
            look(name, true, &mut best);
            for suffix in parent_suffixes(name) {
                look(suffix, false, &mut best);
            }
        }
        (best != u32::MAX).then_some(best as usize)
    }
}

/// The entries of every prefix length whose block holds `addr` (one map lookup per length in use).
fn prefix_hits<'a, K>(
    maps: &'a [(u8, HashMap<K, Vec<Entry>>)],
    addr: K,
    mask: fn(u8) -> Option<K>,
) -> impl Iterator<Item = &'a [Entry]>
where
    K: Copy + Default + Eq + std::hash::Hash + std::ops::BitAnd<Output = K> + 'a,
{
    maps.iter().filter_map(move |(prefix, map)| {
        map.get(&(addr & mask(*prefix).unwrap_or_default()))
            .map(Vec::as_slice)
    })
}

/// The map for one prefix length, created on first use (the list stays short: at most 33 or 129 entries).
fn bucket<K>(
    list: &mut Vec<(u8, HashMap<K, Vec<Entry>>)>,
    prefix: u8,
) -> &mut HashMap<K, Vec<Entry>> {
    let pos = match list.iter().position(|(p, _)| *p == prefix) {
        Some(pos) => pos,
        None => {
            list.push((prefix, HashMap::new()));
            list.len() - 1
        }
    };
    &mut list[pos].1
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn who(user: Option<&'static str>) -> Who<'static> {
        Who {
            user,
            groups: &[],
            client: "127.0.0.1".parse().unwrap(),
        }
    }

    fn set(rules: &[(&[&str], Action)], default: Action) -> RuleSet {
        let list = rules
            .iter()
            .map(|(dest, action)| {
                let pats = dest
                    .iter()
                    .flat_map(|d| parse_pattern(d).unwrap())
                    .collect();
                (Rule::new(*action), pats)
            })
            .collect();
        RuleSet::new(list, default)
    }

    fn name(rs: &RuleSet, n: &str, port: u16) -> NameVerdict {
        rs.check_name(&who(None), Command::Connect, n, port)
    }

    #[test]
    fn name_kinds() {
        let rs = set(
            &[(
                &["*.blocked.test", "exact.test", ".corp.test"],
                Action::Deny,
            )],
            Action::Allow,
        );
        let deny = NameVerdict::Decided(Action::Deny);
        let allow = NameVerdict::Decided(Action::Allow);
        assert_eq!(name(&rs, "a.blocked.test", 80), deny);
        assert_eq!(name(&rs, "x.y.blocked.test", 80), deny);
        assert_eq!(name(&rs, "blocked.test", 80), allow);
        assert_eq!(name(&rs, "notblocked.test", 80), allow);
        assert_eq!(name(&rs, "exact.test", 80), deny);
        assert_eq!(name(&rs, "a.exact.test", 80), allow);
        assert_eq!(name(&rs, "corp.test", 80), deny);
        assert_eq!(name(&rs, "a.corp.test", 80), deny);
        assert_eq!(name(&rs, "xcorp.test", 80), allow);
    }

    #[test]
    fn first_match_and_ports() {
        let rs = set(
            &[
                (&["ok.test"], Action::Allow),
                (&[".test"], Action::Deny),
                (&["127.0.0.1:8000-8099"], Action::Deny),
                (&[":25"], Action::Deny),
            ],
            Action::Allow,
        );
        assert_eq!(name(&rs, "ok.test", 1), NameVerdict::Decided(Action::Allow));
        assert_eq!(name(&rs, "no.test", 1), NameVerdict::Decided(Action::Deny));
        // A rule with names and addresses that matches by name decides without an address.
        let mixed = set(
            &[(&["*.blocked.test", "10.0.0.0/8"], Action::Deny)],
            Action::Allow,
        );
        assert_eq!(
            name(&mixed, "a.blocked.test", 1),
            NameVerdict::Decided(Action::Deny)
        );
        assert_eq!(name(&mixed, "ok.test", 1), NameVerdict::NeedAddress);
        // Not decided by a name: the address rule at index 2 comes first.
        assert_eq!(name(&rs, "other.example", 25), NameVerdict::NeedAddress);
        let w = who(None);
        let ck = |a: &str| rs.check_addr(&w, Command::Connect, None, a.parse().unwrap());
        assert_eq!(ck("127.0.0.1:8050"), Action::Deny);
        assert_eq!(ck("127.0.0.1:8100"), Action::Allow);
        assert_eq!(ck("127.0.0.2:25"), Action::Deny);
        assert_eq!(ck("[::ffff:127.0.0.1]:8000"), Action::Deny);
        // A name rule never matches an address target.
        let rs = set(&[(&["localhost"], Action::Deny)], Action::Allow);
        assert_eq!(
            rs.check_addr(&w, Command::Connect, None, "127.0.0.1:80".parse().unwrap()),
            Action::Allow
        );
    }

    #[test]
    fn conditions() {
        let mut r = Rule::new(Action::Deny).with_commands(&[Command::Http]);
        r.users = Some(vec![Arc::from("alice")]);
        let rs = RuleSet::new(vec![(r, vec![])], Action::Allow);
        let d = |u, c| rs.check_name(&who(u), c, "x.test", 80);
        assert_eq!(
            d(Some("alice"), Command::Http),
            NameVerdict::Decided(Action::Deny)
        );
        assert_eq!(
            d(Some("alice"), Command::Connect),
            NameVerdict::Decided(Action::Allow)
        );
        assert_eq!(
            d(Some("bob"), Command::Http),
            NameVerdict::Decided(Action::Allow)
        );
        assert_eq!(d(None, Command::Http), NameVerdict::Decided(Action::Allow));
        let rs = RuleSet::new(vec![], Action::Deny);
        assert_eq!(d(None, Command::Http), NameVerdict::Decided(Action::Allow));
        assert_eq!(
            rs.check_name(&who(None), Command::Udp, "x.test", 1),
            NameVerdict::Decided(Action::Deny)
        );
    }

    #[test]
    fn bad_patterns() {
        for bad in [
            "a..b",
            "*",
            "*.",
            "a.*.b",
            "x_y.test",
            ":0",
            ":99999",
            "10.0.0.0/33",
            "host:",
            ":5-4",
            "a b",
        ] {
            assert!(parse_pattern(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_pattern("private").unwrap().len(), 11);
        assert!(parse_pattern("[2001:db8::/32]:443").is_ok());
        assert!(parse_pattern("Exact.Test.:443").is_ok());
    }
}
