#![no_main]
//! Fuzz target `proof`: see `fuzz/README.md` and `fuzz/src/proto_checks.rs`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tether_fuzz::proto_checks::proof(data));
