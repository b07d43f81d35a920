//! Frames: the payloads a stable conduit sends after the handshake.
//!
//! A frame is the postcard encoding of
//! `Frame { seq: u32, ack: Option<Ack { max_delivered: u32 }>, item: T }`:
//! `seq` as a varint, the option as one byte `0x00` (none) or `0x01`
//! followed by the varint, then the item's own postcard encoding with no
//! length prefix. The header (seq and ack) is encoded and decoded here by
//! hand, byte-compatible with postcard; the item goes through postcard.

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

use crate::Seq;

/// The longest a [`FrameHeader`] can be on the wire: a 5-byte varint seq,
/// the option byte and a 5-byte varint ack.
pub const MAX_HEADER_LEN: usize = 11;

/// Longest varint encoding of a u32.
const MAX_VARINT_LEN: usize = 5;

/// What each received message counts for against a receive bound
/// ([`Control::Window`]'s `recv_bytes`), on top of its item's bytes: the
/// bookkeeping a receiver holds per queued message. A sender counts each
/// frame it has not had acknowledged as its length plus this.
pub const RECV_ITEM_COST: usize = 64;

/// The receive bound a sender assumes until its peer's first window frame
/// arrives (`ACKS`); every receiver accepts at least this much.
pub const INITIAL_RECV_WINDOW: usize = 64 * 1024;

const OPTION_NONE: u8 = 0x00;
const OPTION_SOME: u8 = 0x01;

/// The sequencing part of a frame, before its item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// This frame's sequence number.
    pub seq: Seq,
    /// The highest seq the sender of this frame has delivered from its
    /// peer, if it has delivered any (piggybacked acknowledgement).
    pub ack: Option<Seq>,
}

/// A frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The frame ends inside the header.
    #[error("frame truncated: it ends inside the header (seq or ack)")]
    Truncated,
    /// A header varint is longer than 5 bytes or above `u32::MAX`.
    #[error("bad varint in frame header: longer than 5 bytes or above u32::MAX (4294967295)")]
    BadVarint,
    /// The ack option byte is neither `0x00` nor `0x01`.
    #[error("bad ack option tag in frame header: 0x{0:02x} (expected 0x00 or 0x01)")]
    BadOptionTag(u8),
    /// The item could not be serialized.
    #[error("could not serialize the frame item: {0}")]
    Encode(postcard::Error),
    /// The item bytes are not a valid encoding of the expected type.
    #[error("could not decode the frame item: {0}")]
    Decode(postcard::Error),
    /// The item decoded, but bytes were left over after it.
    #[error("frame item decoded but {0} trailing byte(s) were left over")]
    TrailingBytes(usize),
}

fn varint_len(value: u32) -> usize {
    match value {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        0x20_0000..=0x0fff_ffff => 4,
        _ => 5,
    }
}

fn put_varint(value: u32, out: &mut BytesMut) {
    let mut buf = [0u8; MAX_VARINT_LEN];
    let n = put_varint_slice(value, &mut buf);
    out.put_slice(&buf[..n]);
}

/// Reads a u32 varint at `*pos` with postcard's rules: 7 bits per byte,
/// least significant first, high bit set means another byte follows, at
/// most 5 bytes, and the 5th byte may carry only the top 4 bits.
fn take_varint(frame: &[u8], pos: &mut usize) -> Result<u32, FrameError> {
    let mut value = 0u32;
    for i in 0..MAX_VARINT_LEN {
        let byte = *frame.get(*pos).ok_or(FrameError::Truncated)?;
        *pos += 1;
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if i == MAX_VARINT_LEN - 1 && byte > 0x0f {
                return Err(FrameError::BadVarint);
            }
            return Ok(value);
        }
    }
    Err(FrameError::BadVarint)
}

/// Writes the varint of `value` at the start of `out` (which has room for
/// five bytes) and returns its length.
fn put_varint_slice(mut value: u32, out: &mut [u8]) -> usize {
    let mut i = 0;
    while value >= 0x80 {
        out[i] = (value as u8 & 0x7f) | 0x80;
        value >>= 7;
        i += 1;
    }
    out[i] = value as u8;
    i + 1
}

