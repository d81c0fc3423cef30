//! `ftctl lab drill --count N [--fault pull|partition|mixed|freeze-standby|freeze-primary|switchover]`:
//! failover drills on the protected ledger VM.
//!
//! One ledger client (on the outer host, one TCP connection for the whole
//! drill) appends operations without pause. Each round waits until the
//! pair is protected, then at a random moment:
//! - **pull**: power-cuts the primary's node; the standby must serve the
//!   next acknowledged operation; the pulled node is brought back and its
//!   daemon makes it the standby.
//! - **partition**: cuts every path between the nodes (the A-link, and the
//!   business network either on both nodes, which also takes both off the
//!   witness, or on one node only, which isolates that node while the
//!   other keeps the witness), heals after a random 1-5 s; exactly one
//!   copy may go on, the other rejoins as the standby.
//! - **freeze-standby / freeze-primary**: stops that node's engine process
//!   (SIGSTOP: a stalled host, a long pause) for a random 0.2-3 s, then
//!   lets it go on (SIGCONT); exactly one copy may go on.
//! - **switchover**: a planned switchover through the API (`POST
//!   /api/vms/{name}/switchover`): the standby must take over with nothing
//!   lost, the old primary becomes the standby. Its `failover_ms` is the
//!   client-visible pause: the longest time between two consecutive
//!   acknowledgements around the switchover.
//!
//! The failover time is fault -> the first operation acknowledged after
//! it. After each round the ledger in the VM's memory and on its disk is
//! checked against every acknowledged operation, and the pair must be
//! protected again. During a partition and until re-protection both
//! nodes' engines are watched for two active copies ([`watch`]). Prints a
//! table and writes a JSON report.

mod client;
pub mod watch;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guest_tools::ledger::{LedgerError, Verdict};
use replicator::stats::percentile;
use replicator::status::{FtState, Role, Status, TakeoverTimes};
use serde::Serialize;

use self::client::{Client, Reconnect};
use self::watch::Watch;
use crate::ft_pair::{self, FtPairError};
use crate::lab::{progress, Lab};
use crate::topology::{LinkId, NodeId};
pub use replicator::level::Level;

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error(transparent)]
    Pair(#[from] FtPairError),
    #[error(transparent)]
    Lab(#[from] crate::lab::LabError),
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("the ledger client failed: {0}")]
    Client(String),
    #[error("drill {round}: no operation was acknowledged within {secs} s of the fault")]
    NoTakeover { round: u32, secs: u64 },
    #[error("drill {round}: no node ran the VM as the primary within {secs} s of the heal; last seen: {seen}")]
    NoWinner { round: u32, secs: u64, seen: String },
    #[error("drill {round}: the switchover asked of {node} failed: {source}")]
    Switchover {
        round: u32,
        node: NodeId,
        #[source]
        source: FtPairError,
    },
    #[error("drill {round}: freezing the engine on {node} failed: {why}")]
    Freeze {
        round: u32,
        node: NodeId,
        why: String,
    },
    #[error("a drill of {fault:?} faults at level HA is not built: level HA drills pull the primary (--fault pull) or move the VM by live migration (--fault switchover)")]
    NotAtHa { fault: Fault },
    #[error(
        "{node}'s engine was not a protected primary at level {level} within {secs} s: {last}"
    )]
    NotAtLevel {
        node: NodeId,
        level: Level,
        secs: u64,
        last: String,
    },
    #[error("drill {round}: the VM booted on {node}, but its console never said how the data disk's check (e2fsck) went within {secs} s")]
    NoFsck { round: u32, node: NodeId, secs: u64 },
    #[error("writing the report {path}: {source}")]
    Report {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Which faults a drill injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// Power-cut the primary's node.
    Pull,
    /// Cut every path between the nodes, heal after 1-5 s.
    Partition,
    /// Pulls and partitions at random.
    Mixed,
    /// SIGSTOP the standby's engine for 0.2-3 s.
    FreezeStandby,
    /// SIGSTOP the primary's engine (its guest too) for 0.2-3 s.
    FreezePrimary,
    /// A planned switchover through the API.
    Switchover,
}

/// The fault of one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoundFault {
    Pull,
    /// A-link and business network cut on both nodes (the witness too).
    PartitionEverything,
    /// A-link cut, and this node cut off the business network (and the
    /// witness); the other node keeps them.
    PartitionIsolating(NodeId),
    /// The engine process of this node stopped (SIGSTOP), then continued.
    Freeze(NodeId),
    /// A planned switchover asked through the API.
    Switchover,
}

impl std::fmt::Display for RoundFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoundFault::Pull => f.write_str("pull"),
            RoundFault::PartitionEverything => f.write_str("cut all"),
            RoundFault::PartitionIsolating(n) => write!(f, "isolate {n}"),
            RoundFault::Freeze(n) => write!(f, "freeze {n}"),
            RoundFault::Switchover => f.write_str("switchover"),
        }
    }
}

