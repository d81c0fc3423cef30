//! The replication protocol: every message the primary and the standby
//! exchange, as one typed enum, with its codec in both directions. The
//! A-link carries each message as an opaque frame (kind, epoch,
//! generation, payload); this module alone knows what the payloads hold.
//!
//! ```text
//! primary -> standby                     standby -> primary
//! SyncBegin   the VM's geometry          Ack(N)   epoch N committed
//!                                        Refuse   this standby cannot hold the
//!                                                 replica (why, in UTF-8)
//! SyncPages   memory, copied while the guest runs
//! SyncDisk    disk contents, likewise
//! SyncPagesZ, SyncDiskZ   the same, zstd-compressed (see `compressed`)
//! SyncEnd     the copy's end record: [pages u64][crc32 of their addresses]
//!             [disk records u64][crc32 of the SyncDisk payloads]
//! Backup      first message of a second path (heartbeats only)
//! EpochBegin(N)  the checkpoint's state (see `state`)
//! EpochStateDelta(N)  in its place: the state as what changed since
//!                epoch N-1's (see `state_delta`)
//! Pages(N)       dirty pages: [gpa u64 LE][4096 bytes] ... (see `pages`)
//! PageDeltas(N)  dirty pages as what changed since the replica's version
//!                (or since a page of zeros: len's top bit set):
//!                [gpa u64 LE][len u16 LE][delta] ... (see `page_deltas`)
//! DiskWrites(N)  [disk u32][offset u64][len u32][bytes] ... (see `disk`)
//! EpochAudit(N)  a few pages' sums as the replica must hold them once
//!                epoch N is applied: [gpa|why u64][sum u64] ... (see
//!                `audit`)
//! EpochEnd(N)    [pages u64][crc32 of the page addresses, in order: those
//!                of Pages and PageDeltas frames as the frames came]
//!                [writes u64][crc32 of the DiskWrites payloads]
//! Inbound     frames the guest received, as they arrive (see `inbound`):
//!             replayed by a standby that takes over, past its checkpoint
//! EpochOutput(N) a copy of the frames the guest sent in epoch N (inbound
//!             records; bounded): sent by a standby that takes over from
//!             epoch N, whose primary may have died before releasing them
//! Stop        the primary's VM stopped on purpose: no takeover
//! Release     the primary drops this standby (it did not acknowledge in
//!             time) and goes on unprotected: no takeover; the replica is
//!             kept for the next session to compare against
//! Handover    the primary's VM failed on its host (a vCPU could not go
//!             on): take over now from the last committed epoch
//! ```
//! Each frame carries its own crc32 over its payload (the A-link), so page
//! contents are checked once; the end record lets the standby tell a
//! complete epoch from a torn one and catches lost or reordered page
//! frames (the address sequence would differ) at 8 bytes per page.

pub mod audit;
pub mod compressed;
pub mod delta;
mod disk;
mod held;
mod inbound;
pub mod page_deltas;
mod pages;
mod state;
pub mod state_delta;

use bytes::{BufMut, Bytes, BytesMut};
use ft_link::{Frame, FrameKind};

pub use self::audit::{AuditRecord, PageAudit, Picked, AUDIT_MAX};

pub use self::disk::{disk_payloads, DiskBatch, DiskRecord, DISK_BYTES_PER_FRAME};
pub use self::held::{Held, HeldPart, Region, DIGESTS_PER_FRAME};
pub use self::inbound::{inbound_payloads, InboundBatch, InboundRecord, INBOUND_BYTES_PER_FRAME};
pub use self::page_deltas::{
    DeltaBase, DeltaRecord, PageDeltaBatch, PageDeltaStager, DELTA_MAX, ZERO_PAGE,
};
pub use self::pages::{PageBatch, PageStager, StagedPages, PAGES_PER_FRAME, PAGE_RECORD};
pub use self::state::{
    BootPlan, CheckpointState, MemorySince, StateError, SyncPlan, WrittenPlan,
    CHECKPOINT_STATE_VERSION, SYNC_PLAN_VERSION,
};
pub use self::state_delta::{StateDelta, StateDeltaError};
pub use vmm::replication::PAGE_SIZE;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("frame kind {0:?} is not a replication message")]
    NotAMessage(FrameKind),
    #[error("unknown replication message kind {0}")]
    UnknownKind(u8),
    #[error("{kind} message of epoch {epoch} is malformed ({len} bytes): {why}")]
    Malformed {
        kind: &'static str,
        epoch: u64,
        len: usize,
        why: &'static str,
    },
    #[error("page at {gpa:#x} is not a page of the replica's {ram_bytes} bytes of memory")]
    PageOutside { gpa: u64, ram_bytes: u64 },
    #[error("compressed {kind} message of epoch {epoch} ({len} bytes) is refused: {source}")]
    Decompress {
        kind: &'static str,
        epoch: u64,
        len: usize,
        source: compressed::DecompressError,
    },
}

