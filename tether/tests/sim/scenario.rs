//! The scenario kinds: what a run of each kind draws from its seed, how it
//! is set up and ended, and what it must satisfy.
//!
//! A two-party run is one client and one server session exchanging traffic
//! both ways over a [`FaultConnector`]/[`FaultListener`] pair, ended one of
//! three ways: draining (every accepted message arrives, then the run is
//! torn down), a `close()` by one side, or one side dropping every handle,
//! either at a random moment or once its senders are done. The many-sessions
//! kind is a server with a few hundred echoing sessions whose links are cut
//! at random.
//!
//! The real-transport kinds (`real_tcp`, `real_unix`, `real_tls`,
//! `real_ws`, `real_wss`) run the same two-party drain and the same checks
//! over real sockets of `common::transport`, on the real clock: the
//! client's links go through its cutter (the `FaultProxy` for TCP, TLS and
//! both WebSockets, the budget relay for Unix sockets), which cuts each connection after a budget drawn from the seed
//! and cuts every link at a few seeded moments, until the storm ends. The
//! seed fixes the plan (traffic, configurations, budgets, cut moments), not
//! the interleaving: the kernel and the clock decide where in the traffic a
//! cut lands, so a replay reruns the plan and usually, not always, the
//! failure.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tether::fault::FaultConfig;
use tether::link::mem::{self, MemConfig};
use tether::proto::ext;
use tether::{Config, Connector, Error, Server, StableConduit, StableSender, Stats};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

use crate::common::transport::Transport;
use crate::fault::{
    random_duration, FaultConnector, FaultKind, FaultListener, FaultLog, FaultMix, Faults,
};
use crate::traffic::{
    check, spawn_reader, spawn_sender, stream, summary, Board, Expect, Msg, Pace, ReadPlan, Reader,
    Record, SendPlan, Side, SideRecord, Sizes,
};

/// A run that has not finished after this much virtual time hangs.
pub(crate) const TIME_LIMIT: Duration = Duration::from_secs(600);
/// A run in which no message was accepted or received and no side ended
/// for this long (virtual time) is stuck; the longest legitimate wait is a
/// session waiting out its resume window.
const STUCK_AFTER: Duration = Duration::from_secs(150);

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(4);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Give-up deadline and resume window where faults are transient: far
/// beyond any outage a transient fault causes.
const PATIENCE: Duration = Duration::from_secs(120);

/// Names of the random streams drawn from a run's seed.
const PARAMS: u64 = 1;
const FAULTS: u64 = 2;
const CONFIG: u64 = 3;
const SENDERS: u64 = 0x100;
const READERS: u64 = 0x200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Links killed at random payloads, mid-batch and by byte count;
    /// refused connects.
    Cuts,
    /// Black holes, silent stalls, held-back payloads, late hellos.
    Stalls,
    /// Tiny replay and receive bounds, tiny links, large messages,
    /// cancelled sends and receives, every fault.
    Pressure,
    /// Readers that pause for longer than the keepalive timeout, on links
    /// that are only ever cut.
    SlowReader,
    /// Every link dies after 80 to 256 KiB; messages up to 300 KiB.
    ShortLinks,
    /// Cuts, with at least one side offering no standalone acks: the base
    /// format, with some extensions offered and refused.
    BaseFormat,
    /// The client calls `close()`, mid-traffic or once its senders are done,
    /// keeping its receiver or dropping it first; every fault, swallowed
    /// close frames included, races the close.
    ClientClose,
    /// The same, closed by the server.
    ServerClose,
    /// The client drops every handle, mid-traffic or once its senders are
    /// done; every fault.
    ClientDrop,
    /// The same, dropped by the server.
    ServerDrop,
    /// Outages longer than the give-up deadline or the resume window:
    /// sessions may be lost, and what was lost must be accounted for.
    Lossy,
    /// One server, a few hundred echoing sessions, links cut at random.
    ManySessions,
    /// The drain over real TCP, links cut by the `FaultProxy`.
    RealTcp,
    /// The drain over real Unix sockets, links cut by the budget relay.
    RealUnix,
    /// The drain over real TLS, its TCP connections cut by the `FaultProxy`.
    RealTls,
    /// The drain over real WebSocket (`ws://`), its TCP connections cut by
    /// the `FaultProxy`.
    RealWs,
    /// The drain over real secure WebSocket (`wss://`), its TCP connections
    /// cut by the `FaultProxy`.
    RealWss,
}

