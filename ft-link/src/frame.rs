//! A-link frames.
//!
//! ```text
//! offset  size  field
//!      0     2  magic "FT"
//!      2     1  version (2)
//!      3     1  kind
//!      4     4  crc32 of the payload (0 where the payload is
//!                 authenticated instead: see below)
//!      8     8  epoch
//!     16     8  generation
//!     24     4  payload length
//!     28     4  crc32 of bytes 0..28 (the header check)
//!     32     -  payload
//! ```
//! All integers are little endian. The header has its own check, made
//! before its length is believed: a corrupted length is refused at once,
//! never waited for (a flipped high bit would otherwise have the reader
//! swallow tens of MiB of later frames, heartbeats included, as payload).
//! A length must also fit its kind (the link's own frames are small).
//!
//! On a sealed link the payload crc32 is left out (0, and not checked) in
//! two places where the AEAD tag already covers every byte: a
//! [`FrameKind::Sealed`] record's payload (its ciphertext and tag), and
//! the frames inside the opened stream (`PayloadCheck::Sealed`,
//! crate-private). A crc there would only repeat a stronger check, at a
//! pass over every byte on each side.
//!
//! The link's own frames (handshake, heartbeats, refusals) have kinds below
//! [`MESSAGE_KIND_FIRST`]; every kind from there up is a message of the
//! protocol the link carries (the replication protocol), opaque here: the
//! link checks and delivers it, and knows nothing of what it means.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const MAGIC: [u8; 2] = *b"FT";
pub const VERSION: u8 = 2;
pub const HEADER_LEN: usize = 32;
/// The largest payload accepted: a frame announcing more is malformed.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// The largest payload of the link's own frames (handshake, refusals).
pub const MAX_LINK_PAYLOAD: u32 = 64 << 10;
/// The first kind byte of a carried message.
pub const MESSAGE_KIND_FIRST: u8 = 64;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Hello,
    Challenge,
    Response,
    Heartbeat,
    /// The peer refuses something and says why.
    Refusal,
    /// The peer checked the handshake and accepts to pair.
    Accepted,
    /// A message of the key exchange that opens a sealed link
    /// ([`crate::seal`]).
    KeyExchange,
    /// A sealed record: a piece of the link's encrypted byte stream, in
    /// which the frames after the key exchange travel.
    Sealed,
    /// A message of the carried protocol, by its kind byte
    /// (`MESSAGE_KIND_FIRST..=255`).
    Message(u8),
}

impl FrameKind {
    /// The largest payload a frame of this kind may carry.
    pub fn max_payload(self) -> u32 {
        match self {
            FrameKind::Heartbeat => 0,
            FrameKind::Message(_) => MAX_PAYLOAD,
            _ => MAX_LINK_PAYLOAD,
        }
    }

    /// The kind byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            FrameKind::Hello => 1,
            FrameKind::Challenge => 2,
            FrameKind::Response => 3,
            FrameKind::Heartbeat => 4,
            FrameKind::Refusal => 10,
            FrameKind::Accepted => 11,
            FrameKind::KeyExchange => 12,
            FrameKind::Sealed => 13,
            FrameKind::Message(code) => code,
        }
    }
}

