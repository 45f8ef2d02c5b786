//! SOCKS5 server side (RFC 1928) with username/password authentication (RFC 1929), plus the client-side encoders
//! used by tests, the load generator and upstream chaining.
//!
//! Wire flow (RFC 1928 §3, §4, §6): greeting -> method choice -> [RFC 1929 sub-negotiation] -> request -> reply.
//! UDP ASSOCIATE datagrams carry the §7 header handled by [`parse_udp_header`] / [`encode_udp_header`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::{canonical_ip, Name, Parse, ProtoError, Reader, TargetAddr, Writer};

/// RFC 1928 §3: the VER byte of every SOCKS5 message.
pub const VERSION: u8 = 5;
/// RFC 1928 §3: X'00' NO AUTHENTICATION REQUIRED.
pub const METHOD_NO_AUTH: u8 = 0x00;
/// RFC 1928 §3: X'02' USERNAME/PASSWORD (RFC 1929).
pub const METHOD_USER_PASS: u8 = 0x02;
/// RFC 1928 §3: X'FF' NO ACCEPTABLE METHODS; the client must close after receiving it.
pub const METHOD_NO_ACCEPTABLE: u8 = 0xFF;

/// RFC 1929 §2: the sub-negotiation version byte.
pub(crate) const AUTH_VERSION: u8 = 0x01;

/// RFC 1928 §5: IP V4 address, 4 octets.
pub(crate) const ATYP_IPV4: u8 = 0x01;
/// RFC 1928 §5: DOMAINNAME, one length octet then the name, no terminating NUL.
pub(crate) const ATYP_DOMAIN: u8 = 0x03;
/// RFC 1928 §5: IP V6 address, 16 octets.
pub(crate) const ATYP_IPV6: u8 = 0x04;

/// Length of the method-selection message (RFC 1928 §3): VER METHOD.
pub const MAX_METHOD_LEN: usize = 2;
/// Length of the RFC 1929 §2 status message: VER STATUS.
pub const MAX_AUTH_STATUS_LEN: usize = 2;
/// Longest reply (RFC 1928 §6): VER REP RSV ATYP + 16-byte IPv6 + port; we never send a domain BND.ADDR.
pub const MAX_REPLY_LEN: usize = 22;
/// Longest UDP header (RFC 1928 §7): RSV(2) FRAG ATYP LEN + 255-byte name + port.
pub const MAX_UDP_HEADER_LEN: usize = 262;
/// Longest greeting (RFC 1928 §3): VER NMETHODS + 255 methods.
pub const MAX_GREETING_LEN: usize = 257;
/// Longest RFC 1929 §2 request: VER ULEN UNAME(255) PLEN PASSWD(255).
pub const MAX_USER_PASS_LEN: usize = 513;
/// Longest request (RFC 1928 §4): VER CMD RSV ATYP LEN + 255-byte name + port.
pub const MAX_REQUEST_LEN: usize = 262;

/// The authentication methods a client offered (RFC 1928 §3); only the two we implement are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// X'00' was offered.
    pub no_auth: bool,
    /// X'02' was offered.
    pub user_pass: bool,
}

/// Parses the version identifier/method selection message (RFC 1928 §3): VER NMETHODS METHODS.
pub fn parse_greeting(buf: &[u8]) -> Result<Parse<Greeting>, ProtoError> {
    let mut r = Reader::new(buf);
    need!(r.version(&[VERSION])?);
    // NMETHODS = 0 can never select a method; reject it now rather than answer X'FF' to an empty list.
    let n = need!(r.u8());
    if n == 0 {
        return Err(ProtoError::NoMethods);
    }
    let methods = need!(r.take(usize::from(n)));
    let greeting = Greeting {
        no_auth: methods.contains(&METHOD_NO_AUTH),
        user_pass: methods.contains(&METHOD_USER_PASS),
    };
    Ok(Parse::Done(greeting, r.pos()))
}

/// Encodes the method selection (RFC 1928 §3): `05 METHOD`; returns 0 if `out` is shorter than [`MAX_METHOD_LEN`].
pub fn encode_method(method: u8, out: &mut [u8]) -> usize {
    let mut w = Writer::new(out);
    w.u8(VERSION).u8(method);
    w.finish().unwrap_or(0)
}

