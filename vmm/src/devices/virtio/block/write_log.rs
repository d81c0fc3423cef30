//! A record of the writes a disk executes, for whoever mirrors the disk
//! (the replicator sends each checkpoint's writes to the standby, which
//! applies them only when that checkpoint commits). Off until started.
//!
//! A synchronous mirror (level HA: a write completes only once the peer
//! has it) also holds each write's completion: writes are numbered as they
//! are recorded, the mirror says which are settled (on the peer's disk),
//! and the device waits for its writes before it tells the guest they are
//! done ([`WriteLog::wait_settled`]). Stopping the record, or the mirror
//! going back to asynchronous, lets every waiting write complete: the disk
//! runs unprotected then, which the mirror reports.
//!
//! A disk with a [`WrittenMap`] notes each write's extents in it first,
//! under the same lock as the record: a write is in the map before it is
//! on the disk, and before any take that misses it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use super::written_map::{WrittenMap, WrittenMapError};

/// One executed write: bytes at a byte offset of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskWrite {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Rung whenever a write is recorded on any disk that shares it: wakes the
/// mirror that sends them.
#[derive(Debug, Default)]
pub struct Doorbell {
    rings: Mutex<u64>,
    rung: Condvar,
}

impl Doorbell {
    fn ring(&self) {
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        *rings += 1;
        self.rung.notify_all();
    }

