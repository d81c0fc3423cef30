//! A record of the writes a disk executes, for whoever mirrors the disk
//! (the replicator sends each checkpoint's writes to the standby, which
//! applies them only when that checkpoint commits). Off until started.

use std::sync::Mutex;

/// One executed write: bytes at a byte offset of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskWrite {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The write record of one disk.
#[derive(Debug, Default)]
pub struct WriteLog {
    /// `None` while not recording.
    writes: Mutex<Option<Vec<DiskWrite>>>,
}

impl WriteLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<DiskWrite>>> {
        self.writes.lock().expect("write log lock")
    }

    /// Records every write from now on (anything recorded before is dropped).
    pub fn start(&self) {
        *self.lock() = Some(Vec::new());
    }

    /// Stops recording and drops what was recorded.
    pub fn stop(&self) {
        *self.lock() = None;
    }

    pub fn is_recording(&self) -> bool {
        self.lock().is_some()
    }

    pub(crate) fn record(&self, offset: u64, data: Vec<u8>) {
        if let Some(writes) = self.lock().as_mut() {
            writes.push(DiskWrite { offset, data });
        }
    }

    /// The writes recorded since the last take, in execution order
    /// (recording goes on).
    pub fn take(&self) -> Vec<DiskWrite> {
        self.lock().as_mut().map(std::mem::take).unwrap_or_default()
    }
}
