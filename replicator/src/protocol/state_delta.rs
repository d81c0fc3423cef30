//! An epoch's checkpoint state as what changed since the previous epoch's
//! (`EpochStateDelta`, in place of `EpochBegin`).
//!
//! Between two checkpoints a VM's state barely moves: its CPUID, MSR list,
//! most of the FPU area, the interrupt controllers and the devices stay as
//! they were; the registers, timers and a few queue indexes change. Sent
//! whole, the state is most of an idle epoch's bytes (~9 KB for one vCPU),
//! all of it sealed, sent and opened at every checkpoint.
//!
//! Payload: `[state length: u32 LE][state CRC32: u32 LE]` then, for each
//! 4 KiB chunk of the state (the last one zero-filled to 4 KiB),
//! `[length: u16 LE][delta]` with the page delta codec ([`super::delta`]).
//! The base is the state of the epoch before, which the standby holds
//! once it assembled that epoch: epochs come whole and in order, and a
//! torn one refuses those after it. The CRC of the result is checked all
//! the same, so a delta applied to any other base is refused, never
//! taken for a state.

use bytes::{BufMut, Bytes, BytesMut};

use super::delta::{self, DeltaError};
use super::PAGE_SIZE;

/// A longer state always goes whole (the largest VM's is far smaller).
pub const STATE_DELTA_MAX_LEN: usize = 1 << 20;
const HEADER: usize = 4 + 4;

/// Why a state delta did not give a state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateDeltaError {
    #[error("no state of an epoch before to apply it to")]
    NoBase,
    #[error("it is of a state of {expected} bytes, the one before is {found}")]
    BaseLength { expected: usize, found: usize },
    #[error("chunk {chunk}: {source}")]
    Delta {
        chunk: usize,
        #[source]
        source: DeltaError,
    },
    #[error("the state it gives has CRC32 {found:#010x}, not {expected:#010x} (a different base)")]
    Crc { expected: u32, found: u32 },
}

/// A well-formed state delta (checked whole when decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDelta {
    bytes: Bytes,
}

fn chunks(len: usize) -> usize {
    len.div_ceil(PAGE_SIZE)
}

/// Chunk `i` of `state`, zero-filled to a page.
fn chunk(state: &[u8], i: usize) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    let from = i * PAGE_SIZE;
    let to = state.len().min(from + PAGE_SIZE);
    page[..to - from].copy_from_slice(&state[from..to]);
    page
}

/// Each chunk's delta, or `None` at the first record cut short or beyond
/// the last.
fn records(body: &[u8]) -> impl Iterator<Item = Option<&[u8]>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at == body.len() {
            return None;
        }
        let Some(len) = body.get(at..at + 2) else {
            at = body.len();
            return Some(None);
        };
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        let Some(d) = body.get(at + 2..at + 2 + len) else {
            at = body.len();
            return Some(None);
        };
        at += 2 + len;
        Some(Some(d))
    })
}

impl StateDelta {
    /// The delta from `old` to `new` (states of the same length), if it
    /// takes at most `limit` bytes: else the state goes whole.
    pub fn encode(old: &[u8], new: &[u8], limit: usize) -> Option<StateDelta> {
        if old.len() != new.len() || new.len() > STATE_DELTA_MAX_LEN {
            return None;
        }
        let mut out = Vec::with_capacity(HEADER + 64);
        out.extend_from_slice(&(new.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(new).to_le_bytes());
        let mut piece = Vec::new();
        for i in 0..chunks(new.len()) {
            piece.clear();
            let left = limit.checked_sub(out.len() + 2)?;
            delta::encode(&chunk(old, i), &chunk(new, i), left, &mut piece)?;
            out.extend_from_slice(&(piece.len() as u16).to_le_bytes());
            out.extend_from_slice(&piece);
        }
        Some(StateDelta { bytes: out.into() })
    }

    /// `None` unless `payload` is a header, then one well-formed delta per
    /// chunk of the state it names, and nothing after.
    pub fn parse(payload: Bytes) -> Option<StateDelta> {
        let header = payload.get(..HEADER)?;
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        if len > STATE_DELTA_MAX_LEN {
            return None;
        }
        let mut count = 0;
        for record in records(&payload[HEADER..]) {
            delta::check(record?).ok()?;
            count += 1;
        }
        (count == chunks(len)).then_some(StateDelta { bytes: payload })
    }

    /// The length of the state it gives.
    pub fn len(&self) -> usize {
        u32::from_le_bytes(self.bytes[..4].try_into().expect("checked")) as usize
    }

    /// Whether it gives an empty state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn crc(&self) -> u32 {
        u32::from_le_bytes(self.bytes[4..HEADER].try_into().expect("checked"))
    }

