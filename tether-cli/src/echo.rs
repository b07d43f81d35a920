//! `tether echo`: a stable-conduit echo server over TCP.

use std::net::SocketAddr;

use tether::link::TcpListener;
use tether::{Config, Server, StableConduit};

use crate::Bytes;

/// Serves stable conduits on `listener`, echoing every byte-string message
/// back to its sender, until the process ends.
pub async fn serve(listener: TcpListener, config: Config) -> anyhow::Result<()> {
    let mut server = Server::<Bytes>::new(listener, config);
    while let Some(conduit) = server.accept().await {
        tokio::spawn(echo_session(conduit));
    }
    Ok(())
}

/// Echoes one session's messages until it ends.
pub async fn echo_session(mut conduit: StableConduit<Bytes>) {
    loop {
        match conduit.recv().await {
            Ok(Some(msg)) => {
                if let Err(e) = conduit.send(&msg).await {
                    tracing::info!(error = %e, "echo session ended");
                    return;
                }
            }
            Ok(None) => return,
            Err(e) if e.session_lost().is_some() => {
                tracing::info!(error = %e, "echo session ended");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "dropping a message that is not a byte string"),
        }
    }
}

/// Binds `addr` and serves.
pub async fn run(addr: SocketAddr, config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("tether echo listening on {}", listener.local_addr()?);
    serve(listener, config).await
}
