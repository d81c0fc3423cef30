//! The initial copy's writes, handed to the replica disks' writeback as
//! they come. Left to the kernel, a large copy sits in the page cache (up
//! to its dirty limit, a fifth of the node's memory) until background
//! writeback starts, and what is left is written by the first epoch's
//! sync, while the primary holds the guest's output (and, past its
//! run-ahead bound, the guest itself) for that epoch's acknowledgement.
//! Instead, each [`CHUNK`] a disk gathers is handed to writeback at once
//! (`sync_file_range`, data only), on a thread of the disk's own: the call may
//! block while the disk's queue is full, and the session, the A-link's
//! only reader, must not (the primary takes a link that makes no progress
//! for 1.2 s for a lost standby). When the thread is still busy, a chunk
//! is left to the kernel. On a disk at least as fast as the A-link, about
//! a chunk per disk is left for the first epoch's sync. On a slower disk
//! the backlog grows up to the kernel's dirty limit as before (the
//! session's own writes are then slowed by the kernel), and the first
//! epoch's deadline allows for it at a floor rate.

use std::fs::File;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

use tracing::{debug, warn};

use super::replica_disk::ReplicaDisk;

/// How much of a disk's copy is gathered before it is handed to
/// writeback: large writes, and little left unwritten.
pub(super) const CHUNK: u64 = 8 << 20;

/// Chunks waiting for a disk's thread, at most (beyond: left to the
/// kernel).
const QUEUED_AT_MOST: usize = 4;

#[derive(Debug, Default)]
struct DiskCopy {
    /// The span of the writes since the last chunk, and their bytes.
    gathering: Option<Range<u64>>,
    gathered: u64,
}

/// Which spans of the disks to hand to writeback, as the copy writes.
#[derive(Debug)]
pub(super) struct Chunks {
    disks: Vec<DiskCopy>,
}

impl Chunks {
    pub(super) fn new(disks: usize) -> Chunks {
        Chunks {
            disks: (0..disks).map(|_| DiskCopy::default()).collect(),
        }
    }

    /// Notes a write of the copy (`len` bytes at `offset` of `disk`); the
    /// span of the chunk when that disk gathered a chunk's worth.
    pub(super) fn wrote(&mut self, disk: usize, offset: u64, len: u64) -> Option<Range<u64>> {
        let d = self.disks.get_mut(disk)?;
        let end = offset.saturating_add(len);
        d.gathering = Some(match d.gathering.take() {
            Some(span) => span.start.min(offset)..span.end.max(end),
            None => offset..end,
        });
        d.gathered += len;
        if d.gathered < CHUNK {
            return None;
        }
        d.gathered = 0;
        d.gathering.take()
    }
}

/// A disk's writeback thread: its queue.
type Thread = SyncSender<Range<u64>>;

/// The copy's writeback: [`Chunks`] and, per disk, the thread that hands
/// them on (one per disk: a disk whose writeback hangs leaves the others'
/// going).
pub(super) struct CopyWriteback {
    chunks: Chunks,
    /// Per disk; None: no thread (the kernel writes that disk's copy back
    /// by itself).
    threads: Vec<Option<Thread>>,
}

impl CopyWriteback {
    /// The threads end once this is dropped (the copy ended), each after
    /// the call under way and those queued.
    pub(super) fn start(disks: &[ReplicaDisk]) -> CopyWriteback {
        let threads = disks
            .iter()
            .enumerate()
            .map(|(i, disk)| {
                spawn_thread(i, disk)
                    .inspect_err(|error| {
                        warn!(
                            path = %disk.path.display(),
                            %error,
                            "the disk's copy is left to the kernel's writeback"
                        )
                    })
                    .ok()
            })
            .collect();
        CopyWriteback {
            chunks: Chunks::new(disks.len()),
            threads,
        }
    }

