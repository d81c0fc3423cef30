//! Telling a dropped standby that it is dropped: `Release`, the last word
//! on the session's A-link (no takeover; the standby keeps its replica to
//! compare against in the next session).
//!
//! A standby is dropped because it stopped taking what it is sent (its
//! disk hung, say), so the word may wait behind everything it has not read
//! yet. It is written without a deadline of its own by a task that
//! outlives the session (after the rest of any frame a stalled send cut),
//! and the connection stays open until the standby closes its side: a
//! connection closed while the standby's bytes arrive is reset, and a reset
//! throws away whatever the standby has not taken yet, the word included.
//! Without a witness (and without a backup path to hear this node on), a
//! standby that misses the word takes the closed link for a lost primary;
//! it misses it when it hangs longer than the patience, or when this
//! process ends meanwhile (the task ends with the runtime).

use std::time::Duration;

use ft_link::{LinkError, LinkReceiver, LinkSender};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{AckEvent, PrimaryError};
use crate::protocol::Message;

/// How long the word may wait on the standby, and the connection for the
/// standby's side to close: a disk that hangs longer than this has its
/// standby take the closed link as the word (see the module's note).
pub(super) const RELEASE_PATIENCE: Duration = Duration::from_secs(120);

/// A send that stalled while the standby protected the VM and was heard
/// lately (`last_heard`, given while it protected the VM: its heartbeats
/// come; it lives but does not read) drops a live standby; one that
/// stalled while it was silent too is a lost path or standby.
pub(super) fn judge_stall(
    error: PrimaryError,
    last_heard: Option<std::time::Instant>,
    heartbeat_interval: Duration,
) -> PrimaryError {
    match error {
        PrimaryError::Link(LinkError::SendStalled { after, .. })
            if last_heard.is_some_and(|at| at.elapsed() <= heartbeat_interval * 3) =>
        {
            PrimaryError::StandbyNotReading { stalled: after }
        }
        error => error,
    }
}

/// Whether `error` dropped a standby that is still there (it counts as a
/// drop).
pub(super) fn drops_a_live_standby(error: &PrimaryError) -> bool {
    matches!(
        error,
        PrimaryError::StandbyUnresponsive { .. } | PrimaryError::StandbyNotReading { .. }
    )
}

/// Whether the standby is told it is dropped after `error`: a live standby
/// that was dropped, and one behind a stalled send (a standby silent too
/// may only be cut off for a while: it finds the word if the path comes
/// back before it is taken for lost).
pub(super) fn tells_release(error: &PrimaryError) -> bool {
    drops_a_live_standby(error)
        || matches!(error, PrimaryError::Link(LinkError::SendStalled { .. }))
}

