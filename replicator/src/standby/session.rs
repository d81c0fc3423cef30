//! One session with a primary, in steps: [`begin`] (check the plan, make
//! the replica), then for each message: [`next_message`], the initial copy
//! ([`Receiving::sync_pages`], [`Receiving::sync_disk`]) or an epoch
//! ([`Receiving::on_epoch_message`]: assemble, decode, apply, acknowledge,
//! count); when the link fails, [`link_lost`] decides between a takeover
//! and an end without one.

use std::collections::VecDeque;
use std::time::Instant;

use ft_link::{Link, LinkError};
use tokio::sync::mpsc;
use tracing::{info, warn};
use vmm::replication::ReplicaRam;

use super::copy_writeback::CopyWriteback;
use super::durable::Durable;
use super::inbound::InboundFrames;
use super::output_copies::OutputCopies;
use super::overheard::{Overheard, Overhearing};
use super::paths::{Arrival, BackupPath};
use super::replica_disk::{self, Fresh, ReplicaDisk};
use super::{path_margin, Checkpointed, Machine, Replica, StandbyConfig, StandbyError};
use crate::assembler::{AssemblerError, CompleteEpoch, EpochAssembler, StagingLimits};
use crate::content::ContentKey;
use crate::level::Level;
use crate::protocol::{
    BootPlan, CheckpointState, DiskBatch, EndTally, Envelope, EpochEnd, Held, HeldPart, Message,
    PageBatch, ProtocolError, Region, SyncPlan, WrittenPlan,
};
use crate::status::{FtState, Role, StatusBoard};
use crate::written;
use crate::{oracle, workers};
use vmm::replication::written_map::extents_of;

/// How a session ended (moved once per session: its size does not matter).
#[allow(clippy::large_enum_variant)]
pub(super) enum Session {
    /// The primary is gone; this replica holds a committed epoch.
    Lost(Replica),
    /// The active path failed while the primary was still heard on the
    /// backup path; the replica (holding a committed epoch) is kept while
    /// the caller watches that path.
    PathLost(Box<Replica>, BackupPath, LinkError),
    /// Ended without a takeover; a new session may already be waiting.
    Ended(StandbyError, Option<Arrival>),
}

/// Receives one session from a primary.
pub(super) async fn receive(
    (mut link, first): Arrival,
    arrivals: &mut mpsc::Receiver<Arrival>,
    config: &StandbyConfig,
    status: &StatusBoard,
) -> Session {
    let generation = first.generation;
    match run(&mut link, first, arrivals, config, status).await {
        Ok(outcome) => outcome,
        Err(error) => {
            if error.is_this_nodes_fault() {
                refuse(&link, &error, generation, &status.snapshot().node).await;
            }
            Session::Ended(error, None)
        }
    }
}

/// Tells the primary why this standby ends the session (best effort: the
/// link may be gone), so that its status and the operator see the reason
/// instead of a closed connection.
async fn refuse(link: &Link, error: &StandbyError, generation: u64, node: &str) {
    let reason = format!("the standby on {node}: {error}");
    let frame = Message::Refuse(reason).into_frame(0, generation);
    match tokio::time::timeout(REFUSE_WITHIN, link.send(&frame)).await {
        Ok(Ok(())) => info!(%error, "told the primary why this standby cannot hold the replica"),
        Ok(Err(e)) => warn!(%error, send_error = %e, "could not tell the primary why"),
        Err(_) => warn!(%error, "could not tell the primary why within {REFUSE_WITHIN:?}"),
    }
}

/// How long telling the primary may take.
const REFUSE_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

