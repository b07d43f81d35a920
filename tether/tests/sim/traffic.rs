//! Traffic with checkable content, the record of what each side's
//! application sent and received, and the checks of a finished run.
//!
//! A message carries its origin (which side sent it), its sender task, its
//! index within that task, and a checksum of those and its length; its body
//! is derived from the checksum. A receiver checks each message as it
//! arrives: right origin, intact, and the next index of its task (nothing
//! lost, duplicated or reordered). A message counts as *accepted* only once
//! `send` returned `Ok`; a cancelled send is retried with the same index,
//! so a cancelled send that was queued anyway shows up as a duplicate.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tether::{ConduitState, Error, StableReceiver, StableSender, Stats};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};

use crate::fault::{random_duration, FaultLog};

/// One side of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

impl Side {
    pub(crate) const BOTH: [Side; 2] = [Side::Client, Side::Server];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn peer(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Server => "server",
        })
    }
}

/// A message whose every field can be checked by its receiver.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Msg {
    pub(crate) origin: u32,
    pub(crate) task: u32,
    pub(crate) index: u64,
    pub(crate) check: u64,
    /// `len` bytes derived from `check`; a `String` so that it is encoded
    /// and decoded in one piece.
    pub(crate) body: String,
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// A seed for a separate random stream, derived from a run's seed.
pub(crate) fn stream(seed: u64, name: u64) -> u64 {
    mix(seed ^ mix(name))
}

const BODY_BLOCK: usize = 61;

fn block(check: u64) -> [u8; BODY_BLOCK] {
    const ALPHABET: &[u8; 64] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";
    std::array::from_fn(|i| ALPHABET[(mix(check ^ i as u64) % 64) as usize])
}

impl Msg {
    pub(crate) fn new(origin: u32, task: u32, index: u64, len: usize) -> Msg {
        let check = Msg::checksum(origin, task, index, len);
        let block = block(check);
        let mut body = String::from_utf8(block.to_vec())
            .expect("ASCII")
            .repeat(len.div_ceil(BODY_BLOCK));
        body.truncate(len);
        Msg {
            origin,
            task,
            index,
            check,
            body,
        }
    }

    fn checksum(origin: u32, task: u32, index: u64, len: usize) -> u64 {
        mix(mix(u64::from(origin) << 32 | u64::from(task)) ^ mix(index) ^ len as u64)
    }

    /// Why this message is not what its sender made, if it is not.
    pub(crate) fn damage(&self) -> Option<String> {
        let len = self.body.len();
        if self.check != Msg::checksum(self.origin, self.task, self.index, len) {
            return Some(format!(
                "checksum mismatch (origin {} task {} index {} len {len})",
                self.origin, self.task, self.index
            ));
        }
        let block = block(self.check);
        let intact = self
            .body
            .as_bytes()
            .chunks(BODY_BLOCK)
            .all(|chunk| chunk == &block[..chunk.len()]);
        (!intact).then(|| format!("body corrupted (task {} index {})", self.task, self.index))
    }
}

/// Message sizes: mostly small, some of kilobytes, a few large.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sizes {
    /// Chance of a large message (32 KiB up to `max_large`).
    pub(crate) large: f64,
    pub(crate) max_large: usize,
}

impl Sizes {
    fn draw(self, rng: &mut SmallRng) -> usize {
        let r: f64 = rng.random();
        if r < self.large {
            rng.random_range(32 * 1024..=self.max_large.max(32 * 1024))
        } else if r < 0.08 {
            rng.random_range(1024..32 * 1024)
        } else if r < 0.35 {
            rng.random_range(64..1024)
        } else {
            rng.random_range(0..64)
        }
    }
}

/// Pauses between operations: short ones often, long ones rarely.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pace {
    pub(crate) chance: f64,
    pub(crate) max: Duration,
    pub(crate) long_chance: f64,
    pub(crate) max_long: Duration,
}

impl Pace {
    async fn pause(self, rng: &mut SmallRng) {
        if rng.random_bool(self.long_chance) {
            sleep(random_duration(rng, self.max_long)).await;
        } else if rng.random_bool(self.chance) {
            sleep(random_duration(rng, self.max)).await;
        }
    }
}

