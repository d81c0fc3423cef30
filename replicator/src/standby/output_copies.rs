//! The copies of the guest's output that come with the epochs
//! (`EpochOutput`, TCP segments only): kept for the last few committed
//! epochs (by epoch number: an idle guest's old copies go too), which the
//! primary may not have released when it died (epochs are pipelined
//! exactly when output waits, so several may be committed here and
//! unacknowledged there; with more than [`COMMITTED_OUTPUT_EPOCHS`] in
//! flight the older ones are not sent). A takeover sends them, oldest
//! first.

use std::collections::VecDeque;

use bytes::Bytes;
use tracing::warn;

use crate::protocol::{InboundBatch, EPOCH_OUTPUT_MAX};

/// The last committed epochs whose copies are kept (more than the epochs a
/// primary keeps in flight by default).
pub const COMMITTED_OUTPUT_EPOCHS: usize = 8;

/// One epoch's copy: per NIC, in order.
struct Copy {
    epoch: u64,
    per_nic: Vec<Vec<Bytes>>,
    bytes: usize,
    /// A frame did not fit: later ones are left out too (as the primary
    /// does), so the copy has no gaps.
    full: bool,
}

pub struct OutputCopies {
    nics: usize,
    /// The copy of the epoch being received.
    pending: Option<Copy>,
    /// Copies of the last committed epochs, oldest first.
    committed: VecDeque<Copy>,
}

impl OutputCopies {
    pub fn new(nics: usize) -> OutputCopies {
        OutputCopies {
            nics,
            pending: None,
            committed: VecDeque::new(),
        }
    }

    /// Part of the copy of epoch `epoch`'s output. A copy of an epoch at or
    /// before `committed` (one that cannot come now), frames past
    /// [`EPOCH_OUTPUT_MAX`] and frames of a NIC the replica does not have
    /// are left out: the guest's TCP sends those again after a takeover, as
    /// without the copy.
    pub fn add(&mut self, batch: InboundBatch, epoch: u64, committed: Option<u64>) {
        if committed.is_some_and(|c| epoch <= c) {
            warn!(
                epoch,
                ?committed,
                "a copy of an epoch's output after the epoch: left out"
            );
            return;
        }
        let nics = self.nics;
        let copy = match &mut self.pending {
            Some(copy) if copy.epoch == epoch => copy,
            pending => pending.insert(Copy {
                epoch,
                per_nic: vec![Vec::new(); nics],
                bytes: 0,
                full: false,
            }),
        };
        for record in batch.into_records() {
            copy.full = copy.full || copy.bytes + record.frame.len() > EPOCH_OUTPUT_MAX;
            if let Some(frames) = copy
                .per_nic
                .get_mut(record.nic as usize)
                .filter(|_| !copy.full)
            {
                copy.bytes += record.frame.len();
                frames.push(record.frame);
            }
        }
    }

    /// Epoch `epoch` committed: its copy (if it had output) joins the
    /// committed ones; copies of epochs [`COMMITTED_OUTPUT_EPOCHS`] or more
    /// before it go.
    pub fn committed(&mut self, epoch: u64) {
        match self.pending.take() {
            Some(copy) if copy.epoch == epoch => self.committed.push_back(copy),
            // A copy of a later epoch waits for it.
            Some(copy) if copy.epoch > epoch => self.pending = Some(copy),
            // A copy without its epoch (the primary moved on): never sent.
            _ => {}
        }
        let window = COMMITTED_OUTPUT_EPOCHS as u64;
        while self
            .committed
            .front()
            .is_some_and(|c| c.epoch + window <= epoch)
        {
            self.committed.pop_front();
        }
    }

    /// Per NIC, the committed copies' frames, oldest epoch first.
    pub fn in_order(self) -> Vec<Vec<Bytes>> {
        let mut per_nic = vec![Vec::new(); self.nics];
        for copy in self.committed {
            for (nic, frames) in copy.per_nic.into_iter().enumerate() {
                per_nic[nic].extend(frames);
            }
        }
        per_nic
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::inbound_payloads;

    fn copy_of(nic: u32, marks: &[u8], len: usize) -> InboundBatch {
        let frames = marks
            .iter()
            .enumerate()
            .map(|(seq, &mark)| vmm::replication::InboundFrame {
                nic,
                seq: seq as u64,
                frame: vec![mark; len],
            });
        inbound_payloads(frames.collect::<Vec<_>>()).remove(0)
    }

    fn marks(per_nic: &[Vec<Bytes>]) -> Vec<Vec<u8>> {
        per_nic
            .iter()
            .map(|f| f.iter().map(|b| b[0]).collect())
            .collect()
    }

    #[test]
    fn the_last_committed_copies_are_kept_in_order_and_bounded() {
        let mut copies = OutputCopies::new(2);
        for epoch in 1..=(COMMITTED_OUTPUT_EPOCHS as u64 + 2) {
            copies.add(copy_of(0, &[epoch as u8], 60), epoch, epoch.checked_sub(1));
            if epoch % 2 == 0 {
                copies.add(
                    copy_of(1, &[100 + epoch as u8], 60),
                    epoch,
                    epoch.checked_sub(1),
                );
            }
            copies.committed(epoch);
        }
        // A copy of epoch 11 whose epoch never commits is not sent.
        copies.add(copy_of(0, &[11], 60), 11, Some(10));
        let per_nic = copies.in_order();
        assert_eq!(
            marks(&per_nic)[0],
            (3..=10).collect::<Vec<u8>>(),
            "the last 8 epochs"
        );
        assert_eq!(marks(&per_nic)[1], vec![104, 106, 108, 110]);
    }

    #[test]
    fn copies_of_epochs_long_committed_go_even_when_later_ones_had_no_output() {
        let mut copies = OutputCopies::new(1);
        copies.add(copy_of(0, &[1], 60), 1, None);
        copies.committed(1);
        copies.add(copy_of(0, &[2], 60), 2, Some(1));
        copies.committed(2);
        // Epochs 3 to 9 sent nothing.
        (3..=9).for_each(|epoch| copies.committed(epoch));
        assert_eq!(
            marks(&copies.in_order()),
            vec![vec![2]],
            "epochs 2 to 9 are the last 8"
        );
    }

    #[test]
    fn a_late_copy_and_a_copy_past_the_bound_are_left_out() {
        let mut copies = OutputCopies::new(1);
        copies.add(copy_of(0, &[1], 60), 1, None);
        copies.committed(1);
        copies.add(copy_of(0, &[9], 60), 1, Some(1));
        let big = EPOCH_OUTPUT_MAX / 2;
        copies.add(copy_of(0, &[2, 3], big), 2, Some(1));
        copies.add(copy_of(0, &[4], big), 2, Some(1));
        // Small enough to fit, but after one that did not: left out too.
        copies.add(copy_of(0, &[5], 1), 2, Some(1));
        copies.add(copy_of(3, &[6], 60), 2, Some(1));
        copies.committed(2);
        assert_eq!(marks(&copies.in_order()), vec![vec![1, 2, 3]]);
    }
}
