//! Supervision of each VM's role on this node. The FT engine runs as one
//! `ftprotect` child process per VM (`run` as the primary, `standby` as
//! the standby), so that a VM's engine failing cannot take the manager and
//! its API down, and `ftd` can restart (or be upgraded) without stopping
//! the VMs: on start it adopts the processes that still answer on their
//! control sockets.
//!
//! The supervisor reconciles: every half second, and at once when the
//! store changes, it compares what the store asks for (desired state,
//! placement, level) with what runs here, starts and stops processes,
//! reads each one's FT status on its control socket, and reports what it
//! sees (a promotion, a guest that stopped, a process that died) to the
//! manager, which records it.
//!
//! With a quorum witness configured, the witness has the last word on
//! where a VM's active copy runs: before starting a primary here, the
//! supervisor asks it, and a VM it says runs on the peer at a generation
//! at least as new as the store's becomes a standby here instead (the node
//! was away while the VM failed over). An engine the witness superseded
//! (exit code 3) is handled the same way.

mod checkpoint_watch;
mod engine_handle;
mod process;
mod standby_alerts;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use replicator::status::{FtState, Role, Status};

use witness::{Answer, Request, WitnessClient};

use crate::manager::Manager;
use crate::model::{Desired, Maintenance, Severity};
use crate::store::VmRecord;

use checkpoint_watch::{Change, CheckpointWatch};
pub(crate) use process::status_holding as engine_status_holding;
use process::{Exit, Process};
pub use process::{ProcessError, VmPaths};
use standby_alerts::{StandbyAlerts, Trouble};

/// How often the supervisor looks when nothing changed.
pub const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// A wait for the peer before starting a role becomes an alert after this.
pub const WAIT_ALERT_AFTER: Duration = Duration::from_secs(30);
/// After a role's process failed, the next start waits this long.
pub const RESTART_BACKOFF: Duration = Duration::from_secs(5);

/// What runs here for a VM, as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalRole {
    pub role: Role,
    pub state: FtState,
    pub epoch: Option<u64>,
    pub message: Option<String>,
    pub status: Option<Status>,
}

impl LocalRole {
    /// What the pair channel and the API tell of it.
    pub fn report(&self, vm: &str) -> crate::pair::wire::RoleReport {
        crate::pair::wire::RoleReport {
            vm: vm.to_string(),
            role: self.role,
            state: self.state,
            epoch: self.epoch,
            peer: self.status.as_ref().and_then(|s| s.peer.clone()),
            message: self.message.clone(),
            counters: self.status.as_ref().map(|s| s.counters.clone()),
            sync: self.status.as_ref().and_then(|s| s.sync.clone()),
            generation: self.status.as_ref().map(|s| s.generation),
            migrating: self.status.as_ref().is_some_and(|s| s.migrating),
            level: self.status.as_ref().map(|s| s.level),
        }
    }
}

/// The supervisor's view of what runs here, shared with the manager.
#[derive(Clone, Default)]
pub struct Runtime(Arc<RwLock<HashMap<String, LocalRole>>>);

impl Runtime {
    pub fn get(&self, vm: &str) -> Option<LocalRole> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(vm)
            .cloned()
    }

    pub fn all(&self) -> HashMap<String, LocalRole> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set(&self, vm: &str, role: Option<LocalRole>) {
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        match role {
            Some(r) => {
                map.insert(vm.to_string(), r);
            }
            None => {
                map.remove(vm);
            }
        }
    }
}

/// Which role this node should play for a VM, from its record; a node in
/// maintenance (`keeps_no_vm`) keeps no standby (its primaries leave by
/// switchovers).
pub fn wanted_role(
    record: &VmRecord,
    me: &str,
    peer: Option<&str>,
    keeps_no_vm: bool,
) -> Option<Role> {
    if record.desired != Desired::Running {
        return None;
    }
    match record.primary_node.as_deref() {
        Some(p) if p == me => Some(Role::Primary),
        Some(p) if Some(p) == peer && record.definition.level.has_standby() && !keeps_no_vm => {
            Some(Role::Standby)
        }
        _ => None,
    }
}

