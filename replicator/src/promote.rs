//! Promotion: the standby's replica becomes the running VM. Its memory is
//! used where it is (no copy), its disks are the replica's files, its NICs
//! this node's TAPs with the guest's own MACs; guest time advances by the
//! real gap since the checkpoint. Its TAPs, attached and put on the bridge
//! (down) while this node stood by ([`prepare_taps`]), are up on the
//! bridge before its
//! vCPUs run; then, the vCPUs still parked, the guest's addresses are
//! announced with gratuitous ARP (the first round at once, the repeats from
//! a thread of their own) so switches and clients find it on this node, and
//! the committed epochs' output leaves. The frames the primary's guest
//! received after the checkpoint (forwarded as they arrived) are queued for
//! the promoted guest before anything else, then the frames for the guest
//! that reached this node after the primary was lost
//! ([`crate::standby::overheard`]), so that requests it had not answered
//! are answered now, not after the clients' own retransmission timers.
//! Then the vCPUs run.

use std::time::{Duration, Instant};

use tracing::{info, warn};
use vmm::config::SerialSink;
use vmm::replication::{Announcer, AttachedTaps, Backings, ReplicationError};
use vmm::vm::Vm;

use crate::standby::overheard::OverheardFrames;
use crate::standby::replica_disk::ReplicaDisk;
use crate::standby::{Checkpointed, Machine, Replica, SessionEnd};
use crate::status::TakeoverTimes;

#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error("the replica of epoch {epoch} cannot run: {source}")]
    Restore {
        epoch: u64,
        #[source]
        source: ReplicationError,
    },
    #[error("the replica of epoch {epoch} is a disk mirror (level HA): it is booted, not resumed")]
    NoCheckpoint { epoch: u64 },
    #[error(
        "the replica of epoch {epoch} holds a checkpoint (level FT): it is resumed, not booted"
    )]
    NoBootPlan { epoch: u64 },
    #[error("the VM cannot boot from its mirror (epoch {epoch}): {source}")]
    Boot {
        epoch: u64,
        #[source]
        source: vmm::vm::VmError,
    },
}

/// How often each address is announced, and how far apart.
const ANNOUNCEMENTS: u32 = 3;
const ANNOUNCE_GAP: Duration = Duration::from_millis(50);

/// A promoted replica, running.
pub struct Promoted {
    pub vm: Vm,
    /// Frames received after the checkpoint, given to the guest again
    /// (`overheard_frames` included).
    pub replayed_frames: u64,
    /// Of those, frames this node received itself while standing by.
    pub overheard_frames: u64,
    /// How long the restore took (of the whole promotion).
    pub restore: Duration,
}

/// Where a takeover's time went: `ended` and `decided` as the replica was
/// handed back ([`Replica::ended`], [`Replica::decided`]), `promoting`
/// when the promotion began, `restore` its restore's (or boot's) share,
/// and `running` when the guest ran.
pub fn takeover_times(
    ended: SessionEnd,
    decided: Instant,
    promoting: Instant,
    restore: Duration,
    running: Instant,
    replica: (u64, bool),
) -> TakeoverTimes {
    let (epoch, switchover) = replica;
    let ms = |d: Duration| d.as_millis() as u64;
    TakeoverTimes {
        at_unix_ms: crate::status::unix_ms(),
        epoch,
        switchover,
        detect_ms: ended
            .last_heard
            .map(|heard| ms(ended.at.saturating_duration_since(heard))),
        claim_ms: ms(decided.saturating_duration_since(ended.at)),
        promote_ms: ms(running.saturating_duration_since(decided.min(promoting))),
        restore_ms: ms(restore),
        total_ms: ended
            .last_heard
            .map(|heard| ms(running.saturating_duration_since(heard))),
    }
}

/// Attaches this node's TAPs for the NICs while it stands by and puts them
/// on `bridge`, down: a promotion then only brings them up. Creating a TAP
/// and adding it to a bridge took 30-40 ms of a promotion in a lab node
/// (the kernel registers a device, its sysfs entries and a bridge port).
/// Down, a TAP takes no part in the bridge: nothing is forwarded to it and
/// nothing queues for the guest. On any failure the TAPs are left to the
/// promotion, as before (a warning says why).
pub fn prepare_taps(taps: &[String], bridge: &str) -> AttachedTaps {
    let attached = match AttachedTaps::attach(taps) {
        Ok(attached) => attached,
        Err(error) => {
            warn!(%error, "could not attach the TAPs ahead: a promotion attaches them");
            return AttachedTaps::default();
        }
    };
    for tap in taps {
        // A bridge port needs no address of its own: without IPv6 the TAP
        // coming up at a promotion sets up no link-local address, no
        // duplicate address detection and no router solicitations.
        crate::bridge::without_ipv6(tap);
        if let Err(error) = crate::bridge::add(tap, bridge) {
            warn!(tap, bridge, %error, "could not put the TAP on the bridge ahead: a promotion attaches the TAPs");
            return AttachedTaps::default();
        }
    }
    info!(taps = ?taps, bridge, "TAPs attached and on the bridge ahead of a promotion (down until then)");
    attached
}

