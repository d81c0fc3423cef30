//! The standby: waits for a primary on the A-link, receives the initial
//! copy into a replica (guest RAM in a memfd, disk files of its own), then
//! applies each complete, checked epoch and acknowledges it. When the
//! primary goes silent or the link drops after at least one committed
//! epoch (with a second path: once that path is silent too, however much
//! later), the replica is handed back for promotion: at once without a
//! witness; with one ([`claim`]), only once the witness grants the next
//! generation (a replica the witness says is stale is dropped, and a
//! primary that comes back with a new session ends the claim). A session
//! of a generation older than this standby knows is refused (a stale
//! primary back from a partition). A refused epoch (torn,
//! corrupt, replayed, out of order, or not decodable) is reported, never
//! applied, and ends the session: the primary then runs unprotected and
//! resynchronises from scratch.
//!
//! - [`paths`]: accepting connections, backup paths.
//! - [`claim`]: asking the witness before a takeover.
//! - [`session`]: one session with a primary, step by step.
//! - [`replica_disk`]: the replica's disk files.

mod claim;
mod copy_writeback;
mod durable;
mod inbound;
mod output_copies;
pub mod overheard;
mod paths;
pub mod replica_disk;
mod session;

use std::path::PathBuf;
use std::time::Duration;

use ft_link::{LinkConfig, LinkError, LinkListener};
use tracing::{info, warn};
use vmm::replication::{ReplicaRam, ReplicationError};

use self::claim::Claimed;
use self::paths::spawn_acceptors;
use self::replica_disk::{ReplicaDisk, ReplicaDiskError};
use self::session::Session;
use crate::assembler::AssemblerError;
use crate::protocol::{BootPlan, CheckpointState, Message, ProtocolError, StateError};
use crate::quorum::WitnessConfig;
use crate::status::{FtState, Role, StatusBoard};

#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("A-link: {0}")]
    Link(#[from] LinkError),
    #[error("A-link: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the primary began with {0} instead of the synchronisation plan")]
    NoPlan(&'static str),
    #[error("the primary's VM has {primary} disks, this standby was given {local}")]
    DiskCount { primary: usize, local: usize },
    #[error("the primary's VM has {primary} NICs, this standby was given {local} TAPs")]
    NicCount { primary: usize, local: usize },
    #[error("the replica: {0}")]
    Replica(#[from] ReplicationError),
    #[error(transparent)]
    Disk(#[from] ReplicaDiskError),
    #[error("{0} message after the initial copy ended")]
    LateSync(&'static str),
    #[error(
        "the initial copy is incomplete: the primary sent {pages_sent} pages and \
         {disk_sent} disk records, this standby received {pages_received} and {disk_received} \
         (or not in that order)"
    )]
    SyncIncomplete {
        pages_sent: u64,
        pages_received: u64,
        disk_sent: u64,
        disk_received: u64,
    },
    #[error("a {0} message before the initial copy's end record")]
    EpochBeforeSyncEnd(&'static str),
    #[error("epoch refused: {0}")]
    Refused(#[from] AssemblerError),
    #[error("the active A-link path failed while the primary is still heard on the backup path (no takeover): {0}")]
    PathLost(#[source] LinkError),
    #[error("the primary began a new session")]
    Superseded,
    #[error("a primary of generation {got} was refused: this standby knows generation {known} (a stale primary)")]
    StaleGeneration { got: u64, known: u64 },
    #[error("a {kind} message of generation {got} in a session of generation {session}")]
    WrongGeneration {
        kind: &'static str,
        got: u64,
        session: u64,
    },
    #[error("the primary's VM stopped on purpose (no takeover)")]
    PrimaryStopped,
    #[error(
        "the primary dropped this standby: it did not take or acknowledge what it was sent in \
         time (is this node's disk or host hanging?); no takeover, the primary resynchronises it"
    )]
    Released,
    #[error("the primary handed its failed VM over before the first committed epoch: nothing to take over")]
    HandedOverUnsynced,
    #[error(
        "a switchover after epoch {last}, but this standby committed {committed:?}: no takeover"
    )]
    SwitchoverNotCommitted { last: u64, committed: Option<u64> },
    #[error(
        "mirror epoch {epoch} refused: it carries a checkpoint state ({len} bytes) at level HA"
    )]
    StateInMirror { epoch: u64, len: usize },
    #[error("epoch {epoch} refused: its state does not decode: {source}")]
    BadState {
        epoch: u64,
        #[source]
        source: StateError,
    },
}

