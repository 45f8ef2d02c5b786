//! UDP ASSOCIATE and BIND against the real binary: raw clients that check every byte, plus the `socks` crate.

use crate::common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How long "nothing comes back" is watched for. Loopback delivers in microseconds, so this is wide.
const QUIET: Duration = Duration::from_millis(300);
/// Bound for polling metrics and fd counts.
const POLL_LIMIT: Duration = Duration::from_secs(10);

const DROP_FOREIGN: &str = "socksgate_udp_drops_total{reason=\"foreign_source\"}";
const DROP_FRAG: &str = "socksgate_udp_drops_total{reason=\"fragmented\"}";
const DROP_DENIED: &str = "socksgate_udp_drops_total{reason=\"denied\"}";
const UDP_UP: &str = "socksgate_udp_datagrams_total{direction=\"up\"}";
const UDP_DOWN: &str = "socksgate_udp_datagrams_total{direction=\"down\"}";

fn with_metrics(extra: &[&str]) -> Proxy {
    let mut args = vec!["--metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

/// Sends a SOCKS5 no-auth greeting and checks the method choice.
fn greet(s: &mut TcpStream) {
    s.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_n(s, 2), vec![5, 0], "method choice");
}

/// Sends UDP ASSOCIATE with `hint` as DST; returns the control connection and the reply (REP, BND).
fn associate_raw(proxy: SocketAddr, hint: SocketAddr) -> (TcpStream, u8, SocketAddr) {
    let mut s = connect(proxy);
    greet(&mut s);
    s.write_all(&socks5_request(3, hint)).unwrap();
    let (rep, bnd) = read_socks5_reply(&mut s);
    (s, rep, bnd)
}

/// A successful association: the control connection and the relay address, checked to be usable.
fn associate(proxy: SocketAddr, hint: SocketAddr) -> (TcpStream, SocketAddr) {
    let (s, rep, bnd) = associate_raw(proxy, hint);
    assert_eq!(rep, 0, "UDP ASSOCIATE reply");
    assert_eq!(
        bnd.ip(),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        "BND.ADDR must be reachable, got {bnd}"
    );
    assert_ne!(bnd.port(), 0, "BND.PORT");
    (s, bnd)
}

/// A client UDP socket on 127.0.0.1 with a generous receive timeout.
fn udp_client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// RFC 1928 §7 datagram: RSV RSV FRAG ATYP ADDR PORT DATA.
fn dgram_frag(frag: u8, target: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut d = vec![0, 0, frag];
    match target {
        SocketAddr::V4(a) => {
            d.push(1);
            d.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            d.push(4);
            d.extend_from_slice(&a.ip().octets());
        }
    }
    d.extend_from_slice(&target.port().to_be_bytes());
    d.extend_from_slice(payload);
    d
}

fn dgram(target: SocketAddr, payload: &[u8]) -> Vec<u8> {
    dgram_frag(0, target, payload)
}

fn dgram_domain(host: &str, port: u16, payload: &[u8]) -> Vec<u8> {
    let mut d = vec![0, 0, 0, 3, host.len() as u8];
    d.extend_from_slice(host.as_bytes());
    d.extend_from_slice(&port.to_be_bytes());
    d.extend_from_slice(payload);
    d
}

/// Splits a relayed datagram into (source address in the header, payload); the header must be RSV 0, FRAG 0 and an
/// address type 1 or 4 (never a domain).
fn parse_dgram(d: &[u8]) -> (SocketAddr, &[u8]) {
    assert!(d.len() >= 10, "short datagram {d:?}");
    assert_eq!(&d[..3], &[0, 0, 0], "RSV/FRAG of a relayed datagram");
    match d[3] {
        1 => {
            let a = SocketAddr::from(([d[4], d[5], d[6], d[7]], u16::from_be_bytes([d[8], d[9]])));
            (a, &d[10..])
        }
        4 => {
            assert!(d.len() >= 22, "short IPv6 datagram");
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&d[4..20]);
            (
                SocketAddr::from((ip, u16::from_be_bytes([d[20], d[21]]))),
                &d[22..],
            )
        }
        other => panic!("ATYP {other} in a relayed datagram"),
    }
}

/// Receives one datagram from `relay` (datagrams from anyone else fail the test).
fn recv_relayed(s: &UdpSocket, relay: SocketAddr) -> Vec<u8> {
    let mut buf = vec![0u8; 70_000];
    let (n, from) = s.recv_from(&mut buf).expect("relayed datagram");
    assert_eq!(
        from, relay,
        "replies must come from the advertised relay address"
    );
    buf.truncate(n);
    buf
}

