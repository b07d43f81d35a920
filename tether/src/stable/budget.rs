//! A memory budget shared by every session of a server.
//!
//! Each session charges what its buffers hold for the peer: the bytes of
//! its replay buffer (sent, not yet acknowledged) and of its receive queue
//! (received, not yet consumed, counted as `Shared::consumed` counts them),
//! and releases them as they are freed. One atomic add per message pushed,
//! per batch received and per ack; a session's consumed items are released
//! in batches.
//!
//! While the budget is over its limit, a server session's `send` waits
//! (backpressure), except that an empty replay buffer still takes one
//! message, so that every session can make progress whatever the others
//! hold: the budget can be exceeded by at most one message per session (up
//! to `max_message_size` each) plus what peers send within their receive
//! bound. The server can also refuse new sessions while it is over.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
    /// Woken when `used` drops from over the limit to at most the limit.
    /// In an `Arc` so that a sender's registration can outlive one poll.
    freed: Arc<Notify>,
}

// `new` and `limit` are for the server, which creates the budget from its
// configuration (`Config::memory_budget`).
#[allow(dead_code)]
impl MemoryBudget {
    pub(crate) fn new(limit: usize) -> MemoryBudget {
        MemoryBudget {
            limit,
            used: AtomicUsize::new(0),
            freed: Arc::new(Notify::new()),
        }
    }

    /// The limit, in bytes.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Counts `n` more bytes held.
    pub(crate) fn charge(&self, n: usize) {
        if n != 0 {
            self.used.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// Counts `n` bytes freed (at most what was charged); wakes the waiters
    /// of [`wait_below`](Self::wait_below) when this brings the budget back
    /// within its limit.
    pub(crate) fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.used.fetch_sub(n, Ordering::AcqRel);
        debug_assert!(before >= n, "released {n} bytes of {before} charged");
        if before > self.limit && before.saturating_sub(n) <= self.limit {
            self.freed.notify_waiters();
        }
    }

    /// Bytes held now, over every session.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Whether more than the limit is held.
    pub(crate) fn is_over(&self) -> bool {
        self.used() > self.limit
    }

    /// A registration for the next time the budget comes back within its
    /// limit, to be enabled before looking at [`is_over`](Self::is_over)
    /// (as [`wait_below`](Self::wait_below) does) and kept across polls.
    pub(crate) fn freed_owned(&self) -> OwnedNotified {
        self.freed.clone().notified_owned()
    }

    /// Resolves once the budget is within its limit (at once if it is).
    pub(crate) async fn wait_below(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so a release in between is seen.
            freed.as_mut().enable();
            if !self.is_over() {
                return;
            }
            freed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn counts_what_is_charged_and_released() {
        let b = MemoryBudget::new(100);
        assert_eq!((b.used(), b.is_over(), b.limit()), (0, false, 100));
        b.charge(60);
        b.charge(40);
        assert_eq!(
            (b.used(), b.is_over()),
            (100, false),
            "the limit itself is within"
        );
        b.charge(1);
        assert!(b.is_over());
        b.release(0);
        b.release(51);
        assert_eq!((b.used(), b.is_over()), (50, false));
        b.release(50);
        assert_eq!(b.used(), 0);
    }

    #[tokio::test]
    async fn wait_below_returns_at_once_within_the_limit() {
        let b = MemoryBudget::new(10);
        b.charge(10);
        tokio::time::timeout(Duration::from_secs(1), b.wait_below())
            .await
            .expect("within the limit: no wait");
    }

    #[tokio::test]
    async fn wait_below_wakes_when_a_release_crosses_the_limit() {
        let b = Arc::new(MemoryBudget::new(10));
        b.charge(30);
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.wait_below().await })
            })
            .collect();
        tokio::task::yield_now().await;
        // Still over: nobody wakes for good.
        b.release(15);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        // Back within: every waiter wakes.
        b.release(5);
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(1), w)
                .await
                .expect("woken")
                .unwrap();
        }
        // Over again, then a release that lands exactly on the limit.
        b.charge(1);
        let w = {
            let b = b.clone();
            tokio::spawn(async move { b.wait_below().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!w.is_finished());
        b.release(1);
        tokio::time::timeout(Duration::from_secs(1), w)
            .await
            .expect("woken")
            .unwrap();
    }

    #[test]
    fn concurrent_charges_and_releases_balance() {
        let b = Arc::new(MemoryBudget::new(1 << 20));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for n in 0..10_000usize {
                        let n = n % 97 + i;
                        b.charge(n);
                        b.release(n);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.used(), 0);
    }
}

