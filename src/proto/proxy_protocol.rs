//! HAProxy PROXY protocol, versions 1 and 2, receiving side (haproxy `doc/proxy-protocol.txt`).
//!
//! A load balancer in front of the gateway prepends one header to each connection carrying the real client
//! address. [`parse`] reads that header from the first bytes of a connection and reports how many bytes it
//! occupied; everything after it is the client's own first protocol message and is left alone.
//!
//! The version is decided from the first bytes (spec §2: "the receiver ... must not try to guess"): a connection
//! whose first bytes are neither a prefix of `"PROXY "` nor of the v2 signature is refused at once, because a
//! listener configured for the PROXY protocol must never fall back to trusting the socket peer for a client that
//! simply omitted the header (spec §7, security considerations).
//!
//! [`encode_v1`] and [`encode_v2`] produce headers for sending upstream and for tests.

use super::{canonical_ip, Parse, ProtoError, Reader, Writer};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest v1 header including the CRLF (spec §2.1: "a 107-byte buffer" is always enough).
pub const MAX_V1_LEN: usize = 107;

/// Longest v2 header: 16 fixed bytes plus a 16-bit length (spec §2.2), so callers can size their buffers.
pub const MAX_V2_LEN: usize = V2_FIXED_LEN + u16::MAX as usize;

/// What the PROXY header said about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The proxied connection's original source and destination (v1 TCP4/TCP6, v2 PROXY over IPv4/IPv6).
    Proxy {
        /// The original client address.
        src: SocketAddr,
        /// The address the client connected to.
        dst: SocketAddr,
    },
    /// No usable addresses (v2 LOCAL, v1 UNKNOWN, v2 UNSPEC or UNIX): the caller uses the real socket addresses.
    Local,
}

/// v1 header start (spec §2.1): the protocol word and exactly one space.
const V1_PREFIX: &[u8] = b"PROXY ";

/// v2 signature (spec §2.2): chosen so that it can never be the start of a valid v1 header or of any common
/// protocol (it contains a NUL and a bare "QUIT\n").
const V2_SIG: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// Signature, version/command, family/transport and a 2-byte length (spec §2.2).
const V2_FIXED_LEN: usize = 16;

/// v2 command nibble LOCAL: health checks and the proxy's own connections (spec §2.2).
const CMD_LOCAL: u8 = 0x0;
/// v2 command nibble PROXY: a relayed client connection (spec §2.2).
const CMD_PROXY: u8 = 0x1;

/// Parses a PROXY protocol header (v1 or v2) from the start of `buf`.
///
/// Returns [`Parse::Incomplete`] while `buf` is a valid prefix, [`Parse::Done`] with the header length once
/// complete (bytes after it belong to the client), and [`ProtoError::Malformed`] as soon as the bytes cannot
/// become a valid header. A malformed prefix stays malformed whatever follows, so callers may stop reading.
pub fn parse(buf: &[u8]) -> Result<Parse<ProxyHeader>, ProtoError> {
    // The two starts differ in their first byte ('P' vs CR), so at most one of these can match.
    if buf.starts_with(V1_PREFIX) {
        return parse_v1(buf);
    }
    if buf.starts_with(&V2_SIG) {
        return parse_v2(buf);
    }
    if V1_PREFIX.starts_with(buf) || V2_SIG.starts_with(buf) {
        // Also covers the empty buffer: nothing has been ruled out yet.
        return Ok(Parse::Incomplete);
    }
    Err(ProtoError::Malformed)
}

/// v1 (spec §2.1): one text line of at most 107 bytes ending in CRLF; `buf` starts with `"PROXY "`.
fn parse_v1(buf: &[u8]) -> Result<Parse<ProxyHeader>, ProtoError> {
    // Only the first 107 bytes can hold the header, so never scan further: the receiver "must not try to
    // read more than 107 bytes" and a line that has not ended by then is invalid (spec §2.1).
    let window = buf.get(..MAX_V1_LEN).unwrap_or(buf);
    let Some(eol) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        if buf.len() >= MAX_V1_LEN {
            return Err(ProtoError::Malformed);
        }
        check_v1_prefix(buf.get(V1_PREFIX.len()..).unwrap_or(&[]))?;
        return Ok(Parse::Incomplete);
    };
    // The line ends with CRLF only; a bare LF or a CR followed by anything else is not a v1 header.
    if window.get(eol) != Some(&b'\r') {
        return Err(ProtoError::Malformed);
    }
    let end = eol.saturating_add(2);
    if end > MAX_V1_LEN {
        // The CR is the 107th byte, so the LF would be the 108th: too long.
        return Err(ProtoError::Malformed);
    }
    let line = buf.get(V1_PREFIX.len()..eol).ok_or(ProtoError::Malformed)?;
    match buf.get(eol.saturating_add(1)) {
        None => {
            check_v1_prefix(line)?;
            Ok(Parse::Incomplete)
        }
        Some(b'\n') => Ok(Parse::Done(parse_v1_line(line)?, end)),
        Some(_) => Err(ProtoError::Malformed),
    }
}

