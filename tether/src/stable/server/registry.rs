//! The server's session table: resume keys to sessions, the per-source
//! session counts, and tombstones of closed sessions.
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
//! so a late hello can never revoke the key the client really holds.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use tether_proto::proof::{Accepted, Refused, ResumeRequest, ServerSecrets};
use tether_proto::{ResumeKey, ResumeSecret};
use tokio::sync::mpsc;

use super::admission::{PerSource, Source};
use super::snapshot::{Ended, Outcome};
use super::SessionInfo;
use crate::link::Link;
use crate::stable::shared::Shared;

/// Most keys issued to a session and not yet proven. Each handshake with
/// the confirmed key adds one; a client's own attempts are sequential, so
/// more than a few are stale hellos, and the oldest goes first.
const MAX_PENDING_KEYS: usize = 8;

/// Where a session's driver receives the links that resume it. Boxed: the
/// channel's slots then cost a pointer each, not a whole pair of link
/// halves, in every idle session.
pub(super) type AttachTx<L> = mpsc::Sender<Box<super::Attach<L>>>;
pub(super) type AttachRx<L> = mpsc::Receiver<Box<super::Attach<L>>>;

pub(super) struct Entry<L: Link> {
    confirmed: Option<ResumeKey>,
    pending: Vec<ResumeKey>,
    /// With `PROOF`: the session id (its only entry in `by_key`, for the
    /// session's whole life) and the secrets. Bearer keys never resume such
    /// a session.
    proof: Option<(ResumeKey, ServerSecrets)>,
    /// `None` once the session is a tombstone: a tombstone keeps only its
    /// keys and what it answers.
    attach: Option<AttachTx<L>>,
    source: Option<Source>,
    pub(super) info: Arc<SessionInfo>,
    pub(super) shared: Weak<Shared>,
    /// Handed to `accept`.
    pub(super) accepted: bool,
    /// The session ended: a tombstone until the resume window passes.
    tomb: Option<Tomb>,
}

/// What a tombstone answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tomb {
    /// The close completed.
    Closed,
    /// The session was dropped before its client proved its key: nothing
    /// was delivered, and the client may start over.
    Unproven,
}

/// Where a resume goes.
pub(super) enum Route<L: Link> {
    Session(AttachTx<L>),
    Ended(Tomb),
}

/// What a new session is registered under.
pub(super) enum First {
    /// Its first bearer key (pending).
    Bearer(ResumeKey),
    /// Its public session id (`PROOF`), for its whole life.
    Proof(tether_proto::SessionId),
}

/// Where a `PROOF` resume goes.
pub(super) enum ProofRoute<L: Link> {
    /// It verified: the driver answers it, MAC'd with `accepted.secret`.
    Session(AttachTx<L>, Accepted),
    Ended(Tomb),
    /// The session has not got its client's key share (yet): the client
    /// is told to come back, since the key share may still arrive.
    NoSecret,
    /// No such session.
    Unknown,
    /// A bad MAC, a replayed counter, or a bearer session: only this link
    /// is answered, the session is not touched.
    BadProof,
}

/// Why a new session was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Full {
    Sessions,
    Source,
}

pub(super) struct Registry<L: Link> {
    by_key: HashMap<ResumeKey, u64>,
    pub(super) sessions: HashMap<u64, Entry<L>>,
    next_id: u64,
    pub(super) tombstones: usize,
    per_source: PerSource,
    /// What the sessions that ended left behind, for the server's totals.
    pub(super) ended: Ended,
}

impl<L: Link> Registry<L> {
    pub(super) fn new() -> Self {
        Registry {
            by_key: HashMap::new(),
            sessions: HashMap::new(),
            next_id: 1,
            tombstones: 0,
            per_source: PerSource::default(),
            ended: Ended::default(),
        }
    }

    /// Whether a new session from `source` fits under the caps.
    pub(super) fn check(
        &self,
        source: Option<Source>,
        max: usize,
        max_per_source: usize,
    ) -> Result<(), Full> {
        if self.live() >= max {
            Err(Full::Sessions)
        } else if self.per_source.get(source) >= max_per_source {
            Err(Full::Source)
        } else {
            Ok(())
        }
    }

    /// The id the next session gets.
    pub(super) fn reserve_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Registers a new session under its first key.
    pub(super) fn insert(
        &mut self,
        id: u64,
        first: First,
        attach: AttachTx<L>,
        source: Option<Source>,
        info: Arc<SessionInfo>,
        shared: Weak<Shared>,
    ) {
        let (key, proof) = match first {
            First::Bearer(key) => (key, false),
            First::Proof(session_id) => (session_id.as_key(), true),
        };
        self.by_key.insert(key, id);
        self.per_source.add(source);
        self.sessions.insert(
            id,
            Entry {
                confirmed: None,
                pending: if proof { Vec::new() } else { vec![key] },
                proof: proof.then(|| (key, ServerSecrets::new())),
                attach: Some(attach),
                source,
                info,
                shared,
                accepted: false,
                tomb: None,
            },
        );
    }

