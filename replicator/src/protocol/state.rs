//! What a checkpoint's `EpochBegin` message and the `SyncBegin` message
//! carry (versioned): the VM's state, the addresses to announce after a
//! takeover, and the geometry a standby needs before the first copy.
//!
//! The checkpoint state goes with every epoch, so it is encoded compactly
//! (postcard: the KVM structs as their bytes, integers as varints). JSON
//! wrote each of those bytes as a decimal number: 27 KB an epoch for a
//! 1-vCPU guest, against ~9 KB, all of it sealed, sent, opened and parsed
//! again 50-100 times a second. The plan goes once a session and stays
//! JSON.

use serde::{Deserialize, Serialize};
use vmm::snapshot::MachineState;

/// 2: postcard instead of JSON (a state of version 1 starts with `{`,
/// which reads as version 123 and is refused as such).
pub const CHECKPOINT_STATE_VERSION: u32 = 2;
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
    Encode(#[source] postcard::Error),
    #[error("the checkpoint state ({len} bytes) is not valid: {source}")]
    Decode {
        len: usize,
        #[source]
        source: postcard::Error,
    },
    #[error("the checkpoint state ({len} bytes) has {extra} bytes after its end")]
    Trailing { len: usize, extra: usize },
    #[error("the synchronisation plan ({len} bytes) is not valid: {source}")]
    DecodePlan {
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

/// The state half of a checkpoint (memory travels as pages). Every field
/// is always encoded (postcard has no field names to leave one out by).
#[derive(Serialize, Deserialize)]
pub struct CheckpointState {
    pub version: u32,
    pub machine: MachineState,
    /// IPv4 addresses the guest sent from (announced after a takeover).
    pub guest_ipv4: Vec<[u8; 4]>,
    /// The VM digested at this checkpoint (asked for by `verify`): the
    /// standby compares its replica with it once the epoch is applied.
    pub digest: Option<crate::oracle::Digest>,
    /// Per NIC, the frames the guest had received at this checkpoint
    /// (inbound frames numbered from here on are not in it). Empty from a
    /// primary that does not forward what its guest receives.
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

fn decode_plan(payload: &[u8]) -> Result<SyncPlan, StateError> {
    serde_json::from_slice(payload).map_err(|source| StateError::DecodePlan {
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
        postcard::to_stdvec(self).map_err(StateError::Encode)
    }

    /// The version is read and checked first (it leads the encoding), so a
    /// state of another version is refused as such, not as garbage.
    pub fn from_payload(payload: &[u8]) -> Result<CheckpointState, StateError> {
        let decode_error = |source| StateError::Decode {
            len: payload.len(),
            source,
        };
        let (version, _) = postcard::take_from_bytes::<u32>(payload).map_err(decode_error)?;
        check_version(version, CHECKPOINT_STATE_VERSION)?;
        let (state, rest) =
            postcard::take_from_bytes::<CheckpointState>(payload).map_err(decode_error)?;
        if !rest.is_empty() {
            return Err(StateError::Trailing {
                len: payload.len(),
                extra: rest.len(),
            });
        }
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
        let plan = decode_plan(payload)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A machine of one vCPU and no devices, from JSON (the KVM structs'
    /// short byte arrays are zero-filled when decoded).
    fn machine() -> MachineState {
        let vcpu = json!({
            "version": 1, "index": 0, "cpuid": [[0, 0, 0, 0, 0, 0, 0, 0, 0x0d]],
            "mp_state": [], "regs": [0x10, 0, 0, 0], "sregs": [], "xsave": [0x7f, 3],
            "xcrs": [1], "debug_regs": [], "lapic": vec![0xfe_u8; 64], "msrs": [[0x10, 0, 0, 0]],
            "events": [], "tsc_khz": 2_000_000,
        });
        serde_json::from_value(json!({
            "version": 1, "captured_unix_ns": 1_700_000_000_000_000_000u64,
            "vcpu_count": 1, "mem_mib": 128, "msr_indices": [0x10, 0xc000_0080u32],
            "cpu_features": "host", "vcpus": [vcpu],
            "vm": {"version": 1, "pic_master": [], "pic_slave": [1], "ioapic": [2],
                   "pit": [], "clock": [9, 9]},
            "serial": {"version": 1, "baud_divisor_low": 1, "baud_divisor_high": 0,
                       "interrupt_enable": 0, "interrupt_identification": 1,
                       "line_control": 3, "line_status": 0x60, "modem_control": 8,
                       "modem_status": 0xb0, "scratch": 0, "in_buffer": [104, 105]},
            "virtio": [],
        }))
        .expect("a machine state")
    }

    fn state() -> CheckpointState {
        CheckpointState {
            version: CHECKPOINT_STATE_VERSION,
            machine: machine(),
            guest_ipv4: vec![[10, 77, 0, 100]],
            digest: None,
            inbound_through: vec![3],
        }
    }

    #[test]
    fn a_state_goes_and_comes_back_the_same_and_smaller_than_as_json() {
        let payload = state().to_payload().unwrap();
        let back = CheckpointState::from_payload(&payload).unwrap();
        assert_eq!(back.to_payload().unwrap(), payload);
        assert_eq!(back.guest_ipv4, vec![[10, 77, 0, 100]]);
        assert_eq!(back.inbound_through, vec![3]);
        assert_eq!(back.machine.vcpus[0].regs.rax, 0x10);
        assert_eq!(back.machine.serial.in_buffer, vec![104, 105]);
        // What the JSON encoding (version 1) made of the same machine.
        let json = serde_json::to_vec(&back.machine).unwrap();
        assert!(
            payload.len() * 2 < json.len(),
            "{} bytes encoded, {} as JSON",
            payload.len(),
            json.len()
        );
    }

    #[test]
    fn a_state_of_another_version_a_cut_one_and_one_with_more_after_it_are_refused() {
        // A version 1 state (JSON) reads as version 123 ('{').
        let json = serde_json::to_vec(&json!({"version": 1})).unwrap();
        assert!(matches!(
            CheckpointState::from_payload(&json),
            Err(StateError::Version {
                found: 123,
                expected: CHECKPOINT_STATE_VERSION
            })
        ));
        let payload = state().to_payload().unwrap();
        for cut in [0, 1, payload.len() / 2, payload.len() - 1] {
            assert!(
                matches!(
                    CheckpointState::from_payload(&payload[..cut]),
                    Err(StateError::Decode { .. })
                ),
                "cut at {cut}"
            );
        }
        let mut longer = payload.clone();
        longer.push(0);
        assert!(matches!(
            CheckpointState::from_payload(&longer),
            Err(StateError::Trailing { extra: 1, .. })
        ));
    }
}
