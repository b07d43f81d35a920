//! The queue between a session's link reader and the application's
//! receiver.
//!
//! The reader hands over items in batches (everything one wake-up of the
//! link yielded) and the receiver takes the whole queue at once into a local
//! buffer, so the lock is taken once per batch on each side rather than once
//! per message, and the two `VecDeque`s swap places instead of allocating.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tether_proto::Seq;

/// A received item on its way to the application.
pub(crate) type Delivered = (Seq, Bytes);

#[derive(Default)]
struct State {
    items: VecDeque<Delivered>,
    /// The driver ended: nothing more will be pushed.
    driver_done: bool,
    /// The receiver was dropped: nothing pushed will ever be read.
    receiver_gone: bool,
}

/// See the module documentation.
#[derive(Default)]
pub(crate) struct Inbox {
    state: Mutex<State>,
    /// Wakes the receiver: items arrived or the driver ended. There is one
    /// receiver, so one waker is enough: no lock, no waiter list.
    ready: AtomicWaker,
}

/// What [`Inbox::take`] found.
pub(crate) enum Taken {
    /// Items were moved into the caller's buffer.
    Items,
    /// Nothing yet ([`poll_take`](Inbox::poll_take) never returns it).
    Empty,
    /// Nothing, and nothing more will come.
    Ended,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a queue and two flags; none is left half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `batch` (emptying it) and wakes the receiver. Returns `false`
    /// and leaves `batch` as it is when the receiver is gone.
    pub(crate) fn push(&self, batch: &mut Vec<Delivered>) -> bool {
        if batch.is_empty() {
            return true;
        }
        {
            let mut s = self.lock();
            if s.receiver_gone {
                return false;
            }
            s.items.extend(batch.drain(..));
        }
        self.ready.wake();
        true
    }

    /// Moves every queued item into `into`, which must be empty (its
    /// allocation is handed to the reader side in exchange).
    pub(crate) fn take(&self, into: &mut VecDeque<Delivered>) -> Taken {
        debug_assert!(into.is_empty());
        let mut s = self.lock();
        if !s.items.is_empty() {
            std::mem::swap(&mut s.items, into);
            Taken::Items
        } else if s.driver_done {
            Taken::Ended
        } else {
            Taken::Empty
        }
    }

    /// [`take`](Self::take), or `Pending` with the task registered for the
    /// next push or end when there is nothing yet. The receiver's only
    /// wait: it registers before it looks a second time, so no push is
    /// missed, and costs nothing more than `take` when items are there.
    pub(crate) fn poll_take(
        &self,
        cx: &mut Context<'_>,
        into: &mut VecDeque<Delivered>,
    ) -> Poll<Taken> {
        match self.take(into) {
            Taken::Empty => {}
            found => return Poll::Ready(found),
        }
        self.ready.register(cx.waker());
        match self.take(into) {
            Taken::Empty => Poll::Pending,
            found => Poll::Ready(found),
        }
    }

    /// Nothing more will be pushed (the driver ended, or the peer closed
    /// its side): the receiver gets what is queued, then the end.
    pub(crate) fn close_driver(&self) {
        self.lock().driver_done = true;
        self.ready.wake();
    }

    /// The receiver was dropped: nothing more is queued. Returns what was,
    /// for the caller to count as consumed and free.
    pub(crate) fn close_receiver(&self) -> VecDeque<Delivered> {
        let mut s = self.lock();
        s.receiver_gone = true;
        std::mem::take(&mut s.items)
    }

    pub(crate) fn receiver_gone(&self) -> bool {
        self.lock().receiver_gone
    }
}
