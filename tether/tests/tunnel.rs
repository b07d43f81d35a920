//! The tunnel's streams over a stable session through a proxy that cuts
//! the link: every byte once, in order, both ways, on several streams at
//! once (checked by SHA-256 at both ends); a stalled stream beside a busy
//! one; half-close, refusal and reset carried faithfully.
//!
//! `TETHER_TUNNEL_MIB=256` runs the big transfer at the size
//! (256 MiB each way per stream; minutes in debug builds). Every failure
//! names its seed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ring::digest::{Context, SHA256};
use tether::fault::{FaultConfig, FaultProxy};
use tether::link::{TcpConnector, TcpListener};
use tether::tunnel::{
    serve_session, serve_session_with_limit, StreamError, TunnelClient, TunnelFrame, MAX_CHUNK,
    MAX_STREAMS, STREAM_WINDOW,
};
use tether::{Config, Server, StableConduit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(300);

/// The `n`-th byte of the pattern `seed`: cheap, and different per
/// stream and direction.
fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (offset + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
        *b = (x >> 29) as u8;
    }
}

fn digest_of_pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        pattern(seed, at, &mut buf[..n]);
        ctx.update(&buf[..n]);
        at += n as u64;
    }
    ctx.finish().as_ref().to_vec()
}

/// Writes `len` bytes of pattern `seed` to `w`, then shuts it down.
async fn write_pattern(mut w: impl tokio::io::AsyncWrite + Unpin, seed: u64, len: u64) {
    let mut buf = vec![0u8; 48 * 1024];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        pattern(seed, at, &mut buf[..n]);
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
        at += n as u64;
    }
    let _ = w.shutdown().await;
}

/// Reads `r` to its end: (bytes, SHA-256).
async fn read_digest(mut r: impl tokio::io::AsyncRead + Unpin) -> (u64, Vec<u8>) {
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                ctx.update(&buf[..n]);
                total += n as u64;
            }
        }
    }
    (total, ctx.finish().as_ref().to_vec())
}

/// A target that, on each connection, reads an 8-byte seed and an 8-byte
/// length, sends that many bytes of pattern `seed ^ 1`, and reports the
/// digest of everything else it read.
async fn pattern_target() -> (SocketAddr, mpsc::UnboundedReceiver<(u64, u64, Vec<u8>)>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (report, reports) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let report = report.clone();
            tokio::spawn(async move {
                let (mut r, w) = stream.into_split();
                let mut head = [0u8; 16];
                if r.read_exact(&mut head).await.is_err() {
                    return;
                }
                let seed = u64::from_be_bytes(head[..8].try_into().unwrap());
                let len = u64::from_be_bytes(head[8..].try_into().unwrap());
                let writer = tokio::spawn(write_pattern(w, seed ^ 1, len));
                let (got, digest) = read_digest(r).await;
                let _ = writer.await;
                let _ = report.send((seed, got, digest));
            });
        }
    });
    (addr, reports)
}

/// A tunnel server for `target` behind a proxy cutting every `cut_every`
/// bytes (0: never), and a client through it.
async fn tunnel(
    seed: u64,
    target: SocketAddr,
    cut_every: u64,
) -> (FaultProxy, TunnelClient, Arc<Server<TunnelFrame>>) {
    let cfg = Config::default()
        .seed(seed)
        .keepalive(Duration::from_millis(500), Duration::from_secs(5))
        .reconnect_with(|r| {
            r.min_backoff(Duration::from_millis(1))
                .max_backoff(Duration::from_millis(50))
                .give_up_after(Some(Duration::from_secs(60)))
        });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Arc::new(Server::<TunnelFrame>::new(listener, cfg.clone()));
    let proxy = FaultProxy::start(
        addr,
        FaultConfig {
            seed,
            mean_bytes_between_cuts: cut_every,
            handshake_cut_probability: if cut_every == 0 { 0.0 } else { 0.05 },
            ..FaultConfig::default()
        },
    )
    .await
    .unwrap();
    let accepting = server.clone();
    tokio::spawn(async move {
        while let Some(session) = accepting.accept().await {
            let target = target.to_string();
            tokio::spawn(serve_session(session, move |name| {
                (name.is_empty() || name == "pattern").then(|| target.clone())
            }));
        }
    });
    let conduit = StableConduit::<TunnelFrame>::connect(TcpConnector::new(proxy.local_addr()), cfg)
        .await
        .unwrap();
    (proxy, TunnelClient::new(conduit), server)
}

