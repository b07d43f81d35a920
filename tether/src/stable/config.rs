//! Configuration of stable conduits.

use std::time::Duration;

use tether_proto::{ext, Seq};

/// How a client retries after losing its link, and how long its first
/// connect may take.
///
/// Delays grow exponentially from `min_backoff` to `max_backoff`, and each
/// actual delay is drawn uniformly from zero to the current bound ("full
/// jitter"), so that many clients cut at once do not reconnect in lockstep.
/// Each failed attempt is reported as a
/// [`ConduitEvent::AttemptFailed`](crate::ConduitEvent::AttemptFailed)
/// (and logged), with the delay until the next one.
///
/// Start from the default (10 ms, 1 s, give up after 120 s, the first
/// connect after 10 s) and set what differs; [`Config::reconnect`] takes
/// the policy, and [`Config::reconnect_with`] changes the config's own in
/// place:
///
/// ```
/// use std::time::Duration;
/// use tether::{Config, ReconnectPolicy};
///
/// // A client on a flaky mobile link: retry at once, wait at most 2 s
/// // between tries, never declare the session lost for want of a link,
/// // but fail fast when the server is not there at all.
/// let policy = ReconnectPolicy::default()
///     .min_backoff(Duration::ZERO)
///     .max_backoff(Duration::from_secs(2))
///     .give_up_after(None)
///     .connect_give_up_after(Duration::from_secs(3));
/// let config = Config::default().reconnect(policy);
///
/// // The same, in place: only the give-up deadline changes.
/// let patient = Config::default().reconnect_with(|r| r.give_up_after(None));
/// # let _ = (config, patient);
/// ```
///
/// A server waits for a resume only [`Config::resume_window`] long (120 s
/// by default): a client that keeps trying longer finds its session gone.
#[derive(Clone, Debug)]
pub struct ReconnectPolicy {
    pub(crate) min_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) give_up_after: Option<Duration>,
    pub(crate) connect_give_up_after: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            give_up_after: Some(Duration::from_secs(120)),
            connect_give_up_after: Duration::from_secs(10),
        }
    }
}

impl ReconnectPolicy {
    /// Upper bound of the first retry delay. Default 10 ms. Zero retries at
    /// once (useful on loopback and in benchmarks).
    #[must_use]
    pub fn min_backoff(mut self, value: Duration) -> Self {
        self.min_backoff = value;
        self
    }

    /// Largest retry delay bound. Default 1 s: after an outage of any
    /// length the conduit is back within about a second of the network
    /// (half that on average), at the cost of up to two attempts a second
    /// per client while the server is unreachable. For an immediate
    /// attempt, on a network change say, call
    /// [`reconnect_now`](crate::StableConduit::reconnect_now).
    #[must_use]
    pub fn max_backoff(mut self, value: Duration) -> Self {
        self.max_backoff = value;
        self
    }

    /// How long to keep trying after the link is lost before the session is
    /// declared lost ([`SessionLost::GaveUp`](crate::SessionLost::GaveUp)).
    /// Default 120 s; `None` retries forever. The deadline is kept: the
    /// last attempt's handshake is cut short by it, and the client gives up
    /// when it passes, not an attempt early.
    #[must_use]
    pub fn give_up_after(mut self, value: Option<Duration>) -> Self {
        self.give_up_after = value;
        self
    }

    /// How long [`StableConduit::connect`](crate::StableConduit::connect)
    /// keeps trying to get its first link before it fails with
    /// [`SessionLost::GaveUp`](crate::SessionLost::GaveUp) (whose
    /// `last_error` says why, e.g. `ConnectionRefused` when nothing
    /// listens). Default 10 s: a wrong address or a server that is down
    /// fails fast, while a server that is restarting or busy gets a few
    /// seconds. A shorter [`give_up_after`](Self::give_up_after) applies
    /// to the first connect too; later reconnects use only that.
    #[must_use]
    pub fn connect_give_up_after(mut self, value: Duration) -> Self {
        self.connect_give_up_after = value;
        self
    }
}

