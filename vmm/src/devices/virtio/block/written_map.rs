//! A disk's written map: a file beside the disk image with one bit per
//! [`EXTENT_BYTES`] of the disk, set (and made durable) before the first
//! write to that extent reaches the image, so that the map names every
//! extent the image may hold differently from the last point it was known
//! to match a copy elsewhere (its common point, named by [`CommonId`]).
//! Whoever keeps the copies (the replicator) clears bits once the other
//! copy durably holds an extent's writes, and compares only the extents
//! either map names when the two meet again.
//!
//! DRBD keeps a bitmap and an activity log for this; here one persistent
//! bitmap at 1 MiB does both: a write to an extent already set costs
//! nothing, a write to a new extent costs one small write and an
//! `fdatasync` of this file (at most one per MiB of new ground), and a
//! crash at any point leaves every extent that may differ set.
//!
//! File layout (little endian): a 64-byte header (magic, version, the
//! extent size as a shift, the disk's size, whether a common point is
//! known and its 16-byte id, a CRC32 of what precedes it), then the bits,
//! extent `n` at bit `n % 8` of byte `n / 8`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// log2 of the bytes per extent.
pub const EXTENT_SHIFT: u32 = 20;
/// Bytes of the disk per bit of the map (the last extent may be short).
pub const EXTENT_BYTES: u64 = 1 << EXTENT_SHIFT;

const MAGIC: [u8; 8] = *b"FTWRMAP\0";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 64;
/// Header bytes the CRC covers.
const CRC_COVERS: usize = 48;

/// The name of a common point (random, drawn when two copies match).
pub type CommonId = [u8; 16];

/// A range of extents, `start..end`.
pub type Extents = std::ops::Range<u64>;

/// The process-wide write clock: notes read it, [`mark`] advances it.
static CLOCK: AtomicU64 = AtomicU64::new(1);

/// Advances the write clock and returns the new time: every write noted
/// from now on is at or after it, every write whose note already returned
/// is before it ([`WrittenMap::forget_written_before`]).
pub fn mark() -> u64 {
    CLOCK.fetch_add(1, Ordering::SeqCst) + 1
}

#[derive(Debug, thiserror::Error)]
pub enum WrittenMapError {
    #[error("cannot read or create the written map {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the written map {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot note {len} bytes at {offset} in the written map {path}: {source}")]
    Note {
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Why a map was started afresh (every bit clear, no common point) instead
/// of loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fresh {
    /// There was no map.
    Absent,
    /// The file is not a map of this version, or its header is damaged.
    Unreadable(String),
    /// It is the map of a disk of another size.
    OtherSize { had: u64 },
}

impl std::fmt::Display for Fresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fresh::Absent => f.write_str("there was none"),
            Fresh::Unreadable(why) => write!(f, "the one there is unreadable ({why})"),
            Fresh::OtherSize { had } => write!(f, "the one there is of a disk of {had} bytes"),
        }
    }
}

struct Bits {
    common: Option<CommonId>,
    bits: Vec<u8>,
    /// Per extent, the clock at its last note (0: set before this process
    /// opened the map).
    last: Vec<u64>,
}

impl Bits {
    fn is_set(&self, extent: u64) -> bool {
        self.bits[(extent / 8) as usize] & (1 << (extent % 8)) != 0
    }

    fn set(&mut self, extent: u64) {
        self.bits[(extent / 8) as usize] |= 1 << (extent % 8);
    }

    fn clear(&mut self, extent: u64) {
        self.bits[(extent / 8) as usize] &= !(1 << (extent % 8));
    }
}

/// The written map of one disk.
pub struct WrittenMap {
    path: PathBuf,
    file: File,
    disk_bytes: u64,
    bits: Mutex<Bits>,
}

impl std::fmt::Debug for WrittenMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrittenMap")
            .field("path", &self.path)
            .field("disk_bytes", &self.disk_bytes)
            .finish()
    }
}

