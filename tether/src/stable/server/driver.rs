//! A server session's driver: answers each link that attaches the session,
//! runs the attachment, waits for resumes, and ends the session.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use bytes::Bytes;
use tether_proto::proof::{ServerNew, KEY_SHARE_LEN};
use tether_proto::{ext, ResumeKey, ServerHello};
use tokio::time::{timeout, timeout_at, Instant};

use super::registry::{AttachRx, Registry, Tomb};
use super::snapshot::Outcome;
use super::{Attach, Cred, Inner, SessionInfo};
use crate::error::SessionLost;
use crate::link::{Link, LinkRx, LinkTx};
use crate::stable::attach::{run_attachment, AttachEnd, Endpoint, Handles};
use crate::stable::events::{ConduitEvent, LinkLoss};
use crate::stable::shared::{Shared, Terminal};
use crate::stable::ConduitState;

pub(super) struct SessionDriver<L: Link> {
    pub(super) weak: Weak<Inner<L>>,
    pub(super) id: u64,
    pub(super) shared: Arc<Shared>,
    pub(super) endpoint: Endpoint,
    pub(super) info: Arc<SessionInfo>,
    /// The application's handles until the session is handed to `accept`.
    ///
    /// A ServerHello can be lost with its link; the client then opens
    /// another session and this one is an orphan nobody holds. So the
    /// session is handed out only once the client proved it holds the key:
    /// its first frame (a tether client with standalone acks sends its
    /// window first thing; a base-format client, its first message), or a
    /// resume. An orphan is never seen by the application, and is dropped
    /// at `proof_deadline`.
    pub(super) unaccepted: Arc<Mutex<Option<Handles>>>,
    /// When a session whose client never proved its key is dropped: one
    /// handshake timeout after the session was created.
    pub(super) proof_deadline: Instant,
}

/// Whether the session was proven (and so handed to `accept`).
fn proven(unaccepted: &Mutex<Option<Handles>>) -> bool {
    unaccepted
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .is_none()
}

/// A session's peer address and public id, for its log lines ("-" where
/// there is none: Unix and in-memory links, bearer sessions).
fn who(info: &SessionInfo) -> (String, String) {
    let peer = info
        .peer()
        .addr
        .map_or_else(|| "-".to_owned(), |a| a.to_string());
    let session = info
        .session_id()
        .map_or_else(|| "-".to_owned(), |id| id.to_string());
    (peer, session)
}

/// Hands the session's handles to `accept`, once.
fn hand_off<L: Link>(
    weak: &Weak<Inner<L>>,
    id: u64,
    info: &Arc<SessionInfo>,
    unaccepted: &Mutex<Option<Handles>>,
) {
    let handles = unaccepted
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let (Some(handles), Some(inner)) = (handles, weak.upgrade()) {
        let (peer, session) = who(info);
        tracing::info!(%peer, %session, "session started");
        if let Some(entry) = inner.registry().sessions.get_mut(&id) {
            entry.accepted = true;
        }
        let accepted = inner.accepted.clone();
        let info = info.clone();
        // The queue's room is checked when a session is admitted, so this
        // rarely waits; it must not block the driver when it does.
        tokio::spawn(async move {
            let _ = accepted.send((handles, info)).await;
        });
    }
}