/// The summary that closes an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EpochEnd {
    pub pages: u64,
    pub pages_crc: u32,
    pub writes: u64,
    pub writes_crc: u32,
}

impl EpochEnd {
    const LEN: usize = 24;

    fn to_payload(self) -> Bytes {
        let mut b = BytesMut::with_capacity(Self::LEN);
        b.put_u64_le(self.pages);
        b.put_u32_le(self.pages_crc);
        b.put_u64_le(self.writes);
        b.put_u32_le(self.writes_crc);
        b.freeze()
    }

    fn from_payload(p: &[u8]) -> Option<EpochEnd> {
        (p.len() == Self::LEN).then(|| EpochEnd {
            pages: u64::from_le_bytes(p[..8].try_into().expect("8 bytes")),
            pages_crc: u32::from_le_bytes(p[8..12].try_into().expect("4 bytes")),
            writes: u64::from_le_bytes(p[12..20].try_into().expect("8 bytes")),
            writes_crc: u32::from_le_bytes(p[20..24].try_into().expect("4 bytes")),
        })
    }
}

/// A running tally of page and disk batches, closed into the end record
/// that lets the receiver tell a whole sequence from one with a batch
/// lost, repeated or reordered (the initial copy's `SyncEnd`).
#[derive(Default)]
pub struct EndTally {
    pages: u64,
    pages_crc: crc32fast::Hasher,
    writes: u64,
    writes_crc: crc32fast::Hasher,
}

impl EndTally {
    pub fn add_pages(&mut self, batch: &PageBatch) {
        self.pages += batch.len() as u64;
        batch.hash_addresses(&mut self.pages_crc);
    }

    pub fn add_disk(&mut self, batch: &DiskBatch) {
        self.writes += batch.records().len() as u64;
        self.writes_crc.update(batch.bytes());
    }

    /// The end record of what was tallied.
    pub fn end(&self) -> EpochEnd {
        EpochEnd {
            pages: self.pages,
            pages_crc: self.pages_crc.clone().finalize(),
            writes: self.writes,
            writes_crc: self.writes_crc.clone().finalize(),
        }
    }
}

