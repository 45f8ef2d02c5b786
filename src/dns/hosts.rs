//! `/etc/hosts`: parsed into a name -> addresses map, re-read when the file's modification time changes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// How often the file's mtime is looked at: a lookup never pays more than one stat(2) per second.
const RECHECK: Duration = Duration::from_secs(1);

/// Parses hosts(5) text: `IP name [aliases...]`, `#` comments; names are case-insensitive; addresses keep file
/// order; scoped IPv6 addresses (`fe80::1%eth0`) and malformed lines are skipped.
pub fn parse(text: &str) -> HashMap<String, Vec<IpAddr>> {
    let mut map: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else {
            continue;
        };
        for name in words {
            let key = name.trim_end_matches('.').to_ascii_lowercase();
            let list = map.entry(key).or_default();
            if !list.contains(&ip) {
                list.push(ip);
            }
        }
    }
    map
}

/// The hosts file and what it said when last read.
#[derive(Debug)]
pub struct HostsFile {
    path: PathBuf,
    mtime: Option<SystemTime>,
    checked: Option<Instant>,
    map: HashMap<String, Vec<IpAddr>>,
}

impl HostsFile {
    /// A hosts file at `path`; read on first use.
    pub fn new(path: PathBuf) -> HostsFile {
        HostsFile {
            path,
            mtime: None,
            checked: None,
            map: HashMap::new(),
        }
    }

    /// The addresses for `name` (lower case, no trailing dot), re-reading the file first when it changed.
    pub fn get(&mut self, name: &str, now: Instant) -> Option<Vec<IpAddr>> {
        self.refresh(now);
        self.map.get(name).cloned()
    }

    fn refresh(&mut self, now: Instant) {
        if self
            .checked
            .is_some_and(|t| now.saturating_duration_since(t) < RECHECK)
        {
            return;
        }
        self.checked = Some(now);
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if mtime == self.mtime && mtime.is_some() {
            return;
        }
        self.mtime = mtime;
        // A missing or unreadable file is an empty one, as for the C library.
        self.map = std::fs::read_to_string(&self.path)
            .map(|t| parse(&t))
            .unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_text() {
        let m = parse(
            "127.0.0.1 localhost\n::1 localhost ip6-localhost # comment\n\
             10.0.0.5 Web.Example. web\nnot-an-ip name\nfe80::1%eth0 scoped\n# 1.2.3.4 commented\n\
             127.0.0.1 localhost\n",
        );
        assert_eq!(
            m["localhost"],
            vec![
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(
            m["web.example"],
            vec!["10.0.0.5".parse::<IpAddr>().unwrap()]
        );
        assert!(m.contains_key("web"));
        assert!(!m.contains_key("name") && !m.contains_key("scoped") && !m.contains_key("1.2.3.4"));
    }

    #[test]
    fn rereads_when_the_file_changes() {
        let path =
            crate::test_support::scratch_file("socksgate-hosts", "hosts", "10.0.0.1 a.test\n");
        let dir = path.parent().unwrap().to_path_buf();
        let mut h = HostsFile::new(path.clone());
        let t0 = Instant::now();
        assert_eq!(h.get("a.test", t0), Some(vec!["10.0.0.1".parse().unwrap()]));
        std::fs::write(&path, "10.0.0.2 a.test\n").unwrap();
        // Force a different mtime even on filesystems with coarse timestamps.
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(10))
            .unwrap();
        // Within the recheck interval the old answer stands; after it, the new file is read.
        assert_eq!(h.get("a.test", t0), Some(vec!["10.0.0.1".parse().unwrap()]));
        let t1 = t0 + RECHECK;
        assert_eq!(h.get("a.test", t1), Some(vec!["10.0.0.2".parse().unwrap()]));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(h.get("a.test", t1 + RECHECK), None);
        let _ = std::fs::remove_dir(&dir);
    }
}
