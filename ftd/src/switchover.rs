//! A planned switchover (`POST /api/vms/{name}/switchover`): the FT VM's
//! primary role moves to its standby without losing anything and without a
//! heartbeat timeout. Asked on the node that runs the primary: its engine
//! takes a final checkpoint with the guest stopped, the standby takes over
//! from it at once, and this node's copy stops; the store then names the
//! peer as the primary node, and the supervisor here starts this node's
//! standby, which the new primary synchronises.
//!
//! Asked on the other node, the request goes over the pair channel to the
//! node that runs the primary, and its answer is the answer
//! ([`Manager::move_asked`]): either node's API and console move any VM.
//!
//! An HA VM moves by live migration: its engine goes to level FT (memory
//! copied while the guest runs), switches over after the first epoch, and
//! the new primary goes back to HA (its daemon asks). That takes the copy's
//! time, so the request answers once the engine took it; the events say
//! when the VM moved.

use std::time::{Duration, Instant};

use replicator::control::{self, ControlCommand, ControlRequest};
use replicator::status::{FtState, Role};

use crate::manager::{Manager, ManagerError};
use crate::model::{Desired, Severity, VmView};
use crate::pair::forward::ForwardError;
use crate::pair::wire::{MoveAnswer, MoveAsk, MoveOutcome};
use crate::store::StoreError;

/// How long the engine has to hand its VM over (a final checkpoint and a
/// word to the standby; the witness's release with one).
/// With the last status request ([`ASK_WITHIN`]), within a client's
/// request timeout (10 s), so that no client sends it again for want of
/// an answer.
pub const SWITCHOVER_WITHIN: Duration = Duration::from_secs(6);

/// How often the engine's status is read while waiting.
const LOOK_EVERY: Duration = Duration::from_millis(20);

/// How long one control request may take.
const ASK_WITHIN: Duration = Duration::from_secs(2);

/// How long a move asked of the peer may take to be answered: its own
/// switchover's time and a status request, within a client's request
/// timeout (10 s).
pub const FORWARDED_WITHIN: Duration = Duration::from_secs(9);

impl Manager {
    /// A move asked through this node's API by `by`: done here when the
    /// primary runs here, asked of the peer when it runs there.
    /// `from`: the node the caller saw running the primary; a VM that
    /// runs elsewhere is refused (it moved already: asked again, the move
    /// would take it back).
    pub async fn move_asked(
        &self,
        name: &str,
        from: Option<&str>,
        by: &str,
    ) -> Result<(VmView, bool), ManagerError> {
        let record = self.store().vm(name)?;
        if let Some(from) = from {
            let runs_on = record.primary_node.as_deref().unwrap_or("no node");
            if runs_on != from {
                return Err(ManagerError::NoSwitchover(format!(
                    "VM {name} runs on {runs_on}, not on {from}: it moved already (ask with \
                     from={runs_on} to move it from there)"
                )));
            }
        }
        let peer = self.config().peer.as_ref().map(|p| p.name.clone());
        match (record.primary_node, peer) {
            (Some(p), Some(peer)) if p == peer => {}
            _ => return self.move_to_peer(name).await,
        }
        let peer = self.config().peer.as_ref().map_or("", |p| p.name.as_str());
        if self.peer_connected() && !self.peer_takes_moves() {
            return Err(ForwardError::PeerTooOld { peer: peer.into() }.into());
        }
        let outcome = self
            .forwards()
            .ask(peer, name, by, FORWARDED_WITHIN)
            .await?;
        let peer = peer.to_string();
        match outcome {
            MoveOutcome::Moved { view, migration } => Ok((*view, migration)),
            MoveOutcome::NotFound { reason } => Err(ManagerError::PeerNotFound { peer, reason }),
            MoveOutcome::Refused { reason } => Err(ManagerError::PeerRefused { peer, reason }),
            MoveOutcome::Failed { reason } => Err(ManagerError::PeerFailed { peer, reason }),
        }
    }

