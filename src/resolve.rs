//! Blocking work off the event loops: name resolution and slow password-hash verification.
//!
//! `getaddrinfo` blocks and bcrypt takes milliseconds on purpose, so workers never run them: they send a [`Job`]
//! to a small pool of threads, which answer through the worker's channel and wake its poll with its
//! `mio::Waker`. Every job carries the connection's `(key, gen)`, and the worker drops answers for connections that
//! have gone away in the meantime.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use crate::auth::{Authorized, Users};
use crate::dns::stats::{self, DnsStats};
use crate::dns::{self, Dns, DnsSettings};

/// Names answered without DNS (`--resolve NAME=IP[,IP]`).
#[derive(Debug, Clone, Default)]
pub struct StaticHosts {
    map: HashMap<String, Vec<IpAddr>>,
}

impl StaticHosts {
    /// Adds an entry from `NAME=IP[,IP...]`.
    pub fn add(&mut self, spec: &str) -> Result<(), String> {
        let (name, ips) = spec
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=IP[,IP], got {spec:?}"))?;
        if name.is_empty() {
            return Err("empty name".to_string());
        }
        let mut list = Vec::new();
        for ip in ips.split(',') {
            list.push(
                ip.trim()
                    .parse::<IpAddr>()
                    .map_err(|_| format!("bad address {ip:?}"))?,
            );
        }
        self.map.insert(name.to_ascii_lowercase(), list);
        Ok(())
    }

    fn get(&self, name: &str) -> Option<&Vec<IpAddr>> {
        if self.map.is_empty() {
            return None;
        }
        self.map.get(&name.to_ascii_lowercase())
    }
}

type LookupFn = dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync;

#[derive(Clone)]
enum Backend {
    /// A blocking function run on the pool threads (getaddrinfo, or one injected by tests).
    Blocking(Arc<LookupFn>),
    /// The non-blocking resolver in src/dns.
    Dns(Arc<DnsSettings>),
}

/// How names become addresses: static `--resolve` entries first, then the system resolver, our own DNS resolver,
/// or an injected function (tests).
#[derive(Clone)]
pub struct Resolver {
    hosts: Arc<StaticHosts>,
    backend: Backend,
    stats: Arc<DnsStats>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    /// `getaddrinfo` (through std) on the pool threads, after the static entries (`--dns-system`).
    pub fn system(hosts: StaticHosts) -> Resolver {
        Resolver {
            hosts: Arc::new(hosts),
            backend: Backend::Blocking(Arc::new(|name: &str, port| {
                let addrs: Vec<SocketAddr> = (name, port).to_socket_addrs()?.collect();
                if addrs.is_empty() {
                    return Err(io::Error::new(io::ErrorKind::NotFound, "no addresses"));
                }
                Ok(addrs)
            })),
            stats: Arc::default(),
        }
    }

    /// The non-blocking resolver with its cache (src/dns), after the static entries.
    pub fn dns(hosts: StaticHosts, settings: DnsSettings) -> Resolver {
        Resolver {
            hosts: Arc::new(hosts),
            backend: Backend::Dns(Arc::new(settings)),
            stats: Arc::default(),
        }
    }

    /// An injected lookup function.
    pub fn custom(
        f: impl Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync + 'static,
    ) -> Resolver {
        Resolver {
            hosts: Arc::default(),
            backend: Backend::Blocking(Arc::new(f)),
            stats: Arc::default(),
        }
    }

    /// The resolver's counters (rendered on /metrics).
    pub fn stats(&self) -> &DnsStats {
        &self.stats
    }

    /// The DNS settings, unless this is the system resolver or an injected function.
    pub fn dns_settings(&self) -> Option<&DnsSettings> {
        match &self.backend {
            Backend::Dns(s) => Some(s),
            Backend::Blocking(_) => None,
        }
    }