impl FrameHeader {
    /// Number of bytes [`FrameHeader::encode`] appends.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        varint_len(self.seq.0) + 1 + self.ack.map_or(0, |ack| varint_len(ack.0))
    }

    /// Appends the header's wire bytes to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(self.encoded_len());
        put_varint(self.seq.0, out);
        match self.ack {
            None => out.put_u8(OPTION_NONE),
            Some(ack) => {
                out.put_u8(OPTION_SOME);
                put_varint(ack.0, out);
            }
        }
    }

    /// The header's wire bytes in a fixed array: the first `len` bytes of
    /// the returned pair ([`write_end`](Self::write_end) into an array).
    #[must_use]
    pub fn to_array(&self) -> ([u8; MAX_HEADER_LEN], usize) {
        let mut out = [0u8; MAX_HEADER_LEN];
        let len = self.encoded_len();
        self.write_end(&mut out[..len]);
        (out, len)
    }

    /// Writes the header so that it ends where `gap` ends, and returns its
    /// length ([`encoded_len`](Self::encoded_len)): for writing the header
    /// into the gap left in front of an item that was serialized before its
    /// seq was known, in place. `gap` must hold at least that many bytes
    /// (at most [`MAX_HEADER_LEN`]).
    ///
    /// # Panics
    ///
    /// If `gap` is shorter than the header.
    #[inline]
    pub fn write_end(&self, gap: &mut [u8]) -> usize {
        let len = self.encoded_len();
        let start = gap.len() - len;
        let out = &mut gap[start..];
        let mut at = put_varint_slice(self.seq.0, out);
        match self.ack {
            None => out[at] = OPTION_NONE,
            Some(ack) => {
                out[at] = OPTION_SOME;
                at += 1;
                put_varint_slice(ack.0, &mut out[at..]);
            }
        }
        len
    }

    /// [`write_end`](Self::write_end) for the header of a fragment frame
    /// with this seq ([`fragment_array`](Self::fragment_array)).
    ///
    /// # Panics
    ///
    /// If `gap` is shorter than the header.
    #[inline]
    pub fn write_fragment_end(seq: Seq, gap: &mut [u8]) -> usize {
        let len = varint_len(seq.0) + 1;
        let start = gap.len() - len;
        let at = put_varint_slice(seq.0, &mut gap[start..]);
        gap[start + at] = TAG_FRAGMENT;
        len
    }

    /// The header of a fragment frame with this seq ([`ext::FRAGMENTS`]):
    /// its seq, then the fragment tag `08` and no ack. The first `len` bytes
    /// of the returned pair, like [`to_array`](Self::to_array).
    #[must_use]
    pub fn fragment_array(seq: Seq) -> ([u8; MAX_HEADER_LEN], usize) {
        let mut out = [0u8; MAX_HEADER_LEN];
        let len = varint_len(seq.0) + 1;
        Self::write_fragment_end(seq, &mut out[..len]);
        (out, len)
    }

    /// Parses the header at the start of `frame`. Returns it with its length
    /// in bytes; the item starts at that offset.
    pub fn decode(frame: &[u8]) -> Result<(FrameHeader, usize), FrameError> {
        let mut pos = 0;
        let seq = Seq(take_varint(frame, &mut pos)?);
        let tag = *frame.get(pos).ok_or(FrameError::Truncated)?;
        pos += 1;
        let ack = match tag {
            OPTION_NONE => None,
            OPTION_SOME => Some(Seq(take_varint(frame, &mut pos)?)),
            other => return Err(FrameError::BadOptionTag(other)),
        };
        Ok((FrameHeader { seq, ack }, pos))
    }
}

/// Extension bits, advertised in the hellos' reserved flag bits
/// ([`crate::flags::EXTENSION_MASK`]). An extension is on for a link only if
/// the client offered it and the server echoed it.
pub mod ext {
    /// Standalone ack frames: a side that only receives still acknowledges.
    pub const ACKS: u8 = 0x04;
    /// Keepalive ping/pong frames.
    pub const KEEPALIVE: u8 = 0x08;
    /// The close handshake: a sequenced close frame from each side and a
    /// closed frame from the server.
    pub const CLOSE: u8 = 0x10;
    /// Large messages travel as bounded pieces.
    pub const FRAGMENTS: u8 = 0x20;
    /// Admission: the client understands a typed refusal (busy, denied,
    /// policy) after a rejected ServerHello, and its ClientHello may carry a
    /// credential after the 25 hello bytes. Independent of the others.
    pub const ADMISSION: u8 = 0x40;
    /// Proof-of-possession resume: the hellos' key field carries a public
    /// session id, and a resume proves a secret that never crosses the wire
    /// ([`crate::proof`]). Concerns the handshake only; on only together
    /// with [`ADMISSION`], whose restart answer it relies on.
    pub const PROOF: u8 = 0x80;

    /// Every extension this crate knows.
    pub const ALL: u8 = ACKS | KEEPALIVE | CLOSE | FRAGMENTS | ADMISSION | PROOF;

