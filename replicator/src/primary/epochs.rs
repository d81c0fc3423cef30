//! The epoch loop, one checkpoint after another, in steps: wait until the
//! checkpoint is due ([`wait_until_due`]), capture it with the guest
//! stopped ([`super::checkpoint::capture`]), send it and wait for its
//! acknowledgement ([`send_epoch`]), release its output (commit), and
//! record its statistics ([`EpochStats`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ft_link::LinkSender;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};
use vmm::vm::Vm;

use super::checkpoint::{capture, Captured};
use super::lease::GateMode;
use super::switchover::{hand_over, Outcome, SwitchoverRequest};
use super::{send_all, AckEvent, PrimaryConfig, PrimaryError, Session};
use crate::assembler::EPOCH_DISK_BYTES_MAX;
use crate::interval::Schedule;
use crate::protocol::{epoch_frames, Message};
use crate::status::{FtState, Role, Samples, StatusBoard};

pub(super) async fn epochs(
    vm: &Arc<Vm>,
    tx: &LinkSender,
    acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    session: &Session<'_>,
    config: &PrimaryConfig,
    status: &StatusBoard,
    stop: &Notify,
) -> Result<Infallible, PrimaryError> {
    let generation = session.generation;
    // Held output wakes the wait for the next checkpoint.
    let output = Arc::new(Notify::new());
    let wake = Arc::clone(&output);
    vm.output()
        .on_held_output(Arc::new(move || wake.notify_one()));
    let mut schedule = Schedule::new(config.interval);
    let mut stats = EpochStats::default();
    let mut behind = Behind::new(vm, status, config);
    // A switchover asked before this session is not for it.
    config.switchover.take();
    for epoch in 1.. {
        let wake = wait_until_due(vm, &schedule, &output, stop, &config.switchover).await;
        // Not before the first epoch: the standby holds nothing to run yet.
        if wake == Wake::Switchover && epoch > 1 {
            let outcome = hand_over(vm, tx, acks, epoch, generation, session.lease, status).await?;
            match outcome {
                Outcome::HandedOver { epoch } => return Err(PrimaryError::SwitchedOver { epoch }),
                Outcome::CalledOff(why) => {
                    warn!(epoch, why, "switchover called off: the VM runs on here");
                    status.update(|s| {
                        s.counters.switchovers_called_off += 1;
                        s.message = Some(format!("switchover called off: {why}"));
                    });
                    continue;
                }
            }
        }
        if wake == Wake::Stopped {
            // The VM ended. On purpose (the guest, or a stop asked): no
            // takeover. By a host fault (a vCPU failed): the standby takes
            // it over from the last epoch it committed; output not yet
            // released stays held (it never committed).
            let failed = config.vm_failed.load(std::sync::atomic::Ordering::SeqCst);
            let message = if failed {
                Message::Handover
            } else {
                Message::Stop
            };
            let _ = tx.send(&message.into_frame(epoch, generation)).await;
            return Err(PrimaryError::VmStopped);
        }
        let late = schedule.is_late(Instant::now());
        if epoch == 1 {
            // From the first epoch on, output leaves by acknowledgement
            // only (output commit), not under the witness's lease.
            if let Some(lease) = session.lease {
                lease.set_mode(vm, GateMode::Off);
            }
        }

        let stop_start = Instant::now();
        let verify = config
            .verify_next
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        let captured = if verify {
            // A digest reads the whole VM: off the async workers.
            crate::oracle::off_the_workers(|| capture(vm, epoch, true))
        } else {
            capture(vm, epoch, false)
        };
        if captured.is_err() || !config.synchronous {
            vm.resume();
        }
        let captured = captured?;
        let mut stopped = stop_start.elapsed();
        behind.start(epoch);
        let acked = send_epoch(tx, acks, epoch, generation, captured, status, &mut behind).await;
        if config.synchronous {
            vm.resume();
            stopped = stop_start.elapsed();
        }
        behind.caught_up();
        let sent = acked?;
        // Output commit: batch `epoch` may leave now.
        let released = vm.output().release_through(epoch);
        let interval = schedule.plan_next(stopped, vm.output().has_unsealed());
        stats.record(
            vm,
            status,
            Committed {
                epoch,
                stopped,
                sent,
                released,
                interval,
                late,
            },
        );
    }
    unreachable!("epochs run until the link fails")
}

/// What ends the wait for the next checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Due,
    /// The guest stopped.
    Stopped,
    /// The operator asked for a planned switchover.
    Switchover,
}

