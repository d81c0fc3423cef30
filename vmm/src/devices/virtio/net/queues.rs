//! Moving frames between the TAP and the guest's queues. Frames keep their
//! 12-byte virtio_net_hdr_v1 both ways (the TAP speaks the same header).
//! Received frames are written to guest memory through vm-memory only, so
//! the dirty bitmap sees them.

use std::io::ErrorKind;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

use super::rx_log::RxLog;
use super::tap::{Tap, VNET_HDR_LEN};
use super::tx_gate::TxGate;
use crate::devices::virtio::{VirtioInterrupt, INTERRUPT_USED_BUFFER};
use crate::memory::GuestMemoryMmap;

/// The largest frame the TAP can hand over: header + 64 KiB.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65535;

/// Frame counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames dropped because they did not fit the guest's buffer or were
    /// malformed.
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames the guest queued malformed (the gate counts what the TAP
    /// refused).
    pub tx_dropped: u64,
}

/// Why a receive pass stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxStop {
    /// The TAP has no more frames queued.
    TapEmpty,
    /// The guest has no receive buffers; reading resumes at its next
    /// notification of the receive queue.
    NoBuffers,
    /// The device is paused.
    Paused,
    /// Reading the TAP failed with something other than "no frame".
    TapError(ErrorKind),
}

/// The device's queues while it runs; shared by the vCPU threads (transmit)
/// and the receive thread behind one Mutex, so holding the Mutex stops both
/// at a consistent point.
pub struct NetQueues {
    pub mem: GuestMemoryMmap,
    pub rx: Queue,
    pub tx: Queue,
    pub interrupt: Arc<VirtioInterrupt>,
    pub tap: Arc<Tap>,
    /// Where transmitted frames go (the TAP, or held for output commit).
    pub gate: Arc<TxGate>,
    /// Counts (and, while recording, copies) delivered frames; holds
    /// frames to replay before the TAP's.
    pub rx_log: Arc<RxLog>,
    /// While set, nothing is received (see `Net::pause`).
    pub paused: bool,
    /// A receive pass stopped for the pause (frames may wait): the
    /// receive thread is kicked at the resume only then, not at every
    /// checkpoint's (a wakeup that, where the engine and the vCPUs share
    /// one CPU, preempts the engine and the guest for nothing).
    pub stopped_by_pause: bool,
    pub counters: NetCounters,
    rx_frame: Vec<u8>,
    tx_frame: Vec<u8>,
}

/// What a NIC's frames pass through outside the guest: its TAP, the gate
/// of what it transmits and the log of what it receives.
pub struct NetBackend {
    pub tap: Arc<Tap>,
    pub gate: Arc<TxGate>,
    pub rx_log: Arc<RxLog>,
}

impl NetQueues {
    pub fn new(
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        interrupt: Arc<VirtioInterrupt>,
        backend: NetBackend,
        paused: bool,
    ) -> Self {
        let NetBackend { tap, gate, rx_log } = backend;
        NetQueues {
            mem,
            rx,
            tx,
            interrupt,
            tap,
            gate,
            rx_log,
            paused,
            // Created paused: whatever came meanwhile is looked at on resume.
            stopped_by_pause: paused,
            counters: NetCounters::default(),
            rx_frame: vec![0; MAX_FRAME_LEN],
            tx_frame: Vec::with_capacity(MAX_FRAME_LEN),
        }
    }

    fn signal_used(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &VirtioInterrupt) {
        if queue.needs_notification(mem).unwrap_or(true) {
            // A failed eventfd write leaves the frame for the guest's next poll.
            let _ = interrupt.trigger(INTERRUPT_USED_BUFFER);
        }
    }

    /// Sends every frame the guest queued for transmission to the TAP.
    pub fn transmit(&mut self) {
        let mut used = false;
        while let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            self.tx_frame.clear();
            let mut readable = true;
            for desc in chain {
                if desc.is_write_only() {
                    continue;
                }
                let len = desc.len() as usize;
                let start = self.tx_frame.len();
                if start + len > MAX_FRAME_LEN {
                    readable = false;
                    break;
                }
                self.tx_frame.resize(start + len, 0);
                if self
                    .mem
                    .read_slice(&mut self.tx_frame[start..], desc.addr())
                    .is_err()
                {
                    readable = false;
                    break;
                }
            }
            let sent = readable && self.tx_frame.len() > VNET_HDR_LEN;
            if sent {
                self.gate.transmit(&self.tx_frame);
                self.counters.tx_frames += 1;
                self.counters.tx_bytes += (self.tx_frame.len() - VNET_HDR_LEN) as u64;
            } else {
                self.counters.tx_dropped += 1;
            }
            if self.tx.add_used(&self.mem, head, 0).is_ok() {
                used = true;
            }
        }
        if used {
            Self::signal_used(&mut self.tx, &self.mem, &self.interrupt);
        }
    }

    /// Moves frames into the guest's receive buffers (those waiting to be
    /// replayed first, then the TAP's) until the TAP is empty, the guest
    /// has no buffers left or the device is paused.
    pub fn receive(&mut self) -> RxStop {
        let mut used = false;
        let stop = loop {
            if self.paused {
                self.stopped_by_pause = true;
                break RxStop::Paused;
            }
            // A buffer first: a frame is read from the TAP only when there
            // is room for it, so none is lost while the guest is slow.
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
                break RxStop::NoBuffers;
            };
            let head = chain.head_index();
            let buffers: Vec<_> = chain
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr(), d.len() as usize))
                .collect();
            let replayed = self.rx_log.next_replay(&mut self.rx_frame);
            let len = match replayed.map_or_else(|| self.tap.read_frame(&mut self.rx_frame), Ok) {
                Ok(len) => len,
                Err(e) => {
                    self.rx.go_to_previous_position();
                    if e.kind() == ErrorKind::WouldBlock {
                        break RxStop::TapEmpty;
                    }
                    if e.kind() == ErrorKind::Interrupted {
                        continue;
                    }
                    break RxStop::TapError(e.kind());
                }
            };
            let room: usize = buffers.iter().map(|&(_, l)| l).sum();
            if len < VNET_HDR_LEN || len > room {
                // Without mergeable buffers a frame must fit one chain.
                self.counters.rx_dropped += 1;
                self.rx.go_to_previous_position();
                continue;
            }
            // num_buffers: one chain per frame (VIRTIO_NET_F_MRG_RXBUF is
            // not offered).
            self.rx_frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            let mut written = 0;
            let mut ok = true;
            for (addr, buf_len) in buffers {
                if written == len {
                    break;
                }
                let n = buf_len.min(len - written);
                if self
                    .mem
                    .write_slice(&self.rx_frame[written..written + n], addr)
                    .is_err()
                {
                    ok = false;
                    break;
                }
                written += n;
            }
            let used_len = if ok {
                self.rx_log.delivered_frame(&self.rx_frame[..len]);
                self.counters.rx_frames += 1;
                self.counters.rx_bytes += (len - VNET_HDR_LEN) as u64;
                len as u32
            } else {
                self.counters.rx_dropped += 1;
                0
            };
            if self.rx.add_used(&self.mem, head, used_len).is_ok() {
                used = true;
            }
        };
        if used {
            Self::signal_used(&mut self.rx, &self.mem, &self.interrupt);
        }
        stop
    }
}
