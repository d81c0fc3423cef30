//! Node maintenance (`POST /api/nodes/{name}/maintenance/enter|exit`):
//! a person takes a node out of service to work on it, and brings it back.
//!
//! - Entering: the node's FT VMs switch over to the peer (planned
//!   switchovers, nothing lost) and its HA VMs migrate there (live
//!   migration), and the node starts no standby. Once no VM
//!   runs there, the node is `on` maintenance: its VMs run unprotected on
//!   the peer (an alert says so), and pulling or rebooting the node affects
//!   no VM.
//! - Leaving: the node's standbys start again (each VM is re-protected),
//!   and each VM that prefers the node switches back to it once protected.
//!   When every running protected VM is protected and where it prefers to be, the
//!   node is back in service (`off`).
//!
//! The state is a node record in the store that travels over the pair
//! channel, so either node's API shows and changes it. Each step is done by
//! the daemon that can do it: the switchovers by the node running the
//! primaries, the end of a step by the node in maintenance. Every
//! step goes into the event log and the audit log, with who asked.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use replicator::status::{FtState, Role};

use crate::manager::{Manager, ManagerError};
use crate::model::{Desired, Level, Maintenance, NodeView, Severity, VmState, VmView};
use crate::store::{unix_ms, NodeRecord, VmRecord};

/// How often the driver looks when nothing changed.
pub const STEP_EVERY: Duration = Duration::from_millis(500);
/// After a switchover of one VM failed, the next try waits this long,
/// doubled after each further failure up to [`RETRY_AT_MOST_AFTER`] (each
/// failure raises an alert: a VM that cannot move raises a few, not one
/// every few seconds).
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
pub const RETRY_AT_MOST_AFTER: Duration = Duration::from_secs(80);

/// A live migration the engine took shows as under way in the daemon's
/// view of its engine within this long; a VM still idle here after it
/// (running, protected, not migrating) was not moved: the migration failed.
pub const MIGRATION_SHOWS_WITHIN: Duration = Duration::from_secs(5);

/// The pause after `failures` failed switchovers of one VM in a row.
pub fn retry_pause(failures: u32) -> Duration {
    RETRY_AFTER
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(RETRY_AT_MOST_AFTER)
}

/// The moves the driver asked of each VM, for the pause between tries.
/// A switchover's outcome is known when the request returns; a live
/// migration's request returns once the migration began (HTTP's 202), so
/// it counts as failed when the VM is later found here again, idle.
#[derive(Default)]
struct Attempts {
    /// When the last move of each VM failed, and how many failed in a row.
    failed: HashMap<String, (Instant, u32)>,
    /// Live migrations begun and not yet seen to end, since when.
    migrations: HashMap<String, Instant>,
}

impl Attempts {
    /// Whether a move of `name` may be asked at `now`. `idle_here`: the VM
    /// runs here, protected, with no migration under way.
    fn may_try(&mut self, name: &str, idle_here: bool, now: Instant) -> bool {
        if let Some(&begun) = self.migrations.get(name) {
            if !idle_here || now.duration_since(begun) < MIGRATION_SHOWS_WITHIN {
                return false;
            }
            self.migrations.remove(name);
            self.failed_at(name, now);
        }
        idle_here
            && self
                .failed
                .get(name)
                .is_none_or(|(at, failures)| now.duration_since(*at) >= retry_pause(*failures))
    }

    /// The move asked of `name` at `now` came to `outcome`: a switchover
    /// done, a live migration begun, or a refusal.
    fn asked(&mut self, name: &str, outcome: Result<Moved, ()>, now: Instant) {
        match outcome {
            Ok(Moved::SwitchedOver) => {
                self.failed.remove(name);
            }
            Ok(Moved::MigrationBegun) => {
                self.migrations.insert(name.to_string(), now);
            }
            Err(()) => self.failed_at(name, now),
        }
    }

    /// `name` runs elsewhere now: a migration begun has worked, and a
    /// later move of it starts afresh.
    fn left(&mut self, name: &str) {
        self.failed.remove(name);
        self.migrations.remove(name);
    }

    fn failed_at(&mut self, name: &str, now: Instant) {
        let failures = self.failed.get(name).map_or(0, |(_, n)| *n) + 1;
        self.failed.insert(name.to_string(), (now, failures));
    }

