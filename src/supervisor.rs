//! Talking to whatever supervises the process: systemd's notify socket, the pid file, and the new process of a
//! SIGUSR2 binary upgrade.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::listen::upgrade_env;

/// Sends `msg` (newline-separated `KEY=VALUE` assignments) to systemd's notify socket when `NOTIFY_SOCKET` is
/// set (sd_notify protocol: one datagram; a leading `@` names an abstract socket). Returns false when there is no
/// socket; a send error is returned so the caller can log it.
pub fn notify(msg: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            UnixAddr::from_abstract_name(name)?
        }
        None => UnixAddr::from_pathname(Path::new(&path))?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(msg.as_bytes(), &addr)?;
    Ok(true)
}

/// [`notify`], logging a failure instead of returning it.
pub fn notify_or_log(msg: &str) {
    if let Err(e) = notify(msg) {
        log::warn!("sd_notify {:?}: {e}", msg.lines().next().unwrap_or(""));
    }
}

/// Writes this process's pid to `path` atomically (a temporary file in the same directory, then rename), so a
/// reader never sees an empty or half-written file, even while an upgrade replaces the pid.
pub fn write_pid_file(path: &Path) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{}", std::process::id())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the pid file if it still names this process (after an upgrade it names the new one).
pub fn remove_pid_file(path: &Path) {
    let me = std::process::id().to_string();
    if std::fs::read_to_string(path).is_ok_and(|s| s.trim() == me) {
        let _ = std::fs::remove_file(path);
    }
}

/// The path to start the new binary from in an upgrade, resolved once at startup: `argv[0]` made absolute
/// (against the starting directory, or searched in `PATH` when it has no slash), like nginx and HAProxy. Not
/// `/proc/self/exe`: after the binary is replaced on disk that names the old, deleted file; the path names
/// whatever is installed there now (through a symlink, the symlink's current target).
pub fn resolve_exe(argv0: &std::ffi::OsStr) -> Option<PathBuf> {
    let p = Path::new(argv0);
    if p.as_os_str().is_empty() {
        return std::fs::read_link("/proc/self/exe").ok();
    }
    if p.as_os_str().as_encoded_bytes().contains(&b'/') {
        return if p.is_absolute() {
            Some(p.to_path_buf())
        } else {
            std::env::current_dir().ok().map(|d| d.join(p))
        };
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(p))
        .find(|c| c.is_file())
        .and_then(|c| {
            if c.is_absolute() {
                Some(c)
            } else {
                std::env::current_dir().ok().map(|d| d.join(c))
            }
        })
}

/// The message a new process sends on its readiness socket.
const READY: &[u8] = b"READY\n";

/// Tells the old process (through the socket it handed over) that this process serves.
pub fn report_ready(mut to: UnixStream) -> io::Result<()> {
    to.write_all(READY)
}

/// A new process started by SIGUSR2, not yet ready.
pub struct Upgrade {
    child: Child,
    ready: mio::net::UnixStream,
    got: Vec<u8>,
    deadline: Instant,
    exe: PathBuf,
    /// Why and when the new process was found to have failed while it may still be exiting: its status is
    /// collected on later checks (the control loop must not block on it).
    failing: Option<(String, Instant)>,
}

/// How long a new process that gave up is given to exit on its own before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// How a pending upgrade stands after its readiness socket or its deadline was checked.
#[derive(Debug)]
pub enum UpgradeState {
    /// Still starting.
    Pending,
    /// The new process serves; its pid.
    Ready(u32),
    /// It failed; why, in words for the log.
    Failed(String),
}

impl Upgrade {
    /// Starts `exe` with `args`, keeping `listen_fds` (and `metrics_fd`) open in it; it has `timeout` to report
    /// readiness.
    pub fn start(
        exe: &Path,
        args: &[OsString],
        listen_fds: &[RawFd],
        metrics_fd: Option<RawFd>,
        timeout: Duration,
    ) -> io::Result<Upgrade> {
        let (ours, theirs) = UnixStream::pair()?;
        let list: Vec<String> = listen_fds.iter().map(|f| f.to_string()).collect();
        let mut keep: Vec<RawFd> = listen_fds.to_vec();
        keep.push(theirs.as_raw_fd());
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env(upgrade_env::FDS, list.join(","))
            .env(upgrade_env::READY_FD, theirs.as_raw_fd().to_string())
            .env(upgrade_env::FROM, std::process::id().to_string())
            .env_remove(upgrade_env::METRICS_FD);
        if let Some(m) = metrics_fd {
            cmd.env(upgrade_env::METRICS_FD, m.to_string());
            keep.push(m);
        }
        crate::sys::keep_fds_in_child(&mut cmd, keep);
        let child = cmd.spawn()?;
        // Our copy of the child's end must close, or its exit would not show as EOF here.
        drop(theirs);
        ours.set_nonblocking(true)?;
        Ok(Upgrade {
            child,
            ready: mio::net::UnixStream::from_std(ours),
            got: Vec::new(),
            deadline: Instant::now() + timeout,
            exe: exe.to_path_buf(),
            failing: None,
        })
    }

