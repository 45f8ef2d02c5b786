//! Command line -> validated, typed [`Config`]. Pure: reads the users file named on the command line but opens no
//! socket.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use getopts::Options;

use crate::acl::{self, ClientRules, DestRules};
use crate::auth::Users;
use crate::dns::conf::{self, ResolvConf};
use crate::dns::DnsSettings;
use crate::policy::{self, Policy};
use crate::resolve::{Resolver, StaticHosts};
use crate::upstream::Upstream;

/// Everything a running server needs to know.
#[derive(Clone)]
pub struct Config {
    /// Addresses to listen on (each worker binds every one with SO_REUSEPORT).
    pub listen: Vec<SocketAddr>,
    /// Worker threads, each with its own event loop.
    pub threads: usize,
    /// The users table (empty = no authentication).
    pub users: Arc<Users>,
    /// The users file, re-read on SIGHUP.
    pub users_file: Option<PathBuf>,
    /// `NAME:PASS` pairs given with `--user` (kept to merge on reload).
    pub inline_users: Vec<(String, String)>,
    /// The policy file (`--policy`), re-read on SIGHUP together with the users file.
    pub policy_file: Option<PathBuf>,
    /// Rules, per-user limits and egress from the policy file (empty without one).
    pub policy: Arc<Policy>,
    /// Size of each relay buffer.
    pub buffer_size: usize,
    /// Relay with splice(2) through pipes instead of copying through user space.
    pub splice: bool,
    /// SO_RCVBUF/SO_SNDBUF for both legs of proxied TCP connections (`None` = kernel autotuning).
    pub socket_buffer: Option<usize>,
    /// `--tcp-keepalive`, `--tcp-user-timeout` (both legs) and `--tcp-fastopen` (listeners).
    pub tcp: crate::net::TcpOptions,
    /// Deadline for the whole client handshake, counted from accept.
    pub handshake_timeout: Duration,
    /// Deadline for resolving and connecting to a target.
    pub connect_timeout: Duration,
    /// Happy Eyeballs (RFC 8305): start the next address this long after the previous attempt while it is pending.
    pub connection_attempt_delay: Duration,
    /// Close a tunnel after this long with no traffic either way.
    pub idle_timeout: Duration,
    /// How long established tunnels may finish after SIGTERM (or after handing over in an upgrade).
    pub drain_timeout: Duration,
    /// How long the new process of a SIGUSR2 upgrade has to become ready.
    pub upgrade_timeout: Duration,
    /// Where to write the serving process's pid.
    pub pid_file: Option<PathBuf>,
    /// `--state-dir`: where the quota counters are kept across reloads and restarts.
    pub state_dir: Option<PathBuf>,
    /// `--open`: serving without authentication on a non-loopback address was asked for.
    pub open: bool,
    /// Cap on concurrent client connections across all workers.
    pub max_connections: Option<usize>,
    /// Cap on concurrent sessions per authenticated user.
    pub user_max_connections: Option<usize>,
    /// Serve SOCKS4/4a.
    pub socks4: bool,
    /// Let SOCKS4 through (without a password) even when users are configured.
    pub socks4_with_users: bool,
    /// Serve the HTTP proxy.
    pub http: bool,
    /// Largest HTTP request or response head.
    pub max_head: usize,
    /// The Via pseudonym for forwarded HTTP messages (`None` = no Via header).
    pub via: Option<String>,
    /// Serve SOCKS5 UDP ASSOCIATE.
    pub udp: bool,
    /// Address to advertise in UDP ASSOCIATE replies instead of the control connection's local IP (NAT).
    pub udp_advertise: Option<IpAddr>,
    /// Close a UDP association after this long with no datagrams.
    pub udp_idle_timeout: Duration,
    /// Serve SOCKS BIND.
    pub bind_cmd: bool,
    /// How long a BIND listener waits for its inbound connection.
    pub bind_timeout: Duration,
    /// Client address rules.
    pub client_rules: ClientRules,
    /// Destination rules.
    pub dest_rules: DestRules,
    /// Source address for outbound connections and UDP.
    pub outbound_bind: Option<IpAddr>,
    /// Proxy to send every outbound connection through.
    pub upstream: Option<Arc<Upstream>>,
    /// The client configuration for a TLS upstream (`https://`, `socks5s://`).
    pub upstream_tls: Option<Arc<rustls::ClientConfig>>,
    /// How TLS upstreams are verified (`--upstream-ca`, `--upstream-insecure`); policy groups default to it.
    pub upstream_trust: crate::tls::UpstreamTrust,
    /// Every connection starts with a PROXY protocol v1/v2 header.
    pub proxy_protocol: bool,
    /// TLS on every listener (`--tls-cert` / `--tls-key`): connections starting with a TLS record are TLS.
    pub tls: Option<Arc<crate::tls::TlsAcceptor>>,
    /// Refuse clear-text clients (`--tls-only`, implied by `--tls-client-ca`).
    pub tls_only: bool,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<SocketAddr>,
    /// `--metrics-per-user`: per-user series on /metrics (one per user and direction: cardinality is opt-in).
    pub metrics_per_user: bool,
    /// Threads that run blocking name lookups.
    pub resolver_threads: usize,
    /// How names are resolved: `--resolve` entries, then the built-in DNS resolver (`--dns-system`: getaddrinfo).
    /// `Config::default()` uses getaddrinfo, so in-process users read no resolv.conf unless they ask for it.
    pub resolver: Resolver,
    /// Log level from -v/-q (RUST_LOG overrides).
    pub log_level: log::LevelFilter,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hand-written so that a debug print can never leak `inline_users` passwords.
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("threads", &self.threads)
            .field("users", &self.users.len())
            .field("buffer_size", &self.buffer_size)
            .finish_non_exhaustive()
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 1080))],
            threads: default_threads(),
            users: Arc::new(Users::default()),
            users_file: None,
            inline_users: Vec::new(),
            policy_file: None,
            policy: Arc::new(Policy::default()),
            buffer_size: 16 * 1024,
            splice: true,
            socket_buffer: None,
            tcp: crate::net::TcpOptions::default(),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            connection_attempt_delay: crate::happy::DEFAULT_ATTEMPT_DELAY,
            idle_timeout: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(30),
            upgrade_timeout: Duration::from_secs(30),
            pid_file: None,
            state_dir: None,
            open: false,
            max_connections: None,
            user_max_connections: None,
            socks4: true,
            socks4_with_users: false,
            http: true,
            max_head: 64 * 1024,
            via: Some("socksgate".to_string()),
            udp: true,
            udp_advertise: None,
            udp_idle_timeout: Duration::from_secs(120),
            bind_cmd: true,
            bind_timeout: Duration::from_secs(120),
            client_rules: ClientRules::default(),
            dest_rules: DestRules::default(),
            outbound_bind: None,
            upstream: None,
            upstream_tls: None,
            upstream_trust: crate::tls::UpstreamTrust::System,
            proxy_protocol: false,
            tls: None,
            tls_only: false,
            metrics: None,
            metrics_per_user: false,
            resolver_threads: 4,
            resolver: Resolver::system(StaticHosts::default()),
            log_level: log::LevelFilter::Info,
        }
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Command {
    /// Run the server.
    Run(Box<Config>),
    /// Print this help text and exit 0.
    Help(String),
    /// Print the version and exit 0.
    Version,
    /// `--check-config`: every file-backed setting was validated; these are the errors (none: exit 0, else 2).
    Check(Vec<String>),
}