impl Kind {
    pub(crate) const ALL: [Kind; 17] = [
        Kind::Cuts,
        Kind::Stalls,
        Kind::Pressure,
        Kind::SlowReader,
        Kind::ShortLinks,
        Kind::BaseFormat,
        Kind::ClientClose,
        Kind::ServerClose,
        Kind::ClientDrop,
        Kind::ServerDrop,
        Kind::Lossy,
        Kind::ManySessions,
        Kind::RealTcp,
        Kind::RealUnix,
        Kind::RealTls,
        Kind::RealWs,
        Kind::RealWss,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Cuts => "cuts",
            Kind::Stalls => "stalls",
            Kind::Pressure => "pressure",
            Kind::SlowReader => "slow_reader",
            Kind::ShortLinks => "short_links",
            Kind::BaseFormat => "base_format",
            Kind::ClientClose => "client_close",
            Kind::ServerClose => "server_close",
            Kind::ClientDrop => "client_drop",
            Kind::ServerDrop => "server_drop",
            Kind::Lossy => "lossy",
            Kind::ManySessions => "many_sessions",
            Kind::RealTcp => "real_tcp",
            Kind::RealUnix => "real_unix",
            Kind::RealTls => "real_tls",
            Kind::RealWs => "real_ws",
            Kind::RealWss => "real_wss",
        }
    }

    /// The real transport of a real-transport kind.
    pub(crate) fn transport(self) -> Option<Transport> {
        match self {
            Kind::RealTcp => Some(Transport::Tcp),
            Kind::RealUnix => Some(Transport::Unix),
            Kind::RealTls => Some(Transport::Tls),
            Kind::RealWs => Some(Transport::Ws),
            Kind::RealWss => Some(Transport::Wss),
            _ => None,
        }
    }

    /// Whether the kind runs over real sockets on the real clock (so a
    /// seed replays its plan, not its interleaving).
    pub(crate) fn is_real(self) -> bool {
        self.transport().is_some()
    }

    pub(crate) fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Seeds of this kind in the default run; a many-sessions seed costs
    /// about ten times more than the others, a real-transport seed takes
    /// real time.
    pub(crate) fn default_seeds(self) -> u64 {
        match self {
            Kind::ManySessions => 40,
            _ if self.is_real() => 6,
            _ => 400,
        }
    }
}

/// Runs one seed of `kind`: `Ok` with a fingerprint of the run (equal for
/// equal seeds), or `Err` with what went wrong.
pub(crate) async fn run(kind: Kind, seed: u64) -> Result<String, String> {
    match kind {
        Kind::ManySessions => run_many(seed).await,
        _ => match kind.transport() {
            Some(transport) => run_real(PairPlan::draw(kind, seed), transport, seed).await,
            None => run_pair(PairPlan::draw(kind, seed), seed).await,
        },
    }
}

/// How one side's conduit is configured, beyond the fixed timeouts.
#[derive(Clone, Copy, Debug)]
struct Tuning {
    bounds: Bounds,
    /// Give-up deadline and resume window.
    patience: Duration,
    extensions: u8,
    initial_seq: u32,
    fragment_size: usize,
}

impl Tuning {
    fn draw(rng: &mut SmallRng) -> Tuning {
        Tuning {
            bounds: Bounds::draw(rng),
            patience: PATIENCE,
            extensions: ext::ALL,
            // Now and then close to where sequence numbers wrap.
            initial_seq: if rng.random_bool(0.25) {
                u32::MAX - rng.random_range(0..2_000)
            } else {
                0
            },
            fragment_size: if rng.random_bool(0.5) {
                64 * 1024
            } else {
                rng.random_range(1024..=64 * 1024)
            },
        }
    }

    fn config(self, seed: u64) -> Config {
        let mut c = Config::default();
        c = c
            .seed(seed)
            .handshake_timeout(HANDSHAKE_TIMEOUT)
            .keepalive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .close_timeout(CLOSE_TIMEOUT)
            .resume_window(self.patience)
            .max_replay(self.bounds.replay_bytes, self.bounds.replay_frames)
            .max_recv_queue_bytes(self.bounds.recv_queue)
            .extensions(self.extensions)
            .initial_seq(self.initial_seq)
            .fragment_size(self.fragment_size);
        c = c.reconnect_with(|r| {
            r.min_backoff(Duration::from_millis(5))
                .max_backoff(Duration::from_millis(500))
                .give_up_after(Some(self.patience))
                .connect_give_up_after(self.patience)
        });
        c
    }
}

#[derive(Clone, Copy, Debug)]
struct Bounds {
    replay_bytes: usize,
    replay_frames: usize,
    recv_queue: usize,
}

impl Bounds {
    /// Anything from small to the defaults.
    fn draw(rng: &mut SmallRng) -> Bounds {
        Bounds {
            replay_bytes: 1 << rng.random_range(14..=22),
            replay_frames: 1 << rng.random_range(4..=16),
            recv_queue: 1 << rng.random_range(16..=26),
        }
    }

