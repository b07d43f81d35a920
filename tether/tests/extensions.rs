//! Protocol extensions: negotiation, standalone acks, and interoperation
//! with a peer that speaks only the base format.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{config, exchange, within, Msg, Traffic};
use tether::link::mem::{self, MemConnector};
use tether::link::{Connector, Link, LinkRx, LinkTx};
use tether::proto::{ext, ClientHello, ServerHello};
use tether::{Config, Server, StableConduit};

async fn server_answer(c: &MemConnector, extensions: u8) -> ServerHello {
    let (mut tx, mut rx) = c.connect().await.unwrap().split();
    let hello = ClientHello {
        resume_key: None,
        last_received: None,
        extensions,
    };
    let _ = tx.send(Bytes::copy_from_slice(&hello.encode())).await;
    let reply = rx.recv().await.unwrap().unwrap();
    // With `PROOF` on, the server's key share follows the hello.
    let expected = if ext::negotiate(extensions, ext::ALL) & ext::PROOF != 0 {
        tether::proto::proof::SERVER_OFFER_LEN
    } else {
        tether::proto::HELLO_LEN
    };
    assert_eq!(reply.len(), expected, "offered {extensions:#04x}");
    ServerHello::decode(&reply[..tether::proto::HELLO_LEN]).unwrap()
}

#[tokio::test]
async fn server_echoes_only_extensions_both_sides_speak() {
    within(async {
        let (listener, c) = mem::listener(8);
        let _server = Server::<Msg>::new(listener, config(1));
        assert_eq!(server_answer(&c, ext::ACKS).await.extensions, ext::ACKS);
        assert_eq!(server_answer(&c, 0).await.extensions, 0);
        // PROOF (0x80) is on only with ADMISSION (0x40).
        assert_eq!(
            server_answer(&c, ext::PROOF | ext::ACKS).await.extensions,
            ext::ACKS
        );
        assert_eq!(
            server_answer(&c, ext::ADMISSION | ext::ACKS)
                .await
                .extensions,
            ext::ADMISSION | ext::ACKS
        );
        let proof = server_answer(&c, ext::PROOF | ext::ADMISSION | ext::ACKS).await;
        assert_eq!(proof.extensions, ext::PROOF | ext::ADMISSION | ext::ACKS);
        assert_eq!(proof.resume_key.as_bytes()[..4], [0, 0, 0, 0], "node id 0");

        let (listener, c) = mem::listener(8);
        let mut base = config(2);
        base = base.extensions(0);
        let _base_server = Server::<Msg>::new(listener, base);
        assert_eq!(server_answer(&c, ext::ACKS).await.extensions, 0);
    })
    .await;
}

/// Streams `n` messages one way and returns the largest replay-buffer
/// occupancy (frames) the sender showed while doing so.
async fn one_way(client_cfg: Config, server_cfg: Config, n: u64) -> usize {
    let (listener, c) = mem::listener(64);
    let server = Server::<u64>::new(listener, server_cfg);
    let client = StableConduit::<u64>::connect(c.clone(), client_cfg)
        .await
        .unwrap();
    // The client speaks first: a base-format client proves its key only
    // with its first message, and only then does the server hand the
    // session to `accept`.
    let sender = tokio::spawn(async move {
        let mut max_frames = 0;
        for i in 0..n {
            client.send(&i).await.unwrap();
            if i % 64 == 0 {
                max_frames = max_frames.max(client.stats().replay_frames);
            }
        }
        (client, max_frames)
    });
    let mut session = server.accept().await.unwrap();
    for i in 0..n {
        assert_eq!(session.recv().await.unwrap(), Some(i));
    }
    let (client, max_frames) = sender.await.unwrap();
    max_frames.max(client.stats().replay_frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_acks_keep_a_one_way_stream_bounded() {
    within(async {
        let mut cfg = config(3);
        cfg = cfg.max_replay(1 << 20, 256);
        let peak = one_way(cfg.clone(), cfg, 200_000).await;
        assert!(peak <= 256, "replay buffer grew to {peak} frames");
        assert!(peak > 0);
    })
    .await;
}

/// A base-format stream of `n` messages from the client, whose receiver
/// (the server) replies with one message every `reply_every`: the replies'
/// piggybacked acks are the only acks the client gets. Returns the largest
/// replay-buffer occupancy (frames) the client showed.
async fn one_way_with_replies(
    client_cfg: Config,
    server_cfg: Config,
    n: u64,
    reply_every: u64,
) -> usize {
    let (listener, c) = mem::listener(64);
    let server = Server::<u64>::new(listener, server_cfg);
    let client = StableConduit::<u64>::connect(c.clone(), client_cfg)
        .await
        .unwrap();
    let (tx, mut rx) = client.split();
    let sender = tokio::spawn(async move {
        let mut max_frames = 0;
        for i in 0..n {
            tx.send(&i).await.unwrap();
            max_frames = max_frames.max(tx.stats().replay_frames);
        }
        (tx, max_frames)
    });
    let replies = tokio::spawn(async move {
        for r in 0..n / reply_every {
            assert_eq!(rx.recv().await.unwrap(), Some(r));
        }
        rx
    });
    let mut session = server.accept().await.unwrap();
    for i in 0..n {
        assert_eq!(session.recv().await.unwrap(), Some(i));
        if (i + 1) % reply_every == 0 {
            session.send(&(i / reply_every)).await.unwrap();
        }
    }
    let (_tx, max_frames) = sender.await.unwrap();
    drop(replies.await.unwrap());
    max_frames
}

/// The replay bound holds in the base format too: a receive-only peer
/// that never acknowledges holds the sender to its bound, and the acks its
/// replies carry free it, with a base-format peer on either side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_format_peer_on_either_side_still_delivers_within_the_bound() {
    within(async {
        let mut with = config(4);
        with = with.max_replay(1 << 20, 256);
        let mut without = with.clone();
        without = without.extensions(0);
        let n = 5_000;
        let peak = one_way_with_replies(without.clone(), with.clone(), n, 100).await;
        assert!(peak <= 256, "replay buffer grew to {peak} frames");
        let peak = one_way_with_replies(with, without, n, 100).await;
        assert!(peak <= 256, "replay buffer grew to {peak} frames");
    })
    .await;
}

/// A base-format stream to a peer that only receives: `send` waits once
/// the bound is reached (the peer never acknowledges), and a resume, whose
/// hello reports what the peer received, frees the buffer and lets it go
/// on. Everything arrives once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_format_send_waits_at_the_bound_until_a_resume_trims() {
    within(async {
        let mut cfg = config(7);
        cfg = cfg.max_replay(1 << 20, 64).extensions(0);
        let (listener, c) = mem::listener(64);
        let server = Server::<u64>::new(listener, cfg.clone());
        let client = StableConduit::<u64>::connect(c.clone(), cfg).await.unwrap();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let n = 200;
        let sender = {
            let sent = sent.clone();
            tokio::spawn(async move {
                for i in 0..n {
                    client.send(&i).await.unwrap();
                    sent.store(i + 1, std::sync::atomic::Ordering::SeqCst);
                }
                client
            })
        };
        let mut session = server.accept().await.unwrap();
        for i in 0..64 {
            assert_eq!(session.recv().await.unwrap(), Some(i));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            sent.load(std::sync::atomic::Ordering::SeqCst),
            64,
            "send went past the bound of 64 frames with no ack"
        );
        // Each cut's resume trims what the server received.
        let mut got = 64;
        while got < n {
            c.kill_all();
            let more = tokio::time::timeout(Duration::from_secs(5), async {
                let mut k = 0;
                while got + k < n && k < 64 {
                    assert_eq!(session.recv().await.unwrap(), Some(got + k));
                    k += 1;
                }
                k
            })
            .await
            .expect("the resume freed nothing");
            got += more;
        }
        let client = sender.await.unwrap();
        assert!(client.stats().max_replay_bytes > 0);
        assert!(client.stats().replay_frames <= 64);
    })
    .await;
}

