//! Client side of SOCKS5, SOCKS4/4a and HTTP CONNECT.
//!
//! The handshake is a sans-IO state machine so the same code drives blocking sockets
//! (most modes) and nonblocking mio sockets (idle mode, thousands of tunnels in one thread).
//! Every message is encoded and every reply parsed by the proxy's own `socksgate::proto`
//! client side (the functions the proxy uses when it chains to an upstream).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use socksgate::proto::{self, socks4, socks5, upstream, Name, Parse, TargetAddr};

use crate::proxy::{Dest, Endpoint, ProxySpec, Scheme};

/// What the tunnel request asks the proxy to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Command {
    /// Open a TCP connection to the destination.
    Connect,
    /// SOCKS5 only: set up a UDP relay; the destination is our UDP source address.
    UdpAssociate,
}

/// Where the handshake currently waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Socks5Method,
    Socks5Auth,
    Socks5Reply,
    Socks4Reply,
    HttpReply,
    Done,
}

/// Result of feeding the handshake with bytes from the proxy.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// The proxy has not answered completely yet (check `output()` for bytes to send).
    NeedMore,
    /// The tunnel is up.
    Done(Established),
}

/// What a completed handshake yields.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Established {
    /// Bound address from the proxy reply (the UDP relay for UDP ASSOCIATE).
    pub(crate) bound: Option<SocketAddr>,
    /// Bytes received after the reply: they already belong to the tunnel.
    pub(crate) leftover: Vec<u8>,
}

/// Sans-IO client handshake for one tunnel.
#[derive(Debug)]
pub(crate) struct Handshake {
    step: Step,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    /// SOCKS5 request, held back until method selection (and auth) succeed.
    request: Vec<u8>,
    /// SOCKS5 username/password sub-negotiation message, if we have credentials.
    auth: Option<Vec<u8>>,
}

impl Handshake {
    /// Prepare the handshake; the first message is immediately available in `output()`.
    pub(crate) fn new(proxy: &ProxySpec, dest: &Dest, cmd: Command) -> io::Result<Self> {
        if cmd == Command::UdpAssociate && !proxy.scheme.is_socks5() {
            return Err(invalid("UDP ASSOCIATE needs a socks5 proxy"));
        }
        let mut hs = Handshake {
            step: Step::Done,
            out: Vec::new(),
            inbuf: Vec::new(),
            request: Vec::new(),
            auth: None,
        };
        match proxy.scheme {
            Scheme::Direct => {}
            Scheme::Socks5 | Scheme::Socks5h => {
                let creds = proxy.credentials();
                hs.out = socks5_greeting(creds.is_some());
                hs.auth = creds.map(|(u, p)| socks5_auth(u, p)).transpose()?;
                hs.request = socks5_request(cmd, &target(dest)?)?;
                hs.step = Step::Socks5Method;
            }
            Scheme::Socks4 | Scheme::Socks4a => {
                let userid = proxy.user.as_deref().unwrap_or("");
                hs.out = socks4_request(&target(dest)?, userid)?;
                hs.step = Step::Socks4Reply;
            }
            Scheme::Http => {
                hs.out = http_connect_request(&target(dest)?, proxy.credentials())?;
                hs.step = Step::HttpReply;
            }
        }
        Ok(hs)
    }

    /// Bytes that must be sent to the proxy now.
    pub(crate) fn output(&self) -> &[u8] {
        &self.out
    }

    /// Mark `n` bytes of `output()` as sent.
    pub(crate) fn consume_output(&mut self, n: usize) {
        self.out.drain(..n);
    }

    /// Whether no proxy exchange is needed at all (direct).
    pub(crate) fn is_done(&self) -> bool {
        self.step == Step::Done
    }