/// Waits until the next checkpoint is due (output produced meanwhile brings
/// it forward), the guest stopped or a switchover is asked.
async fn wait_until_due(
    vm: &Vm,
    schedule: &Schedule,
    output: &Notify,
    stop: &Notify,
    switchover: &SwitchoverRequest,
) -> Wake {
    loop {
        if switchover.take() {
            return Wake::Switchover;
        }
        let due = schedule.due_at(vm.output().has_unsealed());
        if Instant::now() >= due {
            return Wake::Due;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(due.into()) => {}
            _ = output.notified() => {}
            _ = switchover.asked() => {}
            _ = stop.notified() => return Wake::Stopped,
        }
    }
}

/// What sending an epoch found out.
pub(super) struct Sent {
    dirty: u64,
    writes: u64,
    /// From the end of the send to the acknowledgement.
    ack_time: Duration,
}

/// Encodes epoch `epoch` (the guest runs again, unless synchronous), sends
/// it and waits for its acknowledgement.
pub(super) async fn send_epoch(
    tx: &LinkSender,
    acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    epoch: u64,
    generation: u64,
    captured: Captured,
    status: &StatusBoard,
    behind: &mut Behind<'_>,
) -> Result<Sent, PrimaryError> {
    let dirty = captured.pages.count;
    let writes = captured.writes.1;
    let state = Bytes::from(captured.state.to_payload()?);
    let frames = epoch_frames(epoch, generation, state, captured.pages, captured.writes);
    // The standby's word is heard while sending too: a silence (or any
    // error) the acknowledgement reader found ends the epoch at once,
    // instead of after a send that stalls on a dead peer
    // (`send_stall_timeout`, four heartbeat timeouts).
    // The guest's run past the checkpoint is watched from the start: on a
    // slow link the send itself takes most of the epoch.
    let send = send_all(tx, &frames, status);
    tokio::pin!(send);
    loop {
        tokio::select! {
            sent = &mut send => { sent?; break; }
            event = acks.recv() => {
                return Err(match event {
                    Some(Err(error)) => error,
                    Some(Ok(got)) => PrimaryError::WrongAck { got, expected: epoch },
                    None => PrimaryError::AckStreamEnded,
                });
            }
            _ = tokio::time::sleep(BEHIND_CHECK_EVERY) => behind.check(),
        }
    }
    let sent_at = Instant::now();
    let answer = loop {
        tokio::select! {
            answer = acks.recv() => break answer,
            _ = tokio::time::sleep(BEHIND_CHECK_EVERY) => behind.check(),
        }
    };
    match answer {
        Some(Ok(got)) if got == epoch => Ok(Sent {
            dirty,
            writes,
            ack_time: sent_at.elapsed(),
        }),
        Some(Ok(got)) => Err(PrimaryError::WrongAck {
            got,
            expected: epoch,
        }),
        Some(Err(e)) => Err(e),
        None => Err(PrimaryError::AckStreamEnded),
    }
}

/// How often the wait for an acknowledgement looks at how long the guest
/// has run past the checkpoint and what its disk writes hold.
const BEHIND_CHECK_EVERY: Duration = Duration::from_millis(5);

/// The guest is paused when its recorded disk writes pass this while an
/// acknowledgement is awaited: the next epoch stays within what the
/// standby stages ([`EPOCH_DISK_BYTES_MAX`]), and the record's memory is
/// bounded.
pub(super) const PAUSE_WRITES_AT: u64 = EPOCH_DISK_BYTES_MAX / 2;

/// Why a guest was paused while an acknowledgement was awaited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BehindBy {
    /// Its disk writes since the checkpoint reached [`PAUSE_WRITES_AT`].
    DiskWrites(u64),
    /// It ran [`IntervalLimits::max_run_ahead`] past the checkpoint.
    ///
    /// [`IntervalLimits::max_run_ahead`]: crate::interval::IntervalLimits::max_run_ahead
    RunAhead(Duration),
}

/// Throttles a guest whose standby (or A-link) falls behind: the epoch
/// lengthens while its acknowledgement is awaited (the next checkpoint
/// waits for it); once the guest has run `max_run_ahead` past the
/// checkpoint, or its disk writes since then reach [`PAUSE_WRITES_AT`],
/// the guest pauses until the acknowledgement comes. That bounds the next
/// epoch (its pages, its disk writes, and so the time it takes to send)
/// and the output held with it. Said in the status while it lasts, with a
/// count of pauses and the time spent paused.
pub(super) struct Behind<'a> {
    vm: &'a Vm,
    status: &'a StatusBoard,
    /// The guest is paused anyway until the acknowledgement.
    synchronous: bool,
    max_run_ahead: Duration,
    /// The epoch awaited, and when the guest ran again after its capture.
    epoch: u64,
    resumed_at: Instant,
    /// When the guest was paused here, if it is.
    paused_at: Option<Instant>,
    /// Epochs in a row that paused the guest (the first is logged as a
    /// warning, the end of the run too).
    streak: u64,
}

