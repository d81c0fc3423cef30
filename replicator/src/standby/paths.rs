//! The standby's paths to the primary: every listen address accepts
//! connections and reads each one's first message (a new session begins
//! with SyncBegin, a backup path with Backup); a backup path is kept open
//! and watched, so a lost active path can be told from a lost primary.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ft_link::{Link, LinkError, LinkListener};
use tokio::sync::mpsc;
use tracing::warn;

use super::FIRST_FRAME_WITHIN;
use crate::protocol::{Envelope, Message};
use crate::status::StatusBoard;

/// A connection with its first message read.
pub(super) type Arrival = (Link, Envelope);

/// Accepts connections on every listener; each one's first message is read
/// here (so a stalled connection holds up only itself).
pub(super) fn spawn_acceptors(
    listeners: Vec<LinkListener>,
    status: &StatusBoard,
) -> (mpsc::Receiver<Arrival>, Vec<tokio::task::JoinHandle<()>>) {
    let (tx, arrivals) = mpsc::channel(4);
    let tasks = listeners
        .into_iter()
        .map(|listener| {
            let tx = tx.clone();
            let status = status.clone();
            tokio::spawn(async move {
                loop {
                    if tx.is_closed() {
                        return;
                    }
                    let mut link = match listener.accept().await {
                        Ok(link) => link,
                        Err(error) => {
                            warn!(%error, "A-link connection refused");
                            status.update(|s| s.message = Some(error.to_string()));
                            continue;
                        }
                    };
                    // The first message is awaited in a task of its own: a
                    // connection that authenticates and then says nothing
                    // holds up only itself.
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let first = match tokio::time::timeout(FIRST_FRAME_WITHIN, link.recv())
                            .await
                        {
                            Ok(Ok(frame)) => Message::from_frame(frame),
                            Ok(Err(error)) => {
                                warn!(%error, "A-link connection ended before its first message");
                                return;
                            }
                            Err(_) => {
                                warn!("A-link connection sent no first message");
                                return;
                            }
                        };
                        match first {
                            Ok(first) => {
                                let _ = tx.send((link, first)).await;
                            }
                            Err(error) => {
                                warn!(%error, "A-link connection began with a bad message")
                            }
                        }
                    });
                }
            })
        })
        .collect();
    (arrivals, tasks)
}

/// A second path to the primary: kept open (heartbeats both ways) and
/// watched.
pub(super) struct BackupPath {
    _sender: ft_link::LinkSender,
    liveness: ft_link::Liveness,
    /// When the path ended by the primary's side closing or resetting it
    /// (its host was alive then); a silent path leaves this empty.
    closed_by_peer_at: Arc<Mutex<Option<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl BackupPath {
    pub(super) fn watch(link: Link) -> BackupPath {
        let liveness = link.liveness();
        let (sender, mut receiver) = link.split();
        let closed_by_peer_at = Arc::new(Mutex::new(None));
        let closed = Arc::clone(&closed_by_peer_at);
        let task = tokio::spawn(async move {
            // Only heartbeats travel here; anything else is ignored.
            let error = loop {
                if let Err(e) = receiver.recv().await {
                    break e;
                }
            };
            if !matches!(error, LinkError::PeerSilent { .. }) {
                *closed.lock().expect("backup lock") = Some(Instant::now());
            }
        });
        BackupPath {
            _sender: sender,
            liveness,
            closed_by_peer_at,
            task,
        }
    }

    /// When the primary last showed life on this path: its last frame or
    /// heartbeat, or its side closing or resetting the connection, if that
    /// came later.
    pub(super) fn last_heard(&self) -> Instant {
        let arrival = self.liveness.last_arrival();
        self.closed_by_peer_at
            .lock()
            .expect("backup lock")
            .map_or(arrival, |closed| closed.max(arrival))
    }

    /// Whether the primary showed life on this path after `since`: a frame
    /// or heartbeat arrived, or its side closed or reset the connection (a
    /// host that lost power does neither).
    pub(super) fn heard_primary_after(&self, since: Instant) -> bool {
        self.last_heard() > since
    }
}

/// What watching the backup path after the active path failed came to.
pub(super) enum Watched {
    /// The primary began a new session (it lives).
    NewSession(Box<Arrival>),
    /// Nothing more came on the backup path for the silence timeout: the
    /// primary is lost on every path.
    Silent,
    /// The primary's side closed or reset the backup path.
    Closed,
}

/// Watches `backup` until the primary begins a new session, or the path
/// falls silent for `silence`, or the primary's side closes it. (A cut of
/// the paths one after the other must not leave a replica that nobody
/// takes over: the backup path is watched until it decides.)
pub(super) async fn watch_backup(
    backup: &BackupPath,
    arrivals: &mut mpsc::Receiver<Arrival>,
    silence: std::time::Duration,
) -> Watched {
    let since = Instant::now();
    loop {
        if backup
            .closed_by_peer_at
            .lock()
            .expect("backup lock")
            .is_some()
        {
            return Watched::Closed;
        }
        let quiet_until = backup.liveness.last_arrival() + silence;
        let now = Instant::now();
        if now >= quiet_until && now >= since + silence {
            return Watched::Silent;
        }
        let wake = quiet_until.max(since + silence).min(now + silence / 4);
        tokio::select! {
            arrival = arrivals.recv() => match arrival {
                Some(arrival) if arrival.1.message != Message::Backup => {
                    return Watched::NewSession(Box::new(arrival));
                }
                // A backup path of the session that ended: the primary
                // lives (the session ends without a takeover, a new one is
                // on its way).
                Some(_) => {}
                None => return Watched::Closed,
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

impl Drop for BackupPath {
    fn drop(&mut self) {
        self.task.abort();
    }
}
