//! Issue 10, the stable conduit's own limits against a peer that does not
//! play along: forged pongs, a peer that stops reading, a link on which
//! nothing arrives, a base-format peer that never acknowledges, a peer that
//! announces a huge window, and an honest peer with a larger window than
//! the receiver's bound.
//!
//! The hostile peers are raw: they speak the wire by hand, over an
//! in-memory link on the paused clock, or over real TCP.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{config, within};
use tether::link::mem::{self, MemConnector, MemLink};
use tether::link::{Connector, Link, LinkRx, LinkTx, TcpListener};
use tether::proto::frame::{encode_frame, FrameHeader};
use tether::proto::{ext, ClientHello, Control, Seq, ServerHello};
use tether::{ConduitState, Server, SessionLost, StableConduit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout, Instant};

type Tx = <MemLink as Link>::Tx;
type Rx = <MemLink as Link>::Rx;

fn control(c: Control) -> Bytes {
    let mut out = BytesMut::new();
    c.encode(&mut out);
    out.freeze()
}

fn data(seq: u32, item: &impl serde::Serialize) -> Bytes {
    let mut out = BytesMut::new();
    encode_frame(
        &FrameHeader {
            seq: Seq(seq),
            ack: None,
        },
        item,
        &mut out,
    )
    .unwrap();
    out.freeze()
}

/// A raw peer's handshake for a new session over a memory link: its hello
/// with `extensions`, and the server's answer.
async fn raw_hello(c: &MemConnector, extensions: u8) -> (Tx, Rx, ServerHello) {
    let (mut tx, mut rx) = c.connect().await.unwrap().split();
    let hello = ClientHello {
        resume_key: None,
        last_received: None,
        extensions,
    };
    tx.send(Bytes::copy_from_slice(&hello.encode()))
        .await
        .unwrap();
    let answer = timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no server hello")
        .unwrap()
        .unwrap();
    let answer = ServerHello::decode(&answer).unwrap();
    assert!(!answer.rejected);
    assert_eq!(
        answer.extensions, extensions,
        "not what the test negotiates"
    );
    (tx, rx, answer)
}

/// Waits until `session` leaves its link (the server waits for a resume)
/// or ends; returns how long that took from `since`.
async fn link_dropped(
    mut states: tokio::sync::watch::Receiver<ConduitState>,
    since: Instant,
) -> Duration {
    let _ = timeout(
        Duration::from_secs(600),
        states.wait_for(|s| {
            matches!(
                s,
                ConduitState::Reconnecting | ConduitState::Lost | ConduitState::Closed
            )
        }),
    )
    .await
    .expect("the server kept the link");
    since.elapsed()
}

// ---- liveness ----

/// A server over memory links with keepalive `interval` and `timeout`.
fn keepalive_server(
    seed: u64,
    interval: Duration,
    timeout: Duration,
) -> (Server<u64>, MemConnector) {
    let mut cfg = config(seed);
    cfg = cfg.keepalive(interval, timeout);
    let (listener, c) = mem::listener(16);
    (Server::<u64>::new(listener, cfg), c)
}

/// Sends a window frame, which proves the key: the session is handed to
/// accept.
async fn prove_with_window(tx: &mut Tx) {
    tx.send(control(Control::Window {
        frames: 1024,
        bytes: 1 << 20,
        recv_bytes: Some(1 << 20),
    }))
    .await
    .unwrap();
}

/// A peer that negotiates keepalive, never reads, and sends a pong every
/// interval / 3 with nonces it guesses (0, 1, 2, ...: what sequential
/// nonces would have been) is dropped within the keepalive timeout: only
/// a pong with the outstanding ping's unpredictable nonce counts.
#[tokio::test(start_paused = true)]
async fn forged_pongs_do_not_keep_a_peer_that_never_reads_alive() {
    let interval = Duration::from_secs(1);
    let keepalive_timeout = Duration::from_secs(3);
    let (server, c) = keepalive_server(101, interval, keepalive_timeout);
    let (mut tx, _rx, _) = raw_hello(&c, ext::ACKS | ext::KEEPALIVE).await;
    let start = Instant::now();
    prove_with_window(&mut tx).await;
    let forger = tokio::spawn(async move {
        for nonce in 0.. {
            tokio::time::sleep(interval / 3).await;
            if tx.send(control(Control::Pong(nonce))).await.is_err() {
                return nonce;
            }
        }
        unreachable!()
    });
    let session = timeout(Duration::from_secs(5), server.accept())
        .await
        .expect("no session")
        .unwrap();
    let took = link_dropped(session.state_changes(), start).await;
    assert!(
        took <= keepalive_timeout + Duration::from_millis(100),
        "dropped after {took:?}, keepalive timeout {keepalive_timeout:?}"
    );
    assert!(took >= keepalive_timeout - Duration::from_millis(1));
    assert_eq!(session.stats().keepalive_timeouts, 1);
    let pongs = forger.await.unwrap();
    assert!(pongs >= 8, "the forger sent only {pongs} pongs");
    // Every forged pong that arrived while the link lived was counted, and
    // refreshed nothing.
    assert!(
        session.stats().unsolicited_pongs >= 8,
        "{:?}",
        session.stats()
    );
}

