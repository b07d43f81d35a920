//! The fault proxy's modes as users see them, over real TCP: the default
//! configuration forwards faithfully, `bind` listens where it is told, an
//! outage resets live and new connections for its window, a black hole
//! freezes live connections and holds new ones until it ends, `restore`
//! ends either early; and a stable conduit through the proxy comes through
//! an outage and a black hole with every message delivered exactly once, in
//! order.
//!
//! Checks that something does *not* happen during a mode run inside a mode of
//! an hour, which a short one then replaces to see it end by itself: a slow
//! machine can make such a check weaker, never make it fail.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether::fault::{FaultConfig, FaultProxy, ProxyStats};
use tether::link::{TcpConnector, TcpListener as LinkListener};
use tether::{Config, Server, StableConduit, StableReceiver, StableSender};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Upper bound for anything that should happen; only reached by a bug.
const WAIT: Duration = Duration::from_secs(20);
/// How long a check waits to see that nothing arrives.
const QUIET: Duration = Duration::from_millis(400);

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// Deterministic payload that shows truncation, reordering and mix-ups.
fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 8) as u8 ^ salt)
        .collect()
}

/// An upstream that echoes every connection until end of stream.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// An upstream that hands each accepted connection to the test.
async fn upstream() -> (SocketAddr, mpsc::UnboundedReceiver<TcpStream>) {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            if tx.send(stream).is_err() {
                break;
            }
        }
    });
    (addr, rx)
}

async fn next_upstream(rx: &mut mpsc::UnboundedReceiver<TcpStream>, what: &str) -> TcpStream {
    timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: no connection reached the upstream"))
        .expect("upstream listener gone")
}

/// Reads exactly `len` bytes, or says what came instead.
async fn read_exactly(stream: &mut TcpStream, len: usize, what: &str) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    match timeout(WAIT, stream.read_exact(&mut buf)).await {
        Ok(Ok(_)) => buf,
        Ok(Err(err)) => panic!("{what}: reading {len} bytes failed: {err}"),
        Err(_) => panic!("{what}: {len} bytes did not arrive within {WAIT:?}"),
    }
}

/// Asserts that nothing arrives on `stream` for [`QUIET`].
async fn expect_silence(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    if let Ok(res) = timeout(QUIET, stream.read(&mut buf)).await {
        match res {
            Ok(n) => panic!("{what}: expected silence, got {:?}", &buf[..n]),
            Err(err) => panic!("{what}: expected silence, got error {err}"),
        }
    }
}

/// Asserts that the proxy reset `stream`.
async fn expect_reset(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match timeout(WAIT, stream.read(&mut buf)).await {
        Ok(Err(err)) if err.kind() == io::ErrorKind::ConnectionReset => {}
        Ok(Err(err)) => panic!("{what}: expected a reset, got error {err}"),
        Ok(Ok(n)) => panic!(
            "{what}: expected a reset, got {n} bytes {:?} (0 = orderly close)",
            &buf[..n]
        ),
        Err(_) => panic!("{what}: expected a reset, the connection stayed open for {WAIT:?}"),
    }
}

async fn roundtrip(stream: &mut TcpStream, msg: &[u8], what: &str) {
    stream
        .write_all(msg)
        .await
        .unwrap_or_else(|err| panic!("{what}: write failed: {err}"));
    let back = read_exactly(stream, msg.len(), what).await;
    assert_eq!(back, msg, "{what}: echo differs");
}

