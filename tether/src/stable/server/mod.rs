//! The server side: admit links, read hellos, create sessions, and route
//! resumes to the session they belong to.
//!
//! A link goes through three steps before it costs a session:
//!
//! 1. the accept loop takes it from the [`Listener`] and checks the caps on
//!    pending handshakes, global and per source, before anything is read
//!    (`admission.rs`);
//! 2. in the link's own task, the listener's per-connection setup runs
//!    (a TLS handshake, say), then the hello is read with a limit of its own
//!    size, all within the handshake timeout;
//! 3. a new session is checked against the session caps (global, per
//!    source), the memory budget, the required extensions and the
//!    application's [`Authorize`] hook; a refused client gets a typed
//!    refusal if it speaks the admission extension.
//!
//! Resumes skip step 3: the resume key proves the client was admitted.
//! `registry.rs` explains how resume keys rotate and are proven; a newer
//! link displaces the session's live one (which may be half-open) as long
//! as the key it was routed with is still valid; a stale link whose key the
//! live link's proof revoked in the meantime is rejected instead.
//!
//! A session whose close completed leaves a tombstone for the resume
//! window: its keys are answered "closed" instead of rejected, so a client
//! whose last link died during the close learns that it completed. A
//! session whose client never proves its key is dropped one handshake
//! timeout after it was created.

mod admission;
mod driver;
mod registry;
mod snapshot;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tether_proto::proof::{
    Accepted as ProofAccepted, Ephemeral, ResumeRequest, ServerResume, RESUME_REQUEST_LEN,
};
use tether_proto::{
    ext, ClientHello, Refusal as WireRefusal, RefusalKind, ResumeKey, Seq, ServerHello, SessionId,
    HELLO_LEN,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};

pub use self::admission::{Admission, Authorize, Denied, Grant};
use self::admission::{DynAuthorize, Pending, PendingSlot, Source};
use self::driver::SessionDriver;
use self::registry::{First, Full, ProofRoute, Registry, Route, Tomb};
use self::snapshot::Ended;
pub use self::snapshot::{LiveSessions, ServerSnapshot, SessionTotals};
use super::attach::{endpoint, Handles};
use super::budget::MemoryBudget;
use super::config::Config;
use super::shared::{Role, Shared};
use super::{ConduitState, StableConduit, Stats};
use crate::error::SessionLost;
use crate::link::{Link, LinkRx, LinkTx, Listener, PeerInfo, PendingLink};

/// Server-wide counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Links accepted from the listener.
    pub links_accepted: u64,
    /// Links closed at once because a cap on pending handshakes (global or
    /// per source) was reached.
    pub handshakes_refused: u64,
    /// Links in their handshake now.
    pub pending_handshakes: u64,
    /// Sessions created.
    pub sessions_created: u64,
    /// Sessions currently registered (alive or waiting for a resume).
    pub sessions_open: u64,
    /// Sessions that ended with their close completed.
    pub sessions_closed: u64,
    /// Sessions that ended lost (expired, close timed out, protocol error,
    /// shut down), including sessions nobody saw that ended so before their
    /// proof deadline. Those dropped at it count in `unproven_dropped`:
    /// once every driver is done, `sessions_created` is `sessions_open +
    /// sessions_closed + sessions_lost + unproven_dropped`.
    pub sessions_lost: u64,
    /// Closed sessions remembered for the resume window, so that a late
    /// resume is answered "closed".
    pub tombstones: u64,
    /// Resumes routed to an existing session.
    pub resumes: u64,
    /// Resumes rejected (unknown, expired or replaced key).
    pub rejected: u64,
    /// New sessions refused as busy: a session cap or the memory budget
    /// was reached, or the server is shutting down.
    pub refused_busy: u64,
    /// New sessions refused by the application's [`Authorize`] hook.
    pub refused_denied: u64,
    /// New sessions refused because the client lacked a required
    /// extension.
    pub refused_policy: u64,
    /// New sessions dropped because their client never proved its key
    /// within the handshake timeout.
    pub unproven_dropped: u64,
    /// Links dropped during the handshake: setup failed, malformed or
    /// oversized hello, timeout, or closed before the hello.
    pub bad_handshakes: u64,
    /// Resumes with proof of possession (`PROOF`) that verified.
    pub proof_resumes: u64,
    /// `PROOF` resumes refused for their proof: a bad MAC, a replayed
    /// counter, a low-order key, or a proof for a bearer session. Only that
    /// link was answered; the session was not touched. (A bearer resume
    /// that names a `PROOF` session's id counts in `rejected`.)
    pub bad_proofs: u64,
    /// Bytes all sessions' replay buffers and receive queues hold now,
    /// against [`Config::memory_budget`].
    pub memory_used: u64,
}

