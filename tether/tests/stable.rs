//! End-to-end tests of stable conduits: exactly-once, in-order delivery
//! across link failures (on every transport of `common::transport`),
//! session loss, isolation between sessions.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::transport::{Cutter, Transport};
use common::{config, exchange, Msg, Traffic};
use rand::{Rng, SeedableRng};
use tether::fault::FaultConfig;
use tether::link::mem::{self, MemConnector, MemLink};
use tether::link::{Connector, Link, LinkError, LinkRx, LinkTx};
use tether::proto::frame::{encode_frame, FrameHeader};
use tether::proto::{ClientHello, ResumeKey, Seq, ServerHello};
use tether::{Error, Server, SessionLost, StableConduit};

/// Calls `cut_all` (which kills every link) at random moments until `stop`
/// is set.
fn spawn_chaos(
    cut_all: impl Fn() + Send + 'static,
    seed: u64,
    max_gap_us: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut kills = 0;
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_micros(rng.random_range(0..=max_gap_us))).await;
            cut_all();
            kills += 1;
        }
        kills
    })
}

/// A session over `transport` whose links the test cuts (only) with
/// [`Cutter::cut_all`], and the fixture that holds its listener's address.
async fn session(
    transport: Transport,
    seed: u64,
) -> (
    Server<Msg>,
    Cutter,
    StableConduit<Msg>,
    StableConduit<Msg>,
    common::transport::Fixture,
) {
    let mut fx = transport.fixture().await;
    let server = Server::<Msg>::new(fx.listener(), config(seed));
    let connector = fx
        .cutting(FaultConfig {
            seed,
            mean_bytes_between_cuts: 0,
            handshake_cut_probability: 0.0,
            max_connection_age: None,
        })
        .await;
    let client = StableConduit::<Msg>::connect(connector.clone(), config(seed))
        .await
        .unwrap();
    let server_side = server.accept().await.unwrap();
    (server, connector, client, server_side, fx)
}

/// Every link cut at random moments (every 0-3 ms), traffic both ways.
async fn links_cut_at_random_points_many_seeds(transport: Transport) {
    common::within(async move {
        let mut total_reconnects = 0;
        for seed in 0..6 {
            let (_server, connector, client, server_side, _fx) = session(transport, seed).await;
            let stop = Arc::new(AtomicBool::new(false));
            let chaos = spawn_chaos(
                {
                    let c = connector.clone();
                    move || c.cut_all()
                },
                seed,
                3_000,
                stop.clone(),
            );
            let t = Traffic {
                seed,
                streams: 4,
                per_stream: 400,
                max_len: 2_000,
            };
            let (client_tx, _) = exchange(
                client,
                server_side,
                t,
                Traffic {
                    seed: seed + 1000,
                    ..t
                },
            )
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            stop.store(true, Ordering::Relaxed);
            let kills = chaos.await.unwrap();
            let stats = client_tx.stats();
            assert!(kills > 0, "seed {seed}: the chaos task never cut");
            total_reconnects += stats.reconnects;
        }
        assert!(
            total_reconnects >= 6,
            "cuts rarely landed: {total_reconnects} reconnects in 6 runs"
        );
    })
    .await;
}

transport_tests!(links_cut_at_random_points_many_seeds);