/// RFC 1929 §2 username and password, borrowed from the input buffer (never logged: they are secrets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials<'a> {
    /// UNAME, 1..=255 bytes.
    pub user: &'a [u8],
    /// PASSWD, 0..=255 bytes.
    pub pass: &'a [u8],
}

/// Parses the RFC 1929 §2 request: VER ULEN UNAME PLEN PASSWD.
///
/// VER must be X'01'; X'05' is accepted too because many clients wrongly repeat the SOCKS version there (see
/// tinyproxy PR 174). ULEN = 0 is rejected (RFC 1929 §2 gives UNAME 1 to 255 octets); PLEN = 0 is accepted, as
/// curl and others send an empty password.
pub fn parse_user_pass(buf: &[u8]) -> Result<Parse<Credentials<'_>>, ProtoError> {
    let mut r = Reader::new(buf);
    need!(r.version(&[AUTH_VERSION, VERSION])?);
    let ulen = need!(r.u8());
    if ulen == 0 {
        return Err(ProtoError::BadField);
    }
    let user = need!(r.take(usize::from(ulen)));
    let plen = need!(r.u8());
    let pass = need!(r.take(usize::from(plen)));
    Ok(Parse::Done(Credentials { user, pass }, r.pos()))
}

/// Encodes the RFC 1929 §2 status: always VER X'01' (even if the client sent X'05'), STATUS 00 success, 01 failure;
/// returns 0 if `out` is shorter than [`MAX_AUTH_STATUS_LEN`].
pub fn encode_auth_status(success: bool, out: &mut [u8]) -> usize {
    let mut w = Writer::new(out);
    w.u8(AUTH_VERSION).u8(if success { 0x00 } else { 0x01 });
    w.finish().unwrap_or(0)
}

/// RFC 1928 §4 CMD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// X'01' CONNECT.
    Connect,
    /// X'02' BIND.
    Bind,
    /// X'03' UDP ASSOCIATE.
    UdpAssociate,
}

/// Maps a CMD byte (RFC 1928 §4) to a command.
fn command_from(code: u8) -> Option<Command> {
    match code {
        0x01 => Some(Command::Connect),
        0x02 => Some(Command::Bind),
        0x03 => Some(Command::UdpAssociate),
        _ => None,
    }
}

/// The CMD byte (RFC 1928 §4) of a command.
fn command_code(command: Command) -> u8 {
    match command {
        Command::Connect => 0x01,
        Command::Bind => 0x02,
        Command::UdpAssociate => 0x03,
    }
}

/// A SOCKS5 request (RFC 1928 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// CMD.
    pub command: Command,
    /// DST.ADDR and DST.PORT. IPv6 literals stay `SocketAddr::V6` (IPv4-mapped ones too: ACLs apply `canonical_ip`).
    pub target: TargetAddr,
}

/// Reads ATYP DST.ADDR DST.PORT (RFC 1928 §4/§5) from `r`, which reads `buf`.
///
/// `Ok(None)` means more bytes are needed. An unknown ATYP, an empty domain and a domain with a byte that
/// [`Name::new`] refuses are errors as soon as the offending byte is in `buf`, not when the name is complete.
pub(crate) fn read_target(
    buf: &[u8],
    r: &mut Reader<'_>,
) -> Result<Option<TargetAddr>, ProtoError> {
    let Some(atyp) = r.u8() else {
        return Ok(None);
    };
    let addr = match atyp {
        ATYP_IPV4 => {
            let Some(ip) = r.array::<4>() else {
                return Ok(None);
            };
            IpAddr::V4(Ipv4Addr::from(ip))
        }
        ATYP_IPV6 => {
            let Some(ip) = r.array::<16>() else {
                return Ok(None);
            };
            IpAddr::V6(Ipv6Addr::from(ip))
        }
        ATYP_DOMAIN => {
            let Some(len) = r.u8() else {
                return Ok(None);
            };
            if len == 0 {
                return Err(ProtoError::BadName);
            }
            let Some(raw) = r.take(usize::from(len)) else {
                // Check the part already received so a bad byte fails now instead of after up to 255 more bytes.
                let partial = buf.get(r.pos()..).unwrap_or(&[]);
                if !partial.is_empty() && Name::new(partial).is_none() {
                    return Err(ProtoError::BadName);
                }
                return Ok(None);
            };
            let name = Name::new(raw).ok_or(ProtoError::BadName)?;
            let Some(port) = r.u16() else {
                return Ok(None);
            };
            return Ok(Some(TargetAddr::Domain(name, port)));
        }
        other => return Err(ProtoError::BadAddressType(other)),
    };
    let Some(port) = r.u16() else {
        return Ok(None);
    };
    Ok(Some(TargetAddr::Ip(match addr {
        IpAddr::V4(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
        IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, 0)),
    })))
}

