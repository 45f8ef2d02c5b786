//! Upstream groups (`[upstreams.NAME]` in the policy file): the members, the order a session tries them in
//! (failover, round-robin, hash by client address) and their passive health.
//!
//! Pure apart from the clock, which every call takes as `now`, so the tests drive time. Member state is atomics
//! shared by every worker (no lock); a reload hands the state of members that stay to the new groups
//! ([`Group::adopt`]), so a member that was down stays down across a SIGHUP.

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::upstream::Upstream;

/// How a group orders its members for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The first healthy member in the configured order.
    Failover,
    /// The next member in turn, shared by every worker.
    RoundRobin,
    /// The member chosen by the client address (sticky while it is healthy).
    Hash,
}

impl Strategy {
    /// The policy file's spelling.
    pub fn parse(s: &str) -> Option<Strategy> {
        Some(match s {
            "failover" => Strategy::Failover,
            "round-robin" => Strategy::RoundRobin,
            "hash" => Strategy::Hash,
            _ => return None,
        })
    }
}

/// Default consecutive failures before a member is skipped (`max_fails`).
pub const DEFAULT_MAX_FAILS: u32 = 3;
/// Default time a failed member is skipped (`fail_timeout`).
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);

/// Most members a group may have (a session's member order holds 16-bit indexes).
pub const MAX_MEMBERS: usize = 1024;

/// A member's health and counters, shared by all workers and carried over reloads.
#[derive(Debug, Default)]
pub struct MemberState {
    /// Failures in a row since the last success.
    fails: AtomicU32,
    /// Milliseconds since [`epoch`] until which the member is skipped; 0 while it is up.
    down_until: AtomicU64,
    /// Connect attempts made to it.
    attempts: AtomicU64,
    /// Attempts that failed (connect or proxy handshake).
    failures: AtomicU64,
}

/// One member of a group.
pub struct Member {
    /// The server as configured (its address is an IP: nothing is resolved).
    pub server: Arc<Upstream>,
    /// The URL without the password (metrics labels, logs).
    pub label: String,
    /// The TLS client configuration for an `https://` or `socks5s://` member (its trust set at policy load).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    state: Arc<MemberState>,
}

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.label)
    }
}

/// What a health change was, for the caller to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The member reached `max_fails` and is skipped until the cool-down ends.
    Down,
    /// A member that was down answered again.
    Up,
}

/// An upstream group.
#[derive(Debug)]
pub struct Group {
    /// The name after `upstreams.`.
    pub name: String,
    /// Members in configured order.
    pub members: Vec<Member>,
    /// How sessions pick members.
    pub strategy: Strategy,
    /// Failures in a row that take a member down.
    pub max_fails: u32,
    /// How long a down member is skipped.
    pub fail_timeout: Duration,
    next: AtomicUsize,
}

/// The clock origin the member deadlines count from (one per process, so reloaded groups agree).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn ms(now: Instant) -> u64 {
    // +1 so that 0 always means "up", even in the first millisecond.
    u64::try_from(now.saturating_duration_since(epoch()).as_millis()).unwrap_or(u64::MAX - 1) + 1
}

/// The server URL without its password.
pub fn label(server: &Upstream) -> String {
    let scheme = match (server.kind, server.tls) {
        (crate::upstream::UpstreamKind::Socks5, false) => "socks5",
        (crate::upstream::UpstreamKind::Socks5, true) => "socks5s",
        (crate::upstream::UpstreamKind::Http, false) => "http",
        (crate::upstream::UpstreamKind::Http, true) => "https",
    };
    let user = match &server.credentials {
        Some((u, _)) => format!("{u}@"),
        None => String::new(),
    };
    match server.addrs.first() {
        Some(a) => format!("{scheme}://{user}{a}"),
        None => format!("{scheme}://{user}{}:{}", server.host, server.port),
    }
}

impl Group {
    /// A group with fresh member state.
    pub fn new(
        name: String,
        servers: Vec<Upstream>,
        strategy: Strategy,
        max_fails: u32,
        fail_timeout: Duration,
    ) -> Group {
        let _ = epoch();
        let members = servers
            .into_iter()
            .map(|server| Member {
                label: label(&server),
                server: Arc::new(server),
                tls: None,
                state: Arc::default(),
            })
            .collect();
        Group {
            name,
            members,
            strategy,
            max_fails: max_fails.max(1),
            fail_timeout,
            next: AtomicUsize::new(0),
        }
    }