pub struct Supervisor {
    manager: Manager,
    processes: HashMap<String, Process>,
    /// When a VM's role last failed (for the restart back-off).
    failed_at: HashMap<String, Instant>,
    /// When each VM began waiting for the peer, and how often that was
    /// said (once at once, once more as an alert when it lasts).
    waiting_since: HashMap<String, Instant>,
    waiting_said: HashMap<String, u8>,
    /// What was said of each VM's standby (a refusal, a drop): each once,
    /// until the VM is protected again.
    standby_alerts: StandbyAlerts,
    checkpoint_watch: CheckpointWatch,
    /// The quorum witness, if the pair has one.
    witness: Option<WitnessClient>,
}

/// The exit code of an engine the witness superseded.
const EXIT_SUPERSEDED: i32 = 3;
/// The exit code of a primary that handed its VM to the standby.
const EXIT_SWITCHED_OVER: i32 = 4;

impl Supervisor {
    pub fn new(manager: Manager) -> Supervisor {
        let witness = crate::quorum::client(&manager);
        Supervisor {
            manager,
            processes: HashMap::new(),
            failed_at: HashMap::new(),
            waiting_since: HashMap::new(),
            waiting_said: HashMap::new(),
            standby_alerts: StandbyAlerts::default(),
            checkpoint_watch: CheckpointWatch::default(),
            witness,
        }
    }

    /// Reconciles until the process ends.
    pub async fn run(mut self) {
        self.adopt().await;
        loop {
            self.reconcile().await;
            tokio::select! {
                _ = self.manager.changed() => {}
                _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            }
        }
    }

    fn paths(&self, vm: &str) -> VmPaths {
        VmPaths::new(self.manager.config(), self.manager.state_dir(), vm)
    }

    /// Takes over the processes a previous `ftd` left running.
    async fn adopt(&mut self) {
        let Ok(records) = self.manager.store().vms() else {
            return;
        };
        for record in records {
            let name = record.definition.name.clone();
            let paths = self.paths(&name);
            if let Some(process) = Process::adopt(&name, paths).await {
                self.manager.record(
                    Severity::Info,
                    false,
                    "vm",
                    Some(&name),
                    &format!(
                        "VM {name}: adopted its running {} process",
                        role_name(process.role)
                    ),
                );
                self.processes.insert(name, process);
            }
        }
    }