#[derive(Default)]
struct Counters {
    links_accepted: AtomicU64,
    handshakes_refused: AtomicU64,
    sessions_created: AtomicU64,
    resumes: AtomicU64,
    rejected: AtomicU64,
    refused_busy: AtomicU64,
    refused_denied: AtomicU64,
    refused_policy: AtomicU64,
    unproven_dropped: AtomicU64,
    bad_handshakes: AtomicU64,
    proof_resumes: AtomicU64,
    bad_proofs: AtomicU64,
}

/// What a server knows of one of its sessions: who the client is and what
/// the application's [`Authorize`] hook decided. See
/// [`StableConduit::session_info`].
#[derive(Debug)]
pub struct SessionInfo {
    id: u64,
    peer: PeerInfo,
    grant: Grant,
    session_id: Option<SessionId>,
}

impl SessionInfo {
    /// The session's id: unique within this server, for logs and for
    /// [`Server::sessions`]. Not a secret and not a credential (resume keys
    /// are the secrets, and never leave the handshake).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What the link that opened the session knew of the peer.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// What the authorization hook decided ([`Grant::none`] without one).
    pub fn grant(&self) -> &Grant {
        &self.grant
    }

    /// The public session id that the client's hellos carry, for a session
    /// with proof-of-possession resume (`PROOF`); `None` for a session with
    /// bearer resume keys. Not a secret: it links the session's resumes.
    pub fn session_id(&self) -> Option<SessionId> {
        self.session_id
    }
}

/// One session in [`Server::sessions`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionSummary {
    /// Who the session is with.
    pub info: Arc<SessionInfo>,
    /// Whether it was handed to [`Server::accept`] (the client proved its
    /// key).
    pub accepted: bool,
    /// Its counters now.
    pub stats: Stats,
}

/// How a [`Server::shutdown`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Sessions whose close completed in time: everything was delivered.
    pub closed: usize,
    /// Sessions that were lost: the deadline passed first (their handles
    /// see [`SessionLost::ServerShutdown`], or how they ended earlier).
    pub lost: usize,
}

/// A new link for a session, with the client's hello already read.
struct Attach<L: Link> {
    tx: L::Tx,
    rx: L::Rx,
    cred: Cred,
    client_last_received: Option<Seq>,
    client_extensions: u8,
}

/// How a link proves it belongs to its session, and what the ServerHello
/// carries.
enum Cred {
    /// Bearer keys: the fresh key this link's ServerHello carries.
    Bearer(ResumeKey),
    /// A new session with `PROOF`: the ServerHello carries the session id
    /// and the server's key share; the client's key share follows.
    ProofNew {
        id: SessionId,
        eph: Ephemeral,
        client_hello: Bytes,
    },
    /// A `PROOF` resume that verified with `accepted.secret`.
    ProofResume {
        id: SessionId,
        answer: ServerResume,
        accepted: ProofAccepted,
    },
}

impl Cred {
    /// What the ServerHello's key field carries.
    fn hello_key(&self) -> ResumeKey {
        match self {
            Cred::Bearer(key) => *key,
            Cred::ProofNew { id, .. } | Cred::ProofResume { id, .. } => id.as_key(),
        }
    }
}

/// A session on its way to [`Server::accept`].
type Accepted = (Handles, Arc<SessionInfo>);

/// Room in the queue of sessions waiting for [`Server::accept`]; a new
/// session is refused as busy while it is full.
const ACCEPT_QUEUE: usize = 1024;

/// The retry hint to a `PROOF` resume of a session whose key share has not
/// arrived yet.
const NOT_YET_RETRY: Duration = Duration::from_millis(50);

/// The retry hint of a busy refusal.
const BUSY_RETRY: Duration = Duration::from_secs(1);

struct Inner<L: Link> {
    config: Config,
    registry: Mutex<Registry<L>>,
    counters: Counters,
    pending: Arc<Pending>,
    accepted: mpsc::Sender<Accepted>,
    authorizer: Option<Box<dyn DynAuthorize>>,
    shutting_down: AtomicBool,
    /// What every session's replay buffer and receive queue hold, together.
    budget: Arc<MemoryBudget>,
}

impl<L: Link> Inner<L> {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry<L>> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a client that offered `offered` speaks the admission
    /// extension with this server: it reads typed refusals, and can be told
    /// to restart.
    fn speaks_admission(&self, offered: u8) -> bool {
        ext::negotiate(offered, self.config.extensions) & ext::ADMISSION != 0
    }
}

