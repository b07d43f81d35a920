//! The `tether` command: a demo of stable conduits under injected faults, an
//! echo server, and benchmarks.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use clap::{Parser, Subcommand};
use tether_cli::bench::{self, AllocCounter, AllocCounts, BenchOptions, Role, SLOTS};
use tether_cli::demo::{self, DemoOptions};

/// The system allocator, counting calls and bytes for `tether bench` while
/// counting is enabled. Disabled, it costs one relaxed load per call.
struct CountingAlloc {
    enabled: AtomicBool,
    slots: [Slot; SLOTS],
}

/// One slot's counters, on its own cache lines so that threads counting into
/// different slots do not contend.
#[repr(align(128))]
struct Slot {
    allocs: AtomicU64,
    reallocs: AtomicU64,
    frees: AtomicU64,
    bytes_allocated: AtomicU64,
    bytes_freed: AtomicU64,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            allocs: AtomicU64::new(0),
            reallocs: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            bytes_allocated: AtomicU64::new(0),
            bytes_freed: AtomicU64::new(0),
        }
    }
}

thread_local! {
    /// The slot this thread counts into (no destructor, so it is usable from
    /// the allocator at any point of a thread's life).
    static THREAD_SLOT: Cell<usize> = const { Cell::new(0) };
}

impl CountingAlloc {
    #[inline]
    fn slot(&self) -> Option<&Slot> {
        if !self.enabled.load(Relaxed) {
            return None;
        }
        let i = THREAD_SLOT.try_with(Cell::get).unwrap_or(0);
        self.slots.get(i)
    }
}

// SAFETY: every call is forwarded unchanged to `System`; the counting only
// touches atomics and a const-initialized thread-local, never the heap.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        if let (false, Some(s)) = (p.is_null(), self.slot()) {
            s.allocs.fetch_add(1, Relaxed);
            s.bytes_allocated.fetch_add(layout.size() as u64, Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(layout) };
        if let (false, Some(s)) = (p.is_null(), self.slot()) {
            s.allocs.fetch_add(1, Relaxed);
            s.bytes_allocated.fetch_add(layout.size() as u64, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) };
        if let Some(s) = self.slot() {
            s.frees.fetch_add(1, Relaxed);
            s.bytes_freed.fetch_add(layout.size() as u64, Relaxed);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if let (false, Some(s)) = (p.is_null(), self.slot()) {
            s.reallocs.fetch_add(1, Relaxed);
            s.bytes_allocated.fetch_add(new_size as u64, Relaxed);
            s.bytes_freed.fetch_add(layout.size() as u64, Relaxed);
        }
        p
    }
}

impl AllocCounter for CountingAlloc {
    fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Relaxed);
    }

    fn tag_thread(&self, slot: usize) {
        THREAD_SLOT.with(|s| s.set(slot.min(SLOTS - 1)));
    }

    fn counts(&self, slot: usize) -> AllocCounts {
        let s = &self.slots[slot.min(SLOTS - 1)];
        AllocCounts {
            allocs: s.allocs.load(Relaxed),
            reallocs: s.reallocs.load(Relaxed),
            frees: s.frees.load(Relaxed),
            bytes_allocated: s.bytes_allocated.load(Relaxed),
            bytes_freed: s.bytes_freed.load(Relaxed),
        }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc {
    enabled: AtomicBool::new(false),
    slots: [const { Slot::new() }; SLOTS],
};

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Stable conduits that survive link failures"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream messages through a proxy that cuts the connection at random,
    /// and check that every one comes back exactly once, in order.
    Demo {
        /// Messages to send (each is echoed back). Default: 1,000,000, or
        /// as many as make 256 MiB when messages are larger than 268 bytes
        /// (32 of 8 MiB).
        #[arg(long)]
        messages: Option<u64>,
        /// Payload size in bytes (at least 8).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Mean bytes forwarded between two cuts (both directions); 0: no cuts.
        #[arg(long, default_value_t = 256 * 1024)]
        cut_every: u64,
        /// Probability that a new connection is cut inside its handshake.
        #[arg(long, default_value_t = 0.1)]
        handshake_cuts: f64,
        /// Seed of the fault schedule and the payloads (default: random).
        #[arg(long)]
        seed: Option<u64>,
        /// Run only the client, against this `tether echo` (or compatible)
        /// server; the cutting proxy sits in front of it.
        #[arg(long)]
        server: Option<SocketAddr>,
        /// Give up if no echo arrives for this many seconds.
        #[arg(long, default_value_t = 30)]
        stall_timeout: u64,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Stream from client to server only; the server checks. Shows the
        /// replay buffer staying under its bound.
        #[arg(long)]
        one_way: bool,
    },
    /// Run a stable-conduit echo server over TCP (messages: byte strings).
    Echo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:4000")]
        listen: SocketAddr,
    },
    /// Benchmark tether against tokio-util's Framed: throughput, round
    /// trips, resume latency, allocations, idle-session memory and a
    /// reconnect storm, side by side, with targets. See BENCHMARKS.md.
    Bench {
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Smaller counts and 1,000 sessions: under a minute on 2 cores.
        #[arg(long)]
        quick: bool,
        /// Run only these workloads (comma-separated): small, large, rtt,
        /// resume, allocs, idle, storm.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Compare only these systems (comma-separated): framed, bare,
        /// stable, stable_mem.
        #[arg(long, value_delimiter = ',')]
        systems: Vec<String>,
        /// Sessions of the idle-memory and storm workloads (default 10,000;
        /// 1,000 with --quick).
        #[arg(long)]
        sessions: Option<usize>,
        /// Exit with a failure status when a target is missed (a failed
        /// delivery check or workload always fails the run).
        #[arg(long)]
        fail_on_miss: bool,
        /// Internal: run as a child process of the benchmark.
        #[arg(long, hide = true)]
        role: Option<String>,
        /// Internal: the server a `--role clients` child connects to.
        #[arg(long, hide = true)]
        addr: Option<SocketAddr>,
    },
}

