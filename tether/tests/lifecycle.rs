//! Liveness, reconnect policy and session lifecycle: keepalive, backoff,
//! give-up, expiry, graceful close, flow control, and what goes on the wire
//! for every combination of extensions.
//!
//! Time-dependent tests run on tokio's paused clock over memory links:
//! deterministic, and the seconds they simulate cost no real time. Close,
//! drop, flow control and admission limits run on every transport of
//! `common::transport`, closes and drops also while the links die.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::transport::{Fixture, Transport};
use common::{config, within, Msg};
use tether::fault::FaultConfig;
use tether::link::any::{AnyConnector, AnyLink};
use tether::link::mem;
use tether::link::{Connector, Link, LinkError, LinkRx, LinkTx};
use tether::proto::{decode_payload, ext, ClientHello, Control, Incoming, Seq, ServerHello};
use tether::{ConduitState, Config, Error, Server, SessionLost, StableConduit};
use tokio::time::Instant;

// ---- a connector whose links can be made to go silent, and that records
// every payload and every connection attempt ----

#[derive(Default)]
struct Log {
    /// Payloads sent by the client, per link.
    up: Vec<Vec<Bytes>>,
    /// Payloads received by the client, per link.
    down: Vec<Vec<Bytes>>,
    attempts: Vec<Instant>,
}

#[derive(Clone)]
struct TestConnector {
    inner: AnyConnector,
    log: Arc<Mutex<Log>>,
    /// Stall flags of the links made so far.
    stalls: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    refuse: Arc<AtomicBool>,
    /// Every flush lingers 20 ms after the payloads went out, so the peer
    /// can react (and drop the link) before the flush returns.
    slow_flush: Arc<AtomicBool>,
}

impl TestConnector {
    fn new(inner: impl Into<AnyConnector>) -> Self {
        let inner = inner.into();
        TestConnector {
            inner,
            log: Arc::default(),
            stalls: Arc::default(),
            refuse: Arc::default(),
            slow_flush: Arc::default(),
        }
    }

    /// Kills every in-memory link made so far (the paused-clock tests run
    /// in memory).
    fn kill_all(&self) {
        match &self.inner {
            AnyConnector::Mem(c) => c.kill_all(),
            _ => unreachable!("only in-memory links are killed this way"),
        }
    }

    /// Existing links go silent both ways, as a half-open connection would;
    /// links made later work.
    fn stall_existing(&self) {
        for s in self.stalls.lock().unwrap().iter() {
            s.store(true, Ordering::SeqCst);
        }
    }
}

struct TestTx {
    inner: <AnyLink as Link>::Tx,
    stalled: Arc<AtomicBool>,
    slow_flush: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
    idx: usize,
}
struct TestRx {
    inner: <AnyLink as Link>::Rx,
    stalled: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
    idx: usize,
}
struct TestLink(TestTx, TestRx);

impl Link for TestLink {
    type Tx = TestTx;
    type Rx = TestRx;
    fn split(self) -> (TestTx, TestRx) {
        (self.0, self.1)
    }
}

impl LinkTx for TestTx {
    async fn feed(&mut self, payload: Bytes) -> Result<(), LinkError> {
        if self.stalled.load(Ordering::SeqCst) {
            return Ok(()); // swallowed: the peer never sees it
        }
        self.log.lock().unwrap().up[self.idx].push(payload.clone());
        self.inner.feed(payload).await
    }
    async fn flush(&mut self) -> Result<(), LinkError> {
        if self.stalled.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.flush().await?;
        if self.slow_flush.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
    async fn close(&mut self) -> Result<(), LinkError> {
        self.inner.close().await
    }
}

impl LinkRx for TestRx {
    async fn recv(&mut self) -> Result<Option<Bytes>, LinkError> {
        loop {
            let got = self.inner.recv().await;
            if self.stalled.load(Ordering::SeqCst) {
                if got.is_err() {
                    // Half-open: not even the peer's reset gets through.
                    std::future::pending::<()>().await;
                }
                continue; // dropped on the floor
            }
            let got = got?;
            if let Some(p) = &got {
                self.log.lock().unwrap().down[self.idx].push(p.clone());
            }
            return Ok(got);
        }
    }

