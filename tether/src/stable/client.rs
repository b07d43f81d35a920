//! The client side: connect, handshake, and reconnect with backoff.

use std::io::ErrorKind;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tether_proto::proof::{ClientNew, ClientResume, Ephemeral};
use tether_proto::{
    ext, ClientHello, Refusal as WireRefusal, RefusalKind, ResumeKey, ResumeSecret, Seq,
    ServerHello, SessionId, HELLO_LEN,
};
use tokio::time::{timeout, Instant};

use super::attach::{endpoint, run_attachment, AttachEnd, Endpoint};
use super::config::Config;
use super::events::{ConduitEvent, LinkLoss};
use super::shared::{lock, Role, Shared};
use super::{ConduitState, StableConduit};
use crate::error::{AttemptError, Error, Human, Refusal, SessionLost};
use crate::link::{Connector, Link, LinkError, LinkRx, LinkTx};

type Halves<C> = (
    <<C as Connector>::Link as Link>::Tx,
    <<C as Connector>::Link as Link>::Rx,
);

/// What the client's next hello presents.
enum Cred {
    /// Nothing: a new session (the first, or after a restart).
    New,
    /// A bearer resume key, as the last ServerHello gave it.
    Bearer(ResumeKey),
    /// Proof of possession (`PROOF`): the session's public id, the secret
    /// the client holds, and the counter of its last resume attempt (every
    /// attempt takes the next one).
    Proof {
        id: SessionId,
        secret: ResumeSecret,
        counter: u64,
    },
}

/// What one connection attempt can end in.
enum Attempt<C: Connector> {
    /// With what the next resume presents.
    Attached(Halves<C>, ServerHello, Cred),
    Rejected,
    /// A typed refusal (busy, denied, policy).
    Refused(Refusal),
    /// The server dropped the session before it heard from this client
    /// after its hello: nothing was delivered; start a new one.
    Restart,
    /// The server answered that the session's close already completed.
    Closed,
    Failed(AttemptError),
}

/// An attempt that failed on a link error, its kind taken from the error.
fn link_failed<C: Connector>(context: &str, e: &LinkError) -> Attempt<C> {
    let kind = match e {
        LinkError::Io(io) => io.kind(),
        LinkError::Truncated { .. } => ErrorKind::ConnectionReset,
        LinkError::TooLarge { .. } => ErrorKind::InvalidData,
        _ => ErrorKind::Other,
    };
    Attempt::Failed(AttemptError::new(kind, format!("{context}: {e}")))
}

fn failed<C: Connector>(kind: ErrorKind, message: impl Into<String>) -> Attempt<C> {
    Attempt::Failed(AttemptError::new(kind, message))
}

/// What getting a link back can end in, short of losing the session.
enum Reconnected<C: Connector> {
    /// With the number of attempts it took.
    Attached(Halves<C>, ServerHello, u32),
    Closed,
}

impl<S, R> StableConduit<S, R> {
    /// Connects through `connector`, performs the handshake, and returns the
    /// conduit; a driver task keeps it connected from then on, replacing the
    /// link whenever it fails.
    ///
    /// The first connection is retried with backoff for
    /// [`ReconnectPolicy::connect_give_up_after`](crate::ReconnectPolicy::connect_give_up_after)
    /// (10 s by default), each failed attempt logged, and so is a server
    /// that answers busy (waiting at least as long as it asks). This fails
    /// with [`Error::Refused`] if the server refuses the client (or is
    /// still busy at the deadline), and with [`Error::SessionLost`] if it
    /// rejects the session or the deadline passes without a link
    /// ([`SessionLost::GaveUp`], whose `last_error` says why).
    pub async fn connect<C: Connector>(connector: C, config: Config) -> Result<Self, Error> {
        let shared = Shared::new(&config, Role::Client, ConduitState::Connecting, None);
        let mut rng = match config.seed {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => SmallRng::from_os_rng(),
        };
        let mut cred = Cred::New;
        let first = Retry {
            give_up_after: Some(match config.reconnect.give_up_after {
                Some(later) => later.min(config.reconnect.connect_give_up_after),
                None => config.reconnect.connect_give_up_after,
            }),
            started: Instant::now(),
        };
        let Reconnected::Attached(halves, hello, _) = reconnect(
            &connector, &shared, &mut cred, None, &config, &mut rng, first,
        )
        .await?
        else {
            unreachable!("a session that never closed is not answered closed");
        };
        let (ep, handles) = endpoint(shared.clone());
        shared.resume(
            hello.last_received,
            None,
            ext::negotiate(config.extensions, hello.extensions),
        )?;
        shared.set_state(ConduitState::Connected);
        tracing::debug!("stable conduit connected");
        let driver = ClientDriver {
            connector,
            config,
            shared,
            endpoint: ep,
            cred,
            rng,
        };
        let span = tracing::info_span!("tether_client");
        tokio::spawn(tracing::Instrument::instrument(driver.run(halves), span));
        Ok(StableConduit::from_handles(handles))
    }
}