/// The pong that answers the outstanding ping keeps the link alive, and a
/// pong sent twice counts once: a peer that reads, answers each ping once,
/// and keeps replaying its last pong is never dropped for it, and a peer
/// that stops answering is dropped a timeout after its last good pong.
#[tokio::test(start_paused = true)]
async fn only_the_answer_to_the_outstanding_ping_counts() {
    let interval = Duration::from_secs(1);
    let keepalive_timeout = Duration::from_secs(3);
    let (server, c) = keepalive_server(102, interval, keepalive_timeout);
    let (mut tx, mut rx, _) = raw_hello(&c, ext::ACKS | ext::KEEPALIVE).await;
    prove_with_window(&mut tx).await;
    let session = timeout(Duration::from_secs(5), server.accept())
        .await
        .expect("no session")
        .unwrap();
    // Answer every ping for 10 s, each answer twice.
    let answered_until = Instant::now() + Duration::from_secs(10);
    let mut answered = 0;
    while Instant::now() < answered_until {
        let Ok(Ok(Some(p))) = timeout(Duration::from_secs(2), rx.recv()).await else {
            panic!("no ping from the server");
        };
        if let Ok(tether::proto::Incoming::Control(Control::Ping(nonce))) =
            tether::proto::decode_payload(&p, ext::ACKS | ext::KEEPALIVE)
        {
            tx.send(control(Control::Pong(nonce))).await.unwrap();
            tx.send(control(Control::Pong(nonce))).await.unwrap();
            answered += 1;
        }
    }
    assert!(answered >= 9, "only {answered} pings in 10 s");
    assert_eq!(session.stats().state, ConduitState::Connected);
    assert_eq!(session.stats().keepalive_timeouts, 0);
    assert!(session.stats().rtt.is_some());
    // Now only replays of the last pong: they refresh nothing.
    let last_good = Instant::now();
    let replayer = tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval / 3).await;
            if tx.send(control(Control::Pong(0))).await.is_err() {
                return;
            }
        }
    });
    let took = link_dropped(session.state_changes(), last_good).await;
    assert!(
        took <= keepalive_timeout + interval,
        "dropped {took:?} after the last good pong"
    );
    replayer.abort();
}

