//! Guest RAM in a memfd: one file that the VMM maps, and that the FT engine
//! (or a restore in another process) can map, copy and replicate. Or in a
//! named file (on a tmpfs), which outlives the process: the FT engine then
//! finds this node's last copy of the guest's memory there and resends
//! only the pages that differ ([`open_file`]).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    #[error("guest RAM file {path}: {source}")]
    RamFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no room for the guest RAM file {path}: it needs {bytes} bytes ({source}); \
         give its tmpfs more room or run without a RAM file"
    )]
    RamFileNoSpace {
        path: PathBuf,
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

fn check_size(mib: u64) -> Result<u64, MemoryError> {
    if !(16..=(MMIO_GAP_START >> 20)).contains(&mib) {
        return Err(MemoryError::BadSize { mib });
    }
    Ok(mib << 20)
}

/// Maps `file` (already `size` bytes) as guest RAM at address 0.
fn map(file: File, size: u64) -> Result<GuestRam, MemoryError> {
    let map_file = file.try_clone().map_err(MemoryError::Memfd)?;
    let memory = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(map_file, 0)),
    )])?;
    Ok(GuestRam {
        memory,
        memfd: file,
        size,
    })
}

/// How long [`open_file`] waits for another process to let go of a kept
/// RAM file (a copy of the VM that is still stopping).
const KEPT_FILE_WAIT: Duration = Duration::from_secs(5);

/// Guest RAM of `mib` MiB in the file at `path`, which this process holds
/// locked (`flock`) for as long as it maps it. With `keep`, a file of that
/// size that no other process holds (waiting a few seconds for one that
/// is stopping) is mapped as it is: returns true, the RAM holds what it
/// held. Otherwise the RAM is new and zeroed (a file still held elsewhere
/// is unlinked first: that process keeps its own copy). The file's blocks
/// are allocated at once, so that a full tmpfs is an error here rather
/// than a fault in the running guest.
pub fn open_file(path: &Path, mib: u64, keep: bool) -> Result<(GuestRam, bool), MemoryError> {
    let size = check_size(mib)?;
    let err = |source| MemoryError::RamFile {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let open = || {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
    };
    let mut file = open().map_err(err)?;
    let kept = keep && file.metadata().map_err(err)?.len() == size && lock(&file, KEPT_FILE_WAIT);
    if !kept {
        if !lock(&file, Duration::ZERO) {
            std::fs::remove_file(path).map_err(err)?;
            file = open().map_err(err)?;
            if !lock(&file, Duration::ZERO) {
                return Err(err(std::io::Error::from_raw_os_error(libc::EWOULDBLOCK)));
            }
        }
        file.set_len(0).map_err(err)?;
        file.set_len(size).map_err(err)?;
    }
    let len = libc::off_t::try_from(size)
        .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EFBIG)))?;
    // SAFETY: fallocate on a descriptor this function owns; no memory is
    // passed to the kernel.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } != 0 {
        let source = std::io::Error::last_os_error();
        return Err(match source.raw_os_error() {
            Some(libc::ENOSPC) => MemoryError::RamFileNoSpace {
                path: path.to_path_buf(),
                bytes: size,
                source,
            },
            _ => err(source),
        });
    }
    Ok((map(file, size)?, kept))
}

/// Takes an exclusive `flock` on `file`, trying for up to `wait`.
fn lock(file: &File, wait: Duration) -> bool {
    let until = Instant::now() + wait;
    loop {
        // SAFETY: flock on a descriptor the caller owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Creates `mib` MiB of zeroed guest RAM at guest physical address 0.
pub fn create(mib: u64) -> Result<GuestRam, MemoryError> {
    let size = check_size(mib)?;
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
    map(memfd, size)
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
