//! Per-worker counters and their Prometheus text rendering.
//!
//! Each worker owns one [`Stats`] and is its only writer, so a counter bump is a relaxed load plus store (no locked
//! read-modify-write on the data path). The control thread reads every worker's `Stats` and sums them when
//! `/metrics` is scraped.

pub mod serve;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::indexed::indexed_enum;
use crate::proto::Failure;

indexed_enum! {
    /// A protocol label for per-protocol series.
    pub enum Proto {
        /// Not yet known (PROXY header or first byte pending).
        Unknown => "unknown",
        /// SOCKS5.
        Socks5 => "socks5",
        /// SOCKS4 or SOCKS4a.
        Socks4 => "socks4",
        /// HTTP proxy (CONNECT or forwarding).
        Http => "http",
    }
}

indexed_enum! {
    /// Why a connection was refused before any handshake.
    pub enum Refusal {
        /// `--allow-client` did not match.
        ClientAcl => "client_acl",
        /// `--max-connections` reached (counted when the backlog is finally accepted and closed at drain).
        Limit => "limit",
        /// The first byte was not a protocol we serve.
        UnknownProtocol => "unknown_protocol",
        /// A missing or invalid PROXY protocol header.
        ProxyHeader => "proxy_header",
        /// A clear-text client under `--tls-only` (or `--tls-client-ca`).
        TlsRequired => "tls_required",
    }
}

indexed_enum! {
    /// How a TLS handshake on the proxy port ended.
    pub enum TlsOutcome {
        /// Completed.
        Ok => "ok",
        /// The client certificate was missing, did not verify, or named nobody.
        ClientCert => "client_cert",
        /// Garbage, truncated records or another protocol error (a TLS alert was sent where one applies).
        Error => "error",
        /// The handshake deadline passed first.
        Timeout => "timeout",
        /// The client closed or reset the connection mid-handshake.
        Aborted => "aborted",
    }
}

/// Label values of the TLS version index: [`crate::tls::TlsVersion`] as usize, then "unknown" (failed before
/// a version was chosen).
pub const TLS_VERSION_LABELS: [&str; 3] = ["1.2", "1.3", "unknown"];

/// Label values of [`Failure`] in SOCKS5 reply-code order (0x01..=0x08).
pub const FAILURE_LABELS: [&str; 8] = [
    "general",
    "not_allowed",
    "net_unreachable",
    "host_unreachable",
    "refused",
    "timeout",
    "bad_command",
    "bad_address_type",
];

indexed_enum! {
    /// Why a UDP datagram was dropped.
    pub enum UdpDrop {
        /// From an address other than the associated client.
        ForeignSource => "foreign_source",
        /// FRAG != 0 (fragmentation is not supported, RFC 1928 §7).
        Fragmented => "fragmented",
        /// Header did not parse.
        Malformed => "malformed",
        /// Destination rules refused it.
        Denied => "denied",
        /// Name resolution failed.
        Unresolved => "unresolved",
        /// The socket would block or send failed.
        SendFailed => "send_failed",
        /// A rule of the policy file denied the destination.
        Rule => "rule",
        /// Over the user's `rate_up` / `rate_down`.
        Rate => "rate",
    }
}

/// One worker's counters and gauges.
#[derive(Default)]
pub struct Stats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections refused, by [`Refusal`].
    pub refused: [AtomicU64; Refusal::COUNT],
    /// Sessions open now, by [`Proto`] (gauge).
    pub active: [AtomicU64; Proto::COUNT],
    /// Successful handshakes by [`Proto`].
    pub handshakes_ok: [AtomicU64; Proto::COUNT],
    /// Failed handshakes by [`Proto`] (malformed, refused, auth failure, connect failure).
    pub handshakes_failed: [AtomicU64; Proto::COUNT],
    /// Authentication failures.
    pub auth_failures: AtomicU64,
    /// Outbound connect failures by [`Failure`].
    pub connect_errors: [AtomicU64; FAILURE_LABELS.len()],
    /// Bytes from clients to targets.
    pub bytes_up: AtomicU64,
    /// Bytes from targets to clients.
    pub bytes_down: AtomicU64,
    /// UDP datagrams relayed client -> target.
    pub udp_up: AtomicU64,
    /// UDP datagrams relayed target -> client.
    pub udp_down: AtomicU64,
    /// UDP datagrams dropped by [`UdpDrop`].
    pub udp_drops: [AtomicU64; UdpDrop::COUNT],
    /// DNS lookups started.
    pub dns_lookups: AtomicU64,
    /// DNS lookups that failed.
    pub dns_failures: AtomicU64,
    /// HTTP requests forwarded (absolute-form).
    pub http_requests: AtomicU64,
    /// Pool buffers in use now (gauge).
    pub pool_in_use: AtomicU64,
    /// Slab entries in use now (gauge).
    pub slab_len: AtomicU64,
    /// Drive loops that hit their iteration cap (a fairness yield, not an error).
    pub loop_yields: AtomicU64,
    /// TLS handshakes by [`TlsOutcome`] and version index ([`TLS_VERSION_LABELS`]).
    pub tls_handshakes: [[AtomicU64; TLS_VERSION_LABELS.len()]; TlsOutcome::COUNT],
}

