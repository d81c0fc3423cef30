//! VM moves forwarded over the pair channel: a switchover (or an HA VM's
//! live migration) asked through the API of the node that does not run the
//! VM's primary is passed to the node that does, and its answer comes back
//! as the API's answer. So either node's console and API can move any VM.
//!
//! An ask belongs to the pair-channel session it was made in: it is sent
//! only there, and it fails when that session ends, so an ask never
//! reaches the peer late, on a later connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::wire::{MoveAnswer, MoveAsk, MoveOutcome, PairMessage};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the pair channel to {peer} is down")]
    ChannelDown { peer: String },
    #[error(
        "{peer}'s daemon is an older version that cannot take a move asked here: ask {peer}'s \
         API (ftctl vm switchover does)"
    )]
    PeerTooOld { peer: String },
    #[error(
        "the pair channel to {peer} went down before it answered: the move may have happened \
         (see the VM's events before asking again)"
    )]
    Unanswered { peer: String },
    #[error(
        "{peer} did not answer within {} s: the move may still happen (see the VM's events \
         before asking again)",
        .within.as_secs()
    )]
    Late { peer: String, within: Duration },
}

/// An outgoing message and the pair-channel session it belongs to.
type Outgoing = (u64, PairMessage);

/// The asks awaiting the peer's answer, and the session they belong to.
#[derive(Default)]
struct Pending {
    /// The current session's number; 0 while no session runs.
    session: u64,
    asks: HashMap<u64, (u64, oneshot::Sender<MoveOutcome>)>,
}

/// The asks this node made of its peer and awaits, and the messages they
/// and this node's answers put on the channel.
pub struct Forwards {
    next_id: AtomicU64,
    sessions: AtomicU64,
    pending: Mutex<Pending>,
    out_tx: mpsc::UnboundedSender<Outgoing>,
    out_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Outgoing>>,
}

impl Default for Forwards {
    fn default() -> Self {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        Forwards {
            next_id: AtomicU64::new(1),
            sessions: AtomicU64::new(0),
            pending: Mutex::new(Pending::default()),
            out_tx,
            out_rx: tokio::sync::Mutex::new(out_rx),
        }
    }
}

/// A running pair-channel session: its asks fail when it is dropped,
/// however the session ends (an error, or its future dropped because the
/// peer came back on a new connection).
pub struct Session<'a> {
    forwards: &'a Forwards,
    number: u64,
}

impl Session<'_> {
    pub fn number(&self) -> u64 {
        self.number
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.forwards.end(self.number);
    }
}

