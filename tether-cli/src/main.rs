//! The `tether` command: a demo of stable conduits under injected faults, and
//! an echo server.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tether_cli::demo::{self, DemoOptions};

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Stable conduits that survive link failures"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream messages through a proxy that cuts the connection at random,
    /// and check that every one comes back exactly once, in order.
    Demo {
        /// Messages to send (each is echoed back).
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        /// Payload size in bytes (at least 8).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Mean bytes forwarded between two cuts (both directions); 0: no cuts.
        #[arg(long, default_value_t = 256 * 1024)]
        cut_every: u64,
        /// Probability that a new connection is cut inside its handshake.
        #[arg(long, default_value_t = 0.1)]
        handshake_cuts: f64,
        /// Seed of the fault schedule and the payloads (default: random).
        #[arg(long)]
        seed: Option<u64>,
        /// Run only the client, against this `tether echo` (or compatible)
        /// server; the cutting proxy sits in front of it.
        #[arg(long)]
        server: Option<SocketAddr>,
        /// Give up if no echo arrives for this many seconds.
        #[arg(long, default_value_t = 30)]
        stall_timeout: u64,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Stream from client to server only; the server checks. Shows the
        /// replay buffer staying under its bound.
        #[arg(long)]
        one_way: bool,
    },
    /// Run a stable-conduit echo server over TCP (messages: byte strings).
    Echo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:4000")]
        listen: SocketAddr,
    },
}

/// A seed from the operating system's random source.
fn random_seed() -> u64 {
    use rand::{rngs::SmallRng, RngCore, SeedableRng};
    SmallRng::from_os_rng().next_u64()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tether: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Demo {
                messages,
                size,
                cut_every,
                handshake_cuts,
                seed,
                server,
                stall_timeout,
                json,
                one_way,
            } => {
                let opts = DemoOptions {
                    messages,
                    size: size.max(8),
                    cut_every,
                    handshake_cuts,
                    seed: seed.unwrap_or_else(random_seed),
                    server,
                    stall_timeout: Duration::from_secs(stall_timeout),
                    progress: !json,
                    one_way,
                };
                if !json {
                    eprintln!(
                        "tether demo: {} messages of {} bytes {} through a proxy cutting every ~{} bytes (seed {})",
                        opts.messages,
                        opts.size,
                        if one_way { "streamed one way" } else { "echoed" },
                        opts.cut_every,
                        opts.seed
                    );
                }
                let report = demo::run(opts.clone()).await?;
                if json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    print!("{}", demo::render(&report, &opts));
                }
                Ok::<bool, anyhow::Error>(report.ok)
            }
            Command::Echo { listen } => {
                tether_cli::echo::run(listen, tether::Config::default()).await?;
                Ok(true)
            }
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tether: {e:#}");
            ExitCode::FAILURE
        }
    }
}
