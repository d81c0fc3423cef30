//! `ftd`: the node manager daemon.
//!
//! - `ftd init --node NAME --api ADDR --alink ADDR[,ADDR]` makes this
//!   node's state directory: configuration, pair secret, API token,
//!   database.
//! - `ftd serve` runs the daemon (the systemd unit's command).
//! - `ftd openapi` prints the API's OpenAPI document.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use ftd::api::{self, ApiState};
use ftd::config::{Config, NodeAddresses, DB_FILE, DEFAULT_STATE_DIR, SECRET_FILE, TOKEN_FILE};
use ftd::manager::Manager;
use ftd::metrics::Metrics;
use ftd::model::Severity;
use ftd::secrets;
use ftd::store::Store;
use ftd::supervisor::{Runtime, Supervisor};

#[derive(Parser)]
#[command(name = "ftd", about = "The node manager of a fault-tolerant VM pair")]
struct Cli {
    /// The state directory (configuration, secrets, database, VM disks).
    #[arg(long, global = true, env = "FTD_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make this node's state directory (once, on the first node of a pair).
    Init {
        /// This node's name (lower-case letters, digits, '-').
        #[arg(long)]
        node: String,
        /// Where the API listens (the management network), host:port.
        #[arg(long)]
        api: SocketAddr,
        /// Where this node's standbys listen: the A-link, then optionally the
        /// backup path (comma-separated host:port; each VM adds its slot).
        #[arg(long, value_delimiter = ',', required = true)]
        alink: Vec<SocketAddr>,
        /// The bridge the VMs' NICs join.
        #[arg(long, default_value = "br0")]
        bridge: String,
        /// The `ftprotect` binary.
        #[arg(long, default_value = "ftprotect")]
        ftprotect: PathBuf,
        /// Where control sockets go.
        #[arg(long, default_value = "/run/ftd")]
        run_dir: PathBuf,
    },
    /// Run the daemon.
    Serve,
    /// Print the API's OpenAPI document.
    Openapi,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init {
            node,
            api,
            alink,
            bridge,
            ftprotect,
            run_dir,
        } => {
            let mut config = Config::new(NodeAddresses {
                name: node,
                api,
                alink,
            });
            config.bridge = bridge;
            config.ftprotect = ftprotect;
            config.run_dir = run_dir;
            init(&cli.state_dir, &config)
        }
        Command::Serve => serve(&cli.state_dir),
        Command::Openapi => {
            println!("{}", api::openapi_json());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ftd: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init(state_dir: &Path, config: &Config) -> Result<(), String> {
    ftd::model::check_node_name(&config.node.name)?;
    if Config::path(state_dir).exists() {
        return Err(format!(
            "{} exists: this node is set up already",
            Config::path(state_dir).display()
        ));
    }
    std::fs::create_dir_all(state_dir)
        .map_err(|e| format!("cannot make {}: {e}", state_dir.display()))?;
    for file in [SECRET_FILE, TOKEN_FILE] {
        let path = state_dir.join(file);
        if !path.exists() {
            secrets::write_new(&path, &secrets::random_hex().map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
    }
    Store::open(&state_dir.join(DB_FILE), &config.node.name).map_err(|e| e.to_string())?;
    config.save(state_dir).map_err(|e| e.to_string())?;
    println!(
        "node {} set up in {}; start the daemon (systemctl start ftd, or ftd serve); \
         the API token is in {}",
        config.node.name,
        state_dir.display(),
        state_dir.join(TOKEN_FILE).display()
    );
    Ok(())
}

fn serve(state_dir: &Path) -> Result<(), String> {
    let config = Config::load(state_dir).map_err(|e| e.to_string())?;
    let token = secrets::read(&state_dir.join(TOKEN_FILE)).map_err(|e| e.to_string())?;
    let store =
        Store::open(&state_dir.join(DB_FILE), &config.node.name).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.node.api)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.node.api))?;
        let manager = Manager::new(config.clone(), state_dir, store, Runtime::default());
        manager.record(
            Severity::Info,
            false,
            "node",
            None,
            &format!(
                "ftd {} started on {} (API on {})",
                env!("CARGO_PKG_VERSION"),
                config.node.name,
                config.node.api
            ),
        );
        tokio::spawn(Supervisor::new(manager.clone()).run());
        let state = ApiState::new(manager, Arc::new(Metrics::new()), token);
        tokio::select! {
            served = api::serve(listener, state) => {
                served.map_err(|e| format!("the API stopped: {e}"))
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted; VM roles keep running");
                Ok(())
            }
        }
    })
}