/// True when nothing arrives on `s` within `wait`.
fn quiet(s: &UdpSocket, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = vec![0u8; 70_000];
    let r = s.recv_from(&mut buf);
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    match r {
        Ok((n, from)) => {
            eprintln!("unexpected datagram of {n} bytes from {from}");
            false
        }
        Err(e) => matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

/// One echo round trip through the association, checking header and payload.
fn round_trip(s: &UdpSocket, relay: SocketAddr, target: SocketAddr, payload: &[u8]) {
    s.send_to(&dgram(target, payload), relay).unwrap();
    let d = recv_relayed(s, relay);
    let (src, data) = parse_dgram(&d);
    assert_eq!(src, target, "reply header names the answering remote");
    assert_eq!(data, payload);
}

/// A UDP echo on the dual-stack wildcard, so a name resolving to 127.0.0.1 or ::1 reaches it on one port.
struct DualEcho {
    port: u16,
    _echo: UdpEcho,
}

impl DualEcho {
    fn start() -> DualEcho {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        s.set_only_v6(false).unwrap();
        s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)).into())
            .unwrap();
        let echo = UdpEcho::on(s.into());
        DualEcho {
            port: echo.addr.port(),
            _echo: echo,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// UDP ASSOCIATE
// ---------------------------------------------------------------------------------------------------------------

/// 500 datagrams of distinct sizes between 1 and 65,000 bytes, with DST 0.0.0.0:0 (the port is learned from the
/// first datagram). Each size is used once, so the size identifies the datagram and the check is
/// order-insensitive; payloads are compared by digest. Bytes in flight are bounded well below the default socket
/// receive buffer so the kernel never has a reason to drop.
#[test]
fn udp_associate_echoes_500_datagrams_of_all_sizes() {
    let echo = UdpEcho::start();
    let proxy = with_metrics(&[]);
    let (_ctl, relay) = associate(proxy.addr(), "0.0.0.0:0".parse().unwrap());
    let client = udp_client();

    const N: usize = 500;
    // Sizes 1, 131, 261, ... 65,000 (distinct), sent in a scrambled order so big and small interleave.
    let sizes: Vec<usize> = (0..N).map(|i| 1 + i * 64_999 / (N - 1)).collect();
    let order: Vec<usize> = (0..N).map(|i| (i * 293) % N).collect();
    {
        let mut seen = order.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), N, "order is a permutation");
    }
    let expected: HashMap<usize, u64> = (0..N)
        .map(|i| (sizes[i], digest(&pseudo_random(i as u64 + 1, sizes[i]))))
        .collect();
    const WINDOW: usize = 128 * 1024;
    let mut in_flight: HashMap<usize, usize> = HashMap::new(); // size -> size (bytes outstanding)
    let mut bytes_out = 0usize;
    let mut next = 0usize;
    let mut got = 0usize;
    let mut buf = vec![0u8; 70_000];
    while got < N {
        while next < N {
            let i = order[next];
            let size = sizes[i];
            if !in_flight.is_empty() && bytes_out + size > WINDOW {
                break;
            }
            let payload = pseudo_random(i as u64 + 1, size);
            client.send_to(&dgram(echo.addr, &payload), relay).unwrap();
            in_flight.insert(size, size);
            bytes_out += size;
            next += 1;
        }
        let (n, from) = client.recv_from(&mut buf).unwrap_or_else(|e| {
            panic!(
                "waiting for reply {got} of {N} ({} in flight): {e}",
                in_flight.len()
            )
        });
        assert_eq!(from, relay);
        let (src, data) = parse_dgram(&buf[..n]);
        assert_eq!(src, echo.addr);
        let size = data.len();
        assert!(
            in_flight.remove(&size).is_some(),
            "unexpected or duplicate datagram of {size} bytes"
        );
        assert_eq!(
            digest(data),
            expected[&size],
            "payload of the {size}-byte datagram"
        );
        bytes_out -= size;
        got += 1;
    }
    wait_metric(&proxy, UDP_UP, N as u64);
    wait_metric(&proxy, UDP_DOWN, N as u64);
}

/// A burst of 130 datagrams sent without waiting: more than the relay handles per turn (64), so the association
/// has to yield and come back on its own (edge-triggered readiness is not re-signalled). Small datagrams, so the
/// burst fits the default socket buffers and the kernel has no reason to drop.
#[test]
fn udp_burst_larger_than_one_turn() {
    let echo = UdpEcho::start();
    let proxy = with_metrics(&[]);
    let (_ctl, relay) = associate(proxy.addr(), "0.0.0.0:0".parse().unwrap());
    let client = udp_client();
    round_trip(&client, relay, echo.addr, b"learn");
    const N: u32 = 130;
    for i in 0..N {
        client
            .send_to(&dgram(echo.addr, &i.to_be_bytes()), relay)
            .unwrap();
    }
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let d = recv_relayed(&client, relay);
        let (src, data) = parse_dgram(&d);
        assert_eq!(src, echo.addr);
        let i = u32::from_be_bytes(data.try_into().expect("4-byte payload")) as usize;
        assert!(!seen[i], "datagram {i} twice");
        seen[i] = true;
    }
    wait_metric(&proxy, UDP_UP, u64::from(N) + 1);
    wait_metric(&proxy, UDP_DOWN, u64::from(N) + 1);
}

/// 200 datagrams each way through one association, two targets, in bursts of 100 sent without waiting: more than
/// one batch (32) and one turn (64) at a time, in runs of equal sizes to one target (which leave as one GSO message)
/// cut by size and by target changes. In each direction every payload must arrive once, whole and in order, and the
/// counters must match. Bursts of small datagrams fit the default socket buffers, so the kernel never has a reason
/// to drop.
#[test]
fn udp_bursts_keep_order_both_ways() {
    bursts_keep_order([udp_client(), udp_client()]);
}

/// The same with an IPv4 and an IPv6 target in one association (IPv4 goes out mapped on the dual-stack socket):
/// each target keeps its order both ways, and closing the association closes every socket it opened.
#[test]
fn udp_bursts_to_ipv4_and_ipv6_targets_keep_order_both_ways() {
    let Ok(six) = UdpSocket::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here: skipped");
        return;
    };
    six.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    bursts_keep_order([udp_client(), six]);
}

