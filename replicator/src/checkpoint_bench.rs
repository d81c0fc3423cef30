//! The checkpoint stop-time benchmark: rounds of the primary's own capture
//! ([`crate::primary::checkpoint::capture`]: pause, state, dirty pages
//! staged by the production stager, disk writes, output cut) on a running
//! VM, without a standby, with the guest running between rounds. What the
//! guest loses per checkpoint, next to this machine's memcpy measured in
//! the same process. `ftprotect bench` runs it.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm::vm::Vm;

use crate::primary::checkpoint::capture;
use crate::primary::PrimaryError;
use crate::protocol::PAGE_SIZE;
use crate::status::percentile;

/// Percentiles of one measured step, in microseconds (nearest rank).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Percentiles {
    fn of(samples: &[Duration]) -> Percentiles {
        let mut us: Vec<u64> = samples.iter().map(|d| d.as_micros() as u64).collect();
        Percentiles {
            p50_us: percentile(&mut us.clone(), 50.0),
            p99_us: percentile(&mut us.clone(), 99.0),
            max_us: percentile(&mut us, 100.0),
        }
    }
}

/// What a benchmark run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub rounds: u32,
    pub mem_mib: u64,
    /// Pause + state capture (what the guest loses without memory).
    pub stop_without_memory: Percentiles,
    pub pause: Percentiles,
    pub state_capture: Percentiles,
    /// Harvest of the dirty set and staging of its pages into frame
    /// payloads.
    pub pages: Percentiles,
    /// Pause to resume, everything included.
    pub stop_total: Percentiles,
    pub dirty_pages_mean: f64,
    /// Of them, those left writable (hot), per round.
    #[serde(default)]
    pub hot_pages_mean: f64,
    /// Harvest + staging cost per dirty page, and memcpy per 4 KiB page in
    /// this process.
    pub pages_ns_per_page: f64,
    pub memcpy_ns_per_page: f64,
}

/// `rounds` checkpoints' capture, `interval` of guest running between them.
pub fn run(vm: &Vm, rounds: u32, interval: Duration) -> Result<BenchReport, PrimaryError> {
    let rounds = rounds.max(1);
    let (mut wo, mut pause, mut state, mut pages, mut total) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut dirty_total, mut hot_total, mut pages_ns) = (0u64, 0u64, 0f64);
    // As the epochs do: a few pages summed for the page audit.
    let mut audit = crate::primary::audit::AuditPicker::new();
    // The first harvest reports every page: start from a clean slate.
    vm.pause();
    let cleared = vm.clear_dirty();
    vm.resume();
    cleared.map_err(|source| PrimaryError::Stage { epoch: 0, source })?;
    for epoch in 1..=u64::from(rounds) {
        std::thread::sleep(interval);
        let captured = capture(vm, epoch, false, Some(&mut audit));
        let resumed_at = Instant::now();
        vm.resume();
        let captured = captured?;
        // No standby: the cut output goes out at once.
        vm.output().release_through(epoch);
        let t = captured.times;
        wo.push(t.pause + t.state);
        pause.push(t.pause);
        state.push(t.state);
        pages.push(t.pages);
        total.push(t.total + resumed_at.elapsed());
        dirty_total += captured.pages.count;
        hot_total += captured.hot_pages;
        pages_ns += t.pages.as_nanos() as f64;
    }
    vm.output().open();
    vm.disk_writes().stop();
    Ok(BenchReport {
        rounds,
        mem_mib: vm.mem_mib(),
        stop_without_memory: Percentiles::of(&wo),
        pause: Percentiles::of(&pause),
        state_capture: Percentiles::of(&state),
        pages: Percentiles::of(&pages),
        stop_total: Percentiles::of(&total),
        dirty_pages_mean: dirty_total as f64 / f64::from(rounds),
        hot_pages_mean: hot_total as f64 / f64::from(rounds),
        pages_ns_per_page: if dirty_total == 0 {
            0.0
        } else {
            pages_ns / dirty_total as f64
        },
        memcpy_ns_per_page: memcpy_ns_per_page(64),
    })
}

/// This machine's memcpy speed in the same process, for ratios:
/// nanoseconds per 4 KiB page when copying `mib` MiB in one go.
pub fn memcpy_ns_per_page(mib: usize) -> f64 {
    let src = vec![0x5au8; mib << 20];
    let mut dst = vec![0u8; mib << 20];
    dst.copy_from_slice(&src); // fault the pages in first
    let start = Instant::now();
    dst.copy_from_slice(&src);
    let took = start.elapsed();
    std::hint::black_box(&dst);
    took.as_nanos() as f64 / ((mib << 20) / PAGE_SIZE) as f64
}