    /// Feed bytes read from the proxy and advance as far as they allow.
    pub(crate) fn input(&mut self, data: &[u8]) -> io::Result<Progress> {
        self.inbuf.extend_from_slice(data);
        loop {
            match self.step {
                Step::Socks5Method => {
                    let Some((method, used)) = done(upstream::parse_method_choice(&self.inbuf))?
                    else {
                        return Ok(Progress::NeedMore);
                    };
                    self.inbuf.drain(..used);
                    match (method, self.auth.take()) {
                        (socks5::METHOD_NO_AUTH, _) => {
                            self.out.append(&mut self.request);
                            self.step = Step::Socks5Reply;
                        }
                        (socks5::METHOD_USER_PASS, Some(mut auth)) => {
                            self.out.append(&mut auth);
                            self.step = Step::Socks5Auth;
                        }
                        (socks5::METHOD_USER_PASS, None) => {
                            return Err(proto("proxy requires username/password (user:pass@)"))
                        }
                        (socks5::METHOD_NO_ACCEPTABLE, _) => {
                            return Err(proto("proxy accepted none of our auth methods"))
                        }
                        (m, _) => return Err(proto(format!("proxy chose unoffered method {m}"))),
                    }
                }
                Step::Socks5Auth => {
                    let Some((ok, used)) = done(upstream::parse_auth_status(&self.inbuf))? else {
                        return Ok(Progress::NeedMore);
                    };
                    self.inbuf.drain(..used);
                    if !ok {
                        return Err(proto("SOCKS5 authentication failed"));
                    }
                    self.out.append(&mut self.request);
                    self.step = Step::Socks5Reply;
                }
                Step::Socks5Reply => {
                    let Some((reply, used)) = done(upstream::parse_socks5_reply(&self.inbuf))?
                    else {
                        return Ok(Progress::NeedMore);
                    };
                    if reply.rep != 0 {
                        let why = upstream::failure_from_socks5_reply(reply.rep).label();
                        return Err(proto(format!("SOCKS5 reply: {why} ({})", reply.rep)));
                    }
                    self.inbuf.drain(..used);
                    let bound = match reply.bnd {
                        TargetAddr::Ip(a) => Some(a),
                        TargetAddr::Domain(..) => None,
                    };
                    return Ok(self.finish(bound));
                }
                Step::Socks4Reply => {
                    let Some(((cd, _), used)) = done(socks4::parse_reply(&self.inbuf))? else {
                        return Ok(Progress::NeedMore);
                    };
                    self.inbuf.drain(..used);
                    if cd != socks4::REPLY_GRANTED {
                        return Err(proto(format!("SOCKS4 request rejected (code {cd:#04x})")));
                    }
                    return Ok(self.finish(None));
                }
                Step::HttpReply => {
                    let Some((reply, used)) =
                        done(upstream::parse_http_connect_reply(&self.inbuf))?
                    else {
                        return Ok(Progress::NeedMore);
                    };
                    if !(200..300).contains(&reply.status) {
                        return Err(proto(format!(
                            "HTTP proxy refused CONNECT: status {}",
                            reply.status
                        )));
                    }
                    self.inbuf.drain(..used);
                    return Ok(self.finish(None));
                }
                Step::Done => return Ok(self.finish(None)),
            }
        }
    }

    /// Complete the handshake, handing over whatever tunnel bytes arrived with the reply.
    fn finish(&mut self, bound: Option<SocketAddr>) -> Progress {
        self.step = Step::Done;
        Progress::Done(Established {
            bound,
            leftover: std::mem::take(&mut self.inbuf),
        })
    }
}

/// An established tunnel over a blocking socket.
#[derive(Debug)]
pub(crate) struct Tunnel {
    /// The socket (to the proxy, or to the target for `direct`).
    pub(crate) stream: TcpStream,
    /// Tunnel bytes that arrived together with the proxy reply.
    pub(crate) leftover: Vec<u8>,
    /// Bound address reported by the proxy.
    pub(crate) bound: Option<SocketAddr>,
}

/// Open a blocking TCP tunnel to `target` through `proxy` (or straight to it for `direct`).
pub(crate) fn connect(
    proxy: &ProxySpec,
    target: &Endpoint,
    timeout: Duration,
) -> io::Result<Tunnel> {
    let dest = target.dest(proxy.scheme);
    let hs = Handshake::new(proxy, &dest, Command::Connect)?;
    let addr = proxy.addr.unwrap_or(target.addr);
    let stream = connect_stream(addr, timeout)?;
    drive(stream, hs)
}

