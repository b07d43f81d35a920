//! The `tether` command: a demo of stable conduits under injected faults, an
//! echo server, and benchmarks.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use clap::{Parser, Subcommand};
use tether_cli::bench::{self, AllocCounter, AllocCounts, BenchOptions, Role, SLOTS};
use tether_cli::demo::{self, DemoOptions};
use tether_cli::echo::{Listen, TlsFiles};
use tether_cli::transport::{Transport, WsBind};

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
enum TunnelCommand {
    /// Accept tunnel clients and connect each stream they open to a
    /// target. Ctrl-C (or SIGTERM) closes the sessions; SIGUSR1 prints the
    /// sessions held.
    Serve {
        /// Where clients connect.
        #[arg(long, default_value = "127.0.0.1:4100")]
        listen: SocketAddr,
        /// A target: HOST:PORT (the default one), or NAME=HOST:PORT for
        /// clients that ask for NAME (`connect --to NAME`). Repeatable.
        #[arg(long, required = true, value_parser = tether_cli::tunnel::parse_forward)]
        forward: Vec<(String, String)>,
        /// Serve TLS with this certificate chain (PEM); needs --tls-key.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Require client certificates signed by this CA (PEM).
        #[arg(long, requires = "tls_cert")]
        client_ca: Option<PathBuf>,
        /// Admit only clients presenting one of the tokens in this file
        /// (one per line; `#` comments). Send them over TLS.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// How long a session whose client is away is kept, with its
        /// target connections open: 500ms, 30s, 10m, 12h, 3d.
        #[arg(long, default_value = "12h", value_parser = parse_duration)]
        resume_window: Duration,
    },
    /// Connect to a tunnel server and carry stdin/stdout (--stdio) or
    /// every connection to a local port (--local) to its target.
    Connect {
        /// The server: HOST:PORT, tcp://HOST:PORT or tls://HOST:PORT.
        server: String,
        /// Join stdin and stdout to one stream (an ssh ProxyCommand).
        #[arg(long, conflicts_with = "local", required_unless_present = "local")]
        stdio: bool,
        /// Listen on this address and carry each connection to the target.
        #[arg(long, value_name = "ADDR")]
        local: Option<SocketAddr>,
        /// The server's target name (default: its default target).
        #[arg(long, default_value = "")]
        to: String,
        /// With tls://: trust the CA certificates in this PEM file instead
        /// of Mozilla's roots.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// Present the token in this file (its first line); or set
        /// TETHER_TUNNEL_TOKEN.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Report events as JSON objects, one per line, on stderr.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Stream messages through a proxy that cuts the connection at random,
    /// and check that every one comes back exactly once, in order. Runs
    /// over TCP, Unix sockets, TLS, WebSocket or secure WebSocket: under TLS
    /// and WebSocket the proxy cuts the TCP connection. The report says in
    /// words how often the connection was killed, what the application saw
    /// of it, and what tether resent to hide it.
    Demo {
        /// Messages to send (each is echoed back). Default: 1,000,000, or
        /// as many as make 256 MiB when messages are larger than 268 bytes.
        /// Any count runs in constant memory (Ctrl-C stops a long run with
        /// a partial report).
        #[arg(long)]
        messages: Option<u64>,
        /// Payload size in bytes: at least 8 (each message starts with its
        /// index), at most 8,388,593 (a message must fit the 8 MiB limit).
        #[arg(long, default_value_t = 64, value_parser = demo::parse_size)]
        size: usize,
        /// Mean bytes forwarded between two cuts (both directions); 0 turns
        /// cuts off.
        #[arg(long, default_value_t = 256 * 1024)]
        cut_every: u64,
        /// Probability, from 0 up to (not including) 1, that a new
        /// connection is cut inside its handshake.
        #[arg(
            long,
            default_value_t = 0.1,
            allow_negative_numbers = true,
            value_parser = demo::parse_handshake_cuts
        )]
        handshake_cuts: f64,
        /// Seed of the fault schedule and the payloads (default: random).
        #[arg(long)]
        seed: Option<u64>,
        /// The transport: tcp, unix, tls, ws or wss (default: tcp, or the
        /// scheme of --server). For tls and wss the in-process server
        /// presents a certificate for `localhost` from a CA made at run time,
        /// which the client trusts and checks the name against.
        #[arg(long, value_enum)]
        transport: Option<Transport>,
        /// Run only the client, against this `tether echo` (or compatible)
        /// server; the cutting proxy (or, for unix, relay) sits in front of
        /// it. A URL: tcp://HOST:PORT, tls://HOST:PORT,
        /// ws://HOST[:PORT][/PATH], wss://HOST[:PORT][/PATH], unix:PATH; or
        /// HOST:PORT over --transport. HOST may be a name (localhost:4000),
        /// resolved at start.
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        /// With --server over tls or wss: trust the CA certificates in this
        /// PEM file instead of Mozilla's roots. The name checked is the
        /// server's host.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// Give up if no echo arrives for this many seconds (at least 1).
        #[arg(
            long,
            default_value_t = 30,
            allow_negative_numbers = true,
            value_parser = demo::parse_stall_timeout
        )]
        stall_timeout: u64,
        /// Print one JSON object instead of text, also when the demo fails
        /// (then `ok` is false and `error` says why).
        #[arg(long)]
        json: bool,
        /// Stream from client to server only; the server checks. Shows the
        /// memory kept for resending (the replay buffer) staying under its
        /// limit.
        #[arg(long)]
        one_way: bool,
    },
    /// Run a stable-conduit echo server (messages: byte strings) over TCP,
    /// TLS, WebSocket, secure WebSocket and Unix sockets, several at once,
    /// all sharing one session table. Ctrl-C (or SIGTERM) closes every
    /// session gracefully, then exits. With RUST_LOG=info it logs each
    /// session's start and end, with the peer's address. With --metrics
    /// ADDR it serves Prometheus metrics at http://ADDR/metrics.
    Echo(Box<EchoArgs>),
    /// A port forward, or an ssh ProxyCommand, that survives the network:
    /// `tether tunnel serve` on the server's side, `tether tunnel connect`
    /// on the client's. Streams are multiplexed over one stable session,
    /// which survives cuts, sleep and network changes for the server's
    /// resume window; the server keeps its target connections open
    /// meanwhile.
    ///
    /// ssh through it: `ssh -o ProxyCommand='tether tunnel connect
    /// SERVER:PORT --stdio' HOST`
    Tunnel {
        #[command(subcommand)]
        command: TunnelCommand,
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
        /// resume, allocs, idle, storm, tunnel.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Compare only these systems (comma-separated): framed, bare,
        /// stable, stable_mem, framed_tls, stable_tls, ws_plain, stable_ws,
        /// and loopback_limit (plain TCP with no framing, beside the
        /// throughput workloads).
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
        /// Internal: over TLS (`--role clients`: the CA file to trust;
        /// `--role idle-server`: any value).
        #[arg(long, hide = true)]
        tls_ca: Option<PathBuf>,
    },
}

