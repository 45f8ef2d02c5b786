//! Resolver counters: written by the pool threads and the resolver thread (hence `fetch_add`, off the data path),
//! read by the control thread for `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::lookup::Error;
use crate::metrics::{family, series_by};

/// Label values of [`Error`] in `socksgate_dns_errors_total{kind=...}`, plus `system` for getaddrinfo errors.
pub const ERROR_LABELS: [&str; 7] = [
    "timeout", "servfail", "nxdomain", "nodata", "refused", "bad_name", "system",
];

/// Upper bounds (seconds) of the query latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The index of `e` in [`ERROR_LABELS`].
pub fn error_index(e: Error) -> usize {
    match e {
        Error::Timeout => 0,
        Error::ServFail => 1,
        Error::NxDomain => 2,
        Error::NoData => 3,
        Error::Refused => 4,
        Error::BadName => 5,
    }
}

/// Index of getaddrinfo failures in [`ERROR_LABELS`].
pub const SYSTEM_ERROR: usize = 6;

/// Resolver-wide counters.
#[derive(Default)]
pub struct DnsStats {
    /// Answers served from the cache.
    pub cache_hits: AtomicU64,
    /// Answers from /etc/hosts or `--resolve`.
    pub static_hits: AtomicU64,
    /// Lookups that joined a query already in flight for the same name.
    pub coalesced: AtomicU64,
    /// Messages sent to nameservers: UDP, TCP.
    pub queries: [AtomicU64; 2],
    /// Failed lookups by [`ERROR_LABELS`] kind (one per asking connection or datagram).
    pub errors: [AtomicU64; 7],
    /// Names in the cache now (gauge).
    pub cache_names: AtomicU64,
    /// Histogram of lookup latency (first query sent to outcome): per-bucket counts (not cumulative), +Inf last.
    pub latency_buckets: [AtomicU64; 13],
    /// Sum of observed latencies in microseconds.
    pub latency_sum_us: AtomicU64,
}

impl DnsStats {
    /// Records one upstream lookup's duration.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[i].fetch_add(1, Relaxed);
        self.latency_sum_us
            .fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    /// Appends the resolver's series in the Prometheus text format.
    pub fn render(&self, o: &mut String) {
        let single = [
            (
                "dns_cache_hits_total",
                "counter",
                "Lookups answered from the DNS cache.",
                &self.cache_hits,
            ),
            (
                "dns_static_hits_total",
                "counter",
                "Lookups answered from /etc/hosts or --resolve.",
                &self.static_hits,
            ),
            (
                "dns_coalesced_total",
                "counter",
                "Lookups that joined a query already in flight for the same name.",
                &self.coalesced,
            ),
            (
                "dns_cache_names",
                "gauge",
                "Names in the DNS cache.",
                &self.cache_names,
            ),
        ];
        for (name, kind, help, v) in single {
            family(o, name, kind, help);
            let _ = writeln!(o, "socksgate_{name} {}", v.load(Relaxed));
        }
        let by = [
            (
                "dns_queries_total",
                "Messages sent to nameservers, by transport.",
                "transport",
                &["udp", "tcp"][..],
                &self.queries[..],
            ),
            (
                "dns_errors_total",
                "Failed lookups by kind, as the resolver answered them.",
                "kind",
                &ERROR_LABELS[..],
                &self.errors[..],
            ),
        ];
        for (name, help, label, values, counts) in by {
            family(o, name, "counter", help);
            series_by(o, name, label, values, |i| counts[i].load(Relaxed));
        }
        family(
            o,
            "dns_query_duration_seconds",
            "histogram",
            "Time from the first query sent to the lookup's outcome.",
        );
        let mut cumulative = 0;
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.latency_buckets[i].load(Relaxed);
            let _ = writeln!(
                o,
                "socksgate_dns_query_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        cumulative += self.latency_buckets[LATENCY_BUCKETS.len()].load(Relaxed);
        let _ = writeln!(
            o,
            "socksgate_dns_query_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.latency_sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(o, "socksgate_dns_query_duration_seconds_sum {sum}");
        let _ = writeln!(o, "socksgate_dns_query_duration_seconds_count {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let s = DnsStats::default();
        s.observe(Duration::from_micros(300));
        s.observe(Duration::from_millis(20));
        s.observe(Duration::from_secs(9));
        s.errors[error_index(Error::NxDomain)].fetch_add(1, Relaxed);
        let mut o = String::new();
        s.render(&mut o);
        assert!(o.contains("socksgate_dns_query_duration_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(o.contains("socksgate_dns_query_duration_seconds_bucket{le=\"0.01\"} 1\n"));
        assert!(o.contains("socksgate_dns_query_duration_seconds_bucket{le=\"0.025\"} 2\n"));
        assert!(o.contains("socksgate_dns_query_duration_seconds_bucket{le=\"2.5\"} 2\n"));
        assert!(o.contains("socksgate_dns_query_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(o.contains("socksgate_dns_query_duration_seconds_count 3\n"));
        assert!(o.contains("socksgate_dns_query_duration_seconds_sum 9.0203\n"));
        assert!(o.contains("socksgate_dns_errors_total{kind=\"nxdomain\"} 1\n"));
        assert!(o.contains("# TYPE socksgate_dns_query_duration_seconds histogram\n"));
    }
}
