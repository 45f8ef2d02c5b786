//! DNS messages through hickory-proto: the query we send, and what an answer means for the question we asked.
//! Pure: bytes in, values out. Anything that does not answer exactly our question is [`Verdict::Foreign`] and
//! must be ignored (a late answer to an earlier query, or a spoofing attempt).

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

/// Longest CNAME chain followed inside one answer.
const MAX_CHAIN: usize = 16;

/// What one answer says about (name, type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not an answer to our question: ignore it and keep waiting.
    Foreign,
    /// The TC bit: ask again over TCP.
    Truncated,
    /// Addresses (after following CNAMEs) and the smallest TTL on the way.
    Addrs(Vec<IpAddr>, u32),
    /// The name exists but has no record of this type; negative TTL from the SOA (RFC 2308 §5), if any.
    NoData(Option<u32>),
    /// The answer is a CNAME chain that stops at a name without records and without a SOA: the server did not
    /// follow the chain (authoritative servers for out-of-zone targets, dnsmasq's auth mode). Ask for the target,
    /// remembering the chain's smallest TTL.
    Alias(Name, u32),
    /// The name does not exist; negative TTL from the SOA, if any.
    NxDomain(Option<u32>),
    /// SERVFAIL: this server could not answer; try the next one.
    ServFail,
    /// REFUSED, NOTIMP, FORMERR or anything else: this server will not answer; try the next one.
    Refused,
}

/// Encodes a recursive query for `name`/`rtype` with message id `id`.
pub fn query(id: u16, name: &Name, rtype: RecordType) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name.clone(), rtype));
    m.to_vec().ok()
}

/// Builds the wire name for `name` (a fully qualified name: the search list has been applied already).
pub fn wire_name(name: &str) -> Option<Name> {
    let mut n = Name::from_ascii(name).ok()?;
    n.set_fqdn(true);
    // Re-encoding checks the 255-octet limit that from_ascii alone does not.
    let mut probe = Message::new();
    probe.add_query(Query::query(n.clone(), RecordType::A));
    probe.to_vec().ok()?;
    Some(n)
}

/// Judges `bytes` as the answer to query `id` for `name`/`rtype`.
pub fn judge(bytes: &[u8], id: u16, name: &Name, rtype: RecordType) -> Verdict {
    let Ok(m) = Message::from_vec(bytes) else {
        return Verdict::Foreign;
    };
    if m.id() != id || m.message_type() != MessageType::Response || m.op_code() != OpCode::Query {
        return Verdict::Foreign;
    }
    // The question must be echoed back exactly (RFC 5452 §4.2): one entry, our name (case-insensitively), type, IN.
    match m.queries() {
        [q] if q.name() == name && q.query_type() == rtype && q.query_class() == DNSClass::IN => {}
        _ => return Verdict::Foreign,
    }
    if m.truncated() {
        return Verdict::Truncated;
    }
    match m.response_code() {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Verdict::NxDomain(negative_ttl(&m)),
        ResponseCode::ServFail => return Verdict::ServFail,
        _ => return Verdict::Refused,
    }
    // Follow the CNAME chain from our name; only records owned by the name we are at count, so unrelated records
    // a server adds (or an attacker slips in) are ignored.
    let mut at = name.clone();
    let mut ttl = u32::MAX;
    let mut addrs = Vec::new();
    let mut seen = vec![name.clone()];
    let mut ended = false;
    for _ in 0..MAX_CHAIN {
        let mut next = None;
        for r in m.answers() {
            if r.name() != &at || r.dns_class() != DNSClass::IN {
                continue;
            }
            match (r.data(), rtype) {
                (RData::A(a), RecordType::A) => {
                    addrs.push(IpAddr::V4(a.0));
                    ttl = ttl.min(r.ttl());
                }
                (RData::AAAA(a), RecordType::AAAA) => {
                    addrs.push(IpAddr::V6(a.0));
                    ttl = ttl.min(r.ttl());
                }
                (RData::CNAME(c), _) if next.is_none() => {
                    ttl = ttl.min(r.ttl());
                    next = Some(c.0.clone());
                }
                _ => {}
            }
        }
        if !addrs.is_empty() {
            return Verdict::Addrs(addrs, ttl);
        }
        match next {
            // A loop, or a chain too long to follow: no address behind it.
            Some(n) if seen.contains(&n) => return Verdict::NoData(negative_ttl(&m)),
            Some(n) => {
                seen.push(n.clone());
                at = n;
            }
            None => {
                ended = true;
                break;
            }
        }
    }
    let soa = negative_ttl(&m);
    if !ended {
        return Verdict::NoData(soa);
    }
    if at != *name && soa.is_none() {
        return Verdict::Alias(at, ttl);
    }
    Verdict::NoData(soa)
}

