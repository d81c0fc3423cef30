//! The guest's disk writes, VM-wide: every disk's write record started,
//! taken and stopped together, each write tagged with its disk.

use std::sync::Arc;

use crate::devices::virtio::block::write_log::WriteLog;

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
}

impl DiskWrites {
    pub(crate) fn new(logs: Vec<Arc<WriteLog>>) -> DiskWrites {
        DiskWrites { logs }
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

    /// Stops recording and drops what was recorded.
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