async fn run(
    link: &mut Link,
    first: Envelope,
    arrivals: &mut mpsc::Receiver<Arrival>,
    config: &StandbyConfig,
    status: &StatusBoard,
) -> Result<Session, StandbyError> {
    status.update(|s| {
        s.peer = Some(link.peer_addr().to_string());
        s.alink = Some(link.protection().describe().to_string());
    });
    let (mut replica, key, kept) = begin(first, config, status)?;
    tell_holdings(link, &replica, &key, &kept, status).await?;
    // Until the first epoch commits, a silence ends the session without a
    // takeover, and restarts a copy that may have run for a long while: it
    // is judged after SYNC_SILENCE at least.
    let silence = config.link.heartbeat_timeout;
    link.set_silence_timeout(silence.max(crate::SYNC_SILENCE));
    let mut standing_by = false;
    loop {
        if !standing_by && replica.committed.is_some() {
            standing_by = true;
            link.set_silence_timeout(silence);
        }
        let envelope = match next_message(link, arrivals, &mut replica.backup).await {
            Next::Message(envelope) if envelope.generation != replica.generation => {
                return Err(refused(
                    status,
                    StandbyError::WrongGeneration {
                        kind: envelope.message.name(),
                        got: envelope.generation,
                        session: replica.generation,
                    },
                ));
            }
            Next::Message(envelope) => envelope,
            Next::Malformed(error) => return Err(refused(status, error.into())),
            Next::Superseded(arrival) => {
                // The primary started over (it lost this session's path):
                // no takeover, the new session goes on.
                return Ok(Session::Ended(StandbyError::Superseded, Some(*arrival)));
            }
            Next::LinkFailed(error) => return link_lost(error, link, replica, config, status),
        };
        match envelope.message {
            Message::Stop => return Err(StandbyError::PrimaryStopped),
            // The primary goes on without this standby (it did not
            // acknowledge in time): no takeover; the replica stays for the
            // next session to compare against.
            Message::Release => return Err(StandbyError::Released),
            // The primary's VM failed on its host: the replica takes over
            // at once (no waiting for silence).
            Message::Handover => return handed_over(replica, status),
            // A planned switchover: the epoch just acknowledged is the
            // last; take over from it now.
            Message::Switchover => {
                let (epoch, generation) = (envelope.epoch, replica.generation);
                let outcome = switched_over(replica, epoch, status);
                match &outcome {
                    // The primary waits for this word before it stops.
                    Ok(_) => {
                        let ack = Message::Ack.into_frame(epoch, generation);
                        if let Ok(Err(error)) =
                            tokio::time::timeout(REFUSE_WITHIN, link.send(&ack)).await
                        {
                            warn!(%error, "the switchover could not be acknowledged; taking over anyway");
                        }
                    }
                    Err(error) => refuse(link, error, generation, &status.snapshot().node).await,
                }
                return outcome;
            }
            Message::SyncPages(_) | Message::SyncDisk(_) | Message::SyncEnd(_)
                if replica.committed.is_some() || replica.synced =>
            {
                return Err(StandbyError::LateSync(envelope.message.name()));
            }
            Message::SyncPages(batch) => replica.sync_pages(batch)?,
            Message::SyncDisk(batch) => replica.sync_disk(batch)?,
            Message::SyncEnd(end) => replica.sync_end(end, status)?,
            Message::Inbound(batch) => replica.inbound.add(batch),
            Message::FinalOutput(batch) => replica.final_output(batch, envelope.epoch, status)?,
            Message::EpochOutput(batch) => replica.epoch_output(batch, envelope.epoch),
            // An epoch over a copy not known to be whole would be promoted
            // with whatever the copy missed.
            other if !replica.synced => {
                return Err(refused(
                    status,
                    StandbyError::EpochBeforeSyncEnd(other.name()),
                ));
            }
            _ => {
                // An acknowledgement that cannot be sent is a lost link,
                // not a bad epoch: the epoch is committed here, and the
                // replica may be needed.
                if let Some(error) = replica.on_epoch_message(envelope, link, status).await? {
                    return link_lost(error, link, replica, config, status);
                }
            }
        }
    }
}

/// The replica a session builds.
struct Receiving {
    /// The replica's memory (none at level HA).
    ram: Option<ReplicaRam>,
    disks: Vec<ReplicaDisk>,
    /// Level HA: how the VM boots from the mirror (the replica is its
    /// disks alone; epochs are batches of disk writes).
    mirror: Option<BootPlan>,
    assembler: EpochAssembler,
    /// The last committed epoch and its state (none at level HA).
    committed: Option<(u64, Option<CheckpointState>)>,
    /// What the primary's guest received past the committed epoch.
    inbound: InboundFrames,
    /// Frames for the guest that reach this node (level FT, from the
    /// first committed epoch, where this node can).
    overhearing: Option<Overhearing>,
    /// A switchover's final output (of the committed epoch), per NIC.
    final_output: Vec<Vec<bytes::Bytes>>,
    final_output_bytes: usize,
    /// The copies of the epochs' output, received and committed.
    committed_output: OutputCopies,
    /// The capture clock's offset from this node's, as seen over the
    /// latest epochs (see `on_epoch_message`).
    clock_offsets: VecDeque<i128>,
    /// The session's generation (every message carries it).
    generation: u64,
    sync_bytes: u64,
    /// What the initial copy brought, for its end record.
    tally: EndTally,
    /// The initial copy ended and its end record matched.
    synced: bool,
    started: Instant,
    backup: Option<BackupPath>,
    /// The written maps' side of the session.
    durable: Durable,
    /// The copy's writes, handed to the disks' writeback as they come
    /// (none once the copy ended).
    writeback: Option<CopyWriteback>,
    /// The session's memory lineage: the RAM file is labelled with it and
    /// each epoch applied ([`crate::memory_point`]).
    lineage: Option<crate::memory_point::Lineage>,
}

/// What `begin` kept of an earlier replica on this node.
struct Kept {
    /// Per disk: why it was made new, if it was.
    disks: Vec<Option<Fresh>>,
    memory: bool,
    /// Kept memory whose label names a checkpoint the primary offers to
    /// bring forward from.
    memory_since: Option<u64>,
    /// The primary's written maps, per disk, from its plan.
    written: Vec<Option<WrittenPlan>>,
}

