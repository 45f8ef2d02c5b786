//! cargo-fuzz harness for socksgate's sans-IO parsers. The target bodies live in [`targets`], which the main
//! crate's `tests/corpus_replay.rs` also includes, so the committed corpus is replayed on stable by `cargo test`.
pub mod targets;
