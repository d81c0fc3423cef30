//! The epoch loop, one checkpoint after another, in steps: wait until the
//! checkpoint is due and an epoch may be sent ([`wait_until_due`]),
//! capture it with the guest stopped ([`super::checkpoint::capture`]), and
//! send it ([`send_epoch`]). Epochs are pipelined: the next one may be
//! captured and sent while earlier ones await their acknowledgements
//! ([`InFlight`]: a few at most, each acknowledgement releasing its
//! epoch's output, strictly in order).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ft_link::{Frame, LinkSender};
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};
use vmm::vm::Vm;

use super::audit::AuditPicker;
use super::checkpoint::{capture, Captured};
use super::cpu_wait::CpuWait;
use super::deadline;
use super::delta_cache::DeltaCache;
use super::in_flight::{InFlight, Pending, BEHIND_CHECK_EVERY};
use super::lease::GateMode;
use super::switchover::{hand_over, output_batches, Outcome};
use super::{send_all, AckEvent, PrimaryConfig, PrimaryError, Session};
use crate::assembler::EPOCH_DISK_BYTES_MAX;
use crate::interval::{GuestLoss, Schedule};
use crate::protocol::{epoch_frames_from, Message};
use crate::status::StatusBoard;

pub(super) async fn epochs(
    vm: &Arc<Vm>,
    tx: &LinkSender,
    acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    // `copied`: the disk bytes of the initial copy, which the standby
    // makes durable before it acknowledges epoch 1.
    (session, forgetter, copied): (&Session<'_>, super::forget::Forgetter, u64),
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
    let mut cpu_wait = CpuWait::new(vm);
    let mut in_flight = InFlight::new(vm, status, config);
    // This session's: what its epochs gave the standby's replica.
    let mut delta_cache = DeltaCache::new(config.delta_cache_bytes);
    let mut audit = AuditPicker::new();
    in_flight.sync_started = Some(session.sync_started);
    in_flight.forgetter = Some(forgetter);
    // A switchover asked before this session is not for it; a live
    // migration asked before it is (it began with the change to FT).
    config.switchover.take();
    let migrating = config.switchover.take_migration();
    for epoch in 1.. {
        if migrating && epoch == 2 {
            // Epoch 1 holds the rest of the copy: once it is
            // acknowledged the standby can run the VM.
            info!(epoch, "live migration: memory copied; switching over");
            config.switchover.ask();
        }
        let wake =
            wait_until_due(vm, &schedule, &output, stop, config, acks, &mut in_flight).await?;
        // Not before the first epoch: the standby holds nothing to run yet.
        if wake == Wake::Switchover && epoch > 1 {
            // The final checkpoint follows every epoch acknowledged. Its
            // pages go whole, past the delta cache: should the switchover
            // be called off, the cache no longer knows what the replica
            // holds, and starts over.
            in_flight.drain(acks).await?;
            if let Some(cache) = delta_cache.as_mut() {
                cache.clear();
            }
            let outcome = hand_over(vm, tx, acks, (epoch, generation), session, status).await?;
            match outcome {
                Outcome::HandedOver { epoch } => return Err(PrimaryError::SwitchedOver { epoch }),
                Outcome::CalledOff(why) => {
                    warn!(epoch, why, "switchover called off: the VM runs on here");
                    status.update(|s| {
                        s.migrating = false;
                        s.counters.switchovers_called_off += 1;
                        s.message = Some(format!("switchover called off: {why}"));
                    });
                    continue;
                }
            }
        }
        if let Wake::Relevel(to) = wake {
            // Everything in flight acknowledged (its output released),
            // then the standby lets go without a takeover.
            in_flight.drain(acks).await?;
            tx.send(&Message::Stop.into_frame(epoch, generation))
                .await?;
            return Err(PrimaryError::Relevel { to });
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
                // The guest's last words: the epochs in flight are
                // committed before the standby lets the VM go, and their
                // output leaves (a while at most: the VM is ending).
                match tokio::time::timeout(DRAIN_AT_STOP, in_flight.drain(acks)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => warn!(
                        %error,
                        "epochs in flight at the VM's stop were not acknowledged: their output is dropped"
                    ),
                    Err(_) => warn!(
                        within_ms = DRAIN_AT_STOP.as_millis() as u64,
                        "epochs in flight at the VM's stop were not acknowledged in time: their output is dropped"
                    ),
                }
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
            crate::workers::off_the_workers(|| capture(vm, epoch, true, Some(&mut audit)))
        } else {
            capture(vm, epoch, false, Some(&mut audit))
        };
        if captured.is_err() || !config.synchronous {
            vm.resume();
        }
        // Kept for the next copy: what a standby left at an earlier
        // checkpoint of this session lacks.
        session
            .history
            .note_capture(epoch, captured.as_ref().ok(), vm.guest_pages());
        let captured = captured?;
        let stopped = (!config.synchronous).then(|| stop_start.elapsed());
        if let Some(stopped) = stopped {
            plan_next(&mut schedule, (stop_start, stopped), &cpu_wait, vm, status);
        }
        in_flight.push(Pending {
            epoch,
            resumed_at: Instant::now(),
            stopped,
            stop_start,
            sent_at: None,
            send_from: None,
            bytes: 0,
            dirty: captured.pages.count,
            repeats: captured.repeat_pages,
            hot: captured.hot_pages,
            writes: captured.writes.1,
            written_mark: captured.written_mark,
            late,
            deadline: (!verify).then(|| deadline::ack_deadline(config.ack_deadline, epoch, copied)),
            deltas: Default::default(),
        });
        let sent = send_epoch(
            tx,
            acks,
            (epoch, generation),
            captured,
            delta_cache
                .as_mut()
                .map(|cache| (cache, audit.delta_pivot(vm.guest_bytes()))),
            status,
            &mut in_flight,
        )
        .await;
        if config.synchronous {
            // The guest stayed stopped for the acknowledgement; it runs
            // again also when the session ended meanwhile (then it goes on
            // alone, or the lease fences it).
            let acked = match sent {
                Ok(()) => in_flight.drain(acks).await,
                Err(error) => Err(error),
            };
            vm.resume();
            acked?;
            let stopped = stop_start.elapsed();
            plan_next(&mut schedule, (stop_start, stopped), &cpu_wait, vm, status);
        } else {
            sent?;
        }
        // The guest runs: how long its vCPUs waited for the rest of the
        // process since the last reading.
        if let Some(waited) = cpu_wait.since_last(vm, Instant::now()) {
            status.update(|s| s.counters.vcpu_waited_us_total += waited.as_micros() as u64);
        }
    }
    unreachable!("epochs run until the link fails")
}

/// How long a VM that stops on purpose waits for its epochs in flight to
/// be acknowledged: well inside the time `ftprotect` gives the session to
/// end once the VM stopped (2 s), so that `Stop` reaches the standby
/// before the link closes (a link that just closes is a lost primary: the
/// standby would take over a VM stopped on purpose).
pub const DRAIN_AT_STOP: Duration = Duration::from_millis(500);

/// After a checkpoint that began at `stop_start` and stopped the guest
/// `stopped`: when the next one is due, by what it cost the guest (the
/// stop, and the vCPUs' wait for the engine per checkpoint of late).
fn plan_next(
    schedule: &mut Schedule,
    (stop_start, stopped): (Instant, Duration),
    cpu_wait: &CpuWait,
    vm: &Vm,
    status: &StatusBoard,
) {
    let loss = GuestLoss {
        stopped,
        waited: cpu_wait.per_checkpoint(),
    };
    let interval = schedule.plan_next(stop_start, loss, vm.output().has_unsealed());
    status.update(|s| s.counters.interval_us_last = interval.as_micros() as u64);
}

/// What ends the wait for the next checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Due,
    /// The guest stopped.
    Stopped,
    /// The operator asked for a planned switchover.
    Switchover,
    /// The operator asked for another protection level.
    Relevel(crate::level::Level),
}

