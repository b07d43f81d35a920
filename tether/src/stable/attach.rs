//! One link attachment: the reader, the writer and the keepalive watchdog
//! of a session on one link, run together until the link fails, the
//! session's close completes, or a newer link preempts this one; and the
//! driver's side of the application's handles.

use std::sync::Arc;
use std::time::Duration;

use tether_proto::ext;

use super::recv::{deliver_batch, read_loop, RecvSide};
use super::send::write_loop;
use super::shared::{Role, Shared};
use crate::link::{LinkError, LinkRx, LinkTx};
use crate::throttle::{throttled, Throttle};

/// Why one attachment ended.
#[derive(Debug)]
pub(crate) enum AttachEnd<P> {
    /// The link failed or ended; the session goes on.
    Link(LinkError),
    /// The peer ended the link at a payload boundary.
    Eof,
    /// The peer broke the protocol; the session is lost.
    Protocol(String),
    /// This side's part of the close is complete (the server: the client's
    /// close arrived and everything it sent was acknowledged; the client:
    /// the server said so). Without the close extension: this side closed
    /// and everything it sent was acknowledged.
    Finished,
    /// The close did not complete within the close timeout.
    CloseTimedOut,
    /// No pong arrived within the keepalive timeout, or (without
    /// keepalive) nothing at all within the idle timeout.
    Timeout,
    /// The caller's preempting future resolved (e.g. a newer link arrived).
    Preempted(P),
}

/// The driver's side of the application handles: what the reader keeps
/// across links, and the end of the inbox when the driver goes away.
pub(crate) struct Endpoint {
    shared: Arc<Shared>,
    pub(super) recv: RecvSide,
}

/// The application's side, before it is wrapped in typed handles: one
/// sender and one receiver, counted as live handles of the session until
/// they are dropped.
pub(crate) struct Handles {
    shared: Option<Arc<Shared>>,
}

impl Handles {
    /// Takes the session out; the caller now owns the two handles' counts.
    pub(crate) fn into_shared(mut self) -> Arc<Shared> {
        self.shared.take().expect("handles taken once")
    }
}

impl Drop for Handles {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.handle_dropped();
            shared.handle_dropped();
        }
    }
}

pub(crate) fn endpoint(shared: Arc<Shared>) -> (Endpoint, Handles) {
    shared.handle_added();
    shared.handle_added();
    (
        Endpoint {
            shared: shared.clone(),
            recv: RecvSide::default(),
        },
        Handles {
            shared: Some(shared),
        },
    )
}

impl Endpoint {
    /// What this side last received, for its hello.
    pub(crate) fn last_received(&self) -> Option<tether_proto::Seq> {
        self.recv.state.last_received()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        deliver_batch(&self.shared, &mut self.recv.batch);
        self.shared.inbox.close_driver();
    }
}

/// Polls `fut` once: its output if it is ready now.
pub(super) fn poll_now<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// Runs one link attachment until it fails, this side's close completes or
/// times out, or `preempt` resolves. `on_first_frame` runs when the first
/// well-formed frame arrives on this link (the server confirms a rotated
/// key with it).
pub(crate) async fn run_attachment<Tx, Rx, P>(
    shared: &Shared,
    endpoint: &mut Endpoint,
    tx: &mut Tx,
    rx: &mut Rx,
    preempt: impl std::future::Future<Output = P>,
    on_first_frame: impl FnOnce(),
) -> AttachEnd<P>
where
    Tx: LinkTx,
    Rx: LinkRx,
{
    let recv = &mut endpoint.recv;
    deliver_batch(shared, &mut recv.batch);
    let extensions = shared.extensions();
    let end = tokio::select! {
        biased;
        p = preempt => AttachEnd::Preempted(p),
        () = shared.close_expired() => AttachEnd::CloseTimedOut,
        end = read_loop(shared, rx, recv, extensions, on_first_frame) => end,
        end = write_loop(shared, tx, extensions) => end,
        end = watchdog(shared, extensions) => end,
    };
    // Whatever the reader had decoded when the attachment ended is the
    // application's.
    deliver_batch(shared, &mut recv.batch);
    match end {
        // The client may end the link as soon as the server's closed frame
        // arrived, and its end of stream can win the race against the
        // server's own return from that last write. With everything
        // delivered both ways (the client's close frame arrived and the
        // server's was acknowledged), the server's part is done: a late
        // resume is answered "closed" by the tombstone. Not on the client:
        // its ack of the server's close frame may not have arrived, and
        // only the server can say so.
        AttachEnd::Link(_) | AttachEnd::Eof | AttachEnd::Timeout
            if shared.role == Role::Server && shared.delivered_both_ways() =>
        {
            AttachEnd::Finished
        }
        end => end,
    }
}

