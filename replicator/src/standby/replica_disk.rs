//! A disk of the standby's replica: a file of the primary disk's size that
//! receives the initial copy and then each committed epoch's writes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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
    #[error("syncing {path} failed: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct ReplicaDisk {
    pub path: PathBuf,
    pub size: u64,
    file: File,
}

impl ReplicaDisk {
    /// An all-zero (sparse) file of `size` bytes at `path`; whatever the
    /// file held before is gone (a returning node's disk is never trusted).
    pub fn create(path: &Path, size: u64) -> Result<ReplicaDisk, ReplicaDiskError> {
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
            .truncate(true)
            .open(path)
            .map_err(err)?;
        file.set_len(size).map_err(err)?;
        Ok(ReplicaDisk {
            path: path.to_path_buf(),
            size,
            file,
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
