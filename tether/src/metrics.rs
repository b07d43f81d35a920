//! Records tether's counters through the [`metrics`](https://docs.rs/metrics) facade
//! (the `metrics` feature), for whatever recorder the application installed
//! (Prometheus, StatsD, ...). Every metric is listed, with its type and
//! meaning, in `docs/METRICS.md`.
//!
//! Nothing here runs on its own, and nothing is added to the message path:
//! call [`record_server`] with a [`Server::snapshot`] (or [`record_conduit`]
//! with a conduit's [`Stats`]) when a scraper asks, or on a timer. Counters
//! are recorded as absolute values (the snapshot holds the totals), gauges
//! as what they are now. Names start with `tether_server_` or
//! `tether_conduit_` and follow Prometheus's conventions: counters end in
//! `_total`, and units are in the name (`_bytes`, `_seconds`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use metrics::Label;
//! let listener = tether::link::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let server: tether::Server<String> = tether::Server::new(listener, tether::Config::default());
//! tether::metrics::describe();
//! // On each scrape:
//! tether::metrics::record_server(&server.snapshot(), &[Label::new("listener", "main")]);
//! # }
//! ```
//!
//! [`Server::snapshot`]: crate::Server::snapshot

use std::time::Duration;

use ::metrics::{describe_counter, describe_gauge, Label, Unit};

use crate::stable::{ConduitState, ServerSnapshot, Stats};

