//! The receive side: the reader of one link, and what the application's
//! receiver reports back.
//!
//! The reader decodes each frame header, applies acks to the replay
//! buffer, drops duplicates, puts fragmented messages back together, and
//! queues the item bytes (a slice of the link's buffer, not a copy, unless
//! the message came in pieces) for the
//! application, a batch at a time (`inbox.rs`). With standalone acks it
//! never stops reading: pings, pongs, acks and the close keep flowing
//! however slow the application is. Memory is bounded by this side's own
//! receive bound, which it announces in its window frame: acks report what
//! the application has *consumed*, and the peer keeps what it has not had
//! acknowledged below the bound. Only in the base format, where nothing
//! else pushes back, does a full receive queue pause the reader.
//!
//! Each queued item counts as its bytes plus `RECV_ITEM_COST`
//! ([`Shared::item_cost`]), and what is counted is what is held: an item
//! is a slice of the link's read buffer, which it keeps alive whole, and
//! the stream link fills each read buffer before it takes another, so
//! queued items share their buffers instead of each pinning its own
//! (`StreamRx::make_room`).

use std::sync::atomic::Ordering;

use bytes::{Buf, Bytes};
use tether_proto::frame::{INITIAL_RECV_WINDOW, RECV_ITEM_COST};
use tether_proto::{decode_payload, ext, Control, Delivery, Incoming, Reassembly, RecvState, Seq};

use super::attach::{poll_now, AttachEnd};
use super::inbox::Delivered;
use super::shared::{encode_seq, lock, Role, Shared};

/// Items handed to the receiver per batch at most, and bytes.
const MAX_DELIVER_BATCH: usize = 256;
const MAX_DELIVER_BATCH_BYTES: usize = 256 * 1024;

impl Shared {
    /// Called by the application's receiver for one item it took.
    pub(crate) fn consumed(&self, seq: Seq, len: usize) {
        self.consumed_up_to(seq, 1, Shared::item_cost(len));
    }

    /// The application's receiver took `count` items, the last of them
    /// `seq`, costing `len` in all ([`item_cost`](Shared::item_cost)
    /// each): what [`Consumption`] reports at once.
    pub(crate) fn consumed_up_to(&self, seq: Seq, count: u32, len: usize) {
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
            let pending_before = pending.saturating_sub(count);
            let bytes_before = self.unacked_bytes.fetch_add(len, Ordering::AcqRel);
            let (frames_due, bytes_due) = self.ack_thresholds();
            let crossed_bytes = bytes_before < bytes_due && bytes_before + len >= bytes_due;
            let crossed_frames = pending_before < frames_due && pending >= frames_due;
            if (pending_before == 0 && pending > 0) || crossed_frames || crossed_bytes {
                self.writer_wake.notify_one();
            }
        }
        let before = self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
        self.recv_release(len, before - len);
        if before > self.max_queued_bytes && before - len <= self.max_queued_bytes {
            self.queue_space.notify_one();
        }
    }

    /// The most the peer may have waiting here, unconsumed (in the units of
    /// [`item_cost`](Shared::item_cost)), before it is breaking flow
    /// control: our own receive bound, which it learns from our window
    /// frame (at least what it assumes before that), plus one message,
    /// which its empty replay buffer always takes. Nothing the peer
    /// announces raises it.
    fn recv_cap(&self) -> usize {
        self.max_queued_bytes
            .max(INITIAL_RECV_WINDOW)
            .saturating_add(self.max_message_size)
            .saturating_add(RECV_ITEM_COST)
    }

    /// The peer's close frame arrived, after every frame before it: the
    /// receiver gets what is queued, then the end; this side closes too.
    fn on_peer_fin(&self, fin: Seq, before: Option<Seq>) {
        self.peer_fin
            .store(encode_seq(Some(fin)), Ordering::Release);
        self.inbox.close_driver();
        if before.is_none() {
            // The close is the first frame of the session: nothing before
            // it to consume.
            self.consumed
                .store(encode_seq(Some(fin)), Ordering::Release);
        }
        self.start_close(true);
        self.writer_wake.notify_one();
    }
}

/// What the application's receiver took and has not reported yet.
///
/// The receiver takes items from its own buffer (a batch the reader
/// handed over at once) and reports what it took once that buffer runs
/// dry, rather than item by item: an item costs a few shared counters
/// (the consumed seq, the bytes waiting for an ack, the receive queue's
/// bytes), which the reader and the writer read and write too on other
/// threads. Nothing waits on the difference: the items still in the
/// buffer are not consumed either, so an ack could not free the peer's
/// window any sooner, and the report comes before the receiver next
/// waits (or is dropped).
#[derive(Debug, Default)]
pub(crate) struct Consumption {
    /// The last item taken, how many, and their cost.
    taken: Option<(Seq, u32, usize)>,
}

impl Consumption {
    /// Notes one item taken.
    pub(crate) fn took(&mut self, seq: Seq, len: usize) {
        let cost = Shared::item_cost(len);
        self.taken = Some(match self.taken {
            Some((_, count, total)) => (seq, count + 1, total + cost),
            None => (seq, 1, cost),
        });
    }