/// A bad flag or value: printed as one line, exit status 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn options() -> Options {
    let mut o = Options::new();
    o.optmulti(
        "l",
        "listen",
        "listen address, IPv4 or [IPv6]:port; repeatable (default 127.0.0.1:1080); not bound when systemd passes sockets",
        "ADDR:PORT",
    );
    o.optopt(
        "t",
        "threads",
        "worker threads, one event loop each (default: number of CPUs)",
        "N",
    );
    o.optmulti(
        "U",
        "user",
        "allow user NAME with password PASS; repeatable; visible in ps, prefer --users",
        "NAME:PASS",
    );
    o.optopt(
        "",
        "users",
        "users file: NAME:PASS per line, PASS plain or $6$/$2b$ crypt hash; re-read on SIGHUP",
        "FILE",
    );
    o.optopt(
        "",
        "policy",
        "policy file (TOML): per-user limits and egress, destination rules; re-read on SIGHUP",
        "FILE",
    );
    o.optflag(
        "",
        "check-config",
        "validate the flags, --users and --policy files, print the errors and exit (0 ok, 2 errors)",
    );
    o.optopt(
        "",
        "buffer-size",
        "relay buffer size in bytes (default 16384)",
        "BYTES",
    );
    o.optopt(
        "",
        "socket-buffer",
        "SO_RCVBUF and SO_SNDBUF for both legs of every proxied TCP connection (client, target, upstream), e.g. \
         64KiB; caps the kernel memory a stalled tunnel holds, at the cost of throughput on long fat paths; \
         capped by net.core.rmem_max/wmem_max (default: kernel autotuning)",
        "BYTES",
    );
    o.optflag(
        "",
        "no-splice",
        "relay with read/write through user space instead of splice(2) through pipes",
    );
    o.optopt(
        "",
        "handshake-timeout",
        "deadline for the client handshake from accept (default 10s)",
        "DUR",
    );
    o.optopt(
        "",
        "connect-timeout",
        "deadline to resolve and connect to a target (default 10s)",
        "DUR",
    );
    o.optopt(
        "",
        "tcp-keepalive",
        "TCP keepalive on both legs after this idle time (probes every third of it, 1s..75s, 3 of them)",
        "DUR",
    );
    o.optopt(
        "",
        "tcp-user-timeout",
        "TCP_USER_TIMEOUT on both legs: drop a connection whose sent data stays unacknowledged this long",
        "DUR",
    );
    o.optflag(
        "",
        "tcp-fastopen",
        "accept TCP Fast Open on the listeners (needs net.ipv4.tcp_fastopen & 2)",
    );
    o.optopt(
        "",
        "connection-attempt-delay",
        "Happy Eyeballs: start the next address this long after the previous attempt (default 250ms, min 10ms); \
         an A answer waits 50ms for a pending AAAA",
        "DUR",
    );
    o.optopt(
        "",
        "idle-timeout",
        "close tunnels idle this long (default 300s)",
        "DUR",
    );
    o.optopt(
        "",
        "drain-timeout",
        "on SIGTERM, let tunnels finish for this long (default 30s)",
        "DUR",
    );
    o.optopt(
        "",
        "upgrade-timeout",
        "on SIGUSR2, how long the new binary has to become ready (default 30s)",
        "DUR",
    );
    o.optopt(
        "",
        "pid-file",
        "write the serving process's pid here (the new one's after an upgrade)",
        "FILE",
    );
    o.optopt(
        "",
        "state-dir",
        "keep the policy's quota counters in DIR/quota.state (written every few seconds and on exit; \
         read at startup)",
        "DIR",
    );
    o.optopt(
        "",
        "max-connections",
        "cap on concurrent client connections (default unlimited)",
        "N",
    );
    o.optopt(
        "",
        "user-max-connections",
        "cap on concurrent sessions per user (default unlimited)",
        "N",
    );
    o.optflag("", "no-socks4", "refuse SOCKS4 and SOCKS4a");
    o.optflag(
        "",
        "socks4-with-users",
        "serve SOCKS4 (which has no password) even when users are configured",
    );
    o.optflag(
        "",
        "no-http",
        "refuse the HTTP proxy (CONNECT and forwarding)",
    );
    o.optopt(
        "",
        "max-header-size",
        "largest HTTP head in bytes (default 65536)",
        "BYTES",
    );
    o.optopt(
        "",
        "via",
        "pseudonym in the Via header of forwarded HTTP (default socksgate)",
        "NAME",
    );
    o.optflag("", "no-via", "do not add a Via header to forwarded HTTP");
    o.optflag("", "no-udp", "refuse SOCKS5 UDP ASSOCIATE");
    o.optopt(
        "",
        "udp-advertise",
        "address to put in UDP ASSOCIATE replies (for NAT)",
        "IP",
    );
    o.optopt(
        "",
        "udp-idle-timeout",
        "close UDP associations idle this long (default 120s)",
        "DUR",
    );
    o.optflag("", "no-bind", "refuse SOCKS BIND");
    o.optopt(
        "",
        "bind-timeout",
        "how long a BIND waits for its inbound connection (default 120s)",
        "DUR",
    );
    o.optmulti(
        "",
        "allow-client",
        "accept clients only from these networks; repeatable (default all)",
        "CIDR",
    );
    o.optmulti(
        "",
        "allow-dest",
        "allow only these destinations; repeatable (default all)",
        "CIDR[:PORT[-PORT]]",
    );
    o.optmulti(
        "",
        "deny-dest",
        "deny these destinations, wins over allow; `private` = loopback, RFC 1918, link-local, ULA",
        "CIDR[:PORT[-PORT]]",
    );
    o.optopt(
        "",
        "bind",
        "source address for outbound TCP and UDP, and for DNS queries to nameservers of its family",
        "IP",
    );
    o.optopt(
        "",
        "upstream",
        "send outbound connections through socks5://[user:pass@]host:port, http://..., or inside TLS: \
         socks5s://..., https://...; a host name is resolved per session (Happy Eyeballs), a failure at start \
         only warns",
        "URL",
    );
    o.optopt(
        "",
        "upstream-ca",
        "trust only the CAs in this PEM file for https:// and socks5s:// upstreams and TLS group members \
         (default: system roots)",
        "FILE",
    );
    o.optflag(
        "",
        "upstream-insecure",
        "do not verify the certificate of a TLS upstream or TLS group member (only where you control the path)",
    );
    o.optflag(
        "",
        "proxy-protocol",
        "require a PROXY protocol v1/v2 header on every connection (behind a load balancer)",
    );
    o.optopt(
        "",
        "tls-cert",
        "PEM certificate chain, leaf first: serve TLS on every listener (clients whose first byte is a TLS \
         record); re-read on SIGHUP",
        "FILE",
    );
    o.optopt(
        "",
        "tls-key",
        "PEM private key for --tls-cert (PKCS#8, RSA or EC); re-read on SIGHUP",
        "FILE",
    );
    o.optopt(
        "",
        "tls-client-ca",
        "require a client certificate from this PEM CA; its DNS SAN (else CN) is the user, no password; \
         implies --tls-only",
        "FILE",
    );
    o.optflag(
        "",
        "tls-only",
        "refuse clear-text clients (closed after their first byte)",
    );
    o.optopt(
        "",
        "metrics",
        "serve Prometheus metrics at http://ADDR:PORT/metrics",
        "ADDR:PORT",
    );
    o.optflag(
        "",
        "metrics-per-user",
        "add per-user series to /metrics: bytes, active sessions, seconds throttled, quota left",
    );
    o.optmulti(
        "",
        "resolve",
        "resolve NAME to these addresses without DNS; repeatable",
        "NAME=IP[,IP]",
    );
    o.optopt(
        "",
        "resolver-threads",
        "threads for blocking work: getaddrinfo with --dns-system, password hashes (default 4)",
        "N",
    );
    o.optmulti(
        "",
        "dns",
        "nameserver to ask instead of those in /etc/resolv.conf; repeatable, tried in order",
        "IP[:PORT]",
    );
    o.optflag(
        "",
        "dns-system",
        "resolve with getaddrinfo on the pool threads (NSS: LDAP, mDNS) instead of the built-in resolver",
    );
    o.optopt(
        "",
        "dns-max-ttl",
        "longest time a DNS answer is cached, whatever its TTL (default 5m)",
        "DUR",
    );
    o.optopt(
        "",
        "dns-timeout",
        "wait for one DNS answer before asking the next server (default: resolv.conf timeout, else 5s)",
        "DUR",
    );
    o.optflag(
        "",
        "open",
        "allow listening on a non-loopback address without authentication or client rules",
    );
    o.optflagmulti("v", "verbose", "more logging (-v debug, -vv trace)");
    o.optflagmulti("q", "quiet", "less logging (-q warn, -qq error)");
    o.optflag("h", "help", "print this help");
    o.optflag("V", "version", "print the version");
    o
}

