//! `tether echo --metrics ADDR`: the server's metrics in the Prometheus text
//! format at `GET /metrics`.
//!
//! Each scrape records a fresh [`Server::snapshot`](tether::Server::snapshot) through
//! `tether::metrics` into a Prometheus recorder (local to this endpoint:
//! nothing is installed process-wide), and answers with its rendering.
//!
//! The HTTP side is a small responder of its own rather than the exporter's
//! hyper listener: it records the snapshot at scrape time (the exporter's
//! listener only renders what was recorded before), and a scraper gets a
//! bounded share of the server: at most [`MAX_CONNECTIONS`] at once (more
//! are closed at once), a request of at most [`MAX_REQUEST`] bytes, and
//! [`DEADLINE`] for the whole exchange, reading and writing. Every request
//! gets `Connection: close`. Whatever a scraper sends, the worst it gets is
//! an error answer or a closed connection; the echo server does not notice.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::Bytes;

/// Scrapes served at once; connections beyond are closed unanswered.
pub const MAX_CONNECTIONS: usize = 16;
/// The longest request (line and headers) read.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time for one whole exchange: request read, answer written.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// The metrics endpoint, bound and not yet serving.
pub struct MetricsEndpoint {
    listener: TcpListener,
    url: String,
}

impl MetricsEndpoint {
    /// Binds `addr` (port 0 picks one).
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        let url = format!("http://{}/metrics", listener.local_addr()?);
        Ok(MetricsEndpoint { listener, url })
    }

    /// Where it serves: `http://HOST:PORT/metrics`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Serves `server`'s metrics until the server is dropped or the task
    /// is aborted.
    pub fn spawn(self, server: &Arc<tether::Server<Bytes>>) -> tokio::task::JoinHandle<()> {
        let recorder = Arc::new(PrometheusBuilder::new().build_recorder());
        metrics::with_local_recorder(&*recorder, tether::metrics::describe);
        let server = Arc::downgrade(server);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let listener = self.listener;
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, typically: back off.
                        tracing::debug!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if server.strong_count() == 0 {
                    return;
                }
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue; // dropped: closed at once
                };
                let (server, recorder) = (server.clone(), recorder.clone());
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(DEADLINE, exchange(stream, &server, &recorder)).await;
                    drop(slot);
                });
            }
        })
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    Metrics,
    NotFound,
    BadMethod,
    Bad,
    TooLarge,
}

/// Reads one request and answers it.
async fn exchange(
    mut stream: TcpStream,
    server: &Weak<tether::Server<Bytes>>,
    recorder: &PrometheusRecorder,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    let ask = loop {
        if len == buf.len() {
            break Ask::TooLarge;
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(()); // closed before a whole request
        }
        len += n;
        match parse(&buf[..len]) {
            Some(ask) => break ask,
            None => continue,
        }
    };
    let (status, body) = match ask {
        Ask::Metrics => match server.upgrade() {
            Some(server) => {
                let snapshot = server.snapshot();
                drop(server);
                metrics::with_local_recorder(recorder, || {
                    tether::metrics::record_server(&snapshot, &[]);
                });
                ("200 OK", recorder.handle().render())
            }
            None => ("503 Service Unavailable", "shutting down\n".into()),
        },
        Ask::NotFound => ("404 Not Found", "not found: try /metrics\n".into()),
        Ask::BadMethod => ("405 Method Not Allowed", "GET only\n".into()),
        Ask::Bad => ("400 Bad Request", "bad request\n".into()),
        Ask::TooLarge => (
            "431 Request Header Fields Too Large",
            "request too large\n".into(),
        ),
    };
    let content_type = match ask {
        Ask::Metrics => "text/plain; version=0.0.4; charset=utf-8",
        _ => "text/plain; charset=utf-8",
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// What the request in `bytes` asks, or `None` if it is not complete yet.
fn parse(bytes: &[u8]) -> Option<Ask> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => Some(Ask::TooLarge),
        Err(_) => Some(Ask::Bad),
        Ok(httparse::Status::Complete(_)) => {
            let path = req.path.unwrap_or("");
            let path = path.split('?').next().unwrap_or("");
            Some(match (req.method, path) {
                (Some("GET"), "/metrics") => Ask::Metrics,
                (Some("GET"), _) => Ask::NotFound,
                _ => Ask::BadMethod,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        let ask = |s: &str| parse(s.as_bytes());
        assert_eq!(
            ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Ask::Metrics)
        );
        assert_eq!(ask("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Some(Ask::Metrics));
        assert_eq!(ask("GET / HTTP/1.1\r\n\r\n"), Some(Ask::NotFound));
        assert_eq!(ask("POST /metrics HTTP/1.1\r\n\r\n"), Some(Ask::BadMethod));
        assert_eq!(ask("GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(ask("\x00\x01garbage\r\n\r\n"), Some(Ask::Bad));
        let many: String = (0..40).map(|i| format!("H{i}: v\r\n")).collect();
        assert_eq!(
            ask(&format!("GET /metrics HTTP/1.1\r\n{many}\r\n")),
            Some(Ask::TooLarge)
        );
    }
}
