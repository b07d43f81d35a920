//! Replays the committed fuzz corpora of the `hello`, `frame` and `replay`
//! targets (`fuzz/corpus/<target>/`) through the same checks the fuzz
//! targets run, on stable Rust and without libFuzzer. The checks live in
//! `fuzz/src/proto_checks.rs`, shared with the targets; see `fuzz/README.md`.

use std::path::PathBuf;

#[allow(unreachable_pub)]
#[path = "../../fuzz/src/proto_checks.rs"]
mod proto_checks;

/// Runs `check` on every file of `fuzz/corpus/<target>/` and fails listing
/// every file that panicked. An empty or missing corpus fails too, so this
/// test cannot pass by checking nothing.
fn replay_corpus(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus files in {}", dir.display());
    let failed: Vec<String> = files
        .iter()
        .filter_map(|path| {
            let data = std::fs::read(path).unwrap();
            std::panic::catch_unwind(|| check(&data))
                .is_err()
                .then(|| path.display().to_string())
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} {target} corpus files failed: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn hello_corpus() {
    replay_corpus("hello", proto_checks::hello);
}

#[test]
fn frame_corpus() {
    replay_corpus("frame", proto_checks::frame);
}

#[test]
fn replay_corpus_runs() {
    replay_corpus("replay", proto_checks::replay);
}
