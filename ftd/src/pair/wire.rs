//! What the two daemons tell each other on the pair channel: each side's
//! whole state (VM records, tombstones, the roles running on it, the
//! nodes' maintenance), sent
//! when it changes and every second. JSON in A-link message frames.

use bytes::Bytes;
use ft_link::{Frame, FrameKind};
use replicator::status::{FtState, Role};
use serde::{Deserialize, Serialize};

use crate::store::{NodeRecord, Tombstone, UserRecord, VmRecord};

/// The pair channel's protocol version.
pub const PAIR_VERSION: u32 = 1;
/// The message code of a [`PairState`] frame.
pub const STATE_CODE: u8 = 64;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot encode this node's state: {0}")]
    Encode(serde_json::Error),
    #[error("cannot frame this node's state: {0}")]
    Frame(ft_link::FrameError),
    #[error("the peer sent a {0:?} frame, not a state")]
    UnexpectedFrame(FrameKind),
    #[error("the peer's state ({len} bytes) is not valid: {source}")]
    Decode {
        len: usize,
        source: serde_json::Error,
    },
    #[error("the peer speaks pair protocol {0}, this node {PAIR_VERSION}")]
    Version(u32),
}

/// A role running on the sending node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleReport {
    pub vm: String,
    pub role: Role,
    pub state: FtState,
    pub epoch: Option<u64>,
    #[serde(default)]
    pub peer: Option<String>,
    pub message: Option<String>,
    /// The engine's counters (for the console's charts on either node).
    #[serde(default)]
    pub counters: Option<replicator::status::FtCounters>,
    #[serde(default)]
    pub sync: Option<replicator::status::SyncProgress>,
    #[serde(default)]
    pub generation: Option<u64>,
}

/// One side's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairState {
    pub version: u32,
    pub node: String,
    pub unix_ms: u64,
    pub vms: Vec<VmRecord>,
    pub tombstones: Vec<Tombstone>,
    pub roles: Vec<RoleReport>,
    /// The nodes' maintenance records (absent from an older daemon).
    #[serde(default)]
    pub nodes: Vec<NodeRecord>,
    /// The console's users (their password hashes; absent from an older
    /// daemon).
    #[serde(default)]
    pub users: Vec<UserRecord>,
}

impl PairState {
    pub fn to_frame(&self) -> Result<Frame, WireError> {
        let payload = serde_json::to_vec(self).map_err(WireError::Encode)?;
        Frame::message(STATE_CODE, 0, 0, Bytes::from(payload)).map_err(WireError::Frame)
    }

    pub fn from_frame(frame: &Frame) -> Result<PairState, WireError> {
        if frame.kind != FrameKind::Message(STATE_CODE) {
            return Err(WireError::UnexpectedFrame(frame.kind));
        }
        let state: PairState =
            serde_json::from_slice(&frame.payload).map_err(|source| WireError::Decode {
                len: frame.payload.len(),
                source,
            })?;
        if state.version != PAIR_VERSION {
            return Err(WireError::Version(state.version));
        }
        Ok(state)
    }
}
