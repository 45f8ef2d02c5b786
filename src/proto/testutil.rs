//! Test support shared by the parsers' unit tests: one deterministic generator for the random-input loops, and
//! the bad SOCKS5 domain addresses every parser of an RFC 1928 address must refuse.
//! (`check_valid!`, `check_err!` and `check_contract!` are macros in `proto/mod.rs`: the parsers return values
//! that borrow their input, which a generic helper function cannot name.)

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

/// SOCKS5 DOMAIN addresses (RFC 1928 §5: `03 LEN NAME PORT`) that are `BadName`, each with how many of its bytes
/// arrive before the error: the empty name fails on its length byte, the others at their first bad byte (a NUL
/// is one in SOCKS5).
pub(crate) fn bad_socks5_domains() -> Vec<(Vec<u8>, usize)> {
    let with_nul: &[(&[u8], usize)] = &[(b"ab\0cd", 2), (b"a\0b", 1)];
    let mut all = vec![(vec![3, 0, 0, 80], 2)];
    for &(bad, pos) in BAD_NAMES.iter().chain(with_nul) {
        let len = u8::try_from(bad.len()).unwrap_or(u8::MAX);
        all.push(([&[3, len], bad, &[0, 80]].concat(), 2 + pos + 1));
    }
    all
}
