//! The only place with `unsafe`: syscalls std does not wrap.

use std::io;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit. A proxy holds two descriptors
/// per tunnel, so the common default soft limit of 1024 would cap it at ~500 tunnels; HAProxy and nginx raise it
/// the same way.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into `lim`, a valid, exclusively borrowed rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
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