/// One message of the replication protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    SyncBegin(Box<SyncPlan>),
    SyncPages(PageBatch),
    SyncDisk(DiskBatch),
    /// The end of the initial copy: how many page and disk records it
    /// sent, and checksums of their order (see [`EndTally`]). Epochs come
    /// only after it.
    SyncEnd(EpochEnd),
    Backup,
    /// The encoded [`CheckpointState`]: decoded only once its epoch is
    /// complete (a torn epoch costs no decode).
    EpochBegin(Bytes),
    /// In place of `EpochBegin`: the state as what changed since the
    /// previous epoch's (checked whole when decoded; applied, and its
    /// result's CRC checked, when the epoch begins on the standby).
    EpochStateDelta(StateDelta),
    Pages(PageBatch),
    /// Pages of the epoch as deltas from the version the standby's
    /// replica holds (the primary's delta cache knows it).
    PageDeltas(PageDeltaBatch),
    DiskWrites(DiskBatch),
    /// Sums of pages as the replica must hold them after the epoch.
    EpochAudit(PageAudit),
    EpochEnd(EpochEnd),
    /// Frames the guest received, forwarded as they arrive (the frame's
    /// epoch means nothing).
    Inbound(InboundBatch),
    Ack,
    Stop,
    Handover,
    /// The primary drops this standby (an epoch not acknowledged within
    /// its deadline: the standby's disk or host hangs) and goes on
    /// unprotected. No takeover; a new session follows.
    Release,
    /// A planned switchover: the epoch just acknowledged is the last one,
    /// the primary's guest stays stopped for good; the standby takes over
    /// from it at once (its frame carries that epoch).
    Switchover,
    /// The output of a switchover's final epoch (inbound records: NIC,
    /// order, frame with its virtio header), which the primary did not
    /// send: the standby sends it once it runs the VM, from its own port,
    /// so that the guest's peers answer it there.
    FinalOutput(InboundBatch),
    /// A copy of the TCP segments the guest sent in the frame's epoch
    /// (inbound records, at most [`EPOCH_OUTPUT_MAX`] bytes; sent before
    /// the epoch): a standby that takes over sends the copies of its last
    /// committed epochs, because the primary may have died after the
    /// standby committed them and before it released their output. (A
    /// segment the primary did send arrives twice, as the network may
    /// deliver any packet: the peer's TCP drops it. Other traffic is not
    /// copied: a datagram sent twice might be acted on twice.)
    EpochOutput(InboundBatch),
    /// The standby cannot hold the replica (no space for its disks, a
    /// disk that fails, a plan it cannot match): why, for the primary's
    /// status and the operator. No takeover follows.
    Refuse(String),
    /// What the standby holds of a disk or of memory before the copy
    /// (after the plan, before anything is copied): the primary copies
    /// only what differs.
    SyncHeld(Held),
}

/// The most bytes of one epoch's output copied to the standby
/// ([`Message::EpochOutput`]): request and reply traffic whole; of a bulk
/// transfer only its start (the guest's TCP sends the rest again after a
/// takeover, as it would without the copy).
pub const EPOCH_OUTPUT_MAX: usize = 64 << 10;

/// The longest reason a [`Message::Refuse`] carries (bytes).
pub const REFUSE_REASON_MAX: usize = 1024;

/// A message with the epoch and generation its frame carried.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub epoch: u64,
    pub generation: u64,
    pub message: Message,
}

// Kind bytes on the wire (ft-link passes them through).
const SYNC_BEGIN: u8 = 64;
const SYNC_PAGES: u8 = 65;
const SYNC_DISK: u8 = 66;
const BACKUP: u8 = 67;
const EPOCH_BEGIN: u8 = 68;
const PAGES: u8 = 69;
const DISK_WRITES: u8 = 70;
const EPOCH_END: u8 = 71;
const ACK: u8 = 72;
const STOP: u8 = 73;
const HANDOVER: u8 = 74;
const REFUSE: u8 = 75;
const SYNC_END: u8 = 76;
const INBOUND: u8 = 77;
const SWITCHOVER: u8 = 78;
const FINAL_OUTPUT: u8 = 79;
const SYNC_HELD: u8 = 80;
const SYNC_PAGES_Z: u8 = 81;
const SYNC_DISK_Z: u8 = 82;
const EPOCH_OUTPUT: u8 = 83;
const RELEASE: u8 = 84;
const PAGE_DELTAS: u8 = 85;
const EPOCH_STATE_DELTA: u8 = 86;
const EPOCH_AUDIT: u8 = 87;

impl Message {
    /// Whether frames of kind `code` carry a compressed copy payload
    /// (which decodes to `SyncPages` or `SyncDisk`).
    pub fn is_compressed_kind(code: u8) -> bool {
        matches!(code, SYNC_PAGES_Z | SYNC_DISK_Z)
    }

