//! Integration tests of the links: the in-memory link, generic link
//! properties, cancel safety.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tether::link::mem::{self, MemConfig, MemLink};
use tether::link::{Connector, Link, LinkError, LinkRx, LinkTx, Listener, DEFAULT_MAX_PAYLOAD};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Maximum payload used by the transport tests (small enough to be quick).
const TEST_MAX: usize = 1024 * 1024;

/// Deterministic payload content: `len` bytes that depend on `seed`.
fn pattern(len: usize, seed: usize) -> Bytes {
    let mut v = vec![0u8; len];
    let mut x = (seed as u32)
        .wrapping_mul(2_654_435_761)
        .wrapping_add(len as u32);
    for b in v.iter_mut() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        *b = (x >> 24) as u8;
    }
    Bytes::from(v)
}

/// Runs a test body with a deadline, so that a bug fails the test instead
/// of hanging it.
async fn bounded<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), body)
        .await
        .expect("test timed out")
}

/// Polls a future exactly once.
async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    poll_fn(|cx| Poll::Ready(Pin::new(&mut *fut).poll(cx))).await
}

fn mem_pair() -> (MemLink, MemLink) {
    mem::pair_with_config(MemConfig {
        capacity: 8,
        max_payload: TEST_MAX,
    })
}

// ---------------------------------------------------------------------------
// Generic checks, run over every transport
// ---------------------------------------------------------------------------

/// Mixed sizes, boundaries and order, with both `send` and `feed`+`flush`.
async fn check_order_and_boundaries<L: Link>(a: L, b: L, max: usize) {
    let sizes = [
        0,
        1,
        1000,
        100 * 1024,
        max,
        0,
        0,
        1,
        max,
        1000,
        100 * 1024,
        1,
        0,
    ];
    let (mut tx, _a_rx) = a.split();
    let (_b_tx, mut rx) = b.split();
    let sending = async {
        for (i, &size) in sizes.iter().enumerate() {
            if i % 2 == 0 {
                tx.send(pattern(size, i)).await.unwrap();
            } else {
                tx.feed(pattern(size, i)).await.unwrap();
            }
        }
        tx.flush().await.unwrap();
        tx.close().await.unwrap();
    };
    let receiving = async {
        for (i, &size) in sizes.iter().enumerate() {
            let got = rx.recv().await.unwrap().expect("a payload");
            assert_eq!(got.len(), size, "payload {i}");
            assert!(got == pattern(size, i), "payload {i} content");
        }
        assert!(rx.recv().await.unwrap().is_none());
    };
    tokio::join!(sending, receiving);
}

/// A payload of `max + 1` is refused with `TooLarge`, nothing of it is
/// sent, and the half is dead afterwards.
async fn check_too_large_refused<L: Link>(a: L, b: L, max: usize) {
    let (mut tx, _a_rx) = a.split();
    let (_b_tx, mut rx) = b.split();
    tx.send(pattern(10, 1)).await.unwrap();
    let err = tx
        .send(Bytes::from(vec![7u8; max + 1]))
        .await
        .expect_err("over the maximum");
    assert!(
        matches!(err, LinkError::TooLarge { len, max: m } if len == max + 1 && m == max),
        "{err:?}"
    );
    assert!(err.is_dead());
    assert!(matches!(tx.feed(pattern(1, 2)).await, Err(LinkError::Dead)));
    assert!(matches!(tx.flush().await, Err(LinkError::Dead)));
    assert!(matches!(tx.close().await, Err(LinkError::Dead)));
    assert_eq!(rx.recv().await.unwrap().unwrap(), pattern(10, 1));
    drop(tx);
    // Whatever the transport reports for the vanished sender, it is never
    // the refused payload (or any other data).
    let next = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the peer learns that the sender is gone");
    assert!(!matches!(next, Ok(Some(_))), "{next:?}");
}

