//! Sealing: the A-link authenticated and encrypted after its first two
//! frames.
//!
//! A link opens with a key exchange of the Noise protocol framework
//! ([`NOISE_PARAMS`], through the `snow` crate): `NNpsk0` with a
//! pre-shared key derived from the pair secret ([`crate::auth`]), so that
//! only the two nodes of the pair complete it, and fresh ephemeral keys on
//! both sides, so that every link has keys of its own (a recording of one
//! link is worth nothing on the next, nor after the pair secret leaks).
//! The two messages travel as [`FrameKind::KeyExchange`] frames; a peer
//! without the pair secret fails at the first one.
//!
//! Everything after it (the rest of the handshake, then the frames of the
//! carried protocol) is one byte stream cut into sealed records: each is a
//! [`FrameKind::Sealed`] frame whose payload is the ciphertext of at most
//! [`RECORD_PLAIN_MAX`] bytes of the stream under AES-256-GCM, with a
//! nonce that counts the records of its direction. A record altered,
//! replayed, reordered, dropped or forged does not open: the link ends.
//! A record's header keeps its own check (line noise in a length is
//! refused at once, as on a plaintext link), but neither the record's
//! payload nor the frames inside the stream carry a payload crc32: the tag
//! covers every byte, so a crc would only repeat a stronger check at a
//! pass over every byte on each side (see [`crate::frame`]).

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use bytes::{BufMut, BytesMut};
use snow::HandshakeState;
use zeroize::Zeroizing;

use crate::auth::{seal_psk, PairSecret, Side};
use crate::frame::{header, FrameError, FrameKind, PayloadCheck, HEADER_LEN};

/// The Noise protocol of the key exchange and of the records.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Bound into the key exchange: a peer speaking another version of this
/// link does not complete it.
const PROLOGUE: &[u8] = b"ft-link A-link v1 sealed";
/// A Noise message is at most 65535 bytes, its tag included.
const RECORD_MAX: usize = 65535;
const TAG_LEN: usize = 16;
/// What a record adds to its plaintext besides its frame header.
pub const RECORD_OVERHEAD: usize = TAG_LEN;
/// The most plaintext one record carries.
pub const RECORD_PLAIN_MAX: usize = RECORD_MAX - TAG_LEN;

/// How the frames after the handshake's first step travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protection {
    /// Authenticated and encrypted (the default).
    #[default]
    Sealed,
    /// In the clear, checked by CRCs only: for a dedicated cable between
    /// the two nodes, by explicit choice on both.
    Plaintext,
}

impl Protection {
    /// As in "the peer runs the A-link {name}".
    pub fn name(self) -> &'static str {
        match self {
            Protection::Sealed => "sealed",
            Protection::Plaintext => "in plaintext",
        }
    }

    /// What the status shows.
    pub fn describe(self) -> &'static str {
        match self {
            Protection::Sealed => "sealed (Noise NNpsk0, X25519, AES-256-GCM)",
            Protection::Plaintext => "plaintext (CRC only; chosen for a dedicated cable)",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the key exchange ({NOISE_PARAMS}) could not be set up")]
    Setup(#[source] snow::Error),
    #[error(
        "the key exchange failed: the peer does not hold the pair secret, or its message was \
         altered"
    )]
    KeyExchange(#[source] snow::Error),
    #[error("the key exchange ended in a state that carries no keys")]
    NoKeys(#[source] snow::Error),
    #[error("sealing record {nonce} failed")]
    Seal { nonce: u64 },
    #[error(
        "sealed record {nonce} ({len} bytes) did not open: it was altered, replayed, reordered \
         or forged"
    )]
    Open { nonce: u64, len: usize },
    #[error("a sealed record cannot carry {0} bytes")]
    Record(#[source] FrameError),
}

/// One side's key exchange, from its first message to its keys.
pub struct KeyExchange {
    side: Side,
    state: HandshakeState,
}