    async fn reconcile(&mut self) {
        let records = match self.manager.store().vms() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the VMs; supervision paused");
                return;
            }
        };
        let me = self.manager.node_name().to_string();
        let peer = self.manager.config().peer.as_ref().map(|p| p.name.clone());
        // Processes of VMs no longer defined.
        let defined: Vec<String> = records.iter().map(|r| r.definition.name.clone()).collect();
        let gone: Vec<String> = self
            .processes
            .keys()
            .filter(|n| !defined.contains(n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(mut p) = self.processes.remove(&name) {
                p.stop_now().await;
            }
            self.manager.runtime().set(&name, None);
        }
        self.remove_deleted(&defined);
        for record in records {
            self.reconcile_vm(record, &me, peer.as_deref()).await;
        }
    }

    /// Removes the files of VMs that were deleted (here or on the peer).
    fn remove_deleted(&mut self, defined: &[String]) {
        let root = self.manager.state_dir().join("vms");
        let Ok(entries) = std::fs::read_dir(&root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if defined.contains(&name) || self.processes.contains_key(&name) {
                continue;
            }
            let paths = VmPaths::new(self.manager.config(), self.manager.state_dir(), &name);
            if let Some(ram) = &paths.ram {
                let _ = std::fs::remove_file(ram);
            }
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => self.manager.record(
                    Severity::Info,
                    false,
                    "vm",
                    Some(&name),
                    &format!(
                        "VM {name}: its files on {} are removed (the VM was deleted)",
                        self.manager.node_name()
                    ),
                ),
                Err(e) => {
                    tracing::warn!(vm = %name, error = %e, "cannot remove a deleted VM's files")
                }
            }
        }
    }

    async fn reconcile_vm(&mut self, record: VmRecord, me: &str, peer: Option<&str>) {
        let name = record.definition.name.clone();
        if let Some(process) = self.processes.get_mut(&name) {
            // Refusals by the standby, and standbys the primary dropped
            // (one that hung): an alert, until protected again.
            let before = process
                .last_status()
                .map(|s| (s.counters.standby_refusals, s.counters.standby_drops));
            let seen = process.poll().await;
            if let Some(status) = &seen.status {
                let (refused_now, dropped_now) = before.map_or((false, false), |(r, d)| {
                    (
                        status.counters.standby_refusals > r,
                        status.counters.standby_drops > d,
                    )
                });
                if refused_now && self.standby_alerts.raise(&name, Trouble::Refused) {
                    standby_refused(&self.manager, &name, status);
                }
                if dropped_now && self.standby_alerts.raise(&name, Trouble::Dropped) {
                    standby_dropped(&self.manager, &name);
                }
                // A standby whose epoch stands still while standing by:
                // the primary stopped checkpointing, or this standby
                // cannot commit.
                if let Some(change) = self.checkpoint_watch.observe(&name, status, Instant::now()) {
                    checkpoints_changed(&self.manager, &name, change);
                }
                if status.state == FtState::Protected && self.standby_alerts.protected(&name) {
                    self.manager.record(
                        Severity::Info,
                        false,
                        "vm",
                        Some(&name),
                        &format!("VM {name}: the standby took the replica; protected again"),
                    );
                }
            }
            if let Some(status) = &seen.status {
                self.manager.runtime().set(
                    &name,
                    Some(LocalRole {
                        role: status.role,
                        state: status.state,
                        epoch: (status.epoch > 0).then_some(status.epoch),
                        message: status.message.clone(),
                        status: Some(status.clone()),
                    }),
                );
            }
            // A standby that promoted is now the primary: the VM's active
            // copy moved here.
            if process.role == Role::Standby
                && seen
                    .status
                    .as_ref()
                    .is_some_and(|s| s.role == Role::Primary)
            {
                process.role = Role::Primary;
                let generation = seen.status.as_ref().map_or(0, |s| s.generation);
                let planned = seen
                    .status
                    .as_ref()
                    .is_some_and(|s| s.counters.switchovers > 0);
                self.promoted(&name, me, generation, planned);
                return;
            }
            if let Some(status) = &seen.status {
                follow_level(&self.manager, process, status, &record).await;
                if unwitnessed(process, status, !self.manager.config().witness.is_empty()) {
                    self.manager.record(
                        Severity::Critical,
                        true,
                        "vm",
                        Some(&name),
                        &format!(
                            "VM {name}: its primary on this node runs without the pair's \
                             witness (its engine was started before the witness was \
                             configured, or by an older ftd, and adopted): a partition could \
                             leave two active copies. Stop and start the VM, or switch it \
                             over, to run it under the witness"
                        ),
                    );
                }
            }
            // The primary here went on alone: the witness gave it a new
            // generation (the lost standby's replica is stale for good).
            if let Some(status) = &seen.status {
                if process.role == Role::Primary && status.generation > record.generation {
                    new_generation(&self.manager, &name, me, status.generation);
                }
            }
            if let Some(exit) = seen.exit {
                let role = process.role;
                self.processes.remove(&name);
                self.manager.runtime().set(&name, None);
                self.exited(&record, role, exit);
                return;
            }
        }
        let maintenance = self
            .manager
            .store()
            .node_record(me)
            .map(|n| n.maintenance)
            .unwrap_or_default();
        let running = self.processes.get(&name).map(|p| p.role);
        // A node entering maintenance keeps the standbys it has (its peer's
        // VMs stay protected while its own move) and starts no new one; on
        // maintenance it keeps none.
        let keeps_no_vm = match maintenance {
            Maintenance::On => true,
            Maintenance::Entering => running != Some(Role::Standby),
            Maintenance::Off | Maintenance::Leaving => false,
        };
        let wanted = wanted_role(&record, me, peer, keeps_no_vm);
        // A standby here that the store already names the primary is
        // taking over (a switchover recorded by the other node before this
        // engine promoted): it becomes the primary by itself.
        let taking_over = running == Some(Role::Standby) && wanted == Some(Role::Primary);
        if running.is_some() && running != wanted && !taking_over {
            let Some(mut process) = self.processes.remove(&name) else {
                return;
            };
            if let Some(why) = split_brain(process.role, process.last_status(), &record, me) {
                self.manager
                    .record(Severity::Critical, true, "vm", Some(&name), &why);
            }
            self.manager.record(
                Severity::Info,
                false,
                "vm",
                Some(&name),
                &format!("VM {name}: stopping its {} here", role_name(process.role)),
            );
            let exit = process.stop().await;
            self.manager.runtime().set(&name, None);
            tracing::info!(vm = %name, ?exit, "role stopped");
            return;
        }
        let Some(role) = wanted else {
            return;
        };
        if running.is_some() {
            return;
        }
        if !self.manager.may_start_roles() {
            // Not before the peer was heard: it may run this VM. Said at
            // once; an alert when it lasts.
            let since = *self
                .waiting_since
                .entry(name.clone())
                .or_insert_with(Instant::now);
            let long = since.elapsed() >= WAIT_ALERT_AFTER;
            let said = self.waiting_said.get(&name).copied().unwrap_or(0);
            if said == 0 || (long && said == 1) {
                self.waiting_said.insert(name.clone(), said + 1);
                self.manager.record(
                    if long {
                        Severity::Warning
                    } else {
                        Severity::Info
                    },
                    long,
                    "vm",
                    Some(&name),
                    &format!(
                        "VM {name}: waiting to hear the peer before starting its {} here \
                         (the peer may be running it){}",
                        role_name(role),
                        if long {
                            format!(" for {} s already", since.elapsed().as_secs())
                        } else {
                            String::new()
                        }
                    ),
                );
            }
            return;
        }
        if self
            .failed_at
            .get(&name)
            .is_some_and(|t| t.elapsed() < RESTART_BACKOFF)
        {
            return;
        }
        if role == Role::Primary && self.runs_elsewhere(&record, me).await {
            return;
        }
        let paths = self.paths(&name);
        let generation = record.generation;
        match Process::start(
            self.manager.config(),
            &record.definition,
            generation,
            role,
            paths,
        )
        .await
        {
            Ok(process) => {
                self.manager.record(
                    Severity::Info,
                    false,
                    "vm",
                    Some(&name),
                    &format!("VM {name}: {} started on {me}", role_name(role)),
                );
                self.manager.runtime().set(
                    &name,
                    Some(LocalRole {
                        role,
                        state: FtState::Starting,
                        epoch: None,
                        message: None,
                        status: None,
                    }),
                );
                self.processes.insert(name, process);
            }
            Err(e) => {
                self.failed_at.insert(name.clone(), Instant::now());
                self.manager.record(
                    Severity::Critical,
                    true,
                    "vm",
                    Some(&name),
                    &format!("VM {name}: cannot start its {}: {e}", role_name(role)),
                );
            }
        }
    }

    /// The standby here promoted: record the new placement and generation
    /// (the engine's, granted by the witness; or the next one). `planned`:
    /// by a switchover, which the other node may have recorded already.
    fn promoted(&mut self, name: &str, me: &str, generation: u64, planned: bool) {
        let me = me.to_string();
        match self.manager.store().update_vm(name, |r| {
            if r.primary_node.as_deref() != Some(me.as_str()) {
                r.generation += 1;
            }
            r.primary_node = Some(me.clone());
            r.generation = r.generation.max(generation);
        }) {
            Ok(record) if planned => self.manager.record(
                Severity::Info,
                false,
                "vm",
                Some(name),
                &format!(
                    "VM {name}: planned switchover: the standby on {me} took over (generation {})",
                    record.generation
                ),
            ),
            Ok(record) if record.definition.level == crate::model::Level::Ha => {
                self.manager.record(
                    Severity::Critical,
                    true,
                    "vm",
                    Some(name),
                    &format!(
                        "VM {name}: its primary was lost; node {me} rebooted it from its disk \
                         mirror (level ha, generation {})",
                        record.generation
                    ),
                )
            }
            Ok(record) => self.manager.record(
                Severity::Critical,
                true,
                "vm",
                Some(name),
                &format!(
                    "VM {name}: its primary was lost; the standby on {me} took over (generation {})",
                    record.generation
                ),
            ),
            Err(e) => tracing::error!(vm = name, error = %e, "cannot record a takeover"),
        }
    }

    /// Whether the witness says the VM's active copy runs on another node
    /// at a generation at least as new as the store's; if so the store
    /// follows (this node becomes the standby). False when there is no
    /// witness or it cannot be asked (the engine asks it again).
    async fn runs_elsewhere(&mut self, record: &VmRecord, me: &str) -> bool {
        let Some(witness) = &self.witness else {
            return false;
        };
        let name = &record.definition.name;
        let records = match witness.ask(&Request::Show).await {
            Ok(Answer::Records { records, .. }) => records,
            Ok(other) => {
                tracing::warn!(vm = %name, ?other, "unexpected answer from the witness");
                return false;
            }
            Err(e) => {
                tracing::warn!(vm = %name, error = %e, "cannot ask the witness before starting a primary");
                return false;
            }
        };
        let Some(owned) = records.into_iter().find(|r| &r.vm == name) else {
            return false;
        };
        if owned.owner == me || owned.generation < record.generation {
            return false;
        }
        let owner = owned.owner.clone();
        match self.manager.store().update_vm(name, |r| {
            r.primary_node = Some(owner.clone());
            r.generation = owned.generation;
        }) {
            Ok(_) => self.manager.record(
                Severity::Warning,
                true,
                "vm",
                Some(name),
                &format!(
                    "VM {name}: the witness says node {owner} runs it at generation {}; \
                     this node (generation {}) becomes its standby",
                    owned.generation, record.generation
                ),
            ),
            Err(e) => tracing::error!(vm = %name, error = %e, "cannot record the witness's owner"),
        }
        true
    }

    fn exited(&mut self, record: &VmRecord, role: Role, exit: Exit) {
        let name = &record.definition.name;
        if exit.code == Some(EXIT_SWITCHED_OVER) || exit.last_state == Some(FtState::SwitchedOver) {
            // A planned switchover: the peer runs the VM now, and this
            // node becomes its standby (at once: no back-off).
            if let Some(peer) = &self.manager.config().peer {
                self.manager
                    .switched_over(name, &peer.name, record.generation, None, None);
            }
            return;
        }
        if exit.code == Some(EXIT_SUPERSEDED) || exit.last_state == Some(FtState::Superseded) {
            // Not a guest stop and not a failure: the witness says the VM
            // runs elsewhere. The next start asks it where.
            self.manager.record(
                Severity::Critical,
                true,
                "vm",
                Some(name),
                &format!(
                    "VM {name}: the witness says another node runs it at a newer generation: \
                     this node's copy stopped, its held output dropped ({})",
                    exit.describe()
                ),
            );
            return;
        }
        let guest_stopped = role == Role::Primary && exit.last_state == Some(FtState::Stopped);
        let wanted = record.desired == Desired::Running;
        if guest_stopped && wanted {
            // The guest shut itself down: the VM stops on both nodes.
            if let Err(e) = self
                .manager
                .store()
                .update_vm(name, |r| r.desired = Desired::Stopped)
            {
                tracing::error!(vm = %name, error = %e, "cannot record a stop");
            }
            self.manager.record(
                Severity::Info,
                false,
                "vm",
                Some(name),
                &format!("VM {name}: the guest stopped ({})", exit.describe()),
            );
            return;
        }
        if !wanted || exit.code == Some(0) {
            self.manager.record(
                Severity::Info,
                false,
                "vm",
                Some(name),
                &format!("VM {name}: {} ended ({})", role_name(role), exit.describe()),
            );
            return;
        }
        self.failed_at.insert(name.clone(), Instant::now());
        self.manager.record(
            Severity::Critical,
            true,
            "vm",
            Some(name),
            &format!(
                "VM {name}: its {} failed ({}); restarting in {} s",
                role_name(role),
                exit.describe(),
                RESTART_BACKOFF.as_secs()
            ),
        );
    }
}