    /// Looks `key` up: a live session's attach channel, with `fresh`
    /// registered as its newest pending key; a tombstone; or `None` if the
    /// key is not (or no longer) valid.
    pub(super) fn route(&mut self, key: &ResumeKey, fresh: ResumeKey) -> Option<Route<L>> {
        // HashMap lookup hashes with a per-process random SipHash key; the
        // final comparison is `ResumeKey`'s constant-time equality.
        let id = *self.by_key.get(key)?;
        let entry = self.sessions.get_mut(&id)?;
        if let Some(tomb) = entry.tomb {
            return Some(Route::Ended(tomb));
        }
        if entry.proof.is_some() {
            // The session id is public: it is no bearer key.
            return None;
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
        entry.attach.clone().map(Route::Session)
    }

    /// Looks a `PROOF` resume up by its session id and checks its proof
    /// (`payload` is the request's wire bytes). Nothing of the session
    /// changes unless it verifies.
    pub(super) fn route_proof(&mut self, payload: &[u8], request: &ResumeRequest) -> ProofRoute<L> {
        let Some(id) = self.by_key.get(&request.session_id.as_key()).copied() else {
            return ProofRoute::Unknown;
        };
        let Some(entry) = self.sessions.get_mut(&id) else {
            return ProofRoute::Unknown;
        };
        if let Some(tomb) = entry.tomb {
            return ProofRoute::Ended(tomb);
        }
        let Some((_, secrets)) = entry.proof.as_mut() else {
            return ProofRoute::BadProof;
        };
        match secrets.accept(payload, request) {
            Ok(accepted) => match entry.attach.clone() {
                Some(tx) => ProofRoute::Session(tx, accepted),
                None => ProofRoute::Unknown,
            },
            Err(Refused::NoSecret) => ProofRoute::NoSecret,
            Err(Refused::BadMac | Refused::Replay) => ProofRoute::BadProof,
        }
    }

    /// secret₁ of a `PROOF` session arrived with its key share.
    pub(super) fn set_first_secret(&mut self, id: u64, secret: ResumeSecret) {
        if let Some((_, secrets)) = self.sessions.get_mut(&id).and_then(|e| e.proof.as_mut()) {
            secrets.set_confirmed(secret);
        }
    }

    /// A resume reply is about to carry `secret`'s derivation: it is
    /// pending. Its tag, or `None` if the session is gone.
    pub(super) fn add_pending_secret(&mut self, id: u64, secret: ResumeSecret) -> Option<u64> {
        let (_, secrets) = self.sessions.get_mut(&id)?.proof.as_mut()?;
        Some(secrets.add_pending(secret))
    }

    /// The client proved the pending secret `tag` by a frame on the link
    /// whose reply carried it.
    pub(super) fn confirm_secret(&mut self, id: u64, tag: u64) {
        if let Some((_, secrets)) = self.sessions.get_mut(&id).and_then(|e| e.proof.as_mut()) {
            secrets.confirm(tag);
        }
    }

    /// Whether no secret of `PROOF` session `id` was proven since `epoch`.
    pub(super) fn proof_epoch_is(&self, id: u64, epoch: u64) -> bool {
        self.sessions
            .get(&id)
            .and_then(|e| e.proof.as_ref())
            .is_some_and(|(_, secrets)| secrets.epoch() == epoch)
    }

    /// The client proved it holds `key` by sending a frame on the link that
    /// delivered it.
    pub(super) fn confirm(&mut self, id: u64, key: &ResumeKey) {
        if let Some(entry) = self.sessions.get_mut(&id) {
            if entry.pending.contains(key) {
                prove(&mut self.by_key, entry, key);
            }
        }
    }

    /// Whether `key` still leads to session `id`.
    pub(super) fn is_valid(&self, id: u64, key: &ResumeKey) -> bool {
        self.by_key.get(key) == Some(&id)
    }

    /// The session ended: its keys now answer `tomb`, and it no longer
    /// counts against its source. Returns `false`, changing nothing, when
    /// `max` tombstones are kept already: the caller forgets the session
    /// instead (a client resuming after that is rejected, as after the
    /// resume window).
    pub(super) fn tombstone(&mut self, id: u64, tomb: Tomb, max: usize) -> bool {
        if self.tombstones >= max {
            return false;
        }
        if let Some(entry) = self.sessions.get_mut(&id) {
            if entry.tomb.is_none() {
                entry.tomb = Some(tomb);
                // What the tombstone no longer needs goes now, not after
                // the resume window: the driver's channel, and the weak
                // reference that would keep the session's state allocated.
                entry.attach = None;
                entry.shared = std::sync::Weak::new();
                self.tombstones += 1;
                self.per_source.remove(entry.source);
            }
        }
        true
    }

    /// Live session `id` ended (with `outcome`) with `stats`, its final
    /// counters: they join the server's totals. Call it in the same lock as
    /// the [`tombstone`](Self::tombstone) or [`remove`](Self::remove) that
    /// takes the session out of the live table, so that a snapshot counts
    /// it either live or ended, never both nor neither. Once per session.
    pub(super) fn fold(&mut self, id: u64, stats: &crate::stable::Stats, outcome: Outcome) {
        if self.sessions.get(&id).is_some_and(|e| e.tomb.is_none()) {
            self.ended.totals.add(stats);
            match outcome {
                Outcome::Closed => self.ended.closed += 1,
                Outcome::Lost => self.ended.lost += 1,
                // Counted in `unproven_dropped` where it happens.
                Outcome::Unproven => {}
            }
        }
    }

    pub(super) fn remove(&mut self, id: u64) {
        if let Some(entry) = self.sessions.remove(&id) {
            if entry.tomb.is_some() {
                self.tombstones -= 1;
            } else {
                self.per_source.remove(entry.source);
            }
            for key in entry.confirmed.iter().chain(entry.pending.iter()) {
                self.by_key.remove(key);
            }
            if let Some((key, _)) = &entry.proof {
                self.by_key.remove(key);
            }
        }
    }

    /// Sessions that are not tombstones.
    pub(super) fn live(&self) -> usize {
        self.sessions.len() - self.tombstones
    }

    /// The live sessions.
    pub(super) fn live_entries(&self) -> impl Iterator<Item = &Entry<L>> {
        self.sessions.values().filter(|e| e.tomb.is_none())
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