/// A stable-conduit server: admits links from a [`Listener`], keeps
/// sessions, and routes resuming clients back to their session.
///
/// Each new session is handed out by [`accept`](Self::accept) as a
/// [`StableConduit`] with the same guarantees as the client's, carrying its
/// [`SessionInfo`]. `accept` takes `&self`: share the server (in an `Arc`)
/// to accept from several tasks. A client that sends garbage, stalls in its
/// handshake, floods or presents a forged key only loses its own link; the
/// caps of [`Config`] bound what all clients together can make the server
/// hold (`docs/SECURITY.md`).
///
/// [`shutdown`](Self::shutdown) closes every session gracefully. Dropping
/// the server stops accepting; sessions with a live link go on, and fail
/// with [`SessionLost::ServerShutdown`] when they would need a resume.
///
/// An echo server with its accept loop, one task per session, and a
/// graceful shutdown (over memory here; a
/// [`TcpListener`](crate::link::TcpListener) or any other [`Listener`]
/// works the same):
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tether::Error> {
/// use std::{sync::Arc, time::Duration};
/// use tether::{link::mem, Config, Server, StableConduit};
///
/// let (listener, connector) = mem::listener(16);
/// let server = Arc::new(Server::<String>::new(listener, Config::default()));
/// let accepting = tokio::spawn({
///     let server = Arc::clone(&server);
///     async move {
///         while let Some(mut session) = server.accept().await {
///             tokio::spawn(async move {
///                 // Each message once, in order, until the client closes.
///                 while let Ok(Some(msg)) = session.recv().await {
///                     if session.send(&msg).await.is_err() {
///                         break;
///                     }
///                 }
///             });
///         }
///     }
/// });
///
/// let mut client = StableConduit::<String>::connect(connector, Config::default()).await?;
/// client.send("echo?").await?;
/// assert_eq!(client.recv().await?.as_deref(), Some("echo?"));
///
/// // Close every session, waiting up to 5 s; then `accept` returns `None`.
/// let report = server.shutdown(Duration::from_secs(5)).await;
/// assert_eq!((report.closed, report.lost), (1, 0));
/// assert_eq!(client.recv().await?, None); // the client saw the close
/// accepting.await.unwrap();
/// # Ok(())
/// # }
/// ```
pub struct Server<S, R = S> {
    inner: Arc<dyn ServerShared>,
    accepted: tokio::sync::Mutex<mpsc::Receiver<Accepted>>,
    /// Set once [`Server::shutdown`] is done: `accept` returns `None`.
    stopped: tokio::sync::watch::Sender<bool>,
    accept_task: JoinHandle<()>,
    _msg: std::marker::PhantomData<fn(&S) -> R>,
}

impl<L: Link> Inner<L> {
    /// [`ServerStats`], with what was read from the registry.
    fn stats_with(&self, sessions_open: u64, tombstones: u64, ended: &Ended) -> ServerStats {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStats {
            links_accepted: n(&c.links_accepted),
            handshakes_refused: n(&c.handshakes_refused),
            pending_handshakes: self.pending.count() as u64,
            sessions_created: n(&c.sessions_created),
            sessions_open,
            sessions_closed: ended.closed,
            sessions_lost: ended.lost,
            tombstones,
            resumes: n(&c.resumes),
            rejected: n(&c.rejected),
            refused_busy: n(&c.refused_busy),
            refused_denied: n(&c.refused_denied),
            refused_policy: n(&c.refused_policy),
            unproven_dropped: n(&c.unproven_dropped),
            bad_handshakes: n(&c.bad_handshakes),
            proof_resumes: n(&c.proof_resumes),
            bad_proofs: n(&c.bad_proofs),
            memory_used: self.budget.used() as u64,
        }
    }
}

/// The untyped part of a server the handle needs (so `Server` does not carry
/// the link type).
trait ServerShared: Send + Sync {
    fn stats(&self) -> ServerStats;
    fn snapshot(&self) -> ServerSnapshot;
    fn sessions(&self) -> Vec<SessionSummary>;
    /// Refuses new sessions from now on, and returns the live ones:
    /// those handed to `accept`, and those never proven (nobody saw them).
    fn begin_shutdown(&self) -> (Vec<Arc<Shared>>, Vec<Arc<Shared>>);
}

impl<L: Link> ServerShared for Inner<L> {
    fn stats(&self) -> ServerStats {
        let (sessions_open, tombstones, ended) = {
            let registry = self.registry();
            let (open, tombs) = (registry.live() as u64, registry.tombstones as u64);
            (open, tombs, registry.ended.clone())
        };
        self.stats_with(sessions_open, tombstones, &ended)
    }

    fn snapshot(&self) -> ServerSnapshot {
        // One look at the registry: the live sessions and what the ended
        // ones left, consistent with each other (`Registry::fold`). Each
        // session's counters are read outside the registry's lock.
        let (live, sessions_open, tombstones, ended) = {
            let registry = self.registry();
            let live: Vec<Arc<Shared>> = registry
                .live_entries()
                .filter_map(|e| e.shared.upgrade())
                .collect();
            let (open, tombs) = (registry.live() as u64, registry.tombstones as u64);
            (live, open, tombs, registry.ended.clone())
        };
        let live: Vec<Stats> = live.iter().map(|shared| shared.stats()).collect();
        let (totals, live) = snapshot::summarize(&ended.totals, &live);
        ServerSnapshot {
            stats: self.stats_with(sessions_open, tombstones, &ended),
            totals,
            live,
            memory_budget: self.budget.limit() as u64,
        }
    }

    fn sessions(&self) -> Vec<SessionSummary> {
        let live: Vec<_> = self
            .registry()
            .live_entries()
            .map(|e| (e.info.clone(), e.accepted, e.shared.clone()))
            .collect();
        // Stats take the session's own locks: outside the registry's.
        live.into_iter()
            .filter_map(|(info, accepted, weak)| {
                let stats = weak.upgrade()?.stats();
                Some(SessionSummary {
                    info,
                    accepted,
                    stats,
                })
            })
            .collect()
    }

    fn begin_shutdown(&self) -> (Vec<Arc<Shared>>, Vec<Arc<Shared>>) {
        self.shutting_down.store(true, Ordering::Release);
        let (mut accepted, mut unseen) = (Vec::new(), Vec::new());
        for entry in self.registry().live_entries() {
            if let Some(shared) = entry.shared.upgrade() {
                match entry.accepted {
                    true => accepted.push(shared),
                    false => unseen.push(shared),
                }
            }
        }
        (accepted, unseen)
    }
}

impl<S, R> Server<S, R> {
    /// Starts serving links from `listener`, admitting every client that
    /// fits under the caps of `config`. Must be called within a tokio
    /// runtime.
    pub fn new<Li: Listener>(listener: Li, config: Config) -> Self {
        Self::start(listener, config, None)
    }

    /// Like [`new`](Self::new), and asks `authorizer` about every client
    /// that wants a new session.
    pub fn with_authorizer<Li: Listener>(
        listener: Li,
        config: Config,
        authorizer: impl Authorize,
    ) -> Self {
        Self::start(listener, config, Some(Box::new(authorizer)))
    }

    fn start<Li: Listener>(
        mut listener: Li,
        config: Config,
        authorizer: Option<Box<dyn DynAuthorize>>,
    ) -> Self {
        let (accepted_tx, accepted) = mpsc::channel(ACCEPT_QUEUE);
        let budget_limit = config.memory_budget;
        let inner = Arc::new(Inner::<Li::Link> {
            pending: Pending::new(config.max_pending_handshakes, config.max_pending_per_source),
            config,
            registry: Mutex::new(Registry::new()),
            counters: Counters::default(),
            accepted: accepted_tx,
            authorizer,
            shutting_down: AtomicBool::new(false),
            budget: Arc::new(MemoryBudget::new(budget_limit)),
        });
        let weak = Arc::downgrade(&inner);
        let accept_task = tokio::spawn(async move {
            let mut failures = 0u64;
            loop {
                let pending = match listener.accept().await {
                    Ok(pending) => pending,
                    Err(e) => {
                        // Typically out of file descriptors: back off
                        // briefly, and say so once per 1,000 failures.
                        if failures % 1000 == 0 {
                            tracing::warn!(error = %e, failures, "accept failed");
                        }
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Some(inner) = weak.upgrade() else { return };
                let c = &inner.counters;
                c.links_accepted.fetch_add(1, Ordering::Relaxed);
                // Checked before anything is read or set up: a link over a
                // cap costs nothing but the accept.
                let source = Source::of(pending.addr());
                let Some(slot) = inner.pending.enter(source) else {
                    c.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(?source, "pending handshake cap reached: closing a link");
                    continue;
                };
                tokio::spawn(handle_link(inner, pending, slot));
            }
        });
        Server {
            inner,
            accepted: tokio::sync::Mutex::new(accepted),
            stopped: tokio::sync::watch::Sender::new(false),
            accept_task,
            _msg: std::marker::PhantomData,
        }
    }

    /// The next new session. `None` once the server stopped. Cancel-safe,
    /// and callable from several tasks at once (each session goes to one).
    pub async fn accept(&self) -> Option<StableConduit<S, R>> {
        let mut stopped = self.stopped.subscribe();
        let next = async {
            let mut accepted = self.accepted.lock().await;
            accepted.recv().await
        };
        let (handles, info) = tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s) => return None,
            next = next => next?,
        };
        Some(StableConduit::from_handles(handles).with_info(info))
    }

    /// A snapshot of the server's counters.
    pub fn stats(&self) -> ServerStats {
        self.inner.stats()
    }

    /// Everything an operator monitors, in one snapshot: [`stats`](Self::stats),
    /// counters summed over every session (live and ended: frames sent,
    /// received, replayed...), what the live sessions hold now (replay
    /// buffers, receive queues) and their round-trip times.
    ///
    /// It walks the live sessions and reads each one's counters (briefly
    /// taking its send lock, as [`sessions`](Self::sessions) does): call it
    /// when a scraper asks, not per message. Nothing is added to the
    /// sessions' own paths for it: a session's counters join the server's
    /// totals once, when it ends. Totals never go down from one snapshot
    /// to the next. With the `metrics` feature, `tether::metrics::record_server`
    /// records it through the `metrics` facade (`docs/METRICS.md`).
    pub fn snapshot(&self) -> ServerSnapshot {
        self.inner.snapshot()
    }

    /// Every live session (not the tombstones), with its counters.
    pub fn sessions(&self) -> Vec<SessionSummary> {
        self.inner.sessions()
    }

    /// Closes every session gracefully and stops the server.
    ///
    /// New sessions are refused as busy from now on; resumes are still
    /// served, so that clients whose link is down can come back and finish
    /// their close. Every session's close begins at once (its application
    /// can still `recv` what the client sent before it learned of the
    /// close). Sessions whose close has not completed when `deadline`
    /// passes are lost with [`SessionLost::ServerShutdown`]. Then the
    /// listener is dropped and [`accept`](Self::accept) returns `None`.
    ///
    /// Sessions the application never saw (their client never proved its
    /// key share, typically because a cut ate the server's answer and the
    /// client started another session) are dropped at once, without a
    /// warning, and not counted in the report: nothing was delivered to
    /// them or accepted from them.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let until = Instant::now() + deadline;
        let (sessions, unseen) = self.inner.begin_shutdown();
        for shared in &unseen {
            shared.discard(SessionLost::ServerShutdown);
        }
        for shared in &sessions {
            shared.begin_close();
        }
        let mut report = ShutdownReport::default();
        for shared in &sessions {
            let ended = timeout_at(until, shared.wait_ended()).await;
            if !matches!(ended, Ok(Ok(()))) {
                shared.fail(SessionLost::ServerShutdown);
            }
            match shared.state() {
                ConduitState::Closed => report.closed += 1,
                _ => report.lost += 1,
            }
        }
        self.accept_task.abort();
        self.stopped.send_replace(true);
        report
    }
}