/// Waits until `pred` holds for the proxy's counters.
async fn wait_for_stats(proxy: &FaultProxy, what: &str, pred: impl Fn(&ProxyStats) -> bool) {
    let res = timeout(WAIT, async {
        while !pred(&proxy.stats()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        res.is_ok(),
        "{what}: stats never got there: {:?}",
        proxy.stats()
    );
}

// ---- the proxy alone ----

#[tokio::test]
async fn default_config_forwards_faithfully_both_ways() {
    let config = FaultConfig::default();
    assert_eq!(
        (
            config.seed,
            config.mean_bytes_between_cuts,
            config.handshake_cut_probability,
            config.max_connection_age
        ),
        (0, 0, 0.0, None),
        "{config:?}"
    );
    let (up, mut conns) = upstream().await;
    let proxy = FaultProxy::start(up, config).await.unwrap();
    let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let mut server = next_upstream(&mut conns, "default").await;

    // Several MiB each way at once, so both directions are busy together.
    let c2s = pattern(3 << 20, 1);
    let s2c = pattern(2 << 20, 2);
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let (c2s_len, s2c_len) = (c2s.len(), s2c.len());
    let ((), (), got_s2c, got_c2s) = tokio::join!(
        async {
            cw.write_all(&c2s).await.unwrap();
            cw.shutdown().await.unwrap();
        },
        async {
            sw.write_all(&s2c).await.unwrap();
            sw.shutdown().await.unwrap();
        },
        async {
            let mut got = Vec::with_capacity(s2c_len);
            timeout(WAIT, cr.read_to_end(&mut got))
                .await
                .expect("server to client timed out")
                .unwrap();
            got
        },
        async {
            let mut got = Vec::with_capacity(c2s_len);
            timeout(WAIT, sr.read_to_end(&mut got))
                .await
                .expect("client to server timed out")
                .unwrap();
            got
        },
    );
    assert!(
        got_c2s == c2s,
        "client to server: {} of {} bytes, first difference at {:?}",
        got_c2s.len(),
        c2s.len(),
        got_c2s.iter().zip(&c2s).position(|(a, b)| a != b)
    );
    assert!(
        got_s2c == s2c,
        "server to client: {} of {} bytes, first difference at {:?}",
        got_s2c.len(),
        s2c.len(),
        got_s2c.iter().zip(&s2c).position(|(a, b)| a != b)
    );
    // The struct update syntax users asked for.
    let cutting = FaultConfig {
        mean_bytes_between_cuts: 4096,
        ..Default::default()
    };
    assert_eq!(cutting.mean_bytes_between_cuts, 4096);
    assert_eq!(
        proxy.stats(),
        ProxyStats {
            connections: 1,
            bytes_forwarded: (c2s.len() + s2c.len()) as u64,
            ..ProxyStats::default()
        }
    );
}

#[tokio::test]
async fn bind_listens_on_the_given_address() {
    let echo = echo_server().await;

    // A port of our choosing: find a free one, then bind the proxy to it.
    let probe = std::net::TcpListener::bind(loopback()).unwrap();
    let chosen = probe.local_addr().unwrap();
    drop(probe);
    let proxy = FaultProxy::bind(chosen, echo, FaultConfig::default())
        .await
        .unwrap_or_else(|err| panic!("binding {chosen} failed: {err}"));
    assert_eq!(proxy.local_addr(), chosen);
    let mut stream = TcpStream::connect(chosen).await.unwrap();
    roundtrip(&mut stream, b"via a chosen port", "chosen port").await;

    // The address is taken now, and bind says so.
    match FaultProxy::bind(chosen, echo, FaultConfig::default()).await {
        Err(err) => assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}"),
        Ok(other) => panic!("bound {chosen} twice: {:?}", other.local_addr()),
    }

    // Any address: the wildcard, port 0.
    let wildcard = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    let proxy = FaultProxy::bind(wildcard, echo, FaultConfig::default())
        .await
        .unwrap();
    let addr = proxy.local_addr();
    assert!(addr.ip().is_unspecified() && addr.port() != 0, "{addr}");
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, addr.port()))
        .await
        .unwrap();
    roundtrip(&mut stream, b"via the wildcard", "wildcard").await;
}

#[tokio::test]
async fn outage_cuts_live_connections_and_refuses_new_ones_until_it_ends() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo, FaultConfig::default())
        .await
        .unwrap();
    let mut live = Vec::new();
    for i in 0..2 {
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        roundtrip(&mut stream, b"before", &format!("live {i}")).await;
        live.push(stream);
    }

    // Long enough that the checks below run inside it however slow the
    // machine; it is replaced by a short one below, which ends by itself.
    proxy.outage(Duration::from_secs(3600));
    for (i, stream) in live.iter_mut().enumerate() {
        expect_reset(stream, &format!("live {i} at the outage")).await;
    }
    for i in 0..3 {
        // The connect succeeds (the kernel accepts), then the proxy resets.
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        expect_reset(
            &mut stream,
            &format!("new connection {i} during the outage"),
        )
        .await;
    }
    let during = proxy.stats();
    assert_eq!(
        (during.connections, during.cuts, during.outage_refused),
        (5, 2, 3),
        "{during:?}"
    );

    // A new outage replaces the old one; with nothing live, it cuts nothing.
    let window = Duration::from_millis(300);
    let started = tokio::time::Instant::now();
    proxy.outage(window);
    // After the window, connections are served again.
    tokio::time::sleep_until(started + window).await;
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    roundtrip(&mut stream, b"after", "after the outage").await;
    let after = proxy.stats();
    assert_eq!(
        (after.connections, after.cuts, after.outage_refused),
        (6, 2, 3),
        "{after:?}"
    );
}

