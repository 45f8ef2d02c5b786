//! Destination policy against the real binary: `--deny-dest` on BIND, the policy file (`--policy`): rules by name,
//! address, port, command, user and client, per-user limits and egress addresses, `--check-config` and reload.
//! Names resolve through `--resolve`, never the machine's DNS.

mod common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Connects to `to` from source address `from_ip` (any 127/8 address is local on Linux).
fn connect_from(from_ip: Ipv4Addr, to: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((from_ip, 0)).into()).unwrap();
    s.connect_timeout(&to.into(), IO_TIMEOUT).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Sends a SOCKS5 no-auth greeting and checks the method answer.
fn greet(s: &mut TcpStream) {
    s.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_n(s, 2), vec![5, 0]);
}

/// True when the peer closed `s` (EOF or reset) without sending anything more.
fn peer_closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// BIND obeys --deny-dest (issue 13's first bug)
// ---------------------------------------------------------------------------------------------------------------

/// A BIND whose expected peer is denied is refused in the first reply: SOCKS5 0x02, SOCKS4 CD 91.
#[test]
fn bind_expecting_denied_peer_is_refused() {
    let proxy = Proxy::start(&["--deny-dest", "127.0.0.0/8"]);
    let mut s = connect(proxy.addr());
    greet(&mut s);
    s.write_all(&socks5_request(2, "127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let (rep, _) = read_socks5_reply(&mut s);
    assert_eq!(rep, 0x02, "SOCKS5 BIND expecting a denied peer");
    assert!(peer_closed(&mut s), "connection closed after the refusal");

    let mut s = connect(proxy.addr());
    s.write_all(&socks4_request(2, 0, [127, 0, 0, 1], b"u", None))
        .unwrap();
    let r = read_n(&mut s, 8);
    assert_eq!(&r[..2], &[0, 91], "SOCKS4 BIND expecting a denied peer");
    assert!(peer_closed(&mut s));
    // A CONNECT to the same address gets the same answer (the rules are one policy).
    assert_eq!(
        socks5_connect(proxy.addr(), "127.0.0.1:9".parse().unwrap()).err(),
        Some(0x02)
    );
}

/// A BIND naming no peer: an inbound peer from a denied address is closed without a byte of the tunnel, and the
/// client's second reply is 0x02 (SOCKS4: 91).
#[test]
fn bind_inbound_peer_denied_is_closed() {
    let proxy = Proxy::start(&["--deny-dest", "127.0.0.2/32"]);
    let mut ctl = connect(proxy.addr());
    greet(&mut ctl);
    ctl.write_all(&socks5_request(2, "0.0.0.0:0".parse().unwrap()))
        .unwrap();
    let (rep, listen) = read_socks5_reply(&mut ctl);
    assert_eq!(rep, 0, "first reply");
    let mut peer = connect_from(Ipv4Addr::new(127, 0, 0, 2), listen);
    let (rep2, _) = read_socks5_reply(&mut ctl);
    assert_eq!(rep2, 0x02, "second reply for a denied inbound peer");
    assert!(peer_closed(&mut peer), "denied peer is closed");
    assert!(peer_closed(&mut ctl), "control connection closed");

    let mut ctl = connect(proxy.addr());
    ctl.write_all(&socks4_request(2, 0, [0, 0, 0, 0], b"u", None))
        .unwrap();
    let r1 = read_n(&mut ctl, 8);
    assert_eq!(&r1[..2], &[0, 90]);
    let port = u16::from_be_bytes([r1[2], r1[3]]);
    let mut peer = connect_from(
        Ipv4Addr::new(127, 0, 0, 2),
        SocketAddr::from(([127, 0, 0, 1], port)),
    );
    let r2 = read_n(&mut ctl, 8);
    assert_eq!(&r2[..2], &[0, 91], "SOCKS4 second reply for a denied peer");
    assert!(peer_closed(&mut peer));

    // An allowed peer (127.0.0.3) is still served.
    let mut ctl = connect(proxy.addr());
    greet(&mut ctl);
    ctl.write_all(&socks5_request(2, "0.0.0.0:0".parse().unwrap()))
        .unwrap();
    let (_, listen) = read_socks5_reply(&mut ctl);
    let mut peer = connect_from(Ipv4Addr::new(127, 0, 0, 3), listen);
    let (rep2, from) = read_socks5_reply(&mut ctl);
    assert_eq!(rep2, 0);
    assert_eq!(from, peer.local_addr().unwrap());
    peer.write_all(b"hello").unwrap();
    assert_eq!(read_n(&mut ctl, 5), b"hello".to_vec());
}