fn bursts_keep_order(targets: [UdpSocket; 2]) {
    let proxy = with_metrics(&[]);
    let base = proxy.fd_baseline();
    let (ctl, relay) = associate(proxy.addr(), "0.0.0.0:0".parse().unwrap());
    let client = udp_client();
    for s in [&client, &targets[0], &targets[1]] {
        socket2::SockRef::from(s)
            .set_recv_buffer_size(1 << 20)
            .unwrap();
    }
    let taddr = [
        targets[0].local_addr().unwrap(),
        targets[1].local_addr().unwrap(),
    ];
    const N: usize = 200;
    const BURST: usize = 100;
    // (target, payload): runs of 1..=6 datagrams of one size to one target; the first 4 bytes number them.
    let mut plan: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut run = 0;
    while plan.len() < N {
        let len = [4, 17, 64, 120, 255, 300, 64][run % 7];
        for _ in 0..(run % 6 + 1).min(N - plan.len()) {
            let i = plan.len();
            let mut p = (i as u32).to_be_bytes().to_vec();
            p.extend(pseudo_random(i as u64 + 7, len - 4));
            plan.push(((run / 2) % 2, p));
        }
        run += 1;
    }
    let mut buf = vec![0u8; 70_000];
    let mut out_addr = [None, None];
    // Up: each target gets its own datagrams in the order the client sent them, all from one outbound socket (the
    // same one for targets of one family).
    for burst in plan.chunks(BURST) {
        for (t, p) in burst {
            client.send_to(&dgram(taddr[*t], p), relay).unwrap();
        }
        for (t, want) in [0, 1].map(|t| (t, burst.iter().filter(move |(x, _)| *x == t))) {
            for (_, p) in want {
                let (n, from) = targets[t].recv_from(&mut buf).unwrap_or_else(|e| {
                    panic!(
                        "target {t} waiting for datagram {}: {e}",
                        u32::from_be_bytes(p[..4].try_into().unwrap())
                    )
                });
                assert_eq!(
                    *out_addr[t].get_or_insert(from),
                    from,
                    "one outbound socket"
                );
                assert_eq!(
                    (n, digest(&buf[..n])),
                    (p.len(), digest(p)),
                    "target {t}: datagram {} (got number {})",
                    u32::from_be_bytes(p[..4].try_into().unwrap()),
                    u32::from_be_bytes(buf[..4].try_into().unwrap())
                );
            }
        }
    }
    let out_addr = out_addr.map(|a| a.expect("datagrams reached the targets"));
    let same_family = taddr[0].is_ipv4() == taddr[1].is_ipv4();
    if same_family {
        assert_eq!(out_addr[0], out_addr[1], "one outbound socket");
    }
    wait_metric(&proxy, UDP_UP, N as u64);
    // Down: the targets answer in the same interleaving; the client gets every one, each header naming the target
    // that sent it. For targets of one family the interleaving itself is asserted; across families only each
    // target's own order is, which is all UDP promises for datagrams from different hosts (a proxy may well keep a
    // socket per family).
    for burst in plan.chunks(BURST) {
        for (t, p) in burst {
            targets[*t].send_to(p, out_addr[*t]).unwrap();
        }
        let mut want: [Vec<&Vec<u8>>; 2] = [0, 1].map(|t| {
            burst
                .iter()
                .filter(|(x, _)| *x == t)
                .map(|(_, p)| p)
                .collect()
        });
        for (t, p) in burst {
            let d = recv_relayed(&client, relay);
            let (src, data) = parse_dgram(&d);
            let (t, p) = if same_family {
                (*t, p)
            } else {
                let from = taddr
                    .iter()
                    .position(|a| *a == src)
                    .unwrap_or_else(|| panic!("datagram from {src}, not a target"));
                assert!(
                    !want[from].is_empty(),
                    "more datagrams from {src} than sent"
                );
                (from, want[from].remove(0))
            };
            assert_eq!(
                (src, data.len(), digest(data)),
                (taddr[t], p.len(), digest(p)),
                "client: datagram {} (got number {})",
                u32::from_be_bytes(p[..4].try_into().unwrap()),
                u32::from_be_bytes(data[..4].try_into().unwrap())
            );
        }
    }
    wait_metric(&proxy, UDP_DOWN, N as u64);
    assert_eq!(
        proxy.metric("socksgate_udp_drops_total{reason=\"send_failed\"}"),
        0
    );
    drop(ctl);
    base.assert_back(Duration::from_secs(5), "after the association ended");
}

/// A datagram for "localhost" is resolved by the proxy (once, then cached) and the reply header carries the
/// answering IP, never the name.
#[test]
fn udp_domain_target_localhost() {
    let echo = DualEcho::start();
    let proxy = with_metrics(&[]);
    let (_ctl, relay) = associate(proxy.addr(), "0.0.0.0:0".parse().unwrap());
    let client = udp_client();
    for k in 0..5u64 {
        let payload = pseudo_random(100 + k, 700);
        client
            .send_to(&dgram_domain("localhost", echo.port, &payload), relay)
            .unwrap();
        let d = recv_relayed(&client, relay);
        let (src, data) = parse_dgram(&d);
        assert!(src.ip().is_loopback(), "reply source {src}");
        assert_eq!(src.port(), echo.port);
        assert_eq!(data, &payload[..]);
    }
    wait_metric(&proxy, "socksgate_dns_lookups_total", 1);
    wait_metric(&proxy, "socksgate_dns_failures_total", 0);
}

