//! Page records (`[gpa: u64 LE][4096 bytes]` ...), as `Pages` and
//! `SyncPages` messages carry them.
//!
//! Input: a payload. Checks: a batch is accepted iff it is whole records
//! (the input, and its longest whole-records prefix so that records are
//! always exercised); its records are the payload's, in order; the address
//! checksum is the crc of the addresses; the range check accepts exactly
//! the aligned pages inside memory (several memory sizes, 0 and the
//! largest included); staging the records again (the primary's encoder)
//! gives back the same bytes, and so does a trip through a frame.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use replicator::protocol::{Message, PageBatch, PageStager, PAGE_RECORD, PAGE_SIZE};
use vmm::replication::PageSink;

fn check(payload: &[u8]) {
    let batch = PageBatch::new(Bytes::copy_from_slice(payload));
    assert_eq!(batch.is_some(), payload.len().is_multiple_of(PAGE_RECORD));
    let Some(batch) = batch else { return };
    assert_eq!(batch.len(), payload.len() / PAGE_RECORD);
    assert_eq!(batch.is_empty(), payload.is_empty());

    let mut addresses = crc32fast::Hasher::new();
    let mut stager = PageStager::default();
    for (i, (gpa, data)) in batch.records().enumerate() {
        let record = &payload[i * PAGE_RECORD..(i + 1) * PAGE_RECORD];
        assert_eq!(gpa.to_le_bytes()[..], record[..8]);
        assert_eq!(data, &record[8..]);
        addresses.update(&record[..8]);
        stager.page_buffer(gpa).extend_from_slice(data);
    }
    let mut crc = crc32fast::Hasher::new();
    batch.hash_addresses(&mut crc);
    assert_eq!(crc.finalize(), addresses.finalize());

    let first = batch.records().next().map(|(gpa, _)| gpa);
    for ram in [
        0,
        16 << 20,
        first.unwrap_or(0),
        first.unwrap_or(0).wrapping_add(PAGE_SIZE as u64),
        u64::MAX,
    ] {
        let inside = batch.records().all(|(gpa, _)| {
            gpa.is_multiple_of(PAGE_SIZE as u64)
                && gpa
                    .checked_add(PAGE_SIZE as u64)
                    .is_some_and(|end| end <= ram)
        });
        assert_eq!(batch.check_within(ram).is_ok(), inside, "ram {ram}");
    }

    let staged = stager.finish();
    assert_eq!(staged.count, batch.len() as u64);
    let restaged: Vec<u8> = staged
        .batches
        .into_iter()
        .flat_map(|b| b.into_bytes())
        .collect();
    assert_eq!(
        restaged, payload,
        "the stager encodes the records differently"
    );

    for message in [Message::Pages(batch.clone()), Message::SyncPages(batch)] {
        let back = Message::from_frame(message.clone().into_frame(3, 1)).expect("decodes");
        assert_eq!(back.message, message);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let whole = data.len() - data.len() % PAGE_RECORD;
    if whole != data.len() {
        check(&data[..whole]);
    }
});
