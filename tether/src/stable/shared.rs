//! What one stable session's application handles and its driver task share,
//! and the session's lifecycle: handles, the close, the end, and the stats.
//!
//! The send side (`send.rs`) and the receive side (`recv.rs`) add their own
//! methods to [`Shared`]; the loop that runs one link is in `attach.rs`.
//!
//! Lifecycle: a session is open until it ends for good, either *closed*
//! (both sides finished the close handshake, or a close found everything
//! delivered both ways) or *lost* (see [`SessionLost`]). A close starts on
//! `close()`, when every handle is dropped, or when the peer's close frame
//! arrives; from then on `send` refuses new messages, and the close runs
//! over this link or the next ones, bounded as a whole by `close_timeout`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use tether_proto::frame::{INITIAL_RECV_WINDOW, RECV_ITEM_COST};
use tether_proto::{decode_payload, ext, Control, Incoming, ReplayBuffer, Seq};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::budget::MemoryBudget;
use super::config::Config;
use super::events::{ConduitEvent, EventHub};
use super::inbox::Inbox;
use super::{ConduitState, Stats};
use crate::bare::Arena;
use crate::error::{Error, SessionLost};
use crate::throttle::{throttled, Throttle};

/// Session losses logged per second at most, over every session.
static LOST_LOG: Throttle = Throttle::new(20);

/// Consumed bytes a session gathers before it releases them to the budget.
const RELEASE_BATCH: usize = 32 * 1024;

/// How a session ended for good.
#[derive(Debug, Clone)]
pub(crate) enum Terminal {
    Lost(SessionLost),
    Closed,
}

/// Which end of the session this is: the close handshake differs (the
/// server completes it first and keeps a tombstone; the client completes it
/// on the server's word).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Client,
    Server,
}

/// The send side, guarded by one short-lived lock that is never held across
/// an await.
pub(crate) struct SendSide {
    pub(super) replay: ReplayBuffer,
    /// Next seq to write on the current link.
    pub(super) cursor: Seq,
    /// One past the highest seq ever handed to a link: frames before it
    /// that a resume sends again are replays; later ones are first sends.
    pub(super) written_until: Seq,
    /// A close began: no new sends.
    pub(super) closing: bool,
    /// The seq of this side's close frame, once it is queued behind the
    /// data (only with the close extension).
    pub(super) fin: Option<Seq>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) reconnects: AtomicU64,
    pub(super) frames_sent: AtomicU64,
    pub(super) frames_received: AtomicU64,
    pub(super) frames_replayed: AtomicU64,
    pub(super) bytes_replayed: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) keepalive_timeouts: AtomicU64,
    /// Pongs that answered no outstanding ping (forged, replayed, or late
    /// for a ping a newer one replaced): they refresh nothing.
    pub(crate) unsolicited_pongs: AtomicU64,
    /// Links dropped because nothing arrived for the idle timeout (no
    /// keepalive).
    pub(crate) idle_timeouts: AtomicU64,
    /// Base-format links dropped because a send waited for an ack for a
    /// keepalive interval: the resume's hellos trim the replay buffer.
    pub(crate) ack_stalls: AtomicU64,
    pub(super) max_replay_bytes: AtomicUsize,
    pub(super) undelivered: AtomicU64,
    /// Resumes with proof of possession that verified.
    pub(crate) proof_resumes: AtomicU64,
}

