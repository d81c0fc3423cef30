//! What a standby holds of a disk before the copy (`SyncHeld`, standby to
//! primary): `[disk: u32 LE][kind: u8]`, then for kind 1 (a file kept from
//! before) `[first chunk: u64 LE][digest: 16 bytes] ...`, the digests of
//! consecutive chunks from the first; kind 0 (a new, all-zero file) has
//! nothing more. A large disk's digests take several messages, in order.

use bytes::{BufMut, Bytes, BytesMut};

use crate::content::{ChunkDigest, DIGEST_LEN};

/// Digests per `SyncHeld` message, at most (16 MiB of payload).
pub const DIGESTS_PER_FRAME: usize = 1 << 20;

const ZEROED: u8 = 0;
const DIGESTS: u8 = 1;

/// Part of what the standby holds of disk `disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskHeld {
    pub disk: u32,
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
}

impl DiskHeld {
    /// The messages that say a kept disk's `digests` (one for an empty
    /// disk).
    pub fn kept(disk: u32, digests: &[ChunkDigest]) -> Vec<DiskHeld> {
        if digests.is_empty() {
            return vec![DiskHeld {
                disk,
                part: HeldPart::Digests {
                    first_chunk: 0,
                    digests: Vec::new(),
                },
            }];
        }
        digests
            .chunks(DIGESTS_PER_FRAME)
            .enumerate()
            .map(|(i, part)| DiskHeld {
                disk,
                part: HeldPart::Digests {
                    first_chunk: (i * DIGESTS_PER_FRAME) as u64,
                    digests: part.to_vec(),
                },
            })
            .collect()
    }

    pub fn to_payload(&self) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u32_le(self.disk);
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
        }
        b.freeze()
    }

    /// `None` if `p` is malformed.
    pub fn from_payload(p: &[u8]) -> Option<DiskHeld> {
        let disk = u32::from_le_bytes(p.get(..4)?.try_into().ok()?);
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
            _ => return None,
        };
        Some(DiskHeld { disk, part })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_round_trip_and_a_large_disk_takes_several_messages() {
        let zeroed = DiskHeld {
            disk: 2,
            part: HeldPart::Zeroed,
        };
        assert_eq!(DiskHeld::from_payload(&zeroed.to_payload()), Some(zeroed));
        let digests: Vec<ChunkDigest> = (0..DIGESTS_PER_FRAME + 3)
            .map(|i| [(i % 251) as u8; DIGEST_LEN])
            .collect();
        let parts = DiskHeld::kept(1, &digests);
        assert_eq!(parts.len(), 2);
        for part in &parts {
            assert_eq!(
                DiskHeld::from_payload(&part.to_payload()).as_ref(),
                Some(part)
            );
        }
        let HeldPart::Digests {
            first_chunk,
            digests: tail,
        } = &parts[1].part
        else {
            panic!("digests")
        };
        assert_eq!((*first_chunk, tail.len()), (DIGESTS_PER_FRAME as u64, 3));
        assert_eq!(DiskHeld::kept(0, &[]).len(), 1);
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
        ] {
            assert_eq!(DiskHeld::from_payload(bad), None, "{bad:?}");
        }
    }
}