    fn set_max_payload(&mut self, max: usize) {
        self.inner.set_max_payload(max);
    }
}

impl Connector for TestConnector {
    type Link = TestLink;
    async fn connect(&self) -> Result<TestLink, LinkError> {
        self.log.lock().unwrap().attempts.push(Instant::now());
        if self.refuse.load(Ordering::SeqCst) {
            return Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into());
        }
        let (tx, rx) = self.inner.connect().await?.split();
        let stalled = Arc::new(AtomicBool::new(false));
        self.stalls.lock().unwrap().push(stalled.clone());
        let idx = {
            let mut log = self.log.lock().unwrap();
            log.up.push(Vec::new());
            log.down.push(Vec::new());
            log.up.len() - 1
        };
        Ok(TestLink(
            TestTx {
                inner: tx,
                stalled: stalled.clone(),
                slow_flush: self.slow_flush.clone(),
                log: self.log.clone(),
                idx,
            },
            TestRx {
                inner: rx,
                stalled,
                log: self.log.clone(),
                idx,
            },
        ))
    }
}

async fn setup(
    client_cfg: Config,
    server_cfg: Config,
) -> (
    Server<Msg>,
    TestConnector,
    StableConduit<Msg>,
    StableConduit<Msg>,
) {
    let (listener, c) = mem::listener(64);
    let server = Server::<Msg>::new(listener, server_cfg);
    let connector = TestConnector::new(c);
    let client = StableConduit::<Msg>::connect(connector.clone(), client_cfg)
        .await
        .unwrap();
    let session = server.accept().await.unwrap();
    (server, connector, client, session)
}

/// [`setup`] over `transport`; the fixture keeps the listener's address.
async fn setup_on(
    transport: Transport,
    client_cfg: Config,
    server_cfg: Config,
) -> (
    Server<Msg>,
    TestConnector,
    StableConduit<Msg>,
    StableConduit<Msg>,
    Fixture,
) {
    let mut fx = transport.fixture().await;
    let server = Server::<Msg>::new(fx.listener(), server_cfg);
    let connector = TestConnector::new(fx.connector());
    let client = StableConduit::<Msg>::connect(connector.clone(), client_cfg)
        .await
        .unwrap();
    let session = server.accept().await.unwrap();
    (server, connector, client, session, fx)
}

fn keepalive_config(seed: u64) -> Config {
    let mut c = config(seed);
    c = c.keepalive(Duration::from_secs(1), Duration::from_secs(3));
    c
}

