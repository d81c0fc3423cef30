//! [`LinkError`]: why a link could not be opened, or ended.

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::AuthError;
use crate::frame::{FrameError, FrameKind};
use crate::hello::{HelloError, Mismatch, Refusal};
use crate::seal::SealError;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("could not connect the A-link to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not bind the A-link listener to {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not accept an A-link connection")]
    Accept {
        #[source]
        source: std::io::Error,
    },
    #[error("could not read the peer address of an A-link connection")]
    PeerAddress {
        #[source]
        source: std::io::Error,
    },
    #[error("could not set TCP_NODELAY on the A-link to {peer}")]
    NoDelay {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("could not prepare authentication with {peer}")]
    AuthSetup {
        peer: SocketAddr,
        #[source]
        source: AuthError,
    },
    #[error("authentication of {peer} failed")]
    AuthenticationFailed {
        peer: SocketAddr,
        #[source]
        source: AuthError,
    },
    #[error("{peer} refused to pair: {reason}")]
    PeerRefused { peer: SocketAddr, reason: Refusal },
    #[error("refusing to pair with {peer}")]
    Incompatible {
        peer: SocketAddr,
        #[source]
        mismatch: Box<Mismatch>,
    },
    #[error("bad handshake payload from or for {peer}")]
    HandshakePayload {
        peer: SocketAddr,
        #[source]
        source: HelloError,
    },
    #[error("handshake with {peer}: expected a {expected:?} frame, got {got:?}")]
    UnexpectedFrame {
        peer: SocketAddr,
        expected: FrameKind,
        got: FrameKind,
    },
    #[error("handshake with {peer} did not finish within {after:?}")]
    HandshakeTimeout { peer: SocketAddr, after: Duration },
    #[error("could not encode a {kind:?} frame for {peer}")]
    Encode {
        peer: SocketAddr,
        kind: FrameKind,
        #[source]
        source: FrameError,
    },
    /// The link cannot be used after this (a frame may be cut short).
    #[error("{peer} took nothing sent to it for {after:?}: the peer is not reading")]
    SendStalled { peer: SocketAddr, after: Duration },
    #[error("could not send to {peer}")]
    Send {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("could not receive from {peer}")]
    Receive {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("frame from {peer} refused, the link is ended")]
    Corrupt {
        peer: SocketAddr,
        #[source]
        source: FrameError,
    },
    #[error("{peer} closed the link inside a frame ({received} bytes of it received)")]
    Truncated { peer: SocketAddr, received: usize },
    #[error("{peer} closed the link")]
    PeerClosed { peer: SocketAddr },
    #[error("nothing arrived from {peer} for {after:?}: the peer is silent")]
    PeerSilent { peer: SocketAddr, after: Duration },
    #[error("the key exchange with {peer} failed")]
    KeyExchange {
        peer: SocketAddr,
        #[source]
        source: SealError,
    },
    #[error(
        "{peer} runs the A-link {theirs} and this node {ours}: set the same mode on both nodes \
         (plaintext only for a dedicated cable)"
    )]
    ProtectionMismatch {
        peer: SocketAddr,
        ours: &'static str,
        theirs: &'static str,
    },
    #[error("could not seal a frame for {peer}")]
    Seal {
        peer: SocketAddr,
        #[source]
        source: SealError,
    },
    #[error("a record from {peer} refused, the link is ended")]
    Unsealed {
        peer: SocketAddr,
        #[source]
        source: SealError,
    },
    #[error(
        "a plaintext {kind:?} frame from {peer} on a sealed link (injected?): the link is ended"
    )]
    NotSealed { peer: SocketAddr, kind: FrameKind },
    #[error("the link to {peer} already ended with an error")]
    Ended { peer: SocketAddr },
}