    /// What needs no lookup at all: `--resolve` entries, IP literals and RFC 6761 `.invalid` names.
    fn early(&self, name: &str, port: u16) -> Option<io::Result<Vec<SocketAddr>>> {
        if let Some(ips) = self.hosts.get(name) {
            self.stats.static_hits.fetch_add(1, Relaxed);
            return Some(Ok(ips
                .iter()
                .map(|ip| SocketAddr::new(*ip, port))
                .collect()));
        }
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Some(Ok(vec![SocketAddr::new(ip, port)]));
        }
        // RFC 6761 §6.4: resolver libraries should answer "invalid." names negatively without querying DNS.
        let lower = name.trim_end_matches('.').to_ascii_lowercase();
        if lower == "invalid" || lower.ends_with(".invalid") {
            self.stats.errors[stats::error_index(dns::lookup::Error::NxDomain)]
                .fetch_add(1, Relaxed);
            return Some(Err(io::Error::new(
                io::ErrorKind::NotFound,
                "name does not resolve (.invalid)",
            )));
        }
        None
    }

    /// Runs a lookup on the calling thread: static entries, then the blocking backend (only pool threads and
    /// tests call this; with the DNS backend only the static part answers here).
    pub fn lookup(&self, name: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        if let Some(r) = self.early(name, port) {
            return r;
        }
        match &self.backend {
            Backend::Blocking(f) => {
                let started = Instant::now();
                let r = f(name, port);
                self.stats.observe(started.elapsed());
                if r.is_err() {
                    self.stats.errors[stats::SYSTEM_ERROR].fetch_add(1, Relaxed);
                }
                r
            }
            Backend::Dns(_) => Err(io::Error::other(
                "the DNS resolver answers through the pool",
            )),
        }
    }
}

/// Answers that need no thread hop, for a worker to try before it sends a `Work::Resolve`: `--resolve` entries, IP
/// literals, `.invalid`, and with the built-in resolver the hosts file and live cache entries. `None` means "ask the
/// pool". Costs two uncontended mutexes and a hash lookup; never blocks on the network.
#[derive(Clone)]
pub struct QuickAnswers {
    resolver: Resolver,
    dns: Option<Arc<Dns>>,
}

impl QuickAnswers {
    /// The answer for `host:port` if it is known without a query.
    pub fn get(&self, host: &str, port: u16) -> Option<io::Result<Vec<SocketAddr>>> {
        if let Some(r) = self.resolver.early(host, port) {
            return Some(r);
        }
        let dns = self.dns.as_ref()?;
        let hit = dns.quick(host, Instant::now())?;
        Some(dns.result(&hit, port))
    }
}

/// Where a resolver thread sends its answer.
#[derive(Clone)]
pub struct ReplyTo {
    /// The worker's reply channel.
    pub tx: Sender<Reply>,
    /// The worker's waker.
    pub waker: Arc<mio::Waker>,
}

/// What a job asks for.
pub enum Work {
    /// Resolve `host` and attach `port` to every address.
    Resolve {
        /// The name.
        host: String,
        /// The port.
        port: u16,
        /// Also send [`Outcome::Early`] when one address family answers before the other (the built-in resolver
        /// only; getaddrinfo gives both at once).
        early: bool,
    },
    /// Check a password against a hashed users-table entry.
    Verify {
        /// The table the client authenticates against.
        users: Arc<Users>,
        /// User name as sent.
        user: Vec<u8>,
        /// Password as sent.
        pass: Vec<u8>,
    },
}

/// The answer to a [`Work`].
pub enum Outcome {
    /// Addresses, or the lookup error.
    Resolved(io::Result<Vec<SocketAddr>>),
    /// One family's addresses while the other family's query is still out (RFC 8305 §3), for a job that asked
    /// for it. The job's [`Outcome::Resolved`] follows with every address, these included.
    Early(Vec<SocketAddr>),
    /// The authenticated user, or `None` for a wrong password or unknown name.
    Verified(Option<Authorized>),
}

/// A request to the pool.
pub struct Job {
    /// Slab key of the asking connection.
    pub key: usize,
    /// Its generation, echoed back.
    pub gen: u32,
    /// What the answer is for (a worker-defined tag, e.g. TCP connect vs UDP datagram).
    pub tag: u32,
    /// The work.
    pub work: Work,
    /// Where to answer.
    pub reply: ReplyTo,
}

/// An answer from the pool.
pub struct Reply {
    /// Slab key from the job.
    pub key: usize,
    /// Generation from the job.
    pub gen: u32,
    /// Tag from the job.
    pub tag: u32,
    /// The result.
    pub outcome: Outcome,
}

/// A fixed pool of threads sharing one job queue: blocking work, and the front of the DNS resolver.
pub struct ResolverPool {
    tx: Option<Sender<Job>>,
    threads: Vec<thread::JoinHandle<()>>,
    dns: Option<Arc<Dns>>,
    resolver: Resolver,
}

