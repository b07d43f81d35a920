//! Checks for the fuzz targets `hello`, `frame` and `replay` (tether-proto).
//!
//! Each `pub fn` takes the fuzzer's raw bytes and panics if tether-proto
//! misbehaves on them. The expectations come from `docs/PROTOCOL.md`, written
//! out here independently of the decoders (a small reference decoder for
//! frame headers, an unwrapped-position model for the replay buffer) rather
//! than by calling the code under test twice.
//!
//! Shared with `tether-proto/tests/fuzz_corpus.rs` through `#[path]`: no
//! libFuzzer, and only crates tether-proto itself depends on.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tether_proto::{
    decode_frame, decode_payload, encode_frame, flags, ClientHello, Control, FrameError,
    FrameHeader, HelloError, Incoming, ReplayBuffer, ReplayError, ResumeKey, Seq, ServerHello,
    CLIENT_MAGIC, HELLO_LEN, MAX_HEADER_LEN, SERVER_MAGIC,
};

// ---------------------------------------------------------------------------
// hello
// ---------------------------------------------------------------------------

const FLAGS_AT: usize = 4;
const KEY: std::ops::Range<usize> = 5..21;
const LAST: std::ops::Range<usize> = 21..25;

/// Target `hello`: `data` goes into both hello decoders as it is.
///
/// - Anything but 25 bytes is `WrongSize { 25, len }` for both (size is
///   checked before magic).
/// - 25 bytes with the other side's (or any wrong) magic is `BadMagic` with
///   the first four bytes; at most one of the two decoders accepts.
/// - Whatever decodes has exactly the fields the flags byte says, and
///   re-encodes to the same 25 bytes, except the bytes the format ignores:
///   the ClientHello key unless flag `0x01` is set, the last-received field
///   (either hello) unless flag `0x02` is set; those come back as zeros. The
///   flags byte itself always round-trips, all eight bits (0x01 and 0x02
///   from the fields, 0xFC as extensions). Decoding the re-encoding gives
///   the same hello.
/// - The other way round, a hello built from the bytes (when there are at
///   least 22) survives encode then decode, extensions masked to 0xFC.
pub fn hello(data: &[u8]) {
    let client = ClientHello::decode(data);
    let server = ServerHello::decode(data);
    if let Err(e) = &client {
        let _ = e.to_string();
    }
    if let Err(e) = &server {
        let _ = e.to_string();
    }
    if data.len() != HELLO_LEN {
        let size = HelloError::WrongSize {
            expected: HELLO_LEN,
            got: data.len(),
        };
        assert_eq!(client, Err(size.clone()));
        assert_eq!(server, Err(size));
    } else {
        let bytes: &[u8; HELLO_LEN] = data.try_into().unwrap();
        let magic: [u8; 4] = bytes[..4].try_into().unwrap();
        assert!(client.is_err() || server.is_err(), "both hellos decoded");
        match client {
            Ok(hello) => check_client_hello(bytes, &hello),
            Err(err) => {
                assert_ne!(magic, CLIENT_MAGIC);
                assert_eq!(
                    err,
                    HelloError::BadMagic {
                        expected: CLIENT_MAGIC,
                        got: magic
                    }
                );
            }
        }
        match server {
            Ok(hello) => check_server_hello(bytes, &hello),
            Err(err) => {
                assert_ne!(magic, SERVER_MAGIC);
                assert_eq!(
                    err,
                    HelloError::BadMagic {
                        expected: SERVER_MAGIC,
                        got: magic
                    }
                );
            }
        }
    }
    build_hellos(data);
}

fn key_at(bytes: &[u8]) -> ResumeKey {
    ResumeKey::from_bytes(bytes[..ResumeKey::LEN].try_into().unwrap())
}

fn u32_at(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[..4].try_into().unwrap())
}