/// Several names in flight at once on one association: each datagram must go to the address of *its own* name.
/// "localhost" goes through getaddrinfo (slower) and is sent first; three `--resolve` names (instant, ::1) follow,
/// so with several resolver threads their answers usually return before the first one. Every reply must come from
/// the address its name resolves to: "A" from 127.0.0.1, "B" from ::1. Repeated over many associations, because
/// answer order depends on thread scheduling; a correct relay passes every round.
#[test]
fn udp_domain_answers_matched_to_their_names() {
    let echo = DualEcho::start();
    let proxy = with_metrics(&[
        "--resolver-threads",
        "4",
        "--resolve",
        "s1.test=::1",
        "--resolve",
        "s2.test=::1",
        "--resolve",
        "s3.test=::1",
    ]);
    let localhost_is_v4_only = std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 0))
        .map(|it| it.collect::<Vec<_>>())
        .unwrap_or_default()
        .iter()
        .all(|a| a.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST));
    for round in 0..300 {
        let (_ctl, relay) = associate(proxy.addr(), "0.0.0.0:0".parse().unwrap());
        let client = udp_client();
        client
            .send_to(&dgram_domain("localhost", echo.port, b"A"), relay)
            .unwrap();
        for name in ["s1.test", "s2.test", "s3.test"] {
            client
                .send_to(&dgram_domain(name, echo.port, b"B"), relay)
                .unwrap();
        }
        for _ in 0..4 {
            let d = recv_relayed(&client, relay);
            let (src, data) = parse_dgram(&d);
            match data {
                b"B" => assert_eq!(
                    src.ip(),
                    "::1".parse::<IpAddr>().unwrap(),
                    "round {round}: a datagram for s*.test (::1) was sent to {src}: another name's answer was applied"
                ),
                b"A" if localhost_is_v4_only => assert_eq!(
                    src.ip(),
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    "round {round}: the datagram for localhost was sent to {src}"
                ),
                b"A" => assert!(src.ip().is_loopback()),
                other => panic!("unexpected payload {other:?}"),
            }
        }
    }
}

/// DST 0.0.0.0:<real port> (what PySocks sends): the association is pinned to that port; a datagram from another
/// port of the same host is dropped and counted.
#[test]
fn udp_declared_port_pins_source_and_foreign_port_is_dropped() {
    let echo = UdpEcho::start();
    let proxy = with_metrics(&[]);
    let client = udp_client();
    let declared = SocketAddr::from(([0, 0, 0, 0], client.local_addr().unwrap().port()));
    let (_ctl, relay) = associate(proxy.addr(), declared);
    round_trip(&client, relay, echo.addr, b"from the declared port");

    let intruder = udp_client();
    intruder
        .send_to(&dgram(echo.addr, b"from another port"), relay)
        .unwrap();
    assert!(
        wait_until(POLL_LIMIT, &mut || proxy.metric(DROP_FOREIGN) == 1),
        "udp_drops_total{{reason=\"foreign_source\"}} did not reach 1"
    );
    assert!(
        quiet(&intruder, QUIET),
        "the foreign datagram was answered to the intruder"
    );
    assert!(quiet(&client, QUIET), "the foreign datagram was relayed");
    wait_metric(&proxy, UDP_UP, 1);
    // The association still works for its owner.
    round_trip(&client, relay, echo.addr, b"still alive");
    wait_metric(&proxy, DROP_FOREIGN, 1);
}

/// DST 0.0.0.0:0: the first datagram's source port is learned; later datagrams from another port are dropped.
#[test]
fn udp_learned_port_rejects_other_ports() {
    let echo = UdpEcho::start();
    let proxy = with_metrics(&[]);
    let (_ctl, relay) = associate(proxy.addr(), "0.0.0.0:0".parse().unwrap());
    let client = udp_client();
    round_trip(
        &client,
        relay,
        echo.addr,
        b"first datagram teaches the port",
    );
    let intruder = udp_client();
    intruder
        .send_to(&dgram(echo.addr, b"second port"), relay)
        .unwrap();
    assert!(wait_until(POLL_LIMIT, &mut || proxy.metric(DROP_FOREIGN) == 1));
    assert!(quiet(&intruder, QUIET));
    assert!(quiet(&client, QUIET));
    round_trip(&client, relay, echo.addr, b"owner unaffected");
}

/// With DST 0.0.0.0:0 the port is learned, but only from the control connection's IP: a first datagram from
/// another host (127.0.0.2) is dropped and does not claim the association.
#[test]
fn udp_other_ip_cannot_claim_unlearned_association() {
    let echo = UdpEcho::start();
    let proxy = with_metrics(&[]);
    let (_ctl, relay) = associate(proxy.addr(), "0.0.0.0:0".parse().unwrap());
    let intruder = UdpSocket::bind("127.0.0.2:0").unwrap();
    intruder
        .send_to(&dgram(echo.addr, b"hijack"), relay)
        .unwrap();
    assert!(wait_until(POLL_LIMIT, &mut || proxy.metric(DROP_FOREIGN) == 1));
    assert!(
        quiet(&intruder, QUIET),
        "a datagram from another IP was relayed"
    );
    let client = udp_client();
    round_trip(&client, relay, echo.addr, b"the real client");
    wait_metric(&proxy, UDP_UP, 1);
}

