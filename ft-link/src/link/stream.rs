//! A link's byte stream in each direction, sealed or plaintext: frames in,
//! bytes for the socket out ([`Outbound`]); bytes from the socket in,
//! frames out ([`Inbound`]). See [`crate::seal`].

use std::net::SocketAddr;

use bytes::{Buf, Bytes, BytesMut};

use super::LinkError;
use crate::frame::{
    header, Frame, FrameDecoder, FrameKind, PayloadCheck, HEADER_LEN, MAX_LINK_PAYLOAD,
};
use crate::seal::{Opener, Sealer};

/// Room made for what arrives next when a sealed link's records run out
/// (a few page frames' records).
const READ_AHEAD: usize = 1 << 20;

/// What this side sends, as the bytes that go on the connection.
pub(super) struct Outbound {
    /// None on a plaintext link (and during a key exchange).
    pub sealer: Option<Sealer>,
    /// The bytes to write for the frames last encoded (see
    /// [`Outbound::encode_all`]: what it prepared is written before it
    /// encodes again).
    pub tx: BytesMut,
}

/// How a frame goes on the wire.
pub(super) enum Encoded {
    /// All of it is in `tx`.
    Buffered,
    /// The header is in `tx`; the payload follows as it is (plaintext
    /// only: no copy of a large payload).
    Then(Bytes),
}

/// Payloads from this size on are written after their header without
/// being copied into the send buffer (plaintext links).
pub(super) const LARGE_PAYLOAD: usize = 16 << 10;

impl Outbound {
    pub(super) fn new(capacity: usize) -> Outbound {
        Outbound {
            sealer: None,
            tx: BytesMut::with_capacity(capacity),
        }
    }

    /// Prepares `frame` for the wire: `tx` holds what to write first.
    pub(super) fn encode(&mut self, peer: SocketAddr, frame: &Frame) -> Result<Encoded, LinkError> {
        self.tx.clear();
        self.encode_appending(peer, frame)
    }

    /// [`Outbound::encode`], after what `tx` holds already.
    fn encode_appending(&mut self, peer: SocketAddr, frame: &Frame) -> Result<Encoded, LinkError> {
        let kind = frame.kind;
        let encode_err = |source| LinkError::Encode { peer, kind, source };
        let Some(sealer) = self.sealer.as_mut() else {
            if frame.payload.len() < LARGE_PAYLOAD {
                frame.encode(&mut self.tx).map_err(encode_err)?;
                return Ok(Encoded::Buffered);
            }
            frame.encode_header(&mut self.tx).map_err(encode_err)?;
            return Ok(Encoded::Then(frame.payload.clone()));
        };
        let header = header(
            kind,
            frame.epoch,
            frame.generation,
            &frame.payload,
            PayloadCheck::Sealed,
        )
        .map_err(encode_err)?;
        sealer
            .seal_into(&[&header, &frame.payload], &mut self.tx)
            .map_err(|source| LinkError::Seal { peer, source })?;
        Ok(Encoded::Buffered)
    }

    /// Prepares `frames` for the wire as one write: `tx` holds them,
    /// `runs` says what to write in order (runs of `tx`, and on a
    /// plaintext link large payloads as they are, uncopied). On an error
    /// the frames before the failing one are in `runs` still: a sealed
    /// stream counts the records it sealed, so they must go out all the
    /// same.
    pub(super) fn encode_all(
        &mut self,
        peer: SocketAddr,
        frames: &[Frame],
        runs: &mut Vec<Run>,
    ) -> Result<(), LinkError> {
        self.tx.clear();
        let mut from = 0;
        let mut result = Ok(());
        for frame in frames {
            let at = self.tx.len();
            match self.encode_appending(peer, frame) {
                Ok(Encoded::Buffered) => {}
                Ok(Encoded::Then(payload)) => {
                    runs.push(Run::Buffered(from..self.tx.len()));
                    runs.push(Run::Payload(payload));
                    from = self.tx.len();
                }
                Err(error) => {
                    // A frame that failed took no nonce unless a record of
                    // it was sealed; those stay (see above).
                    if self.sealer.is_none() {
                        self.tx.truncate(at);
                    }
                    result = Err(error);
                    break;
                }
            }
        }
        if from < self.tx.len() {
            runs.push(Run::Buffered(from..self.tx.len()));
        }
        result
    }

    /// The bytes `run` stands for.
    pub(super) fn bytes<'a>(&'a self, run: &'a Run) -> &'a [u8] {
        match run {
            Run::Buffered(range) => &self.tx[range.clone()],
            Run::Payload(payload) => payload,
        }
    }
}

/// A piece of what [`Outbound::encode_all`] prepared.
pub(super) enum Run {
    /// These bytes of the send buffer.
    Buffered(std::ops::Range<usize>),
    /// A large plaintext payload, after its header.
    Payload(Bytes),
}

