//! The pair channel: the two daemons' link over the management network,
//! authenticated like the A-link (the pair secret, HMAC challenge and
//! response; ft-link does the handshake, framing and heartbeats). Each
//! side sends its whole state when it changes and every second; each
//! merges what it receives (newer VM records and deletes win, see
//! [`crate::store::VmRecord::precedence`]), so either node's API shows
//! and accepts the same VMs, and a node that was away catches up on its
//! first exchange.
//!
//! The states also carry the event and audit logs' entries the other node
//! lacks, so that either node's API and console show both nodes' events,
//! alerts and audit log (each entry once, however often it comes: see
//! `store/logs.rs`).
//!
//! A VM move asked through the API of the node that does not run the VM's
//! primary goes over the channel to the node that does ([`forward`]).
//!
//! The node whose name sorts first dials; the other listens.

pub mod forward;
pub mod wire;

use std::time::Duration;

use ft_link::{CpuFeatureSummary, Hello, Link, LinkConfig, LinkListener, Role};
use tokio::sync::mpsc;

use crate::config::SECRET_FILE;
use crate::manager::Manager;
use wire::PairMessage;

/// The peer's daemon counts as gone after this much silence.
pub const PAIR_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
/// Each side sends its state at least this often.
pub const STATE_EVERY: Duration = Duration::from_secs(1);
/// How long the dialer waits between attempts.
pub const REDIAL_EVERY: Duration = Duration::from_secs(1);
/// The name both daemons put where the A-link puts the VM's name.
const PAIR_CHANNEL: &str = "ftd-pair-channel";

