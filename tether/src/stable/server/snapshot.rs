//! A server-wide snapshot for monitoring: [`ServerStats`] together with
//! what every session did (summed over live and ended sessions) and what
//! the live ones hold now.
//!
//! Sessions keep their own counters (`Shared::counters`, atomics the hot
//! path already updates). The server adds nothing per message: when a
//! session ends, its driver folds its final counters into the registry's
//! [`Ended`] in the same lock as it leaves the table; a snapshot reads the
//! registry once (the ended totals and the live sessions), then each live
//! session's counters outside that lock. A session seen live by one
//! snapshot is in the ended totals of the next, with counters at least as
//! high, so every total only grows.

use std::time::Duration;

use super::ServerStats;
use crate::stable::{ConduitState, Stats};

/// Counters summed over a server's sessions, those that ended included.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionTotals {
    /// Frames handed to links, replays included ([`Stats::frames_sent`]).
    pub frames_sent: u64,
    /// Frames received and queued for the application, duplicates
    /// excluded ([`Stats::frames_received`]).
    pub frames_received: u64,
    /// Frames sent again after a resume ([`Stats::frames_replayed`]).
    pub frames_replayed: u64,
    /// Bytes of those frames ([`Stats::bytes_replayed`]).
    pub bytes_replayed: u64,
    /// Received frames dropped as duplicates ([`Stats::duplicates_dropped`]).
    pub duplicates_dropped: u64,
    /// Links declared dead for want of a pong ([`Stats::keepalive_timeouts`]).
    pub keepalive_timeouts: u64,
    /// Links without keepalive dropped as idle ([`Stats::idle_timeouts`]).
    pub idle_timeouts: u64,
    /// Base-format links ended by a stalled send ([`Stats::ack_stalls`]).
    pub ack_stalls: u64,
    /// Pongs that answered no outstanding ping ([`Stats::unsolicited_pongs`]).
    pub unsolicited_pongs: u64,
}

impl SessionTotals {
    pub(super) fn add(&mut self, s: &Stats) {
        self.frames_sent += s.frames_sent;
        self.frames_received += s.frames_received;
        self.frames_replayed += s.frames_replayed;
        self.bytes_replayed += s.bytes_replayed;
        self.duplicates_dropped += s.duplicates_dropped;
        self.keepalive_timeouts += s.keepalive_timeouts;
        self.idle_timeouts += s.idle_timeouts;
        self.ack_stalls += s.ack_stalls;
        self.unsolicited_pongs += s.unsolicited_pongs;
    }

    fn sum(&self, other: &SessionTotals) -> SessionTotals {
        let mut t = self.clone();
        t.frames_sent += other.frames_sent;
        t.frames_received += other.frames_received;
        t.frames_replayed += other.frames_replayed;
        t.bytes_replayed += other.bytes_replayed;
        t.duplicates_dropped += other.duplicates_dropped;
        t.keepalive_timeouts += other.keepalive_timeouts;
        t.idle_timeouts += other.idle_timeouts;
        t.ack_stalls += other.ack_stalls;
        t.unsolicited_pongs += other.unsolicited_pongs;
        t
    }
}

/// What a server's live sessions hold now, summed (and their round-trip
/// times).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LiveSessions {
    /// Live sessions without a link: waiting for their client to resume
    /// (or for their first link's handshake to finish).
    pub detached: u64,
    /// Frames in the replay buffers (sent, not yet acknowledged).
    pub replay_frames: u64,
    /// Bytes in the replay buffers.
    pub replay_bytes: u64,
    /// Bytes received and waiting for the application, each message
    /// counted as its length plus 64 ([`Stats::recv_queue_bytes`]).
    pub recv_queue_bytes: u64,
    /// Live sessions with a round-trip time (a keepalive ping answered).
    pub rtt_sessions: u64,
    /// The lowest smoothed round-trip time among them.
    pub rtt_min: Option<Duration>,
    /// Their mean smoothed round-trip time.
    pub rtt_mean: Option<Duration>,
    /// The highest smoothed round-trip time among them.
    pub rtt_max: Option<Duration>,
}

/// A server-wide snapshot for monitoring; see [`Server::snapshot`].
///
/// [`Server::snapshot`]: super::Server::snapshot
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerSnapshot {
    /// The server's own counters, as [`Server::stats`] returns them.
    ///
    /// [`Server::stats`]: super::Server::stats
    pub stats: ServerStats,
    /// Counters summed over every session this server ever had: those
    /// still live and those that ended.
    pub totals: SessionTotals,
    /// What the live sessions hold now.
    pub live: LiveSessions,
    /// The server's memory budget in bytes ([`Config::memory_budget`]),
    /// against which `stats.memory_used` counts.
    ///
    /// [`Config::memory_budget`]: crate::Config::memory_budget
    pub memory_budget: u64,
}

/// What the sessions that ended left behind: kept in the registry, updated
/// in the same lock as a session leaves the live table.
#[derive(Clone, Debug, Default)]
pub(super) struct Ended {
    pub(super) closed: u64,
    pub(super) lost: u64,
    pub(super) totals: SessionTotals,
}

/// How a session ended, for [`Ended`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Closed,
    Lost,
    /// Dropped at its proof deadline: its client never proved its key.
    Unproven,
}

/// Sums the live sessions' `stats` onto the ended sessions' `ended`.
pub(super) fn summarize(ended: &SessionTotals, live: &[Stats]) -> (SessionTotals, LiveSessions) {
    let mut now = SessionTotals::default();
    let mut l = LiveSessions::default();
    let mut rtt_sum = Duration::ZERO;
    for s in live {
        now.add(s);
        if matches!(
            s.state,
            ConduitState::Connecting | ConduitState::Reconnecting
        ) {
            l.detached += 1;
        }
        l.replay_frames += s.replay_frames as u64;
        l.replay_bytes += s.replay_bytes as u64;
        l.recv_queue_bytes += s.recv_queue_bytes as u64;
        if let Some(rtt) = s.rtt {
            l.rtt_sessions += 1;
            rtt_sum += rtt;
            l.rtt_min = Some(l.rtt_min.map_or(rtt, |m| m.min(rtt)));
            l.rtt_max = Some(l.rtt_max.map_or(rtt, |m| m.max(rtt)));
        }
    }
    if l.rtt_sessions > 0 {
        l.rtt_mean = Some(rtt_sum / l.rtt_sessions as u32);
    }
    (ended.sum(&now), l)
}
