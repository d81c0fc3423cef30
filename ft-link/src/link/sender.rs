//! [`LinkSender`], the sending half of a link: frames written with a bound
//! on stalls, and the heartbeat task.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{trace, warn};

use super::stream::{Outbound, Run};
use super::LinkError;
use crate::frame::{Frame, FrameKind};
use crate::pulse::Pulses;

pub(super) struct Writer {
    pub(super) half: OwnedWriteHalf,
    pub(super) last_sent: Instant,
    /// This direction's stream: sealed or plaintext.
    pub(super) outbound: Outbound,
    /// A write that makes no progress for this long fails.
    pub(super) stall: Duration,
    /// What the socket has not taken yet of the frames last encoded.
    pub(super) unsent: Unsent,
}

/// The runs of the frames last encoded (see [`Outbound::encode_all`]) and
/// how far the socket took them.
#[derive(Default)]
pub(super) struct Unsent {
    runs: Vec<Run>,
    /// The run being written, and the bytes of it written.
    run: usize,
    at: usize,
}

/// At most this many runs go to one `writev`.
const RUNS_PER_WRITE: usize = 64;

/// How many bytes of frames' payloads are encoded (and sealed) for one
/// write at most, unless one frame holds more: an epoch's small frames go
/// as one write, while a large frame goes as soon as it is encoded (the
/// kernel sends it while the next one is).
pub(super) const WRITE_BATCH_BYTES: usize = 64 << 10;

/// Writes part of what `unsent` holds; fails when no byte is taken for
/// `stall`. Cancel-safe: a write that is dropped took nothing.
async fn write_within(
    half: &mut OwnedWriteHalf,
    (outbound, unsent): (&Outbound, &Unsent),
    stall: Duration,
    peer: SocketAddr,
) -> Result<usize, LinkError> {
    let mut slices = [IoSlice::new(&[]); RUNS_PER_WRITE];
    let mut count = 0;
    for (i, run) in unsent.runs[unsent.run..]
        .iter()
        .take(RUNS_PER_WRITE)
        .enumerate()
    {
        let bytes = outbound.bytes(run);
        slices[i] = IoSlice::new(if i == 0 { &bytes[unsent.at..] } else { bytes });
        count += 1;
    }
    match tokio::time::timeout(stall, half.write_vectored(&slices[..count])).await {
        Ok(Ok(0)) => Err(LinkError::Send {
            peer,
            source: std::io::ErrorKind::WriteZero.into(),
        }),
        Ok(Ok(n)) => Ok(n),
        Ok(Err(source)) => Err(LinkError::Send { peer, source }),
        Err(_) => Err(LinkError::SendStalled { peer, after: stall }),
    }
}

impl Writer {
    /// Writes `frames`, in as few writes as the socket takes them. Frames
    /// whose write was cut before (a stall, or a send whose future was
    /// dropped) go out first, whole, so that the peer reads whole frames;
    /// even those of which nothing went out yet: a sealed stream counts
    /// every record it sealed, and the peer opens the next only after it.
    async fn write(&mut self, peer: SocketAddr, frames: &[Frame]) -> Result<(), LinkError> {
        self.write_unsent(peer).await?;
        let encoded = self
            .outbound
            .encode_all(peer, frames, &mut self.unsent.runs);
        self.write_unsent(peer).await?;
        encoded?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Writes what the socket has not taken of the frames last encoded.
    async fn write_unsent(&mut self, peer: SocketAddr) -> Result<(), LinkError> {
        while self.unsent.run < self.unsent.runs.len() {
            let len = |w: &Writer| w.outbound.bytes(&w.unsent.runs[w.unsent.run]).len();
            if len(self) == self.unsent.at {
                self.unsent.run += 1;
                self.unsent.at = 0;
                continue;
            }
            let mut taken = write_within(
                &mut self.half,
                (&self.outbound, &self.unsent),
                self.stall,
                peer,
            )
            .await?;
            // Past the runs taken whole, into the one taken in part.
            while taken > 0 {
                let left = len(self) - self.unsent.at;
                if taken < left {
                    self.unsent.at += taken;
                    break;
                }
                taken -= left;
                self.unsent.run += 1;
                self.unsent.at = 0;
            }
        }
        self.unsent.runs.clear();
        self.unsent.run = 0;
        self.unsent.at = 0;
        Ok(())
    }
}

pub(super) async fn send_heartbeats(
    writer: Arc<Mutex<Writer>>,
    peer: SocketAddr,
    interval: Duration,
) {
    let heartbeat = Frame::new(FrameKind::Heartbeat, 0, Bytes::new());
    loop {
        let due = writer.lock().await.last_sent + interval;
        tokio::time::sleep_until(due).await;
        let mut writer = writer.lock().await;
        if writer.last_sent + interval > Instant::now() {
            continue;
        }
        if let Err(error) = writer.write(peer, std::slice::from_ref(&heartbeat)).await {
            warn!(%peer, %error, "heartbeats stopped");
            return;
        }
        trace!(%peer, "heartbeat sent");
    }
}

/// The sending half of a link; it also sends the heartbeats.
pub struct LinkSender {
    pub(super) peer: SocketAddr,
    pub(super) writer: Arc<Mutex<Writer>>,
    pub(super) heartbeats: JoinHandle<()>,
    /// The link's pulses (stopped when this half closes or goes).
    pub(super) pulses: std::sync::Mutex<Option<Pulses>>,
}

impl LinkSender {
    /// Sends one frame. A send cut in the middle (a stall, or this future
    /// dropped once the frame was encoded) leaves the rest of its frame to
    /// go out before the next one: the stream stays whole for the peer.
    pub async fn send(&self, frame: &Frame) -> Result<(), LinkError> {
        self.send_all(std::slice::from_ref(frame)).await
    }

