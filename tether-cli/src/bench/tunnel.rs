//! The tunnel workload: one bulk stream of bytes from a client socket to a
//! sink over loopback, three ways in the same run:
//!
//! - **direct TCP**: the client connects to the sink itself;
//! - **relay chain**: through two plain relays (a read/write loop with a
//!   256 KiB buffer, no framing), the same three loopback hops as the tunnel: client to local
//!   relay, relay to relay (where the tunnel has its stable conduit), relay
//!   to sink. Every byte is copied through the kernel three times instead
//!   of once, so on a machine with few cores this, not direct TCP, is the
//!   most a tunnel of any kind can reach;
//! - **tunnel**: through tether's tunnel in this process, set up as
//!   `tether tunnel serve --forward SINK` and `tether tunnel connect
//!   --local PORT` would: a `Server<TunnelFrame>` serving each session with
//!   `serve_session`, and a `TunnelClient` carrying every connection to a
//!   local port with `forward_tcp`;
//! - **ssh -L**: through `ssh -N -L PORT:SINK` to a throwaway `sshd` on
//!   loopback, when both exist and the bench runs as root.
//!
//! Each stream starts with an 8-byte id, so the sink can tell the
//! measured streams from the probes that wait for a forward to listen; the
//! sink reports how many bytes each stream delivered, and a stream that
//! delivered other than all of them fails the workload.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tether::link::{TcpConnector, TcpListener};
use tether::tunnel::{serve_session, TunnelClient, TunnelFrame};
use tether::{Config, Server, StableConduit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::systems::STEP_TIMEOUT;

/// One way of carrying the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Way {
    Direct,
    Relay,
    Tunnel,
    Ssh,
}

impl Way {
    pub(crate) const ALL: [Way; 4] = [Way::Direct, Way::Relay, Way::Tunnel, Way::Ssh];

    pub(crate) fn key(self) -> &'static str {
        match self {
            Way::Direct => "direct_tcp",
            Way::Relay => "relay_chain",
            Way::Tunnel => "tunnel",
            Way::Ssh => "ssh_l",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Way::Direct => "direct TCP",
            Way::Relay => "relay chain",
            Way::Tunnel => "tether tunnel",
            Way::Ssh => "ssh -L",
        }
    }
}

/// Streams waiting for the sink's count, by id.
type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<u64>>>>;