/// What the handles and the driver of one session share.
pub(crate) struct Shared {
    pub(super) role: Role,
    pub(super) send: Padded<Mutex<SendSide>>,
    /// Messages are serialized here, outside the send lock, and split off;
    /// frames share its chunks.
    pub(super) arena: Padded<Mutex<Arena>>,
    /// Wakes the writer when a frame is pushed (one waiter: `notify_one`).
    pub(super) writer_wake: Notify,
    /// A sender woke the writer for frames it has not taken yet: later
    /// senders need not (see [`Shared::poke_writer`]). Cleared by the
    /// writer under the send lock when it takes a batch.
    pub(super) writer_poked: AtomicBool,
    /// Wakes senders blocked on a full replay buffer. In an `Arc` so that a
    /// sender's registration can outlive one poll (`SpaceWait`).
    pub(super) space_wake: Arc<Notify>,
    /// Wakes the reader blocked on a full receive queue (base format only).
    pub(super) queue_space: Notify,
    /// Last seq the application consumed, as `1 << 32 | seq`, 0 for none.
    pub(super) consumed: AtomicU64,
    /// The highest ack the peer has been told on the current link (same
    /// encoding), so consumers know when to wake the writer for an ack.
    pub(super) ack_told: AtomicU64,
    /// Extensions negotiated on the current link.
    pub(super) extensions: AtomicU8,
    /// Extensions of the first link; every later link must agree, since
    /// frames are encoded for them before they are written.
    session_extensions: OnceLock<u8>,
    pub(super) ack_every: u32,
    pub(super) ack_delay: Duration,
    /// The peer's announced replay bound (0: not announced): acks go out by
    /// half of it.
    pub(super) peer_window_frames: AtomicU32,
    pub(super) peer_window_bytes: AtomicU32,
    /// The peer's announced receive bound, in the units of
    /// [`item_cost`](Shared::item_cost): what this side keeps unacknowledged
    /// stays below it (but for one message). [`INITIAL_RECV_WINDOW`] until
    /// the peer's first window frame; `usize::MAX` if its window frames
    /// announce none.
    pub(super) peer_recv_bytes: AtomicUsize,
    /// Bytes consumed since the peer was last told an ack.
    pub(super) unacked_bytes: AtomicUsize,
    /// Our own bound, announced to the peer.
    pub(super) window: (u32, u32),
    pub(super) keepalive_interval: Duration,
    pub(super) keepalive_timeout: Duration,
    /// Without keepalive: a link on which nothing arrives for this long is
    /// dropped.
    pub(super) idle_timeout: Duration,
    close_timeout: Duration,
    /// With `PROOF`: the session's public id (the client's, which a
    /// restart replaces).
    pub(crate) session_id: Mutex<Option<tether_proto::SessionId>>,
    /// Tests only ([`Config::record_secrets_for_tests`]): every resume
    /// secret the client held.
    pub(crate) secret_log: Option<Mutex<Vec<[u8; 32]>>>,
    pub(super) max_message_size: usize,
    pub(super) fragment_size: usize,
    /// Time base for the atomics below.
    epoch: Instant,
    /// The outstanding ping's nonce (`1 << 32 | nonce`, 0 for none) and
    /// its send time (µs since `epoch`). Only a pong with that nonce counts.
    pub(super) ping_nonce: AtomicU64,
    pub(super) ping_sent_us: AtomicU64,
    /// Draws the ping nonces, so that a peer cannot answer a ping it did
    /// not read.
    pub(super) ping_rng: Mutex<SmallRng>,
    /// When the last pong that answered a ping (or the link's start) was
    /// seen, µs since `epoch`.
    pub(super) last_pong_us: AtomicU64,
    /// Without keepalive: when the reader last got anything from the link
    /// (or the link started, or the reader resumed reading), µs since
    /// `epoch`.
    pub(super) last_rx_us: AtomicU64,
    /// The reader stopped reading because the application is behind (base
    /// format): the link is not idle meanwhile.
    pub(super) reader_paused: AtomicBool,
    /// Base format: since when (µs since `epoch`, 0 for not) a `send` has
    /// been waiting for room with no frame freed since; `stall_wake` tells
    /// the watchdog it started.
    pub(super) send_stalled_us: AtomicU64,
    pub(super) stall_wake: Notify,
    /// Smoothed round-trip time in µs; 0 until the first sample.
    srtt_us: AtomicU64,
    /// A pong to send: `1 << 32 | nonce`, 0 for none.
    pub(super) pong_due: AtomicU64,
    /// What the items delivered to the inbox and not yet consumed hold, in
    /// the units of [`item_cost`](Shared::item_cost).
    pub(super) queued_bytes: AtomicUsize,
    /// Our receive bound (announced to the peer in window frames).
    pub(super) max_queued_bytes: usize,
    /// The server-wide memory budget this session's buffers count against.
    pub(super) budget: Option<Arc<MemoryBudget>>,
    /// Consumed bytes not yet released to the budget: consumed items are
    /// released in batches.
    pub(super) recv_unreleased: AtomicUsize,
    /// Received items on their way to the application.
    pub(crate) inbox: Padded<Inbox>,
    /// The seq of the peer's close frame once it arrived (same encoding as
    /// `consumed`).
    pub(super) peer_fin: AtomicU64,
    /// The close began because the peer's close frame arrived, not on
    /// this side's word: sends are refused with `Error::PeerClosed`
    /// rather than `Error::Closed`. Set once, with `closing`.
    peer_closed: AtomicBool,
    /// When the close must be complete; set once, when it begins.
    close_deadline: OnceLock<Instant>,
    close_begun: Notify,
    /// Live application handles (senders and the receiver); the last one
    /// dropped starts the close.
    handles: AtomicUsize,
    terminal: OnceLock<Terminal>,
    state: watch::Sender<ConduitState>,
    pub(crate) events: EventHub,
    /// Client: how long an attached link may stay silent while this side
    /// waits for an answer before the conduit reports itself stalled.
    pub(super) stall_timeout: Duration,
    /// Client: the application asked for a new link now.
    pub(crate) reconnect_request: Notify,
    /// Client: the stall watch wants a ping now, ahead of the keepalive
    /// schedule, to learn whether a quiet link still answers.
    pub(super) probe_requested: AtomicBool,
    /// Once the session is lost: the messages the peer never acknowledged,
    /// encoded, oldest first, until the application takes them.
    undelivered_items: Mutex<Vec<bytes::Bytes>>,
    pub(crate) counters: Counters,
}

