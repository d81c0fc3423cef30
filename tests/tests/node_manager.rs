//! The node manager (`ftd`) in the lab, driven through its API only: the
//! ledger VM protected by the daemons; the primary's checkpoint counter
//! advancing in `/metrics` (checked by `promtool`); a node pulled while
//! the other changes the definitions, and back: its store (definitions,
//! audit log) intact, the change received, the VM protected again with no
//! command from anyone; a daemon restarted while the VM runs: the engine
//! keeps running and is adopted. Node maintenance: the VM moves off the
//! node and back with the client writing, a pull of the node in
//! maintenance changes nothing.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ft_tests::{Appender, LabPair};
use ftd_client::client::EventQuery;
use ftd_client::model::{AuditEntry, Event, NodeView, VmView};
use lab::ft_pair;
use lab::NodeId;
use replicator::status::{FtState, Role};

fn vm_named(lab: &LabPair, via: NodeId, name: &str) -> Option<VmView> {
    ft_pair::api(lab.lab(), via).ok()?.vm::<VmView>(name).ok()
}

/// Polls `via`'s view of `name` until `want` holds.
fn eventually(
    lab: &LabPair,
    via: NodeId,
    name: &str,
    what: &str,
    timeout: Duration,
    want: impl Fn(&VmView) -> bool,
) -> VmView {
    let start = Instant::now();
    let mut last = None;
    loop {
        let view = vm_named(lab, via, name);
        if let Some(v) = view.as_ref().filter(|v| want(v)) {
            return v.clone();
        }
        last = view.or(last);
        assert!(
            start.elapsed() < timeout,
            "{what}: node {via} shows {last:?}\n{}",
            ft_pair::log_tail(lab.lab(), via)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The ledger VM's primary's value of counter `name` (none: not there).
fn primary_counter(metrics: &str, name: &str) -> Option<u64> {
    let series = format!("{name}{{vm=\"ledger-vm\",role=\"primary\"}} ");
    metrics
        .lines()
        .find(|l| l.starts_with(&series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn checkpoints(metrics: &str) -> u64 {
    primary_counter(metrics, "ftvm_checkpoints_total").unwrap_or(0)
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/test.sh installs Debian's prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_daemons_keep_the_vm_protected_through_a_pull_and_a_restart() {
    let lab = LabPair::start("ftdmgr");
    let (a, b) = (NodeId::A, NodeId::B);
    ft_pair::protect(lab.lab(), a, Default::default()).expect("protected through the API");
    let api_a = ft_pair::api(lab.lab(), a).unwrap();
    let api_b = ft_pair::api(lab.lab(), b).unwrap();

    // Metrics: valid exposition, the checkpoint counter advances.
    let first = api_a.metrics().expect("metrics of a");
    promtool_check(&first);
    std::thread::sleep(Duration::from_secs(2));
    let second = api_a.metrics().expect("metrics of a");
    assert!(
        checkpoints(&second) > checkpoints(&first),
        "ftvm_checkpoints_total did not advance: {} -> {}",
        checkpoints(&first),
        checkpoints(&second)
    );
    assert!(
        second.contains(
            "ftvm_guest_stop_seconds_bucket{le=\"+Inf\",vm=\"ledger-vm\",role=\"primary\"}"
        ),
        "no guest stop histogram:\n{second}"
    );
    // Page deltas: counted, and a share of the dirty pages.
    let dirty = primary_counter(&second, "ftvm_dirty_pages_total").expect("dirty pages");
    let deltas = primary_counter(&second, "ftvm_delta_pages_total").expect("delta pages");
    let delta_bytes = primary_counter(&second, "ftvm_delta_bytes_total").expect("delta bytes");
    assert!(
        // A record: at most DELTA_MAX (1 KiB) of delta and its 10-byte header.
        deltas <= dirty && delta_bytes <= deltas * (1024 + 10),
        "{deltas} delta pages ({delta_bytes} bytes) of {dirty} dirty pages"
    );

    // A mutating request on b, for b's audit log.
    let spare = ft_pair::ledger_vm(lab.lab(), a, "unprotected", Default::default());
    let spare = ftd_client::model::VmCreate {
        name: "before-pull".into(),
        ..spare
    };
    api_b
        .create_vm::<VmView>(&spare)
        .expect("define a VM through b");
    let audit_before: Vec<AuditEntry> = api_b.audit(Some(100)).expect("b's audit");
    assert!(audit_before
        .iter()
        .any(|e| e.action == "POST /api/vms" && e.status == 201));
    // a has it before b goes away (the pair channel sends each change at
    // once; on a loaded host that can take a moment).
    eventually(
        &lab,
        a,
        "before-pull",
        "b's definition reaches a",
        Duration::from_secs(30),
        |_| true,
    );

    // b (the standby) is pulled; a changes the definitions meanwhile.
    lab.pull(b);
    eventually(
        &lab,
        a,
        "ledger-vm",
        "a unprotected",
        Duration::from_secs(60),
        |v| v.state == "unprotected",
    );
    api_a.delete_vm("before-pull").expect("delete through a");
    let during = ftd_client::model::VmCreate {
        name: "while-b-was-away".into(),
        ..ft_pair::ledger_vm(lab.lab(), a, "unprotected", Default::default())
    };
    api_a
        .create_vm::<VmView>(&during)
        .expect("define a VM through a");

    // b comes back: nobody tells it anything.
    let back = Instant::now();
    lab.lab().up(&[b]).expect("b back");
    let protected = eventually(
        &lab,
        b,
        "ledger-vm",
        "protected again by the daemons",
        Duration::from_secs(240),
        |v| v.state == "protected" && v.standby_node.as_deref() == Some("node-b"),
    );
    assert_eq!(protected.primary_node.as_deref(), Some("node-a"));
    eprintln!(
        "[e2e] node b back: the VM protected again {:.1} s after b's start, with no command",
        back.elapsed().as_secs_f64()
    );
    assert!(
        vm_named(&lab, b, "while-b-was-away").is_some(),
        "the change did not reach b"
    );
    assert!(
        vm_named(&lab, b, "before-pull").is_none(),
        "the delete did not reach b"
    );
    let audit_after: Vec<AuditEntry> = api_b.audit(Some(100)).expect("b's audit");
    for entry in &audit_before {
        assert!(audit_after.contains(entry), "b's audit lost {entry:?}");
    }

    // ftd on a restarts (killed; init starts it again): the engine keeps
    // running (same process) and is adopted.
    let engine_pid = lab.sh(a, "pidof ftprotect").trim().to_string();
    lab.sh(a, "kill $(pidof ftd)");
    let adopted = Instant::now();
    let view = eventually(
        &lab,
        a,
        "ledger-vm",
        "a's daemon back",
        Duration::from_secs(60),
        |v| v.state == "protected",
    );
    assert_eq!(view.primary_node.as_deref(), Some("node-a"));
    assert_eq!(
        lab.sh(a, "pidof ftprotect").trim(),
        engine_pid,
        "the engine was restarted"
    );
    // Adopted with a handle on that very process (a pidfd): it counts as
    // gone when it has ended, not when it is slow to answer.
    let log = lab.sh(
        a,
        "grep 'adopting a running VM role' /data/ftd/ftd.log | tail -n 1",
    );
    assert!(
        log.contains(&format!("pid=Some({engine_pid})")),
        "ftd did not name the adopted engine's process: {log:?}"
    );
    let status = ft_pair::wait_for(
        lab.lab(),
        a,
        Role::Primary,
        FtState::Protected,
        Duration::from_secs(30),
    )
    .expect("still protected");
    eprintln!(
        "[e2e] ftd on a restarted: engine pid {engine_pid} kept, adopted and shown protected after {:.1} s (epoch {})",
        adopted.elapsed().as_secs_f64(),
        status.epoch
    );
}

/// Polls `via`'s view of `node` until its maintenance is `target`, the
/// client writing all along; returns the node and how long it took.
fn follow_maintenance(
    lab: &LabPair,
    via: NodeId,
    node: &str,
    target: &str,
    writer: &mut Appender,
    timeout: Duration,
) -> (NodeView, Duration) {
    let start = Instant::now();
    let api = ft_pair::api(lab.lab(), via).unwrap();
    let mut last: Option<NodeView> = None;
    loop {
        writer.append_for(Duration::from_millis(250));
        if let Ok(view) = api.node::<NodeView>(node) {
            if last
                .as_ref()
                .is_none_or(|l| l.maintenance_waiting != view.maintenance_waiting)
            {
                eprintln!(
                    "[e2e] node {node}: maintenance {} {:?}",
                    view.maintenance, view.maintenance_waiting
                );
            }
            if view.maintenance == target {
                return (view, start.elapsed());
            }
            last = Some(view);
        }
        assert!(
            start.elapsed() < timeout,
            "node {node} not in maintenance {target} within {timeout:?}: {last:?}\n{}",
            ft_pair::log_tail(lab.lab(), via)
        );
    }
}

/// Node maintenance with the ledger client writing (issue 13): entering it
/// on the primary's node switches the VM over to the peer and leaves no
/// role on the node (the VM runs unprotected, an alert says so); pulling
/// the node then changes nothing for the VM; it boots again still in
/// maintenance and starts nothing; leaving maintenance protects the VM
/// again and switches it back to its preferred node. Nothing acknowledged
/// is lost, and the audit logs name every step with who asked.
#[test]
fn maintenance_moves_the_vm_off_a_node_and_back_and_loses_nothing() {
    let lab = LabPair::start("ftmaint");
    let (a, b) = (NodeId::A, NodeId::B);
    ft_pair::protect(lab.lab(), a, Default::default()).expect("protected through the API");
    ft_pair::wait_for(
        lab.lab(),
        b,
        Role::Standby,
        FtState::StandingBy,
        Duration::from_secs(60),
    )
    .expect("standby ready");
    let api_a = ft_pair::api(lab.lab(), a).unwrap();
    let api_b = ft_pair::api(lab.lab(), b).unwrap();
    let mut writer = Appender::new(lab.ledger_client());
    writer.append_for(Duration::from_secs(2));

    // Enter, asked of node b: the VM moves to b; a keeps no role.
    let asked: NodeView = api_b.enter_maintenance("node-a").expect("enter");
    assert_eq!(asked.maintenance, "entering", "{asked:?}");
    let (_, entering) = follow_maintenance(
        &lab,
        b,
        "node-a",
        "on",
        &mut writer,
        Duration::from_secs(120),
    );
    let moved = eventually(
        &lab,
        b,
        ft_pair::VM_NAME,
        "the VM runs on b",
        Duration::from_secs(30),
        |v| v.primary_node.as_deref() == Some("node-b") && v.state == "unprotected",
    );
    let gone = Instant::now();
    while ft_pair::status(lab.lab(), a).is_some() {
        writer.append_for(Duration::from_millis(250));
        assert!(
            gone.elapsed() < Duration::from_secs(30),
            "a role still runs on a in maintenance: {:?}",
            ft_pair::status(lab.lab(), a)
        );
    }
    let alerts: Vec<Event> = api_b
        .events(&EventQuery {
            alerts: true,
            limit: Some(1000),
            ..Default::default()
        })
        .expect("b's alerts");
    let alerts_a: Vec<Event> = api_a
        .events(&EventQuery {
            alerts: true,
            limit: Some(1000),
            ..Default::default()
        })
        .expect("a's alerts");
    assert!(
        alerts
            .iter()
            .chain(&alerts_a)
            .any(|e| e.kind == "maintenance"
                && e.message.contains("ledger-vm")
                && e.message.contains("unprotected")),
        "no alert says the VM runs unprotected: {alerts:?} {alerts_a:?}"
    );

    // Pull a: nothing happens to the VM.
    lab.pull(a);
    writer.append_for(Duration::from_secs(5));
    let after_pull = eventually(
        &lab,
        b,
        ft_pair::VM_NAME,
        "the VM runs on b",
        Duration::from_secs(10),
        |_| true,
    );
    assert_eq!(after_pull.primary_node.as_deref(), Some("node-b"));
    assert_eq!(
        after_pull.generation, moved.generation,
        "pulling a node in maintenance changed the VM's generation"
    );
    let promoted = ft_pair::status(lab.lab(), b).expect("b's engine");
    assert_eq!(
        (promoted.role, promoted.state),
        (Role::Primary, FtState::Unprotected),
        "{promoted:?}"
    );

    // a boots again still in maintenance: it starts no standby.
    lab.lab().up(&[a]).expect("a back");
    let back = Instant::now();
    loop {
        writer.append_for(Duration::from_millis(250));
        // Both nodes up as a sees them, and a still in maintenance.
        let seen = ft_pair::api(lab.lab(), a)
            .ok()
            .and_then(|api| api.nodes::<Vec<NodeView>>().ok());
        if seen.is_some_and(|nodes| {
            nodes.iter().all(|n| n.state == "up")
                && nodes
                    .iter()
                    .any(|n| n.name == "node-a" && n.maintenance == "on")
        }) {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(120),
            "a's daemon did not come back"
        );
    }
    writer.append_for(Duration::from_secs(3));
    assert!(
        ft_pair::status(lab.lab(), a).is_none(),
        "a node in maintenance started a role: {:?}",
        ft_pair::status(lab.lab(), a)
    );

    // Exit, asked of node a: the VM is protected again and returns to a.
    let api_a = ft_pair::api(lab.lab(), a).unwrap();
    let asked: NodeView = api_a.exit_maintenance("node-a").expect("exit");
    assert_eq!(asked.maintenance, "leaving", "{asked:?}");
    let (_, leaving) = follow_maintenance(
        &lab,
        a,
        "node-a",
        "off",
        &mut writer,
        Duration::from_secs(300),
    );
    let home = eventually(
        &lab,
        a,
        ft_pair::VM_NAME,
        "the VM protected on a",
        Duration::from_secs(10),
        |v| v.state == "protected",
    );
    assert_eq!(home.primary_node.as_deref(), Some("node-a"));
    assert_eq!(home.standby_node.as_deref(), Some("node-b"));
    writer.append_for(Duration::from_secs(2));
    writer.assert_nothing_lost();

    // The audit logs: the requests with who asked, each switchover done on
    // their behalf, each in the log of the node that took it, as that node
    // logged it (the peer's entries reach it too: ftd's pair tests).
    let audit_a: Vec<AuditEntry> = api_a.audit(Some(1000)).expect("a's audit");
    let audit_b: Vec<AuditEntry> = api_b.audit(Some(1000)).expect("b's audit");
    let has = |log: &[AuditEntry], node: &str, who: &str, action: &str| {
        log.iter().any(|e| {
            e.node == node && e.who.starts_with(who) && e.action.contains(action) && e.status < 300
        })
    };
    // Asked through b's API, and through a's.
    let enter = "POST /api/nodes/node-a/maintenance/enter";
    let exit = "POST /api/nodes/node-a/maintenance/exit";
    // Done by a, and by b, on the admin's behalf.
    let away = "switchover of VM ledger-vm from node-a to node-b";
    let back = "switchover of VM ledger-vm from node-b to node-a";
    assert!(has(&audit_b, "node-b", "admin@", enter), "{audit_b:?}");
    assert!(has(&audit_a, "node-a", "admin@", exit), "{audit_a:?}");
    assert!(
        has(&audit_a, "node-a", "ftd@node-a for admin@", away),
        "{audit_a:?}"
    );
    assert!(
        has(&audit_b, "node-b", "ftd@node-b for admin@", back),
        "{audit_b:?}"
    );
    eprintln!(
        "[e2e] maintenance of node-a: entered in {:.1} s, left (protected, back on a) in {:.1} s; {} operations, none lost",
        entering.as_secs_f64(),
        leaving.as_secs_f64(),
        writer.acked.len()
    );
}