impl TryFrom<u8> for FrameKind {
    type Error = FrameError;
    fn try_from(v: u8) -> Result<Self, FrameError> {
        use FrameKind::*;
        Ok(match v {
            1 => Hello,
            2 => Challenge,
            3 => Response,
            4 => Heartbeat,
            10 => Refusal,
            11 => Accepted,
            12 => KeyExchange,
            13 => Sealed,
            code if code >= MESSAGE_KIND_FIRST => Message(code),
            other => return Err(FrameError::UnknownKind(other)),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub epoch: u64,
    /// The generation of the active copy the sender acts for (0 where the
    /// carried protocol does not use one).
    pub generation: u64,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("not an A-link frame (magic {0:02x?})")]
    BadMagic([u8; 2]),
    #[error("frame version {0} is not supported (this node speaks version {VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{kind:?} frame announces {len} bytes of payload, more than the {max} it may carry")]
    TooLong { kind: FrameKind, len: u32, max: u32 },
    #[error("frame header failed its checksum (carried {carried:08x}, computed {computed:08x})")]
    HeaderChecksum { carried: u32, computed: u32 },
    #[error("frame of epoch {epoch} failed its checksum (carried {carried:08x}, computed {computed:08x})")]
    Checksum {
        epoch: u64,
        carried: u32,
        computed: u32,
    },
    #[error("the stream ended inside a frame ({0} bytes of it received)")]
    Truncated(usize),
    #[error("payload of {0} bytes is larger than a frame can carry")]
    PayloadTooLarge(usize),
    #[error("kind {0} is not a message kind (they start at {MESSAGE_KIND_FIRST})")]
    NotAMessageKind(u8),
}

/// How the payload of a frame is checked against corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PayloadCheck {
    /// By the crc32 in its header: frames on the wire (a
    /// [`FrameKind::Sealed`] record's payload excepted, which its tag
    /// authenticates).
    Crc32,
    /// By the AEAD tags of the sealed records that carried it: frames
    /// inside a sealed link's opened stream. Their header's crc field is 0
    /// and is not checked.
    Sealed,
}

impl PayloadCheck {
    /// Whether a frame of `kind` carries and is checked by a crc32.
    fn crc32(self, kind: FrameKind) -> bool {
        self == PayloadCheck::Crc32 && kind != FrameKind::Sealed
    }
}

fn header_checksum(header: &[u8]) -> u32 {
    crc32fast::hash(&header[..28])
}

impl Frame {
    /// Its bytes on a plaintext link: header and payload.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// A frame of the link itself (generation 0).
    pub fn new(kind: FrameKind, epoch: u64, payload: impl Into<Bytes>) -> Frame {
        Frame {
            kind,
            epoch,
            generation: 0,
            payload: payload.into(),
        }
    }

    /// A message of the carried protocol; `code` must be a message kind.
    pub fn message(
        code: u8,
        epoch: u64,
        generation: u64,
        payload: impl Into<Bytes>,
    ) -> Result<Frame, FrameError> {
        if code < MESSAGE_KIND_FIRST {
            return Err(FrameError::NotAMessageKind(code));
        }
        Ok(Frame {
            kind: FrameKind::Message(code),
            epoch,
            generation,
            payload: payload.into(),
        })
    }

    /// Appends only the header (it carries the payload's crc); the payload
    /// follows it on the wire as it is, without a copy.
    pub fn encode_header(&self, out: &mut BytesMut) -> Result<(), FrameError> {
        let header = header(
            self.kind,
            self.epoch,
            self.generation,
            &self.payload,
            PayloadCheck::Crc32,
        )?;
        out.extend_from_slice(&header);
        Ok(())
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), FrameError> {
        out.reserve(HEADER_LEN + self.payload.len());
        self.encode_header(out)?;
        out.put_slice(&self.payload);
        Ok(())
    }
}

/// The header of a frame of `kind` carrying `payload`, checked by `check`.
pub(crate) fn header(
    kind: FrameKind,
    epoch: u64,
    generation: u64,
    payload: &[u8],
    check: PayloadCheck,
) -> Result<[u8; HEADER_LEN], FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= kind.max_payload())
        .ok_or(FrameError::PayloadTooLarge(payload.len()))?;
    let mut h = [0u8; HEADER_LEN];
    h[0..2].copy_from_slice(&MAGIC);
    h[2] = VERSION;
    h[3] = kind.code();
    if check.crc32(kind) {
        h[4..8].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    }
    h[8..16].copy_from_slice(&epoch.to_le_bytes());
    h[16..24].copy_from_slice(&generation.to_le_bytes());
    h[24..28].copy_from_slice(&len.to_le_bytes());
    let crc = header_checksum(&h);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    Ok(h)
}

/// Splits a byte stream into checked frames.
#[derive(Debug, Default)]
pub struct FrameDecoder;

