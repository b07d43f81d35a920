//! A fault-injecting TCP proxy.
//!
//! [`FaultProxy`] listens on a TCP address ([`FaultProxy::bind`]; [`FaultProxy::start`] takes an
//! ephemeral loopback port) and forwards every accepted connection to a fixed upstream address,
//! copying bytes in both directions. Each connection is cut — both TCP
//! streams are closed abruptly with `SO_LINGER` set to zero, so both peers see a reset just as
//! they would on a real link failure — after a randomly drawn number of bytes, and optionally
//! during the handshake phase or after a maximum age. It exists so that `tether demo` can show
//! conduits surviving link failures.
//!
//! # Cut budget
//!
//! Every connection gets its own random generator, seeded from ([`FaultConfig::seed`],
//! connection index), where the index counts accepted connections from 0 in accept order. The
//! same seed and the same traffic (same connection order, same bytes) therefore produce the same
//! cut points, independently of how the bytes happen to be chunked by the kernel. Reproducibility
//! holds for a given build; the generator is `rand`'s `StdRng`, whose stream may change between
//! `rand` versions.
//!
//! The generator first decides, with probability [`FaultConfig::handshake_cut_probability`],
//! whether the connection gets a *handshake cut*:
//!
//! * **Handshake cut**: `k` is drawn uniformly from `0..=32`. The proxy forwards exactly `k`
//!   bytes from the client to the server and then cuts (with `k = 0`, right after the upstream
//!   connection is established). Server-to-client bytes are forwarded meanwhile and do not count
//!   towards `k`, so protocols where the server speaks first still reach the cut.
//! * **Otherwise**, if [`FaultConfig::mean_bytes_between_cuts`] is non-zero, a budget `B` is drawn
//!   from an exponential distribution with that mean, rounded up, at least 1 (and, because the
//!   uniform variate behind it is a 53-bit float, never more than about 37 times the mean). Bytes
//!   forwarded in *both* directions count against `B`. When a read would exceed the budget, only
//!   the bytes up to the budget are forwarded and the connection is cut: the cut lands on an
//!   arbitrary byte, very often inside a length-prefixed frame. If the budget is used up exactly
//!   at the end of a chunk, the cut happens right after that chunk is forwarded.
//!
//! A budget is only consumed by the direction that exhausts it; if the other direction is in the
//! middle of writing an earlier chunk at that moment, that write is abandoned by the cut.
//!
//! [`FaultConfig::default`] plans no cuts at all: such a proxy forwards faithfully until it is told
//! otherwise (by [`FaultProxy::cut_all`] or one of the modes below).
//!
//! # Other cuts and closes
//!
//! * [`FaultProxy::cut_all`] cuts every live connection, [`FaultProxy::shutdown`] (also run on
//!   drop) stops accepting and cuts every live connection.
//! * [`FaultConfig::max_connection_age`] cuts connections that have lived that long (measured
//!   from accept) without being cut.
//! * A clean end of stream on one side is forwarded as a half-close (`FIN`) to the other side;
//!   once both directions have ended, the connection closes normally and no cut is counted.
//! * An IO error on either side (for example a peer resetting its connection) closes both streams
//!   abruptly, mirroring the failure; this is not counted as a cut.
//! * If connecting to the upstream fails, the client connection is closed abruptly. Such a
//!   connection is counted in [`ProxyStats::connections`] but not in any cut counter.
//!
//! # Outage and black hole
//!
//! Two modes imitate a path or a server that is down for a while. At most one mode is active at a
//! time: starting a mode while another one (or the same one) is active replaces it, with the new
//! duration counted from the new call, and [`FaultProxy::restore`] ends either mode early. The
//! window is measured on tokio's clock (`tokio::time::Instant`), so a paused test clock controls
//! it. Connections are sorted into "new" and "live" when the accept loop accepts them: a
//! connection that is still in the kernel's accept queue when a mode starts is a new one.
//!
//! * **Outage** ([`FaultProxy::outage`]): every live connection is cut at once, exactly as by
//!   [`FaultProxy::cut_all`] (counted in [`ProxyStats::cuts`]), including connections held by a
//!   black hole that the outage replaces. Until the outage ends, every new connection is accepted
//!   and immediately closed with a reset, without connecting upstream: a client sees its connect
//!   succeed and then a reset. These connections are counted in [`ProxyStats::connections`] and
//!   [`ProxyStats::outage_refused`], not in any cut counter, and take no connection index (the
//!   cut plans of later connections are the same as without the outage). When the outage ends,
//!   new connections are served normally; nothing else happens at that moment.
//! * **Black hole** ([`FaultProxy::black_hole`]): nothing is forwarded in either direction, and
//!   the proxy stops reading from both sides of every live connection, so the kernels' buffers
//!   fill and the senders' writes eventually block, as on a path that drops every packet. At most
//!   one read chunk per direction (16 KiB), read before the black hole began, is held back in the
//!   proxy; no end of stream is forwarded either. New connections are accepted (the client's
//!   connect succeeds) but held silent: no upstream connection is made and nothing is read until
//!   the black hole ends; they are counted in [`ProxyStats::black_hole_held`]. When the black
//!   hole ends, forwarding resumes on every live connection where it stopped, and held
//!   connections connect upstream and are served normally, as if the path came back and TCP
//!   retransmission recovered them. A peer that gave up during the black hole (closed or reset
//!   its side) is seen only then. Cuts still happen during a black hole: [`FaultProxy::cut_all`],
//!   an outage, [`FaultProxy::shutdown`] and [`FaultConfig::max_connection_age`] cut live and held
//!   connections alike; byte budgets do not run down, since nothing is forwarded.
//!
//! The proxy never panics on IO errors; it logs them through `tracing` at debug level (accept
//! errors at warn level).