/// Checks the primary's plan against this standby and makes the replica
/// for it: disks and memory kept from before where they fit (with why not
/// where they do not). Returns the session's content key.
fn begin(
    first: Envelope,
    config: &StandbyConfig,
    status: &StatusBoard,
) -> Result<(Receiving, ContentKey, Kept), StandbyError> {
    let Message::SyncBegin(plan) = first.message else {
        return Err(StandbyError::NoPlan(first.message.name()));
    };
    if first.generation < config.min_generation {
        return Err(StandbyError::StaleGeneration {
            got: first.generation,
            known: config.min_generation,
        });
    }
    check_plan(&plan, config)?;
    status.set_state(Role::Standby, FtState::Syncing, None);
    status.update(|s| s.generation = first.generation);
    let key = plan
        .key()
        .ok_or(StandbyError::Protocol(ProtocolError::Malformed {
            kind: "SyncBegin",
            epoch: 0,
            len: 0,
            why: "no content key",
        }))?;
    // Waits for another process that still holds a disk (and reserves
    // the disks' blocks): off the async workers. First, so that a disk
    // still held refuses the plan before the RAM file is touched.
    let (disks, fresh): (Vec<_>, Vec<_>) = workers::off_the_workers(|| {
        config
            .disks
            .iter()
            .zip(&plan.disk_bytes)
            .map(|(path, &size)| ReplicaDisk::open_or_create(path, size))
            .collect::<Result<Vec<_>, _>>()
    })?
    .into_iter()
    .unzip();
    // Waits for an earlier holder of the RAM file and allocates it:
    // off the async workers too. A mirror (level HA) holds no memory.
    let (ram, kept_memory) = match plan.level {
        Level::Ha => (None, false),
        Level::Ft => {
            let (ram, kept) = workers::off_the_workers(|| match &config.ram_file {
                Some(path) => ReplicaRam::open_file(path, plan.mem_mib),
                None => ReplicaRam::create(plan.mem_mib).map(|ram| (ram, false)),
            })?;
            (Some(ram), kept)
        }
    };
    status.update(|s| s.level = plan.level);
    let writeback = CopyWriteback::start(&disks);
    let receiving = Receiving {
        ram,
        disks,
        mirror: plan.boot.clone().filter(|_| plan.level == Level::Ha),
        assembler: EpochAssembler::with_limits(1, StagingLimits::for_guest(plan.mem_mib)),
        committed: None,
        inbound: InboundFrames::new(plan.nics),
        overhearing: None,
        final_output: vec![Vec::new(); plan.nics],
        final_output_bytes: 0,
        committed_output: OutputCopies::new(plan.nics),
        clock_offsets: VecDeque::new(),
        generation: first.generation,
        sync_bytes: 0,
        tally: EndTally::default(),
        synced: false,
        started: Instant::now(),
        backup: None,
        durable: Durable::new(
            plan.next_common
                .as_deref()
                .and_then(written::common_from_hex),
        ),
        writeback: Some(writeback),
        lineage: plan
            .memory_lineage
            .as_deref()
            .and_then(crate::written::common_from_hex),
    };
    let memory_since = receiving
        .ram
        .as_ref()
        .filter(|_| kept_memory)
        .and_then(|ram| labelled_since(ram.taken_label()?, plan.memory_since.as_ref()?));
    let kept = Kept {
        disks: fresh,
        memory: kept_memory,
        memory_since,
        written: plan.written.clone(),
    };
    Ok((receiving, key, kept))
}

/// The checkpoint a RAM file's label names, if the primary offers to
/// bring memory forward from it.
fn labelled_since(label: &[u8], offer: &crate::protocol::MemorySince) -> Option<u64> {
    let (lineage, epoch) = crate::memory_point::from_label(label)?;
    let offered = crate::written::common_from_hex(&offer.lineage)?;
    (lineage == offered && (offer.from..=offer.through).contains(&epoch)).then_some(epoch)
}

