//! Promotion: the standby's replica becomes the running VM. Its memory is
//! used where it is (no copy), its disks are the replica's files, its NICs
//! this node's TAPs with the guest's own MACs; guest time advances by the
//! real gap since the checkpoint. Then the guest's addresses are announced
//! with gratuitous ARP so switches and clients find it on this node.

use std::time::{Duration, Instant};

use tracing::{info, warn};
use vmm::config::SerialSink;
use vmm::replication::{Backings, ReplicationError};
use vmm::vm::Vm;

use crate::standby::Replica;

#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error("the replica of epoch {epoch} cannot run: {source}")]
    Restore {
        epoch: u64,
        #[source]
        source: ReplicationError,
    },
}

/// How often each address is announced, and how far apart.
const ANNOUNCEMENTS: u32 = 3;
const ANNOUNCE_GAP: Duration = Duration::from_millis(50);

/// Starts the replica as the VM on this node. `taps`: this node's TAPs for
/// the NICs; `bridge`: a bridge to put them on (as `ip link` does).
pub fn promote(
    replica: Replica,
    taps: &[String],
    bridge: Option<&str>,
    serial: SerialSink,
) -> Result<Vm, PromoteError> {
    let started = Instant::now();
    let epoch = replica.epoch;
    for disk in &replica.disks {
        if let Err(error) = disk.sync() {
            warn!(%error, "replica disk sync before promotion failed");
        }
    }
    let backings = Backings {
        serial,
        disks: replica.disks.iter().map(|d| d.path.clone()).collect(),
        taps: taps.to_vec(),
    };
    let addresses = replica.state.guest_ipv4;
    let vm = Vm::restore_replica(replica.state.machine, replica.ram, backings)
        .map_err(|source| PromoteError::Restore { epoch, source })?;
    if let Some(bridge) = bridge {
        for tap in taps {
            join_bridge(tap, bridge);
        }
    }
    for _ in 0..ANNOUNCEMENTS {
        let failed = vm.output().announce(&addresses);
        if failed > 0 {
            warn!(failed, "gratuitous ARP failed");
        }
        std::thread::sleep(ANNOUNCE_GAP);
    }
    info!(
        epoch,
        addresses = ?addresses,
        promote_ms = started.elapsed().as_millis() as u64,
        "replica promoted: the VM runs on this node"
    );
    Ok(vm)
}

/// Puts `tap` on `bridge` and brings it up.
pub fn join_bridge(tap: &str, bridge: &str) {
    match crate::bridge::join(tap, bridge) {
        Ok(()) => info!(tap, bridge, "TAP joined the bridge"),
        Err(error) => warn!(tap, bridge, %error, "could not put the TAP on the bridge"),
    }
}
