//! The receiver's view of one direction: which seq it delivered last.

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
}
