//! The vocabulary every phase shares: the worker context a phase may touch besides its connection, what a phase
//! asks the dispatcher to do next (how the client is to be answered, `ReplyKind`, lives with the phases).

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::close::CloseReason;
use super::phase::Connected;
pub use super::phase::ReplyKind;
use super::timers::Timers;
use crate::auth::Users;
use crate::buffer::BufferPool;
use crate::config::Config;
use crate::metrics::Stats;
use crate::resolve::{Job, Reply, ReplyTo};

/// Messages from the control thread.
pub enum Command {
    /// Swap in a new users table (SIGHUP).
    ReloadUsers(Arc<Users>),
    /// Swap in a new users table and policy together (SIGHUP with `--policy`); revokes sessions of users whose
    /// credentials are gone.
    ReloadPolicy(Arc<Users>, Arc<crate::policy::Policy>),
    /// Some user's quota is used up: close every session whose quota is (`end=quota`).
    QuotaSweep,
    /// Stop accepting, finish tunnels until the deadline, then exit.
    Drain(Instant),
    /// A new process has taken over the listening sockets (SIGUSR2 upgrade): stop accepting and drain as with
    /// `Drain`, but let connections in their handshake or connect finish here; they were accepted and did nothing
    /// wrong. Only HTTP connections idle between requests are closed, as any keep-alive server may.
    Handover(Instant),
    /// Answer on the channel once every command sent before this one has been applied (reload confirmation).
    Barrier(std::sync::mpsc::Sender<()>),
    /// Exit now.
    Stop,
}

/// What a phase handler wants next.
pub enum Next {
    /// Nothing more until new readiness arrives.
    Wait,
    /// The phase changed (or there is more to do): drive again.
    Again,
    /// The iteration cap was hit with work left: drive again on the next loop iteration, after other connections.
    Yield,
    /// Close the connection, with this reason for the access log.
    Close(CloseReason),
    /// The path to the target is up (directly or through the upstream proxy): the dispatcher hands the outbound
    /// socket, by value, to whoever answers this kind of request.
    Connected(Connected),
    /// Resolving or connecting failed (already counted, outbound socket dropped): the dispatcher answers the client.
    Failed(ReplyKind, CloseReason),
}

/// Concurrent session counts per user, shared by all workers (touched at authentication and close only).
pub type UserCounts = Arc<Mutex<HashMap<String, usize>>>;

/// Everything a phase handler may touch besides its own connection.
pub struct Ctx {
    /// For registering outbound, UDP and BIND sockets.
    pub registry: mio::Registry,
    /// The configuration.
    pub cfg: Arc<Config>,
    /// The current users table (replaced on SIGHUP).
    pub users: Arc<Users>,
    /// The current policy file (replaced on SIGHUP with the users table).
    pub policy: Arc<crate::policy::Policy>,
    /// This worker's counters.
    pub stats: Arc<Stats>,
    /// Relay buffers.
    pub pool: BufferPool,
    /// Where relays read into before writing straight through.
    pub scratch: Box<[u8]>,
    /// Deadlines.
    pub timers: Timers,
    /// The time at the top of this loop iteration.
    pub now: Instant,
    /// Resolver pool job queue.
    pub resolve_tx: Sender<Job>,
    /// Names answered without the pool (`--resolve`, hosts file, live cache entries).
    pub quick: crate::resolve::QuickAnswers,
    /// Where resolver answers come back.
    pub reply_to: ReplyTo,
    /// Connections to drive again next iteration.
    pub pending: Vec<usize>,
    /// Draining: finish what is established, start nothing new.
    pub draining: bool,
    /// Sessions per user (for `--user-max-connections`).
    pub user_counts: UserCounts,
    /// Per-user token buckets (`rate_down`, `rate_up`), shared by all workers.
    pub limits: Arc<crate::policy::Limits>,
    /// Reused output buffer for rewritten HTTP heads.
    pub head_out: Vec<u8>,
    /// Batch buffers for UDP associations, shared by all of them (allocated on first use).
    pub udp: UdpArena,
    /// Idle pipes for `--splice` (a tunnel holds one only while a sink refuses bytes).
    pub pipes: Vec<crate::sys::Pipe>,
}

/// The worker's datagram arena: one `recvmmsg` batch of slots (each a full-size datagram plus header room), what
/// the batch received, and the sends assembled from it. One per worker rather than per association, so idle
/// associations hold no buffer; the slots are zero-filled by the allocator, so pages no datagram touched stay
/// unmapped.
#[derive(Default)]
pub struct UdpArena {
    /// `sys::MAX_BATCH` slots back to back.
    pub buf: Vec<u8>,
    /// What the last receive put in each slot.
    pub got: Vec<crate::sys::Received>,
    /// Datagrams to send, pointing into `buf`, in arrival order.
    pub out: Vec<crate::sys::Outgoing>,
    /// Whether the kernel takes UDP GSO sends (asked once, with the first association's socket).
    pub gso: Option<bool>,
}

/// Handles shared by all workers.
#[derive(Clone)]
pub struct Shared {
    /// The configuration.
    pub cfg: Arc<Config>,
    /// Open client connections across all workers (for `--max-connections`).
    pub open: Arc<AtomicUsize>,
    /// Sessions per user.
    pub user_counts: UserCounts,
    /// Per-user token buckets.
    pub limits: Arc<crate::policy::Limits>,
    /// Resolver job queue.
    pub resolve_tx: Sender<Job>,
    /// Answers a worker takes inline, without a pool round trip.
    pub quick: crate::resolve::QuickAnswers,
}

/// The channels between a worker and the other threads.
pub struct Channels {
    /// Commands from the control thread.
    pub commands: Receiver<Command>,
    /// Resolver answers.
    pub replies: Receiver<Reply>,
    /// Where resolver threads send answers for this worker.
    pub reply_tx: Sender<Reply>,
    /// Wakes this worker's poll.
    pub waker: Arc<mio::Waker>,
}