impl Drop for Shared {
    /// Whatever the session still holds leaves the budget with it (a
    /// runtime shut down under it, or items nobody consumed).
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            let replay = lock(&self.send).replay.bytes();
            let queued = self.queued_bytes.load(Ordering::Acquire);
            let pending = self.recv_unreleased.load(Ordering::Acquire);
            budget.release(replay + queued + pending);
        }
    }
}

/// A value alone in its cache lines (128 bytes: two lines, for CPUs that
/// fetch them in pairs), so that the threads that write it (a lock taken
/// by the sender, the writer and the reader in turn) do not evict the
/// fields around it, which others read on every message.
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

pub(super) fn lock(m: &Mutex<SendSide>) -> MutexGuard<'_, SendSide> {
    // A panic while holding the lock cannot leave the replay buffer half
    // updated in a way that matters more than losing the session would.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) fn encode_seq(seq: Option<Seq>) -> u64 {
    seq.map_or(0, |s| (1u64 << 32) | u64::from(s.0))
}

pub(super) fn decode_seq(v: u64) -> Option<Seq> {
    (v >> 32 != 0).then_some(Seq(v as u32))
}

impl Shared {
    pub(crate) fn new(
        config: &Config,
        role: Role,
        initial: ConduitState,
        budget: Option<Arc<MemoryBudget>>,
    ) -> Arc<Shared> {
        // Reproducible nonces for seeded (test) configurations, drawn from a
        // stream of their own; unpredictable ones otherwise.
        let ping_rng = match config.seed {
            Some(seed) => SmallRng::seed_from_u64(seed ^ 0x7069_6e67_5f72_6e67 ^ role as u64),
            None => SmallRng::from_os_rng(),
        };
        Arc::new(Shared {
            session_id: Mutex::new(None),
            secret_log: config.record_secrets.then(|| Mutex::new(Vec::new())),
            role,
            send: Padded(Mutex::new(SendSide {
                replay: ReplayBuffer::with_limits(
                    config.initial_seq,
                    config.max_replay_bytes,
                    config.max_replay_frames,
                ),
                cursor: config.initial_seq,
                written_until: config.initial_seq,
                closing: false,
                fin: None,
            })),
            arena: Padded(Mutex::new(Arena::new())),
            writer_wake: Notify::new(),
            writer_poked: AtomicBool::new(false),
            space_wake: Arc::new(Notify::new()),
            queue_space: Notify::new(),
            consumed: AtomicU64::new(0),
            ack_told: AtomicU64::new(0),
            extensions: AtomicU8::new(0),
            session_extensions: OnceLock::new(),
            ack_every: config.ack_every,
            ack_delay: config.ack_delay,
            peer_window_frames: AtomicU32::new(0),
            peer_window_bytes: AtomicU32::new(0),
            peer_recv_bytes: AtomicUsize::new(INITIAL_RECV_WINDOW),
            unacked_bytes: AtomicUsize::new(0),
            window: (
                u32::try_from(config.max_replay_frames).unwrap_or(u32::MAX),
                u32::try_from(config.max_replay_bytes).unwrap_or(u32::MAX),
            ),
            keepalive_interval: config.keepalive_interval,
            keepalive_timeout: config.keepalive_timeout,
            idle_timeout: config.idle_timeout,
            close_timeout: config.close_timeout,
            max_message_size: config.max_message_size,
            fragment_size: config.fragment_size,
            epoch: Instant::now(),
            ping_nonce: AtomicU64::new(0),
            ping_sent_us: AtomicU64::new(0),
            ping_rng: Mutex::new(ping_rng),
            last_pong_us: AtomicU64::new(0),
            last_rx_us: AtomicU64::new(0),
            reader_paused: AtomicBool::new(false),
            send_stalled_us: AtomicU64::new(0),
            stall_wake: Notify::new(),
            srtt_us: AtomicU64::new(0),
            pong_due: AtomicU64::new(0),
            queued_bytes: AtomicUsize::new(0),
            max_queued_bytes: config.max_recv_queue_bytes,
            budget,
            recv_unreleased: AtomicUsize::new(0),
            inbox: Padded(Inbox::default()),
            peer_fin: AtomicU64::new(0),
            peer_closed: AtomicBool::new(false),
            close_deadline: OnceLock::new(),
            close_begun: Notify::new(),
            handles: AtomicUsize::new(0),
            terminal: OnceLock::new(),
            state: watch::Sender::new(initial),
            events: EventHub::default(),
            stall_timeout: config.stall_timeout,
            reconnect_request: Notify::new(),
            probe_requested: AtomicBool::new(false),
            undelivered_items: Mutex::new(Vec::new()),
            counters: Counters::default(),
        })
    }

