//! Deadlines: a hierarchical timing wheel with at most one entry per connection and kind.
//!
//! A connection's entry of a kind is re-armed in place and all its entries are cancelled when it closes
//! (`Worker::close`), so what the wheel holds is bounded by the live connections, not by the connections handled
//! (a heap that only dropped entries when they fell due kept every closed connection's 10 s and 300 s entries).
//! Arming, re-arming and cancelling are O(1); finding the next deadline looks at one bitmap per level.
//!
//! Nothing is rescheduled per byte. A tunnel records `last_active`; when its idle entry falls due, the worker
//! compares and re-arms it if the tunnel was active since (lazy re-arm).
//!
//! Deadlines are rounded up to whole milliseconds (ticks counted from the wheel's origin) and an entry falls due
//! only once its tick has fully passed, so nothing fires early. Level `l` has 64 slots of `64^l` ticks each; an
//! entry sits in the lowest level whose slot range tells its tick apart from the current one, and moves down a
//! level when the loop reaches its slot. Eleven levels cover every `u64` tick, so no deadline is ever clamped.

use std::time::{Duration, Instant};

/// What a deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKind {
    /// The client handshake must be complete by now.
    Handshake,
    /// Resolving plus connecting must be complete by now.
    Connect,
    /// The next connect attempt is due: a Happy Eyeballs attempt delay ran out, or an upstream group member's
    /// share of the connect deadline did.
    Attempt,
    /// Check for an idle tunnel.
    Idle,
    /// Stop lingering after an error reply and close.
    Linger,
    /// A BIND listener gives up waiting.
    Bind,
    /// A BIND accept that ran out of descriptors tries again.
    BindRetry,
    /// Check for an idle UDP association.
    UdpIdle,
    /// A rate-limited direction may read again (its user's bucket has tokens).
    Throttle,
    /// Try accepting again after running out of descriptors or hitting a limit (a worker timer).
    AcceptRetry,
    /// The drain deadline: wakes the loop so it can close what is left and exit (a worker timer).
    Drain,
}

/// Kinds a connection can arm: every kind before `AcceptRetry`.
const CONN_KINDS: usize = TimerKind::AcceptRetry as usize;
/// Kinds of the worker itself.
const WORKER_KINDS: usize = TimerKind::Drain as usize + 1 - CONN_KINDS;

const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
/// 11 levels of 6 bits reach past bit 63: any tick has a place.
const LEVELS: usize = 11;
/// The list of entries already due, after the wheel's slots.
const READY: u16 = (LEVELS * SLOTS) as u16;
/// Marks a free node.
const FREE: u16 = READY + 1;
const NIL: u32 = u32::MAX;

/// One armed deadline, linked into the list of its slot (or the ready list).
struct Node {
    tick: u64,
    key: usize,
    gen: u32,
    kind: TimerKind,
    list: u16,
    prev: u32,
    next: u32,
}

/// Where a `(key, kind)` pair's node index lives.
#[derive(Clone, Copy)]
enum Owner {
    Conn(usize, usize),
    Worker(usize),
}

/// The worker's deadlines.
pub struct Timers {
    /// Tick 0: deadlines are whole milliseconds after it.
    origin: Instant,
    /// Every entry with a tick up to this one is on the ready list (or gone).
    elapsed: u64,
    nodes: Vec<Node>,
    /// Head of the chain of free nodes (linked through `next`).
    free: u32,
    heads: Vec<u32>,
    /// One bit per non-empty slot, per level.
    occupied: [u64; LEVELS],
    /// A connection's node per kind, by slab key.
    by_conn: Vec<[u32; CONN_KINDS]>,
    by_worker: [u32; WORKER_KINDS],
    armed: usize,
}

impl Default for Timers {
    fn default() -> Self {
        Timers::new(Instant::now())
    }
}

impl Timers {
    /// An empty wheel counting ticks from `origin` (tests pass their own clock).
    pub fn new(origin: Instant) -> Self {
        Timers {
            origin,
            elapsed: 0,
            nodes: Vec::new(),
            free: NIL,
            heads: vec![NIL; usize::from(READY) + 1],
            occupied: [0; LEVELS],
            by_conn: Vec::new(),
            by_worker: [NIL; WORKER_KINDS],
            armed: 0,
        }
    }