/// Parses the text between `"PROXY "` and CRLF.
fn parse_v1_line(line: &[u8]) -> Result<ProxyHeader, ProtoError> {
    // "UNKNOWN": "the receiver must ignore anything presented before the CRLF is found" (spec §2.1).
    if line.starts_with(b"UNKNOWN") {
        return Ok(ProxyHeader::Local);
    }
    // Exactly one space between fields (spec §2.1), so splitting on each space yields an empty field, and thus an
    // error, for doubled, leading or trailing spaces.
    let mut fields = line.split(|&b| b == b' ');
    let proto = fields.next().ok_or(ProtoError::Malformed)?;
    let src = fields.next().ok_or(ProtoError::Malformed)?;
    let dst = fields.next().ok_or(ProtoError::Malformed)?;
    let sport = v1_port(fields.next().ok_or(ProtoError::Malformed)?)?;
    let dport = v1_port(fields.next().ok_or(ProtoError::Malformed)?)?;
    if fields.next().is_some() {
        return Err(ProtoError::Malformed);
    }
    let (src, dst) = match proto {
        b"TCP4" => (
            IpAddr::V4(v1_text::<Ipv4Addr>(src)?),
            IpAddr::V4(v1_text::<Ipv4Addr>(dst)?),
        ),
        b"TCP6" => (
            IpAddr::V6(v1_text::<Ipv6Addr>(src)?),
            IpAddr::V6(v1_text::<Ipv6Addr>(dst)?),
        ),
        _ => return Err(ProtoError::Malformed),
    };
    Ok(ProxyHeader::Proxy {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
    })
}

/// Parses an address of the family named by the protocol word. The standard library's parsers match the spec's
/// canonical forms: IPv4 is four decimal octets without leading zeros (spec §2.1 forbids them to avoid octal
/// confusion, and `Ipv4Addr` rejects them), IPv6 is hex groups with at most one "::".
fn v1_text<T: std::str::FromStr>(field: &[u8]) -> Result<T, ProtoError> {
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ProtoError::Malformed)
}

/// A v1 port: decimal 0..=65535 without leading zeros (spec §2.1), so each port has exactly one spelling.
fn v1_port(field: &[u8]) -> Result<u16, ProtoError> {
    let digits_ok = !field.is_empty()
        && field.len() <= 5
        && field.iter().all(u8::is_ascii_digit)
        && (field.len() == 1 || field.first() != Some(&b'0'));
    if !digits_ok {
        return Err(ProtoError::Malformed);
    }
    v1_text::<u16>(field)
}

/// Rejects an unfinished v1 line early when no ending can make it valid, so a client that is not a PROXY sender
/// is dropped at once instead of holding the slot until the header timeout. `rest` follows `"PROXY "` and holds
/// no CR or LF. Every prefix of a valid line passes (the tests check this property).
fn check_v1_prefix(rest: &[u8]) -> Result<(), ProtoError> {
    const UNKNOWN: &[u8] = b"UNKNOWN";
    if rest.starts_with(UNKNOWN) || UNKNOWN.starts_with(rest) {
        return Ok(());
    }
    for (proto, v6) in [(b"TCP4 ", false), (b"TCP6 ", true)] {
        if proto.starts_with(rest) {
            return Ok(());
        }
        let Some(fields) = rest.strip_prefix(proto) else {
            continue;
        };
        // Four fields, single spaces, and only the characters addresses and ports are written with.
        let mut spaces = 0u8;
        let mut after_space = true;
        for &b in fields {
            if b == b' ' {
                if after_space || spaces == 3 {
                    return Err(ProtoError::Malformed);
                }
                spaces += 1;
                after_space = true;
            } else if b.is_ascii_digit()
                || b == b'.'
                || (v6 && (b.is_ascii_hexdigit() || b == b':'))
            {
                after_space = false;
            } else {
                return Err(ProtoError::Malformed);
            }
        }
        return Ok(());
    }
    Err(ProtoError::Malformed)
}

