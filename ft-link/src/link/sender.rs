//! [`LinkSender`], the sending half of a link: frames written with a bound
//! on stalls, and the heartbeat task.

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

use super::stream::{Encoded, Outbound};
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
    /// The frame last encoded, until the socket took all of it.
    pub(super) unsent: Option<Unsent>,
}

/// How much of the frame last encoded the socket took: its head is in the
/// outbound stream's `tx`, a large plaintext payload follows it.
pub(super) struct Unsent {
    head_at: usize,
    payload: Option<Bytes>,
    payload_at: usize,
}

/// Writes part of `buf`; fails when no byte is taken for `stall`.
/// Cancel-safe: a write that is dropped took nothing.
async fn write_within(
    half: &mut OwnedWriteHalf,
    buf: &[u8],
    stall: Duration,
    peer: SocketAddr,
) -> Result<usize, LinkError> {
    match tokio::time::timeout(stall, half.write(buf)).await {
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
    /// Writes `frame`. A frame whose write was cut before (a stall, or a
    /// send whose future was dropped) goes out first, whole, so that the
    /// peer reads whole frames; even one of which nothing went out yet: a
    /// sealed stream counts every record it sealed, and the peer opens
    /// the next only after it.
    async fn write(&mut self, peer: SocketAddr, frame: &Frame) -> Result<(), LinkError> {
        self.write_unsent(peer).await?;
        let payload = match self.outbound.encode(peer, frame)? {
            Encoded::Buffered => None,
            // Large payloads (page frames) of a plaintext link go out as
            // they are, after the header: no copy into the send buffer.
            Encoded::Then(payload) => Some(payload),
        };
        self.unsent = Some(Unsent {
            head_at: 0,
            payload,
            payload_at: 0,
        });
        self.write_unsent(peer).await?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Writes what the socket has not taken of the frame last encoded.
    async fn write_unsent(&mut self, peer: SocketAddr) -> Result<(), LinkError> {
        let Some(unsent) = self.unsent.as_mut() else {
            return Ok(());
        };
        let head = &self.outbound.tx;
        while unsent.head_at < head.len() {
            unsent.head_at +=
                write_within(&mut self.half, &head[unsent.head_at..], self.stall, peer).await?;
        }
        if let Some(payload) = &unsent.payload {
            while unsent.payload_at < payload.len() {
                unsent.payload_at += write_within(
                    &mut self.half,
                    &payload[unsent.payload_at..],
                    self.stall,
                    peer,
                )
                .await?;
            }
        }
        self.unsent = None;
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
        if let Err(error) = writer.write(peer, &heartbeat).await {
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
        self.writer.lock().await.write(self.peer, frame).await
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
        writer.write(self.peer, frame).await?;
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

    /// A link whose standby side is not read yet, and the number of frames
    /// of `len` bytes sent whole before a send stalled (the next one is
    /// cut, or not begun: either way sealed).
    async fn stalled(sealed: bool, len: usize) -> (Link, Link, usize, Frame) {
        let (mut a, mut b) = (
            config("node-a", Role::Primary, SECRET),
            config("node-b", Role::Standby, SECRET),
        );
        if !sealed {
            (a, b) = (plaintext(a), plaintext(b));
        }
        // The reading side must not count the stall as the peer's silence.
        b.heartbeat_timeout = Duration::from_secs(60);
        let (accepted, connected) = pair(b, a).await;
        let (standby, primary) = (accepted.unwrap(), connected.unwrap());
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