/// The usage text, every flag with its default.
pub fn usage() -> String {
    let brief = "Usage: socksgate [options]\n\nSOCKS5, SOCKS4/4a and HTTP proxy on one port. \
                 DUR is a number with an optional\nunit: 500ms, 10s, 5m, 1h, 1d (default s).\n\n\
                 Signals: SIGTERM/SIGINT drain (a second one exits at once); SIGHUP re-reads\n\
                 --users and --policy; SIGUSR2 upgrades: starts the binary again from the\n\
                 same path, hands it the listening sockets, and drains once it is ready.\n\
                 Socket activation: when systemd passes listening sockets (LISTEN_FDS and\n\
                 LISTEN_PID), those are served instead of the -l addresses (-l is ignored).";
    options().usage(brief)
}

/// Parses a duration such as `10`, `10s`, `500ms`, `5m`, `1h`, `30d`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "" | "s" => Some(Duration::from_secs(n)),
        "ms" => Some(Duration::from_millis(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        "d" => n.checked_mul(86400).map(Duration::from_secs),
        _ => None,
    }
}

/// Parses `1.2.3.4:80`, `[::1]:80`, or `:80` / `80`? No: an address is always explicit.
pub fn parse_socket_addr(s: &str) -> Option<SocketAddr> {
    s.parse().ok()
}

