//! `tether bench`: tether against a plain `tokio-util` baseline, every
//! workload in one process run, each system side by side.
//!
//! Systems, all carrying the same postcard-encoded byte-string message over
//! TCP on loopback unless said otherwise:
//!
//! - **Framed**: `Framed<TcpStream, LengthDelimitedCodec>`, postcard, fed
//!   and flushed every 64 messages: what a competent user writes by hand;
//! - **bare**: tether's bare conduit (`BareSender::feed`/`flush`);
//! - **stable**: tether's stable conduit (`StableSender::send`);
//! - **stable (mem)**: the stable conduit over the in-memory link, which
//!   separates the protocol's cost from the socket's.
//!
//! Beside them, in the throughput workloads, the **loopback limit**: the
//! bytes of the same encoded messages pushed through a plain loopback TCP
//! connection in 256 KiB writes by one writer and one reader, with no
//! framing (see `bench/limit.rs`). It is what the machine can move, and
//! every system's figure is also read as a fraction of it. It runs unless
//! `--systems` names systems without `loopback_limit`.
//!
//! The tunnel workload compares one bulk stream carried directly over TCP
//! (the physical limit of one hop), through two plain relays (the limit of
//! the tunnel's three hops), through tether's tunnel and through `ssh -L`
//! (see `bench/tunnel.rs`).
//!
//! Every ratio compares two figures measured in the same process run, with
//! the systems' runs interleaved. `BENCHMARKS.md` describes the method.

mod alloc;
mod limit;
mod resume;
mod sessions;
mod systems;
mod tunnel;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

pub use self::alloc::{AllocCounter, AllocCounts, SLOTS, SLOT_OTHER, SLOT_RECEIVER, SLOT_SENDER};
use self::resume::{Over, ResumeRun};
pub use self::sessions::Over as IdleOver;
use self::sessions::{IdleReport, StormReport};
use self::systems::{AllocRun, System};

/// Every workload, by the name `--only` takes.
pub const WORKLOADS: [&str; 8] = [
    "small", "large", "rtt", "resume", "allocs", "idle", "storm", "tunnel",
];

/// Payload of the small-message workloads, in bytes.
const SMALL: usize = 32;

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct BenchOptions {
    /// Smaller counts and 1,000 sessions, to finish in under a minute.
    pub quick: bool,
    /// Run only these workloads (names from [`WORKLOADS`]); empty: all.
    pub only: Vec<String>,
    /// Sessions of the idle-memory and storm workloads, instead of 10,000
    /// (1,000 with `quick`).
    pub sessions: Option<usize>,
    /// Compare only these systems (keys of the JSON report: `framed`,
    /// `bare`, `stable`, `stable_mem`, ..., and `loopback_limit` for the
    /// throughput workloads' loopback limit); empty: all. Ratios need both
    /// of their systems.
    pub systems: Vec<String>,
    /// Print progress to stderr.
    pub progress: bool,
}

/// A child role of `tether bench` (used by the bench itself).
#[derive(Clone, Debug)]
pub enum Role {
    /// Connect this many client sessions to `addr` and obey commands.
    Clients {
        /// The server.
        addr: SocketAddr,
        /// How many sessions.
        sessions: usize,
        /// Over TLS, trusting the CA in this PEM file.
        tls_ca: Option<std::path::PathBuf>,
        /// Over WebSocket (`ws://ADDR/`).
        ws: bool,
    },
    /// Serve this many sessions from a child client process and report the
    /// memory they take.
    IdleServer {
        /// How many sessions.
        sessions: usize,
        /// The link under the sessions.
        over: sessions::Over,
    },
}

/// Runs a child role; see [`Role`].
pub fn run_role(role: Role, counter: Option<&'static dyn AllocCounter>) -> anyhow::Result<()> {
    match role {
        Role::Clients {
            addr,
            sessions,
            tls_ca,
            ws,
        } => sessions::run_clients(addr, sessions, tls_ca, ws),
        Role::IdleServer { sessions, over } => sessions::run_idle_server(sessions, over, counter),
    }
}

/// How much of each workload to run.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Plan {
    small_messages: u64,
    large_64k_messages: u64,
    large_1m_messages: u64,
    /// Interleaved runs per system of the throughput and round-trip
    /// workloads; the median is reported.
    runs: usize,
    round_trips: usize,
    resume_cuts: usize,
    alloc_warmup: u64,
    alloc_messages: u64,
    sessions: usize,
    /// Bytes of the tunnel workload's one stream, per run.
    tunnel_bytes: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                small_messages: 200_000,
                large_64k_messages: 2_048,
                large_1m_messages: 128,
                runs: 3,
                round_trips: 2_000,
                resume_cuts: 30,
                alloc_warmup: 20_000,
                alloc_messages: 50_000,
                sessions: 1_000,
                tunnel_bytes: 64 << 20,
            }
        } else {
            Plan {
                small_messages: 2_000_000,
                large_64k_messages: 16_384,
                large_1m_messages: 1_024,
                // Loopback throughput on a shared 2-core VM varies by tens of
                // percent from run to run; five interleaved runs give a
                // steadier median.
                runs: 5,
                round_trips: 20_000,
                resume_cuts: 200,
                alloc_warmup: 50_000,
                alloc_messages: 200_000,
                sessions: 10_000,
                tunnel_bytes: 256 << 20,
            }
        }
    }
}

/// The machine the run happened on.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Machine {
    cpus: usize,
    cpu_model: String,
    mem_total_bytes: u64,
    kernel: String,
    somaxconn: Option<u32>,
    fd_limit: Option<u64>,
}

fn first_field(path: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

impl Machine {
    fn read() -> Machine {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
        };
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: first_field("/proc/cpuinfo", "model name").unwrap_or_default(),
            mem_total_bytes: first_field("/proc/meminfo", "MemTotal")
                .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kib| kib * 1024),
            kernel: read("/proc/sys/kernel/osrelease").unwrap_or_default(),
            somaxconn: read("/proc/sys/net/core/somaxconn").and_then(|s| s.parse().ok()),
            fd_limit: std::fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("Max open files"))
                        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
                }),
        }
    }
}

/// Several runs of one figure and their median.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Figure {
    runs: Vec<f64>,
    median: f64,
}

