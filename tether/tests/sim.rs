//! Deterministic simulation: stable conduits under seeded schedules of link
//! faults, traffic and lifecycle endings.
//!
//! A schedule is one `u64` seed and a scenario kind. It runs on its own
//! current-thread runtime with a paused clock (time jumps to the next
//! timer), and everything random in it (fault plans, traffic, pauses,
//! cancellations, endings, the conduits' jitter) is drawn from the seed, so
//! a seed replays the same interleaving. Every failure names its kind and
//! seed and the command that replays it.
//!
//! The real-transport kinds (`real_tcp`, `real_unix`, `real_tls`,
//! `real_ws`, `real_wss`; six seeds each by default) run over real sockets
//! on the real clock, their links cut at seeded random points: there a
//! seed replays the fault plan and the traffic, not the thread
//! interleaving (the kernel and the clock decide where a cut lands), so
//! the replay command reruns the plan and may pass. `a_seed_replays_identically` leaves them out.
//!
//! - `cargo test -p tether --test sim`: every kind, a few hundred seeds each.
//! - `TETHER_SIM_SEEDS=N`: N seeds per kind instead.
//! - `TETHER_SIM_KIND=cuts,lossy`: only these kinds (see [`Kind::name`]).
//! - `TETHER_SIM_SEED=1234`: only this seed; a passing run prints what it
//!   did (with `-- --nocapture`).
//! - `cargo test -p tether --test sim -- --ignored --nocapture soak`: 20,000+
//!   seeds over all kinds, with a count and the time taken per kind.
//!
//! `sim/fault.rs` is the fault-injecting link, `sim/traffic.rs` the traffic
//! and the checks, `sim/scenario.rs` the kinds.

mod common;
#[path = "sim/fault.rs"]
mod fault;
#[path = "sim/scenario.rs"]
mod scenario;
#[path = "sim/traffic.rs"]
mod traffic;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use scenario::Kind;

/// Where the soak's seeds start, so that it explores beyond the default run.
const SOAK_FIRST_SEED: u64 = 1 << 32;
/// Seeds of the soak in all, at the least.
const SOAK_SEEDS: u64 = 20_000;
/// Seeds per kind of the determinism test.
const REPLAYED_SEEDS: u64 = 4;
/// Failures shown in full in a report.
const SHOWN: usize = 5;
/// A batch stops taking new seeds of a kind after this many of its seeds
/// failed.
const MAX_FAILURES: usize = 10;
/// A seed still running after this much real time is spinning: busy
/// without ever letting virtual time advance (no seed needs a second).
const REAL_TIME_LIMIT: Duration = Duration::from_secs(60);

/// Runs one seed on a fresh current-thread runtime with a paused clock, on
/// a thread of its own so that a seed that spins is reported, not waited
/// for.
fn run_seed(kind: Kind, seed: u64) -> Result<String, String> {
    let (done, outcome) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("sim {} {seed}", kind.name()))
        .spawn(move || {
            // Real sockets need the real clock: a paused one would jump
            // over every timeout while the kernel moves bytes.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(!kind.is_real())
                .build()
                .expect("a runtime");
            let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
                runtime.block_on(scenario::run(kind, seed))
            }));
            let _ = done.send(ran.unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                Err(format!("panicked: {what}"))
            }));
        })
        .expect("a thread");
    outcome.recv_timeout(REAL_TIME_LIMIT).unwrap_or_else(|_| {
        Err(format!(
            "still running after {REAL_TIME_LIMIT:?} of real time: busy without letting virtual time advance (left running)"
        ))
    })
}

/// Runs a seed twice: it must do exactly the same both times.
fn replay_seed(kind: Kind, seed: u64) -> Result<String, String> {
    let first = run_seed(kind, seed);
    let second = run_seed(kind, seed);
    if first == second {
        return Ok(String::new());
    }
    Err(format!(
        "ran differently twice:\n      first:  {first:?}\n      second: {second:?}"
    ))
}

fn replay_command(kind: Kind, seed: u64) -> String {
    format!(
        "TETHER_SIM_KIND={} TETHER_SIM_SEED={seed} cargo test -p tether --test sim",
        kind.name()
    )
}

