//! Test support shared by the parsers' unit tests: one deterministic generator for the random-input loops, and
//! the bad SOCKS5 domain addresses every parser of an RFC 1928 address must refuse, and the small constructors
//! the SOCKS tests write their messages and targets with.
//! (`check_valid!`, `check_err!` and `check_contract!` are macros in `proto/mod.rs`: the parsers return values
//! that borrow their input, which a generic helper function cannot name.)

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::{Name, Parse, ProtoError, TargetAddr};

/// How many random inputs each parser's contract loop feeds it: enough to reach every error path of the small
/// binary parsers in well under a second in release builds.
pub(crate) const ROUNDS: usize = 100_000;

/// Size of the buffers [`Rng::fill`] fills: longer than every SOCKS message and most test heads.
pub(crate) const FILL_LEN: usize = 300;

/// xorshift64: deterministic, dependency-free pseudo-random numbers, so a failure reproduces exactly.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    /// The next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % (n.max(1) as u64)) as usize
    }

    /// A random byte.
    pub(crate) fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    /// A buffer of length `0..FILL_LEN`: random bytes, or (a third of the time each) small values, which make
    /// length fields short and messages complete, or bytes drawn from `alphabet` (NULs and letters for
    /// terminated fields and names, header text for HTTP heads). A random prefix of `shape` starts it, so the
    /// parsers get past their first checks.
    pub(crate) fn fill<'b>(
        &mut self,
        buf: &'b mut [u8; FILL_LEN],
        shape: &[u8],
        alphabet: &[u8],
    ) -> &'b [u8] {
        let len = self.below(FILL_LEN);
        for b in buf.iter_mut() {
            *b = self.byte();
        }
        match self.below(3) {
            0 => buf.iter_mut().for_each(|b| *b %= 24),
            1 if !alphabet.is_empty() => buf
                .iter_mut()
                .for_each(|b| *b = alphabet[usize::from(*b) % alphabet.len()]),
            _ => {}
        }
        let keep = self.below(shape.len() + 1);
        buf[..keep].copy_from_slice(&shape[..keep]);
        &buf[..len]
    }
}

/// Host names [`super::Name::new`] refuses, none with a NUL (SOCKS4a ends its DOMAIN there), each with the
/// offset of its first bad byte: a parser must fail as soon as that byte arrives.
pub(crate) const BAD_NAMES: &[(&[u8], usize)] = &[
    (b"a b", 1),
    (b"a b.c", 1),
    (b"x/y", 1),
    (b"\x01", 0),
    (b"ok\xff", 2),
    (b"\\", 0),
    (b"a\xc3\xa9", 1),
];

/// Checks the errors every parser of `05 CODE RSV ATYP ADDR PORT` (RFC 1928 §4 requests, §6 replies) owes, with
/// `code` a CODE it accepts: a bad VER, an unknown ATYP, an empty name and bad bytes in a name, each as soon as
/// the offending byte arrives (`check_err!`).
pub(crate) fn check_socks5_address_errors<T: fmt::Debug + PartialEq>(
    parse: impl Fn(&[u8]) -> Result<Parse<T>, ProtoError>,
    code: u8,
) {
    let template = [5, code, 0, 1, 1, 2, 3, 4, 0, 80];
    check_bad_bytes!(
        parse,
        (template, 0, [0u8, 1, 4, 6, 0xff], ProtoError::BadVersion),
        (template, 3, [0u8, 2, 5, 0xff], ProtoError::BadAddressType),
    );
    // `03 LEN NAME PORT`: the empty name fails on its length byte, the others at their first bad byte (a NUL
    // is one in SOCKS5).
    check_err!(parse, &[5, code, 0, 3, 0, 0, 80], ProtoError::BadName, 5);
    let with_nul: &[(&[u8], usize)] = &[(b"ab\0cd", 2), (b"a\0b", 1)];
    for &(bad, pos) in BAD_NAMES.iter().chain(with_nul) {
        let len = u8::try_from(bad.len()).unwrap_or(u8::MAX);
        let msg = [&[5, code, 0, 3, len], bad, &[0, 80]].concat();
        check_err!(parse, &msg, ProtoError::BadName, 5 + pos + 1);
    }
}

/// The parts of a test message, end to end.
pub(crate) fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// An IPv4 target.
pub(crate) fn v4(ip: [u8; 4], port: u16) -> TargetAddr {
    TargetAddr::Ip(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
}

/// An IPv6 target from the text of its address.
pub(crate) fn v6(ip: &str, port: u16) -> TargetAddr {
    match ip.parse() {
        Ok(ip) => TargetAddr::Ip(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))),
        Err(e) => panic!("bad test address {ip}: {e}"),
    }
}

/// A literal target from `ip:port` text.
pub(crate) fn ip(s: &str) -> TargetAddr {
    match s.parse() {
        Ok(sa) => TargetAddr::Ip(sa),
        Err(e) => panic!("bad test address {s}: {e}"),
    }
}

/// A domain target; the name must be one [`Name::new`] takes.
pub(crate) fn dom(name: &[u8], port: u16) -> TargetAddr {
    match Name::new(name) {
        Some(n) => TargetAddr::Domain(n, port),
        None => panic!("bad test name {name:?}"),
    }
}
