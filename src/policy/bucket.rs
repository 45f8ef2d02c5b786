//! Per-user token buckets shared by every worker thread without a lock on the hot path.
//!
//! A bucket is one atomic "theoretical arrival time" (GCRA, the token bucket expressed as a clock): tokens are the
//! nanoseconds between it and `now + burst`. A worker takes what one read may use with a single compare-and-swap
//! and gives back what the read did not fill, so all workers and all sessions of a user draw on the same rate.
//! Rate and burst are atomics too: a reload changes them in place and running sessions see the new limit at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::quota::{self, Quota, QuotaSpec, Saved};
use super::Policy;

const NS: u128 = 1_000_000_000;

/// The clock buckets count in: nanoseconds since the first use in this process.
pub fn now_ns(now: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| now - Duration::from_secs(1));
    now.saturating_duration_since(epoch).as_nanos() as u64
}

/// One direction's bucket.
#[derive(Debug, Default)]
pub struct Bucket {
    /// Bytes per second; 0 = unlimited.
    rate: AtomicU64,
    /// Bytes that may go at once after an idle spell.
    burst: AtomicU64,
    /// The bucket's clock: tokens are what lies between it and `now + burst`.
    tat: AtomicU64,
}

/// Bytes to nanoseconds at `rate`, rounded up.
fn ns_for(bytes: u64, rate: u64) -> u64 {
    (u128::from(bytes) * NS).div_ceil(u128::from(rate.max(1))) as u64
}

impl Bucket {
    /// Sets rate and burst (`burst` 0: a quarter second of the rate).
    pub fn set(&self, rate: u64, burst: u64) {
        let burst = if burst == 0 { (rate / 4).max(1) } else { burst };
        self.burst.store(burst, Ordering::Relaxed);
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// The configured rate (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Takes up to `want` bytes' worth of tokens: `Ok(granted)` (at least 1), or `Err(wait)` until some are back.
    pub fn take(&self, now: Instant, want: usize) -> Result<usize, Duration> {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 || want == 0 {
            return Ok(want);
        }
        let burst = self.burst.load(Ordering::Relaxed).max(1);
        let tau = ns_for(burst, rate);
        let now = now_ns(now);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let base = tat.max(now);
            let room = (now + tau).saturating_sub(base);
            let avail = (u128::from(room) * u128::from(rate) / NS) as u64;
            let grant = avail.min(want as u64).min(burst);
            // Waking for a few bytes at a time would cost a timer per few bytes: wait for a useful chunk.
            let chunk = (want as u64).min(burst / 4).max(1);
            if grant < chunk {
                let wait = (base + ns_for(chunk, rate)).saturating_sub(now + tau);
                return Err(Duration::from_nanos(wait.max(1_000_000)));
            }
            let next = base + ns_for(grant, rate);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(grant as usize),
                Err(t) => tat = t,
            }
        }
    }

    /// Returns tokens taken but not used (a read that came back short).
    pub fn give_back(&self, bytes: usize) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 || bytes == 0 {
            return;
        }
        let ns = (u128::from(bytes as u64) * NS / u128::from(rate)) as u64;
        let _ = self
            .tat
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(ns))
            });
    }

    /// Charges bytes already moved without asking first (a request head): the debt delays the next grant.
    pub fn charge(&self, now: Instant, bytes: usize) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 || bytes == 0 {
            return;
        }
        let now = now_ns(now);
        let cost = ns_for(bytes as u64, rate);
        let _ = self
            .tat
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.max(now) + cost)
            });
    }

    /// Charges bytes that were moved without asking first (datagram accounting uses [`Bucket::take_exact`]).
    pub fn take_exact(&self, now: Instant, bytes: usize) -> bool {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return true;
        }
        let burst = self.burst.load(Ordering::Relaxed).max(bytes as u64);
        let tau = ns_for(burst, rate);
        let now = now_ns(now);
        let cost = ns_for(bytes as u64, rate);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let base = tat.max(now);
            if base + cost > now + tau {
                return false;
            }
            match self.tat.compare_exchange_weak(
                tat,
                base + cost,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(t) => tat = t,
            }
        }
    }
}