/// A tunnel server on loopback (no proxy) serving `targets` by name, with
/// at most `max_streams` streams per session, and a client of it.
async fn direct_tunnel(seed: u64, targets: &[(&str, String)], max_streams: usize) -> TunnelClient {
    let targets: std::collections::HashMap<String, String> = targets
        .iter()
        .map(|(name, addr)| (name.to_string(), addr.clone()))
        .collect();
    let targets = Arc::new(targets);
    let cfg = Config::default().seed(seed);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::<TunnelFrame>::new(listener, cfg.clone());
    tokio::spawn(async move {
        while let Some(session) = server.accept().await {
            let targets = targets.clone();
            tokio::spawn(serve_session_with_limit(
                session,
                move |name| targets.get(name).cloned(),
                max_streams,
            ));
        }
    });
    let conduit = StableConduit::<TunnelFrame>::connect(TcpConnector::new(addr), cfg)
        .await
        .unwrap();
    TunnelClient::new(conduit)
}

/// Carries stream `k` of a run: sends `len` bytes of pattern `seed` after
/// the 16-byte head and checks what comes back against pattern `seed ^ 1`.
async fn stream_through(client: TunnelClient, seed: u64, len: u64) -> Result<(), String> {
    let (local, remote) = tokio::io::duplex(256 * 1024);
    let (remote_r, remote_w) = tokio::io::split(remote);
    let carried = tokio::spawn(async move { client.forward("pattern", remote_r, remote_w).await });
    let (local_r, mut local_w) = tokio::io::split(local);
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&seed.to_be_bytes());
    head[8..].copy_from_slice(&len.to_be_bytes());
    local_w.write_all(&head).await.map_err(|e| e.to_string())?;
    let writer = tokio::spawn(write_pattern(local_w, seed, len));
    let (got, digest) = read_digest(local_r).await;
    writer.await.map_err(|e| e.to_string())?;
    let summary = carried
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("stream {seed}: {e}"))?;
    if got != len {
        return Err(format!("stream {seed}: {got} of {len} bytes came back"));
    }
    if digest != digest_of_pattern(seed ^ 1, len) {
        return Err(format!(
            "stream {seed}: the bytes that came back differ (SHA-256)"
        ));
    }
    if summary.sent != len + 16 || summary.received != len {
        return Err(format!("stream {seed}: {summary:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_carry_every_byte_both_ways_through_cuts() {
    let mib: u64 = std::env::var("TETHER_TUNNEL_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let len = mib << 20;
    let seed = 0x7e57;
    let (target, mut reports) = pattern_target().await;
    let (proxy, client, _server) = tunnel(seed, target, 256 * 1024).await;
    let streams = 4u64;
    let runs: Vec<_> = (0..streams)
        .map(|k| tokio::spawn(stream_through(client.clone(), seed * 16 + k, len)))
        .collect();
    for run in runs {
        let result = timeout(WAIT, run).await.expect("a stream hung").unwrap();
        if let Err(e) = result {
            panic!("seed {seed}: {e}; proxy {:?}", proxy.stats());
        }
    }
    // The target got every byte each stream sent, intact.
    for _ in 0..streams {
        let (s, got, digest) = timeout(WAIT, reports.recv()).await.unwrap().unwrap();
        assert_eq!(
            got, len,
            "seed {seed}: stream {s}: the target got {got} of {len}"
        );
        assert_eq!(
            digest,
            digest_of_pattern(s, len),
            "seed {seed}: stream {s}: the target's bytes differ (SHA-256)"
        );
    }
    let cuts = proxy.stats().cuts;
    println!("{streams} streams x {mib} MiB each way: {cuts} cuts");
    assert!(cuts >= 10, "seed {seed}: only {cuts} cuts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_does_not_hold_up_a_busy_one() {
    // The stalled target accepts and never reads.
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalled_addr = stalled.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = stalled.accept().await {
            held.push(s);
        }
    });
    let (target, _reports) = pattern_target().await;
    let client = direct_tunnel(
        3,
        &[
            ("pattern", target.to_string()),
            ("stalled", stalled_addr.to_string()),
        ],
        MAX_STREAMS,
    )
    .await;
    // 64 MiB into a target that never reads: it stops after the window
    // and the sockets' buffers.
    let (local, remote) = tokio::io::duplex(64 * 1024);
    let (remote_r, remote_w) = tokio::io::split(remote);
    let c = client.clone();
    let _stalled_stream =
        tokio::spawn(async move { c.forward("stalled", remote_r, remote_w).await });
    let (_local_r, local_w) = tokio::io::split(local);
    let stuck = tokio::spawn(write_pattern(local_w, 9, 64 << 20));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile a busy stream moves 8 MiB each way.
    timeout(
        Duration::from_secs(120),
        stream_through(client.clone(), 42, 8 << 20),
    )
    .await
    .expect("the busy stream was held up by the stalled one")
    .unwrap();
    assert!(!stuck.is_finished(), "the stalled stream was not stalled");
    held.abort();
}

#[tokio::test]
async fn refused_targets_and_resets_reach_the_client_with_their_reason() {
    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // A target that resets every connection after reading a little.
    let resetting = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let resetting_addr = resetting.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = resetting.accept().await {
            let mut b = [0u8; 4];
            let _ = s.read_exact(&mut b).await;
            let _ = s.set_zero_linger();
            drop(s);
        }
    });
    let client = direct_tunnel(
        4,
        &[
            ("closed", closed.to_string()),
            ("resetting", resetting_addr.to_string()),
        ],
        MAX_STREAMS,
    )
    .await;
    let run = |name: &'static str| {
        let client = client.clone();
        async move {
            let (local, remote) = tokio::io::duplex(1024);
            let (r, w) = tokio::io::split(remote);
            let (_lr, mut lw) = tokio::io::split(local);
            let _ = lw.write_all(b"ping").await;
            timeout(Duration::from_secs(30), client.forward(name, r, w))
                .await
                .expect("hung")
        }
    };
    match run("nowhere").await {
        Err(StreamError::Refused(reason)) => assert!(reason.contains("unknown target"), "{reason}"),
        other => panic!("{other:?}"),
    }
    match run("closed").await {
        Err(StreamError::Refused(reason)) => {
            assert!(reason.to_lowercase().contains("refused"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    match run("resetting").await {
        Err(StreamError::ResetByPeer(reason)) => {
            assert!(reason.to_lowercase().contains("reset"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // The session is still good for the next stream.
    assert!(client.ended().is_none());
}

/// A target that accepts connections and keeps them, never reading:
/// its address.
async fn holding_target() -> String {
    let holding = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = holding.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = holding.accept().await {
            held.push(s);
        }
    });
    addr
}

#[tokio::test]
async fn streams_beyond_the_session_limit_are_refused() {
    let holding_addr = holding_target().await;
    let client = direct_tunnel(5, &[("", holding_addr)], 2).await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let c = client.clone();
        let (_local, remote) = tokio::io::duplex(1024);
        let (r, w) = tokio::io::split(remote);
        open.push((
            _local,
            tokio::spawn(async move { c.forward("", r, w).await }),
        ));
    }
    // Both are open (the server counts them) before the third asks.
    timeout(Duration::from_secs(10), async {
        while client.open_streams() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_local, remote) = tokio::io::duplex(1024);
    let (r, w) = tokio::io::split(remote);
    match timeout(Duration::from_secs(10), client.forward("", r, w))
        .await
        .unwrap()
    {
        Err(StreamError::Refused(reason)) => {
            assert!(reason.contains("too many streams"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        open.iter().all(|(_, t)| !t.is_finished()),
        "the open streams were disturbed"
    );
}

/// A client that ignores its credit: the server resets the stream, tells
/// the client why, drops what else comes on it, and the session and its
/// other streams carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_its_window_has_the_stream_reset_and_is_told_why() {
    // A target that accepts and never reads: the server's writes to it
    // stop once the socket buffers are full, so its window fills.
    let holding_addr = holding_target().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::<TunnelFrame>::new(listener, Config::default().seed(8));
    tokio::spawn(async move {
        while let Some(session) = server.accept().await {
            let target = holding_addr.clone();
            tokio::spawn(serve_session(session, move |_| Some(target.clone())));
        }
    });
    let conduit =
        StableConduit::<TunnelFrame>::connect(TcpConnector::new(addr), Config::default().seed(9))
            .await
            .unwrap();
    let (tx, mut rx) = conduit.split();
    tx.send(&TunnelFrame::Open {
        id: 1,
        target: String::new(),
    })
    .await
    .unwrap();
    let opened = timeout(Duration::from_secs(10), rx.recv()).await.unwrap();
    assert!(
        matches!(opened, Ok(Some(TunnelFrame::Opened { id: 1 }))),
        "{opened:?}"
    );
    // Data without waiting for credit, until the server answers.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = stop.clone();
    let flood = tokio::spawn(async move {
        let chunk = tether::ByteBuf::from(vec![0x5a; MAX_CHUNK]);
        let mut sent = 0usize;
        // Far more than the window plus any socket buffers.
        while sent < 512 << 20 && !stopping.load(std::sync::atomic::Ordering::Relaxed) {
            let frame = TunnelFrame::Data {
                id: 1,
                bytes: chunk.clone(),
            };
            tx.send(&frame).await.expect("the session stays up");
            sent += MAX_CHUNK;
        }
        (tx, sent)
    });
    let reason = timeout(Duration::from_secs(30), async {
        loop {
            match rx.recv().await {
                Ok(Some(TunnelFrame::Reset { id: 1, reason })) => break reason,
                Ok(Some(TunnelFrame::Credit { .. })) => {}
                other => panic!("expected the stream's reset, got {other:?}"),
            }
        }
    })
    .await
    .expect("the server never reset the flooded stream");
    assert!(
        reason.contains("over the stream's window") && reason.contains(&STREAM_WINDOW.to_string()),
        "{reason}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (tx, sent) = flood.await.unwrap();
    assert!(sent > STREAM_WINDOW, "reset after only {sent} bytes");
    // The session carries on: a new stream on it opens.
    tx.send(&TunnelFrame::Open {
        id: 2,
        target: String::new(),
    })
    .await
    .unwrap();
    let opened = timeout(Duration::from_secs(10), async {
        loop {
            match rx.recv().await {
                Ok(Some(TunnelFrame::Opened { id: 2 })) => break,
                Ok(Some(TunnelFrame::Credit { .. } | TunnelFrame::Reset { id: 1, .. })) => {}
                other => panic!("expected stream 2 opened, got {other:?}"),
            }
        }
    })
    .await;
    assert!(opened.is_ok(), "the session stopped serving");
}

#[tokio::test]
async fn wait_ended_resolves_when_the_session_ends() {
    let (listener, connector) = tether::link::mem::listener(4);
    let server = Arc::new(Server::<TunnelFrame>::new(
        listener,
        Config::default().seed(6),
    ));
    let accepting = server.clone();
    tokio::spawn(async move {
        while let Some(session) = accepting.accept().await {
            tokio::spawn(serve_session(session, |_| None));
        }
    });
    let conduit = StableConduit::<TunnelFrame>::connect(connector, Config::default().seed(7))
        .await
        .unwrap();
    let client = TunnelClient::new(conduit);
    assert!(client.ended().is_none());
    // The server has handed the session to serve_session.
    timeout(Duration::from_secs(10), async {
        while !server.sessions().iter().any(|s| s.accepted) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the session was never accepted");
    let report = server.shutdown(Duration::from_secs(5)).await;
    let ended = timeout(Duration::from_secs(30), client.wait_ended()).await;
    assert!(
        ended.is_ok(),
        "wait_ended did not resolve after the server shut down: {report:?}, client {:?}",
        client.stats().state
    );
    assert!(client.ended().is_some());
    // And at once for a session that already ended.
    timeout(Duration::from_secs(1), client.wait_ended())
        .await
        .unwrap();
}
