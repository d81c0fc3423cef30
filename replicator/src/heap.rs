//! The process heap, set up for checkpointing.
//!
//! Every epoch stages its dirty pages into fresh frame payloads of about
//! 260 KiB (64 page records) and the standby receives into buffers of the
//! same order. glibc serves allocations of that size with a fresh `mmap`
//! (its threshold starts at 128 KiB), and the kernel faults each 4 KiB page
//! of it in, zeroed, on first touch: the primary paid those faults while
//! the guest was stopped. The pipeline bench's capture ran at 0.11 of
//! memcpy that way and at 0.40 with freed memory kept for reuse.
//!
//! [`keep_freed_memory`] has the allocator serve such buffers from its
//! heap and keep what is freed there (for the next epoch) instead of
//! handing it back to the kernel: the process keeps its peak heap, which
//! for the engine is a few epochs' pages.

/// Requests below this come from the heap (glibc's ceiling for the
/// setting: 32 MiB on 64-bit).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of the heap is handed back only past this.
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Sets the allocator up as described in the module documentation; returns
/// whether it took the settings (only glibc has them).
pub fn keep_freed_memory() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes the allocator's tuning parameters; the
        // values are within the ranges glibc documents for them.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_takes_the_settings() {
        assert_eq!(keep_freed_memory(), cfg!(target_env = "gnu"));
    }
}
