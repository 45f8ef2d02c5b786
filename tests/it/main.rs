//! The proxy's integration tests, as one test binary: each module drives the real `socksgate` binary (or, in
//! `worker_layers`, reads its sources) through the helpers in `common`. One binary links the helpers once and lets
//! the harness schedule every test in one pool; `cargo test --release --test it MODULE::` runs one module.
//!
//! Adding a test file: put it in this folder as `tests/it/NAME.rs` and add `mod NAME;` below (keep the list
//! sorted); that is the whole change. A file written as its own binary (`tests/NAME.rs` starting with
//! `mod common;`) moves in with `git mv tests/NAME.rs tests/it/`, the `mod NAME;` line, and its `mod common;`
//! turned into `use crate::common;` (its `use common::*;` and `common::name` paths then work unchanged). Test
//! names gain the module as a prefix (`socks5::auth_success_inline_and_file_users`).
//! `tests/corpus_replay.rs` stays its own binary on purpose: it compiles the fuzz crate's `fuzz/src/targets.rs` by
//! `#[path]` (that file names it), needs no proxy binary and catches the targets' panics with `catch_unwind`.

mod common;

mod dns;
mod faults;
mod happy_eyeballs;
mod haproxy;
mod http_proxy;
mod lifecycle;
mod limits;
mod operations;
mod policy;
mod quota;
mod real_clients;
mod routing;
mod security;
mod session_ends;
mod socks4;
mod socks5;
mod tcp_options;
mod tls;
mod udp_bind;
mod worker_layers;
mod zero_downtime;
