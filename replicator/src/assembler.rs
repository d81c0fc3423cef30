//! The standby side of an epoch: messages are staged until the epoch is
//! complete and checked, then applied to the replica's memory and disks in
//! one go.
//! Anything else (a torn, corrupt, replayed or reordered epoch) is refused
//! and the staged data is dropped: the replica never holds half an epoch.

use bytes::Bytes;
use vmm::replication::ReplicaRam;

use crate::protocol::delta;
use crate::protocol::{
    audit, DeltaBase, DeltaRecord, DiskRecord, Envelope, EpochEnd, Message, PageAudit, PageBatch,
    PageDeltaBatch, Picked, ProtocolError, PAGE_SIZE,
};
use crate::sequence::{EpochSequencer, SequenceError};
use crate::standby::replica_disk::{ReplicaDisk, ReplicaDiskError};

#[derive(Debug, thiserror::Error)]
pub enum AssemblerError {
    #[error("{kind} message of epoch {epoch} arrived outside any epoch")]
    OutsideEpoch { kind: &'static str, epoch: u64 },
    #[error("epoch refused: {0}")]
    Sequence(#[from] SequenceError),
    #[error("message of epoch {frame} arrived while epoch {staged} was being staged")]
    WrongEpoch { staged: u64, frame: u64 },
    #[error("epoch {epoch} never ended: epoch {next} began while it was being staged")]
    NeverEnded { epoch: u64, next: u64 },
    #[error("epoch {epoch} is torn: {announced} pages announced, {received} received")]
    Torn {
        epoch: u64,
        announced: u64,
        received: u64,
    },
    #[error("epoch {epoch}: the page frames do not match the end record's checksum (lost or reordered frames)")]
    PagesChecksum { epoch: u64 },
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
    #[error("epoch {epoch}: {source}")]
    Page {
        epoch: u64,
        #[source]
        source: ProtocolError,
    },
    #[error("epoch {epoch} carries a second page audit")]
    AuditTwice { epoch: u64 },
    #[error("epoch {epoch}: its page audit names page {gpa:#x}, outside the guest's memory")]
    AuditOutside { epoch: u64, gpa: u64 },
    #[error("epoch {epoch}: the replica DIFFERS from the primary in {} of {audited} audited pages (first: {})", .differ.len(), .differ.first().map(AuditMiss::to_string).unwrap_or_default())]
    AuditMismatch {
        epoch: u64,
        audited: usize,
        differ: Vec<AuditMiss>,
    },
    #[error("epoch {epoch}: the delta of page {gpa:#x} does not apply: {source}")]
    Delta {
        epoch: u64,
        gpa: u64,
        #[source]
        source: crate::protocol::delta::DeltaError,
    },
    #[error("epoch {epoch}: its state delta does not apply: {source}")]
    StateDelta {
        epoch: u64,
        #[source]
        source: crate::protocol::StateDeltaError,
    },
    #[error("applying epoch {epoch} failed: {source}")]
    Apply {
        epoch: u64,
        #[source]
        source: vmm::replication::ReplicationError,
    },
    #[error(
        "epoch {epoch} carries {pages} memory pages, but this replica is a disk mirror (level HA)"
    )]
    PagesInMirror { epoch: u64, pages: u64 },
    #[error("unexpected {0} message on the epoch stream")]
    Unexpected(&'static str),
    #[error(
        "epoch {epoch} is larger than a replica stages: more than {limit} {what} \
         (refused, nothing applied)"
    )]
    TooLarge {
        epoch: u64,
        what: &'static str,
        limit: u64,
    },
}

/// How much one epoch may stage before it is complete. An epoch holds each
/// dirty page once, so never more pages than the guest has; its disk
/// writes are bounded by what the primary records between two checkpoints
/// (it pauses its guest before its record passes
/// [`EPOCH_DISK_BYTES_MAX`] / 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagingLimits {
    pub pages: u64,
    pub disk_bytes: u64,
}

/// The most disk-write bytes one epoch carries.
pub const EPOCH_DISK_BYTES_MAX: u64 = 256 << 20;

impl StagingLimits {
    /// For a guest of `mem_mib` MiB.
    pub fn for_guest(mem_mib: u64) -> StagingLimits {
        StagingLimits {
            pages: mem_mib.saturating_mul((1 << 20) / crate::protocol::PAGE_SIZE as u64),
            disk_bytes: EPOCH_DISK_BYTES_MAX,
        }
    }
}

