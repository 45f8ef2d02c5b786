//! Happy Eyeballs v2 (RFC 8305) as a sans-IO scheduler: which address to dial next, and when.
//!
//! The caller feeds in the answers per address family as they arrive (already filtered by the destination rules),
//! the result of every connection attempt, and the current time; [`Scheduler::next`] says whether to dial an
//! address now, when to ask again, or that there is nothing left to try. The caller owns the sockets, the timers
//! and the overall deadline (`--connect-timeout`). No clock is read here, so every rule is unit-tested with an
//! injected one.
//!
//! Rules (RFC 8305): dialling starts as soon as the preferred family (IPv6 unless told otherwise) answers, or the
//! resolution delay (50 ms) after the other family answered first (§3); addresses are interleaved by family,
//! starting with the preferred one (§4); a new attempt starts the connection attempt delay (250 ms) after the
//! previous one while earlier attempts stay in flight, or at once when no attempt is in flight (§5); the first
//! success wins and the others are to be closed.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// RFC 8305 §3: how long to wait for AAAA after A arrived first.
pub const RESOLUTION_DELAY: Duration = Duration::from_millis(50);
/// RFC 8305 §5: the default delay between connection attempts.
pub const DEFAULT_ATTEMPT_DELAY: Duration = Duration::from_millis(250);
/// RFC 8305 §5: attempt delays below this are raised to it.
pub const MIN_ATTEMPT_DELAY: Duration = Duration::from_millis(10);

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv6 (AAAA).
    V6 = 0,
    /// IPv4 (A).
    V4 = 1,
}

impl Family {
    fn other(self) -> Family {
        match self {
            Family::V6 => Family::V4,
            Family::V4 => Family::V6,
        }
    }

    /// The family of `addr` (an IPv4-mapped IPv6 address counts as IPv6: it is dialled over an IPv6 socket).
    pub fn of(addr: &SocketAddr) -> Family {
        if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Start a connection attempt to this address now, then call [`Scheduler::next`] again.
    Dial(SocketAddr),
    /// Nothing to do before this instant unless an answer or an attempt result arrives first.
    WaitUntil(Instant),
    /// Nothing to do until an answer or an attempt result arrives.
    Idle,
    /// Every address was tried and failed, and no answer is outstanding: report the last failure.
    Exhausted,
    /// An attempt succeeded.
    Done,
}

/// One connection's Happy Eyeballs state.
#[derive(Debug)]
pub struct Scheduler {
    attempt_delay: Duration,
    preferred: Family,
    /// Answers still outstanding, by [`Family`] index.
    pending: [bool; 2],
    /// Addresses not yet dialled, by family.
    queued: [VecDeque<SocketAddr>; 2],
    /// When the non-preferred family answered while the preferred one was outstanding.
    other_answered: Option<Instant>,
    /// The family the next dial should come from.
    turn: Family,
    started: bool,
    last_dial: Option<Instant>,
    in_flight: Vec<SocketAddr>,
    done: bool,
}

impl Scheduler {
    /// A scheduler waiting for the answers of the families in `asked` (e.g. both for a name, one for an IP
    /// literal), preferring `preferred`, with `attempt_delay` between attempts (`--connection-attempt-delay`).
    pub fn new(asked: &[Family], preferred: Family, attempt_delay: Duration) -> Scheduler {
        let mut pending = [false; 2];
        for f in asked {
            pending[*f as usize] = true;
        }
        Scheduler {
            attempt_delay: attempt_delay.max(MIN_ATTEMPT_DELAY),
            preferred,
            pending,
            queued: [VecDeque::new(), VecDeque::new()],
            other_answered: None,
            turn: preferred,
            started: false,
            last_dial: None,
            in_flight: Vec::new(),
            done: false,
        }
    }

    /// For addresses known up front (IP literals, `--resolve`, a cache hit with both families): nothing pending.
    pub fn with_addrs(
        addrs: &[SocketAddr],
        preferred: Family,
        attempt_delay: Duration,
    ) -> Scheduler {
        let mut s = Scheduler::new(&[], preferred, attempt_delay);
        for a in addrs {
            s.queued[Family::of(a) as usize].push_back(*a);
        }
        s
    }

    /// The answer for `family` arrived (empty for NODATA or a failed lookup). Addresses keep their order within
    /// the family; later families are interleaved into what is still queued.
    pub fn on_answer(&mut self, family: Family, addrs: &[SocketAddr], now: Instant) {
        let i = family as usize;
        if !self.pending[i] {
            return;
        }
        self.pending[i] = false;
        self.queued[i].extend(addrs.iter().filter(|a| Family::of(a) == family));
        if family != self.preferred
            && self.pending[self.preferred as usize]
            && !self.queued[i].is_empty()
        {
            self.other_answered = Some(now);
        }
    }

