//! The client side: connect, handshake, and reconnect with backoff.

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
use super::shared::{Role, Shared};
use super::{ConduitState, StableConduit};
use crate::error::{Error, Refusal, SessionLost};
use crate::link::{Connector, Link, LinkRx, LinkTx};

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
    Failed(String),
}

/// What getting a link back can end in, short of losing the session.
enum Reconnected<C: Connector> {
    Attached(Halves<C>, ServerHello),
    Closed,
}

impl<S, R> StableConduit<S, R> {
    /// Connects through `connector`, performs the handshake, and returns the
    /// conduit; a driver task keeps it connected from then on, replacing the
    /// link whenever it fails.
    ///
    /// The first connection is retried under the same policy as later ones,
    /// and so is a server that answers busy (waiting at least as long as it
    /// asks); this fails with [`Error::Refused`] if the server refuses the
    /// client (or is still busy at the give-up deadline), and with
    /// [`Error::SessionLost`] if it rejects the session or the deadline
    /// passes without a link.
    pub async fn connect<C: Connector>(connector: C, config: Config) -> Result<Self, Error> {
        let shared = Shared::new(&config, Role::Client, ConduitState::Connecting, None);
        let mut rng = match config.seed {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => SmallRng::from_os_rng(),
        };
        let mut cred = Cred::New;
        let Reconnected::Attached(halves, hello) =
            reconnect(&connector, &shared, &mut cred, None, &config, &mut rng).await?
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
        loop {
            let (tx, rx) = &mut halves;
            let end = run_attachment(
                &self.shared,
                &mut self.endpoint,
                tx,
                rx,
                std::future::pending::<()>(),
                || {},
            )
            .await;
            match end {
                AttachEnd::Finished => {
                    let _ = timeout(self.config.handshake_timeout, tx.close()).await;
                    return self.shared.finish();
                }
                AttachEnd::CloseTimedOut => return self.shared.fail(SessionLost::CloseTimedOut),
                AttachEnd::Protocol(msg) => return self.shared.fail(SessionLost::Protocol(msg)),
                AttachEnd::Link(e) => tracing::debug!(error = %e, "link failed"),
                AttachEnd::Eof => tracing::debug!("link ended by peer"),
                AttachEnd::Timeout => tracing::debug!("keepalive timeout"),
                AttachEnd::Preempted(()) => unreachable!("pending() never resolves"),
            }
            drop(halves);
            self.shared.set_state(ConduitState::Reconnecting);
            // A close that began (or begins now) goes on over the next link,
            // within its own deadline.
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
                ) => r,
            };
            let hello = match attempt {
                Ok(Reconnected::Attached(h, hello)) => {
                    halves = h;
                    hello
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
            self.shared.set_state(ConduitState::Resumed);
            tracing::debug!("stable conduit resumed");
        }
    }
}

/// Gets a link and completes a handshake, retrying with exponential backoff
/// and full jitter until the give-up deadline. `cred` is what the hellos
/// present; on success, what the next resume will.
async fn reconnect<C: Connector>(
    connector: &C,
    shared: &Shared,
    cred: &mut Cred,
    last_received: Option<Seq>,
    config: &Config,
    rng: &mut SmallRng,
) -> Result<Reconnected<C>, Error> {
    let policy = &config.reconnect;
    let started = Instant::now();
    let mut attempts: u32 = 0;
    let mut bound = policy.min_backoff;
    loop {
        attempts += 1;
        let mut at_least = Duration::ZERO;
        let mut busy = None;
        let outcome = match timeout(
            config.handshake_timeout,
            attempt::<C>(connector, shared, cred, last_received, config),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Attempt::Failed(format!(
                "connect and handshake timed out after {:?}",
                config.handshake_timeout
            )),
        };
        let last_error = match outcome {
            Attempt::Attached(halves, hello, next) => {
                *cred = next;
                return Ok(Reconnected::Attached(halves, hello));
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
                let error = format!("server busy: {reason}");
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
                continue;
            }
            Attempt::Restart => return Err(SessionLost::Rejected.into()),
            Attempt::Failed(e) => e,
        };
        tracing::debug!(attempts, error = %last_error, "connection attempt failed");
        let elapsed = started.elapsed();
        let delay = if bound.is_zero() {
            Duration::ZERO
        } else {
            rng.random_range(Duration::ZERO..=bound)
        }
        .max(at_least);
        if let Some(limit) = policy.give_up_after {
            if elapsed + delay >= limit {
                if let Some(busy) = busy {
                    return Err(busy.into());
                }
                return Err(SessionLost::GaveUp {
                    attempts,
                    elapsed,
                    last_error,
                }
                .into());
            }
        }
        tokio::time::sleep(delay).await;
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
                    Err(e) => return Attempt::Failed(format!("no randomness: {e}")),
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
                Err(e) => return Attempt::Failed(format!("no randomness: {e}")),
            };
            let resume = ClientResume::new(id, last_received, offered, *counter, eph, secret);
            let payload = Bytes::copy_from_slice(resume.request());
            (payload, Pending::Resume(resume, *id, *counter))
        }
    };
    let link = match connector.connect().await {
        Ok(link) => link,
        Err(e) => return Attempt::Failed(format!("connect: {e}")),
    };
    let (mut tx, mut rx) = link.split();
    // A send error does not end the attempt: the hello may have been
    // delivered and answered (a rejection, say) before the server dropped the
    // link, so the answer is read either way.
    let sent = tx.send(payload).await;
    let reply = match (rx.recv().await, sent) {
        (Ok(Some(reply)), _) => reply,
        (_, Err(e)) => return Attempt::Failed(format!("sending hello: {e}")),
        (Ok(None), Ok(())) => {
            return Attempt::Failed("link closed before the server's hello".into())
        }
        (Err(e), Ok(())) => return Attempt::Failed(format!("waiting for the server's hello: {e}")),
    };
    let head = match reply.get(..HELLO_LEN).map(ServerHello::decode) {
        Some(Ok(head)) => head,
        Some(Err(e)) => return Attempt::Failed(format!("bad server hello: {e}")),
        None => return Attempt::Failed(format!("server hello of {} bytes", reply.len())),
    };
    if head.rejected {
        if reply.len() > HELLO_LEN && offered & ext::ADMISSION != 0 {
            return match WireRefusal::decode(&reply) {
                Ok(refusal) if refusal.kind == RefusalKind::Restart => Attempt::Restart,
                Ok(refusal) => Attempt::Refused(Refusal::from_wire(refusal)),
                Err(e) => Attempt::Failed(format!("bad server refusal: {e}")),
            };
        }
        if reply.len() != HELLO_LEN {
            return Attempt::Failed(format!("server hello of {} bytes", reply.len()));
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
                Err(e) => return Attempt::Failed(format!("bad server key share: {e}")),
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
                return Attempt::Failed(format!("sending the key share: {e}"));
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
                return Attempt::Failed(format!("server hello of {} bytes", reply.len()));
            }
            Attempt::Attached((tx, rx), head, Cred::Bearer(head.resume_key))
        }
        Pending::Resume(resume, id, counter) => {
            if !proof {
                return Attempt::Failed("the server answered a proof resume without one".into());
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
                Err(e) => Attempt::Failed(format!("the server's proof: {e}")),
            }
        }
    }
}