impl Default for StagingLimits {
    /// The largest guest the VMM makes (the MMIO gap's start: 3 GiB).
    fn default() -> Self {
        StagingLimits::for_guest(3 << 10)
    }
}

/// An audited page the replica holds otherwise than the primary did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditMiss {
    pub gpa: u64,
    pub picked: Picked,
    /// Whether the epoch carried the page (whole or as a delta).
    pub in_epoch: bool,
}

impl std::fmt::Display for AuditMiss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "page {:#x}, picked as {}, {}",
            self.gpa,
            self.picked.name(),
            if self.in_epoch {
                "carried by the epoch"
            } else {
                "not in the epoch"
            }
        )
    }
}

/// An epoch being received.
struct Staging {
    epoch: u64,
    state: Bytes,
    audit: Option<PageAudit>,
    pages: Vec<PageBatch>,
    deltas: Vec<PageDeltaBatch>,
    page_count: u64,
    crc: crc32fast::Hasher,
    writes: Vec<DiskRecord>,
    write_bytes: u64,
    writes_crc: crc32fast::Hasher,
}

/// A complete, checked epoch, ready to apply.
#[derive(Debug)]
pub struct CompleteEpoch {
    pub epoch: u64,
    /// The encoded checkpoint state.
    pub state: Bytes,
    pub pages: Vec<PageBatch>,
    /// Pages as deltas from the replica's version (none of them is also
    /// among `pages`: an epoch holds each dirty page once).
    pub deltas: Vec<PageDeltaBatch>,
    /// Pages in all, whole and as deltas.
    pub page_count: u64,
    /// Disk writes in the order the primary executed them.
    pub writes: Vec<DiskRecord>,
    /// Pages the replica must hold as summed once the epoch is applied.
    pub audit: PageAudit,
}

/// Turns the message stream into complete epochs and applies them in
/// order.
pub struct EpochAssembler {
    sequencer: EpochSequencer,
    staging: Option<Staging>,
    limits: StagingLimits,
    /// The state of the last epoch assembled whole: the base of the next
    /// epoch's state delta.
    last_state: Option<Bytes>,
}

impl EpochAssembler {
    /// Expects `first_epoch` next; stages within the default limits.
    pub fn new(first_epoch: u64) -> Self {
        EpochAssembler::with_limits(first_epoch, StagingLimits::default())
    }

