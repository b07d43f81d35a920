//! The server side: accept links, read hellos, create sessions, and route
//! resumes to the session they belong to.
//!
//! Resume keys rotate on every handshake. A key handed out in a ServerHello
//! may never reach the client (the link can die right after the server sent
//! it), and a hello can reach the server late, after the client gave up on
//! that attempt and succeeded with another. So the server keeps, per
//! session, the last key the client is known to hold (`confirmed`) beside
//! the keys it issued since (`pending`, a few at most). A key is *proven*
//! by a resume with it or by the first frame the client sends on the link
//! that carried it: it becomes `confirmed` and every other key stops
//! working. A resume with `confirmed` (the client never saw a pending key,
//! or it is a stale hello) issues one more pending key and withdraws none,
//! so a late hello can never revoke the key the client really holds. A
//! newer link displaces the session's live one (which may be half-open) as
//! long as the key it was routed with is still valid; a stale link whose
//! key the live link's proof revoked in the meantime is rejected instead.
//!
//! A session whose close completed leaves a tombstone for the resume
//! window: its keys are answered "closed" instead of rejected, so a client
//! whose last link died during the close learns that it completed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tether_proto::{ext, ClientHello, ResumeKey, Seq, ServerHello};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::attach::{endpoint, run_attachment, AttachEnd, Endpoint, Handles};
use super::config::Config;
use super::shared::{Role, Shared, Terminal};
use super::{ConduitState, StableConduit};
use crate::error::SessionLost;
use crate::link::{Link, LinkRx, LinkTx, Listener};

/// Server-wide counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Links accepted.
    pub links_accepted: u64,
    /// Sessions created.
    pub sessions_created: u64,
    /// Sessions currently registered (alive or waiting for a resume).
    pub sessions_open: u64,
    /// Closed sessions remembered for the resume window, so that a late
    /// resume is answered "closed".
    pub tombstones: u64,
    /// Resumes routed to an existing session.
    pub resumes: u64,
    /// Resumes rejected (unknown, expired or replaced key).
    pub rejected: u64,
    /// Links dropped during the handshake: malformed hello, timeout, or
    /// closed before the hello.
    pub bad_handshakes: u64,
}

#[derive(Default)]
struct Counters {
    links_accepted: AtomicU64,
    sessions_created: AtomicU64,
    resumes: AtomicU64,
    rejected: AtomicU64,
    bad_handshakes: AtomicU64,
}

/// A new link for a session, with the client's hello already read.
struct Attach<L: Link> {
    tx: L::Tx,
    rx: L::Rx,
    key: ResumeKey,
    client_last_received: Option<Seq>,
    client_extensions: u8,
}

/// Where a session's driver receives the links that resume it. Boxed: the
/// channel's slots then cost a pointer each, not a whole pair of link
/// halves, in every idle session.
type AttachTx<L> = mpsc::Sender<Box<Attach<L>>>;
type AttachRx<L> = mpsc::Receiver<Box<Attach<L>>>;

/// Most keys issued to a session and not yet proven. Each handshake with
/// the confirmed key adds one; a client's own attempts are sequential, so
/// more than a few are stale hellos, and the oldest goes first.
const MAX_PENDING_KEYS: usize = 8;

struct Entry<L: Link> {
    confirmed: Option<ResumeKey>,
    pending: Vec<ResumeKey>,
    attach: AttachTx<L>,
    /// The close completed: a tombstone until the resume window passes.
    closed: bool,
}

/// Where a resume goes.
enum Route<L: Link> {
    Session(AttachTx<L>),
    Closed,
}

struct Registry<L: Link> {
    by_key: HashMap<ResumeKey, u64>,
    sessions: HashMap<u64, Entry<L>>,
    next_id: u64,
    tombstones: usize,
}

impl<L: Link> Registry<L> {
    fn insert(&mut self, key: ResumeKey, attach: AttachTx<L>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.by_key.insert(key, id);
        self.sessions.insert(
            id,
            Entry {
                confirmed: None,
                pending: vec![key],
                attach,
                closed: false,
            },
        );
        id
    }