impl Forwards {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the peer to move `vm` to this node; waits at most `within` for
    /// its answer.
    pub async fn ask(
        &self,
        peer: &str,
        vm: &str,
        by: &str,
        within: Duration,
    ) -> Result<MoveOutcome, ForwardError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let ask = MoveAsk {
            id,
            vm: vm.into(),
            by: by.into(),
        };
        {
            // The session is read, the ask recorded and queued at once: a
            // session that ends meanwhile fails it.
            let mut pending = self.pending();
            let session = pending.session;
            if session == 0
                || self
                    .out_tx
                    .send((session, PairMessage::MoveAsk(ask)))
                    .is_err()
            {
                return Err(ForwardError::ChannelDown { peer: peer.into() });
            }
            pending.asks.insert(id, (session, tx));
        }
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(ForwardError::Unanswered { peer: peer.into() }),
            Err(_) => {
                // Given up: if it is still queued, it is never sent.
                self.pending().asks.remove(&id);
                Err(ForwardError::Late {
                    peer: peer.into(),
                    within,
                })
            }
        }
    }

    /// The peer's answer to one of this node's asks (an answer to none,
    /// or to one given up on, is dropped).
    pub fn answered(&self, answer: MoveAnswer) {
        let waiting = self.pending().asks.remove(&answer.id);
        match waiting {
            Some((_, tx)) => {
                let _ = tx.send(answer.outcome);
            }
            None => tracing::info!(
                id = answer.id,
                "pair channel: an answer to an ask no longer awaited"
            ),
        }
    }

    /// Puts this node's answer to the peer's ask on the current session.
    pub fn answer(&self, answer: MoveAnswer) {
        let session = self.pending().session;
        if session == 0
            || self
                .out_tx
                .send((session, PairMessage::MoveAnswer(answer)))
                .is_err()
        {
            tracing::warn!("pair channel: down, an answer to the peer's ask is lost");
        }
    }

    /// A pair-channel session begins; it ends when the guard is dropped.
    pub fn begin(&self) -> Session<'_> {
        let number = self.sessions.fetch_add(1, Ordering::SeqCst) + 1;
        self.pending().session = number;
        Session {
            forwards: self,
            number,
        }
    }

    /// Session `n` ended: its asks fail (their senders are dropped).
    fn end(&self, n: u64) {
        let mut pending = self.pending();
        if pending.session == n {
            pending.session = 0;
        }
        pending.asks.retain(|_, (session, _)| *session != n);
    }

    /// The next message of session `n` to send: those of other sessions,
    /// and asks no longer awaited, are dropped. Only one session runs at a
    /// time.
    pub async fn next_outgoing(&self, n: u64) -> Option<PairMessage> {
        let mut rx = self.out_rx.lock().await;
        loop {
            let (session, message) = rx.recv().await?;
            if session != n {
                continue;
            }
            if let PairMessage::MoveAsk(ask) = &message {
                if !self.pending().asks.contains_key(&ask.id) {
                    continue;
                }
            }
            return Some(message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(id: u64) -> MoveAnswer {
        MoveAnswer {
            id,
            outcome: MoveOutcome::Refused {
                reason: "not protected".into(),
            },
        }
    }

    #[tokio::test]
    async fn an_ask_without_a_session_fails_at_once() {
        let f = Forwards::default();
        let e = f
            .ask("node-a", "vm", "admin", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ForwardError::ChannelDown { .. }), "{e}");
    }

    #[tokio::test]
    async fn an_ask_is_sent_on_its_session_and_gets_its_answer() {
        let f = std::sync::Arc::new(Forwards::default());
        let session = f.begin();
        let n = session.number();
        let asker = {
            let f = f.clone();
            tokio::spawn(
                async move { f.ask("node-a", "vm", "admin", Duration::from_secs(5)).await },
            )
        };
        let Some(PairMessage::MoveAsk(ask)) = f.next_outgoing(n).await else {
            panic!("no ask sent");
        };
        assert_eq!((ask.vm.as_str(), ask.by.as_str()), ("vm", "admin"));
        f.answered(answer(ask.id + 100)); // not ours: dropped
        f.answered(answer(ask.id));
        let outcome = asker.await.unwrap().unwrap();
        assert_eq!(outcome, answer(ask.id).outcome);
    }

    #[tokio::test]
    async fn an_ask_fails_when_its_session_ends_and_is_never_sent_on_the_next() {
        let f = std::sync::Arc::new(Forwards::default());
        let first = f.begin();
        let asker = {
            let f = f.clone();
            tokio::spawn(
                async move { f.ask("node-a", "vm", "admin", Duration::from_secs(5)).await },
            )
        };
        // Wait until the ask is queued, then end the session unsent.
        while f.pending().asks.is_empty() {
            tokio::task::yield_now().await;
        }
        // Dropped, as when the peer's new connection replaces this one.
        drop(first);
        let e = asker.await.unwrap().unwrap_err();
        assert!(matches!(e, ForwardError::Unanswered { .. }), "{e}");
        let second = f.begin();
        f.answer(answer(9));
        match f.next_outgoing(second.number()).await {
            Some(PairMessage::MoveAnswer(a)) => assert_eq!(a.id, 9),
            other => panic!("the old session's ask came out on the new one: {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unanswered_ask_gives_up_after_its_time() {
        let f = Forwards::default();
        let session = f.begin();
        let e = f
            .ask("node-a", "vm", "admin", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, ForwardError::Late { .. }), "{e}");
        assert!(f.pending().asks.is_empty());
        // Still queued (the channel was busy), it is never sent now.
        f.answer(answer(3));
        match f.next_outgoing(session.number()).await {
            Some(PairMessage::MoveAnswer(a)) => assert_eq!(a.id, 3),
            other => panic!("an ask given up on was sent: {other:?}"),
        }
    }
}