#[tokio::test]
async fn restore_ends_an_outage_early() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo, FaultConfig::default())
        .await
        .unwrap();
    proxy.outage(Duration::from_secs(3600));
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    expect_reset(&mut stream, "during the outage").await;
    proxy.restore();
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    roundtrip(&mut stream, b"restored", "after restore").await;
    let stats = proxy.stats();
    assert_eq!((stats.outage_refused, stats.cuts), (1, 0), "{stats:?}");
    // Restoring with no mode active changes nothing.
    proxy.restore();
    roundtrip(&mut stream, b"still", "after a second restore").await;
}

#[tokio::test]
async fn black_hole_freezes_both_ways_and_holds_new_connections_until_it_ends() {
    let (up, mut conns) = upstream().await;
    let proxy = FaultProxy::start(up, FaultConfig::default()).await.unwrap();
    let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let mut server = next_upstream(&mut conns, "before").await;
    client.write_all(b"c1").await.unwrap();
    assert_eq!(read_exactly(&mut server, 2, "before, c2s").await, b"c1");
    server.write_all(b"s1").await.unwrap();
    assert_eq!(read_exactly(&mut client, 2, "before, s2c").await, b"s1");

    // Long enough that the checks below run inside it however slow the
    // machine; it is replaced by a short one below, which ends by itself.
    proxy.black_hole(Duration::from_secs(3600));
    client.write_all(b"c2").await.unwrap();
    server.write_all(b"s2").await.unwrap();
    // A connection opened during the black hole is accepted but goes nowhere.
    let mut held = TcpStream::connect(proxy.local_addr()).await.unwrap();
    held.write_all(b"h1").await.unwrap();
    wait_for_stats(&proxy, "held", |s| s.black_hole_held == 1).await;
    let (c2s, s2c) = tokio::join!(
        expect_silence(&mut server, "live c2s during the black hole"),
        expect_silence(&mut client, "live s2c during the black hole"),
    );
    let ((), ()) = (c2s, s2c);
    if let Ok(Some(_)) = timeout(QUIET, conns.recv()).await {
        panic!("the held connection reached the upstream during the black hole");
    }
    let during = proxy.stats();
    assert_eq!(
        (during.connections, during.bytes_forwarded, during.cuts),
        (2, 4, 0),
        "{during:?}"
    );
    proxy.black_hole(Duration::from_millis(300));

    // When it ends, everything comes through, in order, on both.
    assert_eq!(read_exactly(&mut server, 2, "after, c2s").await, b"c2");
    assert_eq!(read_exactly(&mut client, 2, "after, s2c").await, b"s2");
    let mut held_up = next_upstream(&mut conns, "held after the black hole").await;
    assert_eq!(read_exactly(&mut held_up, 2, "held, c2s").await, b"h1");
    held_up.write_all(b"h2").await.unwrap();
    assert_eq!(read_exactly(&mut held, 2, "held, s2c").await, b"h2");
    let after = proxy.stats();
    assert_eq!(
        (
            after.connections,
            after.black_hole_held,
            after.cuts,
            after.bytes_forwarded
        ),
        (2, 1, 0, 12),
        "{after:?}"
    );
}

