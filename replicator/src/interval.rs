//! When the next checkpoint is due. Between `min` and `max` (2 and 20 ms by
//! default): as soon as `min` allows while guest output waits for a
//! checkpoint (held output is latency a client sees), otherwise later the
//! more a checkpoint costs the guest, so that, below `max`, it loses about
//! a tenth of its time to them at most: the time it was stopped, and the
//! time its vCPUs waited for a CPU while the engine's process worked.
//!
//! Where the engine shares the guest's cores (a one-CPU lab node; a small
//! server) that wait is most of a checkpoint's cost: on a lab node about
//! 1.5-2 ms per checkpoint, a few pages or none, besides a stop of about
//! 0.6 ms. Counted, a CPU-bound guest there is checkpointed about 50 times
//! a second instead of about 90 and keeps 0.74 of its unprotected speed
//! instead of 0.60 (session 53, `SPIN` in the ledger VM, alternated runs).
//! The wait is a mean per checkpoint over the last reading window (a
//! quarter of a second, [`crate::primary`]'s `CpuWait`), so work that does
//! not grow with the checkpoints (the device threads, the heartbeats)
//! counts too, the more the fewer checkpoints there are: where the rest of
//! the process keeps a shared CPU busy, the interval sits at `max`. On a
//! server with cores to spare the vCPUs do not wait and the stop alone
//! counts. Output still brings the next checkpoint to `min`, whatever the
//! cost.

use std::time::{Duration, Instant};

/// The shortest epoch by default (`ftprotect --min-interval-ms`).
pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_millis(2);
/// The longest epoch by default (`ftprotect --max-interval-ms`).
pub const DEFAULT_MAX_INTERVAL: Duration = Duration::from_millis(20);
/// How long the guest may run past a checkpoint not yet acknowledged, by
/// default (`ftprotect --max-run-ahead-ms`).
pub const DEFAULT_MAX_RUN_AHEAD: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntervalLimits {
    pub min: Duration,
    pub max: Duration,
    /// The guest runs at most this long past a checkpoint whose
    /// acknowledgement has not come (it is paused then until it comes).
    /// This bounds the next epoch when the A-link or the standby is slower
    /// than the guest dirties memory: without it the epoch grows to the
    /// whole time the last one took to send, and the output it holds with
    /// it (seconds on a slow link: longer than the peers' ARP and TCP
    /// timers wait).
    pub max_run_ahead: Duration,
}

impl Default for IntervalLimits {
    fn default() -> Self {
        IntervalLimits {
            min: DEFAULT_MIN_INTERVAL,
            max: DEFAULT_MAX_INTERVAL,
            max_run_ahead: DEFAULT_MAX_RUN_AHEAD,
        }
    }
}

/// What a checkpoint cost the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestLoss {
    /// How long the checkpoint stopped the guest.
    pub stopped: Duration,
    /// How long its vCPUs (on average) were ready to run but waited for a
    /// CPU while the engine's process worked, per checkpoint of late
    /// (zero where they have cores of their own).
    pub waited: Duration,
}

impl GuestLoss {
    /// A checkpoint that only stopped the guest.
    pub fn stopped(stopped: Duration) -> GuestLoss {
        GuestLoss {
            stopped,
            waited: Duration::ZERO,
        }
    }
}

/// The guest runs at least this many times as long as it lost to a
/// checkpoint (within the limits).
const RUN_TO_STOP: u32 = 9;

impl IntervalLimits {
    /// How long after the last checkpoint's resume the next one is due.
    /// `loss`: what the last checkpoint cost the guest; `output_waiting`:
    /// whether the guest transmitted since then (then the next one comes
    /// at `min`, or once the guest ran as long as it was stopped).
    pub fn next(&self, loss: GuestLoss, output_waiting: bool) -> Duration {
        let by_cost = (loss.stopped + loss.waited) * RUN_TO_STOP;
        let wanted = if output_waiting {
            by_cost.min(self.min.max(loss.stopped))
        } else {
            by_cost
        };
        wanted.clamp(self.min, self.max)
    }
}

/// When the next checkpoint is due: [`IntervalLimits::next`] after the
/// last one's resume, brought forward to `min` after it when guest output
/// waits. `max` bounds the time from one checkpoint's start to the next's,
/// the stop included (`max` 20 ms: 50 checkpoints a second when the
/// standby keeps up and stops are short), but the guest runs at least as
/// long as it was last stopped, and `min` at the least.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    limits: IntervalLimits,
    /// When the guest resumed after the last checkpoint.
    resumed: Instant,
    next_due: Instant,
}

impl Schedule {
    /// The first checkpoint is due at once.
    pub fn new(limits: IntervalLimits) -> Schedule {
        let now = Instant::now();
        Schedule {
            limits,
            resumed: now,
            next_due: now,
        }
    }

    /// When the checkpoint is due, given whether output waits for it.
    pub fn due_at(&self, output_waiting: bool) -> Instant {
        if output_waiting {
            (self.resumed + self.limits.min).min(self.next_due)
        } else {
            self.next_due
        }
    }

