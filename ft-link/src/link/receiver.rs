//! [`LinkReceiver`], the receiving half of a link, and [`Liveness`]: frames
//! read and checked, heartbeats skipped, a silent peer detected.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::tcp::OwnedReadHalf;
use tokio::time::Instant;
use tracing::warn;

use super::arrival::{self, ArrivalClock};
use super::handshake::refusal_error;
use super::stream::Inbound;
use super::LinkError;
use crate::frame::{Frame, FrameKind};

/// When anything (heartbeats included) last arrived on a link, readable
/// while another task is blocked receiving on it.
#[derive(Debug, Clone)]
pub struct Liveness {
    base: Instant,
    /// Microseconds after `base` of the last arrival.
    last_us: Arc<std::sync::atomic::AtomicU64>,
    /// Microseconds after `base` of the last pulse (0: none yet).
    last_pulse_us: Arc<std::sync::atomic::AtomicU64>,
}

impl Liveness {
    pub(super) fn new() -> Liveness {
        Liveness {
            base: Instant::now(),
            last_us: Arc::default(),
            last_pulse_us: Arc::default(),
        }
    }

    /// A pulse arrived now (from the pulse thread).
    pub(crate) fn mark_pulse(&self) {
        let us = self.base.elapsed().as_micros().max(1) as u64;
        self.last_pulse_us
            .fetch_max(us, std::sync::atomic::Ordering::Relaxed);
        self.last_us
            .fetch_max(us, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a pulse arrived at most `within` before `at` (or after it):
    /// pulses were coming when something arrived at `at`.
    fn pulsed_near(&self, at: Instant, within: Duration) -> bool {
        match self
            .last_pulse_us
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => false,
            us => self.base + Duration::from_micros(us) + within >= at,
        }
    }

    /// Something arrived at `at` (not earlier than the link's start).
    pub(crate) fn mark_at(&self, at: Instant) {
        let us = at.saturating_duration_since(self.base).as_micros() as u64;
        self.last_us
            .fetch_max(us, std::sync::atomic::Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_micros(self.last_us.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The last arrival (the link's start if nothing arrived yet).
    pub fn last_arrival(&self) -> std::time::Instant {
        self.last().into_std()
    }
}

/// The receiving half of a link.
pub struct LinkReceiver {
    pub(super) peer: SocketAddr,
    pub(super) reader: OwnedReadHalf,
    /// This direction's stream: sealed or plaintext.
    pub(super) inbound: Inbound,
    pub(super) liveness: Liveness,
    pub(super) silence_timeout: Duration,
    /// Bytes count as heard when they arrived, not when read (a link with
    /// pulses, whose kernel stamps arrivals, for bytes that arrived while
    /// its pulses came: see [`arrival`]).
    pub(super) stamped: Option<ArrivalClock>,
    /// The peer is not declared silent within this long of the last read
    /// that took bytes (the heartbeat interval): a receiver that drained a
    /// backlog gives its peer, which the backlog may have held back, time
    /// to send again.
    pub(super) read_grace: Duration,
    /// When a read last took bytes.
    pub(super) last_read: Instant,
    pub(super) ended: bool,
}

impl LinkReceiver {
    /// A handle telling when the peer was last heard on this link.
    pub fn liveness(&self) -> Liveness {
        self.liveness.clone()
    }

    /// The next frame that is not a heartbeat. Fails with
    /// [`LinkError::PeerSilent`] when nothing arrived for the heartbeat
    /// timeout. Cancel-safe. Any error is final.
    pub async fn recv(&mut self) -> Result<Frame, LinkError> {
        if self.ended {
            return Err(LinkError::Ended { peer: self.peer });
        }
        let result = self.next_frame().await;
        if let Err(error) = &result {
            warn!(peer = %self.peer, %error, "A-link ended");
            self.ended = true;
        }
        result
    }

    /// Reads and throws away whatever arrives until the peer closes or
    /// resets its side, or `within` passes; silence does not end it. For a
    /// side that said its last word and must not close first: a socket
    /// closed while the peer's bytes are unread, or while more arrive, is
    /// reset, and a reset throws away what the peer has not read yet.
    pub async fn discard_until_closed(mut self, within: Duration) {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 << 10];
        let _ = tokio::time::timeout(within, async {
            while let Ok(1..) = self.reader.read(&mut buf).await {}
        })
        .await;
    }

    /// From now on the peer is silent after `timeout` (a session may allow
    /// more while a silence could not lead to a takeover anyway).
    pub fn set_silence_timeout(&mut self, timeout: Duration) {
        self.silence_timeout = timeout;
    }

    /// When the peer is silent unless something arrives first.
    fn silence_deadline(&self) -> Instant {
        (self.liveness.last() + self.silence_timeout).max(self.last_read + self.read_grace)
    }

    async fn next_frame(&mut self) -> Result<Frame, LinkError> {
        let peer = self.peer;
        loop {
            match self.inbound.next_frame(peer, u32::MAX)? {
                Some(frame) if frame.kind == FrameKind::Heartbeat => continue,
                Some(frame) if frame.kind == FrameKind::Refusal => {
                    return Err(refusal_error(peer, &frame.payload));
                }
                Some(frame) => return Ok(frame),
                None => {}
            }
            // Silence is judged on bytes and pulses alike (a pulse may
            // have come in while this waited: look again before judging).
            let deadline = self.silence_deadline();
            let stream = self.reader.as_ref();
            let read = arrival::read_stamped(stream, &mut self.inbound.raw);
            let read = match tokio::time::timeout_at(deadline, read).await {
                Ok(read) => read,
                // Bytes already there were heard, even if the runtime put
                // the read off past the deadline.
                Err(_) => match arrival::try_read_stamped(stream, &mut self.inbound.raw) {
                    Ok(Some(read)) => Ok(read),
                    Ok(None) if self.silence_deadline() > Instant::now() => continue,
                    Ok(None) => {
                        return Err(LinkError::PeerSilent {
                            peer,
                            after: self.liveness.last().elapsed(),
                        })
                    }
                    Err(source) => Err(source),
                },
            };
            match read {
                Err(source) => return Err(LinkError::Receive { peer, source }),
                Ok(read) if read.len == 0 => return Err(self.inbound.end_of_stream(peer)),
                Ok(read) => {
                    self.last_read = Instant::now();
                    // A stamp counts when pulses were coming at the time it
                    // names (however long ago this receiver got to it):
                    // without them, a peer this receiver held back has
                    // nothing else to show that it lived.
                    let arrived = match self.stamped.as_mut().map(|c| c.arrival(read.stamp)) {
                        Some(at) if self.liveness.pulsed_near(at, self.silence_timeout) => at,
                        _ => self.last_read,
                    };
                    self.liveness.mark_at(arrived);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::auth::Side;
    use crate::frame::FrameError;
    use crate::hello::Role;
    use crate::link::handshake::handshake;
    use crate::link::tests::{config, encoded, pair, plaintext, SECRET, WITHIN};
    use crate::link::{Link, LinkListener};

    /// A raw peer that runs the real handshake as the connecting side and
    /// then owns the bare socket.
    /// A peer that writes raw bytes after a plaintext handshake (these
    /// tests are of the frames themselves; sealed links: `link::tests`).
    async fn raw_connected_peer(addr: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        handshake(
            &mut stream,
            Side::Connecting,
            &plaintext(config("raw", Role::Standby, SECRET)),
        )
        .await
        .unwrap();
        stream
    }

    async fn listener_with_raw_peer() -> (Link, TcpStream) {
        let listener =
            LinkListener::bind("127.0.0.1:0", plaintext(config("a", Role::Primary, SECRET)))
                .await
                .unwrap();
        let addr = listener.local_addr().unwrap();
        let (link, raw) = tokio::time::timeout(WITHIN, async {
            tokio::join!(listener.accept(), raw_connected_peer(addr))
        })
        .await
        .expect("handshake finished");
        (link.unwrap(), raw)
    }

    #[tokio::test]
    async fn a_corrupt_frame_ends_the_link_with_a_checksum_error() {
        let (mut link, mut raw) = listener_with_raw_peer().await;
        let mut wire = encoded(&Frame::message(65, 4, 1, vec![0x55u8; 256]).unwrap());
        wire[100] ^= 0x01;
        raw.write_all(&wire).await.unwrap();
        let err = tokio::time::timeout(WITHIN, link.recv())
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(
                err,
                LinkError::Corrupt {
                    source: FrameError::Checksum { epoch: 4, .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("checksum"));
        // Ended: the link closed its direction and refuses further use.
        assert!(matches!(link.recv().await, Err(LinkError::Ended { .. })));
        let mut rest = Vec::new();
        tokio::time::timeout(WITHIN, raw.read_to_end(&mut rest))
            .await
            .expect("the link closed its sending direction")
            .unwrap();
    }

    #[tokio::test]
    async fn a_silent_peer_is_detected_within_the_timeout() {
        let (mut link, _raw_kept_open) = listener_with_raw_peer().await;
        let started = Instant::now();
        let err = tokio::time::timeout(WITHIN, link.recv())
            .await
            .expect("silence detected within the bound")
            .unwrap_err();
        match err {
            LinkError::PeerSilent { after, .. } => {
                assert!(
                    after >= Duration::from_millis(300),
                    "declared silent after {after:?}"
                );
                assert!(started.elapsed() < Duration::from_secs(2));
            }
            other => panic!("wrong error {other}"),
        }
    }

    #[tokio::test]
    async fn a_peer_that_closes_gives_peer_closed() {
        let (accepted, connected) = pair(
            config("node-a", Role::Primary, SECRET),
            config("node-b", Role::Standby, SECRET),
        )
        .await;
        let mut primary = accepted.unwrap();
        drop(connected.unwrap());
        let err = tokio::time::timeout(WITHIN, primary.recv())
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, LinkError::PeerClosed { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_stream_ending_inside_a_frame_is_truncated() {
        let (mut link, mut raw) = listener_with_raw_peer().await;
        let wire = encoded(&Frame::message(65, 2, 1, vec![1u8; 100]).unwrap());
        raw.write_all(&wire[..60]).await.unwrap();
        drop(raw);
        let err = tokio::time::timeout(WITHIN, link.recv())
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(err, LinkError::Truncated { received: 60, .. }),
            "{err}"
        );
    }

    /// The far end of a link on a runtime that runs nothing for `busy`
    /// after the handshake (a node whose CPUs the guest takes), then sends
    /// one message; what the near end's `recv` gives.
    fn recv_from_a_starved_peer(pulses: bool, busy: Duration) -> Result<Frame, LinkError> {
        let mut near = config("node-a", Role::Standby, SECRET);
        near.pulses = pulses;
        let mut far = config("node-b", Role::Primary, SECRET);
        far.pulses = pulses;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(LinkListener::bind("127.0.0.1:0", near))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let starved = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let link = Link::connect(addr, &far).await.unwrap();
                // Busy: this runtime (its heartbeat task included) runs
                // nothing for a while.
                std::thread::sleep(busy);
                let after = Frame::message(64, 1, 0, Bytes::from_static(b"after")).unwrap();
                let _ = link.send(&after).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            });
        });
        let result = runtime.block_on(async {
            let mut link = listener.accept().await.unwrap();
            tokio::time::timeout(WITHIN, link.recv()).await.unwrap()
        });
        starved.join().unwrap();
        result
    }

    /// Issue 12: heartbeats queued on a starved runtime let a live peer be
    /// declared silent (the control below); pulses come from a thread of
    /// their own and keep it alive.
    #[test]
    fn pulses_keep_a_starved_peer_alive() {
        let busy = Duration::from_millis(1200);
        let frame = recv_from_a_starved_peer(true, busy).expect("alive through its pulses");
        assert_eq!(&frame.payload[..], b"after");
        let silent = recv_from_a_starved_peer(false, busy);
        assert!(
            matches!(silent, Err(LinkError::PeerSilent { .. })),
            "without pulses a starved peer is declared silent: {silent:?}"
        );
    }

    #[tokio::test]
    async fn a_dead_peers_pulses_stop_and_it_is_declared_silent() {
        let (accepted, connected) = pair(
            config("node-a", Role::Primary, SECRET),
            config("node-b", Role::Standby, SECRET),
        )
        .await;
        let mut near = accepted.unwrap();
        let far = connected.unwrap();
        // The far end's process freezes: its pulses and heartbeats stop,
        // its socket stays open.
        let (far_tx, _far_rx) = far.split();
        far_tx.heartbeats.abort();
        far_tx.pulses.lock().unwrap().take();
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(WITHIN, near.recv())
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, LinkError::PeerSilent { .. }), "{err}");
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
    }
}
