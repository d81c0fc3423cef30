//! The standby: waits for a primary on the A-link, receives the initial
//! copy into a replica (guest RAM in a memfd, disk files of its own), then
//! applies each complete, checked epoch and acknowledges it. When the
//! primary goes silent or the link drops after at least one committed
//! epoch, the replica is handed back for promotion. A refused epoch (torn,
//! corrupt, replayed, out of order, or not decodable) is reported, never
//! applied, and ends the session: the primary then runs unprotected and
//! resynchronises from scratch.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ft_link::{Frame, FrameKind, Link, LinkConfig, LinkError, LinkListener};
use tokio::sync::mpsc;
use tracing::{info, warn};
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryBackend};
use vmm::memory::{self, GuestRam};

use crate::checkpoint::{CheckpointError, CheckpointState, SyncPlan};
use crate::epoch::{self, PAGE_SIZE};
use crate::replica_disk::{self, ReplicaDisk, ReplicaDiskError};
use crate::standby::{EpochAssembler, StandbyError};
use crate::status::StatusBoard;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("A-link: {0}")]
    Link(#[from] LinkError),
    #[error("the primary began with {0:?} instead of the synchronisation plan")]
    NoPlan(FrameKind),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("the primary's VM has {primary} disks, this standby was given {local}")]
    DiskCount { primary: usize, local: usize },
    #[error("the primary's VM has {primary} NICs, this standby was given {local} TAPs")]
    NicCount { primary: usize, local: usize },
    #[error("creating the replica's memory failed: {0}")]
    Memory(#[from] vmm::memory::MemoryError),
    #[error(transparent)]
    Disk(#[from] ReplicaDiskError),
    #[error("a synchronisation frame of {len} bytes is malformed")]
    BadSyncFrame { len: usize },
    #[error("synchronisation page at {gpa:#x} is outside the replica's memory")]
    SyncPageOutside { gpa: u64 },
    #[error("{0:?} frame after the first epoch")]
    LateSync(FrameKind),
    #[error("epoch refused: {0}")]
    Refused(#[from] StandbyError),
    #[error("the active A-link path failed while the primary is still heard on the backup path (no takeover): {0}")]
    PathLost(#[source] LinkError),
    #[error("the primary began a new session")]
    Superseded,
    #[error("the primary's VM stopped on purpose (no takeover)")]
    PrimaryStopped,
    #[error("epoch {epoch} refused: its state does not decode: {source}")]
    BadState {
        epoch: u64,
        #[source]
        source: CheckpointError,
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
    /// TAPs for the VM's NICs once promoted, in device order.
    pub taps: Vec<String>,
}

/// A replica that holds a committed epoch.
pub struct Replica {
    pub ram: GuestRam,
    pub disks: Vec<ReplicaDisk>,
    pub state: CheckpointState,
    pub epoch: u64,
}

/// A connection with its first frame read.
type Arrival = (Link, Frame);

/// Life on the backup path counts only this long after the last arrival on
/// the active path (frames already in flight when a primary dies).
const PATH_MARGIN: Duration = Duration::from_millis(50);

/// How long a new connection has to say what it is.
const FIRST_FRAME_WITHIN: Duration = Duration::from_secs(5);

/// Accepts connections on every listen address; each one's first frame is
/// read here (a new session begins with SyncBegin, a backup path with
/// Backup).
fn spawn_acceptors(
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
                    let mut link = match listener.accept().await {
                        Ok(link) => link,
                        Err(error) => {
                            warn!(%error, "A-link connection refused");
                            status.update(|s| s.message = Some(error.to_string()));
                            continue;
                        }
                    };
                    match tokio::time::timeout(FIRST_FRAME_WITHIN, link.recv()).await {
                        Ok(Ok(first)) => {
                            if tx.send((link, first)).await.is_err() {
                                return;
                            }
                        }
                        Ok(Err(error)) => {
                            warn!(%error, "A-link connection ended before its first frame")
                        }
                        Err(_) => warn!("A-link connection sent no first frame"),
                    }
                }
            })
        })
        .collect();
    (arrivals, tasks)
}

/// How a session ended (moved once per session: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Session {
    /// The primary is gone; this replica holds a committed epoch.
    Lost(Replica),
    /// Ended without a takeover; a new session may already be waiting.
    Ended(ReplicaError, Option<Arrival>),
}