/// A TCP sink on loopback: reads each connection to its end and reports
/// the bytes it read (the 8-byte id included) to whoever waits for the id.
pub(crate) struct Sink {
    addr: SocketAddr,
    waiting: Waiting,
    next_id: AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    pub(crate) async fn start() -> anyhow::Result<Sink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let waiting: Waiting = Arc::default();
        let reports = waiting.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let reports = reports.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut id = [0u8; 8];
                    let mut total = 0u64;
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let at = total as usize;
                                if at < 8 {
                                    let k = n.min(8 - at);
                                    id[at..at + k].copy_from_slice(&buf[..k]);
                                }
                                total += n as u64;
                            }
                        }
                    }
                    // A probe (fewer than 8 bytes) or an unknown id: nobody
                    // waits for it.
                    if total >= 8 {
                        let waiter = reports
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .remove(&u64::from_be_bytes(id));
                        if let Some(w) = waiter {
                            let _ = w.send(total);
                        }
                    }
                });
            }
        });
        Ok(Sink {
            addr,
            waiting,
            next_id: AtomicU64::new(1),
            task,
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connects to `to`, sends `bytes` bytes (the id first) and shuts the
    /// socket down; returns the time until the sink read the end, and how
    /// many bytes it read.
    pub(crate) async fn push(&self, to: SocketAddr, bytes: u64) -> anyhow::Result<(Duration, u64)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, counted) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, tx);
        // Not zeros, so nothing on the way can take a shortcut.
        let chunk: Vec<u8> = (0..256 * 1024u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 29) as u8)
            .collect();
        let started = Instant::now();
        let send = async {
            let mut s = TcpStream::connect(to)
                .await
                .with_context(|| format!("connecting to {to}"))?;
            s.set_nodelay(true)?;
            let mut head = chunk.clone();
            head[..8].copy_from_slice(&id.to_be_bytes());
            let mut left = bytes;
            let mut first = true;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                let buf = if first { &head[..n] } else { &chunk[..n] };
                s.write_all(buf).await.context("writing the stream")?;
                left -= n as u64;
                first = false;
            }
            s.shutdown().await.context("shutting the stream down")?;
            // Keep the socket until the sink has read everything: closing
            // it could reset what is still in flight on the way.
            let got = counted.await.context("the sink never reported")?;
            anyhow::Ok((started.elapsed(), got))
        };
        let result = tokio::time::timeout(STEP_TIMEOUT, send).await;
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
        match result {
            Ok(r) => r,
            Err(_) => bail!("the stream did not finish within {STEP_TIMEOUT:?}"),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Two plain TCP relays in a row before the sink: each accepted
/// connection is carried to the next hop, one way, by a read/write loop
/// with a 256 KiB buffer (`tokio::io::copy`'s 8 KiB one would make the
/// chain slower than it need be).
pub(crate) struct RelayChain {
    local: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RelayChain {
    pub(crate) async fn start(sink: SocketAddr) -> anyhow::Result<RelayChain> {
        let (far, far_task) = relay(sink).await?;
        let (near, near_task) = relay(far).await?;
        Ok(RelayChain {
            local: near,
            tasks: vec![far_task, near_task],
        })
    }

    /// Where the bench's client connects.
    pub(crate) fn local(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for RelayChain {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A relay on a fresh loopback port to `to`; its address and its task.
async fn relay(to: SocketAddr) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut from, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = from.set_nodelay(true);
                let Ok(mut onward) = TcpStream::connect(to).await else {
                    return;
                };
                let _ = onward.set_nodelay(true);
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match from.read(&mut buf).await {
                        Ok(0) => {
                            let _ = onward.shutdown().await;
                            break;
                        }
                        Ok(n) => {
                            if onward.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                // Hold `from` until the far side is done, as the sink's
                // client does, so nothing in flight is reset.
                let mut rest = [0u8; 1];
                let _ = onward.read(&mut rest).await;
            });
        }
    });
    Ok((addr, task))
}

/// A tunnel server forwarding to the sink and a client forwarding a local
/// port to it, as `tether tunnel serve` and `tether tunnel connect --local`.
pub(crate) struct Tunnel {
    local: SocketAddr,
    client: TunnelClient,
    server: Arc<Server<TunnelFrame>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Tunnel {
    pub(crate) async fn start(sink: SocketAddr) -> anyhow::Result<Tunnel> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = Arc::new(Server::<TunnelFrame>::new(listener, Config::default()));
        let accepting = server.clone();
        let target = sink.to_string();
        let acceptor = tokio::spawn(async move {
            while let Some(session) = accepting.accept().await {
                let target = target.clone();
                tokio::spawn(serve_session(session, move |name| {
                    name.is_empty().then(|| target.clone())
                }));
            }
        });
        let conduit =
            StableConduit::<TunnelFrame>::connect(TcpConnector::new(addr), Config::default())
                .await
                .context("connecting to the tunnel server")?;
        let client = TunnelClient::new(conduit);
        let local = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let local_addr = local.local_addr()?;
        let forwarding = client.clone();
        let forwarder = tokio::spawn(async move {
            while let Ok((stream, _)) = local.accept().await {
                let _ = stream.set_nodelay(true);
                let client = forwarding.clone();
                tokio::spawn(async move {
                    if let Err(e) = client.forward_tcp("", stream).await {
                        tracing::warn!(error = %e, "bench tunnel stream failed");
                    }
                });
            }
        });
        Ok(Tunnel {
            local: local_addr,
            client,
            server,
            tasks: vec![acceptor, forwarder],
        })
    }

    /// Where the bench's client connects.
    pub(crate) fn local(&self) -> SocketAddr {
        self.local
    }

    pub(crate) async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.close()).await;
        self.server.shutdown(Duration::from_secs(5)).await;
    }
}

/// Why ssh -L cannot run here, if it cannot.
pub(crate) fn ssh_unavailable() -> Option<&'static str> {
    let sshd = Path::new("/usr/sbin/sshd");
    let found = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
    };
    if !sshd.is_file() || !found("ssh") || !found("ssh-keygen") {
        return Some("no sshd");
    }
    // The effective uid: the second field of `Uid:`.
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2)?.parse::<u32>().ok())
        });
    if euid != Some(0) {
        return Some("not root");
    }
    None
}

/// A throwaway sshd on loopback and an `ssh -N -L` through it to the sink;
/// both are killed, and their directory removed, on drop.
pub(crate) struct SshForward {
    local: SocketAddr,
    dir: PathBuf,
    sshd: Option<Child>,
    ssh: Option<Child>,
}