/// The buckets of one user (or one anonymous client address).
#[derive(Debug, Default)]
pub struct UserLimits {
    /// Client -> target (`rate_up`).
    pub up: Bucket,
    /// Target -> client (`rate_down`).
    pub down: Bucket,
    /// Bytes relayed client -> target (for `--metrics-per-user`).
    pub bytes_up: AtomicU64,
    /// Bytes relayed target -> client.
    pub bytes_down: AtomicU64,
    /// Sessions holding these buckets.
    pub sessions: AtomicU64,
    /// Nanoseconds a direction of hers waited for tokens.
    pub throttled_ns: AtomicU64,
    /// Her traffic quota, both directions together.
    pub quota: Quota,
}

impl UserLimits {
    fn apply(&self, r: Rates, q: Option<QuotaSpec>) {
        self.up.set(r.up.unwrap_or(0), r.burst.unwrap_or(0));
        self.down.set(r.down.unwrap_or(0), r.burst.unwrap_or(0));
        self.quota.set(q, quota::unix_ms());
    }
}

/// The rates that apply to one user: hers, else `[defaults]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    /// `rate_down` in bytes per second.
    pub down: Option<u64>,
    /// `rate_up` in bytes per second.
    pub up: Option<u64>,
    /// `burst` in bytes.
    pub burst: Option<u64>,
}

impl Rates {
    /// True when neither direction is limited.
    pub fn is_unlimited(&self) -> bool {
        self.down.is_none() && self.up.is_none()
    }
}

/// Every worker's view of the per-user buckets (one registry per process; survives reloads).
#[derive(Debug, Default)]
pub struct Limits {
    map: Mutex<HashMap<String, Arc<UserLimits>>>,
    /// Set by a worker that found a user's quota used up: the control thread then has every worker close that
    /// user's other sessions (idle ones included, which would not notice by themselves).
    exhausted: AtomicBool,
}

/// The registry key of an anonymous client: its address behind a NUL (never a user name).
pub fn anonymous_key(ip: std::net::IpAddr) -> String {
    format!("\0{ip}")
}

impl Limits {
    /// The buckets a new session of `key` uses, or `None` when it is not rate-limited (its relay then touches no
    /// atomic). Called at admission only.
    pub fn session(
        &self,
        key: &str,
        rates: Rates,
        quota: Option<QuotaSpec>,
        track: bool,
    ) -> Option<Arc<UserLimits>> {
        if rates.is_unlimited() && quota.is_none() && !track {
            return None;
        }
        let mut map = self.map.lock().ok()?;
        let e = map.entry(key.to_string()).or_default();
        e.apply(rates, quota);
        e.sessions.fetch_add(1, Ordering::Relaxed);
        Some(Arc::clone(e))
    }

    /// Appends the per-user series (`--metrics-per-user`) in the Prometheus text format. Anonymous clients are
    /// left out: one series per client address would be unbounded.
    pub fn render(&self, o: &mut String) {
        use std::fmt::Write;
        let Ok(map) = self.map.lock() else {
            return;
        };
        let mut users: Vec<(&String, &Arc<UserLimits>)> =
            map.iter().filter(|(k, _)| !k.starts_with('\0')).collect();
        users.sort_by(|a, b| a.0.cmp(b.0));
        let series: [(&str, &str, &str); 4] = [
            ("user_bytes_total", "counter", "Bytes relayed per user."),
            ("user_sessions_active", "gauge", "Open sessions per user."),
            (
                "user_throttled_seconds_total",
                "counter",
                "Seconds a user's transfers waited for her rate limit.",
            ),
            (
                "user_quota_remaining_bytes",
                "gauge",
                "Bytes left of a user's traffic quota in this period (users with a quota).",
            ),
        ];
        for (i, (name, kind, help)) in series.iter().enumerate() {
            let _ = writeln!(
                o,
                "# HELP socksgate_{name} {help}\n# TYPE socksgate_{name} {kind}"
            );
            for (user, l) in &users {
                let user = user.replace('\\', "\\\\").replace('"', "\\\"");
                match i {
                    0 => {
                        for (dir, v) in [("up", &l.bytes_up), ("down", &l.bytes_down)] {
                            let v = v.load(Ordering::Relaxed);
                            let _ = writeln!(
                                o,
                                "socksgate_{name}{{user=\"{user}\",direction=\"{dir}\"}} {v}"
                            );
                        }
                    }
                    1 => {
                        let v = l.sessions.load(Ordering::Relaxed);
                        let _ = writeln!(o, "socksgate_{name}{{user=\"{user}\"}} {v}");
                    }
                    2 => {
                        let v = l.throttled_ns.load(Ordering::Relaxed) as f64 / 1e9;
                        let _ = writeln!(o, "socksgate_{name}{{user=\"{user}\"}} {v:.3}");
                    }
                    _ => {
                        if let Some(v) = l.quota.remaining() {
                            let _ = writeln!(o, "socksgate_{name}{{user=\"{user}\"}} {v}");
                        }
                    }
                }
            }
        }
    }

