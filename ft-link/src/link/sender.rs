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
}

/// Writes all of `buf`, failing when no byte is taken for `stall`.
async fn write_all_within(
    half: &mut OwnedWriteHalf,
    buf: &[u8],
    stall: Duration,
    peer: SocketAddr,
) -> Result<(), LinkError> {
    let mut pos = 0;
    while pos < buf.len() {
        match tokio::time::timeout(stall, half.write(&buf[pos..])).await {
            Ok(Ok(0)) => {
                return Err(LinkError::Send {
                    peer,
                    source: std::io::ErrorKind::WriteZero.into(),
                })
            }
            Ok(Ok(n)) => pos += n,
            Ok(Err(source)) => return Err(LinkError::Send { peer, source }),
            Err(_) => return Err(LinkError::SendStalled { peer, after: stall }),
        }
    }
    Ok(())
}

impl Writer {
    async fn write(&mut self, peer: SocketAddr, frame: &Frame) -> Result<(), LinkError> {
        let then = match self.outbound.encode(peer, frame)? {
            Encoded::Buffered => None,
            // Large payloads (page frames) of a plaintext link go out as
            // they are, after the header: no copy into the send buffer.
            Encoded::Then(payload) => Some(payload),
        };
        write_all_within(&mut self.half, &self.outbound.tx, self.stall, peer).await?;
        if let Some(payload) = then {
            write_all_within(&mut self.half, payload, self.stall, peer).await?;
        }
        self.last_sent = Instant::now();
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
    /// Sends one frame. Do not cancel this future: a frame cut in the
    /// middle corrupts the stream for the peer.
    pub async fn send(&self, frame: &Frame) -> Result<(), LinkError> {
        self.writer.lock().await.write(self.peer, frame).await
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
    use crate::link::tests::{config, pair, SECRET, WITHIN};
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
