//! A disk of the standby's replica: a file of the primary disk's size that
//! receives the initial copy and then each committed epoch's writes. A
//! file of the right size kept from before (an earlier session, or the
//! disk this node ran the VM from) is kept: the initial copy then brings
//! only the chunks whose content differs ([`crate::content`]), or only
//! those the written maps name ([`crate::written`]): each replica disk
//! keeps one beside it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmm::replication::disk_lock::{DiskLock, DiskLockError, DISK_LOCK_WAIT};
use vmm::replication::written_map::{WrittenMap, WrittenMapError};

use crate::protocol::DiskRecord;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaDiskError {
    #[error("cannot create the replica disk {path} ({size} bytes): {source}")]
    Create {
        path: PathBuf,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no space for the replica disk {path}: it needs {size} bytes, the filesystem has \
         {available} bytes free ({source}); free space on this node or move its VM folder"
    )]
    NoSpace {
        path: PathBuf,
        size: u64,
        available: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reserve {size} bytes for the replica disk {path}: {source}")]
    Reserve {
        path: PathBuf,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("a write names disk {disk}, the replica has {count}")]
    NoSuchDisk { disk: u32, count: usize },
    #[error("a write of {len} bytes at {offset} is beyond the end of disk {disk} ({size} bytes)")]
    OutOfRange {
        disk: u32,
        offset: u64,
        len: usize,
        size: u64,
    },
    #[error("writing {len} bytes at {offset} of {path} failed: {source}")]
    Write {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path} to digest what it holds failed: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("syncing {path} failed: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{source} (its replica disk {path})")]
    Locked {
        path: PathBuf,
        #[source]
        source: DiskLockError,
    },
    #[error("the written map of the replica disk {path}: {source}")]
    WrittenMap {
        path: PathBuf,
        #[source]
        source: WrittenMapError,
    },
}

impl ReplicaDiskError {
    /// The node's own disk failed (not a record the peer got wrong).
    pub fn is_this_nodes_fault(&self) -> bool {
        !matches!(
            self,
            ReplicaDiskError::NoSuchDisk { .. } | ReplicaDiskError::OutOfRange { .. }
        )
    }
}

pub struct ReplicaDisk {
    pub path: PathBuf,
    pub size: u64,
    file: File,
    map: Arc<WrittenMap>,
    /// Held while anything of this process may still write the file or
    /// its map (dropped last).
    lock: DiskLock,
}

/// Why a file found at a replica disk's path was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fresh {
    /// There was none.
    Absent,
    /// It had another size (`had` bytes).
    OtherSize { had: u64 },
}

impl ReplicaDisk {
    /// The file at `path` if it is a regular file of `size` bytes (kept,
    /// its contents to be compared), else a new all-zero one and why. The
    /// file is locked against other processes ([`DiskLock`]) before
    /// anything in it changes: another process still holding it (a copy
    /// of the VM, or a standby of it, that is stopping) is waited for a
    /// few seconds, then refused. Blocks for that long: call it off the
    /// async workers.
    pub fn open_or_create(
        path: &Path,
        size: u64,
    ) -> Result<(ReplicaDisk, Option<Fresh>), ReplicaDiskError> {
        ReplicaDisk::open(path, size, true)
    }

    /// A new all-zero file of `size` bytes at `path` (whatever the file
    /// held is gone), locked as [`ReplicaDisk::open_or_create`] locks it.
    pub fn create(path: &Path, size: u64) -> Result<ReplicaDisk, ReplicaDiskError> {
        ReplicaDisk::open(path, size, false).map(|(disk, _)| disk)
    }