    /// What is on for a link when one side offers `offered` and the other
    /// accepts `accepted`: the bits both have, except that keepalive, close
    /// and fragments are only ever on together with acks (a keepalive peer
    /// must keep reading, and a close or a fragmented message is
    /// acknowledged by ack frames). Admission concerns the handshake only
    /// and is on whenever both have it; proof is on whenever both have it
    /// and admission is on.
    #[must_use]
    pub fn negotiate(offered: u8, accepted: u8) -> u8 {
        let both = offered & accepted & ALL;
        let on = if both & ACKS == 0 {
            both & (ADMISSION | PROOF)
        } else {
            both
        };
        if on & ADMISSION == 0 {
            on & !PROOF
        } else {
            on
        }
    }
}

const KIND_ACK: u8 = 0x02;
const KIND_PING: u8 = 0x03;
const KIND_PONG: u8 = 0x04;
const KIND_CLOSE: u8 = 0x05;
const KIND_WINDOW: u8 = 0x06;
const KIND_CLOSED: u8 = 0x07;
/// In the ack-tag position of a data frame: a piece of a message, more
/// pieces follow, no ack.
const TAG_FRAGMENT: u8 = 0x08;

/// A control frame. Only sent when its extension is negotiated.
///
/// On the wire a control frame looks like a frame header whose seq is 0 and
/// whose ack tag (`00`/`01` in the base format) is the kind: `02` ack, `03`
/// ping, `04` pong, `05` close, `06` window, `07` closed, followed by one
/// varint (the acked seq, the ping's nonce, the echoed nonce, the close
/// frame's own seq, the seq of the client's close frame) or, for a window,
/// two or three (frames, bytes, then the receive bound if announced), and
/// nothing after them.
///
/// Control frames are not delivered to the application and, except for
/// [`Control::Close`], not sequenced and never kept for replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// The sender has delivered every frame up to this seq (extension
    /// [`ext::ACKS`]).
    Ack(Seq),
    /// Asks for a [`Control::Pong`] with the same nonce ([`ext::KEEPALIVE`]).
    Ping(u32),
    /// Answers a ping ([`ext::KEEPALIVE`]).
    Pong(u32),
    /// The sender sends nothing after this frame ([`ext::CLOSE`]). Unlike
    /// the other control frames it is sequenced: its value is the seq it
    /// occupies (the one after the sender's last data frame), it is kept
    /// for replay and acknowledged like a data frame.
    Close(Seq),
    /// The server's side of the close is complete: it received every frame
    /// up to and including the client's close frame, whose seq this is, and
    /// its own frames were all acknowledged ([`ext::CLOSE`]).
    Closed(Seq),
    /// The sender's bounds ([`ext::ACKS`]): its replay buffer holds at most
    /// `frames` unacknowledged frames and `bytes` bytes, so its peer should
    /// acknowledge by half of either; and it holds at most `recv_bytes` of
    /// received, unconsumed messages for its application (each counted as
    /// its item's length plus [`RECV_ITEM_COST`]), so its peer keeps what
    /// it has not had acknowledged below that.
    Window {
        /// Replay bound, frames.
        frames: u32,
        /// Replay bound, bytes (saturated at `u32::MAX`).
        bytes: u32,
        /// Receive bound, bytes (saturated at `u32::MAX`); `None` when the
        /// frame carries only the first two values (a sender that announces
        /// no receive bound).
        recv_bytes: Option<u32>,
    },
}

impl Control {
    fn kind_and_value(&self) -> (u8, u32, u8) {
        match *self {
            Control::Ack(seq) => (KIND_ACK, seq.0, ext::ACKS),
            Control::Ping(n) => (KIND_PING, n, ext::KEEPALIVE),
            Control::Pong(n) => (KIND_PONG, n, ext::KEEPALIVE),
            Control::Close(seq) => (KIND_CLOSE, seq.0, ext::CLOSE),
            Control::Closed(seq) => (KIND_CLOSED, seq.0, ext::CLOSE),
            Control::Window { frames, .. } => (KIND_WINDOW, frames, ext::ACKS),
        }
    }

    /// The extension bit this frame needs.
    pub fn extension(&self) -> u8 {
        self.kind_and_value().2
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let (kind, value, _) = self.kind_and_value();
        out.reserve(2 + 3 * MAX_VARINT_LEN);
        out.put_u8(0);
        out.put_u8(kind);
        put_varint(value, out);
        if let Control::Window {
            bytes, recv_bytes, ..
        } = *self
        {
            put_varint(bytes, out);
            if let Some(recv_bytes) = recv_bytes {
                put_varint(recv_bytes, out);
            }
        }
    }
}