    /// Looks `key` up: a live session's attach channel, with `fresh`
    /// registered as its newest pending key; a tombstone; or `None` if the
    /// key is not (or no longer) valid.
    fn route(&mut self, key: &ResumeKey, fresh: ResumeKey) -> Option<Route<L>> {
        // HashMap lookup hashes with a per-process random SipHash key; the
        // final comparison is `ResumeKey`'s constant-time equality.
        let id = *self.by_key.get(key)?;
        let entry = self.sessions.get_mut(&id)?;
        if entry.closed {
            return Some(Route::Closed);
        }
        if entry.pending.contains(key) {
            // The client holds this key: it is proven, the rest is revoked.
            prove(&mut self.by_key, entry, key);
        } else if entry.pending.len() >= MAX_PENDING_KEYS {
            let oldest = entry.pending.remove(0);
            self.by_key.remove(&oldest);
        }
        entry.pending.push(fresh);
        self.by_key.insert(fresh, id);
        Some(Route::Session(entry.attach.clone()))
    }

    /// The client proved it holds `key` by sending a frame on the link that
    /// delivered it.
    fn confirm(&mut self, id: u64, key: &ResumeKey) {
        if let Some(entry) = self.sessions.get_mut(&id) {
            if entry.pending.contains(key) {
                prove(&mut self.by_key, entry, key);
            }
        }
    }

    /// Whether `key` still leads to session `id`.
    fn is_valid(&self, id: u64, key: &ResumeKey) -> bool {
        self.by_key.get(key) == Some(&id)
    }

    /// The session's close completed: its keys now answer "closed".
    /// Returns `false`, changing nothing, when `max` tombstones are kept
    /// already: the caller forgets the session instead (a client resuming
    /// after that is rejected, as after the resume window).
    fn tombstone(&mut self, id: u64, max: usize) -> bool {
        if self.tombstones >= max {
            return false;
        }
        if let Some(entry) = self.sessions.get_mut(&id) {
            if !entry.closed {
                entry.closed = true;
                self.tombstones += 1;
            }
        }
        true
    }

    fn remove(&mut self, id: u64) {
        if let Some(entry) = self.sessions.remove(&id) {
            if entry.closed {
                self.tombstones -= 1;
            }
            for key in entry.confirmed.iter().chain(entry.pending.iter()) {
                self.by_key.remove(key);
            }
        }
    }

    /// Sessions that are not tombstones.
    fn live(&self) -> usize {
        self.sessions.len() - self.tombstones
    }
}

/// `key` (one of `entry`'s pending keys) is proven: it becomes the confirmed
/// key, and every other key of the session is revoked.
fn prove<L: Link>(by_key: &mut HashMap<ResumeKey, u64>, entry: &mut Entry<L>, key: &ResumeKey) {
    for old in entry.confirmed.iter().chain(entry.pending.iter()) {
        if old != key {
            by_key.remove(old);
        }
    }
    entry.pending.clear();
    entry.confirmed = Some(*key);
}

struct Inner<L: Link> {
    config: Config,
    registry: Mutex<Registry<L>>,
    counters: Counters,
    accepted: mpsc::Sender<Handles>,
}