    /// The state it gives from `base`, the state of the epoch before.
    pub fn apply(&self, base: &[u8]) -> Result<Bytes, StateDeltaError> {
        let len = self.len();
        if base.len() != len {
            return Err(StateDeltaError::BaseLength {
                expected: len,
                found: base.len(),
            });
        }
        let mut out = BytesMut::with_capacity(chunks(len) * PAGE_SIZE);
        for (i, record) in records(&self.bytes[HEADER..]).enumerate() {
            let mut page = chunk(base, i);
            delta::apply(&mut page, record.expect("checked when parsed"))
                .map_err(|source| StateDeltaError::Delta { chunk: i, source })?;
            out.put_slice(&page);
        }
        out.truncate(len);
        let found = crc32fast::hash(&out);
        if found != self.crc() {
            return Err(StateDeltaError::Crc {
                expected: self.crc(),
                found,
            });
        }
        Ok(out.freeze())
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state of `len` bytes, byte `i` = `i * seed`.
    fn state(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect()
    }

    #[test]
    fn a_state_that_changed_in_a_few_places_goes_as_a_short_delta() {
        // Three chunks, the last one short.
        let old = state(2 * PAGE_SIZE + 1000, 7);
        let mut new = old.clone();
        new[10] ^= 1;
        new[PAGE_SIZE + 5] ^= 0xff;
        new[2 * PAGE_SIZE + 999] = 0x42; // the last byte
        let d = StateDelta::encode(&old, &new, new.len() / 2).expect("a short delta");
        let bytes = d.clone().into_bytes();
        assert!(bytes.len() < 100, "{} bytes", bytes.len());
        let parsed = StateDelta::parse(bytes).expect("well formed");
        assert_eq!(parsed, d);
        assert_eq!(parsed.len(), new.len());
        assert_eq!(&parsed.apply(&old).unwrap()[..], &new[..]);
        // Unchanged: a header and an empty delta per chunk.
        let same = StateDelta::encode(&old, &old, 100).unwrap();
        assert_eq!(same.into_bytes().len(), HEADER + 3 * 2);
    }

    #[test]
    fn a_state_that_changed_much_or_in_length_goes_whole() {
        let old = state(5000, 3);
        assert!(StateDelta::encode(&old, &state(5000, 5), 2500).is_none());
        assert!(StateDelta::encode(&old, &state(5001, 3), 2500).is_none());
        let huge = vec![0; STATE_DELTA_MAX_LEN + 1];
        assert!(StateDelta::encode(&huge, &huge, usize::MAX).is_none());
    }

    #[test]
    fn a_delta_applied_to_another_base_is_refused() {
        let old = state(3000, 7);
        let mut new = old.clone();
        new[100] ^= 1;
        let d = StateDelta::encode(&old, &new, 1500).unwrap();
        // Same length, other contents: the result's CRC gives it away.
        let other = state(3000, 9);
        assert!(matches!(d.apply(&other), Err(StateDeltaError::Crc { .. })));
        assert_eq!(
            d.apply(&old[..2999]),
            Err(StateDeltaError::BaseLength {
                expected: 3000,
                found: 2999
            })
        );
    }

    #[test]
    fn malformed_payloads_are_refused_when_parsed() {
        let old = state(5000, 7);
        let mut new = old.clone();
        new[4500] ^= 1;
        let good = StateDelta::encode(&old, &new, 2500).unwrap().into_bytes();
        // Cut anywhere: a short header or a chunk missing or cut.
        for cut in 0..good.len() {
            assert!(
                StateDelta::parse(good.slice(..cut)).is_none(),
                "cut at {cut}"
            );
        }
        // A record more than the state has chunks.
        let mut longer = good.to_vec();
        longer.extend_from_slice(&[0, 0]);
        assert!(StateDelta::parse(longer.into()).is_none());
        // A length past the most a state may be.
        let mut huge = good.to_vec();
        huge[..4].copy_from_slice(&(STATE_DELTA_MAX_LEN as u32 + 1).to_le_bytes());
        assert!(StateDelta::parse(huge.into()).is_none());
        // A chunk's delta malformed (a piece of no changed word).
        let mut bad = Vec::new();
        bad.extend_from_slice(&10u32.to_le_bytes());
        bad.extend_from_slice(&0u32.to_le_bytes());
        bad.extend_from_slice(&2u16.to_le_bytes());
        bad.extend_from_slice(&[0, 0]);
        assert!(StateDelta::parse(bad.into()).is_none());
    }
}
