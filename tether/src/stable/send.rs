//! The send side: `send` and the writer of one link.
//!
//! `send` encodes the message once into an arena, behind a gap for the
//! header (a large message, with fragments on, behind a gap for every
//! piece), outside any lock shared with the driver; then it takes the send
//! lock, writes the headers (seq; an ack only in the base format) into the
//! gaps, pushes the frozen frames into the replay buffer and wakes the
//! writer. The replay buffer *is* the outgoing queue: the writer keeps a
//! cursor (next seq to write on the current link) and hands the same
//! `Bytes` to the link. A resume only moves the cursor back to the first
//! frame the peer lacks. A message accepted by `send` is therefore in the
//! buffer before `send` returns, whatever the link is doing, and is written
//! on this link or a later one: no send can race a reconnect.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use tether_proto::frame::{FrameHeader, RECV_ITEM_COST};
use tether_proto::{encode_item, encode_item_gapped, ext, Control, Seq, MAX_HEADER_LEN};
use tokio::sync::futures::OwnedNotified;

use super::attach::AttachEnd;
use super::shared::{decode_seq, encode_seq, lock, Role, Shared};
use crate::error::{Error, SessionLost};
use crate::link::LinkTx;

/// Frames handed to the link per batch at most.
const MAX_BATCH: usize = 256;
/// Bytes handed to the link per batch at most.
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// A batch is flushed at least every this many bytes, so that a link that
/// dies in the middle of a batch has carried its first frames.
const FLUSH_BYTES: usize = 64 * 1024;
/// Small frames of a batch are copied out of the replay buffer into a
/// staging buffer of at most this many bytes (the rest are taken by
/// reference): see [`Out`].
const STAGED_MAX: usize = 16 * 1024;

/// Bytes of staging buffer (and of batch slots) a writer keeps when its
/// session goes quiet; more is released at the next timer wake-up.
const IDLE_KEEP: usize = 1024;

/// One payload of the writer's batch.
///
/// A frame the link copies anyway (up to its
/// [`copy_threshold`](LinkTx::copy_threshold)) is copied out of the replay
/// buffer under the send lock into the writer's staging buffer, instead of
/// being taken by reference: a reference to a frame is a count shared with
/// the sender's arena chunk and with whoever drops acknowledged frames, so
/// taking and dropping one per message had two threads or three writing
/// one cache line. The copy is a few dozen bytes.
enum Out {
    /// A frame (or control frame) taken by reference.
    Frame(Bytes),
    /// The next this many bytes of the staging buffer.
    Staged(usize),
}

pub(super) enum TrySend {
    Sent,
    Full,
}

/// A sender's registrations for room in the replay buffer (and, on a
/// server, in the memory budget), kept across polls by whoever waits:
/// [`Shared::send`] for one call, a [`StableSender`](super::StableSender)'s
/// `Sink` for the handle's whole life. A registration is boxed the first
/// time one is needed and the box is reused by every later wait: a message
/// that finds room costs nothing here.
#[derive(Default)]
pub(super) struct SpaceWait {
    /// On `space_wake`.
    space: Option<Pin<Box<OwnedNotified>>>,
    /// On the budget's `freed`, made when the budget was over.
    budget: Option<Pin<Box<OwnedNotified>>>,
    /// The registrations were made (enabled) before the last look for
    /// room, so that they cover it; stale ones are replaced before use.
    space_armed: bool,
    budget_armed: bool,
    /// The base format's stall watchdog was told of this wait.
    stall_noted: bool,
}

impl SpaceWait {
    /// Replaces the registration in `slot` by `fresh` (in the same box
    /// once there is one) and enables it.
    fn arm(slot: &mut Option<Pin<Box<OwnedNotified>>>, fresh: OwnedNotified) {
        let boxed = match slot {
            Some(boxed) => {
                boxed.set(fresh);
                boxed
            }
            None => slot.insert(Box::pin(fresh)),
        };
        boxed.as_mut().enable();
    }

