//! The primary: keeps a running VM protected by a standby.
//!
//! Without a standby the VM runs unprotected (output goes out at once) and
//! the primary keeps trying to reach the peer. Once an A-link is up:
//! 1. [`sync`]: initial synchronisation while the guest runs: the standby
//!    says what it holds of each disk, disk writes start being recorded,
//!    every disk is copied (only the chunks the standby does not hold),
//!    then memory in pre-copy rounds (every page the standby does not
//!    hold, then the pages dirtied meanwhile) with progress in the status.
//! 2. [`epochs`]: checkpoints (level HA: [`mirror`], batches of disk
//!    writes acknowledged before the guest sees them complete). Each one ([`checkpoint::capture`]) pauses
//!    the vCPUs and device work, captures vCPU/device state, harvests the
//!    dirty pages into frame payloads, takes the disk writes, seals the
//!    transmitted frames as batch N; the guest resumes (speculative mode),
//!    epoch N is sent, and batch N is released when the standby
//!    acknowledges it. Epochs are pipelined for output ([`in_flight`]):
//!    when the guest transmitted, checkpoint N+1 may be taken while N
//!    awaits its acknowledgement, up to a few in flight (otherwise the
//!    next checkpoint waits until none is); a slow standby then delays the
//!    next checkpoint (counted as throttled), and a guest that runs too far
//!    past the oldest epoch not acknowledged is paused, instead of buffers
//!    growing. In synchronous mode the guest stays paused until each
//!    acknowledgement.
//! 3. Any link failure ends protection: disk recording stops, and the
//!    primary goes back to looking for a standby (which then
//!    resynchronises from scratch). Without a witness, held output is
//!    released at once (this copy is the only one now). With a witness
//!    ([`lease`]), it is released only once the witness confirmed that this
//!    copy goes on alone; meanwhile, if neither the witness nor a standby
//!    answers, the guest is paused (fenced). Without a standby, output
//!    leaves only under the witness's lease; a copy the witness says is
//!    superseded stops, its held output dropped.

pub mod audit;
pub mod checkpoint;
mod cpu_wait;
mod deadline;
pub mod delta_cache;
mod epochs;
mod forget;
mod history;
mod in_flight;
mod inbound;
mod lease;
mod mirror;
mod release;
mod relevel;
mod switchover;
mod sync;

pub use epochs::DRAIN_AT_STOP;
pub use in_flight::DEFAULT_EPOCHS_IN_FLIGHT;
pub use relevel::LevelChange;
pub use switchover::SwitchoverRequest;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ft_link::{Frame, Link, LinkConfig, LinkError, LinkSender};
use tokio::sync::mpsc;
use tracing::{info, warn};
use vmm::replication::ReplicationError;
use vmm::vm::Vm;

use self::lease::{Alone, GateMode, Lease};
use crate::interval::IntervalLimits;
use crate::protocol::{Envelope, Message, ProtocolError, StateError};
use crate::quorum::WitnessConfig;
use crate::status::{FtState, Role, StatusBoard};