impl Figure {
    fn push(&mut self, v: f64) {
        self.runs.push(round(v));
        self.median = round(median(&self.runs));
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Four significant digits at most, and no more than 3 decimals.
fn round(v: f64) -> f64 {
    if !v.is_finite() || v == 0.0 {
        return v;
    }
    let digits = 4 - 1 - v.abs().log10().floor() as i32;
    let scale = 10f64.powi(digits.clamp(0, 3));
    (v * scale).round() / scale
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A throughput workload: one figure per system.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Throughput {
    payload_bytes: usize,
    /// Bytes of one postcard-encoded message, without framing: what the
    /// loopback limit moves per message.
    encoded_bytes: usize,
    messages_per_run: u64,
    unit: &'static str,
    /// By system key; `loopback_limit` is the loopback limit, in the same
    /// unit (for msgs/s, the equivalent: bytes/s ÷ `encoded_bytes`).
    systems: BTreeMap<&'static str, Figure>,
}

/// Round trips per system, p50 and p99 in microseconds.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Rtt {
    payload_bytes: usize,
    round_trips_per_run: usize,
    /// On the bench's runtime, two worker threads: a round trip can wait
    /// for a sleeping worker to be woken.
    systems: BTreeMap<&'static str, RttFigure>,
    /// On a current-thread runtime: both ends and all their tasks on one
    /// thread, so no round trip waits for a thread to wake. What is left
    /// is the link's system calls and the code.
    one_thread: BTreeMap<&'static str, RttFigure>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct RttFigure {
    p50_us: Figure,
    p99_us: Figure,
}

/// Resume latency per transport, in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ResumeFigure {
    cuts: usize,
    p50_ms: f64,
    p99_ms: f64,
    min_ms: f64,
    max_ms: f64,
    #[serde(flatten)]
    run: ResumeRun,
}

/// Allocations per message per system.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct AllocFigure {
    per_send: f64,
    per_recv: f64,
    run: AllocRun,
}

/// The tunnel workload: one stream's MB/s per way of carrying it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct TunnelBench {
    bytes_per_run: u64,
    unit: &'static str,
    /// `direct_tcp`, `relay_chain`, `tunnel` and (when it ran) `ssh_l`.
    systems: BTreeMap<&'static str, Figure>,
    /// Why `ssh -L` did not run, if it did not.
    ssh_l_not_run: Option<String>,
}

/// One target: the value, the target as text, and whether it is met.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    key: &'static str,
    label: &'static str,
    value: Option<f64>,
    target: String,
    met: bool,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Targets(Vec<Target>);

impl Serialize for Targets {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Entry<'a> {
            value: Option<f64>,
            target: &'a str,
            met: bool,
        }
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for t in &self.0 {
            map.serialize_entry(
                t.key,
                &Entry {
                    value: t.value,
                    target: &t.target,
                    met: t.met,
                },
            )?;
        }
        map.end()
    }
}

/// Everything one `tether bench` run measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub(crate) quick: bool,
    pub(crate) machine: Machine,
    pub(crate) plan: Plan,
    // The headline figures.
    pub(crate) small_stable_over_bare: Option<f64>,
    pub(crate) small_bare_over_framed: Option<f64>,
    pub(crate) small_stable_over_framed: Option<f64>,
    pub(crate) small_stable_mem_over_stable: Option<f64>,
    pub(crate) large_stable_over_framed: Option<f64>,
    pub(crate) large_64k_stable_over_framed: Option<f64>,
    /// The stable conduit's throughput as a fraction of the loopback limit
    /// (no target): small (msgs/s), 64 KiB and 1 MiB (MB/s).
    pub(crate) small_stable_over_loopback_limit: Option<f64>,
    pub(crate) large_64k_stable_over_loopback_limit: Option<f64>,
    pub(crate) large_stable_over_loopback_limit: Option<f64>,
    pub(crate) rtt_p50_stable_over_bare: Option<f64>,
    pub(crate) rtt_p50_bare_over_framed: Option<f64>,
    /// The same on a current-thread runtime ([`Rtt::one_thread`]).
    pub(crate) rtt_p50_stable_over_bare_one_thread: Option<f64>,
    pub(crate) rtt_p99_stable_over_bare: Option<f64>,
    pub(crate) rtt_p99_stable_over_bare_one_thread: Option<f64>,
    pub(crate) small_stable_tls_over_framed_tls: Option<f64>,
    pub(crate) large_stable_tls_over_framed_tls: Option<f64>,
    pub(crate) resume_tls_p50_ms: Option<f64>,
    pub(crate) resume_tls_no_resumption_p50_ms: Option<f64>,
    pub(crate) idle_tls_session_bytes: Option<f64>,
    pub(crate) small_stable_ws_over_ws_plain: Option<f64>,
    pub(crate) large_stable_ws_over_ws_plain: Option<f64>,
    pub(crate) idle_ws_session_bytes: Option<f64>,
    pub(crate) resume_ws_p50_ms: Option<f64>,
    pub(crate) resume_p50_ms: Option<f64>,
    pub(crate) resume_p99_ms: Option<f64>,
    pub(crate) allocs_per_send: Option<f64>,
    pub(crate) allocs_per_recv: Option<f64>,
    pub(crate) idle_session_bytes: Option<f64>,
    pub(crate) storm_sessions: Option<usize>,
    pub(crate) storm_resumed: Option<usize>,
    pub(crate) storm_lost: Option<u64>,
    pub(crate) storm_s: Option<f64>,
    pub(crate) tunnel_over_direct_tcp: Option<f64>,
    pub(crate) tunnel_over_ssh_l: Option<f64>,
    /// The tunnel against two plain relays over the same three hops.
    pub(crate) tunnel_over_relay_chain: Option<f64>,
    pub(crate) targets: Targets,
    /// No workload failed and every delivery check passed.
    pub(crate) ok: bool,
    pub(crate) all_targets_met: bool,
    pub(crate) errors: Vec<String>,
    // The raw figures.
    pub(crate) small: Option<Throughput>,
    pub(crate) large_64k: Option<Throughput>,
    pub(crate) large_1m: Option<Throughput>,
    pub(crate) rtt: Option<Rtt>,
    pub(crate) resume: Option<BTreeMap<&'static str, ResumeFigure>>,
    pub(crate) allocs: Option<BTreeMap<&'static str, AllocFigure>>,
    pub(crate) idle: Option<BTreeMap<&'static str, IdleReport>>,
    pub(crate) storm: Option<BTreeMap<&'static str, StormReport>>,
    pub(crate) tunnel: Option<TunnelBench>,
    pub(crate) elapsed_s: f64,
}

impl BenchReport {
    /// Whether every workload ran and every delivery check passed.
    pub fn ok(&self) -> bool {
        self.ok
    }

    /// Whether every target is met.
    pub fn all_targets_met(&self) -> bool {
        self.all_targets_met
    }
}

struct Progress {
    on: bool,
    start: Instant,
}

impl Progress {
    fn say(&self, what: impl std::fmt::Display) {
        if self.on {
            eprintln!("[{:6.1} s] {what}", self.start.elapsed().as_secs_f64());
        }
    }
}