    fn tiny(rng: &mut SmallRng) -> Bounds {
        Bounds {
            replay_bytes: rng.random_range(256..=16 * 1024),
            replay_frames: rng.random_range(1..=16),
            recv_queue: rng.random_range(1..=64 * 1024),
        }
    }
}

fn mix(weights: &[(FaultKind, u32)], refuse: f64, late_accept: f64) -> FaultMix {
    FaultMix {
        weights: weights.to_vec(),
        refuse: (refuse, Duration::from_secs(3)),
        late_accept,
        late_by: HANDSHAKE_TIMEOUT,
        max_latency: Duration::from_millis(20),
        max_silence: Duration::from_secs(6),
        byte_budget: (256, 512 * 1024),
    }
}

const CUTS: &[(FaultKind, u32)] = &[
    (FaultKind::Healthy, 1),
    (FaultKind::Cut, 4),
    (FaultKind::CutInBatch, 2),
    (FaultKind::CutBytes, 2),
];

const SILENCES: &[(FaultKind, u32)] = &[
    (FaultKind::Healthy, 3),
    (FaultKind::BlackHole, 3),
    (FaultKind::Stall, 2),
    (FaultKind::Hold, 2),
];

const EVERYTHING: &[(FaultKind, u32)] = &[
    (FaultKind::Healthy, 6),
    (FaultKind::Cut, 3),
    (FaultKind::CutInBatch, 1),
    (FaultKind::CutBytes, 1),
    (FaultKind::BlackHole, 2),
    (FaultKind::Stall, 1),
    (FaultKind::Hold, 1),
    (FaultKind::SwallowClose, 2),
];

const SMALL: Sizes = Sizes {
    large: 0.005,
    max_large: 300 * 1024,
};

/// Senders pause now and then, so that traffic spreads over the storm.
const SENDER_PACE: Pace = Pace {
    chance: 0.5,
    max: Duration::from_millis(30),
    long_chance: 0.02,
    max_long: Duration::from_secs(1),
};

/// Shorter pauses on the real clock, so that a seed takes about a second.
const REAL_SENDER_PACE: Pace = Pace {
    chance: 0.3,
    max: Duration::from_millis(5),
    long_chance: 0.005,
    max_long: Duration::from_millis(200),
};

const REAL_READER_PACE: Pace = Pace {
    chance: 0.1,
    max: Duration::from_millis(2),
    long_chance: 0.0,
    max_long: Duration::ZERO,
};

const READER_PACE: Pace = Pace {
    chance: 0.2,
    max: Duration::from_millis(10),
    long_chance: 0.0,
    max_long: Duration::ZERO,
};

/// How a two-party run ends.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// Every accepted message arrives both ways; then the run is torn down.
    Drain,
    /// `side` calls `close()` on its sender, keeping or dropping its
    /// receiver first.
    Close {
        side: Side,
        when: When,
        keep_reader: bool,
    },
    /// `side` drops every handle.
    Drop { side: Side, when: When },
}

#[derive(Clone, Copy, Debug)]
enum When {
    /// This long after the session started.
    At(Duration),
    /// Once the side's senders are done.
    AfterSending,
}

/// Everything a two-party run draws from its seed.
#[derive(Clone, Debug)]
struct PairPlan {
    kind: Kind,
    mix: FaultMix,
    storm: Duration,
    link_capacity: usize,
    tunings: [Tuning; 2],
    configs: [Config; 2],
    sends: [Vec<SendPlan>; 2],
    reads: [ReadPlan; 2],
    ending: Ending,
    /// (start, length) of outages: every link killed, connects refused.
    outages: Vec<(Duration, Duration)>,
    expect: Expect,
}

