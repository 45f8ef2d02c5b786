//! The policy file (`--policy FILE`, TOML): per-user limits and egress addresses, and the ordered destination
//! rules. Loaded on the control thread at startup and on SIGHUP, together with the users file, and handed to the
//! workers as one immutable [`Policy`] (swapped whole, like the users table).
//!
//! Every table refuses unknown keys (a typo must not silently disable a limit), and every error names the file,
//! the line and the key.

pub mod bucket;
pub mod name;
pub mod quota;
pub mod rules;
pub mod units;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::acl::Cidr;
use crate::auth::Users;
use crate::config::parse_duration;
use crate::groups::{Group, Strategy};
use crate::tls::UpstreamTrust;
use crate::upstream::Upstream;
pub use bucket::{Limits, Rates, UserLimits};
pub use quota::QuotaSpec;
use rules::{Action, Command, NameVerdict, Pattern, Rule, RuleSet, Who};

// ---------------------------------------------------------------------------------------------------------------
// The file as written
// ---------------------------------------------------------------------------------------------------------------

type S<T> = Spanned<T>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: Option<DefaultsSection>,
    #[serde(default)]
    users: BTreeMap<String, S<UserSection>>,
    #[serde(default)]
    rules: Vec<S<RuleSection>>,
    #[serde(default)]
    upstreams: BTreeMap<String, S<UpstreamSection>>,
}