/// `tether echo`'s flags: what to listen on, and every server limit.
/// Each listener flag may be repeated, and any mix given at once; with none,
/// plain TCP on 127.0.0.1:4000. Sizes take a K, M or G suffix (KiB, MiB,
/// GiB); durations `500ms`, `10s`, `2m` or plain seconds. Unset flags keep
/// the library's defaults.
#[derive(clap::Args)]
struct EchoArgs {
    /// Serve plain TCP on this address (default 127.0.0.1:4000 when no
    /// listener flag is given).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Serve TLS on this address (needs --tls-cert and --tls-key).
    #[arg(long, value_name = "ADDR", requires = "tls_cert")]
    tls: Vec<SocketAddr>,
    /// Serve WebSocket (ws://) on this address, upgrading requests for PATH
    /// only (default /): 127.0.0.1:8080/tether.
    #[arg(long, value_name = "ADDR[/PATH]", value_parser = parse_ws)]
    ws: Vec<WsBind>,
    /// Serve secure WebSocket (wss://) on this address and path, with the
    /// certificate of --tls-cert: 127.0.0.1:8443/tether.
    #[arg(long, value_name = "ADDR[/PATH]", value_parser = parse_wss, requires = "tls_cert")]
    wss: Vec<WsBind>,
    /// Serve on a Unix-domain socket at this path (removed on exit).
    #[arg(long, value_name = "PATH")]
    unix: Vec<PathBuf>,
    /// The server's certificate chain for --tls and --wss (PEM, its own
    /// certificate first).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: clients of --tls and --wss must present a certificate
    /// signed by a CA in this PEM file.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Listen backlog (connections the kernel queues before accept).
    #[arg(long, default_value_t = tether::link::DEFAULT_BACKLOG)]
    backlog: u32,
    /// Most sessions at once.
    #[arg(long)]
    max_sessions: Option<usize>,
    /// Most sessions per source address (IPv4, or IPv6 /64).
    #[arg(long)]
    max_sessions_per_source: Option<usize>,
    /// Most links in their handshake at once.
    #[arg(long)]
    max_pending: Option<usize>,
    /// Most links in their handshake per source address.
    #[arg(long)]
    max_pending_per_source: Option<usize>,
    /// Budget for all sessions' buffers together.
    #[arg(long, value_parser = parse_size)]
    memory_budget: Option<usize>,
    /// Time a new link gets to send its hello (and a new session to prove
    /// its key).
    #[arg(long, value_parser = parse_duration)]
    handshake_timeout: Option<Duration>,
    /// How long a session whose link was lost waits for a resume.
    #[arg(long, value_parser = parse_duration)]
    resume_window: Option<Duration>,
    /// Keepalive ping interval.
    #[arg(long, value_parser = parse_duration)]
    keepalive_interval: Option<Duration>,
    /// A link without a pong for this long is dead.
    #[arg(long, value_parser = parse_duration)]
    keepalive_timeout: Option<Duration>,
    /// A link without keepalive on which nothing arrives for this long is
    /// dropped.
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// Refuse clients that do not speak keepalive (and standalone acks).
    #[arg(long)]
    require_keepalive: bool,
    /// Largest message accepted.
    #[arg(long, value_parser = parse_size)]
    max_message_size: Option<usize>,
    /// Replay-buffer bound per session (bytes).
    #[arg(long, value_parser = parse_size)]
    max_replay_bytes: Option<usize>,
    /// Receive-queue bound per session (bytes).
    #[arg(long, value_parser = parse_size)]
    max_recv_queue_bytes: Option<usize>,
    /// How long a graceful close may take.
    #[arg(long, value_parser = parse_duration)]
    close_timeout: Option<Duration>,
    /// How long Ctrl-C waits for sessions to close before exiting.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    shutdown_timeout: Duration,
    /// Serve the server's metrics (sessions, resumes, refusals, replayed
    /// bytes, buffers, round-trip times; see docs/METRICS.md) in the
    /// Prometheus text format at http://ADDR/metrics, fresh on every
    /// scrape. Port 0 picks a free port; the URL is announced on stderr.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

impl EchoArgs {
    fn options(&self) -> tether_cli::echo::EchoOptions {
        let mut c = tether::Config::default();
        if let Some(n) = self.max_sessions {
            c = c.max_sessions(n);
        }
        if let Some(n) = self.max_sessions_per_source {
            c = c.max_sessions_per_source(n);
        }
        if let Some(n) = self.max_pending {
            c = c.max_pending_handshakes(n);
        }
        if let Some(n) = self.max_pending_per_source {
            c = c.max_pending_per_source(n);
        }
        if let Some(n) = self.memory_budget {
            c = c.memory_budget(n);
        }
        if let Some(t) = self.handshake_timeout {
            c = c.handshake_timeout(t);
        }
        if let Some(t) = self.resume_window {
            c = c.resume_window(t);
        }
        // Timeout after interval: it is raised to the interval if shorter.
        if let Some(t) = self.keepalive_interval {
            c = c.keepalive_interval(t);
        }
        if let Some(t) = self.keepalive_timeout {
            c = c.keepalive_timeout(t);
        }
        if let Some(t) = self.idle_timeout {
            c = c.idle_timeout(t);
        }
        if self.require_keepalive {
            c = c.require_extensions(tether::proto::ext::KEEPALIVE | tether::proto::ext::ACKS);
        }
        if let Some(n) = self.max_message_size {
            c = c.max_message_size(n);
        }
        if let Some(n) = self.max_replay_bytes {
            c = c.max_replay_bytes(n);
        }
        if let Some(n) = self.max_recv_queue_bytes {
            c = c.max_recv_queue_bytes(n);
        }
        if let Some(t) = self.close_timeout {
            c = c.close_timeout(t);
        }
        let mut listen: Vec<Listen> = self.listen.iter().copied().map(Listen::Tcp).collect();
        listen.extend(self.tls.iter().copied().map(Listen::Tls));
        listen.extend(self.ws.iter().cloned().map(Listen::Ws));
        listen.extend(self.wss.iter().cloned().map(Listen::Wss));
        listen.extend(self.unix.iter().cloned().map(Listen::Unix));
        if listen.is_empty() {
            listen.push(Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 4000))));
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.client_ca.clone(),
            }),
            _ => None,
        };
        tether_cli::echo::EchoOptions {
            listen,
            tls,
            backlog: self.backlog,
            config: c,
            shutdown_timeout: self.shutdown_timeout,
            metrics: self.metrics,
        }
    }
}

