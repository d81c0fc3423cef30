//! Saved state of a virtio-blk device (plain data, versioned). The queue
//! lives in the transport's state; the disk's contents in its image file.

use serde::{Deserialize, Serialize};

pub const BLOCK_STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub version: u32,
    pub read_only: bool,
    /// The disk's size in 512-byte sectors, as the guest knows it.
    pub capacity_sectors: u64,
}
