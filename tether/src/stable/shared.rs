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

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use tether_proto::{decode_payload, ext, Control, Incoming, ReplayBuffer, Seq};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::config::Config;
use super::inbox::Inbox;
use super::{ConduitState, Stats};
use crate::bare::Arena;
use crate::error::{Error, SessionLost};

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
    pub(super) max_replay_bytes: AtomicUsize,
    pub(super) undelivered: AtomicU64,
}

/// What the handles and the driver of one session share.
pub(crate) struct Shared {
    pub(super) role: Role,
    pub(super) send: Mutex<SendSide>,
    /// Messages are serialized here, outside the send lock, and split off;
    /// frames share its chunks.
    pub(super) arena: Mutex<Arena>,
    /// Wakes the writer when a frame is pushed (one waiter: `notify_one`).
    pub(super) writer_wake: Notify,
    /// Wakes senders blocked on a full replay buffer.
    pub(super) space_wake: Notify,
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
    /// Bytes consumed since the peer was last told an ack.
    pub(super) unacked_bytes: AtomicUsize,
    /// Our own bound, announced to the peer.
    pub(super) window: (u32, u32),
    pub(super) keepalive_interval: Duration,
    pub(super) keepalive_timeout: Duration,
    close_timeout: Duration,
    pub(super) max_message_size: usize,
    pub(super) fragment_size: usize,
    /// Time base for the atomics below.
    epoch: Instant,
    /// Nonce and send time (µs since `epoch`) of the last ping.
    pub(super) ping_nonce: AtomicU64,
    pub(super) ping_sent_us: AtomicU64,
    /// When the last pong (or the link's start) was seen, µs since `epoch`.
    pub(super) last_pong_us: AtomicU64,
    /// Smoothed round-trip time in µs; 0 until the first sample.
    srtt_us: AtomicU64,
    /// A pong to send: `1 << 32 | nonce`, 0 for none.
    pub(super) pong_due: AtomicU64,
    /// Bytes delivered to the inbox and not yet consumed.
    pub(super) queued_bytes: AtomicUsize,
    pub(super) max_queued_bytes: usize,
    /// Received items on their way to the application.
    pub(crate) inbox: Inbox,
    /// The seq of the peer's close frame once it arrived (same encoding as
    /// `consumed`).
    pub(super) peer_fin: AtomicU64,
    /// When the close must be complete; set once, when it begins.
    close_deadline: OnceLock<Instant>,
    close_begun: Notify,
    /// Live application handles (senders and the receiver); the last one
    /// dropped starts the close.
    handles: AtomicUsize,
    terminal: OnceLock<Terminal>,
    state: watch::Sender<ConduitState>,
    pub(crate) counters: Counters,
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
    pub(crate) fn new(config: &Config, role: Role, initial: ConduitState) -> Arc<Shared> {
        Arc::new(Shared {
            role,
            send: Mutex::new(SendSide {
                replay: ReplayBuffer::with_limits(
                    config.initial_seq,
                    config.max_replay_bytes,
                    config.max_replay_frames,
                ),
                cursor: config.initial_seq,
                written_until: config.initial_seq,
                closing: false,
                fin: None,
            }),
            arena: Mutex::new(Arena::new()),
            writer_wake: Notify::new(),
            space_wake: Notify::new(),
            queue_space: Notify::new(),
            consumed: AtomicU64::new(0),
            ack_told: AtomicU64::new(0),
            extensions: AtomicU8::new(0),
            session_extensions: OnceLock::new(),
            ack_every: config.ack_every,
            ack_delay: config.ack_delay,
            peer_window_frames: AtomicU32::new(0),
            peer_window_bytes: AtomicU32::new(0),
            unacked_bytes: AtomicUsize::new(0),
            window: (
                u32::try_from(config.max_replay_frames).unwrap_or(u32::MAX),
                u32::try_from(config.max_replay_bytes).unwrap_or(u32::MAX),
            ),
            keepalive_interval: config.keepalive_interval,
            keepalive_timeout: config.keepalive_timeout,
            close_timeout: config.close_timeout,
            max_message_size: config.max_message_size,
            fragment_size: config.fragment_size,
            epoch: Instant::now(),
            ping_nonce: AtomicU64::new(0),
            ping_sent_us: AtomicU64::new(0),
            last_pong_us: AtomicU64::new(0),
            srtt_us: AtomicU64::new(0),
            pong_due: AtomicU64::new(0),
            queued_bytes: AtomicUsize::new(0),
            max_queued_bytes: config.max_recv_queue_bytes,
            inbox: Inbox::default(),
            peer_fin: AtomicU64::new(0),
            close_deadline: OnceLock::new(),
            close_begun: Notify::new(),
            handles: AtomicUsize::new(0),
            terminal: OnceLock::new(),
            state: watch::Sender::new(initial),
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
            Terminal::Closed => Error::Closed,
        })
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

    /// Starts the close (once): no new sends; with the close extension,
    /// this side's close frame is queued behind everything already sent.
    pub(crate) fn begin_close(&self) {
        {
            let mut s = lock(&self.send);
            if s.closing || self.terminal.get().is_some() {
                return;
            }
            s.closing = true;
            if self.extensions() & ext::CLOSE != 0 {
                let seq = s.replay.next_seq();
                let mut frame = BytesMut::new();
                Control::Close(seq).encode(&mut frame);
                s.replay.push(frame.freeze());
                s.fin = Some(seq);
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
    fn delivered_both_ways(&self) -> bool {
        let done = {
            let s = lock(&self.send);
            s.fin.is_some() && s.replay.is_empty()
        };
        done && self.peer_fin().is_some()
    }

    /// Ends the session for good with `reason`, unless nothing was left to
    /// deliver either way, which is a close however it came about.
    pub(crate) fn fail(&self, reason: SessionLost) {
        if self.delivered_both_ways() {
            tracing::debug!(%reason, "session ends with everything delivered: closed");
            return self.finish();
        }
        let undelivered = self.undelivered_messages();
        if self.terminal.set(Terminal::Lost(reason.clone())).is_ok() {
            self.counters
                .undelivered
                .store(undelivered, Ordering::Relaxed);
            tracing::warn!(%reason, undelivered, "stable session lost");
            self.release_buffers();
            self.set_state(ConduitState::Lost);
        }
        self.space_wake.notify_waiters();
    }

    /// Ends the session gracefully.
    pub(crate) fn finish(&self) {
        if self.terminal.set(Terminal::Closed).is_ok() {
            self.release_buffers();
            self.set_state(ConduitState::Closed);
        }
        self.space_wake.notify_waiters();
    }

    /// Messages accepted by `send` whose frames the peer has not
    /// acknowledged (the last pieces of data messages in the replay buffer).
    fn undelivered_messages(&self) -> u64 {
        let s = lock(&self.send);
        s.replay
            .iter()
            .filter(|(_, frame)| {
                matches!(decode_payload(frame, ext::ALL), Ok(Incoming::Data { .. }))
            })
            .count() as u64
    }

    /// Frees the replay buffer and the encode arena of a session that ended:
    /// nothing in them can be sent any more.
    fn release_buffers(&self) {
        let mut s = lock(&self.send);
        let next = s.replay.next_seq();
        s.replay = ReplayBuffer::with_limits(next, s.replay.max_bytes(), s.replay.max_frames());
        drop(s);
        *self.arena.lock().unwrap_or_else(PoisonError::into_inner) = Arena::new();
    }

    /// Waits until the session ended; `Ok` for a graceful end.
    pub(crate) async fn wait_ended(&self) -> Result<(), Error> {
        let mut rx = self.state.subscribe();
        let _ = rx
            .wait_for(|s| matches!(s, ConduitState::Closed | ConduitState::Lost))
            .await;
        match self.terminal_error() {
            Some(Error::Closed) | None => Ok(()),
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

    pub(super) fn on_pong(&self, nonce: u32) {
        let now = self.now_us();
        self.last_pong_us.store(now, Ordering::Release);
        if u64::from(nonce) == self.ping_nonce.load(Ordering::Acquire) {
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
            rtt: self.rtt(),
            undelivered: c.undelivered.load(Ordering::Relaxed),
        }
    }
}
