//! The server's monitoring snapshot and its export through the `metrics`
//! facade: real sessions over memory links, cut while they stream, one
//! closed while another lives on. The snapshot's totals must only grow,
//! must equal the sum of every session's own final counters once all have
//! ended, and what `tether::metrics` records must be the snapshot's values
//! under the documented names (`docs/METRICS.md`).
//!
//! The `metrics` feature is on for this file through tether's
//! dev-dependency on itself, so every `cargo test` runs it.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::config;
use metrics::Label;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;
use tether::link::mem;
use tether::{ServerSnapshot, SessionTotals, StableConduit, StableSender, Stats};

type Msg = u64;

/// Labels a metric adds to the caller's.
type Extra<'a> = &'a [(&'a str, &'a str)];

/// What was recorded: (kind, name, sorted labels) to the value.
type Recorded = HashMap<(MetricKind, String, Vec<(String, String)>), f64>;

fn record(f: impl FnOnce()) -> Recorded {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, f);
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (kind, key) = key.into_parts();
            let mut labels: Vec<_> = key
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            labels.sort();
            let value = match value {
                DebugValue::Counter(n) => n as f64,
                DebugValue::Gauge(g) => g.0,
                DebugValue::Histogram(_) => panic!("tether records no histogram"),
            };
            ((kind, key.name().to_string(), labels), value)
        })
        .collect()
}

/// The value recorded for `name` with the server label and `extra`.
fn value(recorded: &Recorded, kind: MetricKind, name: &str, extra: &[(&str, &str)]) -> f64 {
    let mut labels = vec![("server".to_string(), "test".to_string())];
    labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    labels.sort();
    *recorded
        .get(&(kind, name.to_string(), labels.clone()))
        .unwrap_or_else(|| panic!("{name} {labels:?} was not recorded"))
}

fn seconds(d: Option<Duration>) -> f64 {
    d.map_or(0.0, |d| d.as_secs_f64())
}

/// Records `snap` and checks every metric against it.
fn check_recorded(snap: &ServerSnapshot) -> Recorded {
    let r = record(|| {
        tether::metrics::record_server(snap, &[Label::new("server", "test")]);
    });
    let (s, t, l) = (&snap.stats, &snap.totals, &snap.live);
    let c = |name: &str, extra: &[(&str, &str)]| value(&r, MetricKind::Counter, name, extra);
    let g = |name: &str| value(&r, MetricKind::Gauge, name, &[]);
    let counters: &[(&str, Extra<'_>, u64)] = &[
        ("tether_server_links_accepted_total", &[], s.links_accepted),
        (
            "tether_server_links_refused_total",
            &[("reason", "pending_cap")],
            s.handshakes_refused,
        ),
        (
            "tether_server_links_refused_total",
            &[("reason", "bad_handshake")],
            s.bad_handshakes,
        ),
        (
            "tether_server_links_refused_total",
            &[("reason", "rejected")],
            s.rejected,
        ),
        (
            "tether_server_links_refused_total",
            &[("reason", "bad_proof")],
            s.bad_proofs,
        ),
        (
            "tether_server_links_refused_total",
            &[("reason", "busy")],
            s.refused_busy,
        ),
        (
            "tether_server_links_refused_total",
            &[("reason", "denied")],
            s.refused_denied,
        ),
        (
            "tether_server_links_refused_total",
            &[("reason", "policy")],
            s.refused_policy,
        ),
        (
            "tether_server_sessions_created_total",
            &[],
            s.sessions_created,
        ),
        (
            "tether_server_sessions_ended_total",
            &[("outcome", "closed")],
            s.sessions_closed,
        ),
        (
            "tether_server_sessions_ended_total",
            &[("outcome", "lost")],
            s.sessions_lost,
        ),
        (
            "tether_server_sessions_ended_total",
            &[("outcome", "unproven")],
            s.unproven_dropped,
        ),
        ("tether_server_resumes_total", &[], s.resumes),
        ("tether_server_proof_resumes_total", &[], s.proof_resumes),
        ("tether_server_sent_frames_total", &[], t.frames_sent),
        (
            "tether_server_received_frames_total",
            &[],
            t.frames_received,
        ),
        (
            "tether_server_replayed_frames_total",
            &[],
            t.frames_replayed,
        ),
        ("tether_server_replayed_bytes_total", &[], t.bytes_replayed),
        (
            "tether_server_duplicate_frames_total",
            &[],
            t.duplicates_dropped,
        ),
        (
            "tether_server_dead_links_total",
            &[("reason", "keepalive")],
            t.keepalive_timeouts,
        ),
        (
            "tether_server_dead_links_total",
            &[("reason", "idle")],
            t.idle_timeouts,
        ),
        (
            "tether_server_dead_links_total",
            &[("reason", "ack_stall")],
            t.ack_stalls,
        ),
        (
            "tether_server_unsolicited_pongs_total",
            &[],
            t.unsolicited_pongs,
        ),
    ];
    for &(name, extra, expected) in counters {
        assert_eq!(c(name, extra), expected as f64, "{name} {extra:?}");
    }
    let gauges: &[(&str, f64)] = &[
        ("tether_server_sessions_open", s.sessions_open as f64),
        ("tether_server_sessions_detached", l.detached as f64),
        ("tether_server_tombstones", s.tombstones as f64),
        (
            "tether_server_pending_handshakes",
            s.pending_handshakes as f64,
        ),
        ("tether_server_memory_used_bytes", s.memory_used as f64),
        (
            "tether_server_memory_budget_bytes",
            snap.memory_budget as f64,
        ),
        ("tether_server_replay_buffer_frames", l.replay_frames as f64),
        ("tether_server_replay_buffer_bytes", l.replay_bytes as f64),
        ("tether_server_recv_queue_bytes", l.recv_queue_bytes as f64),
        ("tether_server_rtt_sessions", l.rtt_sessions as f64),
        ("tether_server_rtt_min_seconds", seconds(l.rtt_min)),
        ("tether_server_rtt_mean_seconds", seconds(l.rtt_mean)),
        ("tether_server_rtt_max_seconds", seconds(l.rtt_max)),
    ];
    for &(name, expected) in gauges {
        assert_eq!(g(name), expected, "{name}");
    }
    // Nothing recorded that the checks above (and the docs) do not name.
    assert_eq!(r.len(), counters.len() + gauges.len(), "{r:#?}");
    r
}

fn assert_grew(before: &SessionTotals, after: &SessionTotals) {
    let pairs = [
        (before.frames_sent, after.frames_sent),
        (before.frames_received, after.frames_received),
        (before.frames_replayed, after.frames_replayed),
        (before.bytes_replayed, after.bytes_replayed),
        (before.duplicates_dropped, after.duplicates_dropped),
        (before.keepalive_timeouts, after.keepalive_timeouts),
    ];
    for (b, a) in pairs {
        assert!(a >= b, "a total went down: {before:?} then {after:?}");
    }
}

fn sum(stats: &[Stats]) -> SessionTotals {
    let mut t = SessionTotals::default();
    for s in stats {
        t.frames_sent += s.frames_sent;
        t.frames_received += s.frames_received;
        t.frames_replayed += s.frames_replayed;
        t.bytes_replayed += s.bytes_replayed;
        t.duplicates_dropped += s.duplicates_dropped;
        t.keepalive_timeouts += s.keepalive_timeouts;
        t.idle_timeouts += s.idle_timeouts;
        t.ack_stalls += s.ack_stalls;
        t.unsolicited_pongs += s.unsolicited_pongs;
    }
    t
}

/// A session whose server side is proven: its first message came back.
/// (A cut in a first handshake would leave an orphan session nobody holds,
/// and a third session in the counts.)
async fn start(connector: &mem::MemConnector, cfg: &tether::Config) -> Halves {
    let conduit = StableConduit::<Msg>::connect(connector.clone(), cfg.clone())
        .await
        .unwrap();
    let (tx, mut rx) = conduit.split();
    tx.send(&0).await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), Some(0));
    (tx, rx)
}