use std::future::{self, Future};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Size of each per-direction copy buffer.
const BUF_SIZE: usize = 16 * 1024;

/// Largest handshake cut point: handshake cuts forward `0..=HANDSHAKE_MAX_BYTES` client bytes.
const HANDSHAKE_MAX_BYTES: u64 = 32;

/// How faults are injected. See the [module documentation](self) for the exact semantics.
///
/// The [`Default`] is a proxy that forwards faithfully: no budget cuts, no handshake cuts, no
/// maximum age, seed 0. Set the fields you need and take the rest from it:
///
/// ```
/// use tether::fault::FaultConfig;
///
/// let config = FaultConfig { mean_bytes_between_cuts: 4096, ..Default::default() };
/// assert_eq!(config.handshake_cut_probability, 0.0);
/// ```
#[derive(Clone, Debug)]
pub struct FaultConfig {
    /// Seed of the per-connection random generators (combined with the connection index).
    pub seed: u64,
    /// Mean number of bytes forwarded (both directions together, per connection) before a cut;
    /// 0 = never cut. Budgets are drawn from an exponential distribution with this mean.
    pub mean_bytes_between_cuts: u64,
    /// Probability (0.0..=1.0) that a connection is cut during the handshake phase: after
    /// forwarding a random number of bytes in 0..=32 from the client (the 29-byte prefixed hello
    /// sits there), so cuts land before, inside and just after the hello. Values outside
    /// 0.0..=1.0 are clamped; NaN counts as 0.0.
    pub handshake_cut_probability: f64,
    /// Optional: also cut any connection that has lived this long without a cut (None = off).
    pub max_connection_age: Option<Duration>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            seed: 0,
            mean_bytes_between_cuts: 0,
            handshake_cut_probability: 0.0,
            max_connection_age: None,
        }
    }
}

/// A snapshot of a [`FaultProxy`]'s counters, taken with [`FaultProxy::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted from clients (including those whose upstream connect failed and
    /// those refused by an outage).
    pub connections: u64,
    /// Connections cut by the proxy, for any reason: byte budget, handshake cut,
    /// [`FaultProxy::cut_all`], [`FaultProxy::outage`], [`FaultProxy::shutdown`] or maximum age.
    pub cuts: u64,
    /// Cuts made by the handshake budget (a subset of `cuts`).
    pub handshake_cuts: u64,
    /// Estimate of the cuts that landed inside a frame: budget cuts (handshake or regular) whose
    /// boundary fell strictly inside a read chunk, so that part of the chunk was withheld. The
    /// proxy does not parse frames, so this is a heuristic (a subset of `cuts`).
    pub mid_frame_cuts: u64,
    /// Bytes written to the peers, both directions together, over all connections.
    pub bytes_forwarded: u64,
    /// New connections closed with a reset, without connecting upstream, because an outage was
    /// active ([`FaultProxy::outage`]). Not counted as cuts.
    pub outage_refused: u64,
    /// New connections accepted while a black hole was active ([`FaultProxy::black_hole`]) and
    /// held silent, without connecting upstream, until it ended (or they were cut).
    pub black_hole_held: u64,
}

/// A running fault-injecting proxy. Dropping it shuts it down (see [`FaultProxy::shutdown`]).
#[derive(Debug)]
pub struct FaultProxy {
    local_addr: SocketAddr,
    /// Also held by the accept loop and every connection task, so the strong count drops to 1
    /// once they have all finished.
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Binds 127.0.0.1:0 and forwards every accepted connection to `upstream`: the same as
    /// [`FaultProxy::bind`] on an ephemeral loopback port.
    ///
    /// Must be called within a tokio runtime; the proxy runs on tasks spawned there.
    pub async fn start(upstream: SocketAddr, config: FaultConfig) -> io::Result<FaultProxy> {
        let loopback = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        FaultProxy::bind(loopback, upstream, config).await
    }