impl<L: Link> SessionDriver<L> {
    pub(super) async fn run(mut self, first: Attach<L>, mut attach_rx: AttachRx<L>) {
        let mut next = Some(first);
        let mut attached_before = false;
        // When the last link was lost, for the resume's event.
        let mut lost_at = Instant::now();
        loop {
            let attach = match next.take() {
                Some(a) => a,
                None => {
                    let Some(window) = self.weak.upgrade().map(|i| i.config.resume_window) else {
                        return self.end(Some(SessionLost::ServerShutdown));
                    };
                    // An unproven session waits no longer than its proof
                    // deadline: nobody holds it.
                    let until = if proven(&self.unaccepted) {
                        Instant::now() + window
                    } else {
                        self.proof_deadline
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
                        () = tokio::time::sleep_until(until) => {
                            return self.expire();
                        }
                    }
                }
            };
            let Attach {
                mut tx,
                mut rx,
                cred,
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
                resume_key: cred.hello_key(),
                last_received: self.endpoint.last_received(),
                extensions,
            };
            // What this link's first frame proves, and the payload that
            // answers the client.
            let (payload, proves) = match cred {
                Cred::Bearer(key) => (hello.encode().to_vec(), Proves::Key(key)),
                Cred::ProofNew {
                    eph, client_hello, ..
                } => {
                    let new = ServerNew::new(&client_hello, &hello, eph);
                    (new.offer().to_vec(), Proves::KeyShare(new))
                }
                Cred::ProofResume {
                    answer, accepted, ..
                } => {
                    let (reply, next) = answer.reply(&hello, &accepted.secret);
                    let tag = self
                        .weak
                        .upgrade()
                        .and_then(|inner| inner.registry().add_pending_secret(self.id, next));
                    (reply, tag.map_or(Proves::Nothing, Proves::Secret))
                }
            };
            let sent = timeout(handshake_timeout, tx.send(Bytes::from(payload))).await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::debug!("link failed while sending the server hello");
                self.shared.set_state(ConduitState::Reconnecting);
                continue;
            }
            if matches!(proves, Proves::Secret(_)) {
                self.shared
                    .counters
                    .proof_resumes
                    .fetch_add(1, Ordering::Relaxed);
            }
            let proves = match proves {
                Proves::KeyShare(new) => {
                    // The client's key share comes before any frame: its
                    // arrival proves the client has the ServerHello.
                    rx.set_max_payload(KEY_SHARE_LEN);
                    let until = self.proof_deadline.min(Instant::now() + handshake_timeout);
                    let share = timeout_at(until, rx.recv()).await;
                    rx.set_max_payload(usize::MAX);
                    let secret = match share {
                        Ok(Ok(Some(share))) => new.finish(&share).map_err(|e| e.to_string()),
                        Ok(Ok(None)) => Err("link closed before the key share".into()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("no key share within the handshake timeout".into()),
                    };
                    match secret {
                        Ok(secret) => {
                            if let Some(inner) = self.weak.upgrade() {
                                inner.registry().set_first_secret(self.id, secret);
                            }
                            hand_off(&self.weak, self.id, &self.info, &self.unaccepted);
                            Proves::Nothing
                        }
                        Err(why) => {
                            tracing::debug!(%why, "no key share: the session stays unproven");
                            self.shared.set_state(ConduitState::Reconnecting);
                            continue;
                        }
                    }
                }
                other => other,
            };
            if attached_before {
                // A resume proves the client holds a key of this session.
                hand_off(&self.weak, self.id, &self.info, &self.unaccepted);
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
                let (peer, session) = who(&self.info);
                tracing::info!(%peer, %session, "session resumed");
                self.shared.emit(ConduitEvent::Resumed {
                    attempts: 1,
                    outage: lost_at.elapsed(),
                });
            }
            self.shared.set_state(if attached_before {
                ConduitState::Resumed
            } else {
                ConduitState::Connected
            });
            attached_before = true;
            let (weak, id, info, unaccepted) = (
                self.weak.clone(),
                self.id,
                self.info.clone(),
                self.unaccepted.clone(),
            );
            let end = {
                let newer = newer_link(&self.weak, self.id, &mut attach_rx);
                let attachment = run_attachment(
                    &self.shared,
                    &mut self.endpoint,
                    &mut tx,
                    &mut rx,
                    newer,
                    move || {
                        if let Some(inner) = weak.upgrade() {
                            match proves {
                                Proves::Key(key) => inner.registry().confirm(id, &key),
                                Proves::Secret(tag) => inner.registry().confirm_secret(id, tag),
                                Proves::KeyShare(_) | Proves::Nothing => {}
                            }
                        }
                        hand_off(&weak, id, &info, &unaccepted);
                    },
                );
                tokio::pin!(attachment);
                // Until the client proves its key, the attachment races the
                // proof deadline.
                loop {
                    if proven(&self.unaccepted) {
                        break Some(attachment.await);
                    }
                    tokio::select! {
                        biased;
                        end = &mut attachment => break Some(end),
                        () = tokio::time::sleep_until(self.proof_deadline) => {
                            if !proven(&self.unaccepted) {
                                break None;
                            }
                        }
                    }
                }
            };
            let Some(end) = end else {
                return self.expire();
            };
            let cause = match end {
                AttachEnd::Preempted(newer) => {
                    tracing::debug!("session moved to a newer link");
                    next = Some(newer);
                    LinkLoss::Replaced
                }
                AttachEnd::Finished => {
                    let _ = timeout(handshake_timeout, tx.close()).await;
                    return self.end(None);
                }
                AttachEnd::CloseTimedOut => return self.end(Some(SessionLost::CloseTimedOut)),
                AttachEnd::Protocol(msg) => return self.end(Some(SessionLost::Protocol(msg))),
                AttachEnd::Link(e) => {
                    tracing::debug!(error = %e, "session link failed; waiting for a resume");
                    LinkLoss::of_link_error(&e)
                }
                AttachEnd::Eof => {
                    tracing::debug!("session link ended; waiting for a resume");
                    LinkLoss::PeerEnded
                }
                AttachEnd::Timeout => {
                    tracing::debug!("session link timed out; waiting for a resume");
                    LinkLoss::of_timeout(self.shared.extensions())
                }
            };
            lost_at = Instant::now();
            // A newer link is already here: no wait for a resume.
            if cause != LinkLoss::Replaced {
                self.shared.set_state(ConduitState::Reconnecting);
            }
            self.shared.emit(ConduitEvent::LinkLost { cause });
        }
    }