/// Settings that a user section can also carry (and `[defaults]` gives everyone without an override).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DefaultsSection {
    max_connections: Option<S<i64>>,
    rules_default: Option<S<String>>,
    session_usernames: Option<S<bool>>,
    rate_down: Option<S<String>>,
    rate_up: Option<S<String>>,
    quota: Option<S<String>>,
    quota_period: Option<S<String>>,
    burst: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserSection {
    password: Option<S<String>>,
    max_connections: Option<S<i64>>,
    egress: Option<S<Vec<S<String>>>>,
    groups: Option<S<Vec<S<String>>>>,
    rate_down: Option<S<String>>,
    rate_up: Option<S<String>>,
    quota: Option<S<String>>,
    quota_period: Option<S<String>>,
    burst: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSection {
    users: Option<S<Vec<S<String>>>>,
    groups: Option<S<Vec<S<String>>>>,
    clients: Option<S<Vec<S<String>>>>,
    commands: Option<S<Vec<S<String>>>>,
    dest: Option<S<Vec<S<String>>>>,
    action: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamSection {
    servers: S<Vec<S<String>>>,
    strategy: Option<S<String>>,
    max_fails: Option<S<i64>>,
    fail_timeout: Option<S<String>>,
    /// CAs for this group's TLS members, instead of `--upstream-ca` / the system roots.
    ca: Option<S<String>>,
    /// Do not verify this group's TLS members' certificates.
    insecure: Option<S<bool>>,
}

// ---------------------------------------------------------------------------------------------------------------
// The compiled policy
// ---------------------------------------------------------------------------------------------------------------

/// A source address for a user's outbound sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Exactly this address.
    Ip(IpAddr),
    /// A random address of this block per session (bound with IP_FREEBIND, so the block need not be configured
    /// address by address on the host).
    Prefix(Cidr),
}

impl Egress {
    fn is_v4(&self) -> bool {
        match self {
            Egress::Ip(ip) => ip.is_ipv4(),
            Egress::Prefix(c) => c.addr().is_ipv4(),
        }
    }

    /// The address to bind: the address itself, or a host address of the block from `random` (never the network
    /// address, nor the IPv4 broadcast address). True in the second field when IP_FREEBIND is needed.
    fn pick(&self, random: u128) -> (IpAddr, bool) {
        match *self {
            Egress::Ip(ip) => (ip, false),
            Egress::Prefix(c) => match c.addr() {
                IpAddr::V4(net) => {
                    let host_bits = 32 - u32::from(c.prefix().min(30));
                    let hosts = (1u128 << host_bits) - 2;
                    let offset = 1 + (random % hosts) as u32;
                    (IpAddr::V4((u32::from(net) | offset).into()), true)
                }
                IpAddr::V6(net) => {
                    let host_bits = 128 - u32::from(c.prefix().min(127));
                    let hosts = match host_bits {
                        128 => u128::MAX,
                        h => (1u128 << h) - 1,
                    };
                    let offset = 1 + random % hosts;
                    (IpAddr::V6((u128::from(net) | offset).into()), true)
                }
            },
        }
    }
}

/// Picks a source address of the wanted family from a user's egress list (at random among the entries, and at
/// random inside a block), or `None` when the list has none of that family.
pub fn pick_egress(list: &[Egress], v4: bool) -> Option<(IpAddr, bool)> {
    pick_egress_from(list, v4, random_u128())
}

/// Like [`pick_egress`], but the same for every session with the same user and session ID (`session_usernames`):
/// a sticky address, from a fixed hash (FNV-1a, spread over 128 bits), stable across restarts.
pub fn pick_sticky_egress(
    list: &[Egress],
    v4: bool,
    user: &str,
    session: &str,
) -> Option<(IpAddr, bool)> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user.bytes().chain([0]).chain(session.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // A second, differently seeded round fills the high half, so /64 blocks get 128 bits to choose from.
    let hi = h.rotate_left(29).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (h >> 31);
    pick_egress_from(list, v4, (u128::from(hi) << 64) | u128::from(h))
}

fn pick_egress_from(list: &[Egress], v4: bool, random: u128) -> Option<(IpAddr, bool)> {
    let fitting: Vec<&Egress> = list.iter().filter(|e| e.is_v4() == v4).collect();
    let n = fitting.len() as u128;
    let entry = fitting.get((random.checked_rem(n)?) as usize)?;
    Some(entry.pick(random.rotate_left(64) / n.max(1)))
}

/// 128 unpredictable-enough bits without a dependency: std's randomly keyed SipHash over a counter. Spreading
/// sessions over a block needs no cryptographic strength.
fn random_u128() -> u128 {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let keys = std::collections::hash_map::RandomState::new();
    (u128::from(keys.hash_one(n)) << 64) | u128::from(keys.hash_one(!n))
}

/// What the policy file says about one user.
#[derive(Debug, Clone, Default)]
pub struct UserPolicy {
    /// Concurrent sessions (`None`: `[defaults]`, then `--user-max-connections`).
    pub max_connections: Option<usize>,
    /// Source addresses for outbound TCP, UDP and BIND (empty: `--bind` or the kernel's choice).
    pub egress: Vec<Egress>,
    /// Groups, for rules.
    pub groups: Vec<Arc<str>>,
    /// `rate_down`, `rate_up` and `burst` of her section (each unset one falls back to `[defaults]`).
    pub rates: Rates,
    /// `quota` in bytes (unset: `[defaults]`).
    pub quota: Option<u64>,
    /// `quota_period` (unset: `[defaults]`).
    pub quota_period: Option<std::time::Duration>,
}

/// The whole policy: rules, per-user settings and defaults. `Policy::default()` is "no policy file".
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: RuleSet,
    groups: Vec<Arc<Group>>,
    users: HashMap<Arc<str>, UserPolicy>,
    default_max_connections: Option<usize>,
    default_rates: Rates,
    default_quota: Option<u64>,
    default_quota_period: Option<std::time::Duration>,
}

/// Why a target is refused before any connection is attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The name is not a valid host name (SOCKS5 0x08, SOCKS4 91, HTTP 400).
    BadName,
    /// A rule denies it (SOCKS5 0x02, SOCKS4 91, HTTP 403).
    Denied,
}

impl Policy {
    /// True when the file has rules (or denies by default): targets are then checked by name and address.
    pub fn has_rules(&self) -> bool {
        !self.rules.is_empty()
    }

    /// The number of rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The number of users with a section.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// The per-user settings of `user`, if the file has a section for her.
    pub fn user(&self, user: &str) -> Option<&UserPolicy> {
        self.users.get(user)
    }

    /// The concurrent-session limit for `user`: her own, else `[defaults]`, else `flag` (`--user-max-connections`).
    pub fn max_connections(&self, user: &str, flag: Option<usize>) -> Option<usize> {
        self.users
            .get(user)
            .and_then(|u| u.max_connections)
            .or(self.default_max_connections)
            .or(flag)
    }

    /// The concurrent-session limit per client address for clients that did not authenticate (`[defaults]`).
    pub fn anonymous_max_connections(&self) -> Option<usize> {
        self.default_max_connections
    }