/// An association over IPv6: BND is ::1 (the control connection's local address), an IPv4 target answers with an
/// ATYP 1 header (not a mapped IPv6 address) and an IPv6 target with ATYP 4.
#[test]
fn udp_associate_over_ipv6() {
    let echo4 = UdpEcho::start();
    let echo6 = DualEcho::start();
    let proxy = Proxy::spawn(&["-l", "[::1]:0"]);
    let mut ctl = connect(proxy.addr());
    greet(&mut ctl);
    ctl.write_all(&socks5_request(3, "[::]:0".parse().unwrap()))
        .unwrap();
    let (rep, relay) = read_socks5_reply(&mut ctl);
    assert_eq!(rep, 0);
    assert_eq!(relay.ip(), "::1".parse::<IpAddr>().unwrap(), "BND.ADDR");
    assert_ne!(relay.port(), 0);
    let client = UdpSocket::bind("[::1]:0").unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let d = pseudo_random(61, 4000);
    client.send_to(&dgram(echo4.addr, &d), relay).unwrap();
    let back = recv_relayed(&client, relay);
    assert_eq!(back[3], 1, "an IPv4 source is written as ATYP 1");
    let (src, data) = parse_dgram(&back);
    assert_eq!(src, echo4.addr);
    assert_eq!(data, &d[..]);
    let six = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, echo6.port));
    round_trip(&client, relay, six, b"over v6");
}

/// Behind a load balancer (--proxy-protocol) the client's address is the one in the PROXY header, so the UDP
/// source check must use it (PROTOCOL-NOTES §6): datagrams from 127.0.0.5 (the header's source) are relayed, and
/// datagrams from the balancer's own address 127.0.0.1 are foreign.
#[test]
fn udp_source_check_uses_proxy_protocol_address() {
    use socksgate::proto::proxy_protocol::{encode_v2, ProxyHeader};
    let echo = UdpEcho::start();
    let proxy = with_metrics(&["--proxy-protocol"]);
    let mut header = vec![0u8; 64];
    let n = encode_v2(
        &ProxyHeader::Proxy {
            src: "127.0.0.5:40000".parse().unwrap(),
            dst: proxy.addr(),
        },
        &[],
        &mut header,
    );
    header.truncate(n);
    let mut ctl = connect(proxy.addr());
    header.extend_from_slice(&[5, 1, 0]);
    ctl.write_all(&header).unwrap();
    assert_eq!(read_n(&mut ctl, 2), vec![5, 0]);
    ctl.write_all(&socks5_request(3, "0.0.0.0:0".parse().unwrap()))
        .unwrap();
    let (rep, relay) = read_socks5_reply(&mut ctl);
    assert_eq!(rep, 0);
    assert_eq!(relay.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));

    let balancer = udp_client();
    balancer
        .send_to(&dgram(echo.addr, b"from the balancer"), relay)
        .unwrap();
    assert!(wait_until(POLL_LIMIT, &mut || proxy.metric(DROP_FOREIGN) == 1));
    assert!(quiet(&balancer, QUIET));

    let client = UdpSocket::bind("127.0.0.5:0").unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    round_trip(&client, relay, echo.addr, b"from the real client");
    wait_metric(&proxy, UDP_UP, 1);
}

/// FRAG != 0 is dropped (RFC 1928 §7) and counted; FRAG 0 right after still works.
#[test]
fn udp_fragment_is_dropped() {
    let echo = UdpEcho::start();
    let proxy = with_metrics(&[]);
    let (_ctl, relay) = associate(proxy.addr(), "0.0.0.0:0".parse().unwrap());
    let client = udp_client();
    round_trip(&client, relay, echo.addr, b"learn port");
    for frag in [1u8, 0x81] {
        client
            .send_to(&dgram_frag(frag, echo.addr, b"fragment"), relay)
            .unwrap();
    }
    assert!(wait_until(POLL_LIMIT, &mut || proxy.metric(DROP_FRAG) == 2));
    assert!(quiet(&client, QUIET), "a fragment was relayed");
    wait_metric(&proxy, UDP_UP, 1);
    round_trip(&client, relay, echo.addr, b"whole");
}

/// Destination rules apply to every datagram: the denied port is dropped and counted, another port is relayed.
#[test]
fn udp_deny_dest_drops_datagrams() {
    let denied = UdpEcho::start();
    let allowed = UdpEcho::start();
    let rule = format!("127.0.0.1:{}", denied.addr.port());
    let proxy = with_metrics(&["--deny-dest", &rule]);
    let (_ctl, relay) = associate(proxy.addr(), "0.0.0.0:0".parse().unwrap());
    let client = udp_client();
    round_trip(&client, relay, allowed.addr, b"allowed");
    client
        .send_to(&dgram(denied.addr, b"denied"), relay)
        .unwrap();
    assert!(wait_until(POLL_LIMIT, &mut || proxy.metric(DROP_DENIED) == 1));
    assert!(quiet(&client, QUIET), "a denied datagram was relayed");
    round_trip(&client, relay, allowed.addr, b"allowed again");
    wait_metric(&proxy, DROP_DENIED, 1);
    wait_metric(&proxy, UDP_UP, 2);
}