fn check_client_hello(bytes: &[u8; HELLO_LEN], hello: &ClientHello) {
    assert_eq!(&bytes[..4], &CLIENT_MAGIC);
    let f = bytes[FLAGS_AT];
    assert_eq!(hello.extensions, f & flags::EXTENSION_MASK);
    let key = (f & flags::CLIENT_RESUME != 0).then(|| key_at(&bytes[KEY]));
    assert_eq!(
        hello.resume_key.map(|k| *k.as_bytes()),
        key.map(|k| *k.as_bytes())
    );
    let last = (f & flags::CLIENT_LAST_RECEIVED != 0).then(|| Seq(u32_at(&bytes[LAST])));
    assert_eq!(hello.last_received, last);

    let mut expected = *bytes;
    if f & flags::CLIENT_RESUME == 0 {
        expected[KEY].fill(0);
    }
    if f & flags::CLIENT_LAST_RECEIVED == 0 {
        expected[LAST].fill(0);
    }
    let encoded = hello.encode();
    assert_eq!(encoded, expected, "ClientHello re-encoding");
    assert_eq!(ClientHello::decode(&encoded).as_ref(), Ok(hello));
}

fn check_server_hello(bytes: &[u8; HELLO_LEN], hello: &ServerHello) {
    assert_eq!(&bytes[..4], &SERVER_MAGIC);
    let f = bytes[FLAGS_AT];
    assert_eq!(hello.extensions, f & flags::EXTENSION_MASK);
    assert_eq!(hello.rejected, f & flags::SERVER_REJECTED != 0);
    // The ServerHello key is always read, whatever the flags.
    assert_eq!(hello.resume_key.as_bytes(), &bytes[KEY]);
    let last = (f & flags::SERVER_LAST_RECEIVED != 0).then(|| Seq(u32_at(&bytes[LAST])));
    assert_eq!(hello.last_received, last);

    let mut expected = *bytes;
    if f & flags::SERVER_LAST_RECEIVED == 0 {
        expected[LAST].fill(0);
    }
    let encoded = hello.encode();
    assert_eq!(encoded, expected, "ServerHello re-encoding");
    assert_eq!(ServerHello::decode(&encoded).as_ref(), Ok(hello));
}

/// Encode-side round trip: hellos whose fields come from the bytes.
fn build_hellos(data: &[u8]) {
    if data.len() < 22 {
        return;
    }
    let (choice, extensions) = (data[0], data[21]);
    let client = ClientHello {
        resume_key: (choice & 1 != 0).then(|| key_at(&data[1..17])),
        last_received: (choice & 2 != 0).then(|| Seq(u32_at(&data[17..21]))),
        extensions,
    };
    let bytes = client.encode();
    assert_eq!(&bytes[..4], &CLIENT_MAGIC);
    assert_eq!(
        bytes[FLAGS_AT],
        (extensions & flags::EXTENSION_MASK) | (choice & 3)
    );
    assert_eq!(
        ClientHello::decode(&bytes),
        Ok(ClientHello {
            extensions: extensions & flags::EXTENSION_MASK,
            ..client
        })
    );
    assert!(matches!(
        ServerHello::decode(&bytes),
        Err(HelloError::BadMagic { .. })
    ));

    let server = ServerHello {
        rejected: choice & 4 != 0,
        resume_key: key_at(&data[1..17]),
        last_received: (choice & 2 != 0).then(|| Seq(u32_at(&data[17..21]))),
        extensions,
    };
    let bytes = server.encode();
    assert_eq!(&bytes[..4], &SERVER_MAGIC);
    assert_eq!(
        bytes[FLAGS_AT],
        (extensions & flags::EXTENSION_MASK) | (choice & 2) | ((choice >> 2) & 1)
    );
    assert_eq!(
        ServerHello::decode(&bytes),
        Ok(ServerHello {
            extensions: extensions & flags::EXTENSION_MASK,
            ..server
        })
    );
    assert!(matches!(
        ClientHello::decode(&bytes),
        Err(HelloError::BadMagic { .. })
    ));
}

// ---------------------------------------------------------------------------
// frame
// ---------------------------------------------------------------------------

/// What the reference decoder reads from a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefFrame {
    Data {
        seq: u32,
        ack: Option<u32>,
        item_offset: usize,
        /// Both varints in their shortest form (so the header re-encodes to
        /// the same bytes).
        minimal: bool,
    },
    /// A piece of a message, more follow (tag `08`, extension `0x20`).
    Fragment { seq: u32, item_offset: usize },
    Control {
        kind: u8,
        value: u32,
        /// The second value of a window frame (its byte bound).
        extra: Option<u32>,
        /// The third value of a window frame, if present (its receive
        /// bound).
        recv: Option<u32>,
        /// The seq is the single byte `00` and the value varint is in its
        /// shortest form (so the frame re-encodes to the same bytes).
        canonical: bool,
    },
}