impl KeyExchange {
    /// The connecting side starts the exchange (Noise's initiator).
    pub fn new(secret: &PairSecret, side: Side) -> Result<KeyExchange, SealError> {
        let psk = seal_psk(secret);
        let params = NOISE_PARAMS
            .parse()
            .map_err(|e: snow::Error| SealError::Setup(e))?;
        let builder = snow::Builder::new(params)
            .prologue(PROLOGUE)
            .map_err(SealError::Setup)?
            .psk(0, &psk)
            .map_err(SealError::Setup)?;
        let state = match side {
            Side::Connecting => builder.build_initiator(),
            Side::Accepting => builder.build_responder(),
        }
        .map_err(SealError::Setup)?;
        Ok(KeyExchange { side, state })
    }

    /// This side's next message (the connecting side's first, or the
    /// accepting side's answer).
    pub fn write(&mut self) -> Result<Vec<u8>, SealError> {
        let mut message = vec![0u8; RECORD_MAX];
        let n = self
            .state
            .write_message(&[], &mut message)
            .map_err(SealError::KeyExchange)?;
        message.truncate(n);
        Ok(message)
    }

    /// The peer's message.
    pub fn read(&mut self, message: &[u8]) -> Result<(), SealError> {
        let mut payload = vec![0u8; RECORD_MAX];
        self.state
            .read_message(message, &mut payload)
            .map_err(SealError::KeyExchange)?;
        Ok(())
    }

    /// The keys, once both messages went: a sealer for this side's
    /// direction and an opener for the peer's.
    ///
    /// The records are Noise transport messages, sealed and opened here
    /// with the split's keys (AES-256-GCM as snow's own transport seals it:
    /// the nonce is four zero bytes and the record's number, big endian; no
    /// associated data), through AWS-LC (`aws-lc-rs`, whose AES-GCM runs
    /// about twice as fast as ring's where the CPU has VAES and AVX-512),
    /// and in place in the link's buffers:
    /// snow's transport copies every byte into a zeroed buffer of its own
    /// first, two passes over every byte on each side that the link does
    /// not need. The records are the same on the wire (a test seals with
    /// one and opens with the other, both ways).
    pub fn finish(mut self) -> Result<(Sealer, Opener), SealError> {
        if !self.state.is_handshake_finished() {
            return Err(SealError::NoKeys(snow::Error::State(
                snow::error::StateProblem::HandshakeNotFinished,
            )));
        }
        // The raw keys are wiped when dropped (AWS-LC keeps its own
        // expanded form, which it zeroes when it frees it; snow does not
        // wipe its copies).
        let (initiator, responder) = self.state.dangerously_get_raw_split();
        let (initiator, responder) = (Zeroizing::new(initiator), Zeroizing::new(responder));
        let (initiator, responder) = (record_key(&initiator)?, record_key(&responder)?);
        let (seal, open) = match self.side {
            Side::Connecting => (initiator, responder),
            Side::Accepting => (responder, initiator),
        };
        Ok((
            Sealer { key: seal, next: 0 },
            Opener {
                key: open,
                next: 0,
                side: self.side,
            },
        ))
    }
}

/// One direction's AES-256-GCM key.
fn record_key(raw: &[u8; 32]) -> Result<LessSafeKey, SealError> {
    UnboundKey::new(&aead::AES_256_GCM, raw)
        .map(LessSafeKey::new)
        .map_err(|_| SealError::NoKeys(snow::Error::Input))
}

/// The nonce of record `number` (Noise's AESGCM nonce).
fn nonce(number: u64) -> Nonce {
    let mut bytes = [0u8; NONCE_LEN];
    bytes[4..].copy_from_slice(&number.to_be_bytes());
    Nonce::assume_unique_for_key(bytes)
}

/// Seals this side's byte stream into records. After an error it is done
/// with: its stream has a gap (the link ends).
pub struct Sealer {
    key: LessSafeKey,
    /// The next record's number (its nonce).
    next: u64,
}