/// Settings of a stable conduit, shared by clients and servers.
///
/// Build it by value from [`Config::default`]: every setter takes the
/// config and returns it, so settings chain and the result can be passed
/// straight on.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tether::Error> {
/// use std::time::Duration;
/// use tether::{link::mem, Config, ReconnectPolicy, Server, StableConduit};
///
/// let (listener, connector) = mem::listener(16);
/// // A server that keeps a silent client's session for 10 minutes.
/// let server = Server::<String>::new(
///     listener,
///     Config::default().resume_window(Duration::from_secs(600)),
/// );
/// // A client that pings every 2 s, replaces a link silent for 6 s, and
/// // keeps reconnecting for up to 10 minutes, with a 1 MiB replay buffer.
/// let config = Config::default()
///     .keepalive(Duration::from_secs(2), Duration::from_secs(6))
///     .reconnect(ReconnectPolicy::default().give_up_after(Some(Duration::from_secs(600))))
///     .max_replay_bytes(1 << 20);
/// let client = StableConduit::<String>::connect(connector, config).await?;
/// # drop((client, server));
/// # Ok(())
/// # }
/// ```
///
/// Or change one setting of the reconnect policy and pass the result
/// straight on: `connect(connector, Config::default().reconnect_with(|r|
/// r.give_up_after(None)))`.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) handshake_timeout: Duration,
    pub(crate) reconnect: ReconnectPolicy,
    pub(crate) max_replay_bytes: usize,
    pub(crate) max_replay_frames: usize,
    pub(crate) max_recv_queue_bytes: usize,
    pub(crate) initial_seq: Seq,
    pub(crate) seed: Option<u64>,
    pub(crate) extensions: u8,
    pub(crate) ack_every: u32,
    pub(crate) ack_delay: Duration,
    pub(crate) keepalive_interval: Duration,
    pub(crate) keepalive_timeout: Duration,
    pub(crate) stall_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) resume_window: Duration,
    pub(crate) max_sessions: usize,
    pub(crate) close_timeout: Duration,
    pub(crate) max_message_size: usize,
    pub(crate) fragment_size: usize,
    pub(crate) max_pending_handshakes: usize,
    pub(crate) max_pending_per_source: usize,
    pub(crate) max_sessions_per_source: usize,
    pub(crate) memory_budget: usize,
    pub(crate) require_extensions: u8,
    pub(crate) credential: Option<bytes::Bytes>,
    pub(crate) max_credential_len: usize,
    pub(crate) node_id: u32,
    pub(crate) record_secrets: bool,
}

/// The extensions this implementation speaks.
pub(crate) const SUPPORTED_EXTENSIONS: u8 = ext::ALL;

impl Default for Config {
    fn default() -> Self {
        Config {
            handshake_timeout: Duration::from_secs(10),
            reconnect: ReconnectPolicy::default(),
            max_replay_bytes: 4 * 1024 * 1024,
            max_replay_frames: 1 << 16,
            max_recv_queue_bytes: 8 * 1024 * 1024,
            initial_seq: Seq::ZERO,
            seed: None,
            extensions: SUPPORTED_EXTENSIONS,
            ack_every: 32,
            ack_delay: Duration::from_millis(5),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(15),
            stall_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(300),
            resume_window: Duration::from_secs(120),
            max_sessions: 100_000,
            close_timeout: Duration::from_secs(10),
            max_message_size: crate::link::DEFAULT_MAX_PAYLOAD,
            fragment_size: 64 * 1024,
            max_pending_handshakes: 1024,
            max_pending_per_source: 64,
            max_sessions_per_source: 1024,
            memory_budget: 1 << 30,
            require_extensions: 0,
            credential: None,
            max_credential_len: 1024,
            node_id: 0,
            record_secrets: false,
        }
    }
}

impl Config {
    /// How long one connection attempt plus handshake may take (client), or
    /// how long a new link may take to set up and send its hello (server).
    /// A new session whose client does not prove it got the key (by a
    /// first frame or a resume) within this much again is dropped, so that
    /// sessions nobody uses do not wait out the resume window. Default 10 s.
    #[must_use]
    pub fn handshake_timeout(mut self, value: Duration) -> Self {
        self.handshake_timeout = value;
        self
    }

    /// The client's reconnect policy.
    #[must_use]
    pub fn reconnect(mut self, value: ReconnectPolicy) -> Self {
        self.reconnect = value;
        self
    }

    /// Changes the reconnect policy in place: `f` gets the current one and
    /// returns the new one.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tether::Config;
    /// let config = Config::default().reconnect_with(|r| r.give_up_after(None));
    /// # let _ = config;
    /// ```
    #[must_use]
    pub fn reconnect_with(mut self, f: impl FnOnce(ReconnectPolicy) -> ReconnectPolicy) -> Self {
        self.reconnect = f(self.reconnect);
        self
    }

