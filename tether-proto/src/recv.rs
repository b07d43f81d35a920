//! The receiver's view of one direction: which seq it delivered last, and
//! the message being put back together from its pieces.

use bytes::{Bytes, BytesMut};

use crate::Seq;

/// What a receiver should do with an incoming frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The frame is the next one: deliver its item.
    Deliver,
    /// The frame was already delivered (a replay): drop it.
    Duplicate,
}

/// A frame arrived that does not follow the last delivered one.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecvError {
    /// Frames between the last delivered one and this one are missing.
    #[error("gap in frame sequence: expected seq {expected}, got seq {got}")]
    Gap {
        /// The seq that should have come next.
        expected: Seq,
        /// The seq that arrived.
        got: Seq,
    },
}

/// Tracks the last seq delivered in one direction, to drop replayed
/// duplicates and detect gaps.
#[derive(Debug, Default, Clone)]
pub struct RecvState {
    last: Option<Seq>,
}

impl RecvState {
    /// A receiver that has delivered nothing yet.
    #[must_use]
    pub fn new() -> RecvState {
        RecvState::default()
    }

    /// The seq of the last delivered frame (what a hello reports as last
    /// received, and what an ack carries).
    #[must_use]
    pub fn last_received(&self) -> Option<Seq> {
        self.last
    }

    /// Classifies an incoming frame's seq. The first frame ever is accepted
    /// whatever its seq; after that, only the next seq is delivered, seqs
    /// not after the last one are duplicates (state unchanged), and seqs
    /// further ahead are a gap (error, state unchanged).
    pub fn on_frame(&mut self, seq: Seq) -> Result<Delivery, RecvError> {
        match self.last {
            None => {
                self.last = Some(seq);
                Ok(Delivery::Deliver)
            }
            Some(last) if seq == last.next() => {
                self.last = Some(seq);
                Ok(Delivery::Deliver)
            }
            Some(last) if !seq.is_after(last) => Ok(Delivery::Duplicate),
            Some(last) => Err(RecvError::Gap {
                expected: last.next(),
                got: seq,
            }),
        }
    }
}

/// The pieces of a fragmented message received so far
/// ([`crate::ext::FRAGMENTS`]), bounded by the largest message accepted.
#[derive(Debug, Default)]
pub struct Reassembly {
    buf: BytesMut,
    /// Whether a piece was received since the last complete message.
    started: bool,
}

/// The pieces of a message add up to more than the receiver accepts.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("fragmented message of at least {len} bytes is over the maximum of {max}")]
pub struct TooLarge {
    /// Bytes received for the message so far.
    pub len: usize,
    /// The maximum.
    pub max: usize,
}

impl Reassembly {
    /// Whether pieces of an unfinished message are held.
    #[must_use]
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// Bytes held for the unfinished message.
    #[must_use]
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no byte is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends a piece that more pieces follow. Fails, keeping nothing of
    /// the message, if the pieces add up to more than `max` bytes.
    pub fn push(&mut self, piece: &[u8], max: usize) -> Result<(), TooLarge> {
        let len = self.buf.len() + piece.len();
        if len > max {
            *self = Reassembly::default();
            return Err(TooLarge { len, max });
        }
        if !self.started {
            // One allocation for a typical large message instead of a
            // doubling series of copies: room for sixteen pieces like this
            // one, within the maximum.
            self.buf.reserve(piece.len().saturating_mul(16).min(max));
        }
        self.buf.extend_from_slice(piece);
        self.started = true;
        Ok(())
    }

    /// The last piece arrived: returns the whole message. A message that
    /// was not fragmented is returned as it is, without a copy.
    pub fn finish(&mut self, last: Bytes, max: usize) -> Result<Bytes, TooLarge> {
        if !self.started {
            return Ok(last);
        }
        self.push(&last, max)?;
        self.started = false;
        Ok(self.buf.split().freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_frame_is_accepted_whatever_its_seq() {
        let mut recv = RecvState::new();
        assert_eq!(recv.last_received(), None);
        assert_eq!(recv.on_frame(Seq(42)), Ok(Delivery::Deliver));
        assert_eq!(recv.last_received(), Some(Seq(42)));
    }

    #[test]
    fn in_order_duplicate_gap() {
        let mut recv = RecvState::new();
        assert_eq!(recv.on_frame(Seq(0)), Ok(Delivery::Deliver));
        assert_eq!(recv.on_frame(Seq(1)), Ok(Delivery::Deliver));
        assert_eq!(recv.on_frame(Seq(1)), Ok(Delivery::Duplicate));
        assert_eq!(recv.on_frame(Seq(0)), Ok(Delivery::Duplicate));
        assert_eq!(
            recv.on_frame(Seq(3)),
            Err(RecvError::Gap {
                expected: Seq(2),
                got: Seq(3)
            })
        );
        assert_eq!(recv.last_received(), Some(Seq(1)));
        assert_eq!(recv.on_frame(Seq(2)), Ok(Delivery::Deliver));
    }

    #[test]
    fn wraps() {
        let mut recv = RecvState::new();
        recv.on_frame(Seq(u32::MAX - 1)).unwrap();
        assert_eq!(recv.on_frame(Seq(u32::MAX)), Ok(Delivery::Deliver));
        assert_eq!(recv.on_frame(Seq(0)), Ok(Delivery::Deliver));
        assert_eq!(recv.on_frame(Seq(u32::MAX)), Ok(Delivery::Duplicate));
        assert_eq!(recv.on_frame(Seq(u32::MAX - 5)), Ok(Delivery::Duplicate));
        assert_eq!(
            recv.on_frame(Seq(2)),
            Err(RecvError::Gap {
                expected: Seq(1),
                got: Seq(2)
            })
        );
        assert_eq!(recv.last_received(), Some(Seq(0)));
    }

    #[test]
    fn gap_message() {
        assert_eq!(
            RecvError::Gap {
                expected: Seq(2),
                got: Seq(9)
            }
            .to_string(),
            "gap in frame sequence: expected seq 2, got seq 9"
        );
    }

    #[test]
    fn reassembly_joins_pieces_and_passes_whole_messages_through() {
        let mut r = Reassembly::default();
        let whole = Bytes::from_static(b"whole");
        assert_eq!(r.finish(whole.clone(), 5).unwrap().as_ptr(), whole.as_ptr());
        r.push(b"ab", 6).unwrap();
        r.push(b"", 6).unwrap();
        assert!(r.is_started());
        assert_eq!(
            r.finish(Bytes::from_static(b"cd"), 6).unwrap(),
            &b"abcd"[..]
        );
        assert!(!r.is_started() && r.is_empty());
        r.push(b"abcd", 6).unwrap();
        assert_eq!(
            r.finish(Bytes::from_static(b"efg"), 6),
            Err(TooLarge { len: 7, max: 6 })
        );
        assert!(
            !r.is_started() && r.is_empty(),
            "nothing kept after an error"
        );
    }
}