/// Adds `n` to a counter that only the calling worker writes.
#[inline]
pub fn add(c: &AtomicU64, n: u64) {
    c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
}

/// Adds one to a single-writer counter.
#[inline]
pub fn inc(c: &AtomicU64) {
    add(c, 1);
}

/// Subtracts one from a single-writer gauge.
#[inline]
pub fn dec(c: &AtomicU64) {
    c.store(c.load(Relaxed).saturating_sub(1), Relaxed);
}

/// Sets a gauge.
#[inline]
pub fn set(c: &AtomicU64, v: u64) {
    c.store(v, Relaxed);
}

impl Stats {
    /// Counts a connect failure.
    pub fn connect_error(&self, f: Failure) {
        let i = (f.socks5_reply() as usize).saturating_sub(1).min(7);
        inc(&self.connect_errors[i]);
    }

    /// Counts a finished TLS handshake (`version`: `None` when it failed before one was negotiated).
    pub fn tls_handshake(&self, outcome: TlsOutcome, version: Option<crate::tls::TlsVersion>) {
        let v = version.map(|v| v as usize).unwrap_or(2);
        inc(&self.tls_handshakes[outcome as usize][v]);
    }

    /// Sessions open now, all protocols.
    pub fn active_total(&self) -> u64 {
        self.active.iter().map(|a| a.load(Relaxed)).sum()
    }
}

fn sum(workers: &[Arc<Stats>], f: impl Fn(&Stats) -> &AtomicU64) -> u64 {
    workers.iter().map(|s| f(s).load(Relaxed)).sum()
}

/// Writes the `# HELP` and `# TYPE` lines of family `socksgate_{name}` (also for the resolver's series).
pub(crate) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP socksgate_{name} {help}");
    let _ = writeln!(out, "# TYPE socksgate_{name} {kind}");
}

/// Writes one `socksgate_{name}{label="V"} N` line per label value `V`, with `N = value(index of V)`.
pub(crate) fn series_by(
    out: &mut String,
    name: &str,
    label: &str,
    values: &[&str],
    value: impl Fn(usize) -> u64,
) {
    for (i, v) in values.iter().enumerate() {
        let _ = writeln!(out, "socksgate_{name}{{{label}=\"{v}\"}} {}", value(i));
    }
}

#[allow(clippy::too_many_arguments)]
fn labelled<const N: usize>(
    out: &mut String,
    workers: &[Arc<Stats>],
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    values: &[&str; N],
    f: impl Fn(&Stats) -> &[AtomicU64; N],
) {
    family(out, name, kind, help);
    series_by(out, name, label, values, |i| sum(workers, |s| &f(s)[i]));
}

fn single(
    out: &mut String,
    workers: &[Arc<Stats>],
    name: &str,
    kind: &str,
    help: &str,
    f: impl Fn(&Stats) -> &AtomicU64,
) {
    family(out, name, kind, help);
    let _ = writeln!(out, "socksgate_{name} {}", sum(workers, f));
}