/// What one sender task sends.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SendPlan {
    pub(crate) count: u64,
    pub(crate) sizes: Sizes,
    pub(crate) pace: Pace,
    /// Chance that a send is given a short deadline and cancelled at it.
    pub(crate) cancel: f64,
}

/// How one side's application reads.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReadPlan {
    pub(crate) pace: Pace,
    /// Chance that a receive is given a short deadline and cancelled at it.
    pub(crate) cancel: f64,
}

/// The longest deadline of a cancelled send or receive.
const MAX_CANCEL_AFTER: Duration = Duration::from_millis(20);

/// Where a side's reader stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reader {
    Reading,
    /// `recv` returned `Ok(None)`: the peer closed.
    Ended,
    /// `recv` returned `SessionLost`.
    Lost(String),
    /// The application dropped its receiver.
    Dropped,
}

/// What one side's application did and saw.
#[derive(Clone, Debug)]
pub(crate) struct SideRecord {
    /// Per own sender task: messages accepted by `send`.
    pub(crate) accepted: Vec<u64>,
    /// Per peer sender task: messages received (always a prefix, checked
    /// on arrival).
    pub(crate) received: Vec<u64>,
    pub(crate) senders_running: usize,
    pub(crate) reader: Reader,
    /// What `close()` returned, once it did.
    pub(crate) close: Option<Result<(), String>>,
    pub(crate) close_requested: bool,
    /// The conduit's state, as last seen.
    pub(crate) state: ConduitState,
    /// The first session loss any handle of this side reported.
    pub(crate) lost: Option<String>,
    pub(crate) cancelled_sends: u64,
    pub(crate) cancelled_recvs: u64,
    /// Sends that returned `Closed` (and stopped their task).
    pub(crate) refused_sends: u64,
}

impl SideRecord {
    fn new(own_tasks: usize, peer_tasks: usize) -> Self {
        SideRecord {
            accepted: vec![0; own_tasks],
            received: vec![0; peer_tasks],
            senders_running: 0,
            reader: Reader::Reading,
            close: None,
            close_requested: false,
            state: ConduitState::Connecting,
            lost: None,
            cancelled_sends: 0,
            cancelled_recvs: 0,
            refused_sends: 0,
        }
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.is_some() || self.state == ConduitState::Lost
    }

    pub(crate) fn ended(&self) -> bool {
        matches!(self.state, ConduitState::Closed | ConduitState::Lost)
    }

    /// Sends and receives have stopped, `close()` (if called) returned, and
    /// the session ended.
    pub(crate) fn done(&self) -> bool {
        self.ended()
            && self.senders_running == 0
            && self.reader != Reader::Reading
            && (self.close.is_some() || !self.close_requested)
    }
}

/// Everything one run's applications did, and what went wrong on the way.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub(crate) sides: [SideRecord; 2],
    pub(crate) violations: Vec<String>,
}

impl Record {
    pub(crate) fn side(&self, side: Side) -> &SideRecord {
        &self.sides[side.index()]
    }

    /// Every accepted message was received, both ways, and no sender runs.
    pub(crate) fn drained(&self) -> bool {
        Side::BOTH.iter().all(|&s| {
            let (me, peer) = (self.side(s), self.side(s.peer()));
            me.senders_running == 0 && me.accepted == peer.received
        })
    }

    /// Changes whenever a message is accepted or received, a session or a
    /// reader ends, or a close returns.
    pub(crate) fn progress(&self) -> (u64, usize) {
        let messages = self
            .sides
            .iter()
            .flat_map(|s| s.accepted.iter().chain(&s.received))
            .sum();
        let endings = self
            .sides
            .iter()
            .flat_map(|s| [s.ended(), s.reader != Reader::Reading, s.close.is_some()])
            .filter(|&ended| ended)
            .count();
        (messages, endings)
    }

    pub(crate) fn any_lost(&self) -> bool {
        self.sides.iter().any(SideRecord::is_lost)
    }

