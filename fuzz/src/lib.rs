//! What the fuzz targets share with the seed generator
//! (`examples/seeds.rs`): how a target reads its input.
//!
//! - [`Chunks`]: the sizes in which `frame_decoder` hands a stream to the
//!   decoder (as TCP would: anywhere).
//! - [`Op`]: one step of `epoch_assembler`'s input, a byte format cheap for
//!   the fuzzer to mutate and for the seeds to write (real messages, with
//!   shortcuts for page and disk records and for an end record, honest or
//!   wrong in one field).
//! - the keys and nonces with which `frame_decoder` checks proofs and
//!   pulses (the seeds carry valid ones).

/// The pair secret the `frame_decoder` target checks proofs with.
pub const PAIR_SECRET: &[u8] = b"fuzz pair secret, 32 bytes long!";
/// The nonce of the checking side, and of the proving side.
pub const VERIFIER_NONCE: [u8; 32] = [0xa5; 32];
pub const PROVER_NONCE: [u8; 32] = [0x07; 32];
/// The key of the pulses the `frame_decoder` target checks.
pub const PULSE_KEY: [u8; 32] = [0x5a; 32];

/// The Hello of the node that `frame_decoder` checks the peer's against.
pub fn local_hello() -> ft_link::Hello {
    ft_link::Hello::new(
        "fuzz-local",
        ft_link::Role::Standby,
        ft_link::CpuFeatureSummary {
            name: "x86-64-v2".into(),
            words: vec![1, 2, 3],
        },
        "vm-fingerprint",
    )
}

/// Chunk sizes for a stream, from one seed byte: the low two bits pick the
/// largest chunk (1, 7, 33 or 4096 bytes), the rest seed a xorshift.
pub struct Chunks {
    state: u32,
    max: usize,
}

impl Chunks {
    pub fn new(seed: u8) -> Chunks {
        Chunks {
            state: 0x9e37_79b9 ^ u32::from(seed >> 2),
            max: [1, 7, 33, 4096][usize::from(seed & 3)],
        }
    }

    /// The next chunk's size (at least 1).
    pub fn next_size(&mut self) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        1 + self.state as usize % self.max
    }
}

/// One step of the `epoch_assembler` input. Epochs are given relative to
/// the assembler's next expected epoch (`delta`, wrapping), so an input
/// stays meaningful after an epoch is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A replication message frame: kind `64 + kind % 16`, any payload.
    Frame {
        kind: u8,
        delta: i8,
        payload: Vec<u8>,
    },
    /// The link broke: the half-received epoch is dropped.
    Abort,
    /// Applies the last completed epoch to the replica.
    Apply,
    /// A `Pages` message of whole records, each page filled with one byte.
    Pages { delta: i8, pages: Vec<(u64, u8)> },
    /// A `DiskWrites` message: (disk, offset, length, fill byte).
    DiskWrites {
        delta: i8,
        writes: Vec<(u8, u32, u16, u8)>,
    },
    /// An `EpochEnd` that matches what the input sent since its last
    /// `EpochBegin` (as the primary would send it), unless `tamper` says
    /// which field to get wrong: see [`Op::tamper`].
    End { delta: i8, tamper: u8 },
}

const TAGS: u8 = 6;
/// At most this many records in one `Pages` or `DiskWrites` op.
pub const MAX_RECORDS: usize = 15;

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn le<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N).map(|b| b.try_into().expect("N bytes"))
    }
}

impl Op {
    /// The ops of an input; a truncated last op is dropped.
    pub fn parse_all(data: &[u8]) -> Vec<Op> {
        let mut r = Reader(data);
        let mut ops = Vec::new();
        while let Some(op) = Op::parse(&mut r) {
            ops.push(op);
        }
        ops
    }

    fn parse(r: &mut Reader) -> Option<Op> {
        Some(match r.u8()? % TAGS {
            0 => {
                let kind = r.u8()?;
                let delta = r.u8()? as i8;
                let len = u32::from_le_bytes(r.le()?) as usize;
                let len = len.min(r.0.len());
                Op::Frame {
                    kind,
                    delta,
                    payload: r.bytes(len)?.to_vec(),
                }
            }
            1 => Op::Abort,
            2 => Op::Apply,
            3 => {
                let delta = r.u8()? as i8;
                let n = usize::from(r.u8()?) % (MAX_RECORDS + 1);
                let pages = (0..n)
                    .map(|_| Some((u64::from_le_bytes(r.le()?), r.u8()?)))
                    .collect::<Option<_>>()?;
                Op::Pages { delta, pages }
            }
            4 => {
                let delta = r.u8()? as i8;
                let n = usize::from(r.u8()?) % (MAX_RECORDS + 1);
                let writes = (0..n)
                    .map(|_| {
                        Some((
                            r.u8()?,
                            u32::from_le_bytes(r.le()?),
                            u16::from_le_bytes(r.le()?),
                            r.u8()?,
                        ))
                    })
                    .collect::<Option<_>>()?;
                Op::DiskWrites { delta, writes }
            }
            _ => Op::End {
                delta: r.u8()? as i8,
                tamper: r.u8()?,
            },
        })
    }

    /// What an [`Op::End`]'s `tamper` byte does to the honest end record
    /// (pages, pages crc, writes, writes crc): `None` for an honest one,
    /// else the field (0 to 3) and a non-zero amount to add or xor.
    pub fn tamper(tamper: u8) -> Option<(u8, u8)> {
        let field = tamper % 5;
        (field != 0).then(|| (field - 1, tamper / 5 + 1))
    }

    /// Appends the op as [`Op::parse_all`] reads it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Frame {
                kind,
                delta,
                payload,
            } => {
                out.extend([0, *kind, *delta as u8]);
                out.extend((payload.len() as u32).to_le_bytes());
                out.extend(payload);
            }
            Op::Abort => out.push(1),
            Op::Apply => out.push(2),
            Op::Pages { delta, pages } => {
                assert!(pages.len() <= MAX_RECORDS);
                out.extend([3, *delta as u8, pages.len() as u8]);
                for (gpa, fill) in pages {
                    out.extend(gpa.to_le_bytes());
                    out.push(*fill);
                }
            }
            Op::DiskWrites { delta, writes } => {
                assert!(writes.len() <= MAX_RECORDS);
                out.extend([4, *delta as u8, writes.len() as u8]);
                for (disk, offset, len, fill) in writes {
                    out.push(*disk);
                    out.extend(offset.to_le_bytes());
                    out.extend(len.to_le_bytes());
                    out.push(*fill);
                }
            }
            Op::End { delta, tamper } => out.extend([5, *delta as u8, *tamper]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_read_back_as_written() {
        let ops = vec![
            Op::Frame {
                kind: 4,
                delta: -1,
                payload: b"state".to_vec(),
            },
            Op::Pages {
                delta: 0,
                pages: vec![(4096, 7), (u64::MAX, 1)],
            },
            Op::DiskWrites {
                delta: 0,
                writes: vec![(1, 512, 10, 3)],
            },
            Op::End {
                delta: 0,
                tamper: 0,
            },
            Op::Apply,
            Op::Abort,
        ];
        let mut wire = Vec::new();
        for op in &ops {
            op.encode(&mut wire);
        }
        assert_eq!(Op::parse_all(&wire), ops);
    }
}
