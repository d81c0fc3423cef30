//! Where the frames a guest transmits go: straight to the TAP ("open"), or
//! held in numbered batches until the owner releases them. Output commit is
//! built on this (the replicator seals a batch per epoch and releases it
//! when the standby acknowledges the epoch); the device only sees a gate.
//!

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::tap::{Tap, VNET_HDR_LEN};

/// Held bytes beyond which further frames are dropped (and counted): the
/// guest's protocols retransmit, memory stays bounded.
pub const MAX_HELD_BYTES: usize = 64 << 20;

/// Counters of the gate (frames and bytes without the virtio header).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GateCounters {
    /// Frames that went to the TAP (directly or released).
    pub sent_frames: u64,
    pub sent_bytes: u64,
    /// Frames held at some point.
    pub held_frames: u64,
    /// Frames and bytes held right now (sealed or not).
    pub holding_frames: u64,
    pub holding_bytes: u64,
    /// Frames dropped because too much was held or the TAP refused them.
    pub dropped_frames: u64,
}

#[derive(Default)]
struct Held {
    holding: bool,
    /// Frames since the last seal.
    current: Vec<Vec<u8>>,
    /// Sealed batches in order.
    sealed: VecDeque<(u64, Vec<Vec<u8>>)>,
    counters: GateCounters,
}

/// Called when a frame starts a new batch of held output.
pub type HeldOutputHook = Box<dyn Fn() + Send + Sync>;

/// The transmit gate of one NIC.
pub struct TxGate {
    tap: Arc<Tap>,
    held: Mutex<Held>,
    on_held: Mutex<Option<HeldOutputHook>>,
}

impl TxGate {
    pub fn new(tap: Arc<Tap>) -> TxGate {
        TxGate {
            tap,
            held: Mutex::default(),
            on_held: Mutex::default(),
        }
    }

    /// The TAP the gate writes to.
    pub(crate) fn tap(&self) -> Arc<Tap> {
        Arc::clone(&self.tap)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().expect("tx gate lock")
    }

    fn write(&self, frame: &[u8], counters: &mut GateCounters) {
        if self.tap.write_frame(frame).is_ok() {
            counters.sent_frames += 1;
            counters.sent_bytes += frame.len().saturating_sub(VNET_HDR_LEN) as u64;
        } else {
            counters.dropped_frames += 1;
        }
    }

    /// A frame from the guest (virtio header included).
    pub fn transmit(&self, frame: &[u8]) {
        let mut guard = self.lock();
        let held = &mut *guard;
        if !held.holding {
            self.write(frame, &mut held.counters);
            return;
        }
        if held.counters.holding_bytes as usize + frame.len() > MAX_HELD_BYTES {
            held.counters.dropped_frames += 1;
            return;
        }
        held.counters.held_frames += 1;
        held.counters.holding_frames += 1;
        held.counters.holding_bytes += frame.len() as u64;
        let first = held.current.is_empty();
        held.current.push(frame.to_vec());
        drop(guard);
        if first {
            if let Some(hook) = self.on_held.lock().expect("tx gate hook lock").as_ref() {
                hook();
            }
        }
    }

    /// Calls `hook` whenever held output starts waiting for a checkpoint
    /// (the owner may want to checkpoint sooner).
    pub fn on_held_output(&self, hook: HeldOutputHook) {
        *self.on_held.lock().expect("tx gate hook lock") = Some(hook);
    }

    /// From now on frames are held until released.
    pub fn hold(&self) {
        self.lock().holding = true;
    }

    /// The frames held since the last seal become batch `batch` (call it
    /// while the guest is paused, so the cut is exact); `inspect` sees each
    /// of them. Returns how many.
    pub fn seal(&self, batch: u64, mut inspect: impl FnMut(&[u8])) -> usize {
        let mut held = self.lock();
        let frames = std::mem::take(&mut held.current);
        frames.iter().for_each(|f| inspect(f));
        let n = frames.len();
        if n > 0 {
            held.sealed.push_back((batch, frames));
        }
        n
    }

    /// Frames held since the last seal (waiting for the next checkpoint).
    pub fn unsealed(&self) -> usize {
        self.lock().current.len()
    }

    /// Sends every sealed batch numbered `batch` or lower; returns the
    /// number of frames sent.
    pub fn release_through(&self, batch: u64) -> usize {
        let mut held = self.lock();
        let held = &mut *held;
        let mut sent = 0;
        while held.sealed.front().is_some_and(|(b, _)| *b <= batch) {
            let (_, frames) = held.sealed.pop_front().expect("checked");
            for frame in frames {
                held.counters.holding_frames -= 1;
                held.counters.holding_bytes -= frame.len() as u64;
                self.write(&frame, &mut held.counters);
                sent += 1;
            }
        }
        sent
    }

    /// Takes every sealed batch numbered `batch` or lower out of the gate
    /// without sending it (another gate, elsewhere, sends those frames);
    /// returns the frames in order, virtio header included.
    pub fn take_through(&self, batch: u64) -> Vec<Vec<u8>> {
        let mut held = self.lock();
        let held = &mut *held;
        let mut taken = Vec::new();
        while held.sealed.front().is_some_and(|(b, _)| *b <= batch) {
            let (_, frames) = held.sealed.pop_front().expect("checked");
            for frame in frames {
                held.counters.holding_frames -= 1;
                held.counters.holding_bytes -= frame.len() as u64;
                taken.push(frame);
            }
        }
        taken
    }