    /// Binds `listen` (any address; port 0 picks a free port, see
    /// [`local_addr`](Self::local_addr)) and forwards every accepted connection to `upstream`.
    ///
    /// Must be called within a tokio runtime; the proxy runs on tasks spawned there.
    pub async fn bind(
        listen: SocketAddr,
        upstream: SocketAddr,
        config: FaultConfig,
    ) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (cut_tx, _) = watch::channel(0u64);
        let (mode_tx, _) = watch::channel(Mode::Normal);
        let shared = Arc::new(Shared {
            upstream,
            config,
            counters: Counters::default(),
            shutdown_tx,
            cut_tx,
            mode_tx,
        });
        // Detached: it ends by itself once shutdown is requested.
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), shutdown_rx));
        Ok(FaultProxy { local_addr, shared })
    }

    /// The address the proxy listens on; clients connect here.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A snapshot of the counters. Each counter is read atomically, but not all of them at the
    /// same instant.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        ProxyStats {
            connections: c.connections.load(Ordering::Relaxed),
            cuts: c.cuts.load(Ordering::Relaxed),
            handshake_cuts: c.handshake_cuts.load(Ordering::Relaxed),
            mid_frame_cuts: c.mid_frame_cuts.load(Ordering::Relaxed),
            bytes_forwarded: c.bytes_forwarded.load(Ordering::Relaxed),
            outage_refused: c.outage_refused.load(Ordering::Relaxed),
            black_hole_held: c.black_hole_held.load(Ordering::Relaxed),
        }
    }

    /// Starts an outage of `duration`: cuts every live connection now, and until it ends closes
    /// every new connection at once with a reset, without connecting upstream. Replaces an
    /// active outage or black hole. See the [module documentation](self#outage-and-black-hole).
    pub fn outage(&self, duration: Duration) {
        // Mode first, then the cut: the accept loop subscribes to cuts before it reads the mode,
        // so a connection accepted concurrently is either refused or cut.
        self.shared.mode_tx.send_replace(Mode::Outage {
            until: deadline(duration),
        });
        self.cut_all();
    }

    /// Starts a black hole of `duration`: nothing is forwarded and nothing read on live
    /// connections, and new connections are held silent, until it ends; then forwarding resumes
    /// where it stopped. Replaces an active outage or black hole. See the
    /// [module documentation](self#outage-and-black-hole).
    pub fn black_hole(&self, duration: Duration) {
        self.shared.mode_tx.send_replace(Mode::BlackHole {
            until: deadline(duration),
        });
    }

    /// Ends an active outage or black hole now; does nothing if neither is active.
    pub fn restore(&self) {
        self.shared.mode_tx.send_replace(Mode::Normal);
    }

    /// Cuts every live connection now. The proxy keeps accepting new connections.
    pub fn cut_all(&self) {
        self.shared
            .cut_tx
            .send_modify(|gen| *gen = gen.wrapping_add(1));
    }

    /// Stops accepting and cuts every live connection (also done on drop).
    ///
    /// Returns immediately; the listener is closed and the connection tasks finish shortly
    /// afterwards on the runtime. Calling it again has no further effect.
    pub fn shutdown(&self) {
        // Order matters: the accept loop subscribes to cut signals before checking the shutdown
        // flag, so a connection accepted concurrently with this call is either refused there or
        // sees the cut signal below.
        self.shared.shutdown_tx.send_replace(true);
        self.cut_all();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// State shared by the handle, the accept loop and the connection tasks.
#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    config: FaultConfig,
    counters: Counters,
    /// `true` once shutdown was requested.
    shutdown_tx: watch::Sender<bool>,
    /// Cut generation: every change cuts all live connections.
    cut_tx: watch::Sender<u64>,
    /// The outage or black hole, if any.
    mode_tx: watch::Sender<Mode>,
}

/// An outage or a black hole, with its end (`None`: beyond what `Instant` can represent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Normal,
    Outage { until: Option<Instant> },
    BlackHole { until: Option<Instant> },
}

impl Mode {
    fn outage_active(self, now: Instant) -> bool {
        matches!(self, Mode::Outage { until } if until.is_none_or(|until| now < until))
    }

    /// The end of the black hole if one is active at `now`.
    fn black_hole(self, now: Instant) -> Option<Option<Instant>> {
        match self {
            Mode::BlackHole { until } if until.is_none_or(|until| now < until) => Some(until),
            _ => None,
        }
    }
}

/// The end of a window of `duration` starting now.
fn deadline(duration: Duration) -> Option<Instant> {
    Instant::now().checked_add(duration)
}

/// Resolves once no black hole is active (at once if none is).
async fn until_forwarding(mode_rx: &mut watch::Receiver<Mode>) {
    loop {
        let mode = *mode_rx.borrow_and_update();
        let Some(until) = mode.black_hole(Instant::now()) else {
            return;
        };
        let end = async move {
            match until {
                Some(until) => tokio::time::sleep_until(until).await,
                None => future::pending().await,
            }
        };
        tokio::select! {
            () = end => {}
            res = mode_rx.changed() => {
                if res.is_err() {
                    // The proxy is gone; nothing can end the black hole but shutdown's cut.
                    return;
                }
            }
        }
    }
}