/// Closing the control connection ends the association: its sockets are closed (fd count back to the baseline),
/// nothing is relayed any more, and the session gauge returns to 0.
#[test]
fn udp_association_ends_with_control_connection() {
    let echo = UdpEcho::start();
    let proxy = with_metrics(&[]);
    let baseline = proxy.fd_baseline();
    let (ctl, relay) = associate(proxy.addr(), "0.0.0.0:0".parse().unwrap());
    let client = udp_client();
    round_trip(&client, relay, echo.addr, b"alive");
    // Control connection + relay socket + outbound socket.
    assert!(
        proxy.fd_count() >= baseline.count + 3,
        "association should hold 3 descriptors"
    );
    drop(ctl);
    baseline.assert_exactly_back(POLL_LIMIT, "after the control connection closed");
    let _ = client.send_to(&dgram(echo.addr, b"after close"), relay);
    assert!(
        quiet(&client, QUIET),
        "relayed after the control connection closed"
    );
    assert!(wait_until(POLL_LIMIT, &mut || {
        proxy.metric("socksgate_sessions_active{protocol=\"socks5\"}") == 0
    }));
    wait_metric(&proxy, UDP_UP, 1);
}

/// --udp-idle-timeout 1s: datagrams keep the association alive; after 1 s without any, the control connection
/// gets EOF.
#[test]
fn udp_idle_timeout_closes_association() {
    let echo = UdpEcho::start();
    let proxy = Proxy::start(&["--udp-idle-timeout", "1s"]);
    let (mut ctl, relay) = associate(proxy.addr(), "0.0.0.0:0".parse().unwrap());
    let client = udp_client();
    // Activity every 200 ms for 1.6 s: longer than the timeout, so only the traffic keeps it open.
    let start = Instant::now();
    let mut k = 0u8;
    while start.elapsed() < Duration::from_millis(1600) {
        round_trip(&client, relay, echo.addr, &[k; 32]);
        k = k.wrapping_add(1);
        thread::sleep(Duration::from_millis(200));
    }
    ctl.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    match ctl.read(&mut b) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("association closed despite traffic: {other:?}"),
    }
    ctl.set_nonblocking(false).unwrap();
    round_trip(&client, relay, echo.addr, b"last");
    let idle_from = Instant::now();
    ctl.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let n = ctl.read(&mut b);
    let waited = idle_from.elapsed();
    assert!(
        matches!(n, Ok(0)),
        "expected EOF on the control connection, got {n:?}"
    );
    assert!(
        waited >= Duration::from_millis(800),
        "closed after only {waited:?}"
    );
    assert!(
        waited <= Duration::from_secs(6),
        "closed only after {waited:?}"
    );
    let _ = client.send_to(&dgram(echo.addr, b"too late"), relay);
    assert!(quiet(&client, QUIET), "relayed after the idle timeout");
}

/// --no-udp: UDP ASSOCIATE gets REP 0x07 (command not supported) and the connection is closed.
#[test]
fn udp_disabled_replies_command_not_supported() {
    let proxy = Proxy::start(&["--no-udp"]);
    let (mut s, rep, _) = associate_raw(proxy.addr(), "0.0.0.0:0".parse().unwrap());
    assert_eq!(rep, 0x07);
    assert!(
        read_all_until_closed(&mut s).is_empty(),
        "bytes after a failure reply"
    );
}