#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error("A-link: {0}")]
    Link(#[from] LinkError),
    #[error("A-link: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the standby sent an unexpected {kind} message (epoch {epoch})")]
    Unexpected { kind: &'static str, epoch: u64 },
    #[error("the standby acknowledged epoch {got}, epoch {expected} was in flight")]
    WrongAck { got: u64, expected: u64 },
    #[error("the standby acknowledged epoch {got}, no epoch was in flight")]
    AckNothingInFlight { got: u64 },
    #[error("the standby acknowledged generation {got}, this primary runs generation {ours}")]
    WrongGeneration { got: u64, ours: u64 },
    #[error("the standby's acknowledgement stream ended")]
    AckStreamEnded,
    #[error("the standby refused the session: {reason}")]
    StandbyRefused { reason: String },
    #[error(
        "the standby did not acknowledge epoch {epoch} within {} s of its sending (its disk or \
         its host hangs?): dropped, the VM goes on unprotected",
        deadline.as_secs_f64()
    )]
    StandbyUnresponsive { epoch: u64, deadline: Duration },
    #[error(
        "the standby stopped reading the A-link (nothing taken for {} s) while it still \
         answers (its disk or its host hangs?): dropped, the VM goes on unprotected",
        stalled.as_secs_f64()
    )]
    StandbyNotReading { stalled: Duration },
    #[error(
        "the witness names this copy at generation {now}, newer than the session's {session} \
         (a confirmation whose answer was lost): the standby is taken again at the new one"
    )]
    GenerationMoved { session: u64, now: u64 },
    #[error("the VM stopped")]
    VmStopped,
    #[error("the protection level changes to {to}: the session at the old level ended cleanly")]
    Relevel { to: crate::level::Level },
    #[error("a planned switchover handed the VM to the standby after epoch {epoch}")]
    SwitchedOver { epoch: u64 },
    #[error("the standby did not answer the switchover after epoch {epoch} within {within:?}")]
    SwitchoverUnconfirmed {
        epoch: u64,
        within: std::time::Duration,
    },
    #[error("checkpoint {epoch}: capturing the state failed: {source}")]
    Capture {
        epoch: u64,
        #[source]
        source: vmm::vm::VmError,
    },
    #[error("digesting the guest's memory for the standby's copy failed: {0}")]
    DigestMemory(#[source] ReplicationError),
    #[error("the task digesting the guest's memory for the copy ended abnormally: {0}")]
    DigestMemoryTask(String),
    #[error("checkpoint {epoch}: staging pages failed: {source}")]
    Stage {
        epoch: u64,
        #[source]
        source: ReplicationError,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("checkpoint {epoch}: the consistency digest failed: {source}")]
    Digest {
        epoch: u64,
        #[source]
        source: crate::oracle::OracleError,
    },
    #[error("no random content key for the initial copy: {0}")]
    ContentKey(#[source] getrandom::Error),
    #[error("no random common point for the session's written maps: {0}")]
    CommonPoint(#[source] getrandom::Error),
    #[error("no random memory lineage for the session: {0}")]
    MemoryLineage(#[source] getrandom::Error),
    #[error("the standby's word on what it holds of {region} is wrong: {why}")]
    BadHolding { region: String, why: String },
    #[error("reading disk {path} for the initial copy failed: {source}")]
    ReadDisk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How the primary protects its VM.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// FT (checkpoints) or HA (the disks mirrored synchronously), at the
    /// start; [`PrimaryConfig::relevel`] changes it while the VM runs.
    pub level: crate::level::Level,
    /// Asked by the control socket's `level-ft` / `level-ha`: the session
    /// ends cleanly and the next one runs at the new level ([`relevel`]).
    pub relevel: Arc<LevelChange>,
    /// The standby's addresses, one per path (the A-link first; a second
    /// path makes a redundant pair: the session runs on one, the other
    /// carries heartbeats so the standby can tell a lost path from a lost
    /// primary).
    pub peers: Vec<String>,
    pub link: LinkConfig,
    pub interval: IntervalLimits,
    /// Keep the guest paused until each epoch is acknowledged.
    pub synchronous: bool,
    /// Epochs sent and not yet acknowledged, at most (1: each checkpoint
    /// waits for the last one's acknowledgement).
    pub epochs_in_flight: usize,
    /// Pre-copy rounds after the first full copy (fewer when the dirty set
    /// gets small).
    pub precopy_rounds: u32,
    /// zstd level of the initial copy's frames (0: uncompressed).
    pub copy_compression: i32,
    /// Bytes of pages the primary keeps as the standby has them, to send
    /// the next epochs' pages as deltas (0: every page whole; see
    /// [`delta_cache`]).
    pub delta_cache_bytes: u64,
    /// Wait between attempts to reach a standby.
    pub retry_every: Duration,
    /// Set (before the stop is notified) when the VM ended by a host
    /// fault, not on purpose: the standby is told to take it over
    /// (Handover) instead of to let it go (Stop).
    pub vm_failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Set by the control socket's `verify`: the next checkpoint carries a
    /// digest of the VM for the standby to compare ([`crate::oracle`]).
    pub verify_next: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The generation of the active copy this primary runs (every message
    /// carries it; a standby refuses an older one).
    pub generation: u64,
    /// The quorum witness, if the pair has one.
    pub witness: Option<WitnessConfig>,
    /// The VM was started unprotected: the witness's lease is taken when
    /// a standby first connects, not at the start (a copy with no standby
    /// to take it over neither waits for the witness nor is fenced).
    pub lease_when_protected: bool,
    /// Asked by the control socket's `switchover`: the VM moves to the
    /// standby at the next checkpoint ([`switchover`]).
    pub switchover: Arc<SwitchoverRequest>,
    /// A promoted copy's first lease: the one the witness gave with its
    /// grant of the takeover.
    pub first_lease: Option<crate::quorum::GrantedLease>,
    /// How long an epoch (or an HA batch of disk writes) may wait for its
    /// acknowledgement once sent. Past it the standby is dropped (its disk
    /// or host hangs while it still answers heartbeats) and the VM goes on
    /// unprotected, instead of its output, its disk writes or the guest
    /// itself waiting for that standby without end.
    pub ack_deadline: Duration,
    /// The file the guest's memory lives in, if any: a copy that hands
    /// its VM over labels it with the final checkpoint, which its next
    /// standby then needs not compare ([`crate::memory_point`]).
    pub ram_file: Option<std::path::PathBuf>,
    /// A promoted copy: the checkpoint its memory was restored from (the
    /// session's memory lineage and epoch). A standby whose RAM file is
    /// labelled with it is brought forward by the pages written since.
    pub memory_base: Option<(crate::memory_point::Lineage, u64)>,
}

/// [`PrimaryConfig::ack_deadline`] by default: far above an
/// acknowledgement's usual time (milliseconds; a second or two for the
/// largest epochs on a slow A-link), short enough that a hung standby
/// costs the VM a few seconds, not its service.
pub const DEFAULT_ACK_DEADLINE: Duration = Duration::from_secs(5);

/// How a primary ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryEnd {
    /// The guest stopped (or a stop was asked).
    Stopped,
    /// The witness says `owner` runs the VM at `generation`: this copy was
    /// stopped and its held output dropped.
    Superseded { generation: u64, owner: String },
    /// A planned switchover handed the VM to the standby, which took over
    /// from `epoch`; this copy stopped.
    SwitchedOver { epoch: u64 },
}

/// Stops a copy that handed its VM to the standby: its guest has been
/// stopped since the final checkpoint, and all its output left with it.
fn stop_switched_over(
    vm: &Vm,
    (epoch, lineage): (u64, Option<crate::memory_point::Lineage>),
    ram_file: Option<&std::path::Path>,
    status: &StatusBoard,
) -> PrimaryEnd {
    let dropped = vm.output().discard_held();
    vm.stop();
    // The guest has not run since the final checkpoint, which the new
    // primary resumed: this node's memory is that checkpoint, and its next
    // standby (on this node, on the same RAM file) is brought forward from
    // it by what the new primary's guest writes.
    // It is labelled so only if nothing wrote the memory since that
    // checkpoint's harvest (the dirty log says so, whatever did it).
    if let (Some(path), Some(lineage)) = (ram_file, lineage) {
        // Hot pages (left writable, reported whether written or not) do
        // not count: the guest has not run since, and all else that
        // writes guest memory is tracked exactly.
        let labelled = match vm.harvest_dirty() {
            Ok(dirty) if dirty.written == 0 => vm
                .label_memory(path, &crate::memory_point::label(&lineage, epoch))
                .map_err(|e| e.to_string()),
            Ok(dirty) => Err(format!(
                "{} pages were written after the final checkpoint",
                dirty.written
            )),
            Err(error) => Err(format!("the dirty log could not be read: {error}")),
        };
        if let Err(error) = labelled {
            warn!(%error, "the RAM file is not labelled with the final checkpoint: the next copy compares it");
        }
    }
    info!(
        epoch,
        dropped_frames = dropped,
        "switched over: this copy stopped"
    );
    status.update(|s| s.counters.switchovers += 1);
    status.set_state(
        Role::Primary,
        FtState::SwitchedOver,
        Some(format!(
            "switched over: the standby took the VM over from checkpoint {epoch}"
        )),
    );
    PrimaryEnd::SwitchedOver { epoch }
}

/// Resolves when the witness says this copy is superseded (never without
/// a witness).
async fn superseded(lease: Option<&Lease>) {
    match lease {
        Some(l) => l.ended().await,
        None => std::future::pending().await,
    }
}

/// Resolves, with the new generation, once the witness names this copy at
/// a generation newer than `session`'s (never without a witness).
async fn generation_moved(lease: Option<&Lease>, session: u64) -> u64 {
    match lease {
        Some(l) => {
            l.moved_past(session).await;
            l.generation()
        }
        None => std::future::pending().await,
    }
}

/// Stops a superseded copy: its held output never leaves.
fn stop_superseded(vm: &Vm, lease: &Lease, status: &StatusBoard) -> PrimaryEnd {
    let (generation, owner) = lease
        .superseded()
        .unwrap_or((lease.generation(), "another node".into()));
    let dropped = vm.output().discard_held();
    vm.stop();
    warn!(
        generation,
        owner,
        dropped_frames = dropped,
        "superseded: this copy stopped"
    );
    status.set_state(
        Role::Primary,
        FtState::Superseded,
        Some(format!(
            "node {owner} runs the VM at generation {generation}: this copy stopped \
             and its {dropped} held frames were dropped"
        )),
    );
    PrimaryEnd::Superseded { generation, owner }
}

/// How long a live migration's session at FT may take to reach its
/// standby before the migration is called off.
const MIGRATION_FINDS_ITS_STANDBY_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Ends a live migration under way, if one is (the VM stays here): its
/// request and the change to FT it asked, if not taken yet, are dropped;
/// the status says why, and the daemon puts the VM back at its level.
fn call_off_migration(config: &PrimaryConfig, status: &StatusBoard, why: &dyn std::fmt::Display) {
    if !status.snapshot().migrating {
        return;
    }
    config.switchover.take_migration();
    if config.relevel.pending() == Some(crate::level::Level::Ft) {
        config.relevel.take();
    }
    warn!(%why, "live migration called off: the VM runs on here");
    status.update(|s| {
        s.migrating = false;
        s.message = Some(format!("live migration called off: {why}"));
    });
}

/// Protects `vm` until `stop` is notified (its guest stopped): then a
/// standby in session is told not to take it over, and this returns.
pub async fn run(
    vm: Arc<Vm>,
    config: PrimaryConfig,
    status: StatusBoard,
    stop: Arc<tokio::sync::Notify>,
) -> PrimaryEnd {
    // A promoted copy holds its lease from the start (its grant is the
    // first one), whatever it was started with.
    let deferred = config.lease_when_protected && config.first_lease.is_none();
    let mut held_lease = match &config.witness {
        Some(w) if !deferred => Some(Lease::start(
            &vm,
            w.clone(),
            config.generation,
            config.first_lease,
            &status,
        )),
        Some(_) => {
            status.update(|s| s.witness = Some("lease taken when a standby connects".into()));
            None
        }
        None => None,
    };
    let mut level = config.level;
    status.update(|s| {
        s.generation = config.generation;
        s.level = level;
    });
    let mut last_refusal = String::new();
    status.set_state(Role::Primary, FtState::Unprotected, None);
    let mut answered = None;
    let history = history::MemoryHistory::new(config.memory_base);
    loop {
        let lease = held_lease.as_ref();
        let found = match answered.take() {
            Some(found) => found,
            None => {
                let looking_since = std::time::Instant::now();
                loop {
                    let attempt = tokio::select! {
                        a = connect_any(&config.peers, &config.link) => a,
                        _ = stop.notified() => return PrimaryEnd::Stopped,
                        _ = superseded(lease) => return stop_superseded(&vm, lease.expect("a lease"), &status),
                    };
                    match attempt {
                        Ok(found) => break found,
                        Err(error) => {
                            // A migration does not wait long for its standby: it
                            // moves the VM to one that is there.
                            if looking_since.elapsed() > MIGRATION_FINDS_ITS_STANDBY_WITHIN {
                                call_off_migration(&config, &status, &error);
                            }
                            if error != last_refusal {
                                info!(peers = ?config.peers, %error, "no standby yet; running unprotected");
                                status.update(|s| s.message = Some(error.clone()));
                                last_refusal = error;
                            }
                            tokio::time::sleep(config.retry_every).await;
                        }
                    }
                }
            }
        };
        let (link, active) = found;
        last_refusal.clear();
        if held_lease.is_none() {
            if let Some(w) = &config.witness {
                // The VM started unprotected has a standby now: from here
                // on it runs under the witness's lease as any protected
                // copy (a takeover needs the witness's grant, and this
                // copy goes on alone only with its word).
                info!("a standby connected to a VM started unprotected: the witness's lease from now on");
                let started = Lease::start(&vm, w.clone(), config.generation, None, &status);
                // The session runs at the generation the witness names.
                tokio::select! {
                    _ = started.first_answer() => {}
                    _ = stop.notified() => return PrimaryEnd::Stopped,
                }
                held_lease = Some(started);
            }
        }
        let lease = held_lease.as_ref();
        status.update(|s| {
            s.peer = Some(link.peer_addr().to_string());
            s.alink = Some(link.protection().describe().to_string());
            s.dirty_tracking = Some(vm.dirty_tracking().to_string());
        });
        let generation = lease.map_or(config.generation, Lease::generation);
        if let Some(l) = lease {
            // Output the lease lets out keeps going during the initial
            // copy (no pause of the guest then: a standby is coming).
            if l.mode() != GateMode::Off {
                l.set_mode(&vm, GateMode::Lease { fence: false });
            }
        }
        if let Some(to) = config.relevel.take() {
            level = to;
        }
        status.update(|s| s.level = level);
        let session = Session {
            generation,
            level,
            sync_started: std::time::Instant::now(),
            lease,
            active,
            history: &history,
        };
        let error = tokio::select! {
            e = protect(&vm, link, session, &config, &status, &stop) => e,
            _ = superseded(lease) => return stop_superseded(&vm, lease.expect("a lease"), &status),
        };
        if matches!(error, PrimaryError::VmStopped) {
            return PrimaryEnd::Stopped;
        }
        if let PrimaryError::SwitchedOver { epoch } = error {
            let lineage = history.lineage();
            return stop_switched_over(&vm, (epoch, lineage), config.ram_file.as_deref(), &status);
        }
        // A live migration goes on only from the HA session into the FT
        // one it asked for; anything else ends it (the VM stays here, and
        // its daemon asks for HA again).
        let migration_goes_on = matches!(
            error,
            PrimaryError::Relevel {
                to: crate::level::Level::Ft
            }
        );
        if !migration_goes_on {
            call_off_migration(&config, &status, &error);
        }
        if let PrimaryError::Relevel { to } = error {
            config.relevel.take();
            // Everything in flight was acknowledged and the standby told
            // to let go: no held output is owed to anyone, and the next
            // session, at the new level, begins at once.
            level = to;
            vm.disk_writes().stop();
            vm.input().stop();
            match lease {
                None => {
                    vm.output().open();
                }
                Some(l) => l.set_mode(&vm, GateMode::Lease { fence: false }),
            }
            status.update(|s| {
                s.level = to;
                s.counters.level_changes += 1;
            });
            status.set_state(
                Role::Primary,
                FtState::Unprotected,
                Some(format!(
                    "protecting at level {to} from now on: resynchronising"
                )),
            );
            info!(level = %to, "protection level changed; a new session begins");
            continue;
        }
        // The state first: whoever sees the session's end counted sees
        // the VM unprotected (the witness may take a moment below).
        status.set_state(
            Role::Primary,
            FtState::Unprotected,
            Some(format!("standby lost: {error}")),
        );
        let refused = matches!(error, PrimaryError::StandbyRefused { .. });
        status.update(|s| {
            let n = &mut s.counters;
            n.silence_ends += u64::from(matches!(
                error,
                PrimaryError::Link(LinkError::PeerSilent { .. })
            ));
            n.standby_drops += u64::from(release::drops_a_live_standby(&error));
            n.standby_refusals += u64::from(refused);
        });
        vm.disk_writes().stop();
        vm.input().stop();
        match lease {
            None => {
                // The standby is gone: this copy is the only one, so output
                // held for it goes out now.
                let released = vm.output().open();
                warn!(%error, released_frames = released, "standby lost: running unprotected");
            }
            Some(l) if matches!(error, PrimaryError::GenerationMoved { .. }) => {
                // The witness already holds this copy at a newer
                // generation, under a lease just renewed: the standby's
                // replica (of the older one) can never be promoted, and
                // what it never acknowledged leaves under the lease.
                let held = vm.output().merge_held(0);
                warn!(%error, held_frames = held, "the session's generation is stale: resynchronising the standby");
                l.set_mode(&vm, GateMode::Lease { fence: true });
            }
            Some(l) if l.mode() == GateMode::Off => {
                // Epochs began: the lost standby may hold a replica. What
                // it never acknowledged leaves only once the witness
                // confirms this copy goes on alone.
                let held = vm.output().merge_held(0);
                warn!(%error, held_frames = held, "standby lost: asking the witness to go on alone");
                let alone = tokio::select! {
                    a = l.go_on_alone(&vm, &config, &status) => a,
                    _ = stop.notified() => return PrimaryEnd::Stopped,
                };
                match alone {
                    Alone::Confirmed { standby } => {
                        l.set_mode(&vm, GateMode::Lease { fence: true });
                        if standby {
                            // The output held for the lost session left;
                            // the standby that answered is asked at once.
                            continue;
                        }
                    }
                    Alone::StandbyAnswered(found) => {
                        // The held output waits for the new session's
                        // first acknowledged epoch.
                        answered = Some(*found);
                        continue;
                    }
                    Alone::Superseded => return stop_superseded(&vm, l, &status),
                }
            }
            Some(l) => {
                warn!(%error, "standby lost before the first epoch: running unprotected under the lease");
                l.set_mode(&vm, GateMode::Lease { fence: true });
            }
        }
        let (message, wait) = if refused {
            // The standby's own fault (a full disk, say) does not clear in
            // a second: try again less often, and say why.
            let wait = config.retry_every.max(REFUSED_RETRY);
            (
                format!("{error}; trying again in {} s", wait.as_secs()),
                wait,
            )
        } else {
            (format!("standby lost: {error}"), config.retry_every)
        };
        status.set_state(Role::Primary, FtState::Unprotected, Some(message));
        tokio::time::sleep(wait).await;
    }
}

/// How long a primary waits before asking a standby that refused again.
const REFUSED_RETRY: Duration = Duration::from_secs(10);

/// What one session with a standby runs with.
struct Session<'a> {
    generation: u64,
    /// The level this session protects the VM at.
    level: crate::level::Level,
    /// When the initial synchronisation began.
    sync_started: std::time::Instant,
    lease: Option<&'a Lease>,
    /// The index of the peer address the session runs on.
    active: usize,
    /// The pages of each epoch of the latest session at level FT.
    history: &'a history::MemoryHistory,
}

/// How long one connection attempt may take (a cut path must not hold up
/// the others).
const CONNECT_WITHIN: Duration = Duration::from_secs(2);

async fn connect_one(addr: &str, config: &LinkConfig) -> Result<Link, String> {
    match tokio::time::timeout(CONNECT_WITHIN, Link::connect(addr, config)).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("connecting to {addr} took over {CONNECT_WITHIN:?}")),
    }
}