/// Parses a byte count: plain digits or with a binary suffix (`K`/`KiB`, `M`/`MiB`, `G`/`GiB`, case-insensitive).
pub fn parse_size(s: &str) -> Option<usize> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let unit: usize = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1024,
        "m" | "mib" => 1024 * 1024,
        "g" | "gib" => 1024 * 1024 * 1024,
        _ => return None,
    };
    digits.parse::<usize>().ok()?.checked_mul(unit)
}

/// The `--socket-buffer` value: the kernel takes an int and doubles it, and refuses less than about 2 KiB.
fn socket_buffer(v: &str) -> Result<usize, ConfigError> {
    match parse_size(v) {
        Some(n) if (4096..=1 << 30).contains(&n) => Ok(n),
        _ => Err(ConfigError(format!(
            "--socket-buffer: expected BYTES from 4096 to 1GiB (suffixes KiB, MiB, GiB), got {v:?}"
        ))),
    }
}

fn num<T>(m: &getopts::Matches, name: &str, min: T) -> Result<Option<T>, ConfigError>
where
    T: std::str::FromStr + PartialOrd + Copy + fmt::Display,
{
    match m.opt_str(name) {
        None => Ok(None),
        Some(v) => match v.parse::<T>() {
            Ok(n) if n >= min => Ok(Some(n)),
            _ => Err(ConfigError(format!(
                "--{name}: expected a number >= {min}, got {v:?}"
            ))),
        },
    }
}