/// Where this standby keeps its replica.
#[derive(Debug, Clone)]
pub struct StandbyConfig {
    /// Where to listen: one address per path to the primary (the first is
    /// the A-link; a second makes a redundant pair).
    pub listen: Vec<String>,
    pub link: LinkConfig,
    /// Replica disk files, one per disk of the VM, in device order.
    pub disks: Vec<PathBuf>,
    /// The replica's RAM in this file (kept from an earlier copy of the VM
    /// on this node where it fits), else in anonymous memory.
    pub ram_file: Option<PathBuf>,
    /// TAPs for the VM's NICs once promoted, in device order.
    pub taps: Vec<String>,
    /// Sessions of an older generation are refused.
    pub min_generation: u64,
    /// The quorum witness, if the pair has one.
    pub witness: Option<WitnessConfig>,
    /// Notified when the operator forces a takeover without the witness's
    /// grant (honoured only while claiming).
    pub force_takeover: std::sync::Arc<tokio::sync::Notify>,
}

impl StandbyError {
    /// Whether the session ended for a reason of this node's (its disks,
    /// its memory, its configuration), which the primary should be told;
    /// otherwise the primary, the link or the protocol ended it.
    pub fn is_this_nodes_fault(&self) -> bool {
        matches!(
            self,
            StandbyError::DiskCount { .. }
                | StandbyError::NicCount { .. }
                | StandbyError::Replica(ReplicationError::ReplicaMemory { .. })
        ) || matches!(self, StandbyError::Disk(e) if e.is_this_nodes_fault())
            // Applying an epoch failed on this node's disk (a write or its
            // sync): an I/O error here, not a bad epoch.
            || matches!(
                self,
                StandbyError::Refused(AssemblerError::Disk { source, .. })
                    if source.is_this_nodes_fault()
            )
    }
}

/// A replica that holds a committed epoch.
pub struct Replica {
    pub disks: Vec<ReplicaDisk>,
    pub epoch: u64,
    /// The generation of the session that built it; once handed back for
    /// promotion, the generation the promoted copy runs (granted by the
    /// witness, or the next one without a witness).
    pub generation: u64,
    /// Handed back by a planned switchover (not because the primary was
    /// lost).
    pub switchover: bool,
    /// The lease the witness gave with its grant of the takeover (the
    /// promoted copy's first).
    pub granted_lease: Option<crate::quorum::GrantedLease>,
    /// How the session that built it ended (for the takeover's figures).
    pub ended: SessionEnd,
    /// When the takeover was decided (the witness granted it, or there is
    /// none), once handed back for promotion.
    pub decided: Option<std::time::Instant>,
    /// How the VM runs here: resumed from the checkpoint (level FT), or
    /// booted from the mirrored disks (level HA).
    pub machine: Machine,
    /// Level FT: the checkpoint its memory holds, as the session's memory
    /// lineage and epoch ([`crate::memory_point`]).
    pub memory_point: Option<(crate::memory_point::Lineage, u64)>,
}

/// When a replica's session ended, and when the primary was last heard
/// where it was lost (after a silence or a lost connection; none after a
/// switchover or a handover, which the primary itself asked for).
#[derive(Debug, Clone, Copy)]
pub struct SessionEnd {
    pub at: std::time::Instant,
    pub last_heard: Option<std::time::Instant>,
}

/// What a replica holds beside its disks.
pub enum Machine {
    /// Level FT: memory and state of the committed checkpoint.
    Checkpoint(Box<Checkpointed>),
    /// Level HA: nothing but how to boot the VM.
    Boot(BootPlan),
}

/// A committed checkpoint (level FT).
pub struct Checkpointed {
    pub ram: ReplicaRam,
    pub state: CheckpointState,
    /// Per NIC, the frames the primary's guest received after this
    /// checkpoint, in order (replayed into the guest if it is promoted).
    pub inbound: Vec<Vec<bytes::Bytes>>,
    /// Frames for the guest this node received itself while standing by
    /// (given after `inbound`, see [`overheard`]).
    pub overheard: Option<overheard::Overheard>,
    /// Per NIC, output of the committed epochs, sent when promoted: what a
    /// switchover handed over instead of sending it, or the copies of TCP
    /// segments that came with the last committed epochs (the primary may
    /// have died before releasing them).
    pub final_output: Vec<Vec<bytes::Bytes>>,
}

impl Replica {
    /// The primary is lost now, after its backup path was watched: it was
    /// last heard on whichever path heard it last.
    fn lost_after_watching(mut self: Box<Self>, backup: &paths::BackupPath) -> Replica {
        let heard_on_backup = backup.last_heard();
        self.ended = SessionEnd {
            at: std::time::Instant::now(),
            last_heard: Some(
                self.ended
                    .last_heard
                    .map_or(heard_on_backup, |active| active.max(heard_on_backup)),
            ),
        };
        *self
    }

    /// The checkpoint (level FT), if this replica holds one.
    pub fn checkpoint(&self) -> Option<&Checkpointed> {
        match &self.machine {
            Machine::Checkpoint(c) => Some(c),
            Machine::Boot(_) => None,
        }
    }
}

/// Life on the backup path counts only this long after the last arrival on
/// the active path (frames already in flight when a primary dies): one and
/// a half heartbeat intervals, at least 50 ms. A primary that died may have
/// sent one last heartbeat on the backup up to an interval after its last
/// frame on the active path; a live one sends several during the silence
/// timeout (four intervals and more).
pub(super) fn path_margin(heartbeat_interval: Duration) -> Duration {
    (heartbeat_interval * 3 / 2).max(Duration::from_millis(50))
}

