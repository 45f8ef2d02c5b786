//! The only place with `unsafe`: syscalls std does not wrap.

use std::io;
use std::os::fd::{OwnedFd, RawFd};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit. A proxy holds two descriptors
/// per tunnel, so the common default soft limit of 1024 would cap it at ~500 tunnels; HAProxy and nginx raise it
/// the same way.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = nofile_rlimit()?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads `lim`, a valid rlimit; raising the soft limit up to the hard limit needs no
        // privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // rlim_t is u64 on Linux but not on every target.
    #[allow(clippy::unnecessary_cast)]
    Ok(lim.rlim_cur as u64)
}

/// The soft `RLIMIT_NOFILE`: how many descriptors this process may hold.
pub fn nofile_limit() -> io::Result<u64> {
    // rlim_t is u64 on Linux but not on every target.
    #[allow(clippy::unnecessary_cast)]
    Ok(nofile_rlimit()?.rlim_cur as u64)
}

fn nofile_rlimit() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into `lim`, a valid, exclusively borrowed rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of the CPU times in /proc/PID/stat; `None` if the
/// system does not say.
pub fn clock_ticks_per_second() -> Option<u64> {
    // SAFETY: sysconf has no preconditions; it reads a configuration value and touches no memory of ours.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0)
}

/// Overwrites the password part of `-U/--user NAME:PASS` arguments in this process's own argument block, so
/// `ps` and `/proc/PID/cmdline` no longer show them (what microsocks calls `zero_arg`). Call it after the command
/// line was parsed: std reads the arguments from the same memory. Returns how many passwords were hidden.
pub fn hide_passwords_in_cmdline() -> io::Result<usize> {
    // /proc/self/stat fields 48 and 49 (Linux >= 3.5) are the bounds of the argument block.
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    // Fields after the command name start at field 3.
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<usize>().ok());
    let (Some(start), Some(end)) = (field(48), field(49)) else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no argument bounds in /proc/self/stat",
        ));
    };
    if end <= start || end - start > 1 << 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "implausible argument bounds",
        ));
    }
    // The kernel's view of the block must match what we are about to edit.
    let cmdline = std::fs::read("/proc/self/cmdline")?;
    if cmdline.len() != end - start {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "argument block moved",
        ));
    }
    let mut hidden = 0;
    let mut offset = 0;
    let mut prev_is_flag = false;
    for arg in cmdline.split(|&b| b == 0) {
        let value_at = if prev_is_flag {
            Some(0)
        } else if arg.starts_with(b"--user=") {
            Some(7)
        } else if arg.starts_with(b"-U") && arg.len() > 2 {
            Some(2)
        } else {
            None
        };
        prev_is_flag = arg == b"-U" || arg == b"--user";
        if let Some(v) = value_at {
            if let Some(colon) = arg.iter().skip(v).position(|&b| b == b':') {
                let from = offset + v + colon + 1;
                let to = offset + arg.len();
                if from < to {
                    // SAFETY: [start, end) is this process's argument block as reported by the kernel and
                    // verified against /proc/self/cmdline above; it lives in writable stack memory for the life of
                    // the process, and `from..to` lies inside it (within one argument, before its NUL).
                    unsafe {
                        std::ptr::write_bytes((start + from) as *mut u8, b'*', to - from);
                    }
                    hidden += 1;
                }
            }
        }
        offset += arg.len() + 1;
    }
    Ok(hidden)
}

/// A nonblocking pipe used as an in-kernel buffer for `splice(2)`: socket -> pipe -> socket moves bytes without
/// copying them through user space. `held` counts the bytes in it not yet spliced out.
pub struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
    /// Bytes in the pipe.
    pub held: usize,
}

impl Pipe {
    /// A fresh nonblocking, close-on-exec pipe.
    pub fn new() -> io::Result<Pipe> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`, a valid array of two c_ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        // Bigger pipes mean fewer splice calls per megabyte; the kernel may refuse (pipe-max-size, per-user
        // limits), and the default 64 KiB still works.
        // SAFETY: fcntl on a descriptor we own; F_SETPIPE_SZ takes an int argument and touches no memory of ours.
        let _ = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, 256 * 1024) };
        Ok(Pipe {
            read,
            write,
            held: 0,
        })
    }

    /// Moves up to `len` bytes from the socket `from` into the pipe.
    pub fn fill_from(&mut self, from: std::os::fd::RawFd, len: usize) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let n = splice(from, self.write.as_raw_fd(), len)?;
        self.held += n;
        Ok(n)
    }

    /// Moves what the pipe holds into the socket `to`, as far as it takes it.
    pub fn drain_to(&mut self, to: std::os::fd::RawFd) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let n = splice(self.read.as_raw_fd(), to, self.held)?;
        self.held -= n.min(self.held);
        Ok(n)
    }
}

fn splice(from: std::os::fd::RawFd, to: std::os::fd::RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: splice takes two descriptors and null offsets (both ends are a socket or a pipe); it touches no
        // memory of ours. Invalid descriptors are reported as errors, not undefined behaviour.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Adds `fd` to the epoll set `epfd` for edge-triggered readability with EPOLLEXCLUSIVE, so when several event
/// loops poll one listening socket a connection wakes one of them, not all (mio does not expose the flag). The
/// event's data is `token`, as mio's own registrations use, so the event arrives through mio with that token.
pub fn epoll_add_exclusive(epfd: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET | libc::EPOLLEXCLUSIVE) as u32,
        u64: token,
    };
    // SAFETY: epoll_ctl reads `ev`, a valid epoll_event on our stack; bad descriptors are reported as errors.
    if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes `fd` from the epoll set `epfd`.
pub fn epoll_del(epfd: RawFd, fd: RawFd) -> io::Result<()> {
    // SAFETY: EPOLL_CTL_DEL ignores the event argument (null is allowed since Linux 2.6.9).
    if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of descriptor `fd` that this process inherited (from systemd or from the process it replaces)
/// and marks it close-on-exec again, so it does not leak into programs started later. Fails when `fd` is not open.
pub fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors 0-2 are stdio",
        ));
    }
    // SAFETY: F_GETFD only queries the descriptor's flags; it fails with EBADF when `fd` is not open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFD sets descriptor flags only.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above) and was handed to this process by its parent under a protocol
    // (sd_listen_fds or our upgrade variables) that makes us its only owner; it is taken once, at startup.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes `cmd`'s child keep `fds` across exec (they stay close-on-exec in this process): the flag is cleared
/// between fork and exec, in the child only, so no other thread's exec can leak them meanwhile.
pub fn keep_fds_in_child(cmd: &mut std::process::Command, fds: Vec<RawFd>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child before exec; it only calls fcntl, which is async-signal-safe, and
    // allocates nothing (`fds` was allocated before the fork and is only read).
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// CLOCK_MONOTONIC in microseconds, for sd_notify's `MONOTONIC_USEC` (systemd compares it with its own clock).
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `ts`, a valid, exclusively borrowed timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}

/// Sets TCP_FASTOPEN on a listening socket: the queue of pending TFO requests (`--tcp-fastopen`; socket2 has
/// no setter for it).
pub fn set_tcp_fastopen(fd: RawFd, queue: i32) -> io::Result<()> {
    // SAFETY: setsockopt reads size_of::<c_int>() bytes from `queue`, a valid c_int on our stack.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&queue as *const i32).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads TCP_FASTOPEN back (the queue length of a listener, 0 when off).
pub fn tcp_fastopen(fd: RawFd) -> io::Result<i32> {
    let mut queue: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `queue`, a c_int on our stack, and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&mut queue as *mut i32).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(queue)
}
