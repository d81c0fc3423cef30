//! What the API speaks and the store keeps: VM definitions (with their
//! checks), VM and node views, events. The JSON field names here are the
//! API's; the OpenAPI document is generated from these types.

use std::path::Path;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Most vCPUs of a protected VM (everRun's FT limit).
pub const MAX_VCPUS: u8 = 8;
pub const MIN_MEMORY_MIB: u64 = 32;
pub const MAX_MEMORY_MIB: u64 = 256 << 10;
pub const MAX_DISKS: usize = 8;
pub const MAX_DISK_MIB: u64 = 16 << 20;
pub const MAX_NICS: usize = 4;
pub const MAX_CMDLINE: usize = 2048;

/// How a VM is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Fault tolerant: checkpointed to the peer, resumed there without a
    /// reboot when this node is lost.
    #[default]
    Ft,
    /// High availability: the disks mirrored synchronously to the peer
    /// (a write completes once both nodes have it); rebooted there from
    /// the mirror when this node is lost.
    Ha,
    /// Runs on one node only.
    Unprotected,
}

impl Level {
    pub const fn as_str(self) -> &'static str {
        match self {
            Level::Ft => "ft",
            Level::Ha => "ha",
            Level::Unprotected => "unprotected",
        }
    }

    /// The level its engine runs at (none unprotected: no standby).
    pub const fn engine_level(self) -> Option<replicator::level::Level> {
        match self {
            Level::Ft => Some(replicator::level::Level::Ft),
            Level::Ha => Some(replicator::level::Level::Ha),
            Level::Unprotected => None,
        }
    }

    /// Whether the VM has a standby on the peer (levels ft and ha).
    pub const fn has_standby(self) -> bool {
        self.engine_level().is_some()
    }

    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "ft" => Some(Level::Ft),
            "ha" => Some(Level::Ha),
            "unprotected" => Some(Level::Unprotected),
            _ => None,
        }
    }
}

/// A disk of a VM: a file per node under the state directory, made at the
/// first start as a copy of `image` or as an empty (sparse) file of
/// `size_mib`. The standby's copy is filled by the initial synchronisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Size of an empty disk (MiB); with `image`, the image's size is used.
    #[serde(default)]
    pub size_mib: Option<u64>,
    /// A file to copy the disk from (absolute path on the node that first
    /// starts the VM).
    #[serde(default)]
    pub image: Option<String>,
}

/// A NIC of a VM, on the node's bridge (the business network).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// The guest's MAC (unicast, `52:54:00:..`); chosen at random when
    /// absent, then kept.
    #[serde(default)]
    pub mac: Option<String>,
}

/// Tuning of level ft (each unset field takes the node's default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FtOptions {
    /// The standby takes over after this much silence of its primary
    /// (ms; default the node's `heartbeat_timeout_ms`, 200).
    #[serde(default)]
    pub heartbeat_timeout_ms: Option<u64>,
    /// Keep the guest paused until each checkpoint is acknowledged
    /// (slower; for comparison with the default speculative mode).
    #[serde(default)]
    pub synchronous: bool,
    /// Shortest and longest checkpoint interval (ms; defaults 2 and 20).
    #[serde(default)]
    pub min_interval_ms: Option<u64>,
    #[serde(default)]
    pub max_interval_ms: Option<u64>,
    /// Checkpoints sent and not yet acknowledged, at most (1-64; default
    /// 4): the next checkpoint may be taken while this many await the
    /// standby. 1 makes each wait for the last one's acknowledgement.
    // Left out when unset, as `ack_deadline_ms` below (and for the same
    // reason: a daemon older than the field still reads the VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64)]
    pub epochs_in_flight: Option<u32>,
    /// Judge the peer's silence on the connection alone, without pulses
    /// (for comparison: pulses keep a busy node from being declared
    /// silent).
    // Left out when false, as `ack_deadline_ms` below.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_pulses: bool,
    /// A checkpoint (at level HA, a batch of disk writes) the standby has
    /// not acknowledged this long after it was sent drops the standby:
    /// the VM goes on unprotected instead of waiting for a standby whose
    /// disk or host hangs, and is protected again once it answers (ms,
    /// 100-600000; default 5000).
    // Left out when unset: a daemon of an older version, which refuses
    // fields it does not know, still reads the VM (over the pair channel,
    // or from the store after a downgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 100, maximum = 600000)]
    pub ack_deadline_ms: Option<u64>,
    /// The primary's delta cache (MiB, 0-65536; default 64; 0 turns
    /// deltas off): each page as it last went to the standby, so that a
    /// page changed in a few places goes as those changes, and the VM's
    /// state as what changed since the checkpoint before.
    // Left out when unset, as `ack_deadline_ms` above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 65536)]
    pub delta_cache_mib: Option<u64>,
}