    /// The rates of `user` (her own, each unset one from `[defaults]`), or of an anonymous client (`None`).
    pub fn rates(&self, user: Option<&str>) -> Rates {
        let d = self.default_rates;
        match user.and_then(|u| self.users.get(u)) {
            Some(u) => Rates {
                down: u.rates.down.or(d.down),
                up: u.rates.up.or(d.up),
                burst: u.rates.burst.or(d.burst),
            },
            None => d,
        }
    }

    /// The traffic quota of `user` (her own, each unset key from `[defaults]`). Quotas count per user name:
    /// anonymous clients (`None`) have none, since a counter per client address would start again with every
    /// new address.
    pub fn quota(&self, user: Option<&str>) -> Option<QuotaSpec> {
        let user = user?;
        let u = self.users.get(user);
        let bytes = u.and_then(|u| u.quota).or(self.default_quota)?;
        let period = u.and_then(|u| u.quota_period).or(self.default_quota_period);
        Some(QuotaSpec { bytes, period })
    }

    /// True when any user can have a quota (the control thread then keeps the counters' periods and state file).
    pub fn has_quotas(&self) -> bool {
        self.default_quota.is_some() || self.users.values().any(|u| u.quota.is_some())
    }

    /// The user's egress list (empty when none is configured).
    pub fn egress(&self, user: Option<&str>) -> &[Egress] {
        user.and_then(|u| self.users.get(u))
            .map(|u| u.egress.as_slice())
            .unwrap_or(&[])
    }

    fn who<'a>(&'a self, user: Option<&'a str>, client: IpAddr) -> Who<'a> {
        let groups = user
            .and_then(|u| self.users.get(u))
            .map(|u| u.groups.as_slice())
            .unwrap_or(&[]);
        Who {
            user,
            groups,
            client,
        }
    }

    /// Checks a name target before resolution: `Err` when the name is invalid or a rule settles it as denied.
    /// Without rules every name passes untouched (the resolver has the last word, as before policy files).
    pub fn check_name(
        &self,
        user: Option<&str>,
        client: IpAddr,
        cmd: Command,
        name: &str,
        port: u16,
    ) -> Result<(), Refusal> {
        if !self.has_rules() {
            return Ok(());
        }
        if name.parse::<IpAddr>().is_ok() {
            // An address spelled as a name is an address: only the address rules apply (after "resolution").
            return Ok(());
        }
        let name = name::normalize(name.as_bytes()).map_err(|_| Refusal::BadName)?;
        match self
            .rules
            .check_name(&self.who(user, client), cmd, &name, port)
        {
            NameVerdict::Decided(Action::Deny) => Err(Refusal::Denied),
            _ => Ok(()),
        }
    }

    /// Checks one address actually dialled (or one datagram's destination, or a BIND peer), with the name it came
    /// from. True when allowed.
    pub fn allows_addr(
        &self,
        user: Option<&str>,
        client: IpAddr,
        cmd: Command,
        name: Option<&str>,
        addr: SocketAddr,
    ) -> bool {
        if !self.has_rules() {
            return true;
        }
        let normalised = match name {
            Some(n) if n.parse::<IpAddr>().is_err() => match name::normalize(n.as_bytes()) {
                Ok(n) => Some(n),
                Err(_) => return false,
            },
            _ => None,
        };
        match self
            .rules
            .check_addr(&self.who(user, client), cmd, normalised.as_deref(), addr)
        {
            Action::Allow => true,
            Action::Deny => false,
            // Only TCP sessions can be carried by a group (`route`); a datagram or BIND peer that a rule sends
            // through one is refused rather than sent around the operator's route.
            Action::Via(_) => matches!(cmd, Command::Connect | Command::Http),
        }
    }

