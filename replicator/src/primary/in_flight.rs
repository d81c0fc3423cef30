//! Epochs sent and not yet acknowledged: a short queue, oldest first. An
//! acknowledgement must name the oldest; it releases that epoch's output
//! (output commit, strictly in order) and records its statistics. The
//! queue is bounded ([`InFlight::has_room`]), and so is how long the guest
//! may run past the oldest checkpoint not yet acknowledged (the throttle,
//! [`InFlight::check`]): a slow standby or A-link slows the guest down
//! instead of growing what is held.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use vmm::vm::Vm;

use super::delta_cache::DeltaFigures;
use super::epochs::PAUSE_WRITES_AT;
use super::{AckEvent, PrimaryConfig, PrimaryError};
use crate::status::{FtState, Role, Samples, StatusBoard};

/// Epochs in flight at most, by default (`ftprotect --epochs-in-flight`).
pub const DEFAULT_EPOCHS_IN_FLIGHT: usize = 4;

/// How often a wait looks at how long the guest has run past the oldest
/// checkpoint not acknowledged and what its disk writes hold.
pub(super) const BEHIND_CHECK_EVERY: Duration = Duration::from_millis(5);

/// An epoch sent (or being sent), waiting for its acknowledgement.
#[derive(Debug)]
pub(super) struct Pending {
    pub epoch: u64,
    /// When the guest ran again after its capture.
    pub resumed_at: Instant,
    /// How long its capture stopped the guest (synchronous mode: filled in
    /// at the acknowledgement, the guest stays stopped until then).
    pub stopped: Option<Duration>,
    pub stop_start: Instant,
    /// When its last frame was handed to the A-link.
    pub sent_at: Option<Instant>,
    /// When its frames began to go to the A-link, and their bytes (from
    /// its encoding on).
    pub send_from: Option<Instant>,
    pub bytes: u64,
    pub dirty: u64,
    /// Of those, pages the epoch before carried too.
    pub repeats: u64,
    /// Of them, those left writable (hot).
    pub hot: u64,
    pub writes: u64,
    /// The written maps' clock before its writes were taken.
    pub written_mark: u64,
    /// It came later than `max` after it was due.
    pub late: bool,
    /// How long its acknowledgement may take once it was sent
    /// ([`super::deadline`]); none for an epoch the standby checks (it
    /// digests the whole replica first, for as long as that takes).
    pub deadline: Option<Duration>,
    /// Its pages sent as deltas: counted in the status with its dirty
    /// pages, at its acknowledgement (counted at the send, a status read
    /// between the two showed more delta pages than dirty pages).
    pub deltas: DeltaFigures,
}

/// Why a guest was paused while an acknowledgement was awaited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BehindBy {
    /// Its disk writes not yet in any epoch reached [`PAUSE_WRITES_AT`].
    DiskWrites(u64),
    /// It ran [`IntervalLimits::max_run_ahead`] past the oldest checkpoint
    /// not acknowledged.
    ///
    /// [`IntervalLimits::max_run_ahead`]: crate::interval::IntervalLimits::max_run_ahead
    RunAhead(Duration),
}

/// The epochs in flight, the throttle and the statistics of those
/// committed.
pub(super) struct InFlight<'a> {
    vm: &'a Vm,
    status: &'a StatusBoard,
    queue: VecDeque<Pending>,
    max: usize,
    /// The guest is stopped anyway until each acknowledgement.
    synchronous: bool,
    max_run_ahead: Duration,
    /// When the last acknowledgement came.
    last_ack: Option<Instant>,
    /// When the guest was paused here, if it is.
    paused_at: Option<Instant>,
    /// When this session's initial synchronisation began (its duration is
    /// counted at the first acknowledgement).
    pub(super) sync_started: Option<Instant>,
    /// The written maps, told of each acknowledgement.
    pub(super) forgetter: Option<super::forget::Forgetter>,
    /// Acknowledgements in a row that found the guest paused (the first
    /// pause is logged as a warning, the end of the run too).
    streak: u64,
    stops: Samples,
    ack_times: Samples,
    /// What the A-link and the standby together get through.
    rate: ServiceRate,
}

/// The rate at which the A-link and the standby get epochs through: each
/// acknowledged epoch's bytes over its service time, from when it could
/// first be served (its sending began, or the epoch before it was
/// acknowledged, whichever came later) to its acknowledgement; smoothed.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ServiceRate {
    bytes_per_s: Option<f64>,
}

/// The weight of the newest epoch in [`ServiceRate`].
const RATE_WEIGHT: f64 = 0.2;
/// Epochs smaller than this say more of the round trip than of the rate.
const RATE_MIN_BYTES: u64 = 64 << 10;