/// How long a new connection has to say what it is.
const FIRST_FRAME_WITHIN: Duration = Duration::from_secs(5);

/// Serves primaries until one is lost while this node holds a committed
/// replica; returns that replica.
pub async fn stand_by(config: &StandbyConfig, status: &StatusBoard) -> Result<Replica, LinkError> {
    // The oldest generation accepted rises with what the witness tells.
    let mut config = config.clone();
    let config = &mut config;
    let mut listeners = Vec::new();
    for addr in &config.listen {
        listeners.push(LinkListener::bind(addr.as_str(), config.link.clone()).await?);
    }
    info!(listen = ?config.listen, "standby waiting for a primary");
    let (mut arrivals, acceptors) = spawn_acceptors(listeners, status);
    let mut next = None;
    let mut why_ended: Option<String> = None;
    let replica = loop {
        status.set_state(Role::Standby, FtState::Waiting, why_ended.take());
        let arrival = match next.take() {
            Some(a) => a,
            None => arrivals.recv().await.expect("the acceptors run"),
        };
        if arrival.1.message == Message::Backup {
            // A backup path of a session that is over: nothing to do.
            continue;
        }
        let lost = match session::receive(arrival, &mut arrivals, &*config, status).await {
            Session::Lost(replica) => replica,
            Session::PathLost(replica, backup, error) => {
                // The primary lives on the backup path, or did a moment
                // ago: keep the replica while watching that path.
                status.set_state(
                    Role::Standby,
                    FtState::Waiting,
                    Some(StandbyError::PathLost(error).to_string()),
                );
                let silence = config.link.heartbeat_timeout;
                match paths::watch_backup(&backup, &mut arrivals, silence).await {
                    paths::Watched::NewSession(arrival) => {
                        next = Some(*arrival);
                        continue;
                    }
                    // The replica keeps the overheard frames from the
                    // active path's loss on: the primary never answered
                    // those it got later (with a witness, its output
                    // waited for a confirmation that a granted takeover
                    // rules out).
                    paths::Watched::Silent => {
                        warn!("the backup path fell silent too: the primary is lost");
                        replica.lost_after_watching(&backup)
                    }
                    paths::Watched::Closed if config.witness.is_some() => {
                        replica.lost_after_watching(&backup)
                    }
                    paths::Watched::Closed => {
                        why_ended = Some("the primary closed its backup path (no takeover)".into());
                        continue;
                    }
                }
            }
            Session::Ended(error, waiting) => {
                warn!(%error, "standby session ended without a takeover");
                if matches!(error, StandbyError::PrimaryStopped) {
                    // A VM stopped on purpose boots anew: what the replica
                    // held is of no use, and its memory is freed.
                    forget_ram(config);
                }
                why_ended = Some(error.to_string());
                next = waiting;
                continue;
            }
        };
        let mut replica = lost;
        let Some(witness) = &config.witness else {
            replica.generation += 1;
            replica.decided = Some(std::time::Instant::now());
            break replica;
        };
        let force = &config.force_takeover;
        match claim::claim(witness, &replica, &mut arrivals, force, status).await {
            Claimed::Granted(generation, lease) => {
                replica.generation = generation;
                replica.granted_lease = lease;
                replica.decided = Some(std::time::Instant::now());
                break replica;
            }
            Claimed::Stale { why, generation } => {
                warn!(why, "replica dropped: no takeover");
                config.min_generation = config.min_generation.max(generation);
                status.update(|s| s.generation = config.min_generation);
                why_ended = Some(why);
            }
            Claimed::PrimaryBack(arrival) => {
                why_ended = Some("the primary came back with a new session".into());
                next = Some(*arrival);
            }
        }
    };
    for task in acceptors {
        task.abort();
    }
    Ok(replica)
}

/// Removes the replica's RAM file, if it has one.
pub fn forget_ram(config: &StandbyConfig) {
    if let Some(path) = &config.ram_file {
        // Its label first: a label never outlives what it describes.
        let _ = std::fs::remove_file(vmm::replication::ram_label::label_path(path));
        match std::fs::remove_file(path) {
            Ok(()) => info!(path = %path.display(), "the replica's RAM file is removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                warn!(path = %path.display(), %error, "the replica's RAM file could not be removed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9 defect 1: the margin was 50 ms, under the 60 ms heartbeat
    /// interval, so a dead primary's last heartbeat on the backup path could
    /// pass for life.
    #[test]
    fn the_path_margin_covers_a_heartbeat_interval() {
        let interval = ft_link::DEFAULT_HEARTBEAT_INTERVAL;
        assert!(
            path_margin(interval) > interval,
            "{:?}",
            path_margin(interval)
        );
        assert_eq!(
            path_margin(Duration::from_millis(10)),
            Duration::from_millis(50)
        );
    }
}