/// Waits until the next checkpoint is due (output produced meanwhile brings
/// it forward) and an epoch may be sent (with output waiting, while
/// earlier ones are in flight; without, once none is), the guest stopped
/// or a switchover is asked. Acknowledgements are taken meanwhile (each releases its
/// epoch's output); a guest the throttle paused is not checkpointed until
/// the acknowledgement that lets it run again.
async fn wait_until_due(
    vm: &Vm,
    schedule: &Schedule,
    output: &Notify,
    stop: &Notify,
    config: &PrimaryConfig,
    acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    in_flight: &mut InFlight<'_>,
) -> Result<Wake, PrimaryError> {
    let switchover = &config.switchover;
    loop {
        if switchover.take() {
            return Ok(Wake::Switchover);
        }
        if let Some(to) = config.relevel.pending() {
            if to != crate::level::Level::Ft {
                return Ok(Wake::Relevel(to));
            }
            // Already at FT: nothing to change.
            config.relevel.take();
        }
        let output_waiting = vm.output().has_unsealed();
        let due = schedule.due_at(output_waiting);
        // Epochs pipeline for output only: without output waiting, a
        // checkpoint waits until none is in flight. Taken sooner it would
        // only queue behind them (the A-link's backlog, the standby's
        // work, and held output after it), and each harvest costs the
        // guest its write-protect faults again.
        let ready = in_flight.has_room()
            && !in_flight.guest_paused()
            && (output_waiting || in_flight.is_empty());
        if ready && Instant::now() >= due {
            return Ok(Wake::Due);
        }
        let watching = !in_flight.is_empty();
        tokio::select! {
            _ = tokio::time::sleep_until(due.into()), if ready => {}
            _ = output.notified() => {}
            _ = switchover.asked() => {}
            _ = config.relevel.asked() => {}
            _ = stop.notified() => return Ok(Wake::Stopped),
            event = acks.recv() => in_flight.acked(event)?,
            _ = tokio::time::sleep(BEHIND_CHECK_EVERY), if watching => in_flight.check(acks)?,
        }
    }
}

