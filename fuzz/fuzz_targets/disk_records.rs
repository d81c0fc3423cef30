//! Disk records (`[disk: u32 LE][offset: u64 LE][len: u32 LE][bytes]` ...),
//! as `DiskWrites` and `SyncDisk` messages carry them.
//!
//! Input: a payload. Checks: it parses iff it is a sequence of whole
//! records (a reference reading of the format); the records are the
//! payload's, and written out again they are the payload byte for byte;
//! the primary's packer (`disk_payloads`) packs them back to the same
//! bytes (it drops empty writes); a trip through a frame keeps the batch.
#![no_main]

use bytes::{BufMut, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use replicator::protocol::{disk_payloads, DiskBatch, DiskRecord, Message};

/// The format read plainly: `None` unless the payload is whole records.
fn reference(payload: &[u8]) -> Option<Vec<(u32, u64, &[u8])>> {
    let mut out = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        if rest.len() < 16 {
            return None;
        }
        let disk = u32::from_le_bytes(rest[..4].try_into().unwrap());
        let offset = u64::from_le_bytes(rest[4..12].try_into().unwrap());
        let len = u32::from_le_bytes(rest[12..16].try_into().unwrap()) as u64;
        if ((rest.len() - 16) as u64) < len {
            return None;
        }
        let (data, tail) = rest[16..].split_at(len as usize);
        out.push((disk, offset, data));
        rest = tail;
    }
    Some(out)
}

fn encode(records: &[DiskRecord]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for r in records {
        out.put_u32_le(r.disk);
        out.put_u64_le(r.offset);
        out.put_u32_le(r.data.len() as u32);
        out.put_slice(&r.data);
    }
    out.to_vec()
}

fuzz_target!(|data: &[u8]| {
    let batch = DiskBatch::parse(Bytes::copy_from_slice(data));
    let expected = reference(data);
    assert_eq!(batch.is_some(), expected.is_some());
    let (Some(batch), Some(expected)) = (batch, expected) else {
        return;
    };
    assert_eq!(batch.bytes(), data);
    let got: Vec<(u32, u64, &[u8])> = batch
        .records()
        .iter()
        .map(|r| (r.disk, r.offset, &r.data[..]))
        .collect();
    assert_eq!(got, expected);
    assert_eq!(encode(batch.records()), data, "re-encoding differs");

    let non_empty: Vec<DiskRecord> = batch
        .records()
        .iter()
        .filter(|r| !r.data.is_empty())
        .cloned()
        .collect();
    let (packed, count) = disk_payloads(non_empty.clone());
    assert_eq!(count, non_empty.len() as u64);
    let repacked: Vec<u8> = packed.iter().flat_map(|b| b.bytes().to_vec()).collect();
    assert_eq!(
        repacked,
        encode(&non_empty),
        "the packer encodes differently"
    );

    for message in [Message::DiskWrites(batch.clone()), Message::SyncDisk(batch)] {
        let back = Message::from_frame(message.clone().into_frame(3, 1)).expect("decodes");
        assert_eq!(back.message, message);
    }
});