    fn disarm(&mut self) {
        self.space_armed = false;
        self.budget_armed = false;
        self.stall_noted = false;
    }

    /// Whether an armed registration fired; registers `cx` with the others.
    fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        let mut fired = false;
        for (armed, slot) in [
            (self.space_armed, &mut self.space),
            (self.budget_armed, &mut self.budget),
        ] {
            if let (true, Some(notified)) = (armed, slot.as_mut()) {
                fired |= notified.as_mut().poll(cx).is_ready();
            }
        }
        fired
    }
}

impl Shared {
    /// The last seq the application consumed: what an ack carries. Data
    /// frames piggyback it only in the base format, where that is the only
    /// way to acknowledge; with standalone acks on they carry none, since a
    /// frame may be replayed long after it was pushed and its ack would be
    /// stale by then (`try_push`).
    pub(crate) fn ack_value(&self) -> Option<Seq> {
        decode_seq(self.consumed.load(Ordering::Acquire))
    }

    /// Serializes `msg` once into the encode arena, behind a gap of
    /// [`MAX_HEADER_LEN`] bytes where [`try_push`](Self::try_push) writes
    /// the header once the seq is known; with fragments on, a gap in front
    /// of every `fragment_size` bytes. Runs outside the send lock, so a
    /// large message never holds up the writer or the ack path. Returns the
    /// encoded bytes and the item's length without the gaps.
    fn encode<T: Serialize + ?Sized>(&self, msg: &T) -> Result<(BytesMut, usize), Error> {
        let mut arena = self
            .arena
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        arena.ensure_chunk();
        let buf = &mut arena.buf;
        let encoded = if self.extensions() & ext::FRAGMENTS != 0 {
            encode_item_gapped(msg, buf, MAX_HEADER_LEN, self.fragment_size)
        } else {
            buf.put_bytes(0, MAX_HEADER_LEN);
            encode_item(msg, buf).map(|()| buf.len() - MAX_HEADER_LEN)
        };
        match encoded {
            Ok(len) => Ok((buf.split(), len)),
            Err(e) => {
                buf.clear();
                Err(Error::Encode(e))
            }
        }
    }

