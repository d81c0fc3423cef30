//! The guest's disk writes, VM-wide: every disk's write record started,
//! taken and stopped together, each write tagged with its disk.

use std::sync::Arc;
use std::time::Duration;

use crate::devices::virtio::block::write_log::{Doorbell, WriteLog};
use crate::devices::virtio::block::written_map::WrittenMap;

/// One executed write: bytes at a byte offset of disk `disk` (device
/// order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskWrite {
    pub disk: u32,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The write records of every disk of a VM.
pub struct DiskWrites {
    logs: Vec<Arc<WriteLog>>,
    /// Rung by every disk's recorded write.
    doorbell: Arc<Doorbell>,
}

/// Per disk (device order), the number of the last write taken: what a
/// synchronous mirror settles once the peer holds them.
pub type WritesThrough = Vec<u64>;

impl DiskWrites {
    pub(crate) fn new(logs: Vec<Arc<WriteLog>>) -> DiskWrites {
        let doorbell = Arc::new(Doorbell::default());
        for log in &logs {
            log.ring_on_write(Arc::clone(&doorbell));
        }
        DiskWrites { logs, doorbell }
    }

    /// Each disk's written map (device order; `None` for a disk without).
    pub fn written_maps(&self) -> Vec<Option<Arc<WrittenMap>>> {
        self.logs
            .iter()
            .map(|log| log.written_map().cloned())
            .collect()
    }

    /// How many disks the VM has.
    pub fn disks(&self) -> usize {
        self.logs.len()
    }

    /// Records every write from now on (anything recorded before is
    /// dropped).
    pub fn start(&self) {
        for log in &self.logs {
            log.start();
        }
    }

    /// Whether each write's completion to the guest waits until
    /// [`DiskWrites::settle`] says the peer holds it (a synchronous mirror,
    /// level HA). Only while recording; off, every waiting write completes.
    pub fn set_synchronous(&self, on: bool) {
        for log in &self.logs {
            log.set_synchronous(on);
        }
    }

    /// The writes recorded since the last take, as [`DiskWrites::take`],
    /// with the number of each disk's last write taken.
    pub fn take_numbered(&self) -> (Vec<DiskWrite>, WritesThrough) {
        let mut through = Vec::with_capacity(self.logs.len());
        let mut writes = Vec::new();
        for (disk, log) in self.logs.iter().enumerate() {
            let (taken, last) = log.take_numbered();
            through.push(last);
            writes.extend(taken.into_iter().map(|w| DiskWrite {
                disk: disk as u32,
                offset: w.offset,
                data: w.data,
            }));
        }
        (writes, through)
    }

    /// The peer holds every write through `through` (from
    /// [`DiskWrites::take_numbered`]): their completions go to the guest.
    pub fn settle(&self, through: &[u64]) {
        for (log, &last) in self.logs.iter().zip(through) {
            log.settle(last);
        }
    }

    /// Waits until a write was recorded on any disk since the record rang
    /// `seen` times, at most `within`; returns the count to pass next time
    /// (start with [`DiskWrites::rings`]).
    pub fn wait_for_writes(&self, seen: u64, within: Duration) -> u64 {
        self.doorbell.wait_past(seen, within)
    }

    /// How many writes were recorded so far, counted for
    /// [`DiskWrites::wait_for_writes`].
    pub fn rings(&self) -> u64 {
        self.doorbell.rings()
    }

    /// Stops recording and drops what was recorded (writes waiting for a
    /// synchronous mirror complete).
    pub fn stop(&self) {
        for log in &self.logs {
            log.stop();
        }
    }

    /// Bytes of write data recorded and not yet taken, on every disk: the
    /// memory the records hold.
    pub fn held_bytes(&self) -> u64 {
        self.logs.iter().map(|log| log.held_bytes()).sum()
    }

    /// The writes recorded since the last take, disk by disk, each disk's
    /// in execution order (recording goes on).
    pub fn take(&self) -> Vec<DiskWrite> {
        self.logs
            .iter()
            .enumerate()
            .flat_map(|(disk, log)| {
                log.take().into_iter().map(move |w| DiskWrite {
                    disk: disk as u32,
                    offset: w.offset,
                    data: w.data,
                })
            })
            .collect()
    }
}