    /// The peer's ask to move a VM whose primary runs here (asked through
    /// its API): done as if asked here, answered as this API would.
    pub async fn move_asked_by_peer(&self, ask: MoveAsk) -> MoveAnswer {
        let from = self
            .config()
            .peer
            .as_ref()
            .map_or("the peer", |p| p.name.as_str());
        self.record(
            Severity::Info,
            false,
            "vm",
            Some(&ask.vm),
            &format!(
                "VM {}: a move asked through {from}'s API by {}",
                ask.vm, ask.by
            ),
        );
        let outcome = match self.move_to_peer(&ask.vm).await {
            Ok((view, migration)) => MoveOutcome::Moved {
                view: Box::new(view),
                migration,
            },
            Err(e) => {
                let reason = e.to_string();
                match e {
                    ManagerError::Store(StoreError::NoSuchVm(_))
                    | ManagerError::PeerNotFound { .. } => MoveOutcome::NotFound { reason },
                    ManagerError::Store(_) | ManagerError::PeerFailed { .. } => {
                        MoveOutcome::Failed { reason }
                    }
                    _ => MoveOutcome::Refused { reason },
                }
            }
        };
        MoveAnswer {
            id: ask.id,
            outcome,
        }
    }

    /// Moves the primary role of `name` from this node to its standby on
    /// the peer; answers once the standby was told to take over.
    pub async fn switchover(&self, name: &str) -> Result<VmView, ManagerError> {
        self.move_to_peer(name).await.map(|(view, _)| view)
    }

    /// [`Manager::switchover`], saying whether the move is a live
    /// migration (the engine runs at HA: it answers once the migration
    /// began) rather than a switchover done.
    pub async fn move_to_peer(&self, name: &str) -> Result<(VmView, bool), ManagerError> {
        let record = self.store().vm(name)?;
        let me = self.node_name().to_string();
        let refuse = |why: String| Err(ManagerError::NoSwitchover(why));
        if record.desired != Desired::Running {
            return Err(ManagerError::NotRunning(name.to_string()));
        }
        if !record.definition.level.has_standby() {
            return refuse(format!(
                "VM {name} runs at level {}: only an FT VM switches over (and an HA VM \
                 migrates)",
                record.definition.level.as_str()
            ));
        }

        let Some(peer) = self.config().peer.as_ref().map(|p| p.name.clone()) else {
            return refuse(format!("{me} has no peer to switch VM {name} over to"));
        };
        match record.primary_node.as_deref() {
            Some(p) if p == me => {}
            Some(p) => {
                let api = self
                    .config()
                    .peer
                    .as_ref()
                    .filter(|n| n.name == p)
                    .map(|n| format!(" at {}", n.api))
                    .unwrap_or_default();
                return refuse(format!(
                    "the primary of VM {name} runs on node {p}, not on {me}: ask that node's \
                     API{api}"
                ));
            }
            None => return Err(ManagerError::NotRunning(name.to_string())),
        }
        // The engine's level decides (the store's may be changing).
        let (before, migration) = match self.runtime().get(name) {
            Some(local) if local.role == Role::Primary && local.state == FtState::Protected => {
                let migration = local
                    .status
                    .as_ref()
                    .is_some_and(|s| s.level == replicator::level::Level::Ha);
                let counters = local.status.map(|s| s.counters).unwrap_or_default();
                (counters, migration)
            }
            Some(local) => {
                return refuse(format!(
                    "VM {name} is {} on {me}, not protected: a switchover needs a standby that \
                     holds its checkpoints",
                    local.state
                ))
            }
            None => return refuse(format!("no primary of VM {name} runs on {me} yet")),
        };
        let sock = crate::supervisor::VmPaths::new(self.config(), self.state_dir(), name).sock;
        let started = Instant::now();
        let asked = ask(&sock, ControlCommand::Switchover).await;
        match asked {
            Ok(r) if r.ok => {}
            Ok(r) => {
                return refuse(format!(
                    "the engine refused: {}",
                    r.error.unwrap_or_else(|| "no reason given".into())
                ))
            }
            Err(e) => return refuse(format!("the engine did not take the request: {e}")),
        }
        if migration {
            self.record(
                Severity::Info,
                false,
                "vm",
                Some(name),
                &format!(
                    "VM {name}: live migration from {me} to {peer} asked: its memory is \
                     copied while it runs (level ft for the move), then it switches over"
                ),
            );
            return Ok((self.view(self.store().vm(name)?), true));
        }
        self.record(
            Severity::Info,
            false,
            "vm",
            Some(name),
            &format!("VM {name}: switchover from {me} to {peer} asked"),
        );
        let handed = loop {
            if started.elapsed() > SWITCHOVER_WITHIN {
                return Err(self.switchover_failed(
                    name,
                    format!("no outcome within {} s", SWITCHOVER_WITHIN.as_secs()),
                ));
            }
            tokio::time::sleep(LOOK_EVERY).await;
            let status = match ask(&sock, ControlCommand::Status).await {
                Ok(r) => r.status,
                // The engine ended: its exit tells (the supervisor records
                // a switchover there too).
                Err(_) => None,
            };
            let Some(status) = status else {
                if self.store().vm(name)?.primary_node.as_deref() == Some(peer.as_str()) {
                    break None;
                }
                continue;
            };
            match status.state {
                FtState::SwitchedOver => break Some(status),
                FtState::Protected
                    if status.counters.switchovers_called_off == before.switchovers_called_off =>
                {
                    continue
                }
                _ => {
                    let why = status.message.unwrap_or_else(|| status.state.to_string());
                    return Err(self.switchover_failed(name, why));
                }
            }
        };
        let took_ms = started.elapsed().as_millis() as u64;
        let engine_generation = handed.as_ref().map_or(0, |s| s.generation);
        let epoch = handed.as_ref().map(|s| s.epoch);
        self.switched_over(name, &peer, engine_generation, epoch, Some(took_ms));
        Ok((self.view(self.store().vm(name)?), false))
    }

