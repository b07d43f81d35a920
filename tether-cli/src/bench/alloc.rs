//! The interface between the benchmark and the counting global allocator,
//! which lives in the `tether` binary (`main.rs`) because only a binary can
//! install one.
//!
//! Counting is off until [`AllocCounter::set_enabled`] turns it on; while it
//! is off every allocation costs one relaxed atomic load more than with the
//! system allocator. Counters are kept per *slot*, and each thread belongs to
//! one slot (0 unless tagged), so that the allocations of a sending runtime
//! and a receiving runtime, each on its own thread, are told apart.

use serde::Serialize;

/// Number of counter slots.
pub const SLOTS: usize = 3;
/// The slot of every thread that was not tagged.
pub const SLOT_OTHER: usize = 0;
/// The slot of the sending side's runtime threads.
pub const SLOT_SENDER: usize = 1;
/// The slot of the receiving side's runtime threads.
pub const SLOT_RECEIVER: usize = 2;

/// What a counting allocator offers the benchmark.
pub trait AllocCounter: Sync + 'static {
    /// Turns counting on or off (off by default).
    fn set_enabled(&self, on: bool);
    /// Makes the current thread count into `slot` (`< SLOTS`).
    fn tag_thread(&self, slot: usize);
    /// The counters of `slot` since the process started (while enabled).
    fn counts(&self, slot: usize) -> AllocCounts;
}

/// Allocator calls and bytes counted in one slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AllocCounts {
    /// `alloc` and `alloc_zeroed` calls.
    pub allocs: u64,
    /// `realloc` calls.
    pub reallocs: u64,
    /// `dealloc` calls.
    pub frees: u64,
    /// Bytes requested by `alloc`, `alloc_zeroed` and `realloc` (new size).
    pub bytes_allocated: u64,
    /// Bytes released by `dealloc` and `realloc` (old size).
    pub bytes_freed: u64,
}

impl AllocCounts {
    /// What was counted between `earlier` and `self`.
    pub fn since(self, earlier: AllocCounts) -> AllocCounts {
        AllocCounts {
            allocs: self.allocs.wrapping_sub(earlier.allocs),
            reallocs: self.reallocs.wrapping_sub(earlier.reallocs),
            frees: self.frees.wrapping_sub(earlier.frees),
            bytes_allocated: self.bytes_allocated.wrapping_sub(earlier.bytes_allocated),
            bytes_freed: self.bytes_freed.wrapping_sub(earlier.bytes_freed),
        }
    }

    /// Calls that obtained memory: `alloc` and `realloc` together.
    pub fn calls(&self) -> u64 {
        self.allocs + self.reallocs
    }

    /// Change of live heap bytes over the interval this covers.
    pub fn live_delta(&self) -> i64 {
        self.bytes_allocated as i64 - self.bytes_freed as i64
    }

    /// The sum of several slots' counts.
    pub fn sum(all: impl IntoIterator<Item = AllocCounts>) -> AllocCounts {
        all.into_iter()
            .fold(AllocCounts::default(), |a, b| AllocCounts {
                allocs: a.allocs + b.allocs,
                reallocs: a.reallocs + b.reallocs,
                frees: a.frees + b.frees,
                bytes_allocated: a.bytes_allocated + b.bytes_allocated,
                bytes_freed: a.bytes_freed + b.bytes_freed,
            })
    }
}