/// One throughput workload: `count` messages of `size` bytes through every
/// system of `list` and, with `with_limit`, the same messages' encoded bytes
/// through the loopback limit (see `bench/limit.rs`), interleaved.
///
/// Every figure is `count` messages over the time taken: msgs/s, or with
/// `bytes` MB/s of payload. The limit's is computed the same way from the
/// time loopback took to move `count` × the encoded message's bytes, so
/// for the 32 B workload it is the equivalent msgs/s (bytes/s ÷ bytes per
/// encoded message), and any system's figure divided by it is the fraction
/// of the machine's loopback the system gets.
#[allow(clippy::too_many_arguments)]
async fn throughput(
    p: &Progress,
    list: &[System],
    with_limit: bool,
    name: &str,
    size: usize,
    count: u64,
    runs: usize,
    bytes: bool,
) -> anyhow::Result<Throughput> {
    let encoded = limit::encoded_len(size)?;
    let mut figures: BTreeMap<&'static str, Figure> = BTreeMap::new();
    // Every system, then the limit if it runs, in the table's order.
    let entries: Vec<Option<System>> = list
        .iter()
        .copied()
        .map(Some)
        .chain(with_limit.then_some(None))
        .collect();
    let one = |entry: Option<System>, n: u64| async move {
        match entry {
            Some(system) => systems::throughput(system, size, n).await,
            None => limit::push(n * encoded as u64).await,
        }
    };
    let key = |entry: Option<System>| entry.map_or(limit::KEY, System::key);
    let label = |entry: Option<System>| entry.map_or(limit::LABEL, System::label);
    // One short unmeasured run each, so the first measured run is not the
    // one that faults in the buffers.
    for &entry in &entries {
        one(entry, (count / 20).max(1))
            .await
            .with_context(|| format!("{name}: {} warm-up", key(entry)))?;
    }
    for run in 1..=runs {
        for &entry in &entries {
            let took = one(entry, count)
                .await
                .with_context(|| format!("{name}: {}", key(entry)))?;
            let secs = took.as_secs_f64().max(1e-9);
            let v = if bytes {
                (count as f64 * size as f64) / secs / 1e6
            } else {
                count as f64 / secs
            };
            p.say(format_args!(
                "{name} run {run}/{runs}: {:<14} {}",
                label(entry),
                if bytes {
                    format!("{v:.0} MB/s")
                } else {
                    format!("{v:.0} msgs/s")
                }
            ));
            figures.entry(key(entry)).or_default().push(v);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(Throughput {
        payload_bytes: size,
        encoded_bytes: encoded,
        messages_per_run: count,
        unit: if bytes { "MB/s" } else { "msgs/s" },
        systems: figures,
    })
}

/// Round trips of every system, on the bench's two-worker runtime and on a
/// current-thread one, interleaved run by run.
fn rtt(
    p: &Progress,
    list: &[System],
    rounds: usize,
    runs: usize,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Rtt> {
    let one = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut two_workers: BTreeMap<&'static str, RttFigure> = BTreeMap::new();
    let mut one_thread: BTreeMap<&'static str, RttFigure> = BTreeMap::new();
    for run in 1..=runs {
        for &system in list {
            for (runtime, mode, figures) in [
                (rt, "2 workers", &mut two_workers),
                (&one, "1 thread ", &mut one_thread),
            ] {
                let mut samples = runtime
                    .block_on(systems::ping_pong(system, SMALL, rounds))
                    .with_context(|| format!("rtt ({}): {}", mode.trim(), system.key()))?;
                samples.sort();
                let us = |d: Duration| d.as_secs_f64() * 1e6;
                let (p50, p99) = (
                    us(percentile(&samples, 0.5)),
                    us(percentile(&samples, 0.99)),
                );
                p.say(format_args!(
                    "rtt run {run}/{runs}, {mode}: {:<13} p50 {p50:.1} µs, p99 {p99:.1} µs",
                    system.label()
                ));
                let f = figures.entry(system.key()).or_default();
                f.p50_us.push(p50);
                f.p99_us.push(p99);
            }
        }
    }
    Ok(Rtt {
        payload_bytes: SMALL,
        round_trips_per_run: rounds,
        systems: two_workers,
        one_thread,
    })
}

async fn resume(
    p: &Progress,
    list: &[System],
    cuts: usize,
) -> anyhow::Result<BTreeMap<&'static str, ResumeFigure>> {
    let mut out = BTreeMap::new();
    let runs = [
        ("stable", "stable", Over::Tcp),
        ("stable_mem", "stable_mem", Over::Mem),
        ("stable_tls", "stable_tls", Over::Tls { resumption: true }),
        (
            "stable_tls",
            "stable_tls_no_resumption",
            Over::Tls { resumption: false },
        ),
        ("stable_ws", "stable_ws", Over::Ws),
    ];
    for (system, key, over) in runs {
        if !list.iter().any(|s| s.key() == system) {
            continue;
        }
        let run = resume::resume_latency(over, cuts)
            .await
            .with_context(|| format!("resume: {key}"))?;
        let mut s = run.samples.clone();
        s.sort();
        let ms = |d: Duration| round(d.as_secs_f64() * 1e3);
        let fig = ResumeFigure {
            cuts: s.len(),
            p50_ms: ms(percentile(&s, 0.5)),
            p99_ms: ms(percentile(&s, 0.99)),
            min_ms: ms(s.first().copied().unwrap_or_default()),
            max_ms: ms(s.last().copied().unwrap_or_default()),
            run,
        };
        p.say(format_args!(
            "resume {key}: p50 {} ms, p99 {} ms over {} cuts",
            fig.p50_ms, fig.p99_ms, fig.cuts
        ));
        out.insert(key, fig);
    }
    Ok(out)
}

fn allocs(
    p: &Progress,
    list: &[System],
    rt: &tokio::runtime::Runtime,
    counter: &'static dyn AllocCounter,
    plan: &Plan,
) -> anyhow::Result<BTreeMap<&'static str, AllocFigure>> {
    let side = |slot: usize, name: &str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .on_thread_start(move || counter.tag_thread(slot))
            .enable_all()
            .build()
    };
    let send_rt = side(SLOT_SENDER, "bench-send")?;
    let recv_rt = side(SLOT_RECEIVER, "bench-recv")?;
    counter.set_enabled(true);
    let mut out = BTreeMap::new();
    let mut result = Ok(());
    for &system in list {
        let run = rt.block_on(systems::alloc_run(
            system,
            counter,
            send_rt.handle(),
            recv_rt.handle(),
            SMALL,
            plan.alloc_warmup,
            plan.alloc_messages,
        ));
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                result = Err(e.context(format!("allocs: {}", system.key())));
                break;
            }
        };
        let n = run.messages.max(1) as f64;
        let fig = AllocFigure {
            per_send: round(run.send.calls() as f64 / n),
            per_recv: round(run.recv.calls() as f64 / n),
            run,
        };
        p.say(format_args!(
            "allocs: {:<13} {} per send, {} per receive",
            system.label(),
            fig.per_send,
            fig.per_recv
        ));
        out.insert(system.key(), fig);
    }
    counter.set_enabled(false);
    send_rt.shutdown_timeout(Duration::from_secs(5));
    recv_rt.shutdown_timeout(Duration::from_secs(5));
    result.map(|()| out)
}

