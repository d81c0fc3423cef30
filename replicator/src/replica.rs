//! The standby: waits for a primary on the A-link, receives the initial
//! copy into a replica (guest RAM in a memfd, disk files of its own), then
//! applies each complete, checked epoch and acknowledges it. When the
//! primary goes silent or the link drops after at least one committed
//! epoch, the replica is handed back for promotion. A refused epoch (torn,
//! corrupt, replayed, out of order, or not decodable) is reported, never
//! applied, and ends the session: the primary then runs unprotected and
//! resynchronises from scratch.

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use ft_link::{Frame, FrameKind, Link, LinkConfig, LinkError, LinkListener};
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
    pub listen: String,
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

/// Serves primaries until one is lost while this node holds a committed
/// replica; returns that replica.
pub async fn stand_by(config: &StandbyConfig, status: &StatusBoard) -> Result<Replica, LinkError> {
    let listener = LinkListener::bind(config.listen.as_str(), config.link.clone()).await?;
    info!(listen = %config.listen, "standby waiting for a primary");
    loop {
        status.set_state("standby", "waiting", None);
        let link = match listener.accept().await {
            Ok(link) => link,
            Err(error) => {
                warn!(%error, "A-link connection refused");
                status.update(|s| s.message = Some(error.to_string()));
                continue;
            }
        };
        status.update(|s| s.peer = Some(link.peer_addr().to_string()));
        match receive(link, config, status).await {
            Ok(replica) => return Ok(replica),
            Err(error) => {
                warn!(%error, "standby session ended without a replica to promote");
                status.update(|s| s.message = Some(error.to_string()));
            }
        }
    }
}

/// Receives from one primary. Ok: the primary was lost and the replica
/// holds a committed epoch. Err: the session ended with nothing to promote.
async fn receive(
    mut link: Link,
    config: &StandbyConfig,
    status: &StatusBoard,
) -> Result<Replica, ReplicaError> {
    let first = link.recv().await?;
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
    status.set_state("standby", "syncing", None);
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
    loop {
        let frame = match link.recv().await {
            Ok(frame) => frame,
            Err(error) => {
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
                return match committed {
                    Some((epoch, state)) => {
                        warn!(%error, last_committed = epoch, discarded_epoch = ?aborted,
                              "primary lost");
                        Ok(Replica {
                            ram,
                            disks,
                            state,
                            epoch,
                        })
                    }
                    None => Err(error.into()),
                };
            }
        };
        match frame.kind {
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
                    status.set_state("standby", "standing-by", None);
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
