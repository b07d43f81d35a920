//! The state one stable session shares between the application's handles and
//! its driver task, and the loop that runs one link attachment.
//!
//! Sending: `send` encodes the message once into an arena, behind a gap
//! for the header, outside any lock shared with the driver; then it takes
//! the send lock, writes the header (seq, ack) into the gap, pushes the
//! frozen bytes into the replay buffer and wakes the writer. The replay
//! buffer *is* the outgoing queue: the writer keeps a
//! cursor (next seq to write on the current link) and hands the same `Bytes`
//! to the link. A resume only moves the cursor back to the first frame the
//! peer lacks. A message accepted by `send` is therefore in the buffer before
//! `send` returns, whatever the link is doing, and is written on this link or
//! a later one: no send can race a reconnect.
//!
//! Receiving: the driver's reader decodes the frame header, applies the
//! piggybacked ack to the replay buffer, drops duplicates, and queues the
//! item bytes (a slice of the link's buffer, not a copy) for the application,
//! a batch at a time (`inbox.rs`).
//! Acks report what the application has *consumed*, so a slow reader pushes
//! back on the sender through the sender's replay-buffer bound while the
//! reader task keeps reading the link.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use tether_proto::{
    decode_payload, ext,
    frame::{encode_item, FrameHeader},
    Control, Delivery, Incoming, RecvState, ReplayBuffer, Seq, MAX_HEADER_LEN,
};
use tokio::sync::{mpsc, watch, Notify};

use super::config::Config;
use super::inbox::{Delivered, Inbox};
use super::{ConduitState, Stats};
use crate::bare::Arena;
use crate::error::{Error, SessionLost};
use crate::link::{LinkError, LinkRx, LinkTx};

/// Frames handed to the link per flush at most.
const MAX_BATCH: usize = 256;
/// Bytes handed to the link per flush at most.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Items handed to the receiver per batch at most, and bytes.
const MAX_DELIVER_BATCH: usize = 256;
const MAX_DELIVER_BATCH_BYTES: usize = 256 * 1024;

/// How a session ended for good.
#[derive(Debug, Clone)]
pub(crate) enum Terminal {
    Lost(SessionLost),
    Closed,
}

/// The send side, guarded by one short-lived lock that is never held across
/// an await.
pub(crate) struct SendSide {
    pub(crate) replay: ReplayBuffer,
    /// Next seq to write on the current link.
    pub(crate) cursor: Seq,
    /// One past the highest seq ever handed to a link: frames before it
    /// that a resume sends again are replays; later ones are first sends.
    written_until: Seq,
    /// A graceful close was asked for: no new sends; the session ends once
    /// the peer acknowledged everything.
    closing: bool,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) reconnects: AtomicU64,
    pub(crate) frames_sent: AtomicU64,
    pub(crate) frames_received: AtomicU64,
    pub(crate) frames_replayed: AtomicU64,
    pub(crate) bytes_replayed: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) keepalive_timeouts: AtomicU64,
    pub(crate) max_replay_bytes: AtomicUsize,
}