struct Failure {
    kind: Kind,
    seed: u64,
    message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kind {} seed {}: {}\n    replay: {}",
            self.kind.name(),
            self.seed,
            self.message,
            replay_command(self.kind, self.seed)
        )
    }
}

/// What a batch of seeds did: per kind, the seeds run and the time spent;
/// the failures.
#[derive(Default)]
struct Outcome {
    ran: Vec<(Kind, u64, Duration)>,
    failures: Vec<Failure>,
}

impl Outcome {
    fn failed(&self, kind: Kind) -> usize {
        self.failures.iter().filter(|f| f.kind == kind).count()
    }

    fn record(&mut self, kind: Kind, seed: u64, spent: Duration, result: Result<String, String>) {
        match self.ran.iter_mut().find(|(k, _, _)| *k == kind) {
            Some((_, n, time)) => {
                *n += 1;
                *time += spent;
            }
            None => self.ran.push((kind, 1, spent)),
        }
        if let Err(message) = result {
            self.failures.push(Failure {
                kind,
                seed,
                message,
            });
        }
    }

    fn report(&self) -> String {
        let ran: u64 = self.ran.iter().map(|(_, n, _)| n).sum();
        let mut text = format!("{} of {ran} seeds failed", self.failures.len());
        let given_up: Vec<&str> = self
            .ran
            .iter()
            .filter(|(kind, _, _)| self.failed(*kind) >= MAX_FAILURES)
            .map(|(kind, _, _)| kind.name())
            .collect();
        if !given_up.is_empty() {
            text.push_str(&format!(
                " (no more seeds of {} after {MAX_FAILURES} failures)",
                given_up.join(", ")
            ));
        }
        text.push_str(":\n");
        for failure in self.failures.iter().take(SHOWN) {
            text.push_str(&format!("  {failure}\n"));
        }
        if self.failures.len() > SHOWN {
            let rest: Vec<String> = self.failures[SHOWN..]
                .iter()
                .map(|f| format!("{}:{}", f.kind.name(), f.seed))
                .collect();
            text.push_str(&format!("  and {}\n", rest.join(" ")));
        }
        text
    }
}

/// Runs `job` on every `(kind, seed)`, on one worker thread per core.
fn run_jobs(jobs: &[(Kind, u64)], job: fn(Kind, u64) -> Result<String, String>) -> Outcome {
    let workers = std::thread::available_parallelism()
        .map_or(2, usize::from)
        .min(jobs.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let outcome = Mutex::new(Outcome::default());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while let Some(&(kind, seed)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if outcome.lock().unwrap().failed(kind) >= MAX_FAILURES {
                        continue;
                    }
                    let started = Instant::now();
                    let result = job(kind, seed);
                    let spent = started.elapsed();
                    outcome.lock().unwrap().record(kind, seed, spent, result);
                }
            });
        }
    });
    let mut outcome = outcome.into_inner().unwrap();
    outcome.failures.sort_by_key(|f| (f.kind.name(), f.seed));
    outcome
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

/// The kinds `TETHER_SIM_KIND` (a comma-separated list, unset for all)
/// selects.
fn selected_kinds() -> Vec<Kind> {
    let Ok(list) = std::env::var("TETHER_SIM_KIND") else {
        return Kind::ALL.to_vec();
    };
    list.split(',')
        .map(|name| {
            Kind::from_name(name.trim()).unwrap_or_else(|| {
                panic!(
                    "TETHER_SIM_KIND: unknown kind {name:?}; the kinds are {:?}",
                    Kind::ALL.map(Kind::name)
                )
            })
        })
        .collect()
}

/// The jobs for `kinds`: `TETHER_SIM_SEED` alone, or `TETHER_SIM_SEEDS`
/// (else `count(kind)`) seeds per kind from `first`, the kinds interleaved
/// so that every worker stays busy to the end.
fn jobs(kinds: &[Kind], first: u64, count: impl Fn(Kind) -> u64) -> Vec<(Kind, u64)> {
    let seeds = |kind| match env_u64("TETHER_SIM_SEED") {
        Some(seed) => seed..seed + 1,
        None => first..first + env_u64("TETHER_SIM_SEEDS").unwrap_or_else(|| count(kind)),
    };
    let mut jobs: Vec<(Kind, u64)> = kinds
        .iter()
        .flat_map(|&kind| seeds(kind).map(move |seed| (kind, seed)))
        .collect();
    jobs.sort_by_key(|&(kind, seed)| (seed, kind.name()));
    jobs
}