/// v2 (spec §2.2): a 16-byte binary prefix and `len` bytes of addresses and TLVs; `buf` starts with the signature.
fn parse_v2(buf: &[u8]) -> Result<Parse<ProxyHeader>, ProtoError> {
    let mut r = Reader::new(buf);
    if r.take(V2_SIG.len()).is_none() {
        return Ok(Parse::Incomplete);
    }
    // Each fixed byte is checked as soon as it arrives so a bad header is refused without waiting for the rest.
    let Some(ver_cmd) = r.u8() else {
        return Ok(Parse::Incomplete);
    };
    // High nibble: version, "must always be \x2" (spec §2.2). Low nibble: LOCAL or PROXY; "other values are
    // unassigned and must not be emitted by senders. Receivers must drop connections presenting unexpected values".
    let cmd = ver_cmd & 0x0F;
    if ver_cmd >> 4 != 0x2 || (cmd != CMD_LOCAL && cmd != CMD_PROXY) {
        return Err(ProtoError::Malformed);
    }
    let Some(fam) = r.u8() else {
        return Ok(Parse::Incomplete);
    };
    // Address block sizes per family (spec §2.2): IPv4 4+4+2+2, IPv6 16+16+2+2, UNIX 108+108. Transport
    // nibble 1 is STREAM (TCP), 2 is DGRAM (UDP); UNSPEC carries no addresses. Anything else is unassigned.
    let addr_len: usize = match fam {
        0x00 => 0,
        0x11 | 0x12 => 12,
        0x21 | 0x22 => 36,
        0x31 | 0x32 => 216,
        _ => return Err(ProtoError::Malformed),
    };
    let Some(len) = r.u16() else {
        return Ok(Parse::Incomplete);
    };
    let len = usize::from(len);
    // For PROXY the addresses must fit in the announced length; known as soon as the length is read.
    if cmd == CMD_PROXY && len < addr_len {
        return Err(ProtoError::Malformed);
    }
    let Some(block) = r.take(len) else {
        return Ok(Parse::Incomplete);
    };
    // Always consume the whole announced block, LOCAL included, so the client's bytes start right after it.
    let consumed = r.pos();
    if cmd == CMD_LOCAL || fam == 0x00 {
        // LOCAL: "the receiver must accept this connection as valid and must use the real connection endpoints
        // and discard the protocol block including the family which is ignored". UNSPEC: "the receiver ... must
        // ignore address information" (spec §2.2). Neither block is interpreted.
        return Ok(Parse::Done(ProxyHeader::Local, consumed));
    }
    let (addrs, tlvs) = block
        .split_at_checked(addr_len)
        .ok_or(ProtoError::Malformed)?;
    check_tlvs(tlvs)?;
    let mut a = Reader::new(addrs);
    let header = match fam >> 4 {
        0x1 => addresses::<4>(&mut a)?,
        0x2 => addresses::<16>(&mut a)?,
        // AF_UNIX paths are no socket address we can use: treat like LOCAL.
        _ => ProxyHeader::Local,
    };
    Ok(Parse::Done(header, consumed))
}

