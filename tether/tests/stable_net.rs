//! Stable conduits over every transport of the matrix
//! (`common::transport`): links cut at random points (mid-frame and inside
//! the handshake: the [`FaultProxy`] for the transports over TCP, the
//! budget relays for memory and Unix sockets), cuts while a burst is being
//! replayed, two clients on one server, one-way traffic; and Unix sockets
//! whose links the test shuts down under the conduit's feet.
//!
//! Every run checks with the shared harness that each message arrives
//! exactly once, in order and intact, in both directions at once, and that
//! the faults really happened (cutter and conduit counters).
//!
//! Run with `-- --nocapture` to see the counters of each run.

mod common;

use std::io;
use std::net::{Ipv4Addr, Shutdown};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::transport::{Cutter, Transport};
use common::{check_receiver, config, exchange, spawn_senders, within, Msg, Traffic};
use rand::{Rng, SeedableRng};
use tether::fault::{FaultConfig, ProxyStats};
use tether::link::any::AnyLink;
use tether::link::{
    StreamConfig, StreamLink, TcpConnector, TcpLink, TcpListener, UnixLink, UnixListener,
};
use tether::{
    ConduitState, Config, Connector, Link, LinkError, LinkRx, Server, ServerStats, StableConduit,
    StableSender, Stats,
};

// ---- helpers ----

fn fault(seed: u64, mean_bytes_between_cuts: u64, handshake_cut_probability: f64) -> FaultConfig {
    FaultConfig {
        seed,
        mean_bytes_between_cuts,
        handshake_cut_probability,
        max_connection_age: None,
    }
}

/// Connects a client through `connector` and accepts its session on
/// `server`. `taken` counts the sessions already accepted from `server`.
///
/// A cut that lands right after the proxy forwarded a complete *new-session*
/// hello makes the server create a session whose ServerHello never reaches
/// the client; the client then retries without a key and gets a second
/// session. The server hands both out, in creation order, and the first one
/// never hears from its client again. The client's session is therefore the
/// newest one created when `connect` returns; the orphans before it are
/// dropped (which ends them) and counted.
async fn connect_session<C: Connector>(
    server: &Server<Msg>,
    taken: &mut u64,
    connector: C,
    cfg: Config,
) -> (StableConduit<Msg>, StableConduit<Msg>, u64) {
    let client = StableConduit::<Msg>::connect(connector, cfg)
        .await
        .expect("the client could not connect");
    // The server counts a session before its ServerHello goes out, so the
    // client's session is counted by now.
    let created = server.stats().sessions_created;
    assert!(created > *taken, "the client connected to no new session");
    let mut orphans = 0;
    loop {
        let session = server.accept().await.expect("the server stopped");
        *taken += 1;
        if *taken == created {
            return (client, session, orphans);
        }
        orphans += 1;
        drop(session);
    }
}

/// Counters of one run, for assertions and for the `--nocapture` report.
struct Run {
    proxy: ProxyStats,
    client: Stats,
    server_side: Stats,
    server: ServerStats,
    orphans: u64,
}

impl Run {
    fn report(&self, label: &str) {
        let (p, c, s) = (&self.proxy, &self.client, &self.server_side);
        eprintln!(
            "{label}: proxy connections {} cuts {} handshake {} mid-frame {} bytes {}; \
             client reconnects {} sent {} replayed {} dups {}; \
             server side reconnects {} sent {} replayed {} dups {}; \
             server resumes {} rejected {} bad handshakes {} sessions {}; orphans {}",
            p.connections,
            p.cuts,
            p.handshake_cuts,
            p.mid_frame_cuts,
            p.bytes_forwarded,
            c.reconnects,
            c.frames_sent,
            c.frames_replayed,
            c.duplicates_dropped,
            s.reconnects,
            s.frames_sent,
            s.frames_replayed,
            s.duplicates_dropped,
            self.server.resumes,
            self.server.rejected,
            self.server.bad_handshakes,
            self.server.sessions_created,
            self.orphans,
        );
    }
}

fn add(total: &mut ProxyStats, p: &ProxyStats) {
    total.connections += p.connections;
    total.cuts += p.cuts;
    total.handshake_cuts += p.handshake_cuts;
    total.mid_frame_cuts += p.mid_frame_cuts;
    total.bytes_forwarded += p.bytes_forwarded;
}

