//! Page delta records: `[guest physical address: u64 LE][base and length:
//! u16 LE][delta]` (see [`super::delta`]), packed up to
//! [`DELTA_FRAME_BYTES`] to a `PageDeltas` frame: pages of an epoch given
//! as what changed since the version the standby's replica holds, or,
//! with the top bit of the length set ([`DeltaBase::Zero`]), since a page
//! of zeros: a mostly-zero page (memory the guest just cleared and began
//! to fill) the primary had no version of. A batch is checked whole when it
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
/// The bit of a record's length field that says its base is a zero page.
const ZERO_BASE: u16 = 0x8000;
const _: () = assert!(DELTA_MAX < ZERO_BASE as usize);

/// What a delta was made against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaBase {
    /// The page as the standby's replica holds it.
    Replica,
    /// A page of zeros: the delta gives the whole page, whatever the
    /// replica holds.
    Zero,
}

/// One record of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaRecord<'a> {
    pub gpa: u64,
    pub base: DeltaBase,
    pub delta: &'a [u8],
}

/// A page of zeros, the base of [`DeltaBase::Zero`] deltas.
pub static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
/// Delta bytes (records included) per frame, at most about.
pub const DELTA_FRAME_BYTES: usize = 256 << 10;

/// A payload of whole, well-formed page delta records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageDeltaBatch {
    bytes: Bytes,
    count: usize,
}

/// Each record of `payload`, or `None` at the first record that is cut
/// short.
fn split(payload: &[u8]) -> impl Iterator<Item = Option<DeltaRecord<'_>>> + '_ {
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
        let field = u16::from_le_bytes(header[8..].try_into().expect("2 bytes"));
        let base = if field & ZERO_BASE != 0 {
            DeltaBase::Zero
        } else {
            DeltaBase::Replica
        };
        let len = usize::from(field & !ZERO_BASE);
        let Some(delta) = payload.get(at + HEADER..at + HEADER + len) else {
            at = payload.len();
            return Some(None);
        };
        at += HEADER + len;
        Some(Some(DeltaRecord { gpa, base, delta }))
    })
}

impl PageDeltaBatch {
    /// `None` unless `payload` is whole records, each delta at most
    /// [`DELTA_MAX`] bytes and well formed.
    pub fn parse(payload: Bytes) -> Option<PageDeltaBatch> {
        let mut count = 0;
        for record in split(&payload) {
            let d = record?.delta;
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

    /// Each record: its page's guest physical address, its base and its
    /// delta.
    pub fn records(&self) -> impl Iterator<Item = DeltaRecord<'_>> + '_ {
        split(&self.bytes).map(|r| r.expect("checked whole when parsed or built"))
    }

    /// Feeds the records' addresses, in order, to `crc` (as
    /// [`super::PageBatch::hash_addresses`]: the end record checks pages
    /// and deltas together, in the order their frames came).
    pub fn hash_addresses(&self, crc: &mut crc32fast::Hasher) {
        for r in self.records() {
            crc.update(&r.gpa.to_le_bytes());
        }
    }

    /// Checks that every record is of an aligned page inside `ram_bytes`
    /// of memory (its delta was checked when the batch was decoded).
    pub fn check_within(&self, ram_bytes: u64) -> Result<(), ProtocolError> {
        self.records()
            .try_for_each(|r| super::pages::check_page_within(r.gpa, ram_bytes))
    }
}

/// Builds delta batches (the primary's encoder).
#[derive(Default)]
pub struct PageDeltaStager {
    full: Vec<PageDeltaBatch>,
    chunk: Vec<u8>,
    in_chunk: usize,
    count: u64,
    from_zero: u64,
    bytes: u64,
}

impl PageDeltaStager {
    /// Adds the delta of the page at `gpa` from `old` to `new` and returns
    /// its length (0: the page did not change), or returns `None` (adding
    /// nothing) where it would be longer than [`DELTA_MAX`]: the page then
    /// goes whole.
    pub fn add(&mut self, gpa: u64, old: &[u8], new: &[u8]) -> Option<usize> {
        self.add_from(gpa, DeltaBase::Replica, old, new)
    }

    /// Adds the page at `gpa` as a delta from a page of zeros, and
    /// returns its length, or returns `None` (adding nothing) where it
    /// would be longer than [`DELTA_MAX`] (the page is not mostly zeros).
    pub fn add_from_zero(&mut self, gpa: u64, new: &[u8]) -> Option<usize> {
        self.add_from(gpa, DeltaBase::Zero, &ZERO_PAGE, new)
    }

    fn add_from(&mut self, gpa: u64, base: DeltaBase, old: &[u8], new: &[u8]) -> Option<usize> {
        let start = self.chunk.len();
        self.chunk.extend_from_slice(&gpa.to_le_bytes());
        self.chunk.extend_from_slice(&[0, 0]);
        let Some(len) = encode(old, new, DELTA_MAX, &mut self.chunk) else {
            self.chunk.truncate(start);
            return None;
        };
        let mut field = u16::try_from(len).expect("at most DELTA_MAX");
        if base == DeltaBase::Zero {
            field |= ZERO_BASE;
            self.from_zero += 1;
        }
        self.chunk[start + 8..start + HEADER].copy_from_slice(&field.to_le_bytes());
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

    /// Of the deltas added so far, those from a page of zeros.
    pub fn from_zero(&self) -> u64 {
        self.from_zero
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
        for (r, new) in batch.records().zip(&news) {
            assert_eq!(r.base, DeltaBase::Replica);
            let mut page = old.clone();
            delta::apply(&mut page, r.delta).unwrap();
            assert_eq!(&page, new, "page {:#x}", r.gpa);
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
    fn mostly_zero_pages_go_from_a_zero_page_whatever_the_replica_holds() {
        let mut sparse = vec![0u8; PAGE_SIZE];
        sparse[0] = 7;
        sparse[2048..2056].fill(3);
        let mut dense = vec![0u8; PAGE_SIZE];
        dense[..DELTA_MAX + 8].fill(1);
        let mut stager = PageDeltaStager::default();
        let old = vec![0x44u8; PAGE_SIZE];
        let mut changed = old.clone();
        changed[9] = 1;
        assert!(stager.add(0, &old, &changed).is_some());
        let len = stager.add_from_zero(4096, &sparse).expect("mostly zeros");
        assert!(len < 32, "{len} bytes for two words");
        assert_eq!(stager.add_from_zero(8192, &ZERO_PAGE), Some(0), "zeros");
        assert_eq!(stager.add_from_zero(12288, &dense), None, "not sparse");
        assert_eq!((stager.count(), stager.from_zero()), (3, 2));
        let batch = PageDeltaBatch::parse(stager.finish().remove(0).into_bytes()).unwrap();
        let bases: Vec<_> = batch.records().map(|r| (r.gpa, r.base)).collect();
        assert_eq!(
            bases,
            [
                (0, DeltaBase::Replica),
                (4096, DeltaBase::Zero),
                (8192, DeltaBase::Zero)
            ]
        );
        // Applied to a zero page: the page, whatever the replica held.
        let r = batch.records().nth(1).unwrap();
        let mut page = ZERO_PAGE.to_vec();
        delta::apply(&mut page, r.delta).unwrap();
        assert_eq!(page, sparse);
        // The base bit does not lift the length limit.
        let mut long = 0u64.to_le_bytes().to_vec();
        long.extend_from_slice(&(ZERO_BASE | (DELTA_MAX as u16 + 1)).to_le_bytes());
        long.extend_from_slice(&vec![0u8; DELTA_MAX + 1]);
        assert!(PageDeltaBatch::parse(Bytes::from(long)).is_none());
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
