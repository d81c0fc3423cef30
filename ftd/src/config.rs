//! The node's configuration file (`<state dir>/ftd.toml`, written by
//! `ftd init` / `ftd join`): who this node is, where it serves the API and
//! the A-link, and who its peer is. Every field but the node's name has a
//! documented default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ftvm";
/// The default port of the REST API (management network).
pub const DEFAULT_API_PORT: u16 = 7200;
/// The default port of the pair channel between the two daemons.
pub const DEFAULT_PAIR_PORT: u16 = 7201;
/// The default A-link port of a standby (first path) and of the backup
/// path.
pub const DEFAULT_ALINK_PORT: u16 = 7800;
pub const DEFAULT_BACKUP_PORT: u16 = 7801;
/// The file name of the configuration inside the state directory.
pub const CONFIG_FILE: &str = "ftd.toml";
/// The bearer token of the API (mode 0600), inside the state directory.
pub const TOKEN_FILE: &str = "api-token";
/// The pair secret (mode 0600), inside the state directory.
pub const SECRET_FILE: &str = "pair-secret";
/// The database, inside the state directory.
pub const DB_FILE: &str = "ftd.sqlite";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the configuration {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("the configuration {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot write the configuration {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One node of the pair as the configuration names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeAddresses {
    /// The node's name (unique in the pair).
    pub name: String,
    /// Its API (management network), host:port.
    #[schema(value_type = String, example = "10.0.0.1:7200")]
    pub api: SocketAddr,
    /// Its end of the pair channel between the daemons (management
    /// network), host:port.
    #[schema(value_type = String, example = "10.0.0.1:7201")]
    pub pair: SocketAddr,
    /// Where its standbys listen: the A-link first, then the backup path.
    #[schema(value_type = Vec<String>, example = json!(["10.9.0.1:7800", "10.0.0.1:7801"]))]
    pub alink: Vec<SocketAddr>,
}

/// `ftd.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node.
    pub node: NodeAddresses,
    /// The other node of the pair (absent until `ftd join`/`ftd pair`).
    #[serde(default)]
    pub peer: Option<NodeAddresses>,
    /// The bridge the VMs' TAPs join (the business network).
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// The standby declares its primary dead after this much silence.
    #[serde(default = "default_heartbeat_timeout_ms")]
    pub heartbeat_timeout_ms: u64,
    /// The `ftprotect` binary that runs each VM's role.
    #[serde(default = "default_ftprotect")]
    pub ftprotect: PathBuf,
    /// Where the per-VM control sockets and logs go.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Where each VM's guest RAM lives while this node runs it or holds
    /// its replica (`<ram_dir>/<vm>.ram`; a tmpfs, such as /dev/shm). It
    /// outlives the VM's process, so that after a switchover, or a copy
    /// superseded by the witness, this node's next standby receives only
    /// the pages that differ instead of all of memory. Empty: anonymous
    /// memory, and a full copy of memory at every re-protection. The
    /// tmpfs must hold every VM's memory (it is allocated up front).
    #[serde(default = "default_ram_dir")]
    pub ram_dir: PathBuf,
    /// A node that starts without hearing its peer starts no VM until it
    /// does (the peer may be running them: two active copies must never
    /// be). With this set, it starts them alone after this many seconds
    /// of not hearing the peer. Unset by default. Not needed with a
    /// witness (the witness decides which copy may run).
    #[serde(default)]
    pub solo_start_after_s: Option<u64>,
    /// The quorum witness (`ftwitness`, on a third machine), host:port;
    /// several addresses are tried in order. With one, a standby takes
    /// over only with its grant and a primary that lost its standby runs
    /// on only with its confirmation. Without one, a cut of every path
    /// between two live nodes leaves both running the VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub witness: Vec<String>,
    /// The A-link in plaintext, checked by CRCs only, instead of sealed
    /// (authenticated and encrypted, the default). Only for a dedicated
    /// cable between the two nodes; both nodes must say the same (a
    /// mismatch is refused at the A-link handshake, and the engines'
    /// status says so).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub alink_plaintext: bool,
    /// The zstd level this node's primaries compress their initial copy
    /// with (memory and disks, as they protect a VM again): 0 sends it
    /// uncompressed, for an A-link faster than one core compresses (about
    /// 480 MB/s at level 3: a 10 GbE link).
    #[serde(default = "default_copy_compression")]
    pub copy_compression: i32,
    /// Where the web console's third-party assets are (its charting
    /// library, installed by `images/console-vendor.sh INSTALL_DIR`); the console's
    /// own pages are built into `ftd`.
    #[serde(default = "default_console_dir")]
    pub console_dir: PathBuf,
}

fn default_bridge() -> String {
    "br0".to_string()
}
fn default_heartbeat_timeout_ms() -> u64 {
    ft_link::DEFAULT_HEARTBEAT_TIMEOUT.as_millis() as u64
}
fn default_ftprotect() -> PathBuf {
    PathBuf::from("ftprotect")
}
fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/ftd")
}
fn default_ram_dir() -> PathBuf {
    PathBuf::from("/dev/shm/ftd")
}
fn default_copy_compression() -> i32 {
    replicator::protocol::compressed::DEFAULT_LEVEL
}
fn default_console_dir() -> PathBuf {
    PathBuf::from("/usr/share/ftvm/console")
}

