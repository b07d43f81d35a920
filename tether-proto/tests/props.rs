//! Property tests for tether-proto.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use tether_proto::{
    decode_frame, encode_frame, flags, ClientHello, Delivery, FrameError, FrameHeader, RecvError,
    RecvState, ReplayBuffer, ReplayError, ResumeKey, Seq, ServerHello, CLIENT_MAGIC, HELLO_LEN,
    SERVER_MAGIC,
};

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Any u32, with extra weight near 0 and u32::MAX (the wrap).
fn seq_value() -> impl Strategy<Value = u32> {
    prop_oneof![
        any::<u32>(),
        (u32::MAX - 300)..=u32::MAX,
        0u32..300,
        // Around varint length boundaries.
        prop::sample::select(vec![
            0x7f,
            0x80,
            0x3fff,
            0x4000,
            0x1f_ffff,
            0x20_0000,
            0x0fff_ffff,
            0x1000_0000
        ]),
    ]
}

fn key() -> impl Strategy<Value = ResumeKey> {
    any::<[u8; 16]>().prop_map(ResumeKey::from_bytes)
}

fn opt_seq() -> impl Strategy<Value = Option<Seq>> {
    prop::option::of(seq_value().prop_map(Seq))
}

fn header() -> impl Strategy<Value = FrameHeader> {
    (seq_value(), opt_seq()).prop_map(|(seq, ack)| FrameHeader { seq: Seq(seq), ack })
}

// ---------------------------------------------------------------------------
// Hellos
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn client_hello_round_trip(resume_key in prop::option::of(key()), last_received in opt_seq(), ext in any::<u8>()) {
        let hello = ClientHello { resume_key, last_received, extensions: ext };
        let bytes = hello.encode();
        prop_assert_eq!(bytes.len(), HELLO_LEN);
        prop_assert_eq!(&bytes[..4], &CLIENT_MAGIC[..]);
        let decoded = ClientHello::decode(&bytes).unwrap();
        prop_assert_eq!(decoded, ClientHello { extensions: ext & flags::EXTENSION_MASK, ..hello });
        prop_assert!(matches!(ServerHello::decode(&bytes), Err(tether_proto::HelloError::BadMagic { .. })), "unexpected result");
    }

    #[test]
    fn server_hello_round_trip(rejected in any::<bool>(), resume_key in key(), last_received in opt_seq(), ext in any::<u8>()) {
        let hello = ServerHello { rejected, resume_key, last_received, extensions: ext };
        let bytes = hello.encode();
        prop_assert_eq!(&bytes[..4], &SERVER_MAGIC[..]);
        let decoded = ServerHello::decode(&bytes).unwrap();
        prop_assert_eq!(decoded, ServerHello { extensions: ext & flags::EXTENSION_MASK, ..hello });
        prop_assert!(matches!(ClientHello::decode(&bytes), Err(tether_proto::HelloError::BadMagic { .. })), "unexpected result");
    }

    /// Any 25 bytes with the right magic decode, and re-encoding gives back
    /// the same bytes except for fields whose flag is clear (zeroed).
    #[test]
    fn any_client_hello_bytes_decode(body in any::<[u8; 21]>()) {
        let mut bytes = [0u8; HELLO_LEN];
        bytes[..4].copy_from_slice(&CLIENT_MAGIC);
        bytes[4..].copy_from_slice(&body);
        let hello = ClientHello::decode(&bytes).unwrap();
        let f = bytes[4];
        prop_assert_eq!(hello.extensions, f & 0xFC);
        prop_assert_eq!(hello.resume_key.is_some(), f & 0x01 != 0);
        prop_assert_eq!(hello.last_received.is_some(), f & 0x02 != 0);
        let mut expected = bytes;
        if f & 0x01 == 0 { expected[5..21].fill(0); }
        if f & 0x02 == 0 { expected[21..].fill(0); }
        prop_assert_eq!(hello.encode(), expected);
    }

    #[test]
    fn any_server_hello_bytes_decode(body in any::<[u8; 21]>()) {
        let mut bytes = [0u8; HELLO_LEN];
        bytes[..4].copy_from_slice(&SERVER_MAGIC);
        bytes[4..].copy_from_slice(&body);
        let hello = ServerHello::decode(&bytes).unwrap();
        let f = bytes[4];
        prop_assert_eq!(hello.rejected, f & 0x01 != 0);
        prop_assert_eq!(hello.extensions, f & 0xFC);
        let mut expected = bytes;
        if f & 0x02 == 0 { expected[21..].fill(0); }
        prop_assert_eq!(hello.encode(), expected);
    }
}

// ---------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------

