//! One name lookup as a sans-IO state machine: the search-list candidates in turn, A and AAAA asked in parallel for
//! each, every query tried on each server in turn for `attempts` rounds, a truncated UDP answer asked again over TCP
//! on the same server. The driver (src/dns/engine.rs) does the sockets and the clock and feeds back what arrives;
//! the machine says what to send, when it next needs a tick, and, at the end, the outcome.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::rr::{Name, RecordType};

use super::message::{self, Verdict};

/// The query slots of a lookup: 0 asks A, 1 asks AAAA.
pub const SLOTS: usize = 2;
const TYPES: [RecordType; SLOTS] = [RecordType::A, RecordType::AAAA];

/// Where and how patiently to ask.
#[derive(Debug, Clone)]
pub struct Servers {
    /// Nameservers, tried in order.
    pub addrs: Vec<SocketAddr>,
    /// Wait for one answer.
    pub timeout: Duration,
    /// Rounds over all servers.
    pub attempts: usize,
}

/// The transport of one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// One datagram from a fresh socket.
    Udp,
    /// A fresh TCP connection, the message with its two-byte length prefix (RFC 1035 §4.2.2).
    Tcp,
}

/// A message the driver must send for `slot`, replacing whatever socket that slot had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    /// Which query (0 = A, 1 = AAAA).
    pub slot: usize,
    /// The server.
    pub server: SocketAddr,
    /// UDP or TCP.
    pub transport: Transport,
    /// The encoded query (without a TCP length prefix).
    pub packet: Vec<u8>,
}

/// Why a lookup failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// No server answered in time.
    Timeout,
    /// The servers answered SERVFAIL.
    ServFail,
    /// The name does not exist.
    NxDomain,
    /// The name has no addresses.
    NoData,
    /// The servers refused or could not be reached.
    Refused,
    /// Not a name that can be asked.
    BadName,
}

/// The end of a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Addresses (IPv6 first, then IPv4: RFC 6724's default precedence, which Happy Eyeballs starts from) and the
    /// TTL to cache them for.
    Addrs(Vec<IpAddr>, u32),
    /// A failure and, for negative answers with a SOA, the TTL to cache it for.
    Failed(Error, Option<u32>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Waiting,
    Done(Verdict),
    Failed(Error),
}

/// CNAME targets asked for after answers that did not follow the chain.
const MAX_ALIAS_HOPS: u8 = 8;

#[derive(Debug)]
struct Query {
    /// The name asked: the candidate, or a CNAME target it led to.
    name: Name,
    /// Targets followed so far, and the smallest TTL on the way.
    hops: u8,
    chain_ttl: u32,
    id: u16,
    /// Sends made so far over UDP rounds; `try_no % servers` is the server asked.
    try_no: usize,
    server: SocketAddr,
    transport: Transport,
    deadline: Instant,
    /// The worst failure seen on this query (reported if every try fails).
    error: Option<Error>,
    state: State,
}

/// One lookup in flight.
pub struct Lookup {
    servers: Arc<Servers>,
    names: Vec<Name>,
    at: usize,
    queries: Vec<Query>,
    /// The smallest negative TTL seen across candidates; `None` once one negative answer had none.
    neg_ttl: Option<u32>,
    saw_nxdomain_only: bool,
    out: Vec<Send>,
    outcome: Option<Outcome>,
    ids: Box<dyn FnMut() -> u16 + std::marker::Send>,
}

impl Lookup {
    /// Starts a lookup of `candidates` (the search list applied, in order). `ids` makes query IDs (random in
    /// production). Returns the lookup with its first sends queued (see [`Lookup::take_sends`]).
    pub fn start(
        candidates: &[String],
        servers: Arc<Servers>,
        ids: Box<dyn FnMut() -> u16 + std::marker::Send>,
        now: Instant,
    ) -> Lookup {
        let names: Vec<Name> = candidates
            .iter()
            .filter_map(|c| message::wire_name(c))
            .collect();
        let mut l = Lookup {
            servers,
            names,
            at: 0,
            queries: Vec::with_capacity(SLOTS),
            neg_ttl: Some(u32::MAX),
            saw_nxdomain_only: true,
            out: Vec::new(),
            outcome: None,
            ids,
        };
        if l.names.is_empty() {
            l.outcome = Some(Outcome::Failed(Error::BadName, None));
        } else if l.servers.addrs.is_empty() {
            l.outcome = Some(Outcome::Failed(Error::Refused, None));
        } else {
            l.ask_candidate(now);
        }
        l
    }

