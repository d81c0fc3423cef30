//! The wire form of one epoch:
//!
//! ```text
//! EpochBegin(N)  payload: the checkpoint's state (see `checkpoint`), opaque here
//! Pages(N) ...   payload: repeated [guest physical address: u64 LE][4096 bytes]
//! DiskWrites(N)  payload: repeated [disk: u32 LE][offset: u64 LE][length: u32 LE][bytes]
//! EpochEnd(N)    payload: [pages: u64][crc32 of the page addresses, in order: u32]
//!                         [writes: u64][crc32 of the DiskWrites payloads: u32]
//! ```
//! Each frame also carries its own crc32 over its whole payload (ft-link),
//! so page contents are checked once; the end record lets the standby tell
//! a complete epoch from a torn one and catches lost or reordered page
//! frames (the address sequence would differ) at 8 bytes per page.

use bytes::{BufMut, Bytes, BytesMut};
use ft_link::{Frame, FrameKind};
use vm_memory::{Bytes as _, GuestAddress};
use vmm::dirty::DirtyPages;
use vmm::memory::GuestMemoryMmap;

pub const PAGE_SIZE: usize = 4096;
/// Pages per `Pages` frame (256 KiB of page data).
pub const PAGES_PER_FRAME: usize = 64;
pub const PAGE_RECORD: usize = 8 + PAGE_SIZE;
/// Bytes of disk data per `DiskWrites` or `SyncDisk` frame (a larger write
/// is split).
pub const DISK_BYTES_PER_FRAME: usize = 1 << 20;
const DISK_RECORD_HEADER: usize = 4 + 8 + 4;

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

    pub fn to_payload(self) -> Bytes {
        let mut b = BytesMut::with_capacity(Self::LEN);
        b.put_u64_le(self.pages);
        b.put_u32_le(self.pages_crc);
        b.put_u64_le(self.writes);
        b.put_u32_le(self.writes_crc);
        b.freeze()
    }

    pub fn from_payload(p: &[u8]) -> Option<EpochEnd> {
        (p.len() == Self::LEN).then(|| EpochEnd {
            pages: u64::from_le_bytes(p[..8].try_into().expect("8 bytes")),
            pages_crc: u32::from_le_bytes(p[8..12].try_into().expect("4 bytes")),
            writes: u64::from_le_bytes(p[12..20].try_into().expect("8 bytes")),
            writes_crc: u32::from_le_bytes(p[20..24].try_into().expect("4 bytes")),
        })
    }
}

/// One disk write of an epoch (or a chunk of a disk during synchronisation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRecord {
    pub disk: u32,
    pub offset: u64,
    pub data: Bytes,
}

/// Page records built straight from guest memory: the staging copy a
/// checkpoint makes while the guest is stopped. Each payload is ready to be
/// a `Pages` (or `SyncPages`) frame.
pub fn stage_pages(
    mem: &GuestMemoryMmap,
    pages: impl IntoIterator<Item = u64>,
) -> Result<(Vec<Bytes>, u64), vm_memory::GuestMemoryError> {
    const CHUNK: usize = PAGES_PER_FRAME * PAGE_RECORD;
    let mut payloads = Vec::new();
    let mut count = 0u64;
    // Appended to, never zero-filled first: one pass over each page.
    let mut chunk: Vec<u8> = Vec::with_capacity(CHUNK);
    for page in pages {
        let gpa = page * PAGE_SIZE as u64;
        chunk.extend_from_slice(&gpa.to_le_bytes());
        mem.write_all_volatile_to(GuestAddress(gpa), &mut chunk, PAGE_SIZE)?;
        count += 1;
        if chunk.len() == CHUNK {
            payloads.push(Bytes::from(std::mem::replace(
                &mut chunk,
                Vec::with_capacity(CHUNK),
            )));
        }
    }
    if !chunk.is_empty() {
        payloads.push(Bytes::from(chunk));
    }
    Ok((payloads, count))
}

/// The page numbers of a harvest, in order.
pub fn dirty_page_numbers(pages: &DirtyPages) -> impl Iterator<Item = u64> + '_ {
    pages.page_numbers()
}

/// Disk records packed into payloads of at most about
/// [`DISK_BYTES_PER_FRAME`] bytes of data each; longer records are split.
pub fn disk_payloads(records: impl IntoIterator<Item = DiskRecord>) -> (Vec<Bytes>, u64) {
    let mut payloads = Vec::new();
    let mut count = 0u64;
    let mut chunk = BytesMut::new();
    for record in records {
        let mut offset = record.offset;
        for piece in record.data.chunks(DISK_BYTES_PER_FRAME) {
            if !chunk.is_empty() && chunk.len() + piece.len() > DISK_BYTES_PER_FRAME {
                payloads.push(chunk.split().freeze());
            }
            chunk.put_u32_le(record.disk);
            chunk.put_u64_le(offset);
            chunk.put_u32_le(piece.len() as u32);
            chunk.put_slice(piece);
            offset += piece.len() as u64;
            count += 1;
        }
    }
    if !chunk.is_empty() {
        payloads.push(chunk.split().freeze());
    }
    (payloads, count)
}