    /// The upstream group a session goes through, when the first rule that matches its target says `via:NAME`. A
    /// name target is routed by the name rules alone (it is not resolved here: the group's member resolves it);
    /// an address target by every rule, as [`Policy::allows_addr`] checks it.
    pub fn route(
        &self,
        user: Option<&str>,
        client: IpAddr,
        cmd: Command,
        target: &crate::proto::TargetAddr,
    ) -> Option<Arc<Group>> {
        if self.groups.is_empty() {
            return None;
        }
        let who = self.who(user, client);
        let action = match target {
            crate::proto::TargetAddr::Domain(name, port) => match name.as_str().parse::<IpAddr>() {
                Ok(ip) => self
                    .rules
                    .check_addr(&who, cmd, None, SocketAddr::new(ip, *port)),
                Err(_) => {
                    let name = name::normalize(name.as_str().as_bytes()).ok()?;
                    self.rules.by_name(&who, cmd, &name, *port)?
                }
            },
            crate::proto::TargetAddr::Ip(addr) => self.rules.check_addr(&who, cmd, None, *addr),
        };
        match action {
            Action::Via(i) => self.groups.get(i as usize).cloned(),
            _ => None,
        }
    }

    /// The upstream groups (for /metrics).
    pub fn groups(&self) -> &[Arc<Group>] {
        &self.groups
    }

    /// Takes over the member health and counters of `old` (the policy before a reload) for members that stay in
    /// a group of the same name. Call before the policy is shared.
    pub fn adopt_health(&mut self, old: &Policy) {
        for g in &mut self.groups {
            if let (Some(o), Some(g)) = (
                old.groups.iter().find(|o| o.name == g.name),
                Arc::get_mut(g),
            ) {
                g.adopt(o);
            }
        }
    }
}

/// The users table and policy that a load produced, or every error found (one line each).
pub type Loaded = Result<(Users, Policy), Vec<String>>;

/// Loads the users table (`--user` pairs over the users file) and then the policy file, which may add users.
/// Errors are lines of the form `FILE:LINE: KEY: problem`.
/// `trust` is how TLS group members are verified where their group does not say (`--upstream-ca`,
/// `--upstream-insecure`, else the system roots).
pub fn load_all(
    inline: &[(String, String)],
    users_file: Option<&Path>,
    policy_file: Option<&Path>,
    trust: &UpstreamTrust,
) -> Loaded {
    let users = crate::config::load_users(inline, users_file).map_err(|e| vec![e])?;
    let Some(path) = policy_file else {
        return Ok((users, Policy::default()));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("{}: cannot read policy file: {e}", path.display())])?;
    parse_with(&text, &path.display().to_string(), users, trust)
}

/// Collects errors with their positions while a file is compiled.
struct Errors<'a> {
    file: &'a str,
    text: &'a str,
    list: Vec<String>,
}

impl Errors<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text
            .as_bytes()
            .get(..end)
            .map(|b| b.iter().filter(|&&c| c == b'\n').count() + 1)
            .unwrap_or(1)
    }

    fn push(&mut self, span: std::ops::Range<usize>, key: &str, problem: impl std::fmt::Display) {
        let line = self.line_of(span.start);
        self.list
            .push(format!("{}:{line}: {key}: {problem}", self.file));
    }

    /// The key a TOML syntax or type error is about: the `key = ...` or `[table]` on its line.
    fn key_at(&self, offset: usize) -> String {
        let start = self
            .text
            .get(..offset.min(self.text.len()))
            .and_then(|t| t.rfind('\n'))
            .map(|i| i + 1)
            .unwrap_or(0);
        let line = self
            .text
            .get(start..)
            .and_then(|t| t.lines().next())
            .unwrap_or("")
            .trim();
        let key = if line.starts_with('[') {
            line.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
        } else {
            line.split('=').next().unwrap_or("").trim()
        };
        // Keys a user typed are short; cap what is quoted back so a value can never be echoed whole.
        let key: String = key.chars().take(64).collect();
        if key.is_empty() || key.contains(char::is_whitespace) || key.starts_with('#') {
            "-".to_string()
        } else {
            key
        }
    }
}

/// Parses and validates a policy file's text; `users` is the table from the users file and `--user`, which
/// `[users.NAME]` sections with a password add to. `file` names the file in error messages.
pub fn parse(text: &str, file: &str, users: Users) -> Loaded {
    parse_with(text, file, users, &UpstreamTrust::System)
}

