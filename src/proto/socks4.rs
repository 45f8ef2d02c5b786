//! SOCKS4 and SOCKS4a server side, plus the client-side request encoder and reply parser used for chaining.
//!
//! Protocol texts: "SOCKS: A protocol for TCP proxy across firewalls" (Ying-Da Lee, SOCKS 4) and "SOCKS 4A: A
//! Simple Extension to SOCKS 4 Protocol". Request: `VN=4 CD DSTPORT(2) DSTIP(4) USERID NUL`; SOCKS4a sets DSTIP to
//! 0.0.0.x (x != 0) and appends `DOMAIN NUL`. Reply: `VN=0 CD DSTPORT DSTIP`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use super::{canonical_ip, Name, Parse, ProtoError, Reader, TargetAddr, Writer};

/// SOCKS4 text: VN of a request is 4.
pub const VERSION: u8 = 4;
/// SOCKS4 text: CD 90, request granted.
pub const REPLY_GRANTED: u8 = 90;
/// SOCKS4 text: CD 91, request rejected or failed.
pub const REPLY_REJECTED: u8 = 91;
/// Our cap on USERID: the protocol sets none, but an unbounded NUL-terminated field must be bounded somewhere.
pub const MAX_USERID: usize = 255;
/// Cap on the SOCKS4a DOMAIN, the DNS limit also used by SOCKS5 (RFC 1928 §5).
pub const MAX_DOMAIN: usize = 255;
/// Length of a reply (SOCKS4 text): VN CD DSTPORT(2) DSTIP(4).
pub const REPLY_LEN: usize = 8;
/// Longest request [`encode_request`] writes: 8 fixed bytes, USERID + NUL, DOMAIN + NUL.
pub const MAX_REQUEST_LEN: usize = 8 + MAX_USERID + 1 + MAX_DOMAIN + 1;

/// SOCKS4 CD of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// CD 1, CONNECT.
    Connect,
    /// CD 2, BIND.
    Bind,
}

/// A SOCKS4 or SOCKS4a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// CD.
    pub command: Command,
    /// DSTIP:DSTPORT, or the SOCKS4a DOMAIN with DSTPORT.
    pub target: TargetAddr,
    /// USERID without its NUL, borrowed from the input (any bytes; the protocol gives no charset).
    pub userid: &'a [u8],
}

/// True for DSTIP 0.0.0.x with x != 0, which SOCKS4a reserves to mean "a DOMAIN follows the USERID".
fn is_4a_marker(ip: [u8; 4]) -> bool {
    matches!(ip, [0, 0, 0, x] if x != 0)
}

/// Reads a NUL-terminated field of at most `max` bytes (NUL excluded) and the NUL.
///
/// `Ok(None)` means more bytes are needed; `TooLong` as soon as `max + 1` bytes arrived without a NUL, so a peer
/// cannot make us buffer an endless field.
fn read_cstr<'a>(
    buf: &'a [u8],
    r: &mut Reader<'a>,
    max: usize,
) -> Result<Option<&'a [u8]>, ProtoError> {
    let rest = buf.get(r.pos()..).unwrap_or(&[]);
    let window = rest.get(..max.saturating_add(1)).unwrap_or(rest);
    match window.iter().position(|&b| b == 0) {
        Some(len) => {
            let field = r.take(len);
            let _nul = r.take(1);
            Ok(field)
        }
        None if window.len() > max => Err(ProtoError::TooLong),
        None => Ok(None),
    }
}

