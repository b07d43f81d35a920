//! The bare conduit: typed messages over one link, nothing more.
//!
//! A bare conduit encodes each message with postcard straight into a buffer
//! it owns (one serialization, no intermediate `Vec`) and hands the frozen
//! bytes to the link; the receiving side decodes from the link's buffer.
//! There is no sequencing and no recovery: when the link fails, the conduit
//! fails. Use a stable conduit (`crate::stable`) when the link may drop.
//!
//! Both halves are also a `futures` `Sink` and `Stream`. Links offer only
//! async methods, whose futures borrow the link and must be kept across
//! polls, so each operation of the `Sink` and the `Stream` runs in a future
//! that owns the link half and hands it back when it completes; that
//! future lives in a box allocated once per handle and reused for every
//! operation (tokio-util's `ReusableBoxFuture`). The async methods call the
//! link directly, as before.

use std::borrow::Borrow;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::stream::FusedStream;
use futures_util::{Sink, Stream};
use serde::{de::DeserializeOwned, Serialize};
use tether_proto::frame::{decode_item, encode_item};
use tokio_util::sync::ReusableBoxFuture;

use crate::borrowed::{Borrowed, BorrowedMessage};
use crate::error::Error;
use crate::link::{Link, LinkError, LinkRx, LinkTx};

/// Largest chunk the encoder serializes into. Frames share a chunk until it
/// is full, so small messages cost no allocation of their own.
pub(crate) const ENCODE_CHUNK: usize = 16 * 1024;

/// First chunk of an encoder; each later chunk doubles, up to
/// [`ENCODE_CHUNK`]. A conduit that sends little holds little (an idle
/// server session is mostly its buffers), one that streams reaches full
/// chunks after a handful of allocations.
const FIRST_CHUNK: usize = 512;

/// Room a chunk must have left for another message to go in without growing
/// mid-serialization.
const MIN_SPARE: usize = 128;

/// The buffer messages are serialized into and split off from.
#[derive(Debug)]
pub(crate) struct Arena {
    pub(crate) buf: BytesMut,
    next_chunk: usize,
}

impl Arena {
    pub(crate) fn new() -> Self {
        Arena {
            buf: BytesMut::new(),
            next_chunk: FIRST_CHUNK,
        }
    }

    /// Makes sure there is room for a typical small message; allocates a
    /// fresh chunk only when the current one is used up.
    pub(crate) fn ensure_chunk(&mut self) {
        if self.buf.capacity() - self.buf.len() < MIN_SPARE {
            self.buf.reserve(self.next_chunk);
            self.next_chunk = (self.next_chunk * 2).min(ENCODE_CHUNK);
        }
    }
}

/// A typed conduit over one link: sends `S`, receives `R`.
pub struct BareConduit<L: Link, S, R = S> {
    tx: BareSender<L::Tx, S>,
    rx: BareReceiver<L::Rx, R>,
}

impl<L: Link, S, R> BareConduit<L, S, R> {
    /// Wraps a link.
    pub fn new(link: L) -> Self {
        let (tx, rx) = link.split();
        BareConduit {
            tx: BareSender::new(tx),
            rx: BareReceiver::new(rx),
        }
    }

    /// Splits into a sending and a receiving half that can live on
    /// different tasks.
    pub fn split(self) -> (BareSender<L::Tx, S>, BareReceiver<L::Rx, R>) {
        (self.tx, self.rx)
    }
}

impl<L: Link, S, R> BareConduit<L, S, R> {
    /// Flushes queued messages; see [`BareSender::flush`].
    pub async fn flush(&mut self) -> Result<(), Error> {
        self.tx.flush().await
    }

    /// Closes the sending side gracefully; see [`BareSender::close`].
    pub async fn close(&mut self) -> Result<(), Error> {
        self.tx.close().await
    }

    /// Receives a borrowed message; see [`BareReceiver::recv_borrowed`].
    pub async fn recv_borrowed<Y: BorrowedMessage>(
        &mut self,
    ) -> Result<Option<Borrowed<Y>>, Error> {
        self.rx.recv_borrowed().await
    }
}

impl<L: Link, S: Serialize, R> BareConduit<L, S, R> {
    /// Sends one message and flushes it; see [`BareSender::send`].
    pub async fn send<Q>(&mut self, msg: &Q) -> Result<(), Error>
    where
        S: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.tx.send(msg).await
    }

    /// Queues one message without flushing; see [`BareSender::feed`].
    pub async fn feed<Q>(&mut self, msg: &Q) -> Result<(), Error>
    where
        S: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.tx.feed(msg).await
    }
}

