//! Guest RAM in a memfd: one file that the VMM maps, and that the FT engine
//! (or a restore in another process) can map, copy and replicate.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress};

use crate::dirty::VmmBitmap;
use crate::layout::MMIO_GAP_START;

/// Guest memory with a VMM-side dirty bitmap: every write the VMM makes
/// through vm-memory (virtio rings, block reads, received packets) marks its
/// page, so such pages are not missed by a checkpoint (KVM's dirty log sees
/// only writes by the guest's CPUs).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<VmmBitmap>;

pub const PAGE_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {mib} MiB is out of range: 16 MiB to {} MiB", MMIO_GAP_START >> 20)]
    BadSize { mib: u64 },
    #[error("memfd_create for guest RAM failed: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("sizing the guest RAM memfd to {bytes} bytes failed: {source}")]
    SetLen {
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping guest RAM failed: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
}

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    pub memfd: File,
    pub size: u64,
}

/// Creates `mib` MiB of zeroed guest RAM at guest physical address 0.
pub fn create(mib: u64) -> Result<GuestRam, MemoryError> {
    let size = mib << 20;
    if !(16..=(MMIO_GAP_START >> 20)).contains(&mib) {
        return Err(MemoryError::BadSize { mib });
    }
    // SAFETY: memfd_create with a static NUL-terminated name; the result is
    // checked before it is used.
    let fd = unsafe { libc::memfd_create(c"ftvmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let memfd = unsafe { File::from_raw_fd(fd) };
    memfd.set_len(size).map_err(|source| MemoryError::SetLen {
        bytes: size,
        source,
    })?;
    let map_file = memfd.try_clone().map_err(MemoryError::Memfd)?;
    let memory = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(map_file, 0)),
    )])?;
    Ok(GuestRam {
        memory,
        memfd,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn ram_lives_in_the_memfd_and_vmm_writes_mark_the_bitmap() {
        let ram = create(16).unwrap();
        ram.memory
            .write_obj(0xabcd_u32, GuestAddress(0x3000))
            .unwrap();
        let mut from_file = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&ram.memfd, &mut from_file, 0x3000).unwrap();
        assert_eq!(u32::from_le_bytes(from_file), 0xabcd);
        let region = ram.memory.iter().next().unwrap();
        assert!(region.bitmap().dirty_at(0x3000));
        assert!(!region.bitmap().dirty_at(0x2000));
        assert!(matches!(create(8), Err(MemoryError::BadSize { mib: 8 })));
    }
}