/// The primary dropped a standby that did not take or acknowledge what it
/// was sent in time.
fn standby_dropped(manager: &Manager, name: &str) {
    manager.record(
        Severity::Critical,
        true,
        "vm",
        Some(name),
        &format!(
            "VM {name} is unprotected: its standby did not take or acknowledge what it was sent in time (its disk or its node hangs?) and was dropped; the VM runs on, and is protected again once the standby answers"
        ),
    );
}

/// The VM's standby here committed no checkpoint for a while (an alert:
/// the primary's engine stopped checkpointing, the guest's output held
/// there, or this standby cannot commit), or commits again, or left
/// standing by.
fn checkpoints_changed(manager: &Manager, name: &str, change: Change) {
    match change {
        Change::Stalled { epoch, for_s } => manager.record(
            Severity::Critical,
            true,
            "vm",
            Some(name),
            &format!(
                "VM {name}: its standby here committed no checkpoint for {for_s} s (standing by at epoch {epoch}, its primary still heard): either the primary's FT engine no longer checkpoints (the guest's output is then held, or the guest paused, on the other node: see that node's engine log for the VM) or this standby cannot commit what it is sent (its disk hangs?)"
            ),
        ),
        Change::Resumed { epoch } => manager.record(
            Severity::Info,
            false,
            "vm",
            Some(name),
            &format!("VM {name}: its standby here commits checkpoints again (epoch {epoch})"),
        ),
        Change::Left { now } => manager.record(
            Severity::Info,
            false,
            "vm",
            Some(name),
            &format!(
                "VM {name}: its standby here is no longer standing by ({}): its stalled checkpoints are no longer watched",
                now.as_str()
            ),
        ),
    }
}