/// Writes ATYP ADDR PORT (RFC 1928 §5); an IPv4-mapped IPv6 address goes out as ATYP 1 so peers see one form.
pub(crate) fn put_target(w: &mut Writer<'_>, target: &TargetAddr) -> Option<()> {
    match target {
        TargetAddr::Ip(sa) => match canonical_ip(sa.ip()) {
            IpAddr::V4(v4) => w.u8(ATYP_IPV4).put(&v4.octets()),
            IpAddr::V6(v6) => w.u8(ATYP_IPV6).put(&v6.octets()),
        },
        TargetAddr::Domain(name, _) => {
            let raw = name.as_bytes();
            w.u8(ATYP_DOMAIN).u8(u8::try_from(raw.len()).ok()?).put(raw)
        }
    };
    w.u16(target.port());
    Some(())
}

/// Parses a request (RFC 1928 §4): VER CMD RSV ATYP DST.ADDR DST.PORT.
///
/// A non-zero RSV is tolerated (RFC 1928 §4 says X'00' but gives no error for other values; some clients send
/// junk there and rejecting them gains nothing). Unknown CMD and ATYP fail as soon as their byte arrives, so the
/// caller can answer X'07' / X'08' (RFC 1928 §6) at once.
pub fn parse_request(buf: &[u8]) -> Result<Parse<Request>, ProtoError> {
    let parsed = parse_coded(buf, |cmd| {
        command_from(cmd).ok_or(ProtoError::BadCommand(cmd))
    })?;
    Ok(parsed.map(|(command, target)| Request { command, target }))
}

/// Parses `05 CODE RSV ATYP ADDR PORT`, the layout a request (RFC 1928 §4) and a reply (§6) share; `code` judges
/// CODE (CMD or REP) as soon as it arrives, so a bad one fails without waiting for the address.
pub(crate) fn parse_coded<T>(
    buf: &[u8],
    code: impl FnOnce(u8) -> Result<T, ProtoError>,
) -> Result<Parse<(T, TargetAddr)>, ProtoError> {
    let mut r = Reader::new(buf);
    need!(r.version(&[VERSION])?);
    let value = code(need!(r.u8()))?;
    let _rsv = need!(r.u8());
    let target = need!(read_target(buf, &mut r)?);
    Ok(Parse::Done((value, target), r.pos()))
}

/// Encodes `05 CODE 00 ATYP ADDR PORT` (see [`parse_coded`]); returns 0 if `out` is too short.
fn encode_coded(code: u8, target: &TargetAddr, out: &mut [u8]) -> usize {
    let mut w = Writer::new(out);
    w.u8(VERSION).u8(code).u8(0x00);
    finish_with_target(w, target)
}

/// Appends ATYP ADDR PORT to what `w` holds; the message length, or 0 if it did not fit.
fn finish_with_target(mut w: Writer<'_>, target: &TargetAddr) -> usize {
    put_target(&mut w, target)
        .and_then(|()| w.finish())
        .unwrap_or(0)
}

