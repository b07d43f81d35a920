//! Replays the committed fuzz corpus of the `stream_decoder` target
//! (`fuzz/corpus/stream_decoder/`) through the same check the fuzz target
//! runs, on stable Rust and without libFuzzer. The check lives in
//! `fuzz/src/stream_checks.rs`, shared with the target; see
//! `fuzz/README.md`.

use std::path::PathBuf;

#[allow(unreachable_pub)]
#[path = "../../fuzz/src/stream_checks.rs"]
mod stream_checks;

#[test]
fn stream_decoder_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/stream_decoder");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    // An empty or missing corpus fails: this test must check something.
    assert!(!files.is_empty(), "no corpus files in {}", dir.display());
    let failed: Vec<String> = files
        .iter()
        .filter_map(|path| {
            let data = std::fs::read(path).unwrap();
            std::panic::catch_unwind(|| stream_checks::stream_decoder(&data))
                .is_err()
                .then(|| path.display().to_string())
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} stream_decoder corpus files failed: {failed:#?}",
        failed.len(),
        files.len()
    );
}
