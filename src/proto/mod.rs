//! Sans-IO protocol layer: bytes in, values and bytes out.
//!
//! Nothing in this module touches a socket, a clock or a logger, so every parser can be unit-tested, fuzzed and
//! replayed from a corpus on the stable toolchain. Parsers take the bytes received so far and return
//! [`Parse::Incomplete`] while those bytes are a valid prefix, [`Parse::Done`] with the number of bytes consumed once a
//! message is complete, and an error as soon as the prefix cannot become valid. They never look past the message
//! they parse: bytes after it belong to the next message (or are tunnel payload).
//!
//! Encoders write into a caller-supplied `&mut [u8]` and return the number of bytes written.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

// Shared by the parsers' unit tests; defined before the modules so they are in scope there.
/// Test helper: feeds every strict prefix (must be Incomplete), the whole message (Done, full length), the message followed
/// by `next` (Done, stops at the first message) and the message followed by junk.
#[cfg(test)]
macro_rules! check_valid {
    ($parse:expr, $msg:expr, $expected:expr, $next:expr) => {{
        let msg: &[u8] = $msg;
        for k in 0..msg.len() {
            assert_eq!(
                $parse(&msg[..k]),
                Ok(Parse::Incomplete),
                "prefix {k} of {msg:?}"
            );
        }
        assert_eq!($parse(msg), Ok(Parse::Done($expected, msg.len())));
        let mut joined = msg.to_vec();
        joined.extend_from_slice($next);
        assert_eq!($parse(&joined[..]), Ok(Parse::Done($expected, msg.len())));
        let mut junk = msg.to_vec();
        junk.extend_from_slice(&[0xff; 600]);
        assert_eq!($parse(&junk[..]), Ok(Parse::Done($expected, msg.len())));
    }};
}

/// The error must appear exactly once the first `at` bytes are in, and stay for every longer prefix.
#[cfg(test)]
macro_rules! check_err {
    ($parse:expr, $msg:expr, $err:expr, $at:expr) => {{
        let msg: &[u8] = $msg;
        for k in 0..$at {
            assert_eq!(
                $parse(&msg[..k]),
                Ok(Parse::Incomplete),
                "prefix {k} of {msg:?}"
            );
        }
        for k in $at..=msg.len() {
            assert_eq!($parse(&msg[..k]), Err($err), "prefix {k} of {msg:?}");
        }
    }};
}

/// For each row `(template, index, values, err)`: every value put at byte `index` of `template` is rejected with
/// `err(value)` from the moment that byte is in (`check_err!` at `index + 1`).
#[cfg(test)]
macro_rules! check_bad_bytes {
    ($parse:expr, $(($template:expr, $index:expr, $values:expr, $err:expr)),+ $(,)?) => {{
        $(
            for v in $values {
                let mut msg = $template.to_vec();
                msg[$index] = v;
                check_err!($parse, &msg, $err(v), $index + 1);
            }
        )+
    }};
}

/// `ROUNDS` random inputs (`testutil::Rng::fill` from `$seed`, each starting with a prefix of the next of
/// `$shapes` in turn, filler from `$alphabet`) through `check_contract!` for every parser listed.
#[cfg(test)]
macro_rules! fuzz_contract {
    ($seed:expr, $shapes:expr, $alphabet:expr, $($parse:expr),+ $(,)?) => {{
        let mut rng = $crate::proto::testutil::Rng($seed);
        let mut store = [0u8; $crate::proto::testutil::FILL_LEN];
        let shapes: &[&[u8]] = &$shapes;
        for i in 0..$crate::proto::testutil::ROUNDS {
            let shape = shapes.get(i % shapes.len()).copied().unwrap_or(&[]);
            let buf = rng.fill(&mut store, shape, $alphabet).to_vec();
            $(check_contract!($parse, &buf, rng);)+
        }
    }};
}

