//! One checkpoint's capture, the part of an epoch that runs while the
//! guest is stopped: pause, vCPU and device state, the dirty pages staged
//! straight into frame payloads, the disk writes, and the cut of the
//! guest's output (batch N). The caller resumes the guest.

use std::time::{Duration, Instant};

use bytes::Bytes;
use vmm::replication::ReplicationError;
use vmm::vm::Vm;

use super::audit::AuditPicker;
use super::PrimaryError;
use crate::oracle;
use crate::protocol::{
    disk_payloads, CheckpointState, DiskBatch, DiskRecord, PageAudit, PageStager, StagedPages,
    CHECKPOINT_STATE_VERSION, EPOCH_OUTPUT_MAX,
};

/// What checkpoint N captured.
pub struct Captured {
    pub state: CheckpointState,
    pub pages: StagedPages,
    /// The disk writes packed into batches, and how many records.
    pub writes: (Vec<DiskBatch>, u64),
    /// A copy of the TCP segments sealed as this epoch's batch (per NIC;
    /// the first [`EPOCH_OUTPUT_MAX`] bytes), for the standby to send if
    /// it takes over.
    pub output: Vec<Vec<Vec<u8>>>,
    /// The written maps' clock just before the writes were taken
    /// ([`crate::written`]).
    pub written_mark: u64,
    /// Pages the standby checks its replica against once the epoch is
    /// applied ([`crate::protocol::audit`]); delta pages join when the
    /// deltas are made.
    pub audit: PageAudit,
    /// Of the dirty pages, those the checkpoint before carried too (known
    /// where the audit is taken; else 0).
    pub repeat_pages: u64,
    /// Of the dirty pages, those the harvest left writable (hot: the guest
    /// takes no write fault for them in the next epoch).
    pub hot_pages: u64,
    pub times: StopTimes,
}

/// Where the stop went.
#[derive(Debug, Clone, Copy, Default)]
pub struct StopTimes {
    /// Stopping the vCPUs and the device work.
    pub pause: Duration,
    /// vCPU, VM and device state.
    pub state: Duration,
    /// Harvesting the dirty set and staging its pages.
    pub pages: Duration,
    /// Pause to the end of the capture.
    pub total: Duration,
}

/// Pauses the guest and captures checkpoint `epoch`; the guest stays
/// paused (the caller resumes it, also on error). Output is held from
/// epoch 1 on. With `verify`, the VM's memory and disks are digested while
/// the guest is paused (the consistency oracle: a slow stop, on request).
/// With `audit`, a few pages are summed for the standby to check.
pub fn capture(
    vm: &Vm,
    epoch: u64,
    verify: bool,
    audit: Option<&mut AuditPicker>,
) -> Result<Captured, PrimaryError> {
    let start = Instant::now();
    let pause = vm.pause();
    if epoch == 1 {
        vm.output().hold();
        // From here on what the guest receives is forwarded as it arrives
        // (`inbound`), numbered against what each checkpoint holds.
        vm.input().start();
    }
    let t = Instant::now();
    let machine = vm
        .capture_state()
        .map_err(|source| PrimaryError::Capture { epoch, source })?;
    let state_took = t.elapsed();
    let t = Instant::now();
    let stage_err = |source| PrimaryError::Stage { epoch, source };
    let dirty = vm
        .harvest_dirty()
        .map_err(|e| stage_err(ReplicationError::Harvest(Box::new(e))))?;
    let mut stager = PageStager::default();
    vm.stage_listed_pages(dirty.page_numbers(), &mut stager)
        .map_err(stage_err)?;
    let pages = stager.finish();
    let (audit, repeat_pages) = audit
        .map(|picker| picker.pick(vm, dirty.page_numbers().collect()))
        .unwrap_or_default();
    let pages_took = t.elapsed();
    let written_mark = vmm::replication::written_map::mark();
    let writes = vm.disk_writes().take().into_iter().map(|w| DiskRecord {
        disk: w.disk,
        offset: w.offset,
        data: Bytes::from(w.data),
    });
    let (_, output) = vm.output().seal_copying(epoch, EPOCH_OUTPUT_MAX);
    let digest = if verify {
        let digest = oracle::digest(
            vm.guest_bytes(),
            |gpa, buf| vm.read_memory(gpa, buf),
            &vm.disk_paths(),
        )
        .map_err(|source| PrimaryError::Digest { epoch, source })?;
        Some(digest)
    } else {
        None
    };
    // Encoded after the guest resumes (see `epochs`).
    let state = CheckpointState {
        version: CHECKPOINT_STATE_VERSION,
        machine,
        guest_ipv4: vm.output().guest_ipv4(),
        digest,
        inbound_through: vm.input().delivered(),
    };
    Ok(Captured {
        state,
        pages,
        writes: disk_payloads(writes),
        output,
        written_mark,
        audit,
        repeat_pages,
        hot_pages: dirty.hot,
        times: StopTimes {
            pause,
            state: state_took,
            pages: pages_took,
            total: start.elapsed(),
        },
    })
}