    /// See [`ReplicaDisk::open_or_create`]; with `keep` false, a file of
    /// the right size is made new too.
    fn open(
        path: &Path,
        size: u64,
        keep: bool,
    ) -> Result<(ReplicaDisk, Option<Fresh>), ReplicaDiskError> {
        let existed = match std::fs::metadata(path) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(source) => {
                return Err(ReplicaDiskError::Create {
                    path: path.to_path_buf(),
                    size,
                    source,
                })
            }
        };
        let err = |source| ReplicaDiskError::Create {
            path: path.to_path_buf(),
            size,
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(err)?;
        let lock = DiskLock::acquire(path, &file, DISK_LOCK_WAIT).map_err(|source| {
            ReplicaDiskError::Locked {
                path: path.to_path_buf(),
                source,
            }
        })?;
        // What the file holds now that no other process writes to it.
        let had = file.metadata().map_err(err)?.len();
        let fresh = if !existed {
            Some(Fresh::Absent)
        } else if had != size || !keep {
            Some(Fresh::OtherSize { had })
        } else {
            None
        };
        if fresh.is_some() {
            // Whatever it held is gone: an all-zero file of `size` bytes.
            file.set_len(0).map_err(err)?;
            file.set_len(size).map_err(err)?;
        }
        // Blocks for the holes of a sparse file (what it holds stays), so
        // that no write of the session can fail for want of space (a full
        // disk is found here, at the plan, and refused with the sizes, not
        // in the middle of an epoch).
        reserve(&file, path, size)?;
        let map = open_map(path, size)?;
        if fresh.is_some() {
            // A new disk matches no other copy.
            map.set_common(None, u64::MAX)
                .map_err(|source| ReplicaDiskError::WrittenMap {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
        Ok((
            ReplicaDisk {
                path: path.to_path_buf(),
                size,
                file,
                map,
                lock,
            },
            fresh,
        ))
    }

    /// Its hold on the file (for threads that still write it or its map
    /// after this is dropped).
    pub fn lock(&self) -> &DiskLock {
        &self.lock
    }

    /// Its written map.
    pub fn map(&self) -> &Arc<WrittenMap> {
        &self.map
    }

    pub fn map_err(&self, source: WrittenMapError) -> ReplicaDiskError {
        ReplicaDiskError::WrittenMap {
            path: self.path.clone(),
            source,
        }
    }

    /// Another handle on the file, to sync it from another thread.
    pub fn sync_handle(&self) -> Result<File, ReplicaDiskError> {
        self.file
            .try_clone()
            .map_err(|source| ReplicaDiskError::Sync {
                path: self.path.clone(),
                source,
            })
    }

    /// The digests of chunks `chunks` under `key`.
    pub fn digests_of(
        &self,
        key: &crate::content::ContentKey,
        chunks: std::ops::Range<u64>,
    ) -> Result<Vec<crate::content::ChunkDigest>, ReplicaDiskError> {
        crate::content::digest_disk_chunks(&self.file, self.size, key, chunks).map_err(|source| {
            ReplicaDiskError::Read {
                path: self.path.clone(),
                source,
            }
        })
    }

    /// The digest of each of its chunks under `key`.
    pub fn digests(
        &self,
        key: &crate::content::ContentKey,
    ) -> Result<Vec<crate::content::ChunkDigest>, ReplicaDiskError> {
        crate::content::digest_disk(&self.file, self.size, key).map_err(|source| {
            ReplicaDiskError::Read {
                path: self.path.clone(),
                source,
            }
        })
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), ReplicaDiskError> {
        self.file
            .write_all_at(data, offset)
            .map_err(|source| ReplicaDiskError::Write {
                path: self.path.clone(),
                offset,
                len: data.len(),
                source,
            })
    }

    pub fn sync(&self) -> Result<(), ReplicaDiskError> {
        self.file
            .sync_data()
            .map_err(|source| ReplicaDiskError::Sync {
                path: self.path.clone(),
                source,
            })
    }
}

/// Hands `range` of `file` to writeback without waiting for it (data
/// only: [`ReplicaDisk::sync`] makes it durable). A filesystem or kernel
/// that cannot is not an error (nothing is done: the sync writes it all).
/// May block while the disk's queue is full: call it off the session.
pub(super) fn start_writeback(file: &File, range: std::ops::Range<u64>) -> std::io::Result<()> {
    sync_file_range(file, range, libc::SYNC_FILE_RANGE_WRITE)
}

/// `sync_file_range(2)` on `range` of `file`; a filesystem or kernel that
/// does not support it is not an error (nothing is done).
fn sync_file_range(
    file: &File,
    range: std::ops::Range<u64>,
    flags: libc::c_uint,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // A length of 0 would mean "to the end of the file".
    let (Ok(offset), Ok(len @ 1..)) = (
        libc::off64_t::try_from(range.start),
        libc::off64_t::try_from(range.end.saturating_sub(range.start)),
    ) else {
        return Ok(());
    };
    // SAFETY: sync_file_range takes integers only; the descriptor is
    // `file`'s own and stays open for the call.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    if rc == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::ENOSYS | libc::ESPIPE | libc::EOPNOTSUPP) => Ok(()),
        _ => Err(error),
    }
}

/// The written map beside the replica disk at `path`.
fn open_map(path: &Path, size: u64) -> Result<Arc<WrittenMap>, ReplicaDiskError> {
    WrittenMap::open_beside(path, size)
        .map(Arc::new)
        .map_err(|source| ReplicaDiskError::WrittenMap {
            path: path.to_path_buf(),
            source,
        })
}

/// Allocates every block of the file's `size` bytes (they read as zeros).
/// A filesystem that cannot allocate ahead (EOPNOTSUPP) is checked for
/// free space instead.
fn reserve(file: &File, path: &Path, size: u64) -> Result<(), ReplicaDiskError> {
    use std::os::fd::AsRawFd;
    if size == 0 {
        return Ok(());
    }
    let len = libc::off_t::try_from(size).map_err(|_| ReplicaDiskError::Reserve {
        path: path.to_path_buf(),
        size,
        source: std::io::Error::from_raw_os_error(libc::EFBIG),
    })?;
    // SAFETY: fallocate on a file descriptor this function borrows (open
    // for writing); no memory is passed to the kernel.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let source = std::io::Error::last_os_error();
    let available = free_bytes(file).unwrap_or(0);
    match source.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Err(ReplicaDiskError::NoSpace {
            path: path.to_path_buf(),
            size,
            available,
            source,
        }),
        Some(libc::EOPNOTSUPP) if available >= size => Ok(()),
        Some(libc::EOPNOTSUPP) => Err(ReplicaDiskError::NoSpace {
            path: path.to_path_buf(),
            size,
            available,
            source,
        }),
        _ => Err(ReplicaDiskError::Reserve {
            path: path.to_path_buf(),
            size,
            source,
        }),
    }
}

/// Bytes an unprivileged writer may still use on the file's filesystem.
fn free_bytes(file: &File) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: fstatvfs writes a statvfs into the buffer it is given, which
    // is sized for one; it is read only when the call succeeded.
    let rc = unsafe { libc::fstatvfs(file.as_raw_fd(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the call succeeded, so the kernel filled the struct.
    let stat = unsafe { stat.assume_init() };
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Whether `record` names a disk of `disks` and lies inside it.
pub fn check(disks: &[ReplicaDisk], record: &DiskRecord) -> Result<(), ReplicaDiskError> {
    let disk = disks
        .get(record.disk as usize)
        .ok_or(ReplicaDiskError::NoSuchDisk {
            disk: record.disk,
            count: disks.len(),
        })?;
    match record.offset.checked_add(record.data.len() as u64) {
        Some(end) if end <= disk.size => Ok(()),
        _ => Err(ReplicaDiskError::OutOfRange {
            disk: record.disk,
            offset: record.offset,
            len: record.data.len(),
            size: disk.size,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel takes the copy's writeback calls (bad flags or ranges
    /// would be refused: EINVAL; where the test's folder is on tmpfs the
    /// call does nothing), and the data is the file's.
    #[test]
    fn the_copy_is_handed_to_writeback() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 << 20;
        let disk = ReplicaDisk::create(&dir.path().join("disk0.img"), size).unwrap();
        let half = size / 2;
        // Opened read-only, as the copy's writeback thread opens it.
        let file = File::open(dir.path().join("disk0.img")).unwrap();
        disk.write(0, &vec![0xa5; half as usize]).unwrap();
        start_writeback(&file, 0..half).unwrap();
        disk.write(half, &vec![0x5a; half as usize]).unwrap();
        start_writeback(&file, half..size).unwrap();
        // The whole file, waited for; an empty span is nothing.
        sync_file_range(&file, 0..size, libc::SYNC_FILE_RANGE_WAIT_BEFORE).unwrap();
        start_writeback(&file, size..size).unwrap();
        disk.sync().unwrap();
        let bytes = std::fs::read(dir.path().join("disk0.img")).unwrap();
        assert_eq!(bytes.len() as u64, size);
        assert!(bytes[..half as usize].iter().all(|&b| b == 0xa5));
        assert!(bytes[half as usize..].iter().all(|&b| b == 0x5a));
    }
}
