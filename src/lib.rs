//! socksgate: a SOCKS5, SOCKS4/4a and HTTP proxy gateway on one port.
//!
//! ```text
//! main thread ("control")          N worker threads (one per core)          M pool threads + 1 "dns" thread
//! -----------------------          -------------------------------          -------------------------------
//! parse CLI -> Config              own mio::Poll, own SO_REUSEPORT          hashes; hosts/cache hits; the dns
//! signals (HUP/TERM/INT/USR2)     listeners, Slab<Conn>, BufferPool,       thread: own mio::Poll, queries
//! /metrics listener                timers, Arc<Users>, own Stats            reply -> worker channel
//! reload users -> workers          command channel + Waker                  + worker Waker
//! ```
//!
//! The protocol parsers in [`proto`] are sans-IO (bytes in, values out); [`worker`] drives them from the event
//! loop. See `docs/architecture.md` for the whole picture.

pub mod acl;
pub mod auth;
pub mod buffer;
pub mod config;
pub mod control;
pub mod dns;
pub mod groups;
pub mod happy;
mod indexed;
pub mod listen;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod proto;
pub mod resolve;
pub mod supervisor;
// The one module allowed to use `unsafe` (workspace lint `unsafe_code = "deny"`); each block has a SAFETY comment.
#[allow(unsafe_code)]
pub mod sys;
#[cfg(test)]
mod test_support;
pub mod tls;
pub mod upstream;
pub mod worker;

pub use config::Config;
pub use control::Server;