#[tokio::test(start_paused = true)]
async fn keepalive_detects_a_silent_link_on_both_sides() {
    let (_server, connector, mut client, session) =
        setup(keepalive_config(1), keepalive_config(1)).await;
    client.send(&(0, 0, vec![])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(client.stats().rtt.is_some(), "no RTT estimate after pings");
    assert_eq!(
        client.stats().keepalive_timeouts,
        0,
        "a healthy link timed out"
    );

    let stalled_at = Instant::now();
    connector.stall_existing();
    let mut states = client.state_changes();
    states
        .wait_for(|s| *s == ConduitState::Resumed)
        .await
        .unwrap();
    let detected = stalled_at.elapsed();
    assert!(
        detected >= Duration::from_secs(2),
        "declared dead too early: {detected:?}"
    );
    assert!(
        detected <= Duration::from_secs(5),
        "declared dead too late: {detected:?}"
    );
    assert_eq!(client.stats().keepalive_timeouts, 1);
    // The server noticed on its own side too (its link was silent as well),
    // and the session goes on over the new link.
    assert!(
        session.stats().keepalive_timeouts >= 1,
        "server never timed out"
    );
    let (stx, _srx) = session.split();
    stx.send(&(1, 1, vec![1])).await.unwrap();
    assert_eq!(client.recv().await.unwrap().unwrap(), (1, 1, vec![1]));
}

#[tokio::test(start_paused = true)]
async fn backoff_grows_with_full_jitter_within_bounds_then_gives_up() {
    let mut cfg = config(2);
    cfg = cfg.reconnect_with(|r| {
        r.min_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_millis(1600))
            .give_up_after(Some(Duration::from_secs(20)))
    });
    let (_server, connector, mut client, _session) = setup(cfg, config(2)).await;
    connector.refuse.store(true, Ordering::SeqCst);
    let lost_at = Instant::now();
    connector.kill_all();
    let err = client.recv().await.unwrap_err();
    let gave_up_after = lost_at.elapsed();
    assert!(
        matches!(err.session_lost(), Some(SessionLost::GaveUp { .. })),
        "{err}"
    );
    assert!(
        gave_up_after <= Duration::from_secs(20),
        "gave up late: {gave_up_after:?}"
    );
    assert!(
        gave_up_after >= Duration::from_secs(18),
        "gave up early: {gave_up_after:?}"
    );

    let attempts = connector.log.lock().unwrap().attempts.clone();
    let gaps: Vec<Duration> = attempts[1..].windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 10, "only {} retries in 20 s", gaps.len());
    for (i, gap) in gaps.iter().enumerate() {
        let bound =
            Duration::from_millis(100 * (1u64 << i.min(4))).min(Duration::from_millis(1600));
        assert!(
            *gap <= bound,
            "retry {i} waited {gap:?}, over its bound {bound:?}"
        );
    }
    // Full jitter: later delays are drawn from a wider range, and not all
    // equal.
    let late = &gaps[5..];
    assert!(
        late.iter().any(|g| *g > Duration::from_millis(400)),
        "delays did not grow: {gaps:?}"
    );
    assert!(late.windows(2).any(|w| w[0] != w[1]), "no jitter: {gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn server_expires_a_session_whose_client_never_returns() {
    let mut server_cfg = config(3);
    server_cfg = server_cfg.resume_window(Duration::from_secs(30));
    let mut client_cfg = config(3);
    client_cfg = client_cfg.reconnect_with(|r| r.give_up_after(None));
    let (server, connector, _client, mut session) = setup(client_cfg, server_cfg).await;
    connector.refuse.store(true, Ordering::SeqCst);
    connector.kill_all();
    // The server goes on accepting sends for the absent client.
    for i in 0..100 {
        session.send(&(0, i, vec![0; 100])).await.unwrap();
    }
    assert!(session.stats().replay_bytes > 10_000);
    assert_eq!(server.stats().sessions_open, 1);
    let started = Instant::now();
    let err = session.recv().await.unwrap_err();
    assert_eq!(err.session_lost(), Some(&SessionLost::Expired), "{err}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(29) && waited <= Duration::from_secs(31),
        "{waited:?}"
    );
    assert_eq!(
        server.stats().sessions_open,
        0,
        "expired session still registered"
    );
    assert_eq!(
        session.stats().replay_bytes,
        0,
        "expired session kept its buffer"
    );
    assert!(matches!(
        session.send(&(0, 0, vec![])).await,
        Err(Error::SessionLost(SessionLost::Expired))
    ));
}

