//! What the engine's own work costs the guest beyond its stops: how long
//! the vCPUs were ready to run but waited for a CPU while the rest of the
//! process (the engine's encoding and sending, its heartbeats, the VM's
//! device threads) ran. On a node whose cores the vCPUs share with the
//! engine (a one-CPU lab node; a small server) this is what the guest
//! loses after each resume; with cores to spare it is near zero. The
//! status counts it (`vcpu_waited_us_total`), and the interval counts its
//! mean per checkpoint as part of a checkpoint's cost (see
//! [`crate::interval`]). The clocks are read at most every
//! [`READ_EVERY`], after the checkpoint's send, while the guest runs, and
//! the bound (the rest of the process's CPU time) holds over each such
//! window: where the vCPUs wait for other programs while the engine runs
//! on another core, a window can count some of that wait which readings
//! at every checkpoint would not (a sum of minimums is at most the
//! minimum of the sums). Where the engine and the vCPUs share one CPU, as
//! in a lab node, the two agree.

use std::time::{Duration, Instant};

use vmm::replication::{process_cpu_time, CpuTimes};
use vmm::vm::Vm;

/// The times at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reading {
    /// The vCPU threads', summed.
    vcpus: CpuTimes,
    /// The whole process's CPU time (the vCPU threads' included).
    process: Duration,
}

/// Measures, from one checkpoint to the next, how long the vCPUs waited
/// for the rest of the process.
pub(super) struct CpuWait {
    vcpus: u32,
    last: Option<Reading>,
    read_at: Instant,
    /// Checkpoints since the last reading.
    checkpoints: u32,
    /// The mean wait per checkpoint between the last two readings.
    per_checkpoint: Duration,
}

/// How often the clocks are read (one `pread` per vCPU and one
/// `clock_gettime`): a few times a second, not at each of the 50-500
/// checkpoints.
const READ_EVERY: Duration = Duration::from_millis(250);

impl CpuWait {
    pub(super) fn new(vm: &Vm) -> CpuWait {
        CpuWait {
            vcpus: u32::from(vm.config().vcpus).max(1),
            last: reading(vm),
            read_at: Instant::now(),
            checkpoints: 0,
            per_checkpoint: Duration::ZERO,
        }
    }

    /// How long the vCPUs waited per checkpoint (on average) between the
    /// last two readings; zero before the second.
    pub(super) fn per_checkpoint(&self) -> Duration {
        self.per_checkpoint
    }

    /// Called once per checkpoint. Since the last reading, once
    /// [`READ_EVERY`] passed (before, None): how long a vCPU waited on
    /// average, at most the CPU time the rest of the process used
    /// meanwhile (a wait for other programs of the node is not the
    /// engine's cost). Zero where the kernel does not tell.
    pub(super) fn since_last(&mut self, vm: &Vm, now: Instant) -> Option<Duration> {
        self.checkpoints += 1;
        if now.saturating_duration_since(self.read_at) < READ_EVERY {
            return None;
        }
        let reading = reading(vm);
        let waited = match (self.last, reading) {
            (Some(before), Some(after)) => waited(before, after, self.vcpus),
            _ => Duration::ZERO,
        };
        self.last = reading;
        self.read_at = now;
        self.per_checkpoint = waited / std::mem::take(&mut self.checkpoints);
        Some(waited)
    }
}

fn reading(vm: &Vm) -> Option<Reading> {
    Some(Reading {
        vcpus: vm.vcpu_cpu_times()?,
        process: process_cpu_time()
            .map_err(|error| tracing::debug!(%error, "the process's CPU time"))
            .ok()?,
    })
}

/// The mean wait of `vcpus` vCPUs from `before` to `after`, at most what
/// the process used besides them.
fn waited(before: Reading, after: Reading, vcpus: u32) -> Duration {
    let waiting = after.vcpus.waiting.saturating_sub(before.vcpus.waiting) / vcpus;
    let process = after.process.saturating_sub(before.process);
    let in_vcpus = after.vcpus.on_cpu.saturating_sub(before.vcpus.on_cpu);
    waiting.min(process.saturating_sub(in_vcpus))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(on_cpu_ms: u64, waiting_ms: u64, process_ms: u64) -> Reading {
        Reading {
            vcpus: CpuTimes {
                on_cpu: Duration::from_millis(on_cpu_ms),
                waiting: Duration::from_millis(waiting_ms),
            },
            process: Duration::from_millis(process_ms),
        }
    }

    #[test]
    fn the_wait_counts_up_to_what_the_rest_of_the_process_used() {
        let ms = Duration::from_millis;
        let before = at(100, 10, 150);
        // vCPUs ran 8 ms, waited 3; the process used 11: the engine 3.
        assert_eq!(waited(before, at(108, 13, 161), 1), ms(3));
        // They waited 5 ms while the engine used 1: other programs held
        // the CPU for the rest, not the engine's cost.
        assert_eq!(waited(before, at(108, 15, 159), 1), ms(1));
        // Two vCPUs waited 6 ms between them: 3 each on average.
        assert_eq!(waited(before, at(116, 16, 176), 2), ms(3));
        // With cores to spare nobody waits, however busy the engine.
        assert_eq!(waited(before, at(108, 10, 190), 1), ms(0));
        // Clocks that went back (a reading from another thread set) count
        // nothing.
        assert_eq!(waited(at(108, 13, 161), before, 1), ms(0));
    }
}