    /// How many times it rang so far.
    pub fn rings(&self) -> u64 {
        *self.rings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until it rang more than `seen` times, at most `within`;
    /// returns how many times it rang.
    pub fn wait_past(&self, seen: u64, within: Duration) -> u64 {
        let rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        let (rings, _) = self
            .rung
            .wait_timeout_while(rings, within, |r| *r <= seen)
            .unwrap_or_else(|e| e.into_inner());
        *rings
    }
}

/// What the lock guards.
#[derive(Debug, Default)]
struct Record {
    /// `None` while not recording.
    writes: Option<Vec<DiskWrite>>,
    /// Writes recorded since the record started (the last one's number).
    recorded: u64,
    /// Writes the mirror says the peer holds, counted like `recorded`.
    settled: u64,
    /// Completions wait for settlement.
    synchronous: bool,
}

/// The write record of one disk.
#[derive(Debug, Default)]
pub struct WriteLog {
    record: Mutex<Record>,
    /// Signalled when `settled` grows or waiting ends.
    settled: Condvar,
    /// Bytes of data held in `writes` (read without the lock).
    held: AtomicU64,
    /// Rung on every recorded write (set once by whoever mirrors).
    doorbell: OnceLock<Arc<Doorbell>>,
    /// Where each write is noted before it is executed, if anywhere.
    map: OnceLock<Arc<WrittenMap>>,
}

impl WriteLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rings `doorbell` on every recorded write from now on (the first
    /// doorbell given stays).
    pub fn ring_on_write(&self, doorbell: Arc<Doorbell>) {
        let _ = self.doorbell.set(doorbell);
    }

    /// Notes every write in `map` before it is executed, from now on (the
    /// first map given stays).
    pub fn note_writes_in(&self, map: Arc<WrittenMap>) {
        let _ = self.map.set(map);
    }

    /// The map writes are noted in, if any.
    pub fn written_map(&self) -> Option<&Arc<WrittenMap>> {
        self.map.get()
    }

    /// Records every write from now on (anything recorded before is
    /// dropped, and the numbering starts again). Completions no longer
    /// wait for settlement until [`WriteLog::set_synchronous`] says so
    /// again: a write waiting under the old numbering completes.
    pub fn start(&self) {
        let mut record = self.lock();
        if record.synchronous {
            // The mirror turns the wait off before it starts again; a
            // caller that did not leaves HA writes asynchronous until the
            // mirror turns it on again, which the log says.
            tracing::warn!(
                recorded = record.recorded,
                settled = record.settled,
                "disk write log restarted while writes waited for the mirror: they complete without it until it is synchronous again"
            );
        }
        record.writes = Some(Vec::new());
        record.recorded = 0;
        record.settled = 0;
        record.synchronous = false;
        self.held.store(0, Ordering::Relaxed);
        self.settled.notify_all();
    }

    /// Stops recording and drops what was recorded; writes waiting for
    /// settlement complete.
    pub fn stop(&self) {
        let mut record = self.lock();
        record.writes = None;
        record.synchronous = false;
        self.held.store(0, Ordering::Relaxed);
        self.settled.notify_all();
    }

    /// Whether completions wait for the mirror (only while recording).
    /// Turning it off lets every waiting write complete.
    pub fn set_synchronous(&self, on: bool) {
        let mut record = self.lock();
        record.synchronous = on && record.writes.is_some();
        self.settled.notify_all();
    }

    /// Bytes of write data recorded and not yet taken: what the record
    /// holds in memory.
    pub fn held_bytes(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Runs one guest write of `len` bytes at `offset` with the recording
    /// decision held: the write is noted in the written map (if any), then
    /// `write` learns whether the log records, executes the write and
    /// returns what to record. [`WriteLog::start`] waits for a write in
    /// flight, so every write either reached the file before recording
    /// began (a copy made after `start` sees it) or is recorded; none
    /// falls between the two. A write that cannot be noted is not
    /// executed.
    pub(crate) fn write_with<E: From<WrittenMapError>>(
        &self,
        (offset, len): (u64, u64),
        write: impl FnOnce(bool) -> Result<Option<DiskWrite>, E>,
    ) -> Result<(), E> {
        let mut record = self.lock();
        if let Some(map) = self.map.get() {
            map.note(offset, len)?;
        }
        let recorded = write(record.writes.is_some())?;
        if let Some(recorded) = recorded {
            if let Some(writes) = record.writes.as_mut() {
                self.held
                    .fetch_add(recorded.data.len() as u64, Ordering::Relaxed);
                writes.push(recorded);
                record.recorded += 1;
                drop(record);
                if let Some(doorbell) = self.doorbell.get() {
                    doorbell.ring();
                }
            }
        }
        Ok(())
    }

    /// The writes recorded since the last take, in execution order
    /// (recording goes on).
    pub fn take(&self) -> Vec<DiskWrite> {
        self.take_numbered().0
    }

    /// Like [`WriteLog::take`], with the number of the last write taken
    /// (what [`WriteLog::settle`] is told once the peer holds them).
    pub fn take_numbered(&self) -> (Vec<DiskWrite>, u64) {
        let mut record = self.lock();
        self.held.store(0, Ordering::Relaxed);
        let through = record.recorded;
        let writes = record
            .writes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        (writes, through)
    }

    /// The mirror's word: the peer holds every write through number
    /// `through`; their completions go to the guest.
    pub fn settle(&self, through: u64) {
        let mut record = self.lock();
        record.settled = record.settled.max(through);
        self.settled.notify_all();
    }

    /// Waits, while the mirror is synchronous, until every write recorded
    /// so far is settled (the device calls it before it completes a batch
    /// of requests to the guest). Returns at once otherwise.
    pub fn wait_settled(&self) {
        let record = self.lock();
        let through = record.recorded;
        let _record = self
            .settled
            .wait_while(record, |r| r.synchronous && r.settled < through)
            .unwrap_or_else(|e| e.into_inner());
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
                log.write_with((0, 1), |recording| {
                    decided.send(recording).unwrap();
                    wait_go.recv().unwrap();
                    disk.lock().unwrap()[0] = 7;
                    Ok::<_, WrittenMapError>(recording.then(|| DiskWrite {
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
            log.write_with((at, 1), |recording| {
                Ok::<_, WrittenMapError>(recording.then(|| DiskWrite {
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

    /// A device thread completing its requests: waits for settlement,
    /// then says so on `done`.
    fn wait_settled_on_a_thread(
        log: &Arc<WriteLog>,
        done: mpsc::Sender<()>,
    ) -> std::thread::JoinHandle<()> {
        let log = Arc::clone(log);
        std::thread::spawn(move || {
            log.wait_settled();
            done.send(()).unwrap();
        })
    }

    fn record(log: &WriteLog, at: u64) {
        log.write_with((at, 1), |recording| {
            Ok::<_, WrittenMapError>(recording.then(|| DiskWrite {
                offset: at,
                data: vec![1],
            }))
        })
        .unwrap();
    }

    /// A record started again (a new session) while a write waits for
    /// the old one's settlement: the write completes (its number means
    /// nothing in the new numbering), and completions wait again only
    /// once the new mirror says so.
    #[test]
    fn a_write_waiting_when_the_record_starts_again_completes() {
        let log = Arc::new(WriteLog::default());
        log.start();
        log.set_synchronous(true);
        record(&log, 1);
        record(&log, 2);
        let (done_tx, done) = mpsc::channel();
        let waiter = wait_settled_on_a_thread(&log, done_tx);
        assert!(done.recv_timeout(Duration::from_millis(200)).is_err());
        log.start();
        done.recv_timeout(Duration::from_secs(5))
            .expect("completed once the record started again");
        waiter.join().unwrap();
        record(&log, 3);
        log.wait_settled();
    }

    /// Level HA: a synchronous mirror holds a write's completion until it
    /// settles the write's number; stopping the record lets a waiting
    /// write complete (the disk runs unprotected), and so does turning
    /// the mirror asynchronous.
    #[test]
    fn a_synchronous_mirror_holds_completions_until_the_peer_has_the_writes() {
        let log = Arc::new(WriteLog::default());
        let doorbell = Arc::new(Doorbell::default());
        log.ring_on_write(Arc::clone(&doorbell));
        log.start();
        log.set_synchronous(true);
        record(&log, 1);
        assert_eq!(doorbell.wait_past(0, Duration::from_secs(5)), 1, "rung");
        let (done_tx, done) = mpsc::channel();
        let waiter = wait_settled_on_a_thread(&log, done_tx.clone());
        assert!(
            done.recv_timeout(Duration::from_millis(200)).is_err(),
            "completed before the peer had the write"
        );
        let (writes, through) = log.take_numbered();
        assert_eq!((writes.len(), through), (1, 1));
        log.settle(through);
        done.recv_timeout(Duration::from_secs(5))
            .expect("completed once settled");
        waiter.join().unwrap();
        // A second write, then the mirror fails: the record stops.
        record(&log, 2);
        let waiter = wait_settled_on_a_thread(&log, done_tx);
        assert!(done.recv_timeout(Duration::from_millis(200)).is_err());
        log.stop();
        done.recv_timeout(Duration::from_secs(5))
            .expect("completed once the record stopped");
        waiter.join().unwrap();
        // Not recording: synchronous cannot be turned on, nothing waits.
        log.set_synchronous(true);
        record(&log, 3);
        log.wait_settled();
    }
}
