//! `udp`: SOCKS5 UDP ASSOCIATE relay throughput and loss, with a bounded in-flight window.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use socksgate::proto::socks5;

use crate::client;
use crate::proxy::{Endpoint, ProxySpec, Scheme};
use crate::stats::{drive, with_errors, with_latency, Histogram, Json, Run};
use crate::target::UdpEcho;
use crate::{finish, Common};

/// Datagrams in flight at most: measures the relay, not socket buffer overflow.
pub(crate) const WINDOW: usize = 64;
/// Payload size of every datagram (after the SOCKS5 UDP header).
const PAYLOAD: usize = 64;
/// A datagram not echoed within this time counts as lost.
const LOSS_TIMEOUT: Duration = Duration::from_millis(500);
/// Bound on the TCP control connection setup.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pacing backlog a rate-limited sender may catch up on at once.
const MAX_LAG: Duration = Duration::from_millis(10);
/// Marks our payloads so stray datagrams are not mistaken for echoes.
const MAGIC: &[u8; 8] = b"SGLOADv1";

/// Counters of one UDP run (measured window only).
#[derive(Debug, Default)]
struct UdpStats {
    sent: u64,
    received: u64,
    lost: u64,
    unexpected: u64,
    hist: Histogram,
}

/// Reject the proxy schemes that have no UDP relay.
pub(crate) fn check_proxy(p: &ProxySpec) -> Result<(), String> {
    if p.scheme == Scheme::Direct || p.scheme.is_socks5() {
        Ok(())
    } else {
        Err(format!(
            "udp mode needs a socks5:// or socks5h:// proxy or direct, not {}",
            p.scheme.name()
        ))
    }
}

/// Run the mode; returns the exit code.
pub(crate) fn run(c: &Common, rate: Option<f64>) -> i32 {
    let echo = match c.target {
        Some(_) => None,
        None => match UdpEcho::start() {
            Ok(e) => Some(e),
            Err(e) => return crate::fatal(&format!("starting UDP echo: {e}")),
        },
    };
    let ep = match (&c.target, &echo) {
        (Some(t), _) => t.clone(),
        (None, Some(e)) => Endpoint::builtin(e.addr()),
        (None, None) => unreachable!("echo started when no target is given"),
    };
    let setup = match setup(&c.proxy, &ep) {
        Ok(s) => s,
        Err(e) => return crate::fatal(&format!("UDP setup: {e}")),
    };
    if !c.quiet {
        eprintln!("udp: sending to {} (relay {})", ep.addr, setup.relay);
    }
    let run = Arc::new(Run::new(0));
    let worker = {
        let (run, sock, prefix) = (run.clone(), setup.sock, setup.prefix);
        std::thread::Builder::new()
            .name("udp".into())
            .spawn(move || pump(&run, sock, &prefix, rate))
    };
    let worker = match worker {
        Ok(w) => w,
        Err(e) => return crate::fatal(&format!("spawn: {e}")),
    };
    let w = drive(&run, c.warmup, c.seconds, c.quiet, &|r| {
        format!("{r:.0} echoes/s")
    });
    let st = match worker.join() {
        Ok(Ok(st)) => st,
        Ok(Err(e)) => return crate::fatal(&format!("UDP pump: {e}")),
        Err(_) => return crate::fatal(&"UDP pump panicked"),
    };
    // The association lives as long as the control connection: keep it until now.
    drop(setup.control);
    let loss_pct = if st.sent > 0 {
        st.lost as f64 * 100.0 / st.sent as f64
    } else {
        0.0
    };
    let el = w.elapsed.max(1e-9);
    let j = Json::new()
        .str("mode", "udp")
        .str("proxy", &c.proxy.to_string())
        .str("target", &c.target_name(&ep))
        .float("seconds", c.seconds, 1)
        .float("elapsed", w.elapsed, 3)
        .int("window", WINDOW as u64)
        .opt_float("rate", rate, 1)
        .int("sent", st.sent)
        .int("received", st.received)
        .int("lost", st.lost)
        .int("unexpected", st.unexpected)
        .float("sent_per_sec", st.sent as f64 / el, 1)
        .float("received_per_sec", st.received as f64 / el, 1)
        .float("loss_pct", loss_pct, 3);
    let j = with_latency(
        with_errors(j, &run),
        &st.hist,
        &[("p50_us", 50.0), ("p99_us", 99.0)],
    );
    // A lost datagram counts as a failed operation.
    finish(
        j.finish(),
        st.sent,
        st.lost + run.errors_total(),
        st.received,
        &run,
    )
}

/// The association: our socket (connected to the relay), the header to prepend, and the
/// control connection that must stay open.
struct Setup {
    sock: UdpSocket,
    relay: SocketAddr,
    prefix: Vec<u8>,
    control: Option<std::net::TcpStream>,
}

