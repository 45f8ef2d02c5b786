//! Deadlines: one min-heap of `(deadline, key, gen, kind)`.
//!
//! Nothing is rescheduled per byte. A connection records `last_active`; when its idle entry pops, the worker
//! compares and pushes a fresh entry if the connection was active since (lazy re-arm). Entries for connections
//! that are gone, or whose slot was reused (`gen` differs), are simply dropped when they pop.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// What a deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKind {
    /// The client handshake must be complete by now.
    Handshake,
    /// Resolving plus connecting must be complete by now.
    Connect,
    /// Check for an idle tunnel.
    Idle,
    /// Stop lingering after an error reply and close.
    Linger,
    /// A BIND listener gives up waiting.
    Bind,
    /// Check for an idle UDP association.
    UdpIdle,
    /// A rate-limited direction may read again (its user's bucket has tokens).
    Throttle,
    /// Try accepting again after running out of descriptors or hitting a limit.
    AcceptRetry,
    /// The drain deadline: wakes the loop so it can close what is left and exit.
    Drain,
}

type Entry = Reverse<(Instant, usize, u32, TimerKind)>;

/// The worker's deadlines.
#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Entry>,
}

impl Timers {
    /// Schedules `kind` for connection `(key, gen)` at `at`.
    pub fn push(&mut self, at: Instant, key: usize, gen: u32, kind: TimerKind) {
        self.heap.push(Reverse((at, key, gen, kind)));
    }

    /// The next entry due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(usize, u32, TimerKind)> {
        match self.heap.peek() {
            Some(Reverse((at, ..))) if *at <= now => self
                .heap
                .pop()
                .map(|Reverse((_, key, gen, kind))| (key, gen, kind)),
            _ => None,
        }
    }

    /// How long poll may sleep: until the earliest deadline, rounded up to whole milliseconds so a deadline
    /// never fires a little early and spins.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        self.heap.peek().map(|Reverse((at, ..))| {
            let d = at.saturating_duration_since(now);
            let ms = d.as_micros().div_ceil(1000) as u64;
            Duration::from_millis(ms)
        })
    }

    /// Entries queued (stale ones included).
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_deadline_order() {
        let now = Instant::now();
        let mut t = Timers::default();
        t.push(now + Duration::from_secs(2), 1, 0, TimerKind::Idle);
        t.push(now + Duration::from_secs(1), 2, 0, TimerKind::Connect);
        assert_eq!(t.pop_due(now), None);
        assert_eq!(t.next_timeout(now), Some(Duration::from_secs(1)));
        let later = now + Duration::from_secs(3);
        assert_eq!(t.pop_due(later), Some((2, 0, TimerKind::Connect)));
        assert_eq!(t.pop_due(later), Some((1, 0, TimerKind::Idle)));
        assert!(t.is_empty());
    }
}