/// Open the SOCKS5 control connection for UDP ASSOCIATE, announcing `udp_src` as our source.
pub(crate) fn udp_associate(
    proxy: &ProxySpec,
    udp_src: SocketAddr,
    timeout: Duration,
) -> io::Result<Tunnel> {
    let addr = proxy
        .addr
        .ok_or_else(|| invalid("UDP ASSOCIATE needs a proxy"))?;
    let hs = Handshake::new(proxy, &Dest::Ip(udp_src), Command::UdpAssociate)?;
    let stream = connect_stream(addr, timeout)?;
    drive(stream, hs)
}

/// Connect with a timeout and set the options every mode wants (no Nagle, bounded blocking).
fn connect_stream(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Run the handshake to completion on a blocking socket.
fn drive(mut stream: TcpStream, mut hs: Handshake) -> io::Result<Tunnel> {
    let mut buf = [0u8; 4096];
    if hs.is_done() {
        return Ok(Tunnel {
            stream,
            leftover: Vec::new(),
            bound: None,
        });
    }
    loop {
        if !hs.output().is_empty() {
            stream.write_all(hs.output())?;
            let n = hs.output().len();
            hs.consume_output(n);
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "proxy closed the connection during the handshake",
            ));
        }
        if let Progress::Done(est) = hs.input(&buf[..n])? {
            return Ok(Tunnel {
                stream,
                leftover: est.leftover,
                bound: est.bound,
            });
        }
    }
}

/// A parsed reply and its length, `None` while incomplete; a malformed reply is an error.
fn done<T>(r: Result<Parse<T>, proto::ProtoError>) -> io::Result<Option<(T, usize)>> {
    match r {
        Ok(Parse::Done(v, used)) => Ok(Some((v, used))),
        Ok(Parse::Incomplete) => Ok(None),
        Err(e) => Err(proto(format!("malformed proxy reply: {e:?}"))),
    }
}

/// The destination in the library's form; a domain must be a valid host name of at most 255 bytes.
pub(crate) fn target(dest: &Dest) -> io::Result<TargetAddr> {
    match dest {
        Dest::Ip(a) => Ok(TargetAddr::Ip(*a)),
        Dest::Domain(name, port) => Name::new(name.as_bytes())
            .map(|n| TargetAddr::Domain(n, *port))
            .ok_or_else(|| invalid("domain name must be 1..=255 printable bytes")),
    }
}

/// Runs a library encoder into a buffer of `cap` bytes; its 0 ("cannot be expressed") becomes `what`.
fn encoded(cap: usize, what: &str, f: impl FnOnce(&mut [u8]) -> usize) -> io::Result<Vec<u8>> {
    let mut m = vec![0u8; cap];
    let n = f(&mut m);
    if n == 0 {
        return Err(invalid(what));
    }
    m.truncate(n);
    Ok(m)
}

/// SOCKS5 greeting offering no-auth, plus username/password when we have credentials.
fn socks5_greeting(with_auth: bool) -> Vec<u8> {
    let methods: &[u8] = if with_auth {
        &[socks5::METHOD_NO_AUTH, socks5::METHOD_USER_PASS]
    } else {
        &[socks5::METHOD_NO_AUTH]
    };
    let mut m = [0u8; 4];
    let n = socks5::encode_greeting(methods, &mut m);
    m[..n].to_vec()
}

/// RFC 1929 username/password message.
fn socks5_auth(user: &str, pass: &str) -> io::Result<Vec<u8>> {
    encoded(
        socks5::MAX_USER_PASS_LEN,
        "SOCKS5 username/password must be 1..=255 bytes",
        |m| socks5::encode_user_pass(user.as_bytes(), pass.as_bytes(), m),
    )
}

