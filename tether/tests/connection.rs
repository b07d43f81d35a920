//! Connection behaviour a user sees: how fast the first connect fails,
//! whether give-up deadlines are kept, the events with their causes, stall
//! detection and `reconnect_now` on a network change, recovery after an
//! outage, taking back what a lost session never delivered, and error
//! texts that say each cause once.

use std::error::Error as _;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether::fault::{FaultConfig, FaultProxy};
use tether::link::{mem, Connector, TcpConnector, TcpListener};
use tether::{
    ConduitEvent, ConduitState, Config, Error, Events, LinkLoss, Server, SessionLost, StableConduit,
};
use tokio::time::{timeout, Instant};

const WAIT: Duration = Duration::from_secs(30);

/// Fast keepalive and reconnects, seeded jitter.
fn config(seed: u64) -> Config {
    Config::default()
        .seed(seed)
        .keepalive(Duration::from_millis(200), Duration::from_secs(2))
        .stall_timeout(Duration::from_millis(400))
}

/// The next event that `pick` accepts, skipping others; fails after `WAIT`.
async fn next_matching<T>(
    events: &mut Events,
    what: &str,
    mut pick: impl FnMut(&ConduitEvent) -> Option<T>,
) -> T {
    let mut seen = Vec::new();
    let found = timeout(WAIT, async {
        while let Some(event) = events.next().await {
            if let Some(t) = pick(&event) {
                return Some(t);
            }
            seen.push(event);
        }
        None
    })
    .await;
    match found {
        Ok(Some(t)) => t,
        _ => panic!("no {what} event; saw {seen:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn first_connect_with_nothing_listening_fails_at_its_own_deadline() {
    let (listener, connector) = mem::listener(4);
    drop(listener);
    let started = Instant::now();
    let err = StableConduit::<String>::connect(connector, Config::default().seed(1))
        .await
        .expect_err("nothing listens");
    let elapsed = started.elapsed();
    let Some(SessionLost::GaveUp {
        attempts,
        last_error,
        ..
    }) = err.session_lost()
    else {
        panic!("expected GaveUp, got {err}");
    };
    // The default first-connect deadline is 10 s, kept to the millisecond
    // (virtual time), not 120 s.
    assert!(
        elapsed >= Duration::from_secs(10) && elapsed < Duration::from_millis(10_050),
        "gave up after {elapsed:?}"
    );
    assert!(*attempts > 5, "only {attempts} attempts");
    assert_eq!(
        last_error.kind(),
        ErrorKind::ConnectionRefused,
        "{last_error}"
    );
    let text = err.to_string();
    assert!(text.contains("over 10 s"), "{text}");
    assert!(err.source().is_none(), "the text says it all: {text}");
}

#[tokio::test]
async fn first_connect_over_tcp_fails_fast_and_reports_connection_refused() {
    // A port nobody listens on: bind, note, close.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let started = std::time::Instant::now();
    let err = StableConduit::<String>::connect(
        TcpConnector::new(addr),
        Config::default().reconnect_with(|r| r.connect_give_up_after(Duration::from_secs(2))),
    )
    .await
    .expect_err("nothing listens");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(6),
        "gave up after {elapsed:?}"
    );
    match err.session_lost() {
        Some(SessionLost::GaveUp { last_error, .. }) => {
            assert_eq!(last_error.kind(), ErrorKind::ConnectionRefused, "{err}")
        }
        _ => panic!("expected GaveUp, got {err}"),
    }
}

/// A connector whose links reach a listener that never answers the hello:
/// every attempt waits for its handshake timeout.
#[derive(Clone)]
struct Silent(mem::MemConnector);

impl Connector for Silent {
    type Link = mem::MemLink;
    async fn connect(&self) -> Result<mem::MemLink, tether::LinkError> {
        self.0.connect().await
    }
}

#[tokio::test(start_paused = true)]
async fn give_up_deadlines_are_kept_whatever_the_handshake_timeout() {
    for (i, limit) in [2u64, 5, 3].into_iter().enumerate() {
        // The server holds the links and never answers; the handshake
        // timeout (10 s) is longer than the deadline.
        let (mut listener, connector) = mem::listener(64);
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok(link) = tether::Listener::accept(&mut listener).await {
                held.push(link);
            }
        });
        let started = Instant::now();
        let cfg = Config::default()
            .seed(i as u64)
            .reconnect_with(|r| r.connect_give_up_after(Duration::from_secs(limit)));
        let err = StableConduit::<String>::connect(Silent(connector), cfg)
            .await
            .expect_err("nobody answers");
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_secs(limit)
                && elapsed < Duration::from_secs(limit) + Duration::from_millis(50),
            "give_up_after({limit} s): gave up after {elapsed:?}: {err}"
        );
        match err.session_lost() {
            Some(SessionLost::GaveUp { last_error, .. }) => {
                assert_eq!(last_error.kind(), ErrorKind::TimedOut, "{err}")
            }
            _ => panic!("expected GaveUp, got {err}"),
        }
        holder.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn reconnect_deadline_is_kept_and_each_attempt_is_an_event() {
    let (listener, connector) = mem::listener(16);
    let server = Server::<String>::new(listener, config(3));
    let cfg = config(4).reconnect_with(|r| r.give_up_after(Some(Duration::from_millis(2_500))));
    let client = StableConduit::<String>::connect(connector.clone(), cfg)
        .await
        .unwrap();
    let _session = server.accept().await.unwrap();
    let mut events = client.events();
    connector.set_refuse(true);
    connector.kill_all();
    let lost_at = Instant::now();
    let cause = next_matching(&mut events, "LinkLost", |e| match e {
        ConduitEvent::LinkLost { cause } => Some(cause.clone()),
        _ => None,
    })
    .await;
    assert!(
        matches!(cause, LinkLoss::Error { .. } | LinkLoss::PeerEnded),
        "{cause:?}"
    );
    let mut attempts = Vec::new();
    let end = loop {
        match timeout(WAIT, events.next()).await.expect("events stopped") {
            Some(ConduitEvent::AttemptFailed {
                attempt,
                error,
                next_retry,
            }) => {
                assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
                attempts.push((attempt, next_retry));
            }
            Some(ConduitEvent::Lost(reason)) => break reason,
            other => panic!("unexpected {other:?}"),
        }
    };
    let elapsed = lost_at.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2_500) && elapsed < Duration::from_millis(2_550),
        "gave up after {elapsed:?}"
    );
    assert!(matches!(end, SessionLost::GaveUp { .. }), "{end}");
    // Numbered from 1, every one but the last with its next delay.
    for (i, (attempt, next)) in attempts.iter().enumerate() {
        assert_eq!(*attempt as usize, i + 1, "{attempts:?}");
        assert_eq!(next.is_none(), i + 1 == attempts.len(), "{attempts:?}");
    }
    assert!(attempts.len() > 3, "{attempts:?}");
    assert!(events.next().await.is_none(), "the stream ends after Lost");
}

