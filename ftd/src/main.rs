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
use ftd::config::{
    Config, NodeAddresses, DB_FILE, DEFAULT_PAIR_PORT, DEFAULT_STATE_DIR, SECRET_FILE, TOKEN_FILE,
};
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

/// The other node of the pair, when known at `init`.
#[derive(clap::Args)]
struct PeerArgs {
    /// The peer's node name.
    #[arg(long, requires_all = ["peer_api", "peer_alink"])]
    peer_name: Option<String>,
    /// The peer's API address, host:port.
    #[arg(long)]
    peer_api: Option<SocketAddr>,
    /// The peer's pair channel address [default: its API's address, port
    /// 7201].
    #[arg(long)]
    peer_pair: Option<SocketAddr>,
    /// Where the peer's standbys listen (comma-separated host:port).
    #[arg(long, value_delimiter = ',')]
    peer_alink: Vec<SocketAddr>,
}

impl PeerArgs {
    fn addresses(&self) -> Option<NodeAddresses> {
        let name = self.peer_name.clone()?;
        let api = self.peer_api?;
        Some(NodeAddresses {
            name,
            api,
            pair: self.peer_pair.unwrap_or_else(|| default_pair(api)),
            alink: self.peer_alink.clone(),
        })
    }
}

fn default_pair(api: SocketAddr) -> SocketAddr {
    SocketAddr::new(api.ip(), DEFAULT_PAIR_PORT)
}

/// This node, as `init` and `join` set it up.
#[derive(clap::Args)]
struct NodeArgs {
    /// This node's name (lower-case letters, digits, '-').
    #[arg(long)]
    node: String,
    /// Where the API listens (the management network), host:port.
    #[arg(long)]
    api: SocketAddr,
    /// Where the pair channel to the peer's daemon listens [default:
    /// the API's address, port 7201].
    #[arg(long)]
    pair: Option<SocketAddr>,
    /// Where this node's standbys listen: the A-link, then optionally the
    /// backup path (comma-separated host:port; each VM adds its slot).
    #[arg(long, value_delimiter = ',', required = true)]
    alink: Vec<SocketAddr>,
    /// The `ftprotect` binary.
    #[arg(long, default_value = "ftprotect")]
    ftprotect: PathBuf,
    /// Where control sockets go.
    #[arg(long, default_value = "/run/ftd")]
    run_dir: PathBuf,
    /// The pair's quorum witness (`ftwitness`), host:port
    /// (comma-separated: tried in order) [default: the first node's, on
    /// join; none on init].
    #[arg(long, value_delimiter = ',')]
    witness: Vec<String>,
    /// Run the A-link in plaintext (CRC-checked only) instead of sealed:
    /// only for a dedicated cable between the two nodes [default: the
    /// first node's, on join; sealed on init].
    #[arg(long)]
    alink_plaintext: bool,
    /// Where the web console's charting library is installed
    /// (`images/console-vendor.sh INSTALL_DIR`).
    #[arg(long, default_value = "/usr/share/ftvm/console")]
    console_dir: PathBuf,
}

impl NodeArgs {
    /// A configuration with every default for this node.
    fn config(&self) -> Config {
        let mut config = Config::new(NodeAddresses {
            name: self.node.clone(),
            api: self.api,
            pair: self.pair.unwrap_or_else(|| default_pair(self.api)),
            alink: self.alink.clone(),
        });
        config.ftprotect = self.ftprotect.clone();
        config.run_dir = self.run_dir.clone();
        config.witness = self.witness.clone();
        config.alink_plaintext = self.alink_plaintext;
        config.console_dir = self.console_dir.clone();
        config
    }
}

#[derive(clap::Args)]
struct InitArgs {
    #[command(flatten)]
    this: NodeArgs,
    /// The bridge the VMs' NICs join.
    #[arg(long, default_value = "br0")]
    bridge: String,
    /// Use this pair secret (a copy of the other node's) instead of
    /// making a new one.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Use this API token (the pair's: a copy of the other node's) instead
    /// of making a new one.
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    peer: PeerArgs,
}

#[derive(clap::Args)]
struct JoinArgs {
    /// The first node's API, http://HOST:PORT.
    #[arg(long)]
    from: String,
    /// The first node's API token (copied from its state directory).
    #[arg(long)]
    token_file: PathBuf,
    #[command(flatten)]
    this: NodeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Make this node's state directory (once, on the first node of a pair).
    Init(Box<InitArgs>),
    /// Set this node up as the second node of a pair: copies the pair's
    /// secret and settings from the first node's API and becomes its peer.
    Join(Box<JoinArgs>),
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
        // Colours on a terminal only: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init(args) => {
            let mut config = args.this.config();
            config.bridge = args.bridge.clone();
            config.peer = args.peer.addresses();
            init(
                &cli.state_dir,
                &config,
                args.secret_file.as_deref(),
                args.token_file.as_deref(),
            )
        }
        Command::Join(args) => join(&cli.state_dir, &args),
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