fn check_kind(kind: Kind) {
    if !selected_kinds().contains(&kind) {
        return;
    }
    if let Some(seed) = env_u64("TETHER_SIM_SEED") {
        // A replay: show what the run did (with --nocapture).
        match run_seed(kind, seed) {
            Ok(fingerprint) => return println!("kind {} seed {seed}: {fingerprint}", kind.name()),
            Err(message) => panic!(
                "{}",
                Failure {
                    kind,
                    seed,
                    message
                }
            ),
        }
    }
    let outcome = run_jobs(&jobs(&[kind], 0, Kind::default_seeds), run_seed);
    assert!(outcome.failures.is_empty(), "{}", outcome.report());
}

#[test]
fn cuts() {
    check_kind(Kind::Cuts);
}

#[test]
fn stalls() {
    check_kind(Kind::Stalls);
}

#[test]
fn pressure() {
    check_kind(Kind::Pressure);
}

#[test]
fn slow_reader() {
    check_kind(Kind::SlowReader);
}

#[test]
fn short_links() {
    check_kind(Kind::ShortLinks);
}

#[test]
fn base_format() {
    check_kind(Kind::BaseFormat);
}

#[test]
fn client_close() {
    check_kind(Kind::ClientClose);
}

#[test]
fn server_close() {
    check_kind(Kind::ServerClose);
}

#[test]
fn client_drop() {
    check_kind(Kind::ClientDrop);
}

#[test]
fn server_drop() {
    check_kind(Kind::ServerDrop);
}

#[test]
fn lossy() {
    check_kind(Kind::Lossy);
}

#[test]
fn many_sessions() {
    check_kind(Kind::ManySessions);
}

#[test]
fn real_tcp() {
    check_kind(Kind::RealTcp);
}

#[test]
fn real_unix() {
    check_kind(Kind::RealUnix);
}

#[test]
fn real_tls() {
    check_kind(Kind::RealTls);
}

#[test]
fn real_ws() {
    check_kind(Kind::RealWs);
}

#[test]
fn real_wss() {
    check_kind(Kind::RealWss);
}

/// The same seed twice gives the same run: same outcome, same counters on
/// both sides, same fault log, same virtual time taken. (Not the
/// real-transport kinds: see the module documentation.)
#[test]
fn a_seed_replays_identically() {
    let kinds: Vec<Kind> = selected_kinds()
        .into_iter()
        .filter(|k| !k.is_real())
        .collect();
    let outcome = run_jobs(&jobs(&kinds, 0, |_| REPLAYED_SEEDS), replay_seed);
    assert!(outcome.failures.is_empty(), "{}", outcome.report());
}

/// 20,000+ seeds over every kind, shared out by cost, from seeds the
/// default run does not use. `TETHER_SIM_SEEDS` sets the seeds per kind.
#[test]
#[ignore = "a long soak: cargo test -p tether --test sim -- --ignored --nocapture soak"]
fn soak() {
    let kinds = selected_kinds();
    let cost: u64 = kinds.iter().map(|&k| k.default_seeds()).sum();
    let jobs = jobs(&kinds, SOAK_FIRST_SEED, |kind| {
        SOAK_SEEDS * kind.default_seeds() / cost.max(1) + 1
    });
    let started = Instant::now();
    let outcome = run_jobs(&jobs, run_seed);
    println!(
        "soak: {} of {} seeds run in {:.1?} on {} threads",
        outcome.ran.iter().map(|(_, n, _)| n).sum::<u64>(),
        jobs.len(),
        started.elapsed(),
        std::thread::available_parallelism().map_or(2, usize::from)
    );
    for (kind, ran, time) in &outcome.ran {
        println!(
            "  {:<14} {ran:>6} seeds, {:>5} failed, {:>8.1?} of worker time",
            kind.name(),
            outcome.failed(*kind),
            time
        );
    }
    assert!(outcome.failures.is_empty(), "{}", outcome.report());
}
