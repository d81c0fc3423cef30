//! A planned switchover: the primary hands its running VM to the standby
//! without losing anything and without waiting for a heartbeat timeout.
//!
//! 1. The final checkpoint is captured at once, and the guest stays
//!    stopped from then on (its output up to that cut is batch N).
//! 2. Epoch N is sent and acknowledged by the standby.
//! 3. With a witness, this copy stops renewing its lease and releases the
//!    VM ([`Lease::release`]), so the standby's claim is granted at once.
//! 4. Batch N (output of the committed epoch N) does not leave from here:
//!    it goes to the standby (`FinalOutput`), which sends it from its own
//!    port right after announcing the guest's addresses there. The peers'
//!    answers (a client's next request, sent once it has its reply) then
//!    reach the new copy instead of this stopped one, where they would be
//!    lost until their sender's retransmission timer.
//!    Likewise the frames that reached this node's TAPs while the guest
//!    was stopped go to the standby (`Inbound`, numbered after those
//!    epoch N holds), which delivers them to the promoted guest: a request
//!    that arrived during the switchover is answered there at once, not
//!    after its sender's retransmission timer.
//! 5. The standby is told `Switchover` (epoch N). It answers by
//!    acknowledging epoch N again and promotes its replica of epoch N,
//!    which is this guest as it stopped; or it refuses.
//!
//! Until step 4 the switchover can be called off and the guest runs on
//! here, protected, batch N released here. Without the standby's answer
//! the VM is taken back at the witness (batch N then leaves here), or
//! this copy stops if the standby may have claimed it; without a witness,
//! only the standby's refusal lets the VM run on here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};
use vmm::vm::Vm;

use super::checkpoint::capture;
use super::epochs::send_final_epoch;
use super::{send_all, AckEvent, PrimaryError, Session};
use crate::protocol::{inbound_payloads, Message};
use crate::status::StatusBoard;
use vmm::replication::InboundFrame;

/// An operator's request for a switchover, shared by the control socket
/// and the epoch loop.
#[derive(Debug, Default)]
pub struct SwitchoverRequest {
    asked: AtomicBool,
    wake: Notify,
    /// A live migration (level HA) is asked: the next FT session switches
    /// over once its first epoch is acknowledged.
    migration: AtomicBool,
}

