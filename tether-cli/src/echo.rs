//! `tether echo`: a stable-conduit echo server over TCP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether::link::{StreamConfig, TcpListener};
use tether::throttle::Throttle;
use tether::{Config, Server, StableConduit};

use crate::Bytes;

/// How `tether echo` runs.
#[derive(Clone, Debug)]
pub struct EchoOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Listen backlog.
    pub backlog: u32,
    /// The server's limits.
    pub config: Config,
    /// How long a shutdown waits for sessions to close.
    pub shutdown_timeout: Duration,
}

/// Serves stable conduits on `listener`, echoing every byte-string message
/// back to its sender, until `stop` resolves; then closes every session
/// gracefully within `shutdown_timeout`.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    stop: impl std::future::Future<Output = ()>,
    shutdown_timeout: Duration,
) -> anyhow::Result<tether::ShutdownReport> {
    let server = Arc::new(Server::<Bytes>::new(listener, config));
    let acceptor = {
        let server = server.clone();
        tokio::spawn(async move {
            while let Some(conduit) = server.accept().await {
                tokio::spawn(echo_session(conduit));
            }
        })
    };
    stop.await;
    let open = server.stats().sessions_open;
    eprintln!("tether echo: shutting down, closing {open} sessions");
    let report = server.shutdown(shutdown_timeout).await;
    acceptor.abort();
    eprintln!(
        "tether echo: {} sessions closed, {} lost",
        report.closed, report.lost
    );
    Ok(report)
}

/// Echoes one session's messages until it ends.
pub async fn echo_session(mut conduit: StableConduit<Bytes>) {
    // One line a second for all sessions together: a peer sending garbage
    // cannot turn the server's log into its own firehose.
    static NOT_BYTES: Throttle = Throttle::new(1);
    let id = conduit.session_info().map(|i| i.id());
    loop {
        match conduit.recv().await {
            Ok(Some(msg)) => {
                if let Err(e) = conduit.send(&msg).await {
                    tracing::info!(?id, error = %e, "echo session ended");
                    return;
                }
            }
            Ok(None) => return,
            Err(e) if e.session_lost().is_some() => {
                tracing::info!(?id, error = %e, "echo session ended");
                return;
            }
            Err(e) => {
                if let Some(suppressed) = NOT_BYTES.allow() {
                    tracing::warn!(
                        ?id,
                        error = %e,
                        suppressed,
                        "dropping a message that is not a byte string"
                    );
                }
            }
        }
    }
}

/// Resolves on Ctrl-C, or SIGTERM on Unix.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Binds and serves until Ctrl-C or SIGTERM.
pub async fn run(opts: EchoOptions) -> anyhow::Result<()> {
    let listener = TcpListener::bind_with(opts.listen, opts.backlog, StreamConfig::default())?;
    eprintln!("tether echo listening on {}", listener.local_addr()?);
    serve(listener, opts.config, stop_signal(), opts.shutdown_timeout).await?;
    Ok(())
}
