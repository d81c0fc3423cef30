//! Before a takeover, with a witness: the standby asks for the next
//! generation and takes over only with the grant. The witness holds the
//! claim while it still hears the primary (a lost A-link, not a lost
//! primary), and refuses it for good once the primary went on alone (the
//! replica is stale then). A primary that comes back with a new session
//! ends the claim: it lives, and the new session starts over. The
//! operator may force the takeover (the witness cannot answer and the
//! other node is known to be down): the witness is told if it answers,
//! and the replica runs at the next generation either way.

use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};
use witness::{Answer, Request};

use super::paths::Arrival;
use super::Replica;
use crate::protocol::Message;
use crate::quorum::{GrantedLease, WitnessConfig};
use crate::status::{FtState, Role, StatusBoard};

/// What a claim came to.
pub(super) enum Claimed {
    /// Take over at this generation, with the grant's lease if it gave one.
    Granted(u64, Option<GrantedLease>),
    /// The replica must never run: the VM runs at `generation` elsewhere.
    Stale { why: String, generation: u64 },
    /// The primary began a new session.
    PrimaryBack(Box<Arrival>),
}

/// How long to wait before asking again when the witness cannot be
/// reached (an "owner heard" answer is asked again at once: the witness
/// waited already).
const RETRY_UNREACHABLE: Duration = Duration::from_millis(200);

pub(super) async fn claim(
    witness: &WitnessConfig,
    replica: &Replica,
    arrivals: &mut mpsc::Receiver<Arrival>,
    force: &Notify,
    status: &StatusBoard,
) -> Claimed {
    status.set_state(
        Role::Standby,
        FtState::Claiming,
        Some(format!(
            "the primary is lost: asking the witness for the generation after {}",
            replica.generation
        )),
    );
    let request = Request::Claim {
        vm: witness.vm.clone(),
        generation: replica.generation,
    };
    let mut shown = String::new();
    loop {
        let sent = std::time::Instant::now();
        let asked = tokio::select! {
            asked = witness.client.ask(&request) => asked,
            _ = force.notified() => return forced(witness, replica, status).await,
        };
        let (why, wait) = match asked {
            Ok(Answer::Granted {
                generation,
                lease_ms,
            }) => {
                info!(
                    generation,
                    lease_ms,
                    epoch = replica.epoch,
                    "the witness granted the takeover"
                );
                status.update(|s| {
                    s.generation = generation;
                    s.witness = Some(format!("granted generation {generation}"));
                });
                return Claimed::Granted(generation, GrantedLease::from_grant(sent, lease_ms));
            }
            Ok(Answer::Superseded { generation, owner }) => {
                return Claimed::Stale {
                    why: format!(
                        "the witness says node {owner} runs the VM at generation {generation}: \
                         this replica (generation {}) is stale",
                        replica.generation
                    ),
                    generation,
                };
            }
            Ok(Answer::OwnerHeard {
                owner,
                heard_ms_ago,
            }) => {
                status.update(|s| s.counters.claims_refused += 1);
                (
                    format!(
                        "the witness still hears the primary (node {owner}, {heard_ms_ago} ms ago): \
                         no takeover while it lives"
                    ),
                    Duration::ZERO,
                )
            }
            Ok(Answer::Refused { reason }) => (
                format!("the witness grants nothing yet ({reason}): no takeover without its grant"),
                RETRY_UNREACHABLE,
            ),
            Ok(other) => (
                format!("the witness answered {other:?}: no takeover without its grant"),
                RETRY_UNREACHABLE,
            ),
            Err(e) => (
                format!("cannot reach the witness ({e}): no takeover without its grant"),
                RETRY_UNREACHABLE,
            ),
        };
        if why != shown {
            warn!(why, "takeover not granted yet");
            status.update(|s| {
                s.message = Some(why.clone());
                s.witness = Some(why.clone());
            });
            shown = why;
        }
        // A new session from the primary ends the claim: it lives.
        while let Ok(arrival) = arrivals.try_recv() {
            if arrival.1.message != Message::Backup {
                return Claimed::PrimaryBack(Box::new(arrival));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = force.notified() => return forced(witness, replica, status).await,
        }
    }
}

/// How long a forced takeover waits for the witness to take note.
const FORCE_NOTE_WITHIN: Duration = Duration::from_millis(1500);

/// The operator forced the takeover: the witness records it if it
/// answers; the replica runs at the next generation either way.
async fn forced(witness: &WitnessConfig, replica: &Replica, status: &StatusBoard) -> Claimed {
    let request = Request::Force {
        vm: witness.vm.clone(),
    };
    let noted = tokio::time::timeout(FORCE_NOTE_WITHIN, witness.client.ask(&request)).await;
    let (generation, how) = match noted {
        Ok(Ok(Answer::Granted { generation, .. })) => (generation, "recorded by the witness"),
        _ => (
            replica.generation + 1,
            "without the witness (it could not be reached)",
        ),
    };
    warn!(generation, how, "takeover forced by the operator");
    status.update(|s| {
        s.generation = generation;
        s.witness = Some(format!("takeover forced by the operator, {how}"));
    });
    Claimed::Granted(generation, None)
}