/// Encodes a reply (RFC 1928 §6): `05 REP 00 ATYP BND.ADDR BND.PORT`.
///
/// BND.ADDR is always a literal (ATYP 1 or 4; IPv4-mapped IPv6 is written as ATYP 1). Returns 0 if `out` is
/// shorter than needed ([`MAX_REPLY_LEN`] always suffices).
pub fn encode_reply(rep: u8, bnd: SocketAddr, out: &mut [u8]) -> usize {
    encode_coded(rep, &TargetAddr::Ip(bnd), out)
}

/// The RFC 1928 §7 header of a UDP ASSOCIATE datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpHeader {
    /// FRAG: 0 for a standalone datagram; the caller drops (and counts) fragments, which we do not reassemble.
    pub frag: u8,
    /// DST.ADDR and DST.PORT.
    pub target: TargetAddr,
}

/// Parses the RFC 1928 §7 header of a whole datagram: RSV(2) FRAG ATYP DST.ADDR DST.PORT; returns it and the
/// offset of DATA.
///
/// A datagram is complete, so truncation is `Malformed` (there is no "incomplete"). RSV must be X'0000'
/// (`BadReserved`). FRAG is returned, not checked: dropping fragments is the caller's policy (RFC 1928 §7 allows
/// an implementation without fragmentation support to drop them).
pub fn parse_udp_header(datagram: &[u8]) -> Result<(UdpHeader, usize), ProtoError> {
    let mut r = Reader::new(datagram);
    let rsv = r.u16().ok_or(ProtoError::Malformed)?;
    if rsv != 0 {
        return Err(ProtoError::BadReserved);
    }
    let frag = r.u8().ok_or(ProtoError::Malformed)?;
    let target = read_target(datagram, &mut r)?.ok_or(ProtoError::Malformed)?;
    Ok((UdpHeader { frag, target }, r.pos()))
}

/// Encodes an RFC 1928 §7 header `00 00 00 ATYP ADDR PORT` (FRAG 0); IPv4-mapped IPv6 is written as ATYP 1.
/// Returns 0 if `out` is shorter than needed ([`MAX_UDP_HEADER_LEN`] always suffices).
pub fn encode_udp_header(addr: &TargetAddr, out: &mut [u8]) -> usize {
    let mut w = Writer::new(out);
    w.u16(0).u8(0);
    finish_with_target(w, addr)
}

/// Client side: encodes a greeting (RFC 1928 §3) `05 NMETHODS METHODS`; returns 0 if `methods` is empty or has
/// more than 255 entries, or if `out` is too short ([`MAX_GREETING_LEN`] always suffices).
pub fn encode_greeting(methods: &[u8], out: &mut [u8]) -> usize {
    let n = match u8::try_from(methods.len()) {
        Ok(n) if n > 0 => n,
        _ => return 0,
    };
    let mut w = Writer::new(out);
    w.u8(VERSION).u8(n).put(methods);
    w.finish().unwrap_or(0)
}

/// Client side: encodes the RFC 1929 §2 request `01 ULEN UNAME PLEN PASSWD`; returns 0 if `user` is empty or
/// longer than 255 bytes, `pass` is longer than 255 bytes, or `out` is too short ([`MAX_USER_PASS_LEN`] suffices).
pub fn encode_user_pass(user: &[u8], pass: &[u8], out: &mut [u8]) -> usize {
    let (Ok(ulen), Ok(plen)) = (u8::try_from(user.len()), u8::try_from(pass.len())) else {
        return 0;
    };
    if ulen == 0 {
        return 0;
    }
    let mut w = Writer::new(out);
    w.u8(AUTH_VERSION).u8(ulen).put(user).u8(plen).put(pass);
    w.finish().unwrap_or(0)
}