impl<S, R> Drop for Server<S, R> {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Sets up one link, reads its hello, and routes it; within the handshake
/// timeout, holding a pending-handshake slot until the hello is answered.
async fn handle_link<L: Link, P: PendingLink<Link = L>>(
    inner: Arc<Inner<L>>,
    pending: P,
    slot: PendingSlot,
) {
    let deadline = Instant::now() + inner.config.handshake_timeout;
    let bad = |why: String| {
        tracing::debug!(%why, "dropping link in handshake");
        inner
            .counters
            .bad_handshakes
            .fetch_add(1, Ordering::Relaxed);
    };
    let link = match timeout_at(deadline, pending.establish()).await {
        Ok(Ok(link)) => link,
        Ok(Err(e)) => return bad(format!("link setup failed: {e}")),
        Err(_) => return bad("link setup timed out".into()),
    };
    let peer = link.peer();
    let (tx, mut rx) = link.split();
    // The hello is read with a limit of its own size: a longer length
    // prefix ends the link before anything is reserved for it. Only a
    // server that asks an authorizer takes a credential after it.
    let credential_room = match inner.authorizer {
        Some(_) => inner.config.max_credential_len,
        None => 0,
    };
    // A `PROOF` resume request is longer than a hello: the limit covers it.
    let proof_room = if inner.config.extensions & ext::PROOF != 0 {
        RESUME_REQUEST_LEN
    } else {
        HELLO_LEN
    };
    rx.set_max_payload((HELLO_LEN + credential_room).max(proof_room));
    let payload = match timeout_at(deadline, rx.recv()).await {
        Ok(Ok(Some(p))) => p,
        Ok(Ok(None)) => return bad("link closed before the hello".into()),
        Ok(Err(e)) => return bad(e.to_string()),
        Err(_) => return bad("handshake timed out".into()),
    };
    rx.set_max_payload(usize::MAX);
    let head = match payload.get(..HELLO_LEN).map(ClientHello::decode) {
        Some(Ok(head)) => head,
        Some(Err(e)) => return bad(format!("malformed client hello: {e}")),
        None => return bad(format!("client hello of {} bytes", payload.len())),
    };
    let proof = ext::negotiate(head.extensions, inner.config.extensions) & ext::PROOF != 0;
    tracing::trace!(
        resume = head.resume_key.is_some(),
        extensions = head.extensions,
        proof,
        "client hello"
    );
    if proof && head.resume_key.is_some() {
        drop(slot);
        return resume_with_proof(inner, tx, rx, payload, head).await;
    }
    let (hello, credential) = match ClientHello::decode_with_credential(&payload) {
        Ok((hello, credential)) => (hello, payload.slice_ref(credential)),
        Err(e) => return bad(format!("malformed client hello: {e}")),
    };
    if !credential.is_empty() && credential_room == 0 {
        return bad("a credential, and no authorizer to take it".into());
    }
    let cred = if proof {
        match (
            SessionId::generate(inner.config.node_id),
            Ephemeral::generate(),
        ) {
            (Ok(id), Ok(eph)) => Cred::ProofNew {
                id,
                eph,
                client_hello: payload.clone(),
            },
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "no secure randomness for a session id");
                return;
            }
        }
    } else {
        match ResumeKey::generate() {
            Ok(key) => Cred::Bearer(key),
            Err(e) => {
                tracing::error!(error = %e, "no secure randomness for a resume key");
                return;
            }
        }
    };
    let attach = Attach::<L> {
        tx,
        rx,
        cred,
        client_last_received: hello.last_received,
        client_extensions: hello.extensions,
    };
    let Some(key) = hello.resume_key else {
        let request = Admission {
            peer,
            credential,
            extensions: hello.extensions,
        };
        return admit(inner, attach, request, deadline, slot).await;
    };
    drop(slot);
    let Cred::Bearer(fresh) = attach.cred else {
        unreachable!("a bearer resume gets a bearer key");
    };
    let route = inner.registry().route(&key, fresh);
    let attach = match route {
        Some(Route::Ended(tomb)) => {
            return answer_tomb(&inner, attach.tx, tomb, hello.extensions).await
        }
        Some(Route::Session(session)) => match session.send(Box::new(attach)).await {
            Ok(()) => {
                inner.counters.resumes.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(mpsc::error::SendError(attach)) => *attach,
        },
        None => attach,
    };
    tracing::debug!(?key, "rejecting resume");
    reject(&inner, attach.tx).await;
}