async fn graceful_close_delivers_everything_then_ends_both_sides(transport: Transport) {
    within(async {
        let (server, _connector, client, mut session, _fx) =
            setup_on(transport, config(4), config(4)).await;
        for i in 0..1000 {
            client.send(&(0, i, vec![1; 10])).await.unwrap();
        }
        let closing = tokio::spawn(client.close());
        for i in 0..1000 {
            assert_eq!(session.recv().await.unwrap().unwrap().1, i);
        }
        // Then a clean end, not an error.
        assert!(session.recv().await.unwrap().is_none());
        closing.await.unwrap().unwrap();
        assert!(matches!(
            session.send(&(0, 0, vec![])).await,
            Err(Error::PeerClosed)
        ));
        // The server's driver unregisters the session right after the
        // close completes; give a loaded machine a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while server.stats().sessions_open != 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            server.stats().sessions_open,
            0,
            "closed session still registered: server {:?}, session {:?}",
            server.stats(),
            session.stats()
        );
    })
    .await;
}

transport_tests!(graceful_close_delivers_everything_then_ends_both_sides);

/// The peer ends its side as soon as the close frame arrives, so the link
/// can fail under the closing side before its own send of the close frame
/// has returned: that is still a clean close, never a reconnect (which the
/// server, having freed the session, would reject: a spurious loss).
async fn close_is_clean_even_when_the_peer_drops_the_link_at_once(transport: Transport) {
    within(async {
        let (server, connector, client, mut session, _fx) =
            setup_on(transport, config(7), config(7)).await;
        client.send(&(0, 1, vec![1; 10])).await.unwrap();
        assert_eq!(session.recv().await.unwrap().unwrap().1, 1);
        // Let the ack come back first, so the close frame is the only
        // thing still to send.
        tokio::time::sleep(Duration::from_millis(50)).await;
        connector.slow_flush.store(true, Ordering::SeqCst);
        let states = client.state_changes();
        let closed = client.close().await;
        assert!(closed.is_ok(), "close() = {closed:?}");
        assert!(session.recv().await.unwrap().is_none());
        assert_eq!(*states.borrow(), ConduitState::Closed);
        assert_eq!(server.stats().rejected, 0, "the client tried to resume");
    })
    .await;
}

transport_tests!(close_is_clean_even_when_the_peer_drops_the_link_at_once);

/// Links cut after 20 kB on average (one in five inside the handshake)
/// while both sides send and the client closes: everything accepted before
/// the close arrives exactly once and in order, both ways, then both
/// receivers end, and the server forgets the session.
async fn close_while_links_die_delivers_everything_then_ends(transport: Transport) {
    within(async {
        let mut fx = transport.fixture().await;
        let server = Server::<Msg>::new(fx.listener(), config(20));
        let cutter = fx.cutting(dying(20)).await;
        let client = StableConduit::<Msg>::connect(cutter.clone(), config(20))
            .await
            .unwrap();
        client.send(&(0, 0, vec![])).await.unwrap();
        let session = server.accept().await.unwrap();
        let (client_tx, mut client_rx) = client.split();
        let (session_tx, mut session_rx) = session.split();
        let up = traffic(21);
        let down = traffic(22);
        let senders: Vec<_> = common::spawn_senders(&client_tx, up)
            .into_iter()
            .chain(common::spawn_senders(&session_tx, down))
            .collect();
        assert_eq!(session_rx.recv().await.unwrap().unwrap(), (0, 0, vec![]));
        let to_server = tokio::spawn(async move {
            common::check_receiver(&mut session_rx, up).await?;
            match session_rx.recv().await {
                Ok(None) => Ok(()),
                other => Err(format!("after the close, the server got {other:?}")),
            }
        });
        let to_client = tokio::spawn(async move {
            common::check_receiver(&mut client_rx, down).await?;
            match client_rx.recv().await {
                Ok(None) => Ok(()),
                other => Err(format!("after the close, the client got {other:?}")),
            }
        });
        for s in senders {
            s.await.unwrap().unwrap();
        }
        client_tx.close().await.unwrap();
        to_server.await.unwrap().unwrap();
        to_client.await.unwrap().unwrap();
        assert!(matches!(
            session_tx.send(&(0, 0, vec![])).await,
            Err(Error::PeerClosed)
        ));
        wait_for_no_sessions(&server).await;
        let cuts = cutter.stats();
        assert!(cuts.cuts > 0, "{transport}: nothing was cut: {cuts:?}");
        assert!(client_tx.stats().reconnects > 0, "{:?}", client_tx.stats());
    })
    .await;
}