/// [`parse`], with `trust` for TLS group members whose group names no `ca` or `insecure` of its own.
pub fn parse_with(text: &str, file: &str, mut users: Users, trust: &UpstreamTrust) -> Loaded {
    let mut errs = Errors {
        file,
        text,
        list: Vec::new(),
    };
    let parsed: File = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            let key = errs.key_at(offset);
            // The message alone: toml's Display quotes the offending line, which may hold a password.
            let msg = e.message().trim().replace('\n', " ");
            errs.push(offset..offset, &key, msg);
            return Err(errs.list);
        }
    };

    let mut policy = Policy::default();
    let mut default_action = Action::Allow;
    if let Some(d) = &parsed.defaults {
        if let Some(m) = &d.max_connections {
            policy.default_max_connections = limit(&mut errs, m, "defaults.max_connections");
        }
        if let Some(r) = &d.rules_default {
            match r.get_ref().as_str() {
                "allow" => default_action = Action::Allow,
                "deny" => default_action = Action::Deny,
                other => errs.push(
                    r.span(),
                    "defaults.rules_default",
                    format!("expected \"allow\" or \"deny\", got {other:?}"),
                ),
            }
        }
        if let Some(s) = &d.session_usernames {
            users.set_session_names(*s.get_ref());
        }
        (
            policy.default_rates,
            policy.default_quota,
            policy.default_quota_period,
        ) = limits(
            &mut errs,
            "defaults",
            [&d.rate_down, &d.rate_up, &d.quota, &d.burst],
            &d.quota_period,
        );
    }

    // Users: passwords merge into the users table; everything else into the per-user policy.
    let mut added = Vec::new();
    for (name, section) in &parsed.users {
        let span = section.span();
        let u = section.get_ref();
        let key = format!("users.{name}");
        if let Some(p) = &u.password {
            if users.contains(name) {
                errs.push(
                    p.span(),
                    &format!("{key}.password"),
                    "user is also defined in the users file or by --user: give her password in one place",
                );
            } else {
                added.push((name.clone(), p.get_ref().clone(), p.span()));
            }
        } else if !users.contains(name) {
            errs.push(
                span.clone(),
                &key,
                "user has no password here and is not in the users file or --user",
            );
        }
        let mut up = UserPolicy::default();
        if let Some(m) = &u.max_connections {
            up.max_connections = limit(&mut errs, m, &format!("{key}.max_connections"));
        }
        if let Some(list) = &u.egress {
            if list.get_ref().is_empty() {
                errs.push(list.span(), &format!("{key}.egress"), "empty list");
            }
            for item in list.get_ref() {
                match parse_egress(item.get_ref()) {
                    Ok(e) => up.egress.push(e),
                    Err(m) => errs.push(item.span(), &format!("{key}.egress"), m),
                }
            }
        }
        if let Some(list) = &u.groups {
            for g in list.get_ref() {
                if g.get_ref().is_empty() {
                    errs.push(g.span(), &format!("{key}.groups"), "empty group name");
                } else {
                    up.groups.push(Arc::from(g.get_ref().as_str()));
                }
            }
        }
        (up.rates, up.quota, up.quota_period) = limits(
            &mut errs,
            &key,
            [&u.rate_down, &u.rate_up, &u.quota, &u.burst],
            &u.quota_period,
        );
        policy.users.insert(Arc::from(name.as_str()), up);
    }
    for (name, pass, span) in added {
        if let Err(m) = users.add(&name, &pass) {
            // The message names the user at most, never the secret.
            errs.push(span, &format!("users.{name}.password"), m);
        }
    }

    // Upstream groups, indexed in name order (the order `via:NAME` rules refer to them by).
    let mut tls_configs = TlsConfigs::default();
    for (name, section) in &parsed.upstreams {
        let g = section.get_ref();
        let key = format!("upstreams.{name}");
        if g.servers.get_ref().is_empty() {
            errs.push(g.servers.span(), &format!("{key}.servers"), "empty list");
        } else if g.servers.get_ref().len() > crate::groups::MAX_MEMBERS {
            errs.push(
                g.servers.span(),
                &format!("{key}.servers"),
                format!("at most {} servers per group", crate::groups::MAX_MEMBERS),
            );
        }
        let mut servers = Vec::new();
        for s in g.servers.get_ref() {
            match check_upstream_url(s.get_ref()) {
                Ok(u) => servers.push(u),
                Err(m) => errs.push(s.span(), &format!("{key}.servers"), m),
            }
        }
        let mut max_fails = crate::groups::DEFAULT_MAX_FAILS;
        if let Some(m) = &g.max_fails {
            match u32::try_from(*m.get_ref()) {
                Ok(n) if (1..=1000).contains(&n) => max_fails = n,
                _ => errs.push(
                    m.span(),
                    &format!("{key}.max_fails"),
                    format!("expected a number from 1 to 1000, got {}", m.get_ref()),
                ),
            }
        }
        let mut fail_timeout = crate::groups::DEFAULT_FAIL_TIMEOUT;
        if let Some(t) = &g.fail_timeout {
            match parse_duration(t.get_ref()) {
                Some(d) if !d.is_zero() => fail_timeout = d,
                _ => errs.push(
                    t.span(),
                    &format!("{key}.fail_timeout"),
                    format!(
                        "expected a duration such as \"10s\" or \"500ms\", got {:?}",
                        t.get_ref()
                    ),
                ),
            }
        }
        let mut strategy = Strategy::Failover;
        if let Some(st) = &g.strategy {
            if let Some(parsed) = Strategy::parse(st.get_ref()) {
                strategy = parsed;
            } else {
                errs.push(
                    st.span(),
                    &format!("{key}.strategy"),
                    format!(
                        "expected \"failover\", \"round-robin\" or \"hash\", got {:?}",
                        st.get_ref()
                    ),
                );
            }
        }
        let mut group = Group::new(name.clone(), servers, strategy, max_fails, fail_timeout);
        member_tls(&mut errs, &key, g, &mut group, trust, &mut tls_configs);
        policy.groups.push(Arc::new(group));
    }

    let groups: Vec<Arc<str>> = policy
        .users
        .values()
        .flat_map(|u| u.groups.iter().cloned())
        .collect();
    let mut list = Vec::with_capacity(parsed.rules.len());
    for (i, section) in parsed.rules.iter().enumerate() {
        let key = format!("rules[{}]", i + 1);
        if let Some(r) = compile_rule(&mut errs, &key, section, &users, &groups, &parsed.upstreams)
        {
            list.push(r);
        }
    }
    if !errs.list.is_empty() {
        return Err(errs.list);
    }
    policy.rules = RuleSet::new(list, default_action);
    Ok((users, policy))
}

