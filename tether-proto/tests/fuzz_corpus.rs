//! Replays the committed fuzz corpora of the `hello`, `frame`, `replay` and `proof`
//! targets (`fuzz/corpus/<target>/`) through the same checks the fuzz
//! targets run, on stable Rust and without libFuzzer. The checks live in
//! `fuzz/src/proto_checks.rs`, shared with the targets; see `fuzz/README.md`.

#[allow(unreachable_pub)]
#[path = "../../fuzz/src/proto_checks.rs"]
mod proto_checks;

#[allow(unreachable_pub)]
#[path = "../../fuzz/src/corpus.rs"]
mod corpus;

#[test]
fn hello_corpus() {
    corpus::replay(env!("CARGO_MANIFEST_DIR"), "hello", proto_checks::hello);
}

#[test]
fn frame_corpus() {
    corpus::replay(env!("CARGO_MANIFEST_DIR"), "frame", proto_checks::frame);
}

#[test]
fn replay_corpus_runs() {
    corpus::replay(env!("CARGO_MANIFEST_DIR"), "replay", proto_checks::replay);
}

#[test]
fn proof_corpus() {
    corpus::replay(env!("CARGO_MANIFEST_DIR"), "proof", proto_checks::proof);
}
