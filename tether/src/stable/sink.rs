//! `futures` [`Sink`] and [`Stream`] for stable conduits, on the poll
//! primitives `send` and `recv` themselves run on (`Shared::poll_push`,
//! `Inbox::poll_take`): a message through the `Sink` or the `Stream` costs
//! what it costs through `send` or `recv`, with no future boxed per call.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use futures_util::stream::FusedStream;
use futures_util::{Sink, Stream};
use serde::{de::DeserializeOwned, Serialize};
use tether_proto::frame::decode_item;

use super::send::SpaceWait;
use super::{StableConduit, StableReceiver, StableSender};
use crate::error::Error;

/// The graceful close a `Sink` runs: boxed once, when `poll_close` first
/// starts it.
type CloseFuture = Pin<Box<dyn Future<Output = Result<(), Error>> + Send + Sync>>;

/// One sender handle's `Sink` state.
#[derive(Default)]
pub(super) struct SinkState {
    /// A message `start_send` serialized while the replay buffer had no room
    /// for it: queued by the next `poll_ready`, `poll_flush` or `poll_close`,
    /// never serialized again.
    pending: Option<(BytesMut, usize)>,
    /// The registration that waits for room, kept across polls.
    wait: SpaceWait,
    close: Close,
}

#[derive(Default)]
enum Close {
    #[default]
    NotStarted,
    Running(CloseFuture),
    Done,
}

impl<S> StableSender<S> {
    /// Queues the message `start_send` could not queue yet, if any.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let SinkState { pending, wait, .. } = &mut self.sink;
        if let Some((item, len)) = pending {
            let queued = ready!(self.shared.poll_push(cx, item, *len, wait));
            // Queued, or refused for good (closed, lost, too large): either
            // way this handle holds it no longer.
            *pending = None;
            queued?;
        }
        Poll::Ready(Ok(()))
    }
}

/// A `Sink` of messages: `SinkExt::send`, `feed`, `send_all` and
/// `StreamExt::forward` work on a stable sender as on any sink.
///
/// - `poll_ready` waits for room in the replay buffer, the same
///   backpressure as [`send`](StableSender::send): it is pending while the
///   last message given is not in the buffer yet.
/// - `start_send` serializes the message once and queues it as `send` does;
///   when the buffer is full it keeps the serialized message in this handle
///   (one message at most) until the next `poll_ready`, `poll_flush` or
///   `poll_close`. It panics if that message is still there, that is if
///   `poll_ready` was not called first.
/// - `poll_flush` is ready once every message given is *accepted*: in the
///   replay buffer, so delivered exactly once, on this link or a later
///   one, unless the session is lost. It does not wait for the peer to
///   receive or acknowledge anything.
/// - `poll_close` flushes, then runs the graceful close of
///   [`StableSender::close`] and is ready once the close is complete on
///   both sides.
///
/// `send` and `close` have namesakes in `SinkExt`: on a `StableSender`
/// (or `&StableSender`), `tx.send(&msg)` is the sender's own, but on a
/// `&mut StableSender` with `SinkExt` in scope it is `SinkExt::send`,
/// which takes the message by value. Call them by path when in doubt:
/// `SinkExt::send(&mut tx, msg)`, `StableSender::send(&tx, &msg)`.
///
/// Errors are those of `send` ([`Error::Encode`] and [`Error::TooLarge`]
/// concern one message; the sink stays usable). A message the sink holds
/// is lost if the handle is dropped before a flush; and it is ordered
/// after the messages this same handle's `send` queued meanwhile, so flush
/// before switching from the sink to `send`. Each clone of the sender is a
/// sink of its own.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use futures_util::{SinkExt, StreamExt};
/// use tether::{link::mem, Config, Server, StableConduit};
///
/// let (listener, connector) = mem::listener(16);
/// let server = Server::<String>::new(listener, Config::default());
/// let client = StableConduit::<String>::connect(connector, Config::default()).await?;
/// let mut session = server.accept().await.expect("a session");
///
/// let (mut tx, mut rx) = client.split();
/// SinkExt::send(&mut tx, "hello".to_string()).await?; // queued, flushed
/// let echo = session.next().await.expect("a message")?; // StreamExt::next
/// SinkExt::send(&mut session, format!("{echo}, back")).await?;
/// assert_eq!(rx.next().await.transpose()?.as_deref(), Some("hello, back"));
///
/// SinkExt::close(&mut tx).await?; // the graceful close
/// assert!(session.next().await.is_none()); // the stream ends
/// # Ok(())
/// # }
/// ```
impl<S: Serialize> Sink<S> for StableSender<S> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.get_mut().poll_pending(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: S) -> Result<(), Error> {
        let this = self.get_mut();
        assert!(
            this.sink.pending.is_none(),
            "StableSender: start_send without a successful poll_ready"
        );
        this.sink.pending = this.shared.start_push(&item)?;
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.get_mut().poll_pending(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        loop {
            match &mut this.sink.close {
                Close::NotStarted => {
                    this.shared.begin_close();
                    let shared = this.shared.clone();
                    this.sink.close =
                        Close::Running(Box::pin(async move { shared.wait_ended().await }));
                }
                Close::Running(close) => {
                    let done = ready!(close.as_mut().poll(cx));
                    this.sink.close = Close::Done;
                    return Poll::Ready(done);
                }
                // As `close` called again: the session's end, at once.
                Close::Done => {
                    return Poll::Ready(match this.shared.terminal_error() {
                        Some(Error::Closed | Error::PeerClosed) | None => Ok(()),
                        Some(err) => Err(err),
                    })
                }
            }
        }
    }
}

