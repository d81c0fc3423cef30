//! Cutting a relayed byte stream into whole A-link frames, without
//! changing a byte.
//!
//! Only the header is read (see [`ft_link::frame`] for its layout): its
//! magic, version and own check, then the payload length, which gives the
//! frame's end. The payload's checksum is not verified: a frame is relayed
//! as it came, and judging it is the receiver's business.
//!
//! A stream that is not (or stops being) a stream of frames, such as a
//! header that fails its check, is passed on unframed, as it comes, from
//! that point to its end: trusting a corrupted length would have the relay
//! hold megabytes of later bytes that the receiver should see (and refuse)
//! at once.

use bytes::{Bytes, BytesMut};
use ft_link::frame::{HEADER_LEN, MAGIC, MAX_PAYLOAD, VERSION};

/// Offsets of the header fields the relay reads or reports.
const KIND_AT: usize = 3;
const PAYLOAD_CHECK_AT: usize = 4;
const EPOCH_AT: usize = 8;
const LEN_AT: usize = 24;
const HEADER_CHECK_AT: usize = 28;

/// Why a stream cannot be cut into frames (from where it was found on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not an A-link frame (magic {0:02x?})")]
    BadMagic([u8; 2]),
    #[error("frame version {0}, not {VERSION}")]
    Version(u8),
    #[error("a frame header failed its check (carried {carried:08x}, computed {computed:08x})")]
    HeaderChecksum { carried: u32, computed: u32 },
    #[error("a frame header announces {0} bytes of payload, more than any frame carries")]
    TooLong(u32),
}

/// A piece of the stream to pass on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// One whole frame, header and payload, exactly as received.
    Frame(Bytes),
    /// Bytes of a stream that cannot be cut into frames.
    Unframed(Bytes),
}

/// The kind byte of a whole frame (as on the wire).
pub fn kind_code(frame: &[u8]) -> u8 {
    frame[KIND_AT]
}

/// The epoch a whole frame carries.
pub fn epoch(frame: &[u8]) -> u64 {
    u64::from_le_bytes(frame[EPOCH_AT..EPOCH_AT + 8].try_into().expect("8 bytes"))
}

/// Computes a whole frame's two checks again (the payload's CRC, then the
/// header's own), after a change to its bytes.
pub fn recompute_checks(frame: &mut [u8]) {
    let payload_crc = crc32fast::hash(&frame[HEADER_LEN..]);
    frame[PAYLOAD_CHECK_AT..PAYLOAD_CHECK_AT + 4].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&frame[..HEADER_CHECK_AT]);
    frame[HEADER_CHECK_AT..HEADER_CHECK_AT + 4].copy_from_slice(&header_crc.to_le_bytes());
}

/// The length of the frame that starts `buf` (header included), `None`
/// while more bytes are needed to know it.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    if buf.len() >= MAGIC.len() && buf[..MAGIC.len()] != MAGIC {
        return Err(WireError::BadMagic([buf[0], buf[1]]));
    }
    if buf.len() > 2 && buf[2] != VERSION {
        return Err(WireError::Version(buf[2]));
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let carried = u32::from_le_bytes(
        buf[HEADER_CHECK_AT..HEADER_LEN]
            .try_into()
            .expect("4 bytes"),
    );
    let computed = crc32fast::hash(&buf[..HEADER_CHECK_AT]);
    if carried != computed {
        return Err(WireError::HeaderChecksum { carried, computed });
    }
    let len = u32::from_le_bytes(buf[LEN_AT..LEN_AT + 4].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLong(len));
    }
    Ok(Some(HEADER_LEN + len as usize))
}

/// Cuts one direction's byte stream into [`Piece`]s.
#[derive(Debug, Default)]
pub struct FrameSplitter {
    buf: BytesMut,
    /// Set once the stream could not be cut: everything after goes on as
    /// it comes.
    unframed: Option<WireError>,
}

impl FrameSplitter {
    /// Where received bytes go.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Why the stream is passed on unframed, if it is.
    pub fn unframed(&self) -> Option<&WireError> {
        self.unframed.as_ref()
    }