transport_tests!(close_while_links_die_delivers_everything_then_ends);

/// The same with the client dropping every handle once its senders are
/// done, instead of closing: the close runs in the background, through the
/// cuts, and the server still gets everything, then the end.
async fn drop_while_links_die_delivers_everything_then_ends(transport: Transport) {
    within(async {
        let mut fx = transport.fixture().await;
        let server = Server::<Msg>::new(fx.listener(), config(23));
        let cutter = fx.cutting(dying(23)).await;
        let client = StableConduit::<Msg>::connect(cutter.clone(), config(23))
            .await
            .unwrap();
        client.send(&(0, 0, vec![])).await.unwrap();
        let mut session = server.accept().await.unwrap();
        assert_eq!(session.recv().await.unwrap().unwrap(), (0, 0, vec![]));
        let up = traffic(24);
        let (client_tx, client_rx) = client.split();
        for s in common::spawn_senders(&client_tx, up) {
            s.await.unwrap().unwrap();
        }
        drop((client_tx, client_rx));
        let (_session_tx, mut session_rx) = session.split();
        common::check_receiver(&mut session_rx, up).await.unwrap();
        match session_rx.recv().await {
            Ok(None) => {}
            other => panic!("after the drop, the server got {other:?}"),
        }
        wait_for_no_sessions(&server).await;
        let cuts = cutter.stats();
        assert!(cuts.cuts > 0, "{transport}: nothing was cut: {cuts:?}");
    })
    .await;
}

transport_tests!(drop_while_links_die_delivers_everything_then_ends);

/// Links that die after 20 kB on average, one in five in the handshake.
fn dying(seed: u64) -> FaultConfig {
    FaultConfig {
        seed,
        mean_bytes_between_cuts: 20_000,
        handshake_cut_probability: 0.2,
        max_connection_age: None,
    }
}

/// Two sender tasks of 400 messages, up to 2 kB each.
fn traffic(seed: u64) -> common::Traffic {
    common::Traffic {
        seed,
        streams: 2,
        per_stream: 400,
        max_len: 2_000,
    }
}

/// The server's driver unregisters a session right after its close
/// completes; gives a loaded machine a moment.
async fn wait_for_no_sessions(server: &Server<Msg>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.stats().sessions_open != 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        server.stats().sessions_open,
        0,
        "a closed session is still registered: {:?}",
        server.stats()
    );
}

async fn a_full_replay_buffer_blocks_send_until_acks_arrive(transport: Transport) {
    within(async {
        let mut cfg = config(5);
        cfg = cfg.max_replay(1 << 20, 8);
        let (_server, _c, client, mut session, _fx) = setup_on(transport, cfg.clone(), cfg).await;
        let (tx, _rx) = client.split();
        let sender = tokio::spawn(async move {
            for i in 0..100u64 {
                tx.send(&(0, i, vec![])).await.unwrap();
            }
            tx
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !sender.is_finished(),
            "100 sends went through an 8-frame window unread"
        );
        for i in 0..100 {
            assert_eq!(session.recv().await.unwrap().unwrap().1, i);
        }
        let tx = sender.await.unwrap();
        assert!(tx.stats().max_replay_bytes > 0);
        assert!(tx.stats().replay_frames <= 8);
    })
    .await;
}

transport_tests!(a_full_replay_buffer_blocks_send_until_acks_arrive);

/// An ack frame is always fresh: one for data never sent breaks the
/// protocol. (A piggybacked ack may be a stale one from a replay, and is
/// ignored instead: `edges.rs`, finding 8a.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_for_data_never_sent_is_a_protocol_error() {
    within(async {
        let (listener, c) = mem::listener(8);
        let server = Server::<Msg>::new(listener, config(6));
        let (mut tx, mut rx) = c.connect().await.unwrap().split();
        let hello = ClientHello {
            resume_key: None,
            last_received: None,
            extensions: ext::ACKS,
        };
        tx.send(Bytes::copy_from_slice(&hello.encode()))
            .await
            .unwrap();
        let answer = ServerHello::decode(&rx.recv().await.unwrap().unwrap()).unwrap();
        assert_eq!(answer.extensions, ext::ACKS);
        // The server sent nothing, yet this frame acks its seq 100. Being
        // the first frame, it also hands the session to `accept`.
        let mut buf = BytesMut::new();
        Control::Ack(Seq(100)).encode(&mut buf);
        // The server may drop the link before our flush returns.
        let _ = tx.send(buf.freeze()).await;
        let mut session = server.accept().await.unwrap();
        let err = session.recv().await.unwrap_err();
        assert!(
            matches!(err.session_lost(), Some(SessionLost::Protocol(m)) if m.contains("ack")),
            "{err}"
        );
    })
    .await;
}

