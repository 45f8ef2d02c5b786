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