    /// Failures in a row of `name`'s moves.
    #[cfg(test)]
    fn failures(&self, name: &str) -> u32 {
        self.failed.get(name).map_or(0, |(_, n)| *n)
    }

    fn clear(&mut self) {
        self.failed.clear();
        self.migrations.clear();
    }
}

/// What a move that was not refused did.
enum Moved {
    SwitchedOver,
    MigrationBegun,
}

impl Manager {
    /// The maintenance record of `node` (a node of this pair).
    pub fn maintenance(&self, node: &str) -> Result<NodeRecord, ManagerError> {
        if !self.config().node_names().iter().any(|n| n == node) {
            return Err(ManagerError::NoSuchNode(node.to_string()));
        }
        Ok(self.store().node_record(node)?)
    }

    /// The other node of the pair.
    fn other_node(&self, node: &str) -> Option<String> {
        self.config().node_names().into_iter().find(|n| n != node)
    }

    /// Takes `node` out of service: its VMs switch over to the peer.
    /// Refused while the peer is down or in maintenance, and while an
    /// unprotected VM runs on `node` (it could move only by a reboot).
    pub fn enter_maintenance(&self, node: &str, who: &str) -> Result<NodeView, ManagerError> {
        let refuse = |why: String| Err(ManagerError::NoMaintenance(why));
        let record = self.maintenance(node)?;
        let Some(other) = self.other_node(node) else {
            return refuse(format!(
                "node {node} has no peer: its VMs have nowhere to go (ftd join)"
            ));
        };
        if record.maintenance.keeps_no_vm() {
            return refuse(format!(
                "node {node} is in maintenance already ({})",
                record.maintenance.as_str()
            ));
        }
        let theirs = self.store().node_record(&other)?;
        if theirs.maintenance != Maintenance::Off {
            return refuse(format!(
                "node {other} is in maintenance ({}): one node must stay in service to run \
                 the VMs",
                theirs.maintenance.as_str()
            ));
        }
        if !self.peer_connected() {
            let peer = self.other_node(self.node_name()).unwrap_or_default();
            return refuse(format!(
                "node {peer} is not reachable (the pair channel is down): maintenance needs \
                 both nodes up, {other} to take the VMs"
            ));
        }
        let stuck: Vec<String> = self
            .store()
            .vms()?
            .into_iter()
            .filter(|r| runs_on(r, node) && !r.definition.level.has_standby())
            .map(|r| {
                format!(
                    "{} (level {})",
                    r.definition.name,
                    r.definition.level.as_str()
                )
            })
            .collect();
        if !stuck.is_empty() {
            return refuse(format!(
                "VM(s) {} run on {node} and cannot move without a reboot (an FT VM \
                 switches over, an HA VM migrates, an unprotected one has no standby): stop \
                 them or protect them first",
                stuck.join(", ")
            ));
        }
        let moving: Vec<String> = self
            .store()
            .vms()?
            .into_iter()
            .filter(|r| runs_on(r, node))
            .map(|r| r.definition.name)
            .collect();
        self.set_maintenance_if(node, record.maintenance, Maintenance::Entering, Some(who))?
            .ok_or_else(|| changed_meanwhile(node))?;
        self.record(
            Severity::Info,
            false,
            "maintenance",
            None,
            &format!(
                "node {node} entering maintenance (asked by {who}): {}",
                if moving.is_empty() {
                    "no VM runs there".to_string()
                } else {
                    format!("VM(s) {} switch over to {other}", moving.join(", "))
                }
            ),
        );
        self.node(node)
    }

    /// Brings `node` back into service: its standbys start, and the VMs
    /// that prefer it return once protected. From `entering`, this calls
    /// the maintenance off (the VMs that moved come back the same way).
    pub fn exit_maintenance(&self, node: &str, who: &str) -> Result<NodeView, ManagerError> {
        let record = self.maintenance(node)?;
        match record.maintenance {
            Maintenance::Off => {
                return Err(ManagerError::NoMaintenance(format!(
                    "node {node} is not in maintenance"
                )))
            }
            Maintenance::Leaving => {
                return Err(ManagerError::NoMaintenance(format!(
                    "node {node} is leaving maintenance already"
                )))
            }
            Maintenance::Entering | Maintenance::On => {}
        }
        self.set_maintenance_if(node, record.maintenance, Maintenance::Leaving, Some(who))?
            .ok_or_else(|| changed_meanwhile(node))?;
        self.record(
            Severity::Info,
            false,
            "maintenance",
            None,
            &format!(
                "node {node} leaving maintenance (asked by {who}): its standbys start, and \
                 the VMs that prefer it return once protected"
            ),
        );
        self.node(node)
    }