/// After close, the peer gets every earlier payload, then end-of-stream
/// (repeatedly); the closed half refuses feed/flush with `Closed`, then is
/// dead.
async fn check_close_then_eof<L: Link>(a: L, b: L) {
    let (mut tx, _a_rx) = a.split();
    let (_b_tx, mut rx) = b.split();
    let sending = async {
        for i in 0..50 {
            tx.feed(pattern(i * 13, i)).await.unwrap();
        }
        // No explicit flush: close flushes.
        tx.close().await.unwrap();
        tx.close().await.unwrap();
        assert!(matches!(
            tx.feed(pattern(1, 0)).await,
            Err(LinkError::Closed)
        ));
        assert!(matches!(tx.feed(pattern(1, 0)).await, Err(LinkError::Dead)));
        assert!(matches!(tx.flush().await, Err(LinkError::Dead)));
    };
    let receiving = async {
        for i in 0..50 {
            assert_eq!(rx.recv().await.unwrap().unwrap(), pattern(i * 13, i));
        }
        assert!(rx.recv().await.unwrap().is_none());
        assert!(rx.recv().await.unwrap().is_none());
    };
    tokio::join!(sending, receiving);
}

/// After the first receive error, `recv` returns `Dead`, never data.
async fn check_rx_dead_after_error<R: LinkRx>(rx: &mut R) -> LinkError {
    let first = rx.recv().await.expect_err("the link failed");
    assert!(!matches!(first, LinkError::Dead), "{first:?}");
    for _ in 0..3 {
        assert!(matches!(rx.recv().await, Err(LinkError::Dead)));
    }
    first
}

const VOLUME: usize = 20_000;

/// 20k messages from one task to another, feed with occasional flushes, in
/// both directions at once.
async fn check_volume<L: Link>(a: L, b: L) {
    fn size(i: usize) -> usize {
        match i % 97 {
            0 => 9000, // above the copy threshold: sent by reference
            k => (k * 7) % 300,
        }
    }
    async fn pump<T: LinkTx>(mut tx: T, seed: usize) {
        for i in 0..VOLUME {
            tx.feed(pattern(size(i), i + seed)).await.unwrap();
            if i % 7 == 0 {
                tx.flush().await.unwrap();
            }
        }
        tx.close().await.unwrap();
    }
    async fn drain<R: LinkRx>(mut rx: R, seed: usize) {
        for i in 0..VOLUME {
            let got = rx.recv().await.unwrap().expect("payload");
            assert!(got == pattern(size(i), i + seed), "message {i}");
        }
        assert!(rx.recv().await.unwrap().is_none());
    }
    let (a_tx, a_rx) = a.split();
    let (b_tx, b_rx) = b.split();
    let tasks = [
        tokio::spawn(pump(a_tx, 0)),
        tokio::spawn(pump(b_tx, 1_000_000)),
        tokio::spawn(drain(b_rx, 0)),
        tokio::spawn(drain(a_rx, 1_000_000)),
    ];
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("volume test finishes")
            .unwrap();
    }
}

// ---------------------------------------------------------------------------
// In-memory link
// ---------------------------------------------------------------------------

#[tokio::test]
async fn mem_order_and_boundaries() {
    bounded(async {
        let (a, b) = mem_pair();
        check_order_and_boundaries(a, b, TEST_MAX).await;
    })
    .await;
}

#[tokio::test]
async fn mem_default_max_payload_is_enforced() {
    bounded(async {
        let (a, b) = mem::pair(4);
        check_too_large_refused(a, b, DEFAULT_MAX_PAYLOAD).await;
    })
    .await;
}

#[tokio::test]
async fn mem_too_large_refused() {
    bounded(async {
        let (a, b) = mem_pair();
        check_too_large_refused(a, b, TEST_MAX).await;
    })
    .await;
}

