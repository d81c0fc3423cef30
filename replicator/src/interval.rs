//! When the next checkpoint is due. Between `min` and `max` (2 and 20 ms by
//! default): as soon as `min` allows while guest output waits for a
//! checkpoint (held output is latency a client sees), otherwise later the
//! more a checkpoint costs, so the guest spends at most about a tenth of
//! its time stopped.

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

/// The guest runs at least this many times as long as it was stopped.
const RUN_TO_STOP: u32 = 9;

impl IntervalLimits {
    /// How long after the last checkpoint's resume the next one is due.
    /// `stopped`: how long the last checkpoint stopped the guest;
    /// `output_waiting`: whether the guest transmitted since then.
    pub fn next(&self, stopped: Duration, output_waiting: bool) -> Duration {
        let by_cost = stopped * RUN_TO_STOP;
        let wanted = if output_waiting {
            by_cost.min(self.min.max(stopped))
        } else {
            by_cost
        };
        wanted.clamp(self.min, self.max)
    }
}

/// When the next checkpoint is due: [`IntervalLimits::next`] after the
/// last one, brought forward to `min` after it when guest output waits.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    limits: IntervalLimits,
    interval: Duration,
    next_due: Instant,
}

impl Schedule {
    /// The first checkpoint is due at once.
    pub fn new(limits: IntervalLimits) -> Schedule {
        Schedule {
            limits,
            interval: limits.min,
            next_due: Instant::now(),
        }
    }

    /// When the checkpoint is due, given whether output waits for it.
    pub fn due_at(&self, output_waiting: bool) -> Instant {
        if output_waiting {
            self.next_due - self.interval + self.limits.min
        } else {
            self.next_due
        }
    }

    /// Whether the checkpoint comes later than `max` after it was due (the
    /// standby held the primary back).
    pub fn is_late(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.next_due) > self.limits.max
    }

    /// After a checkpoint that stopped the guest `stopped`: plans the next
    /// one; returns the interval chosen.
    pub fn plan_next(&mut self, stopped: Duration, output_waiting: bool) -> Duration {
        self.interval = self.limits.next(stopped, output_waiting);
        self.next_due = Instant::now() + self.interval;
        self.interval
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
        // Cheap checkpoints, nothing waiting: as short as cost allows.
        assert_eq!(l.next(us(100), false), ms(2));
        // Expensive ones: longer, capped at max.
        assert_eq!(l.next(ms(1), false), ms(9));
        assert_eq!(l.next(ms(5), false), ms(20));
        // Output waiting: the minimum, whatever the cost.
        assert_eq!(l.next(ms(1), true), ms(2));
        assert_eq!(l.next(ms(5), true), ms(5));
        assert_eq!(l.next(ms(50), true), ms(20));
    }

    #[test]
    fn waiting_output_brings_the_checkpoint_forward() {
        let l = IntervalLimits::default();
        let mut s = Schedule::new(l);
        let chosen = s.plan_next(Duration::from_millis(2), false);
        assert_eq!(chosen, Duration::from_millis(18));
        let quiet = s.due_at(false);
        let busy = s.due_at(true);
        assert_eq!(
            quiet - busy,
            Duration::from_millis(16),
            "due at min when output waits"
        );
        assert!(!s.is_late(quiet));
        assert!(s.is_late(quiet + Duration::from_millis(21)));
    }
}
