//! A fault-injecting link around `tether::link::mem`, with a fault plan per
//! link drawn from the run's seed.
//!
//! [`FaultConnector`] wraps a `MemConnector` and [`FaultListener`] a
//! `MemListener`. Both share one [`Faults`], which draws a [`LinkPlan`] for
//! every link the client side opens, in connect order, from a seeded RNG: a
//! seed replays the same plans. The connector sends the link's id as its
//! first payload; the listener consumes it before the server sees the link,
//! so both ends of a link share one plan and one state.
//!
//! Every payload crosses the inner link behind an 8-byte delivery time
//! (virtual microseconds), stamped by the sending end: the receiving end
//! holds it until then, which gives exact latency and lets a payload (and,
//! in order, everything behind it) arrive late. Sent payloads are queued
//! until `flush`, as on a stream link, and judged one by one when flushed:
//! delivered, or swallowed (a black hole, or a link about to die). A cut
//! takes effect when the fatal payload would have arrived, so what was sent
//! before it still arrives; a payload in flight when a link dies is lost.
//!
//! Faults are only planned during the *storm*, a window at the start of the
//! run; links opened later are healthy, so faults that are transient by
//! construction let the session recover.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tether::link::mem::{MemConnector, MemLink, MemListener, MemRx, MemTx};
use tether::link::{Connector, Link, LinkError, LinkRx, LinkTx, Listener, Ready};
use tether::proto::{decode_payload, Control, Incoming};
use tokio::sync::{mpsc, Notify};
use tokio::time::{sleep, sleep_until, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A direction of travel on a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

impl Dir {
    fn index(self) -> usize {
        self as usize
    }
}

/// Which directions a black hole swallows.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Dirs {
    One(Dir),
    Both,
}

impl Dirs {
    fn covers(self, dir: Dir) -> bool {
        match self {
            Dirs::One(d) => d == dir,
            Dirs::Both => true,
        }
    }
}

/// What goes wrong on one link. Payloads are counted over both directions
/// from 1 (the client's hello is payload 1).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fault {
    Healthy,
    /// The link dies at the `at`-th payload, which never arrives.
    Cut {
        at: u32,
    },
    /// The first flush of more than `after` payloads delivers `after` of
    /// them, and the link dies.
    CutInBatch {
        after: u32,
    },
    /// The link dies at the payload that takes it over `budget` bytes.
    CutBytes {
        budget: usize,
    },
    /// From the `at`-th payload on, payloads going `dirs` are accepted and
    /// never delivered (nor is a reset or end of stream); the link dies
    /// `dies_after` later, or never, and then only keepalive finds it.
    BlackHole {
        at: u32,
        dirs: Dirs,
        dies_after: Option<Duration>,
    },
    /// At the `at`-th payload the link freezes silently both ways for `dur`.
    Stall {
        at: u32,
        dur: Duration,
    },
    /// The `at`-th payload, and in order everything behind it, arrives
    /// `dur` late.
    Hold {
        at: u32,
        dur: Duration,
    },
    /// The `nth` frame of the close handshake (a side's close frame, or the
    /// server's "closed") is swallowed, nothing passes after it, and the
    /// link dies `dies_after` later.
    SwallowClose {
        nth: u32,
        dies_after: Duration,
    },
}

/// The fault kinds a [`FaultMix`] weighs against each other.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FaultKind {
    Healthy,
    Cut,
    CutInBatch,
    CutBytes,
    BlackHole,
    Stall,
    Hold,
    SwallowClose,
}

/// Which faults a run plans, how often, and how long they last.
#[derive(Clone, Debug)]
pub(crate) struct FaultMix {
    /// Relative weights of the fault a link opened during the storm gets.
    pub(crate) weights: Vec<(FaultKind, u32)>,
    /// Chance that a connect attempt during the storm starts a period of
    /// refused connects, and the longest such period.
    pub(crate) refuse: (f64, Duration),
    /// Chance that the listener hands a link to the server late, around
    /// `late_by` (set it to the client's handshake timeout: the client gives
    /// up on the link and retries while its hello is still on the way).
    pub(crate) late_accept: f64,
    pub(crate) late_by: Duration,
    /// Longest one-way latency of a link (drawn per link, storm or not).
    pub(crate) max_latency: Duration,
    /// Longest stall, hold, or wait of a dying black hole.
    pub(crate) max_silence: Duration,
    /// Range of `CutBytes` budgets (drawn log-uniformly).
    pub(crate) byte_budget: (usize, usize),
}

