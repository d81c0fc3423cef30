//! The standby side of an epoch: frames are staged until the epoch is
//! complete and checked, then applied to the replica's memory and disks in
//! one go.
//! Anything else (a torn, corrupt, replayed or reordered epoch) is refused
//! and the staged data is dropped: the replica never holds half an epoch.

use bytes::Bytes;
use ft_link::{EpochSequencer, Frame, FrameKind, SequenceError};
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryBackend};
use vmm::memory::GuestMemoryMmap;

use crate::epoch::{
    disk_records, hash_page_addresses, page_records, DiskRecord, EpochEnd, PAGE_SIZE,
};
use crate::replica_disk::{ReplicaDisk, ReplicaDiskError};

#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("{kind:?} frame of epoch {epoch} arrived outside any epoch")]
    OutsideEpoch { kind: FrameKind, epoch: u64 },
    #[error("epoch refused: {0}")]
    Sequence(#[from] SequenceError),
    #[error("frame of epoch {frame} arrived while epoch {staged} was being staged")]
    WrongEpoch { staged: u64, frame: u64 },
    #[error("epoch {epoch} never ended: epoch {next} began while it was being staged")]
    NeverEnded { epoch: u64, next: u64 },
    #[error("epoch {epoch} carries a malformed page frame ({len} bytes)")]
    BadPageFrame { epoch: u64, len: usize },
    #[error("epoch {epoch} has a malformed end record")]
    BadEnd { epoch: u64 },
    #[error("epoch {epoch} is torn: {announced} pages announced, {received} received")]
    Torn {
        epoch: u64,
        announced: u64,
        received: u64,
    },
    #[error("epoch {epoch}: the page frames do not match the end record's checksum (lost or reordered frames)")]
    PagesChecksum { epoch: u64 },
    #[error("epoch {epoch} carries a malformed disk-write frame ({len} bytes)")]
    BadDiskFrame { epoch: u64, len: usize },
    #[error("epoch {epoch} is torn: {announced} disk writes announced, {received} received")]
    TornWrites {
        epoch: u64,
        announced: u64,
        received: u64,
    },
    #[error("epoch {epoch}: the disk-write frames do not match the end record's checksum")]
    WritesChecksum { epoch: u64 },
    #[error("epoch {epoch}: {source}")]
    Disk {
        epoch: u64,
        #[source]
        source: ReplicaDiskError,
    },
    #[error("epoch {epoch} writes a page at {gpa:#x}, outside the replica's memory")]
    PageOutsideMemory { epoch: u64, gpa: u64 },
    #[error("applying epoch {epoch} failed: {source}")]
    Apply {
        epoch: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("unexpected {0:?} frame on the epoch stream")]
    Unexpected(FrameKind),
}

/// An epoch being received.
struct Staging {
    epoch: u64,
    state: Bytes,
    pages: Vec<(u64, Bytes)>,
    crc: crc32fast::Hasher,
    writes: Vec<DiskRecord>,
    writes_crc: crc32fast::Hasher,
}

/// A complete, checked epoch, ready to apply.
#[derive(Debug)]
pub struct CompleteEpoch {
    pub epoch: u64,
    pub state: Bytes,
    pub pages: Vec<(u64, Bytes)>,
    /// Disk writes in the order the primary executed them.
    pub writes: Vec<DiskRecord>,
}

/// Turns the frame stream into complete epochs and applies them in order.
pub struct EpochAssembler {
    sequencer: EpochSequencer,
    staging: Option<Staging>,
}

impl EpochAssembler {
    /// Expects `first_epoch` next.
    pub fn new(first_epoch: u64) -> Self {
        EpochAssembler {
            sequencer: EpochSequencer::new(first_epoch),
            staging: None,
        }
    }

    /// The next epoch this replica can apply.
    pub fn expected(&self) -> u64 {
        self.sequencer.expected()
    }

    /// Drops a half-received epoch (the link broke); returns its number.
    pub fn abort(&mut self) -> Option<u64> {
        self.staging.take().map(|s| s.epoch)
    }

    /// Takes one frame; returns the epoch it completed, if any. On error the
    /// staged epoch is dropped.
    pub fn on_frame(&mut self, frame: Frame) -> Result<Option<CompleteEpoch>, StandbyError> {
        let result = self.stage(frame);
        if result.is_err() {
            self.staging = None;
        }
        result
    }