/// The standby refused to hold the VM's replica (its own fault: a full
/// disk, say): the VM runs unprotected until that is mended (said once;
/// the engine keeps asking).
fn standby_refused(manager: &Manager, name: &str, status: &replicator::status::Status) {
    let why = status.message.as_deref().unwrap_or("no reason given");
    manager.record(
        Severity::Critical,
        true,
        "vm",
        Some(name),
        &format!("VM {name} is unprotected: {why}"),
    );
}

/// The VM's level changed while it runs (ft <-> ha): the primary here is
/// asked to go on at the store's level, without a reboot (once per level,
/// asked again once the engine got there or a live migration it ran was
/// called off). A live migration runs at FT until the VM moved; one called
/// off is said in the events.
async fn follow_level(
    manager: &Manager,
    process: &mut Process,
    status: &Status,
    record: &VmRecord,
) {
    let name = &record.definition.name;
    if process.was_migrating && !status.migrating && status.role == Role::Primary {
        let why = status.message.as_deref().unwrap_or("no reason given");
        manager.record(
            Severity::Warning,
            true,
            "vm",
            Some(name),
            &format!("VM {name}: live migration called off ({why}); it runs on here"),
        );
        process.level_asked = None;
    }
    process.was_migrating = status.migrating;
    let Some(to) = record.definition.level.engine_level() else {
        return;
    };
    if status.level == to {
        process.level_asked = None;
    }
    if process.role != Role::Primary
        || status.role != Role::Primary
        || status.migrating
        || status.level == to
        || process.level_asked == Some(to)
    {
        return;
    }
    match process.ask_level(to).await {
        Ok(()) => {
            process.level_asked = Some(to);
            manager.record(
                Severity::Info,
                false,
                "vm",
                Some(name),
                &format!(
                    "VM {name}: its primary goes on at level {to} without a reboot (the \
                     standby is synchronised again)"
                ),
            );
        }
        Err(why) => tracing::warn!(vm = %name, %why, "the level change was refused"),
    }
}

