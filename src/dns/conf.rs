//! Resolver settings: `/etc/resolv.conf` (nameserver, search/domain, options timeout/attempts/ndots) and the
//! search-list expansion of a name. Pure: text in, values out.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// glibc's limits: at most 3 nameservers are used, timeout at most 30 s, attempts at most 5, ndots at most 15.
const MAX_SERVERS: usize = 3;
const MAX_SEARCH: usize = 6;

/// What the resolver asks and how patiently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvConf {
    /// Nameservers, tried in order.
    pub servers: Vec<SocketAddr>,
    /// Search domains (without trailing dot), tried for names with fewer than `ndots` dots.
    pub search: Vec<String>,
    /// Names with at least this many dots are tried as given first.
    pub ndots: usize,
    /// Wait for one answer from one server.
    pub timeout: Duration,
    /// Rounds over all servers.
    pub attempts: usize,
}

impl Default for ResolvConf {
    fn default() -> ResolvConf {
        ResolvConf {
            servers: Vec::new(),
            search: Vec::new(),
            ndots: 1,
            timeout: Duration::from_secs(5),
            attempts: 2,
        }
    }
}

/// Parses `host[:port]`, `[v6]:port` or a bare IPv6 address into a nameserver address (port 53 by default).
pub fn parse_server(s: &str) -> Option<SocketAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>().ok()
}

impl ResolvConf {
    /// Parses resolv.conf text the way glibc does: unknown lines are ignored, the last `search`/`domain` wins,
    /// `options` values are clamped to glibc's ranges. A file without nameservers means the local host.
    pub fn parse(text: &str) -> ResolvConf {
        let mut c = ResolvConf::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    // A scope suffix (fe80::1%eth0) cannot be expressed as a SocketAddr: skip such entries.
                    if let Some(a) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                        if c.servers.len() < MAX_SERVERS {
                            c.servers.push(SocketAddr::new(a, 53));
                        }
                    }
                }
                Some("search") => {
                    c.search = words
                        .take(MAX_SEARCH)
                        .map(|w| w.trim_end_matches('.').to_ascii_lowercase())
                        .filter(|w| !w.is_empty())
                        .collect();
                }
                Some("domain") => {
                    c.search = words
                        .next()
                        .map(|w| w.trim_end_matches('.').to_ascii_lowercase())
                        .filter(|w| !w.is_empty())
                        .into_iter()
                        .collect();
                }
                Some("options") => {
                    for opt in words {
                        let (k, v) = opt.split_once(':').unwrap_or((opt, ""));
                        let n = v.parse::<u64>().ok();
                        match (k, n) {
                            ("timeout", Some(n)) => c.timeout = Duration::from_secs(n.clamp(1, 30)),
                            ("attempts", Some(n)) => c.attempts = n.clamp(1, 5) as usize,
                            ("ndots", Some(n)) => c.ndots = n.min(15) as usize,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if c.servers.is_empty() {
            c.servers.push(SocketAddr::from(([127, 0, 0, 1], 53)));
        }
        c
    }

    /// The names to ask for `name`, in order (resolv.conf(5)): a name ending in a dot as given only; a name with at
    /// least `ndots` dots as given, then with each search domain; otherwise with each search domain, then as given.
    pub fn candidates(&self, name: &str) -> Vec<String> {
        if let Some(abs) = name.strip_suffix('.') {
            return vec![abs.to_string()];
        }
        let dots = name.bytes().filter(|b| *b == b'.').count();
        let searched = self.search.iter().map(|d| format!("{name}.{d}"));
        if dots >= self.ndots {
            std::iter::once(name.to_string()).chain(searched).collect()
        } else {
            searched.chain(std::iter::once(name.to_string())).collect()
        }
    }
}

/// How often resolv.conf's mtime is looked at.
const RECHECK: Duration = Duration::from_secs(1);

/// Where the settings came from, so they can be re-read when the file changes (as glibc does); not used with
/// `--dns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reload {
    /// The file (`/etc/resolv.conf`).
    pub path: PathBuf,
    /// `--dns-timeout`, which wins over the file's `timeout:`.
    pub timeout: Option<Duration>,
}

/// Watches resolv.conf for changes.
#[derive(Debug)]
pub struct Watch {
    reload: Reload,
    mtime: Option<SystemTime>,
    checked: Option<Instant>,
}