struct ClientDriver<C> {
    connector: C,
    config: Config,
    shared: Arc<Shared>,
    endpoint: Endpoint,
    cred: Cred,
    rng: SmallRng,
}

impl<C: Connector> ClientDriver<C> {
    async fn run(mut self, mut halves: Halves<C>) {
        let mut attached = ConduitState::Connected;
        loop {
            let (tx, rx) = &mut halves;
            let preempt = async {
                tokio::select! {
                    () = self.shared.reconnect_request.notified() => {}
                    () = watch_stall(&self.shared, attached) => {}
                }
            };
            let end =
                run_attachment(&self.shared, &mut self.endpoint, tx, rx, preempt, || {}).await;
            let cause = match end {
                AttachEnd::Finished => {
                    let _ = timeout(self.config.handshake_timeout, tx.close()).await;
                    return self.shared.finish();
                }
                AttachEnd::CloseTimedOut => return self.shared.fail(SessionLost::CloseTimedOut),
                AttachEnd::Protocol(msg) => return self.shared.fail(SessionLost::Protocol(msg)),
                AttachEnd::Link(e) => LinkLoss::of_link_error(&e),
                AttachEnd::Eof => LinkLoss::PeerEnded,
                AttachEnd::Timeout => LinkLoss::of_timeout(self.shared.extensions()),
                AttachEnd::Preempted(()) => LinkLoss::Requested,
            };
            drop(halves);
            let lost_at = Instant::now();
            self.shared.set_state(ConduitState::Reconnecting);
            self.shared.emit(ConduitEvent::LinkLost { cause });
            // A close that began (or begins now) goes on over the next link,
            // within its own deadline.
            let retry = Retry {
                give_up_after: self.config.reconnect.give_up_after,
                started: lost_at,
            };
            let attempt = tokio::select! {
                biased;
                () = self.shared.close_expired() => {
                    return self.shared.fail(SessionLost::CloseTimedOut);
                }
                r = reconnect(
                    &self.connector,
                    &self.shared,
                    &mut self.cred,
                    self.endpoint.last_received(),
                    &self.config,
                    &mut self.rng,
                    retry,
                ) => r,
            };
            let (hello, attempts) = match attempt {
                Ok(Reconnected::Attached(h, hello, attempts)) => {
                    halves = h;
                    (hello, attempts)
                }
                Ok(Reconnected::Closed) => {
                    tracing::debug!("the server had completed the close");
                    return self.shared.finish();
                }
                Err(Error::SessionLost(reason)) => return self.shared.fail(reason),
                Err(Error::Refused(refusal)) => {
                    return self.shared.fail(SessionLost::Refused(refusal))
                }
                Err(e) => return self.shared.fail(SessionLost::Protocol(e.to_string())),
            };
            if let Err(reason) = self.shared.resume(
                hello.last_received,
                self.endpoint.last_received(),
                ext::negotiate(self.config.extensions, hello.extensions),
            ) {
                return self.shared.fail(reason);
            }
            self.shared
                .counters
                .reconnects
                .fetch_add(1, Ordering::Relaxed);
            attached = ConduitState::Resumed;
            self.shared.set_state(ConduitState::Resumed);
            self.shared.emit(ConduitEvent::Resumed {
                attempts,
                outage: lost_at.elapsed(),
            });
        }
    }
}

