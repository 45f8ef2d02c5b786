//! socksgate: a SOCKS5, SOCKS4/4a and HTTP proxy gateway on one port.
//!
//! ```text
//! main thread ("control")          N worker threads (one per core)          M resolver threads
//! -----------------------          -------------------------------          ------------------
//! parse CLI -> Config              own mio::Poll, own SO_REUSEPORT          blocking getaddrinfo
//! signals (SIGHUP/SIGTERM/SIGINT)  listeners, Slab<Conn>, BufferPool,       reply -> worker channel
//! /metrics listener                timers, Arc<Users>, own Stats            + worker Waker
//! reload users -> workers          command channel + Waker
//! ```
//!
//! The protocol parsers in [`proto`] are sans-IO (bytes in, values out); [`worker`] drives them from the event
//! loop. See `docs/architecture.md` for the whole picture.

pub mod acl;
pub mod auth;
pub mod buffer;
pub mod config;
pub mod control;
pub mod metrics;
pub mod net;
pub mod proto;
pub mod resolve;
pub mod sys;
pub mod tls;
pub mod upstream;
pub mod worker;

pub use config::Config;
pub use control::Server;
