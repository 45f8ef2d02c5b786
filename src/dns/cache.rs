//! The answer cache: positive answers for their TTL (at most `max_ttl`), negative answers per RFC 2308 (at most
//! [`NEGATIVE_MAX`]), least recently used names evicted beyond the capacity. Sans-IO: every call takes `now`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Ceiling for negative answers (NXDOMAIN, NODATA), whatever the SOA says.
pub const NEGATIVE_MAX: Duration = Duration::from_secs(30);
/// Default number of names kept.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// A negative answer's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negative {
    /// The name does not exist.
    NxDomain,
    /// The name exists without A or AAAA records.
    NoData,
}

/// What the cache knows about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// Addresses, in the order they are to be tried.
    Addrs(Arc<[IpAddr]>),
    /// A negative answer.
    Negative(Negative),
}

struct Slot {
    value: Cached,
    expires: Instant,
    tick: u64,
}

/// A bounded LRU map from lower-case names to answers.
pub struct Cache {
    map: HashMap<String, Slot>,
    /// Use order: tick -> name; the smallest tick is the least recently used.
    order: BTreeMap<u64, String>,
    tick: u64,
    capacity: usize,
    max_ttl: Duration,
}

impl Cache {
    /// A cache of at most `capacity` names (0 disables caching); positive TTLs clamped to `max_ttl`.
    pub fn new(capacity: usize, max_ttl: Duration) -> Cache {
        Cache {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            capacity,
            max_ttl,
        }
    }

    /// Names held now (expired ones included until they are looked at or evicted).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The live answer for `name`, marking it as recently used; an expired entry is dropped.
    pub fn get(&mut self, name: &str, now: Instant) -> Option<Cached> {
        let slot = self.map.get_mut(name)?;
        if now >= slot.expires {
            let tick = slot.tick;
            self.map.remove(name);
            self.order.remove(&tick);
            return None;
        }
        self.tick += 1;
        let old = std::mem::replace(&mut slot.tick, self.tick);
        let value = slot.value.clone();
        if let Some(k) = self.order.remove(&old) {
            self.order.insert(self.tick, k);
        }
        Some(value)
    }

    /// Caches addresses for `ttl` seconds, clamped to `max_ttl`; TTL 0 means "do not cache" (RFC 1035 §3.2.1).
    pub fn put_addrs(&mut self, name: &str, addrs: Vec<IpAddr>, ttl: u32, now: Instant) {
        let life = Duration::from_secs(u64::from(ttl)).min(self.max_ttl);
        if addrs.is_empty() {
            return;
        }
        self.put(name, Cached::Addrs(addrs.into()), life, now);
    }

    /// Caches a negative answer for its SOA-derived TTL, clamped to [`NEGATIVE_MAX`]. Without a SOA record there is
    /// no TTL and nothing is cached (RFC 2308 §5).
    pub fn put_negative(&mut self, name: &str, kind: Negative, ttl: Option<u32>, now: Instant) {
        let Some(ttl) = ttl else { return };
        let life = Duration::from_secs(u64::from(ttl)).min(NEGATIVE_MAX);
        self.put(name, Cached::Negative(kind), life, now);
    }

    fn put(&mut self, name: &str, value: Cached, life: Duration, now: Instant) {
        if life.is_zero() || self.capacity == 0 {
            return;
        }
        self.tick += 1;
        let slot = Slot {
            value,
            expires: now + life,
            tick: self.tick,
        };
        if let Some(old) = self.map.insert(name.to_string(), slot) {
            self.order.remove(&old.tick);
        }
        self.order.insert(self.tick, name.to_string());
        while self.map.len() > self.capacity {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            self.map.remove(&victim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn positive_answers_live_for_their_clamped_ttl() {
        let t0 = Instant::now();
        let mut c = Cache::new(10, Duration::from_secs(300));
        c.put_addrs("a.test", vec![ip("10.0.0.1")], 60, t0);
        c.put_addrs("long.test", vec![ip("10.0.0.2")], 86_400, t0);
        c.put_addrs("zero.test", vec![ip("10.0.0.3")], 0, t0);
        let hit = c.get("a.test", t0 + Duration::from_secs(59)).unwrap();
        assert_eq!(hit, Cached::Addrs(vec![ip("10.0.0.1")].into()));
        assert_eq!(c.get("a.test", t0 + Duration::from_secs(60)), None);
        assert!(c.get("long.test", t0 + Duration::from_secs(299)).is_some());
        assert_eq!(c.get("long.test", t0 + Duration::from_secs(300)), None);
        assert_eq!(c.get("zero.test", t0), None);
        assert!(c.is_empty());
    }

    #[test]
    fn negative_answers_follow_rfc_2308() {
        let t0 = Instant::now();
        let mut c = Cache::new(10, Duration::from_secs(300));
        c.put_negative("nx.test", Negative::NxDomain, Some(3600), t0);
        c.put_negative("nodata.test", Negative::NoData, Some(5), t0);
        c.put_negative("nosoa.test", Negative::NxDomain, None, t0);
        assert_eq!(
            c.get("nx.test", t0 + Duration::from_secs(29)),
            Some(Cached::Negative(Negative::NxDomain))
        );
        assert_eq!(c.get("nx.test", t0 + NEGATIVE_MAX), None);
        assert_eq!(
            c.get("nodata.test", t0 + Duration::from_secs(4)),
            Some(Cached::Negative(Negative::NoData))
        );
        assert_eq!(c.get("nodata.test", t0 + Duration::from_secs(5)), None);
        assert_eq!(c.get("nosoa.test", t0), None);
    }

    #[test]
    fn least_recently_used_names_go_first() {
        let t0 = Instant::now();
        let mut c = Cache::new(3, Duration::from_secs(300));
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            c.put_addrs(n, vec![ip(&format!("10.0.0.{i}"))], 100, t0);
        }
        assert!(c.get("a", t0).is_some()); // b is now the oldest
        c.put_addrs("d", vec![ip("10.0.0.9")], 100, t0);
        assert_eq!(c.len(), 3);
        assert!(c.get("b", t0).is_none());
        assert!(c.get("a", t0).is_some() && c.get("c", t0).is_some() && c.get("d", t0).is_some());
        // Replacing an entry does not grow the cache or leave a stale order entry behind.
        c.put_addrs("a", vec![ip("10.0.0.7")], 100, t0);
        assert_eq!(c.len(), 3);
        assert_eq!(c.order.len(), 3);
        assert_eq!(
            c.get("a", t0),
            Some(Cached::Addrs(vec![ip("10.0.0.7")].into()))
        );
        let mut off = Cache::new(0, Duration::from_secs(300));
        off.put_addrs("a", vec![ip("10.0.0.1")], 100, t0);
        assert!(off.is_empty());
    }
}