/// Two senders with tiny windows that only ever piggyback acks would
/// deadlock; standalone acks keep both moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_windows_both_ways_do_not_deadlock() {
    within(async {
        let mut cfg = config(5);
        cfg = cfg.max_replay(4096, 8);
        let (listener, c) = mem::listener(8);
        let server = Server::<Msg>::new(listener, cfg.clone());
        let client = StableConduit::<Msg>::connect(c.clone(), cfg).await.unwrap();
        let session = server.accept().await.unwrap();
        let t = Traffic {
            seed: 5,
            streams: 3,
            per_stream: 2_000,
            max_len: 100,
        };
        let (tx, _) = exchange(client, session, t, Traffic { seed: 6, ..t })
            .await
            .unwrap();
        assert!(tx.stats().replay_frames <= 8);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_ack_goes_out_after_the_delay_when_few_frames_wait() {
    let mut cfg = config(6);
    cfg = cfg.ack_policy(1_000, Duration::from_millis(50));
    let (listener, c) = mem::listener(8);
    let server = Server::<u64>::new(listener, cfg.clone());
    let client = StableConduit::<u64>::connect(c.clone(), cfg).await.unwrap();
    let mut session = server.accept().await.unwrap();
    for i in 0..3 {
        client.send(&i).await.unwrap();
        assert_eq!(session.recv().await.unwrap(), Some(i));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(client.stats().replay_frames, 3, "acked before the delay");
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(client.stats().replay_frames, 0, "no ack after the delay");
}

/// Acks go out by half the peer's announced window: large messages with a
/// byte window of four of them keep flowing although the frame count and
/// the delay alone would hold acks back for an hour.
#[tokio::test(start_paused = true)]
async fn acks_follow_half_the_peers_window() {
    let mut cfg = config(7);
    cfg = cfg
        .max_replay(64 * 1024, 10_000)
        .ack_policy(10_000, Duration::from_secs(3600));
    let (listener, c) = mem::listener(8);
    let server = Server::<Vec<u8>>::new(listener, cfg.clone());
    let client = StableConduit::<Vec<u8>>::connect(c, cfg).await.unwrap();
    let mut session = server.accept().await.unwrap();
    let started = tokio::time::Instant::now();
    let reader = tokio::spawn(async move {
        for _ in 0..200 {
            assert_eq!(session.recv().await.unwrap().unwrap().len(), 16 * 1024);
        }
    });
    for _ in 0..200 {
        client.send(&vec![7u8; 16 * 1024]).await.unwrap();
    }
    reader.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "acks waited for the delay: {:?}",
        started.elapsed()
    );
    assert!(client.stats().max_replay_bytes <= 64 * 1024 + 16 * 1024 + 64);
}