    /// Reports what was taken.
    pub(crate) fn report(&mut self, shared: &Shared) {
        if let Some((seq, count, cost)) = self.taken.take() {
            shared.consumed_up_to(seq, count, cost);
        }
    }
}

/// Hands the reader's batch to the application (or, when the receiver is
/// gone, counts it consumed so that the peer can free it).
pub(super) fn deliver_batch(shared: &Shared, batch: &mut Vec<Delivered>) {
    if batch.is_empty() {
        return;
    }
    shared
        .counters
        .frames_received
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    let cost: usize = batch.iter().map(|(_, b)| Shared::item_cost(b.len())).sum();
    shared.queued_bytes.fetch_add(cost, Ordering::AcqRel);
    shared.recv_charge(cost);
    if !shared.inbox.push(batch) {
        for (seq, item) in batch.drain(..) {
            shared.consumed(seq, item.len());
        }
    }
}

/// Trims the replay buffer up to `ack` and wakes blocked senders. The
/// trimmed frames are dropped after the lock is released (into `freed`,
/// which the caller reuses), so a sender never waits on their release.
///
/// A piggybacked ack (`strict == false`) was fixed when its frame was
/// pushed and may be replayed much later, when it can read as beyond what
/// was sent: it is ignored then. An ack frame is always fresh, and one for
/// data never sent breaks the protocol.
fn apply_ack(
    shared: &Shared,
    ack: Seq,
    strict: bool,
    freed: &mut Vec<Bytes>,
) -> Result<(), String> {
    let result = {
        let mut s = lock(&shared.send);
        let before = s.replay.bytes();
        let result = s.replay.ack_into(ack, freed);
        // Under the lock: the budget follows the buffer's changes in order.
        shared.replay_resized(before, s.replay.bytes());
        result
    };
    freed.clear();
    match result {
        Ok(0) => Ok(()),
        Ok(_) => {
            shared.send_stalled_us.store(0, Ordering::Release);
            shared.space_wake.notify_waiters();
            // A closing writer waits for the buffer to drain. Waking the
            // writer on every ack also measured faster on loopback than
            // leaving it to the senders' wake-ups (tether bench, small
            // messages: 6.6M against 4.9M msgs/s).
            shared.writer_wake.notify_one();
            Ok(())
        }
        Err(_) if !strict => Ok(()),
        Err(e) => Err(format!("bad ack: {e}")),
    }
}

/// What the reader keeps across the links of one session.
#[derive(Default)]
pub(super) struct RecvSide {
    pub(super) state: RecvState,
    /// Items read from the link and not yet handed to the inbox. It lives
    /// here, not in the reader, so that nothing the receive state already
    /// counted as delivered is lost when an attachment's futures are
    /// dropped.
    pub(super) batch: Vec<Delivered>,
    /// The pieces of a fragmented message received so far.
    reassembly: Reassembly,
}