impl PairPlan {
    fn draw(kind: Kind, seed: u64) -> PairPlan {
        let rng = &mut SmallRng::seed_from_u64(stream(seed, PARAMS));
        let storm = Duration::from_millis(rng.random_range(500..=15_000));
        let mut tunings = [Tuning::draw(rng), Tuning::draw(rng)];
        let mut link_capacity = rng.random_range(4..=64);
        let mut sizes = SMALL;
        let mut read_pace = READER_PACE;
        let mut send_pace = SENDER_PACE;
        let mut cancel = 0.02;
        let mut outages = Vec::new();
        let fault_mix = match kind {
            Kind::Cuts => mix(CUTS, 0.15, 0.0),
            Kind::Stalls => mix(SILENCES, 0.05, 0.25),
            Kind::Pressure => {
                for t in &mut tunings {
                    t.bounds = Bounds::tiny(rng);
                }
                link_capacity = rng.random_range(1..=4);
                sizes.large = 0.03;
                cancel = 0.2;
                mix(EVERYTHING, 0.1, 0.1)
            }
            Kind::SlowReader => {
                for t in &mut tunings {
                    t.bounds = Bounds::tiny(rng);
                }
                read_pace.long_chance = 0.03;
                read_pace.max_long = KEEPALIVE_TIMEOUT * 2;
                mix(CUTS, 0.0, 0.0)
            }
            Kind::ShortLinks => {
                for t in &mut tunings {
                    t.fragment_size = 64 * 1024;
                }
                sizes = Sizes {
                    large: 0.1,
                    max_large: 300 * 1024,
                };
                let mut m = mix(&[(FaultKind::CutBytes, 1)], 0.0, 0.0);
                m.byte_budget = (80 * 1024, 256 * 1024);
                m
            }
            Kind::BaseFormat => {
                // Any extensions on one side, any but standalone acks on
                // the other: the link speaks the base format.
                let without_acks = rng.random_range(0..2);
                for (i, t) in tunings.iter_mut().enumerate() {
                    t.extensions = [ext::ACKS, ext::KEEPALIVE, ext::CLOSE, ext::FRAGMENTS]
                        .into_iter()
                        .filter(|&bit| {
                            rng.random_bool(0.5) && (i != without_acks || bit != ext::ACKS)
                        })
                        .fold(0, |bits, bit| bits | bit);
                }
                mix(CUTS, 0.15, 0.0)
            }
            Kind::Lossy => {
                let patience = Duration::from_secs(rng.random_range(5..=30));
                for t in &mut tunings {
                    t.patience = patience;
                }
                // Mostly while traffic flows, often longer than patience.
                for _ in 0..rng.random_range(1..=2) {
                    let at = Duration::from_millis(rng.random_range(200..=5_000));
                    outages.push((at, random_duration(rng, 2 * patience)));
                }
                mix(EVERYTHING, 0.1, 0.1)
            }
            Kind::ClientClose | Kind::ServerClose | Kind::ClientDrop | Kind::ServerDrop => {
                mix(EVERYTHING, 0.1, 0.1)
            }
            Kind::ManySessions => unreachable!("not a two-party kind"),
            // The cutter plays the faults (`run_real`).
            _ => {
                read_pace = REAL_READER_PACE;
                send_pace = REAL_SENDER_PACE;
                mix(&[(FaultKind::Healthy, 1)], 0.0, 0.0)
            }
        };
        // Short links last the whole run: only messages cut in pieces can
        // cross them.
        let storm = if kind == Kind::ShortLinks {
            TIME_LIMIT
        } else if kind.is_real() {
            storm / 8
        } else {
            storm
        };
        let when = |rng: &mut SmallRng| {
            if rng.random_bool(0.5) {
                When::AfterSending
            } else {
                let within = if rng.random_bool(0.5) {
                    Duration::from_millis(500)
                } else {
                    storm
                };
                When::At(random_duration(rng, within))
            }
        };
        let ending = match kind {
            Kind::ClientClose | Kind::ServerClose => Ending::Close {
                side: if kind == Kind::ClientClose {
                    Side::Client
                } else {
                    Side::Server
                },
                when: when(rng),
                keep_reader: rng.random_bool(0.5),
            },
            Kind::ClientDrop | Kind::ServerDrop => Ending::Drop {
                side: if kind == Kind::ClientDrop {
                    Side::Client
                } else {
                    Side::Server
                },
                when: when(rng),
            },
            Kind::Lossy => {
                let side = if rng.random_bool(0.5) {
                    Side::Client
                } else {
                    Side::Server
                };
                if rng.random_bool(0.5) {
                    Ending::Close {
                        side,
                        when: when(rng),
                        keep_reader: rng.random_bool(0.5),
                    }
                } else {
                    Ending::Drop {
                        side,
                        when: when(rng),
                    }
                }
            }
            _ => Ending::Drain,
        };
        let sends = [(); 2].map(|()| {
            (0..rng.random_range(1..=4))
                .map(|_| SendPlan {
                    count: rng.random_range(10..=150),
                    sizes,
                    pace: send_pace,
                    cancel,
                })
                .collect()
        });
        let reads = [(); 2].map(|()| ReadPlan {
            pace: read_pace,
            cancel,
        });
        let configs = Side::BOTH
            .map(|side| tunings[side.index()].config(stream(seed, CONFIG + side.index() as u64)));
        PairPlan {
            kind,
            mix: fault_mix,
            storm,
            link_capacity,
            tunings,
            configs,
            sends,
            reads,
            ending,
            outages,
            expect: Expect {
                transient: kind != Kind::Lossy,
                ends: !matches!(ending, Ending::Drain),
            },
        }
    }