    /// Writes the headers in front of the encoded pieces and queues the
    /// message's frames, unless there is no room for them; `item` is taken
    /// (left empty) only when queued.
    ///
    /// Room, whatever the extensions: the replay bound (frames and bytes);
    /// with standalone acks, the peer's receive bound (what is
    /// unacknowledged, each frame counted as its length plus
    /// `RECV_ITEM_COST`, stays below it); and the server's memory budget
    /// not over its limit. An empty replay buffer always takes one message,
    /// so that no bound can stall a session for good.
    fn try_push(&self, item: &mut BytesMut, item_len: usize) -> Result<TrySend, Error> {
        {
            let mut guard = lock(&self.send);
            if let Some(err) = self.terminal_error() {
                return Err(err);
            }
            let s = &mut *guard;
            if s.closing {
                return Err(self.closed_error());
            }
            let acks = self.acks_negotiated();
            let piece = if self.extensions() & ext::FRAGMENTS != 0 {
                self.fragment_size
            } else {
                usize::MAX
            };
            let pieces = item_len.div_ceil(piece).max(1);
            let first = s.replay.next_seq();
            let last = first.wrapping_add(pieces as u32 - 1);
            let header = FrameHeader {
                seq: last,
                ack: if acks { None } else { self.ack_value() },
            };
            let header_len = header.encoded_len();
            let len = item_len + header_len;
            if len > self.max_message_size {
                return Err(Error::TooLarge {
                    len,
                    max: self.max_message_size,
                });
            }
            let bytes = len + (pieces - 1) * header_len;
            // In the base format too: a peer that never acknowledges (it
            // only receives) holds this side to one window until its hellos
            // trim the buffer on a resume.
            if !s.replay.has_room_for(pieces, bytes) {
                return Ok(TrySend::Full);
            }
            if !s.replay.is_empty() {
                let peer_recv = if acks {
                    self.peer_recv_bytes.load(Ordering::Acquire)
                } else {
                    usize::MAX
                };
                let cost = |frames: usize, bytes: usize| bytes + frames * RECV_ITEM_COST;
                let held = cost(s.replay.len(), s.replay.bytes());
                if held.saturating_add(cost(pieces, bytes)) > peer_recv
                    || self.budget.as_ref().is_some_and(|b| b.is_over())
                {
                    return Ok(TrySend::Full);
                }
            }
            let before = s.replay.bytes();
            for i in 0..pieces {
                let seq = first.wrapping_add(i as u32);
                // The header is written in place, at the end of the gap.
                let (mut frame, hlen) = if seq == last {
                    // The whole rest: taken, not split, which would touch
                    // the arena's shared count (and again when the empty
                    // rest is dropped).
                    let mut frame = std::mem::take(item);
                    let hlen = header.write_end(&mut frame[..MAX_HEADER_LEN]);
                    (frame, hlen)
                } else {
                    let mut frame = item.split_to(MAX_HEADER_LEN + piece);
                    let hlen = FrameHeader::write_fragment_end(seq, &mut frame[..MAX_HEADER_LEN]);
                    (frame, hlen)
                };
                frame.advance(MAX_HEADER_LEN - hlen);
                s.replay.push(frame.freeze());
            }
            // Only the sender, under this lock, raises the peak: a plain
            // store when it grows, no read-modify-write per message.
            let after = s.replay.bytes();
            let peak = &self.counters.max_replay_bytes;
            if after > peak.load(Ordering::Relaxed) {
                peak.store(after, Ordering::Relaxed);
            }
            // Under the lock, so that the budget sees every change in the
            // order the buffer did (an ack applied between could otherwise
            // release bytes before they were charged).
            self.replay_resized(before, after);
            drop(guard);
        }
        self.poke_writer();
        Ok(TrySend::Sent)
    }

    /// Wakes the writer for a frame just pushed, unless a sender already
    /// did since the writer last took a batch: then the writer will take
    /// this frame with that batch or the next, and a plain load replaces
    /// the `Notify`'s read-modify-write.
    ///
    /// Why no frame is left behind: the writer clears the flag under the
    /// send lock when it takes a batch. A sender that pushed (under the
    /// lock) and then reads `true` read a store made after the writer's
    /// last clear that it could see; if its frame was not in the batch of
    /// that clear, its lock came after the writer's, so the clear happened
    /// before its read, and the `true` it read was set later by a sender
    /// that did notify: the writer takes another batch, under the lock,
    /// after this push.
    fn poke_writer(&self) {
        if !self.writer_poked.load(Ordering::Acquire)
            && !self.writer_poked.swap(true, Ordering::AcqRel)
        {
            self.writer_wake.notify_one();
        }
    }

    /// Sends `msg`, waiting while there is no room for it (`try_push`). It
    /// is serialized once, whatever the wait. A message that finds room
    /// allocates nothing beyond its frames; one that has to wait boxes its
    /// registration once ([`SpaceWait`]).
    pub(crate) async fn send<T: Serialize + ?Sized>(&self, msg: &T) -> Result<(), Error> {
        let (mut item, item_len) = self.encode(msg)?;
        let mut wait = SpaceWait::default();
        std::future::poll_fn(|cx| self.poll_push(cx, &mut item, item_len, &mut wait)).await
    }

