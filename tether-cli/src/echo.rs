//! `tether echo`: a stable-conduit echo server over TCP, TLS, WebSocket
//! (plain and secure) and Unix sockets, several at once.
//!
//! Every listener feeds one [`Server`] (through an [`AnyListener`] when
//! there are several), so that all transports share one session table and
//! one set of limits, and a client may resume its session over another
//! transport than it started on.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tether::link::any::AnyListener;
use tether::link::{ServerTls, StreamConfig, TcpListener, TlsListener, UnixListener, WsListener};
use tether::throttle::Throttle;
use tether::{Config, Listener, Server, StableConduit};

use crate::metrics::MetricsEndpoint;
use crate::transport::{Endpoint, Transport, WsBind};
use crate::Bytes;

/// One address `tether echo` serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// Plain TCP.
    Tcp(SocketAddr),
    /// TLS over TCP.
    Tls(SocketAddr),
    /// WebSocket (`ws://`) at a path.
    Ws(WsBind),
    /// Secure WebSocket (`wss://`) at a path.
    Wss(WsBind),
    /// A Unix-domain socket.
    Unix(PathBuf),
}

impl Listen {
    /// Whether it needs the TLS certificate.
    pub fn secure(&self) -> bool {
        matches!(self, Listen::Tls(_) | Listen::Wss(_))
    }
}

/// The server's certificate files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM, end-entity first.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// If given, clients must present a certificate this CA (PEM) signed.
    pub client_ca: Option<PathBuf>,
}

/// How `tether echo` runs.
#[derive(Clone, Debug)]
pub struct EchoOptions {
    /// Addresses to listen on (at least one).
    pub listen: Vec<Listen>,
    /// The certificate for the TLS and secure WebSocket listeners.
    pub tls: Option<TlsFiles>,
    /// Listen backlog of the listeners over TCP.
    pub backlog: u32,
    /// The server's limits.
    pub config: Config,
    /// How long a shutdown waits for sessions to close.
    pub shutdown_timeout: Duration,
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    pub metrics: Option<SocketAddr>,
}

/// Serves stable conduits on `listener`, echoing every byte-string message
/// back to its sender, until `stop` resolves; then closes every session
/// gracefully within `shutdown_timeout`.
pub async fn serve(
    listener: impl Listener,
    config: Config,
    stop: impl std::future::Future<Output = ()>,
    shutdown_timeout: Duration,
) -> anyhow::Result<tether::ShutdownReport> {
    serve_with_metrics(listener, config, stop, shutdown_timeout, None).await
}

/// [`serve`], and serves the server's metrics on `metrics` meanwhile.
pub async fn serve_with_metrics(
    listener: impl Listener,
    config: Config,
    stop: impl std::future::Future<Output = ()>,
    shutdown_timeout: Duration,
    metrics: Option<MetricsEndpoint>,
) -> anyhow::Result<tether::ShutdownReport> {
    let server = Arc::new(Server::<Bytes>::new(listener, config));
    let metrics = metrics.map(|m| m.spawn(&server));
    let acceptor = {
        let server = server.clone();
        tokio::spawn(async move {
            while let Some(conduit) = server.accept().await {
                tokio::spawn(echo_session(conduit));
            }
        })
    };
    stop.await;
    let open = server.stats().sessions_open;
    eprintln!("tether echo: shutting down, closing {open} sessions");
    let report = server.shutdown(shutdown_timeout).await;
    acceptor.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    eprintln!(
        "tether echo: {} sessions closed, {} lost",
        report.closed, report.lost
    );
    Ok(report)
}

/// Echoes one session's messages until it ends. Logs the session's start
/// and end at info, with the peer's address (`unix` for a Unix socket),
/// the server's id of the session and, for sessions with proof-of-possession
/// resume, their public session id.
pub async fn echo_session(mut conduit: StableConduit<Bytes>) {
    // One line a second for all sessions together: a peer sending garbage
    // cannot turn the server's log into its own firehose.
    static NOT_BYTES: Throttle = Throttle::new(1);
    let info = conduit.session_info().cloned();
    let id = info.as_ref().map(|i| i.id());
    let peer = match info.as_ref().and_then(|i| i.peer().addr) {
        Some(addr) => addr.to_string(),
        None => "unix".to_string(),
    };
    let session = info
        .as_ref()
        .and_then(|i| i.session_id())
        .map(|s| s.to_string());
    let span = tracing::info_span!("echo_session", id, %peer);
    let session = session.as_deref().unwrap_or("-");
    // The library logs the session's start, resumes and end at info.
    tracing::debug!(parent: &span, session, "echo session started");
    let mut echoed: u64 = 0;
    let ended = loop {
        match conduit.recv().await {
            Ok(Some(msg)) => {
                if let Err(e) = conduit.send(&msg).await {
                    break format!("lost: {e}");
                }
                echoed += 1;
            }
            Ok(None) => break "closed by the client".to_string(),
            Err(e) if e.session_lost().is_some() => break format!("lost: {e}"),
            Err(e) => {
                if let Some(suppressed) = NOT_BYTES.allow() {
                    tracing::warn!(
                        parent: &span,
                        error = %e,
                        suppressed,
                        "dropping a message that is not a byte string"
                    );
                }
            }
        }
    };
    tracing::info!(parent: &span, echoed, how = %ended, "echo session ended");
}

/// Resolves on Ctrl-C, or SIGTERM on Unix.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// A bound listener, before it serves.
enum Bound {
    Tcp(TcpListener),
    Tls(TlsListener),
    Ws(WsListener),
    Unix(UnixListener, SocketFile),
}