    /// The messages to send now.
    pub fn take_sends(&mut self) -> Vec<Send> {
        std::mem::take(&mut self.out)
    }

    /// The result, once the lookup has ended.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// True while `slot` waits for an answer (its socket must stay open).
    pub fn slot_waiting(&self, slot: usize) -> bool {
        self.outcome.is_none()
            && self
                .queries
                .get(slot)
                .is_some_and(|q| q.state == State::Waiting)
    }

    /// One family's addresses while the other family's query is still out: (slot, addresses). Once a query of the
    /// current candidate has addresses the search ends with that candidate, so these are part of the outcome
    /// whatever the other query brings; a worker can start connecting with them (RFC 8305 §3).
    pub fn early(&self) -> Option<(usize, &[IpAddr])> {
        if self.outcome.is_some() {
            return None;
        }
        let mut waiting = false;
        let mut found = None;
        for (slot, q) in self.queries.iter().enumerate() {
            match &q.state {
                State::Waiting => waiting = true,
                State::Done(Verdict::Addrs(a, _)) if !a.is_empty() => found = Some((slot, &a[..])),
                _ => {}
            }
        }
        found.filter(|_| waiting)
    }

    /// When the machine next needs [`Lookup::on_tick`].
    pub fn deadline(&self) -> Option<Instant> {
        if self.outcome.is_some() {
            return None;
        }
        self.queries
            .iter()
            .filter(|q| q.state == State::Waiting)
            .map(|q| q.deadline)
            .min()
    }

    /// A message arrived on `slot`'s socket from `from`. Anything that is not the answer to that slot's current
    /// question from that slot's current server is ignored.
    pub fn on_message(&mut self, slot: usize, from: SocketAddr, bytes: &[u8], now: Instant) {
        let Some(q) = self.queries.get_mut(slot) else {
            return;
        };
        if q.state != State::Waiting || from != q.server {
            return;
        }
        match message::judge(bytes, q.id, &q.name, TYPES[slot]) {
            Verdict::Foreign => return,
            Verdict::Truncated if q.transport == Transport::Udp => {
                q.transport = Transport::Tcp;
                self.send(slot, now);
                return;
            }
            Verdict::Truncated | Verdict::Refused => {
                self.retry(slot, Error::Refused, now);
                return;
            }
            Verdict::ServFail => {
                self.retry(slot, Error::ServFail, now);
                return;
            }
            Verdict::Alias(target, ttl) if q.hops < MAX_ALIAS_HOPS => {
                q.name = target;
                q.hops += 1;
                q.chain_ttl = q.chain_ttl.min(ttl);
                q.try_no = 0;
                q.error = None;
                q.server = self.servers.addrs[0];
                q.transport = Transport::Udp;
                self.send(slot, now);
                return;
            }
            Verdict::Alias(..) => q.state = State::Done(Verdict::NoData(None)),
            Verdict::Addrs(a, t) => {
                let t = t.min(q.chain_ttl);
                q.state = State::Done(Verdict::Addrs(a, t));
            }
            v => q.state = State::Done(v),
        }
        self.settle(now);
    }

    /// `slot`'s socket failed (ICMP port unreachable, TCP refused or reset): the next server is asked.
    pub fn on_transport_error(&mut self, slot: usize, now: Instant) {
        if self.slot_waiting(slot) {
            self.retry(slot, Error::Refused, now);
        }
    }

    /// Time passed: queries past their deadline move on to the next server or fail.
    pub fn on_tick(&mut self, now: Instant) {
        for slot in 0..self.queries.len() {
            if self.slot_waiting(slot) && self.queries[slot].deadline <= now {
                self.retry(slot, Error::Timeout, now);
            }
        }
    }