    /// The parameters that shape a run, for failure messages.
    fn describe(&self) -> String {
        let counts = self
            .sends
            .each_ref()
            .map(|s| s.iter().map(|p| p.count).collect::<Vec<_>>());
        format!(
            "ending {:?}, storm {:?}, outages {:?}, link capacity {}, client sends {:?}, server sends {:?}, client {:?}, server {:?}",
            self.ending,
            self.storm,
            self.outages,
            self.link_capacity,
            counts[0],
            counts[1],
            self.tunings[0],
            self.tunings[1]
        )
    }
}

/// One side's application: its senders, its reader, and one sender handle
/// kept for `close()` and the counters.
struct Party {
    ctl: Option<StableSender<Msg>>,
    senders: Vec<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
}

impl Party {
    fn start(
        board: &Arc<Board>,
        side: Side,
        conduit: StableConduit<Msg>,
        plan: &PairPlan,
        seed: u64,
    ) -> Party {
        board.observe(side, conduit.state_changes());
        let (tx, rx) = conduit.split();
        let base = 16 * side.index() as u64;
        let senders = plan.sends[side.index()]
            .iter()
            .enumerate()
            .map(|(task, send)| {
                let seed = stream(seed, SENDERS + base + task as u64);
                spawn_sender(board, side, task as u32, tx.clone(), *send, seed)
            })
            .collect();
        let reader_seed = stream(seed, READERS + base);
        let reader = spawn_reader(board, side, rx, plan.reads[side.index()], reader_seed);
        Party {
            ctl: Some(tx),
            senders,
            reader: Some(reader),
        }
    }

    fn drop_reader(&mut self, board: &Board, side: Side) {
        board.side_update(side, |s| {
            if s.reader == Reader::Reading {
                s.reader = Reader::Dropped;
            }
        });
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }

    fn drop_everything(&mut self, board: &Board, side: Side) {
        self.drop_reader(board, side);
        for sender in self.senders.drain(..) {
            sender.abort();
        }
        self.ctl = None;
    }

    fn close(&self, board: &Arc<Board>, side: Side) {
        let ctl = self.ctl.clone().expect("the closing side keeps its handle");
        let board = board.clone();
        board.side_update(side, |s| s.close_requested = true);
        tokio::spawn(async move {
            let closed = ctl.close().await.map_err(|e| e.to_string());
            board.side_update(side, |s| s.close = Some(closed));
        });
    }
}

async fn run_pair(plan: PairPlan, seed: u64) -> Result<String, String> {
    let started = Instant::now();
    let faults = Faults::new(stream(seed, FAULTS), plan.mix.clone(), plan.storm);
    let board = Board::new(plan.sends[0].len(), plan.sends[1].len());
    let (listener, connector) = mem::listener_with_config(MemConfig {
        capacity: plan.link_capacity,
        ..MemConfig::default()
    });
    let server = Server::<Msg>::new(
        FaultListener::new(listener, faults.clone()),
        plan.configs[1].clone(),
    );
    let connector = FaultConnector::new(connector, faults.clone());
    for &(at, length) in &plan.outages {
        let faults = faults.clone();
        tokio::spawn(async move {
            sleep(at).await;
            faults.outage(length);
        });
    }
    let stuck_after = if plan.kind == Kind::ShortLinks {
        // Cut in pieces, the largest message crosses in a few links.
        Duration::from_secs(20)
    } else {
        STUCK_AFTER
    };
    let driven = timeout(TIME_LIMIT, async {
        tokio::select! {
            biased;
            driven = drive(&plan, seed, &board, &server, connector) => driven,
            () = stuck(&board, stuck_after) => {
                Err(format!("no progress for {stuck_after:?} of virtual time"))
            }
        }
    })
    .await;
    let record = board.snapshot();
    let context = || {
        format!(
            "{} | {} | faults {:?}",
            summary(&record),
            plan.describe(),
            faults.log()
        )
    };
    let stats = match driven {
        Ok(Ok(stats)) => stats,
        Ok(Err(e)) => return Err(format!("{e} | {}", context())),
        Err(_) => {
            return Err(format!(
                "did not finish within {TIME_LIMIT:?} of virtual time | {}",
                context()
            ))
        }
    };
    let problems = check(
        &record,
        stats.each_ref().map(Option::as_ref),
        &faults.log(),
        plan.expect,
    );
    if !problems.is_empty() {
        return Err(format!("{} | {}", problems.join("; "), context()));
    }
    Ok(format!(
        "{} after {:?}: {record:?}; stats {stats:?}; server {:?}; faults {:?}",
        plan.kind.name(),
        started.elapsed(),
        server.stats(),
        faults.log()
    ))
}

