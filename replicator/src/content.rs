//! Resynchronisation by content: a standby that kept an older replica (a
//! disk file from before, even the one this node ran the VM from; the
//! guest's RAM file of an earlier copy on this node) tells the primary
//! what each of its chunks (64 KiB of a disk, a page of memory) holds as a
//! keyed digest, and the primary sends only the chunks whose content
//! differs. Nothing on the
//! returning node is trusted: a chunk is skipped only when its digest
//! equals the digest of the primary's own bytes, under a key the primary
//! drew for this session (BLAKE3 keyed: a guest cannot write a page that
//! collides with an older one without knowing the key).
//!
//! DRBD calls this checksum-based resynchronisation (`csums-alg`): it
//! reads both disks, and moves only what differs.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vmm::replication::PAGE_SIZE;

/// Bytes per digested disk chunk: a scattered 4 KiB write costs at most
/// one chunk, and the digests are 16 bytes per 64 KiB (0.025 % of the
/// disk: 256 KiB for 1 GiB).
pub const DISK_CHUNK: usize = 64 << 10;

/// Bytes of a chunk's digest (a truncated keyed BLAKE3).
pub const DIGEST_LEN: usize = 16;

/// The digest of one chunk.
pub type ChunkDigest = [u8; DIGEST_LEN];

/// The session's digest key (drawn by the primary, sent in its plan).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ContentKey(pub [u8; 32]);

impl std::fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentKey(..)")
    }
}

impl ContentKey {
    /// A fresh random key.
    pub fn random() -> Result<ContentKey, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        Ok(ContentKey(key))
    }

    /// As 64 hex digits (the plan is JSON).
    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(hex: &str) -> Option<ContentKey> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ContentKey(key))
    }

    /// The digest of `data` under this key.
    pub fn digest(&self, data: &[u8]) -> ChunkDigest {
        let hash = blake3::keyed_hash(&self.0, data);
        let mut out = [0u8; DIGEST_LEN];
        out.copy_from_slice(&hash.as_bytes()[..DIGEST_LEN]);
        out
    }
}

/// Chunks of a disk of `size` bytes (the last one may be short).
pub fn disk_chunks(size: u64) -> u64 {
    size.div_ceil(DISK_CHUNK as u64)
}

/// The digest of every [`DISK_CHUNK`] of the first `size` bytes of `file`.
pub fn digest_disk(file: &File, size: u64, key: &ContentKey) -> std::io::Result<Vec<ChunkDigest>> {
    const READ: usize = 16 * DISK_CHUNK;
    let mut digests = Vec::with_capacity(disk_chunks(size) as usize);
    let mut buf = vec![0u8; READ];
    let mut offset = 0u64;
    while offset < size {
        let n = (size - offset).min(READ as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset)?;
        digests.extend(buf[..n].chunks(DISK_CHUNK).map(|c| key.digest(c)));
        offset += n as u64;
    }
    Ok(digests)
}

/// The digest of each chunk of `chunks` (in [`DISK_CHUNK`]s) of a disk
/// of `size` bytes in `file`.
pub fn digest_disk_chunks(
    file: &File,
    size: u64,
    key: &ContentKey,
    chunks: std::ops::Range<u64>,
) -> std::io::Result<Vec<ChunkDigest>> {
    let mut digests = Vec::with_capacity((chunks.end - chunks.start) as usize);
    let mut buf = vec![0u8; DISK_CHUNK];
    for chunk in chunks {
        let offset = chunk * DISK_CHUNK as u64;
        let n = size.saturating_sub(offset).min(DISK_CHUNK as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset)?;
        digests.push(key.digest(&buf[..n]));
    }
    Ok(digests)
}

/// What a standby holds of one disk (in [`DISK_CHUNK`]s) or of memory (in
/// pages) before the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holding {
    /// New: all zeros (the primary skips its all-zero chunks).
    Zeroed,
    /// Kept from before: the digest of each chunk under the session's key
    /// (the primary skips the chunks that match).
    Kept(Vec<ChunkDigest>),
    /// A kept disk compared by the written maps ([`crate::written`]): what
    /// the standby said of each chunk.
    Mapped(Vec<MappedChunk>),
    /// Kept memory labelled as checkpoint `.0` of the session the plan
    /// offered ([`crate::memory_point`]): it lacks only the pages written
    /// since.
    Since(u64),
}

/// A chunk of a disk compared by the written maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappedChunk {
    /// Neither map named it: the same on both, read on neither.
    Same,
    /// Its digest on the standby.
    Digest(ChunkDigest),
    /// Said the same, but the primary wrote it after its plan and before
    /// its copy recorded writes: sent whole.
    Send,
}

impl Holding {
    /// Whether the standby already holds `data`, the chunk at `index`.
    pub fn holds(&self, key: &ContentKey, index: u64, data: &[u8]) -> bool {
        match self {
            Holding::Zeroed => data.iter().all(|&b| b == 0),
            // Known by the pages written since, not by content.
            Holding::Since(_) => false,
            Holding::Kept(digests) => digests
                .get(index as usize)
                .is_some_and(|d| *d == key.digest(data)),
            Holding::Mapped(chunks) => match chunks.get(index as usize) {
                Some(MappedChunk::Same) => true,
                Some(MappedChunk::Digest(d)) => *d == key.digest(data),
                Some(MappedChunk::Send) | None => false,
            },
        }
    }