impl Config {
    /// A configuration with every default for `node`.
    pub fn new(node: NodeAddresses) -> Config {
        Config {
            node,
            peer: None,
            bridge: default_bridge(),
            heartbeat_timeout_ms: default_heartbeat_timeout_ms(),
            ftprotect: default_ftprotect(),
            run_dir: default_run_dir(),
            ram_dir: default_ram_dir(),
            solo_start_after_s: None,
            witness: Vec::new(),
            alink_plaintext: false,
            copy_compression: default_copy_compression(),
            console_dir: default_console_dir(),
        }
    }

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(CONFIG_FILE)
    }

    pub fn load(state_dir: &Path) -> Result<Config, ConfigError> {
        let path = Config::path(state_dir);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.clone(),
            source: Box::new(source),
        })?;
        config
            .check()
            .map_err(|reason| ConfigError::Invalid { path, reason })?;
        Ok(config)
    }

    /// Writes the configuration durably and atomically: a temporary file,
    /// synced, renamed over the old one, the folder synced (a power cut
    /// leaves the old file or the new one, never an empty one).
    pub fn save(&self, state_dir: &Path) -> Result<(), ConfigError> {
        let path = Config::path(state_dir);
        let text = toml::to_string_pretty(self).map_err(|e| ConfigError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        crate::secrets::write_durably(&path, text.as_bytes())
            .map_err(|source| ConfigError::Write { path, source })
    }

    fn check(&self) -> Result<(), String> {
        crate::model::check_node_name(&self.node.name)?;
        if let Some(peer) = &self.peer {
            crate::model::check_node_name(&peer.name)?;
            if peer.name == self.node.name {
                return Err(format!("the peer has this node's name {:?}", peer.name));
            }
        }
        if !(0..=19).contains(&self.copy_compression) {
            return Err(format!(
                "copy_compression {} is not a zstd level from 0 (off) to 19",
                self.copy_compression
            ));
        }
        if self.heartbeat_timeout_ms < 50 {
            return Err(format!(
                "heartbeat_timeout_ms {} is below 50",
                self.heartbeat_timeout_ms
            ));
        }
        Ok(())
    }

    /// The names of the pair's nodes, this one first.
    pub fn node_names(&self) -> Vec<String> {
        let mut names = vec![self.node.name.clone()];
        names.extend(self.peer.iter().map(|p| p.name.clone()));
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `ftd.toml` with only its `[node]` table.
    const NODE_ONLY: &str = r#"
            [node]
            name = "node-a"
            api = "10.0.0.1:7200"
            pair = "10.0.0.1:7201"
            alink = ["10.9.0.1:7800"]
"#;

    #[test]
    fn defaults_fill_what_the_file_leaves_out() {
        let config: Config = toml::from_str(NODE_ONLY).unwrap();
        assert_eq!(config.bridge, "br0");
        assert_eq!(config.heartbeat_timeout_ms, 200);
        assert_eq!(config.ram_dir, PathBuf::from("/dev/shm/ftd"));
        assert_eq!(config.copy_compression, 3);
        assert!(config.peer.is_none());
        assert!(config.check().is_ok());
    }

    #[test]
    fn the_documented_example_is_a_valid_configuration() {
        let text = include_str!("../dist/ftd.toml.example");
        let config: Config = toml::from_str(text).unwrap();
        config.check().unwrap();
        let peer = config.peer.clone().unwrap();
        assert_eq!(peer.name, "node-b");
        // "Every key but [node] has the default shown": the example with
        // its own node and peer is what a file of them alone gives.
        let mut defaults = Config::new(config.node.clone());
        defaults.peer = Some(peer);
        assert_eq!(
            config, defaults,
            "ftd.toml.example shows a default that is not"
        );
    }

    #[test]
    fn a_copy_compression_outside_zstds_levels_is_refused() {
        let with = |level: &str| -> Config {
            toml::from_str(&format!("copy_compression = {level}\n{NODE_ONLY}")).unwrap()
        };
        let config = with("23");
        assert!(config.check().unwrap_err().contains("copy_compression 23"));
        let off = with("0");
        assert!(off.check().is_ok());
    }

    #[test]
    fn a_peer_with_this_nodes_name_is_refused() {
        let node = NodeAddresses {
            name: "node-a".into(),
            api: "10.0.0.1:7200".parse().unwrap(),
            pair: "10.0.0.1:7201".parse().unwrap(),
            alink: vec![],
        };
        let mut config = Config::new(node.clone());
        config.peer = Some(node);
        assert!(config.check().unwrap_err().contains("peer"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = r#"
            bridgee = "br1"
            [node]
            name = "node-a"
            api = "10.0.0.1:7200"
            pair = "10.0.0.1:7201"
            alink = []
        "#;
        let err = toml::from_str::<Config>(text).unwrap_err();
        assert!(err.to_string().contains("bridgee"), "{err}");
    }
}
