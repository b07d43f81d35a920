//! The client side: connect, handshake, and reconnect with backoff.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tether_proto::{ext, ClientHello, ResumeKey, Seq, ServerHello};
use tokio::time::{timeout, Instant};

use super::attach::{endpoint, run_attachment, AttachEnd, Endpoint};
use super::config::Config;
use super::shared::{Role, Shared};
use super::{ConduitState, StableConduit};
use crate::error::{Error, SessionLost};
use crate::link::{Connector, Link, LinkRx, LinkTx};

type Halves<C> = (
    <<C as Connector>::Link as Link>::Tx,
    <<C as Connector>::Link as Link>::Rx,
);

/// What one connection attempt can end in.
enum Attempt<C: Connector> {
    Attached(Halves<C>, ServerHello),
    Rejected,
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
    /// The first connection is retried under the same policy as later ones;
    /// this fails only if the server rejects the session or the give-up
    /// deadline passes.
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
    key: Option<ResumeKey>,
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
        let outcome = match timeout(
            config.handshake_timeout,
            attempt::<C>(connector, shared, key, last_received, config.extensions),
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
            Attempt::Failed(e) => e,
        };
        tracing::debug!(attempts, error = %last_error, "connection attempt failed");
        let elapsed = started.elapsed();
        let delay = if bound.is_zero() {
            Duration::ZERO
        } else {
            rng.random_range(Duration::ZERO..=bound)
        };
        if let Some(limit) = policy.give_up_after {
            if elapsed + delay >= limit {
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
    extensions: u8,
) -> Attempt<C> {
    let link = match connector.connect().await {
        Ok(link) => link,
        Err(e) => return Attempt::Failed(format!("connect: {e}")),
    };
    let (mut tx, mut rx) = link.split();
    let hello = ClientHello {
        resume_key: key,
        last_received,
        extensions,
    };
    // A send error does not end the attempt: the hello may have been
    // delivered and answered (a rejection, say) before the server dropped the
    // link, so the answer is read either way.
    let sent = tx.send(Bytes::copy_from_slice(&hello.encode())).await;
    let reply = match (rx.recv().await, sent) {
        (Ok(Some(reply)), _) => reply,
        (_, Err(e)) => return Attempt::Failed(format!("sending hello: {e}")),
        (Ok(None), Ok(())) => {
            return Attempt::Failed("link closed before the server's hello".into())
        }
        (Err(e), Ok(())) => return Attempt::Failed(format!("waiting for the server's hello: {e}")),
    };
    match ServerHello::decode(&reply) {
        // "Closed" completes a close this side began with the close
        // handshake; any other time it is a rejection like any other.
        Ok(hello) if hello.is_closed() && shared.close_frame_queued() => Attempt::Closed,
        Ok(hello) if hello.rejected => Attempt::Rejected,
        Ok(hello) => Attempt::Attached((tx, rx), hello),
        Err(e) => Attempt::Failed(format!("bad server hello: {e}")),
    }
}
