//! [`ByteBuf`]: a message type for raw bytes.
//!
//! A conduit of `Vec<u8>` works, but serde sees a `Vec<u8>` as a sequence
//! of `u8`s and serializes it element by element. [`ByteBuf`] is a
//! `Vec<u8>` that serializes as a serde byte string instead: postcard writes
//! its length as a varint and then the bytes, in one copy. Those are the same
//! bytes as a postcard `Vec<u8>` or `&[u8]`, so either end may use either
//! type; only the speed differs.
//!
//! It is named after `serde_bytes::ByteBuf`, which it matches on the wire and
//! in spirit (an owned, growable byte buffer), and not `Bytes`, so that it
//! does not clash with [`bytes::Bytes`], the shared buffer tether's links
//! carry. Conversions to and from `Vec<u8>` and `bytes::Bytes` reuse the
//! allocation where the `bytes` crate can.

use std::borrow::{Borrow, BorrowMut};
use std::fmt;
use std::ops::{Deref, DerefMut};

use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};
use serde::ser::{Serialize, Serializer};

/// An owned byte buffer that serializes as a byte string: the message type
/// for raw bytes.
///
/// It dereferences to `[u8]` (and mutably), converts from and into
/// `Vec<u8>` and [`bytes::Bytes`] without copying where it can, and from
/// `&[u8]` with one copy. With postcard, tether's encoding, a `ByteBuf` of
/// `n` bytes is `n` as a varint followed by the bytes.
///
/// ```
/// use tether::ByteBuf;
///
/// let msg = ByteBuf::from(vec![1, 2, 3]);
/// assert_eq!(postcard::to_allocvec(&msg).unwrap(), [3, 1, 2, 3]);
/// assert_eq!(&msg[..], [1, 2, 3]);
/// let shared: bytes::Bytes = msg.into(); // no copy
/// assert_eq!(ByteBuf::from(shared), [1u8, 2, 3][..]);
/// ```
///
/// Through a stable conduit, a `ByteBuf` or a byte slice
/// (`send(&b"ping"[..])`, see [`StableSender::send`](crate::StableSender::send)):
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tether::{link::mem, ByteBuf, Config, Server, StableConduit};
///
/// let (listener, connector) = mem::listener(16);
/// let server = Server::<ByteBuf>::new(listener, Config::default());
/// let client = StableConduit::<ByteBuf>::connect(connector, Config::default()).await?;
/// let mut session = server.accept().await.expect("a session");
///
/// client.send(&ByteBuf::from(vec![0xff; 3])).await?;
/// client.send(&b"ping"[..]).await?;
/// assert_eq!(session.recv().await?.as_deref(), Some(&[0xff; 3][..]));
/// assert_eq!(session.recv().await?.as_deref(), Some(&b"ping"[..]));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteBuf(Vec<u8>);

impl ByteBuf {
    /// An empty buffer; does not allocate.
    pub const fn new() -> Self {
        ByteBuf(Vec::new())
    }

    /// An empty buffer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        ByteBuf(Vec::with_capacity(capacity))
    }

    /// The bytes, as a `Vec<u8>`; no copy.
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Debug for ByteBuf {
    /// As a byte string literal: `b"ab\x00"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("b\"")?;
        for &b in &self.0 {
            fmt::Display::fmt(&std::ascii::escape_default(b), f)?;
        }
        f.write_str("\"")
    }
}

impl Deref for ByteBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl DerefMut for ByteBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl AsRef<[u8]> for ByteBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl AsMut<[u8]> for ByteBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// Lets `send(&bytes[..])` go to a conduit of `ByteBuf`: a `[u8]`
/// serializes (element by element) to the same postcard bytes.
impl Borrow<[u8]> for ByteBuf {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl BorrowMut<[u8]> for ByteBuf {
    fn borrow_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl From<Vec<u8>> for ByteBuf {
    /// No copy.
    fn from(bytes: Vec<u8>) -> Self {
        ByteBuf(bytes)
    }
}

impl From<&[u8]> for ByteBuf {
    /// One copy.
    fn from(bytes: &[u8]) -> Self {
        ByteBuf(bytes.to_vec())
    }
}

impl<const N: usize> From<[u8; N]> for ByteBuf {
    fn from(bytes: [u8; N]) -> Self {
        ByteBuf(bytes.to_vec())
    }
}

impl From<bytes::Bytes> for ByteBuf {
    /// No copy when `bytes` is the only handle to a buffer that came from a
    /// `Vec<u8>` (the `bytes` crate's rule); one copy otherwise.
    fn from(bytes: bytes::Bytes) -> Self {
        ByteBuf(bytes.into())
    }
}

impl From<bytes::BytesMut> for ByteBuf {
    /// No copy when the buffer is not shared; one copy otherwise.
    fn from(bytes: bytes::BytesMut) -> Self {
        ByteBuf(bytes.into())
    }
}

impl From<ByteBuf> for Vec<u8> {
    /// No copy.
    fn from(bytes: ByteBuf) -> Self {
        bytes.0
    }
}

impl From<ByteBuf> for bytes::Bytes {
    /// No copy.
    fn from(bytes: ByteBuf) -> Self {
        bytes::Bytes::from(bytes.0)
    }
}

impl FromIterator<u8> for ByteBuf {
    fn from_iter<I: IntoIterator<Item = u8>>(iter: I) -> Self {
        ByteBuf(Vec::from_iter(iter))
    }
}

impl Extend<u8> for ByteBuf {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

impl PartialEq<[u8]> for ByteBuf {
    fn eq(&self, other: &[u8]) -> bool {
        self.0 == other
    }
}

impl PartialEq<&[u8]> for ByteBuf {
    fn eq(&self, other: &&[u8]) -> bool {
        self.0 == *other
    }
}

impl PartialEq<Vec<u8>> for ByteBuf {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.0 == *other
    }
}

impl Serialize for ByteBuf {
    fn serialize<Ser: Serializer>(&self, serializer: Ser) -> Result<Ser::Ok, Ser::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_byte_buf(ByteBufVisitor)
    }
}

struct ByteBufVisitor;

/// Most sequence elements preallocated on a length the input claims, so
/// that a hostile length prefix costs no more than the bytes that follow.
const MAX_PREALLOC: usize = 64 * 1024;

impl<'de> Visitor<'de> for ByteBufVisitor {
    type Value = ByteBuf;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E>(self, bytes: &[u8]) -> Result<ByteBuf, E> {
        Ok(ByteBuf(bytes.to_vec()))
    }

    fn visit_byte_buf<E>(self, bytes: Vec<u8>) -> Result<ByteBuf, E> {
        Ok(ByteBuf(bytes))
    }

    /// Formats without byte strings send a sequence of `u8`s.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PREALLOC));
        while let Some(b) = seq.next_element()? {
            bytes.push(b);
        }
        Ok(ByteBuf(bytes))
    }
}