    /// The message's name (for errors and logs).
    pub fn name(&self) -> &'static str {
        match self {
            Message::SyncBegin(_) => "SyncBegin",
            Message::SyncPages(_) => "SyncPages",
            Message::SyncDisk(_) => "SyncDisk",
            Message::SyncEnd(_) => "SyncEnd",
            Message::Backup => "Backup",
            Message::EpochBegin(_) => "EpochBegin",
            Message::EpochStateDelta(_) => "EpochStateDelta",
            Message::Pages(_) => "Pages",
            Message::PageDeltas(_) => "PageDeltas",
            Message::DiskWrites(_) => "DiskWrites",
            Message::EpochAudit(_) => "EpochAudit",
            Message::EpochEnd(_) => "EpochEnd",
            Message::Inbound(_) => "Inbound",
            Message::Ack => "Ack",
            Message::Stop => "Stop",
            Message::Handover => "Handover",
            Message::Release => "Release",
            Message::Switchover => "Switchover",
            Message::FinalOutput(_) => "FinalOutput",
            Message::EpochOutput(_) => "EpochOutput",
            Message::Refuse(_) => "Refuse",
            Message::SyncHeld(_) => "SyncHeld",
        }
    }

    /// The frame that carries this message.
    pub fn into_frame(self, epoch: u64, generation: u64) -> Frame {
        let (code, payload) = match self {
            Message::SyncBegin(plan) => (SYNC_BEGIN, plan.to_payload()),
            Message::SyncPages(b) => (SYNC_PAGES, b.into_bytes()),
            Message::SyncDisk(b) => (SYNC_DISK, b.into_bytes()),
            Message::SyncEnd(end) => (SYNC_END, end.to_payload()),
            Message::Backup => (BACKUP, Bytes::new()),
            Message::EpochBegin(state) => (EPOCH_BEGIN, state),
            Message::EpochStateDelta(d) => (EPOCH_STATE_DELTA, d.into_bytes()),
            Message::Pages(b) => (PAGES, b.into_bytes()),
            Message::PageDeltas(b) => (PAGE_DELTAS, b.into_bytes()),
            Message::DiskWrites(b) => (DISK_WRITES, b.into_bytes()),
            Message::EpochAudit(a) => (EPOCH_AUDIT, a.to_payload()),
            Message::EpochEnd(end) => (EPOCH_END, end.to_payload()),
            Message::Inbound(b) => (INBOUND, b.into_bytes()),
            Message::Ack => (ACK, Bytes::new()),
            Message::Stop => (STOP, Bytes::new()),
            Message::Handover => (HANDOVER, Bytes::new()),
            Message::Release => (RELEASE, Bytes::new()),
            Message::Switchover => (SWITCHOVER, Bytes::new()),
            Message::FinalOutput(b) => (FINAL_OUTPUT, b.into_bytes()),
            Message::EpochOutput(b) => (EPOCH_OUTPUT, b.into_bytes()),
            Message::Refuse(reason) => (REFUSE, Bytes::from(truncated(reason))),
            Message::SyncHeld(held) => (SYNC_HELD, held.to_payload()),
        };
        Frame::message(code, epoch, generation, payload).expect("replication kinds are messages")
    }

    /// Like [`Message::into_frame`], with a copy's pages or disk contents
    /// compressed where that makes them smaller (every other message, and
    /// any payload compression does not shrink, goes as it is).
    pub fn into_compressed_frame(
        self,
        epoch: u64,
        generation: u64,
        compressor: &mut compressed::Compressor,
    ) -> Frame {
        let (code, payload) = match &self {
            Message::SyncPages(b) => (SYNC_PAGES_Z, compressor.compress(b.bytes())),
            Message::SyncDisk(b) => (SYNC_DISK_Z, compressor.compress(b.bytes())),
            _ => (0, None),
        };
        match payload {
            Some(payload) => Frame::message(code, epoch, generation, payload)
                .expect("replication kinds are messages"),
            None => self.into_frame(epoch, generation),
        }
    }

    /// The message a frame carries, its structure checked (whole page and
    /// disk records, a well-formed end record and plan).
    pub fn from_frame(frame: Frame) -> Result<Envelope, ProtocolError> {
        let FrameKind::Message(code) = frame.kind else {
            return Err(ProtocolError::NotAMessage(frame.kind));
        };
        let (epoch, len, payload) = (frame.epoch, frame.payload.len(), frame.payload);
        let malformed = |kind, why| ProtocolError::Malformed {
            kind,
            epoch,
            len,
            why,
        };
        let empty = |kind| {
            if len == 0 {
                Ok(())
            } else {
                Err(malformed(kind, "carries a payload"))
            }
        };
        let decompressed = |kind| {
            compressed::decompress(&payload).map_err(|source| ProtocolError::Decompress {
                kind,
                epoch,
                len,
                source,
            })
        };
        let message = match code {
            SYNC_BEGIN => Message::SyncBegin(Box::new(
                SyncPlan::from_payload(&payload)
                    .map_err(|_| malformed("SyncBegin", "not a synchronisation plan"))?,
            )),
            SYNC_PAGES => Message::SyncPages(
                PageBatch::new(payload).ok_or(malformed("SyncPages", "not whole page records"))?,
            ),
            SYNC_DISK => Message::SyncDisk(
                DiskBatch::parse(payload).ok_or(malformed("SyncDisk", "not whole disk records"))?,
            ),
            SYNC_PAGES_Z => Message::SyncPages(
                PageBatch::new(decompressed("SyncPagesZ")?)
                    .ok_or(malformed("SyncPagesZ", "not whole page records"))?,
            ),
            SYNC_DISK_Z => Message::SyncDisk(
                DiskBatch::parse(decompressed("SyncDiskZ")?)
                    .ok_or(malformed("SyncDiskZ", "not whole disk records"))?,
            ),
            SYNC_END => Message::SyncEnd(
                EpochEnd::from_payload(&payload).ok_or(malformed("SyncEnd", "not 24 bytes"))?,
            ),
            BACKUP => {
                empty("Backup")?;
                Message::Backup
            }
            EPOCH_BEGIN => Message::EpochBegin(payload),
            EPOCH_STATE_DELTA => Message::EpochStateDelta(StateDelta::parse(payload).ok_or(
                malformed("EpochStateDelta", "not a well-formed state delta"),
            )?),
            PAGES => Message::Pages(
                PageBatch::new(payload).ok_or(malformed("Pages", "not whole page records"))?,
            ),
            PAGE_DELTAS => Message::PageDeltas(PageDeltaBatch::parse(payload).ok_or(malformed(
                "PageDeltas",
                "not whole, well-formed page delta records",
            ))?),
            DISK_WRITES => Message::DiskWrites(
                DiskBatch::parse(payload)
                    .ok_or(malformed("DiskWrites", "not whole disk records"))?,
            ),
            EPOCH_AUDIT => Message::EpochAudit(PageAudit::parse(&payload).ok_or(malformed(
                "EpochAudit",
                "not whole audit records of known reasons, at most 256",
            ))?),
            EPOCH_END => Message::EpochEnd(
                EpochEnd::from_payload(&payload).ok_or(malformed("EpochEnd", "not 24 bytes"))?,
            ),
            INBOUND => Message::Inbound(
                InboundBatch::parse(payload)
                    .ok_or(malformed("Inbound", "not whole inbound records"))?,
            ),
            ACK => {
                empty("Ack")?;
                Message::Ack
            }
            STOP => {
                empty("Stop")?;
                Message::Stop
            }
            HANDOVER => {
                empty("Handover")?;
                Message::Handover
            }
            RELEASE => {
                empty("Release")?;
                Message::Release
            }
            SWITCHOVER => {
                empty("Switchover")?;
                Message::Switchover
            }
            FINAL_OUTPUT => Message::FinalOutput(
                InboundBatch::parse(payload)
                    .ok_or(malformed("FinalOutput", "not whole inbound records"))?,
            ),
            EPOCH_OUTPUT => Message::EpochOutput(
                InboundBatch::parse(payload)
                    .ok_or(malformed("EpochOutput", "not whole inbound records"))?,
            ),
            REFUSE => Message::Refuse(
                std::str::from_utf8(&payload)
                    .ok()
                    .filter(|r| r.len() <= REFUSE_REASON_MAX)
                    .ok_or(malformed(
                        "Refuse",
                        "not a reason of at most 1 KiB of UTF-8",
                    ))?
                    .to_string(),
            ),
            SYNC_HELD => Message::SyncHeld(Held::from_payload(&payload).ok_or(malformed(
                "SyncHeld",
                "not a holding of a disk or of memory",
            ))?),
            other => return Err(ProtocolError::UnknownKind(other)),
        };
        Ok(Envelope {
            epoch,
            generation: frame.generation,
            message,
        })
    }
}

