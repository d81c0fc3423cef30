//! Promotion: the standby's replica becomes the running VM. Its memory is
//! used where it is (no copy), its disks are the replica's files, its NICs
//! this node's TAPs with the guest's own MACs; guest time advances by the
//! real gap since the checkpoint. Then the guest's addresses are announced
//! with gratuitous ARP so switches and clients find it on this node.

use std::time::{Duration, Instant};

use tracing::{info, warn};
use vmm::devices::virtio::net::tx_gate::gratuitous_arp;
use vmm::devices::virtio::{DeviceConfig, DeviceState};
use vmm::vm::{SerialSink, Vm, VmError};

use crate::replica::Replica;

#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error("the replica of epoch {epoch} cannot run: {source}")]
    Restore {
        epoch: u64,
        #[source]
        source: VmError,
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
    let mut machine = replica.state.machine;
    let mut macs = Vec::new();
    let (mut disk_index, mut nic_index) = (0, 0);
    for slot in &mut machine.virtio {
        match &mut slot.config {
            DeviceConfig::Disk(disk) => {
                disk.path = replica.disks[disk_index].path.clone();
                disk_index += 1;
            }
            DeviceConfig::Net(net) => {
                net.tap = taps[nic_index].clone();
                nic_index += 1;
                if let DeviceState::Net(state) = &slot.device {
                    macs.push(state.mac);
                }
            }
        }
    }
    for disk in &replica.disks {
        if let Err(error) = disk.sync() {
            warn!(%error, "replica disk sync before promotion failed");
        }
    }
    let vm = Vm::restore_from(machine, replica.ram, serial, started)
        .map_err(|source| PromoteError::Restore { epoch, source })?;
    if let Some(bridge) = bridge {
        for tap in taps {
            join_bridge(tap, bridge);
        }
    }
    let gates = vm.virtio.tx_gates();
    for gate in &gates {
        for ip in &replica.state.guest_ipv4 {
            gate.remember(*ip);
        }
    }
    for _ in 0..ANNOUNCEMENTS {
        for (gate, mac) in gates.iter().zip(&macs) {
            for ip in &replica.state.guest_ipv4 {
                if let Err(error) = gate.inject(&gratuitous_arp(*mac, *ip)) {
                    warn!(%error, "gratuitous ARP failed");
                }
            }
        }
        std::thread::sleep(ANNOUNCE_GAP);
    }
    info!(
        epoch,
        addresses = ?replica.state.guest_ipv4,
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
