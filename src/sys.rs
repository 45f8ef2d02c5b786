//! The only place with `unsafe`: syscalls std does not wrap.

use std::io;
use std::mem::MaybeUninit;
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
    getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_FASTOPEN)
}

/// One integer socket option, for the options socket2 cannot read.
fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, a c_int on our stack, and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Most datagrams one [`recv_batch`] or [`send_batch`] call moves: enough to amortise the syscall over a burst,
/// small enough that the per-call header arrays live on the stack.
pub const MAX_BATCH: usize = 32;

/// One datagram [`recv_batch`] received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes written into the slot (after its offset).
    pub len: usize,
    /// The sender; `None` when the kernel gave an address that is not IPv4 or IPv6.
    pub from: Option<std::net::SocketAddr>,
    /// The datagram did not fit in the slot and was cut (MSG_TRUNC).
    pub truncated: bool,
}

/// One datagram for [`send_batch`]: the bytes `buf[start..end]` of the buffer passed along, sent to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    /// First byte in the shared buffer.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// Destination.
    pub to: std::net::SocketAddr,
}

/// Receives up to `out.len()` (at most [`MAX_BATCH`]) datagrams from the nonblocking UDP socket `fd` with one
/// `recvmmsg(2)`: datagram `i` lands in `buf[i * slot + off .. (i + 1) * slot]` and is described by `out[i]`.
/// Returns how many arrived; `WouldBlock` when none was waiting.
pub fn recv_batch(
    fd: RawFd,
    buf: &mut [u8],
    slot: usize,
    off: usize,
    out: &mut [Received],
) -> io::Result<usize> {
    if slot == 0 || off >= slot {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad slot layout",
        ));
    }
    let n = out.len().min(MAX_BATCH).min(buf.len() / slot);
    if n == 0 {
        return Ok(0);
    }
    // Only the entries this call uses are written: clearing the whole arrays on every call showed in profiles of
    // small batches (memset 0.77 % of the worker's time, 0.16 % without it).
    let mut iov = [const { MaybeUninit::<libc::iovec>::uninit() }; MAX_BATCH];
    // Room for an IPv6 address, the largest a UDP socket reports (28 bytes, not the 128 of a sockaddr_storage).
    let mut names = [const { MaybeUninit::<libc::sockaddr_in6>::uninit() }; MAX_BATCH];
    let mut hdrs = [const { MaybeUninit::<libc::mmsghdr>::uninit() }; MAX_BATCH];
    for (i, chunk) in buf.chunks_exact_mut(slot).take(n).enumerate() {
        let room = &mut chunk[off..];
        let v = iov[i].write(libc::iovec {
            iov_base: room.as_mut_ptr().cast(),
            iov_len: room.len(),
        });
        // SAFETY: sockaddr_in6 is a plain C struct of integers; all zeroes is valid. It is cleared because the
        // kernel writes only the address's own length and the whole struct is read back below.
        let name = names[i].write(unsafe { std::mem::zeroed() });
        // SAFETY: mmsghdr is a plain C struct of integers and raw pointers; all zeroes (null pointers, zero
        // lengths) is valid.
        let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
        h.msg_hdr.msg_name = (name as *mut libc::sockaddr_in6).cast();
        h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        h.msg_hdr.msg_iov = v;
        h.msg_hdr.msg_iovlen = 1;
        hdrs[i].write(h);
    }
    let got = loop {
        // SAFETY: the first `n` headers point at `n` distinct iovecs, each covering a disjoint part of `buf` that is
        // exclusively borrowed for this call, and at `n` distinct address storages of the size given in
        // msg_namelen; all of them outlive the call. No control buffer, no timeout (the socket is nonblocking).
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr().cast::<libc::mmsghdr>(),
                n as libc::c_uint,
                0,
                std::ptr::null_mut(),
            )
        };
        if rc >= 0 {
            break rc as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    for ((h, name), o) in hdrs
        .iter()
        .zip(names.iter())
        .zip(out.iter_mut())
        .take(got.min(n))
    {
        // SAFETY: the first `n` headers and names were written above, and got <= n.
        let (h, name) = unsafe { (h.assume_init_ref(), name.assume_init_ref()) };
        let mut storage = socket2::SockAddrStorage::zeroed();
        // SAFETY: sockaddr_in6 is one of the platform's sockaddr types, as view_as requires.
        *unsafe { storage.view_as::<libc::sockaddr_in6>() } = *name;
        // A longer address (not IPv4 or IPv6) was cut by the kernel; its length is clamped to what was kept, and
        // socket2 reports a family it does not know as no socket address.
        let len = h
            .msg_hdr
            .msg_namelen
            .min(std::mem::size_of::<libc::sockaddr_in6>() as _);
        // SAFETY: the storage holds the `len` bytes the kernel wrote (the rest is zeroes).
        let addr = unsafe { socket2::SockAddr::new(storage, len) };
        *o = Received {
            len: h.msg_len as usize,
            from: addr.as_socket(),
            truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        };
    }
    Ok(got)
}

/// Largest datagram sent as one segment of a GSO send: a segment bigger than the route's MTU allows makes the
/// kernel refuse the whole send, and 1500 minus the IPv6 and UDP headers fits every common path.
const GSO_MAX_SEGMENT: usize = 1452;
/// Segments per GSO send: the kernel's UDP_MAX_SEGMENTS (64 before Linux 6.x raised it).
const GSO_MAX_SEGMENTS: usize = 64;
/// Bytes per GSO send: the whole must fit one UDP length field (64 KiB minus headers).
const GSO_MAX_BYTES: usize = 65000;