/// Serves primaries until one is lost while this node holds a committed
/// replica; returns that replica.
pub async fn stand_by(config: &StandbyConfig, status: &StatusBoard) -> Result<Replica, LinkError> {
    let mut listeners = Vec::new();
    for addr in &config.listen {
        listeners.push(LinkListener::bind(addr.as_str(), config.link.clone()).await?);
    }
    info!(listen = ?config.listen, "standby waiting for a primary");
    let (mut arrivals, acceptors) = spawn_acceptors(listeners, status);
    let mut next = None;
    let mut why_ended: Option<String> = None;
    let replica = loop {
        status.set_state(
            crate::status::Role::Standby,
            crate::status::FtState::Waiting,
            why_ended.take(),
        );
        let arrival = match next.take() {
            Some(a) => a,
            None => arrivals.recv().await.expect("the acceptors run"),
        };
        if arrival.1.kind == FrameKind::Backup {
            // A backup path of a session that is over: nothing to do.
            continue;
        }
        match receive(arrival, &mut arrivals, config, status).await {
            Session::Lost(replica) => break replica,
            Session::Ended(error, waiting) => {
                warn!(%error, "standby session ended without a takeover");
                why_ended = Some(error.to_string());
                next = waiting;
            }
        }
    };
    for task in acceptors {
        task.abort();
    }
    Ok(replica)
}

