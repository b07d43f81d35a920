//! `cargo run --release` in this directory: one-way throughput of binary
//! WebSocket messages over loopback TCP, client to server, for each crate
//! tether could have built its WebSocket links on. Both ends of a run use
//! the same crate; the HTTP upgrade is skipped (each crate is handed the
//! raw TCP stream in its client and server roles), so only framing,
//! masking and buffering are compared. Runs are interleaved and the median
//! of five is printed.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};

/// The sender flushes after this many messages, as tether's bench does.
const FLUSH_EVERY: usize = 64;

#[derive(Clone, Copy, Debug)]
enum Crate {
    TokioWebsockets,
    /// tokio-websockets writing through a 16 KiB `tokio::io::BufWriter`, as
    /// tether's links do: its vectored writes of two slices per frame
    /// become one contiguous write per flush.
    TokioWebsocketsBuffered,
    TokioTungstenite,
    /// tokio-tungstenite with an 8 KiB read buffer (tokio-websockets'
    /// size) and a 16 KiB write buffer (tether's), instead of its default
    /// 128 KiB each, allocated per connection.
    TokioTungsteniteSmall,
    Fastwebsockets,
}

impl Crate {
    const ALL: [Crate; 5] = [
        Crate::TokioWebsockets,
        Crate::TokioWebsocketsBuffered,
        Crate::TokioTungstenite,
        Crate::TokioTungsteniteSmall,
        Crate::Fastwebsockets,
    ];

    fn name(self) -> &'static str {
        match self {
            Crate::TokioWebsockets => "tokio-websockets 0.13",
            Crate::TokioWebsocketsBuffered => "tokio-websockets, 16 KiB buf",
            Crate::TokioTungstenite => "tokio-tungstenite 0.28",
            Crate::TokioTungsteniteSmall => "tokio-tungstenite, 8/16 KiB",
            Crate::Fastwebsockets => "fastwebsockets 0.10",
        }
    }
}

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let client = client.unwrap();
    let server = server.unwrap().0;
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    (client, server)
}

/// Sends `count` messages of `size` bytes from a client to a server and
/// returns the time until the server has received the last one.
async fn run(which: Crate, size: usize, count: usize) -> Duration {
    let (client, server) = pair().await;
    let payload = bytes::Bytes::from(vec![0x5a; size]);
    let start = Instant::now();
    let (sent, received) = match which {
        Crate::TokioWebsockets | Crate::TokioWebsocketsBuffered => {
            let client = tokio::io::BufWriter::with_capacity(
                if matches!(which, Crate::TokioWebsockets) {
                    0
                } else {
                    16 * 1024
                },
                client,
            );
            let mut tx = tokio_websockets::ClientBuilder::new().take_over(client);
            let mut rx = tokio_websockets::ServerBuilder::new()
                .limits(tokio_websockets::Limits::default().max_payload_len(Some(64 << 20)))
                .serve(server);
            let send = async move {
                for i in 1..=count {
                    tx.feed(tokio_websockets::Message::binary(payload.clone()))
                        .await
                        .unwrap();
                    if i % FLUSH_EVERY == 0 {
                        tx.flush().await.unwrap();
                    }
                }
                tx.flush().await.unwrap();
                tx
            };
            let recv = tokio::spawn(async move {
                let mut bytes = 0;
                for _ in 0..count {
                    bytes += rx.next().await.unwrap().unwrap().as_payload().len();
                }
                bytes
            });
            let (tx, bytes) = tokio::join!(send, recv);
            drop(tx);
            (count * size, bytes.unwrap())
        }
        Crate::TokioTungstenite | Crate::TokioTungsteniteSmall => {
            use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
            use tokio_tungstenite::tungstenite::Message;
            use tokio_tungstenite::WebSocketStream;
            let mut config = WebSocketConfig::default()
                .max_message_size(Some(64 << 20))
                .max_frame_size(Some(64 << 20));
            if matches!(which, Crate::TokioTungsteniteSmall) {
                config = config
                    .read_buffer_size(8 * 1024)
                    .write_buffer_size(16 * 1024);
            }
            let mut tx = WebSocketStream::from_raw_socket(client, Role::Client, Some(config)).await;
            let mut rx = WebSocketStream::from_raw_socket(server, Role::Server, Some(config)).await;
            let send = async move {
                for i in 1..=count {
                    tx.feed(Message::binary(payload.clone())).await.unwrap();
                    if i % FLUSH_EVERY == 0 {
                        tx.flush().await.unwrap();
                    }
                }
                tx.flush().await.unwrap();
                tx
            };
            let recv = tokio::spawn(async move {
                let mut bytes = 0;
                for _ in 0..count {
                    bytes += rx.next().await.unwrap().unwrap().len();
                }
                bytes
            });
            let (tx, bytes) = tokio::join!(send, recv);
            drop(tx);
            (count * size, bytes.unwrap())
        }
        Crate::Fastwebsockets => {
            use fastwebsockets::{Frame, Payload, Role, WebSocket};
            let mut tx = WebSocket::after_handshake(client, Role::Client);
            let mut rx = fastwebsockets::FragmentCollector::new({
                let mut ws = WebSocket::after_handshake(server, Role::Server);
                ws.set_max_message_size(64 << 20);
                ws
            });
            // No buffered sink: every frame is written (and flushed) by
            // `write_frame`, which is how the crate is meant to be used.
            let send = async move {
                for _ in 0..count {
                    tx.write_frame(Frame::binary(Payload::Borrowed(&payload)))
                        .await
                        .unwrap();
                }
                tx
            };
            let recv = tokio::spawn(async move {
                let mut bytes = 0;
                for _ in 0..count {
                    bytes += rx.read_frame().await.unwrap().payload.len();
                }
                bytes
            });
            let (tx, bytes) = tokio::join!(send, recv);
            drop(tx);
            (count * size, bytes.unwrap())
        }
    };
    let elapsed = start.elapsed();
    assert_eq!(sent, received, "{} lost bytes", which.name());
    elapsed
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let workloads = [(32usize, 1_000_000usize), (65_536, 8_192), (1 << 20, 512)];
    // `WS_SIZE=32 WS_CRATE=0 cargo run --release`: one workload of one
    // crate, once, for a profiler.
    if let (Ok(size), Ok(which)) = (std::env::var("WS_SIZE"), std::env::var("WS_CRATE")) {
        let size: usize = size.parse().unwrap();
        let which = Crate::ALL[which.parse::<usize>().unwrap()];
        let count = workloads.iter().find(|w| w.0 == size).map_or(1000, |w| w.1);
        let t = run(which, size, count * 5).await;
        println!("{} {size} B x {}: {t:?}", which.name(), count * 5);
        return;
    }
    println!("one-way throughput, client to server, loopback TCP, median of 5 interleaved runs");
    for (size, count) in workloads {
        for which in Crate::ALL {
            run(which, size, count / 20).await; // warm-up
        }
        let mut figures: Vec<Vec<f64>> = vec![Vec::new(); Crate::ALL.len()];
        for _ in 0..5 {
            for (i, which) in Crate::ALL.into_iter().enumerate() {
                let t = run(which, size, count).await.as_secs_f64();
                figures[i].push(if size < 1024 {
                    count as f64 / t
                } else {
                    (count * size) as f64 / t / 1e6
                });
            }
        }
        for (i, which) in Crate::ALL.into_iter().enumerate() {
            let unit = if size < 1024 { "msgs/s" } else { "MB/s" };
            println!(
                "{size:>8} B x {count:>9}  {:<24} {:>12.0} {unit}",
                which.name(),
                median(figures[i].clone())
            );
        }
    }
}