/// One received payload after the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A data frame; its item starts at `item_offset`.
    Data {
        /// Its seq and piggybacked ack.
        header: FrameHeader,
        /// Where the item's bytes start in the payload.
        item_offset: usize,
    },
    /// A piece of a message that continues in the next frame
    /// ([`ext::FRAGMENTS`]); its bytes start at `item_offset`.
    Fragment {
        /// Its seq.
        seq: Seq,
        /// Where the piece's bytes start in the payload.
        item_offset: usize,
    },
    /// A control frame.
    Control(Control),
}

/// Decodes one payload for a link on which `extensions` are negotiated.
///
/// With no extensions this accepts exactly the base format (a control kind
/// is [`FrameError::BadOptionTag`]); a control frame whose extension is not
/// negotiated is rejected the same way.
pub fn decode_payload(payload: &[u8], extensions: u8) -> Result<Incoming, FrameError> {
    let mut pos = 0;
    let seq = Seq(take_varint(payload, &mut pos)?);
    let tag = *payload.get(pos).ok_or(FrameError::Truncated)?;
    pos += 1;
    let control = match tag {
        OPTION_NONE => {
            return Ok(Incoming::Data {
                header: FrameHeader { seq, ack: None },
                item_offset: pos,
            })
        }
        OPTION_SOME => {
            let ack = Some(Seq(take_varint(payload, &mut pos)?));
            return Ok(Incoming::Data {
                header: FrameHeader { seq, ack },
                item_offset: pos,
            });
        }
        TAG_FRAGMENT if extensions & ext::FRAGMENTS != 0 => {
            return Ok(Incoming::Fragment {
                seq,
                item_offset: pos,
            })
        }
        KIND_ACK if extensions & ext::ACKS != 0 => {
            Control::Ack(Seq(take_varint(payload, &mut pos)?))
        }
        KIND_PING if extensions & ext::KEEPALIVE != 0 => {
            Control::Ping(take_varint(payload, &mut pos)?)
        }
        KIND_PONG if extensions & ext::KEEPALIVE != 0 => {
            Control::Pong(take_varint(payload, &mut pos)?)
        }
        KIND_CLOSE if extensions & ext::CLOSE != 0 => {
            Control::Close(Seq(take_varint(payload, &mut pos)?))
        }
        KIND_CLOSED if extensions & ext::CLOSE != 0 => {
            Control::Closed(Seq(take_varint(payload, &mut pos)?))
        }
        KIND_WINDOW if extensions & ext::ACKS != 0 => {
            let frames = take_varint(payload, &mut pos)?;
            let bytes = take_varint(payload, &mut pos)?;
            let recv_bytes = if pos < payload.len() {
                Some(take_varint(payload, &mut pos)?)
            } else {
                None
            };
            Control::Window {
                frames,
                bytes,
                recv_bytes,
            }
        }
        other => return Err(FrameError::BadOptionTag(other)),
    };
    if pos != payload.len() {
        return Err(FrameError::TrailingBytes(payload.len() - pos));
    }
    Ok(Incoming::Control(control))
}

/// A postcard output flavor that appends straight into a `BytesMut`.
struct BytesMutFlavor<'a> {
    out: &'a mut BytesMut,
}

impl postcard::ser_flavors::Flavor for BytesMutFlavor<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> Result<(), postcard::Error> {
        self.out.put_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> Result<(), postcard::Error> {
        self.out.put_u8(data);
        Ok(())
    }

    fn finalize(self) -> Result<(), postcard::Error> {
        Ok(())
    }
}

/// Appends the postcard encoding of `item` to `out`, serializing once,
/// directly into `out`. On error, `out` is left as it was.
pub fn encode_item<T: Serialize + ?Sized>(item: &T, out: &mut BytesMut) -> Result<(), FrameError> {
    let start = out.len();
    postcard::serialize_with_flavor(item, BytesMutFlavor { out: &mut *out }).map_err(|err| {
        out.truncate(start);
        FrameError::Encode(err)
    })
}

/// A flavor that leaves a gap of `gap` bytes in front of every `piece`
/// bytes of output, so that the item can be cut into pieces that each get
/// a frame header written into the gap in front of them, without a copy.
struct GappedFlavor<'a> {
    out: &'a mut BytesMut,
    gap: usize,
    piece: usize,
    /// Room left in the current piece.
    room: usize,
}

impl GappedFlavor<'_> {
    fn put(&mut self, mut data: &[u8]) {
        // Room for all of `data` and the gaps it crosses, reserved at once:
        // a large byte string arrives in one call, and growing the buffer
        // piece by piece would reallocate and copy everything so far each
        // time it doubled (for a 1 MiB message, twice its size in copies
        // and in freshly touched memory).
        if data.len() > self.room {
            let gaps = (data.len() - self.room).div_ceil(self.piece);
            self.out.reserve(data.len() + gaps * self.gap);
        }
        while !data.is_empty() {
            if self.room == 0 {
                self.out.put_bytes(0, self.gap);
                self.room = self.piece;
            }
            let n = data.len().min(self.room);
            self.out.put_slice(&data[..n]);
            self.room -= n;
            data = &data[n..];
        }
    }
}