    /// Extensions negotiated on the current link.
    pub(super) fn extensions(&self) -> u8 {
        self.extensions.load(Ordering::Acquire)
    }

    /// Whether standalone acks are on for the current link.
    pub(super) fn acks_negotiated(&self) -> bool {
        self.extensions() & ext::ACKS != 0
    }

    /// Records the extensions of a new link. The first link fixes them for
    /// the session; a later link that negotiates others breaks it.
    pub(super) fn set_extensions(&self, extensions: u8) -> Result<(), SessionLost> {
        let first = *self.session_extensions.get_or_init(|| extensions);
        if first != extensions {
            return Err(SessionLost::Protocol(format!(
                "extensions {extensions:#04x} negotiated on a resume, {first:#04x} before"
            )));
        }
        self.extensions.store(extensions, Ordering::Release);
        Ok(())
    }

    pub(crate) fn terminal(&self) -> Option<&Terminal> {
        self.terminal.get()
    }

    pub(super) fn terminal_error(&self) -> Option<Error> {
        self.terminal.get().map(|t| match t {
            Terminal::Lost(reason) => Error::SessionLost(reason.clone()),
            Terminal::Closed => self.closed_error(),
        })
    }

    /// What a send after the close began fails with: who closed first.
    pub(super) fn closed_error(&self) -> Error {
        if self.peer_closed.load(Ordering::Acquire) {
            Error::PeerClosed
        } else {
            Error::Closed
        }
    }

    /// A new application handle (a sender clone or the receiver).
    pub(crate) fn handle_added(&self) {
        self.handles.fetch_add(1, Ordering::Relaxed);
    }

