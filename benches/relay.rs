//! One socksgate worker's relay loop, measured in-process over loopback.
//!
//! Starts `socksgate::control::Server` with one worker thread, then:
//! - pushes a fixed amount of data through SOCKS5 tunnels (up: client -> sink target;
//!   down: source target -> client) and reports GB/s;
//! - opens short tunnels (connect, SOCKS5 handshake, 32-byte echo, target closes) from a
//!   few client threads and reports connections/s.
//!
//! Every phase is bounded both in count and in time. Client, target and proxy threads all
//! share this machine's cores, so the figures are for comparing builds on one machine,
//! not absolute capacity. `cargo bench --bench relay`

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use socksgate::config::Config;
use socksgate::control::Server;
use socksgate::proto::{socks5, upstream, Parse, TargetAddr};

/// Bytes pushed per bulk run (per direction and stream count).
const BULK_BYTES: u64 = 2 << 30;
/// A bulk run stops early after this long.
const BULK_MAX: Duration = Duration::from_secs(8);
/// Write/read block size of the bulk clients and targets.
const BLOCK: usize = 256 * 1024;
/// Short tunnels per connection-rate run, at most.
const CONN_OPS: u64 = 40_000;
/// A connection-rate run stops early after this long.
const CONN_MAX: Duration = Duration::from_secs(6);
/// Client threads of the connection-rate run.
const CONN_CLIENTS: usize = 16;
/// Bytes echoed per short tunnel.
const PING: usize = 32;
/// Bound on every blocking socket operation, so a broken build cannot hang the bench.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let cfg = Config {
        listen: vec!["127.0.0.1:0".parse().expect("addr")],
        threads: 1,
        ..Config::default()
    };
    let server = Server::start(cfg).expect("start socksgate");
    let proxy = server.addrs()[0];
    println!("socksgate: 1 worker on {proxy}");
    // What every connection costs in the slab before any buffer: the idle-memory floor.
    println!(
        "size_of: Conn {} B, Phase {} B, TargetAddr {} B, Buffer {} B",
        std::mem::size_of::<socksgate::worker::conn::Conn>(),
        std::mem::size_of::<socksgate::worker::conn::Phase>(),
        std::mem::size_of::<socksgate::proto::TargetAddr>(),
        std::mem::size_of::<socksgate::buffer::Buffer>(),
    );
    println!(
        "{:<28}  {:>10}  {:>12}  {:>8}",
        "run", "amount", "rate", "seconds"
    );
    println!("{:-<28}  {:->10}  {:->12}  {:->8}", "", "", "", "");

    for (streams, up) in [(1, true), (1, false), (4, true), (4, false)] {
        let (bytes, secs) = bulk(proxy, streams, up);
        let dir = if up { "up" } else { "down" };
        println!(
            "{:<28}  {:>7} MB  {:>7.2} GB/s  {:>8.2}",
            format!("bulk {streams} stream(s) {dir}"),
            bytes >> 20,
            bytes as f64 / secs / 1e9,
            secs
        );
    }
    let (ops, secs) = connrate(proxy);
    println!(
        "{:<28}  {:>10}  {:>8.0} /s  {:>8.2}",
        format!("short tunnels x{CONN_CLIENTS} clients"),
        ops,
        ops as f64 / secs,
        secs
    );
    server.stop();
}

/// SOCKS5 no-auth CONNECT to `target` through `proxy`; returns the tunnel.
fn socks5_connect(proxy: SocketAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    // Greeting and request in one write (the server parses pipelined handshakes).
    let mut req = [0u8; socks5::MAX_GREETING_LEN + socks5::MAX_REQUEST_LEN];
    let n = socks5::encode_greeting(&[socks5::METHOD_NO_AUTH], &mut req);
    let m = socks5::encode_request(
        socks5::Command::Connect,
        &TargetAddr::Ip(target),
        &mut req[n..],
    );
    s.write_all(&req[..n + m])?;
    // Method choice, then the reply: 127.0.0.1 targets get an IPv4 BND.ADDR, 10 bytes.
    let mut reply = [0u8; 2 + 10];
    s.read_exact(&mut reply)?;
    let method = upstream::parse_method_choice(&reply);
    let connect = upstream::parse_socks5_reply(&reply[2..]);
    match (method, connect) {
        (Ok(Parse::Done(socks5::METHOD_NO_AUTH, 2)), Ok(Parse::Done(r, 10))) if r.rep == 0 => Ok(s),
        _ => Err(std::io::Error::other(format!("refused: {reply:?}"))),
    }
}

