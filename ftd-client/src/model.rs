//! What `ftctl` sends to and reads from the node manager's REST API: the
//! parts of `ftd`'s JSON types (see `ftd/openapi.json`) that the commands
//! use. `ftctl` speaks only the API, so these are its own copies; they
//! read tolerantly (unknown fields are ignored, enumerations are strings)
//! so that a newer daemon still answers an older `ftctl`.

use serde::{Deserialize, Serialize};

/// A disk of a new VM: an empty disk of `size_mib`, or a copy of `image`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// A NIC of a new VM; the daemon picks a MAC when `mac` is absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Tuning of level ft; unset fields take the node's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FtOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub synchronous: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs_in_flight: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_pulses: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_cache_mib: Option<u64>,
}

/// The body of `POST /api/vms`. Fields left out take the daemon's
/// defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmCreate {
    pub name: String,
    pub kernel: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicSpec>,
    /// `ft` or `unprotected`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preferred_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ft: Option<FtOptions>,
}

/// A stored VM definition, with the daemon's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmDefinition {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: String,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// MACs, one per NIC.
    #[serde(default)]
    pub nics: Vec<String>,
    pub preferred_node: String,
    pub slot: u64,
    /// Its tuning of level ft (absent from older daemons).
    #[serde(default)]
    pub ft: FtOptions,
}

/// A VM as `GET /api/vms/{name}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmView {
    pub name: String,
    pub level: String,
    pub state: String,
    pub desired: String,
    pub primary_node: Option<String>,
    pub standby_node: Option<String>,
    /// Moving to its standby's node by live migration (absent from older
    /// daemons).
    #[serde(default)]
    pub migrating: bool,
    pub generation: u64,
    pub epoch: Option<u64>,
    pub message: Option<String>,
    /// Its roles on the nodes (absent from older daemons).
    #[serde(default)]
    pub roles: Vec<RoleView>,
    /// What a user should know about its protection (absent from older
    /// daemons).
    #[serde(default)]
    pub warnings: Vec<String>,
    pub definition: VmDefinition,
}

/// A role of a VM on one node, as its FT engine reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RoleView {
    pub node: String,
    /// `primary` or `standby`.
    pub role: String,
    /// The engine's state.
    pub state: String,
    pub epoch: Option<u64>,
    /// The A-link address of the other side, while in session.
    pub peer: Option<String>,
    pub message: Option<String>,
}

/// A node as `GET /api/nodes/{name}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NodeView {
    pub name: String,
    /// The node answering is this one.
    pub local: bool,
    pub api: String,
    #[serde(default)]
    pub alink: Vec<String>,
    /// `up`, `unreachable` or `unknown`.
    pub state: String,
    pub last_seen_unix_ms: Option<u64>,
    #[serde(default)]
    pub primaries: Vec<String>,
    #[serde(default)]
    pub standbys: Vec<String>,
    /// `off`, `entering`, `on` or `leaving` (absent from an older daemon:
    /// `off`).
    #[serde(default = "in_service")]
    pub maintenance: String,
    #[serde(default)]
    pub maintenance_by: Option<String>,
    #[serde(default)]
    pub maintenance_since_unix_ms: Option<u64>,
    /// What an unfinished maintenance step waits for.
    #[serde(default)]
    pub maintenance_waiting: Vec<String>,
}

fn in_service() -> String {
    "off".to_string()
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Event {
    pub id: u64,
    pub unix_ms: u64,
    pub node: String,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    pub alert: bool,
    pub kind: String,
    pub vm: Option<String>,
    pub message: String,
}

/// A mutating API request as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AuditEntry {
    pub id: u64,
    pub unix_ms: u64,
    pub node: String,
    pub who: String,
    pub action: String,
    pub status: u16,
    pub result: String,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ErrorBody {
    /// A stable code: `bad_request`, `invalid_field`, `not_found`, ...
    pub error: String,
    pub message: String,
    /// The field at fault (with `invalid_field`).
    #[serde(default)]
    pub field: Option<String>,
}