/// Tells the primary what the replica holds of each disk and of memory:
/// new is all zeros; kept is read whole and digested under the session's
/// key (seconds for a large disk: off the async workers), so that the
/// copy brings only the chunks that differ.
async fn tell_holdings(
    link: &Link,
    replica: &Receiving,
    key: &ContentKey,
    kept: &Kept,
    status: &StatusBoard,
) -> Result<(), StandbyError> {
    let started = Instant::now();
    let mut kept_bytes = 0u64;
    // New memory, or memory labelled with a checkpoint the primary can
    // bring forward, is said first, before the kept disks are read: the
    // primary, digesting its own memory meanwhile for a comparison, stops.
    let said_first = match (&replica.ram, kept.memory, kept.memory_since) {
        (None, _, _) => None,
        (Some(_), false, _) => Some(HeldPart::Zeroed),
        (Some(_), true, Some(epoch)) => {
            info!(
                checkpoint = epoch,
                "kept replica memory is labelled with a checkpoint the primary offers: not compared, brought forward"
            );
            Some(HeldPart::Since { epoch })
        }
        (Some(_), true, None) => None,
    };
    if let Some(part) = said_first {
        let held = Held {
            region: Region::Memory,
            part,
        };
        link.send(&Message::SyncHeld(held).into_frame(0, replica.generation))
            .await?;
    }
    let mut messages = Vec::new();
    for (index, (disk, fresh)) in replica.disks.iter().zip(&kept.disks).enumerate() {
        let region = Region::Disk(index as u32);
        messages.extend(match fresh {
            Some(why) => {
                info!(disk = %disk.path.display(), ?why, "replica disk made new: the copy brings all of it");
                vec![Held {
                    region,
                    part: HeldPart::Zeroed,
                }]
            }
            None => {
                let primary = kept.written.get(index).cloned().flatten();
                match by_map(disk, primary.as_ref()) {
                    Ok(union) => {
                        // Whatever the copy brings lies in these extents:
                        // they stay set until the new common point.
                        workers::off_the_workers(|| disk.map().note_extents(&union))
                            .map_err(|e| disk.map_err(e))?;
                        let chunks = written::chunks_of(&union, disk.size);
                        let read: u64 = chunks.iter().map(|c| c.end - c.start).sum();
                        info!(
                            disk = %disk.path.display(),
                            extents = union.iter().map(|r| r.end - r.start).sum::<u64>(),
                            chunks_read = read,
                            "kept replica disk compared by the written maps: only the extents either node wrote are read"
                        );
                        kept_bytes += (read * crate::content::DISK_CHUNK as u64).min(disk.size);
                        workers::off_the_workers(|| mapped_holdings(region, disk, key, &chunks))?
                    }
                    Err(why) => {
                        info!(disk = %disk.path.display(), %why, "kept replica disk compared whole");
                        // The copy overwrites it: it matches nothing known
                        // until the new common point.
                        disk.map()
                            .set_common(None, u64::MAX)
                            .map_err(|e| disk.map_err(e))?;
                        status.update(|s| {
                            s.message = Some(format!(
                                "reading the kept replica disk {} to compare it with the primary's",
                                disk.path.display()
                            ))
                        });
                        let digests = workers::off_the_workers(|| disk.digests(key))?;
                        kept_bytes += disk.size;
                        Held::kept(region, &digests)
                    }
                }
            }
        });
    }
    // A mirror (level HA) holds no memory and says nothing of it; new
    // memory was said above.
    messages.extend(
        match (&replica.ram, kept.memory && kept.memory_since.is_none()) {
            (None, _) | (Some(_), false) => Vec::new(),
            (Some(ram), true) => {
                let pages = ram.bytes() / crate::protocol::PAGE_SIZE as u64;
                let digests = workers::off_the_workers(|| {
                    crate::content::digest_pages(pages, key, |gpa, page| ram.read_page(gpa, page))
                })?;
                kept_bytes += ram.bytes();
                Held::kept(Region::Memory, &digests)
            }
        },
    );
    for held in messages {
        link.send(&Message::SyncHeld(held).into_frame(0, replica.generation))
            .await?;
    }
    if kept_bytes > 0 {
        status.update(|s| s.message = None);
        info!(
            kept_bytes,
            took_ms = started.elapsed().as_millis() as u64,
            "kept replica digested: the copy brings only what differs"
        );
    }
    Ok(())
}

/// The extents to compare of a kept disk by the written maps (those its
/// own map or the primary's names), or why the whole disk is compared.
fn by_map(
    disk: &ReplicaDisk,
    primary: Option<&WrittenPlan>,
) -> Result<Vec<written::Extents>, written::NotByMap> {
    if let Some(why) = written::why_not_by_map(disk.map().common(), primary) {
        return Err(why);
    }
    let primary = primary.expect("checked");
    let theirs = written::plan_extents(primary, extents_of(disk.size))
        .ok_or(written::NotByMap::Malformed)?;
    Ok(written::union(&disk.map().written(), &theirs))
}

/// What a kept disk holds by the maps: the digests of `chunks` (chunk
/// ranges in order), every other chunk the same as the primary's.
fn mapped_holdings(
    region: Region,
    disk: &ReplicaDisk,
    key: &ContentKey,
    chunks: &[std::ops::Range<u64>],
) -> Result<Vec<Held>, StandbyError> {
    let total = crate::content::disk_chunks(disk.size);
    let mut held = Vec::new();
    let mut next = 0u64;
    for range in chunks {
        if range.start > next {
            held.push(Held {
                region,
                part: HeldPart::Same {
                    first_chunk: next,
                    count: range.start - next,
                },
            });
        }
        let digests = disk.digests_of(key, range.clone())?;
        for (i, part) in digests
            .chunks(crate::protocol::DIGESTS_PER_FRAME)
            .enumerate()
        {
            held.push(Held {
                region,
                part: HeldPart::Digests {
                    first_chunk: range.start + (i * crate::protocol::DIGESTS_PER_FRAME) as u64,
                    digests: part.to_vec(),
                },
            });
        }
        next = range.end;
    }
    if next < total || held.is_empty() {
        held.push(Held {
            region,
            part: HeldPart::Same {
                first_chunk: next,
                count: total - next,
            },
        });
    }
    Ok(held)
}