/// Connects to the first peer address that answers; returns the link and
/// the index of that address.
pub(super) async fn connect_any(
    peers: &[String],
    config: &LinkConfig,
) -> Result<(Link, usize), String> {
    if peers.is_empty() {
        return Err("no peer is configured".into());
    }
    let mut errors = Vec::new();
    for (index, addr) in peers.iter().enumerate() {
        match connect_one(addr, config).await {
            Ok(link) => return Ok((link, index)),
            Err(e) => errors.push(e),
        }
    }
    Err(errors.join("; "))
}

/// Keeps a backup path open to every other peer address while the session
/// runs on `active` (reconnecting when one drops).
fn spawn_backup_path(
    config: &PrimaryConfig,
    active: usize,
    generation: u64,
) -> tokio::task::JoinHandle<()> {
    let others: Vec<String> = config
        .peers
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != active)
        .map(|(_, a)| a.clone())
        .collect();
    let link_config = config.link.clone();
    let retry = config.retry_every;
    tokio::spawn(async move {
        let Some(addr) = others.first() else { return };
        loop {
            if let Ok(link) = connect_one(addr, &link_config).await {
                let hello = Message::Backup.into_frame(0, generation);
                if link.send(&hello).await.is_ok() {
                    info!(path = %addr, "backup path to the standby is up");
                    let (_sender, mut receiver) = link.split();
                    while receiver.recv().await.is_ok() {}
                    warn!(path = %addr, "backup path to the standby lost");
                }
            }
            tokio::time::sleep(retry).await;
        }
    })
}