    fn stage(&mut self, frame: Frame) -> Result<Option<CompleteEpoch>, StandbyError> {
        let epoch = frame.epoch;
        match frame.kind {
            FrameKind::Heartbeat => Ok(None),
            FrameKind::EpochBegin => {
                if let Some(s) = &self.staging {
                    return Err(StandbyError::NeverEnded {
                        epoch: s.epoch,
                        next: epoch,
                    });
                }
                self.sequencer.check(epoch)?;
                self.staging = Some(Staging {
                    epoch,
                    state: frame.payload,
                    pages: Vec::new(),
                    crc: crc32fast::Hasher::new(),
                    writes: Vec::new(),
                    writes_crc: crc32fast::Hasher::new(),
                });
                Ok(None)
            }
            FrameKind::Pages => {
                let s = self.staged(FrameKind::Pages, epoch)?;
                let records = page_records(&frame.payload).ok_or(StandbyError::BadPageFrame {
                    epoch,
                    len: frame.payload.len(),
                })?;
                s.pages.extend(records);
                hash_page_addresses(&frame.payload, &mut s.crc);
                Ok(None)
            }
            FrameKind::DiskWrites => {
                let s = self.staged(FrameKind::DiskWrites, epoch)?;
                let records = disk_records(&frame.payload).ok_or(StandbyError::BadDiskFrame {
                    epoch,
                    len: frame.payload.len(),
                })?;
                s.writes.extend(records);
                s.writes_crc.update(&frame.payload);
                Ok(None)
            }
            FrameKind::EpochEnd => {
                self.staged(FrameKind::EpochEnd, epoch)?;
                let s = self.staging.take().expect("checked above");
                let end =
                    EpochEnd::from_payload(&frame.payload).ok_or(StandbyError::BadEnd { epoch })?;
                let received = s.pages.len() as u64;
                if end.pages != received {
                    return Err(StandbyError::Torn {
                        epoch,
                        announced: end.pages,
                        received,
                    });
                }
                if end.pages_crc != s.crc.finalize() {
                    return Err(StandbyError::PagesChecksum { epoch });
                }
                let received = s.writes.len() as u64;
                if end.writes != received {
                    return Err(StandbyError::TornWrites {
                        epoch,
                        announced: end.writes,
                        received,
                    });
                }
                if end.writes_crc != s.writes_crc.finalize() {
                    return Err(StandbyError::WritesChecksum { epoch });
                }
                Ok(Some(CompleteEpoch {
                    epoch,
                    state: s.state,
                    pages: s.pages,
                    writes: s.writes,
                }))
            }
            other => Err(StandbyError::Unexpected(other)),
        }
    }

    fn staged(&mut self, kind: FrameKind, epoch: u64) -> Result<&mut Staging, StandbyError> {
        match &mut self.staging {
            None => Err(StandbyError::OutsideEpoch { kind, epoch }),
            Some(s) if s.epoch != epoch => Err(StandbyError::WrongEpoch {
                staged: s.epoch,
                frame: epoch,
            }),
            Some(s) => Ok(s),
        }
    }

    /// Applies a complete epoch to the replica's memory and disks: every
    /// address and disk range is checked first, so the epoch lands whole or
    /// not at all (short of the disk failing mid-way, which is reported).
    pub fn apply(
        &mut self,
        complete: &CompleteEpoch,
        mem: &GuestMemoryMmap,
        disks: &[ReplicaDisk],
    ) -> Result<(), StandbyError> {
        let epoch = complete.epoch;
        self.sequencer.check(epoch)?;
        for w in &complete.writes {
            crate::replica_disk::check(disks, w)
                .map_err(|source| StandbyError::Disk { epoch, source })?;
        }
        for (gpa, _) in &complete.pages {
            let last = GuestAddress(gpa + PAGE_SIZE as u64 - 1);
            if gpa % PAGE_SIZE as u64 != 0
                || !mem.address_in_range(GuestAddress(*gpa))
                || !mem.address_in_range(last)
            {
                return Err(StandbyError::PageOutsideMemory { epoch, gpa: *gpa });
            }
        }
        for (gpa, data) in &complete.pages {
            mem.write_slice(data, GuestAddress(*gpa))
                .map_err(|source| StandbyError::Apply { epoch, source })?;
        }
        for w in &complete.writes {
            disks[w.disk as usize]
                .write(w.offset, &w.data)
                .map_err(|source| StandbyError::Disk { epoch, source })?;
        }
        self.sequencer.applied(epoch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoch::encode;
    use vmm::memory;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE]
    }

    fn epoch_frames(epoch: u64, pages: &[(u64, Vec<u8>)]) -> Vec<Frame> {
        encode(
            epoch,
            Bytes::from_static(b"state"),
            pages.iter().map(|(g, d)| (*g, d.as_slice())),
        )
    }

    fn feed(
        a: &mut EpochAssembler,
        frames: Vec<Frame>,
    ) -> Result<Option<CompleteEpoch>, StandbyError> {
        let mut done = None;
        for f in frames {
            if let Some(c) = a.on_frame(f)? {
                done = Some(c);
            }
        }
        Ok(done)
    }

    fn read(mem: &GuestMemoryMmap, gpa: u64) -> u8 {
        mem.read_obj::<u8>(GuestAddress(gpa)).unwrap()
    }