/// What one drill found.
#[derive(Debug, Clone, Serialize)]
pub struct DrillRound {
    pub round: u32,
    pub fault: RoundFault,
    /// The primary before the fault (the pulled node, for a pull).
    pub pulled: NodeId,
    /// The primary after the round.
    pub promoted: NodeId,
    /// Protected run time before the fault.
    pub pull_after_ms: u64,
    /// Fault -> first acknowledged operation after it.
    pub failover_ms: u64,
    /// Frames the promoted copy's guest was given again: received by the
    /// old primary after its last committed checkpoint (0 where no
    /// promotion happened, or nothing arrived after the checkpoint).
    pub replayed_frames: u64,
    /// Of those, frames the promoted copy's node received itself after the
    /// old primary's node was gone (flooded to it by the bridge).
    pub overheard_frames: u64,
    /// Where the promoted engine's takeover spent its time (none where no
    /// promotion happened).
    pub takeover: Option<TakeoverTimes>,
    /// Pages the promoted engine checked against the primary's page audit
    /// while it stood by, and checkpoints it refused for a page that
    /// differed (must be 0).
    pub audited_pages: u64,
    pub audit_mismatches: u64,
    /// Partition: how long the paths were cut; freeze: how long the
    /// process was stopped.
    pub heal_after_ms: u64,
    /// Last epoch the standby had committed at the fault.
    pub committed_epoch: u64,
    pub acked_before_check: usize,
    pub memory: Verdict,
    pub disk: Verdict,
    /// Fault's end (node back, paths healed) -> pair protected again.
    pub reprotect_ms: u64,
    /// Bytes the primary's initial synchronisations sent to protect the VM
    /// again (0 if the session survived the fault).
    pub resync_bytes: u64,
    /// What the last of those copies' memory and disk frames held before
    /// compression (the engine's `sync_uncompressed_bytes_last`; 0 if the
    /// session survived).
    #[serde(default)]
    pub resync_uncompressed_bytes: u64,
    /// Disk bytes that copy did not read, the same on both nodes by their
    /// written maps (the engine's `sync_disk_unread_bytes_last`).
    #[serde(default)]
    pub resync_disk_unread_bytes: u64,
    /// Guest memory that copy did not read: the returning standby's RAM
    /// was brought forward from the checkpoint it held (the engine's
    /// `sync_memory_unread_bytes_last`).
    #[serde(default)]
    pub resync_memory_unread_bytes: u64,
    /// Pull only: the pulled node's boot (start -> its agent answers).
    pub node_boot_ms: u64,
    /// Node booted or paths healed -> protected again, with no command
    /// from anyone: the daemons re-protect by themselves.
    pub boot_to_protected_ms: u64,
    /// The VM's generation after the round.
    pub generation: u64,
    /// The API showed the new primary as the VM's primary.
    pub placed_ok: bool,
    /// Both copies were seen active at once (must be false).
    pub two_active_seen: bool,
    /// The first such moment, if any.
    pub two_active: Option<String>,
    /// Each node's engine states through the round (watched rounds).
    pub states_a: Vec<String>,
    pub states_b: Vec<String>,
    /// Level HA: the VM rebooted on the survivor found its data disk's
    /// ext4 clean (`e2fsck -fn` after the journal replay); None at FT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fsck_clean: Option<bool>,
}