    /// No resume came in time: within the resume window for a session the
    /// client proved, within the proof deadline for one it never did.
    fn expire(self) {
        if proven(&self.unaccepted) {
            tracing::info!("session expired: no resume");
            return self.end(Some(SessionLost::Expired));
        }
        tracing::debug!("session dropped: the client never proved its key");
        self.shared.discard(SessionLost::Expired);
        let Some(inner) = self.weak.upgrade() else {
            return;
        };
        inner
            .counters
            .unproven_dropped
            .fetch_add(1, Ordering::Relaxed);
        let stats = self.shared.stats();
        let mut registry = inner.registry();
        registry.fold(self.id, &stats, Outcome::Unproven);
        // Nothing reached the application: a client that comes back is
        // told to start over rather than that its session is lost.
        self.bury(&inner, &mut registry, Tomb::Unproven);
    }

    /// Ends the session: closed (then a tombstone answers late resumes for
    /// the resume window) or lost (its keys are forgotten at once).
    fn end(self, lost: Option<SessionLost>) {
        if proven(&self.unaccepted) {
            let (peer, session) = who(&self.info);
            match &lost {
                Some(reason) => tracing::info!(%peer, %session, %reason, "session ended: lost"),
                None => tracing::info!(%peer, %session, "session ended: closed"),
            }
        }
        match lost {
            // Nobody saw an unproven session: no warning (see `expire`).
            Some(reason) if !proven(&self.unaccepted) => self.shared.discard(reason),
            Some(reason) => self.shared.fail(reason),
            None => self.shared.finish(),
        }
        let Some(inner) = self.weak.upgrade() else {
            return;
        };
        // The session's final counters join the server's totals in the
        // same lock as it leaves the live table (`Registry::fold`).
        let stats = self.shared.stats();
        let closed = matches!(self.shared.terminal(), Some(Terminal::Closed));
        let mut registry = inner.registry();
        if closed {
            registry.fold(self.id, &stats, Outcome::Closed);
            self.bury(&inner, &mut registry, Tomb::Closed);
        } else {
            registry.fold(self.id, &stats, Outcome::Lost);
            registry.remove(self.id);
        }
    }

    /// Leaves a tombstone for the resume window (if there is room for one;
    /// otherwise the session is forgotten at once).
    fn bury(&self, inner: &Inner<L>, registry: &mut Registry<L>, tomb: Tomb) {
        if registry.tombstone(self.id, tomb, inner.config.max_sessions) {
            let (weak, id, window) = (self.weak.clone(), self.id, inner.config.resume_window);
            tokio::spawn(async move {
                tokio::time::sleep(window).await;
                if let Some(inner) = weak.upgrade() {
                    inner.registry().remove(id);
                }
            });
        } else {
            registry.remove(self.id);
        }
    }
}

/// What a link's first frame proves.
enum Proves {
    /// The bearer key its ServerHello carried.
    Key(ResumeKey),
    /// The pending secret (by tag) its resume reply derived.
    Secret(u64),
    /// A new `PROOF` session, until its key share arrives.
    KeyShare(ServerNew),
    /// Nothing more (the key share already did).
    Nothing,
}

/// The next link that resumes the session and still holds a valid key. A
/// link routed here before the live link proved its key, whose key that
/// proof then revoked, was a stale hello: it is rejected, and the live
/// link stays.
async fn newer_link<L: Link>(
    weak: &Weak<Inner<L>>,
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
        let valid = match &newer.cred {
            Cred::Bearer(key) => inner.registry().is_valid(id, key),
            Cred::ProofResume { accepted, .. } => {
                inner.registry().proof_epoch_is(id, accepted.epoch)
            }
            Cred::ProofNew { .. } => false,
        };
        if valid {
            return *newer;
        }
        tracing::debug!("rejecting a stale resume: the live link proved a newer key");
        tokio::spawn(async move { super::reject(&inner, newer.tx).await });
    }
}
