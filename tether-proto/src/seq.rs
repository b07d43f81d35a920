//! Wrap-aware frame sequence numbers.

use core::fmt;

/// A frame sequence number.
///
/// Each direction of a stable conduit numbers its frames from 0, adding one
/// per frame and wrapping at 2^32. Because numbers wrap, there is no total
/// order: two sequence numbers are compared with serial-number arithmetic
/// ([`Seq::is_after`], [`Seq::is_before`]), which is meaningful only while
/// the numbers compared are less than 2^31 apart. For that reason `Seq` has
/// no `Ord`/`PartialOrd` implementation.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug, Default)]
pub struct Seq(pub u32);

impl Seq {
    /// The sequence number of the first frame sent in each direction.
    pub const ZERO: Seq = Seq(0);

    /// The sequence number that follows this one (wrapping from `u32::MAX` to 0).
    #[must_use]
    pub fn next(self) -> Seq {
        Seq(self.0.wrapping_add(1))
    }

    /// This sequence number advanced by `n` (wrapping).
    #[must_use]
    pub fn wrapping_add(self, n: u32) -> Seq {
        Seq(self.0.wrapping_add(n))
    }

    /// How many steps forward `earlier` must advance to reach `self`
    /// (`self - earlier`, wrapping).
    #[must_use]
    pub fn distance_from(self, earlier: Seq) -> u32 {
        self.0.wrapping_sub(earlier.0)
    }

    /// Whether `self` comes strictly after `other` in serial-number
    /// arithmetic: `self - other`, taken as an `i32`, is positive.
    ///
    /// Two numbers exactly 2^31 apart are neither before nor after each other.
    #[must_use]
    pub fn is_after(self, other: Seq) -> bool {
        (self.0.wrapping_sub(other.0) as i32) > 0
    }

    /// Whether `self` comes strictly before `other`; the mirror of
    /// [`Seq::is_after`] (`a.is_before(b) == b.is_after(a)`).
    #[must_use]
    pub fn is_before(self, other: Seq) -> bool {
        other.is_after(self)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<u32> for Seq {
    fn from(value: u32) -> Seq {
        Seq(value)
    }
}

impl From<Seq> for u32 {
    fn from(value: Seq) -> u32 {
        value.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_wraps() {
        assert_eq!(Seq(0).next(), Seq(1));
        assert_eq!(Seq(u32::MAX).next(), Seq::ZERO);
        assert_eq!(Seq(u32::MAX - 1).wrapping_add(3), Seq(1));
    }

    #[test]
    fn distance_wraps() {
        assert_eq!(Seq(5).distance_from(Seq(2)), 3);
        assert_eq!(Seq(1).distance_from(Seq(u32::MAX)), 2);
        assert_eq!(Seq(2).distance_from(Seq(2)), 0);
    }

    #[test]
    fn order_around_wrap() {
        assert!(Seq(0).is_after(Seq(u32::MAX)));
        assert!(Seq(u32::MAX).is_before(Seq(0)));
        assert!(Seq(10).is_after(Seq(u32::MAX - 10)));
        assert!(!Seq(7).is_after(Seq(7)));
        assert!(!Seq(7).is_before(Seq(7)));
        // Exactly half the space apart: neither.
        assert!(!Seq(1 << 31).is_after(Seq(0)));
        assert!(!Seq(1 << 31).is_before(Seq(0)));
        assert!(!Seq(0).is_after(Seq(1 << 31)));
        assert!(!Seq(0).is_before(Seq(1 << 31)));
        // Just under half: ordered.
        assert!(Seq((1 << 31) - 1).is_after(Seq(0)));
        assert!(Seq((1 << 31) + 1).is_before(Seq(0)));
    }

    #[test]
    fn display_is_the_number() {
        assert_eq!(Seq(4_294_967_295).to_string(), "4294967295");
        assert_eq!(Seq::ZERO.to_string(), "0");
        assert_eq!(Seq::default(), Seq::ZERO);
    }
}