/// Describes every metric (help text and unit) to the installed recorder,
/// once: a Prometheus exporter then prints `# HELP` lines. Optional.
pub fn describe() {
    for &(name, kind, unit, help) in SERVER.iter().chain(CONDUIT) {
        match (kind, unit) {
            (Kind::Counter, Some(unit)) => describe_counter!(name, unit, help),
            (Kind::Counter, None) => describe_counter!(name, help),
            (Kind::Gauge, Some(unit)) => describe_gauge!(name, unit, help),
            (Kind::Gauge, None) => describe_gauge!(name, help),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

type Described = (&'static str, Kind, Option<Unit>, &'static str);

const SERVER: &[Described] = &[
    ("tether_server_links_accepted_total", Kind::Counter, None, "Links accepted from the listeners."),
    ("tether_server_links_refused_total", Kind::Counter, None, "Links turned away, by reason: pending_cap, bad_handshake, rejected, bad_proof, busy, denied, policy."),
    ("tether_server_sessions_created_total", Kind::Counter, None, "Sessions created."),
    ("tether_server_sessions_ended_total", Kind::Counter, None, "Sessions ended, by outcome: closed, lost, unproven."),
    ("tether_server_resumes_total", Kind::Counter, None, "Resumes routed to an existing session."),
    ("tether_server_proof_resumes_total", Kind::Counter, None, "Resumes with proof of possession that verified."),
    ("tether_server_sent_frames_total", Kind::Counter, None, "Frames handed to links by all sessions, replays included."),
    ("tether_server_received_frames_total", Kind::Counter, None, "Frames received by all sessions, duplicates excluded."),
    ("tether_server_replayed_frames_total", Kind::Counter, None, "Frames sent again after a resume."),
    ("tether_server_replayed_bytes_total", Kind::Counter, Some(Unit::Bytes), "Bytes of frames sent again after a resume."),
    ("tether_server_duplicate_frames_total", Kind::Counter, None, "Received frames dropped as duplicates."),
    ("tether_server_dead_links_total", Kind::Counter, None, "Session links ended by the session's own watchdog, by reason: keepalive, idle, ack_stall."),
    ("tether_server_unsolicited_pongs_total", Kind::Counter, None, "Pongs that answered no outstanding ping."),
    ("tether_server_sessions_open", Kind::Gauge, None, "Live sessions (attached or waiting for a resume)."),
    ("tether_server_sessions_detached", Kind::Gauge, None, "Live sessions without a link, waiting for their client."),
    ("tether_server_tombstones", Kind::Gauge, None, "Closed sessions remembered for the resume window."),
    ("tether_server_pending_handshakes", Kind::Gauge, None, "Links in their handshake."),
    ("tether_server_memory_used_bytes", Kind::Gauge, Some(Unit::Bytes), "Bytes all replay buffers and receive queues hold, against the memory budget."),
    ("tether_server_memory_budget_bytes", Kind::Gauge, Some(Unit::Bytes), "The memory budget."),
    ("tether_server_replay_buffer_frames", Kind::Gauge, None, "Frames in the live sessions' replay buffers."),
    ("tether_server_replay_buffer_bytes", Kind::Gauge, Some(Unit::Bytes), "Bytes in the live sessions' replay buffers."),
    ("tether_server_recv_queue_bytes", Kind::Gauge, Some(Unit::Bytes), "Bytes waiting for the application in the live sessions' receive queues (64 per message added)."),
    ("tether_server_rtt_sessions", Kind::Gauge, None, "Live sessions with a round-trip time."),
    ("tether_server_rtt_min_seconds", Kind::Gauge, Some(Unit::Seconds), "Lowest smoothed round-trip time of a live session (0 with none)."),
    ("tether_server_rtt_mean_seconds", Kind::Gauge, Some(Unit::Seconds), "Mean smoothed round-trip time of the live sessions (0 with none)."),
    ("tether_server_rtt_max_seconds", Kind::Gauge, Some(Unit::Seconds), "Highest smoothed round-trip time of a live session (0 with none)."),
];

const CONDUIT: &[Described] = &[
    (
        "tether_conduit_reconnects_total",
        Kind::Counter,
        None,
        "Links replaced after the first.",
    ),
    (
        "tether_conduit_sent_frames_total",
        Kind::Counter,
        None,
        "Frames handed to links, replays included.",
    ),
    (
        "tether_conduit_received_frames_total",
        Kind::Counter,
        None,
        "Frames received, duplicates excluded.",
    ),
    (
        "tether_conduit_replayed_frames_total",
        Kind::Counter,
        None,
        "Frames sent again after a resume.",
    ),
    (
        "tether_conduit_replayed_bytes_total",
        Kind::Counter,
        Some(Unit::Bytes),
        "Bytes of frames sent again after a resume.",
    ),
    (
        "tether_conduit_duplicate_frames_total",
        Kind::Counter,
        None,
        "Received frames dropped as duplicates.",
    ),
    (
        "tether_conduit_dead_links_total",
        Kind::Counter,
        None,
        "Links ended by the conduit's watchdog, by reason: keepalive, idle, ack_stall.",
    ),
    (
        "tether_conduit_unsolicited_pongs_total",
        Kind::Counter,
        None,
        "Pongs that answered no outstanding ping.",
    ),
    (
        "tether_conduit_proof_resumes_total",
        Kind::Counter,
        None,
        "Resumes with proof of possession that verified.",
    ),
    (
        "tether_conduit_state",
        Kind::Gauge,
        None,
        "1 for the conduit's state, 0 for the others (label state).",
    ),
    (
        "tether_conduit_replay_buffer_frames",
        Kind::Gauge,
        None,
        "Frames in the replay buffer.",
    ),
    (
        "tether_conduit_replay_buffer_bytes",
        Kind::Gauge,
        Some(Unit::Bytes),
        "Bytes in the replay buffer.",
    ),
    (
        "tether_conduit_replay_buffer_peak_bytes",
        Kind::Gauge,
        Some(Unit::Bytes),
        "The most bytes the replay buffer ever held.",
    ),
    (
        "tether_conduit_recv_queue_bytes",
        Kind::Gauge,
        Some(Unit::Bytes),
        "Bytes waiting for the application (64 per message added).",
    ),
    (
        "tether_conduit_rtt_seconds",
        Kind::Gauge,
        Some(Unit::Seconds),
        "Smoothed round-trip time (absent until a ping was answered).",
    ),
    (
        "tether_conduit_undelivered_messages",
        Kind::Gauge,
        None,
        "Once the session is lost: messages the peer did not acknowledge.",
    ),
];

/// `labels` and one more.
fn with(labels: &[Label], key: &'static str, value: &'static str) -> Vec<Label> {
    let mut all = labels.to_vec();
    all.push(Label::new(key, value));
    all
}

fn counter(name: &'static str, labels: &[Label], value: u64) {
    ::metrics::counter!(name, labels.to_vec()).absolute(value);
}

fn gauge(name: &'static str, labels: &[Label], value: f64) {
    ::metrics::gauge!(name, labels.to_vec()).set(value);
}

fn seconds(d: Option<Duration>) -> f64 {
    d.map_or(0.0, |d| d.as_secs_f64())
}

/// Records a server's snapshot ([`Server::snapshot`](crate::Server::snapshot))
/// under `labels` (say, which server this is), to the current recorder.
pub fn record_server(snapshot: &ServerSnapshot, labels: &[Label]) {
    let (s, t, l) = (&snapshot.stats, &snapshot.totals, &snapshot.live);
    counter(
        "tether_server_links_accepted_total",
        labels,
        s.links_accepted,
    );
    for (reason, n) in [
        ("pending_cap", s.handshakes_refused),
        ("bad_handshake", s.bad_handshakes),
        ("rejected", s.rejected),
        ("bad_proof", s.bad_proofs),
        ("busy", s.refused_busy),
        ("denied", s.refused_denied),
        ("policy", s.refused_policy),
    ] {
        let labels = with(labels, "reason", reason);
        counter("tether_server_links_refused_total", &labels, n);
    }
    counter(
        "tether_server_sessions_created_total",
        labels,
        s.sessions_created,
    );
    for (outcome, n) in [
        ("closed", s.sessions_closed),
        ("lost", s.sessions_lost),
        ("unproven", s.unproven_dropped),
    ] {
        let labels = with(labels, "outcome", outcome);
        counter("tether_server_sessions_ended_total", &labels, n);
    }
    counter("tether_server_resumes_total", labels, s.resumes);
    counter("tether_server_proof_resumes_total", labels, s.proof_resumes);
    counter("tether_server_sent_frames_total", labels, t.frames_sent);
    counter(
        "tether_server_received_frames_total",
        labels,
        t.frames_received,
    );
    counter(
        "tether_server_replayed_frames_total",
        labels,
        t.frames_replayed,
    );
    counter(
        "tether_server_replayed_bytes_total",
        labels,
        t.bytes_replayed,
    );
    counter(
        "tether_server_duplicate_frames_total",
        labels,
        t.duplicates_dropped,
    );
    for (reason, n) in [
        ("keepalive", t.keepalive_timeouts),
        ("idle", t.idle_timeouts),
        ("ack_stall", t.ack_stalls),
    ] {
        let labels = with(labels, "reason", reason);
        counter("tether_server_dead_links_total", &labels, n);
    }
    counter(
        "tether_server_unsolicited_pongs_total",
        labels,
        t.unsolicited_pongs,
    );

    gauge(
        "tether_server_sessions_open",
        labels,
        s.sessions_open as f64,
    );
    gauge("tether_server_sessions_detached", labels, l.detached as f64);
    gauge("tether_server_tombstones", labels, s.tombstones as f64);
    gauge(
        "tether_server_pending_handshakes",
        labels,
        s.pending_handshakes as f64,
    );
    gauge(
        "tether_server_memory_used_bytes",
        labels,
        s.memory_used as f64,
    );
    gauge(
        "tether_server_memory_budget_bytes",
        labels,
        snapshot.memory_budget as f64,
    );
    gauge(
        "tether_server_replay_buffer_frames",
        labels,
        l.replay_frames as f64,
    );
    gauge(
        "tether_server_replay_buffer_bytes",
        labels,
        l.replay_bytes as f64,
    );
    gauge(
        "tether_server_recv_queue_bytes",
        labels,
        l.recv_queue_bytes as f64,
    );
    gauge("tether_server_rtt_sessions", labels, l.rtt_sessions as f64);
    gauge("tether_server_rtt_min_seconds", labels, seconds(l.rtt_min));
    gauge(
        "tether_server_rtt_mean_seconds",
        labels,
        seconds(l.rtt_mean),
    );
    gauge("tether_server_rtt_max_seconds", labels, seconds(l.rtt_max));
}

/// Records one conduit's counters ([`StableConduit::stats`]) under
/// `labels`, which tell this conduit from the others the application
/// records (its peer, its role...): keep their values few, as every
/// combination is a time series.
///
/// [`StableConduit::stats`]: crate::StableConduit::stats
pub fn record_conduit(stats: &Stats, labels: &[Label]) {
    let s = stats;
    counter("tether_conduit_reconnects_total", labels, s.reconnects);
    counter("tether_conduit_sent_frames_total", labels, s.frames_sent);
    counter(
        "tether_conduit_received_frames_total",
        labels,
        s.frames_received,
    );
    counter(
        "tether_conduit_replayed_frames_total",
        labels,
        s.frames_replayed,
    );
    counter(
        "tether_conduit_replayed_bytes_total",
        labels,
        s.bytes_replayed,
    );
    counter(
        "tether_conduit_duplicate_frames_total",
        labels,
        s.duplicates_dropped,
    );
    for (reason, n) in [
        ("keepalive", s.keepalive_timeouts),
        ("idle", s.idle_timeouts),
        ("ack_stall", s.ack_stalls),
    ] {
        let labels = with(labels, "reason", reason);
        counter("tether_conduit_dead_links_total", &labels, n);
    }
    counter(
        "tether_conduit_unsolicited_pongs_total",
        labels,
        s.unsolicited_pongs,
    );
    counter(
        "tether_conduit_proof_resumes_total",
        labels,
        s.proof_resumes,
    );
    for (name, state) in [
        ("connecting", ConduitState::Connecting),
        ("connected", ConduitState::Connected),
        ("resumed", ConduitState::Resumed),
        ("reconnecting", ConduitState::Reconnecting),
        ("stalled", ConduitState::Stalled),
        ("lost", ConduitState::Lost),
        ("closed", ConduitState::Closed),
    ] {
        let labels = with(labels, "state", name);
        let on = if s.state == state { 1.0 } else { 0.0 };
        gauge("tether_conduit_state", &labels, on);
    }
    gauge(
        "tether_conduit_replay_buffer_frames",
        labels,
        s.replay_frames as f64,
    );
    gauge(
        "tether_conduit_replay_buffer_bytes",
        labels,
        s.replay_bytes as f64,
    );
    gauge(
        "tether_conduit_replay_buffer_peak_bytes",
        labels,
        s.max_replay_bytes as f64,
    );
    gauge(
        "tether_conduit_recv_queue_bytes",
        labels,
        s.recv_queue_bytes as f64,
    );
    if let Some(rtt) = s.rtt {
        gauge("tether_conduit_rtt_seconds", labels, rtt.as_secs_f64());
    }
    gauge(
        "tether_conduit_undelivered_messages",
        labels,
        s.undelivered as f64,
    );
}