/// Whether the kernel supports UDP generic segmentation offload (`UDP_SEGMENT`, Linux 4.18): one send carries
/// several equal-size datagrams to one destination and the stack splits them. Asked of the UDP socket `fd`.
/// Without it an older kernel would ignore the control message and send one big datagram, so callers must ask.
pub fn udp_gso_supported(fd: RawFd) -> bool {
    getsockopt_int(fd, libc::SOL_UDP, libc::UDP_SEGMENT).is_ok()
}

/// Room for one `UDP_SEGMENT` control message (CMSG_SPACE of a u16 is 24 bytes on 64-bit targets), aligned
/// for cmsghdr.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct SegmentCmsg([u8; 32]);

/// Sends the first [`MAX_BATCH`] (at most) of `msgs`, whose bytes lie in `buf`, from the nonblocking UDP socket
/// `fd` with one `sendmmsg(2)`, in order. Returns how many the kernel took: fewer than asked when a later one
/// failed (the caller retries from the first one not taken to learn its error); an error when the first failed.
///
/// With `gso` (only where [`udp_gso_supported`] said so), runs of datagrams to one destination whose sizes are
/// equal (the last may be shorter) go as one message with a `UDP_SEGMENT` control message: the stack builds and
/// routes one packet and splits it into the same datagrams on the wire, which is most of the cost saved. A GSO
/// message the kernel refuses (an IPsec route, a small MTU) is sent again datagram by datagram, so GSO never
/// changes what arrives.
pub fn send_batch(fd: RawFd, buf: &[u8], msgs: &[Outgoing], gso: bool) -> io::Result<usize> {
    let n = msgs.len().min(MAX_BATCH);
    if n == 0 {
        return Ok(0);
    }
    // Only the entries this call uses are written (see recv_batch).
    let mut iov = [const { MaybeUninit::<libc::iovec>::uninit() }; MAX_BATCH];
    let mut hdrs = [const { MaybeUninit::<libc::mmsghdr>::uninit() }; MAX_BATCH];
    let mut cmsgs = [const { MaybeUninit::<SegmentCmsg>::uninit() }; MAX_BATCH];
    // One address per message (a group shares its destination), filled in below for the messages used.
    let mut addrs = [const { MaybeUninit::<socket2::SockAddr>::uninit() }; MAX_BATCH];
    for (i, m) in msgs.iter().take(n).enumerate() {
        let Some(bytes) = buf.get(m.start..m.end) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "datagram outside the buffer",
            ));
        };
        iov[i].write(libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        });
    }
    // Group the datagrams: (first, count, segment size) per message.
    let mut groups = [(0usize, 0usize, 0usize); MAX_BATCH];
    let mut g = 0;
    for i in 0..n {
        let len = msgs[i].end - msgs[i].start;
        if g > 0 {
            let (first, count, seg) = groups[g - 1];
            let last_len = msgs[first + count - 1].end - msgs[first + count - 1].start;
            let joins = gso
                && msgs[i].to == msgs[first].to
                && len > 0
                && len <= seg
                && last_len == seg
                && count < GSO_MAX_SEGMENTS
                && seg * count + len <= GSO_MAX_BYTES;
            if joins {
                groups[g - 1].1 += 1;
                continue;
            }
        }
        let seg = if len <= GSO_MAX_SEGMENT { len } else { 0 };
        groups[g] = (i, 1, seg);
        g += 1;
    }
    for (k, &(first, count, seg)) in groups.iter().take(g).enumerate() {
        // SAFETY: mmsghdr is a plain C struct of integers and raw pointers; all zeroes (null pointers, zero
        // lengths) is valid.
        let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
        let m = &mut h.msg_hdr;
        let a = addrs[k].write(socket2::SockAddr::from(msgs[first].to));
        m.msg_name = a.as_ptr().cast_mut().cast();
        m.msg_namelen = a.len();
        m.msg_iov = iov[first].as_mut_ptr();
        m.msg_iovlen = count as _;
        if count > 1 {
            let c = cmsgs[k].write(SegmentCmsg([0; 32]));
            m.msg_control = c.0.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size.
            m.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
            // SAFETY: msg_control points at `c`, 32 bytes aligned for cmsghdr, of which msg_controllen (24) are
            // declared, so CMSG_FIRSTHDR returns a pointer into `c` with room for the header and a u16 of data.
            unsafe {
                let cm = libc::CMSG_FIRSTHDR(m);
                (*cm).cmsg_level = libc::SOL_UDP;
                (*cm).cmsg_type = libc::UDP_SEGMENT;
                (*cm).cmsg_len = libc::CMSG_LEN(2) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), seg as u16);
            }
        }
        hdrs[k].write(h);
    }
    let rc = loop {
        // SAFETY: the first `g` headers, written above, point at consecutive runs of the `n` iovecs (written
        // above too), which cover parts of `buf` (checked in bounds above), at socket addresses with their true
        // lengths and at control buffers of the
        // declared length, all alive for the call; sendmmsg only reads through them (the mutable pointers are
        // what the C API takes) and writes msg_len into the headers we own.
        let rc = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr().cast(), g as libc::c_uint, 0) };
        if rc >= 0 {
            break rc as usize;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => return Err(e),
            _ if groups[0].1 > 1 => return send_batch(fd, buf, &msgs[..groups[0].1], false),
            _ => return Err(e),
        }
    };
    Ok(groups.iter().take(rc.min(g)).map(|grp| grp.1).sum())
}
