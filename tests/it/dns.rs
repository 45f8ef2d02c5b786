//! The built-in resolver end to end: a real dnsmasq on a loopback port (skipped with a note when it is missing) and
//! small responders written here with hickory-proto for what dnsmasq cannot be made to do (truncation, spoofing,
//! holding an answer back, answering A and AAAA at different times, recording query sources). Every name is
//! answered on loopback; the machine's own nameservers are never asked.

use crate::common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

use common::*;

const DNSMASQ: &str = "/usr/sbin/dnsmasq";

fn have_dnsmasq() -> bool {
    if Path::new(DNSMASQ).exists() {
        return true;
    }
    eprintln!(
        "note: {DNSMASQ} not found (Debian package dnsmasq-base; .ci/run installs it): skipping"
    );
    false
}

/// A dnsmasq answering authoritatively for `test.` from its own hosts file, on 127.0.0.1:PORT, logging queries.
struct Dnsmasq {
    child: Child,
    port: u16,
    hosts: PathBuf,
    log: PathBuf,
}

impl Dnsmasq {
    /// Starts dnsmasq with `hosts` as its hosts file, answers with TTL `ttl`, and `extra` arguments. `auth`: answer
    /// authoritatively for `test.`, so negative answers carry a SOA (whose MINIMUM is the TTL) and can be cached per
    /// RFC 2308; the plain mode answers them without one, but follows CNAME chains where auth mode gives one link.
    fn start(hosts: &str, ttl: u32, auth: bool, extra: &[&str]) -> Dnsmasq {
        let mode: Vec<String> = if auth {
            vec![
                "--auth-server=ns.test,127.0.0.1".into(),
                "--auth-zone=test".into(),
                format!("--auth-ttl={ttl}"),
            ]
        } else {
            vec!["--local=/test/".into()]
        };
        let hosts_path = temp_path("dnsmasq-hosts");
        std::fs::write(&hosts_path, hosts).unwrap();
        // The port is picked by binding port 0 and releasing it; another process could take it in between, so a
        // failed start is retried on a new port.
        for _ in 0..5 {
            let port = UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log = temp_path("dnsmasq-log");
            let out = std::fs::File::create(&log).unwrap();
            let child = Command::new(DNSMASQ)
                .args([
                    &format!("--port={port}"),
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    "--no-resolv",
                    "--no-hosts",
                    &format!("--addn-hosts={}", hosts_path.display()),
                    "--keep-in-foreground",
                    "--log-queries",
                    "--log-facility=-",
                    "--pid-file=",
                    // Hermetic: no /etc/dnsmasq.conf (or conf-dir) of the machine's.
                    "--conf-file=/dev/null",
                    &format!("--local-ttl={ttl}"),
                ])
                .args(&mode)
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::from(out.try_clone().unwrap()))
                .stderr(Stdio::from(out))
                .spawn()
                .expect("spawn dnsmasq");
            let mut d = Dnsmasq {
                child,
                port,
                hosts: hosts_path.clone(),
                log,
            };
            let ready = wait_until(Duration::from_secs(10), &mut || {
                d.log_text().contains(" names") || d.exited()
            });
            if ready && !d.exited() {
                return d;
            }
            eprintln!("dnsmasq did not start on port {port}: {}", d.log_text());
        }
        panic!("dnsmasq would not start");
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// How many queries of `qtype` (A, AAAA) for `name` dnsmasq has logged.
    fn queries(&self, qtype: &str, name: &str) -> usize {
        let needle = format!("[{qtype}] {name} from ");
        self.log_text()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }

    /// Rewrites the hosts file and makes dnsmasq re-read it (SIGHUP), waiting for its log line.
    fn set_hosts(&self, hosts: &str) {
        let reads = self.log_text().matches(" names").count();
        std::fs::write(&self.hosts, hosts).unwrap();
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        assert!(wait_until(Duration::from_secs(10), &mut || {
            self.log_text().matches(" names").count() > reads
        }));
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proxy_with_dns(servers: &[String], extra: &[&str]) -> Proxy {
    let mut args: Vec<&str> = vec!["--metrics", "127.0.0.1:0"];
    for s in servers {
        args.push("--dns");
        args.push(s);
    }
    args.extend_from_slice(extra);
    Proxy::start(&args)
}

/// SOCKS5 CONNECT to `name:port` through the proxy: the reply code and, on success, the stream.
fn connect_name(proxy: SocketAddr, name: &str, port: u16) -> (u8, TcpStream) {
    let mut s = connect(proxy);
    s.write_all(&[5, 1, 0]).unwrap();
    assert_eq!(read_n(&mut s, 2), vec![5, 0]);
    s.write_all(&socks5_request_domain(1, name, port)).unwrap();
    let (rep, _) = read_socks5_reply(&mut s);
    (rep, s)
}

/// An echo server that answers every connection with `banner` first, so a test can tell which address was used.
fn banner_server(bind: &str, banner: &'static [u8]) -> Option<TestServer> {
    TcpListener::bind(bind).ok()?; // probe: the address may not exist here (e.g. 127.0.0.2 without lo routing)
    Some(TestServer::start_on(bind, move |mut s| {
        let _ = s.write_all(banner);
        echo_handler(s)
    }))
}

#[test]
fn a_only_aaaa_only_both_and_cname_chain() {
    if !have_dnsmasq() {
        return;
    }
    let v6 = have_ipv6();
    let echo4 = TestServer::echo();
    let port = echo4.addr.port();
    // The IPv6 origin listens on the same port number where possible; its absence only skips the IPv6 cases.
    let echo6 = if v6 {
        banner_server(&format!("[::1]:{port}"), b"six\n")
    } else {
        None
    };
    let dns = Dnsmasq::start(
        "127.0.0.1 v4.test both.test\n::1 v6.test both.test\n",
        60,
        false,
        &["--cname=alias.test,mid.test", "--cname=mid.test,v4.test"],
    );
    let proxy = proxy_with_dns(&[dns.addr()], &[]);

    let (rep, mut s) = connect_name(proxy.addr(), "v4.test", port);
    assert_eq!(rep, 0, "A only");
    assert_echo(&mut s, b"over ipv4");

    let (rep, mut s) = connect_name(proxy.addr(), "alias.test", port);
    assert_eq!(rep, 0, "CNAME chain alias -> mid -> v4");
    assert_echo(&mut s, b"through the chain");

    if echo6.is_some() {
        let (rep, mut s) = connect_name(proxy.addr(), "v6.test", port);
        assert_eq!(rep, 0, "AAAA only");
        assert_eq!(read_n(&mut s, 4), b"six\n");
        // both.test: the IPv4 origin is gone, so a success proves the IPv6 address was in the answer.
        drop(echo4);
        assert!(wait_until(Duration::from_secs(10), &mut || {
            TcpStream::connect(("127.0.0.1", port)).is_err()
        }));
        let (rep, mut s) = connect_name(proxy.addr(), "both.test", port);
        assert_eq!(rep, 0, "both families, IPv6 after IPv4 refused");
        assert_eq!(read_n(&mut s, 4), b"six\n");
    } else {
        eprintln!("note: no IPv6 loopback: AAAA cases skipped");
        let (rep, _) = connect_name(proxy.addr(), "both.test", port);
        assert_eq!(rep, 0);
    }
    // Each name was asked once per type, however often it was used; AAAA v4.test once more for alias.test, whose
    // chain ends in a NODATA without SOA (dnsmasq's local answers carry none), which the resolver cannot tell from
    // a chain the server did not follow, so it asks the target itself.
    assert_eq!(dns.queries("A", "v4.test"), 1);
    assert_eq!(dns.queries("AAAA", "v4.test"), 2);
    assert_eq!(dns.queries("A", "alias.test"), 1);
    assert!(proxy.metric("socksgate_dns_query_duration_seconds_count") >= 3);
}

#[test]
fn curl_socks5_hostname_through_the_resolver() {
    if !have_dnsmasq() || !have_curl() {
        eprintln!("note: needs dnsmasq and curl: skipping");
        return;
    }
    let origin = common::origin::Origin::start();
    let dns = Dnsmasq::start("127.0.0.1 web.test\n", 60, false, &[]);
    let proxy = proxy_with_dns(&[dns.addr()], &[]);
    let url = format!("http://web.test:{}/hello", origin.addr.port());
    for _ in 0..3 {
        let (code, body, err) = curl(&["--socks5-hostname", &proxy.addr().to_string(), &url]);
        assert_eq!(code, 0, "curl: {err}");
        assert_eq!(body, b"path=/hello\n");
    }
    assert_eq!(
        dns.queries("A", "web.test"),
        1,
        "later lookups hit the cache"
    );
    assert_eq!(proxy.metric("socksgate_dns_cache_hits_total"), 2);
}

#[test]
fn nxdomain_is_cached_negatively() {
    if !have_dnsmasq() {
        return;
    }
    let dns = Dnsmasq::start("127.0.0.1 v4.test\n", 20, true, &[]);
    let proxy = proxy_with_dns(&[dns.addr()], &[]);
    for i in 0..2 {
        let (rep, _) = connect_name(proxy.addr(), "nx.test", 80);
        assert_eq!(rep, 0x04, "ask {i}: NXDOMAIN is host unreachable");
    }
    assert_eq!(
        dns.queries("A", "nx.test"),
        1,
        "the second ask is a cache hit"
    );
    assert_eq!(dns.queries("AAAA", "nx.test"), 1);
    assert_eq!(proxy.metric("socksgate_dns_cache_hits_total"), 1);
    assert_eq!(
        proxy.metric("socksgate_dns_errors_total{kind=\"nxdomain\"}"),
        2
    );
}

#[test]
fn cname_chain_the_server_does_not_follow() {
    if !have_dnsmasq() {
        return;
    }
    // dnsmasq's auth mode answers alias.test with the first link only; the resolver asks for the target itself.
    let dns = Dnsmasq::start(
        "127.0.0.1 v4.test\n",
        20,
        true,
        &["--cname=alias.test,mid.test", "--cname=mid.test,v4.test"],
    );
    let echo = TestServer::echo();
    let proxy = proxy_with_dns(&[dns.addr()], &[]);
    let (rep, mut s) = connect_name(proxy.addr(), "alias.test", echo.addr.port());
    assert_eq!(rep, 0);
    assert_echo(&mut s, b"followed by us");
    assert_eq!(dns.queries("A", "alias.test"), 1);
    assert_eq!(dns.queries("A", "mid.test"), 1);
    // mid.test's answer carries the last link and v4.test's address: nothing more to ask.
    assert_eq!(dns.queries("A", "v4.test"), 0);
}

#[test]
fn silent_server_times_out_then_the_next_one_answers() {
    if !have_dnsmasq() {
        return;
    }
    // Bound and never read: queries vanish, as with a server that is down behind a firewall.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns = Dnsmasq::start("127.0.0.1 v4.test\n", 60, false, &[]);
    let echo = TestServer::echo();
    let proxy = proxy_with_dns(
        &[silent.local_addr().unwrap().to_string(), dns.addr()],
        &["--dns-timeout", "500ms"],
    );
    let started = Instant::now();
    let (rep, mut s) = connect_name(proxy.addr(), "v4.test", echo.addr.port());
    let took = started.elapsed();
    assert_eq!(rep, 0);
    assert_echo(&mut s, b"second server");
    // The timeout is the feature here: the first server was waited for, but not for the whole connect timeout.
    assert!(
        took >= Duration::from_millis(450),
        "answered after {took:?}"
    );
    assert!(took < Duration::from_secs(8), "answered after {took:?}");
    assert_eq!(dns.queries("A", "v4.test"), 1);
}

#[test]
fn answers_expire_with_their_ttl() {
    if !have_dnsmasq() {
        return;
    }
    let Some(first) = banner_server("127.0.0.1:0", b"one\n") else {
        return;
    };
    let port = first.addr.port();
    let Some(_second) = banner_server(&format!("127.0.0.2:{port}"), b"two\n") else {
        eprintln!("note: cannot bind 127.0.0.2: skipping");
        return;
    };
    let dns = Dnsmasq::start("127.0.0.1 ttl.test\n", 2, true, &[]);
    let proxy = proxy_with_dns(&[dns.addr()], &[]);
    let (rep, mut s) = connect_name(proxy.addr(), "ttl.test", port);
    assert_eq!(rep, 0);
    assert_eq!(read_n(&mut s, 4), b"one\n");
    let answered = Instant::now();
    dns.set_hosts("127.0.0.2 ttl.test\n");
    // Until the TTL runs out the cached address is used; then the new one. Bounded wait, no fixed sleep.
    let mut seen_two = None;
    while answered.elapsed() < Duration::from_secs(15) {
        let (rep, mut s) = connect_name(proxy.addr(), "ttl.test", port);
        assert_eq!(rep, 0);
        let b = read_n(&mut s, 4);
        if b == b"two\n" {
            seen_two = Some(answered.elapsed());
            break;
        }
        assert_eq!(b, b"one\n");
        thread::sleep(Duration::from_millis(100));
    }
    let after = seen_two.expect("new address seen after the TTL");
    assert!(
        after >= Duration::from_millis(1500),
        "new address after {after:?}, TTL 2 s"
    );
    assert_eq!(dns.queries("A", "ttl.test"), 2, "one query per TTL");
}

#[test]
fn etc_hosts_and_dns_system_need_no_nameserver() {
    // /etc/hosts answers localhost before any nameserver is asked (the one given here would never answer).
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo = TestServer::echo();
    let proxy = proxy_with_dns(&[silent.local_addr().unwrap().to_string()], &[]);
    let (rep, mut s) = connect_name(proxy.addr(), "localhost", echo.addr.port());
    assert_eq!(rep, 0);
    assert_echo(&mut s, b"hosts file");
    assert_eq!(
        proxy.metric("socksgate_dns_queries_total{transport=\"udp\"}"),
        0
    );
    assert!(proxy.metric("socksgate_dns_static_hits_total") >= 1);
    // --resolve wins over everything; --dns-system is the getaddrinfo pool.
    let proxy = Proxy::start(&["--dns-system", "--resolve", "pinned.test=127.0.0.1"]);
    for name in ["localhost", "pinned.test"] {
        let (rep, mut s) = connect_name(proxy.addr(), name, echo.addr.port());
        assert_eq!(rep, 0, "{name}");
        assert_echo(&mut s, name.as_bytes());
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Hand-made responders (hickory-proto encodes the answers).
// ---------------------------------------------------------------------------------------------------------------

/// What a responder is asked: (id, name, type) of each query it received.
type Seen = Arc<Mutex<Vec<(u16, String, RecordType)>>>;

fn answer_for(q: &Message, addr4: [u8; 4]) -> Message {
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_recursion_desired(true)
        .set_recursion_available(true)
        .set_response_code(ResponseCode::NoError);
    m.add_queries(q.queries().to_vec());
    if let Some(question) = q.queries().first() {
        let name = question.name().clone();
        // AAAA gets NODATA: these tests only need the IPv4 answer.
        if question.query_type() == RecordType::A {
            m.add_answer(Record::from_rdata(name, 60, RData::A(A(addr4.into()))));
        }
    }
    m
}

/// A UDP responder on 127.0.0.1:0 running `handle` for every datagram (stops when the test's handle drops).
struct Responder {
    addr: SocketAddr,
    seen: Seen,
    stop: Arc<AtomicBool>,
}

impl Responder {
    fn start(
        tcp: bool,
        handle: impl Fn(&UdpSocket, SocketAddr, &Message) + Send + 'static,
        tcp_handle: impl Fn(SocketAddr, &Message) -> Message + Send + 'static,
    ) -> Responder {
        // UDP and TCP on the same port number, as a nameserver has them.
        let (udp, listener) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            if !tcp {
                break (udp, None);
            }
            if let Ok(l) = TcpListener::bind(udp.local_addr().unwrap()) {
                break (udp, Some(l));
            }
        };
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = udp.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (Arc::clone(&seen), Arc::clone(&stop));
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, from)) = udp.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if let Some(question) = q.queries().first() {
                    seen2.lock().unwrap().push((
                        q.id(),
                        question.name().to_ascii(),
                        question.query_type(),
                    ));
                }
                handle(&udp, from, &q);
            }
        });
        if let Some(l) = listener {
            let stop3 = Arc::clone(&stop);
            thread::spawn(move || {
                for s in l.incoming() {
                    if stop3.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(mut s) = s else { continue };
                    let Ok(peer) = s.peer_addr() else { continue };
                    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    let len = read_n(&mut s, 2);
                    let q = read_n(&mut s, usize::from(u16::from_be_bytes([len[0], len[1]])));
                    let Ok(q) = Message::from_vec(&q) else {
                        continue;
                    };
                    let a = tcp_handle(peer, &q).to_vec().unwrap();
                    let mut out = (a.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&a);
                    let _ = s.write_all(&out);
                }
            });
        }
        Responder { addr, seen, stop }
    }

    fn count(&self, rtype: RecordType) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|q| q.2 == rtype)
            .count()
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Unblock the TCP accept loop, if any.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn send(udp: &UdpSocket, to: SocketAddr, m: &Message) {
    let _ = udp.send_to(&m.to_vec().unwrap(), to);
}

