//! Rate limits for log lines a peer can trigger.
//!
//! A log site that a remote peer can make fire at will (a warning per lost
//! session, per malformed frame, per forged pong) must not let that peer
//! fill the log, or stall runtime threads on a slow log writer. A
//! [`Throttle`] lets its site emit at most `per_second` lines in each
//! one-second window and counts the others; the next line it lets through
//! says how many were suppressed before it (its `suppressed` field).
//!
//! One `static` per site, so that the limit holds across every session.
//! Applications can use it for their own peer-triggered log lines:
//!
//! ```
//! use tether::throttle::Throttle;
//!
//! static BAD_MESSAGE: Throttle = Throttle::new(1);
//! if let Some(suppressed) = BAD_MESSAGE.allow() {
//!     eprintln!("dropping a bad message ({suppressed} more since the last line)");
//! }
//! ```

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// See the module documentation. Lock-free; races between threads can let
/// a line or two more through in a window, never fewer.
#[derive(Debug)]
pub struct Throttle {
    per_second: u32,
    /// The current window: whole seconds since the process's first use of
    /// any throttle, plus one (0: none yet).
    window: AtomicU64,
    /// Lines let through in the current window.
    emitted: AtomicU32,
    /// Lines suppressed since the last one let through.
    suppressed: AtomicU64,
}

/// The time base of every throttle's windows.
fn seconds() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_secs() + 1
}

impl Throttle {
    /// A throttle that lets `per_second` lines through per second.
    pub const fn new(per_second: u32) -> Throttle {
        Throttle {
            per_second,
            window: AtomicU64::new(0),
            emitted: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether the caller may emit its line now: `Some(n)`, where `n` is
    /// how many lines this site suppressed since the last one it let
    /// through (to be reported with this one), or `None`: stay silent (the
    /// line is counted).
    pub fn allow(&self) -> Option<u64> {
        let now = seconds();
        let window = self.window.load(Ordering::Relaxed);
        if window != now
            && self
                .window
                .compare_exchange(window, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.emitted.store(0, Ordering::Relaxed);
        }
        if self.emitted.load(Ordering::Relaxed) < self.per_second
            && self.emitted.fetch_add(1, Ordering::Relaxed) < self.per_second
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `tracing::event!` at `$level` through the throttle `$throttle`, with a
/// `suppressed` field (lines this site dropped since its last one) ahead of
/// the given fields and message.
macro_rules! throttled {
    ($level:expr, $throttle:expr, $($rest:tt)+) => {
        if let Some(suppressed) = $throttle.allow() {
            tracing::event!($level, suppressed, $($rest)+);
        }
    };
}
pub(crate) use throttled;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_n_lines_through_per_second_and_counts_the_rest() {
        // Run the whole check within one window; retry if a second boundary
        // falls in the middle (at most once in practice).
        for _ in 0..3 {
            let t = Throttle::new(3);
            let start = seconds();
            let got: Vec<Option<u64>> = (0..10).map(|_| t.allow()).collect();
            if seconds() != start {
                continue;
            }
            let through = got.iter().filter(|g| g.is_some()).count();
            assert_eq!(through, 3, "{got:?}");
            // The window moves on: the first line reports what was dropped.
            while seconds() == start {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let suppressed = t.allow().expect("a new window lets a line through");
            assert_eq!(suppressed as usize, 10 - through);
            assert_eq!(t.allow(), Some(0));
            return;
        }
        panic!("could not stay within one second");
    }

    #[test]
    fn zero_lets_nothing_through() {
        let t = Throttle::new(0);
        assert!((0..5).all(|_| t.allow().is_none()));
    }
}