impl ServiceRate {
    /// Epoch of `bytes`, whose sending began at `from`, acknowledged at
    /// `acked`; the epoch before it was acknowledged at `previous`.
    pub(super) fn observe(
        &mut self,
        bytes: u64,
        from: Instant,
        previous: Option<Instant>,
        acked: Instant,
    ) {
        let start = previous.map_or(from, |p| p.max(from));
        let took = acked.saturating_duration_since(start).as_secs_f64();
        if bytes < RATE_MIN_BYTES || took <= 0.0 {
            return;
        }
        let sample = bytes as f64 / took;
        self.bytes_per_s = Some(match self.bytes_per_s {
            Some(rate) => rate + RATE_WEIGHT * (sample - rate),
            None => sample,
        });
    }

    /// Bytes per second, once an epoch large enough was acknowledged.
    pub(super) fn bytes_per_s(&self) -> Option<u64> {
        self.bytes_per_s.map(|r| r as u64)
    }
}

impl<'a> InFlight<'a> {
    pub(super) fn new(vm: &'a Vm, status: &'a StatusBoard, config: &PrimaryConfig) -> Self {
        InFlight {
            vm,
            status,
            queue: VecDeque::new(),
            max: if config.synchronous {
                1
            } else {
                config.epochs_in_flight.max(1)
            },
            synchronous: config.synchronous,
            max_run_ahead: config.interval.max_run_ahead,
            last_ack: None,
            paused_at: None,
            sync_started: None,
            forgetter: None,
            streak: 0,
            stops: Samples::default(),
            ack_times: Samples::default(),
            rate: ServiceRate::default(),
        }
    }

    /// Bytes of the epochs in flight (those encoded).
    fn backlog_bytes(&self) -> u64 {
        self.queue.iter().map(|p| p.bytes).sum()
    }

    /// The newest epoch is encoded into `bytes` and goes to the A-link now.
    pub(super) fn sending(&mut self, bytes: u64) {
        if let Some(last) = self.queue.back_mut() {
            last.bytes = bytes;
            last.send_from = Some(Instant::now());
        }
        let backlog = self.backlog_bytes();
        self.status
            .update(|s| s.counters.epoch_backlog_bytes_now = backlog);
    }