fn check_plan(plan: &SyncPlan, config: &StandbyConfig) -> Result<(), StandbyError> {
    if plan.disk_bytes.len() != config.disks.len() {
        return Err(StandbyError::DiskCount {
            primary: plan.disk_bytes.len(),
            local: config.disks.len(),
        });
    }
    if plan.nics != config.taps.len() {
        return Err(StandbyError::NicCount {
            primary: plan.nics,
            local: config.taps.len(),
        });
    }
    Ok(())
}

enum Next {
    Message(Envelope),
    Malformed(ProtocolError),
    Superseded(Box<Arrival>),
    LinkFailed(LinkError),
}

/// The next message of the session; a backup path arriving meanwhile is
/// taken on, a new session ends this one.
async fn next_message(
    link: &mut Link,
    arrivals: &mut mpsc::Receiver<Arrival>,
    backup: &mut Option<BackupPath>,
) -> Next {
    loop {
        tokio::select! {
            received = link.recv() => {
                return match received {
                    Ok(frame) => match Message::from_frame(frame) {
                        Ok(envelope) => Next::Message(envelope),
                        Err(error) => Next::Malformed(error),
                    },
                    Err(error) => Next::LinkFailed(error),
                };
            }
            arrival = arrivals.recv() => {
                let Some((other, first)) = arrival else { continue };
                if first.message == Message::Backup {
                    info!(path = %other.peer_addr(), "backup path to the primary is up");
                    *backup = Some(BackupPath::watch(other));
                    continue;
                }
                return Next::Superseded(Box::new((other, first)));
            }
        }
    }
}

/// The session's link failed: a takeover if the primary is gone and this
/// replica holds a committed epoch, otherwise an end without one.
fn link_lost(
    error: LinkError,
    link: &Link,
    mut replica: Receiving,
    config: &StandbyConfig,
    status: &StatusBoard,
) -> Result<Session, StandbyError> {
    let active_heard = link.liveness().last_arrival();
    if matches!(error, LinkError::PeerSilent { .. }) {
        status.update(|s| s.counters.silence_ends += 1);
    }
    let aborted = replica.assembler.abort();
    // A corrupt frame is bad input, not a dead primary: the session ends
    // without a takeover (the primary, alive, resynchronises).
    if matches!(
        error,
        LinkError::Corrupt { .. } | LinkError::PeerRefused { .. }
    ) {
        return Err(refused(status, error.into()));
    }
    // With a second path, the primary may only have lost this one: if it
    // is still heard there, it lives (no takeover; it reconnects and
    // resynchronises). After a silence the window is the silence itself: a
    // live primary sent several heartbeats on the backup meanwhile. After an
    // abrupt end (a FIN or a reset: a middlebox, a restarted path, or a
    // primary whose process ended) nothing can be judged yet: the backup
    // path is watched for the silence timeout before anything is decided.
    let abrupt = !matches!(error, LinkError::PeerSilent { .. });
    let margin = path_margin(config.link.heartbeat_interval);
    if replica
        .backup
        .as_ref()
        .is_some_and(|b| abrupt || b.heard_primary_after(active_heard + margin))
    {
        let backup = replica.backup.take().expect("checked");
        return match replica.into_replica(Some(active_heard)) {
            Some(kept) => {
                warn!(%error, last_committed = kept.epoch, "active path lost; the primary is heard on the backup path");
                Ok(Session::PathLost(Box::new(kept), backup, error))
            }
            None => Err(StandbyError::PathLost(error)),
        };
    }
    match replica.into_replica(Some(active_heard)) {
        Some(kept) => {
            warn!(%error, last_committed = kept.epoch, discarded_epoch = ?aborted, "primary lost");
            Ok(Session::Lost(kept))
        }
        None => Err(error.into()),
    }
}

/// The primary handed its VM over: a takeover from the last committed
/// epoch (an epoch under way is dropped), or, before the first one, an
/// end (there is nothing to take over).
fn handed_over(mut replica: Receiving, status: &StatusBoard) -> Result<Session, StandbyError> {
    let aborted = replica.assembler.abort();
    // The primary lives: frames for its guest reached it, not this node.
    match replica.into_replica(None) {
        Some(kept) => {
            warn!(last_committed = kept.epoch, discarded_epoch = ?aborted, "the primary handed its VM over");
            status.update(|s| {
                s.message = Some("the primary's VM failed on its host: taking over".into())
            });
            Ok(Session::Lost(kept))
        }
        None => Err(StandbyError::HandedOverUnsynced),
    }
}