/// Parses a SOCKS4/4a request: `04 CD DSTPORT DSTIP USERID NUL [DOMAIN NUL]`.
///
/// DOMAIN is present only when DSTIP is 0.0.0.x with x != 0 (SOCKS4a text); 0.0.0.0 is a plain (useless) SOCKS4
/// address and is returned as is for the caller's ACL to refuse. USERID over [`MAX_USERID`] and DOMAIN over
/// [`MAX_DOMAIN`] fail with `TooLong` once the cap is passed without a NUL; an empty DOMAIN, or one with a byte
/// [`Name::new`] refuses, fails with `BadName` as soon as the offending byte arrives.
pub fn parse_request(buf: &[u8]) -> Result<Parse<Request<'_>>, ProtoError> {
    let mut r = Reader::new(buf);
    need!(r.version(&[VERSION])?);
    let cd = need!(r.u8());
    let command = match cd {
        1 => Command::Connect,
        2 => Command::Bind,
        other => return Err(ProtoError::BadCommand(other)),
    };
    let port = need!(r.u16());
    let ip = need!(r.array::<4>());
    let userid = need!(read_cstr(buf, &mut r, MAX_USERID)?);
    if !is_4a_marker(ip) {
        let target = TargetAddr::Ip(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)));
        return Ok(Parse::Done(
            Request {
                command,
                target,
                userid,
            },
            r.pos(),
        ));
    }
    // SOCKS4a: validate the received part of DOMAIN (up to the NUL or the cap) before waiting for the rest.
    let rest = buf.get(r.pos()..).unwrap_or(&[]);
    let seen = rest.get(..MAX_DOMAIN).unwrap_or(rest);
    let seen = match seen.iter().position(|&b| b == 0) {
        Some(0) => return Err(ProtoError::BadName),
        Some(len) => seen.get(..len).unwrap_or(seen),
        None => seen,
    };
    if !seen.is_empty() && Name::new(seen).is_none() {
        return Err(ProtoError::BadName);
    }
    let raw = need!(read_cstr(buf, &mut r, MAX_DOMAIN)?);
    let name = Name::new(raw).ok_or(ProtoError::BadName)?;
    let request = Request {
        command,
        target: TargetAddr::Domain(name, port),
        userid,
    };
    Ok(Parse::Done(request, r.pos()))
}

/// Encodes a reply `00 CD DSTPORT DSTIP`: VN is 0, not 4 (SOCKS4 text: "VN is the version of the reply code and
/// should be 0"). Returns 0 if `out` is shorter than [`REPLY_LEN`].
pub fn encode_reply(code: u8, addr: SocketAddrV4, out: &mut [u8]) -> usize {
    let mut w = Writer::new(out);
    w.u8(0).u8(code).u16(addr.port()).put(&addr.ip().octets());
    w.finish().unwrap_or(0)
}

/// Client side: encodes a request; a domain uses the SOCKS4a form (DSTIP 0.0.0.1, DOMAIN after USERID).
///
/// Returns 0 when the request cannot be expressed: an IPv6 target (IPv4-mapped ones are sent as IPv4), a literal
/// 0.0.0.x with x != 0 (a server would read it as SOCKS4a and wait for a DOMAIN), a USERID with a NUL or longer
/// than [`MAX_USERID`], or `out` too short ([`MAX_REQUEST_LEN`] always suffices).
pub fn encode_request(
    command: Command,
    target: &TargetAddr,
    userid: &[u8],
    out: &mut [u8],
) -> usize {
    if userid.len() > MAX_USERID || userid.contains(&0) {
        return 0;
    }
    let (ip, domain) = match target {
        TargetAddr::Ip(sa) => match canonical_ip(sa.ip()) {
            IpAddr::V4(v4) if !is_4a_marker(v4.octets()) => (v4.octets(), None),
            _ => return 0,
        },
        TargetAddr::Domain(name, _) => ([0, 0, 0, 1], Some(name.as_bytes())),
    };
    let cd = match command {
        Command::Connect => 1,
        Command::Bind => 2,
    };
    let mut w = Writer::new(out);
    w.u8(VERSION)
        .u8(cd)
        .u16(target.port())
        .put(&ip)
        .put(userid)
        .u8(0);
    if let Some(d) = domain {
        w.put(d).u8(0);
    }
    w.finish().unwrap_or(0)
}

