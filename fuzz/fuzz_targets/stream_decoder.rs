#![no_main]
//! Fuzz target `stream_decoder`: see `fuzz/README.md` and `fuzz/src/stream_checks.rs`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tether_fuzz::stream_checks::stream_decoder(data));