/// A `max_connections` value: 1 or more.
fn limit(errs: &mut Errors<'_>, v: &S<i64>, key: &str) -> Option<usize> {
    match usize::try_from(*v.get_ref()) {
        Ok(n) if n >= 1 => Some(n),
        _ => {
            errs.push(
                v.span(),
                key,
                format!("expected a number >= 1, got {}", v.get_ref()),
            );
            None
        }
    }
}

/// A parser of one unit-carrying value.
type UnitParser = fn(&str) -> Result<u64, String>;

/// Rates and burst, quota and its period of one section, validated.
fn limits(
    errs: &mut Errors<'_>,
    section: &str,
    [rate_down, rate_up, quota, burst]: [&Option<S<String>>; 4],
    quota_period: &Option<S<String>>,
) -> (Rates, Option<u64>, Option<std::time::Duration>) {
    let mut one = |value: &Option<S<String>>, name: &str, parse: UnitParser| -> Option<u64> {
        let v = value.as_ref()?;
        match parse(v.get_ref()) {
            Ok(n) => Some(n),
            Err(m) => {
                errs.push(v.span(), &format!("{section}.{name}"), m);
                None
            }
        }
    };
    let rates = Rates {
        down: one(rate_down, "rate_down", units::parse_rate),
        up: one(rate_up, "rate_up", units::parse_rate),
        burst: one(burst, "burst", units::parse_size),
    };
    let bytes = one(quota, "quota", units::parse_size);
    let mut period = None;
    if let Some(v) = quota_period {
        match parse_duration(v.get_ref()) {
            // Periods are kept in milliseconds (the state file's unit): shorter ones would mean nothing.
            Some(d) if d >= std::time::Duration::from_secs(1) => period = Some(d),
            _ => errs.push(
                v.span(),
                &format!("{section}.quota_period"),
                format!(
                    "expected a duration of at least 1s, such as \"30d\" or \"12h\", got {:?}",
                    v.get_ref()
                ),
            ),
        }
    }
    (rates, bytes, period)
}