/// Encodes epoch `epoch` (the guest runs again, unless synchronous), its
/// pages as deltas where `deltas` holds them (those from the address
/// given on audited too), and sends it; acknowledgements of earlier
/// epochs are taken meanwhile.
async fn send_epoch(
    tx: &LinkSender,
    acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    (epoch, generation): (u64, u64),
    mut captured: Captured,
    mut deltas: Option<(&mut DeltaCache, u64)>,
    status: &StatusBoard,
    in_flight: &mut InFlight<'_>,
) -> Result<(), PrimaryError> {
    if let Some((cache, pivot)) = deltas.as_mut() {
        let (pages, figures) = cache.encode(
            std::mem::take(&mut captured.pages),
            (&mut captured.audit, *pivot),
        );
        captured.pages = pages;
        // Counted with its dirty pages, once it is acknowledged.
        in_flight.encoded(figures);
    }
    let frames = encode(
        (epoch, generation),
        captured,
        deltas.map(|(cache, _)| cache),
        status,
    )?;
    in_flight.sending(frames.iter().map(|f| f.wire_len() as u64).sum());
    // The standby's word is heard while sending too: a silence (or any
    // error) the acknowledgement reader found ends the epoch at once,
    // instead of after a send that stalls on a dead peer
    // (`send_stall_timeout`: four heartbeat timeouts, at least 1.2 s).
    // The guest's run past the oldest checkpoint not acknowledged is
    // watched from the start: on a slow link the send itself takes most of
    // the epoch.
    let send = send_all(tx, &frames, status);
    tokio::pin!(send);
    loop {
        tokio::select! {
            sent = &mut send => { sent?; break; }
            event = acks.recv() => in_flight.acked(event)?,
            _ = tokio::time::sleep(BEHIND_CHECK_EVERY) => in_flight.throttle(),
        }
    }
    in_flight.sent();
    Ok(())
}

/// The frames of epoch `epoch`; its state as a delta from the last
/// epoch's where `deltas` allows.
fn encode(
    (epoch, generation): (u64, u64),
    captured: Captured,
    deltas: Option<&mut DeltaCache>,
    status: &StatusBoard,
) -> Result<Vec<Frame>, PrimaryError> {
    let state = Bytes::from(captured.state.to_payload()?);
    let begin = match deltas {
        Some(cache) => cache.begin(state),
        None => Message::EpochBegin(state),
    };
    if matches!(begin, Message::EpochStateDelta(_)) {
        status.update(|s| s.counters.state_deltas_total += 1);
    }
    // The output's copy goes first: the standby holds it once the epoch
    // commits.
    let mut frames: Vec<Frame> = output_batches(&captured.output)
        .map(|batch| Message::EpochOutput(batch).into_frame(epoch, generation))
        .collect();
    frames.extend(epoch_frames_from(
        begin,
        (epoch, generation),
        captured.pages,
        captured.writes,
        captured.audit,
    ));
    Ok(frames)
}

/// Sends the final epoch of a switchover, the guest stopped and nothing
/// else in flight, and waits for its acknowledgement.
pub(super) async fn send_final_epoch(
    tx: &LinkSender,
    acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    epoch: u64,
    generation: u64,
    captured: Captured,
    status: &StatusBoard,
) -> Result<(), PrimaryError> {
    // Whole: it goes past the delta cache (see `epochs`).
    let frames = encode((epoch, generation), captured, None, status)?;
    let send = send_all(tx, &frames, status);
    tokio::pin!(send);
    tokio::select! {
        sent = &mut send => sent?,
        // Nothing else is in flight: a word before the send was seen to
        // end is a failure, or this epoch's acknowledgement already.
        event = acks.recv() => return acknowledges(event, epoch),
    };
    acknowledges(acks.recv().await, epoch)
}

/// Whether the standby's word `event` acknowledges `epoch`.
fn acknowledges(event: Option<AckEvent>, epoch: u64) -> Result<(), PrimaryError> {
    match event {
        Some(Ok(got)) if got == epoch => Ok(()),
        Some(Ok(got)) => Err(PrimaryError::WrongAck {
            got,
            expected: epoch,
        }),
        Some(Err(error)) => Err(error),
        None => Err(PrimaryError::AckStreamEnded),
    }
}

/// The guest is paused when its disk writes not yet in any epoch pass this
/// while an acknowledgement is awaited: the next epoch stays within what
/// the standby stages ([`EPOCH_DISK_BYTES_MAX`]), and the record's memory
/// is bounded.
pub(super) const PAUSE_WRITES_AT: u64 = EPOCH_DISK_BYTES_MAX / 2;