impl FtOptions {
    fn check(&self) -> Result<(), FieldError> {
        if let Some(t) = self.heartbeat_timeout_ms {
            if !(50..=600_000).contains(&t) {
                return Err(FieldError::new(
                    "ft.heartbeat_timeout_ms",
                    format!("{t} is not in 50..=600000"),
                ));
            }
        }
        let min = self.min_interval_ms.unwrap_or(2);
        let max = self.max_interval_ms.unwrap_or(20);
        if min == 0 || min > 10_000 {
            return Err(FieldError::new(
                "ft.min_interval_ms",
                format!("{min} is not in 1..=10000"),
            ));
        }
        if max < min || max > 10_000 {
            return Err(FieldError::new(
                "ft.max_interval_ms",
                format!("{max} is not in {min}..=10000"),
            ));
        }
        if let Some(n) = self.epochs_in_flight {
            if !(1..=64).contains(&n) {
                return Err(FieldError::new(
                    "ft.epochs_in_flight",
                    format!("{n} is not in 1..=64"),
                ));
            }
        }
        if let Some(ms) = self.ack_deadline_ms {
            if !(100..=600_000).contains(&ms) {
                return Err(FieldError::new(
                    "ft.ack_deadline_ms",
                    format!("{ms} is not in 100..=600000"),
                ));
            }
        }
        if let Some(mib) = self.delta_cache_mib {
            if mib > 65_536 {
                return Err(FieldError::new(
                    "ft.delta_cache_mib",
                    format!("{mib} is not in 0..=65536"),
                ));
            }
        }
        Ok(())
    }
}

/// The body of `POST /api/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    /// 1-63 characters: lower-case letters, digits, '-'; a letter or digit
    /// first.
    pub name: String,
    #[serde(default = "default_vcpus")]
    #[schema(default = 1, minimum = 1, maximum = 8)]
    pub vcpus: u8,
    #[serde(default = "default_memory_mib")]
    #[schema(default = 128)]
    pub memory_mib: u64,
    /// The guest kernel (absolute path on both nodes): PVH vmlinux or
    /// bzImage.
    pub kernel: String,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    #[serde(default)]
    pub level: Level,
    /// The node the VM starts on (default: the node that created it).
    #[serde(default)]
    pub preferred_node: Option<String>,
    #[serde(default)]
    pub ft: FtOptions,
}

fn default_vcpus() -> u8 {
    1
}
fn default_memory_mib() -> u64 {
    128
}
fn default_cmdline() -> String {
    "console=ttyS0 reboot=k panic=1 quiet".to_string()
}

/// A stored VM definition: a checked [`VmCreate`] with every default and
/// MAC filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmDefinition {
    pub name: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: String,
    pub disks: Vec<DiskSpec>,
    /// MACs, one per NIC.
    pub nics: Vec<String>,
    pub level: Level,
    pub preferred_node: String,
    #[serde(default)]
    pub ft: FtOptions,
    /// The VM's A-link slot: its standby listens on the node's A-link
    /// ports plus this, its TAPs are named after it.
    pub slot: u16,
}

/// A field the API refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A node's name: 1-63 characters of lower-case letters, digits and '-',
/// a letter or digit first.
pub fn check_node_name(name: &str) -> Result<(), String> {
    check_name(name).map_err(|r| format!("node name {name:?}: {r}"))
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1-63 characters".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("may hold only lower-case letters, digits and '-'".into());
    }
    if name.starts_with('-') {
        return Err("must start with a letter or a digit".into());
    }
    Ok(())
}

