//! What a checkpoint's `EpochBegin` message and the `SyncBegin` message
//! carry (JSON, versioned): the VM's state, the addresses to announce after a
//! takeover, and the geometry a standby needs before the first copy.

use serde::{Deserialize, Serialize};
use vmm::snapshot::MachineState;

pub const CHECKPOINT_STATE_VERSION: u32 = 1;
/// The plan's version, raised whenever what follows a plan changes: 3 the
/// level and boot plan (HA); 4 the copy's frames may come compressed
/// (`SyncPagesZ`, `SyncDiskZ`), which a standby of version 3 would take for
/// malformed frames: it refuses the plan instead; 5 the written maps
/// (`written`, `next_common`) and the standby's word that chunks are the
/// same by them (`SyncHeld` kind 2); 6 the copies of the epochs' output
/// (`EpochOutput`), which a standby of version 5 would take for a
/// malformed frame after the whole copy.
pub const SYNC_PLAN_VERSION: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("encoding the checkpoint state failed: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("the checkpoint state ({len} bytes) is not valid: {source}")]
    Decode {
        len: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("the synchronisation plan's content key is not 64 hex digits")]
    ContentKey,
    #[error("a synchronisation plan at level HA without the VM's boot plan")]
    NoBootPlan,
    #[error("checkpoint state version {found} is not supported (expected {expected})")]
    Version { found: u32, expected: u32 },
}

/// The state half of a checkpoint (memory travels as pages).
#[derive(Serialize, Deserialize)]
pub struct CheckpointState {
    pub version: u32,
    pub machine: MachineState,
    /// IPv4 addresses the guest sent from (announced after a takeover).
    pub guest_ipv4: Vec<[u8; 4]>,
    /// The VM digested at this checkpoint (asked for by `verify`): the
    /// standby compares its replica with it once the epoch is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<crate::oracle::Digest>,
    /// Per NIC, the frames the guest had received at this checkpoint
    /// (inbound frames numbered from here on are not in it). Empty from a
    /// primary that does not forward what its guest receives.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound_through: Vec<u64>,
}

/// What the primary announces before copying a VM to a new standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPlan {
    pub version: u32,
    pub mem_mib: u64,
    /// Size in bytes of each disk, in device order.
    pub disk_bytes: Vec<u64>,
    /// Number of NICs (the standby needs a TAP for each).
    pub nics: usize,
    /// The key of this session's content digests, 64 hex digits (see
    /// [`crate::content`]): the standby digests what it kept with it.
    pub content_key: String,
    /// How the VM is protected: `ha` copies no memory and sends disk
    /// writes alone, each acknowledged before the guest sees it complete.
    #[serde(default)]
    pub level: crate::level::Level,
    /// Level HA: how the standby boots the VM if the primary is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootPlan>,
    /// Per disk, the primary's written map ([`crate::written`]), if it
    /// keeps one: a standby whose own map counts from the same common
    /// point compares only the extents either map names.
    #[serde(default)]
    pub written: Vec<Option<WrittenPlan>>,
    /// The common point both maps name once the first epoch is durable on
    /// the standby (32 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_common: Option<String>,
    /// Level FT: this session's memory lineage (32 hex digits). The
    /// standby labels its RAM file with it and the last epoch it applied
    /// ([`crate::memory_point`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_lineage: Option<String>,
    /// The checkpoints of an earlier session from which this primary can
    /// bring a standby's memory forward by the pages written since, with
    /// no comparison: a standby whose RAM is labelled with one of them
    /// says so instead of sending its digests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_since: Option<MemorySince>,
}

/// Checkpoints `from..=through` of the session of memory lineage
/// `lineage` (32 hex digits); `from` may be 0 where the primary holds
/// every epoch's pages since the session's first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemorySince {
    pub lineage: String,
    pub from: u64,
    pub through: u64,
}

/// The primary's written map of one disk, in a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenPlan {
    /// The common point its bits count from (32 hex digits), if any.
    pub common: Option<String>,
    /// The extents it names, as `[start, end)` ranges of extent indexes.
    pub extents: Vec<(u64, u64)>,
}

/// What a standby at level HA needs to boot the VM from its mirror: the
/// primary's boot source (the same paths on both nodes) and machine, with
/// the NICs' MAC addresses (the guest keeps its identity); disks and TAPs
/// are the standby's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootPlan {
    pub vcpus: u8,
    pub mem_mib: u64,
    pub kernel: std::path::PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<std::path::PathBuf>,
    pub cmdline: String,
    pub macs: Vec<[u8; 6]>,
}

fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(payload).map_err(|source| StateError::Decode {
        len: payload.len(),
        source,
    })
}

fn check_version(found: u32, expected: u32) -> Result<(), StateError> {
    if found == expected {
        Ok(())
    } else {
        Err(StateError::Version { found, expected })
    }
}

impl CheckpointState {
    pub fn to_payload(&self) -> Result<Vec<u8>, StateError> {
        serde_json::to_vec(self).map_err(StateError::Encode)
    }

    pub fn from_payload(payload: &[u8]) -> Result<CheckpointState, StateError> {
        let state: CheckpointState = decode(payload)?;
        check_version(state.version, CHECKPOINT_STATE_VERSION)?;
        Ok(state)
    }
}

impl SyncPlan {
    /// The session's content key (checked when the plan is decoded).
    pub fn key(&self) -> Option<crate::content::ContentKey> {
        crate::content::ContentKey::from_hex(&self.content_key)
    }

    pub fn to_payload(&self) -> bytes::Bytes {
        bytes::Bytes::from(serde_json::to_vec(self).expect("a plan of numbers always encodes"))
    }

    pub fn from_payload(payload: &[u8]) -> Result<SyncPlan, StateError> {
        let plan: SyncPlan = decode(payload)?;
        check_version(plan.version, SYNC_PLAN_VERSION)?;
        if plan.key().is_none() {
            return Err(StateError::ContentKey);
        }
        if plan.level == crate::level::Level::Ha && plan.boot.is_none() {
            return Err(StateError::NoBootPlan);
        }
        Ok(plan)
    }
}
