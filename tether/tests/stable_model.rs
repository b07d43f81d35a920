//! Model-based property test: random interleavings of sends, receives, link
//! failures and reconnects on both sides of one stable session, checked
//! against two plain FIFO queues (one per direction) as the reference model.
//!
//! Each case runs on a current-thread runtime with a paused clock, so a case
//! is deterministic for its operation list and reconnect backoff costs no
//! real time. More cases: `PROPTEST_CASES=2000 cargo test --test stable_model`.

use std::collections::VecDeque;
use std::time::Duration;

use proptest::prelude::*;
use tether::link::mem;
use tether::{Config, Server, StableConduit};

#[derive(Clone, Debug)]
enum Op {
    ClientSend(u8),
    ServerSend(u8),
    ClientRecv(u8),
    ServerRecv(u8),
    /// Fail every link now.
    Kill,
    /// Refuse new links for a while, then kill and allow again.
    Outage(u8),
    /// Let the tasks run without doing anything.
    Yield(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..40).prop_map(Op::ClientSend),
        4 => (1u8..40).prop_map(Op::ServerSend),
        3 => (1u8..40).prop_map(Op::ClientRecv),
        3 => (1u8..40).prop_map(Op::ServerRecv),
        2 => Just(Op::Kill),
        1 => (1u8..50).prop_map(Op::Outage),
        2 => (0u8..20).prop_map(Op::Yield),
    ]
}

fn config(seed: u64, initial_seq: u32, base_format: bool) -> Config {
    let mut c = Config::default();
    c = c.seed(seed).initial_seq(initial_seq);
    if base_format {
        c = c.extensions(0);
    } else {
        // Above the most messages a case can leave unconsumed (60 ops of at
        // most 40), so that inline sends never wait for a recv op.
        c = c.max_replay(1 << 24, 4096);
    }
    c = c.reconnect_with(|r| {
        r.min_backoff(Duration::from_millis(1))
            .max_backoff(Duration::from_millis(10))
            .give_up_after(None)
    });
    c
}

async fn recv_expect(
    end: &mut StableConduit<u64>,
    model: &mut VecDeque<u64>,
    who: &str,
) -> Result<(), TestCaseError> {
    let expected = model
        .pop_front()
        .expect("caller checks the model is not empty");
    let got = tokio::time::timeout(Duration::from_secs(600), end.recv())
        .await
        .map_err(|_| TestCaseError::fail(format!("{who}: message {expected} never arrived")))?
        .map_err(|e| TestCaseError::fail(format!("{who}: {e}")))?;
    prop_assert_eq!(got, Some(expected), "{} received the wrong message", who);
    Ok(())
}

async fn run(
    ops: Vec<Op>,
    seed: u64,
    initial_seq: u32,
    base_format: bool,
) -> Result<(), TestCaseError> {
    let (listener, connector) = mem::listener(8);
    let server = Server::<u64>::new(listener, config(seed, initial_seq, base_format));
    let mut client = StableConduit::<u64>::connect(
        connector.clone(),
        config(seed + 1, initial_seq, base_format),
    )
    .await
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    // The client speaks first: in the base format its first message is what
    // proves its key and hands the session to `accept`.
    client
        .send(&u64::MAX)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut session = server.accept().await.expect("server accepts");
    recv_expect(&mut session, &mut VecDeque::from([u64::MAX]), "server").await?;
    let mut to_server = VecDeque::new();
    let mut to_client = VecDeque::new();
    let mut next = 0u64;
    for op in ops {
        match op {
            Op::ClientSend(n) => {
                for _ in 0..n {
                    client
                        .send(&next)
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    to_server.push_back(next);
                    next += 1;
                }
            }
            Op::ServerSend(n) => {
                for _ in 0..n {
                    session
                        .send(&next)
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    to_client.push_back(next);
                    next += 1;
                }
            }
            Op::ClientRecv(n) => {
                for _ in 0..n.min(to_client.len() as u8) {
                    recv_expect(&mut client, &mut to_client, "client").await?;
                }
            }
            Op::ServerRecv(n) => {
                for _ in 0..n.min(to_server.len() as u8) {
                    recv_expect(&mut session, &mut to_server, "server").await?;
                }
            }
            Op::Kill => connector.kill_all(),
            Op::Outage(ms) => {
                connector.set_refuse(true);
                connector.kill_all();
                tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
                connector.set_refuse(false);
            }
            Op::Yield(n) => {
                for _ in 0..n {
                    tokio::task::yield_now().await;
                }
            }
        }
    }
    while !to_client.is_empty() {
        recv_expect(&mut client, &mut to_client, "client").await?;
    }
    while !to_server.is_empty() {
        recv_expect(&mut session, &mut to_server, "server").await?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
    ))]

    #[test]
    fn stable_session_matches_a_fifo_model(
        ops in proptest::collection::vec(op(), 1..60),
        seed in any::<u64>(),
        near_wrap in any::<bool>(),
        base_format in any::<bool>(),
    ) {
        let initial_seq = if near_wrap { u32::MAX - 30 } else { 0 };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(run(ops, seed, initial_seq, base_format))?;
    }
}