/// postcard's own view of a frame, as the reference implementation defines it.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Ack {
    max_delivered: u32,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Frame<T> {
    seq: u32,
    ack: Option<Ack>,
    item: T,
}

fn reference<T>(header: FrameHeader, item: T) -> Frame<T> {
    Frame {
        seq: header.seq.0,
        ack: header.ack.map(|a| Ack { max_delivered: a.0 }),
        item,
    }
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
enum Kind {
    Empty,
    Number(u64),
    Pair { x: i16, y: String },
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Sample {
    a: u8,
    b: i64,
    c: Option<String>,
    d: Vec<u16>,
    e: bool,
    kind: Kind,
}

fn sample() -> impl Strategy<Value = Sample> {
    let kind = prop_oneof![
        Just(Kind::Empty),
        any::<u64>().prop_map(Kind::Number),
        (any::<i16>(), ".{0,8}").prop_map(|(x, y)| Kind::Pair { x, y }),
    ];
    (
        any::<u8>(),
        any::<i64>(),
        prop::option::of(".{0,12}"),
        prop::collection::vec(any::<u16>(), 0..8),
        any::<bool>(),
        kind,
    )
        .prop_map(|(a, b, c, d, e, kind)| Sample {
            a,
            b,
            c,
            d,
            e,
            kind,
        })
}

fn round_trip<T>(header: FrameHeader, item: &T) -> Result<(), TestCaseError>
where
    T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let mut out = BytesMut::from(&b"prefix"[..]);
    encode_frame(&header, item, &mut out).unwrap();
    prop_assert_eq!(&out[..6], b"prefix");
    let frame = &out[6..];
    // Byte-identical to postcard's encoding of the reference struct.
    let expected = postcard::to_allocvec(&reference(header, item)).unwrap();
    prop_assert_eq!(frame, expected.as_slice());
    let (h, decoded): (FrameHeader, T) = decode_frame(frame).unwrap();
    prop_assert_eq!(h, header);
    prop_assert_eq!(&decoded, item);
    let (h2, len) = FrameHeader::decode(frame).unwrap();
    prop_assert_eq!(h2, header);
    prop_assert_eq!(len, header.encoded_len());
    Ok(())
}

/// Bytes likely to matter to the header decoder.
fn header_ish_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(vec![0x00u8, 0x01, 0x02, 0x0f, 0x10, 0x7f, 0x80, 0x81, 0xff]),
    ];
    prop::collection::vec(byte, 0..14)
}

proptest! {
    #[test]
    fn frame_round_trip_u32(h in header(), item in any::<u32>()) {
        round_trip(h, &item)?;
    }

    #[test]
    fn frame_round_trip_string(h in header(), item in ".{0,40}") {
        round_trip(h, &item)?;
    }

    #[test]
    fn frame_round_trip_bytes(h in header(), item in prop::collection::vec(any::<u8>(), 0..300)) {
        round_trip(h, &item)?;
    }

    #[test]
    fn frame_round_trip_struct(h in header(), item in sample()) {
        round_trip(h, &item)?;
    }

    /// The header alone is exactly postcard's encoding of the reference
    /// frame with an empty (unit) item.
    #[test]
    fn header_is_postcards_encoding(h in header()) {
        let mut out = BytesMut::new();
        h.encode(&mut out);
        let expected = postcard::to_allocvec(&reference(h, ())).unwrap();
        prop_assert_eq!(&out[..], expected.as_slice());
        prop_assert_eq!(out.len(), h.encoded_len());
        prop_assert!(out.len() <= tether_proto::MAX_HEADER_LEN);
        let (array, len) = h.to_array();
        prop_assert_eq!(&array[..len], expected.as_slice());
        // Written in place at the end of a gap, with the bytes in front
        // left alone.
        let mut gap = [0xaau8; tether_proto::MAX_HEADER_LEN + 2];
        let n = h.write_end(&mut gap);
        prop_assert_eq!(n, len);
        prop_assert_eq!(&gap[gap.len() - n..], expected.as_slice());
        prop_assert!(gap[..gap.len() - n].iter().all(|&b| b == 0xaa));
        let (array, len) = FrameHeader::fragment_array(h.seq);
        let n = FrameHeader::write_fragment_end(h.seq, &mut gap);
        prop_assert_eq!(&gap[gap.len() - n..], &array[..len]);
    }

    /// On arbitrary bytes, decoding agrees with postcard decoding the
    /// reference struct: same value, same leftover, failure where it fails.
    #[test]
    fn decode_agrees_with_postcard(bytes in header_ish_bytes()) {
        let ours = decode_frame::<u32>(&bytes);
        let theirs = postcard::take_from_bytes::<Frame<u32>>(&bytes);
        match (ours, theirs) {
            (Ok((h, item)), Ok((frame, rest))) => {
                prop_assert!(rest.is_empty());
                prop_assert_eq!(reference(h, item), frame);
            }
            (Err(FrameError::TrailingBytes(n)), Ok((_, rest))) => prop_assert_eq!(n, rest.len()),
            (Err(FrameError::Truncated), Err(e)) => prop_assert_eq!(e, postcard::Error::DeserializeUnexpectedEnd),
            (Err(FrameError::BadVarint), Err(e)) => prop_assert_eq!(e, postcard::Error::DeserializeBadVarint),
            (Err(FrameError::BadOptionTag(_)), Err(e)) => prop_assert_eq!(e, postcard::Error::DeserializeBadOption),
            (Err(FrameError::Decode(ours)), Err(theirs)) => prop_assert_eq!(ours, theirs),
            (ours, theirs) => prop_assert!(false, "disagree on {:02x?}: ours {:?}, postcard {:?}", bytes, ours, theirs),
        }
    }

    /// Every strict prefix of a header is Truncated.
    #[test]
    fn truncated_header_prefixes(h in header(), item in any::<u32>()) {
        let mut out = BytesMut::new();
        encode_frame(&h, &item, &mut out).unwrap();
        for cut in 0..h.encoded_len() {
            prop_assert!(matches!(FrameHeader::decode(&out[..cut]), Err(FrameError::Truncated)), "unexpected result");
        }
        for cut in h.encoded_len()..out.len() {
            prop_assert!(matches!(decode_frame::<u32>(&out[..cut]), Err(FrameError::Decode(_))), "unexpected result");
        }
    }
}