    /// Notes a write of the copy; hands a whole chunk to its disk's
    /// thread, or leaves it to the kernel when that thread is behind.
    /// Never blocks.
    pub(super) fn wrote(&mut self, disk: usize, offset: u64, len: u64) {
        let Some(span) = self.chunks.wrote(disk, offset, len) else {
            return;
        };
        let Some(slot) = self.threads.get_mut(disk) else {
            return;
        };
        if let Some(thread) = slot {
            match thread.try_send(span) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    debug!(
                        disk,
                        "the copy's writeback is behind: a chunk left to the kernel"
                    );
                }
                Err(TrySendError::Disconnected(_)) => *slot = None,
            }
        }
    }
}

/// The thread that hands the chunks of `disk` to writeback, and its queue.
fn spawn_thread(index: usize, disk: &ReplicaDisk) -> std::io::Result<Thread> {
    // Opened anew, read-only: not the replica's own open file, which
    // holds the disk's lock (a promoted VM takes that lock once the
    // replica lets go, and must not wait for this thread).
    let file = File::open(&disk.path)?;
    let path: PathBuf = disk.path.clone();
    let (tx, rx) = sync_channel::<Range<u64>>(QUEUED_AT_MOST);
    std::thread::Builder::new()
        .name(format!("copy-writeback-{index}"))
        .spawn(move || {
            for span in rx {
                if let Err(error) = super::replica_disk::start_writeback(&file, span) {
                    // The sync at the first epoch says it too, and ends
                    // the session if the disk failed.
                    warn!(path = %path.display(), %error, "handing the copy to writeback failed");
                }
            }
        })?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_chunk_a_disk_gathers_is_handed_on_with_its_span() {
        let mut chunks = Chunks::new(2);
        let half = CHUNK / 2;
        // Under a chunk: nothing yet.
        assert_eq!(chunks.wrote(0, 0, half), None);
        assert_eq!(chunks.wrote(0, half, half), Some(0..CHUNK));
        // Another disk counts on its own.
        assert_eq!(chunks.wrote(1, 0, half), None);
        // Out of order, with a gap: the whole span.
        assert_eq!(chunks.wrote(0, 3 * CHUNK, half), None);
        assert_eq!(
            chunks.wrote(0, 2 * CHUNK, half),
            Some(2 * CHUNK..3 * CHUNK + half)
        );
        // A large write completes disk 1's chunk (with its earlier half).
        assert_eq!(chunks.wrote(1, CHUNK, 2 * CHUNK), Some(0..3 * CHUNK));
        // A disk the replica does not have is not this tracker's to judge.
        assert_eq!(chunks.wrote(7, 0, CHUNK), None);
    }

    /// The session never waits for a thread: chunks beyond a disk's queue
    /// are left to the kernel, one disk's thread behind leaves the others'
    /// queues taking chunks, and a thread that ended is let go.
    #[test]
    fn a_writeback_thread_behind_or_gone_never_blocks_the_copy() {
        let (stuck_tx, stuck_rx) = sync_channel(QUEUED_AT_MOST);
        let (other_tx, other_rx) = sync_channel(QUEUED_AT_MOST);
        let mut writeback = CopyWriteback {
            chunks: Chunks::new(2),
            threads: vec![Some(stuck_tx), Some(other_tx)],
        };
        // Nobody takes from disk 0's queue (a thread stuck on a hung disk).
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for i in 0..(QUEUED_AT_MOST as u64 + 3) {
                writeback.wrote(0, i * CHUNK, CHUNK);
            }
            writeback.wrote(1, 0, CHUNK);
            done_tx.send(writeback).unwrap();
        });
        let mut writeback = done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the copy waited for its writeback thread");
        let queued: Vec<_> = stuck_rx.try_iter().collect();
        assert_eq!(queued.len(), QUEUED_AT_MOST, "the rest left to the kernel");
        assert_eq!(queued[0], 0..CHUNK);
        assert_eq!(
            other_rx.try_iter().collect::<Vec<_>>(),
            vec![0..CHUNK],
            "disk 1's chunk must reach its own thread while disk 0's is stuck"
        );
        // Disk 0's thread is gone: its next chunk lets it go, disk 1's
        // thread stays.
        drop(stuck_rx);
        writeback.wrote(0, 10 * CHUNK, CHUNK);
        assert!(writeback.threads[0].is_none());
        assert!(writeback.threads[1].is_some());
    }
}