/// Answers a resume of a session that ended: "closed", or "restart" to a
/// client that can be told so (a rejection to others).
async fn answer_tomb<L: Link>(inner: &Inner<L>, tx: L::Tx, tomb: Tomb, offered: u8) {
    match tomb {
        Tomb::Closed => {
            tracing::debug!("resume of a closed session");
            answer(inner, tx, &ServerHello::closed().encode()).await;
        }
        Tomb::Unproven => {
            tracing::debug!("resume of a session that never started");
            restart(inner, tx, offered).await;
        }
    }
}

/// Tells the client its session never started (nothing was delivered); a
/// plain rejection to a client that does not speak the admission extension.
async fn restart<L: Link>(inner: &Inner<L>, tx: L::Tx, offered: u8) {
    if !inner.speaks_admission(offered) {
        return reject(inner, tx).await;
    }
    let restart = WireRefusal {
        kind: RefusalKind::Restart,
        retry_after_ms: 0,
        reason: "the session never started: open a new one".into(),
    };
    answer(inner, tx, &restart.encode()).await;
}

/// A resume with proof of possession: checks the request's MAC and counter
/// against the session's secrets, and routes it only if they verify. A
/// request that does not verify is answered on its own link only, and the
/// session (and its live link) is not touched.
async fn resume_with_proof<L: Link>(
    inner: Arc<Inner<L>>,
    tx: L::Tx,
    rx: L::Rx,
    payload: Bytes,
    head: ClientHello,
) {
    let request = match ResumeRequest::decode(&payload) {
        Ok(request) => request,
        Err(e) => {
            inner
                .counters
                .bad_handshakes
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "malformed proof resume");
            return;
        }
    };
    // The X25519 exchange needs no secret: done before the registry's lock.
    let eph = match Ephemeral::generate() {
        Ok(eph) => eph,
        Err(e) => {
            tracing::error!(error = %e, "no secure randomness for a key share");
            return;
        }
    };
    let answer_prep = match ServerResume::new(&payload, eph) {
        Ok(prep) => prep,
        Err(e) => {
            inner.counters.bad_proofs.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "refusing a proof resume");
            return reject(&inner, tx).await;
        }
    };
    let route = inner.registry().route_proof(&payload, &request);
    let id = request.session_id;
    match route {
        ProofRoute::Session(session, accepted) => {
            let attach = Attach::<L> {
                tx,
                rx,
                cred: Cred::ProofResume {
                    id,
                    answer: answer_prep,
                    accepted,
                },
                client_last_received: head.last_received,
                client_extensions: head.extensions,
            };
            match session.send(Box::new(attach)).await {
                Ok(()) => {
                    let c = &inner.counters;
                    c.resumes.fetch_add(1, Ordering::Relaxed);
                    c.proof_resumes.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::SendError(attach)) => reject(&inner, attach.tx).await,
            }
        }
        ProofRoute::Ended(tomb) => answer_tomb(&inner, tx, tomb, head.extensions).await,
        ProofRoute::NoSecret => {
            // The key share may still be on its way (the driver reads it
            // from the first link): answering "restart" now could let the
            // client start over while this session then gets its key share
            // and delivers what followed it, twice. So the client is told to
            // come back; the session either gets its secret (the resume
            // then verifies) or is dropped at its proof deadline, and its
            // tombstone answers "restart".
            tracing::debug!(%id, "resume of a session whose key share has not arrived");
            let not_yet = WireRefusal {
                kind: RefusalKind::Busy,
                retry_after_ms: NOT_YET_RETRY.as_millis() as u32,
                reason: "the session is not ready yet: try again".into(),
            };
            answer(&inner, tx, &not_yet.encode()).await;
        }
        ProofRoute::Unknown => {
            tracing::debug!(%id, "rejecting resume of an unknown session");
            reject(&inner, tx).await;
        }
        ProofRoute::BadProof => {
            inner.counters.bad_proofs.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%id, "rejecting a resume whose proof did not verify");
            reject(&inner, tx).await;
        }
    }
}