#[test]
fn truncated_udp_answer_is_asked_again_over_tcp() {
    let echo = TestServer::echo();
    let tcp_answers = Arc::new(AtomicUsize::new(0));
    let t2 = Arc::clone(&tcp_answers);
    let r = Responder::start(
        true,
        |udp, from, q| {
            // Over UDP: the question back with TC set and no answer.
            let mut m = answer_for(q, [127, 0, 0, 1]);
            m.take_answers();
            m.set_truncated(true);
            send(udp, from, &m);
        },
        move |_, q| {
            t2.fetch_add(1, Ordering::Relaxed);
            answer_for(q, [127, 0, 0, 1])
        },
    );
    let proxy = proxy_with_dns(&[r.addr.to_string()], &[]);
    let (rep, mut s) = connect_name(proxy.addr(), "big.test", echo.addr.port());
    assert_eq!(rep, 0, "the TCP answer was used");
    assert_echo(&mut s, b"via tcp");
    assert_eq!(r.count(RecordType::A), 1);
    assert!(tcp_answers.load(Ordering::Relaxed) >= 1);
    assert!(proxy.metric("socksgate_dns_queries_total{transport=\"tcp\"}") >= 1);
}

#[test]
fn spoofed_answers_are_ignored() {
    let echo = TestServer::echo();
    let r = Responder::start(
        false,
        |udp, from, q| {
            // First a forged answer with a wrong ID and one for another name, both pointing at 127.0.0.3 where
            // nothing listens; then the genuine answer.
            let mut forged = answer_for(q, [127, 0, 0, 3]);
            forged.set_id(q.id().wrapping_add(1));
            send(udp, from, &forged);
            let mut other = Message::new();
            other
                .set_id(q.id())
                .set_message_type(MessageType::Response)
                .add_query(hickory_proto::op::Query::query(
                    hickory_proto::rr::Name::from_ascii("evil.test.").unwrap(),
                    RecordType::A,
                ));
            send(udp, from, &answer_for(&other, [127, 0, 0, 3]));
            // And one from another source address entirely.
            if let Ok(u) = UdpSocket::bind("127.0.0.1:0") {
                send(&u, from, &answer_for(q, [127, 0, 0, 3]));
            }
            send(udp, from, &answer_for(q, [127, 0, 0, 1]));
        },
        |_, q| answer_for(q, [127, 0, 0, 1]),
    );
    let proxy = proxy_with_dns(&[r.addr.to_string()], &[]);
    let (rep, mut s) = connect_name(proxy.addr(), "real.test", echo.addr.port());
    assert_eq!(
        rep, 0,
        "the forged answers (127.0.0.3: refused) were not taken"
    );
    assert_echo(&mut s, b"genuine");
}