/// Checks the sans-IO contract on `buf` and a random prefix of it: Done never overruns and does not depend on
/// later bytes, and once a prefix is Done or an error, every longer input gives the same answer.
#[cfg(test)]
macro_rules! check_contract {
    ($parse:expr, $buf:expr, $rng:expr) => {{
        let buf: &[u8] = $buf;
        let whole = $parse(buf);
        if let Ok(Parse::Done(v, n)) = &whole {
            assert!(*n > 0 && *n <= buf.len());
            assert_eq!($parse(&buf[..*n]), Ok(Parse::Done(v.clone(), *n)));
            assert_eq!($parse(&buf[..*n - 1]), Ok(Parse::Incomplete));
        }
        let k = $rng.below(buf.len() + 1);
        match $parse(&buf[..k]) {
            Ok(Parse::Incomplete) => {}
            prefix => assert_eq!(prefix, whole, "prefix {k} of {buf:?}"),
        }
    }};
}

/// Returns `Ok(Parse::Incomplete)` from the enclosing parser when a read ran out of bytes (the parsers of
/// socks4, socks5 and upstream; defined before those modules so that they see it).
macro_rules! need {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok($crate::proto::Parse::Incomplete),
        }
    };
}

pub mod base64;
pub mod detect;
pub mod http;
pub mod proxy_protocol;
pub mod server;
pub mod socks4;
pub mod socks5;
#[cfg(test)]
#[allow(clippy::indexing_slicing)]
pub(crate) mod testutil;
pub mod upstream;

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The outcome of feeding bytes to a parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse<T> {
    /// The bytes so far are a valid prefix; call again with more.
    Incomplete,
    /// A complete message and the number of input bytes it occupied.
    Done(T, usize),
}

impl<T> Parse<T> {
    /// The same outcome with `f` applied to a complete message; the byte count is kept.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Parse<U> {
        match self {
            Parse::Done(v, n) => Parse::Done(f(v), n),
            Parse::Incomplete => Parse::Incomplete,
        }
    }
}

/// A DNS name held inline (no allocation): at most 255 bytes, as in SOCKS5 and SOCKS4a.
#[derive(Clone, PartialEq, Eq)]
pub struct Name {
    len: u8,
    bytes: [u8; 255],
}

impl Name {
    /// Builds a name from raw bytes; `None` when empty, longer than 255 bytes, or not a plausible host name
    /// (control characters, spaces, NUL or non-ASCII bytes).
    pub fn new(raw: &[u8]) -> Option<Name> {
        if raw.is_empty() || raw.len() > 255 {
            return None;
        }
        if !raw
            .iter()
            .all(|&b| b.is_ascii_graphic() && b != b'/' && b != b'\\')
        {
            return None;
        }
        let mut bytes = [0u8; 255];
        bytes.get_mut(..raw.len())?.copy_from_slice(raw);
        Some(Name {
            len: raw.len() as u8,
            bytes,
        })
    }

    /// The name as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len as usize).unwrap_or(&[])
    }

    /// The name as text (always ASCII by construction).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a client asked to go.
// The name is inline on purpose (parsers never allocate), so the variants differ in size by design.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetAddr {
    /// A literal address.
    Ip(SocketAddr),
    /// A name to resolve, and a port.
    Domain(Name, u16),
}

impl TargetAddr {
    /// The destination port.
    pub fn port(&self) -> u16 {
        match self {
            TargetAddr::Ip(a) => a.port(),
            TargetAddr::Domain(_, p) => *p,
        }
    }
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetAddr::Ip(a) => write!(f, "{a}"),
            TargetAddr::Domain(n, p) => write!(f, "{n}:{p}"),
        }
    }
}