/// The traffic the other side sends back: same shape, other payloads.
fn reply(t: Traffic) -> Traffic {
    Traffic {
        seed: t.seed + 1_000_000,
        ..t
    }
}

/// One client and one server of `transport`, the client's links cut as
/// `fault` plans, traffic both ways.
async fn cut_run(transport: Transport, seed: u64, fault: FaultConfig, t: Traffic) -> Run {
    let mut fx = transport.fixture().await;
    let server = Server::<Msg>::new(fx.listener(), config(seed));
    let cutter = fx.cutting(fault).await;
    let mut taken = 0;
    let (client, server_side, orphans) =
        connect_session(&server, &mut taken, cutter.clone(), config(seed)).await;
    let (client_tx, server_tx) = exchange(client, server_side, t, reply(t))
        .await
        .unwrap_or_else(|e| panic!("{transport}, seed {seed}: {e}"));
    let run = Run {
        proxy: cutter.stats(),
        client: client_tx.stats(),
        server_side: server_tx.stats(),
        server: server.stats(),
        orphans,
    };
    // Nothing beyond the traffic was delivered (duplicates are not counted).
    assert_eq!(run.client.frames_received, t.total(), "seed {seed}");
    assert_eq!(run.server_side.frames_received, t.total(), "seed {seed}");
    run
}

/// Message sizes: mostly up to 300 bytes, one in 50 of `max_len` bytes, so
/// that frames span many TCP segments and budget cuts split them.
const MAX_LEN: usize = 20_000;

// ---- 1. random cuts, many seeds ----

/// Both directions at once, four sender tasks per side, through a cutter
/// that cuts every connection after an exponentially distributed number of
/// bytes (mean 50 kB, so dozens of cuts per run, nearly all inside a frame)
/// and cuts one connection in five inside the handshake (0..=32 client
/// bytes).
async fn random_cuts_many_seeds(transport: Transport) {
    let mut total = ProxyStats::default();
    let mut reconnects = 0;
    let mut replayed = 0;
    for seed in 0..4 {
        let t = Traffic {
            seed,
            streams: 4,
            per_stream: 300,
            max_len: MAX_LEN,
        };
        let run = within(cut_run(transport, seed, fault(seed, 50_000, 0.2), t)).await;
        run.report(&format!("{transport}: random cuts, seed {seed}"));
        assert!(run.proxy.cuts > 0, "seed {seed}: the cutter never cut");
        assert!(
            run.client.reconnects > 0,
            "seed {seed}: the client never reconnected"
        );
        assert!(
            run.server.resumes > 0,
            "seed {seed}: no resume reached the server"
        );
        add(&mut total, &run.proxy);
        reconnects += run.client.reconnects;
        replayed += run.client.frames_replayed + run.server_side.frames_replayed;
    }
    eprintln!(
        "{transport}: random cuts, all seeds: {total:?}, reconnects {reconnects}, \
         replayed {replayed}"
    );
    assert!(total.mid_frame_cuts > 0, "no cut landed inside a frame");
    assert!(total.handshake_cuts > 0, "no cut landed in a handshake");
    assert!(replayed > 0, "nothing was ever replayed");
}

transport_tests!(random_cuts_many_seeds);

// ---- 2. cuts while a burst is replayed ----

/// A cutting connector with a gate: while it is closed, connecting fails as
/// if the server were unreachable.
#[derive(Clone)]
struct Gate {
    inner: Cutter,
    open: Arc<AtomicBool>,
    /// `connect` calls under way (they may have passed the gate).
    in_flight: Arc<AtomicU64>,
}

struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    fn new(inner: Cutter) -> Gate {
        Gate {
            inner,
            open: Arc::new(AtomicBool::new(true)),
            in_flight: Arc::default(),
        }
    }

    /// Closes the gate and cuts every link it handed out, including one
    /// that was connecting while the gate closed.
    async fn close_and_cut(&self) {
        let cutter = &self.inner;
        self.open.store(false, Ordering::SeqCst);
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Every link is connected now, but a proxy may not have accepted
        // the newest yet: cut until no connection arrived for 10 ms.
        loop {
            let seen = cutter.stats().connections;
            cutter.cut_all();
            tokio::time::sleep(Duration::from_millis(10)).await;
            if cutter.stats().connections == seen {
                return;
            }
        }
    }

    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Connector for Gate {
    type Link = AnyLink;
    async fn connect(&self) -> Result<AnyLink, LinkError> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight(&self.in_flight);
        if !self.open.load(Ordering::SeqCst) {
            return Err(LinkError::Io(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "gate closed",
            )));
        }
        self.inner.connect().await
    }
}