/// Resolves once a black hole is active.
async fn black_hole_started(mode_rx: &mut watch::Receiver<Mode>) {
    loop {
        if mode_rx
            .borrow_and_update()
            .black_hole(Instant::now())
            .is_some()
        {
            return;
        }
        if mode_rx.changed().await.is_err() {
            future::pending::<()>().await;
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    cuts: AtomicU64,
    handshake_cuts: AtomicU64,
    mid_frame_cuts: AtomicU64,
    bytes_forwarded: AtomicU64,
    outage_refused: AtomicU64,
    black_hole_held: AtomicU64,
}

/// Why the proxy cut a connection.
#[derive(Clone, Copy, Debug)]
enum CutReason {
    /// The byte budget ran out; `partial` if part of the last read chunk was withheld.
    Budget { partial: bool },
    /// `cut_all`, `outage` or `shutdown`.
    Requested,
    /// `max_connection_age` elapsed.
    Age,
}

impl Shared {
    fn record_cut(&self, plan: &CutPlan, reason: CutReason) {
        let c = &self.counters;
        c.cuts.fetch_add(1, Ordering::Relaxed);
        if let CutReason::Budget { partial } = reason {
            if plan.handshake {
                c.handshake_cuts.fetch_add(1, Ordering::Relaxed);
            }
            if partial {
                c.mid_frame_cuts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The cut planned for one connection, drawn when it is accepted: a pure
/// function of the [`FaultConfig`] and the connection's index
/// ([`FaultConfig::plan`]), so that any relay that cuts some other kind of
/// link (a Unix socket, an in-memory link) cuts exactly where a
/// [`FaultProxy`] with the same configuration would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CutPlan {
    /// Bytes to forward before the cut; `None` = no budget cut.
    pub budget: Option<u64>,
    /// The budget is a handshake budget: it counts client-to-server bytes
    /// only, and is at most 32.
    pub handshake: bool,
}

impl FaultConfig {
    /// The cut planned for connection number `connection` (0 for the
    /// first accepted): with probability `handshake_cut_probability` a
    /// handshake cut after 0..=32 client bytes, else (when
    /// `mean_bytes_between_cuts` is not 0) a budget drawn from an
    /// exponential distribution with that mean. The same for the same
    /// seed and index, whatever the link.
    pub fn plan(&self, connection: u64) -> CutPlan {
        CutPlan::draw(self, connection)
    }
}

impl CutPlan {
    fn draw(config: &FaultConfig, index: u64) -> CutPlan {
        let mut rng = StdRng::seed_from_u64(mix(mix(config.seed) ^ index));
        let p = config.handshake_cut_probability;
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        if rng.random_bool(p) {
            return CutPlan {
                budget: Some(rng.random_range(0..=HANDSHAKE_MAX_BYTES)),
                handshake: true,
            };
        }
        let budget = (config.mean_bytes_between_cuts > 0)
            .then(|| exponential_budget(&mut rng, config.mean_bytes_between_cuts));
        CutPlan {
            budget,
            handshake: false,
        }
    }
}

/// Draws a byte budget from an exponential distribution with the given mean, rounded up, >= 1.
fn exponential_budget(rng: &mut StdRng, mean: u64) -> u64 {
    // `random::<f64>()` is uniform in [0, 1), so `1 - u` is in (0, 1] and the logarithm finite.
    let u: f64 = rng.random();
    let x = -(1.0 - u).ln() * mean as f64;
    // Float-to-int `as` saturates, so huge means cannot wrap.
    (x.ceil() as u64).max(1)
}

/// SplitMix64 finalizer: spreads (seed, index) combinations over the whole seed space.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Closes `stream` abruptly: with `SO_LINGER` 0 the kernel sends a reset instead of a `FIN`.
fn reset(stream: TcpStream) {
    // Ignoring errors: at worst the peer sees an orderly close instead of a reset.
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown_rx: watch::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    let mut index: u64 = 0;
    loop {
        tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown_rx) => break,
            Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(err) = res {
                    tracing::warn!(%err, "fault proxy connection task failed");
                }
            }
            res = listener.accept() => match res {
                Ok((client, peer)) => {
                    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                    // Subscribe before checking the flag; see `FaultProxy::shutdown`.
                    let cut_rx = shared.cut_tx.subscribe();
                    if *shared.shutdown_tx.borrow() {
                        reset(client);
                        break;
                    }
                    let mode = *shared.mode_tx.borrow();
                    let now = Instant::now();
                    if mode.outage_active(now) {
                        shared.counters.outage_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "fault proxy refused connection: outage");
                        reset(client);
                        continue;
                    }
                    if mode.black_hole(now).is_some() {
                        shared.counters.black_hole_held.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, index, "fault proxy holds connection: black hole");
                    }
                    tracing::debug!(%peer, index, "fault proxy accepted connection");
                    tasks.spawn(serve_connection(client, index, Arc::clone(&shared), cut_rx));
                    index += 1;
                }
                Err(err) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(%err, "fault proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    drop(listener);
    // Every live connection has been told to cut itself; wait until they have done so.
    while let Some(res) = tasks.join_next().await {
        if let Err(err) = res {
            tracing::warn!(%err, "fault proxy connection task failed");
        }
    }
}

/// Resolves once shutdown is requested (or the sender is gone, which means the same).
async fn shutdown_requested(shutdown_rx: &mut watch::Receiver<bool>) {
    // The returned guard must not be held across an await, so drop it right here.
    let _ = shutdown_rx.wait_for(|stop| *stop).await;
}

/// How the copying phase of a connection ended.
enum Outcome {
    /// Both directions reached end of stream.
    Closed,
    /// The proxy cuts the connection.
    Cut(CutReason),
    /// An IO error on either side.
    Failed(io::Error),
}

/// How one copying direction ended.
enum PumpEnd {
    /// End of stream, forwarded as a half-close.
    Eof,
    /// The byte budget is used up; `partial` if part of the last chunk was withheld.
    Exhausted { partial: bool },
}

async fn serve_connection(
    client: TcpStream,
    index: u64,
    shared: Arc<Shared>,
    mut cut_rx: watch::Receiver<u64>,
) {
    let plan = CutPlan::draw(&shared.config, index);
    tracing::debug!(index, ?plan, "fault proxy connection plan");
    let age = age_limit(shared.config.max_connection_age);
    tokio::pin!(age);
    let mut mode_rx = shared.mode_tx.subscribe();

    // A black hole holds a new connection before it connects upstream.
    let held = tokio::select! {
        () = until_forwarding(&mut mode_rx) => None,
        _ = cut_rx.changed() => Some(CutReason::Requested),
        () = &mut age => Some(CutReason::Age),
    };
    if let Some(reason) = held {
        shared.record_cut(&plan, reason);
        reset(client);
        return;
    }

    let connected = tokio::select! {
        res = TcpStream::connect(shared.upstream) => match res {
            Ok(server) => Ok(server),
            Err(err) => {
                tracing::debug!(index, %err, "fault proxy upstream connect failed");
                reset(client);
                return;
            }
        },
        _ = cut_rx.changed() => Err(CutReason::Requested),
        () = &mut age => Err(CutReason::Age),
    };
    let server = match connected {
        Ok(server) => server,
        Err(reason) => {
            shared.record_cut(&plan, reason);
            reset(client);
            return;
        }
    };
    let mut client = client;
    let mut server = server;
    for stream in [&client, &server] {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(index, %err, "fault proxy set_nodelay failed");
        }
    }

    let outcome = if plan.budget == Some(0) {
        Outcome::Cut(CutReason::Budget { partial: false })
    } else {
        let remaining = AtomicU64::new(plan.budget.unwrap_or(u64::MAX));
        let c2s_budget = plan.budget.map(|_| &remaining);
        let s2c_budget = if plan.handshake { None } else { c2s_budget };
        let (client_r, client_w) = client.split();
        let (server_r, server_w) = server.split();
        let counters = &shared.counters;
        let c2s = pump(client_r, server_w, c2s_budget, counters, mode_rx.clone());
        let s2c = pump(server_r, client_w, s2c_budget, counters, mode_rx);
        tokio::pin!(c2s, s2c);
        let mut c2s_open = true;
        let mut s2c_open = true;
        loop {
            let end = tokio::select! {
                res = &mut c2s, if c2s_open => {
                    c2s_open = false;
                    res
                }
                res = &mut s2c, if s2c_open => {
                    s2c_open = false;
                    res
                }
                _ = cut_rx.changed() => break Outcome::Cut(CutReason::Requested),
                () = &mut age => break Outcome::Cut(CutReason::Age),
            };
            match end {
                Ok(PumpEnd::Eof) if c2s_open || s2c_open => {}
                Ok(PumpEnd::Eof) => break Outcome::Closed,
                Ok(PumpEnd::Exhausted { partial }) => {
                    break Outcome::Cut(CutReason::Budget { partial })
                }
                Err(err) => break Outcome::Failed(err),
            }
        }
    };

    match outcome {
        Outcome::Closed => {
            tracing::debug!(index, "fault proxy connection closed");
        }
        Outcome::Cut(reason) => {
            // Count before resetting, so that whoever observes the reset also sees the count.
            shared.record_cut(&plan, reason);
            tracing::debug!(index, ?reason, "fault proxy cut connection");
            reset(client);
            reset(server);
        }
        Outcome::Failed(err) => {
            tracing::debug!(index, %err, "fault proxy connection failed");
            reset(client);
            reset(server);
        }
    }
}

/// Resolves when a connection accepted now has reached `max_age`; never if `None`.
fn age_limit(max_age: Option<Duration>) -> impl Future<Output = ()> {
    let deadline = max_age.and_then(|age| Instant::now().checked_add(age));
    async move {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => future::pending().await,
        }
    }
}

/// Copies `reader` to `writer` until end of stream or until `budget` (shared with the other
/// direction when both count) runs out. While a black hole is active it neither reads nor writes.
async fn pump<R, W>(
    mut reader: R,
    mut writer: W,
    budget: Option<&AtomicU64>,
    counters: &Counters,
    mut mode_rx: watch::Receiver<Mode>,
) -> io::Result<PumpEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        until_forwarding(&mut mode_rx).await;
        // Reading a TCP stream is cancel-safe: a read abandoned for a black hole loses nothing.
        let n = tokio::select! {
            res = reader.read(&mut buf) => res?,
            () = black_hole_started(&mut mode_rx) => continue,
        };
        if n == 0 {
            until_forwarding(&mut mode_rx).await;
            // The peer may already be gone; the other direction will notice.
            let _ = writer.shutdown().await;
            return Ok(PumpEnd::Eof);
        }
        let (allowed, exhausted) = match budget {
            None => (n, false),
            Some(remaining) => {
                let read = n as u64;
                let (Ok(before) | Err(before)) =
                    remaining.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                        Some(left.saturating_sub(read))
                    });
                if before == 0 {
                    return Ok(PumpEnd::Exhausted { partial: false });
                }
                // `before < read` here, so the conversion back to usize is lossless.
                let allowed = if before < read { before as usize } else { n };
                (allowed, before <= read)
            }
        };
        write_forwarding(&mut writer, &buf[..allowed], counters, &mut mode_rx).await?;
        if exhausted {
            return Ok(PumpEnd::Exhausted {
                partial: allowed < n,
            });
        }
    }
}