#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("cannot read the pair secret: {0}")]
    Secret(#[from] replicator::pairing::PairingError),
    #[error("the pair channel failed: {0}")]
    Link(#[from] ft_link::LinkError),
    #[error("the peer's message is not valid: {0}")]
    Wire(#[from] wire::WireError),
    #[error("cannot merge the peer's state: {0}")]
    Merge(#[from] crate::manager::ManagerError),
}

fn link_config(manager: &Manager, role: Role) -> Result<LinkConfig, PairError> {
    let secret = replicator::pairing::read_secret(&manager.state_dir().join(SECRET_FILE))?;
    let hello = Hello::new(
        manager.node_name(),
        role,
        CpuFeatureSummary {
            name: "management".into(),
            words: vec![],
        },
        PAIR_CHANNEL,
    );
    Ok(LinkConfig::new(secret, hello).with_heartbeat_timeout(PAIR_HEARTBEAT_TIMEOUT))
}

/// Keeps the pair channel up for the life of the daemon (returns at once
/// when this node has no peer).
pub async fn run(manager: Manager) {
    let Some(peer) = manager.config().peer.clone() else {
        return;
    };
    let dials = manager.node_name() < peer.name.as_str();
    // The dialer plays the link's "primary" side, the listener the
    // "standby" side (the handshake wants two different roles).
    let role = if dials { Role::Primary } else { Role::Standby };
    let config = match link_config(&manager, role) {
        Ok(c) => c,
        Err(e) => {
            manager.record(
                crate::model::Severity::Critical,
                true,
                "pair",
                None,
                &format!("the pair channel cannot start: {e}"),
            );
            return;
        }
    };
    if dials {
        dial(&manager, peer.pair, config).await;
        return;
    }
    let (links_tx, mut links) = mpsc::channel::<Link>(1);
    tokio::spawn(listen(manager.config().node.pair, config, links_tx));
    let mut current: Option<Link> = links.recv().await;
    loop {
        let Some(link) = current.take() else {
            return;
        };
        let addr = link.peer_addr();
        manager.set_peer_connected(true, &addr.to_string());
        tokio::select! {
            ended = session(&manager, link) => {
                manager.set_peer_connected(false, &ended.to_string());
                current = links.recv().await;
            }
            newer = links.recv() => {
                // The peer came back on a new connection: the old one is
                // dead even if it has not timed out yet.
                manager.set_peer_connected(false, "replaced by a new connection");
                current = newer;
            }
        }
    }
}

/// The dialing side: one session at a time, redialing after each.
async fn dial(manager: &Manager, addr: std::net::SocketAddr, config: LinkConfig) {
    let mut last_error = String::new();
    loop {
        match Link::connect(addr, &config).await {
            Ok(link) => {
                last_error.clear();
                manager.set_peer_connected(true, &addr.to_string());
                let ended = session(manager, link).await;
                manager.set_peer_connected(false, &ended.to_string());
            }
            Err(e) => {
                let e = e.to_string();
                if e != last_error {
                    tracing::info!(peer = %addr, error = %e, "pair channel: peer not reached");
                    last_error = e;
                }
            }
        }
        tokio::time::sleep(REDIAL_EVERY).await;
    }
}

async fn listen(addr: std::net::SocketAddr, config: LinkConfig, links: mpsc::Sender<Link>) {
    let listener = loop {
        match LinkListener::bind(addr, config.clone()).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "pair channel: cannot listen; retrying");
                tokio::time::sleep(REDIAL_EVERY).await;
            }
        }
    };
    loop {
        match listener.accept().await {
            Ok(link) => {
                if links.send(link).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!(error = %e, "pair channel: a connection was refused"),
        }
    }
}

/// What one session knows of the logs' exchange.
#[derive(Default)]
struct LogSession {
    /// The identity of the peer's logs, from its last state.
    peer_log: Option<String>,
    /// This node's own entries (events, audit) up to these numbers went
    /// to the peer, or it said it holds them; none until it said how far
    /// it holds this node's logs.
    sent: Option<(u64, u64)>,
    /// The alert that the peer's logs have this node's identity was
    /// raised.
    same_log_said: bool,
}

impl LogSession {
    /// The peer's state said which its logs are and how far it holds
    /// this node's (`mine`: this node's log identity).
    fn heard(&mut self, logs: &wire::LogExchange, mine: &str) {
        self.peer_log = Some(logs.log.clone());
        let Some(held) = &logs.held else { return };
        // A mark of another log of this node's (a database made anew)
        // holds nothing of this one.
        let mark = if held.log == mine {
            (held.events, held.audit)
        } else {
            (0, 0)
        };
        // Never back behind what this session sent already (the peer's
        // word may predate it).
        self.sent = Some(self.sent.map_or(mark, |(events, audit)| {
            (events.max(mark.0), audit.max(mark.1))
        }));
    }
}

/// Runs one session until the link fails; returns why it ended.
async fn session(manager: &Manager, link: Link) -> PairError {
    let (sender, mut receiver) = link.split();
    let logs = std::sync::Mutex::new(LogSession::default());
    let logs_of = || logs.lock().unwrap_or_else(|e| e.into_inner());
    let forwards = manager.forwards();
    // Its asks fail when it ends, however it ends.
    let this_session = forwards.begin();
    let number = this_session.number();
    let send_loop = async {
        loop {
            let state = manager.pair_state().and_then(|mut state| {
                let mut session = logs_of();
                let session = &mut *session;
                state.logs = Some(Box::new(
                    manager.log_exchange(session.peer_log.as_deref(), &mut session.sent)?,
                ));
                Ok(state)
            });
            let state = match state {
                Ok(s) => s,
                Err(e) => return PairError::Merge(e),
            };
            let frame = match PairMessage::State(state).to_frame() {
                Ok(f) => f,
                Err(e) => return PairError::Wire(e),
            };
            if let Err(e) = sender.send(&frame).await {
                return PairError::Link(e);
            }
            // Asks and answers go out as they come; the state when it
            // changes (a change while one is sent counts too), and every
            // second.
            let next_state = tokio::time::sleep(STATE_EVERY);
            let changed = manager.changed();
            tokio::pin!(next_state, changed);
            loop {
                tokio::select! {
                    _ = &mut changed => break,
                    _ = &mut next_state => break,
                    message = forwards.next_outgoing(number) => {
                        let Some(message) = message else { continue };
                        let frame = match message.to_frame() {
                            Ok(f) => f,
                            Err(e) => return PairError::Wire(e),
                        };
                        if let Err(e) = sender.send(&frame).await {
                            return PairError::Link(e);
                        }
                    }
                }
            }
        }
    };
    let recv_loop = async {
        loop {
            let frame = match receiver.recv().await {
                Ok(f) => f,
                Err(e) => return PairError::Link(e),
            };
            match PairMessage::from_frame(&frame) {
                Ok(PairMessage::State(mut state)) => {
                    let peer_logs = state.logs.take();
                    if let Err(e) = manager.merge_peer(state) {
                        return PairError::Merge(e);
                    }
                    if let Some(peer_logs) = peer_logs {
                        match manager.take_peer_logs(&peer_logs) {
                            Ok(true) => {}
                            // Said once a session.
                            Ok(false) if logs_of().same_log_said => {}
                            Ok(false) => {
                                logs_of().same_log_said = true;
                                manager.record(
                                    crate::model::Severity::Warning,
                                    true,
                                    "pair",
                                    None,
                                    "the peer's event and audit logs have this node's identity \
                                     (the two nodes' databases are copies of one): its entries are \
                                     not shown here; make the peer anew with `ftd join`",
                                );
                            }
                            Err(e) => return PairError::Merge(e),
                        }
                        logs_of().heard(&peer_logs, manager.store().log_id());
                    }
                }
                Ok(PairMessage::MoveAsk(ask)) => {
                    let manager = manager.clone();
                    tokio::spawn(async move {
                        let answer = manager.move_asked_by_peer(ask).await;
                        manager.forwards().answer(answer);
                    });
                }
                Ok(PairMessage::MoveAnswer(answer)) => forwards.answered(answer),
                Ok(PairMessage::Unknown(code)) => {
                    tracing::warn!(code, "pair channel: a message this daemon does not know (a newer peer?); skipped")
                }
                Err(e) => return PairError::Wire(e),
            }
        }
    };
    let ended = tokio::select! {
        e = send_loop => e,
        e = recv_loop => e,
    };
    drop(this_session);
    sender.close().await;
    ended
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LogMark;

    fn exchange(log: &str, held: Option<(&str, u64, u64)>) -> wire::LogExchange {
        wire::LogExchange {
            log: log.into(),
            held: held.map(|(log, events, audit)| LogMark::new(log, events, audit)),
            events: vec![],
            audit: vec![],
        }
    }

    #[test]
    fn a_session_sends_from_the_peers_mark_and_never_back() {
        let mut session = LogSession::default();
        // The peer's identity, but no word yet on this node's logs:
        // nothing to send from.
        session.heard(&exchange("peer", None), "mine");
        assert_eq!(session.peer_log.as_deref(), Some("peer"));
        assert_eq!(session.sent, None);
        // It holds this node's logs up to (5, 2).
        session.heard(&exchange("peer", Some(("mine", 5, 2))), "mine");
        assert_eq!(session.sent, Some((5, 2)));
        // This session sent up to (9, 4); an older word does not send
        // them again, a newer one moves on.
        session.sent = Some((9, 4));
        session.heard(&exchange("peer", Some(("mine", 6, 2))), "mine");
        assert_eq!(session.sent, Some((9, 4)));
        session.heard(&exchange("peer", Some(("mine", 12, 4))), "mine");
        assert_eq!(session.sent, Some((12, 4)));
        // A mark of another log of this node's (made anew) holds nothing
        // of this one: a new session sends it all.
        let mut fresh = LogSession::default();
        fresh.heard(&exchange("peer", Some(("old", 40, 7))), "mine");
        assert_eq!(fresh.sent, Some((0, 0)));
    }
}
