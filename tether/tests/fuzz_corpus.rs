//! Replays the committed fuzz corpus of the `stream_decoder` target
//! (`fuzz/corpus/stream_decoder/`) through the same check the fuzz target
//! runs, on stable Rust and without libFuzzer. The check lives in
//! `fuzz/src/stream_checks.rs`, shared with the target; see
//! `fuzz/README.md`.

#[allow(unreachable_pub)]
#[path = "../../fuzz/src/stream_checks.rs"]
mod stream_checks;

#[allow(unreachable_pub)]
#[path = "../../fuzz/src/corpus.rs"]
mod corpus;

#[test]
fn stream_decoder_corpus() {
    corpus::replay(
        env!("CARGO_MANIFEST_DIR"),
        "stream_decoder",
        stream_checks::stream_decoder,
    );
}