impl postcard::ser_flavors::Flavor for GappedFlavor<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> Result<(), postcard::Error> {
        self.put(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> Result<(), postcard::Error> {
        self.put(&[data]);
        Ok(())
    }

    fn finalize(self) -> Result<(), postcard::Error> {
        Ok(())
    }
}

/// Appends `gap` zero bytes and then the postcard encoding of `item` to
/// `out`, with another gap of `gap` bytes in front of every further `piece`
/// bytes of the encoding: `[gap][piece][gap][piece]..[gap][rest]`, the last
/// piece 1 to `piece` bytes long (an empty item is one empty piece). Returns
/// the length of the encoding, gaps not counted. Serializes once; on error
/// `out` is left as it was. `piece` must be at least 1.
pub fn encode_item_gapped<T: Serialize + ?Sized>(
    item: &T,
    out: &mut BytesMut,
    gap: usize,
    piece: usize,
) -> Result<usize, FrameError> {
    assert!(piece > 0, "pieces must hold at least one byte");
    let start = out.len();
    out.put_bytes(0, gap);
    let flavor = GappedFlavor {
        out: &mut *out,
        gap,
        piece,
        room: piece,
    };
    match postcard::serialize_with_flavor(item, flavor) {
        Ok(()) => {
            let written = out.len() - start;
            let pieces = written.div_ceil(gap + piece).max(1);
            Ok(written - pieces * gap)
        }
        Err(err) => {
            out.truncate(start);
            Err(FrameError::Encode(err))
        }
    }
}

/// Appends a whole frame (header, then item) to `out`. On error, `out` is
/// truncated back to its original length: nothing partial is left.
pub fn encode_frame<T: Serialize + ?Sized>(
    header: &FrameHeader,
    item: &T,
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    let start = out.len();
    header.encode(out);
    encode_item(item, out).inspect_err(|_| out.truncate(start))
}

/// Decodes an item that must fill `bytes` exactly.
pub fn decode_item<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, FrameError> {
    let (item, rest) = postcard::take_from_bytes(bytes).map_err(FrameError::Decode)?;
    if rest.is_empty() {
        Ok(item)
    } else {
        Err(FrameError::TrailingBytes(rest.len()))
    }
}

/// Decodes a whole frame: its header, then an item that must fill the rest.
pub fn decode_frame<'de, T: Deserialize<'de>>(
    frame: &'de [u8],
) -> Result<(FrameHeader, T), FrameError> {
    let (header, len) = FrameHeader::decode(frame)?;
    let item = decode_item(&frame[len..])?;
    Ok((header, item))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_bytes<T: Serialize + ?Sized>(header: FrameHeader, item: &T) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_frame(&header, item, &mut out).unwrap();
        out.to_vec()
    }

    // Vectors shared with docs/PROTOCOL.md ("Test vectors").
    #[test]
    fn vector_seq1_ack0_u32_300() {
        let header = FrameHeader {
            seq: Seq(1),
            ack: Some(Seq(0)),
        };
        let bytes = frame_bytes(header, &300u32);
        assert_eq!(bytes, [0x01, 0x01, 0x00, 0xac, 0x02]);
        let (h, item): (FrameHeader, u32) = decode_frame(&bytes).unwrap();
        assert_eq!((h, item), (header, 300));
        assert_eq!(FrameHeader::decode(&bytes).unwrap(), (header, 3));
    }

    #[test]
    fn vector_seq_max_no_ack_hi() {
        let header = FrameHeader {
            seq: Seq(4_294_967_295),
            ack: None,
        };
        let bytes = frame_bytes(header, "hi");
        assert_eq!(
            bytes,
            [0xff, 0xff, 0xff, 0xff, 0x0f, 0x00, 0x02, 0x68, 0x69]
        );
        let (h, item): (FrameHeader, &str) = decode_frame(&bytes).unwrap();
        assert_eq!((h, item), (header, "hi"));
        let (h, item): (FrameHeader, String) = decode_frame(&bytes).unwrap();
        assert_eq!((h, item.as_str()), (header, "hi"));
    }

    #[test]
    fn vector_on_stream_link() {
        // Stream links prefix each payload with its length, u32 little-endian.
        let bytes = frame_bytes(
            FrameHeader {
                seq: Seq(1),
                ack: Some(Seq(0)),
            },
            &300u32,
        );
        let mut linked = (bytes.len() as u32).to_le_bytes().to_vec();
        linked.extend_from_slice(&bytes);
        assert_eq!(
            linked,
            [0x05, 0x00, 0x00, 0x00, 0x01, 0x01, 0x00, 0xac, 0x02]
        );
    }