    /// Whether the checkpoint comes later than `max` after it was due (the
    /// standby held the primary back).
    pub fn is_late(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.next_due) > self.limits.max
    }

    /// After a checkpoint that began at `stop_start` and cost the guest
    /// `loss`: plans the next one; returns the interval chosen, from now
    /// (the guest's resume).
    pub fn plan_next(
        &mut self,
        stop_start: Instant,
        loss: GuestLoss,
        output_waiting: bool,
    ) -> Duration {
        self.plan_next_at(Instant::now(), stop_start, loss, output_waiting)
    }

    /// [`Schedule::plan_next`] with the guest resumed at `now`.
    fn plan_next_at(
        &mut self,
        now: Instant,
        stop_start: Instant,
        loss: GuestLoss,
        output_waiting: bool,
    ) -> Duration {
        let stopped = loss.stopped;
        let wanted = now + self.limits.next(loss, output_waiting);
        // From the stop's start, but the guest runs at least as long as it
        // was stopped (a long stop, or a synchronous checkpoint's wait for
        // its acknowledgement, is not followed by a short run).
        let floor = now + self.limits.min.max(stopped);
        let period_end = stop_start
            .checked_add(self.limits.max)
            .map_or(wanted, |end| end.max(floor));
        self.resumed = now;
        self.next_due = wanted.min(period_end);
        self.next_due.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_shortens_and_cost_lengthens_within_limits() {
        let l = IntervalLimits::default();
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        let stopped = GuestLoss::stopped;
        // Cheap checkpoints, nothing waiting: as short as cost allows.
        assert_eq!(l.next(stopped(us(100)), false), ms(2));
        // Expensive ones: longer, capped at max.
        assert_eq!(l.next(stopped(ms(1)), false), ms(9));
        assert_eq!(l.next(stopped(ms(5)), false), ms(20));
        // Output waiting: the minimum, whatever the cost.
        assert_eq!(l.next(stopped(ms(1)), true), ms(2));
        assert_eq!(l.next(stopped(ms(5)), true), ms(5));
        assert_eq!(l.next(stopped(ms(50)), true), ms(20));
    }

    #[test]
    fn the_vcpus_wait_for_the_engine_counts_as_cost_but_output_still_comes_first() {
        let l = IntervalLimits::default();
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        let loss = |stopped, waited| GuestLoss { stopped, waited };
        // A 0.6 ms stop and 1.4 ms waited: nine times the 2 ms the guest
        // lost, not nine times the stop.
        assert_eq!(l.next(loss(us(600), us(1400)), false), ms(18));
        assert_eq!(l.next(loss(us(600), ms(3)), false), ms(20));
        // Cores to spare: nothing waited, the stop alone counts.
        assert_eq!(l.next(loss(us(600), Duration::ZERO), false), us(5400));
        // Output waiting: `min` after the resume, however long the wait;
        // only a stop longer than `min` makes the guest run as long.
        assert_eq!(l.next(loss(us(600), ms(3)), true), ms(2));
        assert_eq!(l.next(loss(ms(4), ms(3)), true), ms(4));
        // Planned from the stop's start: the period stays within `max`.
        let mut s = Schedule::new(l);
        let began = Instant::now();
        let chosen = s.plan_next_at(began + us(600), began, loss(us(600), ms(3)), false);
        assert_eq!(chosen, ms(20) - us(600));
        assert_eq!(s.due_at(true), began + us(600) + ms(2));
    }

    #[test]
    fn waiting_output_brings_the_checkpoint_forward() {
        let l = IntervalLimits::default();
        let ms = Duration::from_millis;
        let mut s = Schedule::new(l);
        // The first checkpoint: at once, output or not.
        assert_eq!(s.due_at(true), s.due_at(false));
        let now = Instant::now();
        let chosen = s.plan_next_at(now, now, GuestLoss::stopped(ms(2)), false);
        assert_eq!(chosen, ms(18));
        let quiet = s.due_at(false);
        let busy = s.due_at(true);
        assert_eq!(quiet - busy, ms(16), "due at min when output waits");
        assert!(!s.is_late(quiet));
        assert!(s.is_late(quiet + ms(21)));
    }

    #[test]
    fn the_longest_interval_counts_from_the_stops_start() {
        let l = IntervalLimits::default();
        let ms = Duration::from_millis;
        let mut s = Schedule::new(l);
        let began = Instant::now();
        // A checkpoint that stopped the guest 5 ms and cost enough for
        // `max`: the next is due 20 ms after it began, 15 ms after the
        // resume.
        let chosen = s.plan_next_at(began + ms(5), began, GuestLoss::stopped(ms(5)), false);
        assert_eq!(chosen, ms(15));
        assert_eq!(s.due_at(false), began + ms(20));
        // Stopped 12 ms: the guest runs as long (not 8 ms).
        let chosen = s.plan_next_at(began + ms(12), began, GuestLoss::stopped(ms(12)), false);
        assert_eq!(chosen, ms(12));
        // Stopped 30 ms (a synchronous checkpoint's wait): `max` from the
        // resume, as the cost asks.
        let chosen = s.plan_next_at(began + ms(30), began, GuestLoss::stopped(ms(30)), false);
        assert_eq!(chosen, ms(20));
        // Output waiting after it: `min` after the resume.
        assert_eq!(s.due_at(true), began + ms(32));
    }
}