/// Client side: parses a reply `VN CD DSTPORT DSTIP` (VN must be 0, else `BadVersion`); returns CD unchecked,
/// so the caller compares it with [`REPLY_GRANTED`] (91, 92 and 93 are all refusals).
pub fn parse_reply(buf: &[u8]) -> Result<Parse<(u8, SocketAddrV4)>, ProtoError> {
    let mut r = Reader::new(buf);
    need!(r.version(&[0])?);
    let cd = need!(r.u8());
    let port = need!(r.u16());
    let ip = need!(r.array::<4>());
    Ok(Parse::Done(
        (cd, SocketAddrV4::new(Ipv4Addr::from(ip), port)),
        r.pos(),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::proto::testutil::{cat, dom, v4, BAD_NAMES};

    fn req(command: Command, target: TargetAddr, userid: &[u8]) -> Request<'_> {
        Request {
            command,
            target,
            userid,
        }
    }

    #[test]
    fn request_valid() {
        let next = [4u8, 1, 0, 80, 1, 2, 3, 4, 0];
        let msg = cat(&[&[4, 1, 0x1f, 0x90, 10, 0, 0, 1], b"fred", &[0]]);
        check_valid!(
            parse_request,
            &msg,
            req(Command::Connect, v4([10, 0, 0, 1], 8080), b"fred"),
            &next
        );
        // Empty USERID.
        let msg = [4u8, 2, 0, 21, 192, 0, 2, 9, 0];
        check_valid!(
            parse_request,
            &msg,
            req(Command::Bind, v4([192, 0, 2, 9], 21), b""),
            &next
        );
        // 0.0.0.0 is not SOCKS4a: no DOMAIN expected.
        let msg = [4u8, 1, 0, 80, 0, 0, 0, 0, b'u', 0];
        check_valid!(
            parse_request,
            &msg,
            req(Command::Connect, v4([0, 0, 0, 0], 80), b"u"),
            &next
        );
        // SOCKS4a with 0.0.0.1 and 0.0.0.255.
        let msg = cat(&[
            &[4, 1, 1, 187, 0, 0, 0, 1],
            b"id",
            &[0],
            b"example.org",
            &[0],
        ]);
        check_valid!(
            parse_request,
            &msg,
            req(Command::Connect, dom(b"example.org", 443), b"id"),
            &next
        );
        let msg = cat(&[&[4, 1, 0, 80, 0, 0, 0, 255, 0], b"h", &[0]]);
        check_valid!(
            parse_request,
            &msg,
            req(Command::Connect, dom(b"h", 80), b""),
            &next
        );
        // USERID and DOMAIN at their caps; USERID may hold any non-NUL byte.
        let (u, d) = ([0xc3u8; MAX_USERID], [b'd'; MAX_DOMAIN]);
        let msg = cat(&[&[4, 1, 0, 80, 0, 0, 0, 7], &u, &[0], &d, &[0]]);
        assert_eq!(msg.len(), MAX_REQUEST_LEN);
        check_valid!(
            parse_request,
            &msg,
            req(Command::Connect, dom(&d, 80), &u),
            &next
        );
    }

    #[test]
    fn request_malformed() {
        #[rustfmt::skip]
        check_bad_bytes!(parse_request,
            (&[0, 1, 0, 80, 1, 2, 3, 4, 0], 0, [0u8, 5, 3, 0xff], ProtoError::BadVersion),
            (&[4, 0, 0, 80, 1, 2, 3, 4, 0], 1, [0u8, 3, 90, 0xff], ProtoError::BadCommand),
        );
        // USERID over the cap: TooLong as soon as byte MAX_USERID + 1 arrives without a NUL.
        let msg = cat(&[&[4, 1, 0, 80, 1, 2, 3, 4], &[b'u'; MAX_USERID + 10], &[0]]);
        check_err!(parse_request, &msg, ProtoError::TooLong, 8 + MAX_USERID + 1);
        // Same for the SOCKS4a DOMAIN.
        let msg = cat(&[
            &[4, 1, 0, 80, 0, 0, 0, 1, 0],
            &[b'd'; MAX_DOMAIN + 10],
            &[0],
        ]);
        check_err!(parse_request, &msg, ProtoError::TooLong, 9 + MAX_DOMAIN + 1);
        // Empty DOMAIN.
        check_err!(
            parse_request,
            &[4, 1, 0, 80, 0, 0, 0, 1, b'u', 0, 0],
            ProtoError::BadName,
            11
        );
        // Bad bytes in DOMAIN fail when they arrive.
        for &(bad, pos) in BAD_NAMES {
            let msg = cat(&[&[4, 1, 0, 80, 0, 0, 0, 1, 0], bad, &[0]]);
            check_err!(parse_request, &msg, ProtoError::BadName, 9 + pos + 1);
        }
    }

    #[test]
    fn request_round_trip() {
        let cases: [(TargetAddr, &[u8]); 5] = [
            (v4([127, 0, 0, 1], 1080), b"fred"),
            (v4([0, 0, 0, 0], 80), b""),
            (v4([1, 0, 0, 1], 80), b"x"),
            (dom(b"example.com", 443), b"user"),
            (dom(&[b'a'; MAX_DOMAIN], 65535), &[b'u'; MAX_USERID]),
        ];
        for command in [Command::Connect, Command::Bind] {
            for (target, userid) in &cases {
                let mut out = [0u8; MAX_REQUEST_LEN];
                let n = encode_request(command, target, userid, &mut out);
                assert!(n > 0);
                assert_eq!(
                    parse_request(&out[..n]),
                    Ok(Parse::Done(req(command, target.clone(), userid), n))
                );
                assert_eq!(
                    encode_request(command, target, userid, &mut out[..n - 1]),
                    0
                );
            }
        }
        let mut out = [0u8; MAX_REQUEST_LEN];
        let n = encode_request(Command::Connect, &dom(b"h.io", 80), b"u", &mut out);
        assert_eq!(&out[..n], b"\x04\x01\x00\x50\x00\x00\x00\x01u\x00h.io\x00");
        // IPv4-mapped IPv6 goes out as IPv4; other IPv6, 4a-marker literals and bad USERIDs cannot be sent.
        let mapped = TargetAddr::Ip("[::ffff:10.0.0.1]:80".parse().unwrap());
        let n = encode_request(Command::Connect, &mapped, b"", &mut out);
        assert_eq!(&out[..n], &[4, 1, 0, 80, 10, 0, 0, 1, 0]);
        let ip6 = TargetAddr::Ip("[2001:db8::1]:80".parse().unwrap());
        assert_eq!(encode_request(Command::Connect, &ip6, b"", &mut out), 0);
        assert_eq!(
            encode_request(Command::Connect, &v4([0, 0, 0, 9], 80), b"", &mut out),
            0
        );
        let t = v4([1, 2, 3, 4], 80);
        assert_eq!(encode_request(Command::Connect, &t, b"a\0b", &mut out), 0);
        assert_eq!(
            encode_request(Command::Connect, &t, &[b'u'; MAX_USERID + 1], &mut out),
            0
        );
    }

    #[test]
    fn reply_valid_and_round_trip() {
        let next = [0u8, 90, 0, 0, 0, 0, 0, 0];
        let addr = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 3), 4321);
        check_valid!(
            parse_reply,
            &[0, 90, 0x10, 0xe1, 198, 51, 100, 3],
            (REPLY_GRANTED, addr),
            &next
        );
        for code in [REPLY_GRANTED, REPLY_REJECTED, 92, 93] {
            let mut out = [0u8; REPLY_LEN];
            assert_eq!(encode_reply(code, addr, &mut out), REPLY_LEN);
            assert_eq!(out[0], 0, "VN of a reply is 0");
            assert_eq!(parse_reply(&out), Ok(Parse::Done((code, addr), REPLY_LEN)));
            assert_eq!(encode_reply(code, addr, &mut out[..REPLY_LEN - 1]), 0);
        }
    }

    #[test]
    fn reply_malformed() {
        #[rustfmt::skip]
        check_bad_bytes!(parse_reply,
            (&[0, 90, 0, 0, 0, 0, 0, 0], 0, [4u8, 5, 1, 0xff], ProtoError::BadVersion),
        );
    }

    // ---- never panic on arbitrary input ----

    /// Plenty of NULs and letters make terminated fields and valid names likely.
    const NUL_AND_LETTERS: &[u8] = b"\0\0\0\0\0abcdefghijklmnopqrstuvwxyz";

    #[test]
    fn fuzz_parse_request() {
        let shapes: [&[u8]; 2] = [&[4, 1, 0, 80, 1, 2, 3, 4], &[4, 1, 0, 80, 0, 0, 0, 1]];
        fuzz_contract!(
            0x2545_f491_4f6c_dd1d,
            shapes,
            NUL_AND_LETTERS,
            parse_request
        );
    }

    #[test]
    fn fuzz_parse_reply() {
        fuzz_contract!(
            0x1357_9bdf_2468_ace0,
            [&[0, 90]],
            NUL_AND_LETTERS,
            parse_reply
        );
    }
}
