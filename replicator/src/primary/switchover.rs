//! A planned switchover: the primary hands its running VM to the standby
//! without losing anything and without waiting for a heartbeat timeout.
//!
//! 1. The final checkpoint is captured at once, and the guest stays
//!    stopped from then on (its output up to that cut is batch N).
//! 2. Epoch N is sent; once the standby acknowledges it, batch N leaves
//!    (output commit, as for any epoch) - nothing else is held.
//! 3. With a witness, this copy stops renewing its lease and releases the
//!    VM ([`Lease::release`]), so the standby's claim is granted at once.
//! 4. The standby is told `Switchover` (epoch N): it promotes its replica
//!    of epoch N, which is this guest as it stopped.
//!
//! Until step 4 the switchover can be called off and the guest runs on
//! here, protected; a failure after the release takes the VM back at the
//! witness, or stops this copy if the standby may have claimed it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};
use vmm::vm::Vm;

use super::checkpoint::capture;
use super::epochs::{send_epoch, Behind};
use super::lease::Lease;
use super::{AckEvent, PrimaryError};
use crate::protocol::Message;
use crate::status::StatusBoard;

/// An operator's request for a switchover, shared by the control socket
/// and the epoch loop.
#[derive(Debug, Default)]
pub struct SwitchoverRequest {
    asked: AtomicBool,
    wake: Notify,
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
    epoch: u64,
    generation: u64,
    lease: Option<&Lease>,
    status: &StatusBoard,
) -> Result<Outcome, PrimaryError> {
    info!(epoch, "planned switchover: taking the final checkpoint");
    status.update(|s| s.message = Some(format!("switchover: final checkpoint {epoch}")));
    let stopped_at = Instant::now();
    let captured = match capture(vm, epoch, false) {
        Ok(c) => c,
        Err(e) => {
            vm.resume();
            return Err(e);
        }
    };
    // The guest stays stopped: nothing the standby has not got may run.
    let mut behind = Behind::stopped(vm, status);
    if let Err(e) = send_epoch(tx, acks, epoch, generation, captured, status, &mut behind).await {
        vm.resume();
        return Err(e);
    }
    let released = vm.output().release_through(epoch);
    status.update(|s| {
        s.epoch = epoch;
        s.counters.checkpoints += 1;
        s.counters.output_frames_released += released as u64;
    });
    if let Some(lease) = lease {
        if let Err(why) = lease.release().await {
            vm.resume();
            return Ok(Outcome::CalledOff(why));
        }
    }
    let told = tx
        .send(&Message::Switchover.into_frame(epoch, generation))
        .await;
    if let Err(error) = told {
        let Some(lease) = lease else {
            // The standby holds epoch N and lost the link: without a
            // witness it takes over when the link falls silent, so this
            // copy must not run on.
            warn!(epoch, %error, "the switchover could not be told; the standby takes over on the link's silence");
            return Ok(Outcome::HandedOver { epoch });
        };
        if lease.take_back().await {
            warn!(epoch, %error, "the switchover could not be told: the VM runs on here");
            vm.resume();
            return Err(error.into());
        }
        warn!(epoch, %error, "the switchover could not be told and the VM could not be taken back: this copy stops");
        return Ok(Outcome::HandedOver { epoch });
    }
    info!(
        epoch,
        stopped_ms = stopped_at.elapsed().as_millis() as u64,
        "planned switchover: the standby takes over from the final epoch"
    );
    Ok(Outcome::HandedOver { epoch })
}