/// How the reference decoder fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefError {
    Truncated,
    BadVarint,
    BadOptionTag(u8),
    TrailingBytes(usize),
}

/// A varint read by the reference decoder.
struct RefVarint {
    value: u32,
    len: usize,
    minimal: bool,
}

/// PROTOCOL.md §3: 7 bits per byte, least significant first, high bit =
/// more follows, at most 5 bytes, value at most u32::MAX.
fn ref_varint(bytes: &[u8]) -> Result<RefVarint, RefError> {
    let mut value = 0u64;
    for i in 0..5 {
        let byte = *bytes.get(i).ok_or(RefError::Truncated)?;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let value = u32::try_from(value).map_err(|_| RefError::BadVarint)?;
            return Ok(RefVarint {
                value,
                len: i + 1,
                // A last byte of zero after others could have been left out.
                minimal: i == 0 || byte != 0,
            });
        }
    }
    Err(RefError::BadVarint)
}

/// The shortest varint of `value`.
fn ref_put_varint(mut value: u32, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The extension a control kind needs (PROTOCOL.md §5), if it is one.
fn ref_control_extension(kind: u8) -> Option<u8> {
    match kind {
        0x02 | 0x06 => Some(0x04),
        0x03 | 0x04 => Some(0x08),
        0x05 | 0x07 => Some(0x10),
        _ => None,
    }
}

/// PROTOCOL.md §3 and §5, read independently of `decode_payload`.
fn ref_decode(payload: &[u8], extensions: u8) -> Result<RefFrame, RefError> {
    let seq = ref_varint(payload)?;
    let mut pos = seq.len;
    let tag = *payload.get(pos).ok_or(RefError::Truncated)?;
    pos += 1;
    match tag {
        0x00 => Ok(RefFrame::Data {
            seq: seq.value,
            ack: None,
            item_offset: pos,
            minimal: seq.minimal,
        }),
        0x01 => {
            let ack = ref_varint(&payload[pos..])?;
            Ok(RefFrame::Data {
                seq: seq.value,
                ack: Some(ack.value),
                item_offset: pos + ack.len,
                minimal: seq.minimal && ack.minimal,
            })
        }
        0x08 if extensions & 0x20 != 0 => Ok(RefFrame::Fragment {
            seq: seq.value,
            item_offset: pos,
        }),
        kind if ref_control_extension(kind).is_some_and(|bit| extensions & bit != 0) => {
            let value = ref_varint(&payload[pos..])?;
            pos += value.len;
            // A window frame carries a second varint, the byte bound, and
            // may carry a third, the receive bound.
            let extra = if kind == 0x06 {
                let bytes = ref_varint(&payload[pos..])?;
                pos += bytes.len;
                Some(bytes)
            } else {
                None
            };
            let recv = if kind == 0x06 && pos < payload.len() {
                let recv = ref_varint(&payload[pos..])?;
                pos += recv.len;
                Some(recv)
            } else {
                None
            };
            if pos != payload.len() {
                return Err(RefError::TrailingBytes(payload.len() - pos));
            }
            Ok(RefFrame::Control {
                kind,
                value: value.value,
                extra: extra.as_ref().map(|v| v.value),
                recv: recv.as_ref().map(|v| v.value),
                canonical: seq.len == 1
                    && seq.value == 0
                    && value.minimal
                    && extra.as_ref().is_none_or(|v| v.minimal)
                    && recv.as_ref().is_none_or(|v| v.minimal),
            })
        }
        other => Err(RefError::BadOptionTag(other)),
    }
}

fn same_error(ours: &FrameError, reference: RefError) -> bool {
    match (ours, reference) {
        (FrameError::Truncated, RefError::Truncated) => true,
        (FrameError::BadVarint, RefError::BadVarint) => true,
        (FrameError::BadOptionTag(a), RefError::BadOptionTag(b)) => *a == b,
        (FrameError::TrailingBytes(a), RefError::TrailingBytes(b)) => *a == b,
        _ => false,
    }
}

fn control_parts(control: Control) -> (u8, u32, Option<u32>, Option<u32>) {
    match control {
        Control::Ack(seq) => (0x02, seq.0, None, None),
        Control::Ping(nonce) => (0x03, nonce, None, None),
        Control::Pong(nonce) => (0x04, nonce, None, None),
        Control::Close(seq) => (0x05, seq.0, None, None),
        Control::Window {
            frames,
            bytes,
            recv_bytes,
        } => (0x06, frames, Some(bytes), recv_bytes),
        Control::Closed(seq) => (0x07, seq.0, None, None),
    }
}

/// The frame item type of the `decode_frame` check.
type Item = (u32, String, Vec<u8>);

/// postcard's own view of a frame (PROTOCOL.md §3), for comparison.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct PostcardAck {
    max_delivered: u32,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct PostcardFrame<T> {
    seq: u32,
    ack: Option<PostcardAck>,
    item: T,
}

/// Target `frame`: the first byte is the negotiated extensions, the rest
/// one payload.
///
/// - `decode_payload(payload, extensions)` agrees exactly with a reference
///   decoder written from PROTOCOL.md (value, item offset, error and its
///   byte or count).
/// - `decode_payload(payload, 0)` (the base format) and
///   `FrameHeader::decode` agree with each other and with the reference;
///   a data frame decodes the same under any extensions.
/// - A data header re-encodes to its own bytes when its varints are
///   minimal, and to a shorter form that decodes to the same header
///   otherwise.
/// - A control frame needs its extension, re-encodes to `00 kind
///   varint(value)`, which is the input itself exactly when the input's seq
///   is the single byte `00` and its value varint is minimal (the seq of a
///   control frame is ignored; any varint is accepted there), and decodes
///   back to the same control frame.
/// - `decode_frame::<(u32, String, Vec<u8>)>` never panics, agrees with
///   postcard decoding the reference frame struct, and what it accepts
///   re-encodes to postcard's bytes and decodes back to the same value.
pub fn frame(data: &[u8]) {
    let Some((&extensions, payload)) = data.split_first() else {
        return;
    };
    let reference = ref_decode(payload, extensions);
    let base_reference = ref_decode(payload, 0);
    let incoming = decode_payload(payload, extensions);
    let base = decode_payload(payload, 0);
    let header = FrameHeader::decode(payload);

    check_incoming(payload, extensions, &incoming, reference);
    check_incoming(payload, 0, &base, base_reference);

    // The header decoder is the base format without items.
    match (&header, base_reference) {
        (
            Ok((h, len)),
            Ok(RefFrame::Data {
                seq,
                ack,
                item_offset,
                ..
            }),
        ) => {
            assert_eq!(h.seq, Seq(seq));
            assert_eq!(h.ack, ack.map(Seq));
            assert_eq!(*len, item_offset);
            assert!(*len <= MAX_HEADER_LEN);
        }
        (Err(err), Err(r)) => assert!(same_error(err, r), "header: {err:?} vs reference {r:?}"),
        (ours, theirs) => panic!("header decode {ours:?}, reference {theirs:?}"),
    }
    // A data frame is the same under any extensions.
    if let Ok(Incoming::Data { .. }) = incoming {
        assert_eq!(incoming.as_ref().ok(), base.as_ref().ok());
    }
    if let Ok(Incoming::Control(control)) = incoming {
        let (kind, _, _, _) = control_parts(control);
        assert!(matches!(header, Err(FrameError::BadOptionTag(k)) if k == kind));
    }

    check_decode_frame(payload, &header);
}

fn check_incoming(
    payload: &[u8],
    extensions: u8,
    ours: &Result<Incoming, FrameError>,
    reference: Result<RefFrame, RefError>,
) {
    match (ours, reference) {
        (
            Ok(Incoming::Data {
                header,
                item_offset,
            }),
            Ok(RefFrame::Data {
                seq,
                ack,
                item_offset: ref_offset,
                minimal,
            }),
        ) => {
            assert_eq!(header.seq, Seq(seq));
            assert_eq!(header.ack, ack.map(Seq));
            assert_eq!(*item_offset, ref_offset);
            let mut out = BytesMut::new();
            header.encode(&mut out);
            assert_eq!(out.len(), header.encoded_len());
            assert!(out.len() <= *item_offset);
            assert_eq!(minimal, out.len() == *item_offset);
            if minimal {
                assert_eq!(&out[..], &payload[..*item_offset], "header re-encoding");
            }
            assert_eq!(
                FrameHeader::decode(&out).unwrap(),
                (*header, header.encoded_len())
            );
        }
        (
            Ok(Incoming::Fragment { seq, item_offset }),
            Ok(RefFrame::Fragment {
                seq: ref_seq,
                item_offset: ref_offset,
            }),
        ) => {
            assert_ne!(extensions & 0x20, 0);
            assert_eq!((*seq, *item_offset), (Seq(ref_seq), ref_offset));
            // A data frame with the same seq differs only in its tag.
            let mut as_data = payload.to_vec();
            as_data[item_offset - 1] = 0x00;
            assert_eq!(
                decode_payload(&as_data, extensions).unwrap(),
                Incoming::Data {
                    header: FrameHeader {
                        seq: *seq,
                        ack: None
                    },
                    item_offset: *item_offset
                }
            );
        }
        (
            Ok(Incoming::Control(control)),
            Ok(RefFrame::Control {
                kind,
                value,
                extra,
                recv,
                canonical,
            }),
        ) => {
            assert_eq!(control_parts(*control), (kind, value, extra, recv));
            assert_ne!(control.extension() & extensions, 0);
            let mut out = BytesMut::new();
            control.encode(&mut out);
            let mut expected = vec![0x00, kind];
            ref_put_varint(value, &mut expected);
            for extra in [extra, recv].into_iter().flatten() {
                ref_put_varint(extra, &mut expected);
            }
            assert_eq!(&out[..], &expected[..], "control re-encoding");
            assert_eq!(canonical, out[..] == *payload);
            assert_eq!(
                decode_payload(&out, extensions).unwrap(),
                Incoming::Control(*control)
            );
        }
        (Err(err), Err(r)) => {
            assert!(same_error(err, r), "payload: {err:?} vs reference {r:?}");
            let _ = err.to_string();
        }
        (ours, theirs) => panic!("decode_payload {ours:?}, reference {theirs:?}"),
    }
}

fn check_decode_frame(payload: &[u8], header: &Result<(FrameHeader, usize), FrameError>) {
    let ours = decode_frame::<Item>(payload);
    let theirs = postcard::take_from_bytes::<PostcardFrame<Item>>(payload);
    match (ours, theirs) {
        (Ok((h, item)), Ok((frame, rest))) => {
            assert!(rest.is_empty());
            assert_eq!(Some(h), header.as_ref().ok().map(|(h, _)| *h));
            assert_eq!(
                (h.seq.0, h.ack.map(|a| a.0), &item),
                (
                    frame.seq,
                    frame.ack.as_ref().map(|a| a.max_delivered),
                    &frame.item
                )
            );
            let mut out = BytesMut::new();
            encode_frame(&h, &item, &mut out).unwrap();
            assert_eq!(out[..], postcard::to_allocvec(&frame).unwrap()[..]);
            let (h2, item2) = decode_frame::<Item>(&out).unwrap();
            assert_eq!((h2, item2), (h, item));
        }
        (Err(FrameError::TrailingBytes(n)), Ok((_, rest))) => assert_eq!(n, rest.len()),
        (Err(FrameError::Truncated), Err(e)) => {
            assert_eq!(e, postcard::Error::DeserializeUnexpectedEnd)
        }
        (Err(FrameError::BadVarint), Err(e)) => {
            assert_eq!(e, postcard::Error::DeserializeBadVarint)
        }
        (Err(FrameError::BadOptionTag(_)), Err(e)) => {
            assert_eq!(e, postcard::Error::DeserializeBadOption)
        }
        (Err(FrameError::Decode(ours)), Err(theirs)) => assert_eq!(ours, theirs),
        (ours, theirs) => panic!("decode_frame {ours:?}, postcard {theirs:?}"),
    }
}

// ---------------------------------------------------------------------------
// replay
// ---------------------------------------------------------------------------

/// Reads the fuzzer's bytes front to back; everything past the end is
/// absent.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    /// A u32 from up to four bytes, little-endian (missing bytes are zero).
    fn u32(&mut self) -> u32 {
        let mut bytes = [0u8; 4];
        for b in &mut bytes {
            *b = self.byte().unwrap_or(0);
        }
        u32::from_le_bytes(bytes)
    }
}