/// The address block of an AF_INET (`N` = 4) or AF_INET6 (`N` = 16) header: source and destination addresses,
/// then their ports (spec §2.2).
fn addresses<const N: usize>(a: &mut Reader<'_>) -> Result<ProxyHeader, ProtoError>
where
    IpAddr: From<[u8; N]>,
{
    let src = IpAddr::from(a.array::<N>().ok_or(ProtoError::Malformed)?);
    let dst = IpAddr::from(a.array::<N>().ok_or(ProtoError::Malformed)?);
    let (sport, dport) = ports(a)?;
    Ok(ProxyHeader::Proxy {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
    })
}

/// Source then destination port, network byte order (spec §2.2).
fn ports(a: &mut Reader<'_>) -> Result<(u16, u16), ProtoError> {
    let sport = a.u16().ok_or(ProtoError::Malformed)?;
    let dport = a.u16().ok_or(ProtoError::Malformed)?;
    Ok((sport, dport))
}

/// Walks the TLV vectors after the addresses (spec §2.2.1: type u8, length u16 big-endian, value). They must tile
/// the remaining bytes exactly; a truncated TLV means the sender and we disagree about framing. Values are ignored:
/// none of them (ALPN, AUTHORITY, CRC32C, NOOP, UNIQUE_ID, SSL, NETNS) changes how we serve the client.
fn check_tlvs(tlvs: &[u8]) -> Result<(), ProtoError> {
    let mut r = Reader::new(tlvs);
    while r.pos() < tlvs.len() {
        let _kind = r.u8().ok_or(ProtoError::Malformed)?;
        let len = r.u16().ok_or(ProtoError::Malformed)?;
        r.take(usize::from(len)).ok_or(ProtoError::Malformed)?;
    }
    Ok(())
}

/// Writes a v1 header for `src` -> `dst` into `out` and returns its length (0 when `out` is too small; 107 bytes
/// always suffice). IPv4-mapped IPv6 addresses are written as IPv4, so a dual-stack listener's mapped client
/// address still pairs with an IPv4 destination; families that still differ produce `"PROXY UNKNOWN\r\n"`, as v1
/// has no mixed form (spec §2.1).
pub fn encode_v1(src: SocketAddr, dst: SocketAddr, out: &mut [u8]) -> usize {
    let (s, d) = (canonical_ip(src.ip()), canonical_ip(dst.ip()));
    let (sp, dp) = (src.port(), dst.port());
    let mut w = Writer::new(out);
    let written = match (s, d) {
        (IpAddr::V4(_), IpAddr::V4(_)) => write!(w, "PROXY TCP4 {s} {d} {sp} {dp}\r\n"),
        (IpAddr::V6(_), IpAddr::V6(_)) => write!(w, "PROXY TCP6 {s} {d} {sp} {dp}\r\n"),
        _ => w.write_str("PROXY UNKNOWN\r\n"),
    };
    match (written, w.finish()) {
        (Ok(()), Some(n)) => n,
        _ => 0,
    }
}

/// Writes a v2 header with the given TLVs (type, value) into `out` and returns its length (0 when `out` is too
/// small or the block would exceed 65535 bytes). `Proxy` is sent as TCP over IPv4 when both addresses are IPv4
/// (after unmapping IPv4-mapped IPv6), otherwise as TCP over IPv6 with IPv4 addresses mapped; `Local` is sent as
/// LOCAL/UNSPEC with the TLVs only.
pub fn encode_v2(header: &ProxyHeader, tlvs: &[(u8, &[u8])], out: &mut [u8]) -> usize {
    let mut tlv_len = 0usize;
    for (_, value) in tlvs {
        if value.len() > usize::from(u16::MAX) {
            return 0;
        }
        tlv_len = tlv_len.saturating_add(3).saturating_add(value.len());
    }
    // (command, family, addresses) with the address block already laid out in wire order.
    let mut addrs = [0u8; 36];
    let (cmd, fam, addr_len) = match *header {
        ProxyHeader::Local => (CMD_LOCAL, 0x00, 0),
        ProxyHeader::Proxy { src, dst } => {
            let mut a = Writer::new(&mut addrs);
            let fam = match (canonical_ip(src.ip()), canonical_ip(dst.ip())) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    a.put(&s.octets()).put(&d.octets());
                    0x11
                }
                (s, d) => {
                    a.put(&v6(s).octets()).put(&v6(d).octets());
                    0x21
                }
            };
            a.u16(src.port()).u16(dst.port());
            match a.finish() {
                Some(n) => (CMD_PROXY, fam, n),
                None => return 0,
            }
        }
    };
    let Ok(len) = u16::try_from(addr_len.saturating_add(tlv_len)) else {
        return 0;
    };
    let mut w = Writer::new(out);
    w.put(&V2_SIG).u8(0x20 | cmd).u8(fam).u16(len);
    w.put(addrs.get(..addr_len).unwrap_or(&[]));
    for (kind, value) in tlvs {
        // Length checked above, so the conversion cannot fail; 0 keeps this path panic-free regardless.
        w.u8(*kind)
            .u16(u16::try_from(value.len()).unwrap_or(0))
            .put(value);
    }
    w.finish().unwrap_or(0)
}

/// IPv4 becomes IPv4-mapped IPv6 (RFC 4291 §2.5.5.2), so mixed families still fit one v2 address block.
fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)] // a failing test should panic
mod tests {
    use super::*;

    const TLV_ALPN: u8 = 0x01;
    const TLV_AUTHORITY: u8 = 0x02;
    const TLV_NOOP: u8 = 0x04;
    const TLV_UNIQUE_ID: u8 = 0x05;
    const TLV_SSL: u8 = 0x20;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn proxy(src: &str, dst: &str) -> ProxyHeader {
        ProxyHeader::Proxy {
            src: sa(src),
            dst: sa(dst),
        }
    }

    /// Every strict prefix is Incomplete, the whole header is Done, and trailing client bytes are not consumed.
    fn check_valid(header: &[u8], expected: ProxyHeader) {
        for k in 0..header.len() {
            assert_eq!(
                parse(&header[..k]),
                Ok(Parse::Incomplete),
                "prefix of {k} bytes of {header:?}"
            );
        }
        assert_eq!(parse(header), Ok(Parse::Done(expected, header.len())));
        let mut joined = header.to_vec();
        joined.extend_from_slice(b"\x05\x01\x00GET / HTTP/1.1\r\n\r\n");
        assert_eq!(parse(&joined), Ok(Parse::Done(expected, header.len())));
    }

    fn malformed(buf: &[u8]) {
        assert_eq!(parse(buf), Err(ProtoError::Malformed), "{buf:?}");
    }

