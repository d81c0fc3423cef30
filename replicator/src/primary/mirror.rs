//! Level HA after the initial copy: the disks mirrored synchronously
//! (DRBD's protocol C). Each batch of guest writes goes to the standby as
//! an epoch of disk writes alone (no memory, no CPU state, an empty
//! `EpochBegin`); the standby writes it to its mirror, makes it durable
//! and acknowledges it; only then does the guest see those writes
//! complete ([`vmm::replication::DiskWrites::settle`]). Network output is
//! not held: a lost primary's VM is rebooted from the mirror, not resumed.
//!
//! Whatever ends the mirror (a lost standby, a stop) turns it
//! asynchronous first, so that writes waiting for the standby complete:
//! the VM runs on unprotected, which the status says.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ft_link::LinkSender;
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};
use vmm::replication::WritesThrough;
use vmm::vm::Vm;

use super::deadline;
use super::forget::Forgetter;
use super::{send_all, AckEvent, PrimaryConfig, PrimaryError, Session, DRAIN_AT_STOP};
use crate::protocol::{disk_payloads, epoch_frames, DiskRecord, Message, StagedPages};
use crate::stats::Samples;
use crate::status::{FtState, Role, StatusBoard};

/// A mirror epoch sent and not yet acknowledged.
struct Pending {
    epoch: u64,
    through: WritesThrough,
    writes: u64,
    sent_at: Instant,
    /// Its deadline runs from here: its sending, or the acknowledgement of
    /// the batch before it if that came later (the standby works in order).
    due_from: Instant,
    /// How long its acknowledgement may take from `due_from`
    /// ([`super::deadline`]).
    deadline: Duration,
    /// The written maps' clock before its writes were taken.
    written_mark: u64,
}

/// Turns the mirror asynchronous when dropped, and ends the doorbell's
/// watcher: writes waiting for the standby complete.
struct Unmirror<'a> {
    vm: &'a Vm,
    watching: Arc<AtomicBool>,
}

impl Drop for Unmirror<'_> {
    fn drop(&mut self) {
        self.vm.disk_writes().set_synchronous(false);
        self.watching.store(false, Ordering::SeqCst);
    }
}

/// How long the doorbell's watcher waits at a time (it checks whether it
/// is still wanted in between).
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// Wakes `wake` whenever the guest records a disk write, on a thread of
/// its own (the wait blocks), until `watching` is cleared.
fn watch_doorbell(vm: &Arc<Vm>, wake: Arc<Notify>, watching: Arc<AtomicBool>) {
    let vm = Arc::clone(vm);
    let spawned = std::thread::Builder::new()
        .name("ha-doorbell".into())
        .spawn(move || {
            let mut seen = vm.disk_writes().rings();
            while watching.load(Ordering::SeqCst) {
                let rings = vm.disk_writes().wait_for_writes(seen, WATCH_EVERY);
                if rings != seen {
                    seen = rings;
                    wake.notify_one();
                }
            }
        });
    if let Err(error) = spawned {
        // Without the watcher the mirror still sends at every
        // acknowledgement and every WATCH_EVERY.
        warn!(%error, "the disk-write watcher could not start: writes wait up to 100 ms");
    }
}