fn check_file(field: &str, path: &str) -> Result<(), FieldError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(FieldError::new(
            field,
            format!("{path:?} is not an absolute path"),
        ));
    }
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(FieldError::new(field, format!("{path} is not a file"))),
        Err(e) => Err(FieldError::new(field, format!("{path}: {e}"))),
    }
}

/// Parses a MAC "aa:bb:cc:dd:ee:ff" (lower or upper case) into its
/// canonical lower-case form; refuses multicast and all-zero addresses.
pub fn canonical_mac(mac: &str) -> Result<String, String> {
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return Err(format!(
            "{mac:?} is not a MAC (six hex bytes separated by ':')"
        ));
    }
    let mut bytes = [0u8; 6];
    for (b, p) in bytes.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(format!(
                "{mac:?} is not a MAC (six hex bytes separated by ':')"
            ));
        }
        *b = u8::from_str_radix(p, 16)
            .map_err(|_| format!("{mac:?} is not a MAC (six hex bytes separated by ':')"))?;
    }
    if bytes[0] & 1 == 1 {
        return Err(format!("{mac} is a multicast address"));
    }
    if bytes == [0; 6] {
        return Err(format!("{mac} is all zero"));
    }
    Ok(bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// A random locally administered MAC in QEMU's 52:54:00 range.
pub fn random_mac() -> String {
    let mut tail = [0u8; 3];
    // A MAC needs no cryptographic quality; fall back to the clock.
    if getrandom::fill(&mut tail).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        tail.copy_from_slice(&nanos.to_le_bytes()[..3]);
    }
    format!("52:54:00:{:02x}:{:02x}:{:02x}", tail[0], tail[1], tail[2])
}

impl VmCreate {
    /// Checks every field (files on this node included) and fills in the
    /// defaults; `nodes` are the pair's node names, `this_node` the
    /// default preferred node.
    pub fn into_definition(
        self,
        nodes: &[String],
        this_node: &str,
        slot: u16,
    ) -> Result<VmDefinition, FieldError> {
        check_name(&self.name).map_err(|r| FieldError::new("name", r))?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(FieldError::new(
                "vcpus",
                format!("{} is not in 1..={MAX_VCPUS}", self.vcpus),
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(FieldError::new(
                "memory_mib",
                format!(
                    "{} is not in {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}",
                    self.memory_mib
                ),
            ));
        }
        check_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd)?;
        }
        if self.cmdline.len() > MAX_CMDLINE || self.cmdline.contains('\0') {
            return Err(FieldError::new(
                "cmdline",
                format!("longer than {MAX_CMDLINE} bytes or holds a NUL"),
            ));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(FieldError::new(
                "disks",
                format!("{} disks; at most {MAX_DISKS}", self.disks.len()),
            ));
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let field = format!("disks[{i}]");
            match (&disk.image, disk.size_mib) {
                (None, None) => {
                    return Err(FieldError::new(field, "give size_mib or image"));
                }
                (Some(image), _) => check_file(&format!("{field}.image"), image)?,
                (None, Some(size)) if size == 0 || size > MAX_DISK_MIB => {
                    return Err(FieldError::new(
                        format!("{field}.size_mib"),
                        format!("{size} is not in 1..={MAX_DISK_MIB}"),
                    ));
                }
                (None, Some(_)) => {}
            }
        }
        if self.nics.len() > MAX_NICS {
            return Err(FieldError::new(
                "nics",
                format!("{} NICs; at most {MAX_NICS}", self.nics.len()),
            ));
        }
        let mut macs = Vec::with_capacity(self.nics.len());
        for (i, nic) in self.nics.iter().enumerate() {
            let mac = match &nic.mac {
                Some(mac) => {
                    canonical_mac(mac).map_err(|r| FieldError::new(format!("nics[{i}].mac"), r))?
                }
                None => random_mac(),
            };
            if macs.contains(&mac) {
                return Err(FieldError::new(
                    format!("nics[{i}].mac"),
                    format!("{mac} is given twice"),
                ));
            }
            macs.push(mac);
        }
        self.ft.check()?;
        let preferred_node = match self.preferred_node {
            Some(node) if nodes.contains(&node) => node,
            Some(node) => {
                return Err(FieldError::new(
                    "preferred_node",
                    format!("{node:?} is not a node of this pair ({})", nodes.join(", ")),
                ));
            }
            None => this_node.to_string(),
        };
        Ok(VmDefinition {
            name: self.name,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            disks: self.disks,
            nics: macs,
            level: self.level,
            preferred_node,
            ft: self.ft,
            slot,
        })
    }
}