/// Dials whichever of two addresses `current` says: a network change.
#[derive(Clone)]
struct Switching {
    addrs: [SocketAddr; 2],
    current: Arc<AtomicUsize>,
}

impl Connector for Switching {
    type Link = <TcpConnector as Connector>::Link;
    async fn connect(&self) -> Result<Self::Link, tether::LinkError> {
        let addr = self.addrs[self.current.load(Ordering::SeqCst)];
        TcpConnector::new(addr).connect().await
    }
}

async fn tcp_server(cfg: Config) -> (Server<u64>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (Server::new(listener, cfg), addr)
}

#[tokio::test]
async fn a_black_holed_path_is_reported_stalled_and_reconnect_now_moves_to_the_new_one() {
    // Keepalive would take 30 s to declare the old path dead.
    let cfg = Config::default()
        .seed(5)
        .keepalive(Duration::from_secs(10), Duration::from_secs(30))
        .stall_timeout(Duration::from_millis(400));
    let (server, addr) = tcp_server(cfg.clone()).await;
    let old = FaultProxy::start(addr, FaultConfig::default())
        .await
        .unwrap();
    let new = FaultProxy::start(addr, FaultConfig::default())
        .await
        .unwrap();
    let current = Arc::new(AtomicUsize::new(0));
    let connector = Switching {
        addrs: [old.local_addr(), new.local_addr()],
        current: current.clone(),
    };
    let client = StableConduit::<u64>::connect(connector, cfg).await.unwrap();
    let mut session = timeout(WAIT, server.accept()).await.unwrap().unwrap();
    let mut events = client.events();
    let mut states = client.state_changes();
    client.send(&0).await.unwrap();
    assert_eq!(session.recv().await.unwrap(), Some(0));

    // The old path goes dark; the client keeps sending.
    old.black_hole(Duration::from_secs(3600));
    current.store(1, Ordering::SeqCst);
    for i in 1..=100u64 {
        client.send(&i).await.unwrap();
    }
    let quiet = next_matching(&mut events, "Stalled", |e| match e {
        ConduitEvent::Stalled { quiet } => Some(*quiet),
        _ => None,
    })
    .await;
    assert!(quiet >= Duration::from_millis(400), "{quiet:?}");
    timeout(WAIT, states.wait_for(|s| *s == ConduitState::Stalled))
        .await
        .expect("state never Stalled")
        .unwrap();

    // The application learns the network changed.
    let asked = Instant::now();
    client.reconnect_now();
    let cause = next_matching(&mut events, "LinkLost", |e| match e {
        ConduitEvent::LinkLost { cause } => Some(cause.clone()),
        _ => None,
    })
    .await;
    assert_eq!(cause, LinkLoss::Requested);
    next_matching(&mut events, "Resumed", |e| {
        matches!(e, ConduitEvent::Resumed { .. }).then_some(())
    })
    .await;
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "resumed {took:?} after the request"
    );
    println!("resumed over the new path {took:?} after reconnect_now");
    for i in 1..=100u64 {
        let got = timeout(WAIT, session.recv()).await.unwrap().unwrap();
        assert_eq!(got, Some(i), "message {i}");
    }
    assert_eq!(client.stats().state, ConduitState::Resumed);
}