/// Whether to say now that this primary runs a standby session (syncing
/// or protected) without the witness the pair has: its standby, started
/// with the witness, may be granted a takeover this copy never hears of.
/// An engine ftd starts now always gets the witness; one adopted across an
/// upgrade or a change of `ftd.toml` may not. Once per process.
fn unwitnessed(process: &mut Process, status: &Status, pair_has_witness: bool) -> bool {
    let said = &mut process.said_unwitnessed;
    say_once(said, exposed(process.role, status, pair_has_witness))
}

/// Whether this node's `role`, whose engine said `status`, is exposed
/// (see [`unwitnessed`]).
fn exposed(role: Role, status: &Status, pair_has_witness: bool) -> bool {
    pair_has_witness
        && role == Role::Primary
        && status.role == Role::Primary
        && matches!(status.state, FtState::Syncing | FtState::Protected)
        && status.witness.is_none()
}

/// True the first time `now` holds (`said` remembers it).
fn say_once(said: &mut bool, now: bool) -> bool {
    let first = now && !*said;
    *said |= now;
    first
}

/// Whether stopping this node's `role` of a VM ends a split brain: a
/// primary still active here (its engine's last word) while the store
/// names another node the primary at a newer generation, which that node
/// took without this one stepping down (no witness decided: every path
/// between the nodes was cut). Both copies ran and wrote; the policy keeps
/// the newer generation's, and this copy's work since the split is
/// discarded, not merged. Returns the alert.
pub fn split_brain(
    role: Role,
    last: Option<&Status>,
    record: &VmRecord,
    me: &str,
) -> Option<String> {
    let status = last?;
    let other = record.primary_node.as_deref()?;
    let active = matches!(
        status.state,
        FtState::Protected | FtState::Unprotected | FtState::Syncing
    );
    if role != Role::Primary
        || status.role != Role::Primary
        || !active
        || other == me
        || record.desired != Desired::Running
        || status.generation >= record.generation
    {
        return None;
    }
    let name = &record.definition.name;
    let alone = if status.state == FtState::Unprotected {
        let since = status.state_since_unix_ms;
        let secs = crate::store::unix_ms().saturating_sub(since) as f64 / 1000.0;
        format!(", running alone for {secs:.1} s")
    } else {
        String::new()
    };
    Some(format!(
        "VM {name}: split brain: this node ({me}) ran it as the primary at generation {} \
         (level {}{alone}) while node {other} took it over at generation {}: both copies ran \
         and wrote (no witness decided). By the policy the newer generation wins: node \
         {other}'s copy goes on, this one stops and is resynchronised from it; what this \
         copy did since the nodes lost each other is discarded, not merged",
        status.generation,
        record.definition.level.as_str(),
        record.generation
    ))
}