impl<L: Link> Inner<L> {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry<L>> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A stable-conduit server: accepts links from a [`Listener`], keeps
/// sessions, and routes resuming clients back to their session.
///
/// Each new session is handed out by [`accept`](Self::accept) as a
/// [`StableConduit`] with the same guarantees as the client's. A client that
/// sends garbage, stalls in its handshake or presents a forged key only loses
/// its own link. Dropping the server stops accepting; sessions with a live
/// link go on, and fail with [`SessionLost::ServerShutdown`] when they would
/// need a resume.
pub struct Server<S, R = S> {
    inner: Arc<dyn ServerShared>,
    accepted: mpsc::Receiver<Handles>,
    accept_task: JoinHandle<()>,
    _msg: std::marker::PhantomData<fn(&S) -> R>,
}

/// The untyped part of a server the handle needs (so `Server` does not carry
/// the link type).
trait ServerShared: Send + Sync {
    fn stats(&self) -> ServerStats;
}

impl<L: Link> ServerShared for Inner<L> {
    fn stats(&self) -> ServerStats {
        let c = &self.counters;
        let (sessions_open, tombstones) = {
            let registry = self.registry();
            (registry.live() as u64, registry.tombstones as u64)
        };
        ServerStats {
            links_accepted: c.links_accepted.load(Ordering::Relaxed),
            sessions_created: c.sessions_created.load(Ordering::Relaxed),
            sessions_open,
            tombstones,
            resumes: c.resumes.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            bad_handshakes: c.bad_handshakes.load(Ordering::Relaxed),
        }
    }
}

impl<S, R> Server<S, R> {
    /// Starts serving links from `listener`. Must be called within a tokio
    /// runtime.
    pub fn new<Li: Listener>(mut listener: Li, config: Config) -> Self {
        let (accepted_tx, accepted) = mpsc::channel(1024);
        let inner = Arc::new(Inner::<Li::Link> {
            config,
            registry: Mutex::new(Registry {
                by_key: HashMap::new(),
                sessions: HashMap::new(),
                next_id: 0,
                tombstones: 0,
            }),
            counters: Counters::default(),
            accepted: accepted_tx,
        });
        let weak = Arc::downgrade(&inner);
        let accept_task = tokio::spawn(async move {
            loop {
                let link = match listener.accept().await {
                    Ok(link) => link,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        // Typically out of file descriptors: back off briefly.
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Some(inner) = weak.upgrade() else { return };
                inner
                    .counters
                    .links_accepted
                    .fetch_add(1, Ordering::Relaxed);
                tokio::spawn(handle_link(inner, link));
            }
        });
        Server {
            inner,
            accepted,
            accept_task,
            _msg: std::marker::PhantomData,
        }
    }

    /// The next new session. `None` once the server stopped.
    pub async fn accept(&mut self) -> Option<StableConduit<S, R>> {
        self.accepted.recv().await.map(StableConduit::from_handles)
    }

    /// A snapshot of the server's counters.
    pub fn stats(&self) -> ServerStats {
        self.inner.stats()
    }
}

impl<S, R> Drop for Server<S, R> {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Reads one link's hello under the handshake timeout and routes it.
async fn handle_link<L: Link>(inner: Arc<Inner<L>>, link: L) {
    let (tx, mut rx) = link.split();
    let payload = match timeout(inner.config.handshake_timeout, rx.recv()).await {
        Ok(Ok(Some(p))) => p,
        outcome => {
            let why = match outcome {
                Ok(Ok(_)) => "link closed before the hello".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "handshake timed out".to_string(),
            };
            tracing::debug!(%why, "dropping link in handshake");
            inner
                .counters
                .bad_handshakes
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let hello = match ClientHello::decode(&payload) {
        Ok(hello) => hello,
        Err(e) => {
            tracing::info!(error = %e, "dropping link with a malformed client hello");
            inner
                .counters
                .bad_handshakes
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let fresh = match ResumeKey::generate() {
        Ok(key) => key,
        Err(e) => {
            tracing::error!(error = %e, "no secure randomness for a resume key");
            return;
        }
    };
    tracing::trace!(
        resume = hello.resume_key.is_some(),
        extensions = hello.extensions,
        "client hello"
    );
    let attach = Attach::<L> {
        tx,
        rx,
        key: fresh,
        client_last_received: hello.last_received,
        client_extensions: hello.extensions,
    };
    match hello.resume_key {
        None if inner.registry().live() >= inner.config.max_sessions => {
            tracing::warn!(
                max = inner.config.max_sessions,
                "session limit reached: rejecting a new session"
            );
            reject(&inner, attach.tx).await;
        }
        None => new_session(inner, attach).await,
        Some(key) => {
            let route = inner.registry().route(&key, fresh);
            let attach = match route {
                Some(Route::Closed) => {
                    tracing::debug!(?key, "resume of a closed session");
                    return answer(&inner, attach.tx, ServerHello::closed()).await;
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
    }
}

/// Answers with the rejected flag and closes the link.
async fn reject<L: Link>(inner: &Inner<L>, tx: L::Tx) {
    inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
    answer(inner, tx, ServerHello::reject()).await;
}

/// Sends `hello` and closes the link, within the handshake timeout.
async fn answer<L: Link>(inner: &Inner<L>, mut tx: L::Tx, hello: ServerHello) {
    let hello = Bytes::copy_from_slice(&hello.encode());
    let _ = timeout(inner.config.handshake_timeout, async {
        let _ = tx.send(hello).await;
        let _ = tx.close().await;
    })
    .await;
}

async fn new_session<L: Link>(inner: Arc<Inner<L>>, attach: Attach<L>) {
    let shared = Shared::new(&inner.config, Role::Server, ConduitState::Connecting, None);
    let (ep, handles) = endpoint(shared.clone());
    let (attach_tx, attach_rx) = mpsc::channel(4);
    let key = attach.key;
    let id = inner.registry().insert(key, attach_tx);
    inner
        .counters
        .sessions_created
        .fetch_add(1, Ordering::Relaxed);
    let driver = SessionDriver {
        weak: Arc::downgrade(&inner),
        id,
        shared,
        endpoint: ep,
        unaccepted: Arc::new(Mutex::new(Some(handles))),
    };
    // The driver answers the client at once, and hands the session to
    // `accept` once the client proves it holds the key.
    let span = tracing::info_span!("tether_session", id);
    tokio::spawn(tracing::Instrument::instrument(
        driver.run(attach, attach_rx),
        span,
    ));
}

struct SessionDriver<L: Link> {
    weak: std::sync::Weak<Inner<L>>,
    id: u64,
    shared: Arc<Shared>,
    endpoint: Endpoint,
    /// The application's handles until the session is handed to `accept`.
    ///
    /// A ServerHello can be lost with its link; the client then opens
    /// another session and this one is an orphan nobody holds. So the
    /// session is handed out only once the client proved it holds the key:
    /// its first frame (a tether client with standalone acks sends its
    /// window first thing; a base-format client, its first message), or a
    /// resume. An orphan is never seen by the application and expires after
    /// the resume window.
    unaccepted: Arc<Mutex<Option<Handles>>>,
}

/// Hands the session's handles to `accept`, once.
fn hand_off<L: Link>(weak: &std::sync::Weak<Inner<L>>, unaccepted: &Mutex<Option<Handles>>) {
    let handles = unaccepted
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let (Some(handles), Some(inner)) = (handles, weak.upgrade()) {
        let accepted = inner.accepted.clone();
        tokio::spawn(async move {
            let _ = accepted.send(handles).await;
        });
    }
}

impl<L: Link> SessionDriver<L> {
    async fn run(mut self, first: Attach<L>, mut attach_rx: AttachRx<L>) {
        let mut next = Some(first);
        let mut attached_before = false;
        loop {
            let attach = match next.take() {
                Some(a) => a,
                None => {
                    let Some(window) = self.weak.upgrade().map(|i| i.config.resume_window) else {
                        return self.end(Some(SessionLost::ServerShutdown));
                    };
                    // A close that began goes on when the client is back,
                    // within its own deadline and the resume window.
                    tokio::select! {
                        biased;
                        a = attach_rx.recv() => match a {
                            Some(a) => *a,
                            None => return self.end(Some(SessionLost::ServerShutdown)),
                        },
                        () = self.shared.close_expired() => {
                            return self.end(Some(SessionLost::CloseTimedOut));
                        }
                        () = tokio::time::sleep(window) => {
                            tracing::info!(?window, "session expired: no resume");
                            return self.end(Some(SessionLost::Expired));
                        }
                    }
                }
            };
            let Attach {
                mut tx,
                mut rx,
                key,
                client_last_received,
                client_extensions,
            } = attach;
            let (handshake_timeout, offered) = match self.weak.upgrade() {
                Some(inner) => (inner.config.handshake_timeout, inner.config.extensions),
                None => return self.end(Some(SessionLost::ServerShutdown)),
            };
            // Echo what both sides speak; anything else stays off.
            let extensions = ext::negotiate(client_extensions, offered);
            let hello = ServerHello {
                rejected: false,
                resume_key: key,
                last_received: self.endpoint.last_received(),
                extensions,
            };
            let sent = timeout(
                handshake_timeout,
                tx.send(Bytes::copy_from_slice(&hello.encode())),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::debug!("link failed while sending the server hello");
                self.shared.set_state(ConduitState::Reconnecting);
                continue;
            }
            if attached_before {
                // A resume proves the client holds a key of this session.
                hand_off(&self.weak, &self.unaccepted);
            }
            if let Err(reason) = self.shared.resume(
                client_last_received,
                self.endpoint.last_received(),
                extensions,
            ) {
                return self.end(Some(reason));
            }
            if attached_before {
                self.shared
                    .counters
                    .reconnects
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.shared.set_state(if attached_before {
                ConduitState::Resumed
            } else {
                ConduitState::Connected
            });
            attached_before = true;
            let (weak, id, unaccepted) = (self.weak.clone(), self.id, self.unaccepted.clone());
            let newer = newer_link(&self.weak, self.id, &mut attach_rx);
            let end = run_attachment(
                &self.shared,
                &mut self.endpoint,
                &mut tx,
                &mut rx,
                newer,
                move || {
                    if let Some(inner) = weak.upgrade() {
                        inner.registry().confirm(id, &key);
                    }
                    hand_off(&weak, &unaccepted);
                },
            )
            .await;
            match end {
                AttachEnd::Preempted(newer) => {
                    tracing::debug!("session moved to a newer link");
                    next = Some(newer);
                }
                AttachEnd::Finished => {
                    let _ = timeout(handshake_timeout, tx.close()).await;
                    return self.end(None);
                }
                AttachEnd::CloseTimedOut => return self.end(Some(SessionLost::CloseTimedOut)),
                AttachEnd::Protocol(msg) => return self.end(Some(SessionLost::Protocol(msg))),
                AttachEnd::Link(e) => {
                    tracing::debug!(error = %e, "session link failed; waiting for a resume");
                    self.shared.set_state(ConduitState::Reconnecting);
                }
                AttachEnd::Eof | AttachEnd::Timeout => {
                    tracing::debug!("session link lost; waiting for a resume");
                    self.shared.set_state(ConduitState::Reconnecting);
                }
            }
        }
    }

    /// Ends the session: closed (then a tombstone answers late resumes for
    /// the resume window) or lost (its keys are forgotten at once).
    fn end(self, lost: Option<SessionLost>) {
        match lost {
            Some(reason) => self.shared.fail(reason),
            None => self.shared.finish(),
        }
        let Some(inner) = self.weak.upgrade() else {
            return;
        };
        let closed = matches!(self.shared.terminal(), Some(Terminal::Closed));
        if closed
            && inner
                .registry()
                .tombstone(self.id, inner.config.max_sessions)
        {
            let (weak, id, window) = (self.weak.clone(), self.id, inner.config.resume_window);
            tokio::spawn(async move {
                tokio::time::sleep(window).await;
                if let Some(inner) = weak.upgrade() {
                    inner.registry().remove(id);
                }
            });
        } else {
            inner.registry().remove(self.id);
        }
    }
}

/// The next link that resumes the session and still holds a valid key. A
/// link routed here before the live link proved its key, whose key that
/// proof then revoked, was a stale hello: it is rejected, and the live
/// link stays.
async fn newer_link<L: Link>(
    weak: &std::sync::Weak<Inner<L>>,
    id: u64,
    attach_rx: &mut AttachRx<L>,
) -> Attach<L> {
    loop {
        let Some(newer) = attach_rx.recv().await else {
            // The server is gone: keep this link while it lasts.
            return std::future::pending().await;
        };
        let Some(inner) = weak.upgrade() else {
            return std::future::pending().await;
        };
        if inner.registry().is_valid(id, &newer.key) {
            return *newer;
        }
        tracing::debug!("rejecting a stale resume: the live link proved a newer key");
        tokio::spawn(async move { reject(&inner, newer.tx).await });
    }
}
