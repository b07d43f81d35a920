//! The server side: accept links, read hellos, create sessions, and route
//! resumes to the session they belong to.
//!
//! Resume keys rotate on every handshake. A key handed out in a ServerHello
//! may never reach the client (the link can die right after the server sent
//! it), so the server keeps, per session, the last key the client is known to
//! hold (`confirmed`) beside the newest one it issued (`pending`). A resume
//! with `pending` proves the client got it; so does the first frame the
//! client sends on the link that carried it. Either way `pending` becomes
//! `confirmed` and the older key stops working. A resume with `confirmed`
//! means the client never saw `pending`, which is withdrawn. Any other key,
//! including every key replaced that way, is rejected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tether_proto::{ext, ClientHello, RecvState, ResumeKey, Seq, ServerHello};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::config::Config;
use super::core::{endpoint, run_attachment, AttachEnd, Endpoint, Handles, Shared};
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

struct Entry<L: Link> {
    confirmed: Option<ResumeKey>,
    pending: Option<ResumeKey>,
    attach: AttachTx<L>,
}

struct Registry<L: Link> {
    by_key: HashMap<ResumeKey, u64>,
    sessions: HashMap<u64, Entry<L>>,
    next_id: u64,
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
                pending: Some(key),
                attach,
            },
        );
        id
    }

    /// Looks `key` up and rotates: returns the session's attach channel and
    /// its fresh key, or `None` if the key is not (or no longer) valid.
    fn route(&mut self, key: &ResumeKey, fresh: ResumeKey) -> Option<AttachTx<L>> {
        // HashMap lookup hashes with a per-process random SipHash key; the
        // final comparison is `ResumeKey`'s constant-time equality.
        let id = *self.by_key.get(key)?;
        let entry = self.sessions.get_mut(&id)?;
        if entry.pending.as_ref() == Some(key) {
            if let Some(old) = entry.confirmed.replace(*key) {
                self.by_key.remove(&old);
            }
        } else if let Some(withdrawn) = entry.pending.take() {
            self.by_key.remove(&withdrawn);
        }
        entry.pending = Some(fresh);
        self.by_key.insert(fresh, id);
        Some(entry.attach.clone())
    }

    /// The client proved it holds `key` by sending a frame on the link that
    /// delivered it.
    fn confirm(&mut self, id: u64, key: &ResumeKey) {
        if let Some(entry) = self.sessions.get_mut(&id) {
            if entry.pending.as_ref() == Some(key) {
                entry.pending = None;
                if let Some(old) = entry.confirmed.replace(*key) {
                    self.by_key.remove(&old);
                }
            }
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(entry) = self.sessions.remove(&id) {
            for key in entry.confirmed.iter().chain(entry.pending.iter()) {
                self.by_key.remove(key);
            }
        }
    }
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
        ServerStats {
            links_accepted: c.links_accepted.load(Ordering::Relaxed),
            sessions_created: c.sessions_created.load(Ordering::Relaxed),
            sessions_open: self.registry().sessions.len() as u64,
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
        None if inner.registry().sessions.len() >= inner.config.max_sessions => {
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
                Some(session) => match session.send(Box::new(attach)).await {
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
async fn reject<L: Link>(inner: &Inner<L>, mut tx: L::Tx) {
    inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
    let reject = Bytes::copy_from_slice(&ServerHello::reject().encode());
    let _ = timeout(inner.config.handshake_timeout, async {
        let _ = tx.send(reject).await;
        let _ = tx.close().await;
    })
    .await;
}

async fn new_session<L: Link>(inner: Arc<Inner<L>>, attach: Attach<L>) {
    let shared = Shared::new(&inner.config, ConduitState::Connecting);
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
        recv: RecvState::new(),
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
    recv: RecvState,
    /// The application's handles until the session is handed to `accept`.
    ///
    /// A ServerHello can be lost with its link; the client then opens
    /// another session and this one is an orphan nobody holds. With
    /// keepalive on, a tether client pings as soon as it is attached, so the
    /// session is handed out only once the client proved it holds the key
    /// (its first frame, or a resume); an orphan is never seen by the
    /// application and expires after the resume window. Without keepalive
    /// no prompt first frame is guaranteed, and the session is handed out at
    /// once.
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
                    tokio::select! {
                        a = attach_rx.recv() => match a {
                            Some(a) => *a,
                            None => return self.end(Some(SessionLost::ServerShutdown)),
                        },
                        () = self.endpoint.all_gone() => return self.end(None),
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
            let extensions = client_extensions & offered;
            let hello = ServerHello {
                rejected: false,
                resume_key: key,
                last_received: self.recv.last_received(),
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
            if attached_before || extensions & ext::KEEPALIVE == 0 {
                // A resume proves the client holds a key; without keepalive
                // nothing better is coming.
                hand_off(&self.weak, &self.unaccepted);
            }
            if let Err(reason) =
                self.shared
                    .resume(client_last_received, self.recv.last_received(), extensions)
            {
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
            let end = run_attachment(
                &self.shared,
                &mut self.endpoint,
                &mut tx,
                &mut rx,
                &mut self.recv,
                async {
                    match attach_rx.recv().await {
                        Some(newer) => *newer,
                        // The server is gone: keep this link while it lasts.
                        None => std::future::pending().await,
                    }
                },
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
                    let _ = tx.close().await;
                    return self.end(None);
                }
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

    fn end(self, lost: Option<SessionLost>) {
        if let Some(inner) = self.weak.upgrade() {
            inner.registry().remove(self.id);
        }
        match lost {
            Some(reason) => self.shared.fail(reason),
            None => self.shared.finish(),
        }
    }
}
