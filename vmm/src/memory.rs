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
/// than a fault in the running guest. The file and its folder must be
/// this user's own and private (guest memory is in them): a symbolic
/// link, a file of another user's or a folder others may write to is
/// refused, never followed or truncated.
pub fn open_file(path: &Path, mib: u64, keep: bool) -> Result<(GuestRam, bool), MemoryError> {
    let size = check_size(mib)?;
    let err = |source| MemoryError::RamFile {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        private_dir(dir).map_err(err)?;
    }
    let (file, kept) = locked_file(path, size, keep).map_err(err)?;
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

/// An error that says why a RAM file or its folder is refused.
fn refused(why: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, why)
}

/// This process's effective user.
fn euid() -> u32 {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes `dir` (mode 0700) if it is missing; refuses one that is a
/// symbolic link, is another user's, or that others may write to.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(refused(format!("{} is not a folder", dir.display())));
    }
    if meta.uid() != euid() || meta.mode() & 0o022 != 0 {
        return Err(refused(format!(
            "the folder {} is not this user's alone (owner {}, mode {:o}): guest memory \
             must not be where others can replace it",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Opens `path` without following a symbolic link (creating it, mode
/// 0600, `exclusive`: only if it does not exist); refuses anything but a
/// regular file of this user's.
fn open_private(path: &Path, exclusive: bool) -> std::io::Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(!exclusive)
        .create_new(exclusive)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.uid() != euid() {
        return Err(refused(format!(
            "{} is not a regular file of this user's",
            path.display()
        )));
    }
    Ok(file)
}

/// Whether `file` is still the file at `path` (not unlinked or replaced
/// since it was opened).
pub(crate) fn is_at(file: &File, path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let (open, named) = (file.metadata()?, std::fs::symlink_metadata(path)?);
    Ok(open.dev() == named.dev() && open.ino() == named.ino())
}

/// The RAM file at `path`, locked: kept (true) when `keep` and it has
/// `size` bytes, else emptied to `size` zero bytes.
fn locked_file(path: &Path, size: u64, keep: bool) -> std::io::Result<(File, bool)> {
    let mut file = open_private(path, false)?;
    if keep && file.metadata()?.len() == size && lock(&file, KEPT_FILE_WAIT)? && is_at(&file, path)?
    {
        return Ok((file, true));
    }
    if !(lock(&file, Duration::ZERO)? && is_at(&file, path)?) {
        // Another process holds it (or it was replaced): that process
        // keeps its inode, this one makes its own.
        std::fs::remove_file(path)?;
        file = open_private(path, true)?;
        if !lock(&file, Duration::ZERO)? {
            return Err(std::io::Error::from_raw_os_error(libc::EWOULDBLOCK));
        }
    }
    file.set_len(0)?;
    file.set_len(size)?;
    Ok((file, false))
}

/// Takes an exclusive `flock` on `file`, trying for up to `wait`: false
/// if another holder kept it that long.
fn lock(file: &File, wait: Duration) -> std::io::Result<bool> {
    let until = Instant::now() + wait;
    loop {
        if crate::file_lock::try_lock_exclusive(file)? {
            return Ok(true);
        }
        if Instant::now() >= until {
            return Ok(false);
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

    fn ram_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvm-ram-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("ram")
    }

    fn byte_at(ram: &GuestRam, gpa: u64) -> u8 {
        ram.memory.read_obj(GuestAddress(gpa)).unwrap()
    }

    #[test]
    fn a_ram_file_keeps_what_it_held_only_when_asked_and_free() {
        let dir = ram_dir("keep");
        let path = dir.join("vm.ram");
        let (ram, kept) = open_file(&path, 16, true).unwrap();
        assert!(!kept, "a new file holds nothing");
        ram.memory.write_obj(7u8, GuestAddress(0x5000)).unwrap();
        drop(ram);
        let (ram, kept) = open_file(&path, 16, true).unwrap();
        assert!(kept);
        assert_eq!(byte_at(&ram, 0x5000), 7, "kept across processes' lives");
        // Another size: made new.
        drop(ram);
        let (ram, kept) = open_file(&path, 32, true).unwrap();
        assert!(!kept);
        assert_eq!(byte_at(&ram, 0x5000), 0);
        // Held by another (open file description): a VM that boots gets
        // its own file, zeroed; the holder keeps its copy.
        let (ram2, kept) = open_file(&path, 32, false).unwrap();
        assert!(!kept);
        ram.memory.write_obj(9u8, GuestAddress(0x5000)).unwrap();
        assert_eq!(byte_at(&ram2, 0x5000), 0);
        drop((ram, ram2));
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    #[test]
    fn a_symbolic_link_or_a_folder_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = ram_dir("unsafe");
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = dir.join("vm.ram");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(matches!(
            open_file(&link, 16, false),
            Err(MemoryError::RamFile { .. })
        ));
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            b"precious",
            "never truncated"
        );
        std::fs::remove_file(&link).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let Err(MemoryError::RamFile { source, .. }) = open_file(&link, 16, false) else {
            panic!("a folder others may write to was used")
        };
        assert!(
            source.to_string().contains("not this user's alone"),
            "{source}"
        );
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }
}