/// The plan of one link.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LinkPlan {
    pub(crate) fault: Fault,
    pub(crate) latency: Duration,
    /// The listener holds the link this long before the server gets it.
    pub(crate) late_accept: Option<Duration>,
}

/// What the faults did in a run: links opened, connects refused, and the
/// planned faults that fired.
#[derive(Clone, Debug, Default)]
pub(crate) struct FaultLog {
    pub(crate) links: u32,
    pub(crate) refused: u32,
    pub(crate) late_accepts: u32,
    pub(crate) cuts: u32,
    pub(crate) black_holes: u32,
    pub(crate) stalls: u32,
    pub(crate) holds: u32,
    pub(crate) swallowed_closes: u32,
    pub(crate) swallowed: u32,
    /// Outages ([`Faults::outage`]): every live link killed at once.
    pub(crate) mass_kills: u32,
}

impl FaultLog {
    /// Whether any fault that can silence a live link fired.
    pub(crate) fn silenced(&self) -> bool {
        self.black_holes + self.stalls + self.holds + self.swallowed_closes > 0
    }
}

/// The fault source of one run, shared by its connector and listener.
#[derive(Clone)]
pub(crate) struct Faults {
    shared: Arc<Mutex<Planner>>,
    log: Arc<Mutex<FaultLog>>,
    /// Time base of the delivery stamps.
    epoch: Instant,
}

struct Planner {
    rng: SmallRng,
    mix: FaultMix,
    storm_end: Instant,
    refuse_until: Option<Instant>,
    next_id: u64,
    /// Links opened by the connector and not yet claimed by the listener.
    unclaimed: HashMap<u64, Arc<LinkState>>,
    live: Vec<Weak<LinkState>>,
}

impl Faults {
    /// Faults drawn from `seed`, planned while the storm (from now, for
    /// `storm`) lasts.
    pub(crate) fn new(seed: u64, mix: FaultMix, storm: Duration) -> Self {
        let now = Instant::now();
        Faults {
            shared: Arc::new(Mutex::new(Planner {
                rng: SmallRng::seed_from_u64(seed),
                mix,
                storm_end: now + storm,
                refuse_until: None,
                next_id: 0,
                unclaimed: HashMap::new(),
                live: Vec::new(),
            })),
            log: Arc::default(),
            epoch: now,
        }
    }

    pub(crate) fn log(&self) -> FaultLog {
        lock(&self.log).clone()
    }

    /// Kills every live link now, and refuses connects for `refuse` (an
    /// outage, whether or not the storm lasts).
    pub(crate) fn outage(&self, refuse: Duration) {
        let live: Vec<_> = {
            let mut p = lock(&self.shared);
            let until = Instant::now() + refuse;
            p.refuse_until = Some(p.refuse_until.map_or(until, |u| u.max(until)));
            p.live.iter().filter_map(Weak::upgrade).collect()
        };
        lock(&self.log).mass_kills += 1;
        for link in live {
            link.kill();
        }
    }

    /// Decides whether a connect attempt is refused.
    fn admit(&self) -> Result<(), LinkError> {
        let now = Instant::now();
        let mut p = lock(&self.shared);
        if now < p.storm_end && p.refuse_until.is_none_or(|u| now >= u) {
            let (chance, longest) = p.mix.refuse;
            if p.rng.random_bool(chance) {
                let dur = random_duration(&mut p.rng, longest);
                p.refuse_until = Some(now + dur);
            }
        }
        if p.refuse_until.is_some_and(|u| now < u) {
            drop(p);
            lock(&self.log).refused += 1;
            return Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into());
        }
        Ok(())
    }

    /// Plans a link the connector just opened and registers it for the
    /// listener.
    fn open(&self) -> (u64, Arc<LinkState>) {
        let mut p = lock(&self.shared);
        let plan = p.draw();
        let id = p.next_id;
        p.next_id += 1;
        let link = Arc::new(LinkState {
            plan,
            killed: AtomicBool::new(false),
            kill_wake: Notify::new(),
            rx_gone: Mutex::default(),
            log: self.log.clone(),
            epoch: self.epoch,
            progress: Mutex::new(Progress::default()),
        });
        p.unclaimed.insert(id, link.clone());
        p.live.retain(|l| l.strong_count() > 0);
        p.live.push(Arc::downgrade(&link));
        drop(p);
        lock(&self.log).links += 1;
        (id, link)
    }

    fn claim(&self, id: u64) -> Option<Arc<LinkState>> {
        lock(&self.shared).unclaimed.remove(&id)
    }
}

