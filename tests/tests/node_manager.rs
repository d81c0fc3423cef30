//! The node manager (`ftd`) in the lab, driven through its API only: the
//! ledger VM protected by the daemons; the primary's checkpoint counter
//! advancing in `/metrics` (checked by `promtool`); a node pulled while
//! the other changes the definitions, and back: its store (definitions,
//! audit log) intact, the change received, the VM protected again with no
//! command from anyone; a daemon restarted while the VM runs: the engine
//! keeps running and is adopted.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ft_tests::LabPair;
use ftd_client::model::{AuditEntry, VmView};
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

fn checkpoints(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("ftvm_checkpoints_total{vm=\"ledger-vm\",role=\"primary\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
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