/// What the receiving task reports: acknowledged epochs or the end.
type AckEvent = Result<u64, PrimaryError>;

/// Reads the standby's word: acknowledgements and refusals (returned), and
/// what it holds of each disk and of memory before the copy (sent to
/// `held`). The reader hands the link's receiving half back when it ends
/// (the link failed, or the returned receiver is gone).
fn spawn_ack_reader(
    mut rx: ft_link::LinkReceiver,
    generation: u64,
    held: mpsc::UnboundedSender<crate::protocol::Held>,
    silence: Duration,
) -> (
    mpsc::UnboundedReceiver<AckEvent>,
    tokio::task::JoinHandle<ft_link::LinkReceiver>,
) {
    let (tx, acks) = mpsc::unbounded_channel();
    // Until the first acknowledgement (the standby committed an epoch), a
    // silent standby costs the copy, nothing more: see SYNC_SILENCE.
    rx.set_silence_timeout(silence.max(crate::SYNC_SILENCE));
    let mut acknowledged = false;
    let reader = tokio::spawn(async move {
        loop {
            let event = match rx.recv().await.map(Message::from_frame) {
                Ok(Ok(envelope)) if envelope.generation != generation => {
                    Err(PrimaryError::WrongGeneration {
                        got: envelope.generation,
                        ours: generation,
                    })
                }
                Ok(Ok(envelope)) if envelope.message == Message::Ack => Ok(envelope.epoch),
                Ok(Ok(Envelope {
                    message: Message::SyncHeld(part),
                    epoch,
                    ..
                })) => match held.send(part) {
                    Ok(()) => continue,
                    // The copy is over (its receiver is gone): a standby
                    // that says what it holds now breaks the protocol.
                    Err(_) => Err(PrimaryError::Unexpected {
                        kind: "SyncHeld",
                        epoch,
                    }),
                },
                Ok(Ok(Envelope {
                    message: Message::Refuse(reason),
                    ..
                })) => Err(PrimaryError::StandbyRefused { reason }),
                Ok(Ok(envelope)) => Err(PrimaryError::Unexpected {
                    kind: envelope.message.name(),
                    epoch: envelope.epoch,
                }),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(e.into()),
            };
            if !acknowledged && event.is_ok() {
                acknowledged = true;
                rx.set_silence_timeout(silence);
            }
            let end = event.is_err();
            if tx.send(event).is_err() || end {
                return rx;
            }
        }
    });
    (acks, reader)
}

