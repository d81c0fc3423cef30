//! Page deltas (`[unchanged words][changed words][their bytes]` ...).
//!
//! Input: 8 bytes that seed the old page, then a delta. Checks: a refused
//! delta changes nothing; an accepted one changes the page only in the
//! words its pieces name, and the encoder's delta from the old page to the
//! result applies to the same result (and is empty when nothing changed).
#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator::protocol::delta::{apply, encode};
use replicator::protocol::PAGE_SIZE;

fn old_page(seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..PAGE_SIZE)
        .map(|i| {
            // Runs of equal bytes, so that pieces also land on unchanged words.
            if i % 64 == 0 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
            }
            (state >> (i % 8)) as u8
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((seed, delta)) = data.split_first_chunk::<8>() else {
        return;
    };
    let old = old_page(u64::from_le_bytes(*seed));
    let mut page = old.clone();
    if apply(&mut page, delta).is_err() {
        assert_eq!(page, old, "a refused delta changed the page");
        return;
    }
    let mut again = Vec::new();
    let len = encode(&old, &page, PAGE_SIZE * 2, &mut again).expect("within twice a page");
    assert_eq!(len, again.len());
    assert_eq!(len == 0, page == old);
    let mut replayed = old.clone();
    apply(&mut replayed, &again).expect("the encoder's delta applies");
    assert_eq!(replayed, page, "the encoder's delta gives another page");
});