/// A run over real sockets lasts at most this long (real time).
const REAL_TIME_LIMIT: Duration = Duration::from_secs(45);
/// A real run with no progress for this long (real time) is stuck.
const REAL_STUCK_AFTER: Duration = Duration::from_secs(20);

/// The two-party drain over `transport`, on the real clock: the client's
/// links cut by budgets drawn from the seed, and all at once at a few
/// seeded moments, until the storm ends; then new links are left alone.
async fn run_real(plan: PairPlan, transport: Transport, seed: u64) -> Result<String, String> {
    let started = Instant::now();
    let rng = &mut SmallRng::seed_from_u64(stream(seed, FAULTS));
    let cuts = FaultConfig {
        seed: rng.random(),
        mean_bytes_between_cuts: rng.random_range(8 * 1024..=128 * 1024),
        handshake_cut_probability: rng.random_range(0.0..0.3),
        max_connection_age: None,
    };
    let cut_alls: Vec<Duration> = (0..rng.random_range(0..=3))
        .map(|_| random_duration(rng, plan.storm))
        .collect();
    let board = Board::new(plan.sends[0].len(), plan.sends[1].len());
    let mut fx = transport.fixture().await;
    let server = Server::<Msg>::new(fx.listener(), plan.configs[1].clone());
    let cutter = fx.cutting(cuts.clone()).await;
    for at in cut_alls.clone() {
        let cutter = cutter.clone();
        tokio::spawn(async move {
            sleep(at).await;
            cutter.cut_all();
        });
    }
    {
        let (cutter, storm) = (cutter.clone(), plan.storm);
        tokio::spawn(async move {
            sleep(storm).await;
            cutter.calm();
        });
    }
    let driven = timeout(REAL_TIME_LIMIT, async {
        tokio::select! {
            biased;
            driven = drive(&plan, seed, &board, &server, cutter.clone()) => driven,
            () = stuck(&board, REAL_STUCK_AFTER) => {
                Err(format!("no progress for {REAL_STUCK_AFTER:?}"))
            }
        }
    })
    .await;
    let record = board.snapshot();
    let cut = cutter.stats();
    let context = || {
        format!(
            "{} | {} | {transport}: cuts {cuts:?} at {cut_alls:?}, cutter {cut:?}",
            summary(&record),
            plan.describe(),
        )
    };
    let stats = match driven {
        Ok(Ok(stats)) => stats,
        Ok(Err(e)) => return Err(format!("{e} | {}", context())),
        Err(_) => {
            return Err(format!(
                "did not finish within {REAL_TIME_LIMIT:?} | {}",
                context()
            ))
        }
    };
    // The cutter only cuts: nothing silences a live link.
    let log = FaultLog {
        links: u32::try_from(cut.connections).unwrap_or(u32::MAX),
        cuts: u32::try_from(cut.cuts).unwrap_or(u32::MAX),
        ..FaultLog::default()
    };
    let problems = check(
        &record,
        stats.each_ref().map(Option::as_ref),
        &log,
        plan.expect,
    );
    if !problems.is_empty() {
        return Err(format!("{} | {}", problems.join("; "), context()));
    }
    Ok(format!(
        "{} after {:?}: {record:?}; stats {stats:?}; server {:?}; cutter {cut:?}",
        plan.kind.name(),
        started.elapsed(),
        server.stats(),
    ))
}

