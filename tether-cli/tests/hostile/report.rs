//! What every test prints: its parameters, each figure it measured, each
//! pass criterion with the figure it was judged on, and at the end one
//! panic listing every failed criterion (so one run shows them all).

use std::future::Future;
use std::sync::{Mutex, PoisonError};

/// Tests run one at a time: each measures a child's memory and latency,
/// which a neighbour's flood on the same two cores would distort.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one test body on its own two-thread runtime, after the previous
/// test finished.
pub(crate) fn run<F: Future<Output = ()>>(body: F) {
    let _turn = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(body);
}

/// The seed of a test's random choices: `TETHER_HOSTILE_SEED`, or drawn.
pub(crate) fn seed() -> u64 {
    std::env::var("TETHER_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            use rand::{rngs::SmallRng, RngCore, SeedableRng};
            SmallRng::from_os_rng().next_u64()
        })
}

/// The figures and verdicts of one test.
pub(crate) struct Report {
    name: &'static str,
    params: String,
    failed: Vec<String>,
}

impl Report {
    /// Starts the report of test `name`; `params` is what replays it.
    pub(crate) fn new(name: &'static str, params: impl Into<String>) -> Report {
        let params = params.into();
        eprintln!("=== {name}: {params}");
        Report {
            name,
            params,
            failed: Vec::new(),
        }
    }

    /// A measured figure that is not itself a criterion.
    pub(crate) fn figure(&self, what: &str, value: impl std::fmt::Display) {
        eprintln!("[{}] {what}: {value}", self.name);
    }

    /// A pass criterion, with what was measured.
    pub(crate) fn check(&mut self, criterion: &str, ok: bool, measured: impl std::fmt::Display) {
        let verdict = if ok { "PASS" } else { "FAIL" };
        eprintln!(
            "[{}] {verdict} {criterion} (measured: {measured})",
            self.name
        );
        if !ok {
            self.failed
                .push(format!("{criterion} (measured: {measured})"));
        }
    }

    /// Panics with every failed criterion, if any.
    pub(crate) fn finish(self) {
        if self.failed.is_empty() {
            eprintln!("=== {}: all criteria met", self.name);
            return;
        }
        panic!(
            "{}: {} criteria failed:\n  - {}\nparameters: {}",
            self.name,
            self.failed.len(),
            self.failed.join("\n  - "),
            self.params
        );
    }
}
