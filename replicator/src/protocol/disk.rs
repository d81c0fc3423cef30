//! Disk records: `[disk: u32 LE][offset: u64 LE][length: u32 LE][bytes]`,
//! about [`DISK_BYTES_PER_FRAME`] of data to a frame: an epoch's disk
//! writes, or a disk's contents during synchronisation.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of disk data per `DiskWrites` or `SyncDisk` frame (a larger write
/// is split).
pub const DISK_BYTES_PER_FRAME: usize = 1 << 20;
const DISK_RECORD_HEADER: usize = 4 + 8 + 4;

/// One disk write of an epoch (or a chunk of a disk during
/// synchronisation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRecord {
    pub disk: u32,
    pub offset: u64,
    pub data: Bytes,
}

/// A payload of whole disk records, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskBatch {
    raw: Bytes,
    records: Vec<DiskRecord>,
}

impl DiskBatch {
    /// The records of `payload`; `None` if it is malformed.
    pub fn parse(payload: Bytes) -> Option<DiskBatch> {
        let mut records = Vec::new();
        let mut at = 0;
        while at < payload.len() {
            let header = payload.get(at..at.checked_add(DISK_RECORD_HEADER)?)?;
            let disk = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
            let offset = u64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")) as usize;
            let start = at + DISK_RECORD_HEADER;
            let end = start.checked_add(len)?;
            if payload.len() < end {
                return None;
            }
            records.push(DiskRecord {
                disk,
                offset,
                data: payload.slice(start..end),
            });
            at = end;
        }
        Some(DiskBatch {
            raw: payload,
            records,
        })
    }

    pub fn records(&self) -> &[DiskRecord] {
        &self.records
    }

    pub fn into_records(self) -> Vec<DiskRecord> {
        self.records
    }

    /// The encoded payload (the end record checks it whole).
    pub fn bytes(&self) -> &[u8] {
        &self.raw
    }

    pub fn into_bytes(self) -> Bytes {
        self.raw
    }
}

/// Disk records packed into batches of at most about
/// [`DISK_BYTES_PER_FRAME`] bytes of data each; longer records are split.
/// Returns the batches and the number of records in them.
pub fn disk_payloads(records: impl IntoIterator<Item = DiskRecord>) -> (Vec<DiskBatch>, u64) {
    let mut batches = Vec::new();
    let mut count = 0u64;
    let mut chunk = BytesMut::new();
    let mut in_chunk = Vec::new();
    let mut flush = |chunk: &mut BytesMut, in_chunk: &mut Vec<DiskRecord>| {
        batches.push(DiskBatch {
            raw: chunk.split().freeze(),
            records: std::mem::take(in_chunk),
        });
    };
    for record in records {
        let mut offset = record.offset;
        let mut from = 0;
        while from < record.data.len() {
            let to = (from + DISK_BYTES_PER_FRAME).min(record.data.len());
            let piece = record.data.slice(from..to);
            if !chunk.is_empty() && chunk.len() + piece.len() > DISK_BYTES_PER_FRAME {
                flush(&mut chunk, &mut in_chunk);
            }
            chunk.put_u32_le(record.disk);
            chunk.put_u64_le(offset);
            chunk.put_u32_le(piece.len() as u32);
            chunk.put_slice(&piece);
            in_chunk.push(DiskRecord {
                disk: record.disk,
                offset,
                data: piece.clone(),
            });
            // Wrapping: past the last piece of a write that ends at 2^64
            // there is no next offset (a write that would run past it is
            // refused by the standby's range check of its first piece).
            offset = offset.wrapping_add(piece.len() as u64);
            count += 1;
            from = to;
        }
    }
    if !chunk.is_empty() {
        flush(&mut chunk, &mut in_chunk);
    }
    (batches, count)
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
        let (batches, count) = disk_payloads(records.clone());
        assert_eq!(count, 3, "the big write is split in two");
        let back: Vec<DiskRecord> = batches
            .iter()
            .flat_map(|b| {
                DiskBatch::parse(b.clone().into_bytes())
                    .expect("well formed")
                    .into_records()
            })
            .collect();
        let direct: Vec<DiskRecord> = batches.iter().flat_map(|b| b.records().to_vec()).collect();
        assert_eq!(back, direct, "the parse sees what was packed");
        assert_eq!(back[0], records[0]);
        assert_eq!(back[1].offset, 1 << 20);
        assert_eq!(back[2].offset, (1 << 20) + DISK_BYTES_PER_FRAME as u64);
        assert_eq!(back[1].data.len() + back[2].data.len(), big.len());
        // A record announcing more bytes than the payload has is malformed.
        let mut bad = BytesMut::from(batches[0].bytes());
        bad.truncate(bad.len() - 1);
        assert!(DiskBatch::parse(bad.freeze()).is_none());
        // A length that would overflow is malformed, not a panic.
        let mut huge = BytesMut::new();
        huge.put_u32_le(0);
        huge.put_u64_le(0);
        huge.put_u32_le(u32::MAX);
        assert!(DiskBatch::parse(huge.freeze()).is_none());
    }

    #[test]
    fn a_write_at_the_end_of_the_address_space_packs_without_a_panic() {
        // Found by fuzzing (disk_records): packing a write that ends at
        // 2^64 overflowed the offset of the piece after it, which does not
        // exist (a panic where overflow checks are on).
        let (batches, count) = disk_payloads([DiskRecord {
            disk: 0,
            offset: u64::MAX,
            data: Bytes::from_static(b"x"),
        }]);
        assert_eq!(count, 1);
        assert_eq!(batches[0].records()[0].offset, u64::MAX);
        let parsed = DiskBatch::parse(batches[0].clone().into_bytes()).unwrap();
        assert_eq!(parsed.records(), batches[0].records());
    }
}