/// The tunnel workload: one stream of `bytes` to a sink, directly, through
/// the tether tunnel and through `ssh -L`, interleaved. An `ssh -L` that
/// could not be set up (with sshd present) is returned beside the figures
/// of the other two.
async fn tunnel_bench(
    p: &Progress,
    bytes: u64,
    runs: usize,
) -> (anyhow::Result<TunnelBench>, Option<anyhow::Error>) {
    let sink = match tunnel::Sink::start().await {
        Ok(s) => s,
        Err(e) => return (Err(e.context("starting the sink")), None),
    };
    let chain = match tunnel::RelayChain::start(sink.addr()).await {
        Ok(c) => c,
        Err(e) => return (Err(e.context("starting the relay chain")), None),
    };
    let tun = match tunnel::Tunnel::start(sink.addr()).await {
        Ok(t) => t,
        Err(e) => return (Err(e.context("starting the tunnel")), None),
    };
    let (ssh, mut ssh_l_not_run, ssh_error) = match tunnel::ssh_unavailable() {
        Some(why) => (None, Some(why.to_string()), None),
        None => match tunnel::SshForward::start(sink.addr()).await {
            Ok(f) => (Some(f), None, None),
            Err(e) => (None, Some("setup failed".to_string()), Some(e)),
        },
    };
    if let Some(why) = &ssh_l_not_run {
        p.say(format_args!("tunnel: ssh -L not run ({why})"));
    }
    let ways: Vec<(tunnel::Way, SocketAddr)> = tunnel::Way::ALL
        .into_iter()
        .filter_map(|w| match w {
            tunnel::Way::Direct => Some((w, sink.addr())),
            tunnel::Way::Relay => Some((w, chain.local())),
            tunnel::Way::Tunnel => Some((w, tun.local())),
            tunnel::Way::Ssh => ssh.as_ref().map(|s| (w, s.local())),
        })
        .collect();
    let measured = async {
        let mut figures: BTreeMap<&'static str, Figure> = BTreeMap::new();
        let push = |way: tunnel::Way, to: SocketAddr, n: u64| {
            let sink = &sink;
            async move {
                let (took, got) = sink
                    .push(to, n)
                    .await
                    .with_context(|| way.label().to_string())?;
                if got != n {
                    anyhow::bail!(
                        "delivery check failed: {}: the sink got {got} of {n} bytes",
                        way.label()
                    );
                }
                anyhow::Ok(took)
            }
        };
        // One unmeasured short stream each (connections, buffers, ciphers).
        for &(way, to) in &ways {
            push(way, to, (bytes / 16).max(8))
                .await
                .context("warm-up")?;
        }
        for run in 1..=runs {
            for &(way, to) in &ways {
                let took = push(way, to, bytes).await?;
                let v = bytes as f64 / took.as_secs_f64().max(1e-9) / 1e6;
                p.say(format_args!(
                    "tunnel run {run}/{runs}: {:<13} {v:.0} MB/s",
                    way.label()
                ));
                figures.entry(way.key()).or_default().push(v);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        anyhow::Ok(figures)
    }
    .await;
    drop(ssh);
    drop(chain);
    tun.stop().await;
    if measured.is_err() && ssh_l_not_run.is_none() {
        ssh_l_not_run = Some("the workload failed".to_string());
    }
    let result = measured.map(|systems| TunnelBench {
        bytes_per_run: bytes,
        unit: "MB/s",
        systems,
        ssh_l_not_run,
    });
    (result, ssh_error)
}

/// The systems `--systems` selects, in the table's order, and whether the
/// loopback limit runs beside them in the throughput workloads: always
/// when no system is named, otherwise only when `loopback_limit` is.
fn selection(names: &[String]) -> anyhow::Result<(Vec<System>, bool)> {
    for s in names {
        if s != limit::KEY && !System::ALL.iter().any(|k| k.key() == s) {
            let known: Vec<&str> = System::ALL
                .iter()
                .map(|k| k.key())
                .chain([limit::KEY])
                .collect();
            anyhow::bail!("unknown system {s:?}; known: {}", known.join(", "));
        }
    }
    let named = |key: &str| names.is_empty() || names.iter().any(|k| k == key);
    let list = System::ALL.into_iter().filter(|s| named(s.key())).collect();
    Ok((list, named(limit::KEY)))
}

/// Runs the workloads and builds the report. Fails only when it cannot
/// start; a workload that fails is recorded in the report's errors.
pub fn run(
    opts: &BenchOptions,
    counter: Option<&'static dyn AllocCounter>,
) -> anyhow::Result<BenchReport> {
    let started = Instant::now();
    let p = Progress {
        on: opts.progress,
        start: started,
    };
    let mut plan = Plan::new(opts.quick);
    if let Some(n) = opts.sessions {
        plan.sessions = n.max(1);
    }
    for w in &opts.only {
        if !WORKLOADS.contains(&w.as_str()) {
            anyhow::bail!("unknown workload {w:?}; known: {}", WORKLOADS.join(", "));
        }
    }
    let want = |w: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == w);
    let (list, with_limit) = selection(&opts.systems)?;
    let has = |key: &str| list.iter().any(|s| s.key() == key);
    let rt = sessions::runtime()?;
    let mut r = BenchReport {
        quick: opts.quick,
        machine: Machine::read(),
        plan: plan.clone(),
        small_stable_over_bare: None,
        small_bare_over_framed: None,
        small_stable_over_framed: None,
        small_stable_mem_over_stable: None,
        large_stable_over_framed: None,
        large_64k_stable_over_framed: None,
        small_stable_over_loopback_limit: None,
        large_64k_stable_over_loopback_limit: None,
        large_stable_over_loopback_limit: None,
        rtt_p50_stable_over_bare: None,
        rtt_p50_bare_over_framed: None,
        rtt_p50_stable_over_bare_one_thread: None,
        rtt_p99_stable_over_bare: None,
        rtt_p99_stable_over_bare_one_thread: None,
        small_stable_tls_over_framed_tls: None,
        large_stable_tls_over_framed_tls: None,
        resume_tls_p50_ms: None,
        resume_tls_no_resumption_p50_ms: None,
        idle_tls_session_bytes: None,
        small_stable_ws_over_ws_plain: None,
        large_stable_ws_over_ws_plain: None,
        idle_ws_session_bytes: None,
        resume_ws_p50_ms: None,
        resume_p50_ms: None,
        resume_p99_ms: None,
        allocs_per_send: None,
        allocs_per_recv: None,
        idle_session_bytes: None,
        storm_sessions: None,
        storm_resumed: None,
        storm_lost: None,
        storm_s: None,
        tunnel_over_direct_tcp: None,
        tunnel_over_ssh_l: None,
        tunnel_over_relay_chain: None,
        targets: Targets::default(),
        ok: true,
        all_targets_met: false,
        errors: Vec::new(),
        small: None,
        large_64k: None,
        large_1m: None,
        rtt: None,
        resume: None,
        allocs: None,
        idle: None,
        storm: None,
        tunnel: None,
        elapsed_s: 0.0,
    };
    let mut errors = Vec::new();
    let mut record = |what: &str, e: anyhow::Error| {
        p.say(format_args!("{what} FAILED: {e:#}"));
        errors.push(format!("{what}: {e:#}"));
    };
    if want("small") {
        match rt.block_on(throughput(
            &p,
            &list,
            with_limit,
            "small",
            SMALL,
            plan.small_messages,
            plan.runs,
            false,
        )) {
            Ok(t) => r.small = Some(t),
            Err(e) => record("small", e),
        }
    }
    if want("large") {
        let count = plan.large_64k_messages;
        match rt.block_on(throughput(
            &p,
            &list,
            with_limit,
            "64 KiB",
            64 * 1024,
            count,
            plan.runs,
            true,
        )) {
            Ok(t) => r.large_64k = Some(t),
            Err(e) => record("large 64 KiB", e),
        }
        let count = plan.large_1m_messages;
        match rt.block_on(throughput(
            &p,
            &list,
            with_limit,
            "1 MiB",
            1024 * 1024,
            count,
            plan.runs,
            true,
        )) {
            Ok(t) => r.large_1m = Some(t),
            Err(e) => record("large 1 MiB", e),
        }
    }
    if want("rtt") {
        match rtt(&p, &list, plan.round_trips, plan.runs, &rt) {
            Ok(t) => r.rtt = Some(t),
            Err(e) => record("rtt", e),
        }
    }
    if want("resume") {
        match rt.block_on(resume(&p, &list, plan.resume_cuts)) {
            Ok(t) => r.resume = Some(t),
            Err(e) => record("resume", e),
        }
    }
    if want("allocs") {
        match counter {
            Some(c) => match allocs(&p, &list, &rt, c, &plan) {
                Ok(a) => r.allocs = Some(a),
                Err(e) => record("allocs", e),
            },
            None => record("allocs", anyhow::anyhow!("no counting allocator installed")),
        }
    }
    if want("idle") {
        let mut idle = BTreeMap::new();
        for (key, over) in [
            ("stable", sessions::Over::Tcp),
            ("stable_tls", sessions::Over::Tls),
            ("stable_ws", sessions::Over::Ws),
        ] {
            if !has(key) {
                continue;
            }
            p.say(format_args!("idle {key}: {} sessions", plan.sessions));
            match rt.block_on(sessions::idle_memory(plan.sessions, over)) {
                Ok(i) => {
                    p.say(format_args!(
                        "idle {key}: {:.0} bytes resident per server session ({:.0} before any message)",
                        i.rss_per_session, i.rss_per_fresh_session
                    ));
                    if !i.delivery.ok() {
                        record(
                            &format!("idle {key}"),
                            anyhow::anyhow!("delivery check failed: {:?}", i.delivery),
                        );
                    }
                    idle.insert(key, i);
                }
                Err(e) => record(&format!("idle {key}"), e),
            }
        }
        r.idle = Some(idle);
    }
    if want("storm") {
        let mut storms = BTreeMap::new();
        for (key, over_mem) in [("stable", false), ("stable_mem", true)] {
            if !has(key) {
                continue;
            }
            p.say(format_args!("storm {key}: {} sessions", plan.sessions));
            let storm = if over_mem {
                rt.block_on(sessions::storm_mem(plan.sessions))
            } else {
                rt.block_on(sessions::storm_tcp(plan.sessions))
            };
            match storm {
                Ok(s) => {
                    p.say(format_args!(
                        "storm {key}: {}/{} resumed in {:.3} s, {} lost",
                        s.resumed, s.sessions, s.elapsed_s, s.lost
                    ));
                    if !s.ok {
                        record(
                            &format!("storm {key}"),
                            anyhow::anyhow!("check failed: {:?}", s.delivery),
                        );
                    }
                    storms.insert(key, s);
                }
                Err(e) => record(&format!("storm {key}"), e),
            }
        }
        r.storm = Some(storms);
    }
    if want("tunnel") {
        let (bench, ssh_error) = rt.block_on(tunnel_bench(&p, plan.tunnel_bytes, plan.runs));
        if let Some(e) = ssh_error {
            record("tunnel ssh -L", e);
        }
        match bench {
            Ok(t) => r.tunnel = Some(t),
            Err(e) => record("tunnel", e),
        }
    }
    rt.shutdown_timeout(Duration::from_secs(5));
    r.errors = errors;
    r.ok = r.errors.is_empty();
    headline(&mut r);
    r.elapsed_s = round(started.elapsed().as_secs_f64());
    Ok(r)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some((a / b * 1000.0).round() / 1000.0),
        _ => None,
    }
}