    /// Moves `node` from `from` to `to` in one transaction; none when it
    /// is no longer `from` (a request changed it meanwhile).
    fn set_maintenance_if(
        &self,
        node: &str,
        from: Maintenance,
        to: Maintenance,
        who: Option<&str>,
    ) -> Result<Option<NodeRecord>, ManagerError> {
        let record = self.store().update_node_if(
            node,
            |n| n.maintenance == from,
            |n| {
                n.maintenance = to;
                if let Some(who) = who {
                    n.maintenance_by = Some(who.to_string());
                }
                n.maintenance_since_unix_ms = Some(unix_ms());
            },
        )?;
        if record.is_some() {
            self.touch();
        }
        Ok(record)
    }

    /// What the maintenance step of `node` still waits for, one line per
    /// VM (empty: the step is done).
    pub fn maintenance_waiting(
        &self,
        node: &str,
        state: Maintenance,
        records: &[VmRecord],
    ) -> Vec<String> {
        let other = self.other_node(node).unwrap_or_default();
        let running = records.iter().filter(|r| r.desired == Desired::Running);
        match state {
            Maintenance::Off | Maintenance::On => vec![],
            Maintenance::Entering => running
                .filter(|r| runs_on(r, node))
                .map(|r| {
                    let name = &r.definition.name;
                    if !r.definition.level.has_standby() {
                        return format!(
                            "VM {name} runs at level {}: it cannot move without a reboot \
                             (stop it, or protect it)",
                            r.definition.level.as_str()
                        );
                    }
                    let moves = if r.definition.level == Level::Ha {
                        "migrate"
                    } else {
                        "switch over"
                    };
                    let migrating = self
                        .runtime()
                        .get(name)
                        .and_then(|l| l.status)
                        .is_some_and(|s| s.migrating);
                    if migrating {
                        return format!("VM {name}: migrating to {other} (memory being copied)");
                    }
                    let view = self.view(r.clone());
                    match view.state {
                        VmState::Protected => format!("VM {name}: moving to {other}"),
                        state => format!(
                            "VM {name}: waiting until it is protected to {moves} to {other} \
                             (now {})",
                            state_name(state)
                        ),
                    }
                })
                .collect(),
            Maintenance::Leaving => running
                .filter(|r| r.definition.level.has_standby())
                .filter_map(|r| {
                    let name = &r.definition.name;
                    let view = self.view(r.clone());
                    if !protected_now(&view) {
                        return Some(format!(
                            "VM {name}: being protected again (now {})",
                            state_name(view.state)
                        ));
                    }
                    (r.definition.preferred_node == node && !runs_on(r, node))
                        .then(|| format!("VM {name}: switching back to {node}, its preferred node"))
                })
                .collect(),
        }
    }
}

/// A request that found the node's maintenance changed between its check
/// and its write (a step ended, or the other node's request arrived).
fn changed_meanwhile(node: &str) -> ManagerError {
    ManagerError::NoMaintenance(format!(
        "node {node}'s maintenance changed while this request was checked: ask again"
    ))
}

/// Whether the VM runs protected now: its state, and the engine of the
/// node the store names its primary is a primary that says so (not a
/// standby the role is still moving to).
fn protected_now(view: &VmView) -> bool {
    view.state == VmState::Protected
        && view.roles.iter().any(|r| {
            Some(r.node.as_str()) == view.primary_node.as_deref()
                && r.role == "primary"
                && r.state == "protected"
        })
}

/// Whether the record names `node` as the running VM's primary.
fn runs_on(record: &VmRecord, node: &str) -> bool {
    record.desired == Desired::Running && record.primary_node.as_deref() == Some(node)
}

fn state_name(state: VmState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{state:?}"))
}