    /// The next piece in the buffer, `None` when more bytes are needed.
    /// The error comes once, when the stream turns out not to be frames:
    /// from then on every byte comes as [`Piece::Unframed`].
    pub fn next_piece(&mut self) -> Result<Option<Piece>, WireError> {
        if self.unframed.is_some() {
            return Ok((!self.buf.is_empty()).then(|| Piece::Unframed(self.buf.split().freeze())));
        }
        match frame_len(&self.buf) {
            Ok(Some(total)) if self.buf.len() >= total => {
                Ok(Some(Piece::Frame(self.buf.split_to(total).freeze())))
            }
            Ok(Some(total)) => {
                self.buf.reserve(total - self.buf.len());
                Ok(None)
            }
            Ok(None) => Ok(None),
            Err(error) => {
                self.unframed = Some(error.clone());
                Err(error)
            }
        }
    }

    /// At the end of the stream: what is left (a frame cut short), to pass
    /// on as it is.
    pub fn finish(&mut self) -> Option<Bytes> {
        (!self.buf.is_empty()).then(|| self.buf.split().freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ft_link::{Frame, FrameKind};

    fn wire(frames: &[Frame]) -> BytesMut {
        let mut out = BytesMut::new();
        for f in frames {
            f.encode(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn a_rewritten_frame_passes_both_checks_with_the_changed_byte() {
        let frame = Frame::message(69, 7, 1, vec![0x11u8; 100]).unwrap();
        let mut bytes = wire(&[frame]);
        bytes[HEADER_LEN + 40] ^= 0x80;
        assert!(ft_link::FrameDecoder.decode(&mut bytes.clone()).is_err());
        recompute_checks(&mut bytes);
        let got = ft_link::FrameDecoder.decode(&mut bytes).unwrap().unwrap();
        assert_eq!(got.payload[40], 0x91);
        assert_eq!((got.epoch, got.generation), (7, 1));
    }

    fn frames() -> Vec<Frame> {
        vec![
            Frame::new(FrameKind::Heartbeat, 0, Bytes::new()),
            Frame::message(71, 9, 2, vec![7u8; 24]).unwrap(),
            Frame::message(69, 9, 2, vec![1u8; 70_000]).unwrap(),
        ]
    }

    #[test]
    fn a_stream_split_anywhere_comes_out_as_its_frames_byte_for_byte() {
        let frames = frames();
        let stream = wire(&frames);
        for chunk in [1, 5, 31, 32, 33, 1000, stream.len()] {
            let mut splitter = FrameSplitter::default();
            let mut out = Vec::new();
            for part in stream.chunks(chunk) {
                splitter.buffer().extend_from_slice(part);
                while let Some(piece) = splitter.next_piece().unwrap() {
                    out.push(piece);
                }
            }
            assert_eq!(splitter.finish(), None);
            let expected: Vec<Piece> = frames
                .iter()
                .map(|f| Piece::Frame(wire(std::slice::from_ref(f)).freeze()))
                .collect();
            assert_eq!(out, expected, "chunks of {chunk}");
        }
        let end = wire(&frames[1..2]);
        assert_eq!((kind_code(&end), epoch(&end)), (71, 9));
    }

    #[test]
    fn a_stream_that_is_not_frames_passes_unframed_from_where_it_stops_being_frames() {
        let mut stream = wire(&frames()[..2]);
        let mut bad = wire(&frames()[2..]);
        bad[27] ^= 0x01; // the length's high byte: 16 MiB more announced
        stream.extend_from_slice(&bad);
        let mut splitter = FrameSplitter::default();
        splitter.buffer().extend_from_slice(&stream);
        assert!(matches!(splitter.next_piece(), Ok(Some(Piece::Frame(_)))));
        assert!(matches!(splitter.next_piece(), Ok(Some(Piece::Frame(_)))));
        assert!(matches!(
            splitter.next_piece(),
            Err(WireError::HeaderChecksum { .. })
        ));
        assert_eq!(
            splitter.next_piece(),
            Ok(Some(Piece::Unframed(bad.freeze())))
        );
        splitter.buffer().extend_from_slice(b"more");
        assert_eq!(
            splitter.next_piece(),
            Ok(Some(Piece::Unframed(Bytes::from_static(b"more"))))
        );

        let mut http = FrameSplitter::default();
        http.buffer().extend_from_slice(b"GE");
        assert_eq!(http.next_piece(), Err(WireError::BadMagic(*b"GE")));
    }

    #[test]
    fn a_torn_frame_is_left_for_the_end() {
        let stream = wire(&frames()[2..]);
        let mut splitter = FrameSplitter::default();
        splitter.buffer().extend_from_slice(&stream[..100]);
        assert_eq!(splitter.next_piece(), Ok(None));
        assert_eq!(splitter.finish().unwrap(), &stream[..100]);
    }
}
