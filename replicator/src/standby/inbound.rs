//! The frames the primary's guest received, as the standby keeps them:
//! those numbered at or past what the last committed checkpoint holds
//! (per NIC), in order, bounded in memory. A promotion replays them into
//! the guest; each commit drops those the new checkpoint holds.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::protocol::InboundBatch;

/// Bytes of frames kept past the last checkpoint; later frames are dropped
/// (the guest's peers send those again, as without forwarding).
pub const INBOUND_KEPT_BYTES_MAX: usize = 32 << 20;

/// How long the digests of forwarded frames are remembered (committed ones
/// too), so that a frame this node also overheard is not given twice: well
/// past the window of overheard frames.
pub const FORWARDED_REMEMBERED: Duration = Duration::from_secs(10);
/// The most digests remembered (the oldest go first).
pub const FORWARDED_REMEMBERED_MAX: usize = 1 << 16;

/// The uncommitted inbound frames of a replica.
pub struct InboundFrames {
    /// Per NIC, frames by sequence number.
    nics: Vec<VecDeque<(u64, Bytes)>>,
    /// Per NIC, the frames the last committed checkpoint holds; `None`
    /// until a checkpoint said (nothing is replayed without it).
    committed: Option<Vec<u64>>,
    bytes: usize,
    dropped: u64,
    /// Digests of the frames forwarded lately (see
    /// [`super::overheard::frame_digest`]), with when each came.
    recent: VecDeque<(Instant, u32)>,
}

impl InboundFrames {
    pub fn new(nics: usize) -> InboundFrames {
        InboundFrames {
            nics: vec![VecDeque::new(); nics],
            committed: None,
            bytes: 0,
            dropped: 0,
            recent: VecDeque::new(),
        }
    }

    /// Keeps the frames of `batch` that the committed checkpoint does not
    /// hold (a frame of a NIC the replica does not have is dropped).
    pub fn add(&mut self, batch: InboundBatch) {
        let now = Instant::now();
        for record in batch.into_records() {
            self.remember(now, &record.frame);
            let nic = record.nic as usize;
            let held = self
                .committed
                .as_ref()
                .and_then(|c| c.get(nic))
                .is_some_and(|&through| record.seq < through);
            let Some(frames) = self.nics.get_mut(nic) else {
                self.dropped += 1;
                continue;
            };
            if held {
                continue;
            }
            if self.bytes + record.frame.len() > INBOUND_KEPT_BYTES_MAX
                || frames.back().is_some_and(|&(last, _)| record.seq <= last)
            {
                self.dropped += 1;
                continue;
            }
            self.bytes += record.frame.len();
            frames.push_back((record.seq, record.frame));
        }
    }

    /// A checkpoint holding the first `through[n]` frames of each NIC
    /// committed: those frames are dropped.
    pub fn commit(&mut self, through: &[u64]) {
        if through.len() != self.nics.len() {
            // From a primary that does not forward: nothing to replay.
            self.committed = None;
            self.clear();
            return;
        }
        for (frames, &through) in self.nics.iter_mut().zip(through) {
            while frames.front().is_some_and(|&(seq, _)| seq < through) {
                let (_, frame) = frames.pop_front().expect("checked");
                self.bytes -= frame.len();
            }
        }
        self.committed = Some(through.to_vec());
    }

    fn remember(&mut self, now: Instant, frame: &[u8]) {
        let cutoff = now.checked_sub(FORWARDED_REMEMBERED);
        while self.recent.front().is_some_and(|&(at, _)| {
            cutoff.is_some_and(|c| at < c) || self.recent.len() >= FORWARDED_REMEMBERED_MAX
        }) {
            self.recent.pop_front();
        }
        self.recent
            .push_back((now, super::overheard::frame_digest(frame)));
    }

    /// The digests of the frames forwarded in the last
    /// [`FORWARDED_REMEMBERED`], committed or not.
    pub fn forwarded_digests(&self) -> HashSet<u32> {
        self.recent.iter().map(|&(_, digest)| digest).collect()
    }

    fn clear(&mut self) {
        self.nics.iter_mut().for_each(VecDeque::clear);
        self.bytes = 0;
    }

    /// Frames dropped (over the bound, out of order, or of no NIC).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Per NIC, the frames to replay into a guest promoted from the last
    /// committed checkpoint, in order: every kept frame from the first
    /// one that checkpoint lacks, up to the first gap (a frame after a
    /// missing one would reach the guest out of order). None without a
    /// checkpoint that said what it holds.
    pub fn into_replay(self) -> Vec<Vec<Bytes>> {
        let Some(committed) = self.committed else {
            return vec![Vec::new(); self.nics.len()];
        };
        self.nics
            .into_iter()
            .zip(committed)
            .map(|(frames, mut next)| {
                frames
                    .into_iter()
                    .take_while(|&(seq, _)| {
                        let in_order = seq == next;
                        next += 1;
                        in_order
                    })
                    .map(|(_, frame)| frame)
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::inbound_payloads;
    use vmm::replication::InboundFrame;

    fn batch(frames: &[(u32, u64)]) -> InboundBatch {
        let mut batches = inbound_payloads(frames.iter().map(|&(nic, seq)| InboundFrame {
            nic,
            seq,
            frame: vec![seq as u8; 60],
        }));
        assert_eq!(batches.len(), 1);
        batches.remove(0)
    }

    fn seqs(replay: &[Bytes]) -> Vec<u8> {
        replay.iter().map(|f| f[0]).collect()
    }

    #[test]
    fn only_frames_past_the_committed_checkpoint_are_replayed() {
        let mut inbound = InboundFrames::new(2);
        inbound.add(batch(&[(0, 3), (0, 4), (1, 0), (0, 5)]));
        inbound.commit(&[4, 0]);
        inbound.add(batch(&[(0, 2), (0, 6), (1, 1)]));
        let replay = inbound.into_replay();
        assert_eq!(
            seqs(&replay[0]),
            vec![4, 5, 6],
            "3 was held, 2 arrived late"
        );
        assert_eq!(seqs(&replay[1]), vec![0, 1]);
    }

    #[test]
    fn nothing_is_replayed_without_a_checkpoint_that_counted_or_past_a_gap() {
        let mut inbound = InboundFrames::new(1);
        inbound.add(batch(&[(0, 0), (0, 1)]));
        assert!(inbound.into_replay()[0].is_empty(), "no checkpoint yet");
        let mut inbound = InboundFrames::new(1);
        inbound.commit(&[10]);
        inbound.add(batch(&[(0, 10), (0, 12), (0, 13)]));
        assert_eq!(seqs(&inbound.into_replay()[0]), vec![10], "11 is missing");
        let mut inbound = InboundFrames::new(1);
        inbound.commit(&[10]);
        inbound.add(batch(&[(0, 10)]));
        inbound.commit(&[]);
        assert!(
            inbound.into_replay()[0].is_empty(),
            "a primary that stopped counting"
        );
    }

    #[test]
    fn frames_of_no_nic_or_out_of_order_are_dropped() {
        let mut inbound = InboundFrames::new(1);
        inbound.commit(&[0]);
        inbound.add(batch(&[(0, 0), (3, 0), (0, 0)]));
        assert_eq!(inbound.dropped(), 2);
        assert_eq!(seqs(&inbound.into_replay()[0]), vec![0]);
    }
}
