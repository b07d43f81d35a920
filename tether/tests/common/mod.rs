//! Helpers shared by the integration tests: traffic with checkable content,
//! and a checker for exactly-once, in-order delivery per stream.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use tether::{Config, Error, StableConduit, StableReceiver, StableSender};

pub mod pki;
pub mod transport;

/// (stream id, index within the stream, payload derived from both).
pub type Msg = (u32, u64, Vec<u8>);

/// A test configuration: fast retries, reproducible jitter.
pub fn config(seed: u64) -> Config {
    let mut c = Config::default();
    c = c.seed(seed).handshake_timeout(Duration::from_secs(5));
    c = c.reconnect_with(|r| {
        r.min_backoff(Duration::from_millis(1))
            .max_backoff(Duration::from_millis(20))
            .give_up_after(Some(Duration::from_secs(30)))
    });
    c
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ceb9fe1a85ec53);
    x ^ (x >> 33)
}

/// The payload of message `idx` of `stream`: its length and bytes are a
/// function of both, so corruption or mix-ups are detected.
pub fn payload(seed: u64, stream: u32, idx: u64, max_len: usize) -> Vec<u8> {
    let h = mix(seed ^ (u64::from(stream) << 40) ^ idx);
    let len = if max_len == 0 {
        0
    } else if h % 50 == 0 {
        // Occasionally a large one, so frames span many TCP segments.
        max_len
    } else {
        (h % (max_len.min(300) as u64 + 1)) as usize
    };
    (0..len)
        .map(|i| (h >> (i % 8 * 8)) as u8 ^ i as u8)
        .collect()
}

/// Traffic one side sends: `streams` concurrent tasks, `per_stream` messages each.
#[derive(Clone, Copy, Debug)]
pub struct Traffic {
    pub seed: u64,
    pub streams: u32,
    pub per_stream: u64,
    pub max_len: usize,
}

impl Traffic {
    pub fn total(&self) -> u64 {
        u64::from(self.streams) * self.per_stream
    }
}

/// Spawns one task per stream, each sending its messages in order.
pub fn spawn_senders(
    tx: &StableSender<Msg>,
    t: Traffic,
) -> Vec<tokio::task::JoinHandle<Result<(), Error>>> {
    (0..t.streams)
        .map(|stream| {
            let tx = tx.clone();
            tokio::spawn(async move {
                for idx in 0..t.per_stream {
                    tx.send(&(stream, idx, payload(t.seed, stream, idx, t.max_len)))
                        .await?;
                }
                Ok(())
            })
        })
        .collect()
}

/// Receives until `t.total()` messages arrived; fails on the first message
/// that is lost, duplicated, reordered or corrupted.
pub async fn check_receiver(rx: &mut StableReceiver<Msg>, t: Traffic) -> Result<(), String> {
    let mut next = vec![0u64; t.streams as usize];
    let mut got = 0u64;
    while got < t.total() {
        let (stream, idx, data) = match rx.recv().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(format!("ended after {got} of {} messages", t.total())),
            Err(e) => return Err(format!("error after {got} of {} messages: {e}", t.total())),
        };
        let Some(expected) = next.get_mut(stream as usize) else {
            return Err(format!("message from unknown stream {stream}"));
        };
        if idx != *expected {
            let what = if idx > *expected {
                "lost"
            } else {
                "duplicated or reordered"
            };
            return Err(format!(
                "stream {stream}: expected {expected}, got {idx} ({what})"
            ));
        }
        if data != payload(t.seed, stream, idx, t.max_len) {
            return Err(format!("stream {stream} message {idx}: payload corrupted"));
        }
        *expected += 1;
        got += 1;
    }
    Ok(())
}

/// Runs traffic both ways at once between two ends of one session and checks
/// both directions. Returns the two ends for further inspection.
pub async fn exchange(
    a: StableConduit<Msg>,
    b: StableConduit<Msg>,
    a_to_b: Traffic,
    b_to_a: Traffic,
) -> Result<(StableSender<Msg>, StableSender<Msg>), String> {
    let (a_tx, mut a_rx) = a.split();
    let (b_tx, mut b_rx) = b.split();
    let a_senders = spawn_senders(&a_tx, a_to_b);
    let b_senders = spawn_senders(&b_tx, b_to_a);
    let a_check =
        tokio::spawn(async move { check_receiver(&mut a_rx, b_to_a).await.map(|()| a_rx) });
    let b_check =
        tokio::spawn(async move { check_receiver(&mut b_rx, a_to_b).await.map(|()| b_rx) });
    for s in a_senders.into_iter().chain(b_senders) {
        s.await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("send failed: {e}"))?;
    }
    let a_rx = a_check
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("a received: {e}"))?;
    let b_rx = b_check
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("b received: {e}"))?;
    drop((a_rx, b_rx));
    Ok((a_tx, b_tx))
}

/// Runs a test body under a deadline, so that a bug shows as a failure, not
/// as a hung test run.
pub async fn within<T>(body: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), body)
        .await
        .expect("test did not finish within 60 s: something is stuck")
}