/// Renders every worker's stats, summed, in the Prometheus text exposition format (version 0.0.4).
pub fn render(workers: &[Arc<Stats>]) -> String {
    let mut o = String::with_capacity(8192);
    let w = workers;
    single(
        &mut o,
        w,
        "connections_accepted_total",
        "counter",
        "Connections accepted.",
        |s| &s.accepted,
    );
    labelled(
        &mut o,
        w,
        "connections_refused_total",
        "counter",
        "Connections refused before a handshake completed.",
        "reason",
        &Refusal::LABELS,
        |s| &s.refused,
    );
    labelled(
        &mut o,
        w,
        "sessions_active",
        "gauge",
        "Sessions open now.",
        "protocol",
        &Proto::LABELS,
        |s| &s.active,
    );
    family(
        &mut o,
        "handshakes_total",
        "counter",
        "Handshakes by protocol and outcome.",
    );
    for (i, p) in Proto::LABELS.iter().enumerate() {
        let ok = sum(w, |s| &s.handshakes_ok[i]);
        let failed = sum(w, |s| &s.handshakes_failed[i]);
        let _ = writeln!(
            o,
            "socksgate_handshakes_total{{protocol=\"{p}\",outcome=\"ok\"}} {ok}"
        );
        let _ = writeln!(
            o,
            "socksgate_handshakes_total{{protocol=\"{p}\",outcome=\"failed\"}} {failed}"
        );
    }
    single(
        &mut o,
        w,
        "auth_failures_total",
        "counter",
        "Failed authentications.",
        |s| &s.auth_failures,
    );
    labelled(
        &mut o,
        w,
        "connect_errors_total",
        "counter",
        "Outbound connection failures by kind.",
        "kind",
        &FAILURE_LABELS,
        |s| &s.connect_errors,
    );
    let directions = [
        (
            "bytes_total",
            "Bytes relayed, by direction (up = client to target).",
            [sum(w, |s| &s.bytes_up), sum(w, |s| &s.bytes_down)],
        ),
        (
            "udp_datagrams_total",
            "UDP datagrams relayed, by direction.",
            [sum(w, |s| &s.udp_up), sum(w, |s| &s.udp_down)],
        ),
    ];
    for (name, help, [up, down]) in directions {
        family(&mut o, name, "counter", help);
        let _ = writeln!(o, "socksgate_{name}{{direction=\"up\"}} {up}");
        let _ = writeln!(o, "socksgate_{name}{{direction=\"down\"}} {down}");
    }
    labelled(
        &mut o,
        w,
        "udp_drops_total",
        "counter",
        "UDP datagrams dropped, by reason.",
        "reason",
        &UdpDrop::LABELS,
        |s| &s.udp_drops,
    );
    single(
        &mut o,
        w,
        "dns_lookups_total",
        "counter",
        "DNS lookups started.",
        |s| &s.dns_lookups,
    );
    single(
        &mut o,
        w,
        "dns_failures_total",
        "counter",
        "DNS lookups that failed.",
        |s| &s.dns_failures,
    );
    single(
        &mut o,
        w,
        "http_requests_total",
        "counter",
        "HTTP requests forwarded in absolute form.",
        |s| &s.http_requests,
    );
    single(
        &mut o,
        w,
        "pool_buffers_in_use",
        "gauge",
        "Relay buffers taken from the worker pools.",
        |s| &s.pool_in_use,
    );
    single(
        &mut o,
        w,
        "loop_yields_total",
        "counter",
        "Drive loops that yielded at their iteration cap.",
        |s| &s.loop_yields,
    );
    family(
        &mut o,
        "tls_handshakes_total",
        "counter",
        "TLS handshakes on the proxy port, by outcome and protocol version.",
    );
    for (i, outcome) in TlsOutcome::LABELS.iter().enumerate() {
        for (j, version) in TLS_VERSION_LABELS.iter().enumerate() {
            let n = sum(w, |s| &s.tls_handshakes[i][j]);
            let _ = writeln!(
                o,
                "socksgate_tls_handshakes_total{{outcome=\"{outcome}\",version=\"{version}\"}} {n}"
            );
        }
    }
    family(
        &mut o,
        "worker_connections",
        "gauge",
        "Slab entries in use per worker.",
    );
    for (i, s) in w.iter().enumerate() {
        let _ = writeln!(
            o,
            "socksgate_worker_connections{{worker=\"{i}\"}} {}",
            s.slab_len.load(Relaxed)
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_summed_counters() {
        let a = Arc::new(Stats::default());
        let b = Arc::new(Stats::default());
        add(&a.bytes_up, 5);
        add(&b.bytes_up, 7);
        inc(&a.refused[Refusal::ClientAcl as usize]);
        a.connect_error(Failure::ConnectionRefused);
        a.tls_handshake(TlsOutcome::Ok, Some(crate::tls::TlsVersion::Tls13));
        b.tls_handshake(TlsOutcome::Ok, Some(crate::tls::TlsVersion::Tls13));
        b.tls_handshake(TlsOutcome::ClientCert, None);
        let text = render(&[a, b]);
        assert!(text.contains("socksgate_bytes_total{direction=\"up\"} 12\n"));
        assert!(text.contains("socksgate_connections_refused_total{reason=\"client_acl\"} 1\n"));
        assert!(text.contains("socksgate_connect_errors_total{kind=\"refused\"} 1\n"));
        assert!(text.contains("socksgate_worker_connections{worker=\"1\"} 0\n"));
        assert!(text.contains("socksgate_tls_handshakes_total{outcome=\"ok\",version=\"1.3\"} 2\n"));
        assert!(text.contains(
            "socksgate_tls_handshakes_total{outcome=\"client_cert\",version=\"unknown\"} 1\n"
        ));
    }
}