fn dur(m: &getopts::Matches, name: &str, default: Duration) -> Result<Duration, ConfigError> {
    match m.opt_str(name) {
        None => Ok(default),
        Some(v) => match parse_duration(&v) {
            Some(d) if !d.is_zero() => Ok(d),
            _ => Err(ConfigError(format!(
                "--{name}: expected a duration such as 10s or 500ms, got {v:?}"
            ))),
        },
    }
}

/// The built-in resolver's settings: /etc/resolv.conf (a missing file means a nameserver on the local host, as
/// for the C library), overridden by `--dns`, `--dns-timeout` and `--dns-max-ttl`.
fn dns_settings(m: &getopts::Matches) -> Result<DnsSettings, ConfigError> {
    let mut s = DnsSettings {
        conf: ResolvConf::parse(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()),
        ..DnsSettings::default()
    };
    let servers = m.opt_strs("dns");
    if servers.is_empty() {
        s.reload = Some(conf::Reload {
            path: "/etc/resolv.conf".into(),
            timeout: None,
        });
    } else {
        s.conf.servers.clear();
        for v in servers {
            let a = conf::parse_server(&v)
                .ok_or_else(|| ConfigError(format!("--dns: expected IP or IP:PORT, got {v:?}")))?;
            s.conf.servers.push(a);
        }
    }
    s.conf.timeout = dur(m, "dns-timeout", s.conf.timeout)?;
    if let Some(r) = s.reload.as_mut().filter(|_| m.opt_present("dns-timeout")) {
        r.timeout = Some(s.conf.timeout);
    }
    s.max_ttl = dur(m, "dns-max-ttl", s.max_ttl)?;
    Ok(s)
}

fn ip(m: &getopts::Matches, name: &str) -> Result<Option<IpAddr>, ConfigError> {
    match m.opt_str(name) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| ConfigError(format!("--{name}: expected an IP address, got {v:?}"))),
    }
}

/// The trust for TLS upstreams (`--upstream-ca`, `--upstream-insecure`, else the system roots) and the client
/// configuration for a TLS `--upstream`. The flags also apply to TLS members of policy groups.
fn upstream_tls(
    m: &getopts::Matches,
    upstream: Option<&Upstream>,
    policy: bool,
) -> Result<(crate::tls::UpstreamTrust, Option<Arc<rustls::ClientConfig>>), ConfigError> {
    let ca = m.opt_str("upstream-ca");
    let insecure = m.opt_present("upstream-insecure");
    let trust = match (ca, insecure) {
        (Some(_), true) => {
            return Err(ConfigError(
                "--upstream-ca and --upstream-insecure exclude each other".to_string(),
            ))
        }
        (Some(path), false) => crate::tls::UpstreamTrust::Ca(path.into()),
        (None, true) => crate::tls::UpstreamTrust::Insecure,
        (None, false) => crate::tls::UpstreamTrust::System,
    };
    let Some(up) = upstream.filter(|u| u.tls) else {
        // With a policy file the flags are for its groups' TLS members.
        if trust != crate::tls::UpstreamTrust::System && !policy {
            return Err(ConfigError(
                "--upstream-ca and --upstream-insecure need an https:// or socks5s:// --upstream, or a --policy \
                 file with TLS group members"
                    .to_string(),
            ));
        }
        return Ok((trust, None));
    };
    let http = up.kind == crate::upstream::UpstreamKind::Http;
    crate::tls::upstream_client_config(&trust, http)
        .map(|c| (trust, Some(c)))
        .map_err(|e| ConfigError(e.to_string()))
}

/// Loads `--tls-cert`/`--tls-key`/`--tls-client-ca` (an unusable file is a start-up error naming it).
fn tls(m: &getopts::Matches) -> Result<Option<Arc<crate::tls::TlsAcceptor>>, ConfigError> {
    let (cert, key) = match (m.opt_str("tls-cert"), m.opt_str("tls-key")) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        (Some(_), None) => return Err(ConfigError("--tls-cert needs --tls-key".to_string())),
        (None, Some(_)) => return Err(ConfigError("--tls-key needs --tls-cert".to_string())),
    };
    let files = crate::tls::TlsFiles {
        cert: cert.into(),
        key: key.into(),
        client_ca: m.opt_str("tls-client-ca").map(PathBuf::from),
    };
    let (acceptor, _) =
        crate::tls::TlsAcceptor::load(files).map_err(|e| ConfigError(e.to_string()))?;
    Ok(Some(Arc::new(acceptor)))
}

