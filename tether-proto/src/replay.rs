//! The sender's replay buffer of unacknowledged frames.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::Seq;

/// The encoded bytes of every frame sent but not yet acknowledged, in seq
/// order, so they can be resent on a new link.
///
/// Frames are stored as the `Bytes` handles they were pushed with (no copy).
/// The buffer itself does not refuse frames; a sender that wants
/// backpressure asks [`ReplayBuffer::has_room`] before pushing.
#[derive(Debug, Clone)]
pub struct ReplayBuffer {
    frames: VecDeque<Bytes>,
    /// Seq of `frames[0]`; equals `next_seq` when empty.
    first_seq: Seq,
    /// Seq the next pushed frame gets.
    next_seq: Seq,
    /// Sum of the lengths of the held frames.
    bytes: usize,
    max_bytes: usize,
    max_frames: usize,
    /// Whether any frame was ever dropped by an ack.
    trimmed: bool,
}

/// An ack or a resume position does not fit the replay buffer.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayError {
    /// The peer acknowledged (or claims to have received) a seq that was
    /// never sent.
    #[error("peer acknowledged seq {ack}, but that frame was never sent (the next seq to send is {next_seq})")]
    AckBeyondSent {
        /// The seq the peer acknowledged.
        ack: Seq,
        /// The seq the next frame sent will carry.
        next_seq: Seq,
    },
    /// The peer lacks frames that were already dropped from the buffer, so
    /// they cannot be resent.
    #[error("peer last received {}, but the oldest frame still held is seq {first_held}: the frames in between were already dropped and cannot be resent", show_last(peer_last_received))]
    PeerMissingTrimmed {
        /// The peer's last received seq (`None`: it has received nothing).
        peer_last_received: Option<Seq>,
        /// The seq of the oldest frame still held.
        first_held: Seq,
    },
}

fn show_last(last: &Option<Seq>) -> String {
    match last {
        Some(seq) => format!("seq {seq}"),
        None => "nothing".to_owned(),
    }
}

impl ReplayBuffer {
    /// An unbounded buffer whose first frame will carry `initial_seq`.
    #[must_use]
    pub fn new(initial_seq: Seq) -> ReplayBuffer {
        ReplayBuffer::with_limits(initial_seq, usize::MAX, usize::MAX)
    }

    /// A buffer whose first frame will carry `initial_seq`, with the limits
    /// [`ReplayBuffer::has_room`] checks against.
    #[must_use]
    pub fn with_limits(initial_seq: Seq, max_bytes: usize, max_frames: usize) -> ReplayBuffer {
        ReplayBuffer {
            frames: VecDeque::new(),
            first_seq: initial_seq,
            next_seq: initial_seq,
            bytes: 0,
            max_bytes,
            max_frames,
            trimmed: false,
        }
    }

    /// The seq the next pushed frame carries.
    #[must_use]
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// The seq of the oldest held frame (equal to [`ReplayBuffer::next_seq`]
    /// when empty).
    #[must_use]
    pub fn first_seq(&self) -> Seq {
        self.first_seq
    }

    /// Stores an encoded frame (the same handle, not a copy) and returns the
    /// seq it was assigned, the previous [`ReplayBuffer::next_seq`].
    pub fn push(&mut self, frame: Bytes) -> Seq {
        let seq = self.next_seq;
        self.bytes += frame.len();
        self.frames.push_back(frame);
        self.next_seq = seq.next();
        seq
    }

    /// The held frame with this seq, if any.
    #[must_use]
    pub fn get(&self, seq: Seq) -> Option<&Bytes> {
        let index = usize::try_from(seq.distance_from(self.first_seq)).ok()?;
        self.frames.get(index)
    }

    /// Drops every held frame up to and including `max_delivered` and
    /// returns how many were dropped.
    ///
    /// A stale ack (before the oldest held frame) drops nothing. An ack for
    /// a seq that was never sent is an error and changes nothing.
    pub fn ack(&mut self, max_delivered: Seq) -> Result<usize, ReplayError> {
        self.ack_with(max_delivered, drop)
    }

    /// Like [`ack`](Self::ack), but appends the frames it removes to `out`
    /// instead of dropping them, so that a caller holding a lock around the
    /// buffer can release their memory after unlocking.
    pub fn ack_into(
        &mut self,
        max_delivered: Seq,
        out: &mut Vec<Bytes>,
    ) -> Result<usize, ReplayError> {
        self.ack_with(max_delivered, |frame| out.push(frame))
    }