/// Watches an attached link for a stall and reports it, and its end, as a
/// state and an event; never returns.
///
/// With keepalive, the question is whether the peer still answers a ping,
/// which its reader does whatever its application is doing (a slow
/// consumer withholds acks, not pongs): when data waits for an ack and
/// nothing arrived for half the stall timeout, the writer sends a ping at
/// once (a probe), and a ping unanswered while nothing arrived for half
/// the stall timeout is a stall. Without keepalive: a
/// frame written and not acknowledged, and nothing received for the stall
/// timeout.
async fn watch_stall(shared: &Shared, attached: ConduitState) {
    let stall_us = u64::try_from(shared.stall_timeout.as_micros()).unwrap_or(u64::MAX);
    let half_us = stall_us / 2;
    let tick = shared.stall_timeout / 4;
    let keepalive = shared.extensions() & ext::KEEPALIVE != 0;
    // Since when (µs since the session's epoch) data has waited for an ack.
    let mut waiting_since: Option<u64> = None;
    let mut stalled = false;
    loop {
        tokio::time::sleep(tick).await;
        let now = shared.now_us();
        let last_rx = shared.last_rx_us.load(Ordering::Acquire);
        // With a ping outstanding: since when nothing has arrived (its
        // sending, or the last arrival after it).
        let unanswered = shared
            .ping_outstanding()
            .then(|| shared.ping_sent_us.load(Ordering::Acquire).max(last_rx));
        let data_waiting = {
            let s = lock(&shared.send);
            let oldest = s.replay.iter().next().map(|(seq, _)| seq);
            oldest.is_some_and(|seq| seq.is_before(s.cursor))
        };
        if data_waiting {
            waiting_since.get_or_insert(now.saturating_sub(tick.as_micros() as u64));
        } else {
            waiting_since = None;
        }
        let quiet = now.saturating_sub(last_rx.max(waiting_since.unwrap_or(now)));
        let is_stalled = if keepalive {
            if unanswered.is_none() && data_waiting && quiet >= half_us {
                shared.probe_requested.store(true, Ordering::Release);
                shared.writer_wake.notify_one();
            }
            unanswered.is_some_and(|since| now.saturating_sub(since) >= half_us)
        } else {
            data_waiting && quiet >= stall_us
        };
        if is_stalled && !stalled {
            stalled = true;
            shared.set_state(ConduitState::Stalled);
            shared.emit(ConduitEvent::Stalled {
                quiet: Duration::from_micros(now.saturating_sub(last_rx)),
            });
        } else if !is_stalled && stalled {
            stalled = false;
            shared.set_state(attached);
            shared.emit(ConduitEvent::Unstalled);
        }
    }
}

/// How long a round of attempts may go on, from when.
#[derive(Clone, Copy)]
struct Retry {
    give_up_after: Option<Duration>,
    started: Instant,
}

