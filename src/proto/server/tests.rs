//! In-memory tests of the handshake machines: policy tables, a transcript driver that feeds the client's bytes in
//! any split (pipelined, byte by byte, cut at every position), and a client and a server exchanging bytes through
//! in-memory pipes that deliver one byte at a time.

use super::*;
use crate::proto::socks5::Command;
use crate::proto::{upstream, Name, TargetAddr};

/// What a server did with one client input: its output in order, the final event and the bytes it consumed.
#[derive(Debug, PartialEq, Eq)]
struct Transcript {
    out: Vec<u8>,
    end: String,
    consumed: usize,
}

/// Feeds `input` to a fresh SOCKS5 server in pieces of the given sizes (the last piece takes the rest), answering
/// credentials with `verdict`, until the handshake ends or the input runs out.
fn socks5_transcript(
    users: bool,
    input: &[u8],
    pieces: &[usize],
    verdict: fn(&[u8], &[u8]) -> bool,
) -> Transcript {
    let mut hs = Socks5Server::new(users);
    let mut buf = Vec::new();
    let mut fed = 0;
    let mut t = Transcript {
        out: Vec::new(),
        end: String::from("input ended"),
        consumed: 0,
    };
    let mut pieces = pieces.iter().copied();
    let mut out = [0u8; MAX_STEP_OUTPUT];
    loop {
        let step = hs.step(&buf, &mut out);
        t.out.extend_from_slice(&out[..step.written]);
        t.consumed += step.consumed;
        let event = format!("{:?}", step.event);
        let credentials = match step.event {
            Socks5Event::Credentials(c) => Some((c.user.to_vec(), c.pass.to_vec())),
            _ => None,
        };
        let need_more = matches!(step.event, Socks5Event::NeedMore);
        let terminal = matches!(
            step.event,
            Socks5Event::Request(_) | Socks5Event::Reject(_) | Socks5Event::Malformed(_)
        );
        buf.drain(..step.consumed);
        if let Some((user, pass)) = credentials {
            let ok = verdict(&user, &pass);
            let n = hs.auth_result(ok, &mut out);
            t.out.extend_from_slice(&out[..n]);
            if !ok {
                t.end = String::from("auth failed");
                assert!(hs.is_over());
                return t;
            }
        }
        if terminal {
            t.end = event;
            assert!(hs.is_over());
            return t;
        }
        if need_more {
            if fed == input.len() {
                return t;
            }
            let take = pieces.next().unwrap_or(input.len()).min(input.len() - fed);
            buf.extend_from_slice(&input[fed..fed + take]);
            fed += take;
        }
    }
}

/// The same transcript for every way of cutting `input`: whole, byte by byte, and in two at every position.
fn socks5_every_split(users: bool, input: &[u8], verdict: fn(&[u8], &[u8]) -> bool) -> Transcript {
    let whole = socks5_transcript(users, input, &[input.len()], verdict);
    let bytewise = socks5_transcript(users, input, &vec![1; input.len()], verdict);
    assert_eq!(bytewise, whole, "byte by byte");
    for k in 1..input.len() {
        let split = socks5_transcript(users, input, &[k, input.len() - k], verdict);
        assert_eq!(split, whole, "split at {k}");
    }
    whole
}

fn alice(user: &[u8], pass: &[u8]) -> bool {
    user == b"alice" && pass == b"secret"
}

fn ip4(a: [u8; 4], port: u16) -> TargetAddr {
    TargetAddr::Ip(SocketAddr::from((a, port)))
}

fn greeting(methods: &[u8]) -> Vec<u8> {
    let mut b = [0u8; socks5::MAX_GREETING_LEN];
    let n = socks5::encode_greeting(methods, &mut b);
    b[..n].to_vec()
}

fn user_pass(user: &[u8], pass: &[u8]) -> Vec<u8> {
    let mut b = [0u8; socks5::MAX_USER_PASS_LEN];
    let n = socks5::encode_user_pass(user, pass, &mut b);
    b[..n].to_vec()
}

