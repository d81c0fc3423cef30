//! Counters a user would graph: pauses and their length, captures, dirty
//! harvests and pages. Lock-free; read as a plain snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Default)]
pub struct VmCounters {
    pauses: AtomicU64,
    pause_ns_total: AtomicU64,
    pause_ns_max: AtomicU64,
    captures: AtomicU64,
    harvests: AtomicU64,
    dirty_pages_total: AtomicU64,
    harvest_ns_total: AtomicU64,
}

/// A reading of the counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub pauses: u64,
    pub pause_ns_total: u64,
    pub pause_ns_max: u64,
    pub captures: u64,
    pub harvests: u64,
    pub dirty_pages_total: u64,
    pub harvest_ns_total: u64,
    /// Times a vCPU stopped because its dirty ring was full (an epoch
    /// that dirtied more pages than a ring holds; 0 with the bitmap).
    #[serde(default)]
    pub dirty_ring_full_exits: u64,
}

impl VmCounters {
    pub fn record_pause(&self, took: Duration) {
        let ns = took.as_nanos() as u64;
        self.pauses.fetch_add(1, Relaxed);
        self.pause_ns_total.fetch_add(ns, Relaxed);
        self.pause_ns_max.fetch_max(ns, Relaxed);
    }

    pub fn record_capture(&self) {
        self.captures.fetch_add(1, Relaxed);
    }

    pub fn record_harvest(&self, pages: u64, took: Duration) {
        self.harvests.fetch_add(1, Relaxed);
        self.dirty_pages_total.fetch_add(pages, Relaxed);
        self.harvest_ns_total
            .fetch_add(took.as_nanos() as u64, Relaxed);
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            pauses: self.pauses.load(Relaxed),
            pause_ns_total: self.pause_ns_total.load(Relaxed),
            pause_ns_max: self.pause_ns_max.load(Relaxed),
            captures: self.captures.load(Relaxed),
            harvests: self.harvests.load(Relaxed),
            dirty_pages_total: self.dirty_pages_total.load(Relaxed),
            harvest_ns_total: self.harvest_ns_total.load(Relaxed),
            dirty_ring_full_exits: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_accumulate() {
        let c = VmCounters::default();
        c.record_pause(Duration::from_micros(3));
        c.record_pause(Duration::from_micros(5));
        c.record_harvest(10, Duration::from_micros(1));
        let s = c.snapshot();
        assert_eq!(
            (s.pauses, s.pause_ns_total, s.pause_ns_max),
            (2, 8000, 5000)
        );
        assert_eq!((s.harvests, s.dirty_pages_total), (1, 10));
    }
}