    /// Whether the standby holds chunks `chunks` by the written maps
    /// alone: then they need not even be read.
    pub fn same_by_map(&self, chunks: std::ops::Range<u64>) -> bool {
        match self {
            Holding::Mapped(said) => said
                .get(chunks.start as usize..chunks.end as usize)
                .is_some_and(|c| c.iter().all(|c| *c == MappedChunk::Same)),
            _ => false,
        }
    }

    /// Chunks `chunks` of a mapped holding said the same are sent whole
    /// instead (the primary wrote there after its plan); returns how many.
    pub fn send_instead_of_same(&mut self, chunks: std::ops::Range<u64>) -> u64 {
        let Holding::Mapped(said) = self else {
            return 0;
        };
        let end = (chunks.end as usize).min(said.len());
        let start = (chunks.start as usize).min(end);
        let mut changed = 0;
        for c in &mut said[start..end] {
            if *c == MappedChunk::Same {
                *c = MappedChunk::Send;
                changed += 1;
            }
        }
        changed
    }

    /// How many chunks it says something of.
    pub fn chunks_said(&self) -> Option<u64> {
        match self {
            Holding::Zeroed | Holding::Since(_) => None,
            Holding::Kept(d) => Some(d.len() as u64),
            Holding::Mapped(d) => Some(d.len() as u64),
        }
    }
}

/// The digest of each of `pages` pages of memory, read through `read`
/// (guest physical address, page buffer).
pub fn digest_pages<E>(
    pages: u64,
    key: &ContentKey,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<Vec<ChunkDigest>, E> {
    let mut page = vec![0u8; PAGE_SIZE];
    (0..pages)
        .map(|n| {
            read(n * PAGE_SIZE as u64, &mut page)?;
            Ok(key.digest(&page))
        })
        .collect()
}

/// The byte ranges of `data` (read at `offset` of a disk, `offset` a
/// multiple of [`DISK_CHUNK`]) that the standby does not hold, as
/// (start within `data`, end within `data`), neighbouring chunks merged.
pub fn missing_ranges(
    holding: &Holding,
    key: &ContentKey,
    offset: u64,
    data: &[u8],
) -> Vec<(usize, usize)> {
    debug_assert_eq!(offset % DISK_CHUNK as u64, 0);
    let first = offset / DISK_CHUNK as u64;
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for (i, chunk) in data.chunks(DISK_CHUNK).enumerate() {
        if holding.holds(key, first + i as u64, chunk) {
            continue;
        }
        let (start, end) = (i * DISK_CHUNK, i * DISK_CHUNK + chunk.len());
        match ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => ranges.push((start, end)),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> ContentKey {
        ContentKey([b; 32])
    }

    #[test]
    fn a_key_round_trips_through_hex_and_bad_hex_is_refused() {
        let k = ContentKey::random().unwrap();
        assert_eq!(ContentKey::from_hex(&k.to_hex()), Some(k));
        assert_eq!(ContentKey::from_hex("00"), None);
        assert_eq!(ContentKey::from_hex(&"zz".repeat(32)), None);
        assert_eq!(ContentKey::from_hex(&"é".repeat(32)), None);
    }

    #[test]
    fn the_digest_depends_on_the_key_and_the_content() {
        let data = vec![7u8; DISK_CHUNK];
        assert_eq!(key(1).digest(&data), key(1).digest(&data));
        assert_ne!(key(1).digest(&data), key(2).digest(&data));
        let mut other = data.clone();
        other[DISK_CHUNK - 1] = 8;
        assert_ne!(key(1).digest(&data), key(1).digest(&other));
    }

    #[test]
    fn only_chunks_that_differ_are_missing_and_neighbours_merge() {
        let k = key(3);
        let mut standby = vec![0u8; 5 * DISK_CHUNK + 100];
        standby[DISK_CHUNK + 10] = 1;
        let mut primary = standby.clone();
        // Chunks 2 and 3 differ (neighbours), chunk 0 is equal, the short
        // last chunk differs.
        primary[2 * DISK_CHUNK] = 9;
        primary[3 * DISK_CHUNK + 5] = 9;
        primary[5 * DISK_CHUNK + 99] = 9;
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&standby, 0).unwrap();
        let kept = Holding::Kept(digest_disk(&file, standby.len() as u64, &k).unwrap());
        assert_eq!(
            missing_ranges(&kept, &k, 0, &primary),
            vec![
                (2 * DISK_CHUNK, 4 * DISK_CHUNK),
                (5 * DISK_CHUNK, 5 * DISK_CHUNK + 100)
            ]
        );
        // The same chunks read from later in the disk are judged by their
        // own index.
        assert_eq!(
            missing_ranges(&kept, &k, 2 * DISK_CHUNK as u64, &primary[2 * DISK_CHUNK..]),
            vec![(0, 2 * DISK_CHUNK), (3 * DISK_CHUNK, 3 * DISK_CHUNK + 100)]
        );
        // Digests under another key match nothing.
        assert_eq!(missing_ranges(&kept, &key(4), 0, &standby).len(), 1);
        // A zeroed standby misses every chunk that is not all zeros.
        assert_eq!(
            missing_ranges(&Holding::Zeroed, &k, 0, &primary),
            vec![
                (DISK_CHUNK, 4 * DISK_CHUNK),
                (5 * DISK_CHUNK, 5 * DISK_CHUNK + 100)
            ]
        );
        // Fewer digests than chunks: the chunks past them are missing.
        let short = Holding::Kept(vec![k.digest(&standby[..DISK_CHUNK])]);
        assert_eq!(
            missing_ranges(&short, &k, 0, &standby),
            vec![(DISK_CHUNK, 5 * DISK_CHUNK + 100)]
        );
    }
}
