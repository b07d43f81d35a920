//! A progress stream that survives cuts: a worker streams numbered updates
//! to a watcher through a proxy that cuts the TCP connection every few KiB.
//! The watcher still sees every update once, in order.
//!
//! ```sh
//! cargo run -p tether --example progress
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tether::fault::{FaultConfig, FaultProxy};
use tether::link::{TcpConnector, TcpListener};
use tether::{Config, Server, StableConduit};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One progress update, from the worker to the watcher.
#[derive(Serialize, Deserialize, Debug)]
struct Update {
    step: u32,
    of: u32,
    note: String,
}

const LAST: u32 = 10_000;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    run_demo().await // an error makes the exit status non-zero
}

/// Streams updates `0..=LAST` from a worker to a watcher through a cutting
/// proxy, and checks that each arrived once, in order.
pub(crate) async fn run_demo() -> Result<(), BoxError> {
    // The watcher is the server; it never sends, hence `()`.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let upstream = listener.local_addr()?;
    let server = Server::<(), Update>::new(listener, Config::default());

    // Between them, a proxy that cuts each TCP connection after a random
    // number of bytes, 4 KiB on average (both directions together).
    let faults = FaultConfig {
        mean_bytes_between_cuts: 4096,
        seed: 7,
        ..FaultConfig::default()
    };
    let proxy = FaultProxy::start(upstream, faults).await?;

    let worker = tokio::spawn(work(TcpConnector::new(proxy.local_addr())));
    let session = server.accept().await.ok_or("the server stopped")?;
    let received = watch(session, &proxy).await?;
    let worker_reconnects = worker.await??;

    let cuts = proxy.stats().cuts;
    println!("the link was cut {cuts} times; the worker reconnected {worker_reconnects} times");
    if received != LAST + 1 || cuts == 0 {
        return Err(format!("{received} updates arrived, {cuts} cuts").into());
    }
    println!("every one of the {received} updates arrived once, in order");
    Ok(())
}

/// The worker: sends every update, then closes. `send` never fails
/// because a link dropped: each update waits in the replay buffer until
/// the watcher acknowledges it, on this link or the next.
async fn work(connector: TcpConnector) -> Result<u64, BoxError> {
    // On loopback the proxy is back at once: retry quickly.
    let config = Config::default().reconnect_with(|r| r.max_backoff(Duration::from_millis(50)));
    let conduit = StableConduit::<Update, ()>::connect(connector, config).await?;
    let (tx, _rx) = conduit.split(); // keep the sender's counters after close
    for step in 0..=LAST {
        let note = "#".repeat((step % 64) as usize); // some payload
        tx.send(&Update {
            step,
            of: LAST,
            note,
        })
        .await?;
    }
    // Returns once the watcher has every update, however many cuts that takes.
    tx.close().await?;
    Ok(tx.stats().reconnects)
}

/// The watcher: checks each update is the next one, prints now and then,
/// and returns how many arrived before the worker closed.
async fn watch(
    mut session: StableConduit<(), Update>,
    proxy: &FaultProxy,
) -> Result<u32, BoxError> {
    let mut next = 0;
    while let Some(update) = session.recv().await? {
        if update.step != next {
            return Err(format!("expected update {next}, got {}", update.step).into());
        }
        if update.step % 2000 == 0 {
            let cuts = proxy.stats().cuts;
            println!(
                "progress {:>5}/{} ({cuts} cuts so far)",
                update.step, update.of
            );
        }
        next += 1;
    }
    Ok(next)
}