impl ResolverPool {
    /// Starts `n` threads.
    /// Starts `n` threads (and the DNS resolver thread when the resolver is ours).
    pub fn start(n: usize, resolver: Resolver) -> io::Result<ResolverPool> {
        let dns = match resolver.dns_settings() {
            Some(s) => Some(Arc::new(Dns::start(s, Arc::clone(&resolver.stats))?)),
            None => None,
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let rx = Arc::clone(&rx);
            let resolver2 = resolver.clone();
            let dns = dns.clone();
            threads.push(
                thread::Builder::new()
                    .name(format!("resolver-{i}"))
                    .spawn(move || run(&rx, &resolver2, dns.as_deref()))?,
            );
        }
        Ok(ResolverPool {
            tx: Some(tx),
            threads,
            dns,
            resolver,
        })
    }

    /// Answers a worker can take without a round trip through the pool (see [`QuickAnswers`]).
    pub fn quick_answers(&self) -> QuickAnswers {
        QuickAnswers {
            resolver: self.resolver.clone(),
            dns: self.dns.clone(),
        }
    }

    /// A handle workers use to submit jobs.
    pub fn sender(&self) -> Sender<Job> {
        match &self.tx {
            Some(tx) => tx.clone(),
            None => mpsc::channel().0,
        }
    }

    /// Stops the threads once the queue is empty and every worker's sender is gone.
    pub fn shutdown(mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(d) = self.dns.take().and_then(|d| Arc::try_unwrap(d).ok()) {
            d.shutdown();
        }
    }
}

/// Checks in the background that the `--upstream` proxy's name resolves, and logs what it resolves to or a
/// warning. Sessions resolve the name themselves, so one that does not resolve at start is not fatal (Squid treats
/// a `cache_peer` name so; HAProxy does with `init-addr none`): the proxy comes up while DNS is still unreachable,
/// and the first sessions after it returns work.
pub fn check_upstream(pool: &ResolverPool, host: &str, port: u16) -> io::Result<()> {
    let tx = pool.sender();
    let host = host.to_string();
    let poll = mio::Poll::new()?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0))?);
    thread::Builder::new()
        .name("upstream-check".into())
        .spawn(move || {
            let (reply_tx, reply_rx) = mpsc::channel();
            let job = Job {
                key: 0,
                gen: 0,
                tag: 0,
                work: Work::Resolve {
                    host: host.clone(),
                    port,
                    early: false,
                },
                reply: ReplyTo {
                    tx: reply_tx,
                    waker,
                },
            };
            if tx.send(job).is_err() {
                return;
            }
            // The pool stops once every sender is gone: this one must not outlive the question.
            drop(tx);
            let _poll = poll;
            match reply_rx.recv().map(|r| r.outcome) {
                Ok(Outcome::Resolved(Ok(addrs))) => log::info!(
                    "upstream proxy {host} resolves to {addrs:?} (resolved again per session, through the cache)"
                ),
                Ok(Outcome::Resolved(Err(e))) => log::warn!(
                    "upstream proxy {host} does not resolve now ({e}); sessions keep asking, and fail until it does"
                ),
                _ => {}
            }
        })?;
    Ok(())
}

fn run(rx: &Mutex<Receiver<Job>>, resolver: &Resolver, dns: Option<&Dns>) {
    loop {
        // Hold the lock only to take a job, never while resolving.
        let job = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        if let (Some(dns), Work::Resolve { host, port, .. }) = (dns, &job.work) {
            // Static answers here; everything else is answered by the DNS side (hosts file, cache, resolver thread).
            match resolver.early(host, *port) {
                Some(r) => reply(job, Outcome::Resolved(r)),
                None => dns.submit(job),
            }
            continue;
        }
        let outcome = match job.work {
            Work::Resolve { host, port, .. } => Outcome::Resolved(resolver.lookup(&host, port)),
            Work::Verify {
                users,
                user,
                mut pass,
            } => {
                let v = users.verify(&user, &pass);
                pass.fill(0);
                Outcome::Verified(v)
            }
        };
        send_reply(job.key, job.gen, job.tag, &job.reply, outcome);
    }
}

fn reply(job: Job, outcome: Outcome) {
    send_reply(job.key, job.gen, job.tag, &job.reply, outcome);
}

