//! Fault tolerance in the lab, each invariant on its own, with the ledger
//! VM protected across the pair (primary a, standby b):
//! - output commit: while the standby is stopped (SIGSTOP: no
//!   acknowledgements, A-link silence below the heartbeat timeout), the
//!   primary keeps the guest's replies held: none reaches the client on the
//!   business network, the epoch does not advance; once the standby goes on,
//!   the reply arrives;
//! - a cut A-link is not a failover: the pair has a second path (the
//!   business network) on which the standby still hears the primary, so
//!   the standby does not promote, and the primary re-protects over it;
//! - a standby that dies (its node pulled) leaves the primary running,
//!   unprotected, saying so, with output released at once;
//! - drills: the primary is pulled and the standby takes over with every
//!   acknowledged ledger operation, in memory and on disk, over the same
//!   client TCP connection;
//! - partitions (every path between the nodes cut for 1-5 s, the witness
//!   on the outer host reachable by both, one or neither): one copy runs at
//!   a time, nothing acknowledged is lost, the other rejoins as the
//!   standby;
//! - the witness stopped and restarted while protected: an alert, no
//!   takeover, nothing lost;
//! - a standby whose disk hangs (its filesystem frozen) is dropped after
//!   the acknowledgement deadline: the VM serves on unprotected, and is
//!   protected again once the disk is back; no takeover, nothing lost;
//! - faults injected on the real, sealed A-link by `ftrelay` on the
//!   primary's node (a record rewritten with its CRCs recomputed, a record
//!   replayed, a reset, a stall): refused, no takeover, the primary starts
//!   over, nothing lost.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use ft_tests::{Appender, LabPair};
use lab::drill;
use lab::ft_pair;
use lab::NodeId;
use replicator::status::{FtState, Role, Status};

/// `node`'s FT status, asked on its control socket (None if none answers).
fn status(lab: &LabPair, node: NodeId) -> Option<Status> {
    ft_pair::status(lab.lab(), node)
}