/// `tether bench`, which builds its own runtimes.
fn bench_main(
    json: bool,
    opts: BenchOptions,
    fail_on_miss: bool,
    role: Option<String>,
    addr: Option<SocketAddr>,
) -> anyhow::Result<bool> {
    if let Some(role) = role {
        let sessions = opts.sessions.unwrap_or(1);
        let role = match (role.as_str(), addr) {
            ("clients", Some(addr)) => Role::Clients { addr, sessions },
            ("idle-server", _) => Role::IdleServer { sessions },
            _ => anyhow::bail!("unknown bench role {role:?}"),
        };
        bench::run_role(role, Some(&ALLOC))?;
        return Ok(true);
    }
    let report = bench::run(&opts, Some(&ALLOC))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", bench::render(&report));
    }
    Ok(report.ok() && (!fail_on_miss || report.all_targets_met()))
}

/// A seed from the operating system's random source.
fn random_seed() -> u64 {
    use rand::{rngs::SmallRng, RngCore, SeedableRng};
    SmallRng::from_os_rng().next_u64()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::Bench {
        json,
        quick,
        only,
        systems,
        sessions,
        fail_on_miss,
        role,
        addr,
    } = cli.command
    {
        let opts = BenchOptions {
            quick,
            only,
            systems,
            sessions,
            progress: role.is_none(),
        };
        return match bench_main(json, opts, fail_on_miss, role, addr) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("tether bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tether: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Demo {
                messages,
                size,
                cut_every,
                handshake_cuts,
                seed,
                server,
                stall_timeout,
                json,
                one_way,
            } => {
                let opts = DemoOptions {
                    messages: messages.unwrap_or_else(|| tether_cli::demo::default_messages(size)),
                    size: size.max(8),
                    cut_every,
                    handshake_cuts,
                    seed: seed.unwrap_or_else(random_seed),
                    server,
                    stall_timeout: Duration::from_secs(stall_timeout),
                    progress: !json,
                    one_way,
                };
                if !json {
                    eprintln!(
                        "tether demo: {} messages of {} bytes {} through a proxy cutting every ~{} bytes (seed {})",
                        opts.messages,
                        opts.size,
                        if one_way { "streamed one way" } else { "echoed" },
                        opts.cut_every,
                        opts.seed
                    );
                }
                let report = demo::run(opts.clone()).await?;
                if json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    print!("{}", demo::render(&report, &opts));
                }
                Ok::<bool, anyhow::Error>(report.ok)
            }
            Command::Echo { listen } => {
                tether_cli::echo::run(listen, tether::Config::default()).await?;
                Ok(true)
            }
            Command::Bench { .. } => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tether: {e:#}");
            ExitCode::FAILURE
        }
    }
}