    /// Arms `kind` for connection `(key, gen)` at `at`, replacing the connection's entry of that kind if it has
    /// one. A worker kind (`AcceptRetry`, `Drain`) is armed for the worker; `key` and `gen` are then ignored.
    pub fn arm(&mut self, at: Instant, key: usize, gen: u32, kind: TimerKind) {
        let tick = self.tick_ceil(at);
        self.set(tick, key, gen, kind, false);
    }

    /// Like [`Timers::arm`], but an entry of the same connection already due earlier stays: for a wake-up that
    /// serves several waiters (both directions of a throttled tunnel).
    pub fn arm_by(&mut self, at: Instant, key: usize, gen: u32, kind: TimerKind) {
        let tick = self.tick_ceil(at);
        self.set(tick, key, gen, kind, true);
    }

    /// Arms a worker timer (`AcceptRetry`, `Drain`) at `at`.
    pub fn arm_worker(&mut self, at: Instant, kind: TimerKind) {
        self.arm(at, 0, 0, kind);
    }

    /// Cancels every entry of the connection in slab slot `key` (it closed).
    pub fn cancel(&mut self, key: usize) {
        let Some(slots) = self.by_conn.get_mut(key) else {
            return;
        };
        let ids = std::mem::replace(slots, [NIL; CONN_KINDS]);
        for id in ids {
            if id != NIL {
                self.unlink(id);
                self.release(id);
            }
        }
    }

    /// The next entry due at or before `now`, as `(key, gen, kind)` (worker kinds carry key 0 and gen 0).
    /// Entries come out in deadline order, to the millisecond.
    pub fn pop_due(&mut self, now: Instant) -> Option<(usize, u32, TimerKind)> {
        let target = self.tick_floor(now);
        loop {
            if let Some(due) = self.pop_ready() {
                return Some(due);
            }
            match self.next_slot() {
                Some((list, start)) if start <= target => self.open_slot(list, start),
                _ => {
                    // No slot starts before `target`: moving up to it keeps every entry above its level's
                    // current slot.
                    self.elapsed = self.elapsed.max(target);
                    return None;
                }
            }
        }
    }