/// Decides on a new session: policy, capacity, then the application.
async fn admit<L: Link>(
    inner: Arc<Inner<L>>,
    attach: Attach<L>,
    request: Admission,
    deadline: Instant,
    slot: PendingSlot,
) {
    let source = Source::of(request.peer.addr);
    let required = inner.config.require_extensions;
    let negotiated = ext::negotiate(request.extensions, inner.config.extensions);
    if negotiated & required != required {
        let reason = format!(
            "this server requires extensions {required:#04x}; the client offered {:#04x}",
            request.extensions
        );
        return refuse(&inner, attach.tx, &request, RefusalKind::Policy, reason).await;
    }
    if let Err(why) = capacity(&inner, source) {
        return refuse(&inner, attach.tx, &request, RefusalKind::Busy, why).await;
    }
    let grant = match &inner.authorizer {
        None => Grant::none(),
        Some(authorizer) => match timeout_at(deadline, authorizer.decide(&request)).await {
            Ok(Ok(grant)) => grant,
            Ok(Err(denied)) => {
                tracing::debug!(reason = %denied.reason, "authorization refused a client");
                return refuse(
                    &inner,
                    attach.tx,
                    &request,
                    RefusalKind::Denied,
                    denied.reason,
                )
                .await;
            }
            Err(_) => {
                inner
                    .counters
                    .bad_handshakes
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!("authorization did not decide within the handshake timeout");
                return;
            }
        },
    };
    drop(slot);
    let peer = request.peer.clone();
    if let Err(attach) = new_session(inner.clone(), attach, peer, source, grant) {
        let why = "a session limit was reached".to_string();
        refuse(&inner, attach.tx, &request, RefusalKind::Busy, why).await;
    }
}