fn request(command: Command, target: &TargetAddr) -> Vec<u8> {
    let mut b = [0u8; socks5::MAX_REQUEST_LEN];
    let n = socks5::encode_request(command, target, &mut b);
    b[..n].to_vec()
}

fn request_event(command: Command, target: TargetAddr) -> String {
    format!(
        "{:?}",
        Socks5Event::Request(socks5::Request { command, target })
    )
}

#[test]
fn method_choice_is_a_function_of_the_users_table() {
    use crate::proto::socks5::METHOD_USER_PASS as USER_PASS;
    use crate::proto::socks5::{METHOD_NO_ACCEPTABLE as NONE, METHOD_NO_AUTH as NO_AUTH};
    // (users configured, offers no-auth, offers user/pass) -> method.
    let table = [
        ((false, false, false), NONE),
        ((false, true, false), NO_AUTH),
        ((false, false, true), NONE),
        ((false, true, true), NO_AUTH),
        ((true, false, false), NONE),
        ((true, true, false), NONE),
        ((true, false, true), USER_PASS),
        ((true, true, true), USER_PASS),
    ];
    for ((users, no_auth, user_pass), want) in table {
        let g = Greeting { no_auth, user_pass };
        assert_eq!(choose_method(&g, users), want, "{users} {g:?}");
    }
    let socks4 = [
        ((false, false), true),
        ((false, true), true),
        ((true, false), false),
        ((true, true), true),
    ];
    for ((users, with_users), want) in socks4 {
        assert_eq!(
            socks4_allowed(users, with_users),
            want,
            "{users} {with_users}"
        );
    }
}

#[test]
fn pipelined_no_auth_handshake_in_any_split() {
    let target = ip4([192, 0, 2, 7], 443);
    let mut input = greeting(&[socks5::METHOD_NO_AUTH]);
    input.extend(request(Command::Connect, &target));
    let t = socks5_every_split(false, &input, alice);
    assert_eq!(t.out, [5, 0]);
    assert_eq!(t.end, request_event(Command::Connect, target));
    assert_eq!(t.consumed, input.len());
}

#[test]
fn pipelined_user_pass_handshake_in_any_split() {
    let name = Name::new(b"example.com").unwrap();
    let target = TargetAddr::Domain(name, 80);
    let mut input = greeting(&[socks5::METHOD_NO_AUTH, socks5::METHOD_USER_PASS]);
    input.extend(user_pass(b"alice", b"secret"));
    input.extend(request(Command::UdpAssociate, &target));
    // Bytes after the request are tunnel payload: never consumed by the handshake.
    input.extend_from_slice(b"GET / HTTP/1.1\r\n");
    let t = socks5_every_split(true, &input, alice);
    assert_eq!(t.out, [5, 2, 1, 0], "method X'02', then status success");
    assert_eq!(t.end, request_event(Command::UdpAssociate, target));
    assert_eq!(t.consumed, input.len() - b"GET / HTTP/1.1\r\n".len());
}

#[test]
fn a_failed_password_ends_the_handshake_before_the_request() {
    let mut input = greeting(&[socks5::METHOD_USER_PASS]);
    input.extend(user_pass(b"alice", b"wrong"));
    input.extend(request(Command::Connect, &ip4([127, 0, 0, 1], 22)));
    let t = socks5_every_split(true, &input, alice);
    assert_eq!(t.out, [5, 2, 1, 1]);
    assert_eq!(t.end, "auth failed");
    // The pipelined request is left unread: RFC 1929 §2 says close.
    assert_eq!(t.consumed, 3 + (1 + 1 + 5 + 1 + 5));
}