/// A listener on a free loopback port.
fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// Push BULK_BYTES (split over `streams`) through tunnels; returns (bytes, seconds).
fn bulk(proxy: SocketAddr, streams: usize, up: bool) -> (u64, f64) {
    let (l, target) = listener();
    let per_stream = BULK_BYTES / streams as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    // Target side: one thread per accepted stream, sink (up) or source (down).
    let tstop = stop.clone();
    let target_thread = thread::spawn(move || {
        let mut hs = Vec::new();
        for _ in 0..streams {
            let Ok((mut s, _)) = l.accept() else { break };
            let stop = tstop.clone();
            hs.push(thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                let mut buf = vec![0x5au8; BLOCK];
                let mut left = per_stream;
                while left > 0 && !stop.load(Relaxed) {
                    let r = if up {
                        s.read(&mut buf)
                    } else {
                        let n = (left as usize).min(BLOCK);
                        s.write(&buf[..n])
                    };
                    match r {
                        Ok(0) => break,
                        Ok(n) => left -= n as u64,
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => break,
                    }
                }
            }));
        }
        for h in hs {
            let _ = h.join();
        }
    });
    let start = Instant::now();
    let clients: Vec<_> = (0..streams)
        .map(|_| {
            let (stop, moved) = (stop.clone(), moved.clone());
            thread::spawn(move || {
                let mut s = socks5_connect(proxy, target).expect("tunnel");
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                let mut buf = vec![0xa5u8; BLOCK];
                let mut left = per_stream;
                while left > 0 && !stop.load(Relaxed) {
                    let r = if up {
                        let n = (left as usize).min(BLOCK);
                        s.write(&buf[..n])
                    } else {
                        s.read(&mut buf)
                    };
                    match r {
                        Ok(0) => break,
                        Ok(n) => {
                            left -= n as u64;
                            moved.fetch_add(n as u64, Relaxed);
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => break,
                    }
                }
                if up {
                    // Wait for the sink to have everything: half-close, then EOF from it.
                    let _ = s.shutdown(Shutdown::Write);
                    let _ = s.read(&mut buf);
                }
            })
        })
        .collect();
    // Watchdog: the run ends at BULK_MAX whatever happens.
    while clients.iter().any(|c| !c.is_finished()) && start.elapsed() < BULK_MAX {
        thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Relaxed);
    let secs = start.elapsed().as_secs_f64();
    for c in clients {
        let _ = c.join();
    }
    let _ = target_thread.join();
    (moved.load(Relaxed), secs)
}

/// Short tunnels from CONN_CLIENTS threads; returns (completed, seconds).
fn connrate(proxy: SocketAddr) -> (u64, f64) {
    let (l, target) = listener();
    let stop = Arc::new(AtomicBool::new(false));
    // Echo-close target: one blocking thread per client thread shares the listener; each
    // echoes PING bytes and closes first, so TIME_WAIT stays on the target side.
    let targets: Vec<_> = (0..CONN_CLIENTS)
        .map(|_| {
            let l = l.try_clone().expect("clone listener");
            let stop = stop.clone();
            thread::spawn(move || {
                let mut buf = [0u8; PING];
                while !stop.load(Relaxed) {
                    if let Ok((mut s, _)) = l.accept() {
                        let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                        if s.read_exact(&mut buf).is_ok() {
                            let _ = s.write_all(&buf);
                        }
                    }
                }
            })
        })
        .collect();
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let clients: Vec<_> = (0..CONN_CLIENTS)
        .map(|i| {
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            thread::spawn(move || {
                let ping = [i as u8; PING];
                let mut got = [0u8; PING + 1];
                while !stop.load(Relaxed) && done.load(Relaxed) < CONN_OPS {
                    let ok = socks5_connect(proxy, target).and_then(|mut s| {
                        s.write_all(&ping)?;
                        s.read_exact(&mut got[..PING])?;
                        // EOF from the target, relayed by the proxy.
                        let n = s.read(&mut got)?;
                        Ok(n == 0 && got[..PING] == ping)
                    });
                    if matches!(ok, Ok(true)) {
                        done.fetch_add(1, Relaxed);
                    } else {
                        failed.fetch_add(1, Relaxed);
                    }
                }
            })
        })
        .collect();
    while clients.iter().any(|c| !c.is_finished()) && start.elapsed() < CONN_MAX {
        thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Relaxed);
    let secs = start.elapsed().as_secs_f64();
    for c in clients {
        let _ = c.join();
    }
    // Wake every target thread blocked in accept so it sees the stop flag.
    for _ in 0..CONN_CLIENTS {
        let _ = TcpStream::connect_timeout(&target, IO_TIMEOUT);
    }
    for t in targets {
        let _ = t.join();
    }
    let f = failed.load(Relaxed);
    if f > 0 {
        eprintln!("connrate: {f} failed tunnels");
    }
    (done.load(Relaxed), secs)
}
