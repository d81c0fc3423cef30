//! Page delta records: `[guest physical address: u64 LE][length: u16 LE]
//! [delta]` (see [`super::delta`]), packed up to [`DELTA_FRAME_BYTES`] to a
//! `PageDeltas` frame: pages of an epoch given as what changed since the
//! version the standby's replica holds. A batch is checked whole when it
//! is decoded (every record complete, every delta well formed); its
//! addresses are checked against memory before the first byte reaches the
//! replica, as a page batch's are.

use bytes::Bytes;

use super::delta::{self, encode};
use super::{ProtocolError, PAGE_SIZE};

/// A delta longer than this goes as the whole page instead: past it the
/// saving is small against the work on both sides.
pub const DELTA_MAX: usize = PAGE_SIZE / 4;
/// What a record adds to its delta.
const HEADER: usize = 8 + 2;
/// Delta bytes (records included) per frame, at most about.
pub const DELTA_FRAME_BYTES: usize = 256 << 10;

/// A payload of whole, well-formed page delta records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageDeltaBatch {
    bytes: Bytes,
    count: usize,
}

/// Each record of `payload`: (address, delta), or `None` at the first
/// record that is cut short.
fn split(payload: &[u8]) -> impl Iterator<Item = Option<(u64, &[u8])>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at == payload.len() {
            return None;
        }
        let Some(header) = payload.get(at..at + HEADER) else {
            at = payload.len();
            return Some(None);
        };
        let gpa = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let len = usize::from(u16::from_le_bytes(header[8..].try_into().expect("2 bytes")));
        let Some(delta) = payload.get(at + HEADER..at + HEADER + len) else {
            at = payload.len();
            return Some(None);
        };
        at += HEADER + len;
        Some(Some((gpa, delta)))
    })
}

impl PageDeltaBatch {
    /// `None` unless `payload` is whole records, each delta at most
    /// [`DELTA_MAX`] bytes and well formed.
    pub fn parse(payload: Bytes) -> Option<PageDeltaBatch> {
        let mut count = 0;
        for record in split(&payload) {
            let (_, d) = record?;
            if d.len() > DELTA_MAX || delta::check(d).is_err() {
                return None;
            }
            count += 1;
        }
        Some(PageDeltaBatch {
            bytes: payload,
            count,
        })
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// The payload: the records as they go on the wire.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Each record's guest physical address and delta.
    pub fn records(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        split(&self.bytes).map(|r| r.expect("checked whole when parsed or built"))
    }

    /// Feeds the records' addresses, in order, to `crc` (as
    /// [`super::PageBatch::hash_addresses`]: the end record checks pages
    /// and deltas together, in the order their frames came).
    pub fn hash_addresses(&self, crc: &mut crc32fast::Hasher) {
        for (gpa, _) in self.records() {
            crc.update(&gpa.to_le_bytes());
        }
    }

    /// Checks that every record is of an aligned page inside `ram_bytes`
    /// of memory (its delta was checked when the batch was decoded).
    pub fn check_within(&self, ram_bytes: u64) -> Result<(), ProtocolError> {
        self.records()
            .try_for_each(|(gpa, _)| super::pages::check_page_within(gpa, ram_bytes))
    }
}

/// Builds delta batches (the primary's encoder).
#[derive(Default)]
pub struct PageDeltaStager {
    full: Vec<PageDeltaBatch>,
    chunk: Vec<u8>,
    in_chunk: usize,
    count: u64,
    bytes: u64,
}

impl PageDeltaStager {
    /// Adds the delta of the page at `gpa` from `old` to `new` and returns
    /// its length (0: the page did not change), or returns `None` (adding
    /// nothing) where it would be longer than [`DELTA_MAX`]: the page then
    /// goes whole.
    pub fn add(&mut self, gpa: u64, old: &[u8], new: &[u8]) -> Option<usize> {
        let start = self.chunk.len();
        self.chunk.extend_from_slice(&gpa.to_le_bytes());
        self.chunk.extend_from_slice(&[0, 0]);
        let Some(len) = encode(old, new, DELTA_MAX, &mut self.chunk) else {
            self.chunk.truncate(start);
            return None;
        };
        let len16 = u16::try_from(len).expect("at most DELTA_MAX");
        self.chunk[start + 8..start + HEADER].copy_from_slice(&len16.to_le_bytes());
        self.in_chunk += 1;
        self.count += 1;
        self.bytes += (HEADER + len) as u64;
        if self.chunk.len() >= DELTA_FRAME_BYTES {
            self.close_chunk();
        }
        Some(len)
    }

