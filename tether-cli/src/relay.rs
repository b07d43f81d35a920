//! A fault-injecting relay for Unix-domain sockets: what
//! [`FaultProxy`](tether::fault::FaultProxy) is for TCP, for
//! `tether demo --transport unix`.
//!
//! [`UnixFaultRelay`] listens on a socket path of its own and relays every
//! connection to the server's socket, byte by byte, until the connection's
//! budget is spent; then it closes both sockets, so that both peers see
//! their stream end wherever their frames were (Unix sockets have no
//! reset: a cut inside a frame is a truncated frame, a cut between frames
//! an end of stream without the close handshake, both a lost link to a
//! stable conduit). Each connection's budget is the one a `FaultProxy` with
//! the same [`FaultConfig`] draws for it ([`FaultConfig::plan`]): a seed
//! cuts the same way on every transport. `max_connection_age` is not
//! applied.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tether::fault::{CutPlan, FaultConfig, ProxyStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running relay. Dropping it stops accepting, closes every relayed
/// connection and removes its socket file.
#[derive(Debug)]
pub struct UnixFaultRelay {
    path: PathBuf,
    counters: Arc<Counters>,
    /// Set to `true` to stop: every relayed connection closes.
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    cuts: AtomicU64,
    handshake_cuts: AtomicU64,
    mid_frame_cuts: AtomicU64,
    bytes_forwarded: AtomicU64,
}

impl UnixFaultRelay {
    /// Listens on `path` (which must not exist) and relays every connection
    /// to the socket at `upstream`. Must be called within a tokio runtime.
    pub fn start(
        upstream: impl Into<PathBuf>,
        path: impl Into<PathBuf>,
        config: FaultConfig,
    ) -> io::Result<UnixFaultRelay> {
        let path = path.into();
        let listener = UnixListener::bind(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", path.display()),
            )
        })?;
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            upstream.into(),
            config,
            counters.clone(),
            stopped,
        ));
        Ok(UnixFaultRelay {
            path,
            counters,
            stop,
            task,
        })
    }

    /// The socket path clients connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What was relayed and cut so far. `mid_frame_cuts` counts the budget
    /// cuts that withheld part of a read chunk, as the TCP proxy does.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        ProxyStats {
            connections: c.connections.load(Ordering::Relaxed),
            cuts: c.cuts.load(Ordering::Relaxed),
            handshake_cuts: c.handshake_cuts.load(Ordering::Relaxed),
            mid_frame_cuts: c.mid_frame_cuts.load(Ordering::Relaxed),
            bytes_forwarded: c.bytes_forwarded.load(Ordering::Relaxed),
            // The relay has no outage or black-hole mode.
            ..ProxyStats::default()
        }
    }

    /// Stops accepting and closes every relayed connection.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
        self.task.abort();
    }
}

impl Drop for UnixFaultRelay {
    fn drop(&mut self) {
        self.shutdown();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(
    listener: UnixListener,
    upstream: PathBuf,
    config: FaultConfig,
    counters: Arc<Counters>,
    stopped: watch::Receiver<bool>,
) {
    let upstream = Arc::new(upstream);
    let mut index = 0u64;
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(err) => {
                tracing::warn!(%err, "unix relay: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let plan = config.plan(index);
        index += 1;
        let (upstream, counters, mut stopped) =
            (upstream.clone(), counters.clone(), stopped.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = relay(client, &upstream, plan, &counters) => {}
                _ = stopped.wait_for(|stop| *stop) => {}
            }
        });
    }
}

/// How one direction ended.
enum End {
    /// End of stream, passed on.
    Eof,
    /// The budget ran out; `true` if part of a read chunk was withheld.
    Cut(bool),
}

/// Relays one connection until both directions end, the budget runs out
/// or either side fails; every socket is closed on return.
async fn relay(client: UnixStream, upstream: &Path, plan: CutPlan, counters: &Counters) {
    let server = match UnixStream::connect(upstream).await {
        Ok(server) => server,
        Err(err) => {
            tracing::debug!(%err, "unix relay: upstream connect failed");
            return;
        }
    };
    let record_cut = |partial: bool| {
        counters.cuts.fetch_add(1, Ordering::Relaxed);
        counters
            .handshake_cuts
            .fetch_add(u64::from(plan.handshake), Ordering::Relaxed);
        counters
            .mid_frame_cuts
            .fetch_add(u64::from(partial), Ordering::Relaxed);
    };
    if plan.budget == Some(0) {
        record_cut(false);
        return;
    }
    let left = AtomicU64::new(plan.budget.unwrap_or(u64::MAX));
    let up_budget = plan.budget.map(|_| &left);
    let down_budget = if plan.handshake { None } else { up_budget };
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    let up = pump(client_r, server_w, up_budget, counters);
    let down = pump(server_r, client_w, down_budget, counters);
    tokio::pin!(up, down);
    let (mut up_open, mut down_open) = (true, true);
    while up_open || down_open {
        let end = tokio::select! {
            end = &mut up, if up_open => { up_open = false; end }
            end = &mut down, if down_open => { down_open = false; end }
        };
        match end {
            Ok(End::Eof) => {}
            Ok(End::Cut(partial)) => {
                record_cut(partial);
                return;
            }
            Err(err) => {
                tracing::debug!(%err, "unix relay: connection failed");
                return;
            }
        }
    }
}

/// Takes up to `n` bytes from `budget`: how many pass, and whether the
/// budget is spent.
fn take(budget: &AtomicU64, n: usize) -> (usize, bool) {
    let n = n as u64;
    let before = budget
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
            Some(left.saturating_sub(n))
        })
        .unwrap_or(0);
    let pass = before.min(n);
    (pass as usize, before <= n)
}

/// Copies one direction until its end or the budget's.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    budget: Option<&AtomicU64>,
    counters: &Counters,
) -> io::Result<End> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(End::Eof);
        }
        let (pass, spent) = match budget {
            Some(budget) => take(budget, n),
            None => (n, false),
        };
        to.write_all(&buf[..pass]).await?;
        counters
            .bytes_forwarded
            .fetch_add(pass as u64, Ordering::Relaxed);
        if spent {
            return Ok(End::Cut(pass < n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_taken_to_the_byte() {
        let b = AtomicU64::new(10);
        assert_eq!(take(&b, 4), (4, false));
        assert_eq!(take(&b, 6), (6, true));
        let b = AtomicU64::new(10);
        assert_eq!(take(&b, 16), (10, true));
        assert_eq!(take(&b, 1), (0, true));
    }
}