/// Bind our UDP socket and, through a SOCKS5 proxy, set up the association.
fn setup(proxy: &ProxySpec, ep: &Endpoint) -> io::Result<Setup> {
    let family_addr = proxy.addr.unwrap_or(ep.addr);
    let (local, any) = if family_addr.is_ipv6() {
        (
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        )
    };
    let sock = UdpSocket::bind(SocketAddr::new(local, 0))?;
    let port = sock.local_addr()?.port();
    let (relay, prefix, control) = match proxy.addr {
        None => (ep.addr, Vec::new(), None),
        Some(paddr) => {
            // DST is our source port with an unspecified address, as RFC 1928 allows.
            let t = client::udp_associate(proxy, SocketAddr::new(any, port), SETUP_TIMEOUT)?;
            let mut relay = t.bound.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "UDP ASSOCIATE reply has no address",
                )
            })?;
            if relay.ip().is_unspecified() {
                relay.set_ip(paddr.ip());
            }
            if !relay.ip().is_loopback() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("relay {relay} is not on loopback; refusing to send there"),
                ));
            }
            let mut prefix = vec![0; socks5::MAX_UDP_HEADER_LEN];
            let n =
                socks5::encode_udp_header(&client::target(&ep.dest(proxy.scheme))?, &mut prefix);
            prefix.truncate(n);
            (relay, prefix, Some(t.stream))
        }
    };
    sock.connect(relay)?;
    sock.set_nonblocking(true)?;
    Ok(Setup {
        sock,
        relay,
        prefix,
        control,
    })
}

/// Send and receive until the run ends, then wait (bounded) for the last echoes.
fn pump(run: &Run, sock: UdpSocket, prefix: &[u8], rate: Option<f64>) -> io::Result<UdpStats> {
    let mut sock = mio::net::UdpSocket::from_std(sock);
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut sock, Token(0), Interest::READABLE)?;
    let mut events = Events::with_capacity(16);
    let mut st = UdpStats::default();
    let mut inflight: HashMap<u64, (Instant, bool)> = HashMap::with_capacity(WINDOW * 2);
    let mut pkt = prefix.to_vec();
    let body_at = pkt.len();
    pkt.resize(body_at + PAYLOAD, 0);
    pkt[body_at + 8..body_at + 16].copy_from_slice(MAGIC);
    for (i, b) in pkt[body_at + 16..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let interval = rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut next_send = Instant::now();
    let mut seq = 0u64;
    let mut last_expire = Instant::now();
    let mut drain_until: Option<Instant> = None;
    let mut buf = vec![0u8; 65536];
    let is_socks = !prefix.is_empty();
    loop {
        let now = Instant::now();
        if run.running() {
            if interval.is_some() {
                // Catch up on datagrams that fell due while we slept (poll has 1 ms
                // granularity), but never burst more than MAX_LAG worth after a stall.
                let floor = now.checked_sub(MAX_LAG).unwrap_or(now);
                next_send = next_send.max(floor);
            }
            while inflight.len() < WINDOW && interval.is_none_or(|_| now >= next_send) {
                seq += 1;
                pkt[body_at..body_at + 8].copy_from_slice(&seq.to_be_bytes());
                match sock.send(&pkt) {
                    Ok(_) => {
                        let measured = run.recording();
                        inflight.insert(seq, (now, measured));
                        st.sent += u64::from(measured);
                        if let Some(iv) = interval {
                            next_send += iv;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        run.error(format!("send: {e}"));
                        std::thread::sleep(Duration::from_millis(1));
                        break;
                    }
                }
            }
        } else {
            let until = *drain_until.get_or_insert(now + LOSS_TIMEOUT);
            if inflight.is_empty() || now >= until {
                st.lost += inflight.values().filter(|(_, m)| *m).count() as u64;
                return Ok(st);
            }
        }
        if now.duration_since(last_expire) >= Duration::from_millis(10) {
            last_expire = now;
            inflight.retain(|_, (t, m)| {
                let keep = now.duration_since(*t) < LOSS_TIMEOUT;
                st.lost += u64::from(!keep && *m);
                keep
            });
        }
        let mut timeout = Duration::from_millis(10);
        if inflight.len() < WINDOW && run.running() {
            timeout = timeout.min(next_send.saturating_duration_since(now));
        }
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        loop {
            match sock.recv(&mut buf) {
                Ok(n) => match parse_echo(&buf[..n], is_socks) {
                    Some(s) => match inflight.remove(&s) {
                        Some((t0, measured)) => {
                            run.complete(1);
                            if measured {
                                st.received += 1;
                                st.hist.record_duration(t0.elapsed());
                            }
                        }
                        None => st.unexpected += 1,
                    },
                    None => st.unexpected += 1,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. ECONNREFUSED from an ICMP error: count it, do not spin.
                    run.error(format!("recv: {e}"));
                    break;
                }
            }
        }
    }
}

/// Sequence number of an echoed datagram, after the SOCKS5 UDP header if relayed.
fn parse_echo(d: &[u8], socks: bool) -> Option<u64> {
    let body = if socks {
        let (header, used) = socks5::parse_udp_header(d).ok()?;
        if header.frag != 0 {
            return None;
        }
        &d[used..]
    } else {
        d
    };
    if body.len() != PAYLOAD || &body[8..16] != MAGIC {
        return None;
    }
    Some(u64::from_be_bytes(body[..8].try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::Dest;

    #[test]
    fn echo_parsing() {
        let mut body = vec![0u8; PAYLOAD];
        body[..8].copy_from_slice(&42u64.to_be_bytes());
        body[8..16].copy_from_slice(MAGIC);
        assert_eq!(parse_echo(&body, false), Some(42));
        let mut d = vec![0; socks5::MAX_UDP_HEADER_LEN];
        let to = client::target(&Dest::Ip("127.0.0.1:9".parse().unwrap())).unwrap();
        let n = socks5::encode_udp_header(&to, &mut d);
        d.truncate(n);
        d.extend_from_slice(&body);
        assert_eq!(parse_echo(&d, true), Some(42));
        d[2] = 1; // fragments are not supported
        assert_eq!(parse_echo(&d, true), None);
        assert_eq!(parse_echo(&body[..10], false), None);
    }
}