/// A Unix socket file this process created, removed when dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds a TCP listener, the error naming `url`.
fn bind_tcp(addr: SocketAddr, backlog: u32, url: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind_with(addr, backlog, StreamConfig::default())
        .with_context(|| format!("cannot listen on {url}"))
}

/// Binds one listener; returns it and the URL it serves (port 0 resolved).
fn bind(listen: &Listen, backlog: u32, tls: Option<&ServerTls>) -> anyhow::Result<(Bound, String)> {
    let tls = || {
        tls.cloned()
            .context("TLS listeners need --tls-cert and --tls-key")
    };
    let net = |transport, addr: SocketAddr, path: &str| {
        Endpoint::Net {
            transport,
            host: addr.ip().to_string(),
            port: addr.port(),
            path: path.to_owned(),
        }
        .to_string()
    };
    Ok(match listen {
        Listen::Tcp(addr) => {
            let l = bind_tcp(*addr, backlog, &addr.to_string())?;
            // Plain TCP is announced as `host:port`, what `--server`
            // takes (and what scripts reading the line expect).
            let url = l.local_addr()?.to_string();
            (Bound::Tcp(l), url)
        }
        Listen::Tls(addr) => {
            let l = bind_tcp(*addr, backlog, &net(Transport::Tls, *addr, ""))?;
            let url = net(Transport::Tls, l.local_addr()?, "");
            (Bound::Tls(TlsListener::new(l, tls()?)), url)
        }
        Listen::Ws(b) | Listen::Wss(b) => {
            let transport = if listen.secure() {
                Transport::Wss
            } else {
                Transport::Ws
            };
            let l = bind_tcp(b.addr, backlog, &net(transport, b.addr, &b.path))?;
            let url = net(transport, l.local_addr()?, &b.path);
            let mut ws = WsListener::new(l).path(b.path.clone());
            if listen.secure() {
                ws = ws.tls(tls()?);
            }
            (Bound::Ws(ws), url)
        }
        Listen::Unix(path) => {
            let url = Endpoint::Unix(path.clone()).to_string();
            let l = UnixListener::bind(path).map_err(|e| {
                let hint = if e.kind() == io::ErrorKind::AddrInUse {
                    " (a file is at that path: remove it if no server uses it)"
                } else {
                    ""
                };
                anyhow::anyhow!("cannot listen on {url}: {e}{hint}")
            })?;
            (Bound::Unix(l, SocketFile(path.clone())), url)
        }
    })
}

/// Checks that the certificate flags and the listeners agree, and loads
/// the certificate (every error naming its file).
fn load_tls(opts: &EchoOptions) -> anyhow::Result<Option<ServerTls>> {
    let secure = opts.listen.iter().any(Listen::secure);
    match (&opts.tls, secure) {
        (None, false) => Ok(None),
        (None, true) => anyhow::bail!("--tls and --wss need --tls-cert and --tls-key"),
        (Some(_), false) => anyhow::bail!(
            "--tls-cert and --tls-key given, but nothing serves TLS: add --tls ADDR or --wss ADDR[/PATH]"
        ),
        (Some(files), true) => Ok(Some(crate::transport::server_tls(
            &files.cert,
            &files.key,
            files.client_ca.as_deref(),
        )?)),
    }
}

/// Binds every listener of `opts` and serves until Ctrl-C or SIGTERM.
/// Announces each listener on stderr (`tether echo listening on URL`,
/// plain TCP as `host:port`), then the metrics endpoint if any (`tether
/// echo metrics on http://HOST:PORT/metrics`), and logs them at info.
pub async fn run(opts: EchoOptions) -> anyhow::Result<()> {
    if opts.listen.is_empty() {
        anyhow::bail!("nothing to listen on");
    }
    let tls = load_tls(&opts)?;
    // Everything is bound before anything is announced: a run that fails
    // on its third address has not claimed to serve the first two.
    let mut bound = Vec::with_capacity(opts.listen.len());
    let mut urls = Vec::with_capacity(opts.listen.len());
    for listen in &opts.listen {
        let (listener, url) = bind(listen, opts.backlog, tls.as_ref())?;
        bound.push(listener);
        urls.push(url);
    }
    let metrics = match opts.metrics {
        Some(addr) => Some(MetricsEndpoint::bind(addr).await?),
        None => None,
    };
    for url in urls {
        eprintln!("tether echo listening on {url}");
        tracing::info!(%url, "listening");
    }
    if let Some(m) = &metrics {
        eprintln!("tether echo metrics on {}", m.url());
        tracing::info!(url = m.url(), "serving metrics");
    }
    let (config, stop, timeout) = (opts.config, stop_signal(), opts.shutdown_timeout);
    // One listener is served as it is; several through one AnyListener.
    let mut files = Vec::new();
    if bound.len() == 1 {
        match bound.pop().expect("one listener") {
            Bound::Tcp(l) => serve_with_metrics(l, config, stop, timeout, metrics).await?,
            Bound::Tls(l) => serve_with_metrics(l, config, stop, timeout, metrics).await?,
            Bound::Ws(l) => serve_with_metrics(l, config, stop, timeout, metrics).await?,
            Bound::Unix(l, file) => {
                files.push(file);
                serve_with_metrics(l, config, stop, timeout, metrics).await?
            }
        };
        return Ok(());
    }
    let mut any = AnyListener::new();
    for b in bound {
        any = match b {
            Bound::Tcp(l) => any.with(l),
            Bound::Tls(l) => any.with(l),
            Bound::Ws(l) => any.with(l),
            Bound::Unix(l, file) => {
                files.push(file);
                any.with(l)
            }
        };
    }
    serve_with_metrics(any, config, stop, timeout, metrics).await?;
    Ok(())
}