/// `--ws`: `ADDR[/PATH]`, `ws://` allowed in front.
fn parse_ws(s: &str) -> Result<WsBind, String> {
    WsBind::parse(s, "ws")
}

/// `--wss`: `ADDR[/PATH]`, `wss://` allowed in front.
fn parse_wss(s: &str) -> Result<WsBind, String> {
    WsBind::parse(s, "wss")
}

/// `64K`, `8M`, `1G` (powers of 1024) or plain bytes.
fn parse_size(s: &str) -> Result<usize, String> {
    let (digits, unit) = match s.trim().char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.trim().split_at(i),
        None => (s.trim(), ""),
    };
    let n: usize = digits.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let shift = match unit
        .trim_end_matches(['i', 'B', 'b'])
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("unknown size unit in {s:?} (use K, M or G)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

/// `500ms`, `10s`, `2m` or plain (possibly fractional) seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else if let Some(n) = s.strip_suffix('d') {
        (n, 86400.0)
    } else {
        (s, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (use 500ms, 10s, 2m, 12h, 3d)"))?;
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("bad duration {s:?}: {e}"))
}

/// `tether tunnel serve|connect`.
async fn tunnel_main(command: TunnelCommand) -> anyhow::Result<bool> {
    use tether_cli::tunnel::{connect, serve, ConnectOptions, Local, ServeOptions};
    match command {
        TunnelCommand::Serve {
            listen,
            forward,
            tls_cert,
            tls_key,
            client_ca,
            token_file,
            resume_window,
        } => {
            let tls = tls_cert.zip(tls_key).map(|(c, k)| (c, k, client_ca));
            serve(ServeOptions {
                listen,
                forwards: forward,
                tls,
                token_file,
                resume_window,
            })
            .await?;
            Ok(true)
        }
        TunnelCommand::Connect {
            server,
            stdio,
            local,
            to,
            ca,
            token_file,
            json,
        } => {
            let token = match token_file {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_owned(),
                ),
                None => std::env::var("TETHER_TUNNEL_TOKEN").ok(),
            };
            let local = match (stdio, local) {
                (_, Some(addr)) => Local::Listen(addr),
                _ => Local::Stdio,
            };
            let ok = connect(ConnectOptions {
                server,
                ca,
                token,
                to,
                local,
                json,
            })
            .await?;
            if stdio {
                // Tokio reads stdin on a blocking thread that a runtime
                // shutdown would wait for: leave at once.
                std::process::exit(if ok { 0 } else { 1 });
            }
            Ok(ok)
        }
    }
}