/// Runs an outage of `outage` on the path, then measures how long after it
/// ended the client resumed; with `nudge`, the application calls
/// `reconnect_now` when the network comes back.
async fn recovery_after_outage(outage: Duration, nudge: bool, seed: u64) -> Duration {
    let cfg = Config::default().seed(seed);
    let (server, addr) = tcp_server(cfg.clone()).await;
    let proxy = FaultProxy::start(addr, FaultConfig::default())
        .await
        .unwrap();
    let client = StableConduit::<u64>::connect(TcpConnector::new(proxy.local_addr()), cfg)
        .await
        .unwrap();
    let mut session = timeout(WAIT, server.accept()).await.unwrap().unwrap();
    let mut events = client.events();
    proxy.outage(outage);
    tokio::time::sleep(outage).await;
    let back = Instant::now();
    if nudge {
        client.reconnect_now();
    }
    next_matching(&mut events, "Resumed", |e| {
        matches!(e, ConduitEvent::Resumed { .. }).then_some(())
    })
    .await;
    let took = back.elapsed();
    client.send(&7).await.unwrap();
    assert_eq!(
        timeout(WAIT, session.recv()).await.unwrap().unwrap(),
        Some(7)
    );
    took
}

#[tokio::test]
async fn after_an_outage_the_client_is_back_within_a_second_or_at_once_when_told() {
    let (default, nudged) = tokio::join!(
        recovery_after_outage(Duration::from_secs(8), false, 6),
        recovery_after_outage(Duration::from_secs(8), true, 7),
    );
    println!("after an 8 s outage: resumed {default:?} later (default backoff), {nudged:?} with reconnect_now");
    // Default backoff bound: 1 s, plus a loaded machine's slack.
    assert!(default < Duration::from_millis(2_500), "{default:?}");
    assert!(nudged < Duration::from_millis(1_000), "{nudged:?}");
}