#[test]
fn concurrent_lookups_of_one_name_are_coalesced() {
    const CLIENTS: usize = 200;
    let echo = TestServer::echo();
    // The responder holds every query until told to answer, so all clients are waiting on the same lookup.
    let held: Arc<Mutex<Vec<(SocketAddr, Message)>>> = Arc::default();
    let held2 = Arc::clone(&held);
    let (sock_tx, sock_rx) = mpsc::channel::<UdpSocket>();
    let sock_tx = Mutex::new(Some(sock_tx));
    let r = Responder::start(
        false,
        move |udp, from, q| {
            if let Some(tx) = sock_tx.lock().unwrap().take() {
                let _ = tx.send(udp.try_clone().unwrap());
            }
            held2.lock().unwrap().push((from, q.clone()));
        },
        |_, q| answer_for(q, [127, 0, 0, 1]),
    );
    // Long DNS and connect timeouts: a retry while the answer is held back would be a second query.
    let proxy = proxy_with_dns(
        &[r.addr.to_string()],
        &["--dns-timeout", "60s", "--connect-timeout", "90s"],
    );
    let paddr = proxy.addr();
    let port = echo.addr.port();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            thread::spawn(move || {
                let (rep, mut s) = connect_name(paddr, "many.test", port);
                assert_eq!(rep, 0, "client {i}");
                assert_echo(&mut s, format!("client {i}").as_bytes());
            })
        })
        .collect();
    let all_waiting = wait_until(Duration::from_secs(30), &mut || {
        proxy.metric("socksgate_dns_coalesced_total") >= (CLIENTS - 1) as u64
    });
    assert!(
        all_waiting,
        "coalesced: {}",
        proxy.metric("socksgate_dns_coalesced_total")
    );
    let udp = sock_rx.recv_timeout(IO_TIMEOUT).unwrap();
    for (from, q) in held.lock().unwrap().drain(..) {
        send(&udp, from, &answer_for(&q, [127, 0, 0, 1]));
    }
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(
        r.count(RecordType::A),
        1,
        "one A query for {CLIENTS} lookups"
    );
    assert_eq!(r.count(RecordType::AAAA), 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Per-family answers (RFC 8305 §3)

/// The answer to `q`: A `v4` or AAAA `v6` (NODATA for the type not given).
fn answer_with(q: &Message, v4: Option<[u8; 4]>, v6: Option<std::net::Ipv6Addr>) -> Message {
    let mut m = answer_for(q, v4.unwrap_or([0; 4]));
    if v4.is_none() {
        m.take_answers();
    }
    if let (Some(question), Some(ip)) = (q.queries().first(), v6) {
        if question.query_type() == RecordType::AAAA {
            let name = question.name().clone();
            m.add_answer(Record::from_rdata(
                name,
                60,
                RData::AAAA(hickory_proto::rr::rdata::AAAA(ip)),
            ));
        }
    }
    m
}

/// A responder that answers A at once with `v4` and AAAA with `v6` after `aaaa_delay`; `aaaa_sent` turns true
/// once the AAAA answer went out.
fn slow_aaaa_responder(
    v4: [u8; 4],
    v6: std::net::Ipv6Addr,
    aaaa_delay: Duration,
    aaaa_sent: Arc<AtomicBool>,
) -> Responder {
    Responder::start(
        false,
        move |udp, from, q| {
            let Some(question) = q.queries().first() else {
                return;
            };
            if question.query_type() == RecordType::A {
                send(udp, from, &answer_with(q, Some(v4), None));
                return;
            }
            let (udp, q, sent) = (udp.try_clone().unwrap(), q.clone(), Arc::clone(&aaaa_sent));
            thread::spawn(move || {
                thread::sleep(aaaa_delay);
                send(&udp, from, &answer_with(&q, None, Some(v6)));
                sent.store(true, Ordering::Relaxed);
            });
        },
        |_, q| answer_for(q, [127, 0, 0, 1]),
    )
}

#[test]
fn a_first_connects_without_waiting_for_a_slow_aaaa() {
    let echo = TestServer::echo();
    let sent = Arc::new(AtomicBool::new(false));
    // AAAA says ::1, where nothing listens on the echo server's port: refused at once once it is cached.
    let r = slow_aaaa_responder(
        [127, 0, 0, 1],
        std::net::Ipv6Addr::LOCALHOST,
        Duration::from_secs(2),
        Arc::clone(&sent),
    );
    let proxy = proxy_with_dns(&[r.addr.to_string()], &["--dns-timeout", "10s"]);
    let started = Instant::now();
    let (rep, mut s) = connect_name(proxy.addr(), "slow6.test", echo.addr.port());
    let took = started.elapsed();
    assert_eq!(rep, 0);
    assert_echo(&mut s, b"over ipv4 before AAAA");
    // The 50 ms resolution delay, then IPv4: well under the 2 s the AAAA answer takes.
    assert!(
        took >= Duration::from_millis(50) && took < Duration::from_secs(1),
        "took {took:?}"
    );
    assert!(
        !sent.load(Ordering::Relaxed),
        "connected before AAAA answered"
    );
    // The whole answer is cached once AAAA is in: the next session asks nothing.
    assert!(wait_until(Duration::from_secs(10), &mut || {
        sent.load(Ordering::Relaxed) && proxy.metric("socksgate_dns_cache_names") >= 1
    }));
    let (rep, mut s) = connect_name(proxy.addr(), "slow6.test", echo.addr.port());
    assert_eq!(rep, 0);
    assert_echo(&mut s, b"from the cache");
    assert_eq!((r.count(RecordType::A), r.count(RecordType::AAAA)), (1, 1));
}

#[test]
fn aaaa_within_the_resolution_delay_is_dialled_first() {
    if !have_ipv6() {
        eprintln!("note: no IPv6 loopback: skipped");
        return;
    }
    // The same port on ::1 (recording who connects) and on 127.0.0.1 (a banner that gives IPv4 away).
    let (six, four, peers) = loop {
        let (six, peers) = recording_echo("[::1]:0");
        if let Some(four) = banner_server(&format!("127.0.0.1:{}", six.addr.port()), b"four") {
            break (six, four, peers);
        }
    };
    let r = slow_aaaa_responder(
        [127, 0, 0, 1],
        std::net::Ipv6Addr::LOCALHOST,
        // Well inside the 50 ms: an AAAA that comes with the A (no early answer) would pass too, IPv6 first.
        Duration::from_millis(5),
        Arc::default(),
    );
    let proxy = proxy_with_dns(&[r.addr.to_string()], &[]);
    let (rep, mut s) = connect_name(proxy.addr(), "both.test", six.addr.port());
    assert_eq!(rep, 0);
    assert_echo(&mut s, b"over ipv6");
    let peer = peers.recv_timeout(IO_TIMEOUT).unwrap();
    assert!(peer.is_ipv6(), "the target saw {peer}");
    drop(four);
}

#[test]
fn upstream_given_by_name_is_resolved_through_the_cache() {
    let echo = TestServer::echo();
    let upstream = Proxy::start(&["--resolve", &format!("target.test={}", echo.addr.ip())]);
    // up.test: A 127.0.0.1 at once, AAAA ::1 (nothing listens there on the upstream's port) a little later.
    let r = slow_aaaa_responder(
        [127, 0, 0, 1],
        std::net::Ipv6Addr::LOCALHOST,
        Duration::from_millis(200),
        Arc::default(),
    );
    let front = proxy_with_dns(
        &[r.addr.to_string()],
        &[
            "--upstream",
            &format!("socks5://up.test:{}", upstream.addr().port()),
        ],
    );
    for i in 0..3 {
        let (rep, mut s) = connect_name(front.addr(), "target.test", echo.addr.port());
        assert_eq!(rep, 0, "session {i}");
        assert_echo(&mut s, format!("session {i} through up.test").as_bytes());
    }
    // The start-up check and every session shared one lookup (coalesced, then cached for its TTL); the target's
    // name went to the upstream unresolved.
    assert_eq!(r.count(RecordType::A), 1);
    assert!(front.wait_for(Duration::from_secs(10), || front
        .log()
        .contains("upstream proxy up.test resolves to")));
    assert!(!r
        .seen
        .lock()
        .unwrap()
        .iter()
        .any(|q| q.1.starts_with("target")));
}

#[test]
fn queries_leave_from_the_bind_address() {
    // 127.0.0.2 is local on Linux (all of 127/8 is); elsewhere the case is skipped.
    if UdpSocket::bind("127.0.0.2:0").is_err() {
        eprintln!("note: 127.0.0.2 cannot be bound here: skipped");
        return;
    }
    let echo = TestServer::echo();
    let sources: Arc<Mutex<Vec<(&'static str, SocketAddr)>>> = Arc::default();
    let (udp_seen, tcp_seen) = (Arc::clone(&sources), Arc::clone(&sources));
    // UDP answers come truncated, so the TCP path is asked too.
    let r = Responder::start(
        true,
        move |udp, from, q| {
            udp_seen.lock().unwrap().push(("udp", from));
            let mut m = answer_for(q, [127, 0, 0, 1]);
            m.take_answers();
            m.set_truncated(true);
            send(udp, from, &m);
        },
        move |peer, q| {
            tcp_seen.lock().unwrap().push(("tcp", peer));
            answer_for(q, [127, 0, 0, 1])
        },
    );
    let proxy = proxy_with_dns(&[r.addr.to_string()], &["--bind", "127.0.0.2"]);
    let (rep, mut s) = connect_name(proxy.addr(), "bound.test", echo.addr.port());
    assert_eq!(rep, 0);
    assert_echo(&mut s, b"from 127.0.0.2");
    let seen = sources.lock().unwrap().clone();
    assert!(seen.iter().any(|(t, _)| *t == "udp"), "{seen:?}");
    assert!(seen.iter().any(|(t, _)| *t == "tcp"), "{seen:?}");
    for (transport, from) in &seen {
        assert_eq!(
            from.ip(),
            "127.0.0.2".parse::<std::net::IpAddr>().unwrap(),
            "{transport} query from {from}"
        );
    }
}

#[test]
fn a_late_answer_for_an_earlier_origin_is_not_taken_for_the_next() {
    use common::origin::{HttpConn, Origin};
    let (a, b) = (Origin::start(), Origin::start());
    // a.test: A at once, AAAA 500 ms later, while the connection is already resolving b.test (answered after
    // 1.5 s). An AAAA answer taken for b.test's lookup would send b's request to a's origin.
    let r = Responder::start(
        false,
        |udp, from, q| {
            let Some(question) = q.queries().first() else {
                return;
            };
            let name = question.name().to_ascii();
            let is_a = question.query_type() == RecordType::A;
            let delay = match (name.as_str(), is_a) {
                ("a.test.", true) => Duration::ZERO,
                ("a.test.", false) => Duration::from_millis(500),
                _ => Duration::from_millis(1500),
            };
            let answer = if is_a {
                answer_with(q, Some([127, 0, 0, 1]), None)
            } else {
                answer_with(q, None, Some(std::net::Ipv6Addr::LOCALHOST))
            };
            let udp = udp.try_clone().unwrap();
            thread::spawn(move || {
                thread::sleep(delay);
                send(&udp, from, &answer);
            });
        },
        |_, q| answer_for(q, [127, 0, 0, 1]),
    );
    let proxy = proxy_with_dns(&[r.addr.to_string()], &["--dns-timeout", "10s"]);
    let mut c = HttpConn::connect(proxy.addr());
    let (pa, pb) = (a.addr.port(), b.addr.port());
    c.send(format!("GET http://a.test:{pa}/one HTTP/1.1\r\nHost: a.test:{pa}\r\n\r\n").as_bytes());
    let one = c.read_response(false);
    assert_eq!(one.status, 200);
    c.send(format!("GET http://b.test:{pb}/two HTTP/1.1\r\nHost: b.test:{pb}\r\n\r\n").as_bytes());
    let two = c.read_response(false);
    assert_eq!(two.status, 200, "{}", two.head_text());
    assert_eq!(two.header("X-Origin-Port"), Some(pb.to_string().as_str()));
    assert_eq!(b.requests_to("/two").len(), 1);
    assert!(a.requests_to("/two").is_empty());
}