/// RFC 1928 request: VER CMD RSV ATYP DST.ADDR DST.PORT.
fn socks5_request(cmd: Command, target: &TargetAddr) -> io::Result<Vec<u8>> {
    let cmd = match cmd {
        Command::Connect => socks5::Command::Connect,
        Command::UdpAssociate => socks5::Command::UdpAssociate,
    };
    encoded(socks5::MAX_REQUEST_LEN, "SOCKS5 request", |m| {
        socks5::encode_request(cmd, target, m)
    })
}

/// SOCKS4 CONNECT (IPv4) or SOCKS4a CONNECT (domain, with the 0.0.0.x marker address).
fn socks4_request(target: &TargetAddr, userid: &str) -> io::Result<Vec<u8>> {
    encoded(
        socks4::MAX_REQUEST_LEN,
        "SOCKS4 cannot express this request (IPv6 target, or a NUL in the user id)",
        |m| socks4::encode_request(socks4::Command::Connect, target, userid.as_bytes(), m),
    )
}

/// HTTP/1.1 CONNECT request, with Basic proxy auth when credentials are given.
fn http_connect_request(target: &TargetAddr, creds: Option<(&str, &str)>) -> io::Result<Vec<u8>> {
    let creds = creds.map(|(u, p)| (u.as_bytes(), p.as_bytes()));
    encoded(
        upstream::MAX_HTTP_CONNECT_LEN,
        "HTTP CONNECT cannot express this target or these credentials",
        |m| upstream::encode_http_connect(target, creds, m),
    )
}

/// `Proxy-Authorization: Basic ...\r\n` header line, if credentials are given.
pub(crate) fn proxy_authorization(creds: Option<(&str, &str)>) -> Option<String> {
    use base64::Engine as _;
    creds.map(|(u, p)| {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        format!("Proxy-Authorization: Basic {token}\r\n")
    })
}