/// Parses the command line (without the program name).
pub fn parse(args: &[String]) -> Result<Command, ConfigError> {
    let m = options()
        .parse(args)
        .map_err(|e| ConfigError(e.to_string()))?;
    if m.opt_present("h") {
        return Ok(Command::Help(usage()));
    }
    if m.opt_present("V") {
        return Ok(Command::Version);
    }
    if let Some(extra) = m.free.first() {
        return Err(ConfigError(format!(
            "unexpected argument {extra:?} (see --help)"
        )));
    }
    let mut c = Config::default();
    let listen = m.opt_strs("l");
    if !listen.is_empty() {
        c.listen.clear();
        for l in listen {
            let a = parse_socket_addr(&l).ok_or_else(|| {
                ConfigError(format!(
                    "--listen: expected ADDR:PORT (IPv6 as [::1]:1080), got {l:?}"
                ))
            })?;
            if !c.listen.contains(&a) {
                c.listen.push(a);
            }
        }
    }
    if let Some(t) = num::<usize>(&m, "threads", 1)? {
        c.threads = t.min(256);
    }
    for u in m.opt_strs("U") {
        match u.split_once(':') {
            Some((name, pass)) if !name.is_empty() => {
                c.inline_users.push((name.to_string(), pass.to_string()))
            }
            _ => return Err(ConfigError("--user: expected NAME:PASS".to_string())),
        }
    }
    c.users_file = m.opt_str("users").map(PathBuf::from);
    c.policy_file = m.opt_str("policy").map(PathBuf::from);
    if let Some(b) = num::<usize>(&m, "buffer-size", 1024)? {
        if b > 16 * 1024 * 1024 {
            return Err(ConfigError("--buffer-size: at most 16777216".to_string()));
        }
        c.buffer_size = b;
    }
    c.splice = !m.opt_present("no-splice");
    if let Some(v) = m.opt_str("socket-buffer") {
        c.socket_buffer = Some(socket_buffer(&v)?);
    }
    c.handshake_timeout = dur(&m, "handshake-timeout", c.handshake_timeout)?;
    c.connect_timeout = dur(&m, "connect-timeout", c.connect_timeout)?;
    if m.opt_present("tcp-keepalive") {
        c.tcp.keepalive = Some(dur(&m, "tcp-keepalive", Duration::ZERO)?);
    }
    if m.opt_present("tcp-user-timeout") {
        c.tcp.user_timeout = Some(dur(&m, "tcp-user-timeout", Duration::ZERO)?);
    }
    if m.opt_present("tcp-fastopen") {
        c.tcp.fastopen = Some(crate::net::FASTOPEN_QUEUE);
    }
    c.connection_attempt_delay = dur(&m, "connection-attempt-delay", c.connection_attempt_delay)?;
    c.idle_timeout = dur(&m, "idle-timeout", c.idle_timeout)?;
    c.drain_timeout = dur(&m, "drain-timeout", c.drain_timeout)?;
    c.upgrade_timeout = dur(&m, "upgrade-timeout", c.upgrade_timeout)?;
    c.pid_file = m.opt_str("pid-file").map(PathBuf::from);
    c.state_dir = m.opt_str("state-dir").map(PathBuf::from);
    if let Some(d) = &c.state_dir {
        if !d.is_dir() {
            return Err(ConfigError(format!(
                "--state-dir {}: not a directory",
                d.display()
            )));
        }
    }
    c.open = m.opt_present("open");
    c.udp_idle_timeout = dur(&m, "udp-idle-timeout", c.udp_idle_timeout)?;
    c.bind_timeout = dur(&m, "bind-timeout", c.bind_timeout)?;
    c.max_connections = num::<usize>(&m, "max-connections", 1)?;
    c.user_max_connections = num::<usize>(&m, "user-max-connections", 1)?;
    c.socks4 = !m.opt_present("no-socks4");
    c.socks4_with_users = m.opt_present("socks4-with-users");
    c.http = !m.opt_present("no-http");
    if let Some(h) = num::<usize>(&m, "max-header-size", 1024)? {
        c.max_head = h.min(16 * 1024 * 1024);
    }
    if let Some(v) = m.opt_str("via") {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError(format!(
                "--via: expected a token without spaces, got {v:?}"
            )));
        }
        c.via = Some(v);
    }
    if m.opt_present("no-via") {
        c.via = None;
    }
    c.udp = !m.opt_present("no-udp");
    c.udp_advertise = ip(&m, "udp-advertise")?;
    c.bind_cmd = !m.opt_present("no-bind");
    let mut clients = Vec::new();
    for s in m.opt_strs("allow-client") {
        clients.push(
            s.parse::<acl::Cidr>()
                .map_err(|e| ConfigError(format!("--allow-client: {e}")))?,
        );
    }
    c.client_rules = ClientRules::new(clients);
    let mut allow = Vec::new();
    for s in m.opt_strs("allow-dest") {
        allow.extend(
            acl::parse_dest_rules(&s).map_err(|e| ConfigError(format!("--allow-dest: {e}")))?,
        );
    }
    let mut deny = Vec::new();
    for s in m.opt_strs("deny-dest") {
        deny.extend(
            acl::parse_dest_rules(&s).map_err(|e| ConfigError(format!("--deny-dest: {e}")))?,
        );
    }
    c.dest_rules = DestRules::new(allow, deny);
    c.outbound_bind = ip(&m, "bind")?;
    if let Some(u) = m.opt_str("upstream") {
        c.upstream = Some(Arc::new(
            u.parse::<Upstream>()
                .map_err(|e| ConfigError(format!("--upstream: {e}")))?,
        ));
    }
    (c.upstream_trust, c.upstream_tls) =
        upstream_tls(&m, c.upstream.as_deref(), m.opt_present("policy"))?;
    c.proxy_protocol = m.opt_present("proxy-protocol");
    c.tls = tls(&m)?;
    c.tls_only = m.opt_present("tls-only") || m.opt_present("tls-client-ca");
    if c.tls_only && c.tls.is_none() {
        return Err(ConfigError(
            "--tls-only and --tls-client-ca need --tls-cert and --tls-key".to_string(),
        ));
    }
    c.metrics_per_user = m.opt_present("metrics-per-user");
    if let Some(a) = m.opt_str("metrics") {
        c.metrics = Some(
            parse_socket_addr(&a)
                .ok_or_else(|| ConfigError(format!("--metrics: expected ADDR:PORT, got {a:?}")))?,
        );
    }
    let mut hosts = StaticHosts::default();
    for r in m.opt_strs("resolve") {
        hosts
            .add(&r)
            .map_err(|e| ConfigError(format!("--resolve: {e}")))?;
    }
    if let Some(n) = num::<usize>(&m, "resolver-threads", 1)? {
        c.resolver_threads = n.min(256);
    }
    c.resolver = if m.opt_present("dns-system") {
        Resolver::system(hosts)
    } else {
        let mut dns = dns_settings(&m)?;
        // Lookups leave by the same source address (and so interface) as the connections they are made for.
        dns.source = c.outbound_bind;
        Resolver::dns(hosts, dns)
    };
    let verbose = m.opt_count("v") as i32 - m.opt_count("q") as i32;
    c.log_level = match verbose {
        i32::MIN..=-2 => log::LevelFilter::Error,
        -1 => log::LevelFilter::Warn,
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    // Files last, so that --check-config has validated every flag before it reports on them.
    let check = m.opt_present("check-config");
    match policy::load_all(
        &c.inline_users,
        c.users_file.as_deref(),
        c.policy_file.as_deref(),
        &c.upstream_trust,
    ) {
        Ok((users, policy)) => {
            c.users = Arc::new(users);
            c.policy = Arc::new(policy);
        }
        Err(errors) if check => return Ok(Command::Check(errors)),
        // One line per error; main prefixes the first with "socksgate: ", so the others get it here.
        Err(errors) => return Err(ConfigError(errors.join("\nsocksgate: "))),
    }
    let exposed = c.listen.iter().find(|a| !a.ip().is_loopback());
    if let Some(a) = exposed {
        if c.users.is_empty() && c.client_rules.is_empty() && !c.open {
            return Err(ConfigError(format!(
                "refusing to run an open proxy on non-loopback address {a}: configure --user/--users or \
                 --allow-client, or pass --open if that is really what you want"
            )));
        }
    }
    if check {
        return Ok(Command::Check(Vec::new()));
    }
    Ok(Command::Run(Box::new(c)))
}