/// The primary here runs a newer generation than the store knows.
fn new_generation(manager: &Manager, name: &str, me: &str, generation: u64) {
    let me = me.to_string();
    match manager.store().update_vm(name, |r| {
        r.primary_node = Some(me.clone());
        r.generation = r.generation.max(generation);
    }) {
        Ok(_) => manager.record(
            Severity::Warning,
            true,
            "vm",
            Some(name),
            &format!(
                "VM {name}: its standby was lost; the witness confirmed the primary on {me} \
                 runs on alone (generation {generation})"
            ),
        ),
        Err(e) => tracing::error!(vm = name, error = %e, "cannot record a generation"),
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Standby => "standby",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replicator::status::StatusBoard;

    /// The store after node-b took vm1 over at generation 2, and the last
    /// word of this node's (node-a's) primary engine.
    fn split(state: FtState, engine_generation: u64) -> (VmRecord, Status) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::fixtures::store_with_vm(dir.path());
        let record = store
            .update_vm("vm1", |r| {
                r.primary_node = Some("node-b".into());
                r.generation = 2;
            })
            .unwrap();
        let board = StatusBoard::new("node-a", Role::Primary);
        board.set_state(Role::Primary, state, None);
        board.update(|s| s.generation = engine_generation);
        (record, board.snapshot())
    }

    /// Issue 11: both copies ran while the nodes could not hear each other
    /// (no witness): the one stopped here is said to be a split brain, with
    /// the winner by the policy; not when this copy had stepped down, had
    /// the newer generation itself, or was the standby.
    #[test]
    fn a_primary_stopped_because_the_peer_took_over_meanwhile_is_a_split_brain() {
        let (record, alone) = split(FtState::Unprotected, 1);
        let why =
            split_brain(Role::Primary, Some(&alone), &record, "node-a").expect("a split brain");
        assert!(
            why.contains("split brain")
                && why.contains("node node-b took it over at generation 2")
                && why.contains("running alone for")
                && why.contains("discarded, not merged"),
            "{why}"
        );
        let (record, protected) = split(FtState::Protected, 1);
        assert!(split_brain(Role::Primary, Some(&protected), &record, "node-a").is_some());
        // Not a split brain:
        let (record, stopped) = split(FtState::SwitchedOver, 1);
        assert_eq!(
            split_brain(Role::Primary, Some(&stopped), &record, "node-a"),
            None
        );
        let (record, newer) = split(FtState::Unprotected, 2);
        assert_eq!(
            split_brain(Role::Primary, Some(&newer), &record, "node-a"),
            None
        );
        let (record, alone) = split(FtState::Unprotected, 1);
        assert_eq!(
            split_brain(Role::Standby, Some(&alone), &record, "node-a"),
            None
        );
        assert_eq!(split_brain(Role::Primary, None, &record, "node-a"), None);
        assert_eq!(
            split_brain(Role::Primary, Some(&alone), &record, "node-b"),
            None
        );
    }

    /// A primary adopted from before the witness (no `witness` in its
    /// status) running a standby session is said once; not when it holds
    /// the lease (or defers it), has no session yet, or the pair has no
    /// witness.
    #[test]
    fn a_primary_without_the_pairs_witness_in_a_standby_session_is_said_once() {
        let engine = |state: FtState, witness: Option<&str>| {
            let board = StatusBoard::new("node-a", Role::Primary);
            board.set_state(Role::Primary, state, None);
            board.update(|s| s.witness = witness.map(str::to_string));
            board.snapshot()
        };
        let adopted = engine(FtState::Protected, None);
        assert!(exposed(Role::Primary, &adopted, true));
        assert!(exposed(
            Role::Primary,
            &engine(FtState::Syncing, None),
            true
        ));
        assert!(
            !exposed(Role::Primary, &adopted, false),
            "no witness in the pair"
        );
        assert!(
            !exposed(Role::Standby, &adopted, true),
            "this node's role is the standby"
        );
        assert!(!exposed(
            Role::Primary,
            &engine(FtState::Unprotected, None),
            true
        ));
        for held in [
            "lease held at generation 1",
            "lease taken when a standby connects",
        ] {
            assert!(!exposed(
                Role::Primary,
                &engine(FtState::Protected, Some(held)),
                true
            ));
        }
        let mut said = false;
        assert!(say_once(&mut said, true));
        assert!(!say_once(&mut said, true), "said once");
        assert!(!say_once(&mut said, false));
    }
}