/// The wire seq of an unwrapped position.
fn wire(pos: i64) -> Seq {
    Seq(pos.rem_euclid(1 << 32) as u32)
}

/// PROTOCOL.md §4: `a` is before `b` iff `(b - a) mod 2^32`, read as a
/// signed 32-bit integer, is positive.
fn is_before(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}

/// The replay buffer as the protocol document describes it, over unwrapped
/// positions (`i64`; the wire seq is the position mod 2^32).
struct Model {
    initial: i64,
    first: i64,
    next: i64,
    /// (position, contents, address of the pushed `Bytes`)
    held: Vec<(i64, Vec<u8>, usize)>,
    max_bytes: usize,
    max_frames: usize,
}

impl Model {
    /// The position of a wire seq that is before `next`, if it is.
    fn sent(&self, seq: u32) -> Option<i64> {
        let next = wire(self.next).0;
        is_before(seq, next).then(|| self.next - i64::from(next.wrapping_sub(seq)))
    }

    fn drop_through(&mut self, pos: i64) -> usize {
        let count = usize::try_from(pos + 1 - self.first).unwrap_or(0);
        self.held.drain(..count);
        self.first += count as i64;
        count
    }

    fn ack(&mut self, seq: u32) -> Result<usize, ReplayError> {
        match self.sent(seq) {
            None => Err(ReplayError::AckBeyondSent {
                ack: Seq(seq),
                next_seq: wire(self.next),
            }),
            Some(pos) => Ok(self.drop_through(pos)),
        }
    }