/// Starts the replica as the VM on this node. `taps`: this node's TAPs for
/// the NICs (`attached`: those [`prepare_taps`] made ready); `bridge`: a
/// bridge to put them on (as `ip link` does).
pub fn promote(
    replica: Replica,
    taps: &[String],
    attached: AttachedTaps,
    bridge: Option<&str>,
    serial: SerialSink,
) -> Result<Promoted, PromoteError> {
    let started = Instant::now();
    let epoch = replica.epoch;
    let Machine::Checkpoint(checkpoint) = replica.machine else {
        return Err(PromoteError::NoCheckpoint { epoch });
    };
    let backings = Backings {
        serial,
        disks: replica.disks.iter().map(|d| d.path.clone()).collect(),
        taps: taps.to_vec(),
        attached_taps: attached,
    };
    sync_in_background(replica.disks);
    let Checkpointed {
        ram,
        state,
        inbound,
        final_output,
        overheard,
    } = *checkpoint;
    let addresses = state.guest_ipv4;
    // Where the guest resumes: with a guest that does not run again, the
    // first thing to know.
    let cpu0 = state.machine.vcpus.first().map(|v| {
        (
            format!("{:#x}", v.regs.rip),
            format!("{:#x}", v.regs.rflags),
            v.events.interrupt.injected,
            v.events.interrupt.nr,
        )
    });
    let mut heard = OverheardFrames::default();
    let mut announcer = None;
    let mut announced_us = 0;
    // The TAPs go up on the bridge before the guest runs: a reply whose
    // retransmission timer is overdue (guest time jumped by the gap) leaves
    // at once, and a TAP that is down or off the bridge would lose it. The
    // first announcement goes right after: this node's bridge may still
    // place the guest's MACs on its uplink (learned from the primary's
    // broadcasts), where it drops a unicast frame for them that comes in
    // on that very port; the announcement teaches it that they are on the
    // TAPs, which queue such frames from then on until the guest runs.
    // Frames for the guest overheard on this node are taken only then, so
    // none is lost in between (~15 ms in a lab node: a peer's
    // retransmission lost there waited for its next one, a failover of
    // ~650 ms instead of ~330). Those caught from when the TAPs began to
    // come up may have reached the guest through them too, so of those
    // only TCP segments are given (see `overheard`). (Without a bridge to
    // join, the TAPs were wired by whoever made them and may have queued
    // those frames already: then none are taken.)
    let vm = Vm::restore_replica(state.machine, ram, backings, |output| {
        let taps_up_from = Instant::now();
        if let Some(bridge) = bridge {
            for tap in taps {
                join_bridge(tap, bridge);
            }
        }
        let first = output.announcer(&addresses);
        announce_round(&first);
        announced_us = started.elapsed().as_micros() as u64;
        announcer = Some(first);
        if bridge.is_some() {
            if let Some(overheard) = overheard {
                heard = overheard.take(taps_up_from);
            }
        }
    })
    .map_err(|source| PromoteError::Restore { epoch, source })?;
    let restored_us = started.elapsed().as_micros() as u64;
    let announcer = announcer.unwrap_or_else(|| vm.output().announcer(&addresses));
    // The committed epoch's output leaves from here, after the
    // announcement (the answers it draws come to this node): a switchover's
    // final output, or after a failover the copies of their TCP segments
    // that came with the last committed epochs, which the dead primary may
    // not have released (segments it did release arrive twice, which TCP
    // ignores).
    let handed_over_frames: usize = final_output
        .into_iter()
        .enumerate()
        .map(|(nic, frames)| {
            vm.output()
                .send_handed_over(nic, frames.into_iter().map(|f| f.to_vec()))
        })
        .sum();
    let handed_over_us = started.elapsed().as_micros() as u64;
    // What the primary's guest received past the checkpoint, then what
    // reached this node after the primary was lost.
    let overheard_frames = heard.total();
    let mut overheard_per_nic = heard.per_nic.into_iter();
    let mut replayed_frames = 0;
    for (nic, frames) in inbound.into_iter().enumerate() {
        let overheard = overheard_per_nic.next().unwrap_or_default();
        replayed_frames += vm
            .input()
            .replay(nic, frames.into_iter().chain(overheard).map(|f| f.to_vec()))
            as u64;
    }
    // The guest runs from here: its vCPUs waited parked while the above
    // left, which on a busy node they would have slowed (by ~25 ms in a
    // lab node, one CPU under nested emulation).
    let replayed_us = started.elapsed().as_micros() as u64;
    vm.resume();
    let resumed_us = started.elapsed().as_micros() as u64;
    let repeats = std::thread::Builder::new()
        .name("ft-announce".into())
        .spawn(move || {
            for _ in 1..ANNOUNCEMENTS {
                std::thread::sleep(ANNOUNCE_GAP);
                announce_round(&announcer);
            }
        });
    if let Err(error) = repeats {
        warn!(%error, "could not start the thread that repeats the ARP announcements");
    }
    info!(
        epoch,
        addresses = ?addresses,
        replayed_frames,
        overheard_frames,
        handed_over_frames,
        restored_us,
        announced_us,
        handed_over_us,
        replayed_us,
        resumed_us,
        promote_ms = started.elapsed().as_millis() as u64,
        vcpu0 = ?cpu0,
        "replica promoted: the VM runs on this node"
    );
    Ok(Promoted {
        vm,
        replayed_frames,
        overheard_frames,
        restore: Duration::from_micros(restored_us),
    })
}