    fn ask_candidate(&mut self, now: Instant) {
        self.queries.clear();
        for _ in 0..SLOTS {
            self.queries.push(Query {
                name: self.names[self.at].clone(),
                hops: 0,
                chain_ttl: u32::MAX,
                id: 0,
                try_no: 0,
                server: self.servers.addrs[0],
                transport: Transport::Udp,
                deadline: now,
                error: None,
                state: State::Waiting,
            });
        }
        // Both queries exist before either is sent, so a send that fails at once settles with both in view.
        for slot in 0..SLOTS {
            self.send(slot, now);
        }
    }

    /// Sends the slot's query (new ID) to its current server over its current transport.
    fn send(&mut self, slot: usize, now: Instant) {
        let id = (self.ids)();
        let q = &mut self.queries[slot];
        q.id = id;
        q.deadline = now + self.servers.timeout;
        match message::query(id, &q.name, TYPES[slot]) {
            Some(packet) => self.out.push(Send {
                slot,
                server: q.server,
                transport: q.transport,
                packet,
            }),
            None => {
                q.state = State::Failed(Error::BadName);
                self.settle(now);
            }
        }
    }

    /// This try failed with `why`: ask the next server over UDP, or give up after the last round.
    fn retry(&mut self, slot: usize, why: Error, now: Instant) {
        let n = self.servers.addrs.len();
        let limit = n * self.servers.attempts.max(1);
        let q = &mut self.queries[slot];
        // A server that answered (SERVFAIL, REFUSED) says more than one that stayed silent.
        if q.error.is_none() || q.error == Some(Error::Timeout) {
            q.error = Some(why);
        }
        q.try_no += 1;
        if q.try_no >= limit {
            q.state = State::Failed(q.error.unwrap_or(why));
            self.settle(now);
            return;
        }
        q.server = self.servers.addrs[q.try_no % n];
        q.transport = Transport::Udp;
        self.send(slot, now);
    }

    /// When both queries of the current candidate are done: the outcome, or the next candidate.
    fn settle(&mut self, now: Instant) {
        if self.outcome.is_some() || self.queries.iter().any(|q| q.state == State::Waiting) {
            return;
        }
        let mut addrs = Vec::new();
        let mut ttl = u32::MAX;
        let mut failure = None;
        let mut negatives = Vec::new();
        // AAAA's addresses first (see [`Outcome::Addrs`]).
        for q in self.queries.iter().rev() {
            if let State::Done(Verdict::Addrs(a, t)) = &q.state {
                addrs.extend_from_slice(a);
                ttl = ttl.min(*t);
            }
        }
        for q in &self.queries {
            match &q.state {
                State::Done(Verdict::Addrs(..)) => {}
                State::Done(Verdict::NxDomain(t)) => negatives.push((true, *t)),
                State::Done(Verdict::NoData(t)) => negatives.push((false, *t)),
                State::Failed(e) => failure = failure.or(Some(*e)),
                _ => failure = failure.or(Some(Error::Refused)),
            }
        }
        for (nx, t) in negatives {
            self.saw_nxdomain_only &= nx;
            self.note_negative(t);
        }
        if !addrs.is_empty() {
            self.outcome = Some(Outcome::Addrs(addrs, ttl));
            return;
        }
        if let Some(e) = failure {
            // A server problem ends the search: answering from a later search domain would give another name.
            self.outcome = Some(Outcome::Failed(e, None));
            return;
        }
        if self.at + 1 < self.names.len() {
            self.at += 1;
            self.ask_candidate(now);
            return;
        }
        let kind = if self.saw_nxdomain_only {
            Error::NxDomain
        } else {
            Error::NoData
        };
        self.outcome = Some(Outcome::Failed(kind, self.neg_ttl));
    }