    /// Serializes `msg` and queues it if there is room now. `Ok(None)`:
    /// queued; `Ok(Some(..))`: no room, the encoded item to hand to
    /// [`poll_push`](Self::poll_push) (never serialized again).
    pub(super) fn start_push<T: Serialize + ?Sized>(
        &self,
        msg: &T,
    ) -> Result<Option<(BytesMut, usize)>, Error> {
        let (mut item, item_len) = self.encode(msg)?;
        match self.try_push(&mut item, item_len)? {
            TrySend::Sent => Ok(None),
            TrySend::Full => Ok(Some((item, item_len))),
        }
    }

    /// Queues an encoded item (from [`encode`](Self::encode) or
    /// [`start_push`](Self::start_push)) once there is room for it
    /// (`try_push`): `Ready(Ok)` when queued, `Pending` with the task
    /// registered in `wait` for the acknowledgements (or the memory other
    /// sessions free) that can make room. `item` is left empty once queued
    /// and as it was otherwise, so the caller can poll again or drop it.
    pub(super) fn poll_push(
        &self,
        cx: &mut Context<'_>,
        item: &mut BytesMut,
        item_len: usize,
        wait: &mut SpaceWait,
    ) -> Poll<Result<(), Error>> {
        loop {
            match self.try_push(item, item_len) {
                Ok(TrySend::Sent) => {
                    wait.disarm();
                    return Poll::Ready(Ok(()));
                }
                Ok(TrySend::Full) => {}
                Err(e) => {
                    wait.disarm();
                    return Poll::Ready(Err(e));
                }
            }
            if !wait.space_armed {
                // Register for a wake-up before looking again, so that an
                // ack that lands in between is not missed.
                SpaceWait::arm(&mut wait.space, self.space_wake.clone().notified_owned());
                wait.space_armed = true;
                continue;
            }
            // Still no room with the registration in place: this send
            // waits for an ack (once per wake-up, as the ack that frees
            // room clears the mark).
            if !wait.stall_noted {
                wait.stall_noted = true;
                if !self.acks_negotiated()
                    && self
                        .send_stalled_us
                        .compare_exchange(
                            0,
                            self.now_us().max(1),
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok()
                {
                    // The watchdog ends a link on which no ack comes.
                    self.stall_wake.notify_one();
                }
            }
            // Memory other sessions free wakes this one too, while the
            // budget is over; registered before looking again, like
            // `space`.
            if let Some(budget) = &self.budget {
                if !wait.budget_armed && budget.is_over() {
                    SpaceWait::arm(&mut wait.budget, budget.freed_owned());
                    wait.budget_armed = true;
                    continue;
                }
            }
            if wait.poll(cx) {
                wait.disarm();
                continue;
            }
            return Poll::Pending;
        }
    }

    /// After a handshake: records the extensions negotiated for the new link
    /// and rewinds the writer to the first frame the peer lacks.
    /// `our_last_received` is what our hello told the peer. Returns how many
    /// frames will be replayed.
    ///
    /// With standalone acks the peer's last received only moves the cursor:
    /// frames are freed by acks, which report what the peer's application
    /// consumed, so a reader that stalls across cuts keeps its sender within
    /// the replay bound. In the base format the last received is the only
    /// ack a receive-only peer ever gives, and trims the buffer.
    pub(crate) fn resume(
        &self,
        peer_last_received: Option<Seq>,
        our_last_received: Option<Seq>,
        extensions: u8,
    ) -> Result<u64, SessionLost> {
        self.set_extensions(extensions)?;
        let acks = extensions & ext::ACKS != 0;
        let now = self.now_us();
        self.last_pong_us.store(now, Ordering::Release);
        self.last_rx_us.store(now, Ordering::Release);
        self.reader_paused.store(false, Ordering::Release);
        // A pong for a ping of the last link answers nothing on this one.
        self.ping_nonce.store(0, Ordering::Release);
        // A send still waiting for room starts its wait over on this link.
        self.send_stalled_us.store(0, Ordering::Release);
        self.pong_due.store(0, Ordering::Release);
        // In the base format the peer trims on our hello's last received;
        // with acks it trims on acks only, so this link starts with no ack
        // told and the writer acknowledges what was consumed.
        self.set_ack_told(if acks { None } else { our_last_received });
        let (frames, bytes) = {
            let mut s = lock(&self.send);
            let held = s.replay.bytes();
            let start = if acks {
                s.replay.rewind_to(peer_last_received)
            } else {
                s.replay.resume_from(peer_last_received)
            }
            .map_err(|e| SessionLost::Protocol(format!("impossible resume point: {e}")))?;
            s.cursor = start;
            let mut frames = 0u64;
            let mut bytes = 0u64;
            for (seq, f) in s.replay.iter() {
                if seq.is_before(start) {
                    continue;
                }
                if !seq.is_before(s.written_until) {
                    break;
                }
                frames += 1;
                bytes += f.len() as u64;
            }
            self.replay_resized(held, s.replay.bytes());
            (frames, bytes)
        };
        self.space_wake.notify_waiters();
        let c = &self.counters;
        c.frames_replayed.fetch_add(frames, Ordering::Relaxed);
        c.bytes_replayed.fetch_add(bytes, Ordering::Relaxed);
        tracing::debug!(
            replayed_frames = frames,
            replayed_bytes = bytes,
            ?peer_last_received,
            extensions,
            "link attached"
        );
        Ok(frames)
    }

    pub(super) fn ack_told(&self) -> Option<Seq> {
        decode_seq(self.ack_told.load(Ordering::Acquire))
    }

    pub(super) fn set_ack_told(&self, seq: Option<Seq>) {
        self.ack_told.store(encode_seq(seq), Ordering::Release);
        self.unacked_bytes.store(0, Ordering::Release);
    }

    /// Consumed frames and bytes that make an ack due: the configured
    /// count, or half the peer's announced window, whichever is smaller;
    /// for bytes, half of the peer's window or of our own receive bound
    /// (which holds the peer back too), whichever is smaller.
    pub(super) fn ack_thresholds(&self) -> (u32, usize) {
        let frames = match self.peer_window_frames.load(Ordering::Acquire) {
            0 => self.ack_every,
            w => self.ack_every.min((w / 2).max(1)),
        };
        let bytes = match self.peer_window_bytes.load(Ordering::Acquire) {
            0 => usize::MAX,
            w => w as usize,
        };
        let bytes = (bytes.min(self.max_queued_bytes) / 2).max(1);
        (frames, bytes)
    }

    /// The consumed seq the peer has not been told yet, if standalone acks
    /// are on. The peer's close frame counts as consumed as soon as
    /// everything before it is: the application need not ask for the end
    /// of the stream for the peer's close to complete.
    fn pending_ack(&self) -> Option<Seq> {
        if !self.acks_negotiated() {
            return None;
        }
        let mut consumed = self.ack_value()?;
        if let Some(fin) = self.peer_fin() {
            if fin == consumed.next() {
                let _ = self.consumed.compare_exchange(
                    encode_seq(Some(consumed)),
                    encode_seq(Some(fin)),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                consumed = fin;
            }
        }
        match self.ack_told() {
            Some(told) if !consumed.is_after(told) => None,
            _ => Some(consumed),
        }
    }

    /// Whether this side's part of the close is done on this link, and the
    /// frame that says so, if any: the server's closed frame once the
    /// client's close frame arrived and every frame of its own (its close
    /// frame last) was acknowledged; without the close extension, a drained
    /// replay buffer. The client waits for the server's word.
    fn close_done(&self, extensions: u8) -> Option<Option<Control>> {
        let s = lock(&self.send);
        if !s.closing || !s.replay.is_empty() {
            return None;
        }
        if extensions & ext::CLOSE == 0 {
            return Some(None);
        }
        match (self.role, self.peer_fin()) {
            (Role::Server, Some(peer_fin)) => Some(Some(Control::Closed(peer_fin))),
            _ => None,
        }
    }
}

/// Writes frames, acks, pings and pongs to one link until it fails or this
/// side's part of the close is done.
pub(super) async fn write_loop<Tx: LinkTx, P>(
    shared: &Shared,
    tx: &mut Tx,
    extensions: u8,
) -> AttachEnd<P> {
    // Grow to the largest batch seen; an idle session's stay small.
    let mut batch: Vec<Out> = Vec::new();
    let mut staged: Vec<u8> = Vec::new();
    let copy_max = tx.copy_threshold();
    let mut control = BytesMut::new();
    // When the current pending ack (if any) must go out at the latest. Due
    // at once on a new link: the peer keeps what it sent until it is
    // acknowledged, whatever our hello said we received, and its window may
    // be full of frames we already have.
    let mut ack_deadline = Some(tokio::time::Instant::now());
    let keepalive = extensions & ext::KEEPALIVE != 0;
    let acks = extensions & ext::ACKS != 0;
    let mut next_ping = tokio::time::Instant::now();
    // Not registered with the runtime until first polled.
    let timer = tokio::time::sleep_until(next_ping + Duration::from_secs(365 * 24 * 3600));
    tokio::pin!(timer);
    let mut timer_at: Option<tokio::time::Instant> = None;
    if acks {
        let (frames, bytes) = shared.window;
        let recv_bytes = Some(u32::try_from(shared.max_queued_bytes).unwrap_or(u32::MAX));
        Control::Window {
            frames,
            bytes,
            recv_bytes,
        }
        .encode(&mut control);
        if let Err(e) = tx.send(control.split().freeze()).await {
            return AttachEnd::Link(e);
        }
    }
    loop {
        let now = tokio::time::Instant::now();
        // One ping outstanding at a time, with an unpredictable nonce: only
        // its pong counts, and only a peer that read it can send that. One
        // still unanswered an interval later is left to the watchdog.
        let probe = shared.probe_requested.load(Ordering::Relaxed)
            && shared.probe_requested.swap(false, Ordering::AcqRel);
        if keepalive && (now >= next_ping || probe) {
            if !shared.ping_outstanding() {
                // Recorded before it is written: its pong can come back
                // before `send` returns.
                Control::Ping(shared.next_ping()).encode(&mut control);
                if let Err(e) = tx.send(control.split().freeze()).await {
                    return AttachEnd::Link(e);
                }
            }
            next_ping = now + shared.keepalive_interval;
        }
        if let Some(nonce) = decode_seq(shared.pong_due.swap(0, Ordering::AcqRel)) {
            Control::Pong(nonce.0).encode(&mut control);
            if let Err(e) = tx.send(control.split().freeze()).await {
                return AttachEnd::Link(e);
            }
        }
        // An ack that is due goes out first, ahead of any data: data frames
        // carry no ack with standalone acks on, and the peer's sends may be
        // waiting for it.
        if let Some(ack) = shared.pending_ack() {
            let deadline = *ack_deadline.get_or_insert(now + shared.ack_delay);
            let backlog = shared.ack_told().map_or(1, |t| ack.distance_from(t));
            let (frames_due, bytes_due) = shared.ack_thresholds();
            let bytes = shared.unacked_bytes.load(Ordering::Acquire);
            let closing = shared.peer_fin() == Some(ack);
            if backlog >= frames_due || bytes >= bytes_due || now >= deadline || closing {
                Control::Ack(ack).encode(&mut control);
                batch.push(Out::Frame(control.split().freeze()));
                shared.set_ack_told(Some(ack));
                ack_deadline = None;
            }
        } else {
            ack_deadline = None;
        }
        let acked = batch.len();
        {
            let mut guard = lock(&shared.send);
            let s = &mut *guard;
            // Under the lock: see `Shared::poke_writer`.
            shared.writer_poked.store(false, Ordering::Relaxed);
            let first = s.replay.first_seq();
            if s.cursor.is_before(first) {
                s.cursor = first;
            }
            let mut bytes = 0;
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match s.replay.get(s.cursor) {
                    Some(frame) => {
                        bytes += frame.len();
                        if frame.len() <= copy_max && staged.len() + frame.len() <= STAGED_MAX {
                            staged.extend_from_slice(frame);
                            batch.push(Out::Staged(frame.len()));
                        } else {
                            batch.push(Out::Frame(frame.clone()));
                        }
                        s.cursor = s.cursor.next();
                    }
                    None => break,
                }
            }
            if s.cursor.is_after(s.written_until) {
                s.written_until = s.cursor;
            }
        }
        let data_frames = batch.len() - acked;
        // This side's part of the close is done once nothing is left to
        // write: the last batch (an ack, the closed frame) goes out, then the
        // attachment ends.
        let finished = data_frames == 0
            && match shared.close_done(extensions) {
                Some(frame) => {
                    if let Some(frame) = frame {
                        frame.encode(&mut control);
                        batch.push(Out::Frame(control.split().freeze()));
                    }
                    true
                }
                None => false,
            };
        if batch.is_empty() && !finished {
            // Wake for the earliest of: an ack due, a ping due.
            let wake_at = match (ack_deadline, keepalive.then_some(next_ping)) {
                (Some(a), Some(p)) => Some(a.min(p)),
                (a, p) => a.or(p),
            };
            // One timer for the writer's life, moved only when the wake-up
            // time changes: a fresh one per wait would be registered with
            // the runtime's timer wheel and removed again (under its lock)
            // on every round trip.
            if let Some(at) = wake_at {
                if timer_at != Some(at) {
                    timer.as_mut().reset(at);
                    timer_at = Some(at);
                }
            }
            tokio::select! {
                biased;
                _ = shared.writer_wake.notified() => {}
                () = &mut timer, if wake_at.is_some() => {
                    timer_at = None;
                    // Nothing to write since the last wake-up, until an ack
                    // or a ping came due: a quiet session gives back what
                    // a burst grew (up to 16 KiB staged, 256 batch slots).
                    if staged.capacity() > IDLE_KEEP {
                        staged = Vec::new();
                    }
                    if batch.capacity() > IDLE_KEEP / std::mem::size_of::<Out>() {
                        batch = Vec::new();
                    }
                }
            }
            continue;
        }
        shared
            .counters
            .frames_sent
            .fetch_add(data_frames as u64, Ordering::Relaxed);
        if !acks {
            // In the base format the newest frame carries the newest
            // piggybacked ack of the batch.
            let last = match batch.last() {
                Some(Out::Frame(f)) => Some(&f[..]),
                Some(Out::Staged(len)) => Some(&staged[staged.len() - len..]),
                None => None,
            };
            if let Some(Ok((FrameHeader { ack: Some(ack), .. }, _))) = last.map(FrameHeader::decode)
            {
                if shared.ack_told().is_none_or(|told| ack.is_after(told)) {
                    shared.set_ack_told(Some(ack));
                }
            }
        }
        let mut unflushed = 0;
        let mut at = 0;
        for out in batch.drain(..) {
            let fed = match out {
                Out::Frame(frame) => {
                    unflushed += frame.len();
                    tx.feed(frame).await
                }
                Out::Staged(len) => {
                    unflushed += len;
                    at += len;
                    tx.feed_copy(&staged[at - len..at]).await
                }
            };
            if let Err(e) = fed {
                return AttachEnd::Link(e);
            }
            if unflushed >= FLUSH_BYTES {
                unflushed = 0;
                if let Err(e) = tx.flush().await {
                    return AttachEnd::Link(e);
                }
            }
        }
        staged.clear();
        if let Err(e) = tx.flush().await {
            return AttachEnd::Link(e);
        }
        if finished {
            return AttachEnd::Finished;
        }
    }
}
