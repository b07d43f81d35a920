//! ssh through `tether tunnel`, against a real OpenSSH server: `ssh -o
//! ProxyCommand='tether tunnel connect ... --stdio'` to a `tether tunnel
//! serve` beside sshd, with a proxy between them that cuts the link. A
//! command that streams output survives 20 cuts and more with its output
//! complete and identical, and an interactive shell keeps its state across
//! a 30 s outage.
//!
//! sshd and tmux are optional unless `TETHER_REQUIRE_SSHD=1` (install:
//! `apt-get install -y openssh-server openssh-client tmux`).

use std::sync::Arc;
use std::time::Duration;

use tether::fault::{FaultConfig, FaultProxy};

mod common;
use common::ssh::{interactive_shell_keeps_state, streamed_output_is_complete, Sshd};
use common::{bin, tunnel_serve};

/// The ProxyCommand that puts ssh through the tunnel at `addr`.
fn tether_proxy_command(addr: &str) -> String {
    format!("{} tunnel connect {addr} --stdio", bin())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_streamed_output_survives_twenty_cuts() {
    let Some(sshd) = Sshd::start() else { return };
    let (_server, served) = tunnel_serve(&[&format!("127.0.0.1:{}", sshd.port())]);
    // About 79 MB of `seq` output; a cut every ~1.5 MB on average, and in
    // the handshake now and then.
    let lines: u64 = 10_000_000;
    let proxy = FaultProxy::start(
        served.parse().unwrap(),
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
    let (_server, served) = tunnel_serve(&[&format!("127.0.0.1:{}", sshd.port())]);
    let proxy = Arc::new(
        FaultProxy::start(served.parse().unwrap(), FaultConfig::default())
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