/// Connects, runs the traffic and the ending; the final counters of each
/// side that kept a handle.
async fn drive(
    plan: &PairPlan,
    seed: u64,
    board: &Arc<Board>,
    server: &Server<Msg>,
    connector: impl Connector,
) -> Result<[Option<Stats>; 2], String> {
    let client = match StableConduit::<Msg>::connect(connector, plan.configs[0].clone()).await {
        Ok(client) => client,
        // Only an outage may keep the first connection from succeeding.
        Err(e) if !plan.expect.transient => {
            board.side_update(Side::Client, |s| s.lost = Some(e.to_string()));
            return Ok([None, None]);
        }
        Err(e) => return Err(format!("connect failed: {e}")),
    };
    // The client's application starts at once: the server hands the
    // session out only once the client proved it holds its key, by a frame.
    let client = Party::start(board, Side::Client, client, plan, seed);
    let session = tokio::select! {
        biased;
        session = server.accept() => session.ok_or("the server stopped accepting")?,
        () = board.wait(|r| r.side(Side::Client).is_lost()) => {
            // Lost before the server could hand the session out.
            return Ok([client.ctl.as_ref().map(StableSender::stats), None]);
        }
    };
    let mut parties = [
        client,
        Party::start(board, Side::Server, session, plan, seed),
    ];
    let transient = plan.expect.transient;
    let all_done = |r: &Record| {
        r.sides.iter().all(SideRecord::done)
            || !r.violations.is_empty()
            || (transient && r.settled_loss())
    };
    match plan.ending {
        Ending::Drain => {
            board
                .wait(|r| {
                    r.drained()
                        || !r.violations.is_empty()
                        || r.settled_loss()
                        || r.sides.iter().any(|s| s.reader != Reader::Reading)
                })
                .await;
        }
        Ending::Close {
            side,
            when,
            keep_reader,
        } => {
            reach(board, side, when).await;
            let party = &mut parties[side.index()];
            if !keep_reader {
                party.drop_reader(board, side);
            }
            party.close(board, side);
            board.wait(all_done).await;
        }
        Ending::Drop { side, when } => {
            reach(board, side, when).await;
            parties[side.index()].drop_everything(board, side);
            board.wait(all_done).await;
        }
    }
    Ok(parties
        .each_ref()
        .map(|p| p.ctl.as_ref().map(StableSender::stats)))
}

/// Resolves once the run made no progress for `limit`.
async fn stuck(board: &Board, limit: Duration) {
    let mut last = (board.snapshot().progress(), Instant::now());
    loop {
        sleep(limit / 4).await;
        let now = board.snapshot().progress();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= limit {
            return;
        }
    }
}

async fn reach(board: &Board, side: Side, when: When) {
    match when {
        When::At(at) => sleep(at).await,
        When::AfterSending => {
            board.wait(|r| r.side(side).senders_running == 0).await;
        }
    }
}

/// One client of the many-sessions kind: what it sends and how it ends.
struct EchoClient {
    id: u32,
    config: Config,
    start: Duration,
    lens: Vec<usize>,
    close: bool,
}

/// A server with a few hundred sessions. Each client sends a few messages,
/// checks that they come back exactly once, in order, intact and from its
/// own session, and then closes or drops its conduit; each server session
/// echoes until the end of its stream. Links are cut at random, alone and
/// all at once.
async fn run_many(seed: u64) -> Result<String, String> {
    let started = Instant::now();
    let rng = &mut SmallRng::seed_from_u64(stream(seed, PARAMS));
    let storm = Duration::from_millis(rng.random_range(1_000..=10_000));
    let weights = [
        (FaultKind::Healthy, 6),
        (FaultKind::Cut, 3),
        (FaultKind::CutInBatch, 1),
        (FaultKind::BlackHole, 1),
        (FaultKind::SwallowClose, 1),
    ];
    let faults = Faults::new(stream(seed, FAULTS), mix(&weights, 0.02, 0.02), storm);
    let (listener, connector) = mem::listener(rng.random_range(4..=64));
    let server = Server::<Msg>::new(
        FaultListener::new(listener, faults.clone()),
        Tuning::draw(rng).config(stream(seed, CONFIG)),
    );
    let connector = FaultConnector::new(connector, faults.clone());
    for _ in 0..rng.random_range(0..=3) {
        let (at, faults) = (random_duration(rng, storm), faults.clone());
        tokio::spawn(async move {
            sleep(at).await;
            faults.outage(Duration::ZERO);
        });
    }
    let clients: Vec<EchoClient> = (0..rng.random_range(100..=300))
        .map(|id| EchoClient {
            id,
            config: Tuning::draw(rng).config(stream(seed, CONFIG + 1 + u64::from(id))),
            start: random_duration(rng, Duration::from_secs(3)),
            lens: (0..rng.random_range(1..=8))
                .map(|_| rng.random_range(0..=512))
                .collect(),
            close: rng.random_bool(0.6),
        })
        .collect();
    let expected: Vec<u64> = clients.iter().map(|c| c.lens.len() as u64).collect();
    let body = async {
        let (stop, stopped) = oneshot::channel();
        let acceptor = tokio::spawn(accept_echoes(server, stopped));
        let running: Vec<_> = clients
            .into_iter()
            .map(|client| tokio::spawn(echo_client(client, connector.clone())))
            .collect();
        let mut problems = Vec::new();
        let mut reconnects = 0;
        for client in running {
            match client.await.expect("client task") {
                Ok(n) => reconnects += n,
                Err(e) => problems.push(e),
            }
        }
        let _ = stop.send(());
        let (server, echoes) = acceptor.await.expect("acceptor task");
        let mut echoed = vec![None; expected.len()];
        for echo in echoes {
            match echo.await.expect("echo task") {
                Ok((origin, count)) => match echoed.get_mut(origin as usize) {
                    Some(slot @ None) => *slot = Some(count),
                    _ => problems.push(format!(
                        "a second server session, or an unknown one, for client {origin}"
                    )),
                },
                Err(e) => problems.push(e),
            }
        }
        for (id, (got, want)) in echoed.iter().zip(&expected).enumerate() {
            if *got != Some(*want) {
                problems.push(format!(
                    "the server session of client {id} echoed {got:?} messages, not {want}"
                ));
            }
        }
        (problems, reconnects, server.stats())
    };
    let (problems, reconnects, server_stats) = timeout(TIME_LIMIT, body).await.map_err(|_| {
        format!(
            "did not finish within {TIME_LIMIT:?} of virtual time | faults {:?}",
            faults.log()
        )
    })?;
    if !problems.is_empty() {
        let shown: Vec<_> = problems.iter().take(5).cloned().collect();
        return Err(format!(
            "{} problem(s): {} | {} clients, storm {storm:?}, faults {:?}",
            problems.len(),
            shown.join("; "),
            expected.len(),
            faults.log()
        ));
    }
    Ok(format!(
        "many_sessions after {:?}: {} clients, {reconnects} reconnects; server {server_stats:?}; faults {:?}",
        started.elapsed(),
        expected.len(),
        faults.log()
    ))
}