    /// A session of `key` ended: anonymous entries nobody uses any more are dropped (their number would otherwise
    /// grow with every client address ever seen).
    pub fn release(&self, key: &str, held: Arc<UserLimits>) {
        held.sessions.fetch_sub(1, Ordering::Relaxed);
        if !key.starts_with('\0') {
            return;
        }
        if let Ok(mut map) = self.map.lock() {
            drop(held);
            if map.get(key).is_some_and(|e| Arc::strong_count(e) == 1) {
                map.remove(key);
            }
        }
    }

    /// A reload: every user's buckets take the new rates in place, so running sessions follow at once (removed
    /// limits become unlimited).
    pub fn apply(&self, policy: &Policy) {
        let Ok(map) = self.map.lock() else {
            return;
        };
        for (key, e) in map.iter() {
            let user = (!key.starts_with('\0')).then_some(key.as_str());
            e.apply(policy.rates(user), policy.quota(user));
        }
    }

    /// A worker found a quota used up (see [`Limits::take_exhausted`]).
    pub fn note_exhausted(&self) {
        self.exhausted.store(true, Ordering::Relaxed);
    }

    /// True (once) when some quota was found used up since the last call.
    pub fn take_exhausted(&self) -> bool {
        self.exhausted.load(Ordering::Relaxed) && self.exhausted.swap(false, Ordering::Relaxed)
    }

    /// Starts the quota counters whose period is over again; the users whose (non-zero) count started again.
    pub fn roll_periods(&self, now_ms: u64) -> Vec<String> {
        let Ok(map) = self.map.lock() else {
            return Vec::new();
        };
        map.iter()
            .filter(|(_, e)| e.quota.roll(now_ms))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Every user's quota counter, for the state file (users without a quota are left out).
    pub fn snapshot(&self) -> BTreeMap<String, Saved> {
        let Ok(map) = self.map.lock() else {
            return BTreeMap::new();
        };
        map.iter()
            .filter(|(k, e)| !k.starts_with('\0') && e.quota.is_set())
            .map(|(k, e)| (k.clone(), e.quota.snapshot()))
            .collect()
    }

    /// Takes over saved counters at startup, for the users that still have a quota under `policy`; the number
    /// taken over.
    pub fn restore(&self, saved: &BTreeMap<String, Saved>, policy: &Policy) -> usize {
        let Ok(mut map) = self.map.lock() else {
            return 0;
        };
        let mut n = 0;
        for (user, s) in saved {
            let Some(q) = policy.quota(Some(user)) else {
                continue;
            };
            let e = map.entry(user.clone()).or_default();
            e.quota.restore(*s);
            e.apply(policy.rates(Some(user)), Some(q));
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_burst_then_rate() {
        let b = Bucket::default();
        b.set(1000, 0);
        let t0 = Instant::now();
        assert_eq!(b.take(t0, 10_000), Ok(250));
        assert!(b.take(t0, 10_000).is_err());
        // Half a second later: 500 bytes, capped by the burst.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(t1, 10_000), Ok(250));
        b.give_back(100);
        assert_eq!(b.take(t1, 10_000), Ok(100));
    }

    #[test]
    fn unlimited_grants_all() {
        let b = Bucket::default();
        assert_eq!(b.take(Instant::now(), 12345), Ok(12345));
        assert!(b.take_exact(Instant::now(), 1 << 20));
    }

    #[test]
    fn wait_is_bounded() {
        let b = Bucket::default();
        b.set(1 << 20, 0);
        let t0 = Instant::now();
        assert!(b.take(t0, 1 << 20).is_ok());
        let w = b.take(t0, 1 << 20).unwrap_err();
        assert!(w <= Duration::from_millis(100), "{w:?}");
    }
}