/// Why a request could not be served. One table maps each failure onto every protocol's wire reply, so SOCKS5,
/// SOCKS4 and HTTP never disagree about what an error means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Anything without a better code (SOCKS5 0x01).
    General,
    /// Refused by policy: ACL, authentication, limits (0x02).
    NotAllowed,
    /// ENETUNREACH (0x03).
    NetworkUnreachable,
    /// EHOSTUNREACH or a name that does not resolve (0x04).
    HostUnreachable,
    /// ECONNREFUSED (0x05).
    ConnectionRefused,
    /// The connect attempt timed out (0x06, "TTL expired", as microsocks and Dante report timeouts).
    TimedOut,
    /// Unknown or disabled command (0x07).
    CommandNotSupported,
    /// Unknown address type (0x08).
    AddressNotSupported,
}

impl Failure {
    /// RFC 1928 §6 REP field.
    pub fn socks5_reply(self) -> u8 {
        match self {
            Failure::General => 0x01,
            Failure::NotAllowed => 0x02,
            Failure::NetworkUnreachable => 0x03,
            Failure::HostUnreachable => 0x04,
            Failure::ConnectionRefused => 0x05,
            Failure::TimedOut => 0x06,
            Failure::CommandNotSupported => 0x07,
            Failure::AddressNotSupported => 0x08,
        }
    }

    /// SOCKS4 CD field: every failure is 91 ("request rejected or failed").
    pub fn socks4_reply(self) -> u8 {
        91
    }

    /// HTTP status for a proxy-side failure (RFC 9110 §15).
    pub fn http_status(self) -> u16 {
        match self {
            Failure::NotAllowed => 403,
            Failure::TimedOut => 504,
            Failure::CommandNotSupported => 405,
            // A target that is not a valid host name is the client's bad request (RFC 9110 §15.5.1).
            Failure::AddressNotSupported => 400,
            Failure::General => 502,
            Failure::NetworkUnreachable | Failure::HostUnreachable | Failure::ConnectionRefused => {
                502
            }
        }
    }

    /// A short lowercase label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Failure::General => "general",
            Failure::NotAllowed => "not_allowed",
            Failure::NetworkUnreachable => "net_unreachable",
            Failure::HostUnreachable => "host_unreachable",
            Failure::ConnectionRefused => "refused",
            Failure::TimedOut => "timeout",
            Failure::CommandNotSupported => "bad_command",
            Failure::AddressNotSupported => "bad_address_type",
        }
    }
}

/// A malformed message from a peer. Each variant says what was wrong; [`ProtoError::failure`] says what to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    /// The version byte is not the one this parser speaks.
    BadVersion(u8),
    /// A SOCKS5 greeting offered zero methods.
    NoMethods,
    /// Unknown command code.
    BadCommand(u8),
    /// Unknown address type.
    BadAddressType(u8),
    /// A reserved byte that must be zero was not.
    BadReserved,
    /// A zero-length, over-long or non-ASCII host name.
    BadName,
    /// A zero-length username, or an over-long string field.
    BadField,
    /// A field longer than our cap (SOCKS4 USERID, SOCKS4a domain).
    TooLong,
    /// A request head larger than the configured limit (HTTP 431).
    HeadTooLarge,
    /// A syntactically invalid message (HTTP 400).
    Malformed,
    /// Ambiguous message framing (Content-Length with Transfer-Encoding, differing Content-Lengths).
    Smuggling,
}

impl ProtoError {
    /// The failure to report to the client for this error.
    pub fn failure(self) -> Failure {
        match self {
            ProtoError::BadCommand(_) => Failure::CommandNotSupported,
            ProtoError::BadAddressType(_) => Failure::AddressNotSupported,
            _ => Failure::General,
        }
    }