/// `IP` or `CIDR` for `egress`.
fn parse_egress(s: &str) -> Result<Egress, String> {
    if s.contains('/') {
        let c: Cidr = s.parse()?;
        let host_bits = if c.addr().is_ipv4() { 32 } else { 128 } - u32::from(c.prefix());
        if host_bits == 0 {
            return Ok(Egress::Ip(c.addr()));
        }
        if c.addr().is_ipv4() && host_bits < 2 {
            return Err(format!(
                "{s:?}: an IPv4 egress block needs at least two host bits (/30 or shorter)"
            ));
        }
        return Ok(Egress::Prefix(c));
    }
    let ip: IpAddr = s
        .parse()
        .map_err(|_| format!("expected an IP address or CIDR block, got {s:?}"))?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("{s:?} cannot be a source address"));
    }
    Ok(Egress::Ip(crate::proto::canonical_ip(ip)))
}

/// Checks an upstream server URL without resolving anything: the host must be an address, so neither the check
/// nor a reload ever waits on DNS.
fn check_upstream_url(s: &str) -> Result<Upstream, String> {
    let hostport = s
        .split_once("://")
        .map(|(_, r)| r.trim_end_matches('/'))
        .map(|r| r.rsplit_once('@').map(|(_, h)| h).unwrap_or(r))
        .ok_or("expected socks5://[user:pass@]host:port or http://[user:pass@]host:port")?;
    let host = match hostport.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map(|(h, _)| h).unwrap_or(""),
        None => hostport.rsplit_once(':').map(|(h, _)| h).unwrap_or(""),
    };
    if host.parse::<IpAddr>().is_err() {
        return Err("the server must be given by IP address (names are not resolved here)".into());
    }
    // A URL that failed to parse can contain a password: report the parser's message, never the URL.
    s.parse::<Upstream>()
}

/// TLS client configurations made during one load, by trust and ALPN: members that share them share one (the
/// system roots are read once, not once per member).
type TlsConfigs = HashMap<(UpstreamTrust, bool), Arc<rustls::ClientConfig>>;

/// Gives the group's `https://` and `socks5s://` members their TLS client configuration: the group's `ca` or
/// `insecure` if set, else `default` (the flags). The group's keys without a TLS member are an error, since
/// they would silently do nothing.
fn member_tls(
    errs: &mut Errors<'_>,
    key: &str,
    g: &UpstreamSection,
    group: &mut Group,
    default: &UpstreamTrust,
    cache: &mut TlsConfigs,
) {
    let insecure = g.insecure.as_ref().filter(|i| *i.get_ref());
    let (trust, at) = match (&g.ca, insecure) {
        (Some(_), Some(i)) => {
            errs.push(
                i.span(),
                &format!("{key}.insecure"),
                "excludes ca (a certificate is either verified or not)",
            );
            return;
        }
        (Some(ca), None) => {
            if ca.get_ref().is_empty() {
                errs.push(ca.span(), &format!("{key}.ca"), "empty file name");
                return;
            }
            (
                UpstreamTrust::Ca(ca.get_ref().into()),
                Some((ca.span(), "ca")),
            )
        }
        (None, Some(i)) => (UpstreamTrust::Insecure, Some((i.span(), "insecure"))),
        (None, None) => (default.clone(), None),
    };
    let any_tls = group.members.iter().any(|m| m.server.tls);
    if !any_tls {
        if let Some((span, field)) = at {
            errs.push(
                span,
                &format!("{key}.{field}"),
                "applies to https:// and socks5s:// members, and the group has none",
            );
        }
        return;
    }
    for m in &mut group.members {
        if !m.server.tls {
            continue;
        }
        let http = m.server.kind == crate::upstream::UpstreamKind::Http;
        let made = match cache.get(&(trust.clone(), http)) {
            Some(c) => Ok(Arc::clone(c)),
            None => crate::tls::upstream_client_config(&trust, http).inspect(|c| {
                cache.insert((trust.clone(), http), Arc::clone(c));
            }),
        };
        match made {
            Ok(c) => m.tls = Some(c),
            Err(e) => {
                let (span, field) = at.clone().unwrap_or((g.servers.span(), "servers"));
                // The loader names the flag; here the key in front of the message says where it came from.
                let msg = e.to_string();
                let msg = msg
                    .strip_prefix("--upstream-ca ")
                    .or_else(|| msg.strip_prefix("--upstream: "))
                    .unwrap_or(&msg);
                errs.push(span, &format!("{key}.{field}"), msg);
                return;
            }
        }
    }
}

