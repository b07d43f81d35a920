//! The checks behind the fuzz targets.
//!
//! Each target in `fuzz_targets/` is one line that hands libFuzzer's bytes
//! to a function here. The same files are compiled into the normal test
//! suite (`tether-proto/tests/fuzz_corpus.rs`, `tether/tests/fuzz_corpus.rs`)
//! with `#[path]`, which replays every committed corpus file on stable Rust
//! without libFuzzer. So these modules must not use libFuzzer, and may use
//! only crates those test files can see (the tested crate's own dependencies).

pub mod corpus;
pub mod proto_checks;
pub mod stream_checks;
