//! A disk image written by this process is held under an exclusive
//! `flock`, so that a second process (a copy of the VM, or a standby of
//! it, that is still stopping; or one started by mistake) cannot write to
//! it at the same time: it waits a few seconds for the holder to let go,
//! then fails with a clear error.
//!
//! A `flock` belongs to an open file description, so two opens of one
//! file in the same process would lock each other out; and this process
//! opens a disk more than once on purpose (a standby's replica disk is
//! still being synced while the promoted VM opens it). So the lock is one
//! per file (device and inode) per process, on a descriptor of its own
//! that is used for nothing else, and shared by every holder in the
//! process; the last holder to let go releases it.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// How long a disk's opener waits for another process to let go of it.
pub const DISK_LOCK_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DiskLockError {
    #[error(
        "the disk {path} is in use by another process (held for more than {} s): a copy of \
         this VM, or a standby of it, still running on this node?",
        waited.as_secs()
    )]
    Held { path: PathBuf, waited: Duration },
    #[error("cannot lock the disk {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// This process's hold on one disk file; the file stays locked while any
/// holder lives.
#[derive(Clone)]
pub struct DiskLock {
    _held: Arc<Held>,
}

/// The descriptor the lock is on (closing it releases the lock).
struct Held {
    _file: File,
}

/// Device and inode of a file.
type FileKey = (u64, u64);

/// The disks this process holds, by file.
static HELD: Mutex<Option<HashMap<FileKey, Weak<Held>>>> = Mutex::new(None);

impl DiskLock {
    /// Locks the disk `file` (opened from `path`), waiting up to `wait`
    /// for another process to let go of it; a hold this process has on it
    /// already is shared.
    pub fn acquire(path: &Path, file: &File, wait: Duration) -> Result<DiskLock, DiskLockError> {
        let lock_err = |source| DiskLockError::Lock {
            path: path.to_path_buf(),
            source,
        };
        let meta = file.metadata().map_err(lock_err)?;
        let key = (meta.dev(), meta.ino());
        if let Some(held) = held_here(key) {
            return Ok(DiskLock { _held: held });
        }
        // A descriptor of its own for the lock: the caller's (and its
        // duplicates) may be closed while others still write.
        let own = File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(lock_err)?;
        let until = Instant::now() + wait;
        loop {
            if crate::file_lock::try_lock_exclusive(&own).map_err(lock_err)? {
                let held = Arc::new(Held { _file: own });
                let mut table = HELD.lock().unwrap_or_else(|e| e.into_inner());
                let table = table.get_or_insert_with(HashMap::new);
                table.retain(|_, h| h.strong_count() > 0);
                table.insert(key, Arc::downgrade(&held));
                return Ok(DiskLock { _held: held });
            }
            // Another thread of this process may have taken it meanwhile.
            if let Some(held) = held_here(key) {
                return Ok(DiskLock { _held: held });
            }
            if Instant::now() >= until {
                return Err(DiskLockError::Held {
                    path: path.to_path_buf(),
                    waited: wait,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// This process's live hold on the file `key`, if it has one.
fn held_here(key: FileKey) -> Option<Arc<Held>> {
    HELD.lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|table| table.get(&key))
        .and_then(Weak::upgrade)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(dir: &Path) -> (PathBuf, File) {
        let path = dir.join("disk.img");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        file.set_len(4096).unwrap();
        (path, file)
    }

    /// Whether another process could take the lock now (util-linux's
    /// `flock`, a process of its own).
    fn free_for_another_process(path: &Path) -> bool {
        std::process::Command::new("flock")
            .args(["-n", "-x"])
            .arg(path)
            .arg("true")
            .status()
            .expect("flock(1) from util-linux")
            .success()
    }

    #[test]
    fn holders_in_one_process_share_the_lock_and_the_last_releases_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, file) = disk(dir.path());
        let first = DiskLock::acquire(&path, &file, Duration::ZERO).unwrap();
        // Another open of the same file in this process shares it.
        let again = File::open(&path).unwrap();
        let second = DiskLock::acquire(&path, &again, Duration::ZERO).unwrap();
        assert!(!free_for_another_process(&path));
        drop(first);
        drop(file);
        assert!(!free_for_another_process(&path));
        drop(second);
        assert!(free_for_another_process(&path));
        // And it can be taken again.
        let _third = DiskLock::acquire(&path, &again, Duration::ZERO).unwrap();
        assert!(!free_for_another_process(&path));
    }

    #[test]
    fn a_disk_another_process_holds_is_refused_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (path, file) = disk(dir.path());
        // `-o`: only flock(1) holds the lock, not its `sleep`.
        let mut holder = std::process::Command::new("flock")
            .args(["-x", "-o"])
            .arg(&path)
            .args(["sleep", "30"])
            .spawn()
            .expect("flock(1) from util-linux");
        // Until the holder has it.
        let until = Instant::now() + Duration::from_secs(10);
        while free_for_another_process(&path) {
            assert!(Instant::now() < until, "flock(1) never took the lock");
            std::thread::sleep(Duration::from_millis(20));
        }
        let started = Instant::now();
        let refused = DiskLock::acquire(&path, &file, Duration::from_millis(300));
        assert!(started.elapsed() >= Duration::from_millis(300));
        let error = refused.err().expect("refused while held");
        assert!(matches!(error, DiskLockError::Held { .. }), "{error}");
        assert!(error.to_string().contains("in use by another process"));
        holder.kill().unwrap();
        holder.wait().unwrap();
        let _held = DiskLock::acquire(&path, &file, Duration::from_secs(5)).unwrap();
        assert!(!free_for_another_process(&path));
    }
}