/// The `socks` crate's UDP client: DST 0.0.0.0:0, `connect()`s its socket to BND, so BND must be reachable and
/// replies must come from it.
#[test]
fn udp_socks_crate_datagram_echo() {
    let echo = UdpEcho::start();
    let proxy = Proxy::start(&[]);
    let sock =
        socks::Socks5Datagram::bind(proxy.addr(), "127.0.0.1:0").expect("Socks5Datagram::bind");
    sock.get_ref().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    match sock.proxy_addr() {
        socks::TargetAddr::Ip(a) => assert_eq!(a.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST)),
        other => panic!("relay address {other:?}"),
    }
    for size in [1usize, 1000, 30_000] {
        let payload = pseudo_random(size as u64, size);
        sock.send_to(&payload, echo.addr).unwrap();
        let mut buf = vec![0u8; 65536];
        let (n, from) = sock.recv_from(&mut buf).expect("recv through socks crate");
        match from {
            socks::TargetAddr::Ip(a) => assert_eq!(a, echo.addr),
            other => panic!("source {other:?}"),
        }
        assert_eq!(digest(&buf[..n]), digest(&payload), "{size}-byte datagram");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// BIND
// ---------------------------------------------------------------------------------------------------------------

/// Sends a SOCKS5 BIND naming `peer`; returns the control connection and the first reply.
fn bind5(proxy: SocketAddr, peer: SocketAddr) -> (TcpStream, u8, SocketAddr) {
    let mut s = connect(proxy);
    greet(&mut s);
    s.write_all(&socks5_request(2, peer)).unwrap();
    let (rep, addr) = read_socks5_reply(&mut s);
    (s, rep, addr)
}

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

/// True when nothing arrives on `s` within `wait` (EOF counts as "something").
fn tcp_quiet(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 64];
    let r = s.read(&mut b);
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    matches!(r, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}

/// SOCKS5 BIND: first reply 127.0.0.1:port, the peer connects, the second reply names the peer, then data flows
/// both ways and each half-close is propagated.
#[test]
fn bind_socks5_two_replies_data_and_half_close() {
    let proxy = with_metrics(&[]);
    let (mut ctl, rep, listen) = bind5(proxy.addr(), "127.0.0.1:0".parse().unwrap());
    assert_eq!(rep, 0);
    assert_eq!(
        listen.ip(),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        "first reply address"
    );
    assert_ne!(listen.port(), 0);
    // Nothing before the peer arrives.
    assert!(
        tcp_quiet(&mut ctl, QUIET),
        "second reply before any peer connected"
    );

    let mut peer = connect(listen);
    let (rep2, from) = read_socks5_reply(&mut ctl);
    assert_eq!(rep2, 0);
    assert_eq!(
        from,
        peer.local_addr().unwrap(),
        "second reply carries the peer's address"
    );

    let up = pseudo_random(7, 200_000);
    let down = pseudo_random(8, 150_000);
    let up2 = up.clone();
    let mut ctl_w = ctl.try_clone().unwrap();
    let writer = thread::spawn(move || {
        ctl_w.write_all(&up2).unwrap();
        ctl_w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got_up = Vec::new();
    peer.read_to_end(&mut got_up)
        .expect("peer reads until the client's half-close");
    writer.join().unwrap();
    assert_eq!(got_up.len(), up.len());
    assert_eq!(digest(&got_up), digest(&up));
    // The client's write side is shut; the other direction still works.
    peer.write_all(&down).unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    let mut got_down = Vec::new();
    ctl.read_to_end(&mut got_down)
        .expect("client reads until the peer's half-close");
    assert_eq!(digest(&got_down), digest(&down));
    assert!(wait_until(POLL_LIMIT, &mut || {
        proxy.metric("socksgate_bytes_total{direction=\"up\"}") == up.len() as u64
            && proxy.metric("socksgate_bytes_total{direction=\"down\"}") == down.len() as u64
    }));
}

/// A BIND naming 127.0.0.2 as the expected peer: a connection from 127.0.0.1 is not accepted (no second reply, the
/// intruder is dropped), and the expected peer is then accepted.
#[test]
fn bind_rejects_unexpected_peer() {
    let proxy = Proxy::start(&[]);
    let (mut ctl, rep, listen) = bind5(proxy.addr(), "127.0.0.2:0".parse().unwrap());
    assert_eq!(rep, 0);
    // Bytes the client sends while waiting are kept and delivered to the peer first.
    ctl.write_all(b"early bytes").unwrap();
    let mut intruder = connect_from(Ipv4Addr::new(127, 0, 0, 1), listen);
    assert!(
        read_all_until_closed(&mut intruder).is_empty(),
        "the unexpected peer got bytes"
    );
    assert!(
        tcp_quiet(&mut ctl, QUIET),
        "second reply for an unexpected peer"
    );

    let mut peer = connect_from(Ipv4Addr::new(127, 0, 0, 2), listen);
    let (rep2, from) = read_socks5_reply(&mut ctl);
    assert_eq!(rep2, 0);
    assert_eq!(from, peer.local_addr().unwrap());
    assert_eq!(read_n(&mut peer, 11), b"early bytes".to_vec());
    peer.write_all(b"hello from the expected peer").unwrap();
    assert_eq!(
        read_n(&mut ctl, 28),
        b"hello from the expected peer".to_vec()
    );
}

/// BIND sessions give their descriptors back: after a completed session and after an abandoned BIND (client
/// closes before any peer connects) the fd count returns to the baseline.
#[test]
fn bind_releases_descriptors() {
    let proxy = Proxy::start(&[]);
    let baseline = proxy.fd_baseline();
    let (mut ctl, rep, listen) = bind5(proxy.addr(), "127.0.0.1:0".parse().unwrap());
    assert_eq!(rep, 0);
    let mut peer = connect(listen);
    let (rep2, _) = read_socks5_reply(&mut ctl);
    assert_eq!(rep2, 0);
    peer.write_all(b"x").unwrap();
    assert_eq!(read_n(&mut ctl, 1), b"x".to_vec());
    drop(ctl);
    drop(peer);
    baseline.assert_exactly_back(POLL_LIMIT, "after a BIND session");
    let (ctl, rep, listen) = bind5(proxy.addr(), "127.0.0.1:0".parse().unwrap());
    assert_eq!(rep, 0);
    drop(ctl);
    baseline.assert_exactly_back(POLL_LIMIT, "after an abandoned BIND");
    // The abandoned listener is gone: its port refuses connections.
    assert!(
        TcpStream::connect_timeout(&listen, IO_TIMEOUT).is_err(),
        "BIND listener still open"
    );
}

/// --bind-timeout 1s: nobody connects, so the second reply is REP 0x06 and the connection closes.
#[test]
fn bind_timeout_second_reply_ttl_expired() {
    let proxy = with_metrics(&["--bind-timeout", "1s"]);
    let started = Instant::now();
    let (mut ctl, rep, _listen) = bind5(proxy.addr(), "127.0.0.1:0".parse().unwrap());
    assert_eq!(rep, 0);
    let (rep2, _) = read_socks5_reply(&mut ctl);
    let waited = started.elapsed();
    assert_eq!(rep2, 0x06, "second reply after the bind timeout");
    assert!(
        waited >= Duration::from_millis(900),
        "timed out after only {waited:?}"
    );
    assert!(
        waited <= Duration::from_secs(8),
        "timed out only after {waited:?}"
    );
    wait_metric(
        &proxy,
        "socksgate_connect_errors_total{kind=\"timeout\"}",
        1,
    );
    assert!(
        read_all_until_closed(&mut ctl).is_empty(),
        "connection must close after the failure reply"
    );
}

/// SOCKS4 BIND: two replies with VN 0 and CD 90, the second carrying the peer's address, then data.
#[test]
fn bind_socks4_two_replies() {
    let proxy = Proxy::start(&[]);
    let mut ctl = connect(proxy.addr());
    // VN 4, CD 2 (BIND), DSTPORT, DSTIP = the expected peer, USERID "test", NUL.
    let mut req = vec![4, 2, 0, 0, 127, 0, 0, 1];
    req.extend_from_slice(b"test\0");
    ctl.write_all(&req).unwrap();
    let r1 = read_n(&mut ctl, 8);
    assert_eq!(r1[0], 0, "VN of a SOCKS4 reply is 0");
    assert_eq!(r1[1], 90, "CD granted");
    let port = u16::from_be_bytes([r1[2], r1[3]]);
    assert_ne!(port, 0);
    let ip = Ipv4Addr::new(r1[4], r1[5], r1[6], r1[7]);
    assert!(
        ip == Ipv4Addr::LOCALHOST || ip.is_unspecified(),
        "first reply address {ip}"
    );
    let mut peer = connect(SocketAddr::from(([127, 0, 0, 1], port)));
    let r2 = read_n(&mut ctl, 8);
    assert_eq!(&r2[..2], &[0, 90], "second reply");
    let me = peer.local_addr().unwrap();
    assert_eq!(
        u16::from_be_bytes([r2[2], r2[3]]),
        me.port(),
        "second reply port"
    );
    assert_eq!(
        IpAddr::V4(Ipv4Addr::new(r2[4], r2[5], r2[6], r2[7])),
        me.ip()
    );
    peer.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut ctl, 4), b"ping".to_vec());
    ctl.write_all(b"pong").unwrap();
    assert_eq!(read_n(&mut peer, 4), b"pong".to_vec());
}

/// --no-bind: SOCKS5 BIND gets 0x07; SOCKS4 BIND gets CD 91.
#[test]
fn bind_disabled() {
    let proxy = Proxy::start(&["--no-bind"]);
    let (mut s, rep, _) = bind5(proxy.addr(), "127.0.0.1:0".parse().unwrap());
    assert_eq!(rep, 0x07);
    assert!(read_all_until_closed(&mut s).is_empty());
    let mut s4 = connect(proxy.addr());
    s4.write_all(&[4, 2, 0, 0, 127, 0, 0, 1, 0]).unwrap();
    let r = read_n(&mut s4, 8);
    assert_eq!(&r[..2], &[0, 91]);
}

/// The `socks` crate's BIND client (`Socks5Listener`).
#[test]
fn bind_socks_crate_listener() {
    let proxy = Proxy::start(&[]);
    let listener =
        socks::Socks5Listener::bind(proxy.addr(), "127.0.0.1:0").expect("Socks5Listener::bind");
    let listen = match listener.proxy_addr() {
        socks::TargetAddr::Ip(a) => *a,
        other => panic!("listen address {other:?}"),
    };
    assert_eq!(listen.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    let peer_thread = thread::spawn(move || {
        let mut p = connect(listen);
        p.write_all(b"from peer").unwrap();
        assert_eq!(read_n(&mut p, 11), b"from client".to_vec());
        p.local_addr().unwrap()
    });
    let mut stream = listener.accept().expect("accept through the proxy");
    stream.get_ref().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut buf = [0u8; 9];
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from peer");
    stream.write_all(b"from client").unwrap();
    let peer_addr = peer_thread.join().unwrap();
    match stream.proxy_addr() {
        socks::TargetAddr::Ip(a) => assert_eq!(*a, peer_addr),
        other => panic!("peer address {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// PySocks (optional: skipped when python3 or the `socks` module is missing)
// ---------------------------------------------------------------------------------------------------------------

fn have_pysocks() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import socks"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// PySocks' UDP client: DST 0.0.0.0:<its port>, ignores BND.ADDR (uses the proxy host with BND.PORT) and
/// `connect()`s its socket, so replies must come from the relay. With user/password, as PySocks sends them.
#[test]
fn udp_pysocks_client() {
    if !have_pysocks() {
        eprintln!("python3 with PySocks not available: skipping");
        return;
    }
    let echo = UdpEcho::start();
    let proxy = Proxy::start(&["-U", "py:py-pw"]);
    let script = r#"
import socket, sys, hashlib
import socks
proxy_port, echo_port = int(sys.argv[1]), int(sys.argv[2])
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port, username="py", password="py-pw")
s.settimeout(20)
s.bind(("127.0.0.1", 0))
for size in (1, 512, 8000, 60000):
    payload = bytes((i * 7 + size) % 251 for i in range(size))
    s.sendto(payload, ("127.0.0.1", echo_port))
    data, addr = s.recvfrom(65535)
    assert data == payload, (size, len(data))
    assert addr == ("127.0.0.1", echo_port), addr
print("ok")
"#;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &proxy.addr().port().to_string(),
            &echo.addr.port().to_string(),
        ])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "PySocks UDP failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
