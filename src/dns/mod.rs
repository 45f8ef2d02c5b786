//! The non-blocking resolver: `/etc/hosts` first, then a shared cache, then DNS over UDP (TCP on truncation) to
//! the nameservers of `/etc/resolv.conf` or `--dns`, from one resolver thread with its own mio poll.
//!
//! Workers keep talking to the blocking-work pool (src/resolve.rs) with `Work::Resolve`; a pool thread answers
//! hosts-file and cache hits on the spot and hands misses to the resolver thread ([`engine`]), which coalesces
//! lookups of the same name, runs the [`lookup::Lookup`] machines and answers through the worker's channel and waker:
//! for jobs that ask (`early`), first with the family that answered first while the other is still out (RFC 8305
//! §3), then with the whole answer, which is also what the cache keeps.

pub mod cache;
pub mod conf;
pub mod engine;
pub mod hosts;
pub mod lookup;
pub mod message;
pub mod stats;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::info;

use self::cache::{Cache, Cached, Negative};
use self::conf::ResolvConf;
use self::hosts::HostsFile;
use self::lookup::{Error, Outcome, Servers};
use self::stats::{error_index, DnsStats};
use crate::resolve::{Job, Outcome as JobOutcome, Reply, Work};

/// How the resolver is set up (from `/etc/resolv.conf` and the `--dns*` flags).
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Servers, search list, ndots, timeout, attempts.
    pub conf: ResolvConf,
    /// Ceiling on positive TTLs (`--dns-max-ttl`).
    pub max_ttl: Duration,
    /// Names kept in the cache.
    pub cache_size: usize,
    /// The hosts file consulted before DNS.
    pub hosts_path: PathBuf,
    /// Re-read `conf` from this file when it changes (`None` with `--dns`).
    pub reload: Option<conf::Reload>,
    /// The source address of queries (`--bind`), used for servers of its family; the kernel picks for the others.
    pub source: Option<IpAddr>,
}

impl Default for DnsSettings {
    fn default() -> DnsSettings {
        DnsSettings {
            conf: ResolvConf::default(),
            max_ttl: Duration::from_secs(300),
            cache_size: cache::DEFAULT_CAPACITY,
            hosts_path: PathBuf::from("/etc/hosts"),
            reload: None,
            source: None,
        }
    }
}

/// What the pool threads and the resolver thread share.
pub struct Shared {
    cache: Mutex<Cache>,
    hosts: Mutex<HostsFile>,
    stats: Arc<DnsStats>,
}

impl Shared {
    fn cached(&self, name: &str, now: Instant) -> Option<Outcome> {
        let hit = self.cache.lock().ok()?.get(name, now)?;
        Some(match hit {
            Cached::Negative(Negative::ServerFailure(e)) => Outcome::Failed(e, None),
            Cached::Addrs(a) => Outcome::Addrs(a.to_vec(), 0),
            Cached::Negative(Negative::NxDomain) => Outcome::Failed(Error::NxDomain, None),
            Cached::Negative(Negative::NoData) => Outcome::Failed(Error::NoData, None),
        })
    }

    fn store(&self, name: &str, outcome: &Outcome, now: Instant) {
        let Ok(mut c) = self.cache.lock() else { return };
        match outcome {
            Outcome::Addrs(a, ttl) => c.put_addrs(name, a.clone(), *ttl, now),
            Outcome::Failed(Error::NxDomain, ttl) => {
                c.put_negative(name, Negative::NxDomain, *ttl, now)
            }
            Outcome::Failed(Error::NoData, ttl) => {
                c.put_negative(name, Negative::NoData, *ttl, now)
            }
            Outcome::Failed(e @ (Error::Timeout | Error::ServFail | Error::Refused), _) => {
                c.put_failure(name, *e, now)
            }
            Outcome::Failed(Error::BadName, _) => {}
        }
        self.stats.cache_names.store(c.len() as u64, Relaxed);
    }
}

/// The running resolver: the shared state and the resolver thread.
pub struct Dns {
    shared: Arc<Shared>,
    engine: engine::Handle,
}

impl Dns {
    /// Starts the resolver thread.
    pub fn start(settings: &DnsSettings, stats: Arc<DnsStats>) -> io::Result<Dns> {
        let shared = Arc::new(Shared {
            cache: Mutex::new(Cache::new(settings.cache_size, settings.max_ttl)),
            hosts: Mutex::new(HostsFile::new(settings.hosts_path.clone())),
            stats,
        });
        log_conf("", &settings.conf);
        let watch = settings.reload.clone().map(conf::Watch::new);
        let engine = engine::start(
            Arc::clone(&shared),
            (settings.conf.clone(), settings.source),
            watch,
        )?;
        Ok(Dns { shared, engine })
    }

