//! The A-link: framed messages between the two nodes of a pair.
//!
//! - [`frame`]: the frame format (versioned header with a kind, an epoch
//!   number, a generation, a length and a crc32 over header and payload; a
//!   decoder that rejects malformed, oversized, corrupt and truncated
//!   input). The link's own frames (handshake, heartbeats) apart, frames
//!   carry messages of the replication protocol, opaque here.
//! - [`auth`]: mutual HMAC-SHA256 challenge-response over a shared pair
//!   secret that never goes on the wire.
//! - [`hello`]: the Hello the nodes exchange once authenticated (protocol
//!   version, node name, role, CPU features, VM fingerprint), the check that
//!   refuses to pair incompatible nodes, and the Refusal sent to say why.
//! - [`link`]: the transport over one TCP connection (tokio): connect or
//!   listen, handshake (auth, then hello), checked frames, heartbeats and
//!   silent-peer detection.
//! - [`pulse`]: heartbeats on a UDP socket and an OS thread of each link's
//!   own, at real-time priority, so that a busy node cannot starve them.
//!

pub mod auth;
pub mod frame;
pub mod hello;
pub mod link;
pub mod pulse;
pub mod seal;

pub use auth::{AuthError, PairSecret};
pub use frame::{Frame, FrameDecoder, FrameError, FrameKind};
pub use hello::{CpuFeatureSummary, Hello, HelloError, Mismatch, Refusal, Role};
pub use link::{
    heartbeat_interval_for, send_stall_timeout_for, Link, LinkConfig, LinkError, LinkListener,
    LinkReceiver, LinkSender, Liveness, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TIMEOUT,
};
