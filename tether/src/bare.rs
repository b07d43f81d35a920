//! The bare conduit: typed messages over one link, nothing more.
//!
//! A bare conduit encodes each message with postcard straight into a buffer
//! it owns (one serialization, no intermediate `Vec`) and hands the frozen
//! bytes to the link; the receiving side decodes from the link's buffer.
//! There is no sequencing and no recovery: when the link fails, the conduit
//! fails. Use a stable conduit (`crate::stable`) when the link may drop.

use std::borrow::Borrow;
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tether_proto::frame::{decode_item, encode_item};

use crate::borrowed::{Borrowed, BorrowedMessage};
use crate::error::Error;
use crate::link::{Link, LinkRx, LinkTx};

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
    tx: T,
    arena: Arena,
    _msg: PhantomData<fn(&S)>,
}

impl<T: LinkTx, S> BareSender<T, S> {
    /// Wraps the sending half of a link.
    pub fn new(tx: T) -> Self {
        BareSender {
            tx,
            arena: Arena::new(),
            _msg: PhantomData,
        }
    }

    /// Flushes messages queued with [`feed`](Self::feed).
    pub async fn flush(&mut self) -> Result<(), Error> {
        Ok(self.tx.flush().await?)
    }

    /// Flushes, then closes the link gracefully: the peer receives every
    /// earlier message and then the end of the stream.
    pub async fn close(&mut self) -> Result<(), Error> {
        Ok(self.tx.close().await?)
    }

    /// The link's sending half.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.tx
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
        let frame = self.encode(msg)?;
        Ok(self.tx.feed(frame).await?)
    }

    /// Sends one message and flushes it.
    ///
    /// `msg` is an `&S` or a reference to anything `S` borrows as
    /// ([`Borrow`]): `send("hello")` for `S = String`, `send(&[1, 2][..])`
    /// for `S = Vec<u8>`; see
    /// [`StableSender::send`](crate::StableSender::send).
    ///
    /// A message over the link's maximum payload is a link error
    /// ([`LinkError::TooLarge`](crate::link::LinkError::TooLarge)) and, as
    /// every link error, leaves the link dead: a bare conduit has no way to
    /// recover. The stable conduit refuses such messages before they reach
    /// the link.
    pub async fn send<Q>(&mut self, msg: &Q) -> Result<(), Error>
    where
        S: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let frame = self.encode(msg)?;
        Ok(self.tx.send(frame).await?)
    }
}

/// The receiving half of a [`BareConduit`].
pub struct BareReceiver<T, R> {
    rx: T,
    _msg: PhantomData<fn() -> R>,
}

impl<T: LinkRx, R> BareReceiver<T, R> {
    /// Wraps the receiving half of a link.
    pub fn new(rx: T) -> Self {
        BareReceiver {
            rx,
            _msg: PhantomData,
        }
    }

    /// Receives the next payload undecoded.
    pub async fn recv_bytes(&mut self) -> Result<Option<Bytes>, Error> {
        Ok(self.rx.recv().await?)
    }

    /// Receives a message that borrows from the received buffer (`&str`,
    /// `&[u8]`, or a struct of them) without copying it; see [`Borrowed`].
    pub async fn recv_borrowed<Y>(&mut self) -> Result<Option<Borrowed<Y>>, Error>
    where
        Y: BorrowedMessage,
    {
        match self.rx.recv().await? {
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
        match self.rx.recv().await? {
            Some(bytes) => decode_item(&bytes)
                .map(Some)
                .map_err(|source| Error::decode::<R>(None, source)),
            None => Ok(None),
        }
    }
}