    /// Takes over the health state and counters of members that `old` (the same group before a reload) has too,
    /// matched by their URL (credentials included, so a changed password starts afresh).
    pub fn adopt(&mut self, old: &Group) {
        for m in &mut self.members {
            if let Some(o) = old.members.iter().find(|o| o.server == m.server) {
                m.state = Arc::clone(&o.state);
            }
        }
        self.next
            .store(old.next.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The member at `index`.
    pub fn member(&self, index: usize) -> Option<&Member> {
        self.members.get(index)
    }

    /// The order in which a session from `client` tries the members: the healthy ones as the strategy ranks them,
    /// then those cooling down (a last resort, better than refusing when every member is marked down).
    pub fn order(&self, client: IpAddr, now: Instant) -> Vec<u16> {
        let n = self.members.len();
        if n == 0 {
            return Vec::new();
        }
        let start = match self.strategy {
            Strategy::Failover => 0,
            Strategy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            Strategy::Hash => (hash_ip(client) % n as u64) as usize,
        };
        let now = ms(now);
        let mut healthy = Vec::with_capacity(n);
        let mut cooling = Vec::new();
        for i in (0..n).map(|k| (start + k) % n) {
            let down = self.members[i].state.down_until.load(Ordering::Relaxed);
            if down != 0 && down > now {
                cooling.push(i as u16);
            } else {
                healthy.push(i as u16);
            }
        }
        healthy.extend(cooling);
        healthy
    }

    /// Counts an attempt on member `index`.
    pub fn attempt(&self, index: usize) {
        if let Some(m) = self.members.get(index) {
            m.state.attempts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Member `index` connected and completed its handshake: it is up.
    pub fn success(&self, index: usize) -> Option<Change> {
        let m = self.members.get(index)?;
        if m.state.fails.load(Ordering::Relaxed) != 0 {
            m.state.fails.store(0, Ordering::Relaxed);
        }
        // Plain loads first: a healthy member's success writes nothing shared.
        if m.state.down_until.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let was = m.state.down_until.swap(0, Ordering::Relaxed);
        (was != 0).then_some(Change::Up)
    }

    /// Member `index` failed to connect or to complete its handshake. Returns `Down` when this failure takes it
    /// down (reported once per transition, whichever worker makes it).
    pub fn failure(&self, index: usize, now: Instant) -> Option<Change> {
        let m = self.members.get(index)?;
        m.state.failures.fetch_add(1, Ordering::Relaxed);
        let fails = m
            .state
            .fails
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if fails < self.max_fails {
            return None;
        }
        let until = ms(now)
            .saturating_add(u64::try_from(self.fail_timeout.as_millis()).unwrap_or(u64::MAX / 2));
        // A member tried again after its cool-down goes straight back down on its next failure; only the
        // transition from up is a change worth a log line.
        let was = m.state.down_until.swap(until, Ordering::Relaxed);
        (was == 0).then_some(Change::Down)
    }

    /// True unless the member is marked down (it stays marked until a success, also after its cool-down).
    pub fn is_up(&self, index: usize) -> bool {
        self.members
            .get(index)
            .is_some_and(|m| m.state.down_until.load(Ordering::Relaxed) == 0)
    }

    /// `(attempts, failures)` of member `index`.
    pub fn counters(&self, index: usize) -> (u64, u64) {
        self.members.get(index).map_or((0, 0), |m| {
            (
                m.state.attempts.load(Ordering::Relaxed),
                m.state.failures.load(Ordering::Relaxed),
            )
        })
    }
}

/// FNV-1a over the address bytes: stable across restarts and workers.
fn hash_ip(ip: IpAddr) -> u64 {
    let bytes: Vec<u8> = match crate::proto::canonical_ip(ip) {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Appends the groups' member gauges and counters in the Prometheus text format.
pub fn render(groups: &[Arc<Group>], out: &mut String) {
    use std::fmt::Write;
    if groups.is_empty() {
        return;
    }
    let series: [(&str, &str, &str); 3] = [
        (
            "socksgate_upstream_up",
            "gauge",
            "1 while the upstream group member is in service, 0 while it is skipped after failures.",
        ),
        (
            "socksgate_upstream_attempts_total",
            "counter",
            "Connections attempted to the upstream group member.",
        ),
        (
            "socksgate_upstream_failures_total",
            "counter",
            "Attempts to the upstream group member that failed (connect or proxy handshake).",
        ),
    ];
    for (k, (name, kind, help)) in series.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for g in groups {
            for (i, m) in g.members.iter().enumerate() {
                let (attempts, failures) = g.counters(i);
                let v = match k {
                    0 => u64::from(g.is_up(i)),
                    1 => attempts,
                    _ => failures,
                };
                let _ = writeln!(
                    out,
                    "{name}{{group=\"{}\",server=\"{}\"}} {v}",
                    escape(&g.name),
                    escape(&m.label)
                );
            }
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn group(strategy: Strategy, n: usize) -> Group {
        let servers = (0..n)
            .map(|i| format!("socks5://127.0.0.1:{}", 1000 + i).parse().unwrap())
            .collect();
        Group::new("g".into(), servers, strategy, 2, Duration::from_secs(10))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn failover_skips_down_members_until_the_cool_down_ends() {
        let g = group(Strategy::Failover, 3);
        let t0 = Instant::now();
        let c = ip("127.0.0.1");
        assert_eq!(g.order(c, t0), vec![0, 1, 2]);
        assert_eq!(g.failure(0, t0), None);
        assert_eq!(g.order(c, t0), vec![0, 1, 2]);
        assert_eq!(g.failure(0, t0), Some(Change::Down));
        assert!(!g.is_up(0));
        assert_eq!(g.order(c, t0 + Duration::from_secs(9)), vec![1, 2, 0]);
        // After the cool-down it is tried first again, and one more failure takes it down at once (no new log).
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(g.order(c, t1), vec![0, 1, 2]);
        assert_eq!(g.failure(0, t1), None);
        assert_eq!(g.order(c, t1), vec![1, 2, 0]);
        // A success brings it back.
        let t2 = t1 + Duration::from_secs(11);
        assert_eq!(g.success(0), Some(Change::Up));
        assert!(g.is_up(0));
        assert_eq!(g.order(c, t2), vec![0, 1, 2]);
        assert_eq!(g.success(0), None);
        assert_eq!(g.counters(0), (0, 3));
    }

    #[test]
    fn a_success_resets_the_failure_run() {
        let g = group(Strategy::Failover, 2);
        let t = Instant::now();
        assert_eq!(g.failure(0, t), None);
        assert_eq!(g.success(0), None);
        assert_eq!(g.failure(0, t), None);
        assert!(g.is_up(0));
    }

    #[test]
    fn round_robin_rotates_and_hash_sticks() {
        let g = group(Strategy::RoundRobin, 3);
        let t = Instant::now();
        let firsts: Vec<u16> = (0..6).map(|_| g.order(ip("127.0.0.1"), t)[0]).collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        let g = group(Strategy::Hash, 4);
        let a = g.order(ip("10.0.0.1"), t);
        for _ in 0..10 {
            assert_eq!(g.order(ip("10.0.0.1"), t), a);
        }
        assert_eq!(g.order(ip("::ffff:10.0.0.1"), t), a);
        let spread: std::collections::HashSet<u16> = (0..64)
            .map(|i| g.order(ip(&format!("10.0.1.{i}")), t)[0])
            .collect();
        assert!(spread.len() > 1);
        // A down member's clients move to the next one; the others keep theirs.
        let first = a[0] as usize;
        g.failure(first, t);
        g.failure(first, t);
        assert_eq!(g.order(ip("10.0.0.1"), t)[0], a[1]);
    }

    #[test]
    fn adopt_keeps_state_of_members_that_stay() {
        let old = group(Strategy::Failover, 2);
        let t = Instant::now();
        old.failure(1, t);
        old.failure(1, t);
        old.attempt(1);
        let servers = vec![
            "socks5://127.0.0.1:1001".parse().unwrap(),
            "socks5://127.0.0.1:2000".parse().unwrap(),
        ];
        let mut new = Group::new(
            "g".into(),
            servers,
            Strategy::Failover,
            2,
            DEFAULT_FAIL_TIMEOUT,
        );
        new.adopt(&old);
        assert!(!new.is_up(0));
        assert_eq!(new.counters(0), (1, 2));
        assert!(new.is_up(1));
        let mut text = String::new();
        render(&[Arc::new(new)], &mut text);
        assert!(text
            .contains("socksgate_upstream_up{group=\"g\",server=\"socks5://127.0.0.1:1001\"} 0"));
        assert!(text.contains(
            "socksgate_upstream_failures_total{group=\"g\",server=\"socks5://127.0.0.1:1001\"} 2"
        ));
    }
}