    fn resume_from(&mut self, peer: Option<u32>) -> Result<Seq, ReplayError> {
        let missing = ReplayError::PeerMissingTrimmed {
            peer_last_received: peer.map(Seq),
            first_held: wire(self.first),
        };
        match peer {
            // Consistent only if no frame was ever dropped.
            None if self.first != self.initial => Err(missing),
            None => Ok(wire(self.first)),
            Some(seq) => match self.sent(seq) {
                None => Err(ReplayError::AckBeyondSent {
                    ack: Seq(seq),
                    next_seq: wire(self.next),
                }),
                Some(pos) if pos + 1 < self.first => Err(missing),
                Some(pos) => {
                    self.drop_through(pos);
                    Ok(wire(self.first))
                }
            },
        }
    }

    fn get(&self, seq: u32) -> Option<usize> {
        self.held
            .iter()
            .find(|(pos, _, _)| wire(*pos).0 == seq)
            .map(|(_, _, addr)| *addr)
    }

    fn bytes(&self) -> usize {
        self.held.iter().map(|(_, v, _)| v.len()).sum()
    }

    fn has_room(&self, len: usize) -> bool {
        self.held.len() < self.max_frames
            && (self.bytes() as u128 + len as u128 <= self.max_bytes as u128
                || self.held.is_empty())
    }

