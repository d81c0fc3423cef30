//! The pair's quorum witness as the daemon sees it: a client of it (the
//! supervisor asks it before starting a primary), and a watch that asks it
//! every few seconds and says when it stops or starts answering. A witness
//! that cannot be reached changes nothing for running VMs, but a node lost
//! meanwhile is not taken over: the alert says so, and what to do.

use std::time::Duration;

use witness::{Answer, Request, WitnessClient};

use crate::manager::Manager;
use crate::model::Severity;

/// How often the watch asks.
pub const WATCH_EVERY: Duration = Duration::from_secs(5);

/// A client of the pair's witness, when ftd.toml names one.
pub fn client(manager: &Manager) -> Option<WitnessClient> {
    let config = manager.config();
    if config.witness.is_empty() {
        return None;
    }
    let path = manager.state_dir().join(crate::config::SECRET_FILE);
    match replicator::pairing::read_secret(&path) {
        Ok(secret) => Some(WitnessClient::new(
            config.witness.clone(),
            secret,
            &config.node.name,
            Duration::from_secs(2),
        )),
        Err(e) => {
            manager.record(
                Severity::Critical,
                true,
                "witness",
                None,
                &format!("the witness cannot be asked: {e}"),
            );
            None
        }
    }
}

/// Asks the witness every [`WATCH_EVERY`] for the life of the daemon
/// (returns at once without a witness); records each change between
/// answering and not.
pub async fn watch(manager: Manager) {
    let Some(client) = client(&manager) else {
        return;
    };
    let addrs = client.addrs().join(", ");
    loop {
        let answered = match client.ask(&Request::Show).await {
            Ok(Answer::Records { silence_ms, .. }) => Ok(silence_ms),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        };
        let reachable = answered.is_ok();
        if manager.witness_reachable() != Some(reachable) {
            match answered {
                Ok(silence_ms) => manager.record(
                    Severity::Info,
                    false,
                    "witness",
                    None,
                    &format!(
                        "the quorum witness at {addrs} answers (a takeover waits for {silence_ms} ms of \
                         the primary's silence there)"
                    ),
                ),
                Err(e) => manager.record(
                    Severity::Critical,
                    true,
                    "witness",
                    None,
                    &format!(
                        "the quorum witness at {addrs} cannot be reached ({e}): the VMs run on, but \
                         a node lost now is not taken over until the witness answers again. If a \
                         node is surely down and the witness cannot be brought back, force the \
                         takeover on the surviving node: ftctl vm takeover NAME"
                    ),
                ),
            }
            manager.set_witness_reachable(reachable);
        }
        tokio::time::sleep(WATCH_EVERY).await;
    }
}
