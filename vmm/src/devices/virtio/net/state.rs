//! Saved state of a virtio-net device (plain data, versioned). The queues
//! live in the transport's state; the TAP is a host resource named by the
//! configuration of the VMM that restores.

use serde::{Deserialize, Serialize};

pub const NET_STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub version: u32,
    /// The MAC address the guest reads from the configuration space.
    pub mac: [u8; 6],
}