/// Extents of a disk of `disk_bytes`.
pub fn extents_of(disk_bytes: u64) -> u64 {
    disk_bytes.div_ceil(EXTENT_BYTES)
}

impl WrittenMap {
    /// Where the map of the disk image at `disk` lives.
    pub fn path_for(disk: &Path) -> PathBuf {
        let mut name = disk.as_os_str().to_owned();
        name.push(".written");
        PathBuf::from(name)
    }

    /// Opens the map at `path` for a disk of `disk_bytes`, or starts a
    /// fresh one (every bit clear, no common point: the disk matches
    /// nothing known) and says why.
    pub fn open(
        path: &Path,
        disk_bytes: u64,
    ) -> Result<(WrittenMap, Option<Fresh>), WrittenMapError> {
        let read_err = |source| WrittenMapError::Read {
            path: path.to_path_buf(),
            source,
        };
        let extents = extents_of(disk_bytes);
        let map_bytes = extents.div_ceil(8) as usize;
        let loaded = match std::fs::read(path) {
            Ok(bytes) => parse(&bytes, disk_bytes, map_bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Fresh::Absent),
            Err(e) => return Err(read_err(e)),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(read_err)?;
        let (bits, fresh) = match loaded {
            Ok((common, bits)) => (
                Bits {
                    common,
                    bits,
                    last: vec![0; extents as usize],
                },
                None,
            ),
            Err(fresh) => (
                Bits {
                    common: None,
                    bits: vec![0; map_bytes],
                    last: vec![0; extents as usize],
                },
                Some(fresh),
            ),
        };
        let map = WrittenMap {
            path: path.to_path_buf(),
            file,
            disk_bytes,
            bits: Mutex::new(bits),
        };
        if fresh.is_some() {
            map.rewrite()?;
            if let Some(dir) = path.parent() {
                // The new file's name is durable too.
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|source| map.write_err(source))?;
            }
        }
        Ok((map, fresh))
    }