    /// Bound of the replay buffer (sent but unacknowledged frames), in bytes
    /// and in frames, whatever the extensions. When it is full, `send` waits
    /// for acknowledgements: backpressure instead of growth. One message
    /// larger than the byte bound is still accepted when the buffer is
    /// empty. Defaults: 4 MiB, 65,536
    /// frames. Memory per session is at most about this much while the peer
    /// is not acknowledging.
    ///
    /// The bound is also the session's flow-control window: acks report what
    /// the peer's application consumed, so one session carries at most about
    /// `bytes` per round trip (4 MiB at 100 ms: about 40 MiB/s). Raise it for
    /// fast links with long round trips. Larger is not free on short ones:
    /// a sender that runs a whole large window ahead touches that much
    /// memory per cycle, and on loopback 16 MiB measured slower than 4 MiB
    /// for 1 MiB messages (`BENCHMARKS.md`).
    #[must_use]
    pub fn max_replay(mut self, bytes: usize, frames: usize) -> Self {
        self.max_replay_bytes = bytes;
        self.max_replay_frames = frames.max(1);
        self
    }

    /// The byte bound of [`max_replay`](Self::max_replay), keeping the
    /// frame bound.
    #[must_use]
    pub fn max_replay_bytes(mut self, bytes: usize) -> Self {
        self.max_replay_bytes = bytes;
        self
    }

    /// Bound of received messages waiting for the application, in bytes,
    /// each message counted as its encoded length plus 64 bytes of
    /// bookkeeping. Default 8 MiB: twice the default replay bound, so a
    /// peer with the default window is never held back by it, and small
    /// enough that a server's sessions do not each promise 64 MiB to
    /// clients that may never let its application catch up.
    ///
    /// With standalone acks (the default) this side announces the bound in
    /// its window frame and the peer keeps what it has not had acknowledged
    /// below it, since acks report consumption: the link is always read, so
    /// that keepalive and the close keep working while the application is
    /// slow, and a peer that has more than this bound (at least 64 KiB) plus
    /// one message waiting breaks the protocol, whatever it announced. In
    /// the base format the conduit stops reading from the link while the
    /// bound is exceeded, which pushes back on the peer.
    #[must_use]
    pub fn max_recv_queue_bytes(mut self, value: usize) -> Self {
        self.max_recv_queue_bytes = value;
        self
    }

    /// Sequence number of the first frame this side sends. Default 0, as the
    /// protocol prescribes; other values exist to test wrap-around at 2^32.
    #[must_use]
    pub fn initial_seq(mut self, value: u32) -> Self {
        self.initial_seq = Seq(value);
        self
    }

    /// Which protocol extensions to offer (client) or accept (server), as
    /// the bits of [`tether_proto::ext`]; only supported ones are used.
    /// Default: all supported (standalone acks, keepalive, the close
    /// handshake, fragments, admission, proof-of-possession resume). `0`
    /// speaks the base protocol of `shared/PROTOCOL.md` only. Keepalive,
    /// close and fragments are only ever on together with standalone acks;
    /// proof-of-possession resume (`PROOF`) only together with admission
    /// (`ADMISSION`), whose restart answer it needs.
    ///
    /// Without standalone acks a side that only receives never
    /// acknowledges: the replay bound ([`max_replay`](Self::max_replay))
    /// still holds, and a link on which `send` has waited for room for a
    /// keepalive interval with nothing acknowledged is ended, so that the
    /// resume's hellos (which report what each side received) free the
    /// buffer. A one-way stream to such a peer therefore moves one window
    /// per reconnect.
    #[must_use]
    pub fn extensions(mut self, bits: u8) -> Self {
        self.extensions = bits & SUPPORTED_EXTENSIONS;
        self
    }

    /// With standalone acks: acknowledge after this many consumed frames
    /// (default 32) or after `delay` (default 5 ms), whichever comes first,
    /// when no outgoing data frame carries the ack sooner. Fewer, later acks
    /// cost less; sooner acks free the peer's replay buffer sooner.
    #[must_use]
    pub fn ack_policy(mut self, every: u32, delay: Duration) -> Self {
        self.ack_every = every.max(1);
        self.ack_delay = delay;
        self
    }