    #[test]
    fn encode_appends() {
        let mut out = BytesMut::from(&b"xy"[..]);
        encode_frame(
            &FrameHeader {
                seq: Seq(1),
                ack: Some(Seq(0)),
            },
            &300u32,
            &mut out,
        )
        .unwrap();
        assert_eq!(&out[..], &[b'x', b'y', 0x01, 0x01, 0x00, 0xac, 0x02]);
        encode_item(&7u8, &mut out).unwrap();
        assert_eq!(&out[7..], &[7]);
    }

    #[test]
    fn encoded_len_matches() {
        let values = [
            0,
            1,
            0x7f,
            0x80,
            0x3fff,
            0x4000,
            0x1f_ffff,
            0x20_0000,
            0x0fff_ffff,
        ];
        let values = values.into_iter().chain([0x1000_0000, u32::MAX]);
        for v in values {
            for ack in [None, Some(Seq(v)), Some(Seq(u32::MAX))] {
                let header = FrameHeader { seq: Seq(v), ack };
                let mut out = BytesMut::new();
                header.encode(&mut out);
                assert_eq!(out.len(), header.encoded_len());
                assert!(out.len() <= MAX_HEADER_LEN);
                assert_eq!(FrameHeader::decode(&out).unwrap(), (header, out.len()));
            }
        }
        let biggest = FrameHeader {
            seq: Seq(u32::MAX),
            ack: Some(Seq(u32::MAX)),
        };
        assert_eq!(biggest.encoded_len(), MAX_HEADER_LEN);
    }

    #[test]
    fn rejects_overlong_varint() {
        // Six bytes with continuation bits: more than 5 bytes.
        let frame = [0x80, 0x80, 0x80, 0x80, 0x80, 0x00, 0x00];
        assert!(matches!(
            FrameHeader::decode(&frame),
            Err(FrameError::BadVarint)
        ));
        // Same in the ack.
        let frame = [0x01, 0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(matches!(
            FrameHeader::decode(&frame),
            Err(FrameError::BadVarint)
        ));
    }

    #[test]
    fn rejects_varint_above_u32_max() {
        for last in [0x10u8, 0x1f, 0x7f] {
            let frame = [0xff, 0xff, 0xff, 0xff, last, 0x00];
            assert!(matches!(
                FrameHeader::decode(&frame),
                Err(FrameError::BadVarint)
            ));
            let frame = [0x00, 0x01, 0x80, 0x80, 0x80, 0x80, last];
            assert!(matches!(
                FrameHeader::decode(&frame),
                Err(FrameError::BadVarint)
            ));
        }
        // 0x0f in the 5th byte is the largest allowed.
        let frame = [0xff, 0xff, 0xff, 0xff, 0x0f, 0x00];
        assert_eq!(FrameHeader::decode(&frame).unwrap().0.seq, Seq(u32::MAX));
    }

    #[test]
    fn accepts_non_minimal_varint_like_postcard() {
        // `80 00` is a 2-byte encoding of 0; postcard accepts it, so do we.
        let frame = [0x80, 0x00, 0x01, 0x81, 0x80, 0x00, 0x07];
        let (header, len) = FrameHeader::decode(&frame).unwrap();
        assert_eq!(
            header,
            FrameHeader {
                seq: Seq(0),
                ack: Some(Seq(1))
            }
        );
        assert_eq!(len, 6);
        assert_eq!(decode_item::<u8>(&frame[len..]).unwrap(), 7);
        #[derive(Deserialize)]
        struct Reference {
            seq: u32,
            ack: Option<u32>,
            item: u8,
        }
        let r: Reference = postcard::from_bytes(&frame).unwrap();
        assert_eq!((r.seq, r.ack, r.item), (0, Some(1), 7));
    }

    #[test]
    fn rejects_bad_option_tag() {
        for tag in [0x02u8, 0x80, 0xff] {
            let frame = [0x05, tag, 0x00];
            match FrameHeader::decode(&frame) {
                Err(FrameError::BadOptionTag(t)) => assert_eq!(t, tag),
                other => panic!("expected BadOptionTag({tag}), got {other:?}"),
            }
        }
    }

    #[test]
    fn truncation_at_every_split_point() {
        let headers = [
            FrameHeader {
                seq: Seq(1),
                ack: Some(Seq(0)),
            },
            FrameHeader {
                seq: Seq(u32::MAX),
                ack: None,
            },
            FrameHeader {
                seq: Seq(u32::MAX),
                ack: Some(Seq(u32::MAX - 1)),
            },
            FrameHeader {
                seq: Seq(300),
                ack: Some(Seq(70_000)),
            },
        ];
        for header in headers {
            let mut out = BytesMut::new();
            header.encode(&mut out);
            for cut in 0..out.len() {
                assert!(
                    matches!(FrameHeader::decode(&out[..cut]), Err(FrameError::Truncated)),
                    "{header:?} cut at {cut}"
                );
                assert!(matches!(
                    decode_frame::<()>(&out[..cut]),
                    Err(FrameError::Truncated)
                ));
            }
            // The whole header with no item: fine for (), not for u32.
            assert_eq!(decode_frame::<()>(&out).unwrap().0, header);
            assert!(matches!(
                decode_frame::<u32>(&out),
                Err(FrameError::Decode(
                    postcard::Error::DeserializeUnexpectedEnd
                ))
            ));
        }
    }

    #[test]
    fn trailing_bytes() {
        let frame = [0x01, 0x00, 0xac, 0x02, 0xaa, 0xbb];
        match decode_frame::<u32>(&frame) {
            Err(FrameError::TrailingBytes(n)) => assert_eq!(n, 2),
            other => panic!("expected TrailingBytes(2), got {other:?}"),
        }
        assert!(matches!(
            decode_item::<u8>(&[1, 2]),
            Err(FrameError::TrailingBytes(1))
        ));
    }

    #[test]
    fn bad_item() {
        // "hi" with invalid UTF-8.
        let frame = [0x00, 0x00, 0x02, 0xff, 0xfe];
        let err = decode_frame::<String>(&frame).unwrap_err();
        assert!(matches!(
            err,
            FrameError::Decode(postcard::Error::DeserializeBadUtf8)
        ));
        assert_eq!(
            err.to_string(),
            "could not decode the frame item: Tried to parse invalid utf-8"
        );
    }

    /// Writes some bytes, then fails.
    struct FailsHalfway;

    impl Serialize for FailsHalfway {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            use serde::ser::{Error, SerializeTuple};
            let mut tuple = serializer.serialize_tuple(2)?;
            tuple.serialize_element(&0xdead_beef_u32)?;
            tuple.serialize_element(&"partial")?;
            Err(S::Error::custom("refusing to finish"))
        }
    }