fn mtime(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Watch {
    /// Starts watching; the file as it is now is taken to be the one already read.
    pub fn new(reload: Reload) -> Watch {
        Watch {
            mtime: mtime(&reload.path),
            reload,
            checked: None,
        }
    }

    /// The new settings if the file changed since the last look (looked at no more than once a second).
    pub fn poll(&mut self, now: Instant) -> Option<ResolvConf> {
        if self
            .checked
            .is_some_and(|t| now.saturating_duration_since(t) < RECHECK)
        {
            return None;
        }
        self.checked = Some(now);
        let m = mtime(&self.reload.path);
        if m == self.mtime {
            return None;
        }
        self.mtime = m;
        let text = std::fs::read_to_string(&self.reload.path).unwrap_or_default();
        let mut c = ResolvConf::parse(&text);
        if let Some(t) = self.reload.timeout {
            c.timeout = t;
        }
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_servers_options_and_search() {
        let c = ResolvConf::parse(
            "# comment\nnameserver 10.0.0.1\nnameserver ::1 # trailing\nnameserver fe80::1%eth0\n\
             nameserver 10.0.0.2\nnameserver 10.0.0.3\nsearch Corp.Example. lab\n\
             options ndots:2 timeout:0 attempts:9 rotate edns0\nbogus line\n",
        );
        assert_eq!(
            c.servers,
            vec![
                "10.0.0.1:53".parse().unwrap(),
                "[::1]:53".parse().unwrap(),
                "10.0.0.2:53".parse().unwrap()
            ]
        );
        assert_eq!(c.search, vec!["corp.example", "lab"]);
        assert_eq!(c.ndots, 2);
        assert_eq!(c.timeout, Duration::from_secs(1));
        assert_eq!(c.attempts, 5);
    }

    #[test]
    fn defaults_and_domain_line() {
        let c = ResolvConf::parse("domain example.org\n");
        assert_eq!(c.servers, vec!["127.0.0.1:53".parse().unwrap()]);
        assert_eq!(c.search, vec!["example.org"]);
        assert_eq!((c.ndots, c.attempts), (1, 2));
        assert_eq!(c.timeout, Duration::from_secs(5));
        // The last of search/domain wins.
        let c = ResolvConf::parse("search a b\ndomain c\n");
        assert_eq!(c.search, vec!["c"]);
    }

    #[test]
    fn search_list_order_follows_ndots() {
        let mut c = ResolvConf::parse("search a.example b.example\n");
        assert_eq!(
            c.candidates("host"),
            vec!["host.a.example", "host.b.example", "host"]
        );
        assert_eq!(
            c.candidates("www.host"),
            vec!["www.host", "www.host.a.example", "www.host.b.example"]
        );
        assert_eq!(c.candidates("abs.host."), vec!["abs.host"]);
        c.ndots = 3;
        assert_eq!(c.candidates("www.host")[0], "www.host.a.example");
        c.search.clear();
        assert_eq!(c.candidates("host"), vec!["host"]);
    }

    #[test]
    fn server_specs() {
        assert_eq!(parse_server("1.2.3.4"), Some("1.2.3.4:53".parse().unwrap()));
        assert_eq!(
            parse_server("1.2.3.4:5353"),
            Some("1.2.3.4:5353".parse().unwrap())
        );
        assert_eq!(parse_server("::1"), Some("[::1]:53".parse().unwrap()));
        assert_eq!(parse_server("[::1]:54"), Some("[::1]:54".parse().unwrap()));
        assert_eq!(parse_server("dns.example"), None);
    }

    #[test]
    fn watch_rereads_a_changed_file() {
        let path = crate::test_support::scratch_file(
            "socksgate-resolv",
            "resolv.conf",
            "nameserver 127.0.0.1\n",
        );
        let dir = path.parent().unwrap().to_path_buf();
        let mut w = Watch::new(Reload {
            path: path.clone(),
            timeout: Some(Duration::from_millis(300)),
        });
        let t0 = Instant::now();
        assert_eq!(w.poll(t0), None, "unchanged");
        std::fs::write(&path, "nameserver 127.0.0.2\noptions timeout:9\n").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            w.poll(t0 + Duration::from_millis(500)),
            None,
            "checked at most once a second"
        );
        let c = w.poll(t0 + RECHECK).expect("changed");
        assert_eq!(c.servers, vec!["127.0.0.2:53".parse().unwrap()]);
        assert_eq!(c.timeout, Duration::from_millis(300), "--dns-timeout wins");
        assert_eq!(w.poll(t0 + RECHECK * 2), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