impl<L: Link, S, R: DeserializeOwned> BareConduit<L, S, R> {
    /// Receives one message; see [`BareReceiver::recv`].
    pub async fn recv(&mut self) -> Result<Option<R>, Error> {
        self.rx.recv().await
    }
}

/// The sending half of a [`BareConduit`].
pub struct BareSender<T, S> {
    /// `None` while a `Sink` operation holds it (`op`): from `start_send`,
    /// or a poll that returned `Pending`, to the poll that completes it.
    tx: Option<T>,
    arena: Arena,
    /// The `Sink`'s link operation in flight, if `in_flight`; boxed once.
    op: Option<ReusableBoxFuture<'static, (T, Result<(), LinkError>)>>,
    in_flight: Option<OpKind>,
    /// Messages were queued since the last flush.
    dirty: bool,
    _msg: PhantomData<fn(&S)>,
}

/// The link is never pinned (a `Sink` operation moves it into its boxed
/// future), so the handle can move whatever `T` is.
impl<T, S> Unpin for BareSender<T, S> {}

/// A link operation of the `Sink`.
enum Op {
    Feed(Bytes),
    Flush,
    Close,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Feed,
    Flush,
    Close,
}

/// Runs `op` on a link half it owns and hands the half back. One future
/// type for every operation, so the `Sink`'s box is reused for each.
async fn run_op<T: LinkTx>(mut tx: T, op: Op) -> (T, Result<(), LinkError>) {
    let result = match op {
        Op::Feed(frame) => tx.feed(frame).await,
        Op::Flush => tx.flush().await,
        Op::Close => tx.close().await,
    };
    (tx, result)
}

/// What a link half in use by a `Sink` or `Stream` operation says to an
/// access that needs it now.
const IN_USE: &str = "the link half is in use by a pending Sink or Stream operation";

impl<T: LinkTx, S> BareSender<T, S> {
    /// Wraps the sending half of a link.
    pub fn new(tx: T) -> Self {
        BareSender {
            tx: Some(tx),
            arena: Arena::new(),
            op: None,
            in_flight: None,
            dirty: false,
            _msg: PhantomData,
        }
    }

    /// Starts `op` on the link (the `Sink`'s), without polling it.
    fn start_op(&mut self, op: Op) {
        let kind = match op {
            Op::Feed(_) => OpKind::Feed,
            Op::Flush => OpKind::Flush,
            Op::Close => OpKind::Close,
        };
        let future = run_op(self.tx.take().expect(IN_USE), op);
        match &mut self.op {
            Some(boxed) => boxed.set(future),
            None => self.op = Some(ReusableBoxFuture::new(future)),
        }
        self.in_flight = Some(kind);
    }

    /// Drives the `Sink`'s operation in flight, if any, to its end.
    fn poll_op(&mut self, cx: &mut Context<'_>) -> Poll<Option<(OpKind, Result<(), LinkError>)>> {
        let Some(kind) = self.in_flight else {
            return Poll::Ready(None);
        };
        let op = self.op.as_mut().expect("an operation in flight");
        let (tx, result) = ready!(op.poll(cx));
        self.tx = Some(tx);
        self.in_flight = None;
        Poll::Ready(Some((kind, result)))
    }

    /// Finishes what the `Sink` left in flight, so that the async methods
    /// find the link and keep the order of what was given.
    async fn settle(&mut self) -> Result<&mut T, Error> {
        if let Some((_, result)) = std::future::poll_fn(|cx| self.poll_op(cx)).await {
            result?;
        }
        Ok(self.tx.as_mut().expect(IN_USE))
    }

    /// Flushes messages queued with [`feed`](Self::feed).
    pub async fn flush(&mut self) -> Result<(), Error> {
        self.settle().await?.flush().await?;
        self.dirty = false;
        Ok(())
    }

    /// Flushes, then closes the link gracefully: the peer receives every
    /// earlier message and then the end of the stream.
    pub async fn close(&mut self) -> Result<(), Error> {
        self.settle().await?.close().await?;
        self.dirty = false;
        Ok(())
    }

    /// The link's sending half.
    ///
    /// # Panics
    ///
    /// While the `Sink` has an operation in flight (a `poll_ready`,
    /// `poll_flush` or `poll_close` returned `Pending`, or a message was
    /// given since the last one): complete it first, for example with
    /// `SinkExt::flush`.
    pub fn get_mut(&mut self) -> &mut T {
        self.tx.as_mut().expect(IN_USE)
    }
}