/// What arrived from the peer, and what it opened to.
///
/// On a sealed link `raw` holds the records not yet opened. Each is opened
/// where it lies and its plaintext appended to `plain`, the opened stream,
/// from which the frames are taken. `raw` is never shared (no frame points
/// into it), so it keeps its memory: only the part of a record that ends
/// it is moved, to its front, when it runs out of room. A frame's room in
/// `plain` is made once, when its first record is opened (a frame begins a
/// record, as this side's sealer cuts them), so that its opened bytes are
/// not moved again while it grows.
pub(super) struct Inbound {
    /// None on a plaintext link (and during a key exchange).
    pub opener: Option<Opener>,
    /// Bytes as read from the connection: the frames of a plaintext link,
    /// the records of a sealed one.
    pub raw: BytesMut,
    /// Sealed links: opened bytes not yet taken as frames.
    plain: BytesMut,
    decoder: FrameDecoder,
}

impl Inbound {
    pub(super) fn new(raw: BytesMut) -> Inbound {
        Inbound {
            opener: None,
            raw,
            plain: BytesMut::new(),
            decoder: FrameDecoder,
        }
    }

    /// The next whole frame of the stream (heartbeats included) whose
    /// payload is at most `cap`; None while more bytes are needed. On a
    /// sealed link, a frame that is not a sealed record (a plaintext frame
    /// injected into the stream) or a record that does not open ends it.
    pub(super) fn next_frame(
        &mut self,
        peer: SocketAddr,
        cap: u32,
    ) -> Result<Option<Frame>, LinkError> {
        let corrupt = |source| LinkError::Corrupt { peer, source };
        let Some(opener) = self.opener.as_mut() else {
            return self
                .decoder
                .decode_within(&mut self.raw, cap)
                .map_err(corrupt);
        };
        loop {
            // A whole frame among the opened bytes.
            if let Some((_, total)) = self.decoder.peek(&self.plain, cap).map_err(corrupt)? {
                if total <= self.plain.len() {
                    let mut whole = self.plain.split_to(total);
                    let frame = self
                        .decoder
                        .decode_checked(&mut whole, cap, PayloadCheck::Sealed)
                        .map_err(corrupt)?
                        .expect("the frame is whole");
                    return Ok(Some(frame));
                }
            }
            // The next record, opened where it lies.
            let have = self.raw.len();
            let Some((kind, total)) = self
                .decoder
                .peek(&self.raw, MAX_LINK_PAYLOAD)
                .map_err(corrupt)?
            else {
                self.raw.reserve(READ_AHEAD);
                return Ok(None);
            };
            if kind != FrameKind::Sealed {
                return Err(LinkError::NotSealed { peer, kind });
            }
            if have < total {
                self.raw.reserve((total - have).max(READ_AHEAD));
                return Ok(None);
            }
            let len = opener
                .open_in_place(&mut self.raw[HEADER_LEN..total])
                .map_err(|source| LinkError::Unsealed { peer, source })?;
            let opened = &self.raw[HEADER_LEN..HEADER_LEN + len];
            if self.plain.is_empty() {
                let frame = self.decoder.peek(opened, cap).map_err(corrupt)?;
                self.plain
                    .reserve(frame.map_or(0, |(_, total)| total).max(len));
            }
            self.plain.extend_from_slice(opened);
            self.raw.advance(total);
        }
    }