// ---------------------------------------------------------------------------
// Seq ordering
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn seq_order_forward(a in seq_value(), d in 1u32..(1 << 31)) {
        let a = Seq(a);
        let b = a.wrapping_add(d);
        prop_assert!(b.is_after(a));
        prop_assert!(a.is_before(b));
        prop_assert!(!a.is_after(b));
        prop_assert!(!b.is_before(a));
        prop_assert_eq!(b.distance_from(a), d);
        prop_assert!(a.next().is_after(a));
        prop_assert!(a.is_before(a.next()));
    }

    #[test]
    fn seq_order_antisymmetric(a in seq_value(), b in seq_value()) {
        let (a, b) = (Seq(a), Seq(b));
        prop_assert!(!(a.is_after(b) && b.is_after(a)));
        prop_assert!(!(a.is_before(b) && b.is_before(a)));
        prop_assert_eq!(a.is_after(b), b.is_before(a));
        prop_assert!(!a.is_after(a) && !a.is_before(a));
        // Exactly one of before/equal/after, except at distance 2^31.
        let count = [a.is_before(b), a == b, a.is_after(b)].iter().filter(|x| **x).count();
        if b.distance_from(a) == 1 << 31 {
            prop_assert_eq!(count, 0);
        } else {
            prop_assert_eq!(count, 1);
        }
    }
}

// ---------------------------------------------------------------------------
// ReplayBuffer against a model
// ---------------------------------------------------------------------------

/// Positions in the model are unwrapped (i64); the wire seq is the position
/// mod 2^32. The windows used are tiny next to 2^31, so unwrapped order is
/// what wrap-aware order must agree with.
fn wire(pos: i64) -> Seq {
    Seq(pos.rem_euclid(1 << 32) as u32)
}

#[derive(Debug, Clone)]
enum ReplayOp {
    Push(Vec<u8>),
    /// Ack a held frame (index modulo len, or a stale ack when empty).
    AckHeld(usize),
    /// Ack `k + 1` before the oldest held frame.
    AckStale(u16),
    /// Ack `k` at or past next_seq.
    AckBeyond(u16),
    ResumeNone,
    /// Resume from the peer at `first - 1 + (k mod (len + 1))`: valid.
    ResumeValid(usize),
    /// Resume from `first - 2 - k`: the peer lacks dropped frames.
    ResumeMissing(u16),
    /// Resume from `next + k`: never sent.
    ResumeBeyond(u16),
    /// Look up `first + k - 4`.
    Get(u16),
}