/// Sessions wired to a budget as the server will wire them: each server
/// session runs its attachment over a memory link to a client session, as
/// the server's and the client's drivers do after the handshake.
#[cfg(test)]
mod session_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tether_proto::ext;
    use tokio::time::timeout;

    use super::MemoryBudget;
    use crate::link::{mem, Link};
    use crate::stable::attach::{endpoint, run_attachment};
    use crate::stable::shared::{Role, Shared};
    use crate::stable::{ConduitState, Config, StableConduit};

    type Conduit = StableConduit<Vec<u8>>;

    fn start(
        config: &Config,
        role: Role,
        budget: Option<Arc<MemoryBudget>>,
        link: mem::MemLink,
    ) -> Conduit {
        let shared = Shared::new(config, role, ConduitState::Connecting, budget);
        let (mut ep, handles) = endpoint(shared.clone());
        shared.resume(None, None, ext::ALL).unwrap();
        shared.set_state(ConduitState::Connected);
        tokio::spawn(async move {
            let (mut tx, mut rx) = link.split();
            let _ = run_attachment(
                &shared,
                &mut ep,
                &mut tx,
                &mut rx,
                std::future::pending::<()>(),
                || {},
            )
            .await;
        });
        StableConduit::from_handles(handles)
    }

    /// A server session charged to `budget`, and its client peer.
    fn session(budget: &Arc<MemoryBudget>) -> (Conduit, Conduit) {
        let config = Config::default();
        let (a, b) = mem::pair(1024);
        (
            start(&config, Role::Server, Some(budget.clone()), a),
            start(&config, Role::Client, None, b),
        )
    }

    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        timeout(Duration::from_secs(10), async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("never: {what}"));
    }

    /// Two server sessions share a 64 KiB budget; their peers do not read.
    /// The first fills the budget and its `send` waits (its replay bound,
    /// 4 MiB, is far away); the second's empty buffer still takes one
    /// message, then its `send` waits too. Once the first's peer consumes,
    /// both go on, and everything is delivered; when the sessions are
    /// gone, the budget is back to zero.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_sessions_wait_on_a_shared_budget_and_resume_when_a_peer_consumes() {
        const LIMIT: usize = 64 * 1024;
        const MSG: usize = 1000;
        let budget = Arc::new(MemoryBudget::new(LIMIT));
        let (a, mut a_peer) = session(&budget);
        let (b, mut b_peer) = session(&budget);
        let (a_tx, _a_rx) = a.split();
        let (b_tx, _b_rx) = b.split();
        let sent_a = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let a_sender = {
            let (a_tx, sent_a) = (a_tx.clone(), sent_a.clone());
            tokio::spawn(async move {
                for i in 0..200u32 {
                    a_tx.send(&vec![i as u8; MSG]).await.unwrap();
                    sent_a.store(i as usize + 1, std::sync::atomic::Ordering::SeqCst);
                }
            })
        };
        eventually("the first session fills the budget", || budget.is_over()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stuck_at = sent_a.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            (60..=70).contains(&stuck_at),
            "the first session's send went on to {stuck_at} messages over a 64 KiB budget"
        );
        assert!(
            budget.used() <= LIMIT + 2 * MSG,
            "{} bytes used",
            budget.used()
        );
        // The second session: one message into its empty buffer, then wait.
        b_tx.send(&vec![1u8; MSG]).await.unwrap();
        let b_second = {
            let b_tx = b_tx.clone();
            tokio::spawn(async move { b_tx.send(&vec![2u8; MSG]).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !b_second.is_finished(),
            "a send went through an exhausted budget"
        );
        assert_eq!(sent_a.load(std::sync::atomic::Ordering::SeqCst), stuck_at);
        // The first session's peer consumes: acks free the budget.
        for i in 0..200u32 {
            let m = timeout(Duration::from_secs(10), a_peer.recv())
                .await
                .expect("the first session stalled")
                .unwrap()
                .unwrap();
            assert_eq!(m, vec![i as u8; MSG]);
        }
        a_sender.await.unwrap();
        timeout(Duration::from_secs(10), b_second)
            .await
            .expect("the second session's send never resumed")
            .unwrap()
            .unwrap();
        for v in [1u8, 2] {
            assert_eq!(b_peer.recv().await.unwrap().unwrap(), vec![v; MSG]);
        }
        eventually("acks free the replay buffers", || budget.used() == 0).await;
        drop((a_tx, b_tx, a_peer, b_peer));
    }

    /// The receive side counts too: what a server session queues for an
    /// application that does not read is charged (item bytes plus the
    /// per-item cost), released as it is consumed, and whatever a session
    /// still holds when it goes away leaves the budget with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_receive_queue_is_charged_and_released() {
        let budget = Arc::new(MemoryBudget::new(usize::MAX));
        let (mut server, client) = session(&budget);
        for i in 0..100u8 {
            client.send(&vec![i; 100]).await.unwrap();
        }
        // 100 items of 101 bytes (the length prefix of the Vec and 100
        // bytes), each counted with its bookkeeping.
        let queued = 100 * Shared::item_cost(101);
        eventually("the queue is charged", || {
            server.stats().recv_queue_bytes == queued
        })
        .await;
        assert_eq!(budget.used(), queued);
        for i in 0..50u8 {
            assert_eq!(server.recv().await.unwrap().unwrap(), vec![i; 100]);
        }
        // Released in batches: not yet all of the half consumed, at most.
        assert!(budget.used() <= queued && budget.used() >= queued / 2);
        for i in 50..100u8 {
            assert_eq!(server.recv().await.unwrap().unwrap(), vec![i; 100]);
        }
        // An empty queue releases everything it gathered.
        assert_eq!(budget.used(), 0);
        for i in 0..10u8 {
            client.send(&vec![i; 100]).await.unwrap();
        }
        eventually("charged again", || {
            budget.used() == 10 * Shared::item_cost(101)
        })
        .await;
        drop((server, client));
        eventually("a dropped session leaves the budget", || budget.used() == 0).await;
    }
}