fn init(
    state_dir: &Path,
    config: &Config,
    secret: Option<&Path>,
    token: Option<&Path>,
) -> Result<(), String> {
    ftd::model::check_node_name(&config.node.name)?;
    if let Some(peer) = &config.peer {
        ftd::model::check_node_name(&peer.name)?;
        if peer.name == config.node.name {
            return Err(format!("the peer has this node's name {:?}", peer.name));
        }
    }
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
        if path.exists() {
            continue;
        }
        let given = if file == SECRET_FILE { secret } else { token };
        let value = match given {
            Some(from) => std::fs::read_to_string(from)
                .map_err(|e| format!("cannot read {}: {e}", from.display()))?
                .trim()
                .to_string(),
            None => secrets::random_hex().map_err(|e| e.to_string())?,
        };
        if value.len() < 16 {
            return Err(format!("the {file} must be at least 16 characters"));
        }
        secrets::write_new(&path, &value).map_err(|e| e.to_string())?;
    }
    Store::open(&state_dir.join(DB_FILE), &config.node.name).map_err(|e| e.to_string())?;
    config.save(state_dir).map_err(|e| e.to_string())?;
    if let Some(parent) = state_dir.parent() {
        secrets::sync_dir(parent).map_err(|e| format!("cannot sync {}: {e}", parent.display()))?;
    }
    println!(
        "node {} set up in {}; start the daemon (systemctl start ftd, or ftd serve); \
         the API token is in {}",
        config.node.name,
        state_dir.display(),
        state_dir.join(TOKEN_FILE).display()
    );
    Ok(())
}

fn join(state_dir: &Path, args: &JoinArgs) -> Result<(), String> {
    ftd::model::check_node_name(&args.this.node)?;
    if Config::path(state_dir).exists() {
        return Err(format!(
            "{} exists: this node is set up already",
            Config::path(state_dir).display()
        ));
    }
    let token = std::fs::read_to_string(&args.token_file)
        .map_err(|e| format!("cannot read {}: {e}", args.token_file.display()))?
        .trim()
        .to_string();
    let base = args.from.trim_end_matches('/');
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .into();
    let bearer = format!("Bearer {token}");
    let mut answer = agent
        .get(format!("{base}/api/pair"))
        .header("Authorization", &bearer)
        .call()
        .map_err(|e| format!("cannot reach the first node at {base}: {e}"))?;
    let status = answer.status().as_u16();
    let body = answer.body_mut().read_to_string().unwrap_or_default();
    if status != 200 {
        return Err(format!("the first node refused ({status}): {body}"));
    }
    let info: ftd::model::PairInfo = serde_json::from_str(&body)
        .map_err(|e| format!("the first node's answer is not a pair description: {e}"))?;
    if let Some(peer) = &info.peer {
        if peer.name != args.this.node {
            return Err(format!(
                "{} is paired with {} already",
                info.node.name, peer.name
            ));
        }
    }
    if info.node.name == args.this.node {
        return Err(format!("the first node is named {:?} too", args.this.node));
    }
    let mut config = args.this.config();
    let me = config.node.clone();
    config.peer = Some(info.node.clone());
    config.bridge = info.bridge.clone();
    config.heartbeat_timeout_ms = info.heartbeat_timeout_ms;
    if config.witness.is_empty() {
        config.witness = info.witness.clone();
    }
    config.alink_plaintext |= info.alink_plaintext;
    std::fs::create_dir_all(state_dir)
        .map_err(|e| format!("cannot make {}: {e}", state_dir.display()))?;
    for (file, value) in [(SECRET_FILE, &info.pair_secret), (TOKEN_FILE, &token)] {
        secrets::write_new(&state_dir.join(file), value).map_err(|e| e.to_string())?;
    }
    Store::open(&state_dir.join(DB_FILE), &me.name).map_err(|e| e.to_string())?;
    config.save(state_dir).map_err(|e| e.to_string())?;
    if let Some(parent) = state_dir.parent() {
        secrets::sync_dir(parent).map_err(|e| format!("cannot sync {}: {e}", parent.display()))?;
    }
    let mut answer = agent
        .post(format!("{base}/api/pair/peer"))
        .header("Authorization", &bearer)
        .send_json(&me)
        .map_err(|e| format!("cannot reach the first node at {base}: {e}"))?;
    let status = answer.status().as_u16();
    if status != 202 {
        let body = answer.body_mut().read_to_string().unwrap_or_default();
        return Err(format!(
            "the first node did not take this node as its peer ({status}): {body}; \
             this node's state in {} is written: remove it to try again",
            state_dir.display()
        ));
    }
    println!(
        "node {} joined {} (the first node's daemon restarts to apply it); \
         start this node's daemon (systemctl start ftd, or ftd serve)",
        me.name, info.node.name
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
        tokio::spawn(ftd::pair::run(manager.clone()));
        tokio::spawn(ftd::maintenance::run(manager.clone()));
        tokio::spawn(ftd::quorum::watch(manager.clone()));
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