    /// True while the answer for `family` is awaited.
    pub fn pending(&self, family: Family) -> bool {
        self.pending[family as usize]
    }

    /// The attempt to `addr` failed: the next one may start at once.
    pub fn on_attempt_failed(&mut self, addr: SocketAddr) {
        self.in_flight.retain(|a| *a != addr);
    }

    /// The attempt to `addr` succeeded: returns the other attempts still in flight, which the caller closes.
    pub fn on_connected(&mut self, addr: SocketAddr) -> Vec<SocketAddr> {
        self.done = true;
        self.queued.iter_mut().for_each(VecDeque::clear);
        let others = self.in_flight.drain(..).filter(|a| *a != addr).collect();
        others
    }

    /// True once an attempt was started (some address was given and dialled).
    pub fn started(&self) -> bool {
        self.started
    }

    /// Attempts started and not yet resolved.
    pub fn in_flight(&self) -> &[SocketAddr] {
        &self.in_flight
    }

    /// What to do at `now`.
    pub fn next(&mut self, now: Instant) -> Step {
        if self.done {
            return Step::Done;
        }
        let queued = self.queued.iter().any(|q| !q.is_empty());
        let pending = self.pending.iter().any(|p| *p);
        if !queued {
            return if self.in_flight.is_empty() && !pending {
                Step::Exhausted
            } else {
                Step::Idle
            };
        }
        if !self.started && self.pending[self.preferred as usize] {
            // Only the other family is in: give the preferred one the resolution delay (§3).
            if let Some(at) = self.other_answered {
                let until = at + RESOLUTION_DELAY;
                if now < until {
                    return Step::WaitUntil(until);
                }
            }
        }
        if let Some(last) = self.last_dial {
            let until = last + self.attempt_delay;
            if !self.in_flight.is_empty() && now < until {
                return Step::WaitUntil(until);
            }
        }
        let Some(addr) = self.pick() else {
            return Step::Idle;
        };
        self.started = true;
        self.last_dial = Some(now);
        self.in_flight.push(addr);
        Step::Dial(addr)
    }

    /// The next address, alternating families (§4, First Address Family Count 1).
    fn pick(&mut self) -> Option<SocketAddr> {
        let first = self.turn;
        for f in [first, first.other()] {
            if let Some(a) = self.queued[f as usize].pop_front() {
                self.turn = f.other();
                return Some(a);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: [Family; 2] = [Family::V6, Family::V4];

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn v6(n: u16) -> SocketAddr {
        SocketAddr::new(format!("2001:db8::{n}").parse().unwrap(), 443)
    }

    fn v4(n: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, n], 443))
    }

    fn sched() -> Scheduler {
        Scheduler::new(&BOTH, Family::V6, DEFAULT_ATTEMPT_DELAY)
    }

    #[test]
    fn aaaa_first_dials_at_once_and_families_interleave() {
        let t0 = Instant::now();
        let mut s = sched();
        assert_eq!(s.next(t0), Step::Idle);
        s.on_answer(Family::V6, &[v6(1), v6(2)], t0);
        assert_eq!(s.next(t0), Step::Dial(v6(1)));
        assert_eq!(s.next(t0), Step::WaitUntil(t0 + ms(250)));
        s.on_answer(Family::V4, &[v4(1), v4(2)], t0 + ms(10));
        assert_eq!(s.next(t0 + ms(249)), Step::WaitUntil(t0 + ms(250)));
        assert_eq!(s.next(t0 + ms(250)), Step::Dial(v4(1)));
        assert_eq!(s.next(t0 + ms(500)), Step::Dial(v6(2)));
        assert_eq!(s.next(t0 + ms(750)), Step::Dial(v4(2)));
        assert_eq!(s.in_flight().len(), 4);
        assert_eq!(s.next(t0 + ms(800)), Step::Idle, "all in flight");
        for a in [v6(1), v4(1), v6(2), v4(2)] {
            s.on_attempt_failed(a);
        }
        assert_eq!(s.next(t0 + ms(900)), Step::Exhausted);
        assert!(s.started());
    }