fn replay_op() -> impl Strategy<Value = ReplayOp> {
    prop_oneof![
        5 => prop::collection::vec(any::<u8>(), 0..16).prop_map(ReplayOp::Push),
        3 => any::<usize>().prop_map(ReplayOp::AckHeld),
        1 => (0u16..20).prop_map(ReplayOp::AckStale),
        1 => (0u16..20).prop_map(ReplayOp::AckBeyond),
        1 => Just(ReplayOp::ResumeNone),
        2 => any::<usize>().prop_map(ReplayOp::ResumeValid),
        1 => (0u16..20).prop_map(ReplayOp::ResumeMissing),
        1 => (0u16..20).prop_map(ReplayOp::ResumeBeyond),
        2 => (0u16..40).prop_map(ReplayOp::Get),
    ]
}

struct Model {
    initial: i64,
    first: i64,
    next: i64,
    /// (seq position, contents, pointer of the pushed Bytes)
    held: Vec<(i64, Vec<u8>, usize)>,
}

impl Model {
    fn ack(&mut self, pos: i64) -> Result<usize, ReplayError> {
        if pos >= self.next {
            return Err(ReplayError::AckBeyondSent {
                ack: wire(pos),
                next_seq: wire(self.next),
            });
        }
        if pos < self.first {
            return Ok(0);
        }
        let n = (pos - self.first + 1) as usize;
        self.held.drain(..n);
        self.first = pos + 1;
        Ok(n)
    }

    fn resume(&mut self, peer: Option<i64>) -> Result<Seq, ReplayError> {
        let missing = ReplayError::PeerMissingTrimmed {
            peer_last_received: peer.map(wire),
            first_held: wire(self.first),
        };
        match peer {
            None if self.first != self.initial => Err(missing),
            None => Ok(wire(self.first)),
            Some(pos) if pos >= self.next => Err(ReplayError::AckBeyondSent {
                ack: wire(pos),
                next_seq: wire(self.next),
            }),
            Some(pos) if pos + 1 < self.first => Err(missing),
            Some(pos) => {
                self.ack(pos).unwrap();
                Ok(wire(self.first))
            }
        }
    }
}

fn check_replay(buf: &ReplayBuffer, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(buf.len(), model.held.len());
    prop_assert_eq!(buf.is_empty(), model.held.is_empty());
    prop_assert_eq!(
        buf.bytes(),
        model.held.iter().map(|(_, v, _)| v.len()).sum::<usize>()
    );
    prop_assert_eq!(buf.first_seq(), wire(model.first));
    prop_assert_eq!(buf.next_seq(), wire(model.next));
    let listed: Vec<(Seq, &Bytes)> = buf.iter().collect();
    prop_assert_eq!(listed.len(), model.held.len());
    for ((seq, bytes), (pos, contents, ptr)) in listed.iter().zip(&model.held) {
        prop_assert_eq!(*seq, wire(*pos));
        prop_assert_eq!(&bytes[..], &contents[..]);
        prop_assert_eq!(bytes.as_ptr() as usize, *ptr);
        let got = buf.get(wire(*pos)).unwrap();
        prop_assert_eq!(got.as_ptr() as usize, *ptr);
        prop_assert_eq!(got.len(), contents.len());
    }
    Ok(())
}