    /// Keepalive (extension `KEEPALIVE`): a ping every `interval`; a link
    /// on which no pong arrives for `timeout` is declared dead and replaced
    /// (half-open, stalled, or a peer that stopped reading). Defaults: 5 s
    /// and 15 s. A shorter timeout detects dead links sooner and costs more
    /// spurious reconnects on a congested path.
    #[must_use]
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keepalive_interval = interval.max(Duration::from_millis(1));
        self.keepalive_timeout = timeout.max(self.keepalive_interval);
        self
    }

    /// The ping interval of [`keepalive`](Self::keepalive), keeping the
    /// timeout (raised to the interval if it is shorter).
    #[must_use]
    pub fn keepalive_interval(self, interval: Duration) -> Self {
        let timeout = self.keepalive_timeout;
        self.keepalive(interval, timeout)
    }

    /// The timeout of [`keepalive`](Self::keepalive), keeping the interval
    /// (at least the interval).
    #[must_use]
    pub fn keepalive_timeout(self, timeout: Duration) -> Self {
        let interval = self.keepalive_interval;
        self.keepalive(interval, timeout)
    }

    /// Client: an attached link that stops answering makes the conduit
    /// report itself
    /// [`Stalled`](crate::ConduitState::Stalled), with a
    /// [`ConduitEvent::Stalled`](crate::ConduitEvent::Stalled); it reports
    /// [`Unstalled`](crate::ConduitEvent::Unstalled) when something
    /// arrives. With keepalive: when data has waited for an ack with
    /// nothing arriving for half this time, the client pings at once, and
    /// a ping unanswered while nothing arrives for half this time is a
    /// stall; so a peer whose application is slow (it withholds acks, not
    /// pongs) is not one. Without keepalive: data unacknowledged and
    /// nothing arriving for this long. Only a signal: the keepalive timeout
    /// still decides when the link is replaced, and the application may
    /// call [`reconnect_now`](crate::StableConduit::reconnect_now) sooner.
    /// Checked four times per timeout. Default 3 s.
    #[must_use]
    pub fn stall_timeout(mut self, value: Duration) -> Self {
        self.stall_timeout = value.max(Duration::from_millis(4));
        self
    }

    /// Server: how long a session whose link was lost waits for its client
    /// to resume before it expires and frees its memory. Default 120 s
    /// (match the clients' give-up deadline).
    #[must_use]
    pub fn resume_window(mut self, value: Duration) -> Self {
        self.resume_window = value;
        self
    }

    /// Server: most sessions kept at once; a new session beyond it is
    /// refused as busy. Default 100,000.
    #[must_use]
    pub fn max_sessions(mut self, value: usize) -> Self {
        self.max_sessions = value;
        self
    }

    /// How long a graceful close (explicit, because every handle was
    /// dropped, or because the peer closed) may take as a whole, across
    /// every link it needs; if everything was delivered both ways by then
    /// the session ends as closed, otherwise it is lost with
    /// [`SessionLost::CloseTimedOut`](crate::SessionLost::CloseTimedOut).
    /// Default 10 s.
    #[must_use]
    pub fn close_timeout(mut self, value: Duration) -> Self {
        self.close_timeout = value;
        self
    }

    /// Largest encoded frame `send` accepts; a larger message fails with
    /// [`Error::TooLarge`](crate::Error::TooLarge) and nothing is sent. Keep
    /// it at most the links' maximum payload on both sides (default 8 MiB,
    /// the links' default): a frame the link refuses could never be
    /// delivered.
    #[must_use]
    pub fn max_message_size(mut self, value: usize) -> Self {
        self.max_message_size = value;
        self
    }

    /// With fragments (extension `FRAGMENTS`, on by default): a message
    /// whose encoding is larger than this travels as pieces of this many
    /// bytes, each its own frame, so that a resume continues from the last
    /// piece the peer holds instead of the message's first byte, and a
    /// link that lives long enough to carry one piece makes progress.
    /// Default 64 KiB. Smaller pieces make progress on shorter-lived links
    /// and cost a header (2 to 6 bytes) and a frame each; the receiver
    /// copies a fragmented message once to put it back together (smaller
    /// messages are never copied).
    #[must_use]
    pub fn fragment_size(mut self, value: usize) -> Self {
        self.fragment_size = value.max(1);
        self
    }

    /// Server: most links in their handshake at once (connected, hello not
    /// yet answered), over all clients; [`max_pending_per_source`](Self::max_pending_per_source)
    /// caps them per source (an IPv4 address or an IPv6 /64; links without
    /// an address count only globally). A link over either cap is closed at
    /// once, before anything is read from it. Default 1,024. Each pending
    /// handshake holds a socket and at most a hello's worth of buffer (see
    /// `docs/SECURITY.md`).
    #[must_use]
    pub fn max_pending_handshakes(mut self, global: usize) -> Self {
        self.max_pending_handshakes = global.max(1);
        self
    }

    /// Server: most links in their handshake at once from one source; see
    /// [`max_pending_handshakes`](Self::max_pending_handshakes). Default 64.
    #[must_use]
    pub fn max_pending_per_source(mut self, value: usize) -> Self {
        self.max_pending_per_source = value.max(1);
        self
    }

    /// Server: most sessions kept at once for one source (an IPv4 address
    /// or an IPv6 /64), tombstones excluded; a new session beyond it is
    /// refused as busy. Default 1,024, so that one address cannot take the
    /// whole [`max_sessions`](Self::max_sessions) table; raise it for
    /// clients behind one large NAT.
    #[must_use]
    pub fn max_sessions_per_source(mut self, value: usize) -> Self {
        self.max_sessions_per_source = value.max(1);
        self
    }

    /// Server: a budget, in bytes, for the buffers of all sessions
    /// together (replay buffers and receive queues). Once it is reached,
    /// new sessions are refused as busy and the server's `send` calls wait
    /// until memory is freed. Default 1 GiB. `docs/SECURITY.md` gives the
    /// worst case per session and per server.
    #[must_use]
    pub fn memory_budget(mut self, bytes: usize) -> Self {
        self.memory_budget = bytes;
        self
    }

    /// Server: extensions a client must offer to get a session, as bits of
    /// [`tether_proto::ext`]; a client lacking one is refused (a typed
    /// policy refusal to clients that understand it, a plain rejection to
    /// others). Default none, so base-format clients are served. Requiring
    /// [`ext::KEEPALIVE`] (which implies `ACKS`) refuses clients whose
    /// liveness cannot be checked and whose replay buffer only their own
    /// traffic frees.
    #[must_use]
    pub fn require_extensions(mut self, bits: u8) -> Self {
        self.require_extensions = bits & SUPPORTED_EXTENSIONS;
        self
    }

    /// A link without keepalive (not negotiated) on which nothing at all
    /// arrives for this long is dropped, as keepalive would drop it: the
    /// client reconnects, the server waits for a resume. Not counted while
    /// this side stops reading because its application is behind. Links
    /// with keepalive are checked by the keepalive timeout instead. Default
    /// 300 s.
    #[must_use]
    pub fn idle_timeout(mut self, value: Duration) -> Self {
        self.idle_timeout = value.max(Duration::from_millis(1));
        self
    }

    /// Client: a credential sent with the first hello of a new session (not
    /// with resumes), for the server's authorization hook
    /// ([`Authorize`](crate::Authorize)). It travels in the clear unless the
    /// link encrypts. Offering it needs a server that speaks the
    /// `ADMISSION` extension: a base-format server rejects the longer
    /// hello.
    #[must_use]
    pub fn credential(mut self, value: impl Into<bytes::Bytes>) -> Self {
        self.credential = Some(value.into());
        self
    }

    /// Server: the longest credential accepted in a hello, in bytes. The
    /// hello is read with this limit (plus its 25 bytes): a longer length
    /// prefix closes the link before anything is reserved. Default 1,024.
    /// A server without an authorizer takes no credential at all: its
    /// limit is the 25 bytes of the hello.
    #[must_use]
    pub fn max_credential_len(mut self, value: usize) -> Self {
        self.max_credential_len = value;
        self
    }

    /// Server: the node id that opens every session id this server issues
    /// (bytes 0..4, big-endian; see [`SessionId`](tether_proto::SessionId)),
    /// with proof-of-possession resume (`PROOF`). Lets a load balancer send a
    /// resume to the node that holds the session. Default 0. Public: it is
    /// in every hello of the session.
    #[must_use]
    pub fn node_id(mut self, value: u32) -> Self {
        self.node_id = value;
        self
    }

    /// Client, tests only: remember every resume secret this client holds,
    /// for [`StableConduit::secrets_held`](crate::StableConduit::secrets_held).
    /// Defeats the zeroization of old secrets; never use it outside tests.
    #[doc(hidden)]
    #[must_use]
    pub fn record_secrets_for_tests(mut self, value: bool) -> Self {
        self.record_secrets = value;
        self
    }

    /// Seed for the reconnect jitter, for reproducible tests. Default: drawn
    /// from the operating system.
    #[must_use]
    pub fn seed(mut self, value: u64) -> Self {
        self.seed = Some(value);
        self
    }
}
