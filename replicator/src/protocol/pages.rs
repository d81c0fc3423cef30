//! Page records: `[guest physical address: u64 LE][4096 bytes]`, packed
//! [`PAGES_PER_FRAME`] to a frame. The primary stages them straight from
//! guest memory while the guest is stopped ([`PageStager`], the VMM's
//! [`PageSink`]); the standby checks them ([`PageBatch`]) before the first
//! byte reaches the replica.

use bytes::Bytes;
use vmm::replication::PageSink;

use super::{ProtocolError, PAGE_SIZE};

/// Pages per `Pages` (or `SyncPages`) frame: 256 KiB of page data.
pub const PAGES_PER_FRAME: usize = 64;
pub const PAGE_RECORD: usize = 8 + PAGE_SIZE;
const CHUNK: usize = PAGES_PER_FRAME * PAGE_RECORD;

/// The production page stager: page records appended straight into frame
/// payloads (never zero-filled first: one pass over each page).
#[derive(Default)]
pub struct PageStager {
    full: Vec<PageBatch>,
    chunk: Vec<u8>,
    count: u64,
}

/// What a stager holds when it is finished: the epoch's pages, whole
/// (and, once the primary's delta cache went over them, some as deltas).
#[derive(Debug, Default)]
pub struct StagedPages {
    pub batches: Vec<PageBatch>,
    pub deltas: Vec<super::PageDeltaBatch>,
    /// Pages in all, whole and as deltas.
    pub count: u64,
}

impl PageSink for PageStager {
    fn page_buffer(&mut self, gpa: u64) -> &mut Vec<u8> {
        if self.chunk.len() >= CHUNK {
            let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK));
            self.full.push(PageBatch(Bytes::from(chunk)));
        }
        if self.chunk.capacity() == 0 {
            self.chunk.reserve_exact(CHUNK);
        }
        self.chunk.extend_from_slice(&gpa.to_le_bytes());
        self.count += 1;
        &mut self.chunk
    }
}

impl PageStager {
    /// Pages staged so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The batches filled so far (for streaming a long copy); the one
    /// being filled stays.
    pub fn take_full(&mut self) -> Vec<PageBatch> {
        std::mem::take(&mut self.full)
    }

    pub fn finish(mut self) -> StagedPages {
        if !self.chunk.is_empty() {
            self.full.push(PageBatch(Bytes::from(self.chunk)));
        }
        StagedPages {
            batches: self.full,
            deltas: Vec::new(),
            count: self.count,
        }
    }
}

/// A payload of whole page records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBatch(Bytes);

impl PageBatch {
    /// `None` unless `payload` is a whole number of records.
    pub fn new(payload: Bytes) -> Option<PageBatch> {
        payload
            .len()
            .is_multiple_of(PAGE_RECORD)
            .then_some(PageBatch(payload))
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// The payload: the records as they go on the wire.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.0.len() / PAGE_RECORD
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each record's guest physical address and page contents.
    pub fn records(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.0.chunks_exact(PAGE_RECORD).map(|r| {
            let gpa = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
            (gpa, &r[8..])
        })
    }

    /// Feeds the records' addresses, in order, to `crc` (the end record's
    /// check of an epoch's page sequence).
    pub fn hash_addresses(&self, crc: &mut crc32fast::Hasher) {
        for record in self.0.chunks_exact(PAGE_RECORD) {
            crc.update(&record[..8]);
        }
    }

    /// Checks that every record is a whole, aligned page inside
    /// `ram_bytes` of memory: the one check of page ranges, made before
    /// anything is written.
    pub fn check_within(&self, ram_bytes: u64) -> Result<(), ProtocolError> {
        self.records()
            .try_for_each(|(gpa, _)| check_page_within(gpa, ram_bytes))
    }
}

/// That `gpa` is an aligned page inside `ram_bytes` of memory.
pub(super) fn check_page_within(gpa: u64, ram_bytes: u64) -> Result<(), ProtocolError> {
    let inside = gpa.is_multiple_of(PAGE_SIZE as u64)
        && gpa
            .checked_add(PAGE_SIZE as u64)
            .is_some_and(|end| end <= ram_bytes);
    if inside {
        Ok(())
    } else {
        Err(ProtocolError::PageOutside { gpa, ram_bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_records_fill_frames_and_read_back() {
        let mut stager = PageStager::default();
        for n in 0..70u64 {
            stager
                .page_buffer(n * 4096)
                .extend_from_slice(&[n as u8; PAGE_SIZE]);
        }
        assert_eq!(stager.take_full().len(), 1, "one full frame so far");
        let staged = stager.finish();
        assert_eq!(staged.count, 70);
        assert_eq!(staged.batches.len(), 1, "the rest");
        let records: Vec<_> = staged.batches[0].records().collect();
        assert_eq!(records.len(), 6);
        assert_eq!(records[0].0, 64 * 4096);
        assert!(records[5].1.iter().all(|&b| b == 69));
    }

    #[test]
    fn pages_outside_memory_or_unaligned_are_refused() {
        let record = |gpa: u64| {
            let mut r = vec![0u8; PAGE_RECORD];
            r[..8].copy_from_slice(&gpa.to_le_bytes());
            PageBatch::new(Bytes::from(r)).unwrap()
        };
        let ram = 16 << 20;
        assert!(record(0).check_within(ram).is_ok());
        assert!(record(ram - 4096).check_within(ram).is_ok());
        for bad in [ram, 17, u64::MAX - 4095, u64::MAX] {
            assert_eq!(
                record(bad).check_within(ram),
                Err(ProtocolError::PageOutside {
                    gpa: bad,
                    ram_bytes: ram
                })
            );
        }
        assert!(PageBatch::new(Bytes::from(vec![0u8; 100])).is_none());
    }
}