    fn ack_with(
        &mut self,
        max_delivered: Seq,
        sink: impl FnMut(Bytes),
    ) -> Result<usize, ReplayError> {
        if !max_delivered.is_before(self.next_seq) {
            return Err(ReplayError::AckBeyondSent {
                ack: max_delivered,
                next_seq: self.next_seq,
            });
        }
        if max_delivered.is_before(self.first_seq) {
            return Ok(0);
        }
        let count = max_delivered.distance_from(self.first_seq) as usize + 1;
        self.drop_front(count, sink);
        Ok(count)
    }

    fn drop_front(&mut self, count: usize, mut sink: impl FnMut(Bytes)) {
        for frame in self.frames.drain(..count) {
            self.bytes -= frame.len();
            sink(frame);
        }
        self.first_seq = self.first_seq.wrapping_add(count as u32);
        if count > 0 {
            self.trimmed = true;
        }
    }

    /// Lines the buffer up with a peer after a handshake: drops the frames
    /// the peer already has (up to and including `peer_last_received`) and
    /// returns the seq of the first frame to resend (equal to
    /// [`ReplayBuffer::next_seq`] when there is nothing to resend).
    ///
    /// `None` means the peer has received nothing; that is only consistent
    /// if no frame was ever dropped. Errors change nothing.
    pub fn resume_from(&mut self, peer_last_received: Option<Seq>) -> Result<Seq, ReplayError> {
        let start = self.rewind_to(peer_last_received)?;
        let count = start.distance_from(self.first_seq) as usize;
        self.drop_front(count, drop);
        Ok(self.first_seq)
    }

    /// Like [`resume_from`](Self::resume_from), but drops nothing: returns
    /// the seq of the first frame the peer lacks and keeps every held frame
    /// until it is acknowledged. For a peer whose acks report what its
    /// application consumed, which can be less than what it received: the
    /// frames in between stay counted against the bound, so a reader that
    /// stalls across resumes still holds its peer to the bound. Errors
    /// change nothing.
    pub fn rewind_to(&self, peer_last_received: Option<Seq>) -> Result<Seq, ReplayError> {
        let missing = ReplayError::PeerMissingTrimmed {
            peer_last_received,
            first_held: self.first_seq,
        };
        match peer_last_received {
            None if self.trimmed => Err(missing),
            None => Ok(self.first_seq),
            Some(last) if !last.is_before(self.next_seq) => Err(ReplayError::AckBeyondSent {
                ack: last,
                next_seq: self.next_seq,
            }),
            Some(last) if last.next().is_before(self.first_seq) => Err(missing),
            Some(last) => Ok(last.next()),
        }
    }