    fn close_chunk(&mut self) {
        if self.in_chunk > 0 {
            let chunk = std::mem::take(&mut self.chunk);
            self.full.push(PageDeltaBatch {
                bytes: Bytes::from(chunk),
                count: std::mem::take(&mut self.in_chunk),
            });
        }
    }

    /// Deltas added so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes of the records added so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn finish(mut self) -> Vec<PageDeltaBatch> {
        self.close_chunk();
        self.full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_staged_decode_and_apply_to_the_new_pages() {
        let old = vec![0x44u8; PAGE_SIZE];
        let mut stager = PageDeltaStager::default();
        let mut news = Vec::new();
        for n in 0..100u64 {
            let mut new = old.clone();
            new[(n as usize * 40) % PAGE_SIZE] = n as u8;
            assert!(stager.add(n * 4096, &old, &new).is_some());
            news.push(new);
        }
        let whole = vec![0x55u8; PAGE_SIZE];
        assert!(
            stager.add(1 << 20, &old, &whole).is_none(),
            "too long: goes whole"
        );
        assert_eq!(stager.count(), 100);
        let batches = stager.finish();
        assert_eq!(batches.len(), 1);
        let batch = PageDeltaBatch::parse(batches[0].clone().into_bytes()).expect("decodes");
        assert_eq!(batch, batches[0]);
        assert_eq!(batch.len(), 100);
        for ((gpa, d), new) in batch.records().zip(&news) {
            let mut page = old.clone();
            delta::apply(&mut page, d).unwrap();
            assert_eq!(&page, new, "page {gpa:#x}");
        }
        assert!(batch.check_within(100 * 4096).is_ok());
        assert_eq!(
            batch.check_within(99 * 4096),
            Err(ProtocolError::PageOutside {
                gpa: 99 * 4096,
                ram_bytes: 99 * 4096
            })
        );
    }

    #[test]
    fn a_big_epoch_fills_several_frames() {
        let old = vec![0u8; PAGE_SIZE];
        let mut new = old.clone();
        new[..DELTA_MAX - 16].fill(1);
        let mut stager = PageDeltaStager::default();
        for n in 0..600u64 {
            assert!(stager.add(n * 4096, &old, &new).is_some());
        }
        let batches = stager.finish();
        assert!(batches.len() >= 2, "{} frames", batches.len());
        assert!(batches
            .iter()
            .all(|b| b.bytes().len() < DELTA_FRAME_BYTES + HEADER + DELTA_MAX));
        assert_eq!(batches.iter().map(PageDeltaBatch::len).sum::<usize>(), 600);
    }

    #[test]
    fn cut_or_malformed_batches_are_refused() {
        let old = vec![0u8; PAGE_SIZE];
        let mut new = old.clone();
        new[100] = 1;
        let mut stager = PageDeltaStager::default();
        stager.add(0, &old, &new);
        stager.add(4096, &old, &new);
        let bytes = stager.finish().remove(0).into_bytes();
        assert!(PageDeltaBatch::parse(bytes.clone()).is_some());
        for cut in 1..bytes.len() {
            let whole_first = cut == bytes.len() / 2;
            assert_eq!(
                PageDeltaBatch::parse(bytes.slice(..cut)).is_some(),
                whole_first,
                "cut at {cut}"
            );
        }
        // A well-framed record whose delta is not a delta.
        let mut bad = 0u64.to_le_bytes().to_vec();
        bad.extend_from_slice(&2u16.to_le_bytes());
        bad.extend_from_slice(&[0, 0]);
        assert!(PageDeltaBatch::parse(Bytes::from(bad)).is_none());
        // A delta longer than DELTA_MAX, even a valid one.
        let mut long = 0u64.to_le_bytes().to_vec();
        let d = {
            let mut out = Vec::new();
            let mut changed = old.clone();
            changed[..DELTA_MAX + 8].fill(9);
            encode(&old, &changed, PAGE_SIZE, &mut out).unwrap();
            out
        };
        long.extend_from_slice(&(d.len() as u16).to_le_bytes());
        long.extend_from_slice(&d);
        assert!(PageDeltaBatch::parse(Bytes::from(long)).is_none());
        assert_eq!(
            PageDeltaBatch::parse(Bytes::new()).map(|b| b.len()),
            Some(0)
        );
    }
}