/// RFC 2308 §5: the negative TTL is the smaller of the SOA record's TTL and its MINIMUM field.
fn negative_ttl(m: &Message) -> Option<u32> {
    m.name_servers().iter().find_map(|r| match r.data() {
        RData::SOA(soa) => Some(r.ttl().min(soa.minimum())),
        _ => None,
    })
}

#[cfg(test)]
/// Message builders shared by the resolver's unit tests.
pub(crate) mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA};
    use hickory_proto::rr::Record;

    /// A response to (id, name, rtype) with `answers`, `rcode` and an optional SOA (ttl, minimum) in authority.
    pub(crate) fn response(
        id: u16,
        name: &str,
        rtype: RecordType,
        rcode: ResponseCode,
        answers: Vec<Record>,
        soa: Option<(u32, u32)>,
    ) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(id)
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_response_code(rcode)
            .add_query(Query::query(n(name), rtype))
            .add_answers(answers);
        if let Some((ttl, min)) = soa {
            m.add_name_server(Record::from_rdata(
                n("test."),
                ttl,
                RData::SOA(SOA::new(n("ns.test."), n("h.test."), 1, 2, 3, 4, min)),
            ));
        }
        m.to_vec().unwrap()
    }

    /// A NOERROR response to (id, name, rtype) carrying `answers` and no authority section.
    pub(crate) fn answer(id: u16, name: &str, rtype: RecordType, answers: Vec<Record>) -> Vec<u8> {
        response(id, name, rtype, ResponseCode::NoError, answers, None)
    }

    /// An empty NOERROR response to (id, name, A) with the TC bit set: the answer did not fit a UDP datagram.
    pub(crate) fn truncated(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::from_vec(&answer(id, name, RecordType::A, vec![])).unwrap();
        m.set_truncated(true);
        m.to_vec().unwrap()
    }

    /// A name from text; test input only.
    pub(crate) fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    /// An A record.
    pub(crate) fn a(name: &str, ttl: u32, ip: [u8; 4]) -> Record {
        Record::from_rdata(n(name), ttl, RData::A(A(ip.into())))
    }

    fn cname(name: &str, ttl: u32, to: &str) -> Record {
        Record::from_rdata(n(name), ttl, RData::CNAME(CNAME(n(to))))
    }

    #[test]
    fn query_round_trips() {
        let name = wire_name("Host.Example").unwrap();
        let q = query(0xbeef, &name, RecordType::AAAA).unwrap();
        let m = Message::from_vec(&q).unwrap();
        assert_eq!(m.id(), 0xbeef);
        assert!(m.recursion_desired());
        assert_eq!(m.queries()[0].query_type(), RecordType::AAAA);
        assert_eq!(m.queries()[0].name(), &n("host.example."));
        assert!(wire_name(&format!("{}.x", "a".repeat(254))).is_none());
        assert!(wire_name(&"a".repeat(64)).is_none());
    }

    #[test]
    fn addresses_and_cname_chain() {
        let name = n("www.test.");
        let records = vec![
            cname("www.test.", 300, "mid.test."),
            a("other.test.", 1, [9, 9, 9, 9]),
            cname("mid.test.", 60, "end.test."),
            a("end.test.", 100, [10, 0, 0, 1]),
            a("END.test.", 200, [10, 0, 0, 2]),
        ];
        let r = answer(7, "www.test.", RecordType::A, records);
        assert_eq!(
            judge(&r, 7, &name, RecordType::A),
            Verdict::Addrs(
                vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()],
                60
            )
        );
        let six = Record::from_rdata(n("v6.test."), 30, RData::AAAA(AAAA("::1".parse().unwrap())));
        let r = answer(8, "v6.test.", RecordType::AAAA, vec![six]);
        assert_eq!(
            judge(&r, 8, &n("V6.test."), RecordType::AAAA),
            Verdict::Addrs(vec!["::1".parse().unwrap()], 30)
        );
    }

    #[test]
    fn mismatches_are_foreign() {
        let name = n("www.test.");
        let record = a("www.test.", 5, [1, 2, 3, 4]);
        let ok = answer(7, "www.test.", RecordType::A, vec![record]);
        assert!(matches!(
            judge(&ok, 7, &name, RecordType::A),
            Verdict::Addrs(..)
        ));
        let web = n("web.test.");
        let q = query(7, &name, RecordType::A).unwrap();
        for (bytes, id, asked, rtype, why) in [
            (&ok[..], 8, &name, RecordType::A, "id"),
            (&ok[..], 7, &web, RecordType::A, "name"),
            (&ok[..], 7, &name, RecordType::AAAA, "type"),
            (&ok[..ok.len() - 3], 7, &name, RecordType::A, "short"),
            (&[][..], 7, &name, RecordType::A, "empty"),
            // Our own query echoed back is not an answer.
            (&q[..], 7, &name, RecordType::A, "query bit"),
        ] {
            assert_eq!(judge(bytes, id, asked, rtype), Verdict::Foreign, "{why}");
        }
    }

    #[test]
    fn negative_answers_and_errors() {
        use ResponseCode::{NXDomain, NoError, Refused, ServFail};
        let name = n("nx.test.");
        let chain = || vec![cname("nx.test.", 9, "gone.test.")];
        for (rcode, answers, soa, want) in [
            (
                NXDomain,
                vec![],
                Some((600, 20)),
                Verdict::NxDomain(Some(20)),
            ),
            (NXDomain, vec![], None, Verdict::NxDomain(None)),
            (NoError, vec![], Some((5, 60)), Verdict::NoData(Some(5))),
            // A CNAME to nowhere is NODATA for the name when a SOA says so, and a target to ask for when not.
            (NoError, chain(), Some((7, 7)), Verdict::NoData(Some(7))),
            (NoError, chain(), None, Verdict::Alias(n("gone.test."), 9)),
            (ServFail, vec![], None, Verdict::ServFail),
            (Refused, vec![], None, Verdict::Refused),
        ] {
            let r = response(1, "nx.test.", RecordType::A, rcode, answers, soa);
            assert_eq!(
                judge(&r, 1, &name, RecordType::A),
                want,
                "{rcode:?} {soa:?}"
            );
        }
        assert_eq!(
            judge(&truncated(1, "nx.test."), 1, &name, RecordType::A),
            Verdict::Truncated
        );
    }

    #[test]
    fn cname_loops_end() {
        let r = answer(
            1,
            "l.test.",
            RecordType::A,
            vec![
                cname("l.test.", 9, "m.test."),
                cname("m.test.", 9, "l.test."),
            ],
        );
        // The loop ends where it started: nothing to ask for.
        assert_eq!(
            judge(&r, 1, &n("l.test."), RecordType::A),
            Verdict::NoData(None)
        );
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let name = n("www.test.");
        let good = response(
            9,
            "www.test.",
            RecordType::A,
            ResponseCode::NoError,
            vec![
                cname("www.test.", 5, "end.test."),
                a("end.test.", 5, [1, 2, 3, 4]),
            ],
            Some((5, 5)),
        );
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut buf = good.clone();
            for _ in 0..(rnd() % 4 + 1) {
                let i = (rnd() as usize) % buf.len();
                buf[i] = rnd() as u8;
            }
            buf.truncate((rnd() as usize) % (good.len() + 1));
            let _ = judge(&buf, 9, &name, RecordType::A);
            let junk: Vec<u8> = (0..rnd() % 600).map(|_| rnd() as u8).collect();
            let _ = judge(&junk, 9, &name, RecordType::A);
        }
    }
}