impl SshForward {
    /// Where the bench's client connects.
    pub(crate) fn local(&self) -> SocketAddr {
        self.local
    }

    pub(crate) async fn start(sink: SocketAddr) -> anyhow::Result<SshForward> {
        let dir = std::env::temp_dir().join(format!(
            "tether-bench-ssh-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut fwd = SshForward {
            local: sink,
            dir: dir.clone(),
            sshd: None,
            ssh: None,
        };
        for key in ["host_key", "client_key"] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-N", "", "-t", "ed25519", "-f"])
                .arg(dir.join(key))
                .stdin(Stdio::null())
                .status()
                .context("running ssh-keygen")?;
            if !status.success() {
                bail!("ssh-keygen failed: {status}");
            }
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
        let port = free_port()?;
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nAuthorizedKeysFile {auth}\n\
             PidFile {pid}\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             AllowTcpForwarding yes\nPrintMotd no\n",
            host = dir.join("host_key").display(),
            auth = dir.join("authorized_keys").display(),
            pid = dir.join("sshd.pid").display(),
        );
        std::fs::write(dir.join("sshd_config"), config)?;
        // sshd wants its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        fwd.sshd = Some(
            Command::new("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(dir.join("sshd_config"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("sshd.log"))?)
                .spawn()
                .context("starting sshd")?,
        );
        let sshd_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listening = wait_until(Duration::from_secs(10), || async {
            TcpStream::connect(sshd_addr).await.is_ok()
        })
        .await;
        if !listening {
            bail!("sshd did not listen: {}", fwd.log("sshd.log"));
        }
        let local_port = free_port()?;
        fwd.ssh = Some(
            Command::new("ssh")
                .arg("-N")
                .arg("-L")
                .arg(format!("{local_port}:127.0.0.1:{}", sink.port()))
                .args(["-F", "/dev/null"])
                .args(["-o", "StrictHostKeyChecking=no"])
                .arg("-o")
                .arg(format!(
                    "UserKnownHostsFile={}",
                    dir.join("known_hosts").display()
                ))
                .args(["-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes"])
                .args(["-o", "LogLevel=ERROR", "-i"])
                .arg(dir.join("client_key"))
                .args(["-p", &port.to_string(), "root@127.0.0.1"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("ssh.log"))?)
                .spawn()
                .context("starting ssh")?,
        );
        fwd.local = SocketAddr::from(([127, 0, 0, 1], local_port));
        let local = fwd.local;
        // The probes reach the sink as streams of no bytes, which it
        // ignores.
        let ready = wait_until(Duration::from_secs(15), || async {
            TcpStream::connect(local).await.is_ok()
        })
        .await;
        if !ready {
            bail!(
                "ssh -L did not listen: ssh: {}; sshd: {}",
                fwd.log("ssh.log"),
                fwd.log("sshd.log")
            );
        }
        Ok(fwd)
    }

    fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let text = text.trim();
        if text.is_empty() {
            "(nothing logged)".into()
        } else {
            text.lines().last().unwrap_or_default().to_owned()
        }
    }
}

impl Drop for SshForward {
    fn drop(&mut self) {
        // The client first: its connection's sshd child ends with it.
        for child in [self.ssh.take(), self.sshd.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port free a moment ago.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Whether `ok` came true within `within` (tried every 50 ms).
async fn wait_until<F, Fut>(within: Duration, mut ok: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ok().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_sink_counts_each_stream_and_ignores_probes() {
        let sink = Sink::start().await.unwrap();
        // A probe: connects and closes, as the readiness checks do.
        drop(TcpStream::connect(sink.addr()).await.unwrap());
        let (_, got) = sink.push(sink.addr(), 1_000_003).await.unwrap();
        assert_eq!(got, 1_000_003);
    }

    #[tokio::test]
    async fn the_relay_chain_carries_every_byte_to_the_sink() {
        let sink = Sink::start().await.unwrap();
        let chain = RelayChain::start(sink.addr()).await.unwrap();
        let (_, got) = sink.push(chain.local(), 3 << 20).await.unwrap();
        assert_eq!(got, 3 << 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_tunnel_carries_every_byte_to_the_sink() {
        let sink = Sink::start().await.unwrap();
        let tunnel = Tunnel::start(sink.addr()).await.unwrap();
        for n in [8, 3 << 20] {
            let (_, got) = sink.push(tunnel.local(), n).await.unwrap();
            assert_eq!(got, n);
        }
        tunnel.stop().await;
    }
}