/// Carries out the maintenance steps this node can do, for the life of
/// the daemon (returns at once when the node has no peer).
pub async fn run(manager: Manager) {
    let Some(peer) = manager.config().peer.as_ref().map(|p| p.name.clone()) else {
        return;
    };
    let mut driver = Driver {
        manager,
        peer,
        tried: Attempts::default(),
    };
    loop {
        if let Err(e) = driver.step().await {
            tracing::error!(error = %e, "maintenance: a step failed; trying again");
        }
        tokio::select! {
            _ = driver.manager.changed() => {}
            _ = tokio::time::sleep(STEP_EVERY) => {}
        }
    }
}

struct Driver {
    manager: Manager,
    peer: String,
    /// The moves asked of each VM (for the retry pause).
    tried: Attempts,
}

impl Driver {
    async fn step(&mut self) -> Result<(), ManagerError> {
        let me = self.manager.node_name().to_string();
        let peer = self.peer.clone();
        let mine = self.manager.store().node_record(&me)?;
        let theirs = self.manager.store().node_record(&peer)?;
        // Both nodes asked into maintenance at once (each request checked
        // the other before either record travelled): one must stay in
        // service. This one gives way if the peer is on already, or if
        // both are entering and its name sorts last.
        if mine.maintenance == Maintenance::Entering
            && (theirs.maintenance == Maintenance::On
                || (theirs.maintenance == Maintenance::Entering && me > peer))
        {
            if self
                .manager
                .set_maintenance_if(&me, Maintenance::Entering, Maintenance::Off, None)?
                .is_some()
            {
                self.manager.record(
                    Severity::Warning,
                    true,
                    "maintenance",
                    None,
                    &format!(
                        "node {me}'s maintenance is called off: node {peer} entered maintenance \
                         at the same time, and one node must stay in service to run the VMs"
                    ),
                );
            }
            return Ok(());
        }
        // No step moves VMs now: the next one starts with a clean slate of
        // failures.
        if mine.maintenance != Maintenance::Entering && theirs.maintenance != Maintenance::Leaving {
            self.tried.clear();
        }
        // This node is entering: its primaries switch over to the peer.
        if mine.maintenance == Maintenance::Entering {
            self.move_primaries(&mine, &peer, |_| true).await?;
        }
        // The peer is leaving: the VMs that prefer it switch back.
        if theirs.maintenance == Maintenance::Leaving {
            self.move_primaries(&theirs, &peer, |r| r.definition.preferred_node == peer)
                .await?;
        }
        // Only the node in maintenance ends its step: two nodes writing the
        // same record at once could undo a request made meanwhile.
        self.end_step(&mine)?;
        Ok(())
    }

    /// Switches over each protected FT VM (migrates each HA VM) this node runs (that `wanted`
    /// picks) to `to`; one at a time, each after its pause.
    async fn move_primaries(
        &mut self,
        asked: &NodeRecord,
        to: &str,
        wanted: impl Fn(&VmRecord) -> bool,
    ) -> Result<(), ManagerError> {
        let me = self.manager.node_name().to_string();
        for record in self.manager.store().vms()? {
            let name = record.definition.name.clone();
            if !runs_on(&record, &me) {
                // Moved (or never here): what was tried of it is over.
                self.tried.left(&name);
                continue;
            }
            if !record.definition.level.has_standby() || !wanted(&record) {
                continue;
            }
            let idle_here = self.manager.runtime().get(&name).is_some_and(|l| {
                l.role == Role::Primary
                    && l.state == FtState::Protected
                    && !l.status.as_ref().is_some_and(|s| s.migrating)
            });
            if !self.tried.may_try(&name, idle_here, Instant::now()) {
                continue;
            }
            let why = match asked.maintenance {
                Maintenance::Leaving => format!("node {} leaves maintenance", asked.name),
                _ => format!("node {} enters maintenance", asked.name),
            };
            let outcome = self.manager.move_to_peer(&name).await;
            let (move_name, moved) = match &outcome {
                Ok((_, true)) => ("live migration", Ok(Moved::MigrationBegun)),
                Ok((_, false)) => ("switchover", Ok(Moved::SwitchedOver)),
                Err(_) if record.definition.level == Level::Ha => ("live migration", Err(())),
                Err(_) => ("switchover", Err(())),
            };
            self.audit(
                asked,
                &format!("maintenance: {move_name} of VM {name} from {me} to {to} ({why})"),
                &outcome.map(|(view, _)| view),
            );
            self.tried.asked(&name, moved, Instant::now());
        }
        Ok(())
    }

