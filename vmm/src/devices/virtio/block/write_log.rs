//! A record of the writes a disk executes, for whoever mirrors the disk
//! (the replicator sends each checkpoint's writes to the standby, which
//! applies them only when that checkpoint commits). Off until started.

use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Bytes of data held in `writes` (read without the lock).
    held: AtomicU64,
}

impl WriteLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<DiskWrite>>> {
        self.writes.lock().expect("write log lock")
    }

    /// Records every write from now on (anything recorded before is dropped).
    pub fn start(&self) {
        let mut writes = self.lock();
        *writes = Some(Vec::new());
        self.held.store(0, Ordering::Relaxed);
    }

    /// Stops recording and drops what was recorded.
    pub fn stop(&self) {
        let mut writes = self.lock();
        *writes = None;
        self.held.store(0, Ordering::Relaxed);
    }

    /// Bytes of write data recorded and not yet taken: what the record
    /// holds in memory.
    pub fn held_bytes(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Runs one guest write with the recording decision held: `write`
    /// learns whether the log records, executes the write and returns what
    /// to record. [`WriteLog::start`] waits for a write in flight, so every
    /// write either reached the file before recording began (a copy made
    /// after `start` sees it) or is recorded; none falls between the two.
    pub(crate) fn write_with<E>(
        &self,
        write: impl FnOnce(bool) -> Result<Option<DiskWrite>, E>,
    ) -> Result<(), E> {
        let mut writes = self.lock();
        let recorded = write(writes.is_some())?;
        if let (Some(writes), Some(recorded)) = (writes.as_mut(), recorded) {
            self.held
                .fetch_add(recorded.data.len() as u64, Ordering::Relaxed);
            writes.push(recorded);
        }
        Ok(())
    }

    /// The writes recorded since the last take, in execution order
    /// (recording goes on).
    pub fn take(&self) -> Vec<DiskWrite> {
        let mut writes = self.lock();
        self.held.store(0, Ordering::Relaxed);
        writes.as_mut().map(std::mem::take).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// Issue 9 defect 5: recording starts (the initial synchronisation)
    /// while a guest write is in flight, after it was told 'not
    /// recording'. A copy made after `start`, plus the record, must still
    /// hold that write. Before, `start` returned at once: the copy missed
    /// the write (not on the disk yet) and so did the record.
    #[test]
    fn a_write_in_flight_when_recording_starts_is_in_the_copy_or_the_record() {
        let log = WriteLog::default();
        let disk = Mutex::new(vec![0u8; 4]);
        let (decided, wait_decided) = mpsc::channel();
        let (go, wait_go) = mpsc::channel::<()>();
        let (copied, wait_copy) = mpsc::channel();
        std::thread::scope(|s| {
            let (log, disk) = (&log, &disk);
            let writer = s.spawn(move || {
                log.write_with(|recording| {
                    decided.send(recording).unwrap();
                    wait_go.recv().unwrap();
                    disk.lock().unwrap()[0] = 7;
                    Ok::<_, ()>(recording.then(|| DiskWrite {
                        offset: 0,
                        data: vec![7],
                    }))
                })
                .unwrap();
            });
            assert!(!wait_decided.recv().unwrap(), "told 'not recording'");
            s.spawn(move || {
                log.start();
                copied.send(disk.lock().unwrap().clone()).unwrap();
            });
            // Give `start` time to return if it does not wait for the
            // write in flight (the old behaviour), then let the write land.
            let early = wait_copy.recv_timeout(Duration::from_millis(200)).ok();
            go.send(()).unwrap();
            writer.join().unwrap();
            let mut copy = early.unwrap_or_else(|| wait_copy.recv().unwrap());
            for w in log.take() {
                copy[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
            }
            assert_eq!(
                copy,
                *disk.lock().unwrap(),
                "the write in flight at start is in neither the copy nor the record"
            );
        });
    }

    #[test]
    fn writes_are_recorded_only_between_start_and_stop() {
        let log = WriteLog::default();
        let write = |at: u64| {
            log.write_with(|recording| {
                Ok::<_, ()>(recording.then(|| DiskWrite {
                    offset: at,
                    data: vec![1],
                }))
            })
            .unwrap()
        };
        write(1);
        log.start();
        write(2);
        write(3);
        assert_eq!(log.held_bytes(), 2);
        assert_eq!(
            log.take().iter().map(|w| w.offset).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(log.held_bytes(), 0);
        log.stop();
        write(4);
        assert!(log.take().is_empty());
        assert_eq!(log.held_bytes(), 0);
    }
}