    /// Builds a v2 header by hand, independent of `encode_v2`.
    fn v2(ver_cmd: u8, fam: u8, len: u16, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIG.to_vec();
        v.push(ver_cmd);
        v.push(fam);
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn v4_block() -> Vec<u8> {
        vec![192, 0, 2, 1, 198, 51, 100, 7, 0xC3, 0x50, 0x01, 0xBB]
    }

    fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&(value.len() as u16).to_be_bytes());
        v.extend_from_slice(value);
        v
    }

    #[test]
    fn v1_tcp4() {
        check_valid(
            b"PROXY TCP4 192.0.2.1 198.51.100.7 50000 443\r\n",
            proxy("192.0.2.1:50000", "198.51.100.7:443"),
        );
        check_valid(
            b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
            proxy("0.0.0.0:0", "255.255.255.255:65535"),
        );
    }

    #[test]
    fn v1_tcp6() {
        check_valid(
            b"PROXY TCP6 2001:db8::1 2001:DB8::2 1 65535\r\n",
            proxy("[2001:db8::1]:1", "[2001:db8::2]:65535"),
        );
        check_valid(
            b"PROXY TCP6 ::ffff:192.0.2.1 :: 10 20\r\n",
            proxy("[::ffff:192.0.2.1]:10", "[::]:20"),
        );
        let longest = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(longest.len(), 104);
        check_valid(
            longest,
            proxy(
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            ),
        );
    }

    #[test]
    fn v1_unknown() {
        check_valid(b"PROXY UNKNOWN\r\n", ProxyHeader::Local);
        check_valid(
            b"PROXY UNKNOWN 192.0.2.1 198.51.100.7 1 2\r\n",
            ProxyHeader::Local,
        );
        // The spec's worst case is exactly 107 bytes.
        let worst = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(worst.len(), MAX_V1_LEN);
        check_valid(worst, ProxyHeader::Local);
        // Anything but CR/LF may follow UNKNOWN.
        check_valid(b"PROXY UNKNOWN\x01\x7f\xff  x\r\n", ProxyHeader::Local);
    }

    #[test]
    fn v1_length_limit() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(MAX_V1_LEN - 2, b'x');
        line.extend_from_slice(b"\r\n");
        check_valid(&line, ProxyHeader::Local);

        // 107 bytes with no CRLF: refused as soon as the 107th byte is there, not before.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(MAX_V1_LEN - 1, b'x');
        assert_eq!(parse(&long), Ok(Parse::Incomplete));
        long.push(b'x');
        malformed(&long);
        long.extend_from_slice(b"\r\n");
        malformed(&long);

        // CR as the 107th byte: the LF would be the 108th.
        let mut cr_late = b"PROXY UNKNOWN ".to_vec();
        cr_late.resize(MAX_V1_LEN - 1, b'x');
        cr_late.push(b'\r');
        malformed(&cr_late);
        cr_late.push(b'\n');
        malformed(&cr_late);

        let mut tcp4 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2".to_vec();
        tcp4.resize(MAX_V1_LEN, b'0');
        malformed(&tcp4);
    }

    #[test]
    fn v1_malformed() {
        let cases: &[&[u8]] = &[
            b"PROXY TCP4 192.0.2.1 198.51.100.7 01 443\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.7 1 00\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.7 1 65536\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.7 1 99999\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.7 1 100000\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.7 1 +1\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.7 1 -1\r\n",
            b"PROXY TCP4 192.0.2.01 198.51.100.7 1 2\r\n",
            b"PROXY TCP4 192.0.2.256 198.51.100.7 1 2\r\n",
            b"PROXY TCP4 192.0.2 198.51.100.7 1 2\r\n",
            b"PROXY TCP4 ::1 198.51.100.7 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 ::ffff:198.51.100.7 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n",
            b"PROXY TCP6 ::1 ::1 1 2 \r\n",
            b"PROXY TCP6 ::1  ::1 1 2\r\n",
            b"PROXY TCP6 ::1 ::1 1\r\n",
            b"PROXY TCP6 ::1 ::1 1 2 3\r\n",
            b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
            b"PROXY TCP4  192.0.2.1 198.51.100.7 1 2\r\n",
            b"PROXY TCP5 192.0.2.1 198.51.100.7 1 2\r\n",
            b"PROXY tcp4 192.0.2.1 198.51.100.7 1 2\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.7 1 2\r\n",
            b"PROXY TCP4\r\n",
            b"PROXY \r\n",
            b"PROXY  TCP4 192.0.2.1 198.51.100.7 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\rX",
            b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\r\r\n",
            b"PROXY UNKNOWN\n",
            b"PROXY UNKNOWN\rx\r\n",
            b"PROXY\r\n",
            b"PROXYTCP4",
            b"proxy ",
            b"GET / HTTP/1.1\r\n\r\n",
            b"\x05\x01\x00",
            b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",
        ];
        for case in cases {
            malformed(case);
        }
    }

    #[test]
    fn v1_rejected_early() {
        // Decided before the line ends, so a non-PROXY client is not kept waiting for 107 bytes.
        malformed(b"PROXY X");
        malformed(b"PROXY TCP4 1.2.3.4 ::");
        malformed(b"PROXY TCP4 1.2.3.4  ");
        malformed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ");
        malformed(b"PROXY TCP6 ::1 ::1 g");
        malformed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n");
        malformed(b"P\x00");
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"),
            Ok(Parse::Incomplete)
        );
        assert_eq!(parse(b""), Ok(Parse::Incomplete));
        assert_eq!(parse(b"PRO"), Ok(Parse::Incomplete));
    }

    #[test]
    fn v2_proxy_ipv4() {
        let h = v2(0x21, 0x11, 12, &v4_block());
        check_valid(&h, proxy("192.0.2.1:50000", "198.51.100.7:443"));
        // UDP over IPv4 carries the same addresses.
        let h = v2(0x21, 0x12, 12, &v4_block());
        check_valid(&h, proxy("192.0.2.1:50000", "198.51.100.7:443"));
    }

    #[test]
    fn v2_proxy_ipv6() {
        let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let mut body = src.octets().to_vec();
        body.extend_from_slice(&dst.octets());
        body.extend_from_slice(&[0, 1, 0xFF, 0xFF]);
        for fam in [0x21, 0x22] {
            check_valid(
                &v2(0x21, fam, 36, &body),
                proxy("[2001:db8::1]:1", "[2001:db8::2]:65535"),
            );
        }
    }

    #[test]
    fn v2_local() {
        // Without addresses (what HAProxy sends for health checks).
        check_valid(&v2(0x20, 0x00, 0, &[]), ProxyHeader::Local);
        // With addresses: the whole block is consumed and ignored.
        check_valid(&v2(0x20, 0x11, 12, &v4_block()), ProxyHeader::Local);
        // LOCAL ignores the family, so a short block is fine.
        check_valid(&v2(0x20, 0x21, 3, b"abc"), ProxyHeader::Local);
        // LOCAL with TLV-like bytes that do not parse: discarded, not interpreted.
        check_valid(&v2(0x20, 0x00, 2, &[0xFF, 0xFF]), ProxyHeader::Local);
    }

    #[test]
    fn v2_unspec_and_unix_are_local() {
        check_valid(&v2(0x21, 0x00, 0, &[]), ProxyHeader::Local);
        check_valid(&v2(0x21, 0x00, 4, b"junk"), ProxyHeader::Local);
        let mut unix = vec![0u8; 216];
        unix[..9].copy_from_slice(b"/tmp/sock");
        check_valid(&v2(0x21, 0x31, 216, &unix), ProxyHeader::Local);
        check_valid(&v2(0x21, 0x32, 216, &unix), ProxyHeader::Local);
    }

    #[test]
    fn v2_tlvs() {
        let mut body = v4_block();
        body.extend(tlv(TLV_ALPN, b"h2"));
        body.extend(tlv(TLV_AUTHORITY, b"example.com"));
        body.extend(tlv(TLV_NOOP, &[]));
        body.extend(tlv(TLV_UNIQUE_ID, &[7; 32]));
        // PP2_TYPE_SSL: client flags, verify u32, then sub-TLVs (version).
        let mut ssl = vec![0x01, 0, 0, 0, 0];
        ssl.extend(tlv(0x21, b"TLSv1.3"));
        body.extend(tlv(TLV_SSL, &ssl));
        let h = v2(0x21, 0x11, body.len() as u16, &body);
        check_valid(&h, proxy("192.0.2.1:50000", "198.51.100.7:443"));
    }

    #[test]
    fn v2_malformed() {
        let good = v2(0x21, 0x11, 12, &v4_block());
        // Every signature byte matters.
        for i in 0..V2_SIG.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            malformed(&bad);
            malformed(&bad[..=i]);
        }
        for ver_cmd in [0x11, 0x31, 0x01, 0xF1, 0x22, 0x2F, 0x12] {
            malformed(&v2(ver_cmd, 0x11, 12, &v4_block()));
            malformed(&v2(ver_cmd, 0x11, 12, &v4_block())[..13]);
        }
        for fam in [0x01, 0x10, 0x13, 0x20, 0x23, 0x30, 0x33, 0x41, 0xFF] {
            malformed(&v2(0x21, fam, 12, &v4_block()));
            malformed(&v2(0x21, fam, 12, &v4_block())[..14]);
        }
        // Length smaller than the address block, decided from the fixed 16 bytes alone.
        malformed(&v2(0x21, 0x11, 11, &v4_block()[..11]));
        malformed(&v2(0x21, 0x11, 0, &[])[..16]);
        malformed(&v2(0x21, 0x21, 35, &[0; 35])[..16]);
        malformed(&v2(0x21, 0x31, 215, &[0; 215])[..16]);
        // TLVs that do not tile the remaining length.
        let mut body = v4_block();
        body.extend_from_slice(&[TLV_ALPN, 0, 5, b'h', b'2']);
        malformed(&v2(0x21, 0x11, body.len() as u16, &body));
        let mut body = v4_block();
        body.extend_from_slice(&[TLV_NOOP, 0]);
        malformed(&v2(0x21, 0x11, body.len() as u16, &body));
        let mut body = v4_block();
        body.push(TLV_NOOP);
        malformed(&v2(0x21, 0x11, body.len() as u16, &body));
    }

    #[test]
    fn v2_incomplete_until_whole_block() {
        let mut h = v2(0x21, 0x11, 12 + 65000, &v4_block());
        h.extend(tlv(TLV_NOOP, &vec![0; 64997]));
        assert_eq!(h.len(), 16 + 12 + 65000);
        assert_eq!(parse(&h[..h.len() - 1]), Ok(Parse::Incomplete));
        assert_eq!(
            parse(&h),
            Ok(Parse::Done(
                proxy("192.0.2.1:50000", "198.51.100.7:443"),
                h.len()
            ))
        );
        // The largest possible header.
        let mut max = v2(0x20, 0x00, u16::MAX, &[]);
        max.resize(MAX_V2_LEN, 0xAA);
        assert_eq!(parse(&max), Ok(Parse::Done(ProxyHeader::Local, MAX_V2_LEN)));
        assert_eq!(parse(&max[..MAX_V2_LEN - 1]), Ok(Parse::Incomplete));
    }

    #[test]
    fn encode_v1_round_trips() {
        let cases = [
            proxy("192.0.2.1:50000", "198.51.100.7:443"),
            proxy("0.0.0.0:0", "255.255.255.255:65535"),
            proxy("[2001:db8::1]:1", "[::1]:2"),
            proxy(
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            ),
        ];
        for case in cases {
            let ProxyHeader::Proxy { src, dst } = case else {
                unreachable!()
            };
            let mut out = [0u8; MAX_V1_LEN];
            let n = encode_v1(src, dst, &mut out);
            assert!(n > 0);
            check_valid(&out[..n], case);
        }
    }

    #[test]
    fn encode_v1_families() {
        let mut out = [0u8; MAX_V1_LEN];
        // A dual-stack listener's mapped client address pairs with an IPv4 destination.
        let n = encode_v1(sa("[::ffff:192.0.2.1]:5"), sa("198.51.100.7:80"), &mut out);
        assert_eq!(&out[..n], b"PROXY TCP4 192.0.2.1 198.51.100.7 5 80\r\n");
        let n = encode_v1(sa("192.0.2.1:5"), sa("[2001:db8::1]:80"), &mut out);
        assert_eq!(&out[..n], b"PROXY UNKNOWN\r\n");
        assert_eq!(parse(&out[..n]), Ok(Parse::Done(ProxyHeader::Local, n)));
        // Too small a buffer writes nothing useful and says so.
        let mut small = [0u8; 20];
        assert_eq!(
            encode_v1(sa("192.0.2.1:5"), sa("198.51.100.7:80"), &mut small),
            0
        );
    }

    #[test]
    fn encode_v2_round_trips() {
        let tlvs: &[(u8, &[u8])] = &[
            (TLV_ALPN, b"http/1.1"),
            (TLV_AUTHORITY, b"example.com"),
            (TLV_NOOP, b""),
            (TLV_UNIQUE_ID, &[9; 16]),
            (TLV_SSL, &[0, 0, 0, 0, 0]),
        ];
        let cases = [
            proxy("192.0.2.1:50000", "198.51.100.7:443"),
            proxy("[2001:db8::1]:1", "[::1]:65535"),
            ProxyHeader::Local,
        ];
        for case in cases {
            for t in [&[][..], tlvs] {
                let mut out = vec![0u8; 1024];
                let n = encode_v2(&case, t, &mut out);
                assert!(n >= 16);
                check_valid(&out[..n], case);
            }
        }
        let mut out = [0u8; 64];
        // Mixed families travel as IPv6 with the IPv4 side mapped; mapped-only pairs travel as IPv4.
        let n = encode_v2(&proxy("192.0.2.1:1", "[2001:db8::1]:2"), &[], &mut out);
        assert_eq!((n, out[13]), (16 + 36, 0x21));
        assert_eq!(
            parse(&out[..n]),
            Ok(Parse::Done(
                proxy("[::ffff:192.0.2.1]:1", "[2001:db8::1]:2"),
                n
            ))
        );
        let n = encode_v2(&proxy("[::ffff:192.0.2.1]:1", "192.0.2.2:2"), &[], &mut out);
        assert_eq!((n, out[13]), (16 + 12, 0x11));
        // Overflowing the buffer or the 16-bit length writes nothing.
        assert_eq!(encode_v2(&ProxyHeader::Local, &[], &mut out[..15]), 0);
        let big = vec![0u8; 65535];
        let mut huge = vec![0u8; MAX_V2_LEN + 16];
        assert_eq!(encode_v2(&ProxyHeader::Local, &[(1, &big)], &mut huge), 0);
        let fits = vec![0u8; 65532];
        assert_eq!(
            encode_v2(&ProxyHeader::Local, &[(1, &fits)], &mut huge),
            MAX_V2_LEN
        );
    }

    use crate::proto::testutil::{Rng, ROUNDS};

    /// Invariants that must hold for any input: no panic, consumption within the header, errors final, a
    /// result that does not depend on bytes after the header, and (when `prefixes`) every strict prefix of a
    /// complete header reported as Incomplete.
    /// Returns the outcome's index (0 Incomplete, 1 Done, 2 error) so the loops can check they reach every path.
    fn check_invariants(buf: &[u8], extra: &[u8], prefixes: bool) -> usize {
        let result = parse(buf);
        let outcome = match result {
            Ok(Parse::Incomplete) => 0,
            Ok(Parse::Done(..)) => 1,
            Err(_) => 2,
        };
        let mut longer = buf.to_vec();
        longer.extend_from_slice(extra);
        match result {
            Ok(Parse::Done(h, n)) => {
                assert!(n > 0 && n <= buf.len(), "{buf:?}");
                assert_eq!(parse(&buf[..n]), Ok(Parse::Done(h, n)), "{buf:?}");
                assert_eq!(parse(&longer), Ok(Parse::Done(h, n)), "{buf:?}");
                if prefixes {
                    for k in 0..n {
                        assert_eq!(parse(&buf[..k]), Ok(Parse::Incomplete), "{buf:?} at {k}");
                    }
                }
            }
            Ok(Parse::Incomplete) => {
                assert!(buf.len() < MAX_V2_LEN, "{buf:?}");
                // Not yet valid, but the caller was told to wait, so no prefix may have been an error.
                if prefixes {
                    for k in 0..buf.len() {
                        assert!(parse(&buf[..k]).is_ok(), "{buf:?} at {k}");
                    }
                }
            }
            Err(e) => {
                assert_eq!(e, ProtoError::Malformed);
                assert_eq!(parse(&longer), Err(e), "{buf:?}");
            }
        }
        outcome
    }

    #[test]
    fn fuzz_random_buffers() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut seen = [0usize; 3];
        const V1_ALPHABET: &[u8] = b"PROXY TCP46UNKOW0123456789abcdefABCDEF.:\r\n \x00\xff";
        for i in 0..ROUNDS {
            let len = rng.below(160);
            let mut buf = Vec::with_capacity(len + 16);
            // Bias a third of the inputs towards each start so the deep paths get exercised too.
            match i % 3 {
                0 => {}
                1 => {
                    buf.extend_from_slice(&V2_SIG);
                    buf.push(if rng.below(4) == 0 {
                        rng.byte()
                    } else {
                        0x20 | rng.below(2) as u8
                    });
                    buf.push([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, rng.byte()][rng.below(7)]);
                    buf.extend_from_slice(&(rng.below(80) as u16).to_be_bytes());
                }
                _ => buf.extend_from_slice(V1_PREFIX),
            }
            let v1 = i % 3 == 2;
            for _ in 0..len {
                buf.push(if v1 && rng.below(8) != 0 {
                    V1_ALPHABET[rng.below(V1_ALPHABET.len())]
                } else {
                    rng.byte()
                });
            }
            let cut = rng.below(buf.len() + 1);
            let extra: Vec<u8> = (0..rng.below(8)).map(|_| rng.byte()).collect();
            seen[check_invariants(&buf[..cut], &extra, i % 50 == 0)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 1000), "{seen:?}");
    }

    #[test]
    fn fuzz_mutated_valid_headers() {
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        let mut seeds: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.0.2.1 198.51.100.7 50000 443\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 ::ffff:1.2.3.4 1 65535\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            v2(0x20, 0x00, 0, &[]),
            v2(0x20, 0x11, 12, &v4_block()),
        ];
        let tlvs: &[(u8, &[u8])] = &[(TLV_ALPN, b"h2"), (TLV_UNIQUE_ID, &[1, 2, 3])];
        for h in [
            proxy("192.0.2.1:50000", "198.51.100.7:443"),
            proxy("[2001:db8::1]:1", "[::1]:65535"),
        ] {
            let mut out = vec![0u8; 256];
            let n = encode_v2(&h, tlvs, &mut out);
            seeds.push(out[..n].to_vec());
        }
        let mut seen = [0usize; 3];
        for i in 0..ROUNDS / 2 {
            let mut buf = seeds[i % seeds.len()].clone();
            for _ in 0..=rng.below(3) {
                let pos = rng.below(buf.len() + 1);
                match rng.below(5) {
                    0 if pos < buf.len() => buf[pos] = rng.byte(),
                    1 if pos < buf.len() => buf[pos] ^= 1 << rng.below(8),
                    2 if pos < buf.len() => {
                        buf.remove(pos);
                    }
                    3 => buf.insert(pos, rng.byte()),
                    _ => buf.truncate(pos),
                }
            }
            let extra: Vec<u8> = (0..rng.below(4)).map(|_| rng.byte()).collect();
            seen[check_invariants(&buf, &extra, true)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 1000), "{seen:?}");
    }
}