    /// Number of held frames.
    #[must_use]
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether no frame is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Total length of the held frames, in bytes.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The byte limit [`ReplayBuffer::has_room`] checks (`usize::MAX` when
    /// unbounded).
    #[must_use]
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The frame-count limit [`ReplayBuffer::has_room`] checks (`usize::MAX`
    /// when unbounded).
    #[must_use]
    pub fn max_frames(&self) -> usize {
        self.max_frames
    }

    /// Whether a frame of `frame_len` bytes fits within the limits (a
    /// message of one frame, see [`has_room_for`](Self::has_room_for)).
    #[must_use]
    pub fn has_room(&self, frame_len: usize) -> bool {
        self.has_room_for(1, frame_len)
    }

    /// Whether a message of `frames` frames and `bytes` bytes in all fits
    /// within the limits, taken whole: an empty buffer always takes one
    /// message, however large, so that it cannot deadlock the sender (if
    /// `max_frames` allows any frame at all).
    #[must_use]
    pub fn has_room_for(&self, frames: usize, bytes: usize) -> bool {
        self.max_frames > 0 && self.is_empty()
            || (self.len().saturating_add(frames) <= self.max_frames
                && self.bytes.saturating_add(bytes) <= self.max_bytes)
    }

    /// The held frames with their seqs, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (Seq, &Bytes)> + '_ {
        let first = self.first_seq;
        self.frames
            .iter()
            .enumerate()
            .map(move |(i, frame)| (first.wrapping_add(i as u32), frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8, len: usize) -> Bytes {
        Bytes::from(vec![n; len])
    }

    #[test]
    fn push_assigns_seqs_and_keeps_the_handle() {
        let mut buf = ReplayBuffer::new(Seq::ZERO);
        assert!(buf.is_empty());
        assert_eq!(buf.first_seq(), Seq(0));
        let a = frame(1, 3);
        let ptr = a.as_ptr();
        assert_eq!(buf.push(a), Seq(0));
        assert_eq!(buf.push(frame(2, 5)), Seq(1));
        assert_eq!(buf.next_seq(), Seq(2));
        assert_eq!(buf.first_seq(), Seq(0));
        assert_eq!((buf.len(), buf.bytes()), (2, 8));
        assert_eq!(buf.get(Seq(0)).unwrap().as_ptr(), ptr);
        assert_eq!(buf.get(Seq(1)).unwrap()[..], [2; 5]);
        assert!(buf.get(Seq(2)).is_none());
        assert!(buf.get(Seq(u32::MAX)).is_none());
        let seqs: Vec<Seq> = buf.iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, [Seq(0), Seq(1)]);
    }

    #[test]
    fn ack_drops_through_max_delivered() {
        let mut buf = ReplayBuffer::new(Seq(10));
        for i in 0..5 {
            buf.push(frame(i, 2));
        }
        assert_eq!(buf.ack(Seq(11)), Ok(2));
        assert_eq!(buf.first_seq(), Seq(12));
        assert_eq!((buf.len(), buf.bytes()), (3, 6));
        assert!(buf.get(Seq(11)).is_none());
        assert_eq!(buf.get(Seq(12)).unwrap()[0], 2);
        // Stale acks drop nothing.
        assert_eq!(buf.ack(Seq(11)), Ok(0));
        assert_eq!(buf.ack(Seq(3)), Ok(0));
        assert_eq!(buf.len(), 3);
        // Ack everything.
        assert_eq!(buf.ack(Seq(14)), Ok(3));
        assert!(buf.is_empty());
        assert_eq!(buf.first_seq(), buf.next_seq());
        assert_eq!(buf.bytes(), 0);
    }

    #[test]
    fn ack_beyond_sent_changes_nothing() {
        let mut buf = ReplayBuffer::new(Seq(u32::MAX));
        buf.push(frame(0, 1));
        buf.push(frame(1, 1));
        assert_eq!(buf.next_seq(), Seq(1));
        for bad in [Seq(1), Seq(2), Seq(1000)] {
            assert_eq!(
                buf.ack(bad),
                Err(ReplayError::AckBeyondSent {
                    ack: bad,
                    next_seq: Seq(1)
                })
            );
        }
        assert_eq!((buf.len(), buf.first_seq()), (2, Seq(u32::MAX)));
        // Across the wrap.
        assert_eq!(buf.ack(Seq(u32::MAX)), Ok(1));
        assert_eq!(buf.ack(Seq(0)), Ok(1));
        assert_eq!(buf.first_seq(), Seq(1));
        // Nothing sent at all yet.
        let mut empty = ReplayBuffer::new(Seq(0));
        assert!(matches!(
            empty.ack(Seq(0)),
            Err(ReplayError::AckBeyondSent { .. })
        ));
        assert_eq!(empty.ack(Seq(u32::MAX)), Ok(0));
    }

    #[test]
    fn resume_from_nothing_received() {
        let mut buf = ReplayBuffer::new(Seq(0));
        assert_eq!(buf.resume_from(None), Ok(Seq(0)));
        buf.push(frame(0, 1));
        buf.push(frame(1, 1));
        assert_eq!(buf.resume_from(None), Ok(Seq(0)));
        assert_eq!(buf.len(), 2);
        buf.ack(Seq(0)).unwrap();
        assert_eq!(
            buf.resume_from(None),
            Err(ReplayError::PeerMissingTrimmed {
                peer_last_received: None,
                first_held: Seq(1)
            })
        );
        // Still true once everything is acked.
        buf.ack(Seq(1)).unwrap();
        assert!(buf.resume_from(None).is_err());
    }

    #[test]
    fn resume_from_trims_and_returns_first_to_resend() {
        let mut buf = ReplayBuffer::new(Seq(u32::MAX - 1));
        for i in 0..6 {
            buf.push(frame(i, 1));
        }
        // Held: MAX-1, MAX, 0, 1, 2, 3.
        assert_eq!(buf.resume_from(Some(Seq(u32::MAX))), Ok(Seq(0)));
        assert_eq!(buf.len(), 4);
        // Same position again: nothing more to trim.
        assert_eq!(buf.resume_from(Some(Seq(u32::MAX))), Ok(Seq(0)));
        assert_eq!(buf.len(), 4);
        // Peer has everything.
        assert_eq!(buf.resume_from(Some(Seq(3))), Ok(Seq(4)));
        assert!(buf.is_empty());
        assert_eq!(buf.resume_from(Some(Seq(3))), Ok(Seq(4)));
    }

    #[test]
    fn resume_from_errors() {
        let mut buf = ReplayBuffer::new(Seq(100));
        for i in 0..4 {
            buf.push(frame(i, 1));
        }
        buf.ack(Seq(101)).unwrap(); // held: 102, 103
        assert_eq!(
            buf.resume_from(Some(Seq(104))),
            Err(ReplayError::AckBeyondSent {
                ack: Seq(104),
                next_seq: Seq(104)
            })
        );
        assert_eq!(
            buf.resume_from(Some(Seq(100))),
            Err(ReplayError::PeerMissingTrimmed {
                peer_last_received: Some(Seq(100)),
                first_held: Seq(102)
            })
        );
        assert_eq!((buf.len(), buf.first_seq()), (2, Seq(102)));
        // 101 is fine: the peer needs 102, which is held.
        assert_eq!(buf.resume_from(Some(Seq(101))), Ok(Seq(102)));
    }

    #[test]
    fn rewind_keeps_what_the_peer_received_but_did_not_acknowledge() {
        let mut buf = ReplayBuffer::new(Seq(10));
        for seq in 10..15 {
            buf.push(frame(seq, 3));
        }
        assert_eq!(buf.rewind_to(Some(Seq(12))), Ok(Seq(13)));
        assert_eq!((buf.len(), buf.first_seq()), (5, Seq(10)));
        assert_eq!(buf.rewind_to(None), Ok(Seq(10)));
        assert_eq!(
            buf.rewind_to(Some(Seq(15))),
            Err(ReplayError::AckBeyondSent {
                ack: Seq(15),
                next_seq: Seq(15)
            })
        );
        buf.ack(Seq(11)).unwrap();
        assert_eq!(
            buf.rewind_to(Some(Seq(9))),
            Err(ReplayError::PeerMissingTrimmed {
                peer_last_received: Some(Seq(9)),
                first_held: Seq(12)
            })
        );
        assert!(buf.rewind_to(None).is_err());
        assert_eq!(buf.rewind_to(Some(Seq(11))), Ok(Seq(12)));
    }

    #[test]
    fn has_room_limits() {
        let mut buf = ReplayBuffer::with_limits(Seq(0), 10, 3);
        assert_eq!((buf.max_bytes(), buf.max_frames()), (10, 3));
        // Empty takes one oversized frame.
        assert!(buf.has_room(1000));
        buf.push(frame(0, 1000));
        assert!(!buf.has_room(0));
        buf.ack(Seq(0)).unwrap();
        assert!(buf.has_room(6));
        buf.push(frame(1, 6));
        assert!(buf.has_room(4));
        assert!(!buf.has_room(5));
        buf.push(frame(2, 2));
        buf.push(frame(3, 2));
        // Frame limit reached.
        assert!(!buf.has_room(0));
        assert!(buf.has_room(usize::MAX) == buf.is_empty());
        // A message of several frames is taken whole or not at all.
        buf.ack(Seq(3)).unwrap();
        buf.push(frame(4, 1));
        assert!(buf.has_room_for(2, 9));
        assert!(!buf.has_room_for(3, 1));
        assert!(!buf.has_room_for(1, 10));
        buf.ack(Seq(4)).unwrap();
        assert!(
            buf.has_room_for(100, 1 << 20),
            "empty takes any one message"
        );

        let unbounded = ReplayBuffer::new(Seq(0));
        assert_eq!(unbounded.max_bytes(), usize::MAX);
        assert_eq!(unbounded.max_frames(), usize::MAX);
        assert!(unbounded.has_room(usize::MAX));

        let none = ReplayBuffer::with_limits(Seq(0), 10, 0);
        assert!(!none.has_room(1));
    }

    #[test]
    fn error_messages_are_concrete() {
        assert_eq!(
            ReplayError::AckBeyondSent {
                ack: Seq(7),
                next_seq: Seq(5)
            }
            .to_string(),
            "peer acknowledged seq 7, but that frame was never sent (the next seq to send is 5)"
        );
        assert_eq!(
            ReplayError::PeerMissingTrimmed {
                peer_last_received: Some(Seq(3)),
                first_held: Seq(9)
            }
            .to_string(),
            "peer last received seq 3, but the oldest frame still held is seq 9: \
             the frames in between were already dropped and cannot be resent"
        );
        assert!(ReplayError::PeerMissingTrimmed {
            peer_last_received: None,
            first_held: Seq(9)
        }
        .to_string()
        .starts_with("peer last received nothing, but the oldest frame still held is seq 9"));
    }
}
