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
//! per file (device and inode) per process, shared by every holder in the
//! process; the last holder to let go releases it.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// How long a disk's opener waits for another process to let go of it.
pub const DISK_LOCK_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DiskLockError {
    #[error(
        "the disk {path} is in use by another process (still held after {:.1} s): a copy of \
         this VM, or a standby of it, still running on this node?",
        waited.as_secs_f64()
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

/// The lock's descriptor (a duplicate of the first opener's: it keeps
/// that open file, and its lock, alive after the opener closes its own),
/// none on a filesystem without `flock`.
struct Held {
    key: FileKey,
    file: Option<File>,
}

impl Drop for Held {
    /// Leaves the table and closes the descriptor (releasing the lock)
    /// under the table's lock, so that an acquire in this process never
    /// sees the file locked by a holder that is gone.
    fn drop(&mut self) {
        let mut table = table();
        if table.get(&self.key).is_some_and(|h| h.strong_count() == 0) {
            table.remove(&self.key);
        }
        drop(self.file.take());
    }
}

/// Device and inode of a file.
type FileKey = (u64, u64);

/// The disks this process holds, by file.
static HELD: LazyLock<Mutex<HashMap<FileKey, Weak<Held>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn table() -> MutexGuard<'static, HashMap<FileKey, Weak<Held>>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

impl DiskLock {
    /// Locks the disk `file` (opened from `path`), waiting up to `wait`
    /// for another process to let go of it; a hold this process has on it
    /// already is shared. On a filesystem that has no `flock` (NFS without
    /// its lock service) it warns and holds nothing.
    pub fn acquire(path: &Path, file: &File, wait: Duration) -> Result<DiskLock, DiskLockError> {
        let lock_err = |source| DiskLockError::Lock {
            path: path.to_path_buf(),
            source,
        };
        let meta = file.metadata().map_err(lock_err)?;
        let key = (meta.dev(), meta.ino());
        let until = Instant::now() + wait;
        loop {
            {
                // Looked up, locked and entered under the table's lock: a
                // holder of this process that lets go does so under it too.
                let mut table = table();
                if let Some(held) = table.get(&key).and_then(Weak::upgrade) {
                    return Ok(DiskLock { _held: held });
                }
                let own = file.try_clone().map_err(lock_err)?;
                let locked = match crate::file_lock::try_lock_exclusive(&own) {
                    Ok(true) => Some(own),
                    Ok(false) => None,
                    Err(e) if unsupported(&e) => {
                        tracing::warn!(path = %path.display(), error = %e, "this filesystem cannot lock the disk: another process could write it too");
                        return Ok(DiskLock {
                            _held: Arc::new(Held { key, file: None }),
                        });
                    }
                    Err(e) => return Err(lock_err(e)),
                };
                if let Some(own) = locked {
                    let held = Arc::new(Held {
                        key,
                        file: Some(own),
                    });
                    table.insert(key, Arc::downgrade(&held));
                    return Ok(DiskLock { _held: held });
                }
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

/// A filesystem that has no `flock` (or no lock service).
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

#[cfg(test)]
pub(crate) mod tests {
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
        let holder = held_by_another_process(&path);
        let started = Instant::now();
        let refused = DiskLock::acquire(&path, &file, Duration::from_millis(300));
        assert!(started.elapsed() >= Duration::from_millis(300));
        let error = refused.err().expect("refused while held");
        assert!(matches!(error, DiskLockError::Held { .. }), "{error}");
        assert!(error.to_string().contains("in use by another process"));
        drop(holder);
        let _held = DiskLock::acquire(&path, &file, Duration::from_secs(5)).unwrap();
        assert!(!free_for_another_process(&path));
    }

    /// Another process holding a file's lock, for tests: util-linux's `flock`
    /// holds it while its `cat` reads; dropping this closes the pipe, which
    /// ends both (nothing is left running).
    pub(crate) struct OtherHolder(std::process::Child);

    impl Drop for OtherHolder {
        fn drop(&mut self) {
            drop(self.0.stdin.take());
            let _ = self.0.wait();
        }
    }

    /// `path` locked by another process (returns once that process has it).
    pub(crate) fn held_by_another_process(path: &Path) -> OtherHolder {
        let holder = OtherHolder(
            std::process::Command::new("flock")
                .arg("-x")
                .arg(path)
                .arg("cat")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("flock(1) from util-linux"),
        );
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let file = File::open(path).unwrap();
            if !crate::file_lock::try_lock_exclusive(&file).unwrap() {
                return holder;
            }
            drop(file);
            assert!(Instant::now() < until, "flock(1) never took the lock");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