/// The primary switched over to this standby: a takeover from its final
/// epoch, which must be the one committed here (anything else is refused:
/// the primary's guest stays stopped, so it does not resume on a replica
/// that missed its last epoch; the primary then takes the VM back).
fn switched_over(
    mut replica: Receiving,
    last: u64,
    status: &StatusBoard,
) -> Result<Session, StandbyError> {
    let committed = replica.committed.as_ref().map(|(epoch, _)| *epoch);
    if committed != Some(last) {
        return Err(refused(
            status,
            StandbyError::SwitchoverNotCommitted { last, committed },
        ));
    }
    let final_output = std::mem::take(&mut replica.final_output);
    let mut kept = replica.into_replica(None).expect("an epoch is committed");
    kept.switchover = true;
    if let Machine::Checkpoint(checkpoint) = &mut kept.machine {
        checkpoint.final_output = final_output;
    }
    info!(
        epoch = kept.epoch,
        "planned switchover: taking over from the primary's final epoch"
    );
    status.update(|s| s.message = Some("planned switchover: taking over".into()));
    Ok(Session::Lost(kept))
}

impl Receiving {
    /// The replica as of its last committed epoch (none before the first).
    /// `primary_last_heard`: the last arrival from a primary that is gone
    /// (frames for its guest overheard from a little before then on are
    /// given to the promoted guest); None while the primary lives.
    fn into_replica(self, primary_last_heard: Option<Instant>) -> Option<Replica> {
        let (epoch, state) = self.committed?;
        let machine = match (self.ram, state, self.mirror) {
            (Some(ram), Some(state), _) => {
                if self.inbound.dropped() > 0 {
                    warn!(
                        dropped = self.inbound.dropped(),
                        "some frames the primary's guest received were not kept"
                    );
                }
                let overheard = self
                    .overhearing
                    .zip(primary_last_heard)
                    .map(|(hearing, heard)| {
                        Overheard::new(hearing, heard, self.inbound.forwarded_digests())
                    });
                Machine::Checkpoint(Box::new(Checkpointed {
                    ram,
                    state,
                    inbound: self.inbound.into_replay(),
                    overheard,
                    // The committed epochs' output, which the primary may
                    // not have released (a switchover hands over its own).
                    final_output: self.committed_output.in_order(),
                }))
            }
            (None, None, Some(boot)) => Machine::Boot(boot),
            _ => unreachable!(
                "a checkpoint commits with its memory, a mirror epoch with a boot plan"
            ),
        };
        Some(Replica {
            disks: self.disks,
            epoch,
            generation: self.generation,
            switchover: false,
            granted_lease: None,
            ended: super::SessionEnd {
                at: Instant::now(),
                last_heard: primary_last_heard,
            },
            decided: None,
            memory_point: self
                .lineage
                .filter(|_| matches!(machine, Machine::Checkpoint(_)))
                .map(|lineage| (lineage, epoch)),
            machine,
        })
    }

    /// Output of the committed epoch `epoch` that the primary handed over
    /// with a switchover (sent from here once this node runs the VM).
    fn final_output(
        &mut self,
        batch: crate::protocol::InboundBatch,
        epoch: u64,
        status: &StatusBoard,
    ) -> Result<(), StandbyError> {
        let committed = self.committed.as_ref().map(|(e, _)| *e);
        if committed != Some(epoch) {
            return Err(refused(
                status,
                StandbyError::SwitchoverNotCommitted {
                    last: epoch,
                    committed,
                },
            ));
        }
        for record in batch.into_records() {
            let fits = self.final_output_bytes + record.frame.len() <= FINAL_OUTPUT_MAX;
            match self.final_output.get_mut(record.nic as usize) {
                Some(frames) if fits => {
                    self.final_output_bytes += record.frame.len();
                    frames.push(record.frame);
                }
                // Too much, or a NIC the replica does not have: a frame
                // its peer sends again.
                _ => warn!(nic = record.nic, "a frame of the final output was dropped"),
            }
        }
        Ok(())
    }

    /// A copy of the output of epoch `epoch` (sent before the epoch).
    fn epoch_output(&mut self, batch: crate::protocol::InboundBatch, epoch: u64) {
        let committed = self.committed.as_ref().map(|(e, _)| *e);
        self.committed_output.add(batch, epoch, committed);
    }

    /// Initial copy: memory pages, checked before any is written.
    fn sync_pages(&mut self, batch: PageBatch) -> Result<(), StandbyError> {
        // A mirror (level HA) has no memory: not one page is within it.
        let ram_bytes = self.ram.as_ref().map_or(0, |ram| ram.bytes());
        batch.check_within(ram_bytes)?;
        let ram = self.ram.as_ref().expect("pages are within memory");
        self.tally.add_pages(&batch);
        for (gpa, data) in batch.records() {
            ram.write_page(gpa, data)?;
        }
        self.sync_bytes += (batch.len() * crate::protocol::PAGE_RECORD) as u64;
        Ok(())
    }