type Halves = (StableSender<Msg>, tether::StableReceiver<Msg>);

/// Sends messages 1 to `n` - 1 and reads their echoes while `cut` kills
/// every link three times.
async fn stream((tx, mut rx): Halves, n: u64, cut: &mem::MemConnector) -> StableSender<Msg> {
    let sender = {
        let tx = tx.clone();
        tokio::spawn(async move {
            for i in 1..n {
                tx.send(&i).await.unwrap();
            }
        })
    };
    for i in 1..n {
        if i % (n / 4) == 0 {
            cut.kill_all();
        }
        assert_eq!(rx.recv().await.unwrap(), Some(i));
    }
    sender.await.unwrap();
    tx
}

#[tokio::test]
async fn server_snapshot_is_recorded_and_adds_up() {
    let (listener, connector) = mem::listener(64);
    let cfg = config(7).keepalive(Duration::from_millis(20), Duration::from_secs(5));
    let server = std::sync::Arc::new(tether::Server::<Msg>::new(listener, cfg.clone()));

    // The server's application echoes, then hands back its end of the
    // session so its final counters can be read.
    let (ends_tx, mut ends) = tokio::sync::mpsc::unbounded_channel();
    let acceptor = {
        let server = server.clone();
        tokio::spawn(async move {
            while let Some(conduit) = server.accept().await {
                let ends_tx = ends_tx.clone();
                tokio::spawn(async move {
                    let (tx, mut rx) = conduit.split();
                    while let Ok(Some(m)) = rx.recv().await {
                        if tx.send(&m).await.is_err() {
                            break;
                        }
                    }
                    let _ = ends_tx.send(tx);
                });
            }
        })
    };

    // Snapshots taken all along: their totals only grow.
    let watcher = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut last = server.snapshot();
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(2)).await;
                let next = server.snapshot();
                assert_grew(&last.totals, &next.totals);
                assert!(next.stats.resumes >= last.stats.resumes);
                last = next;
            }
        })
    };

    let a = start(&connector, &cfg).await;
    let b = start(&connector, &cfg).await;
    let (a, b) = tokio::join!(stream(a, 2000, &connector), stream(b, 500, &connector));
    a.close().await.unwrap();

    // `a` closed, `b` lives on: wait for `a`'s end and for `b`'s RTT.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let snap = loop {
        let snap = server.snapshot();
        let l = &snap.live;
        if snap.stats.sessions_closed == 1 && l.rtt_sessions == 1 && l.detached == 0 {
            break snap;
        }
        assert!(tokio::time::Instant::now() < deadline, "{snap:#?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let s = &snap.stats;
    assert_eq!((s.sessions_created, s.sessions_open), (2, 1), "{snap:#?}");
    assert!(s.resumes >= 2, "{snap:#?}");
    assert_eq!(snap.live.detached, 0);
    let (min, mean, max) = (snap.live.rtt_min, snap.live.rtt_mean, snap.live.rtt_max);
    assert!(min.is_some() && min == mean && mean == max, "{snap:#?}");
    // `a`'s frames are in the totals after it left the live table.
    assert!(snap.totals.frames_received >= 2000 + 500, "{snap:#?}");
    check_recorded(&snap);

    b.close().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let snap = loop {
        let snap = server.snapshot();
        if snap.stats.sessions_open == 0 {
            break snap;
        }
        assert!(tokio::time::Instant::now() < deadline, "{snap:#?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    watcher.await.unwrap();
    // Every session ended: the totals are exactly the sum of what each
    // one counted.
    let server_ends: Vec<Stats> = [ends.recv().await.unwrap(), ends.recv().await.unwrap()]
        .iter()
        .map(|tx| tx.stats())
        .collect();
    assert_eq!(snap.totals, sum(&server_ends), "{server_ends:#?}");
    let s = &snap.stats;
    assert_eq!((s.sessions_closed, s.sessions_lost), (2, 0), "{snap:#?}");
    assert_eq!(snap.live, Default::default());
    let recorded = check_recorded(&snap);
    assert_eq!(
        value(
            &recorded,
            MetricKind::Gauge,
            "tether_server_rtt_max_seconds",
            &[]
        ),
        0.0
    );
    acceptor.abort();
}

#[tokio::test]
async fn conduit_stats_are_recorded_with_the_callers_labels() {
    let (listener, connector) = mem::listener(64);
    let server = tether::Server::<Msg>::new(listener, config(3));
    let client = StableConduit::<Msg>::connect(connector, config(3))
        .await
        .unwrap();
    client.send(&1).await.unwrap();
    let mut accepted = server.accept().await.unwrap();
    assert_eq!(accepted.recv().await.unwrap(), Some(1));
    let mut stats = client.stats();
    stats.rtt = None;
    let r = record(|| {
        tether::metrics::record_conduit(&stats, &[Label::new("server", "test")]);
    });
    let c = |name: &str, extra: &[(&str, &str)]| value(&r, MetricKind::Counter, name, extra);
    let g = |name: &str, extra: &[(&str, &str)]| value(&r, MetricKind::Gauge, name, extra);
    assert_eq!(
        c("tether_conduit_sent_frames_total", &[]),
        stats.frames_sent as f64
    );
    assert_eq!(c("tether_conduit_reconnects_total", &[]), 0.0);
    assert_eq!(g("tether_conduit_state", &[("state", "connected")]), 1.0);
    assert_eq!(g("tether_conduit_state", &[("state", "lost")]), 0.0);
    assert_eq!(
        g("tether_conduit_replay_buffer_bytes", &[]),
        stats.replay_bytes as f64
    );
    // No round trip measured: no RTT gauge rather than a made-up 0.
    assert!(!r
        .keys()
        .any(|(_, name, _)| name == "tether_conduit_rtt_seconds"));
    stats.rtt = Some(Duration::from_millis(3));
    let r = record(|| {
        tether::metrics::record_conduit(&stats, &[Label::new("server", "test")]);
    });
    assert_eq!(
        value(&r, MetricKind::Gauge, "tether_conduit_rtt_seconds", &[]),
        0.003
    );
}

/// Every metric either function records is documented in docs/METRICS.md.
#[test]
fn every_metric_is_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/METRICS.md"))
        .unwrap();
    let recorded = record(|| {
        let labels = [Label::new("server", "test")];
        tether::metrics::record_server(&ServerSnapshot::default(), &labels);
        let mut stats = some_stats();
        stats.rtt = Some(Duration::from_millis(1));
        tether::metrics::record_conduit(&stats, &labels);
    });
    let mut names: Vec<_> = recorded.keys().map(|(_, name, _)| name.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 26 + 16);
    for name in names {
        assert!(
            doc.contains(&format!("`{name}`")),
            "{name} is not in docs/METRICS.md"
        );
    }
}

/// A conduit's stats (any: `Stats` has no public constructor).
fn some_stats() -> Stats {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (listener, connector) = mem::listener(4);
        let _server = tether::Server::<Msg>::new(listener, config(5));
        let client = StableConduit::<Msg>::connect(connector, config(5))
            .await
            .unwrap();
        client.stats()
    })
}