/// Gets a link and completes a handshake, retrying with exponential backoff
/// and full jitter until the give-up deadline, which is kept: an attempt's
/// handshake is cut short by it, and the client gives up when it passes.
/// `cred` is what the hellos present; on success, what the next resume
/// will. [`StableConduit::reconnect_now`] cuts a wait short and starts the
/// backoff over.
async fn reconnect<C: Connector>(
    connector: &C,
    shared: &Shared,
    cred: &mut Cred,
    last_received: Option<Seq>,
    config: &Config,
    rng: &mut SmallRng,
    retry: Retry,
) -> Result<Reconnected<C>, Error> {
    let policy = &config.reconnect;
    let deadline = retry.give_up_after.map(|limit| retry.started + limit);
    let mut attempts: u32 = 0;
    let mut bound = policy.min_backoff;
    loop {
        attempts += 1;
        let budget = match deadline {
            Some(at) => config
                .handshake_timeout
                .min(at.saturating_duration_since(Instant::now())),
            None => config.handshake_timeout,
        };
        let outcome = match timeout(
            budget,
            attempt::<C>(connector, shared, cred, last_received, config),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => failed(
                ErrorKind::TimedOut,
                format!("no link and handshake within {}", Human(budget)),
            ),
        };
        let mut at_least = Duration::ZERO;
        let mut busy = None;
        let last_error = match outcome {
            Attempt::Attached(halves, hello, next) => {
                *cred = next;
                return Ok(Reconnected::Attached(halves, hello, attempts));
            }
            Attempt::Closed => return Ok(Reconnected::Closed),
            Attempt::Rejected => return Err(SessionLost::Rejected.into()),
            Attempt::Refused(Refusal::Busy {
                retry_after,
                reason,
            }) => {
                // A full server: back off as after a failure, but never
                // sooner than the server asked.
                at_least = retry_after;
                let error = AttemptError::new(ErrorKind::Other, format!("server busy: {reason}"));
                busy = Some(Refusal::Busy {
                    retry_after,
                    reason,
                });
                error
            }
            Attempt::Refused(refusal) => return Err(refusal.into()),
            // The server never handed the session to its application, so
            // nothing this side sent was delivered: a new session with the
            // whole replay buffer (nothing in it was ever acknowledged)
            // loses nothing and delivers nothing twice. Only if nothing was
            // received either, which the server's word implies.
            Attempt::Restart if !matches!(cred, Cred::New) && last_received.is_none() => {
                tracing::debug!("the server never heard from this session: starting over");
                *cred = Cred::New;
                attempts -= 1;
                continue;
            }
            Attempt::Restart => return Err(SessionLost::Rejected.into()),
            Attempt::Failed(e) => e,
        };
        let now = Instant::now();
        let delay = if bound.is_zero() {
            Duration::ZERO
        } else {
            rng.random_range(Duration::ZERO..=bound)
        }
        .max(at_least);
        // With no time left for another attempt, wait out the deadline
        // (or an application's request for one more) and give up.
        let last = deadline.is_some_and(|at| now + delay >= at);
        shared.emit(ConduitEvent::AttemptFailed {
            attempt: attempts,
            error: last_error.clone(),
            next_retry: (!last).then_some(delay),
        });
        let wake = match (last, deadline) {
            (true, Some(at)) => at,
            _ => now + delay,
        };
        let requested = tokio::select! {
            () = tokio::time::sleep_until(wake) => false,
            () = shared.reconnect_request.notified() => true,
        };
        if requested {
            tracing::debug!("reconnect requested: trying at once");
            bound = policy.min_backoff;
            if deadline.is_none_or(|at| Instant::now() < at) {
                continue;
            }
        }
        if last || deadline.is_some_and(|at| Instant::now() >= at) {
            if let Some(busy) = busy {
                return Err(busy.into());
            }
            return Err(SessionLost::GaveUp {
                attempts,
                elapsed: retry.started.elapsed(),
                last_error,
            }
            .into());
        }
        bound = (bound * 2).min(policy.max_backoff);
    }
}

/// What an attempt waits to finish once the server answers.
enum Pending {
    /// A new session; with `PROOF` offered, the client's half of the key
    /// exchange.
    New(Option<ClientNew>),
    Bearer,
    /// A `PROOF` resume with this counter.
    Resume(ClientResume, SessionId, u64),
}

/// Notes a secret the client now holds (tests only).
fn record_secret(shared: &Shared, secret: &ResumeSecret) {
    if let Some(log) = &shared.secret_log {
        log.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(*secret.expose_bytes());
    }
}

