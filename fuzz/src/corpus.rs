//! Replays a committed corpus through a check, for the test suite (the
//! fuzz targets themselves get their inputs from libFuzzer).

use std::path::{Path, PathBuf};

/// Runs `check` on every file of `<repo>/fuzz/corpus/<target>/`, where
/// `manifest_dir` is a crate directory of the repository, and panics
/// listing every file that panicked. An empty or missing corpus fails too,
/// so that a test built on this cannot pass by checking nothing.
pub fn replay(manifest_dir: &str, target: &str, check: fn(&[u8])) {
    let dir = Path::new(manifest_dir).join("../fuzz/corpus").join(target);
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