impl<T: LinkTx, S: Serialize> BareSender<T, S> {
    fn encode<Q: Serialize + ?Sized>(&mut self, msg: &Q) -> Result<Bytes, Error> {
        self.arena.ensure_chunk();
        encode_item(msg, &mut self.arena.buf).map_err(Error::Encode)?;
        Ok(self.arena.buf.split().freeze())
    }

    /// Queues one message without flushing, so that several messages can
    /// share one write. Waits while the link cannot take more. `msg` is an
    /// `&S` or anything `S` borrows as, as for [`send`](Self::send).
    pub async fn feed<Q>(&mut self, msg: &Q) -> Result<(), Error>
    where
        S: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.settle().await?;
        let frame = self.encode(msg)?;
        self.tx.as_mut().expect(IN_USE).feed(frame).await?;
        self.dirty = true;
        Ok(())
    }

    /// Sends one message and flushes it.
    ///
    /// `msg` is an `&S` or a reference to anything `S` borrows as
    /// ([`Borrow`]): `send("hello")` for `S = String`, `send(&[1, 2][..])`
    /// for `S = Vec<u8>`; see
    /// [`StableSender::send`](crate::StableSender::send).
    ///
    /// A message over the link's maximum payload is a link error
    /// ([`LinkError::TooLarge`]) and, as
    /// every link error, leaves the link dead: a bare conduit has no way to
    /// recover. The stable conduit refuses such messages before they reach
    /// the link.
    pub async fn send<Q>(&mut self, msg: &Q) -> Result<(), Error>
    where
        S: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        self.settle().await?;
        let frame = self.encode(msg)?;
        self.tx.as_mut().expect(IN_USE).send(frame).await?;
        self.dirty = false;
        Ok(())
    }
}

/// The receiving half of a [`BareConduit`].
pub struct BareReceiver<T, R> {
    /// `None` while the `Stream`'s receive holds it (`recv`): after a
    /// `poll_next` that returned `Pending`.
    rx: Option<T>,
    /// The `Stream`'s receive in flight, if `receiving`; boxed once.
    recv: Option<ReusableBoxFuture<'static, RecvOutput<T>>>,
    receiving: bool,
    /// The `Stream` returned its end or a link error (which ends the half).
    stream_ended: bool,
    _msg: PhantomData<fn() -> R>,
}

type RecvOutput<T> = (T, Result<Option<Bytes>, LinkError>);

/// As for [`BareSender`]: the link half is never pinned.
impl<T, R> Unpin for BareReceiver<T, R> {}

/// Receives on a link half it owns and hands the half back.
async fn recv_owned<T: LinkRx>(mut rx: T) -> RecvOutput<T> {
    let result = rx.recv().await;
    (rx, result)
}

impl<T: LinkRx, R> BareReceiver<T, R> {
    /// Wraps the receiving half of a link.
    pub fn new(rx: T) -> Self {
        BareReceiver {
            rx: Some(rx),
            recv: None,
            receiving: false,
            stream_ended: false,
            _msg: PhantomData,
        }
    }