impl Sealer {
    /// Appends to `out` the records (whole [`FrameKind::Sealed`] frames)
    /// that carry `parts`, one after the other, as one piece of the
    /// stream. Each record's plaintext is gathered where its ciphertext
    /// goes and sealed there.
    pub fn seal_into(&mut self, parts: &[&[u8]], out: &mut BytesMut) -> Result<(), SealError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let records = total.div_ceil(RECORD_PLAIN_MAX);
        out.reserve(total + records * (HEADER_LEN + TAG_LEN));
        let mut pending = parts.iter().copied().filter(|p| !p.is_empty());
        let mut current: &[u8] = pending.next().unwrap_or(&[]);
        let mut left = total;
        while left > 0 {
            let size = left.min(RECORD_PLAIN_MAX);
            left -= size;
            let start = out.len();
            out.put_bytes(0, HEADER_LEN);
            let mut gathered = 0;
            while gathered < size {
                if current.is_empty() {
                    current = pending.next().expect("the parts hold `total` bytes");
                }
                let take = (size - gathered).min(current.len());
                out.extend_from_slice(&current[..take]);
                current = &current[take..];
                gathered += take;
            }
            if let Err(e) = self.seal_record(out, start) {
                out.truncate(start);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Seals, in place, the record whose header starts at `start` of `out`
    /// and whose plaintext runs to its end; appends the tag and fills in
    /// the header.
    fn seal_record(&mut self, out: &mut BytesMut, start: usize) -> Result<(), SealError> {
        let number = self.next;
        let refused = || SealError::Seal { nonce: number };
        // Noise ends a transport at the last nonce; no link gets near it.
        if number == u64::MAX {
            return Err(refused());
        }
        let body = start + HEADER_LEN;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(number), Aad::empty(), &mut out[body..])
            .map_err(|_| refused())?;
        out.extend_from_slice(tag.as_ref());
        let header = header(FrameKind::Sealed, 0, 0, &out[body..], PayloadCheck::Crc32)
            .map_err(SealError::Record)?;
        out[start..body].copy_from_slice(&header);
        self.next += 1;
        Ok(())
    }
}

/// Opens the peer's records, in order.
pub struct Opener {
    key: LessSafeKey,
    /// The number (nonce) the next record must have been sealed with.
    next: u64,
    side: Side,
}

impl Opener {
    /// Opens one record (a [`FrameKind::Sealed`] frame's payload) and
    /// appends its plaintext to `plain` (the record is copied there and
    /// opened in place). The link opens records where they lie
    /// ([`Opener::open_in_place`]); this is the tests' way.
    #[cfg(test)]
    pub fn open_into(&mut self, record: &[u8], plain: &mut BytesMut) -> Result<(), SealError> {
        let start = plain.len();
        plain.extend_from_slice(record);
        match self.open_in_place(&mut plain[start..]) {
            Ok(len) => {
                plain.truncate(start + len);
                Ok(())
            }
            Err(error) => {
                plain.truncate(start);
                Err(error)
            }
        }
    }

