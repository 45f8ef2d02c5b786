//! Per-user traffic quotas (`quota`, `quota_period`) and the state file that keeps their counters across
//! restarts (`--state-dir`).
//!
//! A quota is one atomic counter of bytes used in the current period, shared by every worker. A relay reserves
//! what one read may use before it reads (a compare-and-swap, like the token buckets) and gives back what the
//! read did not fill, so concurrent sessions on several workers together never move more than the quota; bytes
//! that arrive without asking first (a request head, pipelined bytes) are charged afterwards and are bounded by
//! one buffer.
//!
//! The state file, `DIR/quota.state`, is TOML written by [`encode`] and read back with the `toml` crate:
//!
//! ```toml
//! version = 1
//! [users."alice"]
//! used = 1048576            # bytes counted in the current period
//! period_start_ms = 1764680000000   # Unix time (milliseconds) the period began; 0 without quota_period
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

/// What the policy file sets for one user: the bytes both ways, and how often the count starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaSpec {
    /// Bytes relayed both ways in one period.
    pub bytes: u64,
    /// The period (`None`: the counter never starts again by itself).
    pub period: Option<Duration>,
}

/// Milliseconds since the Unix epoch (the period start must mean the same thing after a restart).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One user's quota counter.
#[derive(Debug, Default)]
pub struct Quota {
    /// Bytes allowed per period; 0 = no quota.
    limit: AtomicU64,
    /// Bytes counted in the current period (reservations included).
    used: AtomicU64,
    /// The period in milliseconds; 0 = never starts again.
    period_ms: AtomicU64,
    /// When the current period began (Unix milliseconds); 0 = not started.
    start_ms: AtomicU64,
}

impl Quota {
    /// Sets (or, with `None`, removes) the quota; a period that was not running starts at `now_ms`.
    pub fn set(&self, spec: Option<QuotaSpec>, now_ms: u64) {
        let (limit, period) = match spec {
            Some(s) => (s.bytes, s.period.map_or(0, |p| p.as_millis() as u64)),
            None => (0, 0),
        };
        self.period_ms.store(period, Ordering::Relaxed);
        if period == 0 {
            self.start_ms.store(0, Ordering::Relaxed);
        } else {
            let _ = self.start_ms.compare_exchange(
                0,
                now_ms.max(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// True when a quota is set.
    pub fn is_set(&self) -> bool {
        self.limit.load(Ordering::Relaxed) != 0
    }

    /// Bytes left in this period (`None` without a quota).
    pub fn remaining(&self) -> Option<u64> {
        let limit = self.limit.load(Ordering::Relaxed);
        (limit != 0).then(|| limit.saturating_sub(self.used.load(Ordering::Relaxed)))
    }

    /// True when a quota is set and used up.
    pub fn exhausted(&self) -> bool {
        self.remaining() == Some(0)
    }

    /// Reserves up to `want` bytes: the bytes granted, 0 when the quota is used up (`want` without a quota).
    pub fn take(&self, want: usize) -> usize {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == 0 || want == 0 {
            return want;
        }
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let grant = limit.saturating_sub(used).min(want as u64);
            if grant == 0 {
                return 0;
            }
            match self.used.compare_exchange_weak(
                used,
                used + grant,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return grant as usize,
                Err(u) => used = u,
            }
        }
    }

    /// Counts `bytes` only if they fit entirely (a datagram is all or nothing); true when counted.
    pub fn take_exact(&self, bytes: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == 0 {
            return true;
        }
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                let next = u.checked_add(bytes as u64)?;
                (next <= limit).then_some(next)
            })
            .is_ok()
    }

    /// Returns a reservation a read did not fill.
    pub fn give_back(&self, bytes: usize) {
        if bytes == 0 || !self.is_set() {
            return;
        }
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes as u64))
            });
    }

    /// Counts bytes that were moved without asking first (a request head).
    pub fn charge(&self, bytes: usize) {
        if bytes != 0 && self.is_set() {
            self.used.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    /// Starts the count again when the period is over. The new period starts where the last one should have
    /// ended (a whole number of periods on), so periods stay on their schedule across restarts. True when a
    /// counter that had counted something was reset.
    pub fn roll(&self, now_ms: u64) -> bool {
        let period = self.period_ms.load(Ordering::Relaxed);
        let start = self.start_ms.load(Ordering::Relaxed);
        if period == 0 || start == 0 || now_ms < start.saturating_add(period) {
            return false;
        }
        let next = start + (now_ms - start) / period * period;
        if self
            .start_ms
            .compare_exchange(start, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        // Only a counter that had counted something is worth a log line.
        self.used.swap(0, Ordering::Relaxed) > 0
    }

    /// The counter as saved: bytes used and the period start.
    pub fn snapshot(&self) -> Saved {
        Saved {
            used: self.used.load(Ordering::Relaxed),
            period_start_ms: self.start_ms.load(Ordering::Relaxed),
        }
    }

    /// Takes a saved counter over (at startup, before any session).
    pub fn restore(&self, saved: Saved) {
        self.used.store(saved.used, Ordering::Relaxed);
        if saved.period_start_ms != 0 {
            self.start_ms
                .store(saved.period_start_ms, Ordering::Relaxed);
        }
    }
}

/// One user's counter in the state file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Saved {
    /// Bytes counted in the current period.
    pub used: u64,
    /// Unix milliseconds the current period began (0: no period).
    #[serde(default)]
    pub period_start_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    #[serde(default)]
    users: BTreeMap<String, Saved>,
}

/// The state file's name inside `--state-dir`.
pub const STATE_FILE: &str = "quota.state";

/// A TOML basic string (the writing side of TOML is a few lines; reading is the `toml` crate's job).
fn toml_string(s: &str, out: &mut String) {
    use std::fmt::Write as _;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The state file's text for these counters.
pub fn encode(counters: &BTreeMap<String, Saved>) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "# socksgate quota counters (--state-dir); rewritten every few seconds and on exit\nversion = 1\n",
    );
    for (user, s) in counters {
        out.push_str("\n[users.");
        toml_string(user, &mut out);
        let _ = writeln!(
            out,
            "]\nused = {}\nperiod_start_ms = {}",
            s.used, s.period_start_ms
        );
    }
    out
}