proptest! {
    #[test]
    fn replay_buffer_matches_model(
        initial in prop_oneof![3 => (u32::MAX - 40)..=u32::MAX, 1 => any::<u32>()],
        ops in prop::collection::vec(replay_op(), 0..120),
    ) {
        let mut buf = ReplayBuffer::new(Seq(initial));
        let initial = i64::from(initial);
        let mut model = Model { initial, first: initial, next: initial, held: Vec::new() };
        check_replay(&buf, &model)?;
        for op in ops {
            match op {
                ReplayOp::Push(contents) => {
                    let frame = Bytes::from(contents.clone());
                    let ptr = frame.as_ptr() as usize;
                    let seq = buf.push(frame);
                    prop_assert_eq!(seq, wire(model.next));
                    model.held.push((model.next, contents, ptr));
                    model.next += 1;
                }
                ReplayOp::AckHeld(k) => {
                    let pos = if model.held.is_empty() {
                        model.first - 1
                    } else {
                        model.first + (k % model.held.len()) as i64
                    };
                    if k % 2 == 0 {
                        prop_assert_eq!(buf.ack(wire(pos)), model.ack(pos));
                    } else {
                        // `ack_into` hands over exactly the frames `ack`
                        // would drop, oldest first, as the same buffers.
                        let held: Vec<usize> = model.held.iter().map(|h| h.2).collect();
                        let expected = model.ack(pos);
                        let mut out = Vec::new();
                        prop_assert_eq!(buf.ack_into(wire(pos), &mut out), expected.clone());
                        let taken: Vec<usize> = out.iter().map(|f| f.as_ptr() as usize).collect();
                        prop_assert_eq!(taken, held[..expected.unwrap_or(0)].to_vec());
                    }
                }
                ReplayOp::AckStale(k) => {
                    let pos = model.first - 1 - i64::from(k);
                    prop_assert_eq!(buf.ack(wire(pos)), Ok(0));
                    prop_assert_eq!(model.ack(pos), Ok(0));
                }
                ReplayOp::AckBeyond(k) => {
                    let pos = model.next + i64::from(k);
                    let expected = model.ack(pos);
                    prop_assert!(expected.is_err());
                    prop_assert_eq!(buf.ack(wire(pos)), expected);
                }
                ReplayOp::ResumeNone => {
                    prop_assert_eq!(buf.resume_from(None), model.resume(None));
                }
                ReplayOp::ResumeValid(k) => {
                    let pos = model.first - 1 + (k % (model.held.len() + 1)) as i64;
                    let expected = model.resume(Some(pos));
                    prop_assert_eq!(expected.clone(), Ok(wire(pos + 1)));
                    prop_assert_eq!(buf.resume_from(Some(wire(pos))), expected);
                }
                ReplayOp::ResumeMissing(k) => {
                    let pos = model.first - 2 - i64::from(k);
                    let expected = model.resume(Some(pos));
                    prop_assert!(matches!(expected, Err(ReplayError::PeerMissingTrimmed { .. })), "unexpected result");
                    prop_assert_eq!(buf.resume_from(Some(wire(pos))), expected);
                }
                ReplayOp::ResumeBeyond(k) => {
                    let pos = model.next + i64::from(k);
                    let expected = model.resume(Some(pos));
                    prop_assert!(matches!(expected, Err(ReplayError::AckBeyondSent { .. })), "unexpected result");
                    prop_assert_eq!(buf.resume_from(Some(wire(pos))), expected);
                }
                ReplayOp::Get(k) => {
                    let pos = model.first + i64::from(k) - 4;
                    let expected = model.held.iter().find(|(p, _, _)| *p == pos).map(|(_, _, ptr)| *ptr);
                    prop_assert_eq!(buf.get(wire(pos)).map(|b| b.as_ptr() as usize), expected);
                }
            }
            check_replay(&buf, &model)?;
        }
    }

    #[test]
    fn has_room_matches_rule(
        max_bytes in 0usize..64,
        max_frames in 0usize..6,
        sizes in prop::collection::vec(0usize..40, 0..8),
        probe in 0usize..80,
    ) {
        let mut buf = ReplayBuffer::with_limits(Seq(u32::MAX - 2), max_bytes, max_frames);
        for size in sizes {
            buf.push(Bytes::from(vec![0u8; size]));
        }
        let expected = buf.len() < max_frames && (buf.bytes() + probe <= max_bytes || buf.is_empty());
        prop_assert_eq!(buf.has_room(probe), expected);
    }
}

// ---------------------------------------------------------------------------
// RecvState against a model
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum RecvOp {
    InOrder,
    /// `k` before the last delivered (0 = the last delivered itself).
    Duplicate(u16),
    /// `k + 2` after the last delivered.
    Gap(u16),
}

fn recv_op() -> impl Strategy<Value = RecvOp> {
    prop_oneof![
        4 => Just(RecvOp::InOrder),
        2 => (0u16..50).prop_map(RecvOp::Duplicate),
        1 => (0u16..50).prop_map(RecvOp::Gap),
    ]
}

proptest! {
    #[test]
    fn recv_state_matches_model(
        start in prop_oneof![3 => (u32::MAX - 60)..=u32::MAX, 1 => any::<u32>()],
        ops in prop::collection::vec(recv_op(), 0..150),
    ) {
        let mut recv = RecvState::new();
        prop_assert_eq!(recv.last_received(), None);
        let start = i64::from(start);
        let mut last: Option<i64> = None;
        for op in ops {
            let pos = match (last, &op) {
                (None, _) => start,
                (Some(l), RecvOp::InOrder) => l + 1,
                (Some(l), RecvOp::Duplicate(k)) => l - i64::from(*k),
                (Some(l), RecvOp::Gap(k)) => l + 2 + i64::from(*k),
            };
            let expected = match last {
                None => Ok(Delivery::Deliver),
                Some(l) if pos == l + 1 => Ok(Delivery::Deliver),
                Some(l) if pos <= l => Ok(Delivery::Duplicate),
                Some(l) => Err(RecvError::Gap { expected: wire(l + 1), got: wire(pos) }),
            };
            if expected == Ok(Delivery::Deliver) {
                last = Some(pos);
            }
            prop_assert_eq!(recv.on_frame(wire(pos)), expected);
            prop_assert_eq!(recv.last_received(), last.map(wire));
        }
    }
}
