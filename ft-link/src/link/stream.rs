//! A link's byte stream in each direction, sealed or plaintext: frames in,
//! bytes for the socket out ([`Outbound`]); bytes from the socket in,
//! frames out ([`Inbound`]). See [`crate::seal`].

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};

use super::LinkError;
use crate::frame::{header, Frame, FrameDecoder, FrameKind, PayloadCheck, MAX_LINK_PAYLOAD};
use crate::seal::{Opener, Sealer};

/// What this side sends, as the bytes that go on the connection.
pub(super) struct Outbound {
    /// None on a plaintext link (and during a key exchange).
    pub sealer: Option<Sealer>,
    /// The bytes to write for the frame last encoded.
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
        let kind = frame.kind;
        let encode_err = |source| LinkError::Encode { peer, kind, source };
        self.tx.clear();
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
}

/// What arrived from the peer, and what it opened to.
pub(super) struct Inbound {
    /// None on a plaintext link (and during a key exchange).
    pub opener: Option<Opener>,
    /// Bytes as read from the connection.
    pub raw: BytesMut,
    /// The opened stream (sealed links).
    pub plain: BytesMut,
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
            if let Some(frame) = self
                .decoder
                .decode_checked(&mut self.plain, cap, PayloadCheck::Sealed)
                .map_err(corrupt)?
            {
                return Ok(Some(frame));
            }
            let Some(record) = self
                .decoder
                .decode_within(&mut self.raw, MAX_LINK_PAYLOAD)
                .map_err(corrupt)?
            else {
                return Ok(None);
            };
            if record.kind != FrameKind::Sealed {
                return Err(LinkError::NotSealed {
                    peer,
                    kind: record.kind,
                });
            }
            opener
                .open_into(&record.payload, &mut self.plain)
                .map_err(|source| LinkError::Unsealed { peer, source })?;
        }
    }

    /// Why the stream ended where it did: cleanly between frames, or
    /// inside one.
    pub(super) fn end_of_stream(&self, peer: SocketAddr) -> LinkError {
        let cut = self.decoder.finish(&self.raw).is_err()
            || (self.opener.is_some() && self.decoder.finish(&self.plain).is_err());
        if cut {
            LinkError::Truncated {
                peer,
                received: self.raw.len() + self.plain.len(),
            }
        } else {
            LinkError::PeerClosed { peer }
        }
    }
}