/// What the standby's word during the initial copy means.
fn during_sync(event: Option<AckEvent>) -> PrimaryError {
    match event {
        Some(Err(error)) => error,
        Some(Ok(epoch)) => PrimaryError::Unexpected { kind: "Ack", epoch },
        None => PrimaryError::AckStreamEnded,
    }
}

/// How long a failed send waits for the standby's reason, which may be
/// behind it on the receiving side.
const REASON_WITHIN: Duration = Duration::from_millis(300);

/// `error`, or the standby's refusal when one arrives right behind it.
async fn refusal_behind(
    error: PrimaryError,
    acks: &mut mpsc::UnboundedReceiver<AckEvent>,
) -> PrimaryError {
    if !matches!(error, PrimaryError::Link(_)) {
        return error;
    }
    match tokio::time::timeout(REASON_WITHIN, acks.recv()).await {
        Ok(Some(Err(refused @ PrimaryError::StandbyRefused { .. }))) => refused,
        _ => error,
    }
}

/// Sends frames (as few writes as the A-link takes them in) and counts
/// their bytes.
async fn send_all(
    tx: &LinkSender,
    frames: &[Frame],
    status: &StatusBoard,
) -> Result<u64, PrimaryError> {
    tx.send_all(frames).await?;
    let bytes: u64 = frames.iter().map(|frame| frame.wire_len() as u64).sum();
    status.update(|s| s.counters.alink_bytes_sent += bytes);
    Ok(bytes)
}