impl<'a> Behind<'a> {
    pub(super) fn new(vm: &'a Vm, status: &'a StatusBoard, config: &PrimaryConfig) -> Self {
        Behind {
            vm,
            status,
            synchronous: config.synchronous,
            max_run_ahead: config.interval.max_run_ahead,
            epoch: 0,
            resumed_at: Instant::now(),
            paused_at: None,
            streak: 0,
        }
    }

    /// For an epoch whose guest stays stopped until it is acknowledged
    /// (nothing to throttle).
    pub(super) fn stopped(vm: &'a Vm, status: &'a StatusBoard) -> Self {
        Behind {
            vm,
            status,
            synchronous: true,
            max_run_ahead: Duration::MAX,
            epoch: 0,
            resumed_at: Instant::now(),
            paused_at: None,
            streak: 0,
        }
    }

    /// Epoch `epoch` was captured and the guest runs again.
    fn start(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.resumed_at = Instant::now();
        self.paused_at = None;
    }

    fn check(&mut self) {
        if self.paused_at.is_some() || self.synchronous {
            return;
        }
        let held = self.vm.disk_writes().held_bytes();
        let ran = self.resumed_at.elapsed();
        let by = if held >= PAUSE_WRITES_AT {
            BehindBy::DiskWrites(held)
        } else if ran >= self.max_run_ahead {
            BehindBy::RunAhead(ran)
        } else {
            return;
        };
        self.vm.pause();
        self.paused_at = Some(Instant::now());
        let epoch = self.epoch;
        let why = match by {
            BehindBy::DiskWrites(held) => format!(
                "the guest wrote {} MiB to disk since checkpoint {epoch}, which is not \
                 acknowledged yet",
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

    /// The acknowledgement came (or the session ended): a guest paused
    /// here runs again.
    fn caught_up(&mut self) {
        match self.paused_at.take() {
            Some(paused_at) => {
                self.vm.resume();
                let paused_ms = paused_at.elapsed().as_millis() as u64;
                self.status
                    .update(|s| s.counters.behind_paused_ms += paused_ms);
            }
            None if self.streak > 0 => {
                info!(
                    epoch = self.epoch,
                    epochs_paused = self.streak,
                    "the standby keeps up again"
                );
                self.streak = 0;
                self.status.update(|s| s.message = None);
            }
            None => {}
        }
    }
}

impl Drop for Behind<'_> {
    /// The session ended while the guest was paused here: it runs again.
    fn drop(&mut self) {
        if self.paused_at.is_some() {
            self.caught_up();
        }
    }
}

/// One committed epoch, for the statistics.
struct Committed {
    epoch: u64,
    stopped: Duration,
    sent: Sent,
    released: usize,
    interval: Duration,
    late: bool,
}

/// The primary's checkpoint statistics, published in the status.
#[derive(Default)]
struct EpochStats {
    stops: Samples,
    ack_times: Samples,
}

impl EpochStats {
    fn record(&mut self, vm: &Vm, status: &StatusBoard, c: Committed) {
        self.stops.push(c.stopped);
        self.ack_times.push(c.sent.ack_time);
        let held_now = vm.output().holding_frames();
        status.update(|s| {
            let n = &mut s.counters;
            s.epoch = c.epoch;
            n.checkpoints += 1;
            n.stop_us_p50 = self.stops.percentile_us(50.0);
            n.stop_us_p99 = self.stops.percentile_us(99.0);
            n.stop_us_max = n.stop_us_max.max(c.stopped.as_micros() as u64);
            n.observe_stop(c.stopped.as_micros() as u64);
            n.ack_us_p50 = self.ack_times.percentile_us(50.0);
            n.ack_us_p99 = self.ack_times.percentile_us(99.0);
            n.interval_us_last = c.interval.as_micros() as u64;
            n.dirty_pages_total += c.sent.dirty;
            n.dirty_pages_last = c.sent.dirty;
            n.disk_writes_total += c.sent.writes;
            n.output_frames_released += c.released as u64;
            n.output_frames_held_now = held_now;
            if c.late {
                n.throttled += 1;
            }
        });
        if c.epoch == 1 {
            status.set_state(Role::Primary, FtState::Protected, None);
        }
        debug!(
            epoch = c.epoch,
            stop_us = c.stopped.as_micros() as u64,
            dirty = c.sent.dirty,
            ack_us = c.sent.ack_time.as_micros() as u64,
            released = c.released,
            "epoch committed"
        );
    }
}