impl Planner {
    fn draw(&mut self) -> LinkPlan {
        let rng = &mut self.rng;
        let latency = random_duration(rng, self.mix.max_latency);
        if Instant::now() >= self.storm_end {
            return LinkPlan {
                fault: Fault::Healthy,
                latency,
                late_accept: None,
            };
        }
        let late_accept = rng.random_bool(self.mix.late_accept).then(|| {
            // Around the client's handshake timeout, either side of it.
            let spread = Duration::from_millis(100);
            self.mix.late_by.saturating_sub(spread) + random_duration(rng, 2 * spread)
        });
        let total: u32 = self.mix.weights.iter().map(|(_, w)| w).sum();
        let mut pick = rng.random_range(0..total.max(1));
        let kind = self
            .mix
            .weights
            .iter()
            .find(|(_, w)| {
                let hit = pick < *w;
                pick = pick.saturating_sub(*w);
                hit
            })
            .map_or(FaultKind::Healthy, |(k, _)| *k);
        let silence = self.mix.max_silence;
        let fault = match kind {
            FaultKind::Healthy => Fault::Healthy,
            FaultKind::Cut => Fault::Cut {
                at: payload_index(rng),
            },
            FaultKind::CutInBatch => Fault::CutInBatch {
                after: rng.random_range(1..=4),
            },
            FaultKind::CutBytes => {
                // Log-uniform: short links as often as long ones.
                let (low, high) = self.mix.byte_budget;
                let budget = low as f64 * (high as f64 / low as f64).powf(rng.random());
                Fault::CutBytes {
                    budget: budget as usize,
                }
            }
            FaultKind::BlackHole => Fault::BlackHole {
                at: payload_index(rng),
                dirs: match rng.random_range(0..3) {
                    0 => Dirs::One(Dir::Up),
                    1 => Dirs::One(Dir::Down),
                    _ => Dirs::Both,
                },
                dies_after: rng.random_bool(0.7).then(|| random_duration(rng, silence)),
            },
            FaultKind::Stall => Fault::Stall {
                at: payload_index(rng),
                dur: random_duration(rng, silence),
            },
            FaultKind::Hold => Fault::Hold {
                at: payload_index(rng),
                dur: random_duration(rng, silence),
            },
            FaultKind::SwallowClose => Fault::SwallowClose {
                nth: rng.random_range(1..=3),
                dies_after: random_duration(rng, silence),
            },
        };
        LinkPlan {
            fault,
            latency,
            late_accept,
        }
    }
}

/// A payload index, often within the handshake and the first frames.
fn payload_index(rng: &mut SmallRng) -> u32 {
    if rng.random_bool(0.3) {
        rng.random_range(1..=6)
    } else {
        rng.random_range(1..=120)
    }
}

/// Uniform in `[0, max]`, in whole microseconds.
pub(crate) fn random_duration(rng: &mut SmallRng, max: Duration) -> Duration {
    Duration::from_micros(rng.random_range(0..=max.as_micros() as u64))
}

/// What happens to one payload.
enum Verdict {
    Deliver { at: Instant },
    Swallow,
}

/// The state both ends of one link share.
struct LinkState {
    plan: LinkPlan,
    /// A killed link fails every call on both ends; what was in flight is
    /// lost. (The inner links are never killed themselves: a `MemKiller`
    /// wakes its waiters in an order that is not reproducible.)
    killed: AtomicBool,
    kill_wake: Notify,
    /// Per direction: when the receiving end dropped its half. The sending
    /// end's inner link notices at once; it reports the reset only when the
    /// news would have crossed the link, after what was sent before it.
    rx_gone: Mutex<[Option<Instant>; 2]>,
    log: Arc<Mutex<FaultLog>>,
    epoch: Instant,
    progress: Mutex<Progress>,
}

#[derive(Default)]
struct Progress {
    payloads: u32,
    bytes: usize,
    /// Frames of the close handshake seen.
    closes: u32,
    /// Per direction: swallowing everything.
    holed: [bool; 2],
    frozen_until: Option<Instant>,
}

impl LinkState {
    fn kill(&self) {
        if !self.killed.swap(true, Ordering::SeqCst) {
            self.kill_wake.notify_waiters();
        }
    }

    fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// Resolves once the link is killed.
    async fn wait_killed(&self) {
        loop {
            let wake = self.kill_wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if self.is_killed() {
                return;
            }
            wake.await;
        }
    }

    fn kill_after(self: &Arc<Self>, delay: Duration) {
        let link = Arc::downgrade(self);
        tokio::spawn(async move {
            sleep(delay).await;
            if let Some(link) = link.upgrade() {
                link.kill();
            }
        });
    }

    fn holed(&self, dir: Dir) -> bool {
        lock(&self.progress).holed[dir.index()]
    }

    fn count(&self, what: impl FnOnce(&mut FaultLog)) {
        what(&mut lock(&self.log));
    }

    /// Judges the next payload going `dir`; `pos` is its place in the
    /// current flush of `batch` payloads.
    fn judge(self: &Arc<Self>, dir: Dir, payload: &[u8], pos: usize, batch: usize) -> Verdict {
        let now = Instant::now();
        let mut p = lock(&self.progress);
        if p.holed[dir.index()] {
            drop(p);
            self.count(|l| l.swallowed += 1);
            return Verdict::Swallow;
        }
        p.payloads += 1;
        p.bytes += payload.len();
        if is_close_frame(payload) {
            p.closes += 1;
        }
        let mut at = now + self.plan.latency;
        match self.plan.fault {
            Fault::Cut { at: n } if p.payloads == n => return self.fire_kill(p),
            Fault::CutInBatch { after } if batch > after as usize && pos == after as usize => {
                return self.fire_kill(p);
            }
            Fault::CutBytes { budget } if p.bytes > budget => return self.fire_kill(p),
            Fault::BlackHole {
                at: n,
                dirs,
                dies_after,
            } if p.payloads == n => {
                for d in [Dir::Up, Dir::Down] {
                    p.holed[d.index()] = dirs.covers(d);
                }
                drop(p);
                self.count(|l| l.black_holes += 1);
                if let Some(delay) = dies_after {
                    self.kill_after(delay);
                }
                if dirs.covers(dir) {
                    self.count(|l| l.swallowed += 1);
                    return Verdict::Swallow;
                }
            }
            Fault::SwallowClose { nth, dies_after }
                if p.closes == nth && is_close_frame(payload) =>
            {
                p.holed = [true, true];
                drop(p);
                self.count(|l| {
                    l.swallowed_closes += 1;
                    l.swallowed += 1;
                });
                self.kill_after(dies_after);
                return Verdict::Swallow;
            }
            Fault::Stall { at: n, dur } if p.payloads == n => {
                p.frozen_until = Some(now + dur);
                drop(p);
                self.count(|l| l.stalls += 1);
            }
            Fault::Hold { at: n, dur } if p.payloads == n => {
                at += dur;
                drop(p);
                self.count(|l| l.holds += 1);
            }
            _ => {}
        }
        Verdict::Deliver { at }
    }

    /// The link dies as this payload would have arrived: what was sent
    /// before it still arrives, nothing sent from now on does.
    fn fire_kill(self: &Arc<Self>, mut progress: MutexGuard<'_, Progress>) -> Verdict {
        progress.holed = [true, true];
        drop(progress);
        self.count(|l| l.cuts += 1);
        self.kill_after(self.plan.latency + Duration::from_micros(1));
        Verdict::Swallow
    }

    /// Waits until `at` (if any) has come and the link is not frozen.
    /// `false` if the link was killed meanwhile.
    async fn wait_until(&self, at: Option<Instant>) -> bool {
        loop {
            if self.is_killed() {
                return false;
            }
            let frozen = lock(&self.progress).frozen_until;
            let Some(until) = at.into_iter().chain(frozen).max() else {
                return true;
            };
            if until <= Instant::now() {
                return true;
            }
            tokio::select! {
                biased;
                () = self.wait_killed() => return false,
                () = sleep_until(until) => {}
            }
        }
    }

    /// Returns `err`, which the inner link reported going `dir`, once the
    /// news of the receiving end's drop would have arrived.
    async fn reset_news(&self, dir: Dir, err: LinkError) -> LinkError {
        let gone = lock(&self.rx_gone)[dir.index()];
        if let Some(gone) = gone {
            tokio::select! {
                biased;
                () = self.wait_killed() => {}
                () = sleep_until(gone + self.plan.latency + Duration::from_micros(1)) => {}
            }
        }
        err
    }