    #[test]
    fn a_complete_epoch_lands_whole_and_in_order() {
        let ram = memory::create(16).unwrap();
        let mut a = EpochAssembler::new(1);
        // 130 pages: three page frames.
        let pages: Vec<(u64, Vec<u8>)> =
            (0..130u64).map(|i| (i * 4096, page(i as u8 + 1))).collect();
        let done = feed(&mut a, epoch_frames(1, &pages))
            .unwrap()
            .expect("complete");
        assert_eq!(done.state, Bytes::from_static(b"state"));
        a.apply(&done, &ram.memory, &[]).unwrap();
        assert_eq!(read(&ram.memory, 129 * 4096 + 17), 130);
        assert_eq!(a.expected(), 2);
    }

    #[test]
    fn a_torn_epoch_is_refused_and_nothing_is_applied() {
        let ram = memory::create(16).unwrap();
        let pages: Vec<(u64, Vec<u8>)> = (0..100u64).map(|i| (i * 4096, page(9))).collect();
        // A page frame lost in the middle.
        let mut a = EpochAssembler::new(1);
        let mut frames = epoch_frames(1, &pages);
        frames.remove(1);
        assert!(matches!(
            feed(&mut a, frames),
            Err(StandbyError::Torn {
                epoch: 1,
                announced: 100,
                received: 36
            })
        ));
        // An epoch that never ends before the next begins.
        let mut a = EpochAssembler::new(1);
        let mut frames = epoch_frames(1, &pages);
        frames.pop();
        frames.extend(epoch_frames(2, &pages));
        assert!(matches!(
            feed(&mut a, frames),
            Err(StandbyError::NeverEnded { epoch: 1, next: 2 })
        ));
        // The link broke mid-epoch.
        let mut a = EpochAssembler::new(1);
        let mut frames = epoch_frames(1, &pages);
        frames.pop();
        assert!(feed(&mut a, frames).unwrap().is_none());
        assert_eq!(a.abort(), Some(1));
        assert_eq!(
            read(&ram.memory, 0),
            0,
            "nothing of a refused epoch reached memory"
        );
        assert_eq!(a.expected(), 1);
    }

    #[test]
    fn reordered_page_frames_fail_the_epoch_checksum() {
        let pages: Vec<(u64, Vec<u8>)> = (0..100u64).map(|i| (i * 4096, page(i as u8))).collect();
        let mut a = EpochAssembler::new(1);
        let mut frames = epoch_frames(1, &pages);
        frames.swap(1, 2);
        assert!(matches!(
            feed(&mut a, frames),
            Err(StandbyError::PagesChecksum { epoch: 1 })
        ));
    }

    #[test]
    fn replayed_and_skipped_epochs_are_refused() {
        let ram = memory::create(16).unwrap();
        let pages = vec![(0u64, page(1))];
        let mut a = EpochAssembler::new(1);
        let one = feed(&mut a, epoch_frames(1, &pages)).unwrap().unwrap();
        a.apply(&one, &ram.memory, &[]).unwrap();
        let replay = feed(&mut a, epoch_frames(1, &[(0, page(7))]));
        assert!(matches!(
            replay,
            Err(StandbyError::Sequence(SequenceError::Replayed {
                got: 1,
                expected: 2
            }))
        ));
        assert!(
            a.apply(&one, &ram.memory, &[]).is_err(),
            "an applied epoch applies once"
        );
        let gap = feed(&mut a, epoch_frames(3, &pages));
        assert!(matches!(
            gap,
            Err(StandbyError::Sequence(SequenceError::Gap {
                got: 3,
                expected: 2
            }))
        ));
        assert_eq!(read(&ram.memory, 0), 1);
    }

    #[test]
    fn malformed_frames_and_wild_addresses_are_refused() {
        let ram = memory::create(16).unwrap();
        let mut a = EpochAssembler::new(1);
        let stray = Frame::new(FrameKind::Pages, 1, Bytes::from(vec![0u8; 4104]));
        assert!(matches!(
            a.on_frame(stray),
            Err(StandbyError::OutsideEpoch { .. })
        ));
        a.on_frame(Frame::new(FrameKind::EpochBegin, 1, Bytes::new()))
            .unwrap();
        let short = Frame::new(FrameKind::Pages, 1, Bytes::from(vec![0u8; 100]));
        assert!(matches!(
            a.on_frame(short),
            Err(StandbyError::BadPageFrame { epoch: 1, len: 100 })
        ));
        // 16 MiB of RAM: a page at 64 MiB is outside it; nothing is written.
        let wild = vec![(0u64, page(5)), (64 << 20, page(5))];
        let done = feed(&mut a, epoch_frames(1, &wild)).unwrap().unwrap();
        assert!(matches!(
            a.apply(&done, &ram.memory, &[]),
            Err(StandbyError::PageOutsideMemory { .. })
        ));
        assert_eq!(read(&ram.memory, 0), 0);
    }
}