    /// The new process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The readiness socket, to register for readable events.
    pub fn source(&mut self) -> &mut mio::net::UnixStream {
        &mut self.ready
    }

    /// Reads what the new process reported and checks the deadline. Never blocks. Once it reports `Failed`, the new
    /// process has been stopped (killed if it was still running) and reaped.
    pub fn check(&mut self, now: Instant) -> UpgradeState {
        if let Some((what, since)) = self.failing.take() {
            return self.finish_failure(what, since, now);
        }
        let mut buf = [0u8; 64];
        let problem = loop {
            match self.ready.read(&mut buf) {
                Ok(0) => break "closed its readiness socket before it was ready".to_string(),
                Ok(n) => {
                    self.got.extend_from_slice(&buf[..n]);
                    if self.got.starts_with(READY) {
                        return UpgradeState::Ready(self.child.id());
                    }
                    if self.got.len() >= READY.len() {
                        break "sent an unexpected readiness message".to_string();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if now >= self.deadline {
                        let _ = self.child.kill();
                        let _ = self.child.wait();
                        return UpgradeState::Failed(format!(
                            "new process {} (pid {}) was not ready in time; killed it",
                            self.exe.display(),
                            self.child.id()
                        ));
                    }
                    return UpgradeState::Pending;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break format!("readiness socket: {e}"),
            }
        };
        self.finish_failure(problem, now, now)
    }

    /// A process that closed the socket is usually exiting: report its status once it has one, or kill it after
    /// [`EXIT_GRACE`].
    fn finish_failure(&mut self, what: String, since: Instant, now: Instant) -> UpgradeState {
        let how = match self.child.try_wait() {
            Ok(Some(st)) => describe(st),
            _ if now < since + EXIT_GRACE => {
                self.failing = Some((what, since));
                return UpgradeState::Pending;
            }
            _ => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                "killed it".to_string()
            }
        };
        UpgradeState::Failed(format!(
            "new process {} (pid {}) {what}; {how}",
            self.exe.display(),
            self.child.id()
        ))
    }

    /// Stops the new process (it never became the serving one) and reaps it.
    pub fn abort(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn describe(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("it exited with status {c}"),
        (None, Some(s)) => format!("it was killed by signal {s}"),
        _ => format!("it ended: {st}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_path_socket_and_an_abstract_one() {
        let dir = std::env::temp_dir().join(format!("socksgate-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The only test in this binary that touches NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(notify("READY=1").unwrap());
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        use std::os::linux::net::SocketAddrExt;
        let name = format!("socksgate-notify-{}", std::process::id());
        let abs = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        abs.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
        assert!(notify("STOPPING=1").unwrap());
        let n = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        std::env::remove_var("NOTIFY_SOCKET");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pid_file_is_replaced_atomically_and_removed_only_by_its_owner() {
        let dir = std::env::temp_dir().join(format!("socksgate-pid-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("socksgate.pid");
        write_pid_file(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            std::process::id().to_string()
        );
        std::fs::write(&path, "1\n").unwrap();
        remove_pid_file(&path);
        assert!(path.exists(), "another process's pid file was removed");
        write_pid_file(&path).unwrap();
        remove_pid_file(&path);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn exe_path_from_argv0() {
        assert_eq!(
            resolve_exe(std::ffi::OsStr::new("/usr/bin/socksgate")),
            Some(PathBuf::from("/usr/bin/socksgate"))
        );
        let rel = resolve_exe(std::ffi::OsStr::new("./bin/socksgate")).unwrap();
        assert!(rel.is_absolute() && rel.ends_with("bin/socksgate"));
        assert_eq!(
            resolve_exe(std::ffi::OsStr::new("sh")).map(|p| p.is_absolute()),
            Some(true)
        );
    }
}
