//! `ftrelay`: the fault relay as a process, driven through a control
//! socket (see `fault_relay::command` for the commands).
//!
//! ```text
//! ftrelay --listen 127.0.0.1:7801 --to 10.78.0.2:7800 --control /tmp/relay.sock
//! ftrelay --control /tmp/relay.sock --send 'up drop on EpochEnd'
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fault_relay::control::{send_command, ControlSocket};
use fault_relay::Relay;
use tokio::signal::unix::{signal, SignalKind};

/// A frame-aware TCP relay for the A-link that injects faults on command.
#[derive(Debug, Parser)]
#[command(name = "ftrelay", version)]
struct Cli {
    /// Address to listen on (the primary connects here).
    #[arg(long, required_unless_present = "send")]
    listen: Option<String>,
    /// Address to relay to (the standby's A-link address).
    #[arg(long, required_unless_present = "send")]
    to: Option<String>,
    /// Control socket (mode 0600): one command per line.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Send this command to the relay at --control, print its answer, exit
    /// (e.g. 'up drop', 'down flip 12', 'both stall', 'counters').
    #[arg(long, requires = "control", conflicts_with_all = ["listen", "to"])]
    send: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours on a terminal only: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTRELAY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    if let (Some(command), Some(path)) = (&cli.send, &cli.control) {
        return match send_command(path, command).await {
            Ok(answer) => {
                println!("{answer}");
                if answer.starts_with("ok") {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(error) => fail(&error),
        };
    }
    let (Some(listen), Some(to)) = (cli.listen, cli.to) else {
        unreachable!("clap requires --listen and --to without --send")
    };
    let relay = match Relay::start(listen.as_str(), &to).await {
        Ok(relay) => relay,
        Err(error) => return fail(&error),
    };
    // The bound address (for --listen HOST:0) on stdout, for scripts.
    println!("listening on {} relaying to {to}", relay.local_addr());
    let control = match cli.control.as_deref().map(ControlSocket::bind).transpose() {
        Ok(control) => control,
        Err(error) => return fail(&error),
    };
    let serving = async {
        match control {
            Some(control) => control.serve(relay.handle().clone()).await,
            None => std::future::pending().await,
        }
    };
    // SIGINT or SIGTERM: the control socket's file is removed on the way
    // out (a killed relay leaves it, and the next one replaces it).
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => return fail(&error),
    };
    tokio::select! {
        _ = serving => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    ExitCode::SUCCESS
}

fn fail(error: &dyn std::error::Error) -> ExitCode {
    let mut message = format!("ftrelay: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{message}");
    ExitCode::FAILURE
}