impl FrameDecoder {
    /// The next whole frame in `buf` (consumed), `None` if more bytes are
    /// needed. A malformed or corrupt frame is an error: the stream cannot
    /// be trusted past it, so the caller drops the connection.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        self.decode_within(buf, u32::MAX)
    }

    /// [`FrameDecoder::decode`], refusing any frame whose payload exceeds
    /// `cap` as well as its kind's own maximum (before authentication: a
    /// stranger must not make the link reserve a message's 64 MiB).
    pub fn decode_within(
        &mut self,
        buf: &mut BytesMut,
        cap: u32,
    ) -> Result<Option<Frame>, FrameError> {
        self.decode_checked(buf, cap, PayloadCheck::Crc32)
    }

    /// [`FrameDecoder::decode_within`] for a stream whose bytes were
    /// checked by `check`.
    pub(crate) fn decode_checked(
        &mut self,
        buf: &mut BytesMut,
        cap: u32,
        check: PayloadCheck,
    ) -> Result<Option<Frame>, FrameError> {
        let Some((kind, total)) = self.peek(buf, cap)? else {
            return Ok(None);
        };
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let epoch = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        let generation = u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes"));
        let len = total - HEADER_LEN;
        if check.crc32(kind) {
            let carried = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
            let computed = crc32fast::hash(&buf[HEADER_LEN..total]);
            if carried != computed {
                return Err(FrameError::Checksum {
                    epoch,
                    carried,
                    computed,
                });
            }
        }
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(len).freeze();
        Ok(Some(Frame {
            kind,
            epoch,
            generation,
            payload,
        }))
    }

    /// The kind and whole length (header and payload) of the frame that
    /// begins `buf`, once its header is there (checked, and its length
    /// within `cap` and its kind's maximum); the payload is not looked at.
    pub(crate) fn peek(
        &self,
        buf: &[u8],
        cap: u32,
    ) -> Result<Option<(FrameKind, usize)>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let magic = [buf[0], buf[1]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if buf[2] != VERSION {
            return Err(FrameError::Version(buf[2]));
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let carried = u32::from_le_bytes(buf[28..32].try_into().expect("4 bytes"));
        let computed = header_checksum(&buf[..HEADER_LEN]);
        if carried != computed {
            return Err(FrameError::HeaderChecksum { carried, computed });
        }
        let kind = FrameKind::try_from(buf[3])?;
        let len = u32::from_le_bytes(buf[24..28].try_into().expect("4 bytes"));
        let max = kind.max_payload().min(cap);
        if len > max {
            return Err(FrameError::TooLong { kind, len, max });
        }
        Ok(Some((kind, HEADER_LEN + len as usize)))
    }

    /// Called at the end of the stream: leftover bytes are a torn frame.
    pub fn finish(&self, buf: &BytesMut) -> Result<(), FrameError> {
        if buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated(buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(frames: &[Frame]) -> BytesMut {
        let mut out = BytesMut::new();
        for f in frames {
            f.encode(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn frames_round_trip_even_when_split_anywhere() {
        let frames = vec![
            Frame::message(70, 7, 3, vec![1, 2, 3]).unwrap(),
            Frame::message(71, 7, 3, vec![0xab; 9000]).unwrap(),
            Frame::message(72, 7, 3, Bytes::new()).unwrap(),
        ];
        let wire = encoded(&frames);
        for split in [1, 3, 23, 31, 32, 33, 4000, wire.len() - 1] {
            let mut dec = FrameDecoder;
            let mut buf = BytesMut::from(&wire[..split]);
            let mut got = Vec::new();
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(f);
            }
            buf.extend_from_slice(&wire[split..]);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(f);
            }
            assert_eq!(got, frames, "split at {split}");
            dec.finish(&buf).unwrap();
        }
    }

    /// Recomputes the header check after a test edited the header.
    fn reseal(wire: &mut BytesMut) {
        let crc = header_checksum(&wire[..HEADER_LEN]);
        wire[28..32].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn a_corrupted_length_is_refused_at_once() {
        // Before the header had its own check, a flipped high bit of the
        // length left the reader waiting for up to 64 MiB (absorbing later
        // frames, heartbeats included): every flip must fail at once.
        let wire = encoded(&[Frame::message(69, 3, 1, vec![5u8; 64]).unwrap()]);
        for bit in 0..32 {
            let mut bad = wire.clone();
            bad[24 + bit / 8] ^= 1 << (bit % 8);
            assert!(
                matches!(
                    FrameDecoder.decode(&mut bad),
                    Err(FrameError::HeaderChecksum { .. })
                ),
                "length bit {bit}"
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let wire = encoded(&[Frame::message(80, 3, 9, vec![5u8; 64]).unwrap()]);
        for byte in 0..wire.len() {
            for bit in 0..8 {
                let mut bad = wire.clone();
                bad[byte] ^= 1 << bit;
                // Refused at once: never a decoded frame, never a wait
                // for bytes a flipped length made up.
                match FrameDecoder.decode(&mut bad) {
                    Err(_) => {}
                    Ok(None) => panic!("flip of bit {bit} in byte {byte} left the reader waiting"),
                    Ok(Some(f)) => panic!("flip of bit {bit} in byte {byte} went unnoticed: {f:?}"),
                }
            }
        }
    }

    #[test]
    fn sealed_payloads_carry_no_crc_but_their_headers_are_still_checked() {
        let frame = Frame::message(70, 4, 2, vec![0x5a; 300]).unwrap();
        // A frame inside an opened stream: crc field 0, payload passed as
        // it is (its record's tag checked it).
        let h = header(
            frame.kind,
            frame.epoch,
            frame.generation,
            &frame.payload,
            PayloadCheck::Sealed,
        )
        .unwrap();
        assert_eq!(h[4..8], [0; 4]);
        let mut inner = BytesMut::from(&h[..]);
        inner.extend_from_slice(&frame.payload);
        let decoded = FrameDecoder
            .decode_checked(&mut inner.clone(), u32::MAX, PayloadCheck::Sealed)
            .unwrap();
        assert_eq!(decoded, Some(frame.clone()));
        // The same bytes on the wire of a plaintext link are refused.
        assert!(matches!(
            FrameDecoder.decode(&mut inner.clone()),
            Err(FrameError::Checksum { .. })
        ));
        // A flipped length is still refused at once inside the stream.
        inner[25] ^= 1;
        assert!(matches!(
            FrameDecoder.decode_checked(&mut inner, u32::MAX, PayloadCheck::Sealed),
            Err(FrameError::HeaderChecksum { .. })
        ));
        // A sealed record on the wire: no crc of its ciphertext, whose tag
        // is its check; its header check stays.
        let record = Frame::new(FrameKind::Sealed, 0, vec![0xc3; 100]);
        let mut wire = encoded(std::slice::from_ref(&record));
        assert_eq!(wire[4..8], [0; 4]);
        assert_eq!(FrameDecoder.decode(&mut wire.clone()), Ok(Some(record)));
        wire[3] = FrameKind::Heartbeat.code();
        assert!(matches!(
            FrameDecoder.decode(&mut wire),
            Err(FrameError::HeaderChecksum { .. })
        ));
    }

    #[test]
    fn malformed_and_torn_frames_are_refused() {
        let mut junk = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert_eq!(
            FrameDecoder.decode(&mut junk),
            Err(FrameError::BadMagic(*b"GE"))
        );
        let mut wire = encoded(&[Frame::new(FrameKind::Heartbeat, 1, Bytes::new())]);
        wire[2] = 9;
        assert_eq!(FrameDecoder.decode(&mut wire), Err(FrameError::Version(9)));
        let mut wire = encoded(&[Frame::new(FrameKind::Heartbeat, 1, Bytes::new())]);
        wire[3] = 20;
        reseal(&mut wire);
        assert_eq!(
            FrameDecoder.decode(&mut wire),
            Err(FrameError::UnknownKind(20))
        );
        assert_eq!(
            Frame::message(11, 1, 0, Bytes::new()),
            Err(FrameError::NotAMessageKind(11))
        );
        let mut wire = encoded(&[Frame::message(64, 1, 0, Bytes::new()).unwrap()]);
        wire[24..28].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        reseal(&mut wire);
        assert_eq!(
            FrameDecoder.decode(&mut wire),
            Err(FrameError::TooLong {
                kind: FrameKind::Message(64),
                len: MAX_PAYLOAD + 1,
                max: MAX_PAYLOAD
            })
        );
        // The link's own frames are small: a handshake frame announcing
        // 1 MiB is refused before anything is reserved for it.
        let mut wire = encoded(&[Frame::new(FrameKind::Hello, 0, vec![b'{'; 10])]);
        wire[24..28].copy_from_slice(&(1u32 << 20).to_le_bytes());
        reseal(&mut wire);
        assert!(matches!(
            FrameDecoder.decode(&mut wire),
            Err(FrameError::TooLong {
                kind: FrameKind::Hello,
                ..
            })
        ));
        assert_eq!(
            Frame::new(FrameKind::Heartbeat, 0, vec![1u8]).encode(&mut BytesMut::new()),
            Err(FrameError::PayloadTooLarge(1))
        );
        // A stream that stops inside a frame.
        let wire = encoded(&[Frame::message(64, 1, 0, vec![0u8; 100]).unwrap()]);
        let mut torn = BytesMut::from(&wire[..60]);
        assert_eq!(FrameDecoder.decode(&mut torn), Ok(None));
        assert_eq!(FrameDecoder.finish(&torn), Err(FrameError::Truncated(60)));
    }
}