/// What the handles and the driver of one session share.
pub(crate) struct Shared {
    send: Mutex<SendSide>,
    /// Messages are serialized here, outside the send lock, and split off;
    /// frames share its chunks.
    arena: Mutex<Arena>,
    /// Wakes the writer when a frame is pushed (one waiter: `notify_one`).
    writer_wake: Notify,
    /// Wakes senders blocked on a full replay buffer.
    space_wake: Notify,
    /// Wakes the reader blocked on a full receive queue.
    queue_space: Notify,
    /// Last seq the application consumed, as `1 << 32 | seq`, 0 for none.
    consumed: AtomicU64,
    /// The highest ack the peer has been told on the current link (same
    /// encoding), so consumers know when to wake the writer for an ack.
    ack_told: AtomicU64,
    /// Extensions negotiated on the current link.
    extensions: AtomicU8,
    ack_every: u32,
    ack_delay: Duration,
    /// The peer's announced replay bound (0: not announced): acks go out by
    /// half of it.
    peer_window_frames: AtomicU32,
    peer_window_bytes: AtomicU32,
    /// Bytes consumed since the peer was last told an ack.
    unacked_bytes: AtomicUsize,
    /// Our own bound, announced to the peer.
    window: (u32, u32),
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    close_timeout: Duration,
    max_message_size: usize,
    /// Time base for the atomics below.
    epoch: tokio::time::Instant,
    /// Nonce and send time (µs since `epoch`) of the last ping.
    ping_nonce: AtomicU64,
    ping_sent_us: AtomicU64,
    /// When the last pong (or the link's start) was seen, µs since `epoch`.
    last_pong_us: AtomicU64,
    /// Smoothed round-trip time in µs; 0 until the first sample.
    srtt_us: AtomicU64,
    /// A pong to send: `1 << 32 | nonce`, 0 for none.
    pong_due: AtomicU64,
    queued_bytes: AtomicUsize,
    max_queued_bytes: usize,
    /// Received items on their way to the application.
    pub(crate) inbox: Inbox,
    /// The close frame was handed to a link: every frame had been
    /// acknowledged, and the peer ends the session when it arrives.
    close_sent: AtomicBool,
    terminal: OnceLock<Terminal>,
    state: watch::Sender<ConduitState>,
    pub(crate) counters: Counters,
}

fn lock(m: &Mutex<SendSide>) -> MutexGuard<'_, SendSide> {
    // A panic while holding the lock cannot leave the replay buffer half
    // updated in a way that matters more than losing the session would.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) enum TrySend {
    Sent,
    Full,
}

impl Shared {
    pub(crate) fn new(config: &Config, initial: ConduitState) -> Arc<Shared> {
        Arc::new(Shared {
            send: Mutex::new(SendSide {
                replay: ReplayBuffer::with_limits(
                    config.initial_seq,
                    config.max_replay_bytes,
                    config.max_replay_frames,
                ),
                cursor: config.initial_seq,
                written_until: config.initial_seq,
                closing: false,
            }),
            arena: Mutex::new(Arena::new()),
            writer_wake: Notify::new(),
            space_wake: Notify::new(),
            queue_space: Notify::new(),
            consumed: AtomicU64::new(0),
            ack_told: AtomicU64::new(0),
            extensions: AtomicU8::new(0),
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
            epoch: tokio::time::Instant::now(),
            ping_nonce: AtomicU64::new(0),
            ping_sent_us: AtomicU64::new(0),
            last_pong_us: AtomicU64::new(0),
            srtt_us: AtomicU64::new(0),
            pong_due: AtomicU64::new(0),
            queued_bytes: AtomicUsize::new(0),
            max_queued_bytes: config.max_recv_queue_bytes,
            inbox: Inbox::default(),
            close_sent: AtomicBool::new(false),
            terminal: OnceLock::new(),
            state: watch::Sender::new(initial),
            counters: Counters::default(),
        })
    }

    pub(crate) fn ack_value(&self) -> Option<Seq> {
        decode_seq(self.consumed.load(Ordering::Acquire))
    }

    fn ack_told(&self) -> Option<Seq> {
        decode_seq(self.ack_told.load(Ordering::Acquire))
    }

    fn set_ack_told(&self, seq: Option<Seq>) {
        self.ack_told.store(encode_seq(seq), Ordering::Release);
        self.unacked_bytes.store(0, Ordering::Release);
    }

    /// Consumed frames and bytes that make an ack due: the configured
    /// count, or half the peer's announced window, whichever is smaller.
    fn ack_thresholds(&self) -> (u32, usize) {
        let frames = match self.peer_window_frames.load(Ordering::Acquire) {
            0 => self.ack_every,
            w => self.ack_every.min((w / 2).max(1)),
        };
        let bytes = match self.peer_window_bytes.load(Ordering::Acquire) {
            0 => usize::MAX,
            w => (w as usize / 2).max(1),
        };
        (frames, bytes)
    }