/// What the user asked a VM to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
}

impl Desired {
    pub const fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<Desired> {
        match s {
            "running" => Some(Desired::Running),
            "stopped" => Some(Desired::Stopped),
            _ => None,
        }
    }
}

/// Where a VM stands, as a user sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Not running anywhere.
    Stopped,
    /// Booting on its primary node.
    Starting,
    /// Running; the standby is being synchronised.
    Syncing,
    /// Running at level FT with a standby that holds every checkpoint.
    Protected,
    /// Running without a standby (level unprotected, or the peer is away).
    Unprotected,
    /// The standby is resuming the VM after its primary was lost (or
    /// asking the witness whether it may).
    FailingOver,
    /// A planned switchover moves its primary role to the peer.
    SwitchingOver,
    /// Paused with its output held: it lost its standby and cannot reach
    /// the witness (it resumes when either answers).
    Fenced,
    /// Being shut down.
    Stopping,
    /// It failed to run; see the events.
    Failed,
    /// It runs on the peer, which is not reachable now.
    Unknown,
}

/// A role of a VM on one node, as its FT engine reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RoleView {
    pub node: String,
    /// `primary` or `standby`.
    pub role: String,
    /// The engine's state: `starting`, `unprotected`, `syncing`,
    /// `protected`, `waiting`, `standing-by`, `claiming`, `promoting`,
    /// `fenced`, `superseded`, `switched-over`, `stopped`, `failed`.
    pub state: String,
    /// The last checkpoint (epoch) committed.
    pub epoch: Option<u64>,
    /// The A-link address of the other side, while in session.
    pub peer: Option<String>,
    pub message: Option<String>,
}

/// A VM as `GET /api/vms/{name}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    pub name: String,
    pub level: Level,
    pub state: VmState,
    pub desired: Desired,
    /// The node running the VM (None when stopped).
    pub primary_node: Option<String>,
    /// The node keeping its replica (None when unprotected).
    pub standby_node: Option<String>,
    /// The VM is moving to its standby's node by live migration (an HA
    /// VM's switchover: its memory is being copied).
    #[serde(default)]
    pub migrating: bool,
    /// Bumped at every change of the active copy (start, failover).
    pub generation: u64,
    /// The last committed checkpoint (epoch), when protected.
    pub epoch: Option<u64>,
    /// What the last change of state said (a failure's reason).
    pub message: Option<String>,
    /// Its roles on the nodes (this node's, and the peer's while the pair
    /// channel is up).
    pub roles: Vec<RoleView>,
    /// What a user should know about its protection (e.g. no quorum
    /// witness: the split-brain policy that holds instead).
    #[serde(default)]
    pub warnings: Vec<String>,
    pub definition: VmDefinition,
}

/// A node as `GET /api/nodes/{name}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    pub name: String,
    /// The node answering is this one.
    pub local: bool,
    /// The node's API address.
    pub api: String,
    /// Its A-link addresses (first path, backup path).
    pub alink: Vec<String>,
    /// Up (this node, or the peer answered lately), unreachable or
    /// unknown (never heard of yet).
    pub state: NodeState,
    /// When its daemon was last heard (ms since the Unix epoch).
    pub last_seen_unix_ms: Option<u64>,
    /// VMs whose primary runs here.
    pub primaries: Vec<String>,
    /// VMs whose standby runs here.
    pub standbys: Vec<String>,
    /// Whether the node is in maintenance (`off`, `entering`, `on`,
    /// `leaving`).
    #[serde(default)]
    pub maintenance: Maintenance,
    /// Who asked for the node's maintenance to begin or end, and when
    /// (ms since the Unix epoch).
    #[serde(default)]
    pub maintenance_by: Option<String>,
    #[serde(default)]
    pub maintenance_since_unix_ms: Option<u64>,
    /// What an unfinished maintenance step waits for (the VMs still to
    /// move or to be protected again).
    #[serde(default)]
    pub maintenance_waiting: Vec<String>,
}

