//! Level HA on the standby: a disk mirror. The plan says `ha` with a boot
//! plan; the standby keeps no memory and says what it holds of its disk
//! alone; each epoch is a batch of disk writes (an empty state), written
//! and made durable before it is acknowledged; a lost primary hands back
//! the mirror with the plan to boot the VM from it.

mod common;

use common::*;
use replicator::level::Level;
use replicator::standby::Machine;

fn disk_bytes(replica_disk: &std::path::Path, offset: usize, len: usize) -> Vec<u8> {
    std::fs::read(replica_disk).unwrap()[offset..offset + len].to_vec()
}

#[tokio::test]
async fn a_mirror_applies_each_batch_of_writes_and_a_lost_primary_leaves_a_bootable_mirror() {
    let standby = start_standby("mirror").await;
    let mut link = mirrored_primary(&standby).await;
    send(&link, &mirror_epoch(1, 4096, b"first")).await;
    expect_ack(&mut link, 1).await;
    send(&link, &mirror_epoch(2, 4096, b"again")).await;
    expect_ack(&mut link, 2).await;
    let status = standby.status.snapshot();
    assert_eq!(status.level, Level::Ha);
    assert_eq!(status.counters.disk_writes_total, 2);
    // A mirror allocates no memory for the guest: no RAM file.
    let ram_file = std::env::temp_dir().join(format!(
        "ft-standby-test-mirror-{}/guest.ram",
        std::process::id()
    ));
    assert!(!ram_file.exists(), "a mirror made a RAM file");
    // The primary is lost: the mirror is handed back, with how to boot.
    drop(link);
    let replica = taken_over(standby.task).await;
    assert_eq!(replica.epoch, 2);
    let Machine::Boot(plan) = &replica.machine else {
        panic!("a mirror handed back a checkpoint")
    };
    assert_eq!(*plan, test_boot_plan());
    let path = &replica.disks[0].path;
    assert_eq!(disk_bytes(path, 0, 6), b"copied");
    assert_eq!(disk_bytes(path, 4096, 5), b"again");
}

/// A mirror epoch that carries pages, or a checkpoint state, is refused
/// unacknowledged (a mirror holds no memory): the session ends, the last
/// committed batch stays, and there is no takeover from a refusal.
#[tokio::test]
async fn a_mirror_refuses_an_epoch_with_memory_or_state() {
    let standby = start_standby("mirror-refuses").await;
    let mut link = mirrored_primary(&standby).await;
    send(&link, &mirror_epoch(1, 0, b"ok")).await;
    expect_ack(&mut link, 1).await;
    // Epoch 2 as level FT would send it: a state and a page.
    send(&link, &epoch_frames(2, 0x33, b"ft")).await;
    until(&standby, "the epoch refused", |s| {
        s.counters.epochs_rejected == 1
    })
    .await;
    let answer = tokio::time::timeout(WITHIN, link.recv()).await;
    assert!(
        matches!(answer, Ok(Err(_))),
        "the standby answered a refused epoch: {answer:?}"
    );
    assert!(!standby.task.is_finished(), "a refusal became a takeover");
    // A new session is served.
    let mut link = mirrored_primary(&standby).await;
    send(&link, &mirror_epoch(1, 0, b"ok")).await;
    expect_ack(&mut link, 1).await;
}

/// A plan at level HA without the boot plan is malformed: the standby
/// cannot take such a VM over.
#[test]
fn a_plan_at_level_ha_needs_its_boot_plan() {
    let plan = replicator::protocol::SyncPlan {
        version: replicator::protocol::SYNC_PLAN_VERSION,
        mem_mib: MEM_MIB,
        disk_bytes: vec![DISK_BYTES],
        nics: 1,
        content_key: test_key().to_hex(),
        level: Level::Ha,
        boot: None,
        written: Vec::new(),
        next_common: None,
        memory_lineage: None,
        memory_since: None,
    };
    assert!(matches!(
        replicator::protocol::SyncPlan::from_payload(&plan.to_payload()),
        Err(replicator::protocol::StateError::NoBootPlan)
    ));
    let with_boot = replicator::protocol::SyncPlan {
        boot: Some(test_boot_plan()),
        ..plan
    };
    assert_eq!(
        replicator::protocol::SyncPlan::from_payload(&with_boot.to_payload()).unwrap(),
        with_boot
    );
}
