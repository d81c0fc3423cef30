//! `lab-agent`: runs inside every lab node (started by its init).
//!
//! `lab-agent serve` answers the lab's requests; `lab-agent send --to ADDR`
//! pushes a payload through another agent and back (used to prove the A-link
//! carries data between the nodes).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lab::agent::{server, AgentClient, AGENT_PORT};

#[derive(Parser)]
#[command(name = "lab-agent", about = "Agent of a lab node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve requests (exec, echo, ping) on a TCP port.
    Serve {
        #[arg(long, default_value_t = AGENT_PORT)]
        port: u16,
    },
    /// Send BYTES through the agent at ADDR and back, check them, print JSON.
    Send {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1 << 20)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
}

fn main() -> ExitCode {
    // Logs go to stderr (the node's console when init starts the agent).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours on a terminal only: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTLAB_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { port } => match server::serve(port) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lab-agent: cannot serve on port {port}: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Send {
            to,
            bytes,
            seed,
            timeout_secs,
        } => {
            let client =
                AgentClient::new(to).with_connect_timeout(Duration::from_secs(timeout_secs));
            match client.echo(bytes, seed, Duration::from_secs(timeout_secs)) {
                Ok(report) => {
                    println!("{}", serde_json::to_string(&report).expect("serialisable"));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lab-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