    /// Sends a frame of the guest's (virtio header included) at once, past
    /// anything held: output another gate held and handed over.
    pub fn send_now(&self, frame: &[u8]) {
        let mut held = self.lock();
        self.write(frame, &mut held.counters);
    }

    /// Stops holding: everything held (sealed or not) is sent in order and
    /// later frames go out at once. Used when no replica remains to wait
    /// for (this node's copy is the only one).
    pub fn open(&self) -> usize {
        let mut held = self.lock();
        let held = &mut *held;
        held.holding = false;
        let mut frames: Vec<Vec<u8>> = held.sealed.drain(..).flat_map(|(_, f)| f).collect();
        frames.append(&mut held.current);
        for frame in &frames {
            self.write(frame, &mut held.counters);
        }
        held.counters.holding_frames = 0;
        held.counters.holding_bytes = 0;
        frames.len()
    }

    /// Every held frame, sealed or not, becomes part of one batch numbered
    /// `batch`, in the order the guest sent them (the batches of a session
    /// that ended are released, or not, together). Returns how many.
    pub fn merge_held(&self, batch: u64) -> usize {
        let mut held = self.lock();
        let held = &mut *held;
        let mut frames: Vec<Vec<u8>> = held.sealed.drain(..).flat_map(|(_, f)| f).collect();
        frames.append(&mut held.current);
        let n = frames.len();
        if n > 0 {
            held.sealed.push_back((batch, frames));
        }
        n
    }

    /// Drops everything held: output of a copy that must not run on (it
    /// belongs to epochs that never committed anywhere that lives on).
    pub fn discard(&self) -> usize {
        let mut held = self.lock();
        let n = held.current.len() + held.sealed.iter().map(|(_, f)| f.len()).sum::<usize>();
        held.current.clear();
        held.sealed.clear();
        held.counters.holding_frames = 0;
        held.counters.holding_bytes = 0;
        n
    }

    /// Sends an Ethernet frame of the host's own (e.g. a gratuitous ARP) at
    /// once, past anything held.
    pub fn inject(&self, ethernet: &[u8]) -> std::io::Result<()> {
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(ethernet);
        self.tap.write_frame(&frame).map(|_| ())
    }

    pub fn counters(&self) -> GateCounters {
        self.lock().counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN + 60];
        f[VNET_HDR_LEN + 59] = n;
        f
    }

    #[test]
    fn held_frames_leave_only_when_their_batch_is_released() {
        // A TAP that is down: released frames are written (and refused by
        // the kernel, counted as dropped); either way they left the gate.
        let tap = Arc::new(Tap::open("ftgatet0").expect("TAP (needs CAP_NET_ADMIN)"));
        let gate = TxGate::new(tap);
        let left = |g: &TxGate| {
            let c = g.counters();
            c.sent_frames + c.dropped_frames
        };
        gate.hold();
        for n in 0..3 {
            gate.transmit(&frame(n));
        }
        assert_eq!(gate.seal(7, |_| {}), 3);
        gate.transmit(&frame(3));
        gate.transmit(&frame(4));
        assert_eq!(gate.counters().holding_frames, 5);
        assert_eq!(left(&gate), 0, "nothing leaves before a release");
        assert_eq!(gate.release_through(6), 0, "batch 7 is not released by 6");
        assert_eq!(left(&gate), 0);
        assert_eq!(gate.release_through(7), 3);
        assert_eq!(left(&gate), 3);
        assert_eq!(gate.unsealed(), 2);
        assert_eq!(gate.seal(8, |_| {}), 2);
        assert_eq!(gate.discard(), 2);
        assert_eq!(gate.release_through(100), 0, "discarded frames never leave");
        // A session's batches merged into one: released together, in order.
        gate.transmit(&frame(7));
        gate.seal(9, |_| {});
        gate.transmit(&frame(8));
        assert_eq!(gate.merge_held(0), 2);
        assert_eq!(gate.unsealed(), 0);
        assert_eq!(gate.release_through(0), 2);
        assert_eq!(left(&gate), 5);
        // Handed over: taken out unsent, in order, and sent by another gate.
        gate.transmit(&frame(9));
        gate.transmit(&frame(10));
        gate.seal(10, |_| {});
        gate.transmit(&frame(11));
        gate.seal(11, |_| {});
        let taken = gate.take_through(10);
        assert_eq!(taken, vec![frame(9), frame(10)]);
        assert_eq!(left(&gate), 5, "taken frames did not leave this gate");
        assert_eq!(gate.counters().holding_frames, 1);
        let other = TxGate::new(Arc::new(Tap::open("ftgatet1").expect("TAP")));
        taken.iter().for_each(|f| other.send_now(f));
        assert_eq!(left(&other), 2);
        assert_eq!(gate.discard(), 1);
        gate.transmit(&frame(5));
        assert_eq!(gate.open(), 1);
        gate.transmit(&frame(6));
        assert_eq!(left(&gate), 7, "an open gate sends at once");
        assert_eq!(gate.counters().holding_frames, 0);
    }
}