/// A peer that stops reading while the server has a lot outstanding is
/// dropped within the keepalive timeout, over real TCP, although the
/// server's writer is stuck on a full socket (its ping may never be
/// written). The peer's receive buffer is tiny and the server's replay
/// bound large, so the writer blocks long before the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_dropped_within_the_keepalive_timeout() {
    within(async {
        let keepalive_timeout = Duration::from_millis(600);
        let mut cfg = config(103);
        cfg = cfg
            .keepalive(Duration::from_millis(200), keepalive_timeout)
            .max_replay(64 << 20, 1 << 20);
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server::<Vec<u8>>::new(listener, cfg);

        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut peer = socket.connect(addr).await.unwrap();
        let hello = ClientHello {
            resume_key: None,
            last_received: None,
            extensions: ext::ACKS | ext::KEEPALIVE,
        }
        .encode();
        peer.write_all(&(hello.len() as u32).to_le_bytes())
            .await
            .unwrap();
        peer.write_all(&hello).await.unwrap();
        let mut answer = [0u8; 4 + 25];
        peer.read_exact(&mut answer).await.unwrap();
        assert!(!ServerHello::decode(&answer[4..]).unwrap().rejected);
        let window = control(Control::Window {
            frames: 1 << 20,
            bytes: u32::MAX,
            recv_bytes: None,
        });
        peer.write_all(&(window.len() as u32).to_le_bytes())
            .await
            .unwrap();
        peer.write_all(&window).await.unwrap();
        // From here on the peer reads nothing.
        let session = timeout(Duration::from_secs(5), server.accept())
            .await
            .expect("no session")
            .unwrap();
        let start = Instant::now();
        let (stx, _srx) = session.split();
        let sender = {
            let stx = stx.clone();
            tokio::spawn(async move {
                let chunk = vec![7u8; 64 * 1024];
                while stx.send(&chunk).await.is_ok() {
                    // Encoding is CPU work that never waits while the
                    // buffer has room: leave the runtime to the driver.
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut states = stx.state_changes();
        timeout(
            Duration::from_secs(10),
            states.wait_for(|s| *s == ConduitState::Reconnecting),
        )
        .await
        .expect("the server kept a link whose peer reads nothing")
        .unwrap();
        let took = start.elapsed();
        let stats = stx.stats();
        sender.abort();
        assert!(
            took <= keepalive_timeout + Duration::from_millis(400),
            "dropped after {took:?}, keepalive timeout {keepalive_timeout:?}"
        );
        assert_eq!(stats.keepalive_timeouts, 1);
        assert!(
            stats.replay_bytes > 4 << 20,
            "only {} bytes outstanding: the writer was never stuck",
            stats.replay_bytes
        );
        drop(peer);
    })
    .await;
}

/// Without keepalive (the base format), a link on which nothing at all
/// arrives for the idle timeout is dropped, on the server; the client
/// resumes, and the session goes on.
#[tokio::test(start_paused = true)]
async fn an_idle_link_without_keepalive_is_dropped_after_the_idle_timeout() {
    let idle = Duration::from_millis(2_000);
    let mut server_cfg = config(104);
    server_cfg = server_cfg.extensions(0).idle_timeout(idle);
    let mut client_cfg = config(105);
    client_cfg = client_cfg.extensions(0);
    let (listener, c) = mem::listener(16);
    let server = Server::<u64>::new(listener, server_cfg);
    let mut client = StableConduit::<u64>::connect(c, client_cfg).await.unwrap();
    client.send(&1).await.unwrap();
    let mut session = timeout(Duration::from_secs(5), server.accept())
        .await
        .expect("no session")
        .unwrap();
    assert_eq!(session.recv().await.unwrap(), Some(1));
    let last_arrival = Instant::now();
    // The client resumes at once, so the server's link change shows as a
    // reconnect of the session.
    timeout(Duration::from_secs(600), async {
        while session.stats().reconnects == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the server kept an idle link");
    let took = last_arrival.elapsed();
    assert!(
        took >= idle - Duration::from_millis(1) && took <= idle + Duration::from_millis(50),
        "dropped after {took:?}, idle timeout {idle:?}"
    );
    assert_eq!(client.stats().reconnects, 1);
    session.send(&2).await.unwrap();
    client.send(&3).await.unwrap();
    assert_eq!(client.recv().await.unwrap(), Some(2));
    assert_eq!(session.recv().await.unwrap(), Some(3));
}

// ---- the replay bound in the base format ----

/// A base-format raw peer that reads everything but never acknowledges
/// (it sends nothing after its first message): the server's `send` stops
/// at the replay bound, and the buffer never holds more than the bound
/// plus one message. A keepalive interval later the server ends the link,
/// so that a resume's hello can report what the peer received.
#[tokio::test(start_paused = true)]
async fn a_base_format_peer_that_never_acks_holds_send_to_the_bound() {
    const BOUND: usize = 64 * 1024;
    let mut cfg = config(106);
    cfg = cfg
        .max_replay(BOUND, 1 << 16)
        .keepalive(Duration::from_secs(5), Duration::from_secs(15));
    let (listener, c) = mem::listener(16);
    let server = Server::<Vec<u8>>::new(listener, cfg);
    let (mut tx, mut rx, _) = raw_hello(&c, 0).await;
    tx.send(data(0, &vec![0u8; 3])).await.unwrap();
    let session = timeout(Duration::from_secs(5), server.accept())
        .await
        .expect("no session")
        .unwrap();
    let start = Instant::now();
    // The peer drains its link, so the link never pushes back: only the
    // bound stops the sender.
    let read = Arc::new(AtomicU64::new(0));
    let reader = {
        let read = read.clone();
        tokio::spawn(async move {
            while let Ok(Some(p)) = rx.recv().await {
                read.fetch_add(p.len() as u64, Ordering::Relaxed);
            }
        })
    };
    let (stx, _srx) = session.split();
    let accepted = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stx, accepted) = (stx.clone(), accepted.clone());
        tokio::spawn(async move {
            let msg = vec![1u8; 1000];
            while stx.send(&msg).await.is_ok() {
                accepted.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut peak = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(stx.stats().replay_bytes);
    }
    let n = accepted.load(Ordering::Relaxed);
    assert!(
        peak <= BOUND + 1010,
        "the replay buffer held {peak} bytes, bound {BOUND}"
    );
    assert!(
        (60..=66).contains(&n),
        "send accepted {n} messages of 1000 bytes against a bound of {BOUND}"
    );
    assert!(read.load(Ordering::Relaxed) as usize >= BOUND - 2048);
    // The waiting send gets its link ended for a resume.
    let took = link_dropped(stx.state_changes(), start).await;
    assert!(
        took <= Duration::from_secs(5) + Duration::from_millis(100),
        "the link stayed {took:?} with a send waiting for an ack"
    );
    assert!(stx.stats().replay_bytes <= BOUND + 1010);
    sender.abort();
    reader.abort();
}

// ---- the receive bound ----

/// A peer that announces a huge window (and so, before issue 10, a huge
/// receive cap) and sends without waiting for acks while the application
/// reads nothing: the session ends as a protocol violation once it holds
/// more than the server's own receive bound plus one message, whatever
/// the peer announced.
#[tokio::test(start_paused = true)]
async fn an_announced_window_does_not_raise_the_receive_cap() {
    const RECV: usize = 64 * 1024;
    const MAX_MSG: usize = 16 * 1024;
    let mut cfg = config(107);
    cfg = cfg.max_recv_queue_bytes(RECV).max_message_size(MAX_MSG);
    let (listener, c) = mem::listener(64);
    let server = Server::<Vec<u8>>::new(listener, cfg);
    let (mut tx, _rx, _) = raw_hello(&c, ext::ACKS).await;
    tx.send(control(Control::Window {
        frames: u32::MAX,
        bytes: u32::MAX,
        recv_bytes: None,
    }))
    .await
    .unwrap();
    let session = timeout(Duration::from_secs(5), server.accept())
        .await
        .expect("no session")
        .unwrap();
    let mut sent = 0usize;
    let mut peak = 0;
    for seq in 0..1000u32 {
        if tx.send(data(seq, &vec![9u8; 1000])).await.is_err() {
            break;
        }
        sent += 1000;
        tokio::task::yield_now().await;
        peak = peak.max(session.stats().recv_queue_bytes);
        if session.stats().state == ConduitState::Lost {
            break;
        }
    }
    let mut states = session.state_changes();
    timeout(
        Duration::from_secs(5),
        states.wait_for(|s| *s == ConduitState::Lost),
    )
    .await
    .expect("the peer sent far beyond the receive bound and the session went on")
    .unwrap();
    let cap = RECV + MAX_MSG + 64;
    assert!(
        sent < 2 * cap,
        "{sent} bytes sent before the session was lost"
    );
    // The frame that crossed the cap was received, and is delivered with
    // the rest before the loss.
    assert!(peak <= cap + 1100, "held {peak} bytes, cap {cap}");
    let (_stx, mut srx) = session.split();
    // What arrived within the cap is still delivered, then the loss.
    let mut delivered = 0;
    let err = loop {
        match srx.recv().await {
            Ok(Some(_)) => delivered += 1,
            Ok(None) => panic!("ended without the loss"),
            Err(e) => break e,
        }
    };
    assert!(delivered > 0);
    assert!(
        matches!(err.session_lost(), Some(SessionLost::Protocol(_))),
        "{err}"
    );
}

/// An honest peer whose window (replay bound) is much larger than the
/// receiver's bound keeps within the receiver's bound, which the
/// receiver's window frame announces: a slow application never trips the
/// cap, holds at most its bound plus one message, and gets everything.
#[tokio::test(start_paused = true)]
async fn a_large_window_peer_keeps_within_the_receivers_bound() {
    const RECV: usize = 32 * 1024;
    let mut client_cfg = config(108);
    client_cfg = client_cfg.max_replay(16 << 20, 1 << 20);
    let mut server_cfg = config(109);
    server_cfg = server_cfg.max_recv_queue_bytes(RECV);
    let (listener, c) = mem::listener(64);
    let server = Server::<Vec<u8>>::new(listener, server_cfg);
    let client = StableConduit::<Vec<u8>>::connect(c, client_cfg)
        .await
        .unwrap();
    let mut session = timeout(Duration::from_secs(5), server.accept())
        .await
        .expect("no session")
        .unwrap();
    let n = 400u64;
    let sender = tokio::spawn(async move {
        for i in 0..n {
            client.send(&vec![(i % 251) as u8; 1000]).await.unwrap();
        }
        client
    });
    let mut peak = 0;
    for i in 0..n {
        if i % 8 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak = peak.max(session.stats().recv_queue_bytes);
        let m = session.recv().await.unwrap().unwrap();
        assert_eq!(m, vec![(i % 251) as u8; 1000]);
    }
    let client = sender.await.unwrap();
    assert!(
        peak <= RECV + 1100,
        "the slow server held {peak} bytes, bound {RECV}"
    );
    assert!(peak >= RECV / 2, "the window never filled: {peak} bytes");
    assert_eq!(client.stats().state, ConduitState::Connected);
    assert_eq!(session.stats().state, ConduitState::Connected);
}
