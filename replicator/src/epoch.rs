//! The wire form of one epoch:
//!
//! ```text
//! EpochBegin(N)  payload: vCPU/VM/device state bytes (opaque here)
//! Pages(N) ...   payload: repeated [guest physical address: u64 LE][4096 bytes]
//! EpochEnd(N)    payload: [pages: u64 LE][crc32 of every Pages payload, in order: u32 LE]
//! ```
//! Each frame also carries its own crc32 (ft-link); the end record lets the
//! standby tell a complete epoch from a torn one.

use bytes::{BufMut, Bytes, BytesMut};
use ft_link::{Frame, FrameKind};

pub const PAGE_SIZE: usize = 4096;
/// Pages per `Pages` frame (256 KiB of page data).
pub const PAGES_PER_FRAME: usize = 64;
const PAGE_RECORD: usize = 8 + PAGE_SIZE;

/// The summary that closes an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEnd {
    pub pages: u64,
    pub pages_crc: u32,
}

impl EpochEnd {
    pub fn to_payload(self) -> Bytes {
        let mut b = BytesMut::with_capacity(12);
        b.put_u64_le(self.pages);
        b.put_u32_le(self.pages_crc);
        b.freeze()
    }

    pub fn from_payload(p: &[u8]) -> Option<EpochEnd> {
        (p.len() == 12).then(|| EpochEnd {
            pages: u64::from_le_bytes(p[..8].try_into().expect("8 bytes")),
            pages_crc: u32::from_le_bytes(p[8..].try_into().expect("4 bytes")),
        })
    }
}

/// Encodes epoch `epoch`: its state, then `pages` (guest physical address
/// and contents, each exactly one page), then the end record.
pub fn encode<'a>(
    epoch: u64,
    state: Bytes,
    pages: impl IntoIterator<Item = (u64, &'a [u8])>,
) -> Vec<Frame> {
    let mut frames = vec![Frame::new(FrameKind::EpochBegin, epoch, state)];
    let mut crc = crc32fast::Hasher::new();
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
            let payload = chunk.split().freeze();
            crc.update(&payload);
            frames.push(Frame::new(FrameKind::Pages, epoch, payload));
        }
    }
    if !chunk.is_empty() {
        let payload = chunk.split().freeze();
        crc.update(&payload);
        frames.push(Frame::new(FrameKind::Pages, epoch, payload));
    }
    let end = EpochEnd {
        pages: count,
        pages_crc: crc.finalize(),
    };
    frames.push(Frame::new(FrameKind::EpochEnd, epoch, end.to_payload()));
    frames
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