#[tokio::test]
async fn restore_ends_a_black_hole_early_and_nothing_is_lost() {
    let (up, mut conns) = upstream().await;
    let proxy = FaultProxy::start(up, FaultConfig::default()).await.unwrap();
    let client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let mut server = next_upstream(&mut conns, "before").await;
    proxy.black_hole(Duration::from_secs(3600));

    // Far more than the socket buffers hold: the writer must block, since
    // the proxy reads nothing.
    let data = pattern(32 << 20, 3);
    let expected = data.clone();
    let written = Arc::new(AtomicU64::new(0));
    let progress = Arc::clone(&written);
    let (_client_r, mut client_w) = client.into_split();
    let writer = tokio::spawn(async move {
        for piece in data.chunks(64 << 10) {
            client_w.write_all(piece).await?;
            progress.fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        client_w.shutdown().await
    });
    expect_silence(&mut server, "during the black hole").await;
    tokio::time::sleep(QUIET).await;
    let stalled_at = written.load(Ordering::Relaxed);
    assert!(
        !writer.is_finished() && stalled_at < expected.len() as u64,
        "the writer got all {} bytes out during the black hole (written {stalled_at}): \
         the proxy kept reading",
        expected.len()
    );
    assert_eq!(proxy.stats().bytes_forwarded, 0, "{:?}", proxy.stats());

    proxy.restore();
    let mut got = Vec::with_capacity(expected.len());
    timeout(WAIT, server.read_to_end(&mut got))
        .await
        .expect("the stream did not resume after restore")
        .unwrap();
    writer.await.unwrap().unwrap();
    assert!(
        got == expected,
        "after restore: {} of {} bytes, first difference at {:?}",
        got.len(),
        expected.len(),
        got.iter().zip(&expected).position(|(a, b)| a != b)
    );
}

#[tokio::test]
async fn an_outage_replaces_a_black_hole_and_cuts_held_connections() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo, FaultConfig::default())
        .await
        .unwrap();
    let mut live = TcpStream::connect(proxy.local_addr()).await.unwrap();
    roundtrip(&mut live, b"before", "live").await;
    proxy.black_hole(Duration::from_secs(3600));
    let mut held = TcpStream::connect(proxy.local_addr()).await.unwrap();
    wait_for_stats(&proxy, "held", |s| s.black_hole_held == 1).await;
    // A zero-length outage: the cut, then service as usual.
    proxy.outage(Duration::ZERO);
    expect_reset(&mut live, "live at the outage").await;
    expect_reset(&mut held, "held at the outage").await;
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    roundtrip(&mut stream, b"after", "after the outage").await;
    let stats = proxy.stats();
    assert_eq!(
        (
            stats.connections,
            stats.cuts,
            stats.outage_refused,
            stats.black_hole_held
        ),
        (3, 2, 0, 1),
        "{stats:?}"
    );
}

// ---- a stable conduit through the proxy ----

/// (index, payload): the index shows loss, duplication and reordering.
type Numbered = (u64, Vec<u8>);

const MESSAGES: u64 = 600;

/// The one place these tests configure conduits: fast keepalive, fast
/// reconnects, handshakes that outlast a held connection.
fn conduit_config(seed: u64) -> Config {
    Config::default()
        .seed(seed)
        .keepalive(Duration::from_millis(200), Duration::from_secs(1))
        .handshake_timeout(Duration::from_secs(10))
        .reconnect_with(|r| {
            r.min_backoff(Duration::from_millis(5))
                .max_backoff(Duration::from_millis(100))
                .give_up_after(Some(Duration::from_secs(60)))
        })
}

/// A server behind a default (faithful) proxy.
struct Through {
    proxy: FaultProxy,
    server: Server<Numbered>,
}

/// A session through the proxy: the setup, the client, the server side.
async fn conduit_through_proxy(
    seed: u64,
) -> (Through, StableConduit<Numbered>, StableConduit<Numbered>) {
    let listener = LinkListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::<Numbered>::new(listener, conduit_config(seed));
    let proxy = FaultProxy::start(addr, FaultConfig::default())
        .await
        .unwrap();
    let client = StableConduit::<Numbered>::connect(
        TcpConnector::new(proxy.local_addr()),
        conduit_config(seed + 1),
    )
    .await
    .expect("the client could not connect through the proxy");
    let server_side = timeout(WAIT, server.accept())
        .await
        .expect("no session reached the server")
        .expect("the server stopped");
    (Through { proxy, server }, client, server_side)
}

/// Sends `MESSAGES` numbered messages, paced so that the stream spans the
/// fault.
fn spawn_sender(
    tx: StableSender<Numbered>,
    salt: u8,
) -> tokio::task::JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        for i in 0..MESSAGES {
            tx.send(&(i, pattern(100 + (i % 50) as usize, salt ^ i as u8)))
                .await
                .map_err(|e| format!("send {i} failed: {e}"))?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    })
}