    /// The initial copy's end record: every batch it announces arrived,
    /// once and in order, or the session ends (no takeover: the primary,
    /// alive, copies again).
    fn sync_end(&mut self, sent: EpochEnd, status: &StatusBoard) -> Result<(), StandbyError> {
        let received = self.tally.end();
        if sent != received {
            return Err(refused(
                status,
                StandbyError::SyncIncomplete {
                    pages_sent: sent.pages,
                    pages_received: received.pages,
                    disk_sent: sent.writes,
                    disk_received: received.writes,
                },
            ));
        }
        self.synced = true;
        // The copy is over: its writeback thread ends (what it did not
        // hand on, the first epoch's sync writes).
        self.writeback = None;
        info!(
            pages = sent.pages,
            disk_records = sent.writes,
            "initial copy complete and checked"
        );
        Ok(())
    }

    /// Initial copy: disk contents, checked before any is written.
    fn sync_disk(&mut self, batch: DiskBatch) -> Result<(), StandbyError> {
        self.tally.add_disk(&batch);
        for r in batch.records() {
            replica_disk::check(&self.disks, r)?;
        }
        for r in batch.records() {
            self.disks[r.disk as usize].write(r.offset, &r.data)?;
            if let Some(writeback) = &mut self.writeback {
                writeback.wrote(r.disk as usize, r.offset, r.data.len() as u64);
            }
        }
        self.sync_bytes += batch.bytes().len() as u64;
        Ok(())
    }

    /// A message of an epoch: when it completes the epoch, the epoch is
    /// decoded, applied whole, committed and acknowledged. The replica
    /// holds the epoch from the moment it is applied, so it is committed
    /// before the acknowledgement goes out: if the acknowledgement cannot
    /// be sent (the link failed meanwhile), the link's error is returned
    /// for the caller to judge as a lost link, with this epoch committed.
    async fn on_epoch_message(
        &mut self,
        envelope: Envelope,
        link: &Link,
        status: &StatusBoard,
    ) -> Result<Option<LinkError>, StandbyError> {
        let (epoch, generation) = (envelope.epoch, envelope.generation);
        let Some(complete) = self
            .assembler
            .on_message(envelope)
            .map_err(|e| refused(status, e.into()))?
        else {
            return Ok(None);
        };
        let state = match &self.ram {
            Some(ram) => {
                let mut state = CheckpointState::from_payload(&complete.state)
                    .map_err(|source| refused(status, StandbyError::BadState { epoch, source }))?;
                // The capture time on this node's clock: the nodes' clocks
                // may differ by more than the gap a promotion advances the
                // guest's time by (the lab's by up to a second), and a guest
                // whose time moves on too little fires its TCP
                // retransmissions late.
                let captured =
                    capture_time_here(&mut self.clock_offsets, state.machine.captured_unix_ns);
                state.machine.set_capture_time(captured);
                Durable::note(&self.disks, &complete.writes)
                    .map_err(|e| refused(status, e.into()))?;
                if let Err(error) = self.assembler.apply(&complete, ram, &self.disks) {
                    if let AssemblerError::AuditMismatch { differ, .. } = &error {
                        // The replica is not its primary's: no later
                        // session may bring it forward from its label.
                        if let Err(e) = ram.clear_label() {
                            warn!(epoch, error = %e, "the RAM file's label could not be cleared");
                        }
                        warn!(epoch, differ = ?differ, "page audit: the replica drifted from the primary; it is dropped");
                        status.update(|s| s.counters.audit_mismatches += 1);
                    }
                    return Err(refused(status, error.into()));
                }

                // The RAM now holds this checkpoint of the session (a
                // label left behind names an earlier one of it: still
                // true of what a later copy would bring).
                if let Some(lineage) = &self.lineage {
                    if let Err(error) = ram.set_label(&crate::memory_point::label(lineage, epoch)) {
                        warn!(epoch, %error, "the RAM file's label could not be written");
                    }
                }
                if let Some(digest) = &state.digest {
                    // Seconds of reading on a large VM: off the async workers.
                    workers::off_the_workers(|| self.verify(ram, epoch, digest, status));
                }
                Some(state)
            }
            None => {
                // Level HA: disk writes alone, durable before the
                // acknowledgement lets the primary's guest see them done.
                if !complete.state.is_empty() {
                    let len = complete.state.len();
                    return Err(refused(status, StandbyError::StateInMirror { epoch, len }));
                }
                Durable::note(&self.disks, &complete.writes)
                    .map_err(|e| refused(status, e.into()))?;
                let disks = &self.disks;
                let assembler = &mut self.assembler;
                workers::off_the_workers(|| assembler.apply_writes(&complete, disks))
                    .map_err(|e| refused(status, e.into()))?;
                None
            }
        };
        self.committed_epoch(&complete, state, status);
        match link.send(&Message::Ack.into_frame(epoch, generation)).await {
            Ok(()) => Ok(None),
            Err(error) => {
                warn!(epoch, %error, "the acknowledgement of a committed epoch could not be sent");
                Ok(Some(error))
            }
        }
    }