#[test]
fn output_is_held_until_acknowledged_and_a_lost_standby_leaves_the_primary_unprotected() {
    let lab = LabPair::start("ftinv");
    // A long heartbeat timeout: a stopped standby is not declared dead
    // while the test watches the held output.
    let opts = ftd_client::model::FtOptions {
        heartbeat_timeout_ms: Some(10_000),
        ..Default::default()
    };
    ft_pair::protect(lab.lab(), NodeId::A, opts).expect("protected");
    ft_pair::wait_for(
        lab.lab(),
        NodeId::B,
        Role::Standby,
        FtState::StandingBy,
        Duration::from_secs(60),
    )
    .expect("standby ready");
    let mut client = lab.ledger_client();
    for id in 1..=5 {
        client.append(id).expect("append while protected");
    }

    // Hold the acknowledgements back: stop the standby process.
    lab.sh(NodeId::B, "kill -STOP $(pidof ftprotect)");
    // The API shows the engine's status as its daemon last polled it
    // (every 0.5 s): wait until two reads 0.6 s apart agree, so that
    // acknowledgements sent before the stop are counted.
    let epoch_at_stop = {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = status(&lab, NodeId::A).expect("status of a").epoch;
        loop {
            std::thread::sleep(Duration::from_millis(600));
            let now = status(&lab, NodeId::A).expect("status of a").epoch;
            if now == last {
                break now;
            }
            assert!(
                Instant::now() < deadline,
                "epochs kept committing with the standby stopped: {last} -> {now}"
            );
            last = now;
        }
    };
    let (tx, rx) = mpsc::channel();
    let appender = std::thread::spawn(move || {
        let result = client.append(6);
        let _ = tx.send((result.map_err(|e| e.to_string()), Instant::now()));
        client
    });
    // Watch the wire for 3 s: the reply must not arrive.
    assert!(
        rx.recv_timeout(Duration::from_secs(3)).is_err(),
        "a reply left the primary while its epoch was unacknowledged"
    );
    let held = status(&lab, NodeId::A).expect("status of a");
    let epoch_held = held.epoch;
    assert!(
        epoch_held <= epoch_at_stop + 1,
        "epochs committed without a standby: {epoch_at_stop} -> {epoch_held}"
    );
    assert_eq!(held.state, FtState::Protected, "{held:?}");
    let resumed_at = Instant::now();
    lab.sh(NodeId::B, "kill -CONT $(pidof ftprotect)");
    let (result, replied_at) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the reply once the standby acknowledges");
    assert_eq!(result, Ok(6), "append 6 after the standby went on");
    assert!(replied_at >= resumed_at);
    let mut client = appender.join().unwrap();
    let epoch = |s: &Option<Status>| s.as_ref().map_or(0, |s| s.epoch);
    let mut after = status(&lab, NodeId::A);
    let deadline = Instant::now() + Duration::from_secs(5);
    while epoch(&after) <= epoch_held && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = status(&lab, NodeId::A);
    }
    assert!(
        epoch(&after) > epoch_held,
        "{after:?}\nnode a:\n{}\nnode b:\n{}",
        ft_pair::log_tail(lab.lab(), NodeId::A),
        ft_pair::log_tail(lab.lab(), NodeId::B)
    );
    eprintln!(
        "[e2e] output commit: reply held {:.1} s while the standby was stopped, released {} ms after it went on",
        3.0,
        replied_at.duration_since(resumed_at).as_millis()
    );

    // A cut A-link: no takeover; protection resumes over the backup path.
    let cut_at = Instant::now();
    lab.lab()
        .set_link(lab::LinkId::Alink, false)
        .expect("cut the A-link");
    let biz_b = lab.lab().topo.biz_ip(NodeId::B).to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let reprotected = loop {
        let b = status(&lab, NodeId::B);
        assert_ne!(
            b.as_ref().map(|b| b.role),
            Some(Role::Primary),
            "the standby took over on a cut A-link: {b:?}"
        );
        let a = status(&lab, NodeId::A);
        if let Some(a) = a.as_ref().filter(|a| {
            a.state == FtState::Protected && a.peer.as_deref().is_some_and(|p| p.contains(&biz_b))
        }) {
            break a.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no re-protection over the backup path: {a:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    client.append(27).expect("append over a cut A-link");
    eprintln!(
        "[e2e] cut A-link: no takeover, protected again over the business network after {:.1} s \
         (heartbeat timeout 10 s): peer {}",
        cut_at.elapsed().as_secs_f64(),
        reprotected.peer.as_deref().unwrap_or("?")
    );
    lab.lab().set_link(lab::LinkId::Alink, true).expect("heal");

    // The standby dies: the primary goes on unprotected and says so.
    lab.pull(NodeId::B);
    let pulled_at = Instant::now();
    let unprotected = ft_pair::wait_for(
        lab.lab(),
        NodeId::A,
        Role::Primary,
        FtState::Unprotected,
        Duration::from_secs(60),
    )
    .expect("the primary notices");
    let message = unprotected.message.clone().unwrap_or_default();
    assert!(message.contains("standby lost"), "{unprotected:?}");
    let t = Instant::now();
    for id in 28..=47 {
        client
            .append(id)
            .expect("the VM keeps serving without its standby");
    }
    let per_op = t.elapsed() / 20;
    let ledger = client.dump().expect("dump");
    let expected: Vec<u64> = (1..=6).chain(27..=47).collect();
    assert_eq!(ledger, expected);
    eprintln!(
        "[e2e] standby lost: primary unprotected {:.1} s after the pull (heartbeat timeout 10 s), \
         ledger ops then {} ms each; message: {message}",
        pulled_at.elapsed().as_secs_f64(),
        per_op.as_millis()
    );
}

/// Pulls of the primary (issue 11 too): the pulled node comes back with
/// its written maps (they survived its power cut and its daemons'
/// restart) and is resynchronised by them, most of its disk not even read;
/// after the last round the replica so made equals the primary, memory and
/// disks (the consistency oracle).
#[test]
fn drills_lose_and_duplicate_nothing() {
    let count = count_from_env("FT_DRILLS", 3);
    let lab = LabPair::start_nodes("ftdrill", &[]);
    let report = drill_passes(&lab, count, drill::Fault::Pull);
    for r in &report.rounds {
        assert!(
            r.resync_disk_unread_bytes > 0,
            "round {}: the returning node was not resynchronised by the written maps: {r:?}",
            r.round
        );
    }
    let last = report.rounds.last().expect("a round");
    let verdict = replica_check(&lab, last.promoted, last.pulled);
    assert!(
        verdict.equal,
        "the replica resynchronised by the written maps differs from the primary: {verdict:?}"
    );
    eprintln!(
        "[drill] after {count} pulls: the replica on {} equals the primary on {} at epoch {} \
         (disk bytes not read by the last copy: {})",
        last.pulled, last.promoted, verdict.epoch, last.resync_disk_unread_bytes
    );
}

/// The consistency oracle once: `primary` digests its next checkpoint,
/// `standby` compares its replica with it; its verdict.
fn replica_check(lab: &LabPair, primary: NodeId, standby: NodeId) -> replicator::oracle::Verdict {
    let checked = |s: &Option<Status>| s.as_ref().map_or(0, |s| s.counters.oracle_checks);
    for attempt in 0..3 {
        let before = ft_pair::wait_for(
            lab.lab(),
            standby,
            Role::Standby,
            FtState::StandingBy,
            Duration::from_secs(300),
        )
        .unwrap_or_else(|e| panic!("no standby on {standby}: {e}"));
        let session = before.state_since_unix_ms;
        let done = before.counters.oracle_checks;
        drill::watch::ask_verify(lab.lab(), primary)
            .unwrap_or_else(|e| panic!("the primary on {primary} refused to verify: {e}"));
        let asked = Instant::now();
        while asked.elapsed() < Duration::from_secs(120) {
            let now = drill::watch::engine_status(lab.lab(), standby);
            if checked(&now) > done {
                return now
                    .and_then(|s| s.oracle)
                    .expect("a verdict with the count");
            }
            if now.is_some_and(|s| s.state_since_unix_ms != session) {
                eprintln!("[oracle] attempt {attempt}: the session started over; asking again");
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    panic!("no verdict from the standby on {standby} in 3 attempts");
}

/// Level HA (issue 11): the primary pulled while the client appends; the
/// survivor reboots the VM from its disk mirror, nothing acknowledged is
/// lost (the ledger fsyncs before it answers, and a write completes only
/// once both nodes have it), the rebooted guest's ext4 checks clean, and
/// the pulled node is resynchronised as the mirror.
#[test]
fn at_level_ha_a_pulled_primary_is_rebooted_on_the_survivor_with_nothing_lost() {
    let count = count_from_env("FT_HA_DRILLS", 2);
    let lab = LabPair::start_nodes("ftha", &[]);
    let path = lab.lab().topo.dir.join("drill-report.json");
    let report = drill::run_at(
        lab.lab(),
        count,
        drill::Fault::Pull,
        drill::Level::Ha,
        &path,
    )
    .unwrap_or_else(|e| panic!("drill: {e}"));
    drill::print_table(&report);
    assert_eq!(report.rounds.len(), count as usize);
    assert_eq!(report.lost_total, 0);
    assert_eq!(report.duplicated_total, 0);
    assert_eq!(report.two_active_total, 0, "two active copies were seen");
    assert!(report.connection_survived, "the client gave up");
    assert!(
        report.reconnects >= u64::from(count),
        "the VM was not rebooted each round (the client reconnected {} times)",
        report.reconnects
    );
    for r in &report.rounds {
        assert_eq!(r.fsck_clean, Some(true), "round {}: {r:?}", r.round);
        assert!(
            r.memory.ok() && r.disk.ok() && r.placed_ok,
            "round {}: {r:?}",
            r.round
        );
        assert!(
            r.resync_bytes > 0,
            "round {}: no resynchronisation: {r:?}",
            r.round
        );
        assert!(
            r.resync_disk_unread_bytes > 0,
            "round {}: the returning node was not resynchronised by the written maps: {r:?}",
            r.round
        );
    }
    assert!(report.passed);
}

/// How many rounds `var` asks for (`default` when unset or not a number).
fn count_from_env(var: &str, default: u32) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `count` drills of `fault` and checks the report: every round, the
/// one client connection, nothing lost or duplicated, one active copy.
fn drill_passes(lab: &LabPair, count: u32, fault: drill::Fault) -> drill::DrillReport {
    let path = lab.lab().topo.dir.join("drill-report.json");
    let report =
        drill::run(lab.lab(), count, fault, &path).unwrap_or_else(|e| panic!("drill: {e}"));
    drill::print_table(&report);
    assert_eq!(report.rounds.len(), count as usize);
    assert_eq!(report.two_active_total, 0, "two active copies were seen");
    assert!(report.connection_survived);
    assert_eq!(report.lost_total, 0);
    assert_eq!(report.duplicated_total, 0);
    for r in &report.rounds {
        assert!(
            r.memory.ok() && r.disk.ok() && r.placed_ok,
            "round {}: {r:?}",
            r.round
        );
        assert!(r.acked_before_check > 0);
        if matches!(fault, drill::Fault::Pull | drill::Fault::Switchover) {
            // The node that comes back (or steps down) holds no replica
            // today: protecting the VM again copies its memory.
            assert!(
                r.resync_bytes > 0,
                "round {}: no resynchronisation counted: {r:?}",
                r.round
            );
        }
    }
    assert!(report.passed);
    report
}

/// Planned switchovers through the API, a to b and back, while the client
/// writes: nothing lost or duplicated, one active copy, the old primary
/// protected again as the standby (issue 13).
/// The old primary's RAM file holds the final checkpoint, which the new
/// primary resumed: its memory is brought forward by what the new
/// primary's guest wrote since (not compared), and the oracle finds the
/// replica equal to the primary.
#[test]
fn switchovers_move_the_vm_and_lose_nothing() {
    let count = count_from_env("FT_SWITCHOVER_DRILLS", 2);
    let lab = LabPair::start_nodes("ftswitch", &[]);
    let report = drill_passes(&lab, count, drill::Fault::Switchover);
    replica_equal(&lab, &report, "switchover", true);
}

/// Partitions with the witness: the primary goes on, the standby keeps
/// its replica; when the paths heal its memory is brought forward from
/// its last checkpoint, and the oracle finds the replica equal.
#[test]
fn partitions_leave_one_active_copy_and_lose_nothing() {
    let count = count_from_env("FT_PARTITION_DRILLS", 2);
    let lab = LabPair::start_nodes("ftsplit", &[]);
    let report = drill_passes(&lab, count, drill::Fault::Partition);
    replica_equal(&lab, &report, "partition", true);
}

/// The last round's replica equals its primary; with `brought_forward`,
/// every round whose primary went on (no takeover: its standby kept the
/// replica it had), or handed the VM over at a switchover, brought the
/// standby's memory forward from its checkpoint (not compared page by
/// page). After a failover the old primary's memory is compared.
fn replica_equal(lab: &LabPair, report: &drill::DrillReport, what: &str, brought_forward: bool) {
    let kept = |r: &&drill::DrillRound| {
        r.resync_bytes > 0 && (r.promoted == r.pulled || r.fault == drill::RoundFault::Switchover)
    };
    for r in report
        .rounds
        .iter()
        .filter(kept)
        .filter(|_| brought_forward)
    {
        assert!(
            r.resync_memory_unread_bytes > 0,
            "{what} round {}: the standby's memory was compared, not brought forward: {r:?}",
            r.round
        );
    }
    // The primary after the last round, and its standby (the other node).
    let primary = report.rounds.last().expect("a round").promoted;
    let verdict = replica_check(lab, primary, primary.peer());
    assert!(
        verdict.equal,
        "{what}: the resynchronised replica differs from the primary: {verdict:?}"
    );
    eprintln!(
        "[{what}] the replica on {} equals the primary on {primary} at epoch {}",
        primary.peer(),
        verdict.epoch
    );
}

/// Issue 11: a running VM's protection level changes between ft and ha
/// without a reboot while the client writes over one connection: the
/// session at the old level ends cleanly (no takeover), a new one begins at
/// the new level, the connection survives and nothing is lost.
#[test]
fn a_running_vm_changes_level_between_ft_and_ha_without_a_reboot() {
    let lab = LabPair::start("ftlevel");
    let l = lab.lab();
    ft_pair::protect(l, NodeId::A, Default::default()).expect("protected at ft");
    let mut client = Appender::new(lab.ledger_client());
    client.append_for(Duration::from_secs(2));
    let api = ft_pair::api(l, NodeId::A).expect("api");
    for level in ["ha", "ft"] {
        let vm = api
            .protect_vm::<ftd_client::model::VmView>(ft_pair::VM_NAME, level)
            .expect("level change");
        assert_eq!(vm.level, level);
        let want = if level == "ha" {
            replicator::level::Level::Ha
        } else {
            replicator::level::Level::Ft
        };
        let start = Instant::now();
        loop {
            // The client keeps writing throughout.
            client.append_for(Duration::from_millis(300));
            let s = ft_pair::status(l, NodeId::A);
            if s.as_ref().is_some_and(|s| {
                s.level == want && s.state == FtState::Protected && s.counters.level_changes > 0
            }) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "never protected at level {level}: {s:?}"
            );
        }
        client.append_for(Duration::from_secs(1));
    }
    let a = ft_pair::status(l, NodeId::A).expect("a's engine");
    assert_eq!(a.counters.level_changes, 2, "{a:?}");
    assert_eq!(a.counters.failovers, 0, "{a:?}");
    let b = ft_pair::status(l, NodeId::B).expect("b's engine");
    assert_eq!(
        (b.role, b.state),
        (Role::Standby, FtState::StandingBy),
        "{b:?}"
    );
    // One connection throughout: the guest never rebooted.
    client.assert_nothing_lost();
    eprintln!(
        "[level] ft -> ha -> ft with {} operations acknowledged, none lost",
        client.acked.len()
    );
}

/// Issue 13: an HA VM moves to its standby by live migration while the
/// client writes over one connection: its engine goes to level FT (memory
/// copied while the guest runs), switches over after the first epoch, and
/// the new primary goes back to HA; nothing lost, and the connection
/// survives (the guest never rebooted).
#[test]
fn an_ha_vm_moves_to_its_standby_by_live_migration_without_a_reboot() {
    let lab = LabPair::start("ftmigrate");
    let l = lab.lab();
    ft_pair::protect_at(l, NodeId::A, "ha", Default::default()).expect("protected at ha");
    let mut client = Appender::new(lab.ledger_client());
    client.append_for(Duration::from_secs(2));
    let before = ft_pair::status(l, NodeId::A).expect("a's engine");
    let vm: ftd_client::model::VmView = ft_pair::api(l, NodeId::A)
        .expect("api")
        .switchover_vm(ft_pair::VM_NAME)
        .expect("live migration asked");
    assert_eq!(vm.level, "ha");
    let start = Instant::now();
    let mut seen_migrating = false;
    let mut seen_in_api = false;
    loop {
        // The client keeps writing throughout.
        client.append_for(Duration::from_millis(300));
        seen_migrating |= ft_pair::status(l, NodeId::A).is_some_and(|s| s.migrating);
        // The other node's API says so too (from the pair channel).
        seen_in_api |= ft_pair::vm(l, NodeId::B)
            .ok()
            .flatten()
            .is_some_and(|v| v.migrating);
        let b = ft_pair::status(l, NodeId::B);
        if b.as_ref().is_some_and(|b| {
            b.role == Role::Primary
                && b.level == replicator::level::Level::Ha
                && b.state == FtState::Protected
        }) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "b never ran the VM protected at ha: {b:?}\n{}",
            ft_pair::log_tail(l, NodeId::A)
        );
    }
    let took = start.elapsed();
    client.append_for(Duration::from_secs(1));
    assert!(seen_migrating, "a's engine never said it was migrating");
    assert!(seen_in_api, "b's API never showed the VM migrating");
    let b = ft_pair::status(l, NodeId::B).expect("b's engine");
    assert!(b.generation > before.generation, "b: {b:?}");
    assert_eq!(
        b.counters.failovers, 0,
        "a switchover, not a failover: {b:?}"
    );
    let a = ft_pair::wait_for(
        l,
        NodeId::A,
        Role::Standby,
        FtState::StandingBy,
        Duration::from_secs(120),
    )
    .expect("a is b's mirror");
    assert_eq!(a.level, replicator::level::Level::Ha, "{a:?}");
    let view = ft_pair::vm(l, NodeId::B).expect("api").expect("the VM");
    assert_eq!(view.primary_node, Some(ft_pair::node_name(NodeId::B)));
    // One connection throughout: the guest never rebooted.
    client.assert_nothing_lost();
    eprintln!(
        "[migrate] a -> b by live migration, back at ha in {} ms, with {} operations \
         acknowledged, none lost",
        took.as_millis(),
        client.acked.len()
    );
}

/// Issue 11: a pair without a witness, at level HA, partitioned so that
/// both copies run and write: node b (isolated: its A-link and business
/// network cut) boots the VM from its mirror and writes its disk, node a
/// goes on alone serving the client. When the paths heal, the divergence
/// is detected: node a's daemon raises the split-brain alert, the copy of
/// the newer generation (b's) wins by the policy, a's stops and becomes
/// the mirror again, resynchronised from b; nothing is merged.
#[test]
fn without_a_witness_both_copies_writing_in_a_partition_is_a_split_brain_alert() {
    use ftd_client::client::EventQuery;
    use ftd_client::model::Event;
    let lab = LabPair::start_configured("ftdiverge", &NodeId::ALL, |t| t.witness = false);
    let l = lab.lab();
    ft_pair::protect_at(l, NodeId::A, "ha", Default::default()).expect("protected at ha");
    let mut client = Appender::new(lab.ledger_client());
    client.append_for(Duration::from_secs(2));
    let b_checks_before = ft_pair::disk_checks(l, NodeId::B).len();
    // Isolate b: its standby hears nothing on any path and boots the VM.
    l.set_link(lab::topology::LinkId::Alink, false)
        .expect("cut the A-link");
    l.set_node_link(NodeId::B, lab::topology::LinkId::Biz, false)
        .expect("cut b's business network");
    let start = Instant::now();
    loop {
        // Its guest mounted the mirror (the journal written) and checked it.
        if ft_pair::disk_checks(l, NodeId::B).len() > b_checks_before {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "b never booted the VM from its mirror: {:?}",
            drill::watch::engine_status(l, NodeId::B)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Meanwhile a serves the client alone: its disk is written too.
    client.append_for(Duration::from_secs(2));
    let a = drill::watch::engine_status(l, NodeId::A).expect("a's engine");
    assert_eq!(
        (a.role, a.state),
        (Role::Primary, FtState::Unprotected),
        "{a:?}"
    );
    let b = drill::watch::engine_status(l, NodeId::B).expect("b's engine");
    assert_eq!(b.role, Role::Primary, "{b:?}");
    assert!(b.generation > a.generation, "a: {a:?}\nb: {b:?}");
    drop(client);
    let last_id = ft_pair::api(l, NodeId::A)
        .expect("api")
        .events::<Vec<Event>>(&EventQuery {
            limit: Some(1),
            ..Default::default()
        })
        .expect("events")
        .first()
        .map_or(0, |e| e.id);
    // Heal: the daemons hear each other again.
    l.set_node_link(NodeId::B, lab::topology::LinkId::Biz, true)
        .expect("heal b's business network");
    l.set_link(lab::topology::LinkId::Alink, true)
        .expect("heal the A-link");
    let alert = (|| {
        let start = Instant::now();
        loop {
            let events = ft_pair::api(l, NodeId::A)
                .ok()
                .and_then(|api| {
                    api.events::<Vec<Event>>(&EventQuery {
                        alerts: true,
                        after: Some(last_id),
                        limit: Some(1000),
                        ..Default::default()
                    })
                    .ok()
                })
                .unwrap_or_default();
            if let Some(e) = events
                .into_iter()
                .find(|e| e.message.contains("split brain"))
            {
                return e;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no split-brain alert on a; a: {:?}",
                drill::watch::engine_status(l, NodeId::A)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    })();
    assert_eq!(alert.severity, "critical", "{alert:?}");
    assert!(
        alert.message.contains("node node-b took it over")
            && alert.message.contains("level ha")
            && alert.message.contains("discarded, not merged"),
        "{alert:?}"
    );
    // The policy's winner goes on; a becomes its mirror again.
    ft_pair::wait_for(
        l,
        NodeId::B,
        Role::Primary,
        FtState::Protected,
        Duration::from_secs(240),
    )
    .expect("b protected by a's new mirror");
    let a = drill::watch::engine_status(l, NodeId::A).expect("a's engine");
    assert_eq!(
        (a.role, a.state),
        (Role::Standby, FtState::StandingBy),
        "{a:?}"
    );
    eprintln!("[split] {}", alert.message);
}

/// The pair's latest 100 alerts, as `api` gives them.
fn latest_alerts(api: &ftd_client::client::ApiClient) -> Vec<ftd_client::model::Event> {
    api.events(&ftd_client::client::EventQuery {
        alerts: true,
        limit: Some(100),
        ..Default::default()
    })
    .expect("events")
}

/// The ledger VM protected (primary a, standby b standing by); a's API,
/// the VM as it is then, and a ledger client that appended for 2 s.
fn protected_and_writing(
    lab: &LabPair,
    ft: ftd_client::model::FtOptions,
) -> (
    ftd_client::client::ApiClient,
    ftd_client::model::VmView,
    Appender,
) {
    ft_pair::protect(lab.lab(), NodeId::A, ft).expect("protected");
    ft_pair::wait_for(
        lab.lab(),
        NodeId::B,
        Role::Standby,
        FtState::StandingBy,
        Duration::from_secs(60),
    )
    .expect("standby ready");
    let api = ft_pair::api(lab.lab(), NodeId::A).expect("api");
    let before = api.vm(ft_pair::VM_NAME).expect("vm");
    let mut writer = Appender::new(lab.ledger_client());
    writer.append_for(Duration::from_secs(2));
    (api, before, writer)
}

#[test]
fn a_witness_restart_while_protected_is_no_takeover_and_loses_nothing() {
    use ftd_client::model::{Event, VmView};
    let lab = LabPair::start("ftwit");
    let (api, before, mut writer) = protected_and_writing(&lab, Default::default());
    assert!(lab.lab().stop_witness(), "the lab's witness ran");
    // The daemons notice within their 5 s watch and say what it means.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        writer.append_for(Duration::from_millis(500));
        let alerts: Vec<Event> = latest_alerts(&api);
        // a's own (b's reach a's log too).
        if alerts
            .iter()
            .any(|e| e.node == "node-a" && e.message.contains("a node lost now is not taken over"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no alert for the lost witness: {alerts:?}"
        );
    }
    lab.lab().start_witness().expect("witness back");
    writer.append_for(Duration::from_secs(4));
    let after: VmView = api.vm(ft_pair::VM_NAME).expect("vm");
    assert_eq!(
        after.generation, before.generation,
        "a takeover happened: {after:?}"
    );
    assert_eq!(after.primary_node.as_deref(), Some("node-a"));
    let a = status(&lab, NodeId::A).expect("a");
    assert_eq!(
        (a.role, a.state),
        (Role::Primary, FtState::Protected),
        "{a:?}"
    );
    let b = status(&lab, NodeId::B).expect("b");
    assert_eq!(b.counters.failovers, 0, "{b:?}");
    writer.assert_nothing_lost();
    eprintln!(
        "[e2e] witness stopped and restarted while protected: no takeover (generation {}), {} operations, none lost",
        after.generation,
        writer.acked.len()
    );
}

/// A standby whose disk hangs (its filesystem frozen: every write to the
/// replica, and to its log, waits) still answers heartbeats, so it is not
/// lost; before, the primary waited for it without end, its guest paused
/// by the throttle (a ledger operation took as long as the disk hung). Now
/// the primary drops it once an epoch waited past the acknowledgement
/// deadline (5 s) and the VM goes on serving, unprotected, with an alert;
/// once the disk is back the standby takes a new session by itself. No
/// takeover, nothing lost.
#[test]
fn a_standby_whose_disk_hangs_is_dropped_and_the_vm_goes_on_serving() {
    use ftd_client::model::{Event, VmView};
    let lab = LabPair::start("fthang");
    // The VM's own deadline, shorter than the default 5 s.
    let ft = ftd_client::model::FtOptions {
        ack_deadline_ms: Some(3000),
        ..Default::default()
    };
    let (api, before, mut writer) = protected_and_writing(&lab, ft);
    assert_eq!(
        before.definition.ft.ack_deadline_ms,
        Some(3000),
        "{before:?}"
    );
    // ... and it reached the engine.
    let started = lab.sh(
        NodeId::A,
        "grep -c '\"--ack-deadline-ms\" \"3000\"' /data/ftd/ftd.log || true",
    );
    assert_ne!(
        started.trim(),
        "0",
        "the engine was not given the VM's deadline"
    );
    let drops_before = status(&lab, NodeId::A).expect("a").counters.standby_drops;

    lab.sh(NodeId::B, "fsfreeze --freeze /data");
    let frozen = Instant::now();
    let deadline = frozen + Duration::from_secs(60);
    // The longest a half-second run of appends took: an operation held
    // for the hung standby would stretch it to the whole freeze.
    let mut longest = Duration::ZERO;
    let dropped = loop {
        let run = Instant::now();
        writer.append_for(Duration::from_millis(500));
        longest = longest.max(run.elapsed());
        let a = status(&lab, NodeId::A).expect("a");
        if a.counters.standby_drops > drops_before {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "the primary did not drop the hung standby: {a:?}"
        );
    };
    let dropped_after = frozen.elapsed();
    if dropped.state == FtState::Protected {
        let log = lab.sh(
            NodeId::A,
            "tail -n 40 /data/ftd/vms/ledger-vm/ftprotect.log",
        );
        panic!("a dropped standby, and the VM still shown protected: {dropped:?}\n{log}");
    }
    let acked_then = writer.acked.len();
    writer.append_for(Duration::from_secs(3));
    assert!(
        writer.acked.len() > acked_then,
        "no operation acknowledged while the standby's disk hung"
    );
    // The reason, in the engine's log and in an alert (the primary has
    // gone on to look for a standby meanwhile).
    let log = lab.sh(
        NodeId::A,
        "grep -E 'did not acknowledge epoch|stopped reading the A-link' /data/ftd/vms/ledger-vm/ftprotect.log || true",
    );
    assert!(log.contains("standby lost"), "{log:?}");
    let alerts: Vec<Event> = latest_alerts(&api);
    assert!(
        alerts.iter().any(|e| e
            .message
            .contains("did not take or acknowledge what it was sent in time")),
        "no alert for the dropped standby: {alerts:?}"
    );

    // Bounded by the deadline (3 s) and the witness's confirmation, far
    // below the freeze this loop would otherwise wait out (60 s).
    assert!(
        longest < Duration::from_secs(30),
        "operations waited {longest:?} for the hung standby"
    );
    lab.sh(NodeId::B, "fsfreeze --unfreeze /data");
    let thawed = Instant::now();
    ft_pair::wait_for(
        lab.lab(),
        NodeId::A,
        Role::Primary,
        FtState::Protected,
        Duration::from_secs(120),
    )
    .expect("protected again by itself");
    let protected_after = thawed.elapsed();
    writer.append_for(Duration::from_secs(2));
    // No takeover: a went on (at a new generation, which the witness
    // gave when it confirmed a alone), b is its standby again.
    let after: VmView = api.vm(ft_pair::VM_NAME).expect("vm");
    assert_eq!(after.primary_node.as_deref(), Some("node-a"), "{after:?}");
    assert!(after.generation >= before.generation, "{after:?}");
    let b = status(&lab, NodeId::B).expect("b");
    assert_eq!((b.role, b.counters.failovers), (Role::Standby, 0), "{b:?}");
    // How the standby's dropped session ended (told by `Release`, or by
    // the primary's next session, or by the closed link while the
    // primary was heard on the backup path): for the record; the property
    // is the one above, no takeover.
    let said = lab.sh(
        NodeId::B,
        "grep -E 'ended without a takeover|active path lost|began a new session' /data/ftd/vms/ledger-vm/ftprotect.log | tail -n 1 || true",
    );
    writer.assert_nothing_lost();
    eprintln!(
        "[e2e] standby's disk hung: dropped {:.1} s after the freeze (deadline 3 s), the VM served on unprotected (operations waited {:.1} s at most); protected again {:.1} s after the thaw; {} operations, none lost, no takeover; the standby: {}",
        dropped_after.as_secs_f64(),
        longest.as_secs_f64(),
        protected_after.as_secs_f64(),
        writer.acked.len(),
        said.trim()
    );
}

/// A cut of every path between the nodes, the witness's too, fences the
/// primary (guest paused, output held). When it heals, the standby and the
/// witness come back together: the output held for the lost session
/// leaves on the witness's confirmation, not after the new session's copy.
/// Which of the two the fenced primary hears first depends on where its
/// loop is at the heal; when the standby answered first, the output
/// waited for the whole resynchronisation (a partition drill's client
/// waited 18.6 s); now the primary asks the witness again then. This run
/// covers whichever order comes.
#[test]
fn when_a_cut_of_every_path_heals_the_held_output_leaves_before_the_resynchronisation() {
    use lab::topology::LinkId;
    let lab = LabPair::start("ftcutall");
    let (_api, _, mut writer) = protected_and_writing(&lab, Default::default());
    let before = drill::watch::engine_status(lab.lab(), NodeId::A).expect("a");
    let cut = |up: bool| {
        lab.lab().set_link(LinkId::Alink, up).expect("A-link");
        lab.lab()
            .set_link(LinkId::Biz, up)
            .expect("business network");
    };
    // The cut lasts 6 s (no node's status can be read meanwhile: the lab
    // agents answer on the business network); a's log says below that it
    // was fenced (lost standby 0.2 s in, the witness's answer missed 2-3 s
    // in).
    cut(false);
    std::thread::sleep(Duration::from_secs(6));
    cut(true);
    let healed = Instant::now();
    // An operation asked as the cut heals (not during it: the client's
    // own retransmission timer, backed off over the cut, would decide
    // when it is answered).
    let (answered_tx, answered) = mpsc::channel();
    let asking = std::thread::spawn(move || {
        let result = writer.try_append();
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let _ = answered_tx.send((Instant::now(), unix_ms));
        (writer, result)
    });
    let (answered_at, answered_unix_ms) = answered
        .recv_timeout(Duration::from_secs(120))
        .expect("the operation was answered");
    // The engine's own word (the API shows what ftd last polled).
    let when_answered = drill::watch::engine_status(lab.lab(), NodeId::A).expect("a");
    let (mut writer, result) = asking.join().expect("the client thread");
    result.expect("the operation asked during the cut");
    ft_pair::wait_for(
        lab.lab(),
        NodeId::A,
        Role::Primary,
        FtState::Protected,
        Duration::from_secs(120),
    )
    .expect("protected again");
    let protected_after = healed.elapsed();
    let fenced = lab.sh(
        NodeId::A,
        "grep -c 'state=fenced' /data/ftd/vms/ledger-vm/ftprotect.log || true",
    );
    assert_ne!(fenced.trim(), "0", "the cut did not fence a");
    let log = lab.sh(
        NodeId::A,
        "grep -v 'falls behind\\|keeps up' /data/ftd/vms/ledger-vm/ftprotect.log | tail -n 30",
    );
    assert_ne!(
        when_answered.state,
        FtState::Protected,
        "the held output waited for the new session: {when_answered:?}\n{log}"
    );
    assert!(
        when_answered.generation > before.generation,
        "the witness confirmed a new generation: answered {:?} after the heal (at {answered_unix_ms} ms unix): {when_answered:?}\n{log}",
        answered_at.saturating_duration_since(healed)
    );
    writer.append_for(Duration::from_secs(2));
    writer.assert_nothing_lost();
    let b = status(&lab, NodeId::B).expect("b");
    assert_eq!((b.role, b.counters.failovers), (Role::Standby, 0), "{b:?}");
    eprintln!(
        "[e2e] cut of every path healed: the held operation answered {:.1} s after the heal (state then {}), protected again {:.1} s after it; {} operations, none lost, no takeover",
        answered_at.saturating_duration_since(healed).as_secs_f64(),
        when_answered.state,
        protected_after.as_secs_f64(),
        writer.acked.len(),
    );
}

/// The consistency oracle (issue 9): with the guest dirtying memory and
/// writing its disk from boot on (so during the initial synchronisation
/// and during epochs), at each checked checkpoint the replica's memory and
/// disk equal the primary's byte for byte (CRC32 per MiB, digested by the
/// primary with the guest paused, by the standby right after applying the
/// epoch). `FT_ORACLE_CHECKS` checks in a row (default 10; the issue's
/// figure is 50).
#[test]
fn the_replica_equals_the_primary_at_checked_checkpoints_under_memory_and_disk_load() {
    let checks = count_from_env("FT_ORACLE_CHECKS", 10);
    let lab = LabPair::start("ftoracle");
    let load = ft_pair::LedgerLoad {
        vcpus: None,
        also: Some(
            "/bin/ft-dirtier,rate,--mib,32,--pages-per-sec,2000,--seconds,100000,\
             --disk-file,/data/churn,--disk-file-mib,4,--disk-blocks-per-sec,100"
                .into(),
        ),
    };
    ft_pair::define_and_start_with(lab.lab(), NodeId::A, "ft", Default::default(), &load)
        .expect("ledger VM started");
    ft_pair::wait_for(
        lab.lab(),
        NodeId::A,
        Role::Primary,
        FtState::Protected,
        Duration::from_secs(300),
    )
    .expect("protected");
    // The lab nodes' kvm_amd (Linux 6.1) has manual dirty protect, and the
    // ledger VM is small: its dirty pages come from KVM's bitmap, hot
    // pages left writable. The checks below are of that path: a hot page
    // goes with every epoch, written or not, until it is protected again.
    let primary = drill::watch::engine_status(lab.lab(), NodeId::A).expect("a's status");
    assert_eq!(
        primary.dirty_tracking.as_deref(),
        Some("bitmap"),
        "the primary does not take dirty pages from KVM's bitmap: {primary:?}"
    );
    // The guest's init starts the dirtier just before the ledger: once the
    // ledger serves, memory and disk are being written. A guest booting
    // under checkpoints on a slow host can take longer than all the
    // checks (seen in CI: no disk write fell in any checked epoch).
    drop(lab.ledger_client());
    let checked = |s: &Option<Status>| s.as_ref().map_or(0, |s| s.counters.oracle_checks);
    // Both engines' logs without the per-epoch lines, for a failure.
    let logs = || {
        NodeId::ALL
            .map(|n| {
                let out = lab.lab().exec(
                    n,
                    &[
                        "sh",
                        "-c",
                        "grep -v 'epoch committed' /data/ftd/vms/ledger-vm/ftprotect.log | tail -n 30",
                    ],
                    Duration::from_secs(10),
                );
                format!("--- node {n}:\n{}", out.map(|o| o.stdout).unwrap_or_default())
            })
            .join("\n")
    };
    let mut done = checked(&drill::watch::engine_status(lab.lab(), NodeId::B));
    let mut epochs = Vec::new();
    let mut digest_ms = Vec::new();
    // A session that starts over (a false silence on a loaded host) loses
    // the check in flight: it is asked again once protected, and counted.
    let mut restarts = 0;
    while epochs.len() < checks as usize {
        let i = epochs.len();
        let standby = ft_pair::wait_for(
            lab.lab(),
            NodeId::B,
            Role::Standby,
            FtState::StandingBy,
            Duration::from_secs(300),
        )
        .unwrap_or_else(|e| panic!("check {i}: no standby: {e}\n{}", logs()));
        let session = standby.state_since_unix_ms;
        drill::watch::ask_verify(lab.lab(), NodeId::A).unwrap_or_else(|e| {
            panic!("check {i}: the primary refused to verify: {e}\n{}", logs())
        });
        let asked = Instant::now();
        let verdict = loop {
            let standby = drill::watch::engine_status(lab.lab(), NodeId::B);
            done = done.min(checked(&standby));
            if checked(&standby) > done {
                done = checked(&standby);
                break standby.and_then(|s| s.oracle);
            }
            if standby
                .as_ref()
                .is_some_and(|s| s.state_since_unix_ms != session)
            {
                restarts += 1;
                eprintln!("[oracle] check {i}: the session started over; asking again");
                break None;
            }
            assert!(
                asked.elapsed() < Duration::from_secs(120),
                "check {i}: no verdict within 120 s; standby: {standby:?}\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let Some(verdict) = verdict else { continue };
        assert!(
            verdict.equal,
            "check {i}: the replica differs from the primary at epoch {}: {verdict:?}\n{}",
            verdict.epoch,
            logs()
        );
        epochs.push(verdict.epoch);
        digest_ms.push(verdict.digest_ms);
    }
    let standby = drill::watch::engine_status(lab.lab(), NodeId::B).expect("standby status");
    assert_eq!(standby.counters.oracle_mismatches, 0);
    // Between the checks, every epoch's page audit: each one matched (a
    // mismatch refuses its epoch and ends the session).
    assert!(
        standby.counters.audit_pages_total > 0,
        "the standby checked no audited page: {:?}",
        standby.counters
    );
    assert_eq!(
        standby.counters.audit_mismatches,
        0,
        "the page audit found the replica drifted\n{}",
        logs()
    );
    let primary = status(&lab, NodeId::A).expect("primary status");
    if primary.counters.disk_writes_total == 0 {
        let console = ft_pair::guest_console(lab.lab(), NodeId::A, 40);
        panic!(
            "the guest wrote no disk block during epochs; primary {primary:?}\nits console:\n{console}\n{}",
            logs()
        );
    }
    // The dirtier changes one byte of each page it writes: once a page
    // went whole, the next epochs send it as a delta from the replica's
    // version, which the checks above found right.
    let c = &primary.counters;
    assert!(
        c.delta_pages_total > 0,
        "no page went as a delta in {} dirty pages: {c:?}",
        c.dirty_pages_total
    );
    // Likewise the VM's state: the standby rebuilt it from the epoch
    // before's, and checked the result's CRC.
    assert!(
        c.state_deltas_total > 0,
        "no state went as a delta in {} checkpoints: {c:?}",
        c.checkpoints
    );
    // The dirtier rewrites its pages at every epoch: they went hot, left
    // writable between the checks that found the replica equal.
    assert!(
        c.hot_pages_total > 0,
        "no dirty page was left writable (hot) in {} dirty pages: {c:?}",
        c.dirty_pages_total
    );
    eprintln!(
        "[oracle] {checks} checks in a row, all equal, at epochs {epochs:?} ({restarts} sessions \
         started over meanwhile); standby digest {:?} ms; disk writes in epochs {}; \
         {} of {} dirty pages as deltas ({} bytes), {} hot; {} of {} states as deltas; {} pages \
         audited by the standby",
        digest_ms,
        c.disk_writes_total,
        c.delta_pages_total,
        c.dirty_pages_total,
        c.delta_bytes_total,
        c.hot_pages_total,
        c.state_deltas_total,
        c.checkpoints,
        standby.counters.audit_pages_total
    );
}

/// Issue 9: a standby pulled while a 2-vCPU guest runs the memory dirtier
/// (the load that starved heartbeats before pulses): the primary says
/// "unprotected" and the guest's output flows. How long it took is printed
/// (the engine's own state-change time against the pull: the lab node's
/// clock is the host's, through kvmclock), with the
/// heartbeat timeout beside it; the issue's goal is at most twice that.
#[test]
fn a_standby_pulled_under_a_busy_two_vcpu_guest_leaves_the_primary_serving() {
    let lab = LabPair::start("ftbusy");
    let load = ft_pair::LedgerLoad {
        vcpus: Some(2),
        also: Some("/bin/ft-dirtier,rate,--mib,64,--pages-per-sec,20000,--seconds,100000".into()),
    };
    ft_pair::define_and_start_with(lab.lab(), NodeId::A, "ft", Default::default(), &load)
        .expect("ledger VM started");
    for (node, role, state) in [
        (NodeId::A, Role::Primary, FtState::Protected),
        (NodeId::B, Role::Standby, FtState::StandingBy),
    ] {
        ft_pair::wait_for(lab.lab(), node, role, state, Duration::from_secs(600))
            .expect("protected under load");
    }
    // Not serving within 180 s: the harness's panic ends with both
    // engines' state and the guest's console.
    let mut client = lab.ledger_client();
    for id in 1..=5 {
        if let Err(e) = client.append(id) {
            // Is the ledger down, or only this connection broken? (Seen
            // with epochs of several seconds: see the note of 2026-11-30.)
            let again = guest_tools::ledger::LedgerClient::connect(
                ft_pair::ledger_addr(lab.lab()),
                Duration::from_secs(30),
            )
            .and_then(|mut c| c.append(1000 + id));
            panic!(
                "append {id} while protected (from {:?}): {e}; a new connection then: {again:?}\n\
                 a: {:?}\n--- a:\n{}\n--- b:\n{}\n--- a's guest console:\n{}",
                client.local_addr(),
                status(&lab, NodeId::A),
                ft_pair::log_tail(lab.lab(), NodeId::A),
                ft_pair::log_tail(lab.lab(), NodeId::B),
                lab.sh(
                    NodeId::A,
                    "sleep 5; tail -n 40 /data/ftd/vms/ledger-vm/console.log"
                )
            );
        }
    }
    let pulled_at = Instant::now();
    lab.pull(NodeId::B);
    let unprotected = loop {
        let a = drill::watch::engine_status(lab.lab(), NodeId::A);
        if let Some(a) = a.as_ref().filter(|a| a.state == FtState::Unprotected) {
            break a.clone();
        }
        assert!(
            pulled_at.elapsed() < Duration::from_secs(60),
            "the primary never said unprotected: {a:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let seen_ms = pulled_at.elapsed().as_millis();
    assert_eq!(unprotected.role, Role::Primary);
    assert!(
        unprotected
            .message
            .as_deref()
            .is_some_and(|m| m.contains("standby lost")),
        "{unprotected:?}"
    );
    // Judged by the silence (the acknowledgement reader's verdict, heard
    // while the epoch is being sent), not by a send that stalls on the
    // dead peer four heartbeat timeouts later (issue 9, defect 2: the
    // verdict used to wait in its channel while the epoch loop was blocked
    // in the send; the message then said "the peer is not reading").
    assert!(
        unprotected
            .message
            .as_deref()
            .is_some_and(|m| m.contains("the peer is silent")),
        "the loss of the standby was not judged by its silence: {unprotected:?}"
    );
    let t = Instant::now();
    for id in 6..=25 {
        client.append(id).expect("output flows without the standby");
    }
    let per_op = t.elapsed() / 20;
    assert_eq!(client.dump().expect("dump"), (1..=25).collect::<Vec<u64>>());
    // By the engine's own log (the node's clock): the silence it waited
    // out began with the last arrival from the standby, about the pull.
    let log = lab.sh(
        NodeId::A,
        "grep -E 'nothing arrived from|unprotected' /data/ftd/vms/ledger-vm/ftprotect.log",
    );
    let by_engine = engine_unprotected_ms(&log).map_or_else(
        || {
            format!(
                "? (log: {:?})",
                log.lines().rev().take(4).collect::<Vec<_>>()
            )
        },
        |ms| ms.to_string(),
    );
    eprintln!(
        "[busy] 2 vCPUs + dirtier: the primary said unprotected {by_engine} ms after the \
         standby's last arrival, by its own log ({seen_ms} ms as polled from the host); heartbeat \
         timeout {} ms (goal: within {} ms); ledger ops then {} ms each",
        unprotected.heartbeat_timeout_ms,
        2 * unprotected.heartbeat_timeout_ms,
        per_op.as_millis()
    );
}

/// From an engine log (lines of `nothing arrived from ... for Xms` and the
/// state changes to unprotected): the time from the last arrival (the
/// start of the last silence) to the first "unprotected" after it, in ms.
fn engine_unprotected_ms(log: &str) -> Option<i64> {
    // Colour codes, if any, left out.
    let plain = |line: &str| {
        let mut out = String::new();
        let mut escape = false;
        for c in line.chars() {
            match c {
                '\x1b' => escape = true,
                'm' if escape => escape = false,
                _ if escape => {}
                c => out.push(c),
            }
        }
        out
    };
    // "2026-11-30T17:35:24.708085Z ..." -> ms since midnight.
    let at = |line: &str| -> Option<f64> {
        let t = line.split_whitespace().next()?.split('T').nth(1)?;
        let mut hms = t.trim_end_matches('Z').split(':');
        let (h, m, s): (f64, f64, f64) = (
            hms.next()?.parse().ok()?,
            hms.next()?.parse().ok()?,
            hms.next()?.parse().ok()?,
        );
        Some(((h * 60.0 + m) * 60.0 + s) * 1000.0)
    };
    // The last silence, and the first "unprotected" after it (the log
    // also holds the start-up's "unprotected" and any earlier session).
    let mut silent = None;
    let mut pair = None;
    for line in log.lines().map(plain) {
        // The state line quotes the silence: test for it first.
        if line.contains("state=unprotected") {
            if let Some(s) = silent.take() {
                pair = Some((s, line));
            }
        } else if line.contains("nothing arrived from") {
            silent = Some(line);
        }
    }
    let (silent, unprotected) = pair?;
    let (silent, unprotected) = (silent.as_str(), unprotected.as_str());
    let waited: f64 = silent
        .split(" for ")
        .nth(1)?
        .split("ms")
        .next()?
        .trim()
        .parse()
        .ok()?;
    Some((at(unprotected)? - (at(silent)? - waited)).round() as i64)
}

/// Runs `ftrelay` on node a between its daemon and b's A-link address
/// (a's configuration names the relay as b's first A-link address; its
/// daemon is restarted by init to read it), before any VM is defined.
/// Returns b's real A-link address.
fn relay_the_alink_on_a(lab: &LabPair) -> String {
    let script = r#"set -e
conf=/data/ftd/ftd.toml
to=$(sed -n '/^\[peer\]/,$ s/.*"\([0-9.]*:7800\)".*/\1/p' "$conf")
[ -n "$to" ] || { echo "no peer A-link address in $conf" >&2; exit 1; }
sed -i "/^\[peer\]/,\$ s/\"$to\"/\"127.0.0.1:9800\"/" "$conf"
grep -q '"127.0.0.1:9800"' "$conf"
setsid /bin/ftrelay --listen 127.0.0.1:9800 --to "$to" --control /run/ftrelay.sock \
    >/run/ftrelay.log 2>&1 </dev/null &
for i in $(seq 50); do [ -S /run/ftrelay.sock ] && break; sleep 0.1; done
[ -S /run/ftrelay.sock ] || { cat /run/ftrelay.log >&2; exit 1; }
killall ftd
echo "$to""#;
    let to = lab.sh(NodeId::A, script).trim().to_string();
    ft_pair::wait_paired(lab.lab(), NodeId::A).expect("a's daemon back, paired");
    to
}

/// One command to the relay on a; its answer.
fn relay(lab: &LabPair, command: &str) -> String {
    lab.sh(
        NodeId::A,
        &format!("/bin/ftrelay --control /run/ftrelay.sock --send '{command}'"),
    )
    .trim()
    .to_string()
}

/// A counter from the relay's `counters` line (`up.faults=1 ...`).
fn relay_counter(counters: &str, name: &str) -> u64 {
    counters
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {counters:?}"))
}

/// The fault relay in the lab (issue 9): the A-link between the real
/// daemons runs through `ftrelay` on the primary's node, and faults are
/// injected into live epochs while the client writes. Each one is caught
/// (a rewritten or replayed record by the seal, a reset or a stall by the
/// session),
/// the standby neither applies the damaged epoch nor takes over (the
/// primary is alive on the backup path), the primary starts a new session
/// and is protected again, and no acknowledged operation is lost. First,
/// acknowledgements delayed on the way back pause the guest (the bound on
/// how far it runs ahead) without ending the session.
#[test]
fn faults_on_the_real_a_link_are_caught_without_a_takeover_and_lose_nothing() {
    let lab = LabPair::start("ftrelay");
    ft_pair::wait_paired(lab.lab(), NodeId::A).expect("paired");
    let to = relay_the_alink_on_a(&lab);
    // Pulses do not pass the relay (a TCP relay): silence is judged on the
    // connection alone, and a heartbeat timeout of 300 ms leaves room for
    // the 150 ms of lag below.
    let opts = ftd_client::model::FtOptions {
        heartbeat_timeout_ms: Some(300),
        ..Default::default()
    };
    ft_pair::protect(lab.lab(), NodeId::A, opts).expect("protected");
    ft_pair::wait_for(
        lab.lab(),
        NodeId::B,
        Role::Standby,
        FtState::StandingBy,
        Duration::from_secs(120),
    )
    .expect("standby ready");
    let counters = relay(&lab, "counters");
    assert!(
        relay_counter(&counters, "up.frames") > 0,
        "the A-link does not run through the relay: {counters}"
    );
    let a = status(&lab, NodeId::A).expect("a");
    assert!(
        a.alink.as_deref().is_some_and(|p| p.starts_with("sealed")),
        "the lab's A-link is not sealed: {a:?}"
    );
    let mut writer = Appender::new(lab.ledger_client());
    // Acknowledgements that lag (150 ms added on their way back): the
    // guest runs at most `max_run_ahead` (100 ms by default) past a
    // checkpoint not yet acknowledged, then waits paused for it; the
    // session goes on. (The added latency stays well under the heartbeat
    // timeout, 300 ms here: the step from none to 150 ms is a gap of 150 ms
    // plus a heartbeat interval in what the primary hears. 250 ms made a
    // 310 ms gap: a silence, rightly.)
    // (Before the faults: the first session runs through the relay; after
    // them one may run on the backup path.)
    let before = status(&lab, NodeId::A).expect("a");
    assert_eq!(
        before.peer.as_deref(),
        Some("127.0.0.1:9800"),
        "the session does not run through the relay: {before:?}"
    );
    assert!(relay(&lab, "down delay 150ms").starts_with("ok"));
    writer.append_for(Duration::from_secs(3));
    assert!(relay(&lab, "down delay 0").starts_with("ok"));
    let a = status(&lab, NodeId::A).expect("a");
    assert_eq!(
        (a.state, a.state_since_unix_ms),
        (FtState::Protected, before.state_since_unix_ms),
        "lagging acknowledgements ended the session: {a:?}"
    );
    let pauses = a.counters.behind_pauses - before.counters.behind_pauses;
    let paused_ms = a.counters.behind_paused_ms - before.counters.behind_paused_ms;
    let checkpoints = a.counters.checkpoints - before.counters.checkpoints;
    assert!(
        pauses > 0 && paused_ms > 0,
        "acknowledgements 150 ms late never paused the guest: {a:?}"
    );
    eprintln!(
        "[relay] acknowledgements 150 ms late for 3 s: {checkpoints} checkpoints, the guest \
         paused {pauses} times for {paused_ms} ms in all"
    );
    // The lab's A-link is sealed (the default): the relay sees records,
    // not the messages in them. A record rewritten with its CRCs
    // recomputed (what someone who knows the frame format could do) and a
    // record repeated (a replay) do not open; a reset and a stall end the
    // session.
    let faults = [
        "up rewrite 40 on Sealed",
        "up dup on Sealed",
        "up reset after Sealed",
        "up stall",
    ];
    for (n, fault) in faults.into_iter().enumerate() {
        writer.append_for(Duration::from_secs(2));
        let since = status(&lab, NodeId::A).expect("a").state_since_unix_ms;
        let injected = Instant::now();
        let answer = relay(&lab, fault);
        assert!(answer.starts_with("ok"), "{fault}: {answer}");
        writer.append_for(Duration::from_secs(2));
        if fault.ends_with("stall") {
            writer.append_for(Duration::from_secs(1));
            assert!(relay(&lab, "up resume").starts_with("ok"));
        }
        let counters = relay(&lab, "counters");
        assert_eq!(
            relay_counter(&counters, "up.faults"),
            n as u64 + 1,
            "{fault} was not applied: {counters}"
        );
        // Protected again, in a new session.
        let deadline = Instant::now() + Duration::from_secs(240);
        let a = loop {
            writer.append_for(Duration::from_millis(500));
            let a = status(&lab, NodeId::A);
            if let Some(a) = a
                .as_ref()
                .filter(|a| a.state == FtState::Protected && a.state_since_unix_ms > since)
            {
                break a.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{fault}: a was not protected again in a new session: {a:?}\n{}",
                ft_pair::log_tail(lab.lab(), NodeId::A)
            );
        };
        // (The generation may advance: a primary that lost its standby
        // goes on alone with the witness's confirmation.)
        assert_eq!(a.role, Role::Primary, "{a:?}");
        let b = status(&lab, NodeId::B).expect("b");
        assert_eq!(b.role, Role::Standby, "{b:?}");
        assert_eq!(b.counters.failovers, 0, "{fault}: b took over: {b:?}");
        // b's RAM file is labelled with its last checkpoint: the copy
        // brought memory forward from it instead of comparing it.
        let unread = a.counters.sync_memory_unread_bytes_last;
        assert!(
            unread > 0,
            "{fault}: the copy compared the memory b kept instead of bringing it forward: {a:?}"
        );
        eprintln!(
            "[relay] {fault}: caught, a protected again in a new session {:.1} s after the \
             fault (generation {}; b: {} epochs applied, {} rejected; {} MiB of memory \
             brought forward, not read)",
            injected.elapsed().as_secs_f64(),
            a.generation,
            b.counters.epochs_applied,
            b.counters.epochs_rejected,
            unread >> 20
        );
    }
    writer.append_for(Duration::from_secs(2));
    writer.assert_nothing_lost();
    // Each new session copied against the memory and disk the standby
    // kept (memory brought forward from its checkpoint, written maps):
    // the replica is the primary.
    let verdict = replica_check(&lab, NodeId::A, NodeId::B);
    assert!(
        verdict.equal,
        "the replica resynchronised from what it kept differs from the primary: {verdict:?}"
    );
    eprintln!(
        "[relay] {} faults on the A-link to {to} through ftrelay: no takeover, {} operations, \
         none lost; the replica equals the primary at epoch {}",
        faults.len(),
        writer.acked.len(),
        verdict.epoch
    );
}