    /// A side lost the session and its reader has seen it (or is gone), so
    /// the reason is on record.
    pub(crate) fn settled_loss(&self) -> bool {
        self.sides
            .iter()
            .any(|s| s.is_lost() && s.reader != Reader::Reading)
    }
}

/// How often a waiter looks at the conduits' states, which change
/// without telling the board.
const STATE_POLL: Duration = Duration::from_millis(250);

/// The shared record of a run, with a wake-up on every change.
pub(crate) struct Board {
    record: Mutex<Record>,
    changed: Notify,
    /// Each side's conduit state, read into the record whenever it is
    /// looked at. (Read, never waited on: a `watch` wakes several waiters in
    /// an order that is not reproducible.)
    states: Mutex<[Option<watch::Receiver<ConduitState>>; 2]>,
}

impl Board {
    pub(crate) fn new(client_tasks: usize, server_tasks: usize) -> Arc<Board> {
        Arc::new(Board {
            record: Mutex::new(Record {
                sides: [
                    SideRecord::new(client_tasks, server_tasks),
                    SideRecord::new(server_tasks, client_tasks),
                ],
                violations: Vec::new(),
            }),
            changed: Notify::new(),
            states: Mutex::new([None, None]),
        })
    }

    /// Follows `side`'s conduit state from now on.
    pub(crate) fn observe(&self, side: Side, states: watch::Receiver<ConduitState>) {
        self.states.lock().unwrap_or_else(PoisonError::into_inner)[side.index()] = Some(states);
        self.changed.notify_waiters();
    }

    fn lock(&self) -> MutexGuard<'_, Record> {
        let mut record = self.record.lock().unwrap_or_else(PoisonError::into_inner);
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        for (side, states) in record.sides.iter_mut().zip(states.iter()) {
            if let Some(states) = states {
                side.state = *states.borrow();
            }
        }
        drop(states);
        record
    }

    pub(crate) fn snapshot(&self) -> Record {
        self.lock().clone()
    }

    pub(crate) fn update<T>(&self, f: impl FnOnce(&mut Record) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed.notify_waiters();
        out
    }

    pub(crate) fn side_update<T>(&self, side: Side, f: impl FnOnce(&mut SideRecord) -> T) -> T {
        self.update(|r| f(&mut r.sides[side.index()]))
    }

    pub(crate) fn violation(&self, what: String) {
        self.update(|r| r.violations.push(what));
    }

    /// Waits until `done` holds for the record.
    pub(crate) async fn wait(&self, done: impl Fn(&Record) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(&self.lock()) {
                return;
            }
            tokio::select! {
                biased;
                () = changed => {}
                () = sleep(STATE_POLL) => {}
            }
        }
    }

    fn lost(&self, side: Side, reason: &dyn fmt::Display) {
        self.side_update(side, |s| {
            s.lost.get_or_insert_with(|| reason.to_string());
        });
    }

    /// Checks a message `side` received and records it.
    fn receive(&self, side: Side, msg: &Msg) {
        let problem = self.update(|r| {
            let peer = side.peer();
            if msg.origin != peer.index() as u32 {
                return Some(format!(
                    "{side} received a message of origin {} (task {} index {}), not from its peer",
                    msg.origin, msg.task, msg.index
                ));
            }
            if let Some(damage) = msg.damage() {
                return Some(format!("{side} received a damaged message: {damage}"));
            }
            let Some(next) = r.sides[side.index()].received.get_mut(msg.task as usize) else {
                return Some(format!(
                    "{side} received a message of unknown {peer} task {}",
                    msg.task
                ));
            };
            if msg.index != *next {
                let what = if msg.index > *next {
                    "lost"
                } else {
                    "duplicated or reordered"
                };
                return Some(format!(
                    "{side} expected index {} of {peer} task {}, got {} ({what})",
                    *next, msg.task, msg.index
                ));
            }
            *next += 1;
            None
        });
        if let Some(problem) = problem {
            self.violation(problem);
        }
    }
}