/// Writes all of `data`, pausing while a black hole is active, and counts what was written.
async fn write_forwarding<W>(
    writer: &mut W,
    data: &[u8],
    counters: &Counters,
    mode_rx: &mut watch::Receiver<Mode>,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut written = 0;
    while written < data.len() {
        until_forwarding(mode_rx).await;
        // Writing a TCP stream is cancel-safe: an abandoned write has written nothing.
        tokio::select! {
            res = writer.write(&data[written..]) => {
                let n = res?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                written += n;
                counters.bytes_forwarded.fetch_add(n as u64, Ordering::Relaxed);
            }
            () = black_hole_started(mode_rx) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use tokio::time::timeout;

    /// Upper bound for any single wait in these tests.
    const WAIT: Duration = Duration::from_secs(5);

    fn config(seed: u64, mean: u64, handshake: f64) -> FaultConfig {
        FaultConfig {
            seed,
            mean_bytes_between_cuts: mean,
            handshake_cut_probability: handshake,
            max_connection_age: None,
        }
    }

    /// Deterministic, non-repeating-looking test payload.
    fn pattern(len: usize) -> Vec<u8> {
        let mut state = 0x1234_5678_u64;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            state = mix(state);
            out.extend_from_slice(&state.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// An upstream that echoes every connection back until end of stream.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.into_split();
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    /// An upstream that reads every connection until end of stream or error and reports what it
    /// received, plus the error kind if reading ended with an error.
    async fn sink_server() -> (
        SocketAddr,
        mpsc::UnboundedReceiver<(Vec<u8>, Option<io::ErrorKind>)>,
    ) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut received = Vec::new();
                    let mut buf = vec![0u8; 4096];
                    let error = loop {
                        match stream.read(&mut buf).await {
                            Ok(0) => break None,
                            Ok(n) => received.extend_from_slice(&buf[..n]),
                            Err(err) => break Some(err.kind()),
                        }
                    };
                    let _ = tx.send((received, error));
                });
            }
        });
        (addr, rx)
    }

    /// Writes `data` in `chunk`-sized pieces until the connection fails, then reads once more to
    /// observe a reset. Returns (bytes written, whether the connection was seen to be reset).
    async fn write_until_reset(stream: &mut TcpStream, data: &[u8], chunk: usize) -> (usize, bool) {
        let mut written = 0;
        let mut reset_seen = false;
        for piece in data.chunks(chunk) {
            match stream.write_all(piece).await {
                Ok(()) => written += piece.len(),
                Err(err) => {
                    assert!(
                        matches!(
                            err.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                        ),
                        "unexpected write error {err}"
                    );
                    reset_seen = true;
                    break;
                }
            }
        }
        let mut byte = [0u8; 1];
        match timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("read timed out")
        {
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset => reset_seen = true,
            // The reset was already reported to the failed write.
            Ok(0) if reset_seen => {}
            other => panic!("expected a reset, got {other:?}"),
        }
        (written, reset_seen)
    }

    async fn recv_report(
        rx: &mut mpsc::UnboundedReceiver<(Vec<u8>, Option<io::ErrorKind>)>,
    ) -> (Vec<u8>, Option<io::ErrorKind>) {
        timeout(WAIT, rx.recv())
            .await
            .expect("sink report timed out")
            .expect("sink gone")
    }

    /// Waits until the accept loop and every connection task have finished.
    async fn wait_for_tasks_to_finish(proxy: &FaultProxy) {
        timeout(WAIT, async {
            while Arc::strong_count(&proxy.shared) > 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("proxy tasks still running");
    }

    async fn expect_reset(stream: &mut TcpStream) {
        let mut buf = [0u8; 16];
        let res = timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("read timed out");
        match res {
            Err(err) => assert_eq!(err.kind(), io::ErrorKind::ConnectionReset),
            Ok(n) => panic!("expected a reset, read {n} bytes"),
        }
    }

    async fn echo_roundtrip(stream: &mut TcpStream, msg: &[u8]) {
        stream.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        timeout(WAIT, stream.read_exact(&mut back))
            .await
            .expect("echo timed out")
            .unwrap();
        assert_eq!(back, msg);
    }

    #[tokio::test]
    async fn forwards_both_ways_byte_exact_without_cuts() {
        let upstream = echo_server().await;
        let proxy = FaultProxy::start(upstream, config(1, 0, 0.0))
            .await
            .unwrap();
        let data = pattern(4 << 20);
        let stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let to_send = data.clone();
        let writer = tokio::spawn(async move {
            for piece in to_send.chunks(7919) {
                w.write_all(piece).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut echoed = Vec::with_capacity(data.len());
        timeout(WAIT, r.read_to_end(&mut echoed))
            .await
            .expect("echo timed out")
            .unwrap();
        writer.await.unwrap();
        assert!(echoed == data, "echoed data differs");
        let stats = proxy.stats();
        assert_eq!(
            stats,
            ProxyStats {
                connections: 1,
                bytes_forwarded: 2 * data.len() as u64,
                ..ProxyStats::default()
            }
        );
    }

    #[tokio::test]
    async fn cuts_after_budget_forwarding_an_exact_prefix() {
        let (upstream, mut reports) = sink_server().await;
        let proxy = FaultProxy::start(upstream, config(7, 1000, 0.0))
            .await
            .unwrap();
        let data = pattern(32 << 20);
        let mut cut_points = Vec::new();
        for i in 0..20u64 {
            let before = proxy.stats();
            let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
            let (written, reset_seen) = write_until_reset(&mut stream, &data, 4096).await;
            assert!(reset_seen);
            assert!(written < data.len(), "never cut");
            let (received, error) = recv_report(&mut reports).await;
            assert_eq!(error, Some(io::ErrorKind::ConnectionReset));
            assert!(received.len() <= written);
            assert!(received == data[..received.len()], "not a prefix");
            let after = proxy.stats();
            assert_eq!(after.connections, i + 1);
            assert_eq!(after.cuts, i + 1);
            assert_eq!(
                after.bytes_forwarded - before.bytes_forwarded,
                received.len() as u64
            );
            // Exponential with mean 1000 never exceeds ~37 * 1000.
            assert!((1..=40_000).contains(&received.len()));
            cut_points.push(received.len());
        }
        let stats = proxy.stats();
        assert_eq!(stats.handshake_cuts, 0);
        // The client writes 4 KiB pieces, so most budgets end inside a chunk.
        assert!(stats.mid_frame_cuts > 0 && stats.mid_frame_cuts <= stats.cuts);
        let mut distinct = cut_points.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(
            distinct.len() > 10,
            "cut points barely vary: {cut_points:?}"
        );
        let mean = cut_points.iter().sum::<usize>() / cut_points.len();
        assert!((200..=5000).contains(&mean), "implausible mean {mean}");
    }

    #[tokio::test]
    async fn reconnecting_eventually_gets_a_message_through() {
        let upstream = echo_server().await;
        let proxy = FaultProxy::start(upstream, config(3, 1000, 0.0))
            .await
            .unwrap();
        let msg = pattern(300);
        let mut attempts = 0;
        loop {
            attempts += 1;
            assert!(attempts <= 50, "no connection got 300 bytes echoed");
            let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
            // Half-close after the message so that a successful echo ends with end of stream.
            if stream.write_all(&msg).await.is_err() || stream.shutdown().await.is_err() {
                continue;
            }
            let mut back = Vec::new();
            let _ = timeout(WAIT, stream.read_to_end(&mut back))
                .await
                .unwrap_or_else(|_| {
                    panic!("echo through the proxy hung");
                });
            if back.len() == msg.len() {
                assert_eq!(back, msg);
                break;
            }
            // A cut connection delivers a prefix of the echo, never anything else.
            assert!(back == msg[..back.len()]);
        }
        assert!(proxy.stats().cuts >= attempts - 1);
    }

    /// Cut points (bytes received upstream) of `n` sequential connections with the given seed.
    async fn cut_points(seed: u64, n: usize) -> Vec<usize> {
        let (upstream, mut reports) = sink_server().await;
        let proxy = FaultProxy::start(upstream, config(seed, 1000, 0.0))
            .await
            .unwrap();
        let data = pattern(4 << 20);
        let mut points = Vec::new();
        for _ in 0..n {
            let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
            let _ = write_until_reset(&mut stream, &data, 1500).await;
            let (received, _) = recv_report(&mut reports).await;
            points.push(received.len());
        }
        points
    }

    #[tokio::test]
    async fn same_seed_same_cut_points_other_seed_different() {
        let a = cut_points(11, 8).await;
        let b = cut_points(11, 8).await;
        let c = cut_points(12, 8).await;
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn plans_are_reproducible_per_seed_and_index() {
        let cfg = config(5, 1000, 0.3);
        let plans: Vec<CutPlan> = (0..200).map(|i| CutPlan::draw(&cfg, i)).collect();
        let again: Vec<CutPlan> = (0..200).map(|i| CutPlan::draw(&cfg, i)).collect();
        assert_eq!(plans, again);
        let other: Vec<CutPlan> = (0..200)
            .map(|i| CutPlan::draw(&config(6, 1000, 0.3), i))
            .collect();
        assert_ne!(plans, other);
        let handshakes = plans.iter().filter(|p| p.handshake).count();
        assert!(
            (30..=90).contains(&handshakes),
            "{handshakes} handshake plans"
        );
        for plan in &plans {
            let budget = plan.budget.expect("every plan cuts");
            if plan.handshake {
                assert!(budget <= HANDSHAKE_MAX_BYTES);
            } else {
                assert!(budget >= 1);
            }
        }
        assert_eq!(CutPlan::draw(&config(5, 0, 0.0), 9).budget, None);
        // Out-of-range probabilities are clamped instead of panicking.
        assert!(CutPlan::draw(&config(5, 0, 7.0), 0).handshake);
        assert!(!CutPlan::draw(&config(5, 0, f64::NAN), 0).handshake);
    }

    #[tokio::test]
    async fn handshake_cuts_land_within_first_32_client_bytes() {
        let (upstream, mut reports) = sink_server().await;
        let proxy = FaultProxy::start(upstream, config(21, 0, 1.0))
            .await
            .unwrap();
        let hello = pattern(64);
        let mut seen = Vec::new();
        for _ in 0..30 {
            let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
            let (_, reset_seen) = write_until_reset(&mut stream, &hello, 64).await;
            assert!(reset_seen);
            let (received, error) = recv_report(&mut reports).await;
            assert_eq!(error, Some(io::ErrorKind::ConnectionReset));
            assert!(received.len() <= 32, "{} bytes got through", received.len());
            assert!(received == hello[..received.len()]);
            seen.push(received.len());
        }
        let stats = proxy.stats();
        assert_eq!(stats.connections, 30);
        assert_eq!(stats.cuts, 30);
        assert_eq!(stats.handshake_cuts, 30);
        assert_eq!(stats.bytes_forwarded, seen.iter().sum::<usize>() as u64);
        seen.sort_unstable();
        seen.dedup();
        assert!(seen.len() > 5, "handshake cut points barely vary: {seen:?}");
    }

    #[tokio::test]
    async fn cut_all_resets_live_connections_and_keeps_accepting() {
        let upstream = echo_server().await;
        let proxy = FaultProxy::start(upstream, config(1, 0, 0.0))
            .await
            .unwrap();
        let mut streams = Vec::new();
        for _ in 0..3 {
            let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
            echo_roundtrip(&mut stream, b"ping").await;
            streams.push(stream);
        }
        proxy.cut_all();
        for stream in &mut streams {
            expect_reset(stream).await;
        }
        assert_eq!(proxy.stats().cuts, 3);
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        echo_roundtrip(&mut stream, b"still here").await;
        assert_eq!(proxy.stats().connections, 4);
        assert_eq!(proxy.stats().cuts, 3);
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_resets_connections() {
        let upstream = echo_server().await;
        let proxy = FaultProxy::start(upstream, config(1, 0, 0.0))
            .await
            .unwrap();
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        echo_roundtrip(&mut stream, b"ping").await;
        proxy.shutdown();
        expect_reset(&mut stream).await;
        wait_for_tasks_to_finish(&proxy).await;
        let err = TcpStream::connect(proxy.local_addr()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(proxy.stats().cuts, 1);
    }

    #[tokio::test]
    async fn drop_shuts_down() {
        let upstream = echo_server().await;
        let proxy = FaultProxy::start(upstream, config(1, 0, 0.0))
            .await
            .unwrap();
        let addr = proxy.local_addr();
        let shared = Arc::clone(&proxy.shared);
        let mut stream = TcpStream::connect(addr).await.unwrap();
        echo_roundtrip(&mut stream, b"ping").await;
        drop(proxy);
        expect_reset(&mut stream).await;
        timeout(WAIT, async {
            while Arc::strong_count(&shared) > 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("proxy tasks still running after drop");
        let err = TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn max_connection_age_cuts_idle_connections() {
        let upstream = echo_server().await;
        let mut cfg = config(1, 0, 0.0);
        cfg.max_connection_age = Some(Duration::from_millis(100));
        let proxy = FaultProxy::start(upstream, cfg).await.unwrap();
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        echo_roundtrip(&mut stream, b"ping").await;
        expect_reset(&mut stream).await;
        let stats = proxy.stats();
        assert_eq!(
            (stats.cuts, stats.handshake_cuts, stats.mid_frame_cuts),
            (1, 0, 0)
        );
    }

    /// The windows run on tokio's clock: a paused clock holds them open and `advance` ends them;
    /// a new mode replaces the old one and `restore` ends either.
    #[tokio::test(start_paused = true)]
    async fn modes_follow_tokio_time_and_replace_each_other() {
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        let proxy = FaultProxy::start(upstream, FaultConfig::default())
            .await
            .unwrap();
        let mode = || *proxy.shared.mode_tx.borrow();
        let mut rx = proxy.shared.mode_tx.subscribe();

        proxy.outage(Duration::from_secs(10));
        assert!(mode().outage_active(Instant::now()));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(mode().outage_active(Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!mode().outage_active(Instant::now()), "{:?}", mode());

        proxy.black_hole(Duration::from_secs(10));
        let start = Instant::now();
        assert!(mode().black_hole(start).is_some());
        // Forwarding waits for exactly the window on the paused clock.
        until_forwarding(&mut rx).await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert_eq!(mode().black_hole(Instant::now()), None);

        // A black hole replaced by an outage is over; restore ends the outage.
        proxy.black_hole(Duration::from_secs(10));
        proxy.outage(Duration::from_secs(10));
        assert_eq!(mode().black_hole(Instant::now()), None);
        assert!(mode().outage_active(Instant::now()));
        proxy.restore();
        assert_eq!(mode(), Mode::Normal);

        // An endless black hole ends with restore, not with time.
        proxy.black_hole(Duration::MAX);
        assert_eq!(mode(), Mode::BlackHole { until: None });
        let wait = tokio::spawn({
            let mut rx = proxy.shared.mode_tx.subscribe();
            async move { until_forwarding(&mut rx).await }
        });
        tokio::time::advance(Duration::from_secs(1 << 30)).await;
        assert!(!wait.is_finished());
        proxy.restore();
        tokio::time::timeout(WAIT, wait).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn failed_upstream_connect_closes_client_without_counting_a_cut() {
        // Reserve a port, then free it so that nothing listens there.
        let unused = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let upstream = unused.local_addr().unwrap();
        drop(unused);
        let proxy = FaultProxy::start(upstream, config(1, 0, 0.0))
            .await
            .unwrap();
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        expect_reset(&mut stream).await;
        let stats = proxy.stats();
        assert_eq!((stats.connections, stats.cuts), (1, 0));
    }
}