/// `tether bench`, which builds its own runtimes.
fn bench_main(
    json: bool,
    opts: BenchOptions,
    fail_on_miss: bool,
    role: Option<String>,
    addr: Option<SocketAddr>,
    tls_ca: Option<PathBuf>,
) -> anyhow::Result<bool> {
    if let Some(role) = role {
        let sessions = opts.sessions.unwrap_or(1);
        let role = match (role.as_str(), addr) {
            ("clients" | "clients-ws", Some(addr)) => Role::Clients {
                addr,
                sessions,
                tls_ca,
                ws: role == "clients-ws",
            },
            ("idle-server", _) => Role::IdleServer {
                sessions,
                over: if tls_ca.is_some() {
                    bench::IdleOver::Tls
                } else {
                    bench::IdleOver::Tcp
                },
            },
            ("idle-server-ws", _) => Role::IdleServer {
                sessions,
                over: bench::IdleOver::Ws,
            },
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

/// glibc's malloc returns freed memory at the top of a heap to the system
/// once more than 128 KiB is free there, and serves blocks of 128 KiB and
/// up by `mmap`, each freshly faulted in. A stable conduit carrying large
/// messages keeps megabytes in flight (replay buffer, receive queue), freed
/// long after and on another thread, so with those defaults nearly every
/// byte it carries lands on pages the kernel must fault in and zero first:
/// 64 KiB messages ran at a third of their speed (see BENCHMARKS.md). Keep
/// up to 32 MiB free at the top of a heap, and allocate up to 16 MiB (two
/// largest messages) from the heap, unless `GLIBC_TUNABLES` already sets
/// malloc's parameters. The library cannot do this for its users; the
/// binary can for itself.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    let set_by_user = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."));
    if set_by_user {
        return;
    }
    // SAFETY: mallopt only sets malloc's parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    // Log lines go to stderr from a thread of their own: a runtime thread
    // never blocks on a slow terminal or pipe, and when the writer falls
    // behind, lines are dropped (and counted) rather than queued without
    // bound.
    let (writer, _log_guard) = tracing_appender::non_blocking(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `demo --json` answers in JSON even when an argument is wrong.
            let args: Vec<String> = std::env::args().skip(1).collect();
            if e.use_stderr()
                && args.first().map(String::as_str) == Some("demo")
                && args.iter().any(|a| a == "--json")
            {
                let why = e.kind().as_str().unwrap_or("invalid arguments");
                let detail = e.render().to_string();
                let first = detail.lines().next().unwrap_or(why);
                let first = first.strip_prefix("error: ").unwrap_or(first);
                println!("{}", demo::failure_json(first));
            }
            e.exit();
        }
    };
    if let Command::Bench {
        json,
        quick,
        only,
        systems,
        sessions,
        fail_on_miss,
        role,
        addr,
        tls_ca,
    } = cli.command
    {
        let opts = BenchOptions {
            quick,
            only,
            systems,
            sessions,
            progress: role.is_none(),
        };
        return match bench_main(json, opts, fail_on_miss, role, addr, tls_ca) {
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
    let demo_json = matches!(cli.command, Command::Demo { json: true, .. });
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Demo {
                messages,
                size,
                cut_every,
                handshake_cuts,
                seed,
                transport,
                server,
                ca,
                stall_timeout,
                json,
                one_way,
            } => {
                let transport = demo::transport_of(transport, server.as_deref())?;
                let opts = DemoOptions {
                    messages: messages.unwrap_or_else(|| tether_cli::demo::default_messages(size)),
                    size,
                    cut_every,
                    handshake_cuts,
                    seed: seed.unwrap_or_else(random_seed),
                    transport,
                    server,
                    ca,
                    stall_timeout: Duration::from_secs(stall_timeout),
                    // A line redrawn in place on a terminal; nothing in a
                    // pipe or a file, where it would only be noise.
                    progress: !json && std::io::stderr().is_terminal(),
                    one_way,
                };
                if !json {
                    eprintln!("{}", demo::banner(&opts));
                }
                let report = demo::run(opts.clone()).await?;
                if json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    print!("{}", demo::render(&report, &opts));
                }
                Ok::<bool, anyhow::Error>(report.ok)
            }
            Command::Echo(args) => {
                tether_cli::echo::run(args.options()).await?;
                Ok(true)
            }
            Command::Tunnel { command } => tunnel_main(command).await,
            Command::Bench { .. } => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            if demo_json {
                println!("{}", demo::failure_json(&format!("{e:#}")));
            }
            eprintln!("tether: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12X").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("3d"), Ok(Duration::from_secs(3 * 86400)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
    }
}
