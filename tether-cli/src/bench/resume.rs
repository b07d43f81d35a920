//! Resume latency: from a link cut to the first message delivered over the
//! new link, one session, reconnect backoff zero.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;
use tether::fault::{FaultConfig, FaultProxy};
use tether::link::tls::{ClientTls, TlsConnector, TlsListener};
use tether::link::ws::{WsConnector, WsListener};
use tether::link::{mem, Connector, Listener, TcpConnector, TcpListener};
use tether::{Config, Server, StableConduit};
use tokio::sync::mpsc;

use super::sessions::{resume_config, session_msg};
use super::systems::{bench_tls, Msg, MEM_CAPACITY};

/// The samples of one resume-latency run.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ResumeRun {
    /// Cut → first message delivered over the new link, per cut.
    #[serde(skip)]
    pub(crate) samples: Vec<Duration>,
    /// Messages that were sent right after a cut but still went through
    /// over the old link (the cut had not reached it yet); each time one
    /// more message was sent at once, and the sample is the arrival of the
    /// first one delivered over the new link.
    pub(crate) raced_old_link: u64,
    /// Links the client replaced.
    pub(crate) client_reconnects: u64,
}

/// An arrival at the server: message index, when, and how many times the
/// server's session had been resumed by then.
type Arrival = (u64, Instant, u64);

/// The link a resume-latency run cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Over {
    /// TCP through a [`FaultProxy`] (no random cuts; `cut_all` is the cut).
    Tcp,
    /// The in-memory link (`MemConnector::kill_all`).
    Mem,
    /// TLS through a [`FaultProxy`]; each resume pays a TLS handshake,
    /// resumed from the client's session cache when `resumption` is on.
    Tls { resumption: bool },
    /// WebSocket (`ws://`) through a [`FaultProxy`]; each resume pays an
    /// HTTP upgrade.
    Ws,
}

/// Runs `cuts` cuts over `over`.
pub(crate) async fn resume_latency(over: Over, cuts: usize) -> anyhow::Result<ResumeRun> {
    let proxied = |listener_addr| {
        FaultProxy::start(
            listener_addr,
            FaultConfig {
                seed: 1,
                mean_bytes_between_cuts: 0,
                handshake_cut_probability: 0.0,
                max_connection_age: None,
            },
        )
    };
    match over {
        Over::Mem => {
            let (listener, connector) = mem::listener(MEM_CAPACITY);
            let killer = connector.clone();
            run(listener, connector, move || killer.kill_all(), cuts).await
        }
        Over::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let proxy = proxied(listener.local_addr()?).await?;
            let connector = TcpConnector::new(proxy.local_addr());
            let run = run(listener, connector, || proxy.cut_all(), cuts).await;
            proxy.shutdown();
            run
        }
        Over::Tls { resumption } => {
            let tls = bench_tls()?;
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let proxy = proxied(listener.local_addr()?).await?;
            let listener = TlsListener::new(listener, tls.server.clone());
            let client = if resumption {
                tls.client.clone()
            } else {
                let mut config = (*tls.client.config()).clone();
                config.resumption = rustls::client::Resumption::disabled();
                ClientTls::from(Arc::new(config))
            };
            let addr = proxy.local_addr();
            let connector = TlsConnector::new(addr.ip().to_string(), addr.port(), client)
                .server_name("localhost");
            let run = run(listener, connector, || proxy.cut_all(), cuts).await;
            proxy.shutdown();
            run
        }
        Over::Ws => {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let proxy = proxied(listener.local_addr()?).await?;
            let listener = WsListener::new(listener);
            let connector = WsConnector::new(&format!("ws://{}/", proxy.local_addr()))?;
            let run = run(listener, connector, || proxy.cut_all(), cuts).await;
            proxy.shutdown();
            run
        }
    }
}

async fn run<Li, C>(
    listener: Li,
    connector: C,
    cut: impl Fn(),
    cuts: usize,
) -> anyhow::Result<ResumeRun>
where
    Li: Listener,
    C: Connector,
{
    let server = Server::<Msg>::new(listener, Config::default());
    let client = StableConduit::<Msg>::connect(connector, resume_config()).await?;
    let session = server.accept().await.context("the server stopped")?;
    let (server_tx, mut server_rx) = session.split();
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel::<Arrival>();
    let receiver = tokio::spawn(async move {
        while let Ok(Some(msg)) = server_rx.recv().await {
            let at = Instant::now();
            let Some(idx) = msg.get(8..16).and_then(|b| b.try_into().ok()) else {
                break;
            };
            let resumes = server_tx.stats().reconnects;
            if arrivals_tx
                .send((u64::from_le_bytes(idx), at, resumes))
                .is_err()
            {
                break;
            }
        }
    });
    let (tx, _rx) = client.split();
    let mut next = 0u64;
    let mut out = ResumeRun::default();
    let mut resumes_before = 0;
    // A first message, so the session is fully up.
    send_and_wait(&tx, &mut arrivals, &mut next).await?;
    for _ in 0..cuts {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let start = Instant::now();
        cut();
        loop {
            let (_, at, resumes) = send_and_wait(&tx, &mut arrivals, &mut next).await?;
            if resumes > resumes_before {
                resumes_before = resumes;
                out.samples.push(at - start);
                break;
            }
            out.raced_old_link += 1;
        }
    }
    out.client_reconnects = tx.stats().reconnects;
    let _ = tokio::time::timeout(Duration::from_secs(5), tx.close()).await;
    receiver.abort();
    Ok(out)
}

/// Sends message `next` and waits for its arrival at the server.
async fn send_and_wait(
    tx: &tether::StableSender<Msg>,
    arrivals: &mut mpsc::UnboundedReceiver<Arrival>,
    next: &mut u64,
) -> anyhow::Result<Arrival> {
    tx.send(&session_msg(0, *next)).await?;
    let arrival = tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
        .await
        .context("no arrival within 10 s")?
        .context("the server session ended")?;
    if arrival.0 != *next {
        bail!("message {} arrived, expected {}", arrival.0, next);
    }
    *next += 1;
    Ok(arrival)
}
