//! `ftwitness`: the quorum witness of an FT pair (run it on a third
//! machine both nodes reach).
//!
//! - `ftwitness serve --secret-file F --state-dir D [--listen ADDR]`: the
//!   service (a systemd unit is in `witness/dist/`).
//! - `ftwitness show --witness ADDR --secret-file F`: every VM's generation
//!   and owner, and how long ago the owner was heard.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use witness::protocol::{Answer, Request};
use witness::registry::Timing;
use witness::server::{Server, ServerConfig};
use witness::WitnessClient;

#[derive(Parser)]
#[command(name = "ftwitness", about = "The quorum witness of an FT pair")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the witness.
    Serve {
        /// Where to listen (both nodes must reach it).
        #[arg(long, default_value = "0.0.0.0:7300")]
        listen: String,
        /// The pair's secret (a copy of the nodes' `pair-secret`, in their
        /// state directory).
        #[arg(long)]
        secret_file: PathBuf,
        /// Where the records are kept (`witness.sqlite`).
        #[arg(long, default_value = "/var/lib/ftwitness")]
        state_dir: PathBuf,
        /// A standby's claim is granted once the primary was not heard for
        /// this long; a primary's lease is half of it.
        #[arg(long, default_value_t = 200)]
        silence_ms: u64,
        /// After a start, no claim is granted for this long (the primaries
        /// reconnect meanwhile).
        #[arg(long, default_value_t = 2000)]
        startup_grace_ms: u64,
        /// The witness's name in the A-link handshake.
        #[arg(long, default_value = "witness")]
        name: String,
    },
    /// Print the witness's records.
    Show {
        /// The witness's address (host:port).
        #[arg(long)]
        witness: String,
        #[arg(long)]
        secret_file: PathBuf,
        /// The name this client gives in the handshake.
        #[arg(long, default_value = "ftwitness-show")]
        node: String,
    },
}

fn read_secret(path: &std::path::Path) -> Result<ft_link::PairSecret, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    ft_link::PairSecret::new(text.trim_ascii().to_vec())
        .map_err(|e| format!("the secret in {} is not usable: {e}", path.display()))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours on a terminal only: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ftwitness: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve {
                listen,
                secret_file,
                state_dir,
                silence_ms,
                startup_grace_ms,
                name,
            } => {
                let secret = read_secret(&secret_file)?;
                std::fs::create_dir_all(&state_dir)
                    .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
                let server = Server::bind(ServerConfig {
                    listen,
                    secret,
                    name,
                    timing: Timing {
                        silence: Duration::from_millis(silence_ms.max(1)),
                        startup_grace: Duration::from_millis(startup_grace_ms),
                    },
                    database: state_dir.join("witness.sqlite"),
                })
                .await
                .map_err(|e| e.to_string())?;
                tokio::select! {
                    _ = server.serve() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                Ok(())
            }
            Command::Show {
                witness,
                secret_file,
                node,
            } => {
                let secret = read_secret(&secret_file)?;
                let client =
                    WitnessClient::new(vec![witness], secret, &node, Duration::from_secs(5));
                match client
                    .ask(&Request::Show)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    Answer::Records {
                        records,
                        silence_ms,
                    } => {
                        println!("silence before a grant: {silence_ms} ms");
                        println!(
                            "{:<24} {:>10}  {:<16} owner heard",
                            "VM", "generation", "owner"
                        );
                        for r in records {
                            let heard = r
                                .owner_heard_ms_ago
                                .map_or("not since the witness started".to_string(), |ms| {
                                    format!("{ms} ms ago")
                                });
                            println!("{:<24} {:>10}  {:<16} {heard}", r.vm, r.generation, r.owner);
                        }
                        Ok(())
                    }
                    other => Err(format!("unexpected answer: {other:?}")),
                }
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ftwitness: {e}");
            ExitCode::from(2)
        }
    }
}