/// Runs protection over `link` until it fails; returns why.
async fn protect(
    vm: &Arc<Vm>,
    link: Link,
    session: Session<'_>,
    config: &PrimaryConfig,
    status: &StatusBoard,
    stop: &tokio::sync::Notify,
) -> PrimaryError {
    let heard = link.liveness();
    let (tx, rx) = link.split();
    let (held_tx, held) = mpsc::unbounded_channel();
    let (mut acks, reader) = spawn_ack_reader(
        rx,
        session.generation,
        held_tx,
        config.link.heartbeat_timeout,
    );
    let mut backup = None;
    let work = async {
        let common = crate::written::random_common().map_err(PrimaryError::CommonPoint)?;
        let forgetter = forget::Forgetter::new(vm.disk_writes().written_maps(), common);
        // The standby speaks during the copy to say what it holds (before
        // anything is copied) or to refuse it; its reason outranks the
        // closed link that follows. `held` ends with the copy.
        let synced = tokio::select! {
            synced = sync::initial_sync(vm, (&tx, held), config, status, (session.generation, session.level), (&forgetter, session.history)) => synced,
            event = acks.recv() => Err(during_sync(event)),
        };
        let copied = match synced {
            Ok(disk_bytes) => disk_bytes,
            Err(error) => return Err(refusal_behind(error, &mut acks).await),
        };
        info!(
            disk_bytes = copied,
            deadline_ms = deadline::ack_deadline(config.ack_deadline, 1, copied).as_millis() as u64,
            "the first epoch's acknowledgement may take this long (the standby makes the copy durable first)"
        );
        // The session exists on the standby now: add the backup path.
        backup = Some(spawn_backup_path(
            config,
            session.active,
            session.generation,
        ));
        if session.level == crate::level::Level::Ha {
            return mirror::mirror(
                vm,
                &tx,
                &mut acks,
                (&session, forgetter, copied),
                config,
                status,
                stop,
            )
            .await;
        }
        // What the guest receives goes to the standby beside the epochs.
        tokio::select! {
            e = epochs::epochs(vm, &tx, &mut acks, (&session, forgetter, copied), config, status, stop) => e,
            never = inbound::forward(vm, &tx, session.generation, status) => match never {},
        }
    };
    // The session runs at the generation the witness knows this copy by:
    // a standby's claim from an older one is refused.
    let result = tokio::select! {
        result = work => result,
        now = generation_moved(session.lease, session.generation) => {
            // The session's work stopped wherever it waited; a guest it
            // kept stopped (a synchronous epoch, a switchover under way)
            // runs again (nothing else pauses it during a session).
            vm.resume();
            Err(PrimaryError::GenerationMoved { session: session.generation, now })
        }
    };
    if let Some(task) = backup {
        task.abort();
    }
    // A stall counts as a drop once the standby protects the VM (during
    // the copy, a standby busy writing it is slow by design).
    let protecting = status.snapshot().state == FtState::Protected;
    let result = result.map_err(|error| {
        release::judge_stall(
            error,
            protecting.then(|| heard.last_arrival()),
            config.link.heartbeat_interval,
        )
    });
    match &result {
        Err(error) if release::tells_release(error) => {
            // The standby reads the word after what it has not read yet.
            let epoch = match error {
                PrimaryError::StandbyUnresponsive { epoch, .. } => *epoch,
                _ => 0,
            };
            release::tell_dropped(
                tx,
                (acks, reader),
                (epoch, session.generation),
                release::RELEASE_PATIENCE,
            );
        }
        _ => tx.close().await,
    }
    match result {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> PrimaryError {
        PrimaryError::StandbyRefused {
            reason: "the standby on b: no space for the replica disk".into(),
        }
    }

    #[test]
    fn the_standby_speaking_during_the_copy_ends_it_with_its_word() {
        assert!(matches!(
            during_sync(Some(Err(refused()))),
            PrimaryError::StandbyRefused { .. }
        ));
        assert!(matches!(
            during_sync(Some(Ok(3))),
            PrimaryError::Unexpected {
                kind: "Ack",
                epoch: 3
            }
        ));
        assert!(matches!(during_sync(None), PrimaryError::AckStreamEnded));
    }

    /// A send that failed because the standby closed after refusing
    /// reports the refusal, which arrives just behind it.
    #[tokio::test]
    async fn a_refusal_right_behind_a_failed_send_is_the_reason() {
        let (tx, mut acks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(Err(refused()));
        });
        let peer = "127.0.0.1:1".parse().unwrap();
        let closed = PrimaryError::Link(LinkError::PeerClosed { peer });
        assert!(matches!(
            refusal_behind(closed, &mut acks).await,
            PrimaryError::StandbyRefused { .. }
        ));
        // No refusal: the link error stands.
        let (_tx, mut acks) = mpsc::unbounded_channel::<AckEvent>();
        assert!(matches!(
            refusal_behind(
                PrimaryError::Link(LinkError::PeerClosed { peer }),
                &mut acks
            )
            .await,
            PrimaryError::Link(LinkError::PeerClosed { .. })
        ));
    }
}