/// Hands every session the server accepts to an echo task, until stopped.
async fn accept_echoes(
    server: Server<Msg>,
    mut stop: oneshot::Receiver<()>,
) -> (Server<Msg>, Vec<JoinHandle<Result<(u32, u64), String>>>) {
    let mut echoes = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => return (server, echoes),
            session = server.accept() => match session {
                Some(session) => echoes.push(tokio::spawn(echo(session))),
                None => return (server, echoes),
            },
        }
    }
}

/// Echoes a session's messages until its stream ends: the client's id and
/// how many messages it sent.
async fn echo(session: StableConduit<Msg>) -> Result<(u32, u64), String> {
    let (tx, mut rx) = session.split();
    let mut origin = None;
    let mut count = 0;
    loop {
        let msg = match rx.recv().await {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                return origin
                    .map(|o| (o, count))
                    .ok_or_else(|| "a server session ended without a message".to_string())
            }
            Err(e) => {
                return Err(format!(
                    "the server session of client {origin:?}: recv: {e}"
                ))
            }
        };
        let from = *origin.get_or_insert(msg.origin);
        if msg.origin != from || msg.index != count || msg.damage().is_some() {
            return Err(format!(
                "the server session of client {from} received origin {} index {} (expected index {count}){}",
                msg.origin,
                msg.index,
                msg.damage().map(|d| format!(": {d}")).unwrap_or_default()
            ));
        }
        count += 1;
        match tx.send(&msg).await {
            // The client closed: nothing more goes back.
            Ok(()) | Err(Error::PeerClosed) => {}
            Err(e) => return Err(format!("the server session of client {from}: send: {e}")),
        }
    }
}

/// One client's life: its reconnects, or what went wrong.
async fn echo_client(client: EchoClient, connector: FaultConnector) -> Result<u64, String> {
    let id = client.id;
    let fail = |what: &str, e: Error| format!("client {id}: {what}: {e}");
    sleep(client.start).await;
    let conduit = StableConduit::<Msg>::connect(connector, client.config)
        .await
        .map_err(|e| fail("connect", e))?;
    let (tx, mut rx) = conduit.split();
    for (index, len) in client.lens.iter().enumerate() {
        tx.send(&Msg::new(id, 0, index as u64, *len))
            .await
            .map_err(|e| fail("send", e))?;
    }
    for index in 0..client.lens.len() as u64 {
        match rx.recv().await {
            Ok(Some(msg)) if msg.origin == id && msg.index == index && msg.damage().is_none() => {}
            Ok(Some(msg)) => {
                return Err(format!(
                    "client {id} expected its echo {index}, got origin {} index {}{}",
                    msg.origin,
                    msg.index,
                    msg.damage().map(|d| format!(": {d}")).unwrap_or_default()
                ))
            }
            Ok(None) => return Err(format!("client {id}: the stream ended before echo {index}")),
            Err(e) => return Err(fail("recv", e)),
        }
    }
    let reconnects = tx.stats().reconnects;
    if client.close {
        tx.close().await.map_err(|e| fail("close", e))?;
        match rx.recv().await {
            Ok(None) => {}
            other => return Err(format!("client {id}: after close, recv gave {other:?}")),
        }
    }
    Ok(reconnects)
}