/// Tells the standby over `tx` that it is dropped, then keeps the link
/// until the standby closes it or `patience` runs out: its words, arriving
/// on `acks`, are set aside; once their reader ends (the standby closed,
/// or fell silent), what still arrives is read from the receiving half it
/// hands back, and thrown away.
pub(super) fn tell_dropped(
    tx: LinkSender,
    (mut acks, reader): (mpsc::UnboundedReceiver<AckEvent>, JoinHandle<LinkReceiver>),
    (epoch, generation): (u64, u64),
    patience: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let until = tokio::time::Instant::now() + patience;
        let release = Message::Release.into_frame(epoch, generation);
        if let Err(error) = tx.farewell(&release, patience).await {
            warn!(%error, "could not tell the dropped standby so");
            return;
        }
        info!(epoch, "the dropped standby is told so");
        let ended =
            tokio::time::timeout_at(until, async { while acks.recv().await.is_some() {} }).await;
        // A silent standby may read again later: its side is read until it
        // closes (at once if it did already).
        if ended.is_ok() {
            if let Ok(rx) = reader.await {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                rx.discard_until_closed(left).await;
            }
        }
        drop(tx);
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use ft_link::{
        CpuFeatureSummary, Frame, Hello, Link, LinkConfig, LinkListener, PairSecret, Role,
    };

    use super::*;
    use crate::protocol::Envelope;

    const WITHIN: Duration = Duration::from_secs(5);

    fn config(role: Role) -> LinkConfig {
        let hello = Hello::new(
            format!("test-{role}"),
            role,
            CpuFeatureSummary {
                name: "x86-64-v2".into(),
                words: vec![1, 2, 3],
            },
            "test-vm",
        );
        let secret = PairSecret::new(b"release-test-pair-secret-0123456".to_vec()).unwrap();
        let mut config = LinkConfig::new(secret, hello);
        config.heartbeat_interval = Duration::from_millis(50);
        // Neither side counts the other's stall as a silence.
        config.heartbeat_timeout = Duration::from_secs(60);
        config.pulses = false;
        config
    }

    /// A linked pair over loopback: the standby's side (configured with
    /// `standby_config`) and the primary's.
    async fn linked(standby_config: LinkConfig) -> (Link, Link) {
        let listener = LinkListener::bind("127.0.0.1:0", standby_config)
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let primary_config = config(Role::Primary);
        let (standby, primary) =
            tokio::join!(listener.accept(), Link::connect(addr, &primary_config));
        (standby.unwrap(), primary.unwrap())
    }

    /// A standby whose disk hung stops reading its link; the primary drops
    /// it after a stalled send (a frame cut in the middle). Once it reads
    /// again, it finds whole frames and then `Release` (no takeover), and
    /// the primary's side of the connection stays open until the
    /// standby's closes, so that no reset throws the word away. Before,
    /// the word's send was given up after 500 ms behind a cut frame.
    #[tokio::test]
    async fn a_standby_that_reads_again_finds_release_after_whole_frames() {
        let (mut standby, primary) = linked(config(Role::Standby)).await;
        // The primary reads the standby's side as a session does.
        let heard = primary.liveness();
        let (tx, rx) = primary.split();
        let (held_tx, _held) = mpsc::unbounded_channel();
        let reading = super::super::spawn_ack_reader(rx, 1, held_tx, Duration::from_secs(60));
        let big = Frame::message(64, 1, 1, Bytes::from(vec![0x5a; 1 << 20])).unwrap();
        let mut whole = 0;
        let stalled = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match tx.send(&big).await {
                    Ok(()) => whole += 1,
                    Err(error) => return error,
                }
            }
        })
        .await
        .expect("the send stalled");
        // The standby's heartbeats came all along: it lives, and does not
        // read.
        let error = judge_stall(
            PrimaryError::Link(stalled),
            Some(heard.last_arrival()),
            Duration::from_millis(50),
        );
        assert!(drops_a_live_standby(&error), "{error}");
        let telling = tell_dropped(tx, reading, (0, 1), Duration::from_secs(60));
        // The standby reads again after longer than a send's stall timeout.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut read = 0;
        let word = loop {
            let frame = tokio::time::timeout(WITHIN, standby.recv())
                .await
                .expect("a frame arrived")
                .expect("the stream is whole");
            if frame != big {
                break frame;
            }
            read += 1;
        };
        assert_eq!(read, whole + 1, "the frames sent whole and the one cut");
        let word = Message::from_frame(word).expect("a protocol message");
        assert_eq!(
            word,
            Envelope {
                message: Message::Release,
                epoch: 0,
                generation: 1
            }
        );
        // The primary's side waits for the standby's to close.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!telling.is_finished(), "the primary closed first");
        drop(standby);
        tokio::time::timeout(WITHIN, telling)
            .await
            .expect("the primary's side closed after the standby's")
            .unwrap();
    }

    /// A stalled send to a standby that fell silent too is a lost path or
    /// standby (a partition), not a drop; it is still told, in case the
    /// path comes back.
    #[test]
    fn a_stall_counts_as_a_drop_only_while_the_standby_is_heard() {
        let stall = || {
            PrimaryError::Link(LinkError::SendStalled {
                peer: "127.0.0.1:1".parse().unwrap(),
                after: Duration::from_millis(1200),
            })
        };
        let interval = Duration::from_millis(100);
        let now = std::time::Instant::now();
        let heard = judge_stall(stall(), Some(now), interval);
        assert!(
            matches!(heard, PrimaryError::StandbyNotReading { .. }),
            "{heard}"
        );
        assert!(drops_a_live_standby(&heard) && tells_release(&heard));
        let silent = judge_stall(stall(), Some(now - Duration::from_secs(1)), interval);
        assert!(
            matches!(silent, PrimaryError::Link(LinkError::SendStalled { .. })),
            "{silent}"
        );
        assert!(!drops_a_live_standby(&silent) && tells_release(&silent));
        // During the copy (the VM not protected yet) a stall is no drop.
        let copying = judge_stall(stall(), None, interval);
        assert!(!drops_a_live_standby(&copying) && tells_release(&copying));
        let other = PrimaryError::AckStreamEnded;
        assert!(!tells_release(&judge_stall(other, Some(now), interval)));
    }

    /// A standby that falls silent as well (its whole host hangs) may
    /// still read again: the primary's side of the link stays open, read,
    /// until the standby closes its side, and no longer (it slept out its
    /// whole patience before).
    #[tokio::test]
    async fn a_silent_standby_finds_release_and_its_close_ends_the_wait() {
        let mut standby_config = config(Role::Standby);
        // It sends nothing: no heartbeats.
        standby_config.heartbeat_interval = Duration::from_secs(600);
        let (mut standby, primary) = linked(standby_config).await;
        let (tx, rx) = primary.split();
        let (held_tx, _held) = mpsc::unbounded_channel();
        // Its reader judges the standby silent after a second.
        let reading = super::super::spawn_ack_reader(rx, 1, held_tx, Duration::from_millis(200));
        let telling = tell_dropped(tx, reading, (5, 1), Duration::from_secs(120));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let word = tokio::time::timeout(WITHIN, standby.recv())
            .await
            .expect("a frame arrived")
            .expect("the word");
        let word = Message::from_frame(word).expect("a protocol message");
        assert_eq!(word.message, Message::Release);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!telling.is_finished(), "the primary closed first");
        drop(standby);
        tokio::time::timeout(WITHIN, telling)
            .await
            .expect("the primary's side closed once the standby's did")
            .unwrap();
    }
}