    /// Opens the record whose ciphertext and tag fill `record` (a
    /// [`FrameKind::Sealed`] frame's payload) where it lies: its plaintext
    /// is then the start of `record`; returns the plaintext's length. On a
    /// refusal the bytes of `record` are unspecified, and nothing of them
    /// may be used.
    pub fn open_in_place(&mut self, record: &mut [u8]) -> Result<usize, SealError> {
        let number = self.next;
        let len = record.len();
        let refused = SealError::Open { nonce: number, len };
        // Noise ends a transport at the last nonce, as the sealer does.
        if !(TAG_LEN..=RECORD_MAX).contains(&len) || number == u64::MAX {
            return Err(refused);
        }
        let (ciphertext, tag) = record.split_at_mut(len - TAG_LEN);
        match self
            .key
            .open_in_place_separate_tag(nonce(number), Aad::empty(), tag, ciphertext)
        {
            Ok(opened) => {
                let len = opened.len();
                self.next += 1;
                Ok(len)
            }
            Err(_) => {
                tracing::debug!(side = %self.side, nonce = number, "a sealed record did not open");
                Err(refused)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frame, FrameDecoder};

    fn secret(s: &[u8]) -> PairSecret {
        PairSecret::new(s.to_vec()).unwrap()
    }

    /// One side's keys.
    type Keys = (Sealer, Opener);

    /// Both sides' keys, after the two messages.
    fn exchanged(a: &PairSecret, b: &PairSecret) -> Result<(Keys, Keys), SealError> {
        let mut connecting = KeyExchange::new(a, Side::Connecting)?;
        let mut accepting = KeyExchange::new(b, Side::Accepting)?;
        accepting.read(&connecting.write()?)?;
        connecting.read(&accepting.write()?)?;
        Ok((connecting.finish()?, accepting.finish()?))
    }

    const SECRET: &[u8] = b"pair-secret-0123456789-abcdefgh";

    /// Every record of `sealed`, opened in order into one stream.
    fn open_all(opener: &mut Opener, mut sealed: BytesMut) -> Result<BytesMut, SealError> {
        let mut plain = BytesMut::new();
        while let Some(frame) = FrameDecoder.decode(&mut sealed).unwrap() {
            assert_eq!(frame.kind, FrameKind::Sealed);
            opener.open_into(&frame.payload, &mut plain)?;
        }
        assert!(sealed.is_empty());
        Ok(plain)
    }

    #[test]
    fn a_stream_in_parts_of_every_size_opens_as_it_was_sealed() {
        let ((mut seal, _), (_, mut open)) = exchanged(&secret(SECRET), &secret(SECRET)).unwrap();
        let big: Vec<u8> = (0..3 * RECORD_PLAIN_MAX + 17)
            .map(|i| (i * 7) as u8)
            .collect();
        for cut in [
            0,
            1,
            32,
            RECORD_PLAIN_MAX - 1,
            RECORD_PLAIN_MAX,
            RECORD_PLAIN_MAX + 5,
        ] {
            let (a, b) = big.split_at(cut);
            let mut out = BytesMut::new();
            seal.seal_into(&[a, &[], b], &mut out).unwrap();
            let plain = open_all(&mut open, out).unwrap();
            assert_eq!(&plain[..], &big[..], "cut at {cut}");
        }
    }

    /// The records are Noise transport messages: snow's own transport
    /// opens what the sealer seals, and the opener opens what snow's
    /// transport seals (so nodes that seal either way pair).
    #[test]
    fn records_are_the_noise_transport_messages_of_snow_both_ways() {
        for snow_is in [Side::Connecting, Side::Accepting] {
            let mut connecting = KeyExchange::new(&secret(SECRET), Side::Connecting).unwrap();
            let mut accepting = KeyExchange::new(&secret(SECRET), Side::Accepting).unwrap();
            accepting.read(&connecting.write().unwrap()).unwrap();
            connecting.read(&accepting.write().unwrap()).unwrap();
            let (snow_side, ours) = match snow_is {
                Side::Connecting => (connecting, accepting),
                Side::Accepting => (accepting, connecting),
            };
            let snow_side = snow_side.state.into_stateless_transport_mode().unwrap();
            let (mut seal, mut open) = ours.finish().unwrap();
            exchange_with_snow(&snow_side, &mut seal, &mut open);
        }
    }

    /// Records both ways between snow's transport and ours.
    fn exchange_with_snow(
        snow_side: &snow::StatelessTransportState,
        seal: &mut Sealer,
        open: &mut Opener,
    ) {
        for (n, text) in [&b"from snow's side"[..], &[7u8; 3000][..]]
            .into_iter()
            .enumerate()
        {
            let mut record = vec![0u8; text.len() + TAG_LEN];
            let len = snow_side
                .write_message(n as u64, text, &mut record)
                .unwrap();
            let mut plain = BytesMut::new();
            open.open_into(&record[..len], &mut plain).unwrap();
            assert_eq!(&plain[..], text);
        }
        for (n, text) in [&b"from our side"[..], &[9u8; 5000][..]]
            .into_iter()
            .enumerate()
        {
            let mut out = BytesMut::new();
            seal.seal_into(&[text], &mut out).unwrap();
            let record = FrameDecoder.decode(&mut out).unwrap().unwrap();
            let mut plain = vec![0u8; record.payload.len()];
            let len = snow_side
                .read_message(n as u64, &record.payload, &mut plain)
                .unwrap();
            assert_eq!(&plain[..len], text);
        }
    }

    #[test]
    fn the_ciphertext_does_not_contain_the_plaintext() {
        let ((mut seal, _), _) = exchanged(&secret(SECRET), &secret(SECRET)).unwrap();
        let known = b"a string the guest wrote in its memory";
        let mut out = BytesMut::new();
        seal.seal_into(&[known], &mut out).unwrap();
        assert!(!out.windows(known.len()).any(|w| w == known));
    }

    #[test]
    fn a_wrong_pair_secret_fails_the_key_exchange() {
        let err = exchanged(
            &secret(SECRET),
            &secret(b"another-secret-0123456789-abcdef"),
        )
        .err()
        .expect("refused");
        assert!(matches!(err, SealError::KeyExchange(_)), "{err}");
    }

    #[test]
    fn altered_replayed_reordered_and_dropped_records_do_not_open() {
        let ((mut seal, _), (_, mut open)) = exchanged(&secret(SECRET), &secret(SECRET)).unwrap();
        let records: Vec<Frame> = (0..3u8)
            .map(|i| {
                let mut out = BytesMut::new();
                seal.seal_into(&[&[i; 100]], &mut out).unwrap();
                FrameDecoder.decode(&mut out).unwrap().unwrap()
            })
            .collect();
        let mut plain = BytesMut::new();
        // Altered: one bit of the ciphertext.
        let mut altered = records[0].payload.to_vec();
        altered[5] ^= 1;
        assert!(matches!(
            open.open_into(&altered, &mut plain),
            Err(SealError::Open { nonce: 0, .. })
        ));
        assert!(plain.is_empty());
        // Reordered / dropped: record 1 where record 0 is due.
        assert!(open.open_into(&records[1].payload, &mut plain).is_err());
        // In order it opens; replayed it does not.
        open.open_into(&records[0].payload, &mut plain).unwrap();
        assert!(open.open_into(&records[0].payload, &mut plain).is_err());
        open.open_into(&records[1].payload, &mut plain).unwrap();
        assert_eq!(&plain[..], &[[0u8; 100], [1u8; 100]].concat()[..]);
    }

    #[test]
    fn a_record_sealed_for_another_link_does_not_open() {
        let ((mut seal, _), _) = exchanged(&secret(SECRET), &secret(SECRET)).unwrap();
        let (_, (_, mut other)) = exchanged(&secret(SECRET), &secret(SECRET)).unwrap();
        let mut out = BytesMut::new();
        seal.seal_into(&[b"epoch 7"], &mut out).unwrap();
        let record = FrameDecoder.decode(&mut out).unwrap().unwrap();
        assert!(other
            .open_into(&record.payload, &mut BytesMut::new())
            .is_err());
    }

    #[test]
    fn a_record_reflected_back_to_its_sender_does_not_open() {
        let ((mut seal_a, mut open_a), (_, mut open_b)) =
            exchanged(&secret(SECRET), &secret(SECRET)).unwrap();
        let mut out = BytesMut::new();
        seal_a.seal_into(&[b"reflected"], &mut out).unwrap();
        let record = FrameDecoder.decode(&mut out).unwrap().unwrap();
        assert!(open_a
            .open_into(&record.payload, &mut BytesMut::new())
            .is_err());
        open_b
            .open_into(&record.payload, &mut BytesMut::new())
            .unwrap();
    }
}