    fn stamp(&self, at: Instant, payload: &[u8]) -> Bytes {
        let mut framed = BytesMut::with_capacity(8 + payload.len());
        framed.put_u64_le(at.duration_since(self.epoch).as_micros() as u64);
        framed.put_slice(payload);
        framed.freeze()
    }

    fn unstamp(&self, mut framed: Bytes) -> (Instant, Bytes) {
        let at = self.epoch + Duration::from_micros(framed.get_u64_le());
        (at, framed)
    }
}

/// Whether `payload` is a frame of the close handshake.
fn is_close_frame(payload: &[u8]) -> bool {
    matches!(
        decode_payload(payload, u8::MAX),
        Ok(Incoming::Control(Control::Close(_) | Control::Closed(_)))
    )
}

/// One end of a faulty link.
pub(crate) struct FaultLink {
    tx: FaultTx,
    rx: FaultRx,
}

impl FaultLink {
    fn new(tx: MemTx, rx: MemRx, link: Arc<LinkState>, out: Dir) -> Self {
        let into = match out {
            Dir::Up => Dir::Down,
            Dir::Down => Dir::Up,
        };
        FaultLink {
            tx: FaultTx {
                inner: tx,
                link: link.clone(),
                dir: out,
                queue: VecDeque::new(),
                ready: None,
                failed: false,
            },
            rx: FaultRx {
                inner: rx,
                link,
                dir: into,
                held: None,
                failed: false,
                max_payload: usize::MAX,
            },
        }
    }
}

impl Link for FaultLink {
    type Tx = FaultTx;
    type Rx = FaultRx;

    fn split(self) -> (FaultTx, FaultRx) {
        (self.tx, self.rx)
    }
}

/// The error of a half of a killed link: a reset, then dead.
fn failure(failed: &mut bool) -> LinkError {
    if std::mem::replace(failed, true) {
        LinkError::Dead
    } else {
        LinkError::Reset
    }
}

pub(crate) struct FaultTx {
    inner: MemTx,
    link: Arc<LinkState>,
    dir: Dir,
    /// Fed, not yet flushed.
    queue: VecDeque<Bytes>,
    /// Judged for delivery and stamped, not yet handed to the inner link
    /// (kept across a cancelled flush).
    ready: Option<Bytes>,
    failed: bool,
}

impl FaultTx {
    fn killed(&mut self) -> LinkError {
        self.queue.clear();
        self.ready = None;
        failure(&mut self.failed)
    }

    /// Whether this direction is a black hole: nothing gets through, not
    /// even news of a vanished peer.
    fn holed(&self) -> bool {
        self.link.holed(self.dir) && !self.link.is_killed()
    }
}

impl LinkTx for FaultTx {
    async fn feed(&mut self, payload: Bytes) -> Result<(), LinkError> {
        if self.link.is_killed() {
            return Err(self.killed());
        }
        self.queue.push_back(payload);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), LinkError> {
        let batch = self.queue.len();
        let mut pos = 0;
        loop {
            if self.ready.is_none() {
                let Some(payload) = self.queue.pop_front() else {
                    break;
                };
                let verdict = self.link.judge(self.dir, &payload, pos, batch);
                pos += 1;
                match verdict {
                    Verdict::Deliver { at } => self.ready = Some(self.link.stamp(at, &payload)),
                    Verdict::Swallow => continue,
                }
            }
            if !self.link.wait_until(None).await {
                return Err(self.killed());
            }
            let framed = self.ready.clone().expect("set above");
            let fed = tokio::select! {
                biased;
                () = self.link.wait_killed() => return Err(self.killed()),
                fed = self.inner.feed(framed) => fed,
            };
            if let Err(e) = fed {
                return Err(self.link.reset_news(self.dir, e).await);
            }
            self.ready = None;
        }
        if self.link.is_killed() {
            return Err(self.killed());
        }
        if self.holed() {
            return Ok(());
        }
        match self.inner.flush().await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.link.reset_news(self.dir, e).await),
        }
    }

    async fn close(&mut self) -> Result<(), LinkError> {
        self.flush().await?;
        if self.holed() {
            return Ok(());
        }
        self.inner.close().await
    }
}