/// Three-digit status code from an `HTTP/1.x NNN reason` line.
pub(crate) fn parse_status_code(line: &str) -> Option<u16> {
    let mut parts = line.split_ascii_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// Position of `needle` in `hay`.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Error for malformed proxy answers.
fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Error for requests we cannot express.
fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::parse_proxy;

    fn v4(s: &str) -> Dest {
        Dest::Ip(s.parse().unwrap())
    }

    #[test]
    fn socks5_encoding() {
        assert_eq!(socks5_greeting(false), [5, 1, 0]);
        assert_eq!(socks5_greeting(true), [5, 2, 0, 2]);
        assert_eq!(socks5_auth("u", "pw").unwrap(), [1, 1, b'u', 2, b'p', b'w']);
        assert!(socks5_auth("", "pw").is_err());
        let t = |d: &Dest| target(d).unwrap();
        assert_eq!(
            socks5_request(Command::Connect, &t(&v4("127.0.0.1:8080"))).unwrap(),
            [5, 1, 0, 1, 127, 0, 0, 1, 0x1f, 0x90]
        );
        let d = Dest::Domain("localhost".into(), 80);
        let mut want = vec![5, 1, 0, 3, 9];
        want.extend_from_slice(b"localhost");
        want.extend_from_slice(&[0, 80]);
        assert_eq!(socks5_request(Command::Connect, &t(&d)).unwrap(), want);
        assert!(target(&Dest::Domain(String::new(), 80)).is_err());
        let v6 = socks5_request(Command::UdpAssociate, &t(&v4("[::1]:1"))).unwrap();
        assert_eq!(&v6[..4], &[5, 3, 0, 4]);
        assert_eq!(v6.len(), 4 + 16 + 2);
        assert_eq!(v6[19], 1);
        assert_eq!(&v6[20..], &[0, 1]);
    }

    #[test]
    fn socks4_encoding() {
        let t = |d: &Dest| target(d).unwrap();
        assert_eq!(
            socks4_request(&t(&v4("127.0.0.1:80")), "bob").unwrap(),
            [4, 1, 0, 80, 127, 0, 0, 1, b'b', b'o', b'b', 0]
        );
        assert_eq!(
            socks4_request(&t(&Dest::Domain("lo".into(), 80)), "").unwrap(),
            [4, 1, 0, 80, 0, 0, 0, 1, 0, b'l', b'o', 0]
        );
        assert!(socks4_request(&t(&v4("[::1]:80")), "").is_err());
    }

    #[test]
    fn http_connect_encoding() {
        let dest = target(&v4("127.0.0.1:9")).unwrap();
        let r = http_connect_request(&dest, Some(("Aladdin", "open sesame"))).unwrap();
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\
             Proxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n\r\n"
        );
        assert_eq!(
            proxy_authorization(Some(("Aladdin", "open sesame"))).unwrap(),
            "Proxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n"
        );
        assert!(http_connect_request(&dest, Some(("a:b", "c"))).is_err());
    }

    #[test]
    fn socks5_handshake_with_auth_byte_by_byte() {
        let p = parse_proxy("socks5://u:p@127.0.0.1:1080").unwrap();
        let mut hs = Handshake::new(&p, &v4("127.0.0.1:80"), Command::Connect).unwrap();
        assert_eq!(hs.output(), [5, 2, 0, 2]);
        hs.consume_output(4);
        assert_eq!(hs.input(&[5]).unwrap(), Progress::NeedMore);
        assert_eq!(hs.input(&[2]).unwrap(), Progress::NeedMore);
        assert_eq!(hs.output(), [1, 1, b'u', 1, b'p']);
        hs.consume_output(5);
        assert_eq!(hs.input(&[1, 0]).unwrap(), Progress::NeedMore);
        assert_eq!(hs.output(), [5, 1, 0, 1, 127, 0, 0, 1, 0, 80]);
        hs.consume_output(10);
        let reply = [5, 0, 0, 1, 127, 0, 0, 1, 0x04, 0x38, b'h', b'i'];
        let mut done = None;
        for b in reply {
            if let Progress::Done(e) = hs.input(&[b]).unwrap() {
                done = Some(e);
            }
        }
        // The reply completes at byte 10; tunnel bytes arriving later are not ours to
        // parse, so feed the reply in one go to check leftover handling.
        assert!(done.is_some());
        let mut hs = Handshake::new(&p, &v4("127.0.0.1:80"), Command::Connect).unwrap();
        hs.consume_output(4);
        hs.input(&[5, 0]).unwrap();
        match hs.input(&reply).unwrap() {
            Progress::Done(e) => {
                assert_eq!(e.bound, Some("127.0.0.1:1080".parse().unwrap()));
                assert_eq!(e.leftover, b"hi");
            }
            Progress::NeedMore => panic!("reply was complete"),
        }
    }

    #[test]
    fn handshake_errors() {
        let p = parse_proxy("socks5://127.0.0.1:1080").unwrap();
        let mut hs = Handshake::new(&p, &v4("127.0.0.1:80"), Command::Connect).unwrap();
        assert!(
            hs.input(&[5, 2]).is_err(),
            "auth demanded but no credentials"
        );
        let mut hs = Handshake::new(&p, &v4("127.0.0.1:80"), Command::Connect).unwrap();
        hs.input(&[5, 0]).unwrap();
        let e = hs.input(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(e.to_string(), "SOCKS5 reply: refused (5)");
        let h = parse_proxy("http://127.0.0.1:8080").unwrap();
        let mut hs = Handshake::new(&h, &v4("127.0.0.1:80"), Command::Connect).unwrap();
        assert!(hs.input(b"HTTP/1.1 407 Proxy Auth\r\n\r\n").is_err());
        let mut hs = Handshake::new(&h, &v4("127.0.0.1:80"), Command::Connect).unwrap();
        assert_eq!(
            hs.input(b"HTTP/1.1 200 Connection established\r\n\r\nxyz")
                .unwrap(),
            Progress::Done(Established {
                bound: None,
                leftover: b"xyz".to_vec()
            })
        );
        let s4 = parse_proxy("socks4://127.0.0.1:1080").unwrap();
        let mut hs = Handshake::new(&s4, &v4("127.0.0.1:80"), Command::Connect).unwrap();
        assert!(hs.input(&[0, 0x5B, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(Handshake::new(&s4, &v4("127.0.0.1:80"), Command::UdpAssociate).is_err());
    }
}
