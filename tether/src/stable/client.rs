//! The client side: connect, handshake, and reconnect with backoff.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tether_proto::{
    ext, ClientHello, Refusal as WireRefusal, RefusalKind, ResumeKey, Seq, ServerHello, HELLO_LEN,
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

/// What one connection attempt can end in.
enum Attempt<C: Connector> {
    Attached(Halves<C>, ServerHello),
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
        let Reconnected::Attached(halves, hello) =
            reconnect(&connector, &shared, None, None, &config, &mut rng).await?
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
            key: hello.resume_key,
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
    key: ResumeKey,
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
                    Some(self.key),
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
            self.key = hello.resume_key;
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
/// and full jitter until the give-up deadline.
async fn reconnect<C: Connector>(
    connector: &C,
    shared: &Shared,
    mut key: Option<ResumeKey>,
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
            attempt::<C>(connector, shared, key, last_received, config),
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
            Attempt::Attached(halves, hello) => return Ok(Reconnected::Attached(halves, hello)),
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
            Attempt::Restart if key.is_some() && last_received.is_none() => {
                tracing::debug!("the server never heard from this session: starting over");
                key = None;
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

async fn attempt<C: Connector>(
    connector: &C,
    shared: &Shared,
    key: Option<ResumeKey>,
    last_received: Option<Seq>,
    config: &Config,
) -> Attempt<C> {
    let link = match connector.connect().await {
        Ok(link) => link,
        Err(e) => return Attempt::Failed(format!("connect: {e}")),
    };
    let (mut tx, mut rx) = link.split();
    let hello = ClientHello {
        resume_key: key,
        last_received,
        extensions: config.extensions,
    };
    // The credential goes with a new session's hello only: a resume is
    // proven by its key.
    let payload = match (&config.credential, key) {
        (Some(credential), None) => Bytes::from(hello.encode_with_credential(credential)),
        _ => Bytes::copy_from_slice(&hello.encode()),
    };
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
    if reply.len() > HELLO_LEN && config.extensions & ext::ADMISSION != 0 {
        return match WireRefusal::decode(&reply) {
            Ok(refusal) if refusal.kind == RefusalKind::Restart => Attempt::Restart,
            Ok(refusal) => Attempt::Refused(Refusal::from_wire(refusal)),
            Err(e) => Attempt::Failed(format!("bad server refusal: {e}")),
        };
    }
    match ServerHello::decode(&reply) {
        // "Closed" completes a close this side began with the close
        // handshake; any other time it is a rejection like any other.
        Ok(hello) if hello.is_closed() && shared.close_frame_queued() => Attempt::Closed,
        Ok(hello) if hello.rejected => Attempt::Rejected,
        Ok(hello) => Attempt::Attached((tx, rx), hello),
        Err(e) => Attempt::Failed(format!("bad server hello: {e}")),
    }
}