    /// The consumed seq the peer has not been told yet, if standalone acks
    /// are on.
    fn pending_ack(&self) -> Option<Seq> {
        if !self.acks_negotiated() {
            return None;
        }
        let consumed = self.ack_value()?;
        match self.ack_told() {
            Some(told) if !consumed.is_after(told) => None,
            _ => Some(consumed),
        }
    }

    /// Whether standalone acks are on for the current link.
    fn acks_negotiated(&self) -> bool {
        self.extensions.load(Ordering::Acquire) & ext::ACKS != 0
    }

    pub(crate) fn terminal(&self) -> Option<&Terminal> {
        self.terminal.get()
    }

    fn terminal_error(&self) -> Option<Error> {
        self.terminal.get().map(|t| match t {
            Terminal::Lost(reason) => Error::SessionLost(reason.clone()),
            Terminal::Closed => Error::Closed,
        })
    }

    /// Ends the session for good with `reason`.
    pub(crate) fn fail(&self, reason: SessionLost) {
        if self.terminal.set(Terminal::Lost(reason.clone())).is_ok() {
            tracing::warn!(%reason, "stable session lost");
            self.release_buffers();
            self.set_state(ConduitState::Lost);
        }
        self.space_wake.notify_waiters();
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

    /// Asks for a graceful close: no new sends; the session ends once the
    /// peer has acknowledged every frame (or after the close timeout).
    pub(crate) fn begin_close(&self) {
        lock(&self.send).closing = true;
        self.writer_wake.notify_one();
        self.space_wake.notify_waiters();
    }

    fn is_closing(&self) -> bool {
        lock(&self.send).closing
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

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Smoothed round-trip time, once a ping was answered.
    pub(crate) fn rtt(&self) -> Option<Duration> {
        match self.srtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    fn on_pong(&self, nonce: u32) {
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

    /// Ends the session because every handle is gone.
    pub(crate) fn finish(&self) {
        if self.terminal.set(Terminal::Closed).is_ok() {
            self.release_buffers();
            self.set_state(ConduitState::Closed);
        }
        self.space_wake.notify_waiters();
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

    /// Serializes `msg` once into the encode arena, behind a gap of
    /// [`MAX_HEADER_LEN`] bytes where [`try_push`](Self::try_push) writes
    /// the header once the seq is known. Runs outside the send lock, so a
    /// large message never holds up the writer or the ack path.
    fn encode<T: Serialize + ?Sized>(&self, msg: &T) -> Result<BytesMut, Error> {
        let mut arena = self.arena.lock().unwrap_or_else(PoisonError::into_inner);
        arena.ensure_chunk();
        let buf = &mut arena.buf;
        buf.put_bytes(0, MAX_HEADER_LEN);
        if let Err(e) = encode_item(msg, buf) {
            buf.clear();
            return Err(Error::Encode(e));
        }
        Ok(buf.split())
    }

    /// Writes the header in front of the encoded item and queues the frame,
    /// unless the replay buffer is full; `item` is taken (left empty) only
    /// when queued.
    fn try_push(&self, item: &mut BytesMut) -> Result<TrySend, Error> {
        {
            let mut guard = lock(&self.send);
            if let Some(err) = self.terminal_error() {
                return Err(err);
            }
            let s = &mut *guard;
            if s.closing {
                return Err(Error::Closed);
            }
            let header = FrameHeader {
                seq: s.replay.next_seq(),
                ack: self.ack_value(),
            };
            let (header_bytes, header_len) = header.to_array();
            let len = item.len() - MAX_HEADER_LEN + header_len;
            if len > self.max_message_size {
                return Err(Error::TooLarge {
                    len,
                    max: self.max_message_size,
                });
            }
            // Without standalone acks, a side that only receives never
            // acknowledges: enforcing the bound could deadlock two senders.
            if self.acks_negotiated() && !s.replay.has_room(len) {
                return Ok(TrySend::Full);
            }
            let mut frame = item.split();
            let start = MAX_HEADER_LEN - header_len;
            frame[start..MAX_HEADER_LEN].copy_from_slice(&header_bytes[..header_len]);
            frame.advance(start);
            s.replay.push(frame.freeze());
            // Only the sender, under this lock, raises the peak: a plain
            // store when it grows, no read-modify-write per message.
            let bytes = s.replay.bytes();
            if bytes > self.counters.max_replay_bytes.load(Ordering::Relaxed) {
                self.counters
                    .max_replay_bytes
                    .store(bytes, Ordering::Relaxed);
            }
        }
        self.writer_wake.notify_one();
        Ok(TrySend::Sent)
    }

    /// Sends `msg`, waiting while the replay buffer is full. It is
    /// serialized once, whatever the wait.
    pub(crate) async fn send<T: Serialize + ?Sized>(&self, msg: &T) -> Result<(), Error> {
        let mut item = self.encode(msg)?;
        loop {
            if let TrySend::Sent = self.try_push(&mut item)? {
                return Ok(());
            }
            // Register for a wake-up before looking again, so an ack that
            // lands in between is not missed.
            let notified = self.space_wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let TrySend::Sent = self.try_push(&mut item)? {
                return Ok(());
            }
            notified.await;
        }
    }

    /// After a handshake: records the extensions negotiated for the new link,
    /// drops what the peer already has and rewinds the writer to the first
    /// frame it lacks. `our_last_received` is what our hello told the peer.
    /// Returns how many frames will be replayed.
    pub(crate) fn resume(
        &self,
        peer_last_received: Option<Seq>,
        our_last_received: Option<Seq>,
        extensions: u8,
    ) -> Result<u64, SessionLost> {
        self.extensions.store(extensions, Ordering::Release);
        // A new link: the peer announces its window again.
        self.peer_window_frames.store(0, Ordering::Release);
        self.peer_window_bytes.store(0, Ordering::Release);
        self.last_pong_us.store(self.now_us(), Ordering::Release);
        self.pong_due.store(0, Ordering::Release);
        // The hello told the peer what we received; it trims on that.
        self.set_ack_told(our_last_received);
        let (frames, bytes) = {
            let mut s = lock(&self.send);
            let start = s
                .replay
                .resume_from(peer_last_received)
                .map_err(|e| SessionLost::Protocol(format!("impossible resume point: {e}")))?;
            s.cursor = start;
            let mut frames = 0u64;
            let mut bytes = 0u64;
            for (seq, f) in s.replay.iter() {
                if !seq.is_before(s.written_until) {
                    break;
                }
                frames += 1;
                bytes += f.len() as u64;
            }
            (frames, bytes)
        };
        self.space_wake.notify_waiters();
        self.counters
            .frames_replayed
            .fetch_add(frames, Ordering::Relaxed);
        tracing::debug!(
            replayed_frames = frames,
            replayed_bytes = bytes,
            ?peer_last_received,
            extensions,
            "link attached"
        );
        self.counters
            .bytes_replayed
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(frames)
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
        }
    }

    /// Called by the application's receiver for each item it takes.
    pub(crate) fn consumed(&self, seq: Seq, len: usize) {
        self.consumed
            .store(encode_seq(Some(seq)), Ordering::Release);
        if self.acks_negotiated() {
            // Wake the writer when an ack becomes pending (it arms the ack
            // delay) and when enough frames or bytes wait for one.
            let pending = match self.ack_told() {
                Some(told) if !seq.is_after(told) => 0,
                Some(told) => seq.distance_from(told),
                None => 1,
            };
            let bytes_before = self.unacked_bytes.fetch_add(len, Ordering::AcqRel);
            let (frames_due, bytes_due) = self.ack_thresholds();
            let crossed_bytes = bytes_before < bytes_due && bytes_before + len >= bytes_due;
            if pending == 1 || pending == frames_due || crossed_bytes {
                self.writer_wake.notify_one();
            }
        }
        let before = self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
        if before > self.max_queued_bytes && before - len <= self.max_queued_bytes {
            self.queue_space.notify_one();
        }
    }
}

/// The driver's side of the application handles: where received items go,
/// and how it learns that every handle is gone.
pub(crate) struct Endpoint {
    shared: Arc<Shared>,
    pub(crate) senders: mpsc::Receiver<Infallible>,
    /// Items read from the link and not yet handed to the inbox. It lives
    /// here, not in the reader, so that nothing the receive state already
    /// counted as delivered is lost when an attachment's futures are
    /// dropped.
    batch: Vec<Delivered>,
}

/// The application's side, before it is wrapped in typed handles.
pub(crate) struct Handles {
    pub(crate) shared: Arc<Shared>,
    pub(crate) alive: mpsc::Sender<Infallible>,
}

pub(crate) fn endpoint(shared: Arc<Shared>) -> (Endpoint, Handles) {
    let (alive, senders) = mpsc::channel(1);
    (
        Endpoint {
            shared: shared.clone(),
            senders,
            batch: Vec::new(),
        },
        Handles { shared, alive },
    )
}

impl Endpoint {
    /// Resolves once every sender and the receiver are dropped.
    pub(crate) async fn all_gone(&mut self) {
        // `recv` can only ever return `None`: the channel carries `Infallible`.
        let _ = self.senders.recv().await;
        self.shared.inbox.wait_receiver_gone().await;
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        deliver_batch(&self.shared, &mut self.batch);
        self.shared.inbox.close_driver();
    }
}

/// Hands the reader's batch to the application (or, when the receiver is
/// gone, counts it consumed so that the peer can free it).
fn deliver_batch(shared: &Shared, batch: &mut Vec<Delivered>) {
    if batch.is_empty() {
        return;
    }
    shared
        .counters
        .frames_received
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    let len: usize = batch.iter().map(|(_, b)| b.len()).sum();
    shared.queued_bytes.fetch_add(len, Ordering::AcqRel);
    if !shared.inbox.push(batch) {
        for (seq, item) in batch.drain(..) {
            shared.consumed(seq, item.len());
        }
    }
}

/// Polls `fut` once: its output if it is ready now.
fn poll_now<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// Why one attachment ended.
#[derive(Debug)]
pub(crate) enum AttachEnd<P> {
    /// The link failed or ended; the session goes on.
    Link(LinkError),
    /// The peer ended the link at a payload boundary.
    Eof,
    /// The peer broke the protocol; the session is lost.
    Protocol(String),
    /// The session ended gracefully: this side closed (every frame was
    /// acknowledged) or the peer sent a close.
    Finished,
    /// No pong arrived within the keepalive timeout.
    Timeout,
    /// The caller's preempting future resolved (e.g. a newer link arrived).
    Preempted(P),
}

/// Runs one link attachment until it fails, the session finishes, or
/// `preempt` resolves. `on_first_frame` runs when the first well-formed frame
/// arrives on this link (the server confirms a rotated key with it).
pub(crate) async fn run_attachment<Tx, Rx, P>(
    shared: &Shared,
    endpoint: &mut Endpoint,
    tx: &mut Tx,
    rx: &mut Rx,
    recv: &mut RecvState,
    preempt: impl std::future::Future<Output = P>,
    on_first_frame: impl FnOnce(),
) -> AttachEnd<P>
where
    Tx: LinkTx,
    Rx: LinkRx,
{
    let Endpoint { senders, batch, .. } = endpoint;
    deliver_batch(shared, batch);
    let extensions = shared.extensions.load(Ordering::Acquire);
    let end = tokio::select! {
        biased;
        p = preempt => AttachEnd::Preempted(p),
        end = read_loop(shared, rx, recv, batch, extensions, on_first_frame) => end,
        end = write_loop(shared, tx, senders, extensions) => end,
        end = watchdog(shared, extensions) => end,
    };
    // Whatever the reader had decoded when the attachment ended is the
    // application's.
    deliver_batch(shared, batch);
    match end {
        // Everything was acknowledged and the close frame went out: the peer
        // ends its side on receipt and may drop the link before our send of
        // it has returned. The session is over, not the link lost.
        AttachEnd::Link(_) | AttachEnd::Eof | AttachEnd::Timeout
            if shared.close_sent.load(Ordering::Acquire) =>
        {
            AttachEnd::Finished
        }
        end => end,
    }
}

async fn write_loop<Tx: LinkTx, P>(
    shared: &Shared,
    tx: &mut Tx,
    senders: &mut mpsc::Receiver<Infallible>,
    extensions: u8,
) -> AttachEnd<P> {
    // Grows to the largest batch seen; an idle session's stays small.
    let mut batch: Vec<Bytes> = Vec::new();
    let mut control = BytesMut::new();
    // When the current pending ack (if any) must go out at the latest.
    let mut ack_deadline: Option<tokio::time::Instant> = None;
    let keepalive = extensions & ext::KEEPALIVE != 0;
    let mut next_ping = tokio::time::Instant::now();
    let mut close_deadline: Option<tokio::time::Instant> = None;
    let mut handles_gone = false;
    if extensions & ext::ACKS != 0 {
        let (frames, bytes) = shared.window;
        Control::Window { frames, bytes }.encode(&mut control);
        if let Err(e) = tx.send(control.split().freeze()).await {
            return AttachEnd::Link(e);
        }
    }
    loop {
        let now = tokio::time::Instant::now();
        if keepalive && now >= next_ping {
            let nonce = shared.ping_nonce.load(Ordering::Relaxed) as u32;
            let nonce = nonce.wrapping_add(1);
            shared
                .ping_sent_us
                .store(shared.now_us(), Ordering::Release);
            shared.ping_nonce.store(u64::from(nonce), Ordering::Release);
            Control::Ping(nonce).encode(&mut control);
            if let Err(e) = tx.send(control.split().freeze()).await {
                return AttachEnd::Link(e);
            }
            next_ping = now + shared.keepalive_interval;
        }
        if let Some(nonce) = decode_seq(shared.pong_due.swap(0, Ordering::AcqRel)) {
            Control::Pong(nonce.0).encode(&mut control);
            if let Err(e) = tx.send(control.split().freeze()).await {
                return AttachEnd::Link(e);
            }
        }
        {
            let mut guard = lock(&shared.send);
            let s = &mut *guard;
            let first = s.replay.first_seq();
            if s.cursor.is_before(first) {
                s.cursor = first;
            }
            let mut bytes = 0;
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match s.replay.get(s.cursor) {
                    Some(frame) => {
                        bytes += frame.len();
                        batch.push(frame.clone());
                        s.cursor = s.cursor.next();
                    }
                    None => break,
                }
            }
            if s.cursor.is_after(s.written_until) {
                s.written_until = s.cursor;
            }
        }
        if batch.is_empty() && (handles_gone || shared.is_closing()) {
            let deadline = *close_deadline.get_or_insert(now + shared.close_timeout);
            let done = {
                let s = lock(&shared.send);
                s.replay.is_empty().then(|| s.replay.next_seq())
            };
            if let Some(next) = done {
                if extensions & ext::CLOSE != 0 {
                    shared.close_sent.store(true, Ordering::Release);
                    Control::Close(next).encode(&mut control);
                    if let Err(e) = tx.send(control.split().freeze()).await {
                        return AttachEnd::Link(e);
                    }
                }
                return AttachEnd::Finished;
            }
            if now >= deadline {
                tracing::info!("close timed out waiting for acks; dropping the session");
                return AttachEnd::Finished;
            }
        }
        if batch.is_empty() {
            // Nothing to carry an ack: send one on its own when it is due.
            if let Some(ack) = shared.pending_ack() {
                let now = tokio::time::Instant::now();
                let deadline = *ack_deadline.get_or_insert(now + shared.ack_delay);
                let backlog = shared.ack_told().map_or(1, |t| ack.distance_from(t));
                let (frames_due, bytes_due) = shared.ack_thresholds();
                let bytes = shared.unacked_bytes.load(Ordering::Acquire);
                if backlog >= frames_due || bytes >= bytes_due || now >= deadline {
                    Control::Ack(ack).encode(&mut control);
                    if let Err(e) = tx.send(control.split().freeze()).await {
                        return AttachEnd::Link(e);
                    }
                    shared.set_ack_told(Some(ack));
                    ack_deadline = None;
                    continue;
                }
            } else {
                ack_deadline = None;
            }
            // Wake for the earliest of: an ack due, a ping due, the close
            // deadline.
            let mut wake_at = ack_deadline;
            for t in [keepalive.then_some(next_ping), close_deadline]
                .into_iter()
                .flatten()
            {
                wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
            }
            let timer = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shared.writer_wake.notified() => {}
                () = timer => {}
                _ = async {
                    let _ = senders.recv().await;
                    shared.inbox.wait_receiver_gone().await;
                }, if !handles_gone => {
                    // Every handle is gone: close gracefully, so that what
                    // was sent still reaches the peer.
                    handles_gone = true;
                }
            }
            continue;
        }
        shared
            .counters
            .frames_sent
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        // The newest frame carries the newest piggybacked ack of the batch.
        if let Some(Ok((FrameHeader { ack: Some(ack), .. }, _))) =
            batch.last().map(|f| FrameHeader::decode(f))
        {
            if shared.ack_told().is_none_or(|told| ack.is_after(told)) {
                shared.set_ack_told(Some(ack));
            }
        }
        for frame in batch.drain(..) {
            if let Err(e) = tx.feed(frame).await {
                return AttachEnd::Link(e);
            }
        }
        if let Err(e) = tx.flush().await {
            return AttachEnd::Link(e);
        }
    }
}

async fn read_loop<Rx: LinkRx, P>(
    shared: &Shared,
    rx: &mut Rx,
    recv: &mut RecvState,
    batch: &mut Vec<Delivered>,
    extensions: u8,
    on_first_frame: impl FnOnce(),
) -> AttachEnd<P> {
    let mut on_first_frame = Some(on_first_frame);
    let mut last_ack: Option<Seq> = None;
    let mut freed: Vec<Bytes> = Vec::new();
    loop {
        if shared.queued_bytes.load(Ordering::Acquire) > shared.max_queued_bytes {
            let notified = shared.queue_space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if shared.queued_bytes.load(Ordering::Acquire) > shared.max_queued_bytes
                && !shared.inbox.receiver_gone()
            {
                notified.await;
            }
            continue;
        }
        // Everything the link has ready now becomes one batch for the
        // receiver: one lock and one wake-up per batch, not per message.
        let mut next = rx.recv().await;
        let mut batch_bytes = 0;
        loop {
            let payload = match next {
                Ok(Some(p)) => p,
                Ok(None) => return AttachEnd::Eof,
                Err(e) => return AttachEnd::Link(e),
            };
            let incoming = match decode_payload(&payload, extensions) {
                Ok(incoming) => incoming,
                Err(e) => return AttachEnd::Protocol(format!("malformed frame: {e}")),
            };
            if let Some(f) = on_first_frame.take() {
                f();
            }
            match incoming {
                Incoming::Data {
                    header,
                    item_offset,
                } => {
                    if let Some(ack) = header.ack {
                        if last_ack != Some(ack) {
                            last_ack = Some(ack);
                            if let Err(e) = apply_ack(shared, ack, &mut freed) {
                                return AttachEnd::Protocol(e);
                            }
                        }
                    }
                    match recv.on_frame(header.seq) {
                        Ok(Delivery::Deliver) => {
                            // The first frame of the session anchors the ack
                            // state: the peer needs no ack for anything
                            // before it.
                            // (A load first: no locked instruction per
                            // message on a line the receiver reads.)
                            if shared.ack_told.load(Ordering::Acquire) == 0 {
                                let _ = shared.ack_told.compare_exchange(
                                    0,
                                    encode_seq(Some(Seq(header.seq.0.wrapping_sub(1)))),
                                    Ordering::AcqRel,
                                    Ordering::Acquire,
                                );
                            }
                            // In place: no second reference to the buffer.
                            let mut item = payload;
                            item.advance(item_offset);
                            batch_bytes += item.len();
                            batch.push((header.seq, item));
                        }
                        Ok(Delivery::Duplicate) => {
                            shared.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => return AttachEnd::Protocol(format!("sequence error: {e}")),
                    }
                }
                Incoming::Control(Control::Ack(ack)) => {
                    if let Err(e) = apply_ack(shared, ack, &mut freed) {
                        return AttachEnd::Protocol(e);
                    }
                }
                Incoming::Control(Control::Ping(nonce)) => {
                    shared
                        .pong_due
                        .store(encode_seq(Some(Seq(nonce))), Ordering::Release);
                    shared.writer_wake.notify_one();
                }
                Incoming::Control(Control::Pong(nonce)) => shared.on_pong(nonce),
                Incoming::Control(Control::Window { frames, bytes }) => {
                    shared.peer_window_frames.store(frames, Ordering::Release);
                    shared.peer_window_bytes.store(bytes, Ordering::Release);
                }
                Incoming::Control(Control::Close(_)) => {
                    tracing::debug!("peer closed the session");
                    return AttachEnd::Finished;
                }
            }
            if batch.len() >= MAX_DELIVER_BATCH || batch_bytes >= MAX_DELIVER_BATCH_BYTES {
                break;
            }
            match poll_now(rx.recv()) {
                Some(more) => next = more,
                None => break,
            }
        }
        deliver_batch(shared, batch);
    }
}

fn encode_seq(seq: Option<Seq>) -> u64 {
    seq.map_or(0, |s| (1u64 << 32) | u64::from(s.0))
}

fn decode_seq(v: u64) -> Option<Seq> {
    (v >> 32 != 0).then_some(Seq(v as u32))
}

/// Trims the replay buffer up to `ack` and wakes blocked senders. The
/// trimmed frames are dropped after the lock is released (into `freed`,
/// which the caller reuses), so a sender never waits on their release.
fn apply_ack(shared: &Shared, ack: Seq, freed: &mut Vec<Bytes>) -> Result<(), String> {
    let result = lock(&shared.send).replay.ack_into(ack, freed);
    freed.clear();
    match result {
        Ok(0) => Ok(()),
        Ok(_) => {
            shared.space_wake.notify_waiters();
            // A closing writer waits for the buffer to drain. Waking the
            // writer on every ack also measured faster on loopback than
            // leaving it to the senders' wake-ups (tether bench, small
            // messages: 6.6M against 4.9M msgs/s).
            shared.writer_wake.notify_one();
            Ok(())
        }
        Err(e) => Err(format!("bad ack: {e}")),
    }
}

/// Declares the link dead when no pong arrived for the keepalive timeout.
async fn watchdog<P>(shared: &Shared, extensions: u8) -> AttachEnd<P> {
    if extensions & ext::KEEPALIVE == 0 {
        return std::future::pending().await;
    }
    let timeout_us = shared.keepalive_timeout.as_micros() as u64;
    loop {
        let last = shared.last_pong_us.load(Ordering::Acquire);
        let due = last + timeout_us;
        let now = shared.now_us();
        if now >= due {
            shared
                .counters
                .keepalive_timeouts
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(timeout = ?shared.keepalive_timeout, "no pong: link declared dead");
            return AttachEnd::Timeout;
        }
        tokio::time::sleep(Duration::from_micros(due - now)).await;
    }
}