    fn switchover_failed(&self, name: &str, why: String) -> ManagerError {
        self.record(
            Severity::Warning,
            true,
            "vm",
            Some(name),
            &format!("VM {name}: switchover not done ({why}); it runs on here"),
        );
        ManagerError::SwitchoverFailed(why)
    }

    /// Records that this node's primary of `name` handed it to `peer`
    /// (said once: by the API's wait or by the engine's exit, whichever
    /// comes first). `engine_generation`: the generation the handing
    /// primary ran (the peer's copy runs the next one).
    pub(crate) fn switched_over(
        &self,
        name: &str,
        peer: &str,
        engine_generation: u64,
        epoch: Option<u64>,
        took_ms: Option<u64>,
    ) {
        let me = self.node_name().to_string();
        let mut moved = false;
        let updated = self.store().update_vm(name, |r| {
            if r.primary_node.as_deref() == Some(me.as_str()) {
                moved = true;
                r.primary_node = Some(peer.to_string());
                r.generation = r.generation.max(engine_generation + 1);
            }
        });
        match updated {
            Ok(record) if moved => {
                let at = epoch.map_or(String::new(), |e| format!(" from checkpoint {e}"));
                let took = took_ms.map_or(String::new(), |t| format!(" in {t} ms"));
                self.record(
                    Severity::Info,
                    false,
                    "vm",
                    Some(name),
                    &format!(
                        "VM {name}: switched over from {me} to {peer}{at}{took} \
                         (generation {}); {me} becomes its standby",
                        record.generation
                    ),
                );
                self.touch();
            }
            Ok(_) => {}
            Err(e) => tracing::error!(vm = name, error = %e, "cannot record a switchover"),
        }
    }
}

/// One request on an engine's control socket, off the async workers.
async fn ask(
    sock: &std::path::Path,
    command: ControlCommand,
) -> Result<control::ControlResponse, String> {
    let sock = sock.to_path_buf();
    tokio::task::spawn_blocking(move || {
        control::request(&sock, &ControlRequest::new(command), ASK_WITHIN)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}