    /// The consistency oracle: the replica, right after applying `epoch`,
    /// against the primary's digest of that checkpoint.
    fn verify(&self, ram: &ReplicaRam, epoch: u64, primary: &oracle::Digest, status: &StatusBoard) {
        let started = Instant::now();
        let paths: Vec<_> = self.disks.iter().map(|d| d.path.clone()).collect();
        let verdict = match oracle::digest(ram.bytes(), |gpa, buf| ram.read_page(gpa, buf), &paths)
        {
            Ok(replica) => oracle::compare(
                epoch,
                primary,
                &replica,
                started.elapsed().as_millis() as u64,
            ),
            Err(e) => oracle::Verdict {
                epoch,
                equal: false,
                digest_ms: started.elapsed().as_millis() as u64,
                memory_differs: vec![],
                disk_differs: vec![],
                shape: Some(format!("the replica could not be digested: {e}")),
            },
        };
        if verdict.equal {
            info!(
                epoch,
                digest_ms = verdict.digest_ms,
                "consistency check: the replica equals the primary"
            );
        } else {
            warn!(
                epoch,
                ?verdict,
                "consistency check: the replica DIFFERS from the primary"
            );
        }
        status.update(|s| {
            s.counters.oracle_checks += 1;
            if !verdict.equal {
                s.counters.oracle_mismatches += 1;
            }
            s.oracle = Some(verdict);
        });
    }

    /// Statistics and state after epoch `complete` committed.
    fn committed_epoch(
        &mut self,
        complete: &CompleteEpoch,
        state: Option<CheckpointState>,
        status: &StatusBoard,
    ) {
        if self.committed.is_none() {
            info!(
                sync_bytes = self.sync_bytes,
                took_ms = self.started.elapsed().as_millis() as u64,
                "first epoch committed: standing by"
            );
            // The KVM VM a promotion runs the replica in is made now, not
            // after the primary is lost.
            if let (Some(ram), Some(state)) = (&mut self.ram, &state) {
                ram.prepare_vm(state.machine.vcpu_count);
                self.overhearing = overhear(&state.machine.nic_macs());
            }
            status.set_state(Role::Standby, FtState::StandingBy, None);
        }
        status.update(|s| {
            s.epoch = complete.epoch;
            s.counters.epochs_applied += 1;
            s.counters.dirty_pages_last = complete.page_count;
            s.counters.dirty_pages_total += complete.page_count;
            s.counters.disk_writes_total += complete.writes.len() as u64;
            s.counters.audit_pages_total += complete.audit.len() as u64;
        });
        if let Some(state) = &state {
            self.inbound.commit(&state.inbound_through);
        }
        self.committed_output.committed(complete.epoch);
        self.committed = Some((complete.epoch, state));
        self.durable.committed(&self.disks);
    }
}

/// Starts overhearing the guest's frames on this node; without it (a
/// node that may not open packet sockets), peers of a promoted guest
/// retransmit what was lost with the primary, as they would anyway. Said
/// as a warning once per process (each session tries again, and fails the
/// same way), then at debug level until it works again.
fn overhear(macs: &[[u8; 6]]) -> Option<Overhearing> {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    match Overhearing::start(macs) {
        Ok(hearing) => {
            WARNED.store(false, std::sync::atomic::Ordering::Relaxed);
            Some(hearing)
        }
        Err(error) => {
            let why = "not overhearing the guest's frames: after a failover its peers resend \
                       what the primary lost by their own timers";
            if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::debug!(%error, "{why}");
            } else {
                warn!(%error, "{why}");
            }
            None
        }
    }
}

/// `captured` (the primary's clock) on this node's clock: shifted by
/// the smallest difference between an epoch's arrival here and its
/// capture there over the latest [`CLOCK_OFFSET_EPOCHS`] epochs (the
/// nodes' skew plus the quickest transfer; an epoch's own arrival
/// would count its transfer and queueing as guest time that did not
/// pass).
fn capture_time_here(offsets: &mut VecDeque<i128>, captured: u64) -> u64 {
    let offset = i128::from(vmm::snapshot::unix_now_ns()) - i128::from(captured);
    if offsets.len() == CLOCK_OFFSET_EPOCHS {
        offsets.pop_front();
    }
    offsets.push_back(offset);
    let least = offsets.iter().min().copied().unwrap_or(offset);
    (i128::from(captured) + least).clamp(0, i128::from(u64::MAX)) as u64
}

/// Epochs over which the capture clock's offset is taken.
const CLOCK_OFFSET_EPOCHS: usize = 64;

/// The most output a switchover hands over (what one NIC's gate holds).
const FINAL_OUTPUT_MAX: usize = vmm::replication::MAX_HELD_BYTES;

/// Counts and reports a refused epoch.
fn refused(status: &StatusBoard, error: StandbyError) -> StandbyError {
    warn!(%error, "epoch refused, not applied");
    status.update(|s| s.counters.epochs_rejected += 1);
    error
}