/// Receives until all `MESSAGES` arrived, checking each; counts in `got`.
fn spawn_checker(
    mut rx: StableReceiver<Numbered>,
    salt: u8,
    got: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<StableReceiver<Numbered>, String>> {
    tokio::spawn(async move {
        for expected in 0..MESSAGES {
            let (i, payload) = match rx.recv().await {
                Ok(Some(m)) => m,
                Ok(None) => return Err(format!("ended after {expected} of {MESSAGES}")),
                Err(e) => return Err(format!("error after {expected} of {MESSAGES}: {e}")),
            };
            if i != expected {
                let what = if i > expected {
                    "lost"
                } else {
                    "duplicated or reordered"
                };
                return Err(format!("expected message {expected}, got {i} ({what})"));
            }
            if payload != pattern(100 + (i % 50) as usize, salt ^ i as u8) {
                return Err(format!("message {i}: payload corrupted"));
            }
            got.fetch_add(1, Ordering::Relaxed);
        }
        Ok(rx)
    })
}

/// Streams both ways; once the server side has received a quarter of the
/// messages, `fault` runs. Returns the client's and server side's senders
/// after every message arrived and was checked.
async fn stream_across(
    t: &Through,
    client: StableConduit<Numbered>,
    server_side: StableConduit<Numbered>,
    fault: impl FnOnce(&FaultProxy),
) -> (StableSender<Numbered>, StableSender<Numbered>) {
    let (c_tx, c_rx) = client.split();
    let (s_tx, s_rx) = server_side.split();
    let at_server = Arc::new(AtomicU64::new(0));
    let at_client = Arc::new(AtomicU64::new(0));
    let senders = [
        spawn_sender(c_tx.clone(), 0x11),
        spawn_sender(s_tx.clone(), 0x22),
    ];
    let s_check = spawn_checker(s_rx, 0x11, Arc::clone(&at_server));
    let c_check = spawn_checker(c_rx, 0x22, Arc::clone(&at_client));
    let quarter = timeout(WAIT, async {
        while at_server.load(Ordering::Relaxed) < MESSAGES / 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        quarter.is_ok(),
        "the stream did not start: server side got {}, client {} (client {:?})",
        at_server.load(Ordering::Relaxed),
        at_client.load(Ordering::Relaxed),
        c_tx.stats()
    );
    fault(&t.proxy);
    let deadline = Duration::from_secs(60);
    for (name, sender) in ["client", "server side"].into_iter().zip(senders) {
        match timeout(deadline, sender).await {
            Ok(res) => res.unwrap().unwrap_or_else(|e| panic!("{name}: {e}")),
            Err(_) => panic!(
                "{name} still sending after {deadline:?}: {:?}",
                c_tx.stats()
            ),
        }
    }
    for (name, check, got) in [
        ("server side", s_check, &at_server),
        ("client", c_check, &at_client),
    ] {
        match timeout(deadline, check).await {
            Ok(res) => drop(
                res.unwrap()
                    .unwrap_or_else(|e| panic!("{name} received: {e}")),
            ),
            Err(_) => panic!(
                "{name} got only {} of {MESSAGES} within {deadline:?}; client {:?}, \
                 server side {:?}, proxy {:?}, server {:?}",
                got.load(Ordering::Relaxed),
                c_tx.stats(),
                s_tx.stats(),
                t.proxy.stats(),
                t.server.stats()
            ),
        }
    }
    (c_tx, s_tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stable_conduit_survives_an_outage_exactly_once_in_order() {
    let (t, client, server_side) = conduit_through_proxy(500).await;
    let (c_tx, s_tx) = stream_across(&t, client, server_side, |proxy| {
        proxy.outage(Duration::from_secs(2));
    })
    .await;
    let (c, s, p) = (c_tx.stats(), s_tx.stats(), t.proxy.stats());
    eprintln!("outage: client {c:?}\nserver side {s:?}\nproxy {p:?}");
    assert!(c.reconnects >= 1, "the client never reconnected: {c:?}");
    assert!(p.cuts >= 1, "the outage cut nothing: {p:?}");
    assert!(
        p.outage_refused >= 1,
        "no reconnect attempt met the outage: {p:?}, client {c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stable_conduit_survives_a_black_hole_exactly_once_in_order() {
    let (t, client, server_side) = conduit_through_proxy(600).await;
    let (c_tx, s_tx) = stream_across(&t, client, server_side, |proxy| {
        proxy.black_hole(Duration::from_secs(3));
    })
    .await;
    let (c, s, p) = (c_tx.stats(), s_tx.stats(), t.proxy.stats());
    eprintln!("black hole: client {c:?}\nserver side {s:?}\nproxy {p:?}");
    assert!(
        c.keepalive_timeouts + s.keepalive_timeouts >= 1,
        "neither side declared the black-holed link dead: client {c:?}, server side {s:?}"
    );
    assert_eq!(p.outage_refused, 0, "{p:?}");
}
