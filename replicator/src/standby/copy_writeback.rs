//! The initial copy's writes, sent on to the replica disks' storage as
//! they come. Left in the page cache, a large copy (up to a fifth of the
//! node's memory, the kernel's dirty limit) would all be written at the
//! first epoch's sync, while the primary holds the guest's output (and,
//! past its run-ahead bound, the guest itself) for that epoch's
//! acknowledgement; and afterwards the kernel would slow every epoch's
//! writes while it caught up. Instead, each [`CHUNK`] a disk gathers is
//! handed to writeback at once, and the chunk before it is waited for, so
//! that about two chunks per disk are left unwritten at any time.

use std::ops::Range;

/// How much of a disk's copy is gathered before it is handed to
/// writeback (and the chunk before it waited for): small enough that the
/// wait is short on a slow disk (under a second at 32 MiB/s, well inside
/// the primary's send stall bound), large enough to keep writes large.
pub(super) const CHUNK: u64 = 16 << 20;

/// What to do on one disk now: wait until `wait` (a range handed to
/// writeback before) is written, then hand `start` to writeback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Step {
    pub disk: usize,
    pub wait: Option<Range<u64>>,
    pub start: Range<u64>,
}

#[derive(Debug, Default)]
struct DiskCopy {
    /// The span of the writes since the last step, and their bytes.
    gathering: Option<Range<u64>>,
    gathered: u64,
    /// Handed to writeback at the last step, not yet waited for.
    started: Option<Range<u64>>,
}

#[derive(Debug)]
pub(super) struct CopyWriteback {
    disks: Vec<DiskCopy>,
}

impl CopyWriteback {
    pub(super) fn new(disks: usize) -> CopyWriteback {
        CopyWriteback {
            disks: (0..disks).map(|_| DiskCopy::default()).collect(),
        }
    }

    /// Notes a write of the copy (`len` bytes at `offset` of `disk`); a
    /// step when that disk gathered a chunk's worth.
    pub(super) fn wrote(&mut self, disk: usize, offset: u64, len: u64) -> Option<Step> {
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
        let start = d.gathering.take()?;
        d.gathered = 0;
        Some(Step {
            disk,
            wait: d.started.replace(start.clone()),
            start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_chunk_is_handed_to_writeback_and_the_one_before_waited_for() {
        let mut copy = CopyWriteback::new(2);
        let half = CHUNK / 2;
        // Under a chunk: nothing yet.
        assert_eq!(copy.wrote(0, 0, half), None);
        // The chunk is whole: writeback begins, nothing to wait for.
        assert_eq!(
            copy.wrote(0, half, half),
            Some(Step {
                disk: 0,
                wait: None,
                start: 0..CHUNK
            })
        );
        // Another disk counts on its own.
        assert_eq!(copy.wrote(1, 0, half), None);
        // The next chunk (out of order, with a gap): its span; the first
        // is waited for.
        assert_eq!(copy.wrote(0, 3 * CHUNK, half), None);
        assert_eq!(
            copy.wrote(0, 2 * CHUNK, half),
            Some(Step {
                disk: 0,
                wait: Some(0..CHUNK),
                start: 2 * CHUNK..3 * CHUNK + half
            })
        );
        // A single large write is a chunk by itself.
        assert_eq!(
            copy.wrote(1, CHUNK, 2 * CHUNK),
            Some(Step {
                disk: 1,
                wait: None,
                start: 0..3 * CHUNK
            })
        );
        // A disk the replica does not have is not this tracker's to judge.
        assert_eq!(copy.wrote(7, 0, CHUNK), None);
    }
}