    /// How long poll may sleep: until the earliest deadline (or until a coarse slot has to be looked into),
    /// rounded up to whole milliseconds so a deadline never fires a little early and spins.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if self.heads[usize::from(READY)] != NIL {
            return Some(Duration::ZERO);
        }
        let (_, start) = self.next_slot()?;
        let left =
            Duration::from_millis(start).saturating_sub(now.saturating_duration_since(self.origin));
        let ms = u64::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
        Some(Duration::from_millis(ms))
    }

    /// Entries armed.
    pub fn len(&self) -> usize {
        self.armed
    }

    /// True when nothing is armed.
    pub fn is_empty(&self) -> bool {
        self.armed == 0
    }

    /// Takes an entry off the ready list.
    fn pop_ready(&mut self) -> Option<(usize, u32, TimerKind)> {
        let id = self.heads[usize::from(READY)];
        if id == NIL {
            return None;
        }
        self.unlink(id);
        let n = self.node(id);
        let (key, gen, kind) = (n.key, n.gen, n.kind);
        *self.owner_slot(owner(key, kind)) = NIL;
        self.release(id);
        let key = if kind as usize >= CONN_KINDS { 0 } else { key };
        Some((key, gen, kind))
    }

    /// Moves the clock to the start of slot `list` and sorts its entries: everything in it is at `start` or later,
    /// so due ones go to the ready list and the rest one level down (or further).
    fn open_slot(&mut self, list: u16, start: u64) {
        self.elapsed = start;
        let mut id = self.take_list(list);
        while id != NIL {
            let next = self.node(id).next;
            self.place(id);
            id = next;
        }
    }

    fn tick_ceil(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.origin);
        u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }

    fn tick_floor(&self, now: Instant) -> u64 {
        let d = now.saturating_duration_since(self.origin);
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }

    fn set(&mut self, tick: u64, key: usize, gen: u32, kind: TimerKind, keep_earlier: bool) {
        let who = owner(key, kind);
        let id = *self.owner_slot(who);
        if id != NIL {
            let n = self.node(id);
            // A node of another generation is a previous occupant's (it should have been cancelled): replaced.
            if n.gen == gen && (n.tick == tick || (keep_earlier && n.tick < tick)) {
                return;
            }
            self.unlink(id);
            let n = self.node_mut(id);
            n.tick = tick;
            n.gen = gen;
            self.place(id);
            return;
        }
        let node = Node {
            tick,
            key,
            gen,
            kind,
            list: FREE,
            prev: NIL,
            next: NIL,
        };
        let id = if self.free != NIL {
            let id = self.free;
            self.free = self.node(id).next;
            *self.node_mut(id) = node;
            id
        } else {
            let Ok(id) = u32::try_from(self.nodes.len()) else {
                // Four billion armed entries cannot happen with one entry per connection and kind.
                return;
            };
            self.nodes.push(node);
            id
        };
        *self.owner_slot(who) = id;
        self.armed += 1;
        self.place(id);
    }

    fn owner_slot(&mut self, who: Owner) -> &mut u32 {
        match who {
            Owner::Conn(key, k) => {
                if key >= self.by_conn.len() {
                    self.by_conn.resize(key + 1, [NIL; CONN_KINDS]);
                }
                &mut self.by_conn[key][k]
            }
            Owner::Worker(k) => &mut self.by_worker[k],
        }
    }

    fn node(&self, id: u32) -> &Node {
        &self.nodes[id as usize]
    }

    fn node_mut(&mut self, id: u32) -> &mut Node {
        &mut self.nodes[id as usize]
    }

    /// Links a detached node into the list its tick belongs to, seen from `elapsed`.
    fn place(&mut self, id: u32) {
        let tick = self.node(id).tick;
        let list = if tick <= self.elapsed {
            READY
        } else {
            let level = (63 - (tick ^ self.elapsed).leading_zeros()) / SLOT_BITS;
            let slot = (tick >> (level * SLOT_BITS)) as usize & (SLOTS - 1);
            self.occupied[level as usize] |= 1 << slot;
            (level as usize * SLOTS + slot) as u16
        };
        let head = self.heads[usize::from(list)];
        if head != NIL {
            self.node_mut(head).prev = id;
        }
        let n = self.node_mut(id);
        n.list = list;
        n.prev = NIL;
        n.next = head;
        self.heads[usize::from(list)] = id;
    }

    fn unlink(&mut self, id: u32) {
        let (list, prev, next) = {
            let n = self.node(id);
            (n.list, n.prev, n.next)
        };
        if prev != NIL {
            self.node_mut(prev).next = next;
        } else {
            self.heads[usize::from(list)] = next;
            if next == NIL && list < READY {
                self.clear_bit(list);
            }
        }
        if next != NIL {
            self.node_mut(next).prev = prev;
        }
        let n = self.node_mut(id);
        n.prev = NIL;
        n.next = NIL;
    }

    /// Detaches a whole slot's list and returns its first node.
    fn take_list(&mut self, list: u16) -> u32 {
        let id = std::mem::replace(&mut self.heads[usize::from(list)], NIL);
        self.clear_bit(list);
        id
    }

    fn clear_bit(&mut self, list: u16) {
        let (level, slot) = (usize::from(list) / SLOTS, usize::from(list) % SLOTS);
        self.occupied[level] &= !(1 << slot);
    }

    fn release(&mut self, id: u32) {
        let free = self.free;
        let n = self.node_mut(id);
        n.list = FREE;
        n.next = free;
        self.free = id;
        self.armed -= 1;
    }

    /// The earliest non-empty slot and the tick it starts at. Every entry of a level shares the levels above with
    /// `elapsed` and lies in a later slot of its own level, so the lowest non-empty level holds the earliest.
    fn next_slot(&self) -> Option<(u16, u64)> {
        let level = self.occupied.iter().position(|&bits| bits != 0)?;
        let slot = u64::from(self.occupied[level].trailing_zeros());
        let shift = level as u32 * SLOT_BITS;
        let above = self
            .elapsed
            .checked_shr(shift + SLOT_BITS)
            .and_then(|hi| hi.checked_shl(shift + SLOT_BITS))
            .unwrap_or(0);
        let start = above | (slot << shift);
        Some(((level * SLOTS) as u16 + slot as u16, start))
    }
}