pub(super) async fn mirror(
    vm: &Arc<Vm>,
    tx: &LinkSender,
    acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    // `copied`: the disk bytes of the initial copy, which the standby
    // makes durable before it acknowledges batch 1.
    (session, mut forgetter, copied): (&Session<'_>, Forgetter, u64),
    config: &PrimaryConfig,
    status: &StatusBoard,
    stop: &Notify,
) -> Result<Infallible, PrimaryError> {
    let forgetter = &mut forgetter;
    let generation = session.generation;
    let writes = vm.disk_writes();
    let watching = Arc::new(AtomicBool::new(true));
    let _unmirror = Unmirror {
        vm,
        watching: Arc::clone(&watching),
    };
    let wake = Arc::new(Notify::new());
    watch_doorbell(vm, Arc::clone(&wake), watching);
    // From here on a write completes to the guest only once the standby
    // has it; what was recorded during the copy goes in epoch 1.
    writes.set_synchronous(true);
    let mut in_flight: VecDeque<Pending> = VecDeque::new();
    let mut ack_times = Samples::default();
    let mut epoch = 1u64;
    loop {
        if let Some(to) = config.relevel.pending() {
            if to != crate::level::Level::Ha {
                // Every batch acknowledged (their writes completed to the
                // guest), then the standby lets go without a takeover.
                drain(
                    acks,
                    (&mut in_flight, forgetter),
                    vm,
                    status,
                    &mut ack_times,
                    session,
                )
                .await?;
                tx.send(&Message::Stop.into_frame(epoch, generation))
                    .await?;
                return Err(PrimaryError::Relevel { to });
            }
            // Already at HA: nothing to change.
            config.relevel.take();
        }
        // A batch not acknowledged within its deadline: the standby hangs,
        // and the guest's writes wait for it; the session ends (the
        // mirror turns asynchronous, the writes complete). Acknowledgements
        // that came during a long send are taken first. The first batch
        // has a longer deadline: the standby makes the whole copy durable
        // before it acknowledges it.
        while let Ok(event) = acks.try_recv() {
            acked(
                Some(event),
                (&mut in_flight, forgetter),
                vm,
                status,
                &mut ack_times,
                session,
            )?;
        }
        if let Some(oldest) = in_flight.front() {
            if oldest.due_from.elapsed() >= oldest.deadline {
                return Err(unresponsive(oldest));
            }
        }
        let written_mark = vmm::replication::written_map::mark();
        let (taken, through) = writes.take_numbered();
        // Epoch 1 goes out even without writes: its acknowledgement says
        // the mirror is whole.
        if !taken.is_empty() || epoch == 1 {
            let count = taken.len() as u64;
            let frames = mirror_frames(epoch, generation, taken);
            send_all(tx, &frames, status).await?;
            in_flight.push_back(Pending {
                epoch,
                through,
                writes: count,
                sent_at: Instant::now(),
                due_from: Instant::now(),
                deadline: deadline::ack_deadline(config.ack_deadline, epoch, copied),
                written_mark,
            });
            epoch += 1;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = config.relevel.asked() => {}
            event = acks.recv() => acked(event, (&mut in_flight, forgetter), vm, status, &mut ack_times, session)?,
            _ = stop.notified() => {
                // The VM ended. By a host fault: the standby boots it from
                // its mirror now. On purpose: the writes in flight are
                // committed first (a while at most), then no takeover.
                let failed = config.vm_failed.load(Ordering::SeqCst);
                let message = if failed {
                    Message::Handover
                } else {
                    let drained = tokio::time::timeout(
                        DRAIN_AT_STOP,
                        drain(acks, (&mut in_flight, forgetter), vm, status, &mut ack_times, session),
                    )
                    .await;
                    if !matches!(drained, Ok(Ok(()))) {
                        warn!("disk writes in flight at the VM's stop were not acknowledged");
                    }
                    Message::Stop
                };
                let _ = tx.send(&message.into_frame(epoch, generation)).await;
                return Err(PrimaryError::VmStopped);
            }
        }
    }
}

/// The frames of mirror epoch `epoch`: an empty state, the writes, the end
/// record that checks them.
pub(crate) fn mirror_frames(
    epoch: u64,
    generation: u64,
    writes: Vec<vmm::replication::DiskWrite>,
) -> Vec<ft_link::Frame> {
    let records = writes.into_iter().map(|w| DiskRecord {
        disk: w.disk,
        offset: w.offset,
        data: Bytes::from(w.data),
    });
    epoch_frames(
        epoch,
        generation,
        Bytes::new(),
        StagedPages::default(),
        disk_payloads(records),
    )
}

fn unresponsive(oldest: &Pending) -> PrimaryError {
    PrimaryError::StandbyUnresponsive {
        epoch: oldest.epoch,
        deadline: oldest.deadline,
    }
}

/// The standby's next word, waited for until the oldest batch in flight is
/// past its acknowledgement deadline.
async fn next_word(
    acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    in_flight: &VecDeque<Pending>,
) -> Result<Option<AckEvent>, PrimaryError> {
    let Some(oldest) = in_flight.front() else {
        return Ok(acks.recv().await);
    };
    let due = oldest.due_from + oldest.deadline;
    tokio::time::timeout_at(due.into(), acks.recv())
        .await
        .map_err(|_| unresponsive(oldest))
}

/// Takes the standby's word until every batch in flight is acknowledged
/// (a level change waits for it, as does a stop), or until one is past the
/// acknowledgement deadline: a standby that hangs then does not hold the
/// guest's writes.
async fn drain(
    acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    (in_flight, forgetter): (&mut VecDeque<Pending>, &mut Forgetter),
    vm: &Vm,
    status: &StatusBoard,
    ack_times: &mut Samples,
    session: &Session<'_>,
) -> Result<(), PrimaryError> {
    while !in_flight.is_empty() {
        let word = next_word(acks, in_flight).await?;
        acked(word, (in_flight, forgetter), vm, status, ack_times, session)?;
    }
    Ok(())
}

/// The standby's word: the oldest epoch in flight acknowledged settles its
/// writes (the guest sees them complete).
fn acked(
    event: Option<AckEvent>,
    (in_flight, forgetter): (&mut VecDeque<Pending>, &mut Forgetter),
    vm: &Vm,
    status: &StatusBoard,
    ack_times: &mut Samples,
    session: &Session<'_>,
) -> Result<(), PrimaryError> {
    let got = match event {
        Some(Ok(got)) => got,
        Some(Err(error)) => return Err(error),
        None => return Err(PrimaryError::AckStreamEnded),
    };
    let Some(oldest) = in_flight.pop_front() else {
        return Err(PrimaryError::AckNothingInFlight { got });
    };
    if got != oldest.epoch {
        return Err(PrimaryError::WrongAck {
            got,
            expected: oldest.epoch,
        });
    }
    vm.disk_writes().settle(&oldest.through);
    if let Some(next) = in_flight.front_mut() {
        next.due_from = next.due_from.max(Instant::now());
    }
    forgetter.acked(oldest.written_mark);
    ack_times.push(oldest.sent_at.elapsed());
    status.update(|s| {
        let n = &mut s.counters;
        s.epoch = got;
        n.checkpoints += 1;
        n.disk_writes_total += oldest.writes;
        n.ack_us_p50 = ack_times.percentile_us(50.0);
        n.ack_us_p99 = ack_times.percentile_us(99.0);
        n.epochs_in_flight_now = in_flight.len() as u64;
    });
    if got == 1 {
        // The standby holds the whole copy: the initial synchronisation
        // is over.
        let took = session.sync_started.elapsed().as_millis() as u64;
        status.update(|s| s.counters.sync_ms_last = took);
        status.set_state(Role::Primary, FtState::Protected, None);
        info!("the standby's mirror is whole: disk writes complete once both nodes have them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(epoch: u64, due_from: Instant, deadline: Duration) -> VecDeque<Pending> {
        VecDeque::from([Pending {
            epoch,
            through: vec![epoch],
            writes: 1,
            sent_at: due_from,
            due_from,
            deadline,
            written_mark: 0,
        }])
    }

    /// A level change or a stop drains the batches in flight: a standby
    /// that hangs ends the drain at the deadline instead of holding the
    /// guest's writes (the drain waited for ever before).
    #[tokio::test]
    async fn a_drain_waits_for_the_standby_only_until_the_deadline() {
        let deadline = Duration::from_millis(200);
        let (tx, mut acks) = mpsc::unbounded_channel::<AckEvent>();
        // A batch sent now, never acknowledged: overdue in 200 ms.
        let started = Instant::now();
        let word = next_word(&mut acks, &pending(2, started, deadline)).await;
        assert!(
            matches!(
                word,
                Err(PrimaryError::StandbyUnresponsive { epoch: 2, .. })
            ),
            "{word:?}"
        );
        assert!(started.elapsed() >= deadline);
        // Already overdue, with its acknowledgement waiting: the word is
        // taken first.
        tx.send(Ok(2)).unwrap();
        let late = pending(2, Instant::now() - Duration::from_secs(1), deadline);
        let word = next_word(&mut acks, &late).await;
        assert!(matches!(word, Ok(Some(Ok(2)))), "{word:?}");
        // The first batch is judged by its own, longer deadline: not at
        // the others' (it waited for ever before)...
        let first_deadline = deadline::ack_deadline(deadline, 1, 0);
        let started = Instant::now();
        let first = tokio::time::timeout(
            deadline * 3,
            next_word(&mut acks, &pending(1, started, first_deadline)),
        )
        .await;
        assert!(
            first.is_err(),
            "the first batch was judged early: {first:?}"
        );
        // ... but at its own.
        let long_ago = started
            .checked_sub(first_deadline)
            .expect("the machine is up longer than the first deadline");
        let overdue = pending(1, long_ago, first_deadline);
        let word = next_word(&mut acks, &overdue).await;
        assert!(
            matches!(
                word,
                Err(PrimaryError::StandbyUnresponsive { epoch: 1, deadline }) if deadline == first_deadline
            ),
            "{word:?}"
        );
    }
}
