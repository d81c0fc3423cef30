//! Inbound records: `[nic: u32 LE][seq: u64 LE][length: u32 LE][frame]`,
//! the frames the primary's guest received, forwarded as they arrive (not
//! with an epoch): a standby that takes over replays those its last
//! checkpoint had not yet received, so that the guest's peers need not
//! send them again.

use bytes::{BufMut, Bytes, BytesMut};
use vmm::replication::InboundFrame;

/// Bytes of frames per `Inbound` message (a frame is never split).
pub const INBOUND_BYTES_PER_FRAME: usize = 256 << 10;
const INBOUND_RECORD_HEADER: usize = 4 + 8 + 4;
/// The longest frame a NIC hands over (a virtio header and 64 KiB).
pub const INBOUND_FRAME_MAX: usize = vmm::replication::MAX_RECEIVED_FRAME_LEN;

/// One received frame of NIC `nic`, number `seq` on that NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRecord {
    pub nic: u32,
    pub seq: u64,
    pub frame: Bytes,
}

/// A payload of whole inbound records, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundBatch {
    raw: Bytes,
    records: Vec<InboundRecord>,
}

impl InboundBatch {
    /// The records of `payload`; `None` if it is malformed (a record cut
    /// short, or a frame longer than a NIC hands over).
    pub fn parse(payload: Bytes) -> Option<InboundBatch> {
        let mut records = Vec::new();
        let mut at = 0;
        while at < payload.len() {
            let header = payload.get(at..at.checked_add(INBOUND_RECORD_HEADER)?)?;
            let nic = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
            let seq = u64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")) as usize;
            if len > INBOUND_FRAME_MAX {
                return None;
            }
            let start = at + INBOUND_RECORD_HEADER;
            let end = start.checked_add(len)?;
            if payload.len() < end {
                return None;
            }
            records.push(InboundRecord {
                nic,
                seq,
                frame: payload.slice(start..end),
            });
            at = end;
        }
        Some(InboundBatch {
            raw: payload,
            records,
        })
    }

    pub fn records(&self) -> &[InboundRecord] {
        &self.records
    }

    pub fn into_records(self) -> Vec<InboundRecord> {
        self.records
    }

    pub fn into_bytes(self) -> Bytes {
        self.raw
    }
}

/// Frames packed into batches of about [`INBOUND_BYTES_PER_FRAME`] bytes
/// each (longer frames than a NIC hands over are left out).
pub fn inbound_payloads(frames: impl IntoIterator<Item = InboundFrame>) -> Vec<InboundBatch> {
    let mut batches = Vec::new();
    let mut chunk = BytesMut::new();
    let mut in_chunk = Vec::new();
    let mut flush = |chunk: &mut BytesMut, in_chunk: &mut Vec<(u32, u64, usize, usize)>| {
        let raw = chunk.split().freeze();
        let records = in_chunk
            .drain(..)
            .map(|(nic, seq, start, end)| InboundRecord {
                nic,
                seq,
                frame: raw.slice(start..end),
            })
            .collect();
        batches.push(InboundBatch { raw, records });
    };
    for f in frames {
        if f.frame.len() > INBOUND_FRAME_MAX {
            continue;
        }
        if !chunk.is_empty() && chunk.len() + f.frame.len() > INBOUND_BYTES_PER_FRAME {
            flush(&mut chunk, &mut in_chunk);
        }
        chunk.put_u32_le(f.nic);
        chunk.put_u64_le(f.seq);
        chunk.put_u32_le(f.frame.len() as u32);
        let start = chunk.len();
        chunk.put_slice(&f.frame);
        in_chunk.push((f.nic, f.seq, start, chunk.len()));
    }
    if !chunk.is_empty() {
        flush(&mut chunk, &mut in_chunk);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(nic: u32, seq: u64, len: usize) -> InboundFrame {
        InboundFrame {
            nic,
            seq,
            frame: vec![seq as u8; len],
        }
    }

    #[test]
    fn frames_round_trip_through_batches_of_bounded_size() {
        let frames: Vec<_> = (0..20).map(|s| frame((s % 2) as u32, s, 60_000)).collect();
        let batches = inbound_payloads(frames.clone());
        assert!(batches.len() > 1, "about 256 KiB to a batch");
        let mut back = Vec::new();
        for batch in batches {
            assert!(batch.raw.len() <= INBOUND_BYTES_PER_FRAME + INBOUND_FRAME_MAX);
            let parsed = InboundBatch::parse(batch.clone().into_bytes()).unwrap();
            assert_eq!(parsed, batch);
            back.extend(parsed.into_records().into_iter().map(|r| InboundFrame {
                nic: r.nic,
                seq: r.seq,
                frame: r.frame.to_vec(),
            }));
        }
        assert_eq!(back, frames);
    }

    #[test]
    fn malformed_batches_are_refused() {
        let good = inbound_payloads([frame(0, 1, 64)]).remove(0).into_bytes();
        assert!(InboundBatch::parse(good.slice(..good.len() - 1)).is_none());
        assert!(InboundBatch::parse(good.slice(..10)).is_none());
        let mut long = BytesMut::new();
        long.put_u32_le(0);
        long.put_u64_le(0);
        long.put_u32_le(INBOUND_FRAME_MAX as u32 + 1);
        long.put_slice(&vec![0; INBOUND_FRAME_MAX + 1]);
        assert!(InboundBatch::parse(long.freeze()).is_none());
        assert_eq!(
            InboundBatch::parse(Bytes::new()).unwrap().records().len(),
            0
        );
    }
}