/// Spawns a sender task of `side`; it sends `plan.count` messages in order
/// and records each accepted one.
pub(crate) fn spawn_sender(
    board: &Arc<Board>,
    side: Side,
    task: u32,
    tx: StableSender<Msg>,
    plan: SendPlan,
    seed: u64,
) -> JoinHandle<()> {
    let board = board.clone();
    board.side_update(side, |s| s.senders_running += 1);
    tokio::spawn(async move {
        // Counts the task out however it ends, aborted included.
        let _running = Running(board.clone(), side);
        let mut rng = SmallRng::seed_from_u64(seed);
        for index in 0..plan.count {
            plan.pace.pause(&mut rng).await;
            let msg = Msg::new(side.index() as u32, task, index, plan.sizes.draw(&mut rng));
            let mut cancel = rng.random_bool(plan.cancel);
            let sent = loop {
                if !cancel {
                    break tx.send(&msg).await;
                }
                cancel = false;
                let deadline = random_duration(&mut rng, MAX_CANCEL_AFTER);
                match timeout(deadline, tx.send(&msg)).await {
                    Ok(sent) => break sent,
                    // Not accepted: the same message goes again.
                    Err(_) => board.side_update(side, |s| s.cancelled_sends += 1),
                }
            };
            match sent {
                Ok(()) => board.side_update(side, |s| s.accepted[task as usize] += 1),
                // After a close began (by either side): not accepted, and
                // nothing more is.
                Err(Error::Closed | Error::PeerClosed) => {
                    return board.side_update(side, |s| s.refused_sends += 1)
                }
                Err(Error::SessionLost(reason)) => return board.lost(side, &reason),
                Err(e) => {
                    return board.violation(format!("{side} task {task}: send failed: {e}"));
                }
            }
        }
    })
}

struct Running(Arc<Board>, Side);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.side_update(self.1, |s| s.senders_running -= 1);
    }
}

/// Spawns `side`'s reader: it checks and records every message until the
/// session ends.
pub(crate) fn spawn_reader(
    board: &Arc<Board>,
    side: Side,
    mut rx: StableReceiver<Msg>,
    plan: ReadPlan,
    seed: u64,
) -> JoinHandle<()> {
    let board = board.clone();
    tokio::spawn(async move {
        let mut rng = SmallRng::seed_from_u64(seed);
        loop {
            plan.pace.pause(&mut rng).await;
            let got = if rng.random_bool(plan.cancel) {
                let deadline = random_duration(&mut rng, MAX_CANCEL_AFTER);
                match timeout(deadline, rx.recv()).await {
                    Ok(got) => got,
                    Err(_) => {
                        board.side_update(side, |s| s.cancelled_recvs += 1);
                        continue;
                    }
                }
            } else {
                rx.recv().await
            };
            let end = match got {
                Ok(Some(msg)) => {
                    board.receive(side, &msg);
                    continue;
                }
                Ok(None) => Reader::Ended,
                Err(Error::SessionLost(reason)) => {
                    board.lost(side, &reason);
                    Reader::Lost(reason.to_string())
                }
                Err(e) => {
                    board.violation(format!("{side}: recv failed: {e}"));
                    Reader::Lost(e.to_string())
                }
            };
            return board.side_update(side, |s| s.reader = end);
        }
    })
}

/// What a run promises.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Expect {
    /// Every fault is transient: no session may be lost, every close must
    /// succeed.
    pub(crate) transient: bool,
    /// The run ends by closing or dropping: every side must end, and a
    /// reader that was kept must see the end of the stream. Otherwise no
    /// stream may end and no send may be refused.
    pub(crate) ends: bool,
}

/// The problems of a finished run; empty if it kept every promise.
/// `stats` are each side's final counters, where a handle was left to read
/// them.
pub(crate) fn check(
    record: &Record,
    stats: [Option<&Stats>; 2],
    faults: &FaultLog,
    expect: Expect,
) -> Vec<String> {
    let mut problems = record.violations.clone();
    for side in Side::BOTH {
        let stats = stats[side.index()];
        check_delivery(record, side, stats, &mut problems);
        check_ending(record.side(side), side, expect, &mut problems);
        check_counters(side, stats, faults, &mut problems);
    }
    problems
}