    /// The HTTP status for this error.
    pub fn http_status(self) -> u16 {
        match self {
            ProtoError::HeadTooLarge => 431,
            _ => 400,
        }
    }
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::BadVersion(v) => write!(f, "unsupported version byte {v:#04x}"),
            ProtoError::NoMethods => f.write_str("greeting offers no methods"),
            ProtoError::BadCommand(c) => write!(f, "unsupported command {c:#04x}"),
            ProtoError::BadAddressType(a) => write!(f, "unsupported address type {a:#04x}"),
            ProtoError::BadReserved => f.write_str("reserved byte is not zero"),
            ProtoError::BadName => f.write_str("invalid host name"),
            ProtoError::BadField => f.write_str("invalid length field"),
            ProtoError::TooLong => f.write_str("field exceeds limit"),
            ProtoError::HeadTooLarge => f.write_str("request head exceeds limit"),
            ProtoError::Malformed => f.write_str("malformed message"),
            ProtoError::Smuggling => f.write_str("ambiguous message framing"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// Maps an IPv4-mapped IPv6 address back to IPv4, so replies and ACLs see one form of each address.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// A cursor over untrusted bytes: every read is bounds-checked and reports "need more" instead of panicking.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Takes `n` bytes, or `None` when fewer remain.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    /// Takes one byte.
    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).and_then(|s| s.first().copied())
    }

    /// Takes a VER byte: `Ok(None)` until it arrives, `BadVersion` as soon as it is not one of `accepted`.
    pub fn version(&mut self, accepted: &[u8]) -> Result<Option<()>, ProtoError> {
        match self.u8() {
            Some(v) if !accepted.contains(&v) => Err(ProtoError::BadVersion(v)),
            v => Ok(v.map(|_| ())),
        }
    }

    /// Takes a big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        let s = self.take(2)?;
        Some(u16::from_be_bytes([*s.first()?, *s.get(1)?]))
    }

    /// Takes a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Some(a)
    }
}

/// A writer over a caller-supplied buffer; writing past the end is reported, never a panic.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
    overflow: bool,
}

impl<'a> Writer<'a> {
    /// Starts writing at the beginning of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Writer<'a> {
        Writer {
            buf,
            pos: 0,
            overflow: false,
        }
    }

    /// Appends bytes; on overflow nothing more is written and [`Writer::finish`] reports it.
    pub fn put(&mut self, bytes: &[u8]) -> &mut Self {
        if self.overflow {
            return self;
        }
        let end = self.pos.saturating_add(bytes.len());
        match self.buf.get_mut(self.pos..end) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.pos = end;
            }
            None => self.overflow = true,
        }
        self
    }

    /// Appends one byte.
    pub fn u8(&mut self, b: u8) -> &mut Self {
        self.put(&[b])
    }

    /// Appends a big-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.put(&v.to_be_bytes())
    }

    /// Bytes written, or `None` if the buffer was too small.
    pub fn finish(&self) -> Option<usize> {
        (!self.overflow).then_some(self.pos)
    }
}

impl fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.put(s.as_bytes());
        if self.overflow {
            Err(fmt::Error)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_rejects_empty_long_and_control() {
        assert!(Name::new(b"").is_none());
        assert!(Name::new(&[b'a'; 256]).is_none());
        assert!(Name::new(b"a b").is_none());
        assert!(Name::new(b"a\0b").is_none());
        assert_eq!(
            Name::new(&[b'a'; 255]).map(|n| n.as_bytes().len()),
            Some(255)
        );
        assert_eq!(
            Name::new(b"localhost").map(|n| n.to_string()),
            Some("localhost".into())
        );
    }

    #[test]
    fn reader_never_overruns() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16(), Some(0x0102));
        assert_eq!(r.u16(), None);
        assert_eq!(r.u8(), Some(3));
        assert_eq!(r.take(usize::MAX), None);
    }

    #[test]
    fn writer_reports_overflow() {
        let mut b = [0u8; 3];
        let mut w = Writer::new(&mut b);
        w.u16(7).u16(8);
        assert_eq!(w.finish(), None);
        let mut w = Writer::new(&mut b);
        w.u8(1).u16(2);
        assert_eq!(w.finish(), Some(3));
    }

    #[test]
    fn mapped_ipv4_is_canonical() {
        let ip: IpAddr = "::ffff:10.1.2.3"
            .parse()
            .unwrap_or(IpAddr::V4([0; 4].into()));
        assert_eq!(canonical_ip(ip), "10.1.2.3".parse::<IpAddr>().unwrap_or(ip));
    }
}