impl SwitchoverRequest {
    /// Asks for a switchover at the next moment the epoch loop can take
    /// one (at once when it waits for the next checkpoint).
    pub fn ask(&self) {
        self.asked.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Takes the request, if one is pending.
    pub(super) fn take(&self) -> bool {
        self.asked.swap(false, Ordering::SeqCst)
    }

    /// Asks for a live migration of an HA VM: with a level change to FT
    /// asked beside it, the session at FT that follows copies memory while
    /// the guest runs and switches over after its first epoch.
    pub fn ask_migration(&self) {
        self.migration.store(true, Ordering::SeqCst);
    }

    /// Takes the migration request, if one is pending.
    pub(super) fn take_migration(&self) -> bool {
        self.migration.swap(false, Ordering::SeqCst)
    }

    /// Resolves when a request may have arrived.
    pub(super) async fn asked(&self) {
        self.wake.notified().await
    }
}

/// What a switchover came to.
pub(super) enum Outcome {
    /// The standby was told to take over from this epoch; this copy must
    /// stop for good.
    HandedOver { epoch: u64 },
    /// Not handed over (why): epoch N committed as any other, the guest
    /// runs on here, protected.
    CalledOff(String),
}

/// Takes the final checkpoint as epoch `epoch` and hands the VM to the
/// standby. An error is a lost session, as for any epoch.
pub(super) async fn hand_over(
    vm: &Arc<Vm>,
    tx: &ft_link::LinkSender,
    acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    (epoch, generation): (u64, u64),
    session: &Session<'_>,
    status: &StatusBoard,
) -> Result<Outcome, PrimaryError> {
    let lease = session.lease;
    info!(epoch, "planned switchover: taking the final checkpoint");
    status.update(|s| s.message = Some(format!("switchover: final checkpoint {epoch}")));
    let stopped_at = Instant::now();
    let captured = capture(vm, epoch, false, None);
    // As any epoch's: a copy after a failed hand-over needs its pages.
    session
        .history
        .note_capture(epoch, captured.as_ref().ok(), vm.guest_pages());
    let captured = match captured {
        Ok(c) => c,
        Err(e) => {
            vm.resume();
            return Err(e);
        }
    };
    // The guest stays stopped: nothing the standby has not got may run.
    if let Err(e) = send_final_epoch(tx, acks, epoch, generation, captured, status).await {
        vm.resume();
        return Err(e);
    }
    status.update(|s| {
        s.epoch = epoch;
        s.counters.checkpoints += 1;
    });
    if let Some(lease) = lease {
        if let Err(why) = lease.release().await {
            release_here(vm, epoch, status);
            vm.resume();
            return Ok(Outcome::CalledOff(why));
        }
    }
    let final_output = vm.output().take_through(epoch);
    let handed_frames: usize = final_output.iter().map(Vec::len).sum();
    let waiting = vm.input().take_waiting();
    let waiting_frames = waiting.len();
    let mut messages: Vec<_> = output_batches(&final_output)
        .map(|batch| Message::FinalOutput(batch).into_frame(epoch, generation))
        .collect();
    messages.extend(
        inbound_payloads(waiting.iter().cloned())
            .into_iter()
            .map(|batch| Message::Inbound(batch).into_frame(0, generation)),
    );
    messages.push(Message::Switchover.into_frame(epoch, generation));
    // The standby's word: it takes the VM over (the final epoch's
    // acknowledgement, again) or refuses.
    let word = match send_all(tx, &messages, status).await {
        Ok(_) => confirmation(acks, epoch).await,
        Err(error) => Err(error),
    };
    if let Err(error) = word {
        let refused = matches!(error, PrimaryError::StandbyRefused { .. });
        let runs_on_here = match lease {
            // The witness decides: the standby claimed, or this copy
            // holds the VM again (then no claim can be granted to it).
            Some(lease) => lease.take_back().await,
            // Without a witness only the standby's refusal says it will
            // not take over; otherwise it may have, or may on the link's
            // silence, so this copy must not run on.
            None => refused,
        };
        if runs_on_here {
            warn!(epoch, %error, "the standby did not take the VM over: it runs on here");
            send_here(vm, final_output, status);
            give_back(vm, waiting);
            vm.resume();
            return Err(error);
        }
        warn!(epoch, %error, "the standby's word did not come and the VM cannot be taken back: this copy stops");
        return Ok(Outcome::HandedOver { epoch });
    }
    info!(
        epoch,
        handed_frames,
        waiting_frames,
        stopped_ms = stopped_at.elapsed().as_millis() as u64,
        "planned switchover: the standby takes over from the final epoch"
    );
    Ok(Outcome::HandedOver { epoch })
}

/// How long the standby has to say it takes the VM over.
const CONFIRM_WITHIN: Duration = Duration::from_secs(2);

/// The standby's answer to `Switchover` after epoch `epoch`: Ok when it
/// takes the VM over (it acknowledges that epoch again).
async fn confirmation(
    acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    epoch: u64,
) -> Result<(), PrimaryError> {
    match tokio::time::timeout(CONFIRM_WITHIN, acks.recv()).await {
        Ok(Some(Ok(got))) if got == epoch => Ok(()),
        Ok(Some(Ok(got))) => Err(PrimaryError::WrongAck {
            got,
            expected: epoch,
        }),
        Ok(Some(Err(error))) => Err(error),
        Ok(None) => Err(PrimaryError::AckStreamEnded),
        Err(_) => Err(PrimaryError::SwitchoverUnconfirmed {
            epoch,
            within: CONFIRM_WITHIN,
        }),
    }
}

/// Batch `epoch` leaves from here after all (the switchover was called
/// off).
fn release_here(vm: &Vm, epoch: u64, status: &StatusBoard) {
    let released = vm.output().release_through(epoch);
    status.update(|s| s.counters.output_frames_released += released as u64);
}

/// Frames taken for the standby leave from here after all (the VM was
/// taken back).
fn send_here(vm: &Vm, final_output: Vec<Vec<Vec<u8>>>, status: &StatusBoard) {
    let sent: usize = final_output
        .into_iter()
        .enumerate()
        .map(|(nic, frames)| vm.output().send_handed_over(nic, frames))
        .sum();
    status.update(|s| s.counters.output_frames_released += sent as u64);
}

/// Frames taken from the TAPs for the standby reach this guest after all
/// (the VM was taken back), before anything the TAPs got since.
fn give_back(vm: &Vm, waiting: Vec<InboundFrame>) {
    for frame in waiting {
        vm.input().replay(frame.nic as usize, [frame.frame]);
    }
}

/// An epoch's output (per NIC, in order) as the payloads of `FinalOutput`
/// or `EpochOutput` messages.
pub(super) fn output_batches(
    per_nic: &[Vec<Vec<u8>>],
) -> impl Iterator<Item = crate::protocol::InboundBatch> {
    let frames = per_nic.iter().enumerate().flat_map(|(nic, frames)| {
        frames
            .iter()
            .enumerate()
            .map(move |(seq, frame)| InboundFrame {
                nic: nic as u32,
                seq: seq as u64,
                frame: frame.clone(),
            })
    });
    inbound_payloads(frames.collect::<Vec<_>>()).into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the final epoch acknowledged again is a yes; a refusal, another
    /// epoch or the end of the stream is a no, with its reason.
    #[tokio::test]
    async fn the_standby_s_word_on_a_switchover_is_read_strictly() {
        let answer = |event: Option<AckEvent>| async move {
            let (tx, mut acks) = mpsc::unbounded_channel();
            if let Some(event) = event {
                tx.send(event).unwrap();
            }
            drop(tx);
            confirmation(&mut acks, 7).await
        };
        assert!(answer(Some(Ok(7))).await.is_ok());
        assert!(matches!(
            answer(Some(Ok(6))).await,
            Err(PrimaryError::WrongAck {
                got: 6,
                expected: 7
            })
        ));
        let refused = PrimaryError::StandbyRefused {
            reason: "a switchover after epoch 7, but this standby committed Some(6)".into(),
        };
        assert!(matches!(
            answer(Some(Err(refused))).await,
            Err(PrimaryError::StandbyRefused { .. })
        ));
        assert!(matches!(
            answer(None).await,
            Err(PrimaryError::AckStreamEnded)
        ));
    }
}