fn owner(key: usize, kind: TimerKind) -> Owner {
    let k = kind as usize;
    if k < CONN_KINDS {
        Owner::Conn(key, k)
    } else {
        Owner::Worker(k - CONN_KINDS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::testutil::Rng;

    const MS: Duration = Duration::from_millis(1);

    /// Pops everything due at `now`.
    fn due(t: &mut Timers, now: Instant) -> Vec<(usize, u32, TimerKind)> {
        std::iter::from_fn(|| t.pop_due(now)).collect()
    }

    #[test]
    fn pops_in_deadline_order() {
        let now = Instant::now();
        let mut t = Timers::new(now);
        t.arm(now + Duration::from_secs(2), 1, 0, TimerKind::Idle);
        t.arm(now + Duration::from_secs(1), 2, 0, TimerKind::Connect);
        t.arm(now + 3 * MS, 3, 0, TimerKind::Handshake);
        assert_eq!(t.pop_due(now), None);
        assert_eq!(t.next_timeout(now), Some(3 * MS));
        let later = now + Duration::from_secs(3);
        assert_eq!(
            due(&mut t, later),
            vec![
                (3, 0, TimerKind::Handshake),
                (2, 0, TimerKind::Connect),
                (1, 0, TimerKind::Idle)
            ]
        );
        assert!(t.is_empty());
        assert_eq!(t.next_timeout(later), None);
    }

    #[test]
    fn never_fires_early() {
        let origin = Instant::now();
        let mut t = Timers::new(origin);
        let at = origin + Duration::from_micros(1500);
        t.arm(at, 1, 0, TimerKind::Throttle);
        // 1.5 ms rounds up to tick 2: nothing at 1.9 ms, the entry at 2 ms.
        let now = origin + Duration::from_micros(200);
        assert_eq!(t.next_timeout(now), Some(2 * MS));
        assert_eq!(t.pop_due(origin + Duration::from_micros(1900)), None);
        assert_eq!(
            t.next_timeout(origin + Duration::from_micros(1900)),
            Some(MS)
        );
        assert_eq!(
            t.pop_due(origin + 2 * MS),
            Some((1, 0, TimerKind::Throttle))
        );
    }

    #[test]
    fn cancel_removes_every_kind_of_a_connection() {
        let now = Instant::now();
        let mut t = Timers::new(now);
        for kind in [TimerKind::Handshake, TimerKind::Connect, TimerKind::Idle] {
            t.arm(now + Duration::from_secs(10), 7, 1, kind);
        }
        t.arm(now + Duration::from_secs(10), 8, 1, TimerKind::Idle);
        t.arm_worker(now + Duration::from_secs(10), TimerKind::AcceptRetry);
        assert_eq!(t.len(), 5);
        t.cancel(7);
        t.cancel(0);
        t.cancel(1000);
        assert_eq!(t.len(), 2);
        let mut left = due(&mut t, now + Duration::from_secs(3600));
        left.sort();
        assert_eq!(
            left,
            vec![(0, 0, TimerKind::AcceptRetry), (8, 1, TimerKind::Idle)]
        );
        assert!(t.is_empty());
    }

    #[test]
    fn rearming_moves_the_one_entry() {
        let now = Instant::now();
        let mut t = Timers::new(now);
        t.arm(now + Duration::from_secs(10), 1, 0, TimerKind::Idle);
        t.arm(now + Duration::from_secs(20), 1, 0, TimerKind::Idle);
        assert_eq!(t.len(), 1);
        assert_eq!(t.pop_due(now + Duration::from_secs(15)), None);
        assert_eq!(
            t.pop_due(now + Duration::from_secs(20)),
            Some((1, 0, TimerKind::Idle))
        );
        // Earlier works too.
        t.arm(now + Duration::from_secs(40), 1, 0, TimerKind::Idle);
        t.arm(now + Duration::from_secs(25), 1, 0, TimerKind::Idle);
        assert_eq!(
            due(&mut t, now + Duration::from_secs(25)),
            vec![(1, 0, TimerKind::Idle)]
        );
        assert_eq!(due(&mut t, now + Duration::from_secs(50)), vec![]);
    }

    #[test]
    fn arm_by_keeps_an_earlier_entry() {
        let now = Instant::now();
        let mut t = Timers::new(now);
        t.arm_by(now + 5 * MS, 1, 0, TimerKind::Throttle);
        t.arm_by(now + 100 * MS, 1, 0, TimerKind::Throttle);
        assert_eq!(t.next_timeout(now), Some(5 * MS));
        t.arm_by(now + 2 * MS, 1, 0, TimerKind::Throttle);
        assert_eq!(t.next_timeout(now), Some(2 * MS));
        assert_eq!(due(&mut t, now + 2 * MS), vec![(1, 0, TimerKind::Throttle)]);
        assert!(t.is_empty());
    }

    #[test]
    fn a_reused_slot_replaces_the_old_generation() {
        let now = Instant::now();
        let mut t = Timers::new(now);
        t.arm(now + 5 * MS, 3, 1, TimerKind::Throttle);
        // The slot's next occupant arms later, even with arm_by: the old entry is not its own.
        t.arm_by(now + 50 * MS, 3, 2, TimerKind::Throttle);
        assert_eq!(t.len(), 1);
        assert_eq!(t.pop_due(now + 10 * MS), None);
        assert_eq!(t.pop_due(now + 50 * MS), Some((3, 2, TimerKind::Throttle)));
        // After a cancel the next occupant starts clean.
        t.arm(now + 60 * MS, 3, 2, TimerKind::Idle);
        t.cancel(3);
        t.arm(now + 70 * MS, 3, 3, TimerKind::Idle);
        assert_eq!(
            due(&mut t, now + Duration::from_secs(1)),
            vec![(3, 3, TimerKind::Idle)]
        );
    }

    #[test]
    fn worker_timers_do_not_collide_with_connection_zero() {
        let now = Instant::now();
        let mut t = Timers::new(now);
        t.arm(now + 10 * MS, 0, 4, TimerKind::Idle);
        t.arm_worker(now + 20 * MS, TimerKind::Drain);
        t.arm_worker(now + 30 * MS, TimerKind::AcceptRetry);
        t.cancel(0);
        assert_eq!(
            due(&mut t, now + 40 * MS),
            vec![(0, 0, TimerKind::Drain), (0, 0, TimerKind::AcceptRetry)]
        );
    }

    #[test]
    fn far_deadlines_beyond_one_wheel_turn() {
        let origin = Instant::now();
        let mut t = Timers::new(origin);
        let far = [
            Duration::from_secs(300),
            Duration::from_secs(3 * 86_400),
            Duration::from_secs(400 * 86_400),
            Duration::from_secs(100 * 365 * 86_400),
        ];
        for (i, d) in far.iter().enumerate() {
            t.arm(origin + *d, i, 0, TimerKind::Idle);
        }
        t.arm(origin + 70 * MS, 9, 0, TimerKind::Linger);
        // Follow the loop: sleep what next_timeout says, pop what is due, never before its deadline.
        let mut now = origin;
        let mut seen = Vec::new();
        let mut wakes = 0;
        while let Some(wait) = t.next_timeout(now) {
            now += wait;
            wakes += 1;
            while let Some((key, _, kind)) = t.pop_due(now) {
                let at = if kind == TimerKind::Linger {
                    origin + 70 * MS
                } else {
                    origin + far[key]
                };
                assert!(at <= now, "{key} fired early");
                assert!(now - at < 2 * MS, "{key} fired late");
                seen.push(key);
            }
        }
        assert_eq!(seen, vec![9, 0, 1, 2, 3]);
        // Each far entry moves down a level at a time: a few wake-ups per level, not one per slot.
        assert!(wakes < 100, "{wakes} wake-ups");
    }

    #[test]
    fn the_end_of_time_has_a_slot() {
        let origin = Instant::now();
        let mut t = Timers::new(origin);
        // As if the loop had run for half a billion years: the last slots of every level are used.
        t.elapsed = u64::MAX - 70;
        t.set(u64::MAX, 1, 0, TimerKind::Idle, false);
        t.set(u64::MAX - 1, 2, 0, TimerKind::Idle, false);
        t.cancel(2);
        t.set(u64::MAX - 1, 2, 0, TimerKind::Idle, false);
        let mut seen = Vec::new();
        // What pop_due does, without an `Instant` that far out.
        while let Some((list, start)) = t.next_slot() {
            t.open_slot(list, start);
            while let Some((key, ..)) = t.pop_ready() {
                seen.push((key, t.elapsed));
            }
        }
        assert_eq!(seen, vec![(2, u64::MAX - 1), (1, u64::MAX)]);
        assert!(t.is_empty());
    }

    /// Random arms, re-arms, cancels and pops against a plain list of deadlines.
    #[test]
    fn matches_a_simple_model() {
        let origin = Instant::now();
        let mut rng = Rng(0x7157_1e55);
        let mut t = Timers::new(origin);
        // (key, kind) -> (tick, gen)
        let mut model: std::collections::BTreeMap<(usize, usize), (u64, u32)> = Default::default();
        let kinds = [TimerKind::Handshake, TimerKind::Idle, TimerKind::Throttle];
        let mut now_ms = 0u64;
        for _ in 0..200_000 {
            let key = rng.below(50);
            let k = rng.below(kinds.len());
            let gen = rng.below(3) as u32;
            match rng.below(10) {
                0..=3 => {
                    let ahead = match rng.below(4) {
                        0 => rng.below(70) as u64,
                        1 => rng.below(5_000) as u64,
                        2 => rng.below(400_000) as u64,
                        _ => rng.next() % (1 << 36),
                    };
                    let at = origin + Duration::from_millis(now_ms + ahead);
                    let tick = now_ms + ahead;
                    let by = rng.below(2) == 0;
                    if by {
                        t.arm_by(at, key, gen, kinds[k]);
                    } else {
                        t.arm(at, key, gen, kinds[k]);
                    }
                    let e = model.entry((key, k)).or_insert((tick, gen));
                    if !(by && e.1 == gen && e.0 < tick) {
                        *e = (tick, gen);
                    }
                }
                4 => {
                    t.cancel(key);
                    model.retain(|(kk, _), _| *kk != key);
                }
                _ => {
                    now_ms += match rng.below(3) {
                        0 => rng.below(3) as u64,
                        1 => rng.below(300) as u64,
                        _ => rng.below(100_000) as u64,
                    };
                    let now = origin + Duration::from_millis(now_ms);
                    if let Some(wait) = t.next_timeout(now) {
                        let first = model.values().map(|v| v.0).min().unwrap_or(u64::MAX);
                        // Never later than the earliest deadline; it may be sooner (a coarse slot to sort).
                        assert!(now_ms + wait.as_millis() as u64 <= first.max(now_ms));
                    } else {
                        assert!(model.is_empty());
                    }
                    let mut got = due(&mut t, now);
                    let mut want: Vec<(usize, u32, TimerKind)> = model
                        .iter()
                        .filter(|(_, v)| v.0 <= now_ms)
                        .map(|((key, k), v)| (*key, v.1, kinds[*k]))
                        .collect();
                    model.retain(|_, v| v.0 > now_ms);
                    got.sort();
                    want.sort();
                    assert_eq!(got, want);
                }
            }
            assert_eq!(t.len(), model.len());
        }
    }
}