async fn wait_for_state(tx: &StableSender<Msg>, state: ConduitState) {
    let mut changes = tx.state_changes();
    tokio::time::timeout(Duration::from_secs(10), changes.wait_for(|s| *s == state))
        .await
        .unwrap_or_else(|_| panic!("the conduit never reached {state:?}"))
        .unwrap();
}

/// Waits until neither side holds an unacknowledged frame.
async fn wait_for_drained(a: &StableSender<Msg>, b: &StableSender<Msg>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while a.stats().replay_frames > 0 || b.stats().replay_frames > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replay buffers never drained: {} and {} frames",
            a.stats().replay_frames,
            b.stats().replay_frames
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Cuts every connection of `cutter` at random intervals until stopped.
fn spawn_cut_all(
    cutter: Cutter,
    seed: u64,
    max_gap_ms: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut cuts = 0;
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(1..=max_gap_ms))).await;
            cutter.cut_all();
            cuts += 1;
        }
        cuts
    })
}

/// Samples both ends every millisecond until `stop`; returns the highest
/// client resume count seen while the server still lacked frames
/// (`server_target` received in all) and while the client did.
fn spawn_replay_monitor(
    client: StableSender<Msg>,
    server: StableSender<Msg>,
    client_target: u64,
    server_target: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<[u64; 2]> {
    tokio::spawn(async move {
        let mut seen = [0, 0];
        while !stop.load(Ordering::Relaxed) {
            // Resumes first: each one counted here began before the
            // receive counters are read, so if a side still lacks frames
            // then, it lacked them when that resume began.
            let resumes = client.stats().reconnects;
            let server_received = server.stats().frames_received;
            let client_received = client.stats().frames_received;
            if server_received < server_target {
                seen[0] = seen[0].max(resumes);
            }
            if client_received < client_target {
                seen[1] = seen[1].max(resumes);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen
    })
}

/// Per round: the link is cut and the server made unreachable, both sides
/// queue a burst of thousands of messages, then the gate opens. The resume
/// replays the whole burst, and the cutter's budget cuts plus `cut_all`
/// every few milliseconds cut the link again and again while it is
/// replaying.
///
/// A monitor proves that cuts landed during the replay: it samples both
/// ends and records the client's resume count whenever a side still lacks
/// part of the burst it is owed. The first resume after the gate opens
/// starts the replay; every later resume seen while frames are still missing
/// began after a link carrying the replay was cut.
async fn cuts_during_replay_of_a_queued_burst(transport: Transport) {
    within(async move {
        let seed = 40;
        let mut fx = transport.fixture().await;
        let server = Server::<Msg>::new(fx.listener(), config(seed));
        let proxy = fx.cutting(fault(seed, 60_000, 0.1)).await;
        let gate = Gate::new(proxy.clone());
        let mut taken = 0;
        let (client, server_side, orphans) =
            connect_session(&server, &mut taken, gate.clone(), config(seed)).await;
        let (client_tx, mut client_rx) = client.split();
        let (server_tx, mut server_rx) = server_side.split();
        // Until a side hears the peer's receive window (announced right
        // after the hellos) it holds itself to the initial window, and a
        // burst queued while the link is down would wait for the gate. One
        // message each way proves both announcements arrived.
        let hello = Traffic {
            seed: seed * 1000,
            streams: 1,
            per_stream: 1,
            max_len: 8,
        };
        for s in spawn_senders(&client_tx, hello)
            .into_iter()
            .chain(spawn_senders(&server_tx, hello))
        {
            s.await.unwrap().unwrap();
        }
        check_receiver(&mut server_rx, hello).await.unwrap();
        check_receiver(&mut client_rx, hello).await.unwrap();
        for round in 0..3 {
            let up = Traffic {
                seed: seed * 100 + round,
                streams: 4,
                per_stream: 750,
                max_len: MAX_LEN,
            };
            let down = reply(up);

            // The previous round's last frames may still await their acks;
            // let them drain so that the burst alone fills the replay
            // buffers (under load it would otherwise meet the byte bound and
            // the senders would wait, through the closed gate, until give-up).
            wait_for_drained(&client_tx, &server_tx).await;
            // Link down, server unreachable.
            gate.close_and_cut().await;
            wait_for_state(&client_tx, ConduitState::Reconnecting).await;

            let senders: Vec<_> = spawn_senders(&client_tx, up)
                .into_iter()
                .chain(spawn_senders(&server_tx, down))
                .collect();
            for s in senders {
                s.await
                    .unwrap()
                    .expect("a send failed while the link was down");
            }
            assert_eq!(
                client_tx.stats().state,
                ConduitState::Reconnecting,
                "round {round}: the client got a link through a closed gate"
            );
            let client_before = client_tx.stats();
            let server_before = server_tx.stats();
            let proxy_before = proxy.stats();
            assert!(client_before.replay_frames as u64 >= up.total());

            let to_server = tokio::spawn(async move {
                let got = check_receiver(&mut server_rx, up).await;
                got.map(|()| server_rx)
            });
            let to_client = tokio::spawn(async move {
                let got = check_receiver(&mut client_rx, down).await;
                got.map(|()| client_rx)
            });
            let stop = Arc::new(AtomicBool::new(false));
            let monitor = spawn_replay_monitor(
                client_tx.clone(),
                server_tx.clone(),
                client_before.frames_received + down.total(),
                server_before.frames_received + up.total(),
                stop.clone(),
            );
            let chaos = spawn_cut_all(proxy.clone(), seed + round, 15, stop.clone());
            gate.open();
            server_rx = to_server
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}, server received: {e}"));
            client_rx = to_client
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}, client received: {e}"));
            stop.store(true, Ordering::Relaxed);
            let cut_alls = chaos.await.unwrap();
            let [up_resumes, down_resumes] = monitor.await.unwrap();
            let base = client_before.reconnects;
            // Resumes after the first one of this round, seen while the
            // client's (up) or the server's (down) burst was incomplete.
            let up_interrupted = up_resumes.saturating_sub(base + 1);
            let down_interrupted = down_resumes.saturating_sub(base + 1);

            let client_after = client_tx.stats();
            let server_after = server_tx.stats();
            let proxy_after = proxy.stats();
            let client_replayed = client_after.frames_replayed - client_before.frames_replayed;
            let server_replayed = server_after.frames_replayed - server_before.frames_replayed;
            eprintln!(
                "replay round {round}: burst {} each way; proxy cuts {} (in handshakes {}, \
                 mid-frame {}; cut_all calls {cut_alls}); client reconnects {} replayed {} frames; \
                 server side replayed {} frames; resumes while the burst was incomplete: \
                 up {up_interrupted} down {down_interrupted}",
                up.total(),
                proxy_after.cuts - proxy_before.cuts,
                proxy_after.handshake_cuts - proxy_before.handshake_cuts,
                proxy_after.mid_frame_cuts - proxy_before.mid_frame_cuts,
                client_after.reconnects - client_before.reconnects,
                client_replayed,
                server_replayed,
            );
            assert!(
                client_replayed > 0,
                "round {round}: the client replayed nothing"
            );
            assert!(
                server_replayed > 0,
                "round {round}: the server replayed nothing"
            );
            assert!(
                up_interrupted > 0,
                "round {round}: no cut landed while the client's burst was replayed"
            );
            assert!(
                down_interrupted > 0,
                "round {round}: no cut landed while the server's burst was replayed"
            );
        }
        let (c, s) = (client_tx.stats(), server_tx.stats());
        assert_eq!(c.frames_received, 1 + 3 * 3_000, "{c:?}");
        assert_eq!(s.frames_received, 1 + 3 * 3_000, "{s:?}");
        assert!(c.frames_replayed > 0 && s.frames_replayed > 0);
        Run {
            proxy: proxy.stats(),
            client: c,
            server_side: s,
            server: server.stats(),
            orphans,
        }
        .report(&format!("{transport}: replay, total"));
    })
    .await;
}

transport_tests!(cuts_during_replay_of_a_queued_burst);

// ---- 3. Unix sockets ----

/// A socket path under the temporary directory, unique per process and
/// test, removed when dropped.
struct SocketPath(PathBuf);

impl SocketPath {
    fn new(name: &str) -> SocketPath {
        let path = std::env::temp_dir().join(format!(
            "tether-stable-net-{}-{name}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        SocketPath(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A Unix-socket connector that keeps a duplicate of every socket it hands
/// out, so that the test can shut the connections down under the links.
///
/// `shutdown(Both)` on a Unix stream socket ends both directions for both
/// peers: writers fail with a broken pipe, readers get end-of-file after
/// what was already queued — wherever the writer was, often inside a frame.
#[derive(Clone)]
struct KillableUnix {
    path: PathBuf,
    live: Arc<Mutex<Vec<std::os::unix::net::UnixStream>>>,
    links: Arc<AtomicU64>,
}

impl KillableUnix {
    fn new(path: &Path) -> KillableUnix {
        KillableUnix {
            path: path.to_path_buf(),
            live: Arc::default(),
            links: Arc::default(),
        }
    }

    fn kill_all(&self) -> usize {
        let live = std::mem::take(&mut *self.live.lock().unwrap());
        for socket in &live {
            let _ = socket.shutdown(Shutdown::Both);
        }
        live.len()
    }
}

impl Connector for KillableUnix {
    type Link = UnixLink;
    async fn connect(&self) -> Result<UnixLink, LinkError> {
        let stream = tokio::net::UnixStream::connect(&self.path).await?;
        // `into_std` leaves the socket non-blocking, as `from_std` needs.
        let std_stream = stream.into_std()?;
        let handle = std_stream.try_clone()?;
        self.live.lock().unwrap().push(handle);
        self.links.fetch_add(1, Ordering::Relaxed);
        let stream = tokio::net::UnixStream::from_std(std_stream)?;
        Ok(StreamLink::unix(stream, StreamConfig::default()))
    }
}

/// The plain connector and listener, no faults: a round trip both ways, on
/// one link.
async fn round_trip_without_faults(transport: Transport) {
    within(async move {
        let mut fx = transport.fixture().await;
        let server = Server::<Msg>::new(fx.listener(), config(50));
        let client = StableConduit::<Msg>::connect(fx.connector(), config(50))
            .await
            .unwrap();
        let server_side = server.accept().await.unwrap();
        let t = Traffic {
            seed: 50,
            streams: 4,
            per_stream: 500,
            max_len: MAX_LEN,
        };
        let (client_tx, server_tx) = exchange(client, server_side, t, reply(t)).await.unwrap();
        let (c, s) = (client_tx.stats(), server_tx.stats());
        assert_eq!((c.reconnects, s.reconnects), (0, 0));
        assert_eq!(
            (c.frames_received, s.frames_received),
            (t.total(), t.total())
        );
        assert_eq!((c.frames_replayed, s.frames_replayed), (0, 0));
        assert_eq!(server.stats().links_accepted, 1);
    })
    .await;
}

transport_tests!(round_trip_without_faults);

/// Unix-socket links shut down at random moments (every 0–2 ms), for
/// several seeds; the client reconnects over fresh sockets each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_links_shut_down_repeatedly() {
    for seed in 60..63 {
        within(async move {
            let sock = SocketPath::new(&format!("chaos-{seed}"));
            let server = Server::<Msg>::new(UnixListener::bind(sock.path()).unwrap(), config(seed));
            let connector = KillableUnix::new(sock.path());
            let client = StableConduit::<Msg>::connect(connector.clone(), config(seed))
                .await
                .unwrap();
            let server_side = server.accept().await.unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let chaos = {
                let (connector, stop) = (connector.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
                    let mut killed = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let gap = rng.random_range(0..=2_000);
                        tokio::time::sleep(Duration::from_micros(gap)).await;
                        killed += connector.kill_all();
                    }
                    killed
                })
            };
            let t = Traffic {
                seed,
                streams: 4,
                per_stream: 1_500,
                max_len: MAX_LEN,
            };
            let (client_tx, server_tx) = exchange(client, server_side, t, reply(t))
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            stop.store(true, Ordering::Relaxed);
            let killed = chaos.await.unwrap();
            let (c, s) = (client_tx.stats(), server_tx.stats());
            eprintln!(
                "unix, seed {seed}: links {} killed {killed}; client reconnects {} replayed {}; \
                 server side reconnects {} replayed {}; server {:?}",
                connector.links.load(Ordering::Relaxed),
                c.reconnects,
                c.frames_replayed,
                s.reconnects,
                s.frames_replayed,
                server.stats(),
            );
            assert!(killed > 0, "seed {seed}: no link was shut down");
            assert!(
                c.reconnects > 0,
                "seed {seed}: the client never reconnected"
            );
            assert_eq!(c.frames_received, t.total(), "seed {seed}");
            assert_eq!(s.frames_received, t.total(), "seed {seed}");
        })
        .await;
    }
}

// ---- 4. two clients, one server ----

/// Two clients with different traffic seeds on one server, through one
/// cutter: each session gets exactly its own messages (a message crossing
/// sessions fails the payload check).
async fn two_clients_through_cuts_do_not_cross_talk(transport: Transport) {
    within(async move {
        let seed = 70;
        let mut fx = transport.fixture().await;
        let server = Server::<Msg>::new(fx.listener(), config(seed));
        let proxy = fx.cutting(fault(seed, 50_000, 0.2)).await;
        let mut taken = 0;
        let (a, sa, orphans_a) =
            connect_session(&server, &mut taken, proxy.clone(), config(71)).await;
        let (b, sb, orphans_b) =
            connect_session(&server, &mut taken, proxy.clone(), config(72)).await;
        let ta = Traffic {
            seed: 700,
            streams: 3,
            per_stream: 500,
            max_len: MAX_LEN,
        };
        let tb = Traffic {
            seed: 800,
            streams: 4,
            per_stream: 400,
            max_len: MAX_LEN,
        };
        let (ra, rb) = tokio::join!(
            exchange(a, sa, ta, reply(ta)),
            exchange(b, sb, tb, reply(tb))
        );
        let (a_tx, sa_tx) = ra.unwrap_or_else(|e| panic!("client a: {e}"));
        let (b_tx, sb_tx) = rb.unwrap_or_else(|e| panic!("client b: {e}"));
        let server_stats = server.stats();
        for (name, tx, stx, t) in [("a", &a_tx, &sa_tx, ta), ("b", &b_tx, &sb_tx, tb)] {
            let run = Run {
                proxy: proxy.stats(),
                client: tx.stats(),
                server_side: stx.stats(),
                server: server_stats.clone(),
                orphans: orphans_a + orphans_b,
            };
            run.report(&format!("{transport}: two clients, client {name}"));
            assert!(run.client.reconnects > 0, "client {name} never reconnected");
            assert_eq!(run.client.frames_received, t.total(), "client {name}");
            assert_eq!(run.server_side.frames_received, t.total(), "client {name}");
        }
        assert!(proxy.stats().cuts > 0);
        assert_eq!(
            server_stats.sessions_created,
            2 + orphans_a + orphans_b,
            "{server_stats:?}"
        );
    })
    .await;
}

transport_tests!(two_clients_through_cuts_do_not_cross_talk);

// ---- soak ----

/// The random-cut run at scale, on every transport: 16 seeds, 100,000
/// messages per seed (50,000 each way), 1.6 million messages per transport.
/// Over TCP alone it took 32.6 s in release on two cores (longer in debug);
/// run it with
/// `cargo test -p tether --release --test stable_net -- --ignored --nocapture soak`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: minutes in release, run on demand (see the doc comment)"]
async fn soak_through_cuts() {
    for transport in Transport::ALL {
        let mut total = ProxyStats::default();
        let mut reconnects = 0;
        for seed in 1000..1016 {
            let t = Traffic {
                seed,
                streams: 4,
                per_stream: 12_500,
                max_len: MAX_LEN,
            };
            let run = within(cut_run(transport, seed, fault(seed, 80_000, 0.2), t)).await;
            run.report(&format!("{transport}: soak, seed {seed}"));
            assert!(run.client.reconnects > 0, "{transport}, seed {seed}");
            add(&mut total, &run.proxy);
            reconnects += run.client.reconnects;
        }
        eprintln!("{transport}: soak, all seeds: {total:?}, reconnects {reconnects}");
        assert!(
            total.mid_frame_cuts > 0 && total.handshake_cuts > 0,
            "{transport}"
        );
    }
}

// ---- known bugs (ignored so the suite stays green) ----

/// A TCP connector whose first link loses the server's answer: the client's
/// hello reaches the server, the ServerHello comes back, and the link then
/// fails as if it had been cut just before the client read the answer.
/// Through the proxy this is a handshake cut after exactly the 29 bytes of
/// the hello; here it is deterministic.
#[derive(Clone)]
struct LoseFirstReply {
    inner: TcpConnector,
    links: Arc<AtomicU64>,
}

struct LossyLink(TcpLink, bool);
struct LossyRx(<TcpLink as Link>::Rx, bool);

impl Link for LossyLink {
    type Tx = <TcpLink as Link>::Tx;
    type Rx = LossyRx;
    fn split(self) -> (Self::Tx, LossyRx) {
        let (tx, rx) = self.0.split();
        (tx, LossyRx(rx, self.1))
    }
}

impl LinkRx for LossyRx {
    async fn recv(&mut self) -> Result<Option<Bytes>, LinkError> {
        let got = self.0.recv().await?;
        if std::mem::take(&mut self.1) {
            return Err(LinkError::Reset);
        }
        Ok(got)
    }

    fn set_max_payload(&mut self, max: usize) {
        self.0.set_max_payload(max);
    }
}

impl Connector for LoseFirstReply {
    type Link = LossyLink;
    async fn connect(&self) -> Result<LossyLink, LinkError> {
        let first = self.links.fetch_add(1, Ordering::Relaxed) == 0;
        Ok(LossyLink(self.inner.connect().await?, first))
    }
}

/// When the answer to a new-session hello is lost, the client retries
/// without a key and gets a second session. The first is an orphan nobody
/// holds: `Server::accept` must hand out the client's session, not the
/// orphan (which expires unseen after the resume window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answer_to_a_new_session_leaves_no_orphan() {
    within(async move {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cfg = config(80);
        cfg = cfg.handshake_timeout(Duration::from_millis(500));
        let server = Server::<Msg>::new(listener, cfg.clone());
        let connector = LoseFirstReply {
            inner: TcpConnector::new(addr),
            links: Arc::default(),
        };
        let client = StableConduit::<Msg>::connect(connector.clone(), cfg)
            .await
            .unwrap();
        client.send(&(0, 0, vec![1])).await.unwrap();
        assert_eq!(connector.links.load(Ordering::Relaxed), 2);
        let mut first = server.accept().await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), first.recv()).await {
            Ok(Ok(Some(msg))) => assert_eq!(msg, (0, 0, vec![1])),
            Ok(Ok(None) | Err(_)) => {}
            Err(_) => panic!(
                "accept() handed out a session no client holds: after 5 s it has \
                 neither received nor ended (state {:?}, server {:?})",
                first.stats().state,
                server.stats()
            ),
        }
    })
    .await;
}