fn median_of(t: &Option<Throughput>, system: System) -> Option<f64> {
    median_by_key(t, system.key())
}

fn median_by_key(t: &Option<Throughput>, key: &str) -> Option<f64> {
    t.as_ref()?.systems.get(key).map(|f| f.median)
}

/// Fills in the headline figures and the targets.
fn headline(r: &mut BenchReport) {
    use System::*;
    r.small_stable_over_bare = ratio(median_of(&r.small, Stable), median_of(&r.small, Bare));
    r.small_bare_over_framed = ratio(median_of(&r.small, Bare), median_of(&r.small, Framed));
    r.small_stable_over_framed = ratio(median_of(&r.small, Stable), median_of(&r.small, Framed));
    r.small_stable_mem_over_stable =
        ratio(median_of(&r.small, StableMem), median_of(&r.small, Stable));
    r.large_stable_over_framed = ratio(
        median_of(&r.large_1m, Stable),
        median_of(&r.large_1m, Framed),
    );
    r.large_64k_stable_over_framed = ratio(
        median_of(&r.large_64k, Stable),
        median_of(&r.large_64k, Framed),
    );
    let of_limit =
        |t: &Option<Throughput>| ratio(median_of(t, Stable), median_by_key(t, limit::KEY));
    r.small_stable_over_loopback_limit = of_limit(&r.small);
    r.large_64k_stable_over_loopback_limit = of_limit(&r.large_64k);
    r.large_stable_over_loopback_limit = of_limit(&r.large_1m);
    let rtt_of = |one: bool, s: System, p99: bool| {
        r.rtt
            .as_ref()
            .and_then(|t| if one { &t.one_thread } else { &t.systems }.get(s.key()))
            .map(|f| {
                if p99 {
                    f.p99_us.median
                } else {
                    f.p50_us.median
                }
            })
    };
    r.rtt_p50_stable_over_bare = ratio(rtt_of(false, Stable, false), rtt_of(false, Bare, false));
    r.rtt_p50_bare_over_framed = ratio(rtt_of(false, Bare, false), rtt_of(false, Framed, false));
    r.rtt_p50_stable_over_bare_one_thread =
        ratio(rtt_of(true, Stable, false), rtt_of(true, Bare, false));
    r.rtt_p99_stable_over_bare = ratio(rtt_of(false, Stable, true), rtt_of(false, Bare, true));
    r.rtt_p99_stable_over_bare_one_thread =
        ratio(rtt_of(true, Stable, true), rtt_of(true, Bare, true));
    r.small_stable_tls_over_framed_tls = ratio(
        median_of(&r.small, StableTls),
        median_of(&r.small, FramedTls),
    );
    r.large_stable_tls_over_framed_tls = ratio(
        median_of(&r.large_1m, StableTls),
        median_of(&r.large_1m, FramedTls),
    );
    r.small_stable_ws_over_ws_plain =
        ratio(median_of(&r.small, StableWs), median_of(&r.small, WsPlain));
    r.large_stable_ws_over_ws_plain = ratio(
        median_of(&r.large_1m, StableWs),
        median_of(&r.large_1m, WsPlain),
    );
    r.idle_ws_session_bytes = r
        .idle
        .as_ref()
        .and_then(|m| m.get("stable_ws"))
        .map(|i| i.rss_per_session.round());
    let resume_p50 = |key: &str| r.resume.as_ref()?.get(key).map(|f| f.p50_ms);
    r.resume_tls_p50_ms = resume_p50("stable_tls");
    r.resume_tls_no_resumption_p50_ms = resume_p50("stable_tls_no_resumption");
    r.resume_ws_p50_ms = resume_p50("stable_ws");
    r.idle_tls_session_bytes = r
        .idle
        .as_ref()
        .and_then(|m| m.get("stable_tls"))
        .map(|i| i.rss_per_session.round());
    let tcp_resume = r.resume.as_ref().and_then(|m| m.get("stable"));
    r.resume_p50_ms = tcp_resume.map(|f| f.p50_ms);
    r.resume_p99_ms = tcp_resume.map(|f| f.p99_ms);
    let stable_allocs = r.allocs.as_ref().and_then(|m| m.get("stable"));
    r.allocs_per_send = stable_allocs.map(|f| f.per_send);
    r.allocs_per_recv = stable_allocs.map(|f| f.per_recv);
    r.idle_session_bytes = r
        .idle
        .as_ref()
        .and_then(|m| m.get("stable"))
        .map(|i| i.rss_per_session.round());
    let tcp_storm = r.storm.as_ref().and_then(|m| m.get("stable"));
    r.storm_sessions = tcp_storm.map(|s| s.sessions);
    r.storm_resumed = tcp_storm.map(|s| s.resumed);
    r.storm_lost = tcp_storm.map(|s| s.lost);
    r.storm_s = tcp_storm.map(|s| round(s.elapsed_s));
    let tunnel_mbps = |key: &str| r.tunnel.as_ref()?.systems.get(key).map(|f| f.median);
    r.tunnel_over_direct_tcp = ratio(tunnel_mbps("tunnel"), tunnel_mbps("direct_tcp"));
    r.tunnel_over_ssh_l = ratio(tunnel_mbps("tunnel"), tunnel_mbps("ssh_l"));
    r.tunnel_over_relay_chain = ratio(tunnel_mbps("tunnel"), tunnel_mbps("relay_chain"));

    let mut t = Vec::new();
    let mut at_least = |key, label, value: Option<f64>, min: f64| {
        t.push(Target {
            key,
            label,
            value,
            target: format!(">= {min}"),
            met: value.is_some_and(|v| v >= min),
        })
    };
    at_least(
        "small_stable_over_bare",
        "small msgs/s: stable / bare",
        r.small_stable_over_bare,
        0.9,
    );
    at_least(
        "small_bare_over_framed",
        "small msgs/s: bare / Framed",
        r.small_bare_over_framed,
        1.5,
    );
    at_least(
        "large_stable_over_framed",
        "1 MiB MB/s: stable / Framed",
        r.large_stable_over_framed,
        1.0,
    );
    at_least(
        "large_64k_stable_over_framed",
        "64 KiB MB/s: stable / Framed",
        r.large_64k_stable_over_framed,
        0.9,
    );
    at_least(
        "small_stable_tls_over_framed_tls",
        "TLS small msgs/s: stable / Framed",
        r.small_stable_tls_over_framed_tls,
        0.9,
    );
    at_least(
        "large_stable_tls_over_framed_tls",
        "TLS 1 MiB MB/s: stable / Framed",
        r.large_stable_tls_over_framed_tls,
        0.9,
    );
    at_least(
        "small_stable_ws_over_ws_plain",
        "WS small msgs/s: stable / WebSocket",
        r.small_stable_ws_over_ws_plain,
        0.9,
    );
    at_least(
        "large_stable_ws_over_ws_plain",
        "WS 1 MiB MB/s: stable / WebSocket",
        r.large_stable_ws_over_ws_plain,
        0.9,
    );
    at_least(
        "tunnel_over_direct_tcp",
        "tunnel MB/s: tunnel / direct TCP",
        r.tunnel_over_direct_tcp,
        0.8,
    );
    let mut at_most = |key, label, value: Option<f64>, max: f64, strict: bool| {
        t.push(Target {
            key,
            label,
            value,
            target: format!("{} {max}", if strict { "<" } else { "<=" }),
            met: value.is_some_and(|v| if strict { v < max } else { v <= max }),
        })
    };
    at_most(
        "rtt_p50_stable_over_bare",
        "round trip p50: stable / bare",
        r.rtt_p50_stable_over_bare,
        1.1,
        false,
    );
    at_most(
        "rtt_p50_stable_over_bare_one_thread",
        "round trip p50 (1 thread): stable / bare",
        r.rtt_p50_stable_over_bare_one_thread,
        1.1,
        false,
    );
    at_most(
        "resume_p50_ms",
        "resume p50 (TCP), ms",
        r.resume_p50_ms,
        1.0,
        true,
    );
    at_most(
        "resume_tls_p50_ms",
        "resume p50 (TLS), ms",
        r.resume_tls_p50_ms,
        5.0,
        true,
    );
    at_most(
        "allocs_per_send",
        "stable: allocations per send",
        r.allocs_per_send,
        1.0,
        false,
    );
    at_most(
        "allocs_per_recv",
        "stable: allocations per receive",
        r.allocs_per_recv,
        1.0,
        false,
    );
    at_most(
        "idle_session_bytes",
        "resident bytes per idle session",
        r.idle_session_bytes,
        16384.0,
        false,
    );
    let required = if r.quick { r.plan.sessions } else { 10_000 };
    for (key, label, storm) in [
        ("storm_lost", "storm (TCP): all resumed, 0 lost", tcp_storm),
        (
            "storm_mem_lost",
            "storm (mem): all resumed, 0 lost",
            r.storm.as_ref().and_then(|m| m.get("stable_mem")),
        ),
    ] {
        t.push(Target {
            key,
            label,
            value: storm.map(|s| s.lost as f64),
            target: format!("== 0, {required} sessions resumed"),
            met: storm.is_some_and(|s| s.ok && s.sessions >= required && s.resumed == s.sessions),
        });
    }
    r.all_targets_met = t.iter().all(|t| t.met);
    r.targets = Targets(t);
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    if v.abs() >= 1000.0 || (v.fract() == 0.0 && v.abs() < 1e15) {
        let s = format!("{:.0}", v);
        let (sign, digits) = s.split_at(if s.starts_with('-') { 1 } else { 0 });
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The report as a table for people.
pub fn render(r: &BenchReport) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(
        out,
        "tether bench{}: {} CPUs ({}), {:.1} GiB, Linux {}; {} interleaved runs per system, medians",
        if r.quick { " --quick" } else { "" },
        m.cpus,
        m.cpu_model,
        m.mem_total_bytes as f64 / (1u64 << 30) as f64,
        m.kernel,
        r.plan.runs
    );
    let _ = writeln!(out);
    // The systems' table, unless only the tunnel workload ran.
    let per_system = r.small.is_some()
        || r.large_64k.is_some()
        || r.large_1m.is_some()
        || r.rtt.is_some()
        || r.resume.is_some()
        || r.allocs.is_some()
        || r.idle.is_some()
        || r.storm.is_some();
    // The loopback limit's column, last, when a throughput workload
    // measured it; the other workloads have no figure there.
    let limit_column = [&r.small, &r.large_64k, &r.large_1m]
        .into_iter()
        .any(|t| median_by_key(t, limit::KEY).is_some());
    if per_system {
        let _ = write!(out, "{:<34}", "workload");
        for s in System::ALL {
            let _ = write!(out, "{:>14}", s.label());
        }
        if limit_column {
            let _ = write!(out, "{:>16}", limit::LABEL);
        }
        let _ = writeln!(out);
    }
    let row = |out: &mut String, name: String, cells: [Option<f64>; System::ALL.len()]| {
        let _ = write!(out, "{name:<34}");
        for c in cells {
            let _ = write!(out, "{:>14}", c.map_or("-".to_string(), fmt_num));
        }
        if limit_column {
            let _ = write!(out, "{:>16}", "-");
        }
        let _ = writeln!(out);
    };
    // A throughput row: every system, then the limit.
    let throughput_row = |out: &mut String, name: String, t: &Option<Throughput>| {
        let _ = write!(out, "{name:<34}");
        for s in System::ALL {
            let c = median_of(t, s);
            let _ = write!(out, "{:>14}", c.map_or("-".to_string(), fmt_num));
        }
        if limit_column {
            let c = median_by_key(t, limit::KEY);
            let _ = write!(out, "{:>16}", c.map_or("-".to_string(), fmt_num));
        }
        let _ = writeln!(out);
    };
    if r.small.is_some() {
        throughput_row(
            &mut out,
            format!("small 32 B, msgs/s ({})", fmt_count(r.plan.small_messages)),
            &r.small,
        );
    }
    if r.large_64k.is_some() {
        throughput_row(
            &mut out,
            format!("64 KiB, MB/s ({})", fmt_count(r.plan.large_64k_messages)),
            &r.large_64k,
        );
    }
    if r.large_1m.is_some() {
        throughput_row(
            &mut out,
            format!("1 MiB, MB/s ({})", fmt_count(r.plan.large_1m_messages)),
            &r.large_1m,
        );
    }
    if let Some(t) = &r.rtt {
        for (mode, figures) in [("", &t.systems), (", 1 thread", &t.one_thread)] {
            let get = |f: fn(&RttFigure) -> f64| System::ALL.map(|s| figures.get(s.key()).map(f));
            row(
                &mut out,
                format!(
                    "round trip p50, µs{mode} ({})",
                    fmt_count(t.round_trips_per_run as u64)
                ),
                get(|f| f.p50_us.median),
            );
            row(
                &mut out,
                format!("round trip p99, µs{mode}"),
                get(|f| f.p99_us.median),
            );
        }
    }
    if let Some(res) = &r.resume {
        let get = |key_of: fn(System) -> String, f: fn(&ResumeFigure) -> f64| {
            System::ALL.map(|s| res.get(key_of(s).as_str()).map(f))
        };
        let own = |s: System| s.key().to_string();
        let no_resumption = |s: System| format!("{}_no_resumption", s.key());
        let n = res.values().map(|f| f.cuts).max().unwrap_or(0);
        row(
            &mut out,
            format!("resume p50, ms ({n} cuts)"),
            get(own, |f| f.p50_ms),
        );
        row(&mut out, "resume p99, ms".into(), get(own, |f| f.p99_ms));
        if res.keys().any(|k| k.ends_with("_no_resumption")) {
            row(
                &mut out,
                "  without TLS resumption, p50 ms".into(),
                get(no_resumption, |f| f.p50_ms),
            );
        }
    }
    if let Some(a) = &r.allocs {
        let get = |f: fn(&AllocFigure) -> f64| System::ALL.map(|s| a.get(s.key()).map(f));
        row(&mut out, "allocations per send".into(), get(|f| f.per_send));
        row(
            &mut out,
            "allocations per receive".into(),
            get(|f| f.per_recv),
        );
    }
    if let Some(idle) = &r.idle {
        let get = |f: fn(&IdleReport) -> f64| System::ALL.map(|s| idle.get(s.key()).map(f));
        let n = idle.values().map(|i| i.sessions).max().unwrap_or(0);
        row(
            &mut out,
            format!("idle server session, bytes ({})", fmt_count(n as u64)),
            get(|i| i.rss_per_session),
        );
        row(
            &mut out,
            "  before any message, bytes".into(),
            get(|i| i.rss_per_fresh_session),
        );
    }
    if let Some(st) = &r.storm {
        let get = |f: fn(&StormReport) -> f64| System::ALL.map(|s| st.get(s.key()).map(f));
        let n = st.values().map(|s| s.sessions).max().unwrap_or(0);
        row(
            &mut out,
            format!("storm: s until all resumed ({})", fmt_count(n as u64)),
            get(|s| s.elapsed_s),
        );
        row(
            &mut out,
            "storm: sessions resumed".into(),
            get(|s| s.resumed as f64),
        );
        row(
            &mut out,
            "storm: messages lost".into(),
            get(|s| s.lost as f64),
        );
    }
    if let Some(t) = &r.tunnel {
        if per_system {
            let _ = writeln!(out);
        }
        let _ = writeln!(
            out,
            "tunnel: one {} stream to a sink, MB/s",
            fmt_bytes(t.bytes_per_run)
        );
        for way in tunnel::Way::ALL {
            let cell = match (t.systems.get(way.key()), &t.ssh_l_not_run) {
                (Some(f), _) => fmt_num(f.median),
                (None, Some(why)) if way == tunnel::Way::Ssh => format!("not run ({why})"),
                (None, _) => "-".to_string(),
            };
            // The two plain ways are the physical limits the tunnel is read
            // against: one loopback hop, and the tunnel's three.
            let note = match way {
                tunnel::Way::Direct => "   physical limit, one hop",
                tunnel::Way::Relay => "   physical limit, three hops",
                tunnel::Way::Tunnel | tunnel::Way::Ssh => "",
            };
            let _ = writeln!(out, "  {:<32}{cell:>14}{note}", way.label());
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "ratios and targets (same run)");
    for t in &r.targets.0 {
        let _ = writeln!(
            out,
            "  {} {:<38}{:>12}   target {:<30}",
            if t.met { "✓" } else { "✗" },
            t.label,
            t.value.map_or("not run".to_string(), fmt_num),
            t.target
        );
    }
    let extra = [
        ("small msgs/s: stable / Framed", r.small_stable_over_framed),
        (
            "small msgs/s: stable mem / stable TCP",
            r.small_stable_mem_over_stable,
        ),
        (
            "64 KiB MB/s: stable / Framed",
            r.large_64k_stable_over_framed,
        ),
        (
            "small msgs/s: stable / loopback limit",
            r.small_stable_over_loopback_limit,
        ),
        (
            "64 KiB MB/s: stable / loopback limit",
            r.large_64k_stable_over_loopback_limit,
        ),
        (
            "1 MiB MB/s: stable / loopback limit",
            r.large_stable_over_loopback_limit,
        ),
        ("round trip p50: bare / Framed", r.rtt_p50_bare_over_framed),
        ("round trip p99: stable / bare", r.rtt_p99_stable_over_bare),
        (
            "round trip p99 (1 thread): stable / bare",
            r.rtt_p99_stable_over_bare_one_thread,
        ),
        (
            "resume p50 (TLS, no resumption), ms",
            r.resume_tls_no_resumption_p50_ms,
        ),
        (
            "resident bytes per idle TLS session",
            r.idle_tls_session_bytes,
        ),
        ("resume p50 (WS), ms", r.resume_ws_p50_ms),
        ("tunnel MB/s: tunnel / ssh -L", r.tunnel_over_ssh_l),
        (
            "tunnel MB/s: tunnel / relay chain",
            r.tunnel_over_relay_chain,
        ),
        (
            "resident bytes per idle WS session",
            r.idle_ws_session_bytes,
        ),
    ];
    for (label, v) in extra {
        if let Some(v) = v {
            let _ = writeln!(out, "    {label:<38}{:>12}", fmt_num(v));
        }
    }
    if r.quick {
        let _ = writeln!(
            out,
            "  (--quick: {} sessions for the idle and storm workloads, fewer messages)",
            r.plan.sessions
        );
    }
    for e in &r.errors {
        let _ = writeln!(out, "ERROR {e}");
    }
    let _ = writeln!(
        out,
        "{} in {:.1} s",
        if r.ok { "done" } else { "FAILED" },
        r.elapsed_s
    );
    out
}

fn fmt_bytes(n: u64) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} B")
    }
}