fn send_reply(key: usize, gen: u32, tag: u32, to: &ReplyTo, outcome: Outcome) {
    let reply = Reply {
        key,
        gen,
        tag,
        outcome,
    };
    if to.tx.send(reply).is_ok() {
        let _ = to.waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_hosts_and_invalid_names() {
        let mut h = StaticHosts::default();
        h.add("Example.TEST=127.0.0.1,::1").unwrap();
        assert!(h.add("nope").is_err());
        assert!(h.add("x=not-an-ip").is_err());
        let r = Resolver::system(h);
        let a = r.lookup("example.test", 80).unwrap();
        assert_eq!(
            a,
            vec!["127.0.0.1:80".parse().unwrap(), "[::1]:80".parse().unwrap()]
        );
        assert_eq!(
            r.lookup("nx.invalid", 80).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert!(r
            .lookup("localhost", 1)
            .unwrap()
            .iter()
            .all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn pool_resolves_through_the_dns_thread_and_fills_the_cache() {
        use crate::dns::message::tests::{a, response};
        use hickory_proto::op::{Message, ResponseCode};
        use hickory_proto::rr::RecordType;
        use std::net::UdpSocket;

        // A nameserver on loopback answering A 127.0.0.7 (TTL 60) and NODATA for AAAA, counting queries.
        let ns = UdpSocket::bind("127.0.0.1:0").unwrap();
        let ns_addr = ns.local_addr().unwrap();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let asked2 = Arc::clone(&asked);
        thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = ns.recv_from(&mut buf) {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let question = &q.queries()[0];
                let name = question.name().to_ascii();
                asked2.fetch_add(1, Relaxed);
                let answers = if question.query_type() == RecordType::A {
                    vec![a(&name, 60, [127, 0, 0, 7])]
                } else {
                    vec![]
                };
                let r = response(
                    q.id(),
                    &name,
                    question.query_type(),
                    ResponseCode::NoError,
                    answers,
                    None,
                );
                let _ = ns.send_to(&r, from);
            }
        });
        let hosts_path = crate::test_support::scratch_file(
            "socksgate-pool",
            "hosts",
            "127.0.0.8 fromfile.test\n",
        );
        let mut statics = StaticHosts::default();
        statics.add("pinned.test=127.0.0.9").unwrap();
        let mut settings = DnsSettings {
            hosts_path,
            ..DnsSettings::default()
        };
        settings.conf.servers = vec![ns_addr];
        let pool = ResolverPool::start(1, Resolver::dns(statics, settings)).unwrap();
        let quick = pool.quick_answers();
        let ip = |r: Option<io::Result<Vec<SocketAddr>>>| r.map(|r| r.unwrap()[0].to_string());
        assert_eq!(ip(quick.get("pinned.test", 1)), Some("127.0.0.9:1".into()));
        assert_eq!(
            ip(quick.get("FromFile.test", 2)),
            Some("127.0.0.8:2".into())
        );
        assert!(quick.get("x.invalid", 3).unwrap().is_err());
        assert!(quick.get("asked.test", 4).is_none(), "not cached yet");

        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (tx, rx) = mpsc::channel();
        let reply = ReplyTo { tx, waker };
        let ask = |key| {
            pool.sender()
                .send(Job {
                    key,
                    gen: 7,
                    tag: 0,
                    work: Work::Resolve {
                        host: "asked.test".into(),
                        port: 80,
                        early: false,
                    },
                    reply: reply.clone(),
                })
                .unwrap();
        };
        ask(1);
        let r = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!((r.key, r.gen), (1, 7));
        let Outcome::Resolved(Ok(addrs)) = r.outcome else {
            panic!("not resolved")
        };
        assert_eq!(addrs, vec!["127.0.0.7:80".parse::<SocketAddr>().unwrap()]);
        assert_eq!(asked.load(Relaxed), 2, "one A and one AAAA query");
        // Now cached: the quick path and the pool both answer without a query.
        assert_eq!(ip(quick.get("asked.test", 5)), Some("127.0.0.7:5".into()));
        ask(2);
        assert!(rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok());
        assert_eq!(asked.load(Relaxed), 2);
        assert_eq!(pool.resolver.stats().cache_hits.load(Relaxed), 2);
        drop(quick);
        pool.shutdown();
    }

    #[test]
    fn the_first_family_is_sent_early_then_the_whole_answer() {
        use crate::dns::message::tests::{a, response};
        use hickory_proto::op::{Message, ResponseCode};
        use hickory_proto::rr::rdata::AAAA;
        use hickory_proto::rr::{Name, RData, Record, RecordType};
        use std::net::UdpSocket;
        use std::time::Duration;

        // A nameserver answering A at once and holding AAAA until the test has seen the early answer.
        let ns = UdpSocket::bind("127.0.0.1:0").unwrap();
        let ns_addr = ns.local_addr().unwrap();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        thread::spawn(move || {
            let mut buf = [0u8; 512];
            let mut held = None;
            while let Ok((n, from)) = ns.recv_from(&mut buf) {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let question = &q.queries()[0];
                let name = question.name().to_ascii();
                if question.query_type() == RecordType::A {
                    let r = response(
                        q.id(),
                        &name,
                        RecordType::A,
                        ResponseCode::NoError,
                        vec![a(&name, 60, [127, 0, 0, 7])],
                        None,
                    );
                    let _ = ns.send_to(&r, from);
                } else {
                    held = Some((q.id(), name, from));
                }
                if let Some((id, name, from)) = held.take() {
                    if release_rx.recv().is_err() {
                        return;
                    }
                    let six = Record::from_rdata(
                        Name::from_ascii(&name).unwrap(),
                        30,
                        RData::AAAA(AAAA("::7".parse().unwrap())),
                    );
                    let r = response(
                        id,
                        &name,
                        RecordType::AAAA,
                        ResponseCode::NoError,
                        vec![six],
                        None,
                    );
                    let _ = ns.send_to(&r, from);
                }
            }
        });
        let mut settings = DnsSettings {
            hosts_path: std::env::temp_dir().join("socksgate-no-such-hosts-file"),
            ..DnsSettings::default()
        };
        settings.conf.servers = vec![ns_addr];
        let pool = ResolverPool::start(1, Resolver::dns(StaticHosts::default(), settings)).unwrap();
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (tx, rx) = mpsc::channel();
        let reply = ReplyTo { tx, waker };
        let ask = |key, early| {
            pool.sender()
                .send(Job {
                    key,
                    gen: 1,
                    tag: 9,
                    work: Work::Resolve {
                        host: "split.test".into(),
                        port: 443,
                        early,
                    },
                    reply: reply.clone(),
                })
                .unwrap();
        };
        let wait = Duration::from_secs(10);
        ask(1, true);
        let r = rx.recv_timeout(wait).unwrap();
        let Outcome::Early(addrs) = r.outcome else {
            panic!("no early answer")
        };
        assert_eq!((r.key, r.tag), (1, 9));
        assert_eq!(addrs, vec!["127.0.0.7:443".parse::<SocketAddr>().unwrap()]);
        // Joining the lookup in flight: one who asked for early answers gets it at once, one who did not waits.
        ask(2, true);
        ask(3, false);
        let r = rx.recv_timeout(wait).unwrap();
        assert!(matches!(r.outcome, Outcome::Early(_)) && r.key == 2);
        release_tx.send(()).unwrap();
        let mut keys = Vec::new();
        for _ in 0..3 {
            let r = rx.recv_timeout(wait).unwrap();
            let Outcome::Resolved(Ok(addrs)) = r.outcome else {
                panic!("not resolved")
            };
            assert_eq!(
                addrs,
                vec![
                    "[::7]:443".parse::<SocketAddr>().unwrap(),
                    "127.0.0.7:443".parse().unwrap()
                ],
                "IPv6 first"
            );
            keys.push(r.key);
        }
        keys.sort_unstable();
        assert_eq!(keys, vec![1, 2, 3]);
        assert!(rx.try_recv().is_err(), "nothing else");
        // Both families are cached together.
        let quick = pool.quick_answers();
        assert_eq!(quick.get("split.test", 1).unwrap().unwrap().len(), 2);
        drop(quick);
        pool.shutdown();
    }

    #[test]
    fn a_burst_of_lookups_that_fail_at_once_is_answered() {
        // No nameserver at all: every lookup fails as soon as it starts (as when no socket can be had). 20,000 of
        // them queued together must neither recurse per job nor be lost.
        let mut settings = DnsSettings {
            hosts_path: std::env::temp_dir().join("socksgate-no-such-hosts-file"),
            ..DnsSettings::default()
        };
        settings.conf.servers.clear();
        let pool = ResolverPool::start(2, Resolver::dns(StaticHosts::default(), settings)).unwrap();
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (tx, rx) = mpsc::channel();
        let reply = ReplyTo { tx, waker };
        const N: usize = 20_000;
        let sender = pool.sender();
        for key in 0..N {
            sender
                .send(Job {
                    key,
                    gen: 0,
                    tag: 0,
                    work: Work::Resolve {
                        host: format!("n{key}.test"),
                        port: 80,
                        early: false,
                    },
                    reply: reply.clone(),
                })
                .unwrap();
        }
        let mut seen = vec![false; N];
        for _ in 0..N {
            let r = rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
            assert!(matches!(r.outcome, Outcome::Resolved(Err(_))));
            seen[r.key] = true;
        }
        assert!(seen.iter().all(|s| *s));
        drop(sender);
        pool.shutdown();
    }
}
