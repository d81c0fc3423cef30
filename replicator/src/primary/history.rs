//! The pages of each epoch of the latest session at level FT, kept after
//! the session ends: with the pages the guest wrote since (the dirty log,
//! not harvested between sessions), they are what a standby whose RAM
//! holds one of those checkpoints lacks ([`crate::memory_point`]).
//!
//! A copy at level FT starts a new line (a new lineage): the line before
//! it is what that copy may bring a labelled standby forward from. Level
//! HA leaves the line alone (its sessions copy no memory and harvest
//! nothing). The line holds at most as many page numbers as the guest has
//! pages; past that, its oldest epochs go (a standby that old is compared
//! by digests).

use std::collections::VecDeque;
use std::sync::Mutex;

use super::checkpoint::Captured;
use crate::memory_point::Lineage;
use crate::protocol::{MemorySince, PAGE_SIZE};
use crate::written::common_to_hex;

/// The pages of the epochs of one session.
#[derive(Debug, Clone)]
pub(super) struct Line {
    pub lineage: Lineage,
    /// The epoch of `epochs[0]`.
    first: u64,
    /// Page numbers per epoch, in epoch order.
    epochs: VecDeque<Vec<u32>>,
    /// Page numbers held in all.
    held: usize,
}

impl Line {
    fn new(lineage: Lineage) -> Line {
        Line {
            lineage,
            first: 1,
            epochs: VecDeque::new(),
            held: 0,
        }
    }

    /// The last epoch recorded (`first - 1` if none).
    fn last(&self) -> u64 {
        self.first + self.epochs.len() as u64 - 1
    }

    /// The checkpoints a standby may be brought forward from, for the
    /// plan; none before the first epoch (checkpoint 0, the copy, is never
    /// a standby's).
    pub fn since(&self) -> Option<MemorySince> {
        (self.last() >= 1).then(|| MemorySince {
            lineage: common_to_hex(self.lineage),
            from: (self.first - 1).max(1),
            through: self.last(),
        })
    }

    /// Whether checkpoint `epoch` can be brought forward.
    pub fn covers(&self, epoch: u64) -> bool {
        epoch >= 1 && epoch + 1 >= self.first && epoch <= self.last()
    }

    /// Marks in `set` every page written by the epochs after `epoch`
    /// (which [`Line::covers`]).
    pub fn mark_after(&self, epoch: u64, set: &mut PageSet) {
        let skip = (epoch + 1).saturating_sub(self.first) as usize;
        for pages in self.epochs.iter().skip(skip) {
            for &page in pages {
                set.insert(u64::from(page));
            }
        }
    }
}

/// The primary's line, across its sessions.
#[derive(Debug, Default)]
pub(super) struct MemoryHistory {
    line: Mutex<Option<Line>>,
}

impl MemoryHistory {
    /// A copy whose memory is checkpoint `base.1` of lineage `base.0` (a
    /// promoted one) starts from that checkpoint, with no epoch of its
    /// own yet.
    pub fn new(base: Option<(Lineage, u64)>) -> MemoryHistory {
        MemoryHistory {
            line: Mutex::new(base.map(|(lineage, epoch)| Line {
                first: epoch + 1,
                ..Line::new(lineage)
            })),
        }
    }

