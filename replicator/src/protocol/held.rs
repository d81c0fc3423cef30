//! What a standby holds of a disk or of memory before the copy
//! (`SyncHeld`, standby to primary): `[region: u32 LE][kind: u8]`, the
//! region a disk's index or `u32::MAX` for memory; then for kind 1 (kept
//! from before) `[first chunk: u64 LE][digest: 16 bytes] ...`, the digests
//! of consecutive chunks from the first (64 KiB of a disk, a 4 KiB page of
//! memory); kind 0 (new, all zeros) has nothing more; kind 2 (a disk's
//! chunks the same as the primary's by the written maps, not read)
//! `[first chunk: u64 LE][count: u64 LE]`; kind 3 (memory as checkpoint E
//! of the session the plan's `memory_since` names) `[E: u64 LE]`. A large
//! region's digests take several messages, in order.

use bytes::{BufMut, Bytes, BytesMut};

use crate::content::{ChunkDigest, DIGEST_LEN};

/// Digests per `SyncHeld` message, at most (16 MiB of payload).
pub const DIGESTS_PER_FRAME: usize = 1 << 20;

const ZEROED: u8 = 0;
const DIGESTS: u8 = 1;
const SAME: u8 = 2;
const SINCE: u8 = 3;
const MEMORY: u32 = u32::MAX;

/// What a holding is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// The disk of this index.
    Disk(u32),
    /// Guest memory.
    Memory,
}

impl Region {
    fn code(self) -> u32 {
        match self {
            Region::Disk(index) => index,
            Region::Memory => MEMORY,
        }
    }

    fn from_code(code: u32) -> Region {
        match code {
            MEMORY => Region::Memory,
            index => Region::Disk(index),
        }
    }
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Region::Disk(index) => write!(f, "disk {index}"),
            Region::Memory => f.write_str("memory"),
        }
    }
}

/// Part of what the standby holds of `region`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub region: Region,
    pub part: HeldPart,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldPart {
    /// The replica's file is new: all zeros.
    Zeroed,
    /// The digests of the kept file's chunks `first_chunk..`.
    Digests {
        first_chunk: u64,
        digests: Vec<ChunkDigest>,
    },
    /// Chunks `first_chunk..first_chunk + count` of a kept disk are the
    /// same as the primary's: neither written map names them.
    Same { first_chunk: u64, count: u64 },
    /// Memory: what checkpoint `epoch` of the session the plan's
    /// `memory_since` names left (the RAM file's label says so).
    Since { epoch: u64 },
}

impl Held {
    /// The messages that say a kept region's `digests` (one for an empty
    /// one).
    pub fn kept(region: Region, digests: &[ChunkDigest]) -> Vec<Held> {
        if digests.is_empty() {
            return vec![Held {
                region,
                part: HeldPart::Digests {
                    first_chunk: 0,
                    digests: Vec::new(),
                },
            }];
        }
        digests
            .chunks(DIGESTS_PER_FRAME)
            .enumerate()
            .map(|(i, part)| Held {
                region,
                part: HeldPart::Digests {
                    first_chunk: (i * DIGESTS_PER_FRAME) as u64,
                    digests: part.to_vec(),
                },
            })
            .collect()
    }

    pub fn to_payload(&self) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u32_le(self.region.code());
        match &self.part {
            HeldPart::Zeroed => b.put_u8(ZEROED),
            HeldPart::Digests {
                first_chunk,
                digests,
            } => {
                b.reserve(9 + digests.len() * DIGEST_LEN);
                b.put_u8(DIGESTS);
                b.put_u64_le(*first_chunk);
                for d in digests {
                    b.put_slice(d);
                }
            }
            HeldPart::Same { first_chunk, count } => {
                b.put_u8(SAME);
                b.put_u64_le(*first_chunk);
                b.put_u64_le(*count);
            }
            HeldPart::Since { epoch } => {
                b.put_u8(SINCE);
                b.put_u64_le(*epoch);
            }
        }
        b.freeze()
    }

    /// `None` if `p` is malformed.
    pub fn from_payload(p: &[u8]) -> Option<Held> {
        let region = Region::from_code(u32::from_le_bytes(p.get(..4)?.try_into().ok()?));
        let part = match *p.get(4)? {
            ZEROED if p.len() == 5 => HeldPart::Zeroed,
            DIGESTS => {
                let first_chunk = u64::from_le_bytes(p.get(5..13)?.try_into().ok()?);
                let rest = &p[13..];
                if !rest.len().is_multiple_of(DIGEST_LEN)
                    || rest.len() / DIGEST_LEN > DIGESTS_PER_FRAME
                {
                    return None;
                }
                let digests = rest
                    .chunks(DIGEST_LEN)
                    .map(|d| d.try_into().expect("whole digests"))
                    .collect();
                HeldPart::Digests {
                    first_chunk,
                    digests,
                }
            }
            SAME if p.len() == 21 => HeldPart::Same {
                first_chunk: u64::from_le_bytes(p.get(5..13)?.try_into().ok()?),
                count: u64::from_le_bytes(p.get(13..21)?.try_into().ok()?),
            },
            SINCE if p.len() == 13 => HeldPart::Since {
                epoch: u64::from_le_bytes(p.get(5..13)?.try_into().ok()?),
            },
            _ => return None,
        };
        Some(Held { region, part })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_round_trip_and_a_large_disk_takes_several_messages() {
        let zeroed = Held {
            region: Region::Disk(2),
            part: HeldPart::Zeroed,
        };
        assert_eq!(Held::from_payload(&zeroed.to_payload()), Some(zeroed));
        let digests: Vec<ChunkDigest> = (0..DIGESTS_PER_FRAME + 3)
            .map(|i| [(i % 251) as u8; DIGEST_LEN])
            .collect();
        let parts = Held::kept(Region::Memory, &digests);
        assert_eq!(parts.len(), 2);
        for part in &parts {
            assert_eq!(Held::from_payload(&part.to_payload()).as_ref(), Some(part));
        }
        let HeldPart::Digests {
            first_chunk,
            digests: tail,
        } = &parts[1].part
        else {
            panic!("digests")
        };
        assert_eq!((*first_chunk, tail.len()), (DIGESTS_PER_FRAME as u64, 3));
        assert_eq!(Held::kept(Region::Disk(0), &[]).len(), 1);
        let same = Held {
            region: Region::Disk(1),
            part: HeldPart::Same {
                first_chunk: 16,
                count: 48,
            },
        };
        assert_eq!(Held::from_payload(&same.to_payload()), Some(same));
        let since = Held {
            region: Region::Memory,
            part: HeldPart::Since { epoch: 41 },
        };
        assert_eq!(Held::from_payload(&since.to_payload()), Some(since));
    }

    #[test]
    fn malformed_payloads_are_refused() {
        for bad in [
            &[][..],
            &[0, 0, 0][..],
            &[0, 0, 0, 0][..],
            &[0, 0, 0, 0, 0, 1][..],
            &[0, 0, 0, 0, 2][..],
            &[0, 0, 0, 0, 1, 0, 0, 0][..],
            &[0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 7][..],
            &[0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0][..],
            &[0, 0, 0, 0, 3][..],
            &[0, 0, 0, 0, 3, 1, 0, 0, 0, 0, 0, 0][..],
            &[0, 0, 0, 0, 3, 1, 0, 0, 0, 0, 0, 0, 0, 0][..],
            &[0, 0, 0, 0, 4][..],
        ] {
            assert_eq!(Held::from_payload(bad), None, "{bad:?}");
        }
    }
}