/// A node's maintenance: its VMs moved to the peer while a person works on
/// it (pulls it, upgrades it), and back when it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Maintenance {
    /// In service.
    #[default]
    Off,
    /// Its VMs are switching over to the peer; it starts no standby.
    Entering,
    /// No VM runs on it (the VMs run unprotected on the peer): pulling or
    /// rebooting it affects no VM.
    On,
    /// Its standbys are synchronising and the VMs that prefer it move
    /// back to it.
    Leaving,
}

impl Maintenance {
    pub const fn as_str(self) -> &'static str {
        match self {
            Maintenance::Off => "off",
            Maintenance::Entering => "entering",
            Maintenance::On => "on",
            Maintenance::Leaving => "leaving",
        }
    }

    pub fn parse(s: &str) -> Option<Maintenance> {
        match s {
            "off" => Some(Maintenance::Off),
            "entering" => Some(Maintenance::Entering),
            "on" => Some(Maintenance::On),
            "leaving" => Some(Maintenance::Leaving),
            _ => None,
        }
    }

    /// The node runs no role: its VMs have left it (or are leaving).
    pub const fn keeps_no_vm(self) -> bool {
        matches!(self, Maintenance::Entering | Maintenance::On)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Up,
    Unreachable,
    Unknown,
}

/// How much an event matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub const fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// One entry of the event log: a change of state, an alert, or (kind
/// `audit`) a mutating API request. Each node's log holds both nodes'
/// events (the peer's come over the pair channel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Its number in the log of the node that answers, in the order that
    /// node learned of it (`after=` pages by it).
    pub id: u64,
    /// When the node that recorded it did, by that node's clock.
    pub unix_ms: u64,
    /// The node that recorded it.
    pub node: String,
    pub severity: Severity,
    /// An alert wants a person's attention.
    pub alert: bool,
    /// `vm`, `node`, `pair`, `maintenance` or `audit`.
    pub kind: String,
    pub vm: Option<String>,
    pub message: String,
}

/// A mutating API request (or `GET /api/pair`, or what a daemon did on
/// someone's behalf) as the audit log keeps it. Each node's audit
/// log holds both nodes' entries (the peer's come over the pair channel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// Its number in the log of the node that answers.
    pub id: u64,
    pub unix_ms: u64,
    /// The node that logged it: the one whose API took the request, or
    /// whose daemon acted on someone's behalf (`who`: `ftd@NODE for ...`).
    pub node: String,
    /// Who asked: the token's holder and the client's address.
    pub who: String,
    /// Method and path, with the query (`POST /api/vms/x/protect?level=ha`).
    pub action: String,
    /// The HTTP status answered.
    pub status: u16,
    /// What came of it (the error's message when refused).
    pub result: String,
}

/// What `GET /api/pair` tells a node that joins the pair (`ftd join`):
/// this node's addresses and the pair's secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PairInfo {
    pub node: crate::config::NodeAddresses,
    pub peer: Option<crate::config::NodeAddresses>,
    /// The pair secret (the A-link and the pair channel prove it).
    pub pair_secret: String,
    pub bridge: String,
    pub heartbeat_timeout_ms: u64,
    /// The pair's quorum witness (empty: none).
    #[serde(default)]
    pub witness: Vec<String>,
    /// The pair runs its A-link in plaintext (a dedicated cable) instead
    /// of sealed.
    #[serde(default)]
    pub alink_plaintext: bool,
}