    /// The next payload, through the reused box: the `Stream`'s receive.
    fn poll_payload(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, LinkError>> {
        if !self.receiving {
            let future = recv_owned(self.rx.take().expect(IN_USE));
            match &mut self.recv {
                Some(boxed) => boxed.set(future),
                None => self.recv = Some(ReusableBoxFuture::new(future)),
            }
            self.receiving = true;
        }
        let recv = self.recv.as_mut().expect("a receive in flight");
        let (rx, result) = ready!(recv.poll(cx));
        self.rx = Some(rx);
        self.receiving = false;
        Poll::Ready(result)
    }

    /// The next payload: the one a `Stream` poll left in flight, if any,
    /// or straight from the link. Cancel-safe, as the link's `recv`.
    async fn payload(&mut self) -> Result<Option<Bytes>, LinkError> {
        if self.receiving {
            return std::future::poll_fn(|cx| self.poll_payload(cx)).await;
        }
        self.rx.as_mut().expect(IN_USE).recv().await
    }

    /// Receives the next payload undecoded.
    pub async fn recv_bytes(&mut self) -> Result<Option<Bytes>, Error> {
        Ok(self.payload().await?)
    }

    /// Receives a message that borrows from the received buffer (`&str`,
    /// `&[u8]`, or a struct of them) without copying it; see [`Borrowed`].
    pub async fn recv_borrowed<Y>(&mut self) -> Result<Option<Borrowed<Y>>, Error>
    where
        Y: BorrowedMessage,
    {
        match self.payload().await? {
            Some(bytes) => Borrowed::decode(bytes)
                .map(Some)
                .map_err(|source| Error::decode::<Y>(None, source)),
            None => Ok(None),
        }
    }
}

impl<T: LinkRx, R: DeserializeOwned> BareReceiver<T, R> {
    /// Receives the next message; `Ok(None)` once the peer closed the link
    /// gracefully. A decode failure consumes the message and is reported as
    /// [`Error::Decode`]; the conduit stays usable.
    pub async fn recv(&mut self) -> Result<Option<R>, Error> {
        match self.payload().await? {
            Some(bytes) => decode_item(&bytes)
                .map(Some)
                .map_err(|source| Error::decode::<R>(None, source)),
            None => Ok(None),
        }
    }
}

/// A `Sink` of messages, with the semantics of the async methods:
/// `start_send` serializes the message once (as [`feed`](Self::feed)) and
/// hands it to the link, `poll_ready` waits until the link took the last
/// one (the link's backpressure), `poll_flush` is
/// [`flush`](Self::flush) (the messages are written to the transport, not
/// acknowledged by anyone) and `poll_close` is [`close`](Self::close).
/// The sender's own `send`, `feed`, `flush` and `close` come before
/// `SinkExt`'s in method calls: call those by path
/// (`SinkExt::send(&mut tx, msg)`).
///
/// Every error is the link's, and fatal to the conduit, except
/// [`Error::Encode`], which concerns one message. A message given and not
/// yet flushed is lost if the handle is dropped. Each link operation runs
/// in a future kept in a box allocated once per handle and reused.
impl<T: LinkTx, S: Serialize> Sink<S> for BareSender<T, S> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if let Some((_, result)) = ready!(this.poll_op(cx)) {
            result?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, item: S) -> Result<(), Error> {
        let this = self.get_mut();
        assert!(
            this.in_flight.is_none(),
            "BareSender: start_send without a successful poll_ready"
        );
        let frame = this.encode(&item)?;
        this.start_op(Op::Feed(frame));
        this.dirty = true;
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        loop {
            if let Some((_, result)) = ready!(this.poll_op(cx)) {
                result?;
            }
            if !this.dirty {
                return Poll::Ready(Ok(()));
            }
            this.dirty = false;
            this.start_op(Op::Flush);
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        loop {
            if let Some((kind, result)) = ready!(this.poll_op(cx)) {
                result?;
                if kind == OpKind::Close {
                    this.dirty = false;
                    return Poll::Ready(Ok(()));
                }
            }
            this.start_op(Op::Close);
        }
    }
}

/// A `Stream` of messages, as [`recv`](Self::recv) returns them:
/// `Some(Ok(message))`; `Some(Err(Error::Decode))` for a message that does
/// not decode, after which the stream goes on; `None` once the peer closed
/// the link; a link error once (it ends the link), then `None`. Fused.
/// Each receive runs in a future kept in a box allocated once per handle
/// and reused.
impl<T: LinkRx, R: DeserializeOwned> Stream for BareReceiver<T, R> {
    type Item = Result<R, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.stream_ended {
            return Poll::Ready(None);
        }
        Poll::Ready(match ready!(this.poll_payload(cx)) {
            Ok(Some(bytes)) => {
                Some(decode_item(&bytes).map_err(|source| Error::decode::<R>(None, source)))
            }
            Ok(None) => {
                this.stream_ended = true;
                None
            }
            Err(e) => {
                this.stream_ended = true;
                Some(Err(e.into()))
            }
        })
    }
}

impl<T: LinkRx, R: DeserializeOwned> FusedStream for BareReceiver<T, R> {
    fn is_terminated(&self) -> bool {
        self.stream_ended
    }
}

/// The sending half's `Sink` (see [`BareSender`]'s).
impl<L: Link, S: Serialize, R> Sink<S> for BareConduit<L, S, R> {
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

/// The receiving half's `Stream` (see [`BareReceiver`]'s).
impl<L: Link, S, R: DeserializeOwned> Stream for BareConduit<L, S, R> {
    type Item = Result<R, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.get_mut().rx).poll_next(cx)
    }
}

impl<L: Link, S, R: DeserializeOwned> FusedStream for BareConduit<L, S, R> {
    fn is_terminated(&self) -> bool {
        self.rx.is_terminated()
    }
}