    #[test]
    fn encode_error_leaves_nothing_partial() {
        let mut out = BytesMut::from(&b"keep"[..]);
        let header = FrameHeader {
            seq: Seq(u32::MAX),
            ack: Some(Seq(12345)),
        };
        let err = encode_frame(&header, &FailsHalfway, &mut out).unwrap_err();
        assert!(matches!(
            err,
            FrameError::Encode(postcard::Error::SerdeSerCustom)
        ));
        assert_eq!(&out[..], b"keep");
        assert!(err
            .to_string()
            .starts_with("could not serialize the frame item: "));

        let err = encode_item(&FailsHalfway, &mut out).unwrap_err();
        assert!(matches!(err, FrameError::Encode(_)));
        assert_eq!(&out[..], b"keep");
    }

    fn hex(bytes: &[u8]) -> String {
        let parts: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        parts.join(" ")
    }

    #[test]
    fn fragment_vector() {
        // A piece of a message with seq 300, more to follow: seq, tag 08,
        // the piece's bytes.
        let (header, len) = FrameHeader::fragment_array(Seq(300));
        let mut frame = header[..len].to_vec();
        frame.extend_from_slice(b"ab");
        assert_eq!(hex(&frame), "ac 02 08 61 62");
        assert_eq!(
            decode_payload(&frame, ext::ALL).unwrap(),
            Incoming::Fragment {
                seq: Seq(300),
                item_offset: 3
            }
        );
        assert!(matches!(
            decode_payload(&frame, ext::ALL & !ext::FRAGMENTS),
            Err(FrameError::BadOptionTag(0x08))
        ));
    }

    #[test]
    fn gapped_encoding_leaves_a_gap_before_every_piece() {
        let item: Vec<u8> = (0..10).collect();
        let mut plain = BytesMut::new();
        encode_item(&item, &mut plain).unwrap();
        assert_eq!(plain.len(), 11, "a length byte, then ten bytes");
        for piece in [1, 3, 4, 11, 12, 100] {
            let mut out = BytesMut::from(&b"xy"[..]);
            let len = encode_item_gapped(&item, &mut out, 2, piece).unwrap();
            assert_eq!(len, 11);
            assert_eq!(&out[..2], b"xy", "what was there stays");
            let body = &out[2..];
            let mut joined = Vec::new();
            for (i, chunk) in body.chunks(2 + piece).enumerate() {
                assert_eq!(&chunk[..2], &[0, 0], "gap {i} with pieces of {piece}");
                assert!(chunk.len() > 2, "no empty trailing piece");
                joined.extend_from_slice(&chunk[2..]);
            }
            assert_eq!(joined, plain.to_vec(), "pieces of {piece}");
        }
        let mut out = BytesMut::new();
        assert_eq!(encode_item_gapped(&(), &mut out, 3, 8).unwrap(), 0);
        assert_eq!(out.len(), 3, "an empty item is one gap and an empty piece");
    }

