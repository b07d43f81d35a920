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
//! stable conduit). Budgets follow [`FaultConfig`] as the TCP proxy reads
//! it: with probability `handshake_cut_probability` a cut after 0 to 32
//! client bytes (inside or just after the hello), otherwise a budget drawn
//! from an exponential distribution with mean `mean_bytes_between_cuts`,
//! both directions counted; each connection's draw depends only on the
//! seed and the connection's index. `max_connection_age` is not applied.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tether::fault::{FaultConfig, ProxyStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest handshake cut: 0 to this many client bytes pass first.
const HANDSHAKE_MAX_BYTES: u64 = 32;

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

/// The cut planned for one connection.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Bytes to pass before the cut; `None`: no cut.
    budget: Option<u64>,
    /// Only client-to-server bytes count (a handshake cut).
    handshake: bool,
}

impl Plan {
    fn draw(config: &FaultConfig, index: u64) -> Plan {
        let mut rng = SmallRng::seed_from_u64(mix(mix(config.seed) ^ index));
        let p = config.handshake_cut_probability;
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        if rng.random_bool(p) {
            return Plan {
                budget: Some(rng.random_range(0..=HANDSHAKE_MAX_BYTES)),
                handshake: true,
            };
        }
        let mean = config.mean_bytes_between_cuts;
        let budget = (mean > 0).then(|| {
            // `1 - u` is in (0, 1]: the logarithm is finite.
            let u: f64 = rng.random();
            ((-(1.0 - u).ln() * mean as f64).ceil() as u64).max(1)
        });
        Plan {
            budget,
            handshake: false,
        }
    }
}

/// SplitMix64's finalizer: spreads (seed, index) over the seed space.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
        let plan = Plan::draw(&config, index);
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
async fn relay(client: UnixStream, upstream: &Path, plan: Plan, counters: &Counters) {
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

    #[test]
    fn plans_follow_the_config() {
        let mut config = FaultConfig {
            seed: 7,
            mean_bytes_between_cuts: 1000,
            handshake_cut_probability: 1.0,
            max_connection_age: None,
        };
        for i in 0..100 {
            let plan = Plan::draw(&config, i);
            assert!(plan.handshake && plan.budget.unwrap() <= HANDSHAKE_MAX_BYTES);
        }
        config.handshake_cut_probability = 0.0;
        let total: u64 = (0..1000)
            .map(|i| Plan::draw(&config, i).budget.unwrap())
            .sum();
        // The mean of 1,000 exponential draws of mean 1,000 is within 20%
        // of it with overwhelming probability (and this seed is fixed).
        assert!((800_000..1_200_000).contains(&total), "{total}");
        config.mean_bytes_between_cuts = 0;
        assert!(Plan::draw(&config, 3).budget.is_none());
    }
}