/// What `side` accepted against what its peer received.
fn check_delivery(record: &Record, side: Side, stats: Option<&Stats>, problems: &mut Vec<String>) {
    let (me, peer) = (record.side(side), record.side(side.peer()));
    let missing: u64 = me
        .accepted
        .iter()
        .zip(&peer.received)
        .map(|(a, r)| a.saturating_sub(*r))
        .sum();
    for (task, (a, r)) in me.accepted.iter().zip(&peer.received).enumerate() {
        if r > a {
            problems.push(format!(
                "{} received {r} messages of {side} task {task}, which had {a} accepted",
                side.peer()
            ));
        }
    }
    // `Ok(None)` means the peer closed: everything it accepted before its
    // close came first, and it accepted nothing after.
    if peer.reader == Reader::Ended && missing > 0 {
        problems.push(format!(
            "{} read to Ok(None) ({side} {:?}), yet {missing} of {side}'s accepted messages never arrived",
            side.peer(),
            me.state
        ));
    }
    // After a loss, what is missing is what the sender reports undelivered
    // at most. (With no handle left to ask, the prefix check is all.)
    let read_to_end = matches!(peer.reader, Reader::Ended | Reader::Lost(_));
    if let Some(undelivered) = stats.map(|s| s.undelivered) {
        if record.any_lost() && read_to_end && missing > undelivered {
            problems.push(format!(
                "{missing} of {side}'s accepted messages never reached {}, but {side} reports only {undelivered} undelivered",
                side.peer()
            ));
        }
    }
}

/// How `side`'s session, reader and close ended.
fn check_ending(me: &SideRecord, side: Side, expect: Expect, problems: &mut Vec<String>) {
    if !expect.ends {
        if me.reader == Reader::Ended {
            problems.push(format!("{side}'s reader got Ok(None), yet nobody closed"));
        }
        if me.refused_sends > 0 {
            problems.push(format!(
                "{} of {side}'s sends returned Closed, yet nobody closed",
                me.refused_sends
            ));
        }
    }
    if !expect.transient {
        return;
    }
    if me.is_lost() {
        let reason = me.lost.as_deref().unwrap_or("state Lost");
        problems.push(format!(
            "{side} lost the session under transient faults: {reason}"
        ));
    }
    if let Some(Err(e)) = &me.close {
        problems.push(format!(
            "{side}'s close() failed under transient faults: {e}"
        ));
    }
    if expect.ends && me.state != ConduitState::Closed {
        problems.push(format!("{side} ended {:?}, not Closed", me.state));
    }
    if expect.ends && !matches!(me.reader, Reader::Ended | Reader::Dropped) {
        problems.push(format!(
            "{side}'s reader ended {:?}, not with Ok(None)",
            me.reader
        ));
    }
}

/// `side`'s counters, where a handle was left to read them.
fn check_counters(
    side: Side,
    stats: Option<&Stats>,
    faults: &FaultLog,
    problems: &mut Vec<String>,
) {
    let Some(s) = stats else {
        return;
    };
    if s.undelivered > 0 && s.state != ConduitState::Lost {
        problems.push(format!(
            "{side} reports {} undelivered, but its session is {:?}, not lost",
            s.undelivered, s.state
        ));
    }
    if s.keepalive_timeouts > 0 && !faults.silenced() {
        problems.push(format!(
            "keepalive declared {} live link(s) of {side} dead, and no fault silenced any link",
            s.keepalive_timeouts
        ));
    }
}

/// A short account of a record, for failure messages.
pub(crate) fn summary(record: &Record) -> String {
    Side::BOTH
        .iter()
        .map(|&side| {
            let s = record.side(side);
            let received_by_peer: u64 = record.side(side.peer()).received.iter().sum();
            format!(
                "{side}: state {:?}, accepted {} (peer received {received_by_peer}), senders running {}, reader {:?}, close {:?}, lost {:?}",
                s.state,
                s.accepted.iter().sum::<u64>(),
                s.senders_running,
                s.reader,
                s.close,
                s.lost,
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