/// The original implementation loses a send that races a link replacement.
/// Here sends go on while the link is down and while it is being replaced;
/// every one of them succeeds and arrives once.
async fn sends_racing_a_reconnect_are_delivered(transport: Transport) {
    common::within(async move {
        let (_server, connector, client, server_side, _fx) = session(transport, 7).await;
        let (tx, _client_rx) = client.split();
        let (_stx, mut srx) = server_side.split();
        let t = Traffic {
            seed: 7,
            streams: 4,
            per_stream: 2_000,
            max_len: 64,
        };
        let checker = tokio::spawn(async move { common::check_receiver(&mut srx, t).await });
        let senders = common::spawn_senders(&tx, t);
        for round in 0..20 {
            // Link down and unreachable for a moment, then back.
            connector.set_refuse(true);
            connector.cut_all();
            tokio::time::sleep(Duration::from_millis(2 + round % 3)).await;
            connector.set_refuse(false);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        for s in senders {
            s.await
                .unwrap()
                .expect("a send failed although only links failed");
        }
        checker.await.unwrap().unwrap();
        assert!(tx.stats().reconnects > 0);
    })
    .await;
}

transport_tests!(sends_racing_a_reconnect_are_delivered);

/// A send blocked on a full replay buffer stays valid across a reconnect: it
/// completes when acks arrive on the new link, and nothing is lost.
async fn send_blocked_on_full_buffer_survives_reconnect(transport: Transport) {
    common::within(async move {
        let mut fx = transport.fixture().await;
        let server = Server::<Msg>::new(fx.listener(), config(3));
        let connector = fx
            .cutting(FaultConfig {
                seed: 3,
                mean_bytes_between_cuts: 0,
                handshake_cut_probability: 0.0,
                max_connection_age: None,
            })
            .await;
        let mut cfg = config(3);
        cfg = cfg.max_replay(1 << 20, 4);
        let client = StableConduit::<Msg>::connect(connector.clone(), cfg)
            .await
            .unwrap();
        let mut server_side = server.accept().await.unwrap();
        for i in 0..4 {
            client.send(&(0, i, vec![])).await.unwrap();
        }
        // The buffer holds 4 unacked frames: the fifth send must wait.
        let (tx, mut rx) = client.split();
        let blocked = tokio::spawn(async move {
            tx.send(&(0, 4, vec![])).await.unwrap();
            tx
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!blocked.is_finished(), "send did not apply backpressure");
        connector.cut_all();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The server consumes and answers: its frame carries the ack.
        for i in 0..4 {
            let (_, idx, _) = server_side.recv().await.unwrap().unwrap();
            assert_eq!(idx, i);
        }
        server_side.send(&(9, 0, vec![])).await.unwrap();
        let tx = tokio::time::timeout(Duration::from_secs(10), blocked)
            .await
            .expect("send stayed blocked")
            .unwrap();
        let (_, idx, _) = server_side.recv().await.unwrap().unwrap();
        assert_eq!(idx, 4);
        assert_eq!(rx.recv().await.unwrap().unwrap().0, 9);
        assert_eq!(tx.stats().replay_frames, 1, "acked frames were not trimmed");
    })
    .await;
}

transport_tests!(send_blocked_on_full_buffer_survives_reconnect);

/// A connector whose target can be swapped, to make a client resume against
/// a server that never heard of its key.
#[derive(Clone)]
struct Switchable(Arc<Mutex<MemConnector>>);

impl Connector for Switchable {
    type Link = MemLink;
    fn connect(&self) -> impl std::future::Future<Output = Result<MemLink, LinkError>> + Send {
        let c = self.0.lock().unwrap().clone();
        async move { c.connect().await }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_unknown_key_is_session_lost() {
    common::within(async move {
        let (l1, c1) = mem::listener(16);
        let s1 = Server::<Msg>::new(l1, config(1));
        let switch = Switchable(Arc::new(Mutex::new(c1.clone())));
        let mut client = StableConduit::<Msg>::connect(switch.clone(), config(1))
            .await
            .unwrap();
        let mut first = s1.accept().await.unwrap();
        client.send(&(0, 0, vec![1])).await.unwrap();
        assert_eq!(first.recv().await.unwrap().unwrap(), (0, 0, vec![1]));
        first.send(&(0, 0, vec![2])).await.unwrap();
        assert_eq!(client.recv().await.unwrap().unwrap(), (0, 0, vec![2]));

        // "Restart" the server: a new one that knows no session.
        let (l2, c2) = mem::listener(16);
        let _s2 = Server::<Msg>::new(l2, config(2));
        *switch.0.lock().unwrap() = c2;
        c1.kill_all();

        let err = tokio::time::timeout(Duration::from_secs(10), client.recv())
            .await
            .expect("client never noticed")
            .unwrap_err();
        assert_eq!(err.session_lost(), Some(&SessionLost::Rejected), "{err}");
        // Terminal: every later call says the same.
        let err = client.send(&(0, 1, vec![])).await.unwrap_err();
        assert_eq!(err.session_lost(), Some(&SessionLost::Rejected));
        assert!(client.recv().await.unwrap_err().session_lost().is_some());
    })
    .await;
}

// ---- raw protocol peers, to drive the server key by key ----

type RawTx = <MemLink as Link>::Tx;
type RawRx = <MemLink as Link>::Rx;

/// Connects a raw link, sends `hello`, and returns the server's answer with
/// the link's halves (kept alive by the caller).
async fn raw_handshake(c: &MemConnector, hello: ClientHello) -> (ServerHello, (RawTx, RawRx)) {
    let (mut tx, mut rx) = c.connect().await.unwrap().split();
    // The server may answer and drop the link before our flush returns.
    let _ = tx.send(Bytes::copy_from_slice(&hello.encode())).await;
    let reply = match rx.recv().await {
        Ok(Some(reply)) => reply,
        other => panic!("no server hello in answer to {hello:?}: {other:?}"),
    };
    (ServerHello::decode(&reply).unwrap(), (tx, rx))
}

/// A ClientHello for a new session, base format.
fn new_hello() -> ClientHello {
    ClientHello {
        resume_key: None,
        last_received: None,
        extensions: 0,
    }
}

/// A ClientHello resuming with `key`, base format.
fn resume_hello(key: ResumeKey, last_received: Option<Seq>) -> ClientHello {
    ClientHello {
        resume_key: Some(key),
        last_received,
        extensions: 0,
    }
}

fn frame(seq: u32, msg: &Msg) -> Bytes {
    let mut buf = BytesMut::new();
    encode_frame(
        &FrameHeader {
            seq: Seq(seq),
            ack: None,
        },
        msg,
        &mut buf,
    )
    .unwrap();
    buf.freeze()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_rotates_keys_and_rejects_replaced_and_forged_ones() {
    common::within(async move {
        let (listener, c) = mem::listener(16);
        let server = Server::<Msg>::new(listener, config(5));
        let (h1, link1) = raw_handshake(&c, new_hello()).await;
        assert!(!h1.rejected);
        let (mut tx1, _rx1) = link1;
        // The first frame proves the key and hands the session to `accept`.
        tx1.send(frame(0, &(0, 0, vec![]))).await.unwrap();
        let mut session = server.accept().await.unwrap();
        assert_eq!(session.recv().await.unwrap().unwrap().1, 0);

        // Resume with K1: accepted, fresh K2 that differs.
        let (h2, link2) = raw_handshake(&c, resume_hello(h1.resume_key, None)).await;
        assert!(!h2.rejected);
        assert_ne!(h2.resume_key, h1.resume_key);
        // The first frame on the new link proves the client holds K2.
        let (mut tx2, _rx2) = link2;
        tx2.send(frame(1, &(0, 1, vec![]))).await.unwrap();
        assert_eq!(session.recv().await.unwrap().unwrap().1, 1);

        // K1 is now replaced: rejected. A forged key: rejected.
        let (h, _) = raw_handshake(&c, resume_hello(h1.resume_key, None)).await;
        assert!(h.rejected, "a replaced key was accepted");
        let forged = ResumeKey::generate().unwrap();
        let (h, _) = raw_handshake(&c, resume_hello(forged, None)).await;
        assert!(h.rejected, "a forged key was accepted");
        // K2 still works, and the session lives on.
        let (h3, _link3) = raw_handshake(&c, resume_hello(h2.resume_key, Some(Seq(0)))).await;
        assert!(!h3.rejected);
        assert_eq!(h3.last_received, Some(Seq(1)));
        assert_eq!(server.stats().rejected, 2);
    })
    .await;
}

/// A key sent in a ServerHello may never reach the client. The client then
/// resumes with the key it holds, which must still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_previous_key_after_lost_server_hello() {
    common::within(async move {
        let (listener, c) = mem::listener(16);
        let _server = Server::<Msg>::new(listener, config(6));
        let (h1, _l1) = raw_handshake(&c, new_hello()).await;
        // The client "never receives" K2: it resumes with K1 again, twice.
        let (h2, _l2) = raw_handshake(&c, resume_hello(h1.resume_key, None)).await;
        assert!(!h2.rejected);
        let (h3, _l3) = raw_handshake(&c, resume_hello(h1.resume_key, None)).await;
        assert!(!h3.rejected, "the key the client holds was rejected");
        // A resume with K1 withdraws nothing (it may be a stale hello while
        // the client holds K2), so K2 still works; using it proves it and
        // revokes every other key, K1 and K3 included.
        let (h4, _l4) = raw_handshake(&c, resume_hello(h2.resume_key, None)).await;
        assert!(
            !h4.rejected,
            "a key issued later than the confirmed one was revoked"
        );
        for stale in [h1.resume_key, h3.resume_key] {
            let (h, _) = raw_handshake(&c, resume_hello(stale, None)).await;
            assert!(h.rejected, "a key older than the proven one still works");
        }
        let (h, _) = raw_handshake(&c, resume_hello(h4.resume_key, None)).await;
        assert!(!h.rejected);
    })
    .await;
}

/// A connector that can replace the resume key of the next ClientHello, to
/// make a real client present an old key.
#[derive(Clone)]
struct KeySwap {
    inner: MemConnector,
    swap: Arc<Mutex<Option<ResumeKey>>>,
    seen: Arc<Mutex<Vec<ResumeKey>>>,
}

struct SwapTx {
    inner: <MemLink as Link>::Tx,
    swap: Arc<Mutex<Option<ResumeKey>>>,
    first: bool,
}
struct SeeRx {
    inner: <MemLink as Link>::Rx,
    seen: Arc<Mutex<Vec<ResumeKey>>>,
    first: bool,
}
struct SwapLink(SwapTx, SeeRx);

impl Link for SwapLink {
    type Tx = SwapTx;
    type Rx = SeeRx;
    fn split(self) -> (SwapTx, SeeRx) {
        (self.0, self.1)
    }
}

impl LinkTx for SwapTx {
    async fn feed(&mut self, payload: Bytes) -> Result<(), LinkError> {
        let mut payload = payload;
        if std::mem::take(&mut self.first) {
            if let Some(key) = self.swap.lock().unwrap().take() {
                let mut hello = ClientHello::decode(&payload).unwrap();
                hello.resume_key = Some(key);
                payload = Bytes::copy_from_slice(&hello.encode());
            }
        }
        self.inner.feed(payload).await
    }
    async fn flush(&mut self) -> Result<(), LinkError> {
        self.inner.flush().await
    }
    async fn close(&mut self) -> Result<(), LinkError> {
        self.inner.close().await
    }
}

impl LinkRx for SeeRx {
    async fn recv(&mut self) -> Result<Option<Bytes>, LinkError> {
        let got = self.inner.recv().await?;
        if let Some(p) = &got {
            if std::mem::take(&mut self.first) {
                self.seen
                    .lock()
                    .unwrap()
                    .push(ServerHello::decode(p).unwrap().resume_key);
            }
        }
        Ok(got)
    }

    fn set_max_payload(&mut self, max: usize) {
        self.inner.set_max_payload(max);
    }
}

impl Connector for KeySwap {
    type Link = SwapLink;
    async fn connect(&self) -> Result<SwapLink, LinkError> {
        let (tx, rx) = self.inner.connect().await?.split();
        Ok(SwapLink(
            SwapTx {
                inner: tx,
                swap: self.swap.clone(),
                first: true,
            },
            SeeRx {
                inner: rx,
                seen: self.seen.clone(),
                first: true,
            },
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_presenting_a_rotated_key_gets_session_lost() {
    common::within(async move {
        let (listener, c) = mem::listener(16);
        // Bearer keys: with proof of possession (tests/proof.rs) the key
        // field is a public session id, and no old key exists.
        let mut bearer = config(8);
        bearer = bearer.extensions(tether::proto::ext::ALL & !tether::proto::ext::PROOF);
        let server = Server::<Msg>::new(listener, bearer.clone());
        let swap = KeySwap {
            inner: c.clone(),
            swap: Default::default(),
            seen: Default::default(),
        };
        let mut client = StableConduit::<Msg>::connect(swap.clone(), bearer)
            .await
            .unwrap();
        let mut session = server.accept().await.unwrap();
        let ping = |i: u64| {
            let client = &client;
            async move { client.send(&(0, i, vec![])).await.unwrap() }
        };
        ping(0).await;
        assert_eq!(session.recv().await.unwrap().unwrap().1, 0);
        c.kill_all();
        // Wait for the resume, then traffic on the new link confirms K2.
        while swap.seen.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        ping(1).await;
        assert_eq!(session.recv().await.unwrap().unwrap().1, 1);
        let old = swap.seen.lock().unwrap()[0];
        *swap.swap.lock().unwrap() = Some(old);
        c.kill_all();
        let err = tokio::time::timeout(Duration::from_secs(10), client.recv())
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.session_lost(), Some(&SessionLost::Rejected), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_get_distinct_sessions() {
    common::within(async move {
        let (listener, c) = mem::listener(16);
        let server = Server::<Msg>::new(listener, config(9));
        let a = StableConduit::<Msg>::connect(c.clone(), config(10))
            .await
            .unwrap();
        let sa = server.accept().await.unwrap();
        let b = StableConduit::<Msg>::connect(c.clone(), config(11))
            .await
            .unwrap();
        let sb = server.accept().await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let chaos = spawn_chaos(
            {
                let c = c.clone();
                move || c.kill_all()
            },
            9,
            5_000,
            stop.clone(),
        );
        // Different seeds make different payloads: a message crossing sessions
        // fails the payload check.
        let ta = Traffic {
            seed: 100,
            streams: 2,
            per_stream: 500,
            max_len: 200,
        };
        let tb = Traffic {
            seed: 200,
            streams: 3,
            per_stream: 400,
            max_len: 200,
        };
        let (ra, rb) = tokio::join!(
            exchange(a, sa, ta, Traffic { seed: 101, ..ta }),
            exchange(b, sb, tb, Traffic { seed: 201, ..tb }),
        );
        stop.store(true, Ordering::Relaxed);
        chaos.await.unwrap();
        ra.unwrap();
        rb.unwrap();
        assert_eq!(server.stats().sessions_created, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_disturb_a_healthy_session() {
    common::within(async move {
        let (listener, c) = mem::listener(16);
        let mut cfg = config(12);
        cfg = cfg.handshake_timeout(Duration::from_millis(200));
        let server = Server::<Msg>::new(listener, cfg.clone());
        let client = StableConduit::<Msg>::connect(c.clone(), cfg).await.unwrap();
        let healthy = server.accept().await.unwrap();
        let t = Traffic {
            seed: 12,
            streams: 2,
            per_stream: 3_000,
            max_len: 100,
        };
        let traffic = tokio::spawn(exchange(client, healthy, t, Traffic { seed: 13, ..t }));

        let mut hostile = Vec::new();
        // Bad magic.
        let (mut tx, mut rx) = c.connect().await.unwrap().split();
        let mut bad = new_hello().encode();
        bad[0] = b'X';
        tx.send(Bytes::copy_from_slice(&bad)).await.unwrap();
        assert!(
            !matches!(rx.recv().await, Ok(Some(_))),
            "server answered a bad magic"
        );
        // Wrong size.
        let (mut tx, mut rx) = c.connect().await.unwrap().split();
        tx.send(Bytes::from_static(&[0u8; 24])).await.unwrap();
        assert!(
            !matches!(rx.recv().await, Ok(Some(_))),
            "server answered a short hello"
        );
        // A handshake that never finishes.
        hostile.push(c.connect().await.unwrap());
        // A forged key.
        let (h, _) = raw_handshake(
            &c,
            ClientHello {
                resume_key: Some(ResumeKey::generate().unwrap()),
                last_received: None,
                extensions: 0,
            },
        )
        .await;
        assert!(h.rejected);
        assert_eq!(
            server.stats().rejected,
            1,
            "only the forged key is rejected"
        );
        // A valid hello, then garbage: the session ends at once, and the
        // application never sees it (its first frame proved nothing).
        let (h, link) = raw_handshake(&c, new_hello()).await;
        assert!(!h.rejected);
        let (mut gtx, mut grx) = link;
        let _ = gtx.send(Bytes::from_static(&[0xff; 9])).await;
        assert!(
            !matches!(grx.recv().await, Ok(Some(_))),
            "the server answered garbage"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(300), server.accept())
                .await
                .is_err(),
            "a session whose first frame was garbage was handed out"
        );

        traffic.await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stats = server.stats();
        assert!(stats.bad_handshakes >= 3, "{stats:?}");
        drop(hostile);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_numbers_wrap_without_loss_or_duplication() {
    common::within(async move {
        let (listener, c) = mem::listener(64);
        let mut cfg = config(14);
        cfg = cfg.initial_seq(u32::MAX - 500);
        let server = Server::<Msg>::new(listener, cfg.clone());
        let client = StableConduit::<Msg>::connect(c.clone(), cfg).await.unwrap();
        let server_side = server.accept().await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let chaos = spawn_chaos(
            {
                let c = c.clone();
                move || c.kill_all()
            },
            14,
            2_000,
            stop.clone(),
        );
        let t = Traffic {
            seed: 14,
            streams: 2,
            per_stream: 1_000,
            max_len: 50,
        };
        let (tx, _) = exchange(client, server_side, t, Traffic { seed: 15, ..t })
            .await
            .unwrap();
        stop.store(true, Ordering::Relaxed);
        chaos.await.unwrap();
        // 2,000 frames from u32::MAX - 500: the counter crossed zero.
        assert_eq!(tx.stats().frames_received, 2_000);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn give_up_deadline_ends_the_session() {
    common::within(async move {
        let (listener, c) = mem::listener(16);
        let server = Server::<Msg>::new(listener, config(16));
        let mut cfg = config(16);
        cfg = cfg.reconnect_with(|r| r.give_up_after(Some(Duration::from_millis(200))));
        let mut client = StableConduit::<Msg>::connect(c.clone(), cfg).await.unwrap();
        let _session = server.accept().await.unwrap();
        c.set_refuse(true);
        c.kill_all();
        let err = tokio::time::timeout(Duration::from_secs(10), client.recv())
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(err.session_lost(), Some(SessionLost::GaveUp { .. })),
            "{err}"
        );
        assert!(matches!(
            client.send(&(0, 0, vec![])).await,
            Err(Error::SessionLost(_))
        ));
    })
    .await;
}

/// A message over the size limit fails with a typed error and is not sent:
/// it must not kill the link (and then be replayed into every new link).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_refused_and_the_session_goes_on() {
    common::within(async {
        let (listener, c) = mem::listener(16);
        let server = Server::<Msg>::new(listener, config(17));
        let mut cfg = config(17);
        cfg = cfg.max_message_size(1024);
        let client = StableConduit::<Msg>::connect(c, cfg).await.unwrap();
        let mut session = server.accept().await.unwrap();
        let err = client.send(&(0, 0, vec![7; 2000])).await.unwrap_err();
        assert!(matches!(err, Error::TooLarge { max: 1024, .. }), "{err}");
        client.send(&(0, 1, vec![7; 100])).await.unwrap();
        assert_eq!(session.recv().await.unwrap().unwrap().1, 1);
        assert_eq!(client.stats().reconnects, 0);
    })
    .await;
}
