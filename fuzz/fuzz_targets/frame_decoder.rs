//! The A-link's frame decoder, and what the handshake reads from frames
//! before and after authentication (nonces, proofs, Hello, Refusal), and
//! the pulse datagrams.
//!
//! Input: `[chunking seed][stream bytes]`. Checks:
//! - the stream decoded whole and decoded in chunks (as TCP delivers it)
//!   give the same frames and the same end (the same error, or the same
//!   torn tail): a frame's fate never depends on where reads split;
//! - every frame re-encodes to exactly the bytes it was decoded from, and
//!   carries no more than its kind allows;
//! - handshake payloads that decode re-encode to the same value, a proof
//!   verifies only when it is the right one, and a pulse decodes only when
//!   it is exactly what the sender encodes.
#![no_main]

use bytes::BytesMut;
use ft_link::auth::{self, Nonce, Side};
use ft_link::{pulse, Frame, FrameDecoder, FrameError, FrameKind, Hello, PairSecret, Refusal};
use ftvm_fuzz::{local_hello, Chunks, PAIR_SECRET, PROVER_NONCE, PULSE_KEY, VERIFIER_NONCE};
use libfuzzer_sys::fuzz_target;

/// How a stream ended.
#[derive(Debug, PartialEq)]
enum End {
    Error(FrameError),
    /// No error; `finish` said this of the leftover bytes.
    Finished(Result<(), FrameError>),
}

fn decode_whole(stream: &[u8]) -> (Vec<(Frame, usize)>, End) {
    let mut buf = BytesMut::from(stream);
    let mut frames = Vec::new();
    loop {
        let before = buf.len();
        match FrameDecoder.decode(&mut buf) {
            Ok(Some(frame)) => frames.push((frame, before - buf.len())),
            Ok(None) => return (frames, End::Finished(FrameDecoder.finish(&buf))),
            Err(e) => return (frames, End::Error(e)),
        }
    }
}

fn decode_chunked(stream: &[u8], mut chunks: Chunks) -> (Vec<Frame>, End) {
    let mut decoder = FrameDecoder;
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let to = (at + chunks.next_size()).min(stream.len());
        buf.extend_from_slice(&stream[at..to]);
        at = to;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, End::Error(e)),
            }
        }
    }
    (frames, End::Finished(decoder.finish(&buf)))
}

/// What the handshake does with a frame's payload.
fn handshake_payload(frame: &Frame) {
    let payload = &frame.payload[..];
    match frame.kind {
        FrameKind::Challenge => {
            if let Ok(nonce) = Nonce::from_wire(payload) {
                assert_eq!(nonce.as_bytes()[..], payload[..]);
            }
        }
        FrameKind::Response => {
            // The proof of the peer (connecting) side, answering our nonce
            // and binding a fixed one of its own.
            let secret = PairSecret::new(PAIR_SECRET).expect("long enough");
            let ours = Nonce::from_wire(&VERIFIER_NONCE).unwrap();
            let theirs = Nonce::from_wire(&PROVER_NONCE).unwrap();
            let right = auth::prove(&secret, Side::Connecting, &ours, &theirs);
            let verified = auth::verify(&secret, Side::Connecting, &ours, &theirs, payload);
            assert_eq!(
                verified.is_ok(),
                payload == right,
                "a proof verifies iff it is the right one"
            );
        }
        FrameKind::Hello => {
            if let Ok(hello) = Hello::from_payload(payload) {
                let again =
                    Hello::from_payload(&hello.to_payload().expect("a decoded hello encodes"))
                        .expect("an encoded hello decodes");
                assert_eq!(again, hello);
                let local = local_hello();
                if let Err(mismatch) = local.check_pairs_with(&hello) {
                    let _ = mismatch.to_string();
                    // The refusal that names the mismatch goes on the wire.
                    let refusal = Refusal::Incompatible(mismatch);
                    let back = Refusal::from_payload(&refusal.to_payload().unwrap()).unwrap();
                    assert_eq!(back, refusal);
                }
                let _ = hello.check_pairs_with(&local);
            }
        }
        FrameKind::Refusal => {
            if let Ok(refusal) = Refusal::from_payload(payload) {
                let _ = refusal.to_string();
                let again = Refusal::from_payload(
                    &refusal.to_payload().expect("a decoded refusal encodes"),
                )
                .expect("an encoded refusal decodes");
                assert_eq!(again, refusal);
            }
        }
        _ => {}
    }
}

/// A pulse decodes only if it is byte for byte what its sender encodes.
fn pulse(bytes: &[u8]) {
    for side in [Side::Connecting, Side::Accepting] {
        if let Some(counter) = pulse::decode(&PULSE_KEY, side, bytes) {
            assert_eq!(pulse::encode(&PULSE_KEY, side, counter)[..], bytes[..]);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    pulse(stream);
    let (whole, end) = decode_whole(stream);
    let (chunked, chunked_end) = decode_chunked(stream, Chunks::new(seed));
    assert_eq!(
        end, chunked_end,
        "the end of the stream depends on the chunking"
    );
    assert_eq!(whole.len(), chunked.len());
    let mut at = 0;
    for ((frame, consumed), other) in whole.iter().zip(&chunked) {
        assert_eq!(frame, other, "a frame depends on the chunking");
        assert!(frame.payload.len() as u64 <= u64::from(frame.kind.max_payload()));
        let mut wire = BytesMut::new();
        frame.encode(&mut wire).expect("a decoded frame encodes");
        assert_eq!(&wire[..], &stream[at..at + consumed], "re-encoding differs");
        at += consumed;
        handshake_payload(frame);
    }
});
