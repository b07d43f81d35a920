//! Integration tests of the links: in-memory, TCP and Unix-socket stream
//! links, framing, batching, cancel safety and hostile input.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use tether::link::mem::{self, MemConfig, MemLink};
use tether::link::stream::{StreamConfig, StreamLink, TcpConnector, TcpLink, TcpListener};
use tether::link::{
    Connector, Link, LinkError, LinkRx, LinkTx, Listener, PeerInfo, PendingLink,
    DEFAULT_MAX_PAYLOAD,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

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

/// Encodes payloads with the stream framing.
fn frame_all(payloads: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in payloads {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// The link of an accepted connection, set up.
async fn established<P: PendingLink>(pending: Result<P, LinkError>) -> P::Link {
    pending.unwrap().establish().await.unwrap()
}

fn mem_pair() -> (MemLink, MemLink) {
    mem::pair_with_config(MemConfig {
        capacity: 8,
        max_payload: TEST_MAX,
    })
}

fn stream_config() -> StreamConfig {
    StreamConfig {
        max_payload: TEST_MAX,
        ..StreamConfig::default()
    }
}

async fn tcp_pair(config: StreamConfig) -> (TcpLink, TcpLink) {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut listener = TcpListener::from_tokio(socket, config.clone());
    let connector = TcpConnector::with_config(listener.local_addr().unwrap(), config);
    let (client, server) = tokio::join!(connector.connect(), listener.accept());
    (client.unwrap(), established(server).await)
}

#[cfg(unix)]
mod unix_helpers {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tether::link::stream::{StreamConfig, UnixConnector, UnixLink, UnixListener};
    use tether::link::{Connector, Listener};

    use super::established;

    /// A unique socket path under the temp dir, removed on drop.
    pub(crate) struct SocketPath(pub(crate) PathBuf);

    impl SocketPath {
        pub(crate) fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "tether-links-{}-{}.sock",
                std::process::id(),
                n
            ));
            let _ = std::fs::remove_file(&path);
            SocketPath(path)
        }
    }

    impl Drop for SocketPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    pub(crate) async fn unix_pair(config: StreamConfig) -> (UnixLink, UnixLink, SocketPath) {
        let path = SocketPath::new();
        let inner = tokio::net::UnixListener::bind(&path.0).unwrap();
        let mut listener = UnixListener::from_tokio(inner, config.clone());
        let connector = UnixConnector::with_config(&path.0, config);
        let (client, server) = tokio::join!(connector.connect(), listener.accept());
        (client.unwrap(), established(server).await, path)
    }
}
#[cfg(unix)]
use unix_helpers::{unix_pair, SocketPath};

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
        // Around the stream link's copy threshold, each way of feeding.
        4095,
        4096,
        4097,
        4095,
        4096,
        4097,
        7,
    ];
    let (mut tx, _a_rx) = a.split();
    let (_b_tx, mut rx) = b.split();
    let sending = async {
        for (i, &size) in sizes.iter().enumerate() {
            match i % 3 {
                0 => tx.send(pattern(size, i)).await.unwrap(),
                1 => tx.feed(pattern(size, i)).await.unwrap(),
                _ => tx.feed_copy(&pattern(size, i)).await.unwrap(),
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
            let (mut s_tx, mut s_rx) = server.unwrap().0.split();
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
        let server_1 = listener.accept().await.unwrap().0;
        let client_2 = other.connect().await.unwrap();
        let server_2 = listener.accept().await.unwrap().0;
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
        let (_s_tx, mut s_rx) = server.unwrap().0.split();
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

// ---------------------------------------------------------------------------
// TCP
// ---------------------------------------------------------------------------

#[tokio::test]
async fn tcp_order_and_boundaries() {
    bounded(async {
        let (a, b) = tcp_pair(stream_config()).await;
        check_order_and_boundaries(a, b, TEST_MAX).await;
    })
    .await;
}

#[tokio::test]
async fn tcp_default_config_bind_and_connect() {
    bounded(async {
        let mut listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connector = TcpConnector::new(listener.local_addr().unwrap());
        assert_eq!(connector.addr(), Some(listener.local_addr().unwrap()));
        let (client, server) = tokio::join!(connector.connect(), listener.accept());
        check_too_large_refused(
            client.unwrap(),
            established(server).await,
            DEFAULT_MAX_PAYLOAD,
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn tcp_too_large_refused() {
    bounded(async {
        let (a, b) = tcp_pair(stream_config()).await;
        check_too_large_refused(a, b, TEST_MAX).await;
    })
    .await;
}

#[tokio::test]
async fn tcp_close_then_eof() {
    bounded(async {
        let (a, b) = tcp_pair(stream_config()).await;
        check_close_then_eof(a, b).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_volume() {
    let (a, b) = tcp_pair(stream_config()).await;
    check_volume(a, b).await;
}

/// A raw peer sends a hostile prefix: the link reports `TooLarge`, then is
/// dead.
#[tokio::test]
async fn tcp_rx_error_then_dead() {
    bounded(async {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let connector = TcpConnector::with_config(addr, stream_config());
    let (link, raw) = tokio::join!(connector.connect(), socket.accept());
    let (mut raw, _) = raw.unwrap();
    let (_tx, mut rx) = link.unwrap().split();
    let mut bytes = frame_all(&[pattern(3, 3)]);
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
    raw.write_all(&bytes).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().unwrap(), pattern(3, 3));
    let err = check_rx_dead_after_error(&mut rx).await;
    assert!(
        matches!(err, LinkError::TooLarge { len, max } if len == u32::MAX as usize && max == TEST_MAX)
    );
}).await;
}

#[tokio::test]
async fn tcp_truncated_then_dead() {
    bounded(async {
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connector = TcpConnector::new(socket.local_addr().unwrap());
        let (link, raw) = tokio::join!(connector.connect(), socket.accept());
        let (mut raw, _) = raw.unwrap();
        let (_tx, mut rx) = link.unwrap().split();
        raw.write_all(&[100, 0, 0, 0, 1, 2]).await.unwrap();
        raw.shutdown().await.unwrap();
        let err = check_rx_dead_after_error(&mut rx).await;
        assert!(
            matches!(
                err,
                LinkError::Truncated {
                    expected: 100,
                    got: 2
                }
            ),
            "{err:?}"
        );
    })
    .await;
}

/// Writing to a peer that is gone eventually fails with an I/O error; the
/// half is dead afterwards.
#[tokio::test]
async fn tcp_tx_error_then_dead() {
    bounded(async {
        let (a, b) = tcp_pair(stream_config()).await;
        drop(b);
        let (mut tx, _rx) = a.split();
        let mut first_err = None;
        for _ in 0..200 {
            if let Err(e) = tx.send(pattern(1000, 0)).await {
                first_err = Some(e);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let err = first_err.expect("sending to a closed socket fails");
        assert!(matches!(err, LinkError::Io(_)), "{err:?}");
        assert!(matches!(tx.send(pattern(1, 0)).await, Err(LinkError::Dead)));
        assert!(matches!(tx.close().await, Err(LinkError::Dead)));
    })
    .await;
}

// ---------------------------------------------------------------------------
// Unix sockets
// ---------------------------------------------------------------------------

#[cfg(unix)]
#[tokio::test]
async fn unix_order_and_boundaries() {
    bounded(async {
        let (a, b, _path) = unix_pair(stream_config()).await;
        check_order_and_boundaries(a, b, TEST_MAX).await;
    })
    .await;
}

#[cfg(unix)]
#[tokio::test]
async fn unix_default_config_bind_and_connect() {
    bounded(async {
        use tether::link::stream::{UnixConnector, UnixListener};
        let path = SocketPath::new();
        let mut listener = UnixListener::bind(&path.0).unwrap();
        let connector = UnixConnector::new(&path.0);
        assert_eq!(connector.path(), path.0.as_path());
        let (client, server) = tokio::join!(connector.connect(), listener.accept());
        check_too_large_refused(
            client.unwrap(),
            established(server).await,
            DEFAULT_MAX_PAYLOAD,
        )
        .await;
    })
    .await;
}

#[cfg(unix)]
#[tokio::test]
async fn unix_too_large_refused() {
    bounded(async {
        let (a, b, _path) = unix_pair(stream_config()).await;
        check_too_large_refused(a, b, TEST_MAX).await;
    })
    .await;
}

#[cfg(unix)]
#[tokio::test]
async fn unix_close_then_eof() {
    bounded(async {
        let (a, b, _path) = unix_pair(stream_config()).await;
        check_close_then_eof(a, b).await;
    })
    .await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_volume() {
    let (a, b, _path) = unix_pair(stream_config()).await;
    check_volume(a, b).await;
}

#[cfg(unix)]
#[tokio::test]
async fn unix_rx_error_then_dead() {
    bounded(async {
        use tether::link::stream::UnixConnector;
        let path = SocketPath::new();
        let socket = tokio::net::UnixListener::bind(&path.0).unwrap();
        let connector = UnixConnector::with_config(&path.0, stream_config());
        let (link, raw) = tokio::join!(connector.connect(), socket.accept());
        let (mut raw, _) = raw.unwrap();
        let (_tx, mut rx) = link.unwrap().split();
        let mut bytes = frame_all(&[pattern(0, 0), pattern(7, 7)]);
        bytes.extend_from_slice(&[5, 0]);
        raw.write_all(&bytes).await.unwrap();
        raw.shutdown().await.unwrap();
        assert_eq!(rx.recv().await.unwrap().unwrap(), pattern(0, 0));
        assert_eq!(rx.recv().await.unwrap().unwrap(), pattern(7, 7));
        let err = check_rx_dead_after_error(&mut rx).await;
        assert!(
            matches!(
                err,
                LinkError::Truncated {
                    expected: 4,
                    got: 2
                }
            ),
            "{err:?}"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------
// Stream framing over in-process IO
// ---------------------------------------------------------------------------

#[test]
fn stream_config_defaults() {
    let config = StreamConfig::default();
    assert_eq!(config.max_payload, 8 * 1024 * 1024);
    assert_eq!(config.max_payload, DEFAULT_MAX_PAYLOAD);
    assert_eq!(config.write_buffer, 64 * 1024);
    assert_eq!(MemConfig::default().max_payload, DEFAULT_MAX_PAYLOAD);
}

/// Known bytes on the wire: the first test vector of the protocol reference.
#[tokio::test]
async fn stream_wire_format() {
    bounded(async {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let (mut tx, _rx) = StreamLink::new(ours, StreamConfig::default()).split();
        tx.send(Bytes::from_static(&[0x01, 0x01, 0x00, 0xac, 0x02]))
            .await
            .unwrap();
        tx.send(Bytes::new()).await.unwrap();
        tx.close().await.unwrap();
        let mut wire = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut theirs, &mut wire)
            .await
            .unwrap();
        assert_eq!(
            wire,
            [0x05, 0, 0, 0, 0x01, 0x01, 0x00, 0xac, 0x02, 0, 0, 0, 0]
        );
    })
    .await;
}

/// A flush dropped part-way keeps its progress; the peer only ever sees
/// whole payloads, in order, including those fed after the cancellation.
#[tokio::test]
async fn stream_flush_cancel_keeps_progress() {
    bounded(async {
        let (ours, theirs) = tokio::io::duplex(64);
        let (mut tx, _rx) = StreamLink::new(ours, stream_config()).split();
        let (_peer_tx, mut peer_rx) = StreamLink::new(theirs, stream_config()).split();
        for i in 0..10 {
            tx.feed(pattern(1000, i)).await.unwrap();
        }
        let before = tx.queued_bytes();
        assert_eq!(before, 10 * 1004);
        {
            let mut flush = pin!(tx.flush());
            assert!(poll_once(&mut flush).await.is_pending(), "duplex is full");
        }
        let after = tx.queued_bytes();
        assert!(after < before && after > 0, "{after} of {before} left");
        for i in 10..15 {
            tx.feed(pattern(1000, i)).await.unwrap();
        }
        // Cancel many more flushes at whatever point they reached while the
        // peer drains concurrently.
        let reader = tokio::spawn(async move {
            for i in 0..15 {
                let got = peer_rx.recv().await.unwrap().expect("payload");
                assert!(got == pattern(1000, i), "payload {i}");
            }
            assert!(peer_rx.recv().await.unwrap().is_none());
        });
        let mut cancelled = 0;
        loop {
            {
                let mut flush = pin!(tx.flush());
                if let Poll::Ready(result) = poll_once(&mut flush).await {
                    result.unwrap();
                    break;
                }
            }
            cancelled += 1;
            tokio::task::yield_now().await;
        }
        assert!(cancelled > 1, "{cancelled}");
        tx.close().await.unwrap();
        reader.await.unwrap();
    })
    .await;
}

/// A feed dropped while waiting under backpressure queues nothing.
#[tokio::test]
async fn stream_feed_cancel_under_backpressure() {
    bounded(async {
        let (ours, theirs) = tokio::io::duplex(64);
        let config = StreamConfig {
            max_payload: TEST_MAX,
            write_buffer: 100,
        };
        let (mut tx, _rx) = StreamLink::new(ours, config.clone()).split();
        let (_peer_tx, mut peer_rx) = StreamLink::new(theirs, config).split();
        tx.feed(pattern(1000, 0)).await.unwrap();
        assert_eq!(tx.queued_bytes(), 1004);
        {
            let mut blocked = pin!(tx.feed(pattern(1000, 1)));
            assert!(poll_once(&mut blocked).await.is_pending(), "backpressure");
        }
        let left = tx.queued_bytes();
        assert!(left < 1004, "progress was kept: {left}");
        let sending = async {
            tx.feed(pattern(1000, 2)).await.unwrap();
            tx.close().await.unwrap();
        };
        let receiving = async {
            assert_eq!(peer_rx.recv().await.unwrap().unwrap(), pattern(1000, 0));
            assert_eq!(peer_rx.recv().await.unwrap().unwrap(), pattern(1000, 2));
            assert!(peer_rx.recv().await.unwrap().is_none());
        };
        tokio::join!(sending, receiving);
    })
    .await;
}

/// A writer that records everything and counts write calls.
#[derive(Clone, Default)]
struct Recorder {
    data: Arc<Mutex<Vec<u8>>>,
    writes: Arc<AtomicUsize>,
}

struct CountingWriter {
    rec: Recorder,
    vectored: bool,
    /// Most bytes accepted per call (usize::MAX: everything).
    limit: usize,
    /// Return `Pending` before every other call.
    stall: bool,
    stalled: bool,
}

impl CountingWriter {
    fn new(rec: &Recorder, vectored: bool) -> Self {
        CountingWriter {
            rec: rec.clone(),
            vectored,
            limit: usize::MAX,
            stall: false,
            stalled: false,
        }
    }

    fn stall(&mut self, cx: &mut Context<'_>) -> bool {
        if self.stall {
            self.stalled = !self.stalled;
            if self.stalled {
                cx.waker().wake_by_ref();
                return true;
            }
        }
        false
    }
}

impl AsyncWrite for CountingWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.stall(cx) {
            return Poll::Pending;
        }
        self.rec.writes.fetch_add(1, Ordering::SeqCst);
        let n = buf.len().min(self.limit);
        self.rec.data.lock().unwrap().extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.stall(cx) {
            return Poll::Pending;
        }
        self.rec.writes.fetch_add(1, Ordering::SeqCst);
        let mut budget = self.limit;
        let mut data = self.rec.data.lock().unwrap();
        let mut n = 0;
        for buf in bufs {
            let take = buf.len().min(budget);
            data.extend_from_slice(&buf[..take]);
            budget -= take;
            n += take;
            if budget == 0 {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.vectored
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Decodes a whole byte string with a `StreamRx` until end-of-stream.
async fn decode_all(bytes: Vec<u8>) -> Vec<Bytes> {
    let (_tx, mut rx) = StreamLink::from_halves(
        io::Cursor::new(bytes),
        tokio::io::sink(),
        StreamConfig::default(),
    )
    .split();
    let mut out = Vec::new();
    while let Some(p) = rx.recv().await.unwrap() {
        out.push(p);
    }
    out
}

/// 100 small payloads fed, then one flush: one write call.
#[tokio::test]
async fn stream_batches_small_payloads_into_one_write() {
    bounded(async {
        for vectored in [false, true] {
            let rec = Recorder::default();
            let (mut tx, _rx) = StreamLink::from_halves(
                tokio::io::empty(),
                CountingWriter::new(&rec, vectored),
                StreamConfig::default(),
            )
            .split();
            let payloads: Vec<Bytes> = (0..100).map(|i| pattern(i * 3, i)).collect();
            for p in &payloads {
                tx.feed(p.clone()).await.unwrap();
            }
            assert_eq!(rec.writes.load(Ordering::SeqCst), 0, "feed does not write");
            tx.flush().await.unwrap();
            assert_eq!(rec.writes.load(Ordering::SeqCst), 1, "vectored: {vectored}");
            let wire = rec.data.lock().unwrap().clone();
            assert_eq!(wire, frame_all(&payloads));
            assert_eq!(decode_all(wire).await, payloads);
        }
    })
    .await;
}

/// Large payloads go out by reference in the same vectored write as the
/// small ones around them.
#[tokio::test]
async fn stream_batches_large_payloads_with_vectored_write() {
    bounded(async {
        let payloads: Vec<Bytes> = [10, 10_000, 20, 50_000, 0, 30, 4096, 4097]
            .iter()
            .enumerate()
            .map(|(i, &n)| pattern(n, i))
            .collect();
        let rec = Recorder::default();
        let (mut tx, _rx) = StreamLink::from_halves(
            tokio::io::empty(),
            CountingWriter::new(&rec, true),
            StreamConfig::default(),
        )
        .split();
        for p in &payloads {
            tx.feed(p.clone()).await.unwrap();
        }
        tx.flush().await.unwrap();
        assert_eq!(rec.writes.load(Ordering::SeqCst), 1);
        let wire = rec.data.lock().unwrap().clone();
        assert_eq!(wire, frame_all(&payloads));
    })
    .await;
}

/// Partial writes (down to one byte per call), with and without vectored
/// writes and with `Pending` in between, never reorder or lose bytes.
#[tokio::test]
async fn stream_partial_writes_resume_correctly() {
    bounded(async {
        let payloads: Vec<Bytes> = [0, 5, 5000, 1, 70_000, 0, 4096, 4097, 300]
            .iter()
            .enumerate()
            .map(|(i, &n)| pattern(n, i))
            .collect();
        for vectored in [false, true] {
            for limit in [1, 3, 7, 4099, 65_536] {
                let rec = Recorder::default();
                let mut writer = CountingWriter::new(&rec, vectored);
                writer.limit = limit;
                writer.stall = true;
                let config = StreamConfig {
                    max_payload: TEST_MAX,
                    write_buffer: 6000,
                };
                let (mut tx, _rx) =
                    StreamLink::from_halves(tokio::io::empty(), writer, config).split();
                for (i, p) in payloads.iter().enumerate() {
                    tx.feed(p.clone()).await.unwrap();
                    if i == 4 {
                        tx.flush().await.unwrap();
                    }
                }
                tx.close().await.unwrap();
                let wire = rec.data.lock().unwrap().clone();
                assert_eq!(
                    wire,
                    frame_all(&payloads),
                    "vectored {vectored}, limit {limit}"
                );
            }
        }
    })
    .await;
}

/// Payloads read together are views of one buffer: no copy per payload.
#[tokio::test]
async fn stream_received_payloads_are_zero_copy_views() {
    bounded(async {
        let wire = frame_all(&[pattern(10, 1), pattern(20, 2)]);
        let got = decode_all(wire).await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].as_ptr() as usize, got[0].as_ptr() as usize + 10 + 4);
    })
    .await;
}

// ---------------------------------------------------------------------------
// Hostile stream input
// ---------------------------------------------------------------------------

/// A reader that follows a script of data chunks and `Pending`s, then EOF.
struct Scripted {
    steps: VecDeque<Step>,
}

enum Step {
    Data(Vec<u8>),
    Pending,
}

impl Scripted {
    fn chunks(chunks: impl IntoIterator<Item = Vec<u8>>) -> Self {
        Scripted {
            steps: chunks
                .into_iter()
                .filter(|c| !c.is_empty())
                .map(Step::Data)
                .collect(),
        }
    }

    /// One byte per read, with a `Pending` before each.
    fn byte_by_byte(bytes: &[u8]) -> Self {
        let mut steps = VecDeque::new();
        for &b in bytes {
            steps.push_back(Step::Pending);
            steps.push_back(Step::Data(vec![b]));
        }
        Scripted { steps }
    }
}

impl AsyncRead for Scripted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.steps.front_mut() {
            None => Poll::Ready(Ok(())),
            Some(Step::Pending) => {
                self.steps.pop_front();
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Step::Data(data)) => {
                let n = data.len().min(buf.remaining());
                buf.put_slice(&data[..n]);
                data.drain(..n);
                if data.is_empty() {
                    self.steps.pop_front();
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

/// What the framing says a byte string decodes to.
#[derive(Debug, PartialEq)]
enum End {
    Eof,
    TooLarge { len: usize, max: usize },
    Truncated { expected: usize, got: usize },
}

fn reference_decode(data: &[u8], max: usize) -> (Vec<Vec<u8>>, End) {
    let mut out = Vec::new();
    let mut rest = data;
    loop {
        if rest.is_empty() {
            return (out, End::Eof);
        }
        if rest.len() < 4 {
            return (
                out,
                End::Truncated {
                    expected: 4,
                    got: rest.len(),
                },
            );
        }
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        rest = &rest[4..];
        if len > max {
            return (out, End::TooLarge { len, max });
        }
        if rest.len() < len {
            return (
                out,
                End::Truncated {
                    expected: len,
                    got: rest.len(),
                },
            );
        }
        out.push(rest[..len].to_vec());
        rest = &rest[len..];
    }
}

/// Runs a `StreamRx` over `reader` to its end; returns the payloads and how
/// it ended, and checks that it stays dead (or at end-of-stream).
async fn decode_with<R>(reader: R, max: usize) -> (Vec<Vec<u8>>, End, usize)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let config = StreamConfig {
        max_payload: max,
        ..StreamConfig::default()
    };
    let (_tx, mut rx) = StreamLink::from_halves(reader, tokio::io::sink(), config).split();
    let mut out = Vec::new();
    let end = loop {
        match rx.recv().await {
            Ok(Some(p)) => out.push(p.to_vec()),
            Ok(None) => {
                assert!(rx.recv().await.unwrap().is_none());
                break End::Eof;
            }
            Err(err) => {
                assert!(matches!(rx.recv().await, Err(LinkError::Dead)));
                break match err {
                    LinkError::TooLarge { len, max } => End::TooLarge { len, max },
                    LinkError::Truncated { expected, got } => End::Truncated { expected, got },
                    other => panic!("unexpected error {other:?}"),
                };
            }
        }
    };
    // Read after the end: nothing huge was reserved on the way.
    (out, end, rx.read_buffer_capacity())
}

#[tokio::test]
async fn hostile_huge_prefix_is_rejected_without_allocation() {
    bounded(async {
    let (mut raw, ours) = tokio::io::duplex(1024);
    let (_tx, mut rx) = StreamLink::new(ours, StreamConfig::default()).split();
    raw.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4])
        .await
        .unwrap();
    let err = rx.recv().await.unwrap_err();
    assert!(
        matches!(err, LinkError::TooLarge { len, max } if len == u32::MAX as usize && max == DEFAULT_MAX_PAYLOAD),
        "{err:?}"
    );
    let capacity = rx.read_buffer_capacity();
    assert!(capacity <= 64 * 1024, "read buffer grew to {capacity}");
    assert!(matches!(rx.recv().await, Err(LinkError::Dead)));
    // Even with the maximum at what a u32 can announce, only what arrives
    // is buffered until the payload is complete.
    let (mut raw, ours) = tokio::io::duplex(1024);
    let config = StreamConfig {
        max_payload: usize::MAX,
        ..StreamConfig::default()
    };
    let (_tx, mut rx) = StreamLink::new(ours, config).split();
    raw.write_all(&[0, 0, 0, 0x40, 9]).await.unwrap(); // announces 1 GiB
    drop(raw);
    let err = rx.recv().await.unwrap_err();
    assert!(
        matches!(err, LinkError::Truncated { expected, got: 1 } if expected == 1 << 30),
        "{err:?}"
    );
}).await;
}

#[tokio::test]
async fn hostile_truncated_prefix() {
    bounded(async {
        let (mut raw, ours) = tokio::io::duplex(1024);
        let (_tx, mut rx) = StreamLink::new(ours, StreamConfig::default()).split();
        raw.write_all(&[2, 0]).await.unwrap();
        drop(raw);
        let err = check_rx_dead_after_error(&mut rx).await;
        assert!(
            matches!(
                err,
                LinkError::Truncated {
                    expected: 4,
                    got: 2
                }
            ),
            "{err:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn hostile_truncated_payload() {
    bounded(async {
        let (mut raw, ours) = tokio::io::duplex(1024);
        let (_tx, mut rx) = StreamLink::new(ours, StreamConfig::default()).split();
        let mut bytes = frame_all(&[pattern(6, 6)]);
        bytes.extend_from_slice(&[10, 0, 0, 0, 1, 2, 3]);
        raw.write_all(&bytes).await.unwrap();
        drop(raw);
        assert_eq!(rx.recv().await.unwrap().unwrap(), pattern(6, 6));
        let err = check_rx_dead_after_error(&mut rx).await;
        assert!(
            matches!(
                err,
                LinkError::Truncated {
                    expected: 10,
                    got: 3
                }
            ),
            "{err:?}"
        );
    })
    .await;
}

/// Every split point: one byte per read with `Pending` in between, and every
/// two-chunk split of the whole stream.
#[tokio::test]
async fn stream_decodes_at_every_split_point() {
    bounded(async {
        let payloads: Vec<Bytes> = [0, 1, 2, 3, 4, 5, 0, 17, 300, 0]
            .iter()
            .enumerate()
            .map(|(i, &n)| pattern(n, i))
            .collect();
        let expected: Vec<Vec<u8>> = payloads.iter().map(|p| p.to_vec()).collect();
        let wire = frame_all(&payloads);
        let (got, end, _) = decode_with(Scripted::byte_by_byte(&wire), 1024).await;
        assert_eq!(got, expected);
        assert_eq!(end, End::Eof);
        for cut in 0..=wire.len() {
            let reader = Scripted::chunks([wire[..cut].to_vec(), wire[cut..].to_vec()]);
            let (got, end, _) = decode_with(reader, 1024).await;
            assert_eq!(got, expected, "cut at {cut}");
            assert_eq!(end, End::Eof);
        }
        // Truncation at every point is reported as such, never as data.
        for cut in 0..wire.len() {
            let (got, end, _) = decode_with(Scripted::byte_by_byte(&wire[..cut]), 1024).await;
            assert_eq!(
                (got, end),
                reference_decode(&wire[..cut], 1024),
                "cut at {cut}"
            );
        }
    })
    .await;
}

/// A recv dropped mid-frame keeps the partial frame.
#[tokio::test]
async fn stream_recv_cancel_keeps_partial_frame() {
    bounded(async {
        let (mut raw, ours) = tokio::io::duplex(1024);
        let (_tx, mut rx) = StreamLink::new(ours, StreamConfig::default()).split();
        let wire = frame_all(&[pattern(100, 1)]);
        raw.write_all(&wire[..50]).await.unwrap();
        {
            let mut recv = pin!(rx.recv());
            assert!(poll_once(&mut recv).await.is_pending());
        }
        raw.write_all(&wire[50..]).await.unwrap();
        assert_eq!(rx.recv().await.unwrap().unwrap(), pattern(100, 1));
    })
    .await;
}

fn run<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

/// Splits `data` into chunks of the given sizes (cycled).
fn chunked(data: &[u8], sizes: &[usize]) -> Scripted {
    let mut chunks = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].clamp(1, rest.len());
        chunks.push(rest[..n].to_vec());
        rest = &rest[n..];
        i += 1;
    }
    Scripted::chunks(chunks)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary bytes decode exactly as the framing says: the same payloads,
    /// then the same end (clean, too large, truncated); never a panic and
    /// never a large buffer.
    #[test]
    fn garbage_decodes_consistently(
        data in proptest::collection::vec(any::<u8>(), 0..600),
        sizes in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let max = 64;
        let (got, end, capacity) = run(decode_with(chunked(&data, &sizes), max));
        prop_assert_eq!((got, end), reference_decode(&data, max));
        prop_assert!(capacity <= 64 * 1024);
    }

    /// Valid frames followed by arbitrary garbage: every valid payload comes
    /// out first, then whatever the garbage means.
    #[test]
    fn frames_then_garbage(
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 0..10),
        tail in proptest::collection::vec(any::<u8>(), 0..12),
        sizes in proptest::collection::vec(1usize..200, 1..8),
    ) {
        let max = 100;
        let frames: Vec<Bytes> = payloads.iter().cloned().map(Bytes::from).collect();
        let mut data = frame_all(&frames);
        data.extend_from_slice(&tail);
        let (got, end, _) = run(decode_with(chunked(&data, &sizes), max));
        let (want, want_end) = reference_decode(&data, max);
        prop_assert_eq!(&got[..payloads.len()], &payloads[..]);
        prop_assert_eq!((got, end), (want, want_end));
    }
}

/// A quiet stream link holds a small read buffer; one that streams grows
/// its reads (so that many frames share a system call), bounded.
#[tokio::test]
async fn read_buffer_starts_small_and_grows_with_traffic() {
    bounded(async {
        let (mut raw, ours) = tokio::io::duplex(1 << 20);
        let (_tx, mut rx) = StreamLink::new(ours, StreamConfig::default()).split();
        raw.write_all(&[3, 0, 0, 0, b'a', b'b', b'c'])
            .await
            .unwrap();
        assert_eq!(&rx.recv().await.unwrap().unwrap()[..], b"abc");
        let quiet = rx.read_buffer_capacity();
        assert!(quiet <= 1024, "a quiet link holds {quiet} bytes");

        // 64 KiB of small frames written at once: reads fill what they are
        // offered, so the offer grows.
        let frame = [28u8, 0, 0, 0]
            .iter()
            .copied()
            .chain([7u8; 28])
            .collect::<Vec<_>>();
        let burst: Vec<u8> = frame
            .iter()
            .copied()
            .cycle()
            .take(frame.len() * 2048)
            .collect();
        raw.write_all(&burst).await.unwrap();
        let mut most = 0;
        for _ in 0..2048 {
            assert_eq!(rx.recv().await.unwrap().unwrap().len(), 28);
            most = most.max(rx.read_buffer_capacity());
        }
        assert!(most >= 8 * 1024, "a busy link reads {most} bytes at most");
        assert!(most <= 2 * (32 * 1024 + 32), "read buffer grew to {most}");
    })
    .await;
}

// ---------------------------------------------------------------------------
// Hostile clients: lowered limits, two-phase accept, peers, backlog
// ---------------------------------------------------------------------------

/// After `set_max_payload(100)`, a 100-byte payload passes and a 101-byte
/// one fails the receiving half with `TooLarge`, then `Dead`.
async fn check_lowered_max_refused<L: Link>(a: L, b: L) -> L::Rx {
    let (mut tx, _a_rx) = a.split();
    let (_b_tx, mut rx) = b.split();
    rx.set_max_payload(100);
    tx.send(pattern(100, 1)).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().unwrap(), pattern(100, 1));
    tx.send(pattern(101, 2)).await.unwrap();
    let err = check_rx_dead_after_error(&mut rx).await;
    assert!(
        matches!(err, LinkError::TooLarge { len: 101, max: 100 }),
        "{err:?}"
    );
    rx
}

#[tokio::test]
async fn mem_set_max_payload_refuses_longer_payloads() {
    bounded(async {
        let (a, b) = mem_pair();
        check_lowered_max_refused(a, b).await;
        // Raising it again never goes above the configured maximum.
        let (a, b) = mem_pair();
        let (mut tx, _a_rx) = a.split();
        let (_b_tx, mut rx) = b.split();
        rx.set_max_payload(10);
        rx.set_max_payload(usize::MAX);
        tx.send(pattern(TEST_MAX, 3)).await.unwrap();
        assert_eq!(rx.recv().await.unwrap().unwrap(), pattern(TEST_MAX, 3));
    })
    .await;
}

#[tokio::test]
async fn tcp_set_max_payload_refuses_longer_payloads() {
    bounded(async {
        let (a, b) = tcp_pair(stream_config()).await;
        let rx = check_lowered_max_refused(a, b).await;
        let capacity = rx.read_buffer_capacity();
        assert!(capacity <= 64 * 1024, "read buffer grew to {capacity}");
    })
    .await;
}

/// The limit applies to the prefix alone: a raw peer announcing more than
/// the lowered limit is refused without sending the payload.
#[tokio::test]
async fn tcp_set_max_payload_refuses_the_prefix_alone() {
    bounded(async {
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connector = TcpConnector::with_config(socket.local_addr().unwrap(), stream_config());
        let (link, raw) = tokio::join!(connector.connect(), socket.accept());
        let (mut raw, _) = raw.unwrap();
        let (_tx, mut rx) = link.unwrap().split();
        rx.set_max_payload(25);
        raw.write_all(&26u32.to_le_bytes()).await.unwrap();
        let err = check_rx_dead_after_error(&mut rx).await;
        assert!(
            matches!(err, LinkError::TooLarge { len: 26, max: 25 }),
            "{err:?}"
        );
    })
    .await;
}

/// A listener over TCP whose per-connection setup waits for a one-byte
/// preamble from the peer, as a TLS handshake would wait for the client.
struct PreambleListener(TcpListener);

struct PreamblePending(tether::link::TcpPending);

impl Listener for PreambleListener {
    type Link = TcpLink;
    type Pending = PreamblePending;

    async fn accept(&mut self) -> Result<PreamblePending, LinkError> {
        Ok(PreamblePending(self.0.accept().await?))
    }
}

impl PendingLink for PreamblePending {
    type Link = TcpLink;

    fn addr(&self) -> Option<std::net::SocketAddr> {
        self.0.addr()
    }

    async fn establish(self) -> Result<TcpLink, LinkError> {
        use tokio::io::AsyncReadExt;
        let config = self.0.config().clone();
        let mut stream = self.0.into_stream();
        let mut preamble = [0u8; 1];
        stream.read_exact(&mut preamble).await?;
        if preamble != [0x42] {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad preamble").into());
        }
        Ok(StreamLink::tcp(stream, config))
    }
}

/// One peer that connects and never sends its preamble does not hold up
/// the next: the accept loop only accepts, and each setup runs in a task
/// of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_setup_does_not_delay_the_next_accept() {
    bounded(async {
        let mut listener = PreambleListener(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let addr = listener.0.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (links_tx, mut links) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn({
            let accepted = accepted.clone();
            async move {
                loop {
                    let Ok(pending) = listener.accept().await else {
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let links_tx = links_tx.clone();
                    tokio::spawn(async move {
                        let setup = pending.establish();
                        if let Ok(Ok(link)) =
                            tokio::time::timeout(Duration::from_secs(30), setup).await
                        {
                            let _ = links_tx.send(link);
                        }
                    });
                }
            }
        });

        // The idle peer: connected, accepted, silent.
        let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        while accepted.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        // A second client, afterwards, is set up at once.
        let started = tokio::time::Instant::now();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(&[0x42]).await.unwrap();
        let client = StreamLink::tcp(stream, StreamConfig::default());
        let server_link = tokio::time::timeout(Duration::from_secs(1), links.recv())
            .await
            .expect("the second client waited behind the idle one")
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        let (mut tx, _rx) = client.split();
        let (_s_tx, mut s_rx) = server_link.split();
        tx.send(pattern(5, 5)).await.unwrap();
        assert_eq!(s_rx.recv().await.unwrap().unwrap(), pattern(5, 5));
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn tcp_links_know_their_peer() {
    bounded(async {
        let mut listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen_addr = listener.local_addr().unwrap();
        let connector = TcpConnector::new(listen_addr);
        let (client, pending) = tokio::join!(connector.connect(), listener.accept());
        let client = client.unwrap();
        let pending = pending.unwrap();
        assert_eq!(client.peer(), PeerInfo::from_addr(listen_addr));
        let (client_tx, _client_rx) = client.split();
        assert_eq!(client_tx.peer().addr, Some(listen_addr));

        // The server learns the client's address before and after setup.
        let client_addr = pending.addr().expect("a TCP peer has an address");
        assert_eq!(client_addr.ip(), listen_addr.ip());
        assert_ne!(client_addr.port(), listen_addr.port());
        let server = pending.establish().await.unwrap();
        assert_eq!(server.peer().addr, Some(client_addr));
        let (server_tx, _server_rx) = server.split();
        assert_eq!(server_tx.peer().addr, Some(client_addr));

        // A stream link built from bare halves knows nothing.
        let (a, _b) = tokio::io::duplex(64);
        assert_eq!(
            StreamLink::new(a, StreamConfig::default()).peer(),
            PeerInfo::default()
        );
    })
    .await;
}

#[tokio::test]
async fn mem_and_unix_links_have_no_peer_address() {
    bounded(async {
        let (mut listener, connector) = mem::listener(4);
        let (client, pending) = tokio::join!(connector.connect(), listener.accept());
        let pending = pending.unwrap();
        assert_eq!(pending.addr(), None);
        assert_eq!(
            pending.establish().await.unwrap().peer(),
            PeerInfo::default()
        );
        assert_eq!(client.unwrap().peer().addr, None);
        #[cfg(unix)]
        {
            let (a, b, _path) = unix_pair(stream_config()).await;
            assert_eq!(a.peer().addr, None);
            assert_eq!(b.peer().addr, None);
        }
    })
    .await;
}

/// Whether the system queues at least `n` connections on one listener
/// (Linux: `net.core.somaxconn` caps every backlog).
fn system_backlog_at_least(n: u32) -> bool {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .is_some_and(|max| max >= n)
}

/// With a large enough backlog, a burst of connections nobody accepts yet
/// is queued by the kernel, none refused or left hanging; they are all
/// accepted afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_with_backlog_queues_a_burst() {
    bounded(async {
        const BURST: usize = 2_000;
        let backlog = 4096;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let mut listener = TcpListener::bind_with(addr, backlog, stream_config()).unwrap();
        let addr = listener.local_addr().unwrap();

        // Usable whatever the system allows.
        let connector = TcpConnector::with_config(addr, stream_config());
        let (client, server) = tokio::join!(connector.connect(), listener.accept());
        check_order_and_boundaries(client.unwrap(), established(server).await, TEST_MAX).await;

        if !(cfg!(target_os = "linux") && system_backlog_at_least(BURST as u32)) {
            eprintln!("skipping the burst: the system caps the listen backlog lower");
            return;
        }
        let mut connecting = tokio::task::JoinSet::new();
        for _ in 0..BURST {
            connecting.spawn(async move {
                tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
                    .await
            });
        }
        let mut clients = Vec::with_capacity(BURST);
        while let Some(outcome) = connecting.join_next().await {
            match outcome.unwrap() {
                Ok(Ok(stream)) => clients.push(stream),
                Ok(Err(e)) if e.raw_os_error() == Some(24) => {
                    eprintln!("skipping the burst: out of file descriptors");
                    return;
                }
                Ok(Err(e)) => panic!("a connection in the burst failed: {e}"),
                Err(_) => panic!("a connection in the burst was not queued"),
            }
        }
        assert_eq!(clients.len(), BURST);
        for _ in 0..BURST {
            let pending = tokio::time::timeout(Duration::from_secs(5), listener.accept())
                .await
                .expect("a queued connection")
                .unwrap();
            drop(pending);
        }
    })
    .await;
}
