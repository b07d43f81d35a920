//! `tether tunnel serve` and `tether tunnel connect`, as built, through a
//! proxy that cuts the link under the session: a local port forward and a
//! stdio stream carry every byte both ways, a token file admits only
//! clients with a token, and a refused target is reported with its reason.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use tether::fault::{FaultConfig, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{command, finish, stderr_lines, tunnel_serve, Running};

/// An echo target on 127.0.0.1: every connection's bytes come back.
async fn echo_target() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u64)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed as u64) as u8
                ^ (i >> 13) as u8
        })
        .collect()
}

/// A proxy in front of `addr` cutting about every `cut_every` bytes.
async fn cutting_proxy(addr: &str, cut_every: u64, seed: u64) -> FaultProxy {
    FaultProxy::start(
        addr.parse().expect("an address"),
        FaultConfig {
            seed,
            mean_bytes_between_cuts: cut_every,
            handshake_cut_probability: 0.05,
            ..FaultConfig::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_forward_carries_every_byte_through_cuts() {
    let target = echo_target().await;
    let target = target.to_string();
    let (server, served) = tunnel_serve(&[&target]);
    let proxy = cutting_proxy(&served, 512 * 1024, 7).await;
    let via = proxy.local_addr().to_string();
    let (_client, local) = Running::spawn(
        &["tunnel", "connect", &via, "--local", "127.0.0.1:0"],
        "tether tunnel forwarding ",
    );
    // Three connections at once, 8 MiB each way.
    let mut runs = Vec::new();
    for k in 0..3u8 {
        let local = local.clone();
        runs.push(tokio::spawn(async move {
            let data = pattern(k, 8 << 20);
            let stream = tokio::net::TcpStream::connect(&local).await.unwrap();
            let (mut r, mut w) = stream.into_split();
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&sent).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut back = Vec::new();
            tokio::time::timeout(Duration::from_secs(240), r.read_to_end(&mut back))
                .await
                .expect("the echo did not end")
                .unwrap();
            writer.await.unwrap();
            assert_eq!(back.len(), data.len(), "connection {k}: length");
            assert!(back == data, "connection {k}: the bytes differ");
        }));
    }
    for run in runs {
        run.await.unwrap();
    }
    let cuts = proxy.stats().cuts;
    println!("3 connections x 8 MiB each way through {cuts} cuts");
    assert!(cuts >= 5, "only {cuts} cuts");
    // SIGUSR1: the server lists the session it holds.
    let pid = server.child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-USR1", &pid])
        .status();
    assert!(sent.is_ok_and(|s| s.success()));
    let mut seen = Vec::new();
    let listed = loop {
        match server.lines.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line.starts_with("tether tunnel: 1 sessions") => {
                break server
                    .lines
                    .recv_timeout(Duration::from_secs(10))
                    .unwrap_or_default()
            }
            Ok(line) => seen.push(line),
            Err(_) => panic!("no session list after SIGUSR1: {seen:?}"),
        }
    };
    assert!(listed.contains("reconnects"), "{listed}");
    println!("{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_carries_a_stream_and_tokens_admit_only_their_holders() {
    let target = echo_target().await.to_string();
    let dir = std::env::temp_dir().join(format!("tether-tunnel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "# who may connect\nsecret-one\nsecret-two\n").unwrap();
    let tokens = tokens.to_str().unwrap().to_owned();
    let forward = format!("echo={target}");
    let (_server, served) = tunnel_serve(&[
        &forward,
        "--forward",
        "closed=127.0.0.1:1",
        "--token-file",
        &tokens,
    ]);
    let proxy = cutting_proxy(&served, 256 * 1024, 9).await;
    let via = proxy.local_addr().to_string();

    // Without a token: refused, with the reason, at once.
    let out = finish(
        command(&["tunnel", "connect", &via, "--stdio", "--to", "echo"])
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
        "connect without a token",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no valid token"), "{stderr}");

    // With one: 4 MiB through stdin and back on stdout, through cuts.
    let data = pattern(3, 4 << 20);
    let mut child = command(&["tunnel", "connect", &via, "--stdio", "--to", "echo"])
        .env("TETHER_TUNNEL_TOKEN", "secret-two")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = data.clone();
    let feeder = std::thread::spawn(move || {
        stdin.write_all(&input).unwrap();
        // Dropping stdin is the end of the stream: a half-close.
    });
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut back = Vec::new();
        stdout.read_to_end(&mut back).unwrap();
        back
    });
    let mut stderr_pipe = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    feeder.join().unwrap();
    let back = reader.join().unwrap();
    let mut status = None;
    for _ in 0..1200 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = status.expect("connect --stdio did not exit within 120 s");
    let errors = errors.join().unwrap();
    assert!(status.success(), "{errors}");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the bytes differ");

    // A target that refuses: the client says so and fails.
    let out = finish(
        command(&["tunnel", "connect", &via, "--stdio", "--to", "closed"])
            .env("TETHER_TUNNEL_TOKEN", "secret-one")
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
        "connect to a closed target",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_forward_on_a_terminal_keeps_a_status_line() {
    let target = echo_target().await.to_string();
    let (_server, served) = tunnel_serve(&[&target]);
    // The client runs for 3 s under a pseudo-terminal, then is stopped.
    let line = format!(
        "timeout -s INT 3 {} tunnel connect {served} --local 127.0.0.1:0",
        common::bin()
    );
    let Some(out) = common::on_terminal(&line, Duration::from_secs(60), "connect on a terminal")
    else {
        return;
    };
    let all = String::from_utf8_lossy(&out.stdout);
    assert!(
        all.contains("\rtether tunnel: connected | rtt"),
        "no status line:\n{all}"
    );
    assert!(all.contains("reconnects | "), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_delivers_bytes_without_a_newline_at_once() {
    // A target that speaks first, with no newline, then answers each
    // message: what ssh does. Standard output is line-buffered, so this
    // hangs unless the tunnel flushes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"HELLO").await.unwrap();
        let mut buf = [0u8; 3];
        while s.read_exact(&mut buf).await.is_ok() {
            s.write_all(b"ok:").await.unwrap();
            s.write_all(&buf).await.unwrap();
        }
    });
    let (_server, served) = tunnel_serve(&[&target]);
    let mut child = command(&["tunnel", "connect", &served, "--stdio"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    // Killed on drop, also when an assertion fails.
    let _client = Running {
        lines: stderr_lines(&mut child),
        child,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 6];
        let mut hello = [0u8; 5];
        if stdout.read_exact(&mut hello).is_ok() {
            let _ = tx.send(hello.to_vec());
        }
        while stdout.read_exact(&mut buf).is_ok() {
            let _ = tx.send(buf.to_vec());
        }
    });
    let got = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("no greeting");
    assert_eq!(got, b"HELLO");
    for word in [b"abc", b"def", b"ghi"] {
        stdin.write_all(word).unwrap();
        stdin.flush().unwrap();
        let got = rx.recv_timeout(Duration::from_secs(30)).expect("no answer");
        assert_eq!(got, [b"ok:".as_slice(), word].concat());
    }
}