/// The records of a `DiskWrites` or `SyncDisk` payload; `None` if it is
/// malformed.
pub fn disk_records(payload: &Bytes) -> Option<Vec<DiskRecord>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let header = payload.get(at..at + DISK_RECORD_HEADER)?;
        let disk = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let offset = u64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")) as usize;
        let start = at + DISK_RECORD_HEADER;
        if payload.len() < start + len {
            return None;
        }
        out.push(DiskRecord {
            disk,
            offset,
            data: payload.slice(start..start + len),
        });
        at = start + len;
    }
    Some(out)
}

/// The frames of epoch `epoch` from its parts (staged pages and disk
/// payloads as built above).
pub fn frames(
    epoch: u64,
    state: Bytes,
    pages: (Vec<Bytes>, u64),
    writes: (Vec<Bytes>, u64),
) -> Vec<Frame> {
    let mut out = Vec::with_capacity(pages.0.len() + writes.0.len() + 2);
    out.push(Frame::new(FrameKind::EpochBegin, epoch, state));
    let mut end = EpochEnd {
        pages: pages.1,
        writes: writes.1,
        ..Default::default()
    };
    let mut crc = crc32fast::Hasher::new();
    for payload in pages.0 {
        hash_page_addresses(&payload, &mut crc);
        out.push(Frame::new(FrameKind::Pages, epoch, payload));
    }
    end.pages_crc = crc.finalize();
    let mut crc = crc32fast::Hasher::new();
    for payload in writes.0 {
        crc.update(&payload);
        out.push(Frame::new(FrameKind::DiskWrites, epoch, payload));
    }
    end.writes_crc = crc.finalize();
    out.push(Frame::new(FrameKind::EpochEnd, epoch, end.to_payload()));
    out
}

/// Encodes epoch `epoch`: its state, then `pages` (guest physical address
/// and contents, each exactly one page), then the end record (no disk
/// writes).
pub fn encode<'a>(
    epoch: u64,
    state: Bytes,
    pages: impl IntoIterator<Item = (u64, &'a [u8])>,
) -> Vec<Frame> {
    let mut payloads = Vec::new();
    let mut count = 0u64;
    let mut chunk = BytesMut::with_capacity(PAGES_PER_FRAME * PAGE_RECORD);
    for (gpa, data) in pages {
        assert_eq!(
            data.len(),
            PAGE_SIZE,
            "a page record holds exactly one page"
        );
        chunk.put_u64_le(gpa);
        chunk.put_slice(data);
        count += 1;
        if chunk.len() == PAGES_PER_FRAME * PAGE_RECORD {
            payloads.push(chunk.split().freeze());
        }
    }
    if !chunk.is_empty() {
        payloads.push(chunk.split().freeze());
    }
    frames(epoch, state, (payloads, count), (Vec::new(), 0))
}

/// Feeds the guest addresses of a `Pages` payload's records to `crc`.
pub fn hash_page_addresses(payload: &[u8], crc: &mut crc32fast::Hasher) {
    for record in payload.chunks(PAGE_RECORD) {
        crc.update(&record[..8.min(record.len())]);
    }
}

/// The page records of a `Pages` payload; `None` if it is not a whole
/// number of records.
pub fn page_records(payload: &Bytes) -> Option<impl Iterator<Item = (u64, Bytes)> + '_> {
    payload.len().is_multiple_of(PAGE_RECORD).then(|| {
        (0..payload.len() / PAGE_RECORD).map(move |i| {
            let at = i * PAGE_RECORD;
            let gpa = u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
            (gpa, payload.slice(at + 8..at + PAGE_RECORD))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_records_round_trip_and_long_writes_are_split() {
        let big = Bytes::from(vec![7u8; DISK_BYTES_PER_FRAME + 512]);
        let records = vec![
            DiskRecord {
                disk: 0,
                offset: 4096,
                data: Bytes::from_static(b"0123456789abcdef"),
            },
            DiskRecord {
                disk: 1,
                offset: 1 << 20,
                data: big.clone(),
            },
        ];
        let (payloads, count) = disk_payloads(records.clone());
        assert_eq!(count, 3, "the big write is split in two");
        let back: Vec<DiskRecord> = payloads
            .iter()
            .flat_map(|p| disk_records(p).expect("well formed"))
            .collect();
        assert_eq!(back[0], records[0]);
        assert_eq!(back[1].offset, 1 << 20);
        assert_eq!(back[2].offset, (1 << 20) + DISK_BYTES_PER_FRAME as u64);
        assert_eq!(back[1].data.len() + back[2].data.len(), big.len());
        // A record announcing more bytes than the payload has is malformed.
        let mut bad = BytesMut::from(&payloads[0][..]);
        bad.truncate(bad.len() - 1);
        assert!(disk_records(&bad.freeze()).is_none());
    }

    #[test]
    fn pages_are_staged_straight_from_guest_memory() {
        let ram = vmm::memory::create(16).unwrap();
        ram.memory
            .write_slice(&[9u8; PAGE_SIZE], GuestAddress(3 * PAGE_SIZE as u64))
            .unwrap();
        let (payloads, count) = stage_pages(&ram.memory, (0..70).chain([3])).unwrap();
        assert_eq!(count, 71);
        assert_eq!(payloads.len(), 2);
        let records: Vec<_> = payloads
            .iter()
            .flat_map(|p| page_records(p).unwrap())
            .collect();
        assert_eq!(records[3].0, 3 * PAGE_SIZE as u64);
        assert!(records[3].1.iter().all(|&b| b == 9));
        assert!(records[70].1.iter().all(|&b| b == 9));
        assert!(stage_pages(&ram.memory, [1 << 30]).is_err());
    }
}
