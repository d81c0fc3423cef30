//! The A-link: framed messages between the two nodes of a pair.
//!
//! Built so far: the frame format ([`frame`]: versioned header with a kind,
//! an epoch number, a length and a crc32 over header and payload; a decoder
//! that rejects malformed, oversized, corrupt and truncated input) and epoch
//! sequencing ([`sequence`]: duplicated and out-of-order epochs are refused).
//! The TCP transport, the authenticated handshake, heartbeats, flow control
//! and redundant links come with the fault-tolerance issue.

pub mod frame;
pub mod sequence;

pub use frame::{Frame, FrameDecoder, FrameError, FrameKind};
pub use sequence::{EpochSequencer, SequenceError};