/// Reads one link until it fails, the peer breaks the protocol, or the
/// server's closed frame ends the session.
pub(super) async fn read_loop<Rx: crate::link::LinkRx, P>(
    shared: &Shared,
    rx: &mut Rx,
    side: &mut RecvSide,
    extensions: u8,
    on_first_frame: impl FnOnce(),
) -> AttachEnd<P> {
    let mut on_first_frame = Some(on_first_frame);
    let mut last_ack: Option<Seq> = None;
    let mut freed: Vec<Bytes> = Vec::new();
    let acks = extensions & ext::ACKS != 0;
    // Without keepalive the watchdog drops a link on which nothing arrives
    // for the idle timeout: note when something does, once per batch.
    // The idle timeout (no keepalive) and a client's stall check read when
    // something last arrived: one clock read per batch.
    let track_idle = extensions & ext::KEEPALIVE == 0 || shared.role == Role::Client;
    let RecvSide {
        state: recv,
        batch,
        reassembly,
    } = side;
    let max = shared.max_message_size;
    loop {
        if !acks && shared.queued_bytes.load(Ordering::Acquire) > shared.max_queued_bytes {
            // The base format has no other way to push back on the peer.
            let notified = shared.queue_space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if shared.queued_bytes.load(Ordering::Acquire) > shared.max_queued_bytes
                && !shared.inbox.receiver_gone()
            {
                // Not reading is this side's doing: the link is not idle.
                shared.reader_paused.store(true, Ordering::Release);
                notified.await;
                shared.last_rx_us.store(shared.now_us(), Ordering::Release);
                shared.reader_paused.store(false, Ordering::Release);
            }
            continue;
        }
        // Everything the link has ready now becomes one batch for the
        // receiver: one lock and one wake-up per batch, not per message.
        let mut next = rx.recv().await;
        if track_idle {
            shared.last_rx_us.store(shared.now_us(), Ordering::Release);
        }
        // What the batch will count for in the receive queue.
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
            // The seq of a data frame or a piece, and where its bytes start.
            let data = match incoming {
                Incoming::Data {
                    header,
                    item_offset,
                } => {
                    if let Some(ack) = header.ack {
                        if last_ack != Some(ack) {
                            last_ack = Some(ack);
                            if let Err(e) = apply_ack(shared, ack, false, &mut freed) {
                                return AttachEnd::Protocol(e);
                            }
                        }
                    }
                    Some((header.seq, item_offset, true))
                }
                Incoming::Fragment { seq, item_offset } => Some((seq, item_offset, false)),
                Incoming::Control(control) => {
                    let fin_at = recv.last_received();
                    match on_control(shared, control, recv, reassembly, &mut freed) {
                        Ok(None) => {}
                        Ok(Some(fin)) => {
                            deliver_batch(shared, batch);
                            shared.on_peer_fin(fin, fin_at);
                        }
                        Err(end) => return end,
                    }
                    None
                }
            };
            if let Some((seq, offset, last_piece)) = data {
                let first_ever = recv.last_received().is_none();
                match on_frame(recv, seq) {
                    Ok(Delivery::Deliver) => {
                        if shared.peer_fin().is_some() {
                            return AttachEnd::Protocol(format!(
                                "frame {seq} after the peer's close frame"
                            ));
                        }
                        let mut item = payload;
                        item.advance(offset);
                        if !last_piece {
                            if let Err(e) = reassembly.push(&item, max) {
                                return AttachEnd::Protocol(e.to_string());
                            }
                        } else {
                            // The first frame of the session anchors the ack
                            // state: the peer needs no ack for anything before
                            // it.
                            if first_ever {
                                let _ = shared.ack_told.compare_exchange(
                                    0,
                                    encode_seq(Some(Seq(seq.0.wrapping_sub(1)))),
                                    Ordering::AcqRel,
                                    Ordering::Acquire,
                                );
                            }
                            let item = match reassembly.finish(item, max) {
                                Ok(item) => item,
                                Err(e) => return AttachEnd::Protocol(e.to_string()),
                            };
                            batch_bytes += Shared::item_cost(item.len());
                            batch.push((seq, item));
                        }
                    }
                    Ok(Delivery::Duplicate) => {
                        shared.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => return AttachEnd::Protocol(e),
                }
            }
            if acks {
                let held =
                    shared.queued_bytes.load(Ordering::Acquire) + batch_bytes + reassembly.len();
                if held > shared.recv_cap() {
                    return AttachEnd::Protocol(format!(
                        "peer exceeded its window: {held} bytes unconsumed"
                    ));
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

/// [`RecvState::on_frame`] with its error as the protocol-violation text.
fn on_frame(recv: &mut RecvState, seq: Seq) -> Result<Delivery, String> {
    recv.on_frame(seq)
        .map_err(|e| format!("sequence error: {e}"))
}

/// Handles one control frame. Returns the seq of the peer's close frame
/// when it is delivered (the caller hands over what came before it).
fn on_control<P>(
    shared: &Shared,
    control: Control,
    recv: &mut RecvState,
    reassembly: &Reassembly,
    freed: &mut Vec<Bytes>,
) -> Result<Option<Seq>, AttachEnd<P>> {
    match control {
        Control::Ack(ack) => apply_ack(shared, ack, true, freed).map_err(AttachEnd::Protocol)?,
        Control::Ping(nonce) => {
            shared
                .pong_due
                .store(encode_seq(Some(Seq(nonce))), Ordering::Release);
            shared.writer_wake.notify_one();
        }
        Control::Pong(nonce) => shared.on_pong(nonce),
        Control::Window {
            frames,
            bytes,
            recv_bytes,
        } => {
            shared.peer_window_frames.store(frames, Ordering::Release);
            shared.peer_window_bytes.store(bytes, Ordering::Release);
            // A peer that announces no receive bound (two values) predates
            // it and holds whatever this side's replay bound lets through.
            let recv = match recv_bytes {
                None | Some(u32::MAX) => usize::MAX,
                Some(b) => b as usize,
            };
            shared.peer_recv_bytes.store(recv, Ordering::Release);
            // Senders waiting on the bound assumed until now look again.
            shared.space_wake.notify_waiters();
        }
        Control::Close(fin) => match on_frame(recv, fin).map_err(AttachEnd::Protocol)? {
            Delivery::Deliver if reassembly.is_started() => {
                return Err(AttachEnd::Protocol(
                    "close frame inside a fragmented message".into(),
                ))
            }
            Delivery::Deliver => {
                tracing::debug!("peer closed its side");
                return Ok(Some(fin));
            }
            Delivery::Duplicate => {}
        },
        Control::Closed(fin) => {
            let ours = lock(&shared.send).fin;
            if shared.role != Role::Client || ours != Some(fin) {
                return Err(AttachEnd::Protocol(format!(
                    "unexpected closed frame for seq {fin} (our close frame: {ours:?})"
                )));
            }
            tracing::debug!("server completed the close");
            return Err(AttachEnd::Finished);
        }
    }
    Ok(None)
}