#[tokio::test(start_paused = true)]
async fn a_lost_session_gives_back_what_the_peer_never_acknowledged() {
    let (listener, connector) = mem::listener(16);
    let server = Server::<Vec<u8>>::new(listener, config(8).fragment_size(1000));
    let client = StableConduit::<Vec<u8>>::connect(
        connector.clone(),
        config(9)
            .fragment_size(1000)
            .reconnect_with(|r| r.give_up_after(Some(Duration::from_secs(2)))),
    )
    .await
    .unwrap();
    let mut session = server.accept().await.unwrap();
    let _server = server;
    // Messages 0..10 are read and acknowledged; 10..30 are not read, one
    // of them fragmented.
    let sent: Vec<Vec<u8>> = (0..30u8)
        .map(|i| vec![i; if i == 20 { 5_000 } else { 10 + i as usize }])
        .collect();
    for msg in &sent {
        client.send(msg).await.unwrap();
    }
    for msg in &sent[..10] {
        assert_eq!(session.recv().await.unwrap().as_ref(), Some(msg));
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // acks go out
    assert!(
        client.take_undelivered().unwrap().is_empty(),
        "not lost yet"
    );
    // The network goes away for longer than the client waits.
    connector.set_refuse(true);
    connector.kill_all();
    let mut states = client.state_changes();
    timeout(WAIT, states.wait_for(|s| *s == ConduitState::Lost))
        .await
        .expect("never lost")
        .unwrap();
    let back = client.take_undelivered().unwrap();
    assert_eq!(client.stats().undelivered, back.len() as u64);
    // A suffix of what was sent, at least everything not read.
    assert!(back.len() >= 20, "{} given back", back.len());
    assert_eq!(back[..], sent[sent.len() - back.len()..]);
    assert!(client.take_undelivered().unwrap().is_empty(), "taken once");
}

#[test]
fn error_texts_say_each_cause_once_with_durations_for_people() {
    let busy = Error::from(tether::Refusal::Busy {
        retry_after: Duration::from_millis(1500),
        reason: "full".into(),
    });
    assert_eq!(
        busy.to_string(),
        "session refused: the server is busy (full); retry after 1.5 s"
    );
    assert!(busy.source().is_none());
    let link = Error::from(tether::LinkError::Io(std::io::Error::new(
        ErrorKind::ConnectionReset,
        "reset by peer",
    )));
    assert_eq!(
        link.to_string(),
        "link failed: link i/o error: reset by peer"
    );
    assert!(link.source().is_none());
}

#[tokio::test]
async fn a_slow_reader_is_not_a_stall() {
    // Acks report consumption, so a peer whose application does not read
    // withholds them; its reader still answers pings.
    let cfg = Config::default()
        .seed(10)
        .keepalive(Duration::from_secs(10), Duration::from_secs(30))
        .stall_timeout(Duration::from_millis(400));
    let (server, addr) = tcp_server(cfg.clone()).await;
    let client = StableConduit::<u64>::connect(TcpConnector::new(addr), cfg)
        .await
        .unwrap();
    let mut session = timeout(WAIT, server.accept()).await.unwrap().unwrap();
    let mut events = client.events();
    for i in 0..100u64 {
        client.send(&i).await.unwrap();
    }
    // Ten stall timeouts with nothing read.
    let quiet = timeout(Duration::from_secs(4), async {
        loop {
            match events.next().await {
                Some(ConduitEvent::Stalled { quiet }) => return quiet,
                Some(_) => {}
                None => std::future::pending().await,
            }
        }
    })
    .await;
    if let Ok(quiet) = quiet {
        panic!("a slow reader was reported as a stall after {quiet:?}");
    }
    assert_eq!(client.stats().state, ConduitState::Connected);
    assert!(
        client.stats().replay_frames > 0,
        "the data was acknowledged"
    );
    for i in 0..100u64 {
        assert_eq!(session.recv().await.unwrap(), Some(i));
    }
}
