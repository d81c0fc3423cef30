//! The guest's network input, VM-wide: every NIC's receive log driven
//! together. The FT engine numbers what the guest received at each
//! checkpoint ([`Input::delivered`]), forwards copies of the frames as they
//! are delivered ([`Input::start`], [`Input::take`]), and a promoted
//! replica gets the frames its checkpoint had not yet received
//! ([`Input::replay`]) instead of waiting for its peers to send them again.

use std::sync::Arc;

use crate::devices::virtio::net::queues::MAX_FRAME_LEN;
use crate::devices::virtio::net::rx_log::RxLog;
use crate::devices::virtio::net::tap::Tap;

/// Most frames [`Input::take_waiting`] takes from one TAP.
const MAX_WAITING_FRAMES: usize = 1024;

/// A frame the guest received on NIC `nic` (virtio header included), with
/// its sequence number on that NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundFrame {
    pub nic: u32,
    pub seq: u64,
    pub frame: Vec<u8>,
}

/// The receive logs of every NIC of a VM.
pub struct Input {
    logs: Vec<Arc<RxLog>>,
    /// Each NIC's TAP, in device order.
    taps: Vec<Arc<Tap>>,
}

impl Input {
    pub(crate) fn new(logs: Vec<Arc<RxLog>>, taps: Vec<Arc<Tap>>) -> Input {
        Input { logs, taps }
    }

    /// Only while the VM is paused (its receive threads read no TAP then):
    /// the frames waiting at each NIC's TAP, not delivered to the guest,
    /// numbered after the delivered ones, NIC by NIC in arrival order (at
    /// most 1024 per NIC). They must reach a copy of the guest: this one
    /// ([`Input::replay`]) or the replica that takes it over.
    pub fn take_waiting(&self) -> Vec<InboundFrame> {
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let mut out = Vec::new();
        for (nic, (log, tap)) in self.logs.iter().zip(&self.taps).enumerate() {
            let mut seq = log.delivered();
            let mut taken = 0;
            while taken < MAX_WAITING_FRAMES {
                match tap.read_frame(&mut buf) {
                    Ok(len) => {
                        out.push(InboundFrame {
                            nic: nic as u32,
                            seq,
                            frame: buf[..len].to_vec(),
                        });
                        seq += 1;
                        taken += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // Empty (WouldBlock), or the TAP went away.
                    Err(_) => break,
                }
            }
        }
        out
    }

    /// Copies every frame delivered from now on (anything copied before is
    /// dropped).
    pub fn start(&self) {
        self.logs.iter().for_each(|l| l.start());
    }

    /// Stops copying and drops what was copied.
    pub fn stop(&self) {
        self.logs.iter().for_each(|l| l.stop());
    }

    /// Per NIC, the frames delivered into guest memory so far (exact while
    /// the guest is paused): a checkpoint taken now holds frames numbered
    /// below these.
    pub fn delivered(&self) -> Vec<u64> {
        self.logs.iter().map(|l| l.delivered()).collect()
    }

    /// Copies dropped because they were not taken in time, on every NIC.
    pub fn dropped(&self) -> u64 {
        self.logs.iter().map(|l| l.dropped()).sum()
    }

    /// The copies made since the last take, NIC by NIC, each in delivery
    /// order.
    pub fn take(&self) -> Vec<InboundFrame> {
        self.logs
            .iter()
            .enumerate()
            .flat_map(|(nic, log)| {
                log.take().into_iter().map(move |f| InboundFrame {
                    nic: nic as u32,
                    seq: f.seq,
                    frame: f.frame,
                })
            })
            .collect()
    }

    /// Calls `hook` whenever a copy starts waiting to be taken.
    pub fn on_recorded(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        for log in &self.logs {
            let hook = Arc::clone(&hook);
            log.on_recorded(Box::new(move || hook()));
        }
    }

    /// Delivers `frames` to the guest on NIC `nic` before anything from
    /// its TAP; returns how many were queued (none for a NIC the VM does
    /// not have).
    pub fn replay(&self, nic: usize, frames: impl IntoIterator<Item = Vec<u8>>) -> usize {
        self.logs.get(nic).map_or(0, |l| l.replay(frames))
    }
}
