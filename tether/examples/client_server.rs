//! A server that answers every line in upper case, and a client that
//! connects to it by host name.
//!
//! ```sh
//! cargo run -p tether --example client_server                         # both, in one process
//! cargo run -p tether --example client_server -- server 127.0.0.1:4000 # one terminal
//! cargo run -p tether --example client_server -- client localhost:4000 # another
//! ```
//!
//! Stop the server with Ctrl-C: it closes its sessions gracefully.

use std::sync::Arc;
use std::time::Duration;

use tether::link::{TcpConnector, TcpListener};
use tether::{Config, Server, StableConduit};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the client sends, one message per line.
const LINES: [&str; 3] = ["hello", "stable conduits", "survive link failures"];

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => run_demo().await,
        ["server", addr] => {
            let server = Server::<String>::new(TcpListener::bind(addr).await?, Config::default());
            println!("serving on {addr}; Ctrl-C stops");
            tokio::select! {
                () = serve(&server) => {}
                _ = tokio::signal::ctrl_c() => {
                    let report = server.shutdown(Duration::from_secs(5)).await;
                    println!("shut down: {} sessions closed, {} lost", report.closed, report.lost);
                }
            }
            Ok(())
        }
        ["client", addr] => client(addr).await.map(drop),
        _ => Err("usage: client_server [server ADDR | client HOST:PORT]".into()),
    }
}

/// Runs a server on a free loopback port and a client against it, and
/// checks the replies.
pub(crate) async fn run_demo() -> Result<(), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let server = Arc::new(Server::<String>::new(listener, Config::default()));
    let accepting = tokio::spawn({
        let server = Arc::clone(&server);
        async move { serve(&server).await }
    });

    // The client dials a host name, as users do; it is resolved again on
    // every reconnect.
    let replies = client(&format!("localhost:{port}")).await?;
    let expected: Vec<String> = LINES.iter().map(|l| l.to_uppercase()).collect();
    if replies != expected {
        return Err(format!("wrong replies: {replies:?}, expected {expected:?}").into());
    }

    // Closes every session gracefully; then `accept` returns `None`.
    let report = server.shutdown(Duration::from_secs(5)).await;
    accepting.await?;
    println!(
        "ok: {} replies checked; {} sessions still open at shutdown",
        replies.len(),
        report.closed + report.lost
    );
    Ok(())
}

/// The accept loop: one task per session, until the server stops.
async fn serve(server: &Server<String>) {
    while let Some(session) = server.accept().await {
        tokio::spawn(async move {
            if let Err(e) = echo_upper(session).await {
                eprintln!("session ended: {e}");
            }
        });
    }
}

/// Answers each line in upper case until the client closes (`Ok(None)`).
/// A link that fails meanwhile is invisible here: the session resumes.
async fn echo_upper(mut session: StableConduit<String>) -> Result<(), tether::Error> {
    while let Some(line) = session.recv().await? {
        session.send(&line.to_uppercase()).await?;
    }
    Ok(())
}

/// Connects to `addr` (`host:port`), sends each line, prints each reply,
/// and closes.
async fn client(addr: &str) -> Result<Vec<String>, BoxError> {
    let connector = TcpConnector::from_host_port(addr)?;
    let mut conduit = StableConduit::<String>::connect(connector, Config::default()).await?;
    let mut replies = Vec::new();
    for line in LINES {
        conduit.send(line).await?; // a &str for a conduit of String
        let reply = conduit.recv().await?.ok_or("the server closed early")?;
        println!("{line:?} -> {reply:?}");
        replies.push(reply);
    }
    // A handshake: returns once the server has everything we sent.
    conduit.close().await?;
    Ok(replies)
}