/// A second path to the primary: kept open (heartbeats both ways) and
/// watched, so a lost active path can be told from a lost primary.
struct BackupPath {
    _sender: ft_link::LinkSender,
    liveness: ft_link::Liveness,
    /// When the path ended by the primary's side closing or resetting it
    /// (its host was alive then); a silent path leaves this empty.
    closed_by_peer_at: Arc<std::sync::Mutex<Option<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl BackupPath {
    fn watch(link: Link) -> BackupPath {
        let liveness = link.liveness();
        let (sender, mut receiver) = link.split();
        let closed_by_peer_at = Arc::new(std::sync::Mutex::new(None));
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

    /// Whether the primary showed life on this path after `since`: a frame
    /// or heartbeat arrived, or its side closed or reset the connection (a
    /// host that lost power does neither).
    fn heard_primary_after(&self, since: Instant) -> bool {
        self.liveness.last_arrival() > since
            || self
                .closed_by_peer_at
                .lock()
                .expect("backup lock")
                .is_some_and(|at| at > since)
    }
}

impl Drop for BackupPath {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Receives one session from a primary.
async fn receive(
    (mut link, first): Arrival,
    arrivals: &mut mpsc::Receiver<Arrival>,
    config: &StandbyConfig,
    status: &StatusBoard,
) -> Session {
    match session(&mut link, first, arrivals, config, status).await {
        Ok(outcome) => outcome,
        Err(error) => Session::Ended(error, None),
    }
}

async fn session(
    link: &mut Link,
    first: Frame,
    arrivals: &mut mpsc::Receiver<Arrival>,
    config: &StandbyConfig,
    status: &StatusBoard,
) -> Result<Session, ReplicaError> {
    status.update(|s| s.peer = Some(link.peer_addr().to_string()));
    if first.kind != FrameKind::SyncBegin {
        return Err(ReplicaError::NoPlan(first.kind));
    }
    let plan = SyncPlan::from_payload(&first.payload)?;
    if plan.disk_bytes.len() != config.disks.len() {
        return Err(ReplicaError::DiskCount {
            primary: plan.disk_bytes.len(),
            local: config.disks.len(),
        });
    }
    if plan.nics != config.taps.len() {
        return Err(ReplicaError::NicCount {
            primary: plan.nics,
            local: config.taps.len(),
        });
    }
    status.set_state(
        crate::status::Role::Standby,
        crate::status::FtState::Syncing,
        None,
    );
    let started = Instant::now();
    let ram = memory::create(plan.mem_mib)?;
    let disks = config
        .disks
        .iter()
        .zip(&plan.disk_bytes)
        .map(|(path, &size)| ReplicaDisk::create(path, size))
        .collect::<Result<Vec<_>, _>>()?;
    let mut assembler = EpochAssembler::new(1);
    let mut committed: Option<(u64, CheckpointState)> = None;
    let mut sync_bytes = 0u64;
    let mut backup: Option<BackupPath> = None;
    loop {
        let received = tokio::select! {
            r = link.recv() => r,
            arrival = arrivals.recv() => {
                let Some((other, first)) = arrival else { continue };
                if first.kind == FrameKind::Backup {
                    info!(path = %other.peer_addr(), "backup path to the primary is up");
                    backup = Some(BackupPath::watch(other));
                    continue;
                }
                // The primary started over (it lost this session's path):
                // no takeover, the new session goes on.
                return Ok(Session::Ended(ReplicaError::Superseded, Some((other, first))));
            }
        };
        let frame = match received {
            Ok(frame) => frame,
            Err(error) => {
                let active_heard = link.liveness().last_arrival();
                let aborted = assembler.abort();
                // A corrupt frame is bad input, not a dead primary: the
                // session ends without a takeover (the primary, alive,
                // resynchronises).
                if matches!(
                    error,
                    LinkError::Corrupt { .. } | LinkError::PeerRefused { .. }
                ) {
                    return Err(refused(status, error.into()));
                }
                // With a second path, the primary may only have lost this
                // one: if it is still heard there, it lives (no takeover;
                // it reconnects and resynchronises).
                // The window is the active path's silence: a live primary
                // sent several heartbeats on the backup meanwhile.
                if let Some(b) = &backup {
                    if b.heard_primary_after(active_heard + PATH_MARGIN) {
                        return Err(ReplicaError::PathLost(error));
                    }
                }
                return match committed {
                    Some((epoch, state)) => {
                        warn!(%error, last_committed = epoch, discarded_epoch = ?aborted,
                              "primary lost");
                        Ok(Session::Lost(Replica {
                            ram,
                            disks,
                            state,
                            epoch,
                        }))
                    }
                    None => Err(error.into()),
                };
            }
        };
        match frame.kind {
            FrameKind::Stop => return Err(ReplicaError::PrimaryStopped),
            FrameKind::SyncPages | FrameKind::SyncDisk if committed.is_some() => {
                return Err(ReplicaError::LateSync(frame.kind));
            }
            FrameKind::SyncPages => {
                sync_bytes += frame.payload.len() as u64;
                apply_sync_pages(&ram, &frame.payload)?;
            }
            FrameKind::SyncDisk => {
                sync_bytes += frame.payload.len() as u64;
                let records =
                    epoch::disk_records(&frame.payload).ok_or(ReplicaError::BadSyncFrame {
                        len: frame.payload.len(),
                    })?;
                for r in &records {
                    replica_disk::check(&disks, r)?;
                    disks[r.disk as usize].write(r.offset, &r.data)?;
                }
            }
            _ => {
                let epoch = frame.epoch;
                let complete = match assembler.on_frame(frame) {
                    Ok(Some(c)) => c,
                    Ok(None) => continue,
                    Err(e) => return Err(refused(status, e.into())),
                };
                let state = CheckpointState::from_payload(&complete.state)
                    .map_err(|source| refused(status, ReplicaError::BadState { epoch, source }))?;
                assembler
                    .apply(&complete, &ram.memory, &disks)
                    .map_err(|e| refused(status, e.into()))?;
                link.send(&Frame::new(FrameKind::Ack, epoch, Bytes::new()))
                    .await?;
                if committed.is_none() {
                    info!(
                        sync_bytes,
                        took_ms = started.elapsed().as_millis() as u64,
                        "first epoch committed: standing by"
                    );
                    status.set_state(
                        crate::status::Role::Standby,
                        crate::status::FtState::StandingBy,
                        None,
                    );
                }
                status.update(|s| {
                    s.epoch = epoch;
                    s.counters.epochs_applied += 1;
                    s.counters.dirty_pages_last = complete.pages.len() as u64;
                    s.counters.dirty_pages_total += complete.pages.len() as u64;
                    s.counters.disk_writes_total += complete.writes.len() as u64;
                });
                committed = Some((epoch, state));
            }
        }
    }
}

/// Counts and reports a refused epoch.
fn refused(status: &StatusBoard, error: ReplicaError) -> ReplicaError {
    warn!(%error, "epoch refused, not applied");
    status.update(|s| s.counters.epochs_rejected += 1);
    error
}

fn apply_sync_pages(ram: &GuestRam, payload: &Bytes) -> Result<(), ReplicaError> {
    let records =
        epoch::page_records(payload).ok_or(ReplicaError::BadSyncFrame { len: payload.len() })?;
    for (gpa, data) in records {
        let last = GuestAddress(gpa + PAGE_SIZE as u64 - 1);
        if !gpa.is_multiple_of(PAGE_SIZE as u64)
            || !ram.memory.address_in_range(GuestAddress(gpa))
            || !ram.memory.address_in_range(last)
        {
            return Err(ReplicaError::SyncPageOutside { gpa });
        }
        ram.memory
            .write_slice(&data, GuestAddress(gpa))
            .map_err(|_| ReplicaError::SyncPageOutside { gpa })?;
    }
    Ok(())
}