    #[test]
    fn a_first_waits_the_resolution_delay_for_aaaa() {
        let t0 = Instant::now();
        let mut s = sched();
        s.on_answer(Family::V4, &[v4(1)], t0);
        assert!(s.pending(Family::V6) && !s.pending(Family::V4));
        assert_eq!(s.next(t0), Step::WaitUntil(t0 + RESOLUTION_DELAY));
        // AAAA in time: IPv6 goes first.
        s.on_answer(Family::V6, &[v6(1)], t0 + ms(30));
        assert_eq!(s.next(t0 + ms(30)), Step::Dial(v6(1)));
        assert_eq!(s.next(t0 + ms(280)), Step::Dial(v4(1)));
    }

    #[test]
    fn late_aaaa_joins_the_queue() {
        let t0 = Instant::now();
        let mut s = sched();
        s.on_answer(Family::V4, &[v4(1), v4(2)], t0);
        assert_eq!(s.next(t0 + ms(49)), Step::WaitUntil(t0 + ms(50)));
        assert_eq!(s.next(t0 + ms(50)), Step::Dial(v4(1)));
        s.on_answer(Family::V6, &[v6(1)], t0 + ms(100));
        // The next dial keeps the attempt delay and takes the other family's turn.
        assert_eq!(s.next(t0 + ms(100)), Step::WaitUntil(t0 + ms(300)));
        assert_eq!(s.next(t0 + ms(300)), Step::Dial(v6(1)));
        assert_eq!(s.next(t0 + ms(550)), Step::Dial(v4(2)));
    }

    #[test]
    fn a_failed_attempt_starts_the_next_at_once() {
        let t0 = Instant::now();
        let mut s =
            Scheduler::with_addrs(&[v4(1), v6(1), v4(2)], Family::V6, DEFAULT_ATTEMPT_DELAY);
        assert_eq!(s.next(t0), Step::Dial(v6(1)));
        s.on_attempt_failed(v6(1));
        assert_eq!(s.next(t0 + ms(5)), Step::Dial(v4(1)));
        assert_eq!(s.next(t0 + ms(5)), Step::WaitUntil(t0 + ms(255)));
        s.on_attempt_failed(v4(1));
        assert_eq!(s.next(t0 + ms(6)), Step::Dial(v4(2)));
    }

    #[test]
    fn black_holed_ipv6_costs_one_attempt_delay() {
        let t0 = Instant::now();
        let mut s = sched();
        s.on_answer(Family::V6, &[v6(1)], t0);
        s.on_answer(Family::V4, &[v4(1)], t0);
        assert_eq!(s.next(t0), Step::Dial(v6(1)));
        // The IPv6 SYN goes nowhere; IPv4 starts after the attempt delay and connects.
        assert_eq!(s.next(t0 + ms(100)), Step::WaitUntil(t0 + ms(250)));
        assert_eq!(s.next(t0 + ms(250)), Step::Dial(v4(1)));
        assert_eq!(
            s.on_connected(v4(1)),
            vec![v6(1)],
            "the IPv6 attempt is to be closed"
        );
        assert_eq!(s.next(t0 + ms(260)), Step::Done);
    }

    #[test]
    fn empty_answers_and_ipv4_preference() {
        let t0 = Instant::now();
        let mut s = sched();
        s.on_answer(Family::V6, &[], t0);
        assert_eq!(s.next(t0), Step::Idle, "A still outstanding");
        s.on_answer(Family::V4, &[], t0);
        assert_eq!(s.next(t0), Step::Exhausted);
        assert!(!s.started(), "nothing was dialled");
        // An empty AAAA answer ends the resolution delay early: no reason to wait.
        let mut s = sched();
        s.on_answer(Family::V4, &[v4(1)], t0);
        s.on_answer(Family::V6, &[], t0 + ms(10));
        assert_eq!(s.next(t0 + ms(10)), Step::Dial(v4(1)));
        // Preferring IPv4 turns the rules around; wrong-family addresses and repeated answers are ignored.
        let mut s = Scheduler::new(&BOTH, Family::V4, ms(1));
        s.on_answer(Family::V6, &[v6(1), v4(9)], t0);
        s.on_answer(Family::V6, &[v6(2)], t0);
        assert_eq!(s.next(t0), Step::WaitUntil(t0 + RESOLUTION_DELAY));
        s.on_answer(Family::V4, &[v4(1)], t0 + ms(1));
        assert_eq!(s.next(t0 + ms(1)), Step::Dial(v4(1)));
        assert_eq!(
            s.next(t0 + ms(1)),
            Step::WaitUntil(t0 + ms(1) + MIN_ATTEMPT_DELAY)
        );
        assert_eq!(s.next(t0 + ms(11)), Step::Dial(v6(1)));
        assert_eq!(s.next(t0 + ms(30)), Step::Idle);
    }
}
