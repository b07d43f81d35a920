//! Runs the programs in `tether/examples/` as tests, so that they keep
//! compiling and keep doing what they claim: each checks its own result
//! and returns an error when the check fails, which fails the test.

use std::future::Future;
use std::time::Duration;

#[path = "../examples/chat.rs"]
#[allow(dead_code)] // `main`
mod chat;
#[path = "../examples/client_server.rs"]
#[allow(dead_code)] // `main`, and the parts only the command line uses
mod client_server;
#[path = "../examples/progress.rs"]
#[allow(dead_code)] // `main`
mod progress;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs one example's demo under a generous deadline, failing on its
/// error or on the deadline.
async fn run(name: &str, demo: impl Future<Output = Result<(), BoxError>>) {
    match tokio::time::timeout(Duration::from_secs(120), demo).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("example {name} failed its check: {e}"),
        Err(_) => panic!("example {name} did not finish within 120 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_server_example() {
    run("client_server", client_server::run_demo()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_example() {
    // The sender stays alive: the members stop by themselves.
    let (_stop, stop) = tokio::sync::watch::channel(false);
    run("chat", chat::run_demo(stop)).await;
}

/// Setting the stop signal ends the members early: they heard too little,
/// and the demo's check reports it instead of passing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_example_fails_when_stopped_early() {
    let (_stop, stop) = tokio::sync::watch::channel(true);
    let result = tokio::time::timeout(Duration::from_secs(120), chat::run_demo(stop))
        .await
        .expect("the chat demo did not finish");
    assert!(result.is_err(), "a chat stopped at once passed its check");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_example() {
    run("progress", progress::run_demo()).await;
}
