//! Messages that borrow from the received buffer.
//!
//! A message type such as `&str`, `&[u8]` or a struct of borrowed fields can be
//! decoded without copying the bytes out of the link's buffer. The borrow must
//! not outlive the buffer, so tether hands out [`Borrowed<Y>`], a
//! self-referential pair of the buffer and the message decoded from it, built
//! on the [`yoke`] crate: the buffer (a reference-counted [`Bytes`]) moves with
//! the message, and [`Borrowed::get`] lends the message for no longer than the
//! `Borrowed` itself lives.
//!
//! Why `yoke` and not a callback: a `Borrowed` can be stored, sent to another
//! task and kept while the conduit goes on receiving, which a callback cannot
//! offer, and `yoke`'s derive makes any borrowed struct usable with one
//! attribute (`#[derive(yoke::Yokeable)]`). The cost is one small allocation
//! (the boxed `Bytes` handle, 32 bytes) per borrowed message; the payload
//! itself is never copied. It keeps the crate free of `unsafe`.
//!
//! ```
//! # use tether::Borrowed;
//! # fn demo(msg: Borrowed<&'static str>) {
//! let text: &str = msg.get();
//! # let _ = text;
//! # }
//! ```

use bytes::Bytes;
use serde::Deserialize;
use tether_proto::frame::decode_item;
use tether_proto::FrameError;
use yoke::{Yoke, Yokeable};

/// A type that can be decoded borrowing from a buffer: any
/// [`Yokeable`] type whose borrowed form implements [`Deserialize`].
///
/// Implemented automatically; `&'static str`, `&'static [u8]` and structs
/// deriving `Yokeable` (with `#[serde(borrow)]` on `Cow` fields) qualify.
/// A top-level `Cow<'static, str>` is accepted too, but serde always
/// decodes it as `Cow::Owned`: a copy.
pub trait BorrowedMessage: for<'a> Yokeable<'a> + Sized {
    /// Decodes `bytes` (a whole postcard item) borrowing from them.
    fn decode_borrowed(bytes: Bytes) -> Result<Borrowed<Self>, FrameError>;
}

impl<Y> BorrowedMessage for Y
where
    Y: for<'a> Yokeable<'a>,
    for<'a> <Y as Yokeable<'a>>::Output: Deserialize<'a>,
{
    fn decode_borrowed(bytes: Bytes) -> Result<Borrowed<Self>, FrameError> {
        Yoke::try_attach_to_cart(Box::new(bytes), |b: &Bytes| decode_item(b))
            .map(|inner| Borrowed { inner })
    }
}

/// A received message that borrows from its own buffer. See the
/// [module documentation](self).
pub struct Borrowed<Y: BorrowedMessage> {
    inner: Yoke<Y, Box<Bytes>>,
}

impl<Y: BorrowedMessage> Borrowed<Y> {
    /// Decodes `bytes` (a whole postcard item) into a borrowed message.
    pub fn decode(bytes: Bytes) -> Result<Self, FrameError> {
        Y::decode_borrowed(bytes)
    }

    /// The message, borrowing from the buffer held by `self`.
    pub fn get<'a>(&'a self) -> &'a <Y as Yokeable<'a>>::Output {
        self.inner.get()
    }

    /// The buffer the message was decoded from.
    pub fn bytes(&self) -> &Bytes {
        self.inner.backing_cart()
    }
}

impl<Y: BorrowedMessage> std::fmt::Debug for Borrowed<Y>
where
    for<'a> <Y as Yokeable<'a>>::Output: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Borrowed").field(self.get()).finish()
    }
}