/// A `Stream` of messages: `StreamExt::next`, `forward` and the stream
/// combinators work on a stable receiver.
///
/// It yields what [`recv`](StableReceiver::recv) returns, in the same
/// order, each message once: `Some(Ok(message))` for each message;
/// `Some(Err(Error::Decode))` for a message that does not decode as `R`,
/// after which the stream goes on; `None` where `recv` returns `Ok(None)`
/// (the peer closed, or the session ended without error). When the
/// session is lost it yields `Some(Err(Error::SessionLost))` once, after
/// every message that arrived before, and then `None`. It is fused: after
/// `None` it only returns `None`.
///
/// See the example on the [`Sink`](#impl-Sink%3CS%3E-for-StableSender%3CS%3E)
/// of [`StableSender`].
impl<R: DeserializeOwned> Stream for StableReceiver<R> {
    type Item = Result<R, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.stream_ended {
            return Poll::Ready(None);
        }
        Poll::Ready(match ready!(this.poll_next_item(cx)) {
            Ok(Some((seq, bytes))) => {
                Some(decode_item(&bytes).map_err(|source| Error::decode::<R>(Some(seq), source)))
            }
            Ok(None) => {
                this.stream_ended = true;
                None
            }
            Err(terminal) => {
                this.stream_ended = true;
                Some(Err(terminal))
            }
        })
    }
}

impl<R: DeserializeOwned> FusedStream for StableReceiver<R> {
    fn is_terminated(&self) -> bool {
        self.stream_ended
    }
}

/// The sending half's [`Sink`] (see [`StableSender`'s](StableSender#impl-Sink%3CS%3E-for-StableSender%3CS%3E)).
/// `poll_close` closes the session gracefully, as
/// [`StableSender::close`] does; messages the peer sent still arrive
/// through the [`Stream`] until it ends.
impl<S: Serialize, R> Sink<S> for StableConduit<S, R> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().tx).poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: S) -> Result<(), Error> {
        Pin::new(&mut self.get_mut().tx).start_send(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().tx).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Pin::new(&mut self.get_mut().tx).poll_close(cx)
    }
}

/// The receiving half's [`Stream`] (see [`StableReceiver`'s](StableReceiver#impl-Stream-for-StableReceiver%3CR%3E)).
impl<S, R: DeserializeOwned> Stream for StableConduit<S, R> {
    type Item = Result<R, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.get_mut().rx).poll_next(cx)
    }
}

impl<S, R: DeserializeOwned> FusedStream for StableConduit<S, R> {
    fn is_terminated(&self) -> bool {
        self.rx.is_terminated()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync_unpin<T: Send + Sync + Unpin>() {}

    /// The sink state keeps the handles what they were: a sender shared
    /// by reference across tasks, and both usable with `SinkExt` and
    /// `StreamExt` without pinning.
    #[test]
    fn handles_stay_send_sync_and_unpin() {
        send_sync_unpin::<StableSender<String>>();
        send_sync_unpin::<StableReceiver<String>>();
        send_sync_unpin::<StableConduit<String>>();
    }
}
