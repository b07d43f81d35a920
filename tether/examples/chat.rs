//! A chat room: the server relays each member's lines to every other
//! member.
//!
//! Each client splits its conduit. The sending half is `Clone`: one clone
//! types lines, another sends a presence heartbeat, from two tasks. The
//! receiving half is read inside `tokio::select!`, next to a stop signal.
//!
//! ```sh
//! cargo run -p tether --example chat   # a server and three scripted members
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tether::link::{TcpConnector, TcpListener};
use tether::{Config, Server, StableConduit};
use tokio::sync::{broadcast, watch, Barrier};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// From a member to the server.
#[derive(Serialize, Deserialize, Debug)]
enum Up {
    Join(String), // the first message: who this is
    Line(String),
    Presence, // a heartbeat: still here
    Leave,    // after the last line
}

/// From the server to a member.
#[derive(Serialize, Deserialize, Debug, Clone)]
enum Down {
    Welcome,
    Said { from: String, text: String },
    Left(String),
}

const NAMES: [&str; 3] = ["ada", "bob", "cy"];
const LINES_EACH: usize = 20;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop_tx.send(true); // Ctrl-C stops every member early
    });
    run_demo(stop).await
}

/// Runs a server and three scripted members on a loopback port, and checks
/// that every member heard every other member's lines once, in order.
pub(crate) async fn run_demo(stop: watch::Receiver<bool>) -> Result<(), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = Arc::new(Server::<Down, Up>::new(listener, Config::default()));
    tokio::spawn(serve(Arc::clone(&server)));

    let everyone_in = Arc::new(Barrier::new(NAMES.len()));
    let members: Vec<_> = NAMES
        .iter()
        .map(|name| tokio::spawn(member(addr, name, everyone_in.clone(), stop.clone())))
        .collect();
    for (name, handle) in NAMES.iter().zip(members) {
        let mut heard = handle.await??;
        // A stable sort by sender keeps each sender's order: then it must be
        // each other member's lines in turn, each once, in the order typed.
        heard.sort_by_key(|(from, _)| NAMES.iter().position(|n| n == from));
        let expected: Vec<(String, String)> = (NAMES.iter().filter(|n| *n != name))
            .flat_map(|o| (0..LINES_EACH).map(move |i| (o.to_string(), format!("{o} {i}"))))
            .collect();
        if heard != expected {
            return Err(format!("{name} heard {heard:?}").into());
        }
    }
    server.shutdown(Duration::from_secs(5)).await;
    println!("ok: every member heard every other member's lines once, in order");
    Ok(())
}

/// The server: one room (a broadcast channel), one task per member.
async fn serve(server: Arc<Server<Down, Up>>) {
    let (room, _) = broadcast::channel::<(u64, Down)>(1024);
    let mut id = 0;
    while let Some(session) = server.accept().await {
        id += 1;
        let (room, mut heard) = (room.clone(), room.subscribe());
        tokio::spawn(async move {
            let (tx, mut rx) = session.split();
            // Relay what the others say to this member (never its own lines).
            // A member so far behind that the room's buffer overflowed for it
            // (`Lagged`) stops hearing the room; a real server would drop it.
            let relay = tokio::spawn({
                let tx = tx.clone();
                async move {
                    while let Ok((from, msg)) = heard.recv().await {
                        if from != id && tx.send(&msg).await.is_err() {
                            break;
                        }
                    }
                }
            });
            // Each message once, in order, until the member closes (`Ok(None)`).
            if let Ok(Some(Up::Join(name))) = rx.recv().await {
                let _ = tx.send(&Down::Welcome).await;
                while let Ok(Some(up)) = rx.recv().await {
                    let said = match up {
                        Up::Line(text) => Down::Said {
                            from: name.clone(),
                            text,
                        },
                        Up::Leave => Down::Left(name.clone()),
                        Up::Presence | Up::Join(_) => continue, // a real server notes "last seen"
                    };
                    let _ = room.send((id, said));
                }
            }
            relay.abort();
        });
    }
}

/// A scripted member: joins, types its lines while a heartbeat says it is
/// present, and reads until every other member left or `stop` is set.
/// Returns what it heard: (from, text).
async fn member(
    addr: SocketAddr,
    name: &'static str,
    everyone_in: Arc<Barrier>,
    mut stop: watch::Receiver<bool>,
) -> Result<Vec<(String, String)>, BoxError> {
    let connector = TcpConnector::new(addr);
    let conduit = StableConduit::<Up, Down>::connect(connector, Config::default()).await?;
    let (tx, mut rx) = conduit.split();
    tx.send(&Up::Join(name.into())).await?;
    match rx.recv().await? {
        Some(Down::Welcome) => everyone_in.wait().await, // start typing together
        other => return Err(format!("{name}: expected a welcome, got {other:?}").into()),
    };

    // Two tasks, each with its own clone of the sending half.
    let typer = tokio::spawn({
        let tx = tx.clone();
        async move {
            for i in 0..LINES_EACH {
                tx.send(&Up::Line(format!("{name} {i}"))).await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tx.send(&Up::Leave).await
        }
    });
    let heartbeat = tokio::spawn({
        let tx = tx.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_millis(20));
            while tx.send(&Up::Presence).await.is_ok() {
                every.tick().await;
            }
        }
    });

    let (mut heard, mut left) = (Vec::new(), 0);
    while left < NAMES.len() - 1 {
        tokio::select! {
            msg = rx.recv() => match msg? {
                Some(Down::Said { from, text }) => heard.push((from, text)),
                Some(Down::Left(who)) => {
                    println!("{name}: {who} left");
                    left += 1;
                }
                Some(Down::Welcome) | None => break, // None: the server closed
            },
            // A closed channel disables this branch instead of stopping.
            Ok(_) = stop.wait_for(|&stop| stop) => break,
        }
    }
    println!("{name}: heard {} lines, leaving", heard.len());
    heartbeat.abort();
    typer.await??;
    drop(rx); // nothing more to read
    tx.close().await?; // returns once the server has every line
    Ok(heard)
}