fn fmt_count(n: u64) -> String {
    if n >= 1_000_000 && n % 1_000_000 == 0 {
        format!("{}M", n / 1_000_000)
    } else if n >= 1000 && n % 1000 == 0 {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_run_without_sshd_says_so() {
        let mut r = run(
            &BenchOptions {
                only: vec!["storm".into()],
                systems: vec!["framed".into()],
                ..BenchOptions::default()
            },
            None,
        )
        .unwrap();
        r.tunnel = Some(TunnelBench {
            bytes_per_run: 64 << 20,
            unit: "MB/s",
            systems: [("direct_tcp", 1000.0), ("tunnel", 900.0)]
                .into_iter()
                .map(|(k, v)| {
                    let mut f = Figure::default();
                    f.push(v);
                    (k, f)
                })
                .collect(),
            ssh_l_not_run: Some("no sshd".into()),
        });
        headline(&mut r);
        let text = render(&r);
        assert!(text.contains("one 64 MiB stream"), "{text}");
        assert!(text.contains("not run (no sshd)"), "{text}");
        assert!(text.contains("physical limit, one hop"), "{text}");
        assert_eq!(r.tunnel_over_direct_tcp, Some(0.9));
        assert_eq!(r.tunnel_over_ssh_l, None);
        let met = r
            .targets
            .0
            .iter()
            .find(|t| t.key == "tunnel_over_direct_tcp")
            .map(|t| t.met);
        assert_eq!(met, Some(true));
    }

    /// A report with nothing measured, cheap to make: the storm workload
    /// with a system that takes no part in it.
    fn empty_report() -> BenchReport {
        run(
            &BenchOptions {
                only: vec!["storm".into()],
                systems: vec!["framed".into()],
                ..BenchOptions::default()
            },
            None,
        )
        .unwrap()
    }

    fn throughput_of(
        size: usize,
        unit: &'static str,
        medians: &[(&'static str, f64)],
    ) -> Throughput {
        Throughput {
            payload_bytes: size,
            encoded_bytes: limit::encoded_len(size).unwrap(),
            messages_per_run: 1000,
            unit,
            systems: medians
                .iter()
                .map(|&(k, v)| {
                    let mut f = Figure::default();
                    f.push(v);
                    (k, f)
                })
                .collect(),
        }
    }

    #[test]
    fn stable_is_read_as_a_fraction_of_the_loopback_limit() {
        let mut r = empty_report();
        r.small = Some(throughput_of(
            SMALL,
            "msgs/s",
            &[("framed", 6e6), ("stable", 5e6), ("loopback_limit", 40e6)],
        ));
        r.large_64k = Some(throughput_of(
            64 * 1024,
            "MB/s",
            &[("stable", 2000.0), ("loopback_limit", 8000.0)],
        ));
        // 1 MiB ran without the limit (`--systems` without it).
        r.large_1m = Some(throughput_of(1 << 20, "MB/s", &[("stable", 1800.0)]));
        headline(&mut r);
        assert_eq!(r.small_stable_over_loopback_limit, Some(0.125));
        assert_eq!(r.large_64k_stable_over_loopback_limit, Some(0.25));
        assert_eq!(r.large_stable_over_loopback_limit, None);
        // Informational: no target.
        assert!(!r.targets.0.iter().any(|t| t.key.contains("loopback")));

        let text = render(&r);
        let header = text.lines().find(|l| l.starts_with("workload")).unwrap();
        assert!(header.trim_end().ends_with("loopback limit"), "{text}");
        let small = text.lines().find(|l| l.starts_with("small 32 B")).unwrap();
        assert!(small.trim_end().ends_with("40,000,000"), "{text}");
        let large = text.lines().find(|l| l.starts_with("1 MiB")).unwrap();
        assert!(large.trim_end().ends_with('-'), "{text}");
        assert!(
            text.contains("small msgs/s: stable / loopback limit"),
            "{text}"
        );
        assert!(
            text.contains("64 KiB MB/s: stable / loopback limit"),
            "{text}"
        );
        assert!(
            !text.contains("1 MiB MB/s: stable / loopback limit"),
            "{text}"
        );

        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["small_stable_over_loopback_limit"], 0.125);
        assert_eq!(json["large_64k_stable_over_loopback_limit"], 0.25);
        assert!(json["large_stable_over_loopback_limit"].is_null());
        assert_eq!(json["small"]["systems"]["loopback_limit"]["median"], 40e6);
        // A 32-byte payload is 33 bytes encoded (one length byte).
        assert_eq!(json["small"]["encoded_bytes"], 33);
    }

    #[test]
    fn no_limit_column_without_a_throughput_workload() {
        let text = render(&empty_report());
        assert!(!text.contains("loopback limit"), "{text}");
    }

    #[test]
    fn naming_systems_leaves_the_loopback_limit_out_unless_named() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (list, with_limit) = selection(&[]).unwrap();
        assert_eq!(list, System::ALL.to_vec());
        assert!(with_limit);
        let (list, with_limit) = selection(&names(&["stable"])).unwrap();
        assert_eq!(list, vec![System::Stable]);
        assert!(!with_limit);
        let (list, with_limit) = selection(&names(&["loopback_limit", "framed"])).unwrap();
        assert_eq!(list, vec![System::Framed]);
        assert!(with_limit);
        let e = selection(&names(&["nope"])).unwrap_err().to_string();
        assert!(
            e.contains("stable_ws") && e.contains("loopback_limit"),
            "{e}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_loopback_limit_moves_exactly_the_bytes_asked() {
        // Not a multiple of the write size, so the last write is short.
        limit::push(3 * limit::WRITE_SIZE as u64 + 5).await.unwrap();
        limit::push(1).await.unwrap();
    }
}