/// Why a new session from `source` does not fit now, if it does not.
fn capacity<L: Link>(inner: &Inner<L>, source: Option<Source>) -> Result<(), String> {
    let config = &inner.config;
    if inner.shutting_down.load(Ordering::Acquire) {
        return Err("the server is shutting down".into());
    }
    if inner.budget.is_over() {
        return Err(format!(
            "memory budget of {} bytes reached",
            inner.budget.limit()
        ));
    }
    if inner.accepted.capacity() == 0 {
        return Err("the application is not accepting sessions".into());
    }
    match inner
        .registry()
        .check(source, config.max_sessions, config.max_sessions_per_source)
    {
        Ok(()) => Ok(()),
        Err(Full::Sessions) => Err(format!("session limit of {} reached", config.max_sessions)),
        Err(Full::Source) => Err(format!(
            "limit of {} sessions per source address reached",
            config.max_sessions_per_source
        )),
    }
}

/// Answers with the rejected flag and closes the link.
async fn reject<L: Link>(inner: &Inner<L>, tx: L::Tx) {
    inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
    answer(inner, tx, &ServerHello::reject().encode()).await;
}

/// Refuses a new session: a typed refusal to a client that speaks the
/// admission extension, a plain rejection to others.
async fn refuse<L: Link>(
    inner: &Inner<L>,
    tx: L::Tx,
    request: &Admission,
    kind: RefusalKind,
    reason: String,
) {
    let counter = match kind {
        RefusalKind::Busy => &inner.counters.refused_busy,
        RefusalKind::Denied => &inner.counters.refused_denied,
        _ => &inner.counters.refused_policy,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(?kind, %reason, peer = ?request.peer.addr, "refusing a new session");
    if !inner.speaks_admission(request.extensions) {
        return answer(inner, tx, &ServerHello::reject().encode()).await;
    }
    let retry_after_ms = match kind {
        RefusalKind::Busy => BUSY_RETRY.as_millis() as u32,
        _ => 0,
    };
    let refusal = WireRefusal {
        kind,
        retry_after_ms,
        reason,
    };
    answer(inner, tx, &refusal.encode()).await;
}

/// Sends `hello` and closes the link, within the handshake timeout.
async fn answer<L: Link>(inner: &Inner<L>, mut tx: L::Tx, hello: &[u8]) {
    let hello = Bytes::copy_from_slice(hello);
    let _ = tokio::time::timeout(inner.config.handshake_timeout, async {
        let _ = tx.send(hello).await;
        let _ = tx.close().await;
    })
    .await;
}

/// Registers and starts a new session, unless a session cap was reached
/// since [`capacity`] looked (the check and the insert are one step here).
fn new_session<L: Link>(
    inner: Arc<Inner<L>>,
    attach: Attach<L>,
    peer: PeerInfo,
    source: Option<Source>,
    grant: Grant,
) -> Result<(), Box<Attach<L>>> {
    let config = &inner.config;
    let client_extensions = attach.client_extensions;
    let shared = Shared::new(
        config,
        Role::Server,
        ConduitState::Connecting,
        Some(inner.budget.clone()),
    );
    let (attach_tx, attach_rx) = mpsc::channel(4);
    let (id, info) = {
        let mut registry = inner.registry();
        if registry
            .check(source, config.max_sessions, config.max_sessions_per_source)
            .is_err()
        {
            return Err(Box::new(attach));
        }
        let id = registry.reserve_id();
        let session_id = match &attach.cred {
            Cred::ProofNew { id, .. } => Some(*id),
            _ => None,
        };
        let info = Arc::new(SessionInfo {
            id,
            peer,
            grant,
            session_id,
        });
        let weak = Arc::downgrade(&shared);
        let first = match session_id {
            Some(session_id) => First::Proof(session_id),
            None => First::Bearer(attach.cred.hello_key()),
        };
        registry.insert(id, first, attach_tx, source, info.clone(), weak);
        (id, info)
    };
    inner
        .counters
        .sessions_created
        .fetch_add(1, Ordering::Relaxed);
    let (ep, handles) = endpoint(shared.clone());
    // A client that speaks the admission extension can be told to start
    // over (`RefusalKind::Restart`), so its unproven session goes after a
    // handshake timeout; a base-format client cannot, and keeps the resume
    // window (the per-source and global caps still bound how many).
    let proof_window = if inner.speaks_admission(client_extensions) {
        config.handshake_timeout
    } else {
        config.resume_window
    };
    let proof_deadline = Instant::now() + proof_window;
    let driver = SessionDriver {
        weak: Arc::downgrade(&inner),
        id,
        shared,
        endpoint: ep,
        info,
        unaccepted: Arc::new(Mutex::new(Some(handles))),
        proof_deadline,
    };
    // The driver answers the client at once, and hands the session to
    // `accept` once the client proves it holds the key.
    let span = tracing::info_span!("tether_session", id);
    tokio::spawn(tracing::Instrument::instrument(
        driver.run(attach, attach_rx),
        span,
    ));
    Ok(())
}