#[tokio::test]
async fn mem_close_then_eof() {
    bounded(async {
        let (a, b) = mem_pair();
        check_close_then_eof(a, b).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_volume() {
    let (a, b) = mem::pair(64);
    check_volume(a, b).await;
}

#[tokio::test]
async fn mem_drop_without_close_is_reset() {
    bounded(async {
        let (a, b) = mem_pair();
        let (mut a_tx, a_rx) = a.split();
        let (_b_tx, mut b_rx) = b.split();
        a_tx.send(pattern(5, 5)).await.unwrap();
        drop(a_tx);
        drop(a_rx);
        assert_eq!(b_rx.recv().await.unwrap().unwrap(), pattern(5, 5));
        assert!(matches!(
            check_rx_dead_after_error(&mut b_rx).await,
            LinkError::Reset
        ));
    })
    .await;
}

#[tokio::test]
async fn mem_dropped_receiver_fails_feed_with_reset() {
    bounded(async {
        let (a, b) = mem_pair();
        let (mut a_tx, _a_rx) = a.split();
        drop(b);
        assert!(matches!(
            a_tx.feed(pattern(1, 1)).await,
            Err(LinkError::Reset)
        ));
        assert!(matches!(
            a_tx.feed(pattern(1, 1)).await,
            Err(LinkError::Dead)
        ));
    })
    .await;
}

#[tokio::test]
async fn mem_kill_wakes_pending_recv_and_feed() {
    bounded(async {
        let (a, b) = mem::pair(1);
        let killer = a.killer();
        let (mut a_tx, mut a_rx) = a.split();
        let (mut b_tx, b_rx) = b.split();
        // Queued data is lost on an abrupt failure.
        b_tx.send(pattern(3, 3)).await.unwrap();
        let b_rx_task = tokio::spawn(async move {
            let mut b_rx = b_rx;
            let first = b_rx.recv().await;
            let second = b_rx.recv().await;
            (first, second)
        });
        // b_tx's channel is full (capacity 1): this feed waits.
        let b_feed = tokio::spawn(async move {
            let first = b_tx.feed(pattern(4, 4)).await;
            let second = b_tx.feed(pattern(4, 4)).await;
            (first, second)
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!b_rx_task.is_finished(), "recv waits for data");
        assert!(!b_feed.is_finished(), "feed waits for capacity");
        killer.kill();
        assert!(killer.is_killed());
        let (first, second) = b_rx_task.await.unwrap();
        assert!(matches!(first, Err(LinkError::Reset)), "{first:?}");
        assert!(matches!(second, Err(LinkError::Dead)), "{second:?}");
        let (first, second) = b_feed.await.unwrap();
        assert!(matches!(first, Err(LinkError::Reset)), "{first:?}");
        assert!(matches!(second, Err(LinkError::Dead)), "{second:?}");
        // The other end fails too, even though a payload was waiting for it.
        assert!(matches!(
            check_rx_dead_after_error(&mut a_rx).await,
            LinkError::Reset
        ));
        assert!(matches!(a_tx.flush().await, Err(LinkError::Reset)));
        assert!(matches!(
            a_tx.send(pattern(1, 1)).await,
            Err(LinkError::Dead)
        ));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn mem_feed_cancel_does_not_leak_capacity() {
    bounded(async {
        let (a, b) = mem::pair(2);
        let (mut tx, _a_rx) = a.split();
        let (_b_tx, mut rx) = b.split();
        tx.feed(pattern(1, 0)).await.unwrap();
        tx.feed(pattern(1, 1)).await.unwrap();
        {
            let mut blocked = pin!(tx.feed(pattern(1, 2)));
            assert!(
                poll_once(&mut blocked).await.is_pending(),
                "channel is full"
            );
            // Dropped before completion.
        }
        // Also cancelled through a timeout (on the paused clock).
        assert!(
            tokio::time::timeout(Duration::from_millis(20), tx.feed(pattern(1, 3)))
                .await
                .is_err()
        );
        assert_eq!(rx.recv().await.unwrap().unwrap(), pattern(1, 0));
        assert_eq!(rx.recv().await.unwrap().unwrap(), pattern(1, 1));
        // Exactly the full capacity is available again: two feeds complete at
        // once, a third waits.
        for seed in [4, 5] {
            let mut feed = pin!(tx.feed(pattern(1, seed)));
            assert!(matches!(poll_once(&mut feed).await, Poll::Ready(Ok(()))));
        }
        {
            let mut third = pin!(tx.feed(pattern(1, 6)));
            assert!(poll_once(&mut third).await.is_pending());
        }
        tx.close().await.unwrap();
        // The cancelled payloads (2, 3, 6) never arrive.
        assert_eq!(rx.recv().await.unwrap().unwrap(), pattern(1, 4));
        assert_eq!(rx.recv().await.unwrap().unwrap(), pattern(1, 5));
        assert!(rx.recv().await.unwrap().is_none());
    })
    .await;
}

#[tokio::test]
async fn mem_recv_cancel_loses_nothing() {
    bounded(async {
        let (a, b) = mem_pair();
        let (mut tx, _a_rx) = a.split();
        let (_b_tx, mut rx) = b.split();
        {
            let mut waiting = pin!(rx.recv());
            assert!(poll_once(&mut waiting).await.is_pending());
        }
        tx.send(pattern(9, 9)).await.unwrap();
        assert_eq!(rx.recv().await.unwrap().unwrap(), pattern(9, 9));
    })
    .await;
}

#[tokio::test]
async fn mem_connector_delivers_linked_pairs() {
    bounded(async {
        let (mut listener, connector) = mem::listener(4);
        for round in 0..3 {
            let (client, server) = tokio::join!(connector.connect(), listener.accept());
            let (mut c_tx, mut c_rx) = client.unwrap().split();
            let (mut s_tx, mut s_rx) = server.unwrap().split();
            c_tx.send(pattern(10, round)).await.unwrap();
            assert_eq!(s_rx.recv().await.unwrap().unwrap(), pattern(10, round));
            s_tx.send(pattern(20, round)).await.unwrap();
            assert_eq!(c_rx.recv().await.unwrap().unwrap(), pattern(20, round));
        }
    })
    .await;
}

#[tokio::test]
async fn mem_connector_kill_all() {
    bounded(async {
        let (mut listener, connector) = mem::listener(4);
        let other = connector.clone();
        let client_1 = connector.connect().await.unwrap();
        let server_1 = listener.accept().await.unwrap();
        let client_2 = other.connect().await.unwrap();
        let server_2 = listener.accept().await.unwrap();
        connector.kill_all();
        for link in [client_1, server_1, client_2, server_2] {
            let (mut tx, mut rx) = link.split();
            assert!(matches!(rx.recv().await, Err(LinkError::Reset)));
            assert!(matches!(rx.recv().await, Err(LinkError::Dead)));
            assert!(matches!(
                tx.send(pattern(1, 1)).await,
                Err(LinkError::Reset)
            ));
        }
        // Links created afterwards are not affected.
        let (client, server) = tokio::join!(connector.connect(), listener.accept());
        let (mut tx, _rx) = client.unwrap().split();
        let (_s_tx, mut s_rx) = server.unwrap().split();
        tx.send(pattern(2, 2)).await.unwrap();
        assert_eq!(s_rx.recv().await.unwrap().unwrap(), pattern(2, 2));
    })
    .await;
}

#[tokio::test]
async fn mem_connector_refuse_and_listener_drop() {
    bounded(async {
        let (mut listener, connector) = mem::listener(4);
        connector.set_refuse(true);
        match connector.connect().await {
            Err(LinkError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        connector.set_refuse(false);
        let (client, server) = tokio::join!(connector.connect(), listener.accept());
        assert!(client.is_ok() && server.is_ok());
        drop(listener);
        match connector.connect().await {
            Err(LinkError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
    })
    .await;
}

#[tokio::test]
async fn mem_listener_fails_when_connectors_are_gone() {
    bounded(async {
        let (mut listener, connector) = mem::listener(4);
        drop(connector);
        assert!(matches!(listener.accept().await, Err(LinkError::Io(_))));
    })
    .await;
}
