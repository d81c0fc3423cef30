//! The replication protocol's top-level decoder (`Message::from_frame`),
//! on any frame the A-link could deliver.
//!
//! Input: `[kind][epoch: u64 LE][generation: u64 LE][payload]`. Checks:
//! a message that decodes keeps the frame's epoch and generation, encodes
//! back to a frame that decodes to the same message, and (every kind but
//! `SyncBegin`, whose JSON may be spelt many ways) to the very payload it
//! came from (a compressed copy frame: to the payload it decompresses
//! to, uncompressed); a link frame is never taken for a message.
#![no_main]

use bytes::Bytes;
use ft_link::{Frame, FrameKind};
use libfuzzer_sys::fuzz_target;
use replicator::protocol::{compressed, Message, ProtocolError};

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let code = data[0];
    let epoch = u64::from_le_bytes(data[1..9].try_into().unwrap());
    let generation = u64::from_le_bytes(data[9..17].try_into().unwrap());
    let payload = Bytes::copy_from_slice(&data[17..]);
    let frame = match FrameKind::try_from(code) {
        Ok(FrameKind::Message(_)) => Frame::message(code, epoch, generation, payload).unwrap(),
        Ok(kind) => {
            let frame = Frame {
                kind,
                epoch,
                generation,
                payload,
            };
            assert_eq!(
                Message::from_frame(frame),
                Err(ProtocolError::NotAMessage(kind))
            );
            return;
        }
        Err(_) => return,
    };
    let Ok(envelope) = Message::from_frame(frame.clone()) else {
        return;
    };
    assert_eq!((envelope.epoch, envelope.generation), (epoch, generation));
    assert!(!envelope.message.name().is_empty());
    let is_plan = matches!(envelope.message, Message::SyncBegin(_));
    let again = envelope.message.clone().into_frame(epoch, generation);
    if Message::is_compressed_kind(code) {
        let raw = compressed::decompress(&frame.payload).expect("it decoded");
        assert_eq!(
            again.payload, raw,
            "re-encoding differs from the decompressed payload"
        );
    } else {
        assert_eq!(again.kind, frame.kind);
        if !is_plan {
            assert_eq!(again.payload, frame.payload, "re-encoding differs");
        }
    }
    let back = Message::from_frame(again).expect("an encoded message decodes");
    assert_eq!(back, envelope);
});