    /// An application handle is gone; the last one starts the close, as
    /// `close()` would, whatever the link is doing.
    pub(crate) fn handle_dropped(&self) {
        if self.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.begin_close();
        }
    }

    /// Starts the close (once), on this side's word: no new sends; with
    /// the close extension, this side's close frame is queued behind
    /// everything already sent.
    pub(crate) fn begin_close(&self) {
        self.start_close(false);
    }

    /// Starts the close (once), as [`begin_close`](Self::begin_close);
    /// `by_peer` when the peer's close frame is what started it.
    pub(super) fn start_close(&self, by_peer: bool) {
        {
            let mut s = lock(&self.send);
            if s.closing || self.terminal.get().is_some() {
                return;
            }
            s.closing = true;
            self.peer_closed.store(by_peer, Ordering::Release);
            if self.extensions() & ext::CLOSE != 0 {
                let seq = s.replay.next_seq();
                let mut frame = BytesMut::new();
                Control::Close(seq).encode(&mut frame);
                let len = frame.len();
                s.replay.push(frame.freeze());
                s.fin = Some(seq);
                self.replay_resized(0, len);
            }
            let _ = self.close_deadline.set(Instant::now() + self.close_timeout);
        }
        tracing::debug!("closing");
        self.writer_wake.notify_one();
        self.space_wake.notify_waiters();
        self.close_begun.notify_waiters();
    }

    /// Resolves when the close began and its deadline passed.
    pub(super) async fn close_expired(&self) {
        loop {
            let begun = self.close_begun.notified();
            tokio::pin!(begun);
            begun.as_mut().enable();
            if let Some(&at) = self.close_deadline.get() {
                return tokio::time::sleep_until(at).await;
            }
            begun.await;
        }
    }

    /// Whether this side's close frame is queued: a close with the close
    /// handshake began.
    pub(super) fn close_frame_queued(&self) -> bool {
        lock(&self.send).fin.is_some()
    }

    /// The peer's close frame, if it arrived.
    pub(super) fn peer_fin(&self) -> Option<Seq> {
        decode_seq(self.peer_fin.load(Ordering::Acquire))
    }

    /// Both directions are known complete: this side's close frame (and so
    /// everything before it) was acknowledged, and the peer's close frame
    /// arrived (so everything the peer sent did). Nothing is left to lose.
    pub(super) fn delivered_both_ways(&self) -> bool {
        let done = {
            let s = lock(&self.send);
            s.fin.is_some() && s.replay.is_empty()
        };
        done && self.peer_fin().is_some()
    }

    /// Ends the session for good with `reason`, unless nothing was left to
    /// deliver either way, which is a close however it came about.
    pub(crate) fn fail(&self, reason: SessionLost) {
        self.lose(reason, true);
    }

    /// Ends a session nobody ever saw (a server session whose client never
    /// proved its key) as lost, without the warning: there is no one to
    /// tell, and a peer could trigger it at will.
    pub(crate) fn discard(&self, reason: SessionLost) {
        self.lose(reason, false);
    }

    fn lose(&self, reason: SessionLost, warn: bool) {
        if self.delivered_both_ways() {
            tracing::debug!(%reason, "session ends with everything delivered: closed");
            return self.finish();
        }
        let items = self.undelivered_messages();
        let undelivered = items.len() as u64;
        if self.terminal.set(Terminal::Lost(reason.clone())).is_ok() {
            self.counters
                .undelivered
                .store(undelivered, Ordering::Relaxed);
            *self
                .undelivered_items
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = items;
            if warn {
                throttled!(
                    tracing::Level::WARN,
                    LOST_LOG,
                    %reason,
                    undelivered,
                    "stable session lost"
                );
            }
            self.release_buffers();
            self.set_state(ConduitState::Lost);
            self.emit(ConduitEvent::Lost(reason));
        }
        self.space_wake.notify_waiters();
    }

    /// Logs `event` and hands it to the session's listeners.
    pub(crate) fn emit(&self, event: ConduitEvent) {
        self.events.emit(event, self.role == Role::Server);
    }

    /// Takes the messages a lost session's peer never acknowledged.
    pub(crate) fn take_undelivered(&self) -> Vec<bytes::Bytes> {
        std::mem::take(
            &mut *self
                .undelivered_items
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Ends the session gracefully.
    pub(crate) fn finish(&self) {
        if self.terminal.set(Terminal::Closed).is_ok() {
            self.release_buffers();
            self.set_state(ConduitState::Closed);
            self.emit(ConduitEvent::Closed);
        }
        self.space_wake.notify_waiters();
    }

    /// Messages accepted by `send` whose last frame the peer has not
    /// acknowledged, encoded, oldest first.
    ///
    /// Acks report consumption, and a message is consumed whole, so the
    /// replay buffer always starts at a message's first piece: every
    /// message in it can be put back together. A message of one frame is
    /// a slice of it; only a fragmented one is copied.
    fn undelivered_messages(&self) -> Vec<bytes::Bytes> {
        let s = lock(&self.send);
        let mut out = Vec::new();
        let mut pieces: Vec<bytes::Bytes> = Vec::new();
        for (_, frame) in s.replay.iter() {
            match decode_payload(frame, ext::ALL) {
                Ok(Incoming::Fragment { item_offset, .. }) => {
                    pieces.push(frame.slice(item_offset..));
                }
                Ok(Incoming::Data { item_offset, .. }) => {
                    let last = frame.slice(item_offset..);
                    if pieces.is_empty() {
                        out.push(last);
                    } else {
                        let mut whole = BytesMut::new();
                        for piece in pieces.drain(..) {
                            whole.extend_from_slice(&piece);
                        }
                        whole.extend_from_slice(&last);
                        out.push(whole.freeze());
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Frees the replay buffer and the encode arena of a session that ended:
    /// nothing in them can be sent any more.
    fn release_buffers(&self) {
        let mut s = lock(&self.send);
        let next = s.replay.next_seq();
        let held = s.replay.bytes();
        let fresh = ReplayBuffer::with_limits(next, s.replay.max_bytes(), s.replay.max_frames());
        let old = std::mem::replace(&mut s.replay, fresh);
        self.replay_resized(held, 0);
        drop(s);
        drop(old);
        *self.arena.lock().unwrap_or_else(PoisonError::into_inner) = Arena::new();
    }

    /// What a received item of `len` bytes counts for against the receive
    /// bound and the budget: its bytes plus the bookkeeping that holds it
    /// (`RECV_ITEM_COST`, as the peer counts it too).
    pub(super) fn item_cost(len: usize) -> usize {
        len + RECV_ITEM_COST
    }

    /// The replay buffer went from `before` to `after` bytes: the budget
    /// follows (one atomic add; nothing without a budget).
    pub(super) fn replay_resized(&self, before: usize, after: usize) {
        if let Some(budget) = &self.budget {
            if after > before {
                budget.charge(after - before);
            } else {
                budget.release(before - after);
            }
        }
    }

    /// Items of `cost` in all were queued for the application.
    pub(super) fn recv_charge(&self, cost: usize) {
        if let Some(budget) = &self.budget {
            budget.charge(cost);
        }
    }

    /// An item of `cost` was consumed, and the queue holds `left` now: the
    /// budget is released in batches of at least [`RELEASE_BATCH`] bytes,
    /// and in full whenever the queue runs empty.
    pub(super) fn recv_release(&self, cost: usize, left: usize) {
        let Some(budget) = &self.budget else {
            return;
        };
        let pending = self.recv_unreleased.fetch_add(cost, Ordering::AcqRel) + cost;
        if pending >= RELEASE_BATCH || left == 0 {
            budget.release(self.recv_unreleased.swap(0, Ordering::AcqRel));
        }
    }

    /// Waits until the session ended; `Ok` for a graceful end.
    pub(crate) async fn wait_ended(&self) -> Result<(), Error> {
        let mut rx = self.state.subscribe();
        let _ = rx
            .wait_for(|s| matches!(s, ConduitState::Closed | ConduitState::Lost))
            .await;
        match self.terminal_error() {
            Some(Error::Closed | Error::PeerClosed) | None => Ok(()),
            Some(err) => Err(err),
        }
    }

    pub(super) fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Smoothed round-trip time, once a ping was answered.
    pub(crate) fn rtt(&self) -> Option<Duration> {
        match self.srtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Draws the nonce of the next ping and records it as outstanding,
    /// sent now. Only one ping is outstanding at a time.
    pub(super) fn next_ping(&self) -> u32 {
        let nonce = rand::Rng::random::<u32>(
            &mut *self.ping_rng.lock().unwrap_or_else(PoisonError::into_inner),
        );
        self.ping_sent_us.store(self.now_us(), Ordering::Release);
        self.ping_nonce
            .store(encode_seq(Some(Seq(nonce))), Ordering::Release);
        nonce
    }

    /// Whether a ping is waiting for its pong.
    pub(super) fn ping_outstanding(&self) -> bool {
        self.ping_nonce.load(Ordering::Acquire) != 0
    }

    /// A pong arrived. It counts (liveness, a round-trip sample) only if it
    /// carries the outstanding ping's nonce, once: a pong for no ping, a
    /// wrong nonce or a repeated one refreshes nothing. That is not a
    /// protocol violation (a late pong for a ping of an earlier link is
    /// harmless); it is counted and logged at debug level.
    pub(super) fn on_pong(&self, nonce: u32) {
        let answered = self
            .ping_nonce
            .compare_exchange(
                encode_seq(Some(Seq(nonce))),
                0,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if !answered {
            static UNSOLICITED_LOG: Throttle = Throttle::new(10);
            self.counters
                .unsolicited_pongs
                .fetch_add(1, Ordering::Relaxed);
            throttled!(
                tracing::Level::DEBUG,
                UNSOLICITED_LOG,
                nonce,
                "pong answers no outstanding ping: ignored"
            );
            return;
        }
        let now = self.now_us();
        self.last_pong_us.store(now, Ordering::Release);
        {
            let sample = now
                .saturating_sub(self.ping_sent_us.load(Ordering::Acquire))
                .max(1);
            let old = self.srtt_us.load(Ordering::Relaxed);
            // RFC 6298's smoothing: srtt = 7/8 srtt + 1/8 sample.
            let new = if old == 0 {
                sample
            } else {
                (old * 7 + sample) / 8
            };
            self.srtt_us.store(new.max(1), Ordering::Relaxed);
        }
    }

    pub(crate) fn set_state(&self, state: ConduitState) {
        let old = self.state.send_replace(state);
        if old != state {
            tracing::debug!(?old, new = ?state, "conduit state");
        }
    }

    pub(crate) fn state(&self) -> ConduitState {
        *self.state.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<ConduitState> {
        self.state.subscribe()
    }

    pub(crate) fn stats(&self) -> Stats {
        let (replay_frames, replay_bytes) = {
            let s = lock(&self.send);
            (s.replay.len(), s.replay.bytes())
        };
        let c = &self.counters;
        Stats {
            state: self.state(),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            frames_sent: c.frames_sent.load(Ordering::Relaxed),
            frames_received: c.frames_received.load(Ordering::Relaxed),
            frames_replayed: c.frames_replayed.load(Ordering::Relaxed),
            bytes_replayed: c.bytes_replayed.load(Ordering::Relaxed),
            duplicates_dropped: c.duplicates.load(Ordering::Relaxed),
            replay_frames,
            replay_bytes,
            recv_queue_bytes: self.queued_bytes.load(Ordering::Relaxed),
            max_replay_bytes: c.max_replay_bytes.load(Ordering::Relaxed),
            keepalive_timeouts: c.keepalive_timeouts.load(Ordering::Relaxed),
            unsolicited_pongs: c.unsolicited_pongs.load(Ordering::Relaxed),
            idle_timeouts: c.idle_timeouts.load(Ordering::Relaxed),
            ack_stalls: c.ack_stalls.load(Ordering::Relaxed),
            rtt: self.rtt(),
            undelivered: c.undelivered.load(Ordering::Relaxed),
            proof_resumes: c.proof_resumes.load(Ordering::Relaxed),
        }
    }
}
