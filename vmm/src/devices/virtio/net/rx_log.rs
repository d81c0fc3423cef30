//! What a NIC's receive path keeps for its owner: the count of frames it
//! delivered into guest memory (each frame's sequence number), a copy of
//! each delivered frame while recording (the FT engine forwards them to the
//! standby as they arrive), and frames to deliver before the TAP's
//! (replayed into a VM that continues from a checkpoint: the frames the
//! checkpoint had not yet received). Off until recording starts; the
//! device knows nothing of what the owner does with it.

use std::collections::VecDeque;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use super::queues::MAX_FRAME_LEN;

/// Recorded bytes beyond which further copies are dropped (and counted):
/// an owner that falls behind loses copies, never guest frames.
pub const MAX_RECORDED_BYTES: usize = 16 << 20;

/// Frames waiting to be replayed beyond which further ones are dropped.
pub const MAX_REPLAY_FRAMES: usize = 4096;

/// A copy of one delivered frame (virtio header included) and its
/// sequence number: the count of frames the device delivered before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFrame {
    pub seq: u64,
    pub frame: Vec<u8>,
}

/// Called when a recorded frame waits where there was none.
pub type RecordedHook = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Inner {
    /// Frames delivered into guest memory since the device was made.
    delivered: u64,
    recording: bool,
    recorded: Vec<ReceivedFrame>,
    recorded_bytes: usize,
    /// Copies dropped because the owner did not take them in time.
    dropped: u64,
    replay: VecDeque<Vec<u8>>,
}

/// The receive log of one NIC.
pub struct RxLog {
    inner: Mutex<Inner>,
    /// Readable while frames wait to be replayed (the receive thread
    /// watches it).
    replay_ready: EventFd,
    on_recorded: Mutex<Option<RecordedHook>>,
}

impl RxLog {
    pub fn new() -> std::io::Result<RxLog> {
        Ok(RxLog {
            inner: Mutex::default(),
            replay_ready: EventFd::new(libc::EFD_NONBLOCK)?,
            on_recorded: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("rx log lock")
    }

    /// The eventfd that is readable while frames wait to be replayed.
    pub(super) fn replay_ready(&self) -> &EventFd {
        &self.replay_ready
    }

    /// Copies every delivered frame from now on (anything recorded before
    /// is dropped).
    pub fn start(&self) {
        let mut inner = self.lock();
        inner.recording = true;
        inner.recorded.clear();
        inner.recorded_bytes = 0;
    }

    /// Stops copying and drops what was copied.
    pub fn stop(&self) {
        let mut inner = self.lock();
        inner.recording = false;
        inner.recorded = Vec::new();
        inner.recorded_bytes = 0;
    }

    /// Frames delivered into guest memory so far: the sequence number the
    /// next one gets. Exact while the device is paused.
    pub fn delivered(&self) -> u64 {
        self.lock().delivered
    }

    /// Copies dropped because they were not taken in time.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// The copies recorded since the last take, in delivery order.
    pub fn take(&self) -> Vec<ReceivedFrame> {
        let mut inner = self.lock();
        inner.recorded_bytes = 0;
        std::mem::take(&mut inner.recorded)
    }

    /// Calls `hook` when a copy is recorded and none was waiting.
    pub fn on_recorded(&self, hook: RecordedHook) {
        *self.on_recorded.lock().expect("rx log hook lock") = Some(hook);
    }

    /// Delivers `frames` (virtio header included) to the guest before any
    /// frame from the TAP, in order. Frames longer than a TAP hands over
    /// are dropped; returns how many were queued.
    pub fn replay(&self, frames: impl IntoIterator<Item = Vec<u8>>) -> usize {
        let mut inner = self.lock();
        let mut queued = 0;
        for frame in frames {
            if frame.len() <= MAX_FRAME_LEN && inner.replay.len() < MAX_REPLAY_FRAMES {
                inner.replay.push_back(frame);
                queued += 1;
            }
        }
        drop(inner);
        if queued > 0 {
            // The counter saturating is the only failure, and it still wakes.
            let _ = self.replay_ready.write(1);
        }
        queued
    }

    /// The next frame to replay, copied into `buf`; its length.
    pub(super) fn next_replay(&self, buf: &mut [u8]) -> Option<usize> {
        let mut inner = self.lock();
        let frame = inner.replay.pop_front()?;
        let len = frame.len().min(buf.len());
        buf[..len].copy_from_slice(&frame[..len]);
        Some(len)
    }

    /// `frame` was delivered into guest memory.
    pub(crate) fn delivered_frame(&self, frame: &[u8]) {
        let mut inner = self.lock();
        let seq = inner.delivered;
        inner.delivered += 1;
        if !inner.recording {
            return;
        }
        if inner.recorded_bytes + frame.len() > MAX_RECORDED_BYTES {
            inner.dropped += 1;
            return;
        }
        let first = inner.recorded.is_empty();
        inner.recorded_bytes += frame.len();
        inner.recorded.push(ReceivedFrame {
            seq,
            frame: frame.to_vec(),
        });
        drop(inner);
        if first {
            if let Some(hook) = self.on_recorded.lock().expect("rx log hook lock").as_ref() {
                hook();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivered_frames_are_numbered_and_copied_only_while_recording() {
        let log = RxLog::new().unwrap();
        let woken = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let w = std::sync::Arc::clone(&woken);
        log.on_recorded(Box::new(move || {
            w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        log.delivered_frame(b"zero");
        assert_eq!(log.delivered(), 1);
        assert!(log.take().is_empty(), "nothing copied before start");
        log.start();
        log.delivered_frame(b"one");
        log.delivered_frame(b"two");
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
        let taken = log.take();
        assert_eq!(
            taken.iter().map(|f| f.seq).collect::<Vec<_>>(),
            vec![1, 2],
            "sequence numbers count every delivered frame"
        );
        assert_eq!(taken[1].frame, b"two");
        log.stop();
        log.delivered_frame(b"three");
        assert!(log.take().is_empty());
        assert_eq!(log.delivered(), 4);
    }

    #[test]
    fn copies_past_the_bound_are_dropped_and_counted() {
        let log = RxLog::new().unwrap();
        log.start();
        let big = vec![0u8; MAX_FRAME_LEN];
        let fit = MAX_RECORDED_BYTES / MAX_FRAME_LEN;
        for _ in 0..fit + 2 {
            log.delivered_frame(&big);
        }
        assert_eq!(log.take().len(), fit);
        assert_eq!(log.dropped(), 2);
        assert_eq!(log.delivered(), fit as u64 + 2, "the guest got them all");
    }

    #[test]
    fn replayed_frames_come_out_in_order_and_wake_the_receiver() {
        let log = RxLog::new().unwrap();
        assert!(log.replay_ready().read().is_err(), "not ready when empty");
        assert_eq!(
            log.replay([b"a".to_vec(), vec![0; MAX_FRAME_LEN + 1], b"b".to_vec()]),
            2,
            "an oversized frame is dropped"
        );
        assert_eq!(log.replay_ready().read().unwrap(), 1);
        let mut buf = [0u8; 8];
        assert_eq!(log.next_replay(&mut buf), Some(1));
        assert_eq!(&buf[..1], b"a");
        assert_eq!(log.next_replay(&mut buf), Some(1));
        assert_eq!(&buf[..1], b"b");
        assert_eq!(log.next_replay(&mut buf), None);
    }
}