    /// Expects `first_epoch` next; refuses an epoch past `limits`.
    pub fn with_limits(first_epoch: u64, limits: StagingLimits) -> Self {
        EpochAssembler {
            sequencer: EpochSequencer::new(first_epoch),
            staging: None,
            limits,
            last_state: None,
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

    /// Takes one message; returns the epoch it completed, if any. On error
    /// the staged epoch is dropped.
    pub fn on_message(
        &mut self,
        envelope: Envelope,
    ) -> Result<Option<CompleteEpoch>, AssemblerError> {
        let result = self.stage(envelope);
        if result.is_err() {
            self.staging = None;
        }
        result
    }

    fn stage(&mut self, envelope: Envelope) -> Result<Option<CompleteEpoch>, AssemblerError> {
        let epoch = envelope.epoch;
        match envelope.message {
            Message::EpochBegin(state) => self.begin(epoch, |_| Ok(state)),
            Message::EpochStateDelta(delta) => self.begin(epoch, |base| {
                let base = base.ok_or(crate::protocol::StateDeltaError::NoBase)?;
                delta.apply(base)
            }),
            Message::Pages(batch) => {
                let s = self.staged_pages("Pages", epoch, batch.len())?;
                batch.hash_addresses(&mut s.crc);
                s.pages.push(batch);
                Ok(None)
            }
            Message::PageDeltas(batch) => {
                let s = self.staged_pages("PageDeltas", epoch, batch.len())?;
                batch.hash_addresses(&mut s.crc);
                s.deltas.push(batch);
                Ok(None)
            }
            Message::DiskWrites(batch) => {
                let limit = self.limits.disk_bytes;
                let s = self.staged("DiskWrites", epoch)?;
                s.write_bytes += batch.bytes().len() as u64;
                if s.write_bytes > limit {
                    return Err(AssemblerError::TooLarge {
                        epoch,
                        what: "disk-write bytes",
                        limit,
                    });
                }
                s.writes_crc.update(batch.bytes());
                s.writes.extend(batch.into_records());
                Ok(None)
            }
            Message::EpochAudit(audit) => {
                let s = self.staged("EpochAudit", epoch)?;
                if s.audit.is_some() {
                    return Err(AssemblerError::AuditTwice { epoch });
                }
                s.audit = Some(audit);
                Ok(None)
            }
            Message::EpochEnd(end) => {
                self.staged("EpochEnd", epoch)?;
                let s = self.staging.take().expect("checked above");
                let complete = check_end(epoch, &end, s)?;
                self.last_state = Some(complete.state.clone());
                Ok(Some(complete))
            }
            other => Err(AssemblerError::Unexpected(other.name())),
        }
    }

    /// Begins staging epoch `epoch`, whose state `state` gives from the
    /// state of the epoch before (if any).
    fn begin(
        &mut self,
        epoch: u64,
        state: impl FnOnce(Option<&[u8]>) -> Result<Bytes, crate::protocol::StateDeltaError>,
    ) -> Result<Option<CompleteEpoch>, AssemblerError> {
        if let Some(s) = &self.staging {
            return Err(AssemblerError::NeverEnded {
                epoch: s.epoch,
                next: epoch,
            });
        }
        self.sequencer.check(epoch)?;
        let state = state(self.last_state.as_deref())
            .map_err(|source| AssemblerError::StateDelta { epoch, source })?;
        self.staging = Some(Staging {
            epoch,
            state,
            audit: None,
            pages: Vec::new(),
            deltas: Vec::new(),
            page_count: 0,
            crc: crc32fast::Hasher::new(),
            writes: Vec::new(),
            write_bytes: 0,
            writes_crc: crc32fast::Hasher::new(),
        });
        Ok(None)
    }

    /// The staged epoch, counting `pages` more pages in it (whole or as
    /// deltas) within the limit.
    fn staged_pages(
        &mut self,
        kind: &'static str,
        epoch: u64,
        pages: usize,
    ) -> Result<&mut Staging, AssemblerError> {
        let limit = self.limits.pages;
        let s = self.staged(kind, epoch)?;
        if s.page_count + pages as u64 > limit {
            return Err(AssemblerError::TooLarge {
                epoch,
                what: "pages",
                limit,
            });
        }
        s.page_count += pages as u64;
        Ok(s)
    }

    fn staged(&mut self, kind: &'static str, epoch: u64) -> Result<&mut Staging, AssemblerError> {
        match &mut self.staging {
            None => Err(AssemblerError::OutsideEpoch { kind, epoch }),
            Some(s) if s.epoch != epoch => Err(AssemblerError::WrongEpoch {
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
        ram: &ReplicaRam,
        disks: &[ReplicaDisk],
    ) -> Result<(), AssemblerError> {
        let epoch = complete.epoch;
        self.sequencer.check(epoch)?;
        check_writes(complete, disks)?;
        for batch in &complete.pages {
            batch
                .check_within(ram.bytes())
                .map_err(|source| AssemblerError::Page { epoch, source })?;
        }
        for batch in &complete.deltas {
            batch
                .check_within(ram.bytes())
                .map_err(|source| AssemblerError::Page { epoch, source })?;
        }
        if let Some(r) = complete
            .audit
            .records()
            .iter()
            .find(|r| r.gpa.saturating_add(PAGE_SIZE as u64) > ram.bytes())
        {
            return Err(AssemblerError::AuditOutside { epoch, gpa: r.gpa });
        }
        for batch in &complete.pages {
            for (gpa, data) in batch.records() {
                ram.write_page(gpa, data)
                    .map_err(|source| AssemblerError::Apply { epoch, source })?;
            }
        }
        // Each delta was checked whole when its frame was decoded, and its
        // page is inside memory: patching cannot fail half-way.
        let mut page = vec![0u8; PAGE_SIZE];
        for batch in &complete.deltas {
            for DeltaRecord { gpa, base, delta } in batch.records() {
                match base {
                    DeltaBase::Replica => ram
                        .read_page(gpa, &mut page)
                        .map_err(|source| AssemblerError::Apply { epoch, source })?,
                    DeltaBase::Zero => page.fill(0),
                }
                delta::apply(&mut page, delta).map_err(|source| AssemblerError::Delta {
                    epoch,
                    gpa,
                    source,
                })?;
                ram.write_page(gpa, &page)
                    .map_err(|source| AssemblerError::Apply { epoch, source })?;
            }
        }
        audit_memory(complete, ram, &mut page)?;
        write_all(complete, disks)?;
        self.sequencer.applied(epoch);
        Ok(())
    }

    /// Level HA: applies a complete epoch of disk writes to a mirror,
    /// which holds no memory (an epoch with pages is refused whole), and
    /// makes the writes durable before it returns.
    pub fn apply_writes(
        &mut self,
        complete: &CompleteEpoch,
        disks: &[ReplicaDisk],
    ) -> Result<(), AssemblerError> {
        let epoch = complete.epoch;
        self.sequencer.check(epoch)?;
        if complete.page_count > 0 {
            return Err(AssemblerError::PagesInMirror {
                epoch,
                pages: complete.page_count,
            });
        }
        check_writes(complete, disks)?;
        write_all(complete, disks)?;
        for disk in disks {
            disk.sync()
                .map_err(|source| AssemblerError::Disk { epoch, source })?;
        }
        self.sequencer.applied(epoch);
        Ok(())
    }
}

/// Each page `complete`'s audit names, as the replica holds it now
/// (`page`: a page's buffer), against the primary's sum.
fn audit_memory(
    complete: &CompleteEpoch,
    ram: &ReplicaRam,
    page: &mut [u8],
) -> Result<(), AssemblerError> {
    let epoch = complete.epoch;
    let mut differ = Vec::new();
    for r in complete.audit.records() {
        ram.read_page(r.gpa, page)
            .map_err(|source| AssemblerError::Apply { epoch, source })?;
        if audit::page_sum(page) != r.sum {
            differ.push(AuditMiss {
                gpa: r.gpa,
                picked: r.picked,
                in_epoch: carries(complete, r.gpa),
            });
        }
    }
    if differ.is_empty() {
        Ok(())
    } else {
        Err(AssemblerError::AuditMismatch {
            epoch,
            audited: complete.audit.len(),
            differ,
        })
    }
}

/// Whether `complete` carries page `gpa` (whole or as a delta).
fn carries(complete: &CompleteEpoch, gpa: u64) -> bool {
    complete
        .pages
        .iter()
        .any(|b| b.records().any(|(g, _)| g == gpa))
        || complete
            .deltas
            .iter()
            .any(|b| b.records().any(|r| r.gpa == gpa))
}

/// Every write of `complete` within its disk (before any is applied).
fn check_writes(complete: &CompleteEpoch, disks: &[ReplicaDisk]) -> Result<(), AssemblerError> {
    let epoch = complete.epoch;
    for w in &complete.writes {
        crate::standby::replica_disk::check(disks, w)
            .map_err(|source| AssemblerError::Disk { epoch, source })?;
    }
    Ok(())
}

/// Writes `complete`'s disk writes in order.
fn write_all(complete: &CompleteEpoch, disks: &[ReplicaDisk]) -> Result<(), AssemblerError> {
    let epoch = complete.epoch;
    for w in &complete.writes {
        disks[w.disk as usize]
            .write(w.offset, &w.data)
            .map_err(|source| AssemblerError::Disk { epoch, source })?;
    }
    Ok(())
}

/// Checks a staged epoch against its end record.
fn check_end(epoch: u64, end: &EpochEnd, s: Staging) -> Result<CompleteEpoch, AssemblerError> {
    if end.pages != s.page_count {
        return Err(AssemblerError::Torn {
            epoch,
            announced: end.pages,
            received: s.page_count,
        });
    }
    if end.pages_crc != s.crc.finalize() {
        return Err(AssemblerError::PagesChecksum { epoch });
    }
    let received = s.writes.len() as u64;
    if end.writes != received {
        return Err(AssemblerError::TornWrites {
            epoch,
            announced: end.writes,
            received,
        });
    }
    if end.writes_crc != s.writes_crc.finalize() {
        return Err(AssemblerError::WritesChecksum { epoch });
    }
    Ok(CompleteEpoch {
        epoch,
        state: s.state,
        pages: s.pages,
        deltas: s.deltas,
        page_count: s.page_count,
        writes: s.writes,
        audit: s.audit.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode_pages, PAGE_SIZE};
    use ft_link::Frame;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE]
    }

    fn epoch_frames(epoch: u64, pages: &[(u64, Vec<u8>)]) -> Vec<Frame> {
        encode_pages(
            epoch,
            0,
            Bytes::from_static(b"state"),
            pages.iter().map(|(g, d)| (*g, d.as_slice())),
        )
    }

    fn feed(
        a: &mut EpochAssembler,
        frames: Vec<Frame>,
    ) -> Result<Option<CompleteEpoch>, AssemblerError> {
        let mut done = None;
        for f in frames {
            let envelope = Message::from_frame(f).expect("well-formed frames");
            if let Some(c) = a.on_message(envelope)? {
                done = Some(c);
            }
        }
        Ok(done)
    }

    fn read(ram: &ReplicaRam, gpa: u64) -> u8 {
        let mut page = vec![0u8; PAGE_SIZE];
        ram.read_page(gpa - gpa % 4096, &mut page).unwrap();
        page[(gpa % 4096) as usize]
    }

    #[test]
    fn a_complete_epoch_lands_whole_and_in_order() {
        let ram = ReplicaRam::create(16).unwrap();
        let mut a = EpochAssembler::new(1);
        // 130 pages: three page frames.
        let pages: Vec<(u64, Vec<u8>)> =
            (0..130u64).map(|i| (i * 4096, page(i as u8 + 1))).collect();
        let done = feed(&mut a, epoch_frames(1, &pages))
            .unwrap()
            .expect("complete");
        assert_eq!(done.state, Bytes::from_static(b"state"));
        a.apply(&done, &ram, &[]).unwrap();
        assert_eq!(read(&ram, 129 * 4096 + 17), 130);
        assert_eq!(a.expected(), 2);
    }

    /// `frames` with an audit of `pages` (address, contents expected,
    /// why) before the end record.
    fn audited(mut frames: Vec<Frame>, epoch: u64, pages: &[(u64, &[u8], Picked)]) -> Vec<Frame> {
        let mut audit = PageAudit::default();
        for (gpa, data, picked) in pages {
            assert!(audit.add(*gpa, *picked, data));
        }
        let end = frames.pop().unwrap();
        frames.push(Message::EpochAudit(audit).into_frame(epoch, 0));
        frames.push(end);
        frames
    }

    #[test]
    fn an_audit_that_matches_lets_the_epoch_commit() {
        let ram = ReplicaRam::create(16).unwrap();
        let mut a = EpochAssembler::new(1);
        let pages: Vec<_> = (0..4u64).map(|i| (i * 4096, page(i as u8 + 1))).collect();
        let frames = audited(
            epoch_frames(1, &pages),
            1,
            &[
                (4096, &page(2), Picked::Delta),
                // Not in the epoch: zero, as a new replica holds it.
                (40 * 4096, &page(0), Picked::Random),
            ],
        );
        let done = feed(&mut a, frames).unwrap().expect("complete");
        assert_eq!(done.audit.len(), 2);
        a.apply(&done, &ram, &[]).unwrap();
        assert_eq!(a.expected(), 2);
    }

    #[test]
    fn a_replica_that_drifted_is_refused_at_the_first_audit_that_shows_it() {
        let ram = ReplicaRam::create(16).unwrap();
        let mut a = EpochAssembler::new(1);
        let first = vec![(0, page(1)), (4096, page(2))];
        let done = feed(&mut a, epoch_frames(1, &first)).unwrap().unwrap();
        a.apply(&done, &ram, &[]).unwrap();
        // The primary's guest wrote page 1 again in epoch 2, and the write
        // was missed: epoch 2 carries page 0 alone, and the audit names
        // page 1 as the primary holds it.
        let frames = audited(
            epoch_frames(2, &[(0, page(3))]),
            2,
            &[
                (4096, &page(9), Picked::Recent),
                (0, &page(3), Picked::Random),
            ],
        );
        let done = feed(&mut a, frames).unwrap().unwrap();
        match a.apply(&done, &ram, &[]) {
            Err(AssemblerError::AuditMismatch {
                epoch: 2,
                audited: 2,
                differ,
            }) => assert_eq!(
                differ,
                [AuditMiss {
                    gpa: 4096,
                    picked: Picked::Recent,
                    in_epoch: false
                }]
            ),
            other => panic!("not refused for the drift: {other:?}"),
        }
        assert_eq!(a.expected(), 2, "the epoch did not commit");
    }

    #[test]
    fn a_second_audit_or_one_outside_memory_is_refused() {
        let ram = ReplicaRam::create(16).unwrap();
        let mut a = EpochAssembler::new(1);
        let pages = vec![(0, page(1))];
        let once = audited(epoch_frames(1, &pages), 1, &[(0, &page(1), Picked::Delta)]);
        let twice = audited(once, 1, &[(0, &page(1), Picked::Delta)]);
        assert!(matches!(
            feed(&mut a, twice),
            Err(AssemblerError::AuditTwice { epoch: 1 })
        ));
        let mut a = EpochAssembler::new(1);
        let outside = audited(
            epoch_frames(1, &pages),
            1,
            &[(16 << 20, &page(0), Picked::Random)],
        );
        let done = feed(&mut a, outside).unwrap().unwrap();
        assert!(matches!(
            a.apply(&done, &ram, &[]),
            Err(AssemblerError::AuditOutside { epoch: 1, gpa }) if gpa == 16 << 20
        ));
        assert_eq!(read(&ram, 0), 0, "nothing applied");
    }

    /// The frames of epoch `epoch` as the primary's delta cache makes
    /// them from `pages` (whole the first time it sees a page).
    fn delta_frames(
        cache: &mut crate::primary::delta_cache::DeltaCache,
        epoch: u64,
        pages: &[(u64, Vec<u8>)],
    ) -> Vec<Frame> {
        let mut stager = crate::protocol::PageStager::default();
        for (gpa, data) in pages {
            vmm::replication::PageSink::page_buffer(&mut stager, *gpa).extend_from_slice(data);
        }
        let (staged, _) = cache.encode(
            stager.finish(),
            (&mut crate::protocol::PageAudit::default(), 0),
        );
        crate::protocol::epoch_frames(
            epoch,
            0,
            Bytes::from_static(b"state"),
            staged,
            (Vec::new(), 0),
        )
    }

    /// Epoch `epoch` of state `state` and one page, begun as the cache
    /// begins it.
    fn state_frames(
        cache: &mut crate::primary::delta_cache::DeltaCache,
        epoch: u64,
        state: &[u8],
    ) -> Vec<Frame> {
        let mut stager = crate::protocol::PageStager::default();
        vmm::replication::PageSink::page_buffer(&mut stager, 0).extend_from_slice(&page(1));
        let begin = cache.begin(Bytes::copy_from_slice(state));
        crate::protocol::epoch_frames_from(
            begin,
            (epoch, 0),
            stager.finish(),
            (Vec::new(), 0),
            PageAudit::default(),
        )
    }

    fn begins_with_a_state_delta(frames: &[Frame]) -> bool {
        matches!(
            Message::from_frame(frames[0].clone()).unwrap().message,
            Message::EpochStateDelta(_)
        )
    }

    #[test]
    fn states_sent_as_deltas_come_out_as_the_primary_had_them() {
        let ram = ReplicaRam::create(16).unwrap();
        let mut cache = crate::primary::delta_cache::DeltaCache::new(1 << 20).unwrap();
        let mut a = EpochAssembler::new(1);
        // Assembled and applied: the state it carried.
        let take = |a: &mut EpochAssembler, frames| {
            let done = feed(a, frames).unwrap().unwrap();
            a.apply(&done, &ram, &[]).unwrap();
            done.state
        };
        let mut state: Vec<u8> = (0..9000u32).map(|i| (i % 251) as u8).collect();
        let first = state_frames(&mut cache, 1, &state);
        assert!(!begins_with_a_state_delta(&first), "nothing before: whole");
        assert_eq!(&take(&mut a, first)[..], &state[..]);
        for epoch in 2..5 {
            state[epoch as usize * 1000] ^= 0x5a;
            let frames = state_frames(&mut cache, epoch, &state);
            assert!(begins_with_a_state_delta(&frames), "epoch {epoch}");
            assert_eq!(&take(&mut a, frames)[..], &state[..], "epoch {epoch}");
        }
        // Another length: whole again.
        state.push(7);
        let frames = state_frames(&mut cache, 5, &state);
        assert!(!begins_with_a_state_delta(&frames));
        assert_eq!(&take(&mut a, frames)[..], &state[..]);
        // A torn epoch: the next one's delta (made against the torn one's
        // state) is refused, whatever else would let it through.
        state[0] ^= 1;
        let mut torn = state_frames(&mut cache, 6, &state);
        torn.pop();
        assert!(feed(&mut a, torn).unwrap().is_none());
        let mut b = EpochAssembler::new(7);
        b.last_state = a.last_state.clone();
        state[100] ^= 1; // another word than the torn epoch changed
        let next = state_frames(&mut cache, 7, &state);
        assert!(begins_with_a_state_delta(&next));
        assert!(matches!(
            feed(&mut b, next),
            Err(AssemblerError::StateDelta {
                epoch: 7,
                source: crate::protocol::StateDeltaError::Crc { .. }
            })
        ));
        // A new assembler (a new session) holds no base.
        let mut fresh = EpochAssembler::new(8);
        state[2] ^= 1;
        assert!(matches!(
            feed(&mut fresh, state_frames(&mut cache, 8, &state)),
            Err(AssemblerError::StateDelta {
                epoch: 8,
                source: crate::protocol::StateDeltaError::NoBase
            })
        ));
    }

    #[test]
    fn pages_sent_as_deltas_land_on_the_replica_as_the_primary_had_them() {
        let ram = ReplicaRam::create(16).unwrap();
        let mut cache = crate::primary::delta_cache::DeltaCache::new(1 << 20).unwrap();
        let mut a = EpochAssembler::new(1);
        let mut memory: Vec<(u64, Vec<u8>)> =
            (0..100u64).map(|i| (i * 4096, page(i as u8))).collect();
        // Page 0, mostly zeros, goes as a delta from zeros: whatever the
        // replica held there before is overwritten.
        memory[0].1[8] = 1;
        ram.write_page(0, &page(0xab)).unwrap();
        let first = feed(&mut a, delta_frames(&mut cache, 1, &memory))
            .unwrap()
            .unwrap();
        let bases: Vec<_> = first
            .deltas
            .iter()
            .flat_map(|b| b.records().map(|r| (r.gpa, r.base)))
            .collect();
        assert_eq!(bases, [(0, DeltaBase::Zero)], "the rest, new, whole");
        a.apply(&first, &ram, &[]).unwrap();
        for (i, (_, data)) in memory.iter_mut().enumerate().step_by(3) {
            data[i * 7 % PAGE_SIZE] = 0xee;
        }
        let dirty: Vec<_> = memory.iter().step_by(3).cloned().collect();
        let second = feed(&mut a, delta_frames(&mut cache, 2, &dirty))
            .unwrap()
            .unwrap();
        assert_eq!(second.page_count, dirty.len() as u64);
        assert!(second.pages.is_empty(), "every page as a delta");
        assert_eq!(
            second.deltas.iter().map(PageDeltaBatch::len).sum::<usize>(),
            dirty.len()
        );
        a.apply(&second, &ram, &[]).unwrap();
        let mut got = page(0);
        for (gpa, data) in &memory {
            ram.read_page(*gpa, &mut got).unwrap();
            assert_eq!(&got, data, "page {gpa:#x}");
        }
        // A delta frame lost: the end record's count says so.
        let mut frames = delta_frames(&mut cache, 3, &dirty);
        let lost = frames
            .iter()
            .position(|f| {
                matches!(
                    Message::from_frame(f.clone()).unwrap().message,
                    Message::PageDeltas(_)
                )
            })
            .unwrap();
        frames.remove(lost);
        assert!(matches!(
            feed(&mut a, frames),
            Err(AssemblerError::Torn { epoch: 3, .. })
        ));
    }

    #[test]
    fn a_torn_epoch_is_refused_and_nothing_is_applied() {
        let ram = ReplicaRam::create(16).unwrap();
        let pages: Vec<(u64, Vec<u8>)> = (0..100u64).map(|i| (i * 4096, page(9))).collect();
        // A page frame lost in the middle.
        let mut a = EpochAssembler::new(1);
        let mut frames = epoch_frames(1, &pages);
        frames.remove(1);
        assert!(matches!(
            feed(&mut a, frames),
            Err(AssemblerError::Torn {
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
            Err(AssemblerError::NeverEnded { epoch: 1, next: 2 })
        ));
        // The link broke mid-epoch.
        let mut a = EpochAssembler::new(1);
        let mut frames = epoch_frames(1, &pages);
        frames.pop();
        assert!(feed(&mut a, frames).unwrap().is_none());
        assert_eq!(a.abort(), Some(1));
        assert_eq!(
            read(&ram, 0),
            0,
            "nothing of a refused epoch reached memory"
        );
        assert_eq!(a.expected(), 1);
    }

    /// Issue 9 defect 11: a peer that keeps sending page or disk frames
    /// without ending its epoch is refused once the epoch passes what a
    /// replica of this guest stages; before, everything was buffered.
    #[test]
    fn an_epoch_larger_than_the_guest_or_the_disk_budget_is_refused_while_staging() {
        // A 16 MiB guest has 4096 pages: 5000 staged pages cannot be one
        // epoch of it.
        let limits = StagingLimits::for_guest(16);
        assert_eq!(limits.pages, 4096);
        let pages: Vec<(u64, Vec<u8>)> =
            (0..5000u64).map(|i| ((i % 4096) * 4096, page(3))).collect();
        let mut a = EpochAssembler::with_limits(1, limits);
        let mut frames = epoch_frames(1, &pages);
        frames.pop(); // no end record: it would be staged forever
        assert!(matches!(
            feed(&mut a, frames),
            Err(AssemblerError::TooLarge {
                epoch: 1,
                what: "pages",
                limit: 4096
            })
        ));
        assert_eq!(a.abort(), None, "the staged data was dropped");
        // Disk writes past the budget.
        let mut a = EpochAssembler::with_limits(
            1,
            StagingLimits {
                pages: 4096,
                disk_bytes: 1 << 20,
            },
        );
        let begin = Message::EpochBegin(Bytes::from_static(b"state")).into_frame(1, 0);
        a.on_message(Message::from_frame(begin).unwrap()).unwrap();
        let chunk = Bytes::from(vec![7u8; 256 << 10]);
        let mut refused = None;
        for n in 0..8u64 {
            let (batches, _) = crate::protocol::disk_payloads([DiskRecord {
                disk: 0,
                offset: n * chunk.len() as u64,
                data: chunk.clone(),
            }]);
            for b in batches {
                let env = Message::from_frame(Message::DiskWrites(b).into_frame(1, 0)).unwrap();
                if let Err(e) = a.on_message(env) {
                    refused.get_or_insert((n, e));
                }
            }
        }
        let (at, error) = refused.expect("refused before 2 MiB were staged");
        assert!(at <= 4, "refused at write {at}");
        assert!(
            matches!(
                error,
                AssemblerError::TooLarge {
                    what: "disk-write bytes",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn reordered_page_frames_fail_the_epoch_checksum() {
        let pages: Vec<(u64, Vec<u8>)> = (0..100u64).map(|i| (i * 4096, page(i as u8))).collect();
        let mut a = EpochAssembler::new(1);
        let mut frames = epoch_frames(1, &pages);
        frames.swap(1, 2);
        assert!(matches!(
            feed(&mut a, frames),
            Err(AssemblerError::PagesChecksum { epoch: 1 })
        ));
    }

    #[test]
    fn replayed_and_skipped_epochs_are_refused() {
        let ram = ReplicaRam::create(16).unwrap();
        let pages = vec![(0u64, page(1))];
        let mut a = EpochAssembler::new(1);
        let one = feed(&mut a, epoch_frames(1, &pages)).unwrap().unwrap();
        a.apply(&one, &ram, &[]).unwrap();
        let replay = feed(&mut a, epoch_frames(1, &[(0, page(7))]));
        assert!(matches!(
            replay,
            Err(AssemblerError::Sequence(SequenceError::Replayed {
                got: 1,
                expected: 2
            }))
        ));
        assert!(
            a.apply(&one, &ram, &[]).is_err(),
            "an applied epoch applies once"
        );
        let gap = feed(&mut a, epoch_frames(3, &pages));
        assert!(matches!(
            gap,
            Err(AssemblerError::Sequence(SequenceError::Gap {
                got: 3,
                expected: 2
            }))
        ));
        assert_eq!(read(&ram, 0), 1);
    }

    #[test]
    fn stray_messages_and_wild_addresses_are_refused() {
        let ram = ReplicaRam::create(16).unwrap();
        let mut a = EpochAssembler::new(1);
        let stray =
            Message::from_frame(Frame::message(69, 1, 0, vec![0u8; 4104]).unwrap()).unwrap();
        assert!(matches!(
            a.on_message(stray),
            Err(AssemblerError::OutsideEpoch { .. })
        ));
        let ack = Envelope {
            epoch: 1,
            generation: 0,
            message: Message::Ack,
        };
        assert!(matches!(
            a.on_message(ack),
            Err(AssemblerError::Unexpected("Ack"))
        ));
        // 16 MiB of RAM: a page at 64 MiB is outside it; nothing is written.
        let wild = vec![(0u64, page(5)), (64 << 20, page(5))];
        let done = feed(&mut a, epoch_frames(1, &wild)).unwrap().unwrap();
        assert!(matches!(
            a.apply(&done, &ram, &[]),
            Err(AssemblerError::Page { .. })
        ));
        assert_eq!(read(&ram, 0), 0);
    }
}