    /// Ends the step of `node` when nothing is left to wait for.
    fn end_step(&mut self, node: &NodeRecord) -> Result<(), ManagerError> {
        let next = match node.maintenance {
            Maintenance::Entering => Maintenance::On,
            Maintenance::Leaving => Maintenance::Off,
            Maintenance::On | Maintenance::Off => return Ok(()),
        };
        let records = self.manager.store().vms()?;
        if !self
            .manager
            .maintenance_waiting(&node.name, node.maintenance, &records)
            .is_empty()
        {
            return Ok(());
        }
        // Only if no request changed it since it was read.
        if self
            .manager
            .set_maintenance_if(&node.name, node.maintenance, next, None)?
            .is_none()
        {
            return Ok(());
        }
        let other = self.manager.other_node(&node.name).unwrap_or_default();
        let by = node.maintenance_by.as_deref().unwrap_or("an operator");
        if next == Maintenance::On {
            let unprotected: Vec<String> = records
                .iter()
                .filter(|r| runs_on(r, &other) && r.definition.level.has_standby())
                .map(|r| r.definition.name.clone())
                .collect();
            self.manager.record(
                Severity::Warning,
                !unprotected.is_empty(),
                "maintenance",
                None,
                &format!(
                    "node {} is in maintenance (asked by {by}): no VM runs there; {}",
                    node.name,
                    if unprotected.is_empty() {
                        "it may be pulled or rebooted".to_string()
                    } else {
                        format!(
                            "VM(s) {} run unprotected on {other} until it leaves maintenance",
                            unprotected.join(", ")
                        )
                    }
                ),
            );
        } else {
            self.manager.record(
                Severity::Info,
                false,
                "maintenance",
                None,
                &format!(
                    "node {} is back in service (maintenance ended by {by}): every FT or HA VM \
                     protected, each on its preferred node where it can be",
                    node.name
                ),
            );
        }
        Ok(())
    }