/// A one-way stream trims the sender's buffer through standalone acks and
/// never holds more than its bound. `TETHER_ONE_WAY_MESSAGES` overrides the
/// count (default 1,000,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_stream_of_a_million_messages_stays_under_the_bound() {
    let n: u64 = std::env::var("TETHER_ONE_WAY_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut cfg = Config::default();
    cfg = cfg.max_replay(64 * 1024, 1024);
    let (listener, c) = mem::listener(256);
    let server = Server::<u64>::new(listener, cfg.clone());
    let client = StableConduit::<u64>::connect(c, cfg).await.unwrap();
    let mut session = server.accept().await.unwrap();
    let reader = tokio::spawn(async move {
        for i in 0..n {
            assert_eq!(session.recv().await.unwrap(), Some(i));
        }
    });
    for i in 0..n {
        client.send(&i).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("reader stuck")
        .unwrap();
    let stats = client.stats();
    assert!(
        stats.max_replay_bytes <= 64 * 1024,
        "replay buffer peaked at {} bytes",
        stats.max_replay_bytes
    );
    assert!(stats.max_replay_bytes > 0);
}

/// Every combination of extension support on the two sides: the server
/// echoes the intersection, traffic flows, and only negotiated control
/// frames appear on the wire.
#[tokio::test(start_paused = true)]
async fn every_extension_combination_speaks_the_right_format() {
    let all = [ext::ACKS, ext::KEEPALIVE, ext::CLOSE, ext::FRAGMENTS];
    let subsets: Vec<u8> = (0u8..16)
        .map(|m| {
            all.iter()
                .enumerate()
                .filter(|(i, _)| m & (1 << i) != 0)
                .map(|(_, b)| *b)
                .fold(0, |a, b| a | b)
        })
        .collect();
    for &client_ext in &subsets {
        for &server_ext in &subsets {
            let mut ccfg = keepalive_config(7);
            ccfg = ccfg.extensions(client_ext).fragment_size(16);
            let mut scfg = keepalive_config(7);
            scfg = scfg.extensions(server_ext);
            let (listener, c) = mem::listener(64);
            let server = Server::<Msg>::new(listener, scfg);
            let connector = TestConnector::new(c);
            let mut client = StableConduit::<Msg>::connect(connector.clone(), ccfg)
                .await
                .unwrap();
            // The client speaks first: in the base format its first message
            // is what proves its key and hands the session to `accept`.
            client.send(&(0, 100, vec![])).await.unwrap();
            let mut session = server.accept().await.unwrap();
            assert_eq!(session.recv().await.unwrap().unwrap().1, 100);
            let agreed = ext::negotiate(client_ext, server_ext);
            for i in 0..50 {
                // Every tenth message is large enough to travel in pieces.
                let body = vec![i as u8; if i % 10 == 0 { 100 } else { 0 }];
                client.send(&(0, i, body.clone())).await.unwrap();
                assert_eq!(session.recv().await.unwrap().unwrap(), (0, i, body));
            }
            session.send(&(1, 0, vec![])).await.unwrap();
            assert_eq!(client.recv().await.unwrap().unwrap().0, 1);
            // Long enough for acks and pings.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let close = client.close();
            let _ = tokio::time::timeout(Duration::from_secs(20), close).await;
            tokio::time::sleep(Duration::from_millis(100)).await;

            let log = connector.log.lock().unwrap();
            let hello = ClientHello::decode(&log.up[0][0]).unwrap();
            assert_eq!(hello.extensions, client_ext);
            let answer = ServerHello::decode(&log.down[0][0]).unwrap();
            assert_eq!(
                answer.extensions, agreed,
                "client {client_ext:#x} server {server_ext:#x}"
            );
            let mut kinds = 0u8;
            for payload in log.up[0][1..].iter().chain(&log.down[0][1..]) {
                // Every payload decodes under exactly the agreed extensions.
                match decode_payload(payload, agreed) {
                    Ok(Incoming::Control(c)) => kinds |= c.extension(),
                    Ok(Incoming::Fragment { .. }) => kinds |= ext::FRAGMENTS,
                    Ok(Incoming::Data { .. }) => {}
                    Err(e) => panic!("client {client_ext:#x} server {server_ext:#x}: {e}"),
                }
            }
            assert_eq!(kinds & !agreed, 0);
            for bit in [ext::ACKS, ext::KEEPALIVE, ext::FRAGMENTS] {
                if agreed & bit != 0 {
                    assert!(kinds & bit != 0, "{bit:#x} agreed but never used");
                }
            }
            if agreed & ext::CLOSE != 0 {
                assert!(kinds & ext::CLOSE != 0, "close agreed but not sent");
                assert_eq!(server.stats().sessions_open, 0);
            }
            let _ = Control::Ack(Seq(0));
        }
    }
}

async fn sessions_beyond_the_limit_are_rejected(transport: Transport) {
    within(async {
        let mut cfg = config(8);
        cfg = cfg.max_sessions(2);
        let mut fx = transport.fixture().await;
        let c = fx.connector();
        let server = Server::<Msg>::new(fx.listener(), cfg);
        let a = StableConduit::<Msg>::connect(c.clone(), config(9))
            .await
            .unwrap();
        let b = StableConduit::<Msg>::connect(c.clone(), config(10))
            .await
            .unwrap();
        // A full server is busy, not a lost session: the client retries
        // until its deadline, then reports the refusal.
        let mut impatient = config(11);
        impatient = impatient.reconnect_with(|r| r.give_up_after(Some(Duration::from_secs(1))));
        let third = StableConduit::<Msg>::connect(c.clone(), impatient).await;
        let err = third.expect_err("a third session was accepted");
        assert!(
            matches!(err, tether::Error::Refused(tether::Refusal::Busy { .. })),
            "{err}"
        );
        // A base-format client cannot read a typed refusal: it is rejected.
        let mut base = config(12);
        base = base.extensions(0);
        let err = StableConduit::<Msg>::connect(c.clone(), base)
            .await
            .expect_err("a third session was accepted");
        assert_eq!(err.session_lost(), Some(&SessionLost::Rejected), "{err}");
        assert_eq!(server.stats().sessions_open, 2);
        assert_eq!(server.stats().refused_busy, 2);
        // The two admitted sessions work (accepted in either order).
        a.send(&(0, 0, vec![])).await.unwrap();
        b.send(&(1, 0, vec![])).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let mut session = server.accept().await.unwrap();
            seen.push(session.recv().await.unwrap().unwrap().0);
        }
        seen.sort();
        assert_eq!(seen, [0, 1]);
    })
    .await;
}

transport_tests!(sessions_beyond_the_limit_are_rejected);
