//! Dirties guest memory at a chosen rate: one byte written per 4 KiB page,
//! walking a buffer round-robin so every write hits a page that a checkpoint
//! must copy again.

use std::time::{Duration, Instant};

pub const PAGE_SIZE: usize = 4096;

/// A buffer whose pages are dirtied in turn.
pub struct Dirtier {
    buf: Vec<u8>,
    next_page: usize,
    generation: u8,
}

impl Dirtier {
    pub fn new(mib: usize) -> Self {
        let pages = (mib * 1024 * 1024 / PAGE_SIZE).max(1);
        Dirtier {
            buf: vec![0; pages * PAGE_SIZE],
            next_page: 0,
            generation: 1,
        }
    }

    pub fn pages(&self) -> usize {
        self.buf.len() / PAGE_SIZE
    }

    /// Writes one byte into each of the next `count` pages.
    pub fn dirty(&mut self, count: usize) {
        for _ in 0..count {
            self.buf[self.next_page * PAGE_SIZE] = self.generation;
            self.next_page += 1;
            if self.next_page == self.pages() {
                self.next_page = 0;
                self.generation = self.generation.wrapping_add(1).max(1);
            }
        }
    }

    /// Dirties `pages_per_sec` pages per second for `duration`, in 1 ms
    /// slices; returns the number of pages written.
    pub fn run(&mut self, pages_per_sec: u64, duration: Duration) -> u64 {
        let start = Instant::now();
        let mut written = 0u64;
        while start.elapsed() < duration {
            let due = (start.elapsed().as_secs_f64() * pages_per_sec as f64) as u64;
            if due > written {
                self.dirty((due - written) as usize);
                written = due;
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        written
    }

    /// Sum of the first byte of every page (what the writes left behind).
    pub fn checksum(&self) -> u64 {
        self.buf
            .iter()
            .step_by(PAGE_SIZE)
            .map(|&b| u64::from(b))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_walks_pages_round_robin() {
        let mut d = Dirtier::new(1);
        assert_eq!(d.pages(), 256);
        d.dirty(10);
        assert_eq!(d.checksum(), 10);
        d.dirty(256);
        // 246 pages hold generation 1, 10 wrapped round to generation 2.
        assert_eq!(d.checksum(), 246 + 20);
    }
}
