//! ssh through `tether tunnel`, against a real OpenSSH server: `ssh -o
//! ProxyCommand='tether tunnel connect ... --stdio'` to a `tether tunnel
//! serve` beside sshd, with a proxy between them that cuts the link. A
//! command that streams output survives 20 cuts and more with its output
//! complete and identical, and an interactive shell keeps its state across
//! a 30 s outage.
//!
//! sshd and tmux are optional unless `TETHER_REQUIRE_SSHD=1` (install:
//! `apt-get install -y openssh-server openssh-client tmux`).

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tether::fault::{FaultConfig, FaultProxy};

mod common;
use common::ssh::{interactive_shell_keeps_state, streamed_output_is_complete, Sshd};
use common::{bin, command, stderr_lines};

/// `tether tunnel serve` forwarding to `port`, killed on drop.
struct TunnelServer {
    child: Child,
    addr: String,
}

impl TunnelServer {
    fn start(port: u16) -> TunnelServer {
        let forward = format!("127.0.0.1:{port}");
        let mut child = command(&[
            "tunnel",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--forward",
            &forward,
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn tether tunnel serve");
        let lines = stderr_lines(&mut child);
        let mut seen = Vec::new();
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("tether tunnel serve did not start: {seen:?}"));
            if let Some(addr) = line.strip_prefix("tether tunnel serving on ") {
                // Keep draining its stderr.
                std::thread::spawn(move || for _ in lines {});
                return TunnelServer {
                    child,
                    addr: addr.trim().to_owned(),
                };
            }
            seen.push(line);
        }
    }
}

impl Drop for TunnelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ProxyCommand that puts ssh through the tunnel at `addr`.
fn tether_proxy_command(addr: &str) -> String {
    format!("{} tunnel connect {addr} --stdio", bin())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_streamed_output_survives_twenty_cuts() {
    let Some(sshd) = Sshd::start() else { return };
    let server = TunnelServer::start(sshd.port());
    // About 79 MB of `seq` output; a cut every ~1.5 MB on average, and in
    // the handshake now and then.
    let lines: u64 = 10_000_000;
    let proxy = FaultProxy::start(
        server.addr.parse().unwrap(),
        FaultConfig {
            seed: 20,
            mean_bytes_between_cuts: 1_500_000,
            handshake_cut_probability: 0.05,
            ..FaultConfig::default()
        },
    )
    .await
    .unwrap();
    let proxy_command = tether_proxy_command(&proxy.local_addr().to_string());
    let elapsed = tokio::task::spawn_blocking(move || {
        streamed_output_is_complete(&sshd, Some(&proxy_command), lines)
    })
    .await
    .unwrap();
    let cuts = proxy.stats().cuts;
    println!("{lines} lines through ssh over tether tunnel in {elapsed:?}, {cuts} cuts");
    assert!(cuts >= 20, "only {cuts} cuts: seed 20");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_interactive_shell_keeps_its_state_across_a_30_s_outage() {
    let Some(sshd) = Sshd::start() else { return };
    let server = TunnelServer::start(sshd.port());
    let proxy = Arc::new(
        FaultProxy::start(server.addr.parse().unwrap(), FaultConfig::default())
            .await
            .unwrap(),
    );
    let proxy_command = tether_proxy_command(&proxy.local_addr().to_string());
    let during = proxy.clone();
    tokio::task::spawn_blocking(move || {
        interactive_shell_keeps_state(&sshd, Some(&proxy_command), || {
            // The network goes away for 30 s: the link is reset, and every
            // reconnect attempt meanwhile is refused.
            during.outage(Duration::from_secs(30));
            std::thread::sleep(Duration::from_secs(30));
        })
    })
    .await
    .unwrap();
    let stats = proxy.stats();
    println!("shell state kept across a 30 s outage: {stats:?}");
    assert!(
        stats.outage_refused > 0,
        "no reconnect was refused: {stats:?}"
    );
}