/// `reason` cut to [`REFUSE_REASON_MAX`] bytes at a character boundary.
fn truncated(mut reason: String) -> String {
    if reason.len() > REFUSE_REASON_MAX {
        let mut end = REFUSE_REASON_MAX;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

/// The frames of epoch `epoch`: its state, its staged pages and its disk
/// writes, closed by the end record that checks them.
pub fn epoch_frames(
    epoch: u64,
    generation: u64,
    state: Bytes,
    pages: StagedPages,
    writes: (Vec<DiskBatch>, u64),
) -> Vec<Frame> {
    epoch_frames_from(
        Message::EpochBegin(state),
        (epoch, generation),
        pages,
        writes,
        PageAudit::default(),
    )
}

/// [`epoch_frames`] beginning with `begin` (`EpochBegin` or
/// `EpochStateDelta`), with `audit` (if it names any page) before the end
/// record: the standby checks it once the epoch is applied.
pub fn epoch_frames_from(
    begin: Message,
    (epoch, generation): (u64, u64),
    pages: StagedPages,
    writes: (Vec<DiskBatch>, u64),
    audit: PageAudit,
) -> Vec<Frame> {
    debug_assert!(matches!(
        begin,
        Message::EpochBegin(_) | Message::EpochStateDelta(_)
    ));
    let mut out = Vec::with_capacity(pages.batches.len() + pages.deltas.len() + writes.0.len() + 2);
    out.push(begin.into_frame(epoch, generation));
    let mut end = EpochEnd {
        pages: pages.count,
        writes: writes.1,
        ..Default::default()
    };
    let mut crc = crc32fast::Hasher::new();
    for batch in pages.batches {
        batch.hash_addresses(&mut crc);
        out.push(Message::Pages(batch).into_frame(epoch, generation));
    }
    for batch in pages.deltas {
        batch.hash_addresses(&mut crc);
        out.push(Message::PageDeltas(batch).into_frame(epoch, generation));
    }
    end.pages_crc = crc.finalize();
    let mut crc = crc32fast::Hasher::new();
    for batch in writes.0 {
        crc.update(batch.bytes());
        out.push(Message::DiskWrites(batch).into_frame(epoch, generation));
    }
    end.writes_crc = crc.finalize();
    if !audit.is_empty() {
        out.push(Message::EpochAudit(audit).into_frame(epoch, generation));
    }
    out.push(Message::EpochEnd(end).into_frame(epoch, generation));
    out
}

/// Epoch `epoch` from pages given as (guest physical address, contents of
/// exactly one page), without disk writes (for tests and benchmarks).
pub fn encode_pages<'a>(
    epoch: u64,
    generation: u64,
    state: Bytes,
    pages: impl IntoIterator<Item = (u64, &'a [u8])>,
) -> Vec<Frame> {
    let mut stager = PageStager::default();
    for (gpa, data) in pages {
        assert_eq!(data.len(), PAGE_SIZE, "a page record holds one page");
        vmm::replication::PageSink::page_buffer(&mut stager, gpa).extend_from_slice(data);
    }
    epoch_frames(epoch, generation, state, stager.finish(), (Vec::new(), 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Message) -> Message {
        let env = Message::from_frame(m.into_frame(9, 4)).unwrap();
        assert_eq!((env.epoch, env.generation), (9, 4));
        env.message
    }

    #[test]
    fn every_message_round_trips_through_a_frame() {
        let plan = SyncPlan {
            version: SYNC_PLAN_VERSION,
            mem_mib: 128,
            disk_bytes: vec![1 << 20],
            nics: 1,
            content_key: crate::content::ContentKey([1; 32]).to_hex(),
            level: Default::default(),
            boot: None,
            written: vec![Some(WrittenPlan {
                common: Some("ab".repeat(16)),
                extents: vec![(0, 2), (7, 8)],
            })],
            next_common: Some("cd".repeat(16)),
            memory_lineage: Some("ef".repeat(16)),
            memory_since: Some(MemorySince {
                lineage: "12".repeat(16),
                from: 3,
                through: 40,
            }),
        };
        let mut page = vec![0u8; PAGE_RECORD];
        page[..8].copy_from_slice(&4096u64.to_le_bytes());
        let pages = PageBatch::new(Bytes::from(page)).unwrap();
        let (disks, _) = disk_payloads([DiskRecord {
            disk: 0,
            offset: 512,
            data: Bytes::from_static(b"x"),
        }]);
        let end = EpochEnd {
            pages: 1,
            pages_crc: 2,
            writes: 3,
            writes_crc: 4,
        };
        for m in [
            Message::SyncBegin(Box::new(plan)),
            Message::SyncPages(pages.clone()),
            Message::SyncDisk(disks[0].clone()),
            Message::SyncEnd(end),
            Message::Backup,
            Message::EpochBegin(Bytes::from_static(b"{}")),
            Message::EpochStateDelta(
                StateDelta::encode(&[1; 5000], &[2; 5000], 10_000).expect("a state delta"),
            ),
            Message::Pages(pages),
            Message::DiskWrites(disks[0].clone()),
            Message::EpochAudit({
                let mut audit = PageAudit::default();
                audit.add(0x3000, Picked::Recent, &[5; PAGE_SIZE]);
                audit
            }),
            Message::EpochEnd(end),
            Message::Inbound(
                inbound_payloads([vmm::replication::InboundFrame {
                    nic: 1,
                    seq: 7,
                    frame: vec![9; 60],
                }])
                .remove(0),
            ),
            Message::Ack,
            Message::Stop,
            Message::Handover,
            Message::Release,
            Message::Switchover,
            Message::FinalOutput(
                inbound_payloads([vmm::replication::InboundFrame {
                    nic: 0,
                    seq: 0,
                    frame: vec![3; 70],
                }])
                .remove(0),
            ),
            Message::EpochOutput(
                inbound_payloads([vmm::replication::InboundFrame {
                    nic: 0,
                    seq: 1,
                    frame: vec![4; 80],
                }])
                .remove(0),
            ),
            Message::Refuse("no space for the replica's disks".into()),
            Message::SyncHeld(Held {
                region: Region::Memory,
                part: HeldPart::Digests {
                    first_chunk: 4,
                    digests: vec![[5; 16]; 3],
                },
            }),
        ] {
            assert_eq!(round_trip(m.clone()), m);
        }
        let long = "é".repeat(REFUSE_REASON_MAX);
        let Message::Refuse(cut) = round_trip(Message::Refuse(long)) else {
            panic!("a refusal")
        };
        assert_eq!(cut.len(), REFUSE_REASON_MAX);
    }

    /// The copy's pages and disk contents travel compressed and arrive as
    /// the same messages; messages without bulk data, and a payload that
    /// would not shrink, go as they are.
    #[test]
    fn compressed_copy_frames_round_trip_and_other_messages_go_plain() {
        let mut compressor = compressed::Compressor::new(compressed::DEFAULT_LEVEL).unwrap();
        let mut stager = PageStager::default();
        for n in 0..PAGES_PER_FRAME as u64 {
            vmm::replication::PageSink::page_buffer(&mut stager, n * 4096)
                .extend_from_slice(&[n as u8; PAGE_SIZE]);
        }
        let pages = stager.finish().batches.remove(0);
        let (disks, _) = disk_payloads([DiskRecord {
            disk: 1,
            offset: 1 << 20,
            data: Bytes::from(vec![7u8; 64 << 10]),
        }]);
        for m in [
            Message::SyncPages(pages.clone()),
            Message::SyncDisk(disks[0].clone()),
        ] {
            let frame = m.clone().into_compressed_frame(0, 3, &mut compressor);
            assert!(
                matches!(frame.kind, FrameKind::Message(SYNC_PAGES_Z | SYNC_DISK_Z)),
                "{}: {:?}",
                m.name(),
                frame.kind
            );
            assert!(frame.payload.len() < 4096, "{}: not compressed", m.name());
            let env = Message::from_frame(frame).unwrap();
            assert_eq!((env.epoch, env.generation), (0, 3));
            assert_eq!(env.message, m);
        }
        let frame = Message::Ack.into_compressed_frame(5, 3, &mut compressor);
        assert_eq!(frame.kind, FrameKind::Message(ACK));
        // One page of noise does not shrink: it goes uncompressed.
        let mut state = 1u64;
        let mut record = vec![0u8; PAGE_RECORD];
        for b in &mut record[8..] {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (state >> 56) as u8;
        }
        let noise = Message::SyncPages(PageBatch::new(Bytes::from(record)).unwrap());
        let frame = noise.clone().into_compressed_frame(0, 3, &mut compressor);
        assert_eq!(frame.kind, FrameKind::Message(SYNC_PAGES));
        assert_eq!(Message::from_frame(frame).unwrap().message, noise);
    }

    /// A compressed frame that is not zstd, or that decompresses to
    /// something other than whole records, is refused before anything
    /// reaches the replica.
    #[test]
    fn bad_compressed_copy_frames_are_refused_with_a_reason() {
        let frame =
            |code, payload: Vec<u8>| Frame::message(code, 0, 0, Bytes::from(payload)).unwrap();
        assert!(matches!(
            Message::from_frame(frame(SYNC_PAGES_Z, vec![0x10, 0, 0, 0, 1, 2, 3])),
            Err(ProtocolError::Decompress {
                kind: "SyncPagesZ",
                source: compressed::DecompressError::Corrupt,
                ..
            })
        ));
        assert!(matches!(
            Message::from_frame(frame(SYNC_DISK_Z, vec![1, 2])),
            Err(ProtocolError::Decompress {
                kind: "SyncDiskZ",
                source: compressed::DecompressError::NoLength,
                ..
            })
        ));
        // Well compressed, but 100 bytes are not page records, and 17
        // bytes of zeros are not a disk record.
        let mut compressor = compressed::Compressor::new(1).unwrap();
        for (code, raw) in [(SYNC_PAGES_Z, vec![0u8; 100]), (SYNC_DISK_Z, vec![0u8; 17])] {
            let packed = compressor
                .compress(&raw)
                .map(|b| b.to_vec())
                .unwrap_or_else(|| {
                    let mut p = (raw.len() as u32).to_le_bytes().to_vec();
                    p.extend(zstd::bulk::compress(&raw, 1).unwrap());
                    p
                });
            assert!(
                matches!(
                    Message::from_frame(frame(code, packed)),
                    Err(ProtocolError::Malformed { .. })
                ),
                "kind {code}"
            );
        }
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        let frame = |code, payload: &'static [u8]| {
            Frame::message(code, 1, 0, Bytes::from_static(payload)).unwrap()
        };
        for (code, payload) in [
            (SYNC_BEGIN, &b"not json"[..]),
            (SYNC_PAGES, &[0u8; 100][..]),
            (PAGES, &[0u8; 4105][..]),
            (DISK_WRITES, &[0u8; 17][..]),
            (EPOCH_END, &[0u8; 23][..]),
            (INBOUND, &[0u8; 17][..]),
            (ACK, &b"x"[..]),
            (SWITCHOVER, &b"x"[..]),
            (FINAL_OUTPUT, &[0u8; 17][..]),
            (EPOCH_OUTPUT, &[0u8; 17][..]),
            (REFUSE, &[0xff, 0xfe][..]),
            (SYNC_HELD, &[0, 0, 0, 0, 1, 0][..]),
        ] {
            assert!(
                matches!(
                    Message::from_frame(frame(code, payload)),
                    Err(ProtocolError::Malformed { .. })
                ),
                "kind {code}"
            );
        }
        assert_eq!(
            Message::from_frame(frame(200, b"")),
            Err(ProtocolError::UnknownKind(200))
        );
        assert!(matches!(
            Message::from_frame(Frame::new(FrameKind::Heartbeat, 0, Bytes::new())),
            Err(ProtocolError::NotAMessage(FrameKind::Heartbeat))
        ));
    }
}