    /// A seq near the window: `first` or `next` (by bit 0 of `anchor`)
    /// plus the signed offset `offset`.
    fn near(&self, anchor: u8, offset: u8) -> u32 {
        let base = if anchor & 1 == 0 {
            self.first
        } else {
            self.next
        };
        wire(base + i64::from(offset as i8)).0
    }
}

fn check_same(buf: &ReplayBuffer, model: &Model) {
    assert_eq!(buf.len(), model.held.len());
    assert_eq!(buf.is_empty(), model.held.is_empty());
    assert_eq!(buf.bytes(), model.bytes());
    assert_eq!(buf.first_seq(), wire(model.first));
    assert_eq!(buf.next_seq(), wire(model.next));
    assert_eq!(buf.iter().count(), model.held.len());
    for ((seq, bytes), (pos, contents, addr)) in buf.iter().zip(&model.held) {
        assert_eq!(seq, wire(*pos));
        assert_eq!(&bytes[..], &contents[..]);
        assert_eq!(
            bytes.as_ptr() as usize,
            *addr,
            "held frame is not the pushed handle"
        );
        assert_eq!(buf.get(seq).map(|b| b.as_ptr() as usize), Some(*addr));
    }
}

/// Target `replay`: a `ReplayBuffer` and a model run the same operations,
/// decoded from the bytes, and must agree after each one on `len`,
/// `is_empty`, `bytes`, `first_seq`, `next_seq`, the held frames (seq,
/// contents, and that each is the very `Bytes` pushed), and on every
/// result and error.
///
/// Layout: byte 0 picks the initial seq (`0x00..=0x7f`: `u32::MAX - b`, so
/// the wrap comes early; `0x80..=0xbf`: around 2^31; `0xc0..`: the next
/// four bytes), byte 1 `max_frames` (`0xff`: unbounded, else `b % 16`),
/// byte 2 `max_bytes` (`0xff`: unbounded, else `4 * b`). Then operations,
/// one opcode byte each (`b % 8`) and its arguments:
///
/// | op | arguments | operation |
/// |---|---|---|
/// | 0 | len | push a frame of `len` bytes |
/// | 1 | anchor, offset | ack `first` or `next` (anchor bit 0) + offset as i8 |
/// | 2 | 4 bytes | ack that seq (anywhere in the 2^32 space) |
/// | 3 | | `resume_from(None)` |
/// | 4 | anchor, offset | `resume_from` near the window, as op 1 |
/// | 5 | 4 bytes | `resume_from` that seq |
/// | 6 | anchor, offset | `get` near the window, as op 1 |
/// | 7 | len | `has_room(2 * len)` |
pub fn replay(data: &[u8]) {
    let mut input = Input(data);
    let start = input.byte().unwrap_or(0);
    let initial = match start {
        0x00..=0x7f => u32::MAX - u32::from(start),
        0x80..=0xbf => (1u32 << 31) - 32 + u32::from(start - 0x80),
        _ => input.u32(),
    };
    let max_frames = match input.byte().unwrap_or(0xff) {
        0xff => usize::MAX,
        b => usize::from(b % 16),
    };
    let max_bytes = match input.byte().unwrap_or(0xff) {
        0xff => usize::MAX,
        b => 4 * usize::from(b),
    };

    let mut buf = ReplayBuffer::with_limits(Seq(initial), max_bytes, max_frames);
    let initial = i64::from(initial);
    let mut model = Model {
        initial,
        first: initial,
        next: initial,
        held: Vec::new(),
        max_bytes,
        max_frames,
    };
    assert_eq!((buf.max_bytes(), buf.max_frames()), (max_bytes, max_frames));
    check_same(&buf, &model);

    let mut pushed = 0u8;
    while let Some(op) = input.byte() {
        match op % 8 {
            0 => {
                let len = usize::from(input.byte().unwrap_or(0));
                pushed = pushed.wrapping_add(1);
                let contents: Vec<u8> = (0..len).map(|i| pushed ^ i as u8).collect();
                let frame = Bytes::from(contents.clone());
                let addr = frame.as_ptr() as usize;
                assert_eq!(buf.push(frame), wire(model.next));
                model.held.push((model.next, contents, addr));
                model.next += 1;
            }
            1 | 2 => {
                let seq = if op % 8 == 1 {
                    let anchor = input.byte().unwrap_or(0);
                    model.near(anchor, input.byte().unwrap_or(0))
                } else {
                    input.u32()
                };
                let expected = model.ack(seq);
                let got = buf.ack(Seq(seq));
                if let Err(e) = &got {
                    let _ = e.to_string();
                }
                assert_eq!(got, expected, "ack({seq})");
            }
            3..=5 => {
                let peer = match op % 8 {
                    3 => None,
                    4 => {
                        let anchor = input.byte().unwrap_or(0);
                        Some(model.near(anchor, input.byte().unwrap_or(0)))
                    }
                    _ => Some(input.u32()),
                };
                let expected = model.resume_from(peer);
                let got = buf.resume_from(peer.map(Seq));
                if let Err(e) = &got {
                    let _ = e.to_string();
                }
                assert_eq!(got, expected, "resume_from({peer:?})");
            }
            6 => {
                let anchor = input.byte().unwrap_or(0);
                let seq = model.near(anchor, input.byte().unwrap_or(0));
                assert_eq!(
                    buf.get(Seq(seq)).map(|b| b.as_ptr() as usize),
                    model.get(seq),
                    "get({seq})"
                );
            }
            _ => {
                let len = 2 * usize::from(input.byte().unwrap_or(0));
                assert_eq!(buf.has_room(len), model.has_room(len), "has_room({len})");
            }
        }
        check_same(&buf, &model);
    }
}

