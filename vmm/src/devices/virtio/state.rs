//! Saved state of the virtio-mmio transport (plain data, versioned).

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

pub const MMIO_TRANSPORT_STATE_VERSION: u32 = 1;

/// One virtqueue as the driver configured it, and the device's positions in
/// its rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfigState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

impl From<&QueueState> for QueueConfigState {
    fn from(q: &QueueState) -> Self {
        QueueConfigState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
        }
    }
}

impl From<&QueueConfigState> for QueueState {
    fn from(q: &QueueConfigState) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            // VIRTIO_F_RING_EVENT_IDX is never offered.
            event_idx_enabled: false,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The transport's registers and its queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub version: u32,
    /// The virtio device ID behind the transport (checked on restore).
    pub device_type: u32,
    pub status: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueConfigState>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_state_round_trips_through_json() {
        let q = QueueState {
            max_size: 256,
            next_avail: 7,
            next_used: 5,
            event_idx_enabled: false,
            size: 128,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        };
        let saved = MmioTransportState {
            version: MMIO_TRANSPORT_STATE_VERSION,
            device_type: 2,
            status: 0xf,
            device_features_select: 1,
            driver_features_select: 0,
            acked_features: 1 << 32,
            queue_select: 0,
            interrupt_status: 1,
            config_generation: 0,
            queues: vec![QueueConfigState::from(&q)],
        };
        let json = serde_json::to_string(&saved).unwrap();
        let back: MmioTransportState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        assert_eq!(QueueState::from(&back.queues[0]), q);
    }
}
