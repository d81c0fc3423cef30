//! The bitmap of pages the VMM wrote (virtio rings, block reads, received
//! packets): vm-memory marks it on every write the VMM makes through it.
//! A second level, one bit per 64 pages, lets a harvest find the marked
//! pages without reading a word per 64 pages of guest memory: with the
//! dirty ring, that read was the last part of a harvest that grew with the
//! guest's memory (12 us for an idle 1 GiB guest, 1.7 us at 128 MiB).

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

use crate::memory::PAGE_SIZE;

/// One bit per page, and one summary bit per word of those.
#[derive(Debug, Default)]
pub struct VmmBitmap {
    pages: usize,
    words: Vec<AtomicU64>,
    summary: Vec<AtomicU64>,
}

impl VmmBitmap {
    fn new(bytes: usize) -> VmmBitmap {
        let pages = bytes.div_ceil(PAGE_SIZE);
        let words = pages.div_ceil(64);
        VmmBitmap {
            pages,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            summary: (0..words.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn mark_page(&self, page: usize) {
        let word = page / 64;
        // The page's bit before its summary bit: a harvest that sees the
        // summary bit finds the page's, and one that misses the summary
        // bit leaves the page's for the next harvest.
        self.words[word].fetch_or(1 << (page % 64), Ordering::Release);
        self.summary[word / 64].fetch_or(1 << (word % 64), Ordering::Release);
    }

    /// Appends the marked pages (numbered from `first_page`), ascending,
    /// and clears them.
    pub fn take(&self, first_page: u64, out: &mut Vec<u64>) {
        for (s, summary) in self.summary.iter().enumerate() {
            if summary.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut words = summary.swap(0, Ordering::AcqRel);
            while words != 0 {
                let word = s * 64 + words.trailing_zeros() as usize;
                words &= words - 1;
                let mut bits = self.words[word].swap(0, Ordering::AcqRel);
                while bits != 0 {
                    out.push(first_page + word as u64 * 64 + u64::from(bits.trailing_zeros()));
                    bits &= bits - 1;
                }
            }
        }
    }
}

impl<'a> WithBitmapSlice<'a> for VmmBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for VmmBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        let first = offset / PAGE_SIZE;
        // Past the end (an access vm-memory refuses anyway) marks nothing.
        if len == 0 || first >= self.pages {
            return;
        }
        let last = (offset.saturating_add(len - 1) / PAGE_SIZE).min(self.pages - 1);
        for page in first..=last {
            self.mark_page(page);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = offset / PAGE_SIZE;
        page < self.pages && self.words[page / 64].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for VmmBitmap {
    fn with_len(len: usize) -> Self {
        VmmBitmap::new(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_pages_are_taken_once_in_order() {
        let b = VmmBitmap::new(64 << 20);
        b.mark_dirty(0x5000 * PAGE_SIZE + 10, 1);
        b.mark_dirty(3 * PAGE_SIZE - 1, 2);
        b.mark_dirty(0x3fff * PAGE_SIZE, PAGE_SIZE);
        b.mark_dirty(64 << 20, PAGE_SIZE); // past the end
        assert!(b.dirty_at(2 * PAGE_SIZE) && b.dirty_at(3 * PAGE_SIZE));
        assert!(!b.dirty_at(4 * PAGE_SIZE) && !b.dirty_at(64 << 20));
        let mut pages = Vec::new();
        b.take(256, &mut pages);
        assert_eq!(pages, [256 + 2, 256 + 3, 256 + 0x3fff]);
        pages.clear();
        b.take(0, &mut pages);
        assert!(pages.is_empty());
        assert!(!b.dirty_at(2 * PAGE_SIZE));
        VmmBitmap::default().mark_dirty(0, PAGE_SIZE);
    }
}
