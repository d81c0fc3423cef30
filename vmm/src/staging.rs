//! Copying dirty pages out of guest RAM into a staging buffer: the step a
//! checkpoint takes while the guest is stopped (the send happens after the
//! guest resumes).

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::dirty::DirtyPages;
use crate::memory::{GuestMemoryMmap, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("reading guest page {page:#x} failed: {source}")]
    Read {
        page: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Copies every page of `pages` into `staging` (resized to fit), in page
/// order; returns how long the copy took.
pub fn copy_pages(
    mem: &GuestMemoryMmap,
    pages: &DirtyPages,
    staging: &mut Vec<u8>,
) -> Result<Duration, StagingError> {
    let count = pages.count() as usize;
    staging.resize(count * PAGE_SIZE, 0);
    let start = Instant::now();
    for (slot, page) in staging
        .chunks_exact_mut(PAGE_SIZE)
        .zip(pages.page_numbers())
    {
        mem.read_slice(slot, GuestAddress(page * PAGE_SIZE as u64))
            .map_err(|source| StagingError::Read { page, source })?;
    }
    Ok(start.elapsed())
}

/// This machine's memcpy speed in the same process, for ratios: nanoseconds
/// per 4 KiB page when copying `mib` MiB in one go.
pub fn memcpy_ns_per_page(mib: usize) -> f64 {
    let src = vec![0x5au8; mib << 20];
    let mut dst = vec![0u8; mib << 20];
    dst.copy_from_slice(&src); // fault the pages in first
    let start = Instant::now();
    dst.copy_from_slice(&src);
    let took = start.elapsed();
    std::hint::black_box(&dst);
    took.as_nanos() as f64 / ((mib << 20) / PAGE_SIZE) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;

    #[test]
    fn staged_pages_hold_the_guest_bytes_in_page_order() {
        let ram = memory::create(16).unwrap();
        ram.memory
            .write_obj(0x1111u32, GuestAddress(3 * 4096))
            .unwrap();
        ram.memory
            .write_obj(0x2222u32, GuestAddress(70 * 4096 + 8))
            .unwrap();
        let mut bits = vec![0u64; 2];
        bits[0] |= 1 << 3;
        bits[1] |= 1 << 6;
        let pages = DirtyPages {
            slots: vec![(0, bits)],
            ..Default::default()
        };
        let mut staging = Vec::new();
        copy_pages(&ram.memory, &pages, &mut staging).unwrap();
        assert_eq!(staging.len(), 2 * PAGE_SIZE);
        assert_eq!(
            u32::from_le_bytes(staging[0..4].try_into().unwrap()),
            0x1111
        );
        assert_eq!(
            u32::from_le_bytes(staging[4096 + 8..4096 + 12].try_into().unwrap()),
            0x2222
        );
        assert!(memcpy_ns_per_page(4) > 0.0);
    }
}