    #[test]
    fn negotiation_needs_acks_for_the_rest() {
        assert_eq!(ext::negotiate(ext::ALL, ext::ALL), ext::ALL);
        assert_eq!(ext::negotiate(ext::KEEPALIVE | ext::CLOSE, ext::ALL), 0);
        assert_eq!(
            ext::negotiate(0xfc, ext::ACKS | ext::CLOSE),
            ext::ACKS | ext::CLOSE
        );
        assert_eq!(ext::negotiate(ext::ALL, 0), 0);
        // Proof concerns the handshake, like admission, and needs it.
        assert_eq!(ext::ALL, 0xfc);
        assert_eq!(
            ext::negotiate(ext::PROOF | ext::ADMISSION, ext::ALL),
            ext::PROOF | ext::ADMISSION
        );
        assert_eq!(ext::negotiate(ext::PROOF | ext::ACKS, ext::ALL), ext::ACKS);
        assert_eq!(
            ext::negotiate(ext::ALL, ext::ALL & !ext::ADMISSION),
            ext::ALL & !ext::ADMISSION & !ext::PROOF
        );
        assert_eq!(
            ext::negotiate(ext::ALL, ext::ALL & !ext::PROOF),
            ext::ALL & !ext::PROOF
        );
    }

    #[test]
    fn control_frame_vectors() {
        let cases = [
            (Control::Ack(Seq(300)), "00 02 ac 02"),
            (Control::Ping(7), "00 03 07"),
            (Control::Pong(7), "00 04 07"),
            (Control::Close(Seq(u32::MAX)), "00 05 ff ff ff ff 0f"),
            (Control::Closed(Seq(41)), "00 07 29"),
            (
                Control::Window {
                    frames: 4096,
                    bytes: 1 << 20,
                    recv_bytes: None,
                },
                "00 06 80 20 80 80 40",
            ),
            (
                Control::Window {
                    frames: 4096,
                    bytes: 1 << 20,
                    recv_bytes: Some(1 << 20),
                },
                "00 06 80 20 80 80 40 80 80 40",
            ),
        ];
        let all = ext::ALL;
        for (control, hex) in cases {
            let mut out = BytesMut::new();
            control.encode(&mut out);
            let got: Vec<String> = out.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(got.join(" "), hex, "{control:?}");
            assert_eq!(
                decode_payload(&out, all).unwrap(),
                Incoming::Control(control)
            );
            // Without its extension the same bytes are a bad tag, as in the
            // base format.
            let without = all & !control.extension();
            assert!(matches!(
                decode_payload(&out, without),
                Err(FrameError::BadOptionTag(_))
            ));
            let mut long = out.to_vec();
            long.push(0);
            match control {
                // A window with two values takes a third: its receive bound.
                Control::Window {
                    frames,
                    bytes,
                    recv_bytes: None,
                } => assert_eq!(
                    decode_payload(&long, all).unwrap(),
                    Incoming::Control(Control::Window {
                        frames,
                        bytes,
                        recv_bytes: Some(0)
                    })
                ),
                _ => assert!(matches!(
                    decode_payload(&long, all),
                    Err(FrameError::TrailingBytes(1))
                )),
            }
        }
    }

    #[test]
    fn decode_payload_reads_data_frames_like_the_header() {
        let bytes = frame_bytes(
            FrameHeader {
                seq: Seq(1),
                ack: Some(Seq(0)),
            },
            &300u32,
        );
        for exts in [0, ext::ACKS] {
            assert_eq!(
                decode_payload(&bytes, exts).unwrap(),
                Incoming::Data {
                    header: FrameHeader {
                        seq: Seq(1),
                        ack: Some(Seq(0))
                    },
                    item_offset: 3
                }
            );
        }
    }

    #[test]
    fn error_messages_are_concrete() {
        assert_eq!(
            FrameError::BadOptionTag(0x02).to_string(),
            "bad ack option tag in frame header: 0x02 (expected 0x00 or 0x01)"
        );
        assert_eq!(
            FrameError::TrailingBytes(3).to_string(),
            "frame item decoded but 3 trailing byte(s) were left over"
        );
        assert!(FrameError::BadVarint.to_string().contains("4294967295"));
        assert!(FrameError::Truncated.to_string().contains("header"));
    }
}