/// Client side: encodes a request (RFC 1928 §4) `05 CMD 00 ATYP DST.ADDR DST.PORT` (IPv4-mapped IPv6 as ATYP 1);
/// returns 0 if `out` is too short ([`MAX_REQUEST_LEN`] always suffices).
pub fn encode_request(command: Command, target: &TargetAddr, out: &mut [u8]) -> usize {
    encode_coded(command_code(command), target, out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::proto::testutil::{cat, check_socks5_address_errors, dom, v4, v6};

    // ---- greeting (RFC 1928 §3) ----

    #[test]
    fn greeting_valid() {
        let next = [1u8, 1, b'u', 0];
        let g = |no_auth, user_pass| Greeting { no_auth, user_pass };
        check_valid!(parse_greeting, &[5, 1, 0], g(true, false), &next);
        check_valid!(parse_greeting, &[5, 1, 2], g(false, true), &next);
        check_valid!(parse_greeting, &[5, 2, 2, 0], g(true, true), &next);
        check_valid!(
            parse_greeting,
            &[5, 3, 1, 0x80, 0xff],
            g(false, false),
            &next
        );
        let mut all = vec![5u8, 255];
        all.extend(0..=254u8);
        check_valid!(parse_greeting, &all, g(true, true), &[5, 1, 0]);
    }

    #[test]
    fn greeting_malformed() {
        #[rustfmt::skip]
        check_bad_bytes!(parse_greeting,
            (&[0, 1, 0], 0, [0u8, 1, 4, 6, 0x16, b'G', 0xff], ProtoError::BadVersion),
        );
        check_err!(parse_greeting, &[5, 0, 0, 2], ProtoError::NoMethods, 2);
    }

    #[test]
    fn greeting_round_trip() {
        let mut out = [0u8; MAX_GREETING_LEN];
        let n = encode_greeting(&[METHOD_NO_AUTH, METHOD_USER_PASS], &mut out);
        assert_eq!(&out[..n], &[5, 2, 0, 2]);
        let g = Greeting {
            no_auth: true,
            user_pass: true,
        };
        assert_eq!(parse_greeting(&out[..n]), Ok(Parse::Done(g, 4)));
        let many = [7u8; 255];
        assert_eq!(encode_greeting(&many, &mut out), MAX_GREETING_LEN);
        assert!(matches!(
            parse_greeting(&out),
            Ok(Parse::Done(_, MAX_GREETING_LEN))
        ));
        assert_eq!(encode_greeting(&[], &mut out), 0);
        assert_eq!(encode_greeting(&[0; 256], &mut out), 0);
        assert_eq!(encode_greeting(&[0, 2], &mut out[..3]), 0);
    }

    #[test]
    fn method_encoding() {
        let mut out = [0u8; MAX_METHOD_LEN];
        assert_eq!(encode_method(METHOD_USER_PASS, &mut out), 2);
        assert_eq!(out, [5, 2]);
        assert_eq!(encode_method(METHOD_NO_ACCEPTABLE, &mut out), 2);
        assert_eq!(out, [5, 0xff]);
        assert_eq!(encode_method(METHOD_NO_AUTH, &mut out[..1]), 0);
    }

    // ---- username/password (RFC 1929 §2) ----

    #[test]
    fn user_pass_valid() {
        let next = [5u8, 1, 0, 1, 1, 2, 3, 4, 0, 80];
        let c = |user, pass| Credentials { user, pass };
        let msg = cat(&[&[1, 4], b"user", &[6], b"secret"]);
        check_valid!(parse_user_pass, &msg, c(b"user", b"secret"), &next);
        // VER 5 instead of 1: accepted leniently.
        let msg = cat(&[&[5, 4], b"user", &[6], b"secret"]);
        check_valid!(parse_user_pass, &msg, c(b"user", b"secret"), &next);
        // Empty password.
        check_valid!(parse_user_pass, &[1, 1, b'u', 0], c(b"u", b""), &next);
        // Arbitrary bytes, maximum lengths.
        let (u, p) = ([0u8; 255], [0xffu8; 255]);
        let msg = cat(&[&[1, 255], &u, &[255], &p]);
        check_valid!(parse_user_pass, &msg, c(&u, &p), &next);
    }

    #[test]
    fn user_pass_malformed() {
        #[rustfmt::skip]
        check_bad_bytes!(parse_user_pass,
            (&[0, 1, b'u', 0], 0, [0u8, 2, 4, 6, 0xff], ProtoError::BadVersion),
        );
        check_err!(parse_user_pass, &[1, 0, 1, b'p'], ProtoError::BadField, 2);
        check_err!(parse_user_pass, &[5, 0, 0], ProtoError::BadField, 2);
    }

    #[test]
    fn user_pass_round_trip() {
        let mut out = [0u8; MAX_USER_PASS_LEN];
        let n = encode_user_pass(b"alice", b"pw", &mut out);
        assert_eq!(&out[..n], b"\x01\x05alice\x02pw");
        let c = Credentials {
            user: b"alice",
            pass: b"pw",
        };
        assert_eq!(parse_user_pass(&out[..n]), Ok(Parse::Done(c, n)));
        let n = encode_user_pass(b"u", b"", &mut out);
        assert_eq!(&out[..n], &[1, 1, b'u', 0]);
        let (u, p) = ([b'u'; 255], [b'p'; 255]);
        assert_eq!(encode_user_pass(&u, &p, &mut out), MAX_USER_PASS_LEN);
        let c = Credentials { user: &u, pass: &p };
        assert_eq!(parse_user_pass(&out), Ok(Parse::Done(c, MAX_USER_PASS_LEN)));
        assert_eq!(encode_user_pass(b"", b"p", &mut out), 0);
        assert_eq!(encode_user_pass(&[b'u'; 256], b"p", &mut out), 0);
        assert_eq!(encode_user_pass(b"u", &[b'p'; 256], &mut out), 0);
        assert_eq!(encode_user_pass(b"alice", b"pw", &mut out[..9]), 0);
    }

    #[test]
    fn auth_status_encoding() {
        let mut out = [0u8; MAX_AUTH_STATUS_LEN];
        assert_eq!(encode_auth_status(true, &mut out), 2);
        assert_eq!(out, [1, 0]);
        assert_eq!(encode_auth_status(false, &mut out), 2);
        assert_eq!(out, [1, 1]);
        assert_eq!(encode_auth_status(true, &mut out[..1]), 0);
    }

    // ---- request (RFC 1928 §4/§5) ----

    #[test]
    fn request_valid() {
        let next = [5u8, 1, 0, 1, 9, 9, 9, 9, 0, 1];
        let req = |command, target| Request { command, target };
        check_valid!(
            parse_request,
            &[5, 1, 0, 1, 10, 0, 0, 1, 0x1f, 0x90],
            req(Command::Connect, v4([10, 0, 0, 1], 8080)),
            &next
        );
        let msg = cat(&[&[5, 2, 0, 3, 11], b"example.com", &[0, 80]]);
        check_valid!(
            parse_request,
            &msg,
            req(Command::Bind, dom(b"example.com", 80)),
            &next
        );
        let ip6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let msg = cat(&[&[5, 3, 0, 4], &ip6.octets(), &[0xff, 0xff]]);
        check_valid!(
            parse_request,
            &msg,
            req(Command::UdpAssociate, v6("2001:db8::1", 65535)),
            &next
        );
        // IPv4-mapped IPv6 stays V6 in the parsed request.
        let mapped: Ipv6Addr = "::ffff:1.2.3.4".parse().unwrap();
        let msg = cat(&[&[5, 1, 0, 4], &mapped.octets(), &[0, 0]]);
        check_valid!(
            parse_request,
            &msg,
            req(Command::Connect, v6("::ffff:1.2.3.4", 0)),
            &next
        );
        // Maximum-length name.
        let long = [b'a'; 255];
        let msg = cat(&[&[5, 1, 0, 3, 255], &long, &[1, 187]]);
        assert_eq!(msg.len(), MAX_REQUEST_LEN);
        check_valid!(
            parse_request,
            &msg,
            req(Command::Connect, dom(&long, 443)),
            &next
        );
        // Non-zero RSV is tolerated.
        check_valid!(
            parse_request,
            &[5, 1, 0xaa, 1, 1, 1, 1, 1, 0, 53],
            req(Command::Connect, v4([1, 1, 1, 1], 53)),
            &next
        );
    }

    #[test]
    fn request_malformed() {
        #[rustfmt::skip]
        check_bad_bytes!(parse_request,
            (&[5, 0, 0, 1, 1, 2, 3, 4, 0, 80], 1, [0u8, 4, 0x80, 0xff], ProtoError::BadCommand),
        );
        check_socks5_address_errors(parse_request, 1);
    }

    #[test]
    fn request_round_trip() {
        let targets = [
            v4([127, 0, 0, 1], 1),
            v4([0, 0, 0, 0], 0),
            v6("::1", 443),
            v6("fe80::1:2:3:4", 22),
            dom(b"localhost", 80),
            dom(&[b'z'; 255], 65535),
        ];
        for command in [Command::Connect, Command::Bind, Command::UdpAssociate] {
            for target in &targets {
                let mut out = [0u8; MAX_REQUEST_LEN];
                let n = encode_request(command, target, &mut out);
                assert!(n > 0);
                let expected = Request {
                    command,
                    target: target.clone(),
                };
                assert_eq!(parse_request(&out[..n]), Ok(Parse::Done(expected, n)));
                assert_eq!(encode_request(command, target, &mut out[..n - 1]), 0);
            }
        }
        // IPv4-mapped goes out as ATYP 1.
        let mut out = [0u8; MAX_REQUEST_LEN];
        let n = encode_request(Command::Connect, &v6("::ffff:10.1.2.3", 80), &mut out);
        assert_eq!(&out[..n], &[5, 1, 0, 1, 10, 1, 2, 3, 0, 80]);
    }

    // ---- reply (RFC 1928 §6) ----

    #[test]
    fn reply_encoding() {
        let mut out = [0u8; MAX_REPLY_LEN];
        let n = encode_reply(0, "192.0.2.1:1080".parse().unwrap(), &mut out);
        assert_eq!(&out[..n], &[5, 0, 0, 1, 192, 0, 2, 1, 0x04, 0x38]);
        let n = encode_reply(5, "[2001:db8::2]:80".parse().unwrap(), &mut out);
        assert_eq!(n, MAX_REPLY_LEN);
        let ip6: Ipv6Addr = "2001:db8::2".parse().unwrap();
        assert_eq!(
            &out[..n],
            &cat(&[&[5, 5, 0, 4], &ip6.octets(), &[0, 80]])[..]
        );
        let n = encode_reply(1, "[::ffff:10.0.0.7]:9".parse().unwrap(), &mut out);
        assert_eq!(&out[..n], &[5, 1, 0, 1, 10, 0, 0, 7, 0, 9]);
        assert_eq!(
            encode_reply(0, "1.2.3.4:5".parse().unwrap(), &mut out[..9]),
            0
        );
        assert_eq!(
            encode_reply(0, "[::1]:5".parse().unwrap(), &mut out[..21]),
            0
        );
    }

    // ---- UDP header (RFC 1928 §7) ----

    #[test]
    fn udp_header_valid() {
        let d = [0u8, 0, 0, 1, 8, 8, 8, 8, 0, 53, b'q', b'r'];
        let h = UdpHeader {
            frag: 0,
            target: v4([8, 8, 8, 8], 53),
        };
        assert_eq!(parse_udp_header(&d), Ok((h.clone(), 10)));
        assert_eq!(parse_udp_header(&d[..10]), Ok((h, 10)));
        // FRAG is reported, not rejected.
        let d = cat(&[&[0, 0, 3, 3, 4], b"host", &[1, 0], b"payload"]);
        let h = UdpHeader {
            frag: 3,
            target: dom(b"host", 256),
        };
        assert_eq!(parse_udp_header(&d), Ok((h, 11)));
        let ip6: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let d = cat(&[&[0, 0, 0, 4], &ip6.octets(), &[0, 7]]);
        let h = UdpHeader {
            frag: 0,
            target: v6("2001:db8::5", 7),
        };
        assert_eq!(parse_udp_header(&d), Ok((h, 22)));
    }

    #[test]
    fn udp_header_truncated_is_malformed() {
        let ip6: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let datagrams = [
            cat(&[&[0, 0, 0, 1, 8, 8, 8, 8, 0, 53]]),
            cat(&[&[0, 0, 0, 3, 4], b"host", &[0, 53]]),
            cat(&[&[0, 0, 0, 4], &ip6.octets(), &[0, 53]]),
        ];
        for d in &datagrams {
            for k in 0..d.len() {
                assert_eq!(
                    parse_udp_header(&d[..k]),
                    Err(ProtoError::Malformed),
                    "{k} of {d:?}"
                );
            }
            assert!(parse_udp_header(d).is_ok());
        }
    }

    #[test]
    fn udp_header_malformed() {
        assert_eq!(
            parse_udp_header(&[0, 1, 0, 1, 1, 1, 1, 1, 0, 1]),
            Err(ProtoError::BadReserved)
        );
        assert_eq!(
            parse_udp_header(&[1, 0, 0, 1, 1, 1, 1, 1, 0, 1]),
            Err(ProtoError::BadReserved)
        );
        assert_eq!(parse_udp_header(&[1, 0]), Err(ProtoError::BadReserved));
        assert_eq!(
            parse_udp_header(&[0, 0, 0, 2, 1, 1, 1, 1, 0, 1]),
            Err(ProtoError::BadAddressType(2))
        );
        assert_eq!(
            parse_udp_header(&[0, 0, 0, 3, 0, 0, 1]),
            Err(ProtoError::BadName)
        );
        assert_eq!(
            parse_udp_header(&[0, 0, 0, 3, 3, b'a', b' ', b'b', 0, 1]),
            Err(ProtoError::BadName)
        );
        // A truncated name whose received part is already bad reports the bad name.
        assert_eq!(
            parse_udp_header(&[0, 0, 0, 3, 9, b'a', 0]),
            Err(ProtoError::BadName)
        );
    }

    #[test]
    fn udp_header_round_trip() {
        let targets = [
            v4([192, 168, 1, 1], 5353),
            v6("2001:db8::9", 1),
            dom(b"dns.example", 53),
            dom(&[b'n'; 255], 1),
        ];
        for t in &targets {
            let mut out = [0u8; MAX_UDP_HEADER_LEN + 3];
            let n = encode_udp_header(t, &mut out);
            assert!(n > 0 && n <= MAX_UDP_HEADER_LEN);
            out[n..n + 3].copy_from_slice(b"abc");
            let h = UdpHeader {
                frag: 0,
                target: t.clone(),
            };
            assert_eq!(parse_udp_header(&out[..n + 3]), Ok((h, n)));
            assert_eq!(encode_udp_header(t, &mut out[..n - 1]), 0);
        }
        let mut out = [0u8; MAX_UDP_HEADER_LEN];
        let n = encode_udp_header(&v6("::ffff:1.2.3.4", 53), &mut out);
        assert_eq!(&out[..n], &[0, 0, 0, 1, 1, 2, 3, 4, 0, 53]);
    }

    // ---- never panic on arbitrary input ----

    use crate::proto::testutil::{Rng, FILL_LEN, ROUNDS};

    #[test]
    fn fuzz_parse_greeting() {
        fuzz_contract!(
            0x9e37_79b9_7f4a_7c15,
            [&[5, 3, 0, 1, 2]],
            &[],
            parse_greeting
        );
    }

    #[test]
    fn fuzz_parse_user_pass() {
        let shape: &[u8] = &[1, 3, b'a', b'b', b'c', 2, b'p'];
        fuzz_contract!(0x0123_4567_89ab_cdef, [shape], &[], parse_user_pass);
    }

    #[test]
    fn fuzz_parse_request() {
        let shapes: [&[u8]; 3] = [&[5, 1, 0, 1], &[5, 3, 0, 3, 7, b'e', b'x'], &[5, 2, 0, 4]];
        fuzz_contract!(0xdead_beef_cafe_f00d, shapes, &[], parse_request);
    }

    #[test]
    fn fuzz_parse_udp_header() {
        let mut rng = Rng(0x5555_aaaa_1234_4321);
        let mut store = [0u8; FILL_LEN];
        let shapes: [&[u8]; 3] = [&[0, 0, 0, 1], &[0, 0, 0, 3, 5, b'h'], &[0, 0, 1, 4]];
        for i in 0..ROUNDS {
            let buf = rng.fill(&mut store, shapes[i % 3], &[]);
            if let Ok((_, off)) = parse_udp_header(buf) {
                assert!(off <= buf.len());
            }
        }
    }
}