async fn attempt<C: Connector>(
    connector: &C,
    shared: &Shared,
    cred: &mut Cred,
    last_received: Option<Seq>,
    config: &Config,
) -> Attempt<C> {
    let offered = config.extensions;
    // Every attempt of a `PROOF` resume takes the next counter, whether or
    // not it reaches the server.
    let (payload, pending) = match cred {
        Cred::New => {
            let hello = ClientHello {
                resume_key: None,
                last_received,
                extensions: offered,
            };
            // The credential goes with a new session's hello only: a resume
            // is proven by its key.
            let payload = match &config.credential {
                Some(credential) => Bytes::from(hello.encode_with_credential(credential)),
                None => Bytes::copy_from_slice(&hello.encode()),
            };
            let new = if offered & ext::PROOF != 0 {
                match Ephemeral::generate() {
                    Ok(eph) => Some(ClientNew::new(&payload, eph)),
                    Err(e) => return failed(ErrorKind::Other, format!("no randomness: {e}")),
                }
            } else {
                None
            };
            (payload, Pending::New(new))
        }
        Cred::Bearer(key) => {
            let hello = ClientHello {
                resume_key: Some(*key),
                last_received,
                extensions: offered,
            };
            (Bytes::copy_from_slice(&hello.encode()), Pending::Bearer)
        }
        Cred::Proof {
            id,
            secret,
            counter,
        } => {
            *counter += 1;
            let eph = match Ephemeral::generate() {
                Ok(eph) => eph,
                Err(e) => return failed(ErrorKind::Other, format!("no randomness: {e}")),
            };
            let resume = ClientResume::new(id, last_received, offered, *counter, eph, secret);
            let payload = Bytes::copy_from_slice(resume.request());
            (payload, Pending::Resume(resume, *id, *counter))
        }
    };
    let link = match connector.connect().await {
        Ok(link) => link,
        Err(e) => return link_failed("connect", &e),
    };
    let (mut tx, mut rx) = link.split();
    // A send error does not end the attempt: the hello may have been
    // delivered and answered (a rejection, say) before the server dropped the
    // link, so the answer is read either way.
    let sent = tx.send(payload).await;
    let reply = match (rx.recv().await, sent) {
        (Ok(Some(reply)), _) => reply,
        (_, Err(e)) => return link_failed("sending hello", &e),
        (Ok(None), Ok(())) => {
            return failed(
                ErrorKind::ConnectionReset,
                "link closed before the server's hello",
            )
        }
        (Err(e), Ok(())) => return link_failed("waiting for the server's hello", &e),
    };
    let head = match reply.get(..HELLO_LEN).map(ServerHello::decode) {
        Some(Ok(head)) => head,
        Some(Err(e)) => return failed(ErrorKind::InvalidData, format!("bad server hello: {e}")),
        None => {
            return failed(
                ErrorKind::InvalidData,
                format!("server hello of {} bytes", reply.len()),
            )
        }
    };
    if head.rejected {
        if reply.len() > HELLO_LEN && offered & ext::ADMISSION != 0 {
            return match WireRefusal::decode(&reply) {
                Ok(refusal) if refusal.kind == RefusalKind::Restart => Attempt::Restart,
                Ok(refusal) => Attempt::Refused(Refusal::from_wire(refusal)),
                Err(e) => failed(ErrorKind::InvalidData, format!("bad server refusal: {e}")),
            };
        }
        if reply.len() != HELLO_LEN {
            return failed(
                ErrorKind::InvalidData,
                format!("server hello of {} bytes", reply.len()),
            );
        }
        // "Closed" completes a close this side began with the close
        // handshake; any other time it is a rejection like any other.
        return if head.is_closed() && shared.close_frame_queued() {
            Attempt::Closed
        } else {
            Attempt::Rejected
        };
    }
    let proof = ext::negotiate(offered, head.extensions) & ext::PROOF != 0;
    match pending {
        Pending::New(Some(new)) if proof => {
            let session = match new.finish(&reply) {
                Ok(session) => session,
                Err(e) => {
                    return failed(ErrorKind::InvalidData, format!("bad server key share: {e}"))
                }
            };
            record_secret(shared, &session.secret);
            *shared
                .session_id
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(session.session_id);
            // From here on the session may exist on the server with this
            // secret (the key share may arrive even if sending it reports
            // an error): the next attempt resumes it. If the key share
            // never arrived, the server says "restart" and nothing is lost.
            *cred = Cred::Proof {
                id: session.session_id,
                secret: session.secret.clone(),
                counter: 0,
            };
            // The key share goes first, before any frame: it is what
            // proves to the server that this client has its hello.
            if let Err(e) = tx.send(Bytes::copy_from_slice(&session.key_share)).await {
                return link_failed("sending the key share", &e);
            }
            let next = Cred::Proof {
                id: session.session_id,
                secret: session.secret,
                counter: 0,
            };
            Attempt::Attached((tx, rx), session.hello, next)
        }
        Pending::New(_) | Pending::Bearer => {
            if reply.len() != HELLO_LEN {
                return failed(
                    ErrorKind::InvalidData,
                    format!("server hello of {} bytes", reply.len()),
                );
            }
            Attempt::Attached((tx, rx), head, Cred::Bearer(head.resume_key))
        }
        Pending::Resume(resume, id, counter) => {
            if !proof {
                return failed(
                    ErrorKind::InvalidData,
                    "the server answered a proof resume without one",
                );
            }
            // A reply that does not prove the server holds the secret is a
            // failed attempt, not a lost session: it may be forged.
            match resume.finish(&reply) {
                Ok((hello, secret)) => {
                    record_secret(shared, &secret);
                    shared
                        .counters
                        .proof_resumes
                        .fetch_add(1, Ordering::Relaxed);
                    let next = Cred::Proof {
                        id,
                        secret,
                        counter,
                    };
                    Attempt::Attached((tx, rx), hello, next)
                }
                Err(e) => failed(ErrorKind::InvalidData, format!("the server's proof: {e}")),
            }
        }
    }
}