fn compile_rule(
    errs: &mut Errors<'_>,
    key: &str,
    section: &S<RuleSection>,
    users: &Users,
    groups: &[Arc<str>],
    upstreams: &BTreeMap<String, S<UpstreamSection>>,
) -> Option<(Rule, Vec<Pattern>)> {
    let r = section.get_ref();
    let before = errs.list.len();
    let action = match r.action.get_ref().as_str() {
        "allow" => Action::Allow,
        "deny" => Action::Deny,
        other => {
            match other.strip_prefix("via:") {
                Some(name) if upstreams.contains_key(name) => {
                    // Groups are compiled in the map's (name) order: the position is the group's index.
                    let i = upstreams.keys().position(|k| k == name).unwrap_or(0);
                    return compile_rule_with(
                        errs,
                        key,
                        section,
                        (users, groups),
                        before,
                        Action::Via(i as u32),
                    );
                }
                Some(name) => errs.push(
                    r.action.span(),
                    &format!("{key}.action"),
                    format!("no [upstreams.{name}] group is defined"),
                ),
                None => errs.push(
                    r.action.span(),
                    &format!("{key}.action"),
                    format!("expected \"allow\", \"deny\" or \"via:NAME\", got {other:?}"),
                ),
            }
            Action::Deny
        }
    };
    compile_rule_with(errs, key, section, (users, groups), before, action)
}

fn compile_rule_with(
    errs: &mut Errors<'_>,
    key: &str,
    section: &S<RuleSection>,
    (users, groups): (&Users, &[Arc<str>]),
    before: usize,
    action: Action,
) -> Option<(Rule, Vec<Pattern>)> {
    let r = section.get_ref();
    let mut rule = Rule::new(action);
    let nonempty = |errs: &mut Errors<'_>, list: &S<Vec<S<String>>>, field: &str| {
        if list.get_ref().is_empty() {
            errs.push(
                list.span(),
                &format!("{key}.{field}"),
                "empty list matches nothing (leave the key out to match everything)",
            );
        }
    };
    if let Some(list) = &r.users {
        nonempty(errs, list, "users");
        let mut v = Vec::new();
        for u in list.get_ref() {
            if !users.contains(u.get_ref()) {
                errs.push(
                    u.span(),
                    &format!("{key}.users"),
                    format!(
                        "user {:?} is not defined (users file, --user or [users.NAME])",
                        u.get_ref()
                    ),
                );
            }
            v.push(Arc::from(u.get_ref().as_str()));
        }
        rule.users = Some(v);
    }
    if let Some(list) = &r.groups {
        nonempty(errs, list, "groups");
        let mut v = Vec::new();
        for g in list.get_ref() {
            if !groups.iter().any(|x| **x == **g.get_ref()) {
                errs.push(
                    g.span(),
                    &format!("{key}.groups"),
                    format!("group {:?} is not given to any user", g.get_ref()),
                );
            }
            v.push(Arc::from(g.get_ref().as_str()));
        }
        rule.groups = Some(v);
    }
    if let Some(list) = &r.clients {
        nonempty(errs, list, "clients");
        let mut v = Vec::new();
        for c in list.get_ref() {
            match c.get_ref().parse::<Cidr>() {
                Ok(c) => v.push(c),
                Err(m) => errs.push(c.span(), &format!("{key}.clients"), m),
            }
        }
        rule.clients = Some(v);
    }
    if let Some(list) = &r.commands {
        nonempty(errs, list, "commands");
        let mut v = Vec::new();
        for c in list.get_ref() {
            match Command::parse(c.get_ref()) {
                Some(c) => v.push(c),
                None => errs.push(
                    c.span(),
                    &format!("{key}.commands"),
                    format!("expected connect, http, bind or udp, got {:?}", c.get_ref()),
                ),
            }
        }
        rule = rule.with_commands(&v);
    }
    let mut patterns = Vec::new();
    if let Some(list) = &r.dest {
        nonempty(errs, list, "dest");
        for d in list.get_ref() {
            match rules::parse_pattern(d.get_ref()) {
                Ok(p) => patterns.extend(p),
                Err(m) => errs.push(d.span(), &format!("{key}.dest"), m),
            }
        }
    }
    (errs.list.len() == before).then_some((rule, patterns))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
