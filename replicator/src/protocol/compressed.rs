//! Compressed copy frames: the initial synchronisation's `SyncPages` and
//! `SyncDisk` payloads, zstd-compressed on the wire as
//! `[length of the payload: u32 LE][one zstd frame]`. Only the copy is
//! compressed: it is bulk data sent while the guest runs, where the A-link
//! is the limit (a 128 MiB guest's memory shrinks about 4.5 times at level
//! 3); epochs are not, as they are on the checkpoint's critical path.
//!
//! The receiver decompresses into at most [`MAX_RAW`] bytes, so a hostile
//! or corrupt frame cannot make it allocate more, and checks that the
//! length said is the length found before the payload is parsed like an
//! uncompressed one.

use bytes::{BufMut, Bytes, BytesMut};

use super::{DISK_BYTES_PER_FRAME, PAGES_PER_FRAME, PAGE_RECORD};

/// The largest payload a compressed frame may hold once decompressed: a
/// disk batch (1 MiB of data and the records' headers) with room to
/// spare; a page batch is smaller.
pub const MAX_RAW: usize = 2 * DISK_BYTES_PER_FRAME;
const _: () = assert!(PAGES_PER_FRAME * PAGE_RECORD <= MAX_RAW);

/// The zstd level the copy uses unless told otherwise: at level 3 zstd
/// compresses about 480 MB/s on one core of the lab's host, several times
/// a 1 GbE link; a 10 GbE A-link may be faster without it (level 0).
pub const DEFAULT_LEVEL: i32 = 3;

/// Why a compressed payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecompressError {
    #[error("shorter than its 4-byte length")]
    NoLength,
    #[error("says it holds more than the largest copy payload")]
    TooLong,
    #[error("not a zstd frame, or one that decompresses past its length")]
    Corrupt,
    #[error("decompresses to another length than it says")]
    WrongLength,
}

/// Compresses copy payloads, keeping one zstd context for the whole copy.
pub struct Compressor {
    ctx: zstd::bulk::Compressor<'static>,
}

impl Compressor {
    /// A compressor at zstd `level` (1-22; the A-link's speed against the
    /// CPU's); `None` for level 0 (no compression).
    pub fn new(level: i32) -> Option<Compressor> {
        if level <= 0 {
            return None;
        }
        // Creating a context fails only for want of memory.
        zstd::bulk::Compressor::new(level)
            .ok()
            .map(|ctx| Compressor { ctx })
    }

    /// `payload` compressed, or `None` where that would not make it
    /// smaller (random data, or a compressor failure: the frame then goes
    /// uncompressed, which is always correct).
    pub fn compress(&mut self, payload: &[u8]) -> Option<Bytes> {
        if payload.is_empty() || payload.len() > MAX_RAW {
            return None;
        }
        let packed = self.ctx.compress(payload).ok()?;
        if packed.len() + 4 >= payload.len() {
            return None;
        }
        let mut out = BytesMut::with_capacity(4 + packed.len());
        out.put_u32_le(payload.len() as u32);
        out.put_slice(&packed);
        Some(out.freeze())
    }
}

/// The payload a compressed frame carries.
pub fn decompress(frame: &[u8]) -> Result<Bytes, DecompressError> {
    let (len, packed) = frame
        .split_first_chunk::<4>()
        .ok_or(DecompressError::NoLength)?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > MAX_RAW {
        return Err(DecompressError::TooLong);
    }
    // The capacity is the length said: a frame that holds more is refused
    // by zstd before it is written past it.
    let raw = zstd::bulk::decompress(packed, len).map_err(|_| DecompressError::Corrupt)?;
    if raw.len() != len {
        return Err(DecompressError::WrongLength);
    }
    Ok(Bytes::from(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressible() -> Vec<u8> {
        (0..PAGES_PER_FRAME * PAGE_RECORD)
            .map(|i| (i / 512) as u8)
            .collect()
    }

    #[test]
    fn a_payload_round_trips_and_shrinks() {
        let raw = compressible();
        let mut c = Compressor::new(DEFAULT_LEVEL).expect("a compressor");
        let packed = c.compress(&raw).expect("compressible");
        assert!(packed.len() < raw.len() / 10, "{} bytes", packed.len());
        assert_eq!(decompress(&packed).unwrap(), raw);
    }

    #[test]
    fn level_zero_means_no_compression_and_incompressible_data_goes_plain() {
        assert!(Compressor::new(0).is_none());
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..64 << 10)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let mut c = Compressor::new(1).unwrap();
        assert_eq!(c.compress(&random), None);
        assert_eq!(c.compress(&[]), None);
    }

    #[test]
    fn bad_compressed_payloads_are_refused_with_the_reason() {
        let raw = compressible();
        let packed = Compressor::new(1).unwrap().compress(&raw).unwrap();
        assert_eq!(decompress(&packed[..3]), Err(DecompressError::NoLength));
        // Says more than any copy payload holds.
        let mut long = packed.to_vec();
        long[..4].copy_from_slice(&(MAX_RAW as u32 + 1).to_le_bytes());
        assert_eq!(decompress(&long), Err(DecompressError::TooLong));
        // Says less than it holds: zstd stops at the length said.
        let mut short = packed.to_vec();
        short[..4].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(decompress(&short), Err(DecompressError::Corrupt));
        // Says more than it holds.
        let mut more = packed.to_vec();
        more[..4].copy_from_slice(&(raw.len() as u32 + 1).to_le_bytes());
        assert_eq!(decompress(&more), Err(DecompressError::WrongLength));
        // Not zstd, and a torn frame.
        let mut garbage = packed.to_vec();
        garbage[4..].fill(0x55);
        assert_eq!(decompress(&garbage), Err(DecompressError::Corrupt));
        assert_eq!(
            decompress(&packed[..packed.len() - 8]),
            Err(DecompressError::Corrupt)
        );
    }
}