/// Brings the replica's disk writes to stable storage apart from
/// promotion. The guest runs on the files as they are (its reads see every
/// applied write; its own flushes sync the files again): waiting for this
/// sync held promotion up by 5-100 ms. Until it ends, the writes are where
/// they were while this node stood by: applied, in the page cache.
fn sync_in_background(disks: Vec<ReplicaDisk>) {
    let sync = move || {
        let started = Instant::now();
        for disk in &disks {
            if let Err(error) = disk.sync() {
                warn!(%error, "replica disk sync after promotion failed");
            }
        }
        info!(
            disks = disks.len(),
            sync_ms = started.elapsed().as_millis() as u64,
            "replica disks synced"
        );
    };
    if let Err(error) = std::thread::Builder::new()
        .name("ft-replica-sync".into())
        .spawn(sync)
    {
        warn!(%error, "could not start the replica disk sync thread");
    }
}

fn announce_round(announcer: &Announcer) {
    let failed = announcer.announce();
    if failed > 0 {
        warn!(failed, "gratuitous ARP failed");
    }
}

/// Puts `tap` on `bridge` and brings it up.
pub fn join_bridge(tap: &str, bridge: &str) {
    match crate::bridge::join(tap, bridge) {
        Ok(()) => info!(tap, bridge, "TAP joined the bridge"),
        Err(error) => warn!(tap, bridge, %error, "could not put the TAP on the bridge"),
    }
}

/// What a VM booted from its mirror runs with that the mirror does not
/// say: this node's own serial sink, CPU feature set and RAM file.
pub struct BootHere {
    pub serial: SerialSink,
    pub cpu_features: vmm::config::FeatureSet,
    pub ram_file: Option<std::path::PathBuf>,
}

/// Level HA: boots the VM from the replica's mirrored disks (a reboot: the
/// guest's memory was not replicated), with its own MACs on this node's
/// TAPs, on the bridge before its vCPUs start. The guest announces itself
/// as it boots.
pub fn boot_from_mirror(
    replica: Replica,
    taps: &[String],
    bridge: Option<&str>,
    here: BootHere,
) -> Result<Vm, PromoteError> {
    let started = Instant::now();
    let epoch = replica.epoch;
    let Machine::Boot(plan) = replica.machine else {
        return Err(PromoteError::NoBootPlan { epoch });
    };
    let config = vmm::config::VmConfig {
        vcpus: plan.vcpus,
        mem_mib: plan.mem_mib,
        boot: vmm::config::BootSource {
            kernel: plan.kernel,
            initrd: plan.initrd,
            cmdline: plan.cmdline,
        },
        serial: here.serial,
        disks: replica
            .disks
            .iter()
            .map(|d| vmm::config::DiskConfig {
                path: d.path.clone(),
                read_only: false,
                written_map: true,
            })
            .collect(),
        nets: taps
            .iter()
            .zip(&plan.macs)
            .map(|(tap, &mac)| vmm::config::NetConfig {
                tap: tap.clone(),
                mac,
            })
            .collect(),
        cpu_features: here.cpu_features,
        dirty_tracking: vmm::config::DirtyTracking::Auto,
        ram_file: here.ram_file,
    };
    drop(replica.disks);
    let vm = Vm::boot(config).map_err(|source| PromoteError::Boot { epoch, source })?;
    if let Some(bridge) = bridge {
        for tap in taps {
            join_bridge(tap, bridge);
        }
    }
    info!(
        epoch,
        took_ms = started.elapsed().as_millis() as u64,
        "booted the VM from its mirror (level HA)"
    );
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_times_split_from_last_heard_to_running() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let ended = SessionEnd {
            at: at(200),
            last_heard: Some(t0),
        };
        let t = takeover_times(
            ended,
            at(212),
            at(213),
            Duration::from_millis(60),
            at(300),
            (7, false),
        );
        assert_eq!(t.detect_ms, Some(200));
        assert_eq!(t.claim_ms, 12);
        assert_eq!(t.promote_ms, 88);
        assert_eq!(t.restore_ms, 60);
        assert_eq!(t.total_ms, Some(300));
        assert_eq!(
            t.total_ms,
            t.detect_ms.map(|d| d + t.claim_ms + t.promote_ms)
        );
        // A switchover: nothing to detect, its claim from the session's end.
        let ended = SessionEnd {
            at: at(0),
            last_heard: None,
        };
        let t = takeover_times(ended, at(5), at(6), Duration::ZERO, at(50), (7, true));
        assert_eq!(
            (t.detect_ms, t.claim_ms, t.promote_ms, t.total_ms),
            (None, 5, 45, None)
        );
        assert!(t.switchover);
    }
}