    /// Sends `frames`, in order, in as few writes as the socket takes them
    /// (up to `WRITE_BATCH_BYTES`, 64 KiB, of payload encoded for each): an
    /// epoch's frames go as one TCP write, not one each. Cut like
    /// [`LinkSender::send`]: the frames encoded go out whole before the
    /// next send, those not yet encoded do not.
    pub async fn send_all(&self, frames: &[Frame]) -> Result<(), LinkError> {
        let mut rest = frames;
        while !rest.is_empty() {
            let mut bytes = 0;
            let count = rest
                .iter()
                .take_while(|frame| {
                    let first = bytes == 0;
                    bytes += frame.payload.len().max(1);
                    first || bytes <= WRITE_BATCH_BYTES
                })
                .count();
            let (batch, after) = rest.split_at(count);
            self.writer.lock().await.write(self.peer, batch).await?;
            rest = after;
        }
        Ok(())
    }

    /// Sends `frame` as this link's last word and closes the sending
    /// direction; heartbeats and pulses stop. A write may wait `patience`
    /// for the peer to take a byte, so that a peer which stopped reading
    /// for a while (a hung disk) finds the word once it reads again. A
    /// frame an earlier send left cut (a stall) is finished first: the
    /// peer reads whole frames up to the word.
    ///
    /// Keep the receiving half open, reading, until the peer closes its
    /// side: a socket closed while bytes from the peer are unread, or
    /// while more arrive, is reset, and a reset throws away what the peer
    /// has not taken yet, the word included.
    pub async fn farewell(&self, frame: &Frame, patience: Duration) -> Result<(), LinkError> {
        self.heartbeats.abort();
        self.pulses.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut writer = self.writer.lock().await;
        writer.stall = patience;
        writer.write(self.peer, std::slice::from_ref(frame)).await?;
        let _ = writer.half.shutdown().await;
        Ok(())
    }

    /// Stops heartbeats and closes the sending direction.
    pub async fn close(&self) {
        self.heartbeats.abort();
        self.pulses.lock().unwrap_or_else(|p| p.into_inner()).take();
        let _ = self.writer.lock().await.half.shutdown().await;
    }
}

impl Drop for LinkSender {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hello::Role;
    use crate::link::tests::{config, pair, plaintext, SECRET, WITHIN};
    use crate::link::{Link, LinkListener};