/// The body of `POST /api/session`: the console's login, with the API
/// token or with a user's name and password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionLogin {
    /// The node's API token (its api-token file).
    #[serde(default)]
    pub token: Option<String>,
    /// A console user (`PUT /api/users/{name}`) ...
    #[serde(default)]
    pub user: Option<String>,
    /// ... and their password.
    #[serde(default)]
    pub password: Option<String>,
}

/// A console user (the password's hash is never shown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub name: String,
    /// When the user was made or last given a password.
    pub updated_unix_ms: u64,
}

/// The body of `PUT /api/users/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPassword {
    /// 10 to 1024 characters.
    pub password: String,
}

/// A console session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    /// The request carried a live session (or the API token).
    pub logged_in: bool,
    pub user: String,
    /// The node that serves the console.
    pub node: String,
    /// Seconds until the session ends if unused (0: the request carried
    /// a token, not a session).
    pub expires_in_s: u64,
    /// `administrator` (the API token: everything) or `operator` (a
    /// console user: the VMs and the nodes, but not the pair secret nor
    /// the console's users).
    #[serde(default)]
    pub role: String,
}

/// One sample of a VM's checkpointing, from the engine running its
/// primary (`GET /api/vms/{name}/stats`). Counters are totals since that
/// engine started: rates come from two samples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmSample {
    pub unix_ms: u64,
    pub vm: String,
    /// The node running the primary (none: the VM runs nowhere known).
    pub node: Option<String>,
    /// The primary engine's state (`protected`, `syncing`, ...).
    pub state: Option<String>,
    pub epoch: Option<u64>,
    pub generation: Option<u64>,
    pub checkpoints: u64,
    pub stop_us_p50: u64,
    pub stop_us_p99: u64,
    pub dirty_pages_total: u64,
    pub dirty_pages_last: u64,
    /// Of `dirty_pages_total`, the pages sent as the words that changed
    /// (page deltas).
    #[serde(default)]
    pub delta_pages_total: u64,
    /// The bytes of those page deltas (a page sent whole is 4096).
    #[serde(default)]
    pub delta_bytes_total: u64,
    /// Of `delta_pages_total`, pages sent as a delta from a page of zeros
    /// (mostly-zero pages the primary had not sent before this session).
    #[serde(default)]
    pub zero_delta_pages_total: u64,
    pub alink_bytes_sent: u64,
    pub ack_us_p50: u64,
    pub ack_us_p99: u64,
    pub output_frames_held_now: u64,
    pub output_frames_released: u64,
    /// The standby's synchronisation, while it runs.
    pub sync: Option<SyncView>,
}