/// Declares the link dead when no pong answered a ping for the keepalive
/// timeout; without keepalive, when nothing at all arrived for the idle
/// timeout (not counting the time this side's reader waits for its
/// application).
///
/// In the base format it also ends a link on which a `send` has waited
/// for room for a keepalive interval with no frame freed: a peer that only
/// receives never acknowledges, and the hellos of the resume that follows
/// report what each side received, which trims the replay buffer
/// (`resume_from`). Without this, a one-way stream to such a peer would
/// stop for good at the replay bound.
///
/// It runs beside the reader and the writer, never behind them: a writer
/// blocked on a full socket (a peer that stopped reading) holds up neither
/// the clock nor this check, and such a peer, which never sees the ping,
/// cannot answer it either, since its nonce is unpredictable.
async fn watchdog<P>(shared: &Shared, extensions: u8) -> AttachEnd<P> {
    use std::sync::atomic::Ordering;
    static TIMEOUT_LOG: Throttle = Throttle::new(10);
    let keepalive = extensions & ext::KEEPALIVE != 0;
    let (last_seen, timeout) = if keepalive {
        (&shared.last_pong_us, shared.keepalive_timeout)
    } else {
        (&shared.last_rx_us, shared.idle_timeout)
    };
    let timeout_us = u64::try_from(timeout.as_micros()).unwrap_or(u64::MAX);
    let acks = extensions & ext::ACKS != 0;
    let stall_us = u64::try_from(shared.keepalive_interval.as_micros()).unwrap_or(u64::MAX);
    loop {
        let stall_wake = shared.stall_wake.notified();
        tokio::pin!(stall_wake);
        stall_wake.as_mut().enable();
        let due = last_seen.load(Ordering::Acquire).saturating_add(timeout_us);
        let now = shared.now_us();
        if !acks {
            let stalled = shared.send_stalled_us.load(Ordering::Acquire);
            if stalled != 0 {
                let stall_due = stalled.saturating_add(stall_us);
                if now >= stall_due {
                    shared.counters.ack_stalls.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("no ack for a waiting send: ending the link for a resume");
                    return AttachEnd::Timeout;
                }
                if stall_due < due {
                    tokio::time::sleep(Duration::from_micros(stall_due - now)).await;
                    continue;
                }
            }
        }
        if now < due {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_micros(due - now)) => {}
                () = &mut stall_wake, if !acks => {}
            }
            continue;
        }
        if !keepalive && shared.reader_paused.load(Ordering::Acquire) {
            // Not the link's silence: the reader stopped. It notes the time
            // when it reads again.
            tokio::time::sleep(timeout.min(Duration::from_secs(1))).await;
            continue;
        }
        if keepalive {
            shared
                .counters
                .keepalive_timeouts
                .fetch_add(1, Ordering::Relaxed);
            throttled!(
                tracing::Level::INFO,
                TIMEOUT_LOG,
                ?timeout,
                "no pong: link declared dead"
            );
        } else {
            shared
                .counters
                .idle_timeouts
                .fetch_add(1, Ordering::Relaxed);
            throttled!(
                tracing::Level::INFO,
                TIMEOUT_LOG,
                ?timeout,
                "nothing arrived: idle link dropped"
            );
        }
        return AttachEnd::Timeout;
    }
}