/// Builds the users table from the users file and `--user` pairs (a `--user` flag overrides the file's entry).
pub fn load_users(
    inline: &[(String, String)],
    file: Option<&std::path::Path>,
) -> Result<Users, String> {
    let flags = Users::from_pairs(inline).map_err(|e| e.to_string())?;
    match file {
        Some(path) => {
            let from_file =
                Users::load_file(path).map_err(|e| format!("--users {}: {e}", path.display()))?;
            Ok(from_file.merge(flags))
        }
        None => Ok(flags),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn run(s: &str) -> Result<Config, ConfigError> {
        match parse(&args(s))? {
            Command::Run(c) => Ok(*c),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn defaults_are_safe() {
        let c = run("").unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:1080".parse().unwrap()]);
        assert!(c.users.is_empty());
        assert!(c.socks4 && c.http);
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.buffer_size, 16384);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("5 days"), None);
    }

    #[test]
    fn socket_buffer_sizes() {
        assert_eq!(parse_size("65536"), Some(65536));
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("2MiB"), Some(2 << 20));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_size("1.5MiB"), None);
        assert_eq!(parse_size("64 KiB"), None);
        assert_eq!(parse_size("99999999999999999999M"), None);
        assert_eq!(run("").unwrap().socket_buffer, None);
        assert_eq!(
            run("--socket-buffer 64KiB").unwrap().socket_buffer,
            Some(65536)
        );
        for bad in ["0", "100", "2GiB", "lots"] {
            let e = run(&format!("--socket-buffer {bad}")).unwrap_err().0;
            assert!(e.contains("--socket-buffer"), "{e}");
        }
    }

    #[test]
    fn bad_values_name_the_flag() {
        assert!(run("--threads 0").unwrap_err().0.contains("--threads"));
        assert!(run("--idle-timeout soon")
            .unwrap_err()
            .0
            .contains("--idle-timeout"));
        assert!(run("-l nonsense").unwrap_err().0.contains("--listen"));
        assert!(run("--bogus").is_err());
        assert!(run("--user nocolon").unwrap_err().0.contains("--user"));
    }

    #[test]
    fn public_listener_needs_auth_or_open() {
        assert!(run("-l 0.0.0.0:1080").unwrap_err().0.contains("--open"));
        assert!(run("-l 0.0.0.0:1080 --open").is_ok());
        assert!(run("-l 0.0.0.0:1080 -U a:b").is_ok());
        assert!(run("-l [::]:1080 --allow-client 10.0.0.0/8").is_ok());
        assert!(run("-l [::1]:1080").is_ok());
    }

    #[test]
    fn tls_flags_need_each_other_and_readable_files() {
        assert!(run("--tls-cert c.pem").unwrap_err().0.contains("--tls-key"));
        assert!(run("--tls-key k.pem").unwrap_err().0.contains("--tls-cert"));
        assert!(run("--tls-only").unwrap_err().0.contains("--tls-cert"));
        let e = run("--tls-cert /nonexistent/c.pem --tls-key /nonexistent/k.pem")
            .unwrap_err()
            .0;
        assert!(
            e.starts_with("--tls-cert /nonexistent/c.pem: cannot read"),
            "{e}"
        );
        assert!(!run("").unwrap().tls_only);
    }

    #[test]
    fn help_lists_every_flag_default() {
        let u = usage();
        for flag in [
            "--listen",
            "--threads",
            "--users",
            "--buffer-size",
            "--handshake-timeout",
            "--drain-timeout",
            "--max-connections",
            "--no-http",
            "--tls-cert",
            "--tls-key",
            "--tls-client-ca",
            "--tls-only",
            "--socket-buffer",
        ] {
            assert!(u.contains(flag), "{flag} missing from help");
        }
        assert!(u.contains("default 16384"));
    }

    #[test]
    fn help_fits_80_columns() {
        for line in usage().lines() {
            assert!(line.chars().count() <= 80, "over 80 columns: {line:?}");
        }
    }

    #[test]
    fn dns_flags() {
        let c = run("--dns 127.0.0.1:5353 --dns ::1 --dns-timeout 500ms --dns-max-ttl 1m").unwrap();
        let d = c
            .resolver
            .dns_settings()
            .expect("built-in resolver by default");
        assert_eq!(
            d.conf.servers,
            vec![
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(d.conf.timeout, Duration::from_millis(500));
        assert_eq!(d.max_ttl, Duration::from_secs(60));
        assert_eq!(d.reload, None, "--dns: resolv.conf is not watched");
        assert_eq!(d.source, None);
        let c = run("--dns 127.0.0.1 --bind 127.0.0.2").unwrap();
        let d = c.resolver.dns_settings().unwrap();
        assert_eq!(d.source, Some("127.0.0.2".parse().unwrap()), "--bind");
        let c = run("--dns-timeout 2s").unwrap();
        let r = c.resolver.dns_settings().unwrap().reload.clone().unwrap();
        assert_eq!(r.timeout, Some(Duration::from_secs(2)));
        assert!(run("--dns-system")
            .unwrap()
            .resolver
            .dns_settings()
            .is_none());
        for (bad, flag) in [
            ("--dns dns.example", "--dns"),
            ("--dns-max-ttl soon", "--dns-max-ttl"),
            ("--dns-timeout 0", "--dns-timeout"),
        ] {
            assert!(run(bad).unwrap_err().0.contains(flag), "{bad}");
        }
    }
}