    /// The current line's lineage.
    pub fn lineage(&self) -> Option<Lineage> {
        self.lock().as_ref().map(|line| line.lineage)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Line>> {
        self.line.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy at level FT begins the line of `lineage`; returns the line
    /// before it.
    pub fn begin(&self, lineage: Lineage) -> Option<Line> {
        self.lock().replace(Line::new(lineage))
    }

    /// The capture of epoch `epoch`, or its failure (`None`): every
    /// capture harvests the dirty log, so one whose pages are not kept
    /// ends the line (a standby's earlier checkpoint could no longer be
    /// brought forward whole).
    pub fn note_capture(&self, epoch: u64, captured: Option<&Captured>, guest_pages: u64) {
        match captured {
            Some(captured) => self.record(
                epoch,
                captured
                    .pages
                    .batches
                    .iter()
                    .flat_map(|batch| batch.records().map(|(gpa, _)| gpa / PAGE_SIZE as u64)),
                guest_pages as usize,
            ),
            None => *self.lock() = None,
        }
    }

    /// Epoch `epoch` of the current line wrote `pages` (numbers); at most
    /// `cap` page numbers are kept in all. An epoch out of sequence ends
    /// the line (nothing can be brought forward from it).
    pub fn record(&self, epoch: u64, pages: impl IntoIterator<Item = u64>, cap: usize) {
        let mut guard = self.lock();
        let Some(line) = guard.as_mut() else {
            return;
        };
        if epoch != line.last() + 1 {
            *guard = None;
            return;
        }
        let Ok(pages) = pages
            .into_iter()
            .map(u32::try_from)
            .collect::<Result<Vec<u32>, _>>()
        else {
            // A guest past 16 TiB: not kept.
            *guard = None;
            return;
        };
        line.held += pages.len();
        line.epochs.push_back(pages);
        while line.held > cap {
            let Some(oldest) = line.epochs.pop_front() else {
                break;
            };
            line.held -= oldest.len();
            line.first += 1;
        }
    }
}

/// A set of page numbers below a bound, ascending when walked.
#[derive(Debug)]
pub(super) struct PageSet {
    words: Vec<u64>,
    pages: u64,
}

impl PageSet {
    pub fn new(pages: u64) -> PageSet {
        PageSet {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// Adds `page` (ignored past the bound).
    pub fn insert(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    pub fn len(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The pages, ascending.
    pub fn to_vec(&self) -> Vec<u64> {
        let mut pages = Vec::with_capacity(self.len() as usize);
        for (i, &word) in self.words.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let bit = u64::from(word.trailing_zeros());
                pages.push(i as u64 * 64 + bit);
                word &= word - 1;
            }
        }
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn union_after(line: &Line, epoch: u64) -> Vec<u64> {
        let mut set = PageSet::new(1000);
        line.mark_after(epoch, &mut set);
        set.to_vec()
    }

    #[test]
    fn a_standby_at_a_checkpoint_of_the_line_lacks_the_pages_of_the_epochs_after_it() {
        let history = MemoryHistory::default();
        assert!(history.begin([1; 16]).is_none());
        history.record(1, [5, 9], 100);
        history.record(2, [9, 700], 100);
        history.record(3, [3], 100);
        let line = history.begin([2; 16]).expect("the line before");
        assert_eq!(line.lineage, [1; 16]);
        let since = line.since().unwrap();
        assert_eq!((since.from, since.through), (1, 3));
        assert_eq!(since.lineage, "01".repeat(16));
        assert_eq!(union_after(&line, 1), [3, 9, 700]);
        assert_eq!(union_after(&line, 3), Vec::<u64>::new());
        assert!(line.covers(1) && line.covers(3));
        assert!(
            !line.covers(0),
            "checkpoint 0 (the copy) is never a standby's"
        );
        assert!(!line.covers(4), "a checkpoint the primary never took");
        // The new line has no epoch yet: nothing to offer.
        assert!(history.begin([3; 16]).unwrap().since().is_none());
    }

    #[test]
    fn past_its_cap_the_oldest_epochs_go_and_an_epoch_out_of_sequence_ends_the_line() {
        let history = MemoryHistory::default();
        history.begin([1; 16]);
        history.record(1, [1, 2, 3], 4);
        history.record(2, [4, 5], 4);
        let line = history.begin([2; 16]).unwrap();
        assert_eq!(line.since().map(|s| (s.from, s.through)), Some((1, 2)));
        assert!(!line.covers(0), "epoch 1's pages are gone");
        assert!(line.covers(1));
        assert_eq!(union_after(&line, 1), [4, 5]);
        history.record(1, [1], 10);
        history.record(3, [1], 10);
        assert!(
            history.begin([3; 16]).is_none(),
            "epoch 2 was never recorded"
        );
        // A capture that failed harvested pages no list holds.
        history.record(1, [1], 10);
        history.note_capture(2, None, 10);
        assert!(
            history.begin([4; 16]).is_none(),
            "a failed capture ends the line"
        );
    }

    /// A promoted copy starts from the checkpoint it was restored from: a
    /// standby at that checkpoint lacks only what was written since.
    #[test]
    fn a_promoted_copy_offers_the_checkpoint_it_was_restored_from() {
        let history = MemoryHistory::new(Some(([4; 16], 9)));
        assert_eq!(history.lineage(), Some([4; 16]));
        let line = history.begin([5; 16]).unwrap();
        let since = line.since().unwrap();
        assert_eq!((since.from, since.through), (9, 9));
        assert!(line.covers(9) && !line.covers(8) && !line.covers(10));
        assert_eq!(union_after(&line, 9), Vec::<u64>::new());
        assert!(MemoryHistory::new(None).lineage().is_none());
    }

    #[test]
    fn a_page_set_walks_ascending_each_page_once() {
        let mut set = PageSet::new(130);
        for page in [129, 0, 64, 63, 64, 200] {
            set.insert(page);
        }
        assert_eq!(set.to_vec(), [0, 63, 64, 129]);
        assert_eq!(set.len(), 4);
    }
}