    /// [`WrittenMap::open`] at the map's place beside the disk image at
    /// `disk` (`path_for`); a fresh map is logged with why.
    pub fn open_beside(disk: &Path, disk_bytes: u64) -> Result<WrittenMap, WrittenMapError> {
        let path = WrittenMap::path_for(disk);
        let (map, fresh) = WrittenMap::open(&path, disk_bytes)?;
        if let Some(why) = fresh {
            tracing::info!(map = %path.display(), %why, "a new written map: the disk matches no other copy");
        }
        Ok(map)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bits> {
        self.bits.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_err(&self, source: std::io::Error) -> WrittenMapError {
        WrittenMapError::Write {
            path: self.path.clone(),
            source,
        }
    }

    /// Notes that `len` bytes at `offset` are about to be written: their
    /// extents are set, durably, before this returns. Extents already set
    /// cost no I/O.
    pub fn note(&self, offset: u64, len: u64) -> Result<(), WrittenMapError> {
        if len == 0 {
            return Ok(());
        }
        let last_extent = (offset.saturating_add(len - 1) >> EXTENT_SHIFT)
            .min(extents_of(self.disk_bytes).saturating_sub(1));
        self.set_extents(offset >> EXTENT_SHIFT..last_extent + 1)
            .map_err(|source| WrittenMapError::Note {
                path: self.path.clone(),
                offset,
                len,
                source,
            })
    }

    /// Sets the extents of `ranges` as written now, durably, with at most
    /// one sync.
    pub fn note_extents(&self, ranges: &[Extents]) -> Result<(), WrittenMapError> {
        self.set_all(ranges.iter().cloned())
            .map_err(|source| self.write_err(source))
    }

    /// Notes writes of (offset, length) about to be executed, durably,
    /// with at most one sync.
    pub fn note_all(&self, writes: &[(u64, u64)]) -> Result<(), WrittenMapError> {
        let extents = writes
            .iter()
            .filter(|&&(_, len)| len > 0)
            .map(|&(offset, len)| {
                offset >> EXTENT_SHIFT..(offset.saturating_add(len - 1) >> EXTENT_SHIFT) + 1
            });
        self.set_all(extents)
            .map_err(|source| self.write_err(source))
    }

    fn set_extents(&self, range: Extents) -> std::io::Result<()> {
        self.set_all(std::iter::once(range))
    }

    fn set_all(&self, ranges: impl Iterator<Item = Extents>) -> std::io::Result<()> {
        let now = CLOCK.load(Ordering::SeqCst);
        let mut bits = self.lock();
        let count = bits.last.len() as u64;
        let mut new = Vec::new();
        for range in ranges {
            for extent in range.start.min(count)..range.end.min(count) {
                bits.last[extent as usize] = now;
                if !bits.is_set(extent) {
                    bits.set(extent);
                    new.push(extent);
                }
            }
        }
        let (Some(&first), Some(&last)) = (new.iter().min(), new.iter().max()) else {
            return Ok(());
        };
        let (first, last) = ((first / 8) as usize, (last / 8) as usize);
        let written = self
            .file
            .write_all_at(&bits.bits[first..=last], HEADER_LEN + first as u64)
            .and_then(|()| self.file.sync_data());
        if written.is_err() {
            // Not durable: the next write there must try again.
            for extent in new {
                bits.clear(extent);
            }
        }
        written
    }

    /// Clears every extent not noted since `mark` (a time from [`mark`]):
    /// the other copy durably holds what was written there. The file is
    /// written but not synced: a clear bit lost in a crash is only set
    /// again, which costs a comparison, never a difference missed.
    /// Returns how many extents it cleared.
    pub fn forget_written_before(&self, mark: u64) -> Result<u64, WrittenMapError> {
        let mut bits = self.lock();
        let cleared = clear_before(&mut bits, mark);
        if cleared > 0 {
            self.file
                .write_all_at(&bits.bits, HEADER_LEN)
                .map_err(|source| self.write_err(source))?;
        }
        Ok(cleared)
    }

    /// Names a new common point (`None`: the disk matches nothing known,
    /// as while a copy overwrites it) after clearing every extent not
    /// noted since `mark`; durable before this returns. The bits go first:
    /// a crash between the two leaves the old header, whose copies no
    /// longer match this disk's bits only where they are set.
    pub fn set_common(&self, common: Option<CommonId>, mark: u64) -> Result<(), WrittenMapError> {
        let mut bits = self.lock();
        clear_before(&mut bits, mark);
        bits.common = None;
        // Invalidate first, so that no crash leaves an old id over new
        // bits, then the bits, then the new id.
        let io = || -> std::io::Result<()> {
            self.file.write_all_at(&header(self.disk_bytes, None), 0)?;
            self.file.sync_data()?;
            self.file.write_all_at(&bits.bits, HEADER_LEN)?;
            self.file.sync_data()?;
            if common.is_some() {
                self.file
                    .write_all_at(&header(self.disk_bytes, common), 0)?;
                self.file.sync_data()?;
            }
            Ok(())
        };
        io().map_err(|source| self.write_err(source))?;
        bits.common = common;
        Ok(())
    }

    /// The common point this disk's bits are counted from, if known.
    pub fn common(&self) -> Option<CommonId> {
        self.lock().common
    }

    /// The extents set, as ranges in order.
    pub fn written(&self) -> Vec<Extents> {
        let bits = self.lock();
        let mut ranges: Vec<Extents> = Vec::new();
        for extent in 0..bits.last.len() as u64 {
            if !bits.is_set(extent) {
                continue;
            }
            match ranges.last_mut() {
                Some(r) if r.end == extent => r.end += 1,
                _ => ranges.push(extent..extent + 1),
            }
        }
        ranges
    }

    /// How many extents are set.
    pub fn written_count(&self) -> u64 {
        self.lock()
            .bits
            .iter()
            .map(|b| u64::from(b.count_ones()))
            .sum()
    }

    /// Writes the whole file (header and bits) and syncs it.
    fn rewrite(&self) -> Result<(), WrittenMapError> {
        let bits = self.lock();
        let io = || -> std::io::Result<()> {
            self.file.set_len(HEADER_LEN + bits.bits.len() as u64)?;
            self.file.write_all_at(&bits.bits, HEADER_LEN)?;
            self.file
                .write_all_at(&header(self.disk_bytes, bits.common), 0)?;
            self.file.sync_all()
        };
        io().map_err(|source| self.write_err(source))
    }
}

fn clear_before(bits: &mut Bits, mark: u64) -> u64 {
    let mut cleared = 0;
    for extent in 0..bits.last.len() as u64 {
        if bits.is_set(extent) && bits.last[extent as usize] < mark {
            bits.clear(extent);
            cleared += 1;
        }
    }
    cleared
}

fn header(disk_bytes: u64, common: Option<CommonId>) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&EXTENT_SHIFT.to_le_bytes());
    h[16..24].copy_from_slice(&disk_bytes.to_le_bytes());
    if let Some(id) = common {
        h[24] = 1;
        h[32..48].copy_from_slice(&id);
    }
    let crc = crc32fast::hash(&h[..CRC_COVERS]);
    h[48..52].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The common point and bits of a map file, or why it cannot be used.
fn parse(
    bytes: &[u8],
    disk_bytes: u64,
    map_bytes: usize,
) -> Result<(Option<CommonId>, Vec<u8>), Fresh> {
    let unreadable = |why: &str| Fresh::Unreadable(why.to_string());
    let h = bytes
        .get(..HEADER_LEN as usize)
        .ok_or_else(|| unreadable("shorter than its header"))?;
    if h[0..8] != MAGIC {
        return Err(unreadable("not a written map"));
    }
    let crc = u32::from_le_bytes(h[48..52].try_into().expect("4 bytes"));
    if crc != crc32fast::hash(&h[..CRC_COVERS]) {
        return Err(unreadable("its header's checksum is wrong"));
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(Fresh::Unreadable(format!(
            "version {version}, not {VERSION}"
        )));
    }
    let shift = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
    if shift != EXTENT_SHIFT {
        return Err(Fresh::Unreadable(format!(
            "extents of 2^{shift} bytes, not 2^{EXTENT_SHIFT}"
        )));
    }
    let had = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    if had != disk_bytes {
        return Err(Fresh::OtherSize { had });
    }
    let bits = bytes
        .get(HEADER_LEN as usize..HEADER_LEN as usize + map_bytes)
        .ok_or_else(|| unreadable("shorter than its bits"))?
        .to_vec();
    let common = (h[24] == 1).then(|| h[32..48].try_into().expect("16 bytes"));
    Ok((common, bits))
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // ranges of extents
mod tests {
    use super::*;

    const DISK: u64 = 40 * EXTENT_BYTES + 4096;

    fn open(dir: &tempfile::TempDir) -> (WrittenMap, Option<Fresh>) {
        WrittenMap::open(&dir.path().join("disk.img.written"), DISK).unwrap()
    }

    #[test]
    fn writes_set_their_extents_and_the_map_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (map, fresh) = open(&dir);
        assert_eq!(fresh, Some(Fresh::Absent));
        assert_eq!(map.common(), None);
        assert!(map.written().is_empty());
        // One sector, a write across an extent boundary, the short last
        // extent.
        map.note(3 * EXTENT_BYTES + 512, 512).unwrap();
        map.note(8 * EXTENT_BYTES - 4096, 8192).unwrap();
        map.note(40 * EXTENT_BYTES, 4096).unwrap();
        map.set_common(Some([7; 16]), 0).unwrap();
        let expected = vec![3..4, 7..9, 40..41];
        assert_eq!(map.written(), expected);
        drop(map);
        // A process that opens it again (the daemon restarted) finds the
        // same extents and common point.
        let (map, fresh) = open(&dir);
        assert_eq!(fresh, None);
        assert_eq!(map.written(), expected);
        assert_eq!(map.common(), Some([7; 16]));
        assert_eq!(map.written_count(), 4);
    }

    #[test]
    fn only_extents_not_written_since_the_mark_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let (map, _) = open(&dir);
        map.note(0, 4096).unwrap();
        map.note(5 * EXTENT_BYTES, 4096).unwrap();
        let t = mark();
        // Extent 5 written again after the mark: it stays.
        map.note(5 * EXTENT_BYTES + 8192, 4096).unwrap();
        map.note(9 * EXTENT_BYTES, 4096).unwrap();
        assert_eq!(map.forget_written_before(t).unwrap(), 1);
        assert_eq!(map.written(), vec![5..6, 9..10]);
        drop(map);
        let (map, _) = open(&dir);
        assert_eq!(map.written(), vec![5..6, 9..10], "the clear is on disk");
        // Bits loaded from the file predate any mark of this process.
        assert_eq!(map.forget_written_before(mark()).unwrap(), 2);
        assert!(map.written().is_empty());
    }

