//! The honest client: the tether library itself (`StableConduit` over TCP),
//! from its own source address, through a connector that binds it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tether::link::{StreamConfig, StreamLink, TcpLink};
use tether::{Config, Connector, LinkError, StableConduit};
use tether_cli::Bytes;
use tokio::time::{timeout, Instant};

use super::raw::connect_from;

/// A [`Connector`] whose links come from `src`, so that per-address limits
/// can tell the honest client from the attacker on loopback.
#[derive(Clone, Debug)]
pub(crate) struct BoundConnector {
    pub(crate) src: IpAddr,
    pub(crate) dst: SocketAddr,
}

impl Connector for BoundConnector {
    type Link = TcpLink;

    async fn connect(&self) -> Result<TcpLink, LinkError> {
        let stream = connect_from(self.src, self.dst).await?;
        Ok(StreamLink::tcp(stream, StreamConfig::default()))
    }
}

/// The honest client's settings: the defaults, but giving up after a few
/// seconds so that a refused client fails the test instead of hanging it.
pub(crate) fn config() -> Config {
    let mut c = Config::default();
    c = c.handshake_timeout(Duration::from_secs(2));
    c = c.reconnect_with(|r| {
        r.min_backoff(Duration::from_millis(5))
            .max_backoff(Duration::from_millis(200))
            .give_up_after(Some(Duration::from_secs(4)))
    });
    c
}

/// A long-lived honest session.
pub(crate) struct Honest {
    conduit: StableConduit<Bytes>,
    n: u64,
}

impl Honest {
    /// Connects from `src` to `dst`.
    pub(crate) async fn connect(src: IpAddr, dst: SocketAddr) -> Result<Honest, String> {
        let conduit = timeout(
            Duration::from_secs(6),
            StableConduit::<Bytes>::connect(BoundConnector { src, dst }, config()),
        )
        .await
        .map_err(|_| "connect: no answer within 6 s".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
        Ok(Honest { conduit, n: 0 })
    }

    /// Waits up to 5 s for the session's end: `Ok(true)` if it ended
    /// cleanly (the peer closed), `Ok(false)` if a message came instead.
    pub(crate) async fn ended_cleanly(&mut self) -> Result<bool, String> {
        match timeout(Duration::from_secs(5), self.conduit.recv()).await {
            Err(_) => Err("the session did not end within 5 s".into()),
            Ok(Ok(None)) => Ok(true),
            Ok(Ok(Some(_))) => Ok(false),
            Ok(Err(e)) => Err(format!("the session ended with an error: {e}")),
        }
    }

    /// One echo round trip (a 32-byte message), checked, timed.
    pub(crate) async fn round_trip(&mut self) -> Result<Duration, String> {
        self.n += 1;
        let mut msg = self.n.to_le_bytes().to_vec();
        msg.resize(32, 0xab);
        let msg = Bytes::from(msg);
        let start = Instant::now();
        let echoed = timeout(Duration::from_secs(5), async {
            self.conduit
                .send(&msg)
                .await
                .map_err(|e| format!("send: {e}"))?;
            self.conduit.recv().await.map_err(|e| format!("recv: {e}"))
        })
        .await
        .map_err(|_| "no echo within 5 s".to_string())??;
        match echoed {
            Some(m) if m == msg => Ok(start.elapsed()),
            Some(m) => Err(format!("echo of message {} came back as {m:?}", self.n)),
            None => Err("the session ended".to_string()),
        }
    }
}

/// A fresh honest client: connect plus the first echo, timed. This is "is a
/// new client served", the pass criterion shared by most tests.
pub(crate) async fn probe(src: IpAddr, dst: SocketAddr) -> Result<Duration, String> {
    let start = Instant::now();
    let mut honest = Honest::connect(src, dst).await?;
    honest.round_trip().await?;
    Ok(start.elapsed())
}

/// Latency summary of a series of samples.
#[derive(Debug, Default)]
pub(crate) struct Latencies {
    pub(crate) samples: Vec<Duration>,
    pub(crate) errors: Vec<String>,
}

impl Latencies {
    pub(crate) fn push(&mut self, r: Result<Duration, String>) {
        match r {
            Ok(d) => self.samples.push(d),
            Err(e) => self.errors.push(e),
        }
    }

    /// The `q` quantile (0..=1) of the samples.
    pub(crate) fn quantile(&self, q: f64) -> Duration {
        let mut s = self.samples.clone();
        s.sort();
        if s.is_empty() {
            return Duration::MAX;
        }
        let i = ((s.len() - 1) as f64 * q).round() as usize;
        s[i.min(s.len() - 1)]
    }

    pub(crate) fn max(&self) -> Duration {
        self.samples.iter().copied().max().unwrap_or(Duration::MAX)
    }

    /// All served (no error), and the slowest under `bound`.
    pub(crate) fn all_under(&self, bound: Duration) -> bool {
        self.errors.is_empty() && !self.samples.is_empty() && self.max() < bound
    }

    pub(crate) fn summary(&self) -> String {
        format!(
            "{} ok, {} failed, p50 {:?}, p99 {:?}, max {:?}{}",
            self.samples.len(),
            self.errors.len(),
            self.quantile(0.5),
            self.quantile(0.99),
            self.max(),
            match self.errors.first() {
                Some(e) => format!(", first error: {e}"),
                None => String::new(),
            }
        )
    }
}