impl DrillRound {
    fn ok(&self) -> bool {
        self.memory.ok()
            && self.disk.ok()
            && self.placed_ok
            && !self.two_active_seen
            && self.fsck_clean != Some(false)
            && self.audit_mismatches == 0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub lab: String,
    pub count: u32,
    pub fault: Fault,
    /// The VM's protection level (`ft` or `ha`).
    pub level: Level,
    /// Level HA: connections the client made again (the VM rebooted).
    pub reconnects: u64,
    pub seed: u64,
    pub rounds: Vec<DrillRound>,
    pub acked_total: usize,
    pub lost_total: usize,
    pub duplicated_total: usize,
    /// Rounds in which two active copies were seen (must be 0).
    pub two_active_total: usize,
    pub connection_survived: bool,
    pub failover_ms_p50: u64,
    pub failover_ms_p99: u64,
    pub failover_ms_max: u64,
    pub passed: bool,
}

/// xorshift64: reproducible random moments from the seed.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// How long re-protection may take (a full resync on a busy TCG node).
const REPROTECT_WITHIN: Duration = Duration::from_secs(240);

/// Runs `count` drills of `fault` on lab `lab` (brought up from scratch);
/// writes the report to `report_path`.
pub fn run(
    lab: &Lab,
    count: u32,
    fault: Fault,
    report_path: &PathBuf,
) -> Result<DrillReport, DrillError> {
    run_at(lab, count, fault, Level::Ft, report_path)
}

/// [`run`] with the ledger VM protected at `level`. At level HA the only
/// fault is the pull: the survivor reboots the VM from its mirror, the
/// client connects again, and each round checks the data disk's ext4.
pub fn run_at(
    lab: &Lab,
    count: u32,
    fault: Fault,
    level: Level,
    report_path: &PathBuf,
) -> Result<DrillReport, DrillError> {
    run_with(lab, (count, fault), level, Default::default(), report_path)
}

/// [`run_at`] with the ledger VM's level-ft tuning `ft` (its delta cache,
/// epochs in flight, ...), which its re-protections keep.
pub fn run_with(
    lab: &Lab,
    (count, fault): (u32, Fault),
    level: Level,
    ft: ftd_client::model::FtOptions,
    report_path: &PathBuf,
) -> Result<DrillReport, DrillError> {
    if level == Level::Ha && !matches!(fault, Fault::Pull | Fault::Switchover) {
        return Err(DrillError::NotAtHa { fault });
    }
    lab.down()?;
    progress("drill: starting the lab pair");
    lab.up(&NodeId::ALL)?;
    let mut primary = NodeId::A;
    progress(format_args!(
        "drill: protecting the ledger VM at level {level} (initial synchronisation)"
    ));
    ft_pair::protect_at(lab, primary, level.as_str(), ft)?;
    ft_pair::wait_for(
        lab,
        primary.peer(),
        Role::Standby,
        FtState::StandingBy,
        Duration::from_secs(60),
    )?;
    let mut client = Client::start_with(
        lab,
        // Only a reboot breaks the client's connection: a live migration
        // (level HA, switchover rounds) keeps it like an FT failover.
        match (level, fault) {
            (Level::Ha, Fault::Pull) => Reconnect::AfterReboot,
            _ => Reconnect::Never,
        },
    )?;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut rng = seed;
    let mut rounds: Vec<DrillRound> = Vec::new();
    let result = (|| -> Result<(), DrillError> {
        for round in 1..=count {
            let this = match fault {
                Fault::Pull => RoundFault::Pull,
                Fault::Partition => partition_kind(&mut rng),
                Fault::Mixed if next_random(&mut rng).is_multiple_of(2) => RoundFault::Pull,
                Fault::Mixed => partition_kind(&mut rng),
                Fault::FreezeStandby => RoundFault::Freeze(primary.peer()),
                Fault::FreezePrimary => RoundFault::Freeze(primary),
                Fault::Switchover => RoundFault::Switchover,
            };
            let r = match this {
                RoundFault::Pull => pull_round(lab, &client, round, primary, level, &mut rng)?,
                RoundFault::Freeze(node) => {
                    freeze_round(lab, &client, round, primary, node, &mut rng)?
                }
                RoundFault::Switchover => {
                    switchover_round(lab, &client, round, primary, level, &mut rng)?
                }
                _ => partition_round(lab, &client, round, primary, this, &mut rng)?,
            };
            progress(format_args!(
                "drill {round}/{count}: {} (primary {}) after {} ms: {} served after {} ms; \
                 {} acked, memory {}, disk {}, two active {}",
                r.fault,
                r.pulled,
                r.pull_after_ms,
                r.promoted,
                r.failover_ms,
                r.acked_before_check,
                if r.memory.ok() { "ok" } else { "WRONG" },
                if r.disk.ok() { "ok" } else { "WRONG" },
                if r.two_active_seen { "SEEN" } else { "never" },
            ));
            let ok = r.ok();
            primary = r.promoted;
            rounds.push(r);
            if !ok {
                break;
            }
        }
        Ok(())
    })();
    let final_error = client.stop();
    result?;
    let acked_total = client.acked_total();
    let mut failovers: Vec<u64> = rounds.iter().map(|r| r.failover_ms).collect();
    let lost_total = rounds
        .iter()
        .map(|r| r.memory.lost.len() + r.disk.lost.len())
        .sum();
    let duplicated_total = rounds
        .iter()
        .map(|r| r.memory.duplicated.len() + r.disk.duplicated.len())
        .sum();
    let reconnects = client.reconnects();
    let report = DrillReport {
        lab: lab.topo.name.clone(),
        count,
        fault,
        level,
        reconnects,
        seed,
        passed: rounds.len() == count as usize
            && rounds.iter().all(DrillRound::ok)
            && final_error.is_none(),
        two_active_total: rounds.iter().filter(|r| r.two_active_seen).count(),
        rounds,
        acked_total,
        lost_total,
        duplicated_total,
        connection_survived: final_error.is_none(),
        failover_ms_p50: percentile(&mut failovers, 50.0),
        failover_ms_p99: percentile(&mut failovers, 99.0),
        failover_ms_max: failovers.iter().copied().max().unwrap_or(0),
    };
    let json = serde_json::to_string_pretty(&report).expect("serialisable");
    std::fs::write(report_path, json).map_err(|source| DrillError::Report {
        path: report_path.clone(),
        source,
    })?;
    Ok(report)
}

fn partition_kind(rng: &mut u64) -> RoundFault {
    match next_random(rng) % 3 {
        0 => RoundFault::PartitionEverything,
        1 => RoundFault::PartitionIsolating(NodeId::A),
        _ => RoundFault::PartitionIsolating(NodeId::B),
    }
}

/// Waits a random 1-4 s of protected running; returns when it waited from.
fn protected_run(rng: &mut u64, client: &Client) -> Result<Instant, DrillError> {
    let since = Instant::now();
    std::thread::sleep(Duration::from_millis(1000 + next_random(rng) % 3000));
    client.failed()?;
    Ok(since)
}

/// A round's start: a random 1-4 s of protected running, then the epoch
/// `standby` has committed; returns when the run began, that epoch and
/// what each node's engine had sent in initial synchronisations so far.
fn before_fault(
    lab: &Lab,
    client: &Client,
    standby: NodeId,
    rng: &mut u64,
) -> Result<(Instant, u64, SyncSent), DrillError> {
    let protected_at = protected_run(rng, client)?;
    let committed_epoch = ft_pair::status(lab, standby).map_or(0, |s| s.epoch);
    Ok((protected_at, committed_epoch, SyncSent::read(lab)))
}

/// What `node`'s last initial synchronisation held before compression,
/// and the disk and memory bytes it did not read, if the round made one
/// (`resync_bytes` > 0).
fn copy_last(lab: &Lab, node: NodeId, resync_bytes: u64) -> (u64, u64, u64) {
    if resync_bytes == 0 {
        return (0, 0, 0);
    }
    ft_pair::status(lab, node).map_or((0, 0, 0), |s| {
        (
            s.counters.sync_uncompressed_bytes_last,
            s.counters.sync_disk_unread_bytes_last,
            s.counters.sync_memory_unread_bytes_last,
        )
    })
}

/// Bytes each node's engine sent in initial synchronisations (its
/// `sync_sent_bytes_total`), by node index.
#[derive(Debug, Clone, Copy)]
struct SyncSent([u64; 2]);

impl SyncSent {
    fn read(lab: &Lab) -> SyncSent {
        SyncSent(
            NodeId::ALL.map(|node| {
                ft_pair::status(lab, node).map_or(0, |s| s.counters.sync_sent_bytes_total)
            }),
        )
    }