pub(crate) struct FaultRx {
    inner: MemRx,
    link: Arc<LinkState>,
    dir: Dir,
    /// Received from the inner link, waiting for its delivery time (kept
    /// across a cancelled recv).
    held: Option<(Bytes, Instant)>,
    failed: bool,
    /// Set by `set_max_payload`; checked on the unstamped payload (the
    /// inner link carries the stamp too).
    max_payload: usize,
}

impl Drop for FaultRx {
    fn drop(&mut self) {
        lock(&self.link.rx_gone)[self.dir.index()].get_or_insert_with(Instant::now);
    }
}

impl LinkRx for FaultRx {
    async fn recv(&mut self) -> Result<Option<Bytes>, LinkError> {
        loop {
            if self.failed {
                return Err(LinkError::Dead);
            }
            if self.link.is_killed() {
                // What was in flight is lost.
                self.held = None;
                return Err(failure(&mut self.failed));
            }
            if let Some((_, at)) = &self.held {
                if self.link.wait_until(Some(*at)).await {
                    return Ok(self.held.take().map(|(payload, _)| payload));
                }
                continue;
            }
            let got = tokio::select! {
                biased;
                () = self.link.wait_killed() => continue,
                got = self.inner.recv() => got,
            };
            if self.link.holed(self.dir) && !matches!(got, Ok(Some(_))) {
                // A reset or end of stream does not cross a black hole
                // either: silence until the link is killed.
                self.link.wait_killed().await;
                continue;
            }
            match got? {
                Some(framed) => {
                    let (at, payload) = self.link.unstamp(framed);
                    if payload.len() > self.max_payload {
                        self.failed = true;
                        return Err(LinkError::TooLarge {
                            len: payload.len(),
                            max: self.max_payload,
                        });
                    }
                    self.held = Some((payload, at));
                }
                None => return Ok(None),
            }
        }
    }

    fn set_max_payload(&mut self, max: usize) {
        self.max_payload = max;
    }
}

/// Opens links through a `MemConnector`, each with a plan from [`Faults`].
#[derive(Clone)]
pub(crate) struct FaultConnector {
    inner: MemConnector,
    faults: Faults,
}

impl FaultConnector {
    pub(crate) fn new(inner: MemConnector, faults: Faults) -> Self {
        FaultConnector { inner, faults }
    }
}

impl Connector for FaultConnector {
    type Link = FaultLink;

    async fn connect(&self) -> Result<FaultLink, LinkError> {
        self.faults.admit()?;
        let mem = self.inner.connect().await?;
        let (id, link) = self.faults.open();
        let (mut tx, rx) = mem.split();
        tx.send(Bytes::copy_from_slice(&id.to_le_bytes())).await?;
        Ok(FaultLink::new(tx, rx, link, Dir::Up))
    }
}

/// Accepts the links of a [`FaultConnector`] from a `MemListener`, each
/// with the plan the connector drew for it.
pub(crate) struct FaultListener {
    accepted: mpsc::UnboundedReceiver<FaultLink>,
}

impl FaultListener {
    /// Starts taking links from `inner` (within a runtime).
    pub(crate) fn new(mut inner: MemListener, faults: Faults) -> Self {
        let (to_server, accepted) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Ready(mem)) = inner.accept().await {
                tokio::spawn(hand_over(mem, faults.clone(), to_server.clone()));
            }
        });
        FaultListener { accepted }
    }
}

/// Reads a new link's id, finds its plan, and hands the link to the
/// server, late if so planned.
async fn hand_over(mem: MemLink, faults: Faults, to_server: mpsc::UnboundedSender<FaultLink>) {
    let (tx, mut rx) = mem.split();
    let Ok(Some(tag)) = rx.recv().await else {
        return;
    };
    let Some(link) = <[u8; 8]>::try_from(&tag[..])
        .ok()
        .and_then(|id| faults.claim(u64::from_le_bytes(id)))
    else {
        return;
    };
    if let Some(delay) = link.plan.late_accept {
        link.count(|l| l.late_accepts += 1);
        sleep(delay).await;
    }
    let _ = to_server.send(FaultLink::new(tx, rx, link, Dir::Down));
}

impl Listener for FaultListener {
    type Link = FaultLink;
    type Pending = Ready<FaultLink>;

    async fn accept(&mut self) -> Result<Ready<FaultLink>, LinkError> {
        match self.accepted.recv().await {
            Some(link) => Ok(Ready(link)),
            // No connector is left: no link will ever come.
            None => std::future::pending().await,
        }
    }
}