    fn note_negative(&mut self, ttl: Option<u32>) {
        self.neg_ttl = match (self.neg_ttl, ttl) {
            (Some(a), Some(b)) => Some(a.min(b)),
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::message::tests::{a, answer, response, truncated};
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::rdata::AAAA;
    use hickory_proto::rr::{RData, Record};
    use ResponseCode::{NXDomain, NoError, ServFail};

    const S1: &str = "127.0.0.1:53";
    const S2: &str = "127.0.0.2:53";

    fn servers(list: &[&str], attempts: usize) -> Arc<Servers> {
        Arc::new(Servers {
            addrs: list.iter().map(|s| s.parse().unwrap()).collect(),
            timeout: Duration::from_secs(2),
            attempts,
        })
    }

    fn counter() -> Box<dyn FnMut() -> u16 + std::marker::Send> {
        let mut n = 100u16;
        Box::new(move || {
            n += 1;
            n
        })
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The ID and question name of a send.
    fn asked(s: &Send) -> (u16, String) {
        let m = Message::from_vec(&s.packet).unwrap();
        (m.id(), m.queries()[0].name().to_ascii())
    }

    /// Hands `l` what the server `send` went to answers it: the send's own ID, name and type, with `rcode`,
    /// the `records` and an optional SOA (ttl, minimum) in authority.
    fn reply(
        l: &mut Lookup,
        send: &Send,
        rcode: ResponseCode,
        records: Vec<Record>,
        soa: Option<(u32, u32)>,
        now: Instant,
    ) {
        let m = Message::from_vec(&send.packet).unwrap();
        let q = &m.queries()[0];
        let name = q.name().to_ascii();
        let bytes = response(m.id(), &name, q.query_type(), rcode, records, soa);
        l.on_message(send.slot, send.server, &bytes, now);
    }

    /// [`reply`] with NOERROR, `records` and no SOA.
    fn reply_records(l: &mut Lookup, send: &Send, records: Vec<Record>, now: Instant) {
        reply(l, send, NoError, records, None, now);
    }

    /// [`reply`] without records: `rcode` and an optional SOA (ttl, minimum).
    fn reply_negative(
        l: &mut Lookup,
        send: &Send,
        rcode: ResponseCode,
        soa: Option<(u32, u32)>,
        now: Instant,
    ) {
        reply(l, send, rcode, vec![], soa, now);
    }

    fn aaaa(name: &str, ttl: u32, ip: &str) -> Record {
        Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            ttl,
            RData::AAAA(AAAA(ip.parse().unwrap())),
        )
    }

    #[test]
    fn both_families_in_parallel_ipv6_first() {
        let t0 = Instant::now();
        let mut l = Lookup::start(&["h.test".into()], servers(&[S1], 2), counter(), t0);
        let sends = l.take_sends();
        assert_eq!(sends.len(), 2);
        assert_eq!((sends[0].slot, sends[1].slot), (0, 1));
        assert!(sends
            .iter()
            .all(|s| s.transport == Transport::Udp && s.server == addr(S1)));
        let (id0, n0) = asked(&sends[0]);
        let (id1, n1) = asked(&sends[1]);
        assert_eq!((n0.as_str(), n1.as_str()), ("h.test.", "h.test."));
        assert_ne!(id0, id1);
        reply_records(&mut l, &sends[1], vec![aaaa("h.test.", 50, "::1")], t0);
        assert!(l.outcome().is_none());
        assert!(!l.slot_waiting(1) && l.slot_waiting(0));
        // AAAA answered first: its addresses can be used before A answers.
        assert_eq!(l.early(), Some((1, &["::1".parse().unwrap()][..])));
        reply_records(
            &mut l,
            &sends[0],
            vec![a("h.test.", 70, [127, 0, 0, 9])],
            t0,
        );
        assert_eq!(
            l.outcome(),
            Some(&Outcome::Addrs(
                vec!["::1".parse().unwrap(), "127.0.0.9".parse().unwrap()],
                50
            ))
        );
        assert_eq!(l.deadline(), None);
        assert_eq!(l.early(), None, "the outcome says it all");
    }

    #[test]
    fn wrong_id_wrong_server_and_garbage_are_ignored() {
        let t0 = Instant::now();
        let mut l = Lookup::start(&["h.test".into()], servers(&[S1], 1), counter(), t0);
        let sends = l.take_sends();
        let (id0, _) = asked(&sends[0]);
        let good = answer(
            id0,
            "h.test.",
            RecordType::A,
            vec![a("h.test.", 9, [10, 0, 0, 1])],
        );
        let spoofed = vec![a("h.test.", 9, [6, 6, 6, 6])];
        let spoof = answer(id0.wrapping_add(7), "h.test.", RecordType::A, spoofed);
        l.on_message(0, addr(S1), &spoof, t0);
        l.on_message(0, addr("127.0.0.66:53"), &good, t0);
        l.on_message(0, addr(S1), b"\x00\x01garbage", t0);
        assert!(l.slot_waiting(0));
        l.on_message(0, addr(S1), &good, t0);
        assert!(!l.slot_waiting(0));
    }

    #[test]
    fn timeouts_move_to_the_next_server_then_fail() {
        let t0 = Instant::now();
        let mut l = Lookup::start(&["h.test".into()], servers(&[S1, S2], 2), counter(), t0);
        assert_eq!(l.take_sends().len(), 2);
        assert_eq!(l.deadline(), Some(t0 + Duration::from_secs(2)));
        // Nothing happens before the deadline.
        l.on_tick(t0 + Duration::from_millis(1999));
        assert!(l.take_sends().is_empty());
        let mut t = t0;
        let mut order = Vec::new();
        for _ in 0..3 {
            t += Duration::from_secs(2);
            l.on_tick(t);
            let s = l.take_sends();
            assert_eq!(s.len(), 2);
            order.push(s[0].server);
        }
        assert_eq!(order, vec![addr(S2), addr(S1), addr(S2)]);
        t += Duration::from_secs(2);
        l.on_tick(t);
        assert!(l.take_sends().is_empty());
        assert_eq!(l.outcome(), Some(&Outcome::Failed(Error::Timeout, None)));
    }

    #[test]
    fn early_addresses_only_once_the_candidate_is_settled() {
        let t0 = Instant::now();
        let mut l = Lookup::start(
            &["h.a.test".into(), "h.test".into()],
            servers(&[S1], 1),
            counter(),
            t0,
        );
        let s = l.take_sends();
        assert_eq!(asked(&s[0]).1, "h.a.test.");
        // A NODATA for A says nothing yet: if AAAA is negative too, the next candidate is asked.
        reply_negative(&mut l, &s[0], NoError, Some((9, 9)), t0);
        assert_eq!(l.early(), None);
        reply_negative(&mut l, &s[1], NoError, Some((9, 9)), t0);
        let s = l.take_sends();
        assert_eq!(asked(&s[0]).1, "h.test.");
        assert_eq!(l.early(), None);
        reply_records(&mut l, &s[0], vec![a("h.test.", 9, [10, 0, 0, 1])], t0);
        assert_eq!(l.early(), Some((0, &["10.0.0.1".parse().unwrap()][..])));
        assert!(l.outcome().is_none(), "AAAA is still out");
    }

    #[test]
    fn servfail_asks_the_next_server_at_once() {
        let t0 = Instant::now();
        let mut l = Lookup::start(&["h.test".into()], servers(&[S1, S2], 1), counter(), t0);
        let s = l.take_sends();
        reply_negative(&mut l, &s[0], ServFail, None, t0);
        let again = l.take_sends();
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].slot, again[0].server), (0, addr(S2)));
        // The second server's answer is taken; the first server may no longer answer for slot 0.
        reply_records(&mut l, &again[0], vec![a("h.test.", 9, [10, 0, 0, 1])], t0);
        reply_negative(&mut l, &s[1], ServFail, None, t0);
        let s = l.take_sends();
        assert_eq!((s[0].slot, s[0].server), (1, addr(S2)));
        reply_negative(&mut l, &s[0], ServFail, None, t0);
        // IPv4 answered, IPv6 failed everywhere: the IPv4 addresses are the result.
        assert_eq!(
            l.outcome(),
            Some(&Outcome::Addrs(vec!["10.0.0.1".parse().unwrap()], 9))
        );
    }

    #[test]
    fn truncation_retries_over_tcp_on_the_same_server() {
        let t0 = Instant::now();
        let mut l = Lookup::start(&["h.test".into()], servers(&[S1, S2], 1), counter(), t0);
        let s = l.take_sends();
        let (id0, _) = asked(&s[0]);
        l.on_message(0, addr(S1), &truncated(id0, "h.test."), t0);
        let tcp = l.take_sends();
        assert_eq!(tcp.len(), 1);
        assert_eq!(
            (tcp[0].transport, tcp[0].server),
            (Transport::Tcp, addr(S1))
        );
        let (id1, _) = asked(&tcp[0]);
        assert_ne!(id1, id0);
        // A TCP failure goes back to UDP on the next server.
        l.on_transport_error(0, t0);
        let next = l.take_sends();
        assert_eq!(
            (next[0].transport, next[0].server),
            (Transport::Udp, addr(S2))
        );
    }

    #[test]
    fn search_list_goes_on_after_negative_answers_and_caches_the_smallest_ttl() {
        let t0 = Instant::now();
        let names = vec![
            "h.a.test".to_string(),
            "h.b.test".to_string(),
            "h".to_string(),
        ];
        let mut l = Lookup::start(&names, servers(&[S1], 1), counter(), t0);
        for (cand, rcodes, ttls) in [
            ("h.a.test.", (NXDomain, NXDomain), (Some(20), Some(10))),
            ("h.b.test.", (NXDomain, NXDomain), (Some(5), Some(30))),
            ("h.", (NXDomain, NoError), (Some(60), Some(60))),
        ] {
            assert!(l.outcome().is_none());
            let s = l.take_sends();
            assert_eq!(s.len(), 2);
            assert_eq!(
                (asked(&s[0]).1.as_str(), asked(&s[1]).1.as_str()),
                (cand, cand)
            );
            reply_negative(&mut l, &s[0], rcodes.0, ttls.0.map(|t| (t, t)), t0);
            reply_negative(&mut l, &s[1], rcodes.1, ttls.1.map(|t| (t, t)), t0);
        }
        assert_eq!(l.outcome(), Some(&Outcome::Failed(Error::NoData, Some(5))));
    }

    #[test]
    fn negative_without_soa_is_not_cacheable_and_bad_names_fail_at_once() {
        let t0 = Instant::now();
        let mut l = Lookup::start(&["nx.test".into()], servers(&[S1], 1), counter(), t0);
        let s = l.take_sends();
        for (send, soa) in s.iter().zip([Some((9, 9)), None]) {
            assert_eq!(asked(send).1, "nx.test.");
            reply_negative(&mut l, send, NXDomain, soa, t0);
        }
        assert_eq!(l.outcome(), Some(&Outcome::Failed(Error::NxDomain, None)));
        let l = Lookup::start(&["a..b".into()], servers(&[S1], 1), counter(), t0);
        assert_eq!(l.outcome(), Some(&Outcome::Failed(Error::BadName, None)));
    }

    #[test]
    fn a_cname_the_server_did_not_follow_is_asked_for() {
        use crate::dns::message::tests::n;
        use hickory_proto::rr::rdata::CNAME;
        let t0 = Instant::now();
        let mut l = Lookup::start(&["alias.test".into()], servers(&[S1, S2], 1), counter(), t0);
        let s = l.take_sends();
        assert_eq!(asked(&s[0]).1, "alias.test.");
        let link =
            |from: &str, to: &str| Record::from_rdata(n(from), 40, RData::CNAME(CNAME(n(to))));
        reply_records(&mut l, &s[0], vec![link("alias.test.", "mid.test.")], t0);
        let again = l.take_sends();
        assert_eq!(again.len(), 1);
        let (id2, q2) = asked(&again[0]);
        assert_eq!((q2.as_str(), again[0].server), ("mid.test.", addr(S1)));
        // An answer for the old name is no longer taken.
        let stale = vec![a("alias.test.", 9, [6, 6, 6, 6])];
        l.on_message(
            0,
            addr(S1),
            &answer(id2, "alias.test.", RecordType::A, stale),
            t0,
        );
        assert!(l.slot_waiting(0));
        reply_records(
            &mut l,
            &again[0],
            vec![a("mid.test.", 300, [10, 0, 0, 5])],
            t0,
        );
        reply_negative(&mut l, &s[1], NoError, Some((5, 5)), t0);
        assert_eq!(
            l.outcome(),
            Some(&Outcome::Addrs(vec!["10.0.0.5".parse().unwrap()], 40)),
            "TTL of the chain"
        );
    }
}