#[test]
fn refusals_and_malformed_messages() {
    // Users configured, but the client offers only "no authentication": X'FF', then close.
    let t = socks5_every_split(true, &greeting(&[socks5::METHOD_NO_AUTH]), alice);
    assert_eq!(t.out, [5, 0xff]);
    assert_eq!(
        t.end,
        format!("{:?}", Socks5Event::Reject(Failure::NotAllowed))
    );
    // A bad command is answered with REP X'07' (RFC 1928 §6) and an all-zero IPv4 BND.
    let mut input = greeting(&[socks5::METHOD_NO_AUTH]);
    input.extend_from_slice(&[5, 9, 0, 1, 127, 0, 0, 1, 0, 80]);
    let t = socks5_every_split(false, &input, alice);
    assert_eq!(t.out, [5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        t.end,
        format!("{:?}", Socks5Event::Reject(Failure::CommandNotSupported))
    );
    // A bad address type: X'08'.
    let mut input = greeting(&[socks5::METHOD_NO_AUTH]);
    input.extend_from_slice(&[5, 1, 0, 9]);
    let t = socks5_every_split(false, &input, alice);
    assert_eq!(t.out[2..4], [5, 8]);
    // A greeting or a credentials message that cannot be parsed has no reply: close.
    let t = socks5_every_split(false, &[4, 1, 0], alice);
    assert_eq!(
        (t.out.len(), t.end.as_str()),
        (0, "Malformed(BadVersion(4))")
    );
    let t = socks5_every_split(false, &[5, 0], alice);
    assert_eq!(t.end, "Malformed(NoMethods)");
    let mut input = greeting(&[socks5::METHOD_USER_PASS]);
    input.extend_from_slice(&[1, 0]);
    let t = socks5_every_split(true, &input, alice);
    assert_eq!(
        (t.out, t.end),
        (vec![5, 2], String::from("Malformed(BadField)"))
    );
}

#[test]
fn an_incomplete_handshake_waits_and_consumes_nothing_partial() {
    let mut input = greeting(&[socks5::METHOD_NO_AUTH]);
    input.extend(request(Command::Connect, &ip4([10, 0, 0, 1], 8080)));
    for cut in 0..input.len() {
        let t = socks5_transcript(false, &input[..cut], &[cut], alice);
        assert_eq!(t.end, "input ended", "cut {cut}");
        assert_eq!(t.consumed, if cut >= 3 { 3 } else { 0 }, "cut {cut}");
        assert_eq!(
            t.out,
            if cut >= 3 { vec![5, 0] } else { vec![] },
            "cut {cut}"
        );
    }
}

#[test]
fn steps_after_the_end_do_nothing() {
    let mut hs = Socks5Server::new(false);
    let mut out = [0u8; MAX_STEP_OUTPUT];
    let mut input = greeting(&[socks5::METHOD_NO_AUTH]);
    input.extend(request(Command::Bind, &ip4([127, 0, 0, 1], 1)));
    let s = hs.step(&input, &mut out);
    assert_eq!(
        (s.consumed, s.written, s.event),
        (3, 2, Socks5Event::Continue)
    );
    let s = hs.step(&input[3..], &mut out);
    assert!(matches!(s.event, Socks5Event::Request(_)) && hs.is_over());
    let again = hs.step(&input, &mut out);
    assert_eq!(
        (again.consumed, again.written, again.event),
        (0, 0, Socks5Event::NeedMore)
    );
    assert_eq!(
        hs.auth_result(true, &mut out),
        0,
        "no credentials were asked for"
    );
}

/// One in-memory direction of a connection: whatever was written, delivered at most `rate` bytes per read.
struct Pipe {
    queued: Vec<u8>,
    rate: usize,
}

impl Pipe {
    fn read(&mut self, into: &mut Vec<u8>) {
        let n = self.rate.min(self.queued.len());
        into.extend(self.queued.drain(..n));
    }
}

/// Bound on the read/step rounds of the pipe test: the whole handshake is under 40 bytes each way.
const MAX_EXCHANGES: usize = 1_000;

#[test]
fn interactive_client_and_server_through_one_byte_pipes() {
    // A client that sends each message only after the answer to the previous one, built from the proto crate's
    // client side (the one the proxy uses towards an upstream), against the server machine. Both directions
    // deliver a single byte per read, so every partial-output state on both sides is visited.
    let target = ip4([198, 51, 100, 4], 25);
    for rate in [1, 2, 7, 64] {
        let mut to_server = Pipe {
            queued: greeting(&[socks5::METHOD_USER_PASS]),
            rate,
        };
        let mut to_client = Pipe {
            queued: Vec::new(),
            rate,
        };
        let mut hs = Socks5Server::new(true);
        let (mut server_in, mut client_in) = (Vec::new(), Vec::new());
        let mut client_stage = 0;
        let mut out = [0u8; MAX_STEP_OUTPUT];
        let mut served = None;
        for _ in 0..MAX_EXCHANGES {
            to_server.read(&mut server_in);
            let s = hs.step(&server_in, &mut out);
            to_client.queued.extend_from_slice(&out[..s.written]);
            let credentials = match &s.event {
                Socks5Event::Credentials(c) => Some(alice(c.user, c.pass)),
                _ => None,
            };
            if let Socks5Event::Request(req) = &s.event {
                served = Some(req.clone());
            }
            server_in.drain(..s.consumed);
            if let Some(ok) = credentials {
                let n = hs.auth_result(ok, &mut out);
                to_client.queued.extend_from_slice(&out[..n]);
            }
            to_client.read(&mut client_in);
            let parsed = match client_stage {
                0 => upstream::parse_method_choice(&client_in).map(|p| match p {
                    Parse::Done(m, n) => Some((m == socks5::METHOD_USER_PASS, n)),
                    Parse::Incomplete => None,
                }),
                1 => upstream::parse_auth_status(&client_in).map(|p| match p {
                    Parse::Done(ok, n) => Some((ok, n)),
                    Parse::Incomplete => None,
                }),
                _ => Ok(None),
            };
            if let Some((ok, n)) = parsed.unwrap() {
                assert!(ok, "stage {client_stage}");
                client_in.drain(..n);
                to_server.queued.extend(match client_stage {
                    0 => user_pass(b"alice", b"secret"),
                    _ => request(Command::Connect, &target),
                });
                client_stage += 1;
            }
            if served.is_some() {
                break;
            }
        }
        let req = served.expect("the handshake completes");
        assert_eq!(
            (req.command, req.target),
            (Command::Connect, target.clone()),
            "rate {rate}"
        );
        assert!(
            to_client.queued.is_empty() && client_in.is_empty(),
            "rate {rate}"
        );
    }
}

/// Feeds a SOCKS4 request to a fresh server in two pieces cut at `k`; returns (output, event, consumed).
fn socks4_run(allowed: bool, input: &[u8], k: usize) -> (Vec<u8>, String, usize) {
    let mut hs = Socks4Server::new(allowed);
    let mut out = [0u8; MAX_STEP_OUTPUT];
    let first = hs.step(&input[..k], &mut out);
    if !matches!(first.event, Socks4Event::NeedMore) {
        return (
            out[..first.written].to_vec(),
            format!("{:?}", first.event),
            first.consumed,
        );
    }
    assert_eq!((first.consumed, first.written), (0, 0));
    let s = hs.step(input, &mut out);
    assert!(hs.is_over());
    (
        out[..s.written].to_vec(),
        format!("{:?}", s.event),
        s.consumed,
    )
}

#[test]
fn socks4_requests_and_refusals_in_any_split() {
    let name = Name::new(b"example.org").unwrap();
    let cases = [
        (
            TargetAddr::Ip(SocketAddr::from(([192, 0, 2, 1], 80))),
            &b"bob"[..],
        ),
        (TargetAddr::Domain(name, 443), b""),
    ];
    for (target, userid) in cases {
        let mut input = [0u8; socks4::MAX_REQUEST_LEN];
        let n = socks4::encode_request(socks4::Command::Connect, &target, userid, &mut input);
        let mut input = input[..n].to_vec();
        input.extend_from_slice(b"payload");
        let want = socks4::Request {
            command: socks4::Command::Connect,
            target: target.clone(),
            userid,
        };
        for k in 0..n {
            let (out, event, consumed) = socks4_run(true, &input, k);
            assert_eq!((out.len(), consumed), (0, n), "split {k}");
            assert_eq!(
                event,
                format!("{:?}", Socks4Event::Request(want.clone())),
                "split {k}"
            );
            // Users configured and SOCKS4 not allowed with them: CD 91 once the request is complete.
            let (out, event, consumed) = socks4_run(false, &input, k);
            assert_eq!(out, [0, 91, 0, 0, 0, 0, 0, 0], "split {k}");
            assert_eq!(
                (event, consumed),
                (format!("{:?}", Socks4Event::NotAllowed(want.clone())), n),
                "split {k}"
            );
        }
    }
    // An unknown command is refused at its byte with CD 91, and nothing is consumed.
    let (out, event, consumed) = socks4_run(true, &[4, 9, 0, 80], 2);
    assert_eq!(
        (out, event.as_str(), consumed),
        (
            vec![0, 91, 0, 0, 0, 0, 0, 0],
            "Reject(CommandNotSupported)",
            0
        )
    );
}

#[test]
fn a_certificate_authenticates_a_client_that_offers_no_authentication() {
    // (users configured, certified, offers no-auth, offers user/pass) -> password required.
    let table = [
        ((false, false, true, true), false),
        ((false, true, false, true), false),
        ((true, false, true, true), true),
        ((true, true, true, false), false),
        ((true, true, true, true), false),
        // Only username/password offered: it is asked for, and the caller accepts it for the certificate.
        ((true, true, false, true), true),
    ];
    for ((users, certified, no_auth, user_pass), want) in table {
        let g = Greeting { no_auth, user_pass };
        assert_eq!(
            password_required(users, certified, &g),
            want,
            "{users} {certified} {g:?}"
        );
    }
    let input = greeting(&[socks5::METHOD_NO_AUTH, socks5::METHOD_USER_PASS]);
    let mut out = [0u8; MAX_STEP_OUTPUT];
    for (certified, method) in [
        (false, socks5::METHOD_USER_PASS),
        (true, socks5::METHOD_NO_AUTH),
    ] {
        let mut hs = Socks5Server::new(true).certified(certified);
        assert_eq!(hs.method(), None);
        let s = hs.step(&input, &mut out);
        assert_eq!(
            (s.consumed, &out[..s.written], s.event),
            (input.len(), &[5, method][..], Socks5Event::Continue),
            "certified {certified}"
        );
        assert_eq!(hs.method(), Some(method));
        let next = if certified {
            Socks5Stage::Request
        } else {
            Socks5Stage::Auth
        };
        assert_eq!(hs.stage(), next);
    }
}

#[test]
fn the_error_that_ended_a_handshake_is_kept_for_the_log() {
    let mut out = [0u8; MAX_STEP_OUTPUT];
    let mut hs = Socks5Server::new(false);
    hs.step(&greeting(&[socks5::METHOD_NO_AUTH]), &mut out);
    assert_eq!(hs.error(), None);
    let s = hs.step(&[5, 9, 0, 1, 127, 0, 0, 1, 0, 80], &mut out);
    assert_eq!(s.event, Socks5Event::Reject(Failure::CommandNotSupported));
    assert_eq!(hs.error(), Some(ProtoError::BadCommand(9)));
    let mut hs = Socks5Server::new(false);
    hs.step(&[4, 1, 0], &mut out);
    assert_eq!(
        (hs.error(), hs.stage()),
        (Some(ProtoError::BadVersion(4)), Socks5Stage::Over)
    );
    let mut hs = Socks4Server::new(true);
    let s = hs.step(&[4, 9, 0, 80], &mut out);
    assert_eq!(s.event, Socks4Event::Reject(Failure::CommandNotSupported));
    assert_eq!(hs.error(), Some(ProtoError::BadCommand(9)));
}