// ---------------------------------------------------------------------------
// proof
// ---------------------------------------------------------------------------

/// Target `proof`: `data` goes into every decoder and verifier of
/// proof-of-possession resume (`docs/PROTOCOL.md` 5.9).
///
/// - A key share decodes iff it is 33 bytes starting with `01`, and gives
///   bytes 1..33.
/// - A server offer decodes iff it is 58 bytes: a ServerHello, `01`, and
///   `S_pub` (bytes 26..58).
/// - A resume request decodes iff it is 98 bytes: a ClientHello with the
///   resume flag and the `PROOF` bit, `01`, and then counter, `C_pub` and
///   `mac_c` at 26, 34 and 66; the session id is the key field.
/// - Nothing the fuzzer makes verifies against a fixed secret (it would
///   have to forge HMAC-SHA256): the server's state refuses it, without
///   recording its counter, and a client refuses it as a reply.
pub fn proof(data: &[u8]) {
    use tether_proto::proof::{
        decode_key_share, decode_server_offer, ClientResume, Ephemeral, Refused, ResumeRequest,
        ServerResume, ServerSecrets, KEY_SHARE_LEN, RESUME_REQUEST_LEN, SERVER_OFFER_LEN,
    };
    use tether_proto::{ext, ResumeSecret, SessionId};

    let share = decode_key_share(data);
    assert_eq!(
        share.is_ok(),
        data.len() == KEY_SHARE_LEN && data[0] == 1,
        "key share {data:02x?}"
    );
    if let Ok(public) = share {
        assert_eq!(&public[..], &data[1..]);
    }

    let offer = decode_server_offer(data);
    let offer_ok =
        data.len() == SERVER_OFFER_LEN && data[..4] == SERVER_MAGIC && data[HELLO_LEN] == 1;
    assert_eq!(offer.is_ok(), offer_ok, "server offer {data:02x?}");
    if let Ok((hello, public)) = offer {
        assert_eq!(hello.resume_key.as_bytes()[..], data[KEY]);
        assert_eq!(&public[..], &data[HELLO_LEN + 1..]);
    }

    let request = ResumeRequest::decode(data);
    let request_ok = data.len() == RESUME_REQUEST_LEN
        && data[..4] == CLIENT_MAGIC
        && data[FLAGS_AT] & flags::CLIENT_RESUME != 0
        && data[FLAGS_AT] & ext::PROOF != 0
        && data[HELLO_LEN] == 1;
    assert_eq!(request.is_ok(), request_ok, "resume request {data:02x?}");
    let secret = ResumeSecret::from_bytes([0x5a; 32]);
    if let Ok(request) = &request {
        assert_eq!(request.session_id.as_bytes()[..], data[KEY]);
        assert_eq!(
            request.counter,
            u64::from_le_bytes(data[26..34].try_into().unwrap())
        );
        assert_eq!(&request.public[..], &data[34..66]);
        assert_eq!(&request.mac[..], &data[66..]);
        assert!(!ResumeRequest::verify(data, &secret));
        let mut state = ServerSecrets::new();
        assert_eq!(state.accept(data, request).unwrap_err(), Refused::NoSecret);
        state.set_confirmed(secret.clone());
        assert_eq!(state.accept(data, request).unwrap_err(), Refused::BadMac);
        assert_eq!(state.highest_counter(), 0);
        // The server's half of the exchange refuses only low-order keys.
        let _ = ServerResume::new(data, Ephemeral::from_private([7; 32]));
    }

    let client = ClientResume::new(
        &SessionId::from_bytes([1; 16]),
        None,
        ext::ALL,
        1,
        Ephemeral::from_private([9; 32]),
        &secret,
    );
    assert!(client.finish(data).is_err(), "a forged reply verified");
}
