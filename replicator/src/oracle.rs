//! The consistency oracle: at a checkpoint the operator (or a test) asks
//! for, the primary digests its guest's memory and disks while the guest is
//! paused and sends the digest with that epoch; the standby digests its
//! replica right after applying the epoch and compares. Equal means the
//! replica is the primary's VM byte for byte at that checkpoint. A digest
//! is one CRC32 per 1 MiB chunk, so a difference names where it is.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Bytes per digested chunk.
pub const CHUNK: usize = 1 << 20;
/// Differences listed in a verdict, at most.
const LISTED: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    #[error("reading guest memory at {gpa:#x} for the digest failed: {source}")]
    Memory {
        gpa: u64,
        #[source]
        source: vmm::replication::ReplicationError,
    },
    #[error("reading {path} for the digest failed: {source}")]
    Disk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A VM's memory and disks, one CRC32 per [`CHUNK`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    pub memory: Vec<u32>,
    /// Per disk, in device order.
    pub disks: Vec<Vec<u32>>,
}

/// What the standby found at a checked checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub epoch: u64,
    pub equal: bool,
    /// How long the standby's digest took (ms).
    pub digest_ms: u64,
    /// Memory chunks (MiB index) that differ, the first few.
    pub memory_differs: Vec<u64>,
    /// (disk, MiB index) chunks that differ, the first few.
    pub disk_differs: Vec<(u32, u64)>,
    /// A shape mismatch (sizes, disk counts), if any.
    pub shape: Option<String>,
}

/// Digests memory of `bytes` bytes through `read` (gpa, buffer) and the
/// files at `disks`.
pub fn digest(
    bytes: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), vmm::replication::ReplicationError>,
    disks: &[PathBuf],
) -> Result<Digest, OracleError> {
    let mut buf = vec![0u8; CHUNK];
    let mut memory = Vec::new();
    let mut gpa = 0;
    while gpa < bytes {
        let n = (bytes - gpa).min(CHUNK as u64) as usize;
        read(gpa, &mut buf[..n]).map_err(|source| OracleError::Memory { gpa, source })?;
        memory.push(crc32fast::hash(&buf[..n]));
        gpa += n as u64;
    }
    let disks = disks
        .iter()
        .map(|path| digest_file(path, &mut buf))
        .collect::<Result<_, _>>()?;
    Ok(Digest { memory, disks })
}

fn digest_file(path: &Path, buf: &mut [u8]) -> Result<Vec<u32>, OracleError> {
    let err = |source| OracleError::Disk {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let mut chunks = Vec::new();
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]).map_err(err)? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            return Ok(chunks);
        }
        chunks.push(crc32fast::hash(&buf[..filled]));
        if filled < buf.len() {
            return Ok(chunks);
        }
    }
}

/// Compares the primary's digest with the replica's.
pub fn compare(epoch: u64, primary: &Digest, replica: &Digest, digest_ms: u64) -> Verdict {
    let mut shape = None;
    if primary.memory.len() != replica.memory.len() {
        shape = Some(format!(
            "memory: {} MiB on the primary, {} MiB in the replica",
            primary.memory.len(),
            replica.memory.len()
        ));
    }
    if primary.disks.len() != replica.disks.len() {
        shape = Some(format!(
            "disks: {} on the primary, {} in the replica",
            primary.disks.len(),
            replica.disks.len()
        ));
    }
    let memory_differs: Vec<u64> = differing(&primary.memory, &replica.memory)
        .take(LISTED)
        .collect();
    let mut disk_differs = Vec::new();
    for (d, (p, r)) in primary.disks.iter().zip(&replica.disks).enumerate() {
        if p.len() != r.len() && shape.is_none() {
            shape = Some(format!(
                "disk {d}: {} MiB on the primary, {} MiB in the replica",
                p.len(),
                r.len()
            ));
        }
        disk_differs.extend(differing(p, r).map(|c| (d as u32, c)));
    }
    disk_differs.truncate(LISTED);
    Verdict {
        epoch,
        equal: shape.is_none() && memory_differs.is_empty() && disk_differs.is_empty(),
        digest_ms,
        memory_differs,
        disk_differs,
        shape,
    }
}

fn differing<'a>(a: &'a [u32], b: &'a [u32]) -> impl Iterator<Item = u64> + 'a {
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(
        fill: impl Fn(u64) -> u8,
    ) -> impl FnMut(u64, &mut [u8]) -> Result<(), vmm::replication::ReplicationError> {
        move |gpa, buf| {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = fill(gpa + i as u64);
            }
            Ok(())
        }
    }

    #[test]
    fn equal_vms_are_equal_and_a_changed_byte_is_found_where_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        std::fs::write(&disk, vec![5u8; 3 * CHUNK + 100]).unwrap();
        let bytes = 4 * CHUNK as u64;
        let a = digest(bytes, mem(|x| (x % 251) as u8), std::slice::from_ref(&disk)).unwrap();
        assert_eq!((a.memory.len(), a.disks[0].len()), (4, 4));
        let same = digest(bytes, mem(|x| (x % 251) as u8), std::slice::from_ref(&disk)).unwrap();
        assert!(compare(7, &a, &same, 0).equal);
        // One byte of memory in the third MiB, one byte of the disk's last chunk.
        let changed = digest(
            bytes,
            mem(|x| {
                if x == 2 * CHUNK as u64 + 9 {
                    0
                } else {
                    (x % 251) as u8
                }
            }),
            std::slice::from_ref(&disk),
        )
        .unwrap();
        let mut image = std::fs::read(&disk).unwrap();
        image[3 * CHUNK + 50] = 6;
        std::fs::write(&disk, image).unwrap();
        let other = digest(bytes, mem(|x| (x % 251) as u8), std::slice::from_ref(&disk)).unwrap();
        let v = compare(7, &a, &changed, 0);
        assert!(!v.equal);
        assert_eq!(v.memory_differs, [2]);
        let v = compare(7, &a, &other, 0);
        assert_eq!((v.equal, v.disk_differs.clone()), (false, vec![(0, 3)]));
        let smaller = digest(bytes - CHUNK as u64, mem(|_| 0), &[]).unwrap();
        assert!(compare(7, &a, &smaller, 0).shape.is_some());
    }
}