    /// What `node`'s engine sent since `self` (all it sent, if it is a new
    /// engine process since).
    fn since(self, lab: &Lab, node: NodeId) -> u64 {
        let before = self.0[node.index() as usize];
        let now = SyncSent::read(lab).0[node.index() as usize];
        now.checked_sub(before).unwrap_or(now)
    }
}

/// Where the VM runs now, as `node`'s API shows it: (placed on `expected`,
/// generation).
fn placement(lab: &Lab, node: NodeId, expected: NodeId) -> Result<(bool, u64), DrillError> {
    let vm = ft_pair::vm(lab, node)?;
    let generation = vm.as_ref().map_or(0, |v| v.generation);
    let placed = vm
        .as_ref()
        .is_some_and(|v| v.primary_node.as_deref() == Some(ft_pair::node_name(expected).as_str()));
    Ok((placed, generation))
}

/// Pull the primary: the standby takes over; the node comes back as the
/// standby. At level HA the standby boots the VM from its mirror (a
/// reboot: the client connects again) and its data disk's ext4 must check
/// clean; the pulled node's mirror is then resynchronised.
fn pull_round(
    lab: &Lab,
    client: &Client,
    round: u32,
    primary: NodeId,
    level: Level,
    rng: &mut u64,
) -> Result<DrillRound, DrillError> {
    let standby = primary.peer();
    // Level HA: the survivor's console says how each boot's disk check went.
    let fscks_before = (level == Level::Ha).then(|| ft_pair::disk_checks(lab, standby).len());
    let (protected_at, committed_epoch, sync_before) = before_fault(lab, client, standby, rng)?;
    let pulled_at = Instant::now();
    lab.pull(primary)?;
    let pull_after_ms = pulled_at.duration_since(protected_at).as_millis() as u64;
    let within = match level {
        Level::Ft => Duration::from_secs(60),
        Level::Ha => HA_RESTART_WITHIN,
    };
    let took_over = client.first_ack_after(pulled_at, within, round)?;
    let failover_ms = took_over.duration_since(pulled_at).as_millis() as u64;
    let fsck_clean = match fscks_before {
        None => None,
        Some(before) => Some(fsck_after(lab, standby, before, round)?),
    };
    let (acked_before_check, memory, disk) = client.check(lab)?;
    // The pulled node comes back; its daemon learns the new placement
    // (from the witness or the peer) and starts the standby by itself.
    let back = Instant::now();
    let boots = lab.up(&[primary])?;
    let node_boot_ms = boots.first().map_or(0, |b| (b.boot_secs * 1000.0) as u64);
    let booted_at = Instant::now();
    // The status read once protected again: the daemon's view of its
    // engine is then that of the promoted copy (it polls the engine; right
    // after the failover it may still hold the standby's).
    let protected = ft_pair::wait_for(
        lab,
        standby,
        Role::Primary,
        FtState::Protected,
        REPROTECT_WITHIN,
    )?;
    let reprotect_ms = back.elapsed().as_millis() as u64;
    let boot_to_protected_ms = booted_at.elapsed().as_millis() as u64;
    let promoted = PromotedEngine::from(protected);
    let resync_bytes = sync_before.since(lab, standby);
    let (resync_uncompressed_bytes, resync_disk_unread_bytes, resync_memory_unread_bytes) =
        copy_last(lab, standby, resync_bytes);
    let (placed_ok, generation) = placement(lab, standby, standby)?;
    Ok(DrillRound {
        round,
        fault: RoundFault::Pull,
        pulled: primary,
        promoted: standby,
        pull_after_ms,
        failover_ms,
        replayed_frames: promoted.replayed_frames,
        overheard_frames: promoted.overheard_frames,
        takeover: promoted.takeover,
        audited_pages: promoted.audited_pages,
        audit_mismatches: promoted.audit_mismatches,
        heal_after_ms: 0,
        committed_epoch,
        acked_before_check,
        memory,
        disk,
        reprotect_ms,
        resync_bytes,
        resync_uncompressed_bytes,
        resync_disk_unread_bytes,
        resync_memory_unread_bytes,
        node_boot_ms,
        boot_to_protected_ms,
        generation,
        placed_ok,
        two_active_seen: false,
        two_active: None,
        states_a: vec![],
        states_b: vec![],
        fsck_clean,
    })
}

/// Level HA: how long the survivor may take to reboot the VM and serve.
const HA_RESTART_WITHIN: Duration = Duration::from_secs(180);

/// Whether the first check of the data disk `node`'s console reports past
/// its first `before` ones said clean (waits for it).
fn fsck_after(lab: &Lab, node: NodeId, before: usize, round: u32) -> Result<bool, DrillError> {
    let within = Duration::from_secs(30);
    let start = Instant::now();
    loop {
        if let Some(line) = ft_pair::disk_checks(lab, node).get(before) {
            let clean = line.trim_end().ends_with(": clean");
            if !clean {
                progress(format_args!("drill {round}: {}", line.trim_end()));
            }
            return Ok(clean);
        }
        if start.elapsed() > within {
            return Err(DrillError::NoFsck {
                round,
                node,
                secs: within.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Cut the links of `fault` on the nodes it names (true) or heal them.
fn cut(lab: &Lab, fault: RoundFault, up: bool) -> Result<(), DrillError> {
    lab.set_link(LinkId::Alink, up)?;
    match fault {
        RoundFault::PartitionIsolating(node) => lab.set_node_link(node, LinkId::Biz, up)?,
        _ => lab.set_link(LinkId::Biz, up)?,
    }
    Ok(())
}

/// Which node runs the VM as its primary once the partition healed: the
/// one whose engine is an active primary while the other's is not.
fn winner(lab: &Lab, round: u32) -> Result<NodeId, DrillError> {
    let start = Instant::now();
    let within = Duration::from_secs(60);
    loop {
        let statuses = NodeId::ALL.map(|n| watch::engine_status(lab, n));
        let primary = |s: &Option<Status>| {
            s.as_ref().is_some_and(|s| {
                s.role == Role::Primary
                    && matches!(
                        s.state,
                        FtState::Protected | FtState::Unprotected | FtState::Syncing
                    )
            })
        };
        match (primary(&statuses[0]), primary(&statuses[1])) {
            (true, false) => return Ok(NodeId::A),
            (false, true) => return Ok(NodeId::B),
            _ => {}
        }
        if start.elapsed() > within {
            return Err(DrillError::NoWinner {
                round,
                secs: within.as_secs(),
                seen: format!("{statuses:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Cut every path between the nodes for 1-5 s: exactly one copy goes on,
/// the other rejoins as the standby.
fn partition_round(
    lab: &Lab,
    client: &Client,
    round: u32,
    primary: NodeId,
    fault: RoundFault,
    rng: &mut u64,
) -> Result<DrillRound, DrillError> {
    let standby = primary.peer();
    let (protected_at, committed_epoch, sync_before) = before_fault(lab, client, standby, rng)?;
    let watch = Watch::start(lab);
    let cut_at = Instant::now();
    cut(lab, fault, false)?;
    let pull_after_ms = cut_at.duration_since(protected_at).as_millis() as u64;
    let heal_after = Duration::from_millis(1000 + next_random(rng) % 4000);
    std::thread::sleep(heal_after.saturating_sub(cut_at.elapsed()));
    let healed_at = Instant::now();
    cut(lab, fault, true)?;
    let heal_after_ms = healed_at.duration_since(cut_at).as_millis() as u64;
    settle(
        lab,
        client,
        EndedFault {
            round,
            fault,
            primary,
            at: cut_at,
            ended_at: healed_at,
            pull_after_ms,
            heal_after_ms,
            committed_epoch,
            sync_before,
        },
        watch,
    )
}

/// What the engine on a node that promoted tells of its takeover.
#[derive(Default)]
struct PromotedEngine {
    replayed_frames: u64,
    overheard_frames: u64,
    takeover: Option<TakeoverTimes>,
    audited_pages: u64,
    audit_mismatches: u64,
}

/// What the promoted engine replayed into its guest, how much of it was
/// overheard, and where its takeover's time went, from its status (which
/// belongs to the engine process, which a promotion keeps).
impl From<Status> for PromotedEngine {
    fn from(s: Status) -> PromotedEngine {
        PromotedEngine {
            replayed_frames: s.counters.inbound_replayed,
            overheard_frames: s.counters.inbound_overheard,
            takeover: s.last_takeover,
            audited_pages: s.counters.audit_pages_total,
            audit_mismatches: s.counters.audit_mismatches,
        }
    }
}

/// A fault that happened and ended (paths healed, process continued).
struct EndedFault {
    round: u32,
    fault: RoundFault,
    /// The primary before the fault.
    primary: NodeId,
    at: Instant,
    ended_at: Instant,
    pull_after_ms: u64,
    heal_after_ms: u64,
    committed_epoch: u64,
    sync_before: SyncSent,
}

/// After a partition or a freeze: the first acknowledged operation, the
/// ledger checked, the one primary found and protected again, what the
/// watch saw, where the API places the VM.
fn settle(
    lab: &Lab,
    client: &Client,
    f: EndedFault,
    watch: Watch,
) -> Result<DrillRound, DrillError> {
    let served = client.first_ack_after(f.at, Duration::from_secs(90), f.round)?;
    let failover_ms = served.duration_since(f.at).as_millis() as u64;
    let (acked_before_check, memory, disk) = client.check(lab)?;
    let winner = winner(lab, f.round)?;
    // Read once protected again: see `pull_round`.
    let protected = ft_pair::wait_for(
        lab,
        winner,
        Role::Primary,
        FtState::Protected,
        REPROTECT_WITHIN,
    )?;
    let promoted = if winner == f.primary {
        PromotedEngine::default()
    } else {
        PromotedEngine::from(protected)
    };
    let reprotect_ms = f.ended_at.elapsed().as_millis() as u64;
    let resync_bytes = f.sync_before.since(lab, winner);
    let (resync_uncompressed_bytes, resync_disk_unread_bytes, resync_memory_unread_bytes) =
        copy_last(lab, winner, resync_bytes);
    let seen = watch.finish();
    let (placed_ok, generation) = placement(lab, winner, winner)?;
    Ok(DrillRound {
        round: f.round,
        fault: f.fault,
        pulled: f.primary,
        promoted: winner,
        pull_after_ms: f.pull_after_ms,
        failover_ms,
        replayed_frames: promoted.replayed_frames,
        overheard_frames: promoted.overheard_frames,
        takeover: promoted.takeover,
        audited_pages: promoted.audited_pages,
        audit_mismatches: promoted.audit_mismatches,
        heal_after_ms: f.heal_after_ms,
        committed_epoch: f.committed_epoch,
        acked_before_check,
        memory,
        disk,
        reprotect_ms,
        resync_bytes,
        resync_uncompressed_bytes,
        resync_disk_unread_bytes,
        resync_memory_unread_bytes,
        node_boot_ms: 0,
        boot_to_protected_ms: reprotect_ms,
        generation,
        placed_ok,
        two_active_seen: seen.two_active > 0,
        two_active: seen.first_two_active,
        states_a: seen.states[0].clone(),
        states_b: seen.states[1].clone(),
        fsck_clean: None,
    })
}

/// How long a freeze lasts at most (ms); at least [`FREEZE_MIN_MS`].
const FREEZE_MAX_MS: u64 = 3000;
const FREEZE_MIN_MS: u64 = 200;

/// Stops `node`'s engine process for a random 0.2-3 s (SIGSTOP, then
/// SIGCONT, timed on the node itself): exactly one copy may go on, and the
/// pair must be protected again.
fn freeze_round(
    lab: &Lab,
    client: &Client,
    round: u32,
    primary: NodeId,
    node: NodeId,
    rng: &mut u64,
) -> Result<DrillRound, DrillError> {
    let standby = primary.peer();
    let (protected_at, committed_epoch, sync_before) = before_fault(lab, client, standby, rng)?;
    let freeze_ms = FREEZE_MIN_MS + next_random(rng) % (FREEZE_MAX_MS - FREEZE_MIN_MS);
    let watch = Watch::start(lab);
    let frozen_at = Instant::now();
    // One command on the node: the stop's length does not depend on the
    // lab's control path. Fails if no engine runs there. The frozen engine
    // may be gone by the end (its daemon stops a copy the other node
    // superseded, with SIGKILL if it cannot answer): then there is nothing
    // to continue.
    let script = format!(
        "set -e; p=$(pidof ftprotect); kill -STOP $p; usleep {}; kill -CONT $p 2>/dev/null || true",
        freeze_ms * 1000
    );
    let out = lab.exec(node, &["sh", "-c", &script], Duration::from_secs(30))?;
    if !out.success() {
        return Err(DrillError::Freeze {
            round,
            node,
            why: format!("{:?} {}", out.code, out.stderr.trim()),
        });
    }
    let thawed_at = Instant::now();
    let pull_after_ms = frozen_at.duration_since(protected_at).as_millis() as u64;
    let heal_after_ms = thawed_at.duration_since(frozen_at).as_millis() as u64;
    settle(
        lab,
        client,
        EndedFault {
            round,
            fault: RoundFault::Freeze(node),
            primary,
            at: frozen_at,
            ended_at: thawed_at,
            pull_after_ms,
            heal_after_ms,
            committed_epoch,
            sync_before,
        },
        watch,
    )
}

/// A planned switchover at a random moment: the standby takes over with
/// nothing lost, the old primary becomes its standby and the pair is
/// protected again. The round's `failover_ms` is the client-visible pause.
/// At level HA the VM moves by live migration: the answer comes when the
/// memory copy begins, and the round waits until the peer runs the VM
/// (then protected at HA again, so that the next round migrates too).
fn switchover_round(
    lab: &Lab,
    client: &Client,
    round: u32,
    primary: NodeId,
    level: Level,
    rng: &mut u64,
) -> Result<DrillRound, DrillError> {
    let standby = primary.peer();
    let (protected_at, committed_epoch, sync_before) = before_fault(lab, client, standby, rng)?;
    let watch = Watch::start(lab);
    let asked_at = Instant::now();
    ft_pair::switchover(lab, primary).map_err(|source| DrillError::Switchover {
        round,
        node: primary,
        source,
    })?;
    if level == Level::Ha {
        ft_pair::wait_for(
            lab,
            standby,
            Role::Primary,
            FtState::Protected,
            MIGRATED_WITHIN,
        )?;
    }
    let answered_at = Instant::now();
    let served = client.first_ack_after(answered_at, Duration::from_secs(60), round)?;
    let pause = client.longest_gap(asked_at, served);
    let mut r = settle(
        lab,
        client,
        EndedFault {
            round,
            fault: RoundFault::Switchover,
            primary,
            at: asked_at,
            ended_at: answered_at,
            pull_after_ms: asked_at.duration_since(protected_at).as_millis() as u64,
            heal_after_ms: answered_at.duration_since(asked_at).as_millis() as u64,
            committed_epoch,
            sync_before,
        },
        watch,
    )?;
    r.failover_ms = pause.as_millis() as u64;
    // The VM must have moved.
    r.placed_ok &= r.promoted == standby;
    if level == Level::Ha {
        at_level(lab, r.promoted, Level::Ha, REPROTECT_WITHIN)?;
    }
    Ok(r)
}

/// How long a live migration may take, from the request to the peer's
/// copy running protected (the memory copy at the lab A-link's rate).
const MIGRATED_WITHIN: Duration = Duration::from_secs(180);

/// Waits until `node`'s engine is a protected primary at `level`.
fn at_level(lab: &Lab, node: NodeId, level: Level, within: Duration) -> Result<(), DrillError> {
    let start = Instant::now();
    loop {
        let status = ft_pair::status(lab, node);
        if status.as_ref().is_some_and(|s| {
            s.role == Role::Primary && s.state == FtState::Protected && s.level == level
        }) {
            return Ok(());
        }
        if start.elapsed() > within {
            return Err(DrillError::NotAtLevel {
                node,
                level,
                secs: within.as_secs(),
                last: format!("{status:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A takeover's figures as "detect+claim+promote"; detect is "-" where no
/// silence or lost connection came first (a switchover, a handover), as in
/// "-+18+53"; "-" alone where the engine told of no takeover.
fn engine_ms(takeover: Option<&TakeoverTimes>) -> String {
    match takeover {
        Some(t) => match t.detect_ms {
            Some(detect) => format!("{detect}+{}+{}", t.claim_ms, t.promote_ms),
            None => format!("-+{}+{}", t.claim_ms, t.promote_ms),
        },
        None => "-".into(),
    }
}

/// The report as a table (lines of text).
pub fn table(report: &DrillReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    writeln!(
        out,
        "{:>5}  {:>10}  {:>7}  {:>5}  {:>8}  {:>11}  {:>15}  {:>8}  {:>9}  {:>7}  {:>7}  {:>7}  {:>10}  {:>12}  {:>17}  {:>9}  {:>15}  {:>9}  {:>13}  {:>13}",
        "drill",
        "fault",
        "from",
        "to",
        "epoch",
        "failover ms",
        "engine ms",
        "replayed",
        "overheard",
        "acked",
        "memory",
        "disk",
        "two active",
        "reprotect ms",
        "back->protect ms",
        "resync MB",
        "uncompressed MB",
        "unread MB",
        "mem unread MB",
        "audited pages"
    )
    .expect("a String takes any text");
    for r in &report.rounds {
        let verdict = |v: &Verdict| if v.ok() { "ok" } else { "WRONG" };
        writeln!(
        out,
            "{:>5}  {:>10}  {:>7}  {:>5}  {:>8}  {:>11}  {:>15}  {:>8}  {:>9}  {:>7}  {:>7}  {:>7}  {:>10}  {:>12}  {:>17}  {:>9.2}  {:>15.1}  {:>9.1}  {:>13.1}  {:>13}",
            r.round,
            r.fault.to_string(),
            r.pulled.to_string(),
            r.promoted.to_string(),
            r.committed_epoch,
            r.failover_ms,
            engine_ms(r.takeover.as_ref()),
            r.replayed_frames,
            r.overheard_frames,
            r.acked_before_check,
            verdict(&r.memory),
            verdict(&r.disk),
            if r.two_active_seen { "SEEN" } else { "never" },
            r.reprotect_ms,
            r.boot_to_protected_ms,
            r.resync_bytes as f64 / 1e6,
            r.resync_uncompressed_bytes as f64 / 1e6,
            r.resync_disk_unread_bytes as f64 / 1e6,
            r.resync_memory_unread_bytes as f64 / 1e6,
            if r.audit_mismatches > 0 {
                format!("{} DIFFER", r.audit_mismatches)
            } else {
                r.audited_pages.to_string()
            }
        )
        .expect("a String takes any text");
    }
    let migrations = report.level == Level::Ha && report.fault == Fault::Switchover;
    if migrations {
        writeln!(
            out,
            "level ha: the VM moved by live migration each round (memory copied while it ran, \
             then a switchover; failover = the longest pause the client saw); one client \
             connection throughout"
        )
        .expect("a String takes any text");
    } else if report.level == Level::Ha {
        let fsck: Vec<&str> = report
            .rounds
            .iter()
            .map(|r| match r.fsck_clean {
                Some(true) => "clean",
                Some(false) => "NOT CLEAN",
                None => "-",
            })
            .collect();
        writeln!(
            out,
            "level ha: the VM rebooted on the survivor each round (failover = pull -> first \
             operation acknowledged by the rebooted VM); data disk e2fsck per round: {}; \
             client reconnected {} times",
            fsck.join(", "),
            report.reconnects
        )
        .expect("a String takes any text");
    }
    writeln!(
        out,
        "{} drills ({:?}, level {}), {} operations acknowledged, {} lost, {} duplicated, two active copies in {} rounds, \
         client connection {}; failover p50 {} ms, p99 {} ms, max {} ms: {}",
        report.rounds.len(),
        report.fault,
        report.level,
        report.acked_total,
        report.lost_total,
        report.duplicated_total,
        report.two_active_total,
        match (report.connection_survived, report.level) {
            (false, _) => "BROKE",
            (true, _) if migrations => "survived every migration",
            (true, Level::Ft) => "survived every fault",
            (true, Level::Ha) => "reconnected after every reboot",
        },
        report.failover_ms_p50,
        report.failover_ms_p99,
        report.failover_ms_max,
        if report.passed { "PASSED" } else { "FAILED" }
    )
    .expect("a String takes any text");
    out
}

/// Prints the report as a table on stdout ([`table`]).
pub fn print_table(report: &DrillReport) {
    print!("{}", table(report));
}