    /// Issue 9, defect 2: a peer that stops reading (a stopped process
    /// whose kernel still answers window probes) blocked a send forever.
    /// Now the send fails when nothing was taken for the stall timeout (it
    /// hung before: the 10 s bound here ran out).
    #[tokio::test]
    async fn a_send_to_a_peer_that_stopped_reading_fails_in_bounded_time() {
        let a = config("node-a", Role::Primary, SECRET);
        let b = config("node-b", Role::Standby, SECRET);
        let stall = a.send_stall_timeout;
        assert_eq!(stall, Duration::from_millis(1200));
        let listener = LinkListener::bind("127.0.0.1:0", b).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, connected) = tokio::join!(listener.accept(), Link::connect(addr, &a));
        // The standby's side is kept, never read from.
        let _not_reading = accepted.unwrap();
        let connected = connected.unwrap();
        let payload = Bytes::from(vec![0x5au8; 1 << 20]);
        let frame = Frame::message(64, 1, 1, payload).unwrap();
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Err(e) = connected.send(&frame).await {
                    return e;
                }
            }
        })
        .await
        .expect("the send failed instead of blocking");
        assert!(
            matches!(result, LinkError::SendStalled { after, .. } if after == stall),
            "{result}"
        );
        // The buffers filled fast; the failure came one stall timeout later.
        assert!(started.elapsed() < stall + Duration::from_secs(3));
    }

    /// A connected link, sealed or plaintext, as (primary, standby); the
    /// standby does not count a stall of the primary's sends as its
    /// silence (a test may leave it unread for a while).
    async fn linked(sealed: bool) -> (Link, Link) {
        let (mut a, mut b) = (
            config("node-a", Role::Primary, SECRET),
            config("node-b", Role::Standby, SECRET),
        );
        if !sealed {
            (a, b) = (plaintext(a), plaintext(b));
        }
        b.heartbeat_timeout = Duration::from_secs(60);
        let (accepted, connected) = pair(b, a).await;
        (connected.unwrap(), accepted.unwrap())
    }

    /// A link whose standby side is not read yet, and the number of frames
    /// of `len` bytes sent whole before a send stalled (the next one is
    /// cut, or not begun: either way sealed).
    async fn stalled(sealed: bool, len: usize) -> (Link, Link, usize, Frame) {
        let (primary, standby) = linked(sealed).await;
        let big = Frame::message(64, 1, 1, Bytes::from(vec![0x5au8; len])).unwrap();
        let mut whole = 0;
        let error = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match primary.send(&big).await {
                    Ok(()) => whole += 1,
                    Err(e) => return e,
                }
            }
        })
        .await
        .expect("the send stalled");
        assert!(matches!(error, LinkError::SendStalled { .. }), "{error}");
        (primary, standby, whole, big)
    }

    /// The frames the standby side reads until the link ends.
    async fn read_to_the_end(mut standby: Link) -> (Vec<Frame>, LinkError) {
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout(WITHIN, standby.recv()).await {
                Ok(Ok(frame)) => frames.push(frame),
                Ok(Err(end)) => return (frames, end),
                Err(_) => panic!("the link neither ended nor carried a frame"),
            }
        }
    }

    /// A dropped standby that stopped reading (a hung disk) gets the
    /// primary's last word once it reads again, after whole frames: the
    /// frame the stall cut is finished first, and the word waits longer
    /// than a send's stall timeout. Before, the word's send was cut by a
    /// timeout, after a cut frame: the standby read a broken stream.
    ///
    /// With small frames the stall often comes before a frame's first
    /// byte: that frame was sealed all the same, and the peer opens the
    /// next record only after it (throwing it away lost the word).
    #[tokio::test]
    async fn a_farewell_reaches_a_peer_that_reads_again_after_whole_frames() {
        for (sealed, len) in [(true, 1 << 20), (false, 1 << 20), (true, 4096), (true, 100)] {
            let (primary, standby, whole, big) = stalled(sealed, len).await;
            let word = Frame::message(84, 9, 1, Bytes::new()).unwrap();
            let said = tokio::spawn(async move {
                let said = primary
                    .sender
                    .farewell(&word, Duration::from_secs(30))
                    .await;
                // Kept open (as a caller does) until the test ends.
                (said, primary)
            });
            // Longer than the stall timeout before the standby reads again.
            tokio::time::sleep(Duration::from_millis(2000)).await;
            let (frames, end) = read_to_the_end(standby).await;
            let (said, _primary) = said.await.unwrap();
            said.expect("the word was sent");
            assert_eq!(frames.len(), whole + 2, "sealed={sealed}: frames read");
            assert!(
                frames[..=whole].iter().all(|f| *f == big),
                "sealed={sealed}"
            );
            assert_eq!(frames[whole + 1].kind.code(), 84, "sealed={sealed}");
            assert!(
                matches!(end, LinkError::PeerClosed { .. }),
                "sealed={sealed}: the word is followed by the end of the stream: {end}"
            );
        }
    }

    /// A send whose future is dropped in the middle of a frame (a select
    /// that took another branch) leaves the rest of the frame to go out
    /// first: the next frame arrives whole after it.
    #[tokio::test]
    async fn a_send_dropped_in_the_middle_of_a_frame_does_not_break_the_stream() {
        for sealed in [true, false] {
            let (primary, standby, whole, big) = stalled(sealed, 1 << 20).await;
            // Another frame's send, dropped while it waits on the socket.
            let dropped =
                tokio::time::timeout(Duration::from_millis(100), primary.send(&big)).await;
            assert!(dropped.is_err(), "the send was dropped while waiting");
            let reader = tokio::spawn(read_to_the_end(standby));
            let next = Frame::message(65, 2, 1, Bytes::from_static(b"next")).unwrap();
            primary.send(&next).await.expect("sent after the cut frame");
            primary.sender.close().await;
            let (frames, _end) = reader.await.unwrap();
            assert_eq!(frames.len(), whole + 2, "sealed={sealed}: frames read");
            assert!(
                frames[..=whole].iter().all(|f| *f == big),
                "sealed={sealed}"
            );
            assert_eq!(frames[whole + 1], next, "sealed={sealed}");
        }
    }

    /// An epoch's frames go in few writes: small ones together, a large
    /// plaintext payload uncopied between them, a batch split where its
    /// payloads pass [`WRITE_BATCH_BYTES`]. They arrive whole, in order;
    /// and a batch whose send is dropped while the socket is full (after
    /// it was encoded) goes out whole before the next send's frames.
    #[tokio::test]
    async fn frames_sent_together_arrive_whole_and_in_order() {
        let sizes = [3, 100_000, 7, 0, 20_000, 1, 300_000, 2, 40_000, 40_000];
        let frames: Vec<Frame> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let payload: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
                Frame::message(64 + i as u8, i as u64, 1, payload).unwrap()
            })
            .collect();
        for sealed in [true, false] {
            let (primary, mut standby) = linked(sealed).await;
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..2 * sizes.len() {
                    got.push(
                        tokio::time::timeout(WITHIN, standby.recv())
                            .await
                            .unwrap()
                            .unwrap(),
                    );
                }
                got
            });
            primary.sender.send_all(&frames).await.unwrap();
            primary.sender.send_all(&frames).await.unwrap();
            let got = reader.await.unwrap();
            assert_eq!(got[..sizes.len()], frames[..], "sealed={sealed}");
            assert_eq!(got[sizes.len()..], frames[..], "sealed={sealed}");
        }
        // A batch cut after it was encoded: 20 KB frames, three to a
        // write, far more than the socket buffers hold while the standby
        // does not read; the send is dropped while a write waits.
        let many: Vec<Frame> = (0..1000u64)
            .map(|i| Frame::message(70, i, 1, Bytes::from(vec![i as u8; 20_000])).unwrap())
            .collect();
        for sealed in [true, false] {
            let (primary, standby) = linked(sealed).await;
            let dropped =
                tokio::time::timeout(Duration::from_millis(300), primary.sender.send_all(&many))
                    .await;
            assert!(dropped.is_err(), "the send was dropped while waiting");
            let reader = tokio::spawn(read_to_the_end(standby));
            let next = Frame::message(99, 2, 1, Bytes::from_static(b"next")).unwrap();
            primary.send(&next).await.expect("sent after the cut batch");
            primary.sender.close().await;
            let (got, _end) = reader.await.unwrap();
            // The frames encoded before the drop, whole and in order (the
            // cut batch's included), then the next.
            let before = &got[..got.len() - 1];
            assert!(
                !before.is_empty() && before.len() < many.len(),
                "sealed={sealed}: {} frames before the next",
                before.len()
            );
            assert_eq!(before, &many[..before.len()], "sealed={sealed}");
            assert_eq!(got.last(), Some(&next), "sealed={sealed}");
        }
    }

    #[tokio::test]
    async fn heartbeats_keep_an_idle_link_alive() {
        // Heartbeats every 50 ms against a 600 ms timeout: a wide margin
        // for a loaded machine.
        let (mut a, mut b) = (
            config("node-a", Role::Primary, SECRET),
            config("node-b", Role::Standby, SECRET),
        );
        a.heartbeat_timeout = Duration::from_millis(600);
        b.heartbeat_timeout = Duration::from_millis(600);
        let (accepted, connected) = pair(a, b).await;
        let (primary, mut standby) = (accepted.unwrap(), connected.unwrap());
        // Idle for three heartbeat timeouts: recv must neither return a
        // heartbeat nor declare the peer silent.
        let idle = tokio::time::timeout(Duration::from_millis(1800), standby.recv()).await;
        assert!(
            idle.is_err(),
            "recv returned during an idle period: {idle:?}"
        );
        let frame = Frame::message(64, 1, 1, vec![1, 2, 3]).unwrap();
        primary.send(&frame).await.unwrap();
        assert_eq!(
            tokio::time::timeout(WITHIN, standby.recv())
                .await
                .unwrap()
                .unwrap(),
            frame
        );
    }
}