    /// Why the stream ended where it did: cleanly between frames, or
    /// inside one.
    pub(super) fn end_of_stream(&self, peer: SocketAddr) -> LinkError {
        let received = self.plain.len() + self.raw.len();
        if received > 0 {
            LinkError::Truncated { peer, received }
        } else {
            LinkError::PeerClosed { peer }
        }
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;
    use crate::auth::{PairSecret, Side};
    use crate::seal::KeyExchange;
    pub use crate::seal::RECORD_PLAIN_MAX;

    pub fn peer() -> SocketAddr {
        "192.0.2.1:7000".parse().unwrap()
    }

    /// A sealer and the peer's opener for it.
    pub fn keys() -> (Sealer, Opener) {
        let secret = || PairSecret::new(b"pair-secret-0123456789-abcdefgh".to_vec()).unwrap();
        let mut connecting = KeyExchange::new(&secret(), Side::Connecting).unwrap();
        let mut accepting = KeyExchange::new(&secret(), Side::Accepting).unwrap();
        accepting.read(&connecting.write().unwrap()).unwrap();
        connecting.read(&accepting.write().unwrap()).unwrap();
        let ((sealer, _), (_, opener)) =
            (connecting.finish().unwrap(), accepting.finish().unwrap());
        (sealer, opener)
    }

    /// Frames whose records end on, just past and far from their
    /// frames' ends (a record holds `RECORD_PLAIN_MAX` bytes).
    pub fn frames() -> Vec<Frame> {
        let one_record = RECORD_PLAIN_MAX - HEADER_LEN;
        [0, 16, one_record, one_record + 1, 256 << 10, 3]
            .iter()
            .enumerate()
            .map(|(n, &len)| {
                let payload: Vec<u8> = (0..len).map(|i| (i * 7 + n) as u8).collect();
                Frame::message(64 + n as u8, n as u64, 1, payload).unwrap()
            })
            .collect()
    }

    /// The bytes a sealed link puts on the wire for `frames`.
    pub fn sealed(sealer: Sealer, frames: &[Frame]) -> Vec<u8> {
        let mut out = Outbound::new(0);
        out.sealer = Some(sealer);
        let mut wire = Vec::new();
        for frame in frames {
            match out.encode(peer(), frame).unwrap() {
                Encoded::Buffered => wire.extend_from_slice(&out.tx),
                Encoded::Then(_) => panic!("a sealed link buffers every frame"),
            }
        }
        wire
    }

    /// Feeds `wire` to a sealed inbound stream `piece` bytes at a time;
    /// returns the frames it gave and how it ended.
    pub fn feed(opener: Opener, wire: &[u8], piece: usize) -> (Vec<Frame>, Result<(), LinkError>) {
        let mut inbound = Inbound::new(BytesMut::new());
        inbound.opener = Some(opener);
        let mut got = Vec::new();
        for chunk in wire.chunks(piece) {
            inbound.raw.extend_from_slice(chunk);
            loop {
                match inbound.next_frame(peer(), u32::MAX) {
                    Ok(Some(frame)) => got.push(frame),
                    Ok(None) => break,
                    Err(error) => return (got, Err(error)),
                }
            }
        }
        (got, Err(inbound.end_of_stream(peer())))
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;

    #[test]
    fn sealed_frames_come_out_whole_and_in_order_however_the_bytes_arrive() {
        for piece in [1, 7, 4096, RECORD_PLAIN_MAX + 1, usize::MAX] {
            let (sealer, opener) = keys();
            let frames = frames();
            let wire = sealed(sealer, &frames);
            let (got, end) = feed(opener, &wire, piece.min(wire.len()));
            assert_eq!(got, frames, "fed {piece} bytes at a time");
            assert!(
                matches!(end, Err(LinkError::PeerClosed { .. })),
                "a clean end, fed {piece} bytes at a time: {end:?}"
            );
        }
    }

    /// A peer that cuts its stream into records anywhere (inside frames,
    /// frame headers included, several frames in one): the frames still
    /// come out whole and in order.
    #[test]
    fn frames_cut_into_records_anywhere_come_out_whole() {
        let (mut sealer, opener) = keys();
        let frames = frames();
        // Encoded as sealed frames' plaintext: the opened stream checks
        // frames by the records' tags, with a zero crc field.
        let mut stream = BytesMut::new();
        for frame in &frames {
            let head = header(
                frame.kind,
                frame.epoch,
                frame.generation,
                &frame.payload,
                PayloadCheck::Sealed,
            )
            .unwrap();
            stream.extend_from_slice(&head);
            stream.extend_from_slice(&frame.payload);
        }
        let mut wire = BytesMut::new();
        let mut at = 0;
        let mut cut = 0usize;
        let mut records = 0;
        while at < stream.len() {
            // Mostly small records, some large.
            cut = if records % 1000 == 999 {
                RECORD_PLAIN_MAX
            } else {
                (cut * 7 + 31) % 200 + 1
            };
            records += 1;
            let end = (at + cut).min(stream.len());
            sealer.seal_into(&[&stream[at..end]], &mut wire).unwrap();
            at = end;
        }
        assert!(records > 1000, "{records} records");
        let (got, end) = feed(opener, &wire, 4096);
        assert_eq!(got, frames);
        assert!(matches!(end, Err(LinkError::PeerClosed { .. })), "{end:?}");
    }

    #[test]
    fn an_altered_record_ends_the_stream_and_nothing_of_its_frame_comes_out() {
        let frames = frames();
        let first_frame_end = sealed(keys().0, &frames[..1]).len();
        let big_frame_start = sealed(keys().0, &frames[..4]).len();
        // Within the first frame's record, and within the second record of
        // the 256 KiB frame (its first record opened fine).
        for at in [
            first_frame_end - 1,
            big_frame_start + HEADER_LEN + RECORD_PLAIN_MAX + 100,
        ] {
            let (sealer, opener) = keys();
            let mut wire = sealed(sealer, &frames);
            wire[at] ^= 0x01;
            let (got, end) = feed(opener, &wire, 4096);
            assert!(
                matches!(end, Err(LinkError::Unsealed { .. })),
                "byte {at} altered: {end:?}"
            );
            let whole_before = frames.iter().take(got.len()).cloned().collect::<Vec<_>>();
            assert_eq!(got, whole_before, "byte {at} altered");
            let altered_frame = if at < first_frame_end { 0 } else { 4 };
            assert_eq!(got.len(), altered_frame, "byte {at} altered");
        }
        // Cut short inside a frame: what came before it, then a torn end.
        let (sealer, opener) = keys();
        let wire = sealed(sealer, &frames);
        let (got, end) = feed(opener, &wire[..wire.len() - 10], 4096);
        assert_eq!(got, frames[..frames.len() - 1]);
        assert!(matches!(end, Err(LinkError::Truncated { .. })), "{end:?}");
    }
}