    #[test]
    fn a_new_common_point_keeps_only_what_was_written_since_and_none_invalidates() {
        let dir = tempfile::tempdir().unwrap();
        let (map, _) = open(&dir);
        map.note(EXTENT_BYTES, 1).unwrap();
        let t = mark();
        map.note(2 * EXTENT_BYTES, 1).unwrap();
        map.set_common(Some([1; 16]), t).unwrap();
        assert_eq!((map.common(), map.written()), (Some([1; 16]), vec![2..3]));
        map.set_common(None, u64::MAX).unwrap();
        drop(map);
        let (map, fresh) = open(&dir);
        assert_eq!(fresh, None);
        assert_eq!((map.common(), map.written()), (None, vec![]));
    }

    #[test]
    fn writes_and_ranges_are_noted_together() {
        let dir = tempfile::tempdir().unwrap();
        let (map, _) = open(&dir);
        map.note_all(&[(0, 1), (10 * EXTENT_BYTES - 1, 2), (20 * EXTENT_BYTES, 0)])
            .unwrap();
        map.note_extents(&[30..32, 39..45]).unwrap();
        assert_eq!(map.written(), vec![0..1, 9..11, 30..32, 39..41]);
    }

    #[test]
    fn a_damaged_or_foreign_map_starts_afresh_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img.written");
        {
            let (map, _) = open(&dir);
            map.note(0, 1).unwrap();
            map.set_common(Some([3; 16]), 0).unwrap();
        }
        // Another disk size.
        let (map, fresh) = WrittenMap::open(&path, DISK * 2).unwrap();
        assert_eq!(fresh, Some(Fresh::OtherSize { had: DISK }));
        assert_eq!((map.common(), map.written()), (None, vec![]));
        drop(map);
        // A flipped bit in the header.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[33] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (_, fresh) = WrittenMap::open(&path, DISK * 2).unwrap();
        assert!(
            matches!(&fresh, Some(Fresh::Unreadable(why)) if why.contains("checksum")),
            "{fresh:?}"
        );
        std::fs::write(&path, b"short").unwrap();
        let (_, fresh) = WrittenMap::open(&path, DISK).unwrap();
        assert!(matches!(fresh, Some(Fresh::Unreadable(_))), "{fresh:?}");
    }

    #[test]
    fn a_note_that_cannot_be_made_durable_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (map, _) = open(&dir);
        // A map whose file descriptor is read-only: the first write to a
        // new extent cannot be noted, and says so.
        let file = File::open(map.path()).unwrap();
        let broken = WrittenMap {
            path: map.path().to_path_buf(),
            file,
            disk_bytes: DISK,
            bits: Mutex::new(Bits {
                common: None,
                bits: vec![0; extents_of(DISK).div_ceil(8) as usize],
                last: vec![0; extents_of(DISK) as usize],
            }),
        };
        let err = broken.note(EXTENT_BYTES, 4096).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot note 4096 bytes at 1048576"),
            "{err}"
        );
    }
}