/// A synchronisation's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SyncView {
    pub phase: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes gone through per second so far.
    #[serde(default)]
    pub rate_bytes_per_s: u64,
    /// Seconds left at that rate (absent before a rate is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// A stable code: `bad_request`, `invalid_field`, `not_found`,
    /// `conflict`, `unauthorized`, `payload_too_large`, ...
    pub error: String,
    /// What is wrong, for a person.
    pub message: String,
    /// The field at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(name: &str) -> VmCreate {
        VmCreate {
            name: name.into(),
            vcpus: 1,
            memory_mib: 128,
            kernel: "/proc/self/exe".into(),
            initrd: None,
            cmdline: default_cmdline(),
            disks: vec![],
            nics: vec![NicSpec { mac: None }],
            level: Level::Ft,
            preferred_node: None,
            ft: FtOptions::default(),
        }
    }

    fn nodes() -> Vec<String> {
        vec!["node-a".into(), "node-b".into()]
    }

    #[test]
    fn a_good_definition_gets_its_defaults() {
        let kernel = std::env::current_exe().unwrap();
        let mut c = create("ledger-vm");
        c.kernel = kernel.to_string_lossy().into_owned();
        let d = c.into_definition(&nodes(), "node-a", 0).unwrap();
        assert_eq!(d.preferred_node, "node-a");
        assert_eq!(d.nics.len(), 1);
        assert!(d.nics[0].starts_with("52:54:00:"));
    }

    /// A VM that leaves the newer options unset is written as a daemon of
    /// the version before them wrote it (which refuses unknown fields, over
    /// the pair channel and in the store); one that sets them round-trips.
    #[test]
    fn unset_newer_options_are_left_out() {
        let unset = serde_json::to_value(FtOptions::default()).unwrap();
        for field in [
            "ack_deadline_ms",
            "epochs_in_flight",
            "no_pulses",
            "delta_cache_mib",
        ] {
            assert!(unset.get(field).is_none(), "{field} in {unset}");
        }
        let set = FtOptions {
            ack_deadline_ms: Some(3000),
            epochs_in_flight: Some(2),
            no_pulses: true,
            delta_cache_mib: Some(0),
            ..Default::default()
        };
        let text = serde_json::to_string(&set).unwrap();
        assert_eq!(serde_json::from_str::<FtOptions>(&text).unwrap(), set);
    }

    #[test]
    fn each_bad_field_is_named() {
        let kernel = std::env::current_exe()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        type Change = Box<dyn Fn(&mut VmCreate)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|c| c.name = "Bad_Name".into()), "name"),
            (Box::new(|c| c.name = "-x".into()), "name"),
            (Box::new(|c| c.vcpus = 0), "vcpus"),
            (Box::new(|c| c.vcpus = 9), "vcpus"),
            (Box::new(|c| c.memory_mib = 1), "memory_mib"),
            (Box::new(|c| c.kernel = "/no/such/kernel".into()), "kernel"),
            (Box::new(|c| c.kernel = "relative".into()), "kernel"),
            (Box::new(|c| c.initrd = Some("/no/such".into())), "initrd"),
            (
                Box::new(|c| {
                    c.disks = vec![DiskSpec {
                        size_mib: None,
                        image: None,
                    }]
                }),
                "disks[0]",
            ),
            (
                Box::new(|c| {
                    c.disks = vec![DiskSpec {
                        size_mib: Some(0),
                        image: None,
                    }]
                }),
                "disks[0].size_mib",
            ),
            (
                Box::new(|c| {
                    c.nics = vec![NicSpec {
                        mac: Some("01:00:00:00:00:01".into()),
                    }]
                }),
                "nics[0].mac",
            ),
            (
                Box::new(|c| {
                    c.nics = vec![NicSpec {
                        mac: Some("zz".into()),
                    }]
                }),
                "nics[0].mac",
            ),
            (
                Box::new(|c| c.preferred_node = Some("node-c".into())),
                "preferred_node",
            ),
            (
                Box::new(|c| c.ft.heartbeat_timeout_ms = Some(10)),
                "ft.heartbeat_timeout_ms",
            ),
            (
                Box::new(|c| c.ft.max_interval_ms = Some(1)),
                "ft.max_interval_ms",
            ),
            (
                Box::new(|c| c.ft.epochs_in_flight = Some(0)),
                "ft.epochs_in_flight",
            ),
            (
                Box::new(|c| c.ft.epochs_in_flight = Some(65)),
                "ft.epochs_in_flight",
            ),
            (
                Box::new(|c| c.ft.ack_deadline_ms = Some(99)),
                "ft.ack_deadline_ms",
            ),
            (
                Box::new(|c| c.ft.ack_deadline_ms = Some(600_001)),
                "ft.ack_deadline_ms",
            ),
            (
                Box::new(|c| c.ft.delta_cache_mib = Some(65_537)),
                "ft.delta_cache_mib",
            ),
        ];
        for (change, field) in cases {
            let mut c = create("vm");
            c.kernel = kernel.clone();
            change(&mut c);
            let err = c.into_definition(&nodes(), "node-a", 0).unwrap_err();
            assert_eq!(err.field, field, "{err:?}");
        }
    }

    #[test]
    fn macs_are_made_canonical() {
        assert_eq!(
            canonical_mac("52:54:00:AB:cd:0F").unwrap(),
            "52:54:00:ab:cd:0f"
        );
        assert!(canonical_mac("00:00:00:00:00:00").is_err());
        assert!(canonical_mac("52:54:00:ab:cd").is_err());
        assert!(canonical_mac("52:54:00:ab:cd:0f0").is_err());
    }
}