    /// The newest epoch's pages went through the delta cache.
    pub(super) fn encoded(&mut self, figures: DeltaFigures) {
        if let Some(last) = self.queue.back_mut() {
            last.deltas = figures;
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Another epoch may be sent.
    pub(super) fn has_room(&self) -> bool {
        self.queue.len() < self.max
    }

    /// The throttle paused the guest (it runs again at the next
    /// acknowledgement): no checkpoint until then.
    pub(super) fn guest_paused(&self) -> bool {
        self.paused_at.is_some()
    }

    /// Epoch `pending.epoch` is about to be sent.
    pub(super) fn push(&mut self, pending: Pending) {
        self.queue.push_back(pending);
        let in_flight = self.queue.len() as u64;
        self.status.update(|s| {
            s.counters.epochs_in_flight_now = in_flight;
            s.counters.epochs_in_flight_max = s.counters.epochs_in_flight_max.max(in_flight);
        });
    }

    /// The newest epoch's frames are all handed to the A-link.
    pub(super) fn sent(&mut self) {
        if let Some(last) = self.queue.back_mut() {
            last.sent_at = Some(Instant::now());
        }
    }

    /// Takes one word of the standby: an acknowledgement of the oldest
    /// epoch in flight releases its output; anything else ends the session.
    pub(super) fn acked(&mut self, event: Option<AckEvent>) -> Result<(), PrimaryError> {
        let got = match event {
            Some(Ok(got)) => got,
            Some(Err(error)) => return Err(error),
            None => return Err(PrimaryError::AckStreamEnded),
        };
        let Some(oldest) = self.queue.front() else {
            return Err(PrimaryError::AckNothingInFlight { got });
        };
        if got != oldest.epoch {
            return Err(PrimaryError::WrongAck {
                got,
                expected: oldest.epoch,
            });
        }
        let committed = self.queue.pop_front().expect("the oldest is there");
        let now = Instant::now();
        if let Some(from) = committed.send_from {
            self.rate.observe(committed.bytes, from, self.last_ack, now);
        }
        self.last_ack = Some(now);
        if let Some(forgetter) = self.forgetter.as_mut() {
            forgetter.acked(committed.written_mark);
        }
        // Output commit: batch `epoch` (and nothing newer) may leave now.
        let released = self.vm.output().release_through(got);
        self.caught_up(got);
        self.record(committed, released);
        Ok(())
    }

    /// Waits until every epoch in flight is acknowledged.
    pub(super) async fn drain(
        &mut self,
        acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    ) -> Result<(), PrimaryError> {
        while !self.queue.is_empty() {
            self.next_ack(acks).await?;
        }
        Ok(())
    }

    /// Takes the next acknowledgement, throttling the guest meanwhile.
    async fn next_ack(
        &mut self,
        acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    ) -> Result<(), PrimaryError> {
        loop {
            tokio::select! {
                event = acks.recv() => return self.acked(event),
                _ = tokio::time::sleep(BEHIND_CHECK_EVERY) => self.check(acks)?,
            }
        }
    }

    /// Pauses the guest once it has run `max_run_ahead` past the oldest
    /// checkpoint not acknowledged, or its disk writes not yet in any
    /// epoch reach [`PAUSE_WRITES_AT`] while an epoch is in flight: that
    /// bounds the next epoch (its pages, its disk writes, so the time it
    /// takes to send) and the output held with it. Said in the status
    /// while it lasts, with a count of pauses and the time spent paused.
    /// An epoch sent and not acknowledged within the deadline ends the
    /// session ([`PrimaryError::StandbyUnresponsive`]).
    pub(super) fn check(
        &mut self,
        acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    ) -> Result<(), PrimaryError> {
        if self.overdue().is_err() {
            // Acknowledgements already here count first.
            while let Ok(event) = acks.try_recv() {
                self.acked(Some(event))?;
            }
            self.overdue()?;
        }
        self.throttle();
        Ok(())
    }

    /// The oldest epoch waited for its acknowledgement past the deadline
    /// since its sending ended, or since the epoch before it was
    /// acknowledged if that came later (the standby works in order: an
    /// epoch behind a slow one by design waits its turn). A send that
    /// stalls is the A-link's to judge (its send stall timeout).
    fn overdue(&self) -> Result<(), PrimaryError> {
        let Some(oldest) = self.queue.front() else {
            return Ok(());
        };
        let waiting_since = oldest
            .sent_at
            .map(|sent| self.last_ack.map_or(sent, |acked| acked.max(sent)));
        match (waiting_since, oldest.deadline) {
            (Some(since), Some(deadline)) if since.elapsed() >= deadline => {
                Err(PrimaryError::StandbyUnresponsive {
                    epoch: oldest.epoch,
                    deadline,
                })
            }
            _ => Ok(()),
        }
    }

    /// The throttle alone (while a send is under way: a send is never cut
    /// in the middle of a frame; the deadline is judged once it ends).
    pub(super) fn throttle(&mut self) {
        if self.paused_at.is_some() || self.synchronous {
            return;
        }
        let Some(oldest) = self.queue.front() else {
            return;
        };
        let held = self.vm.disk_writes().held_bytes();
        let ran = oldest.resumed_at.elapsed();
        let by = if held >= PAUSE_WRITES_AT {
            BehindBy::DiskWrites(held)
        } else if ran >= self.max_run_ahead {
            BehindBy::RunAhead(ran)
        } else {
            return;
        };
        self.vm.pause();
        self.paused_at = Some(Instant::now());
        let epoch = oldest.epoch;
        let why = match by {
            BehindBy::DiskWrites(held) => format!(
                "the guest wrote {} MiB to disk while checkpoint {epoch} is not \
                 acknowledged",
                held >> 20
            ),
            BehindBy::RunAhead(ran) => format!(
                "checkpoint {epoch} is not acknowledged {} ms after it was taken (the \
                 A-link or the standby is slower than the guest dirties memory)",
                ran.as_millis()
            ),
        };
        if self.streak == 0 {
            warn!(
                epoch,
                ?by,
                "the standby falls behind: guest paused until it acknowledges"
            );
        } else {
            debug!(
                epoch,
                ?by,
                streak = self.streak,
                "guest paused until the standby acknowledges"
            );
        }
        self.streak += 1;
        self.status.update(|s| {
            s.counters.behind_pauses += 1;
            s.message = Some(format!(
                "the standby falls behind: {why}; the guest is paused until it is"
            ));
        });
    }

    /// An acknowledgement came: a guest paused here runs again.
    fn caught_up(&mut self, epoch: u64) {
        match self.paused_at.take() {
            Some(paused_at) => {
                self.vm.resume();
                let paused_ms = paused_at.elapsed().as_millis() as u64;
                self.status
                    .update(|s| s.counters.behind_paused_ms += paused_ms);
            }
            None if self.streak > 0 => {
                info!(
                    epoch,
                    epochs_paused = self.streak,
                    "the standby keeps up again"
                );
                self.streak = 0;
                self.status.update(|s| s.message = None);
            }
            None => {}
        }
    }

    /// Statistics of a committed epoch, published in the status.
    fn record(&mut self, c: Pending, released: usize) {
        let stopped = c.stopped.unwrap_or_else(|| c.stop_start.elapsed());
        // An acknowledgement taken before its own send was seen to end has
        // no ack time (not a zero one).
        let ack_time = c.sent_at.map(|t| t.elapsed());
        self.stops.push(stopped);
        if let Some(ack_time) = ack_time {
            self.ack_times.push(ack_time);
        }
        let ack_time = ack_time.unwrap_or_default();
        let held_now = self.vm.output().holding_frames();
        let in_flight = self.queue.len() as u64;
        let backlog = self.backlog_bytes();
        let rate = self.rate.bytes_per_s();
        let (stops, ack_times) = (&self.stops, &self.ack_times);
        self.status.update(|s| {
            let n = &mut s.counters;
            s.epoch = c.epoch;
            n.checkpoints += 1;
            n.stop_us_p50 = stops.percentile_us(50.0);
            n.stop_us_p99 = stops.percentile_us(99.0);
            n.stop_us_max = n.stop_us_max.max(stopped.as_micros() as u64);
            n.observe_stop(stopped.as_micros() as u64);
            n.ack_us_p50 = ack_times.percentile_us(50.0);
            n.ack_us_p99 = ack_times.percentile_us(99.0);
            n.dirty_pages_total += c.dirty;
            n.dirty_pages_last = c.dirty;
            n.delta_pages_total += c.deltas.pages;
            n.delta_bytes_total += c.deltas.bytes;
            n.zero_delta_pages_total += c.deltas.from_zero;
            n.dirty_repeat_pages_total += c.repeats;
            n.hot_pages_total += c.hot;
            n.hot_pages_last = c.hot;
            n.disk_writes_total += c.writes;
            n.output_frames_released += released as u64;
            n.output_frames_held_now = held_now;
            n.epochs_in_flight_now = in_flight;
            n.epoch_backlog_bytes_now = backlog;
            if let Some(rate) = rate {
                n.epoch_service_bytes_per_s = rate;
            }
            if c.late {
                n.throttled += 1;
            }
        });
        if c.epoch == 1 {
            if let Some(started) = self.sync_started {
                let took = started.elapsed().as_millis() as u64;
                self.status.update(|s| s.counters.sync_ms_last = took);
            }
            self.status
                .set_state(Role::Primary, FtState::Protected, None);
        }
        debug!(
            epoch = c.epoch,
            stop_us = stopped.as_micros() as u64,
            dirty = c.dirty,
            ack_us = ack_time.as_micros() as u64,
            released,
            in_flight,
            "epoch committed"
        );
    }
}

impl Drop for InFlight<'_> {
    /// The session ended: nothing is in flight any more, and a guest
    /// paused here runs again.
    fn drop(&mut self) {
        self.status.update(|s| {
            s.counters.epochs_in_flight_now = 0;
            s.counters.epoch_backlog_bytes_now = 0;
        });
        if let Some(paused_at) = self.paused_at.take() {
            self.vm.resume();
            let paused_ms = paused_at.elapsed().as_millis() as u64;
            self.status
                .update(|s| s.counters.behind_paused_ms += paused_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_rate_counts_from_when_an_epoch_could_be_served() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut rate = ServiceRate::default();
        assert_eq!(rate.bytes_per_s(), None);
        // Too small to say anything of the rate.
        rate.observe(4096, t0, None, t0 + ms(10));
        assert_eq!(rate.bytes_per_s(), None);
        // 1 MB sent from t0, acknowledged at 100 ms: 10 MB/s.
        rate.observe(1_000_000, t0, None, t0 + ms(100));
        assert_eq!(rate.bytes_per_s(), Some(10_000_000));
        // The next one was sent at 20 ms but waited behind the first until
        // 100 ms; acknowledged at 150 ms: 1 MB in 50 ms, 20 MB/s, smoothed.
        rate.observe(1_000_000, t0 + ms(20), Some(t0 + ms(100)), t0 + ms(150));
        assert_eq!(rate.bytes_per_s(), Some(12_000_000));
        // Sent after the one before was acknowledged: from its sending.
        rate.observe(2_000_000, t0 + ms(300), Some(t0 + ms(150)), t0 + ms(400));
        assert_eq!(rate.bytes_per_s(), Some(13_600_000));
    }
}