/// A receiver that consumes everything but never sends still acknowledges
/// (standalone acks), so one-way traffic far beyond the replay bound (64
/// frames here) completes.
async fn one_way_traffic_beyond_the_replay_bound_completes(transport: Transport) {
    within(async move {
        let mut fx = transport.fixture().await;
        let server = Server::<Msg>::new(fx.listener(), config(81));
        let mut cfg = config(81);
        cfg = cfg.max_replay(1 << 20, 64);
        let client = StableConduit::<Msg>::connect(fx.connector(), cfg)
            .await
            .unwrap();
        let (_server_tx, mut server_rx) = server.accept().await.unwrap().split();
        let (client_tx, _client_rx) = client.split();
        let t = Traffic {
            seed: 81,
            streams: 1,
            per_stream: 200,
            max_len: 10,
        };
        let senders = spawn_senders(&client_tx, t);
        let got = tokio::time::timeout(Duration::from_secs(5), check_receiver(&mut server_rx, t))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "one-way traffic stalled: the receiver consumed everything it got, \
                     the sender waits for an ack that never comes ({:?})",
                    client_tx.stats()
                )
            });
        got.unwrap();
        for s in senders {
            s.await.unwrap().unwrap();
        }
    })
    .await;
}

transport_tests!(one_way_traffic_beyond_the_replay_bound_completes);