    /// One step in the audit log, in the name of who asked for the
    /// maintenance.
    fn audit(&self, asked: &NodeRecord, action: &str, outcome: &Result<VmView, ManagerError>) {
        let who = format!(
            "ftd@{} for {}",
            self.manager.node_name(),
            asked.maintenance_by.as_deref().unwrap_or("an operator")
        );
        let (status, result) = match outcome {
            Ok(_) => (200, "ok".to_string()),
            Err(e) => (409, e.to_string()),
        };
        if let Err(e) = self
            .manager
            .store()
            .add_audit(&who, action, status, &result)
        {
            tracing::error!(error = %e, action, "cannot write the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VmState;
    use crate::supervisor::{LocalRole, Runtime};

    /// node-a's manager with VM vm1 running, its primary named node-a in
    /// the store, and `role`/`state` as node-a's engine reports.
    fn manager_with(dir: &std::path::Path, role: Role, state: FtState) -> Manager {
        let store = crate::fixtures::store_with_vm(dir);
        let config = crate::fixtures::pair_config();
        let runtime = Runtime::default();
        runtime.set(
            "vm1",
            Some(LocalRole {
                role,
                state,
                epoch: Some(7),
                message: None,
                status: None,
            }),
        );
        store
            .update_node("node-a", |n| n.maintenance = Maintenance::Leaving)
            .unwrap();
        Manager::new(config, dir, store, runtime)
    }

    #[test]
    fn a_role_still_moving_here_is_no_protection() {
        // The store names node-a the primary (a switchover back was
        // recorded) while its engine is still the standby: not protected,
        // so node-a's maintenance does not end yet.
        let dir = tempfile::tempdir().unwrap();
        let m = manager_with(dir.path(), Role::Standby, FtState::StandingBy);
        let records = m.store().vms().unwrap();
        let view = m.view(records[0].clone());
        assert_eq!(view.state, VmState::SwitchingOver);
        assert!(!protected_now(&view));
        assert_eq!(
            m.maintenance_waiting("node-a", Maintenance::Leaving, &records),
            vec!["VM vm1: being protected again (now switching-over)".to_string()]
        );
        // Once its engine is a protected primary, the step is done.
        let dir = tempfile::tempdir().unwrap();
        let m = manager_with(dir.path(), Role::Primary, FtState::Protected);
        let records = m.store().vms().unwrap();
        assert!(protected_now(&m.view(records[0].clone())));
        assert!(m
            .maintenance_waiting("node-a", Maintenance::Leaving, &records)
            .is_empty());
    }

    #[tokio::test]
    async fn of_two_nodes_entering_at_once_one_gives_way() {
        // node-a's view: node-b on maintenance already; node-a, entering,
        // calls its own maintenance off with an alert.
        let dir = tempfile::tempdir().unwrap();
        let m = manager_with(dir.path(), Role::Standby, FtState::StandingBy);
        m.store()
            .update_node("node-a", |n| n.maintenance = Maintenance::Entering)
            .unwrap();
        m.store()
            .update_node("node-b", |n| n.maintenance = Maintenance::On)
            .unwrap();
        let mut driver = Driver {
            manager: m.clone(),
            peer: "node-b".into(),
            tried: Attempts::default(),
        };
        driver.step().await.unwrap();
        assert_eq!(
            m.maintenance("node-a").unwrap().maintenance,
            Maintenance::Off
        );
        // Both entering: the node whose name sorts first goes on.
        m.store()
            .update_node("node-a", |n| n.maintenance = Maintenance::Entering)
            .unwrap();
        m.store()
            .update_node("node-b", |n| n.maintenance = Maintenance::Entering)
            .unwrap();
        driver.step().await.unwrap();
        assert_eq!(
            m.maintenance("node-a").unwrap().maintenance,
            Maintenance::Entering
        );
    }

    #[test]
    fn a_live_migration_that_leaves_the_vm_here_counts_as_failed() {
        let mut tried = Attempts::default();
        let t0 = Instant::now();
        assert!(tried.may_try("vm", true, t0));
        tried.asked("vm", Ok(Moved::MigrationBegun), t0);
        // Under way, or not yet shown as under way: not asked again.
        assert!(!tried.may_try("vm", false, t0 + Duration::from_secs(1)));
        assert!(!tried.may_try("vm", true, t0 + Duration::from_secs(1)));
        assert_eq!(tried.failures("vm"), 0);
        // Idle here once the migration had time to show: it failed, and
        // the next try waits for the pause.
        let t1 = t0 + MIGRATION_SHOWS_WITHIN;
        assert!(!tried.may_try("vm", true, t1));
        assert_eq!(tried.failures("vm"), 1);
        assert!(tried.may_try("vm", true, t1 + retry_pause(1)));
        // A second migration that comes to nothing doubles the pause.
        tried.asked("vm", Ok(Moved::MigrationBegun), t1 + retry_pause(1));
        let t2 = t1 + retry_pause(1) + MIGRATION_SHOWS_WITHIN;
        assert!(!tried.may_try("vm", true, t2));
        assert_eq!(tried.failures("vm"), 2);
        assert!(!tried.may_try("vm", true, t2 + retry_pause(1)));
        assert!(tried.may_try("vm", true, t2 + retry_pause(2)));
        // A switchover done clears the count; a refusal counts.
        tried.asked("vm", Ok(Moved::SwitchedOver), t2 + retry_pause(2));
        assert_eq!(tried.failures("vm"), 0);
        tried.asked("other", Err(()), t2);
        assert_eq!(tried.failures("other"), 1);
        assert!(!tried.may_try("other", true, t2));
        // Not idle here (not protected, or not here): never asked.
        assert!(!tried.may_try("third", false, t2));
        // A migration that worked (the VM left) leaves nothing behind: if
        // the VM comes back, it is tried at once.
        tried.asked("other", Ok(Moved::MigrationBegun), t2 + retry_pause(1));
        tried.left("other");
        assert_eq!(tried.failures("other"), 0);
        assert!(tried.may_try("other", true, t2 + retry_pause(1)));
    }

    #[test]
    fn a_vm_that_cannot_move_is_tried_less_and_less_often() {
        let pauses: Vec<u64> = (1..=7).map(|n| retry_pause(n).as_secs()).collect();
        assert_eq!(pauses, vec![5, 10, 20, 40, 80, 80, 80]);
        assert_eq!(retry_pause(u32::MAX), RETRY_AT_MOST_AFTER);
    }
}