/// Reads a state file's text; `Err` names what is wrong (the caller logs it and starts at zero).
pub fn decode(text: &str) -> Result<BTreeMap<String, Saved>, String> {
    let f: StateFile = toml::from_str(text).map_err(|e| e.message().trim().replace('\n', " "))?;
    if f.version != 1 {
        return Err(format!("unknown version {}", f.version));
    }
    Ok(f.users)
}

/// Loads `DIR/quota.state`: the counters, or none (with the reason, for the log) when the file is missing or
/// unreadable or corrupt.
pub fn load(dir: &Path) -> Result<BTreeMap<String, Saved>, String> {
    let path = dir.join(STATE_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("{}: not found", path.display()))
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let text = String::from_utf8(text).map_err(|_| format!("{}: not UTF-8", path.display()))?;
    decode(&text).map_err(|m| format!("{}: {m}", path.display()))
}

/// Writes `DIR/quota.state` atomically: a temporary file, fsync, rename over the old one, fsync of the directory
/// (a crash leaves the old file or the new one, never half of one).
pub fn save(dir: &Path, counters: &BTreeMap<String, Saved>) -> std::io::Result<PathBuf> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(encode(counters).as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn quota(bytes: u64, period: Option<u64>) -> Quota {
        let q = Quota::default();
        q.set(
            Some(QuotaSpec {
                bytes,
                period: period.map(Duration::from_millis),
            }),
            1000,
        );
        q
    }

    #[test]
    fn reservations_never_pass_the_quota() {
        let q = quota(1000, None);
        assert_eq!(q.take(600), 600);
        assert_eq!(q.take(600), 400);
        assert_eq!(q.take(1), 0);
        assert!(q.exhausted());
        q.give_back(150);
        assert_eq!(q.remaining(), Some(150));
        assert!(!q.take_exact(151));
        assert!(q.take_exact(150));
        assert!(q.exhausted());
        q.charge(10);
        assert_eq!(q.remaining(), Some(0));
    }

    #[test]
    fn no_quota_grants_everything() {
        let q = Quota::default();
        assert_eq!(q.take(1 << 30), 1 << 30);
        assert!(q.take_exact(1 << 30));
        assert!(!q.exhausted());
        assert_eq!(q.remaining(), None);
    }

    #[test]
    fn shared_across_threads() {
        let q = std::sync::Arc::new(quota(1_000_000, None));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let q = std::sync::Arc::clone(&q);
                std::thread::spawn(move || {
                    let mut got = 0;
                    loop {
                        let g = q.take(777);
                        if g == 0 {
                            return got;
                        }
                        // Half of every read comes back short.
                        q.give_back(g / 2);
                        got += g - g / 2;
                    }
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 1_000_000);
    }

    #[test]
    fn periods_roll_on_schedule() {
        let q = quota(100, Some(2000));
        assert_eq!(q.take(100), 100);
        assert!(!q.roll(2999));
        assert!(q.exhausted());
        // 7.5 s after the start: three periods on, the fourth began at 7000.
        assert!(q.roll(8500));
        assert_eq!(q.remaining(), Some(100));
        assert_eq!(q.snapshot().period_start_ms, 7000);
        assert!(!q.roll(8999));
        // Lowering the quota below what was used exhausts it at once.
        q.take(50);
        q.set(
            Some(QuotaSpec {
                bytes: 40,
                period: Some(Duration::from_millis(2000)),
            }),
            9000,
        );
        assert!(q.exhausted());
        assert_eq!(q.snapshot().period_start_ms, 7000);
        assert!(q.roll(20_000));
        // A period with nothing counted starts again silently, on schedule.
        assert!(!q.roll(23_500));
        assert_eq!(q.snapshot().period_start_ms, 23_000);
    }

    #[test]
    fn state_file_round_trip() {
        let mut m = BTreeMap::new();
        m.insert(
            "alice".to_string(),
            Saved {
                used: 12345,
                period_start_ms: 1_764_680_000_000,
            },
        );
        m.insert(
            "we\"ird\\ \u{1} näme".to_string(),
            Saved {
                used: u64::MAX,
                period_start_ms: 0,
            },
        );
        assert_eq!(decode(&encode(&m)).unwrap(), m);
        assert_eq!(decode(&encode(&BTreeMap::new())).unwrap(), BTreeMap::new());
        for bad in [
            "",
            "version = 2",
            "version = 1\n[users.a]\nused = -1",
            "version = 1\n[users.a]\nused = 1\nextra = 2",
            "\u{0}\u{ff}garbage",
            "version = 1\n[users.a]\nused = \"x\"",
        ] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn save_and_load() {
        let dir = std::env::temp_dir().join(format!("socksgate-quota-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(load(&dir).unwrap_err().contains("not found"));
        let mut m = BTreeMap::new();
        m.insert(
            "bob".to_string(),
            Saved {
                used: 7,
                period_start_ms: 0,
            },
        );
        save(&dir, &m).unwrap();
        assert_eq!(load(&dir).unwrap(), m);
        std::fs::write(dir.join(STATE_FILE), b"version = 1\n[users.bob\n").unwrap();
        assert!(load(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