    /// The answer for `host` if it needs no query: the hosts file or a live cache entry (counted as a hit).
    pub fn quick(&self, host: &str, now: Instant) -> Option<Outcome> {
        let name = host.to_ascii_lowercase();
        let from_hosts = self
            .shared
            .hosts
            .lock()
            .ok()
            .and_then(|mut h| h.get(name.trim_end_matches('.'), now));
        if let Some(ips) = from_hosts.or_else(|| localhost(&name)) {
            self.shared.stats.static_hits.fetch_add(1, Relaxed);
            return Some(Outcome::Addrs(ips, 0));
        }
        let hit = self.shared.cached(&name, now)?;
        self.shared.stats.cache_hits.fetch_add(1, Relaxed);
        Some(hit)
    }

    /// Answers `job` (a `Work::Resolve`) from the hosts file or the cache, or hands it to the resolver thread.
    pub fn submit(&self, job: Job) {
        let Work::Resolve { host, .. } = &job.work else {
            return;
        };
        match self.quick(host, Instant::now()) {
            Some(hit) => answer_job(job, &hit, &self.shared.stats),
            None => self.engine.submit(job),
        }
    }

    /// Converts an outcome into what a worker sees, counting a failure by kind.
    pub fn result(&self, outcome: &Outcome, port: u16) -> io::Result<Vec<SocketAddr>> {
        to_result(outcome, port, &self.shared.stats)
    }

    /// Stops the resolver thread.
    pub fn shutdown(mut self) {
        self.engine.shutdown();
    }
}

fn log_conf(what: &str, c: &ResolvConf) {
    info!(
        "dns: {what}nameservers {:?}, search {:?}, ndots {}, timeout {:?}, attempts {}",
        c.servers, c.search, c.ndots, c.timeout, c.attempts
    );
}

/// The servers part of `c`, as lookups take it.
fn servers_of(c: &ResolvConf) -> Arc<Servers> {
    Arc::new(Servers {
        addrs: c.servers.clone(),
        timeout: c.timeout,
        attempts: c.attempts,
    })
}

/// RFC 6761 §6.3: `localhost` and names under it are the loopback addresses and are never sent to a nameserver,
/// even when the hosts file does not list them.
fn localhost(name: &str) -> Option<Vec<IpAddr>> {
    let n = name.trim_end_matches('.');
    (n == "localhost" || n.ends_with(".localhost")).then(|| {
        vec![
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
        ]
    })
}

/// The `io::Error` a worker sees for a failed lookup.
pub fn io_error(e: Error) -> io::Error {
    let (kind, text) = match e {
        Error::Timeout => (io::ErrorKind::TimedOut, "DNS timeout"),
        Error::ServFail => (io::ErrorKind::Other, "DNS server failure (SERVFAIL)"),
        Error::NxDomain => (io::ErrorKind::NotFound, "name does not exist (NXDOMAIN)"),
        Error::NoData => (io::ErrorKind::NotFound, "name has no addresses"),
        Error::Refused => (
            io::ErrorKind::ConnectionRefused,
            "DNS servers refused or unreachable",
        ),
        Error::BadName => (io::ErrorKind::InvalidInput, "not a valid DNS name"),
    };
    io::Error::new(kind, text)
}

/// Answers one job with `outcome`, counting failures by kind.
pub fn answer_job(job: Job, outcome: &Outcome, stats: &DnsStats) {
    let Work::Resolve { port, .. } = job.work else {
        return;
    };
    let result = to_result(outcome, port, stats);
    let reply = Reply {
        key: job.key,
        gen: job.gen,
        tag: job.tag,
        outcome: JobOutcome::Resolved(result),
    };
    if job.reply.tx.send(reply).is_ok() {
        let _ = job.reply.waker.wake();
    }
}

/// Sends the addresses one family answered with while the other is still out, if `job` asked for them.
pub fn answer_early(job: &Job, ips: &[IpAddr]) {
    let Work::Resolve {
        port, early: true, ..
    } = job.work
    else {
        return;
    };
    let reply = Reply {
        key: job.key,
        gen: job.gen,
        tag: job.tag,
        outcome: JobOutcome::Early(with_port(ips, port)),
    };
    if job.reply.tx.send(reply).is_ok() {
        let _ = job.reply.waker.wake();
    }
}

fn to_result(outcome: &Outcome, port: u16, stats: &DnsStats) -> io::Result<Vec<SocketAddr>> {
    match outcome {
        Outcome::Addrs(ips, _) => Ok(with_port(ips, port)),
        Outcome::Failed(e, _) => {
            stats.errors[error_index(*e)].fetch_add(1, Relaxed);
            Err(io_error(*e))
        }
    }
}

fn with_port(ips: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_names_are_loopback() {
        let lo = Some(vec![IpAddr::from([127, 0, 0, 1]), "::1".parse().unwrap()]);
        assert_eq!(localhost("localhost"), lo);
        assert_eq!(localhost("localhost."), lo);
        assert_eq!(localhost("app.localhost"), lo);
        assert_eq!(localhost("notlocalhost"), None);
        assert_eq!(localhost("localhost.example"), None);
    }
}
