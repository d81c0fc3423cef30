//! The standby process's receiving side over a real, authenticated A-link
//! on loopback TCP (no guest needed: the replica is memory and a disk
//! file). Each invariant on its own:
//! - a complete epoch is applied (memory and disk) and acknowledged;
//! - a truncated epoch (the primary dies mid-epoch) is never applied: the
//!   replica handed over for promotion holds the previous epoch exactly;
//! - a replayed epoch is refused, not acknowledged, and ends the session
//!   without a takeover;
//! - a frame corrupted on the wire is refused and causes no takeover;
//! - with a backup path, a lost active path is not a lost primary (no
//!   takeover while the primary is heard on the backup), and a primary
//!   silent on both paths is taken over;
//! - a primary whose VM stopped on purpose says so and is not taken over;
//! - a standby the primary dropped (`Release`) does not take over and
//!   waits for the next session;
//! - a replica disk and memory kept from an earlier session are described
//!   to the next primary by their digests, and what the copy sends
//!   replaces them.
//! - kept memory labelled with a checkpoint the next primary offers is
//!   said to be that checkpoint, not digested; any other is digested.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use fault_relay::{kind, Direction, Fault, Relay};
use ft_link::frame::HEADER_LEN;
use ft_link::{Link, Role};
use replicator::protocol::Message;

#[tokio::test]
async fn a_truncated_epoch_is_never_applied_and_the_last_committed_one_is_handed_over() {
    let standby = start_standby("truncated").await;
    let link = committed_primary(standby.addr).await;
    // Epoch 2 stops before its end record: the primary dies mid-send.
    let mut two = epoch_frames(2, 0x33, b"two");
    two.pop();
    send(&link, &two).await;
    drop(link);
    let replica = taken_over(standby.task).await;
    assert_eq!(replica.epoch, 1, "the last committed epoch");
    assert_eq!(page5(&replica), 0x22, "memory of epoch 1, none of epoch 2");
    assert_eq!(
        disk_at_512(&replica, 3),
        b"one",
        "disk of epoch 1, none of epoch 2"
    );
    assert_eq!(
        replica.checkpoint().unwrap().state.guest_ipv4,
        vec![[10, 77, 0, 100]]
    );
    assert_eq!(standby.status.snapshot().counters.epochs_applied, 1);
}

#[tokio::test]
async fn pipelined_epochs_are_acknowledged_in_order_and_a_takeover_keeps_the_last_whole_one() {
    let standby = start_standby("pipelined").await;
    let mut link = committed_primary(standby.addr).await;
    // Epochs 2, 3 and 4 sent back to back, none waiting for an
    // acknowledgement (a pipelining primary); epoch 5 stops before its end.
    let mut frames = epoch_frames(2, 0x33, b"two");
    frames.extend(epoch_frames(3, 0x44, b"three"));
    frames.extend(epoch_frames(4, 0x55, b"four"));
    let mut five = epoch_frames(5, 0x66, b"five");
    five.pop();
    frames.extend(five);
    send(&link, &frames).await;
    for epoch in 2..=4 {
        expect_ack(&mut link, epoch).await;
    }
    drop(link);
    let replica = taken_over(standby.task).await;
    assert_eq!(replica.epoch, 4, "the last whole epoch");
    assert_eq!(page5(&replica), 0x55, "memory of epoch 4, none of epoch 5");
    assert_eq!(disk_at_512(&replica, 4), b"four", "disk of epoch 4");
    assert_eq!(standby.status.snapshot().counters.epochs_applied, 4);
}

#[tokio::test]
async fn a_replayed_epoch_is_refused_unacknowledged_and_causes_no_takeover() {
    let standby = start_standby("replayed").await;
    let mut link = committed_primary(standby.addr).await;
    send(&link, &epoch_frames(1, 0x44, b"bad")).await;
    // No acknowledgement: the standby ends the session instead.
    let answer = tokio::time::timeout(WITHIN, link.recv())
        .await
        .expect("the session ends in time");
    assert!(
        answer.is_err(),
        "the replayed epoch was answered: {answer:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !standby.task.is_finished(),
        "no takeover after a refused epoch"
    );
    let status = standby.status.snapshot();
    assert_eq!(status.counters.epochs_rejected, 1);
    assert_eq!(status.counters.epochs_applied, 1);
    assert_eq!(status.state, replicator::status::FtState::Waiting);
    standby.task.abort();
}

/// A fault relay from a primary to `to`.
async fn relay(to: SocketAddr) -> Relay {
    Relay::start("127.0.0.1:0", to).await.expect("a relay")
}

#[tokio::test]
async fn a_frame_corrupted_on_the_wire_is_refused_and_causes_no_takeover() {
    // The relay hits a page frame: it must see frames (a sealed link's own
    // refusal of a flipped record: fault-relay's tests).
    plaintext_links();
    let standby = start_standby("corrupt").await;
    let relay = relay(standby.addr).await;
    let mut link = synced_primary(relay.local_addr()).await;
    send(&link, &epoch_frames(1, 0x22, b"one")).await;
    expect_ack(&mut link, 1).await;
    // One bit in the middle of epoch 2's page frame.
    let flip = Fault::FlipByte {
        offset: HEADER_LEN + 2000,
        mask: 0x10,
    };
    relay
        .handle()
        .inject_on(Direction::Up, flip, kind::PAGES)
        .unwrap();
    send(&link, &epoch_frames(2, 0x33, b"two")).await;
    let answer = tokio::time::timeout(WITHIN, link.recv())
        .await
        .expect("the session ends in time");
    assert!(
        answer.is_err(),
        "a corrupted epoch was answered: {answer:?}"
    );
    let counters = relay.handle().counters();
    assert_eq!(
        (counters.up.faults, counters.up.pending),
        (1, 0),
        "the relay corrupted a frame"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !standby.task.is_finished(),
        "no takeover after a corrupt frame"
    );
    let status = standby.status.snapshot();
    assert_eq!(status.counters.epochs_rejected, 1);
    assert_eq!(status.counters.epochs_applied, 1);
    standby.task.abort();
}

/// A primary whose session runs through a relay (the active path), with a
/// backup path through another relay to the standby's second address:
/// (session, backup, active path's relay, backup path's relay).
async fn primary_with_backup(standby: &Standby) -> (Link, Link, Relay, Relay) {
    let path1 = relay(standby.addr).await;
    let path2 = relay(standby.addr2).await;
    let mut link = synced_primary(path1.local_addr()).await;
    send(&link, &epoch_frames(1, 0x22, b"one")).await;
    expect_ack(&mut link, 1).await;
    let backup = backup_path(path2.local_addr()).await;
    (link, backup, path1, path2)
}

/// A path goes silent both ways, its connection held open: an unplugged
/// cable.
fn cut(path: &Relay) {
    path.handle()
        .inject(Direction::Both, Fault::Stall)
        .expect("a stall");
}

#[tokio::test]
async fn a_lost_path_with_the_primary_heard_on_the_backup_causes_no_takeover() {
    let standby = start_standby("path-lost").await;
    let (_link, _backup, path1, _path2) = primary_with_backup(&standby).await;
    cut(&path1);
    // The active path falls silent (400 ms timeout); the backup still
    // carries the primary's heartbeats.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(
        !standby.task.is_finished(),
        "the standby took over while the primary was alive on the backup path"
    );
    let status = standby.status.snapshot();
    assert_eq!(
        status.state,
        replicator::status::FtState::Waiting,
        "{status:?}"
    );
    let message = status.message.unwrap_or_default();
    assert!(message.contains("backup path"), "{message}");
    standby.task.abort();
}

/// The paths fall one after the other (a node isolated by two cuts a
/// moment apart): once the backup path is silent too, the primary is lost
/// and the replica is taken over. (Before, the first cut ended the session
/// on the strength of the backup path, and nobody took the VM over.)
#[tokio::test]
async fn paths_cut_one_after_the_other_are_taken_over() {
    let standby = start_standby("paths-staggered").await;
    let (link, backup, path1, path2) = primary_with_backup(&standby).await;
    cut(&path1);
    // The active path's silence is judged while the backup lives: the
    // standby says so and keeps the replica.
    let judged = tokio::time::timeout(WITHIN, async {
        while !standby
            .status
            .snapshot()
            .message
            .is_some_and(|m| m.contains("backup path"))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(judged.is_ok(), "{:?}", standby.status.snapshot());
    assert!(!standby.task.is_finished());
    cut(&path2);
    let replica = taken_over(standby.task).await;
    drop((link, backup));
    assert_eq!(replica.epoch, 1);
    assert_eq!(page5(&replica), 0x22);
}

#[tokio::test]
async fn a_primary_silent_on_both_paths_is_taken_over() {
    let standby = start_standby("both-lost").await;
    // The primary's host loses power: both paths go quiet at once (no
    // FIN, no RST).
    let (link, backup, path1, path2) = primary_with_backup(&standby).await;
    cut(&path1);
    cut(&path2);
    let replica = taken_over(standby.task).await;
    drop((link, backup));
    assert_eq!(replica.epoch, 1);
    assert_eq!(page5(&replica), 0x22);
}

#[tokio::test]
async fn a_primary_whose_vm_stopped_is_not_taken_over() {
    let standby = start_standby("stopped").await;
    stopped_session(&standby).await;
    // Nothing happens afterwards either (a takeover would end the task).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !standby.task.is_finished(),
        "the standby took over a VM that stopped on purpose"
    );
    let status = standby.status.snapshot();
    assert!(
        status
            .message
            .unwrap_or_default()
            .contains("stopped on purpose"),
        "the standby says why it did not take over"
    );
    standby.task.abort();
}

/// Issue 9, defect 3: a reset after epoch N arrived and before its
/// acknowledgement left made the standby end the session without a
/// takeover, discarding a replica that held epoch N (it failed before the
/// fix: the task never finished).
#[tokio::test]
async fn an_epoch_whose_acknowledgement_cannot_be_sent_is_kept_and_taken_over() {
    plaintext_links();
    let standby = start_standby("ack-reset").await;
    let relay = relay(standby.addr).await;
    let mut link = synced_primary(relay.local_addr()).await;
    send(&link, &epoch_frames(1, 0x22, b"one")).await;
    expect_ack(&mut link, 1).await;
    // The standby gets the whole of epoch 2, then finds its connection
    // reset (SO_LINGER 0) when it acknowledges.
    relay
        .handle()
        .inject_on(Direction::Up, Fault::Reset, kind::EPOCH_END)
        .unwrap();
    send(&link, &epoch_frames(2, 0x33, b"two")).await;
    // The primary never hears of epoch 2.
    let answer = tokio::time::timeout(WITHIN, link.recv())
        .await
        .expect("the relay ends the session in time");
    assert!(answer.is_err(), "epoch 2 was acknowledged: {answer:?}");
    let replica = taken_over(standby.task).await;
    assert_eq!(
        replica.epoch, 2,
        "epoch 2 was applied: it is the one handed over"
    );
    assert_eq!(page5(&replica), 0x33);
    assert_eq!(disk_at_512(&replica, 3), b"two");
    assert_eq!(standby.status.snapshot().counters.epochs_applied, 2);
    assert_eq!(relay.handle().counters().up.faults, 1, "the relay reset");
}

/// Issue 9, defect 6 (the standby's side): a connection that proves the
/// secret and then says nothing held the acceptor until its first-message
/// timeout; the real primary had to wait behind it.
#[tokio::test]
async fn a_silent_authenticated_connection_does_not_hold_up_the_primary() {
    let standby = start_standby("silent-first").await;
    let _silent = Link::connect(standby.addr, &link_config(Role::Primary))
        .await
        .expect("handshake");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let mut link = synced_primary(standby.addr).await;
    send(&link, &epoch_frames(1, 0x22, b"one")).await;
    let f = tokio::time::timeout(Duration::from_secs(2), link.recv())
        .await
        .expect("epoch 1 acknowledged well before the silent connection's timeout")
        .expect("the link stays up");
    let envelope = Message::from_frame(f).expect("a replication message");
    assert_eq!((envelope.message, envelope.epoch), (Message::Ack, 1));
    assert!(started.elapsed() < Duration::from_secs(2));
    standby.task.abort();
}

/// Issue 9, defect 7: a primary whose VM died of a host fault (a vCPU
/// failed) sent Stop, and the standby let the VM go. Now it sends
/// Handover and the standby takes over at once from its last committed
/// epoch (before: Handover did not exist; Stop meant no takeover).
#[tokio::test]
async fn a_vm_handed_over_after_a_host_fault_is_taken_over_at_once() {
    let standby = start_standby("handover").await;
    let link = committed_primary(standby.addr).await;
    // Epoch 2 is under way when the vCPU fails: it is dropped.
    let mut two = epoch_frames(2, 0x33, b"two");
    two.pop();
    send(&link, &two).await;
    let started = std::time::Instant::now();
    send(&link, &[Message::Handover.into_frame(2, 1)]).await;
    let replica = taken_over(standby.task).await;
    // At once: not after the heartbeat timeout (the link is still up).
    assert!(started.elapsed() < Duration::from_millis(300));
    assert_eq!(replica.epoch, 1);
    assert_eq!(page5(&replica), 0x22);
    assert_eq!(disk_at_512(&replica, 3), b"one");
    drop(link);
}

/// Inbound frames `seqs` of NIC 0 (each frame's bytes are its number).
fn inbound(seqs: &[u64]) -> ft_link::Frame {
    let frames = seqs.iter().map(|&seq| vmm::replication::InboundFrame {
        nic: 0,
        seq,
        frame: vec![seq as u8; 60],
    });
    let mut batches = replicator::protocol::inbound_payloads(frames);
    Message::Inbound(batches.remove(0)).into_frame(0, 1)
}

/// Epoch `n` (page 5 = `fill`) whose checkpoint holds the first `through`
/// frames its guest received.
fn epoch_through(n: u64, fill: u8, through: u64) -> Vec<ft_link::Frame> {
    let mut state = checkpoint_state();
    state.inbound_through = vec![through];
    let mut stager = replicator::protocol::PageStager::default();
    vmm::replication::PageSink::page_buffer(&mut stager, 5 * 4096).extend_from_slice(&[fill; 4096]);
    replicator::protocol::epoch_frames(
        n,
        1,
        bytes::Bytes::from(state.to_payload().unwrap()),
        stager.finish(),
        (Vec::new(), 0),
    )
}

/// The frames the primary's guest received after the last committed
/// checkpoint are handed over with the replica (the promoted guest gets
/// them), in order; those the checkpoint holds are not.
#[tokio::test]
async fn frames_received_past_the_committed_checkpoint_are_handed_over_in_order() {
    let standby = start_standby("inbound").await;
    let mut link = synced_primary(standby.addr).await;
    send(&link, &[inbound(&[0, 1])]).await;
    send(&link, &epoch_through(1, 0x22, 1)).await;
    expect_ack(&mut link, 1).await;
    send(&link, &[inbound(&[2, 3])]).await;
    send(&link, &epoch_through(2, 0x33, 3)).await;
    expect_ack(&mut link, 2).await;
    // Frame 4 arrives; epoch 3 (which would hold it) is cut short.
    send(&link, &[inbound(&[4])]).await;
    let mut three = epoch_through(3, 0x44, 5);
    three.pop();
    send(&link, &three).await;
    drop(link);
    let replica = taken_over(standby.task).await;
    assert_eq!(replica.epoch, 2);
    assert_eq!(page5(&replica), 0x33);
    let replay: Vec<u8> = replica.checkpoint().unwrap().inbound[0]
        .iter()
        .map(|f| f[0])
        .collect();
    assert_eq!(replay, vec![3, 4], "what checkpoint 2 lacks, in order");
}

fn epoch_output(epoch: u64, fill: u8) -> ft_link::Frame {
    let frames = [vmm::replication::InboundFrame {
        nic: 0,
        seq: 0,
        frame: vec![fill; 70],
    }];
    let mut batches = replicator::protocol::inbound_payloads(frames);
    Message::EpochOutput(batches.remove(0)).into_frame(epoch, 1)
}

/// The copy of each epoch's output travels before the epoch; a takeover
/// hands over the committed epoch's copy (to send: the primary may have
/// died before releasing it), not the copy of an epoch cut short.
#[tokio::test]
async fn a_takeover_hands_over_the_output_of_the_committed_epoch() {
    let standby = start_standby("output").await;
    let mut link = synced_primary(standby.addr).await;
    send(&link, &[epoch_output(1, 0x51)]).await;
    send(&link, &epoch_through(1, 0x22, 0)).await;
    expect_ack(&mut link, 1).await;
    send(&link, &[epoch_output(2, 0x52)]).await;
    let mut two = epoch_through(2, 0x33, 0);
    two.pop();
    send(&link, &two).await;
    drop(link);
    let replica = taken_over(standby.task).await;
    assert_eq!(replica.epoch, 1);
    let output = &replica.checkpoint().unwrap().final_output;
    assert_eq!(output.len(), 1, "one NIC");
    let fills: Vec<u8> = output[0].iter().map(|f| f[0]).collect();
    assert_eq!(fills, vec![0x51], "epoch 1's output, not epoch 2's");
}

/// A checkpoint's capture time is restamped on the standby's clock when it
/// arrives, with the kvmclock's wall-clock stamp moved by as much: a
/// primary whose clock differs (here: one that says 1970) neither holds
/// back nor rushes the promoted guest's time by the difference.
#[tokio::test]
async fn a_checkpoints_capture_time_is_taken_on_the_standbys_clock() {
    let standby = start_standby("clock").await;
    let mut link = synced_primary(standby.addr).await;
    let mut machine = minimal_machine();
    machine.captured_unix_ns = 1_000_000_000;
    machine.vm.clock.realtime = 1_005_000_000;
    let mut state = checkpoint_state();
    state.machine = machine;
    let mut stager = replicator::protocol::PageStager::default();
    vmm::replication::PageSink::page_buffer(&mut stager, 5 * 4096).extend_from_slice(&[1; 4096]);
    let before = vmm::snapshot::unix_now_ns();
    send(
        &link,
        &replicator::protocol::epoch_frames(
            1,
            1,
            bytes::Bytes::from(state.to_payload().unwrap()),
            stager.finish(),
            (Vec::new(), 0),
        ),
    )
    .await;
    expect_ack(&mut link, 1).await;
    let after = vmm::snapshot::unix_now_ns();
    drop(link);
    let replica = taken_over(standby.task).await;
    let machine = &replica.checkpoint().unwrap().state.machine;
    assert!(
        (before..=after).contains(&machine.captured_unix_ns),
        "captured at {} on the standby's clock, between {before} and {after}",
        machine.captured_unix_ns
    );
    assert_eq!(
        machine.vm.clock.realtime - machine.captured_unix_ns,
        5_000_000,
        "the kvmclock stamp moved with it"
    );
}

/// A planned switchover: once the primary's final epoch is acknowledged,
/// its word hands the replica over at once, while the link is alive (no
/// silence to wait for), marked as a switchover.
#[tokio::test]
async fn a_switchover_after_the_final_epoch_is_taken_over_while_the_primary_lives() {
    let standby = start_standby("switchover").await;
    let mut link = committed_primary(standby.addr).await;
    send(&link, &epoch_frames(2, 0x33, b"two")).await;
    expect_ack(&mut link, 2).await;
    // Epoch 2's output, which the primary did not send.
    let reply = vec![0x5a; 80];
    let batch = replicator::protocol::inbound_payloads([vmm::replication::InboundFrame {
        nic: 0,
        seq: 0,
        frame: reply.clone(),
    }])
    .remove(0);
    send(
        &link,
        &[
            Message::FinalOutput(batch).into_frame(2, 1),
            Message::Switchover.into_frame(2, 1),
        ],
    )
    .await;
    // It says it takes over: the final epoch acknowledged again (the
    // primary stops only on this word).
    expect_ack(&mut link, 2).await;
    // The link stays up (heartbeats) while the standby takes over.
    let replica = taken_over(standby.task).await;
    assert!(replica.switchover, "handed over by a switchover");
    assert_eq!(replica.epoch, 2, "the final epoch");
    assert_eq!(page5(&replica), 0x33, "memory of the final epoch");
    assert_eq!(disk_at_512(&replica, 3), b"two");
    assert_eq!(
        replica.checkpoint().unwrap().final_output,
        vec![vec![bytes::Bytes::from(reply)]],
        "the final output, to be sent from the standby's port"
    );
    drop(link);
}

/// A switchover naming an epoch this standby has not committed (it was
/// never acknowledged) is refused: no takeover, the session ends.
#[tokio::test]
async fn a_switchover_past_the_committed_epoch_is_refused_without_a_takeover() {
    let standby = start_standby("switchover-early").await;
    let mut link = committed_primary(standby.addr).await;
    send(&link, &[Message::Switchover.into_frame(2, 1)]).await;
    // The standby refuses (the primary then runs on), and ends the session.
    let answer = tokio::time::timeout(WITHIN, link.recv())
        .await
        .expect("the standby answers in time")
        .expect("a refusal");
    let refusal = Message::from_frame(answer).expect("a message").message;
    assert!(
        matches!(&refusal, Message::Refuse(why) if why.contains("switchover after epoch 2")),
        "{refusal:?}"
    );
    let answer = tokio::time::timeout(WITHIN, link.recv())
        .await
        .expect("the session ends in time");
    assert!(answer.is_err(), "the session went on: {answer:?}");
    let status = standby.status.snapshot();
    assert_eq!(status.counters.epochs_rejected, 1);
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("switchover after epoch 2"),
        "the standby says why: {:?}",
        status.message
    );
    assert!(
        !standby.task.is_finished(),
        "no takeover after a refused switchover"
    );
    standby.task.abort();
}

/// Resynchronisation by content (issue 11): a standby whose session ended
/// keeps its replica disk and memory (its RAM file), and the next
/// session's primary learns what they hold as digests under the key of
/// that session's plan (so that the copy brings only what differs). A
/// kept disk's stale bytes are replaced by what the copy sends: the
/// survivor's content wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_replica_disk_is_described_by_its_digests_and_replaced_where_it_differs() {
    use replicator::content::{ContentKey, DISK_CHUNK};
    use replicator::protocol::HeldPart;
    let standby = start_standby("kept-disk").await;
    // The first session: a new disk (all zeros), then epoch 1 writes
    // "one" at 512; the primary starts over with a new session (as after
    // losing its path), which ends this one without a takeover.
    let mut link = primary_beginning(standby.addr, 1).await;
    assert_eq!(
        expect_held(&mut link).await,
        (HeldPart::Zeroed, HeldPart::Zeroed)
    );
    drop(link);
    let old = committed_primary(standby.addr).await;
    // The next session: the disk and memory are kept, each chunk digested
    // under this plan's key.
    let mut link = primary_beginning(standby.addr, 1).await;
    let (
        HeldPart::Digests {
            first_chunk: 0,
            digests,
        },
        HeldPart::Digests {
            first_chunk: 0,
            digests: pages,
        },
    ) = expect_held(&mut link).await
    else {
        panic!("the kept disk and memory are not described by their digests")
    };
    // The old session is over (closed only now: closed before the new
    // one began, it would be a lost primary, taken over).
    drop(old);
    // Memory as epoch 1 left it: page 5 filled with 0x22, the rest zeros.
    let page_size = replicator::protocol::PAGE_SIZE;
    assert_eq!(pages.len() as u64, (MEM_MIB << 20) / page_size as u64);
    for (n, digest) in pages.iter().enumerate() {
        let fill = if n == 5 { 0x22 } else { 0 };
        assert_eq!(
            *digest,
            test_key().digest(&vec![fill; page_size]),
            "page {n}"
        );
    }
    let mut expected = vec![0u8; DISK_BYTES as usize];
    expected[512..515].copy_from_slice(b"one");
    let chunks: Vec<_> = expected
        .chunks(DISK_CHUNK)
        .map(|c| test_key().digest(c))
        .collect();
    assert_eq!(digests, chunks, "the digests describe the kept bytes");
    assert_ne!(
        digests[0],
        ContentKey([1; 32]).digest(&expected[..DISK_CHUNK]),
        "another key gives other digests"
    );
    // The primary's disk differs in chunk 0 (no "one" at 512, 0xab at
    // 2000): it sends that chunk, which replaces the kept one whole.
    let mut survivor = vec![0u8; DISK_CHUNK];
    survivor[2000..2010].copy_from_slice(&[0xab; 10]);
    let (disk, _) = replicator::protocol::disk_payloads([replicator::protocol::DiskRecord {
        disk: 0,
        offset: 0,
        data: bytes::Bytes::from(survivor),
    }]);
    let mut tally = replicator::protocol::EndTally::default();
    tally.add_disk(&disk[0]);
    send(
        &link,
        &[
            Message::SyncDisk(disk[0].clone()).into_frame(0, 1),
            Message::SyncEnd(tally.end()).into_frame(0, 1),
        ],
    )
    .await;
    send(&link, &epoch_frames(1, 0x33, b"two")).await;
    expect_ack(&mut link, 1).await;
    drop(link);
    let replica = taken_over(standby.task).await;
    let data = std::fs::read(&replica.disks[0].path).unwrap();
    assert_eq!(&data[512..515], b"two", "the first epoch after the copy");
    assert_eq!(&data[2000..2010], &[0xab; 10], "the copied chunk");
    assert_eq!(
        &data[DISK_CHUNK..],
        &expected[DISK_CHUNK..],
        "the kept chunks"
    );
}

/// A kept file of another size than the primary's disk is not compared:
/// it is made new, and the standby says it holds zeros. A VM stopped on
/// purpose takes the replica's RAM file with it (it boots anew).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_disk_of_another_size_is_made_new() {
    use replicator::protocol::HeldPart;
    let standby = start_standby("resized-disk").await;
    stopped_session(&standby).await;
    let mut link = primary_planning(standby.addr, 1, 2 * DISK_BYTES).await;
    assert_eq!(
        expect_held(&mut link).await,
        (HeldPart::Zeroed, HeldPart::Zeroed),
        "the disk is made new, and the RAM file went with the VM that stopped on purpose"
    );
    standby.task.abort();
}

/// The frames of FT epoch `n` (generation 1) writing `data` at `offset`.
fn epoch_writing(n: u64, offset: u64, data: &'static [u8]) -> Vec<ft_link::Frame> {
    let (writes, _) = replicator::protocol::disk_payloads([replicator::protocol::DiskRecord {
        disk: 0,
        offset,
        data: bytes::Bytes::from_static(data),
    }]);
    replicator::protocol::epoch_frames(n, 1, state_payload(), Default::default(), (writes, 1))
}

/// Resynchronisation by written maps (issue 11): after a session whose
/// first epoch committed, the standby's replica disk and its written map
/// name that session's common point, and the map keeps the extents of
/// later epochs. The next primary whose own map names the same point gets
/// the digests of only the extents either map names (its own extent 1,
/// the standby's extent 3), every other chunk "the same", unread. A
/// primary whose map names another point gets the whole disk's digests,
/// and the standby's map then names none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::single_range_in_vec_init)] // ranges of extents
async fn a_kept_disk_whose_map_shares_the_primarys_common_point_is_compared_only_where_either_wrote(
) {
    use replicator::content::DISK_CHUNK;
    use replicator::protocol::{HeldPart, WrittenPlan};
    use replicator::written::{common_to_hex, CHUNKS_PER_EXTENT};
    use vmm::replication::written_map::{WrittenMap, EXTENT_BYTES};
    const DISK: u64 = 4 * EXTENT_BYTES;
    let dir = std::env::temp_dir().join(format!("ft-written-map-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    let standby = start_standby_on("written-map", 1, None, Some(disk.clone())).await;
    let (first, second) = ([0x11u8; 16], [0x22u8; 16]);
    // Session 1: a new disk; epoch 1 writes extent 0, epoch 2 extent 3.
    let mut link = primary_planning_mapped(
        standby.addr,
        1,
        DISK,
        None,
        (vec![None], Some(common_to_hex(first))),
    )
    .await;
    assert_eq!(
        expect_held(&mut link).await,
        (HeldPart::Zeroed, HeldPart::Zeroed)
    );
    send(
        &link,
        &[Message::SyncEnd(replicator::protocol::EndTally::default().end()).into_frame(0, 1)],
    )
    .await;
    send(&link, &epoch_writing(1, 512, b"one")).await;
    expect_ack(&mut link, 1).await;
    send(&link, &epoch_writing(2, 3 * EXTENT_BYTES + 100, b"three")).await;
    expect_ack(&mut link, 2).await;
    let old = link;
    // Session 2: the primary's map names the same point and extent 1.
    let mut link = primary_planning_mapped(
        standby.addr,
        1,
        DISK,
        None,
        (
            vec![Some(WrittenPlan {
                common: Some(common_to_hex(first)),
                extents: vec![(1, 2)],
            })],
            Some(common_to_hex(second)),
        ),
    )
    .await;
    let mut parts = Vec::new();
    loop {
        let held = next_held(&mut link).await;
        if held.region == replicator::protocol::Region::Memory {
            break;
        }
        parts.push(held.part);
    }
    drop(old);
    let kept = std::fs::read(&disk).unwrap();
    let digests = |extent: u64| -> Vec<_> {
        let at = (extent * EXTENT_BYTES) as usize;
        kept[at..at + EXTENT_BYTES as usize]
            .chunks(DISK_CHUNK)
            .map(|c| test_key().digest(c))
            .collect()
    };
    let c = CHUNKS_PER_EXTENT;
    assert_eq!(
        parts,
        vec![
            HeldPart::Same {
                first_chunk: 0,
                count: c
            },
            HeldPart::Digests {
                first_chunk: c,
                digests: digests(1)
            },
            HeldPart::Same {
                first_chunk: 2 * c,
                count: c
            },
            HeldPart::Digests {
                first_chunk: 3 * c,
                digests: digests(3)
            },
        ],
        "only the extents either map names are digested"
    );
    assert_eq!(&kept[3 * EXTENT_BYTES as usize + 100..][..5], b"three");
    // The standby's map still names the first point, with both extents
    // set until the new point is named.
    let (map, _) = WrittenMap::open(&WrittenMap::path_for(&disk), DISK).unwrap();
    assert_eq!(map.common(), Some(first));
    assert_eq!(map.written(), vec![1..2, 3..4]);
    drop(map);
    // Session 3: a primary whose map names another point.
    let mut link = primary_planning_mapped(
        standby.addr,
        1,
        DISK,
        None,
        (
            vec![Some(WrittenPlan {
                common: Some(common_to_hex([0x33; 16])),
                extents: vec![],
            })],
            Some(common_to_hex(second)),
        ),
    )
    .await;
    let HeldPart::Digests {
        first_chunk: 0,
        digests: all,
    } = next_held(&mut link).await.part
    else {
        panic!("the whole disk is not described by its digests")
    };
    assert_eq!(all.len() as u64, DISK / DISK_CHUNK as u64);
    let (map, _) = WrittenMap::open(&WrittenMap::path_for(&disk), DISK).unwrap();
    assert_eq!(
        map.common(),
        None,
        "a disk the copy overwrites matches nothing known"
    );
    standby.task.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The primary dropped this standby (it did not acknowledge in time) and
/// said so: the session ends without a takeover, and the standby waits
/// for the next one.
#[tokio::test]
async fn a_released_standby_does_not_take_over_and_waits_for_the_next_session() {
    let standby = start_standby("released").await;
    let link = committed_primary(standby.addr).await;
    send(&link, &[Message::Release.into_frame(1, 1)]).await;
    drop(link);
    until(&standby, "the session ended by Release", |s| {
        s.message
            .as_deref()
            .is_some_and(|m| m.contains("dropped this standby"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!standby.task.is_finished(), "the standby took over");
    // The next session is taken.
    let mut next = synced_primary(standby.addr).await;
    send(&next, &epoch_frames(1, 0x55, b"new")).await;
    expect_ack(&mut next, 1).await;
    standby.task.abort();
}

/// Memory common points: a standby that applied epochs of a session whose
/// plan named a memory lineage labels its RAM file with the last one. The
/// next primary that offers to bring memory forward from that lineage's
/// checkpoints is told "checkpoint E" (said first, not digested); one
/// that offers another lineage, or checkpoints that do not include E, is
/// given the digests. Every session takes the label (a copy may overwrite
/// the memory): a session that commits nothing leaves none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_memory_labelled_with_an_offered_checkpoint_is_not_compared() {
    use replicator::protocol::{HeldPart, MemorySince};
    let standby = start_standby("labelled-memory").await;
    let lineage = |n: u8| format!("{n:02x}").repeat(16);
    let offer = |n: u8, from: u64, through: u64| MemorySince {
        lineage: lineage(n),
        from,
        through,
    };
    // A session of lineage `n`, offering `since`: what the standby said of
    // memory; with `epochs`, the copy ends and those epochs commit.
    let session = |n: u8, since: Option<MemorySince>, epochs: u64| {
        let addr = standby.addr;
        async move {
            let plan = replicator::protocol::SyncPlan {
                memory_lineage: Some(lineage(n)),
                memory_since: since,
                ..test_plan(DISK_BYTES, None, (Vec::new(), None))
            };
            let mut link = primary_with_plan(addr, 1, plan).await;
            let (_, memory) = expect_held(&mut link).await;
            if epochs > 0 {
                send(&link, &[sync_end(&[]).into_frame(0, 1)]).await;
                for epoch in 1..=epochs {
                    send(&link, &epoch_frames(epoch, epoch as u8, b"e")).await;
                    expect_ack(&mut link, epoch).await;
                }
            }
            (link, memory)
        }
    };
    let (old, memory) = session(1, None, 3).await;
    assert_eq!(memory, HeldPart::Zeroed, "a new RAM file");
    // Labelled "checkpoint 3 of lineage 1": offered, so not compared.
    let (next, memory) = session(2, Some(offer(1, 0, 7)), 2).await;
    drop(old);
    assert_eq!(memory, HeldPart::Since { epoch: 3 });
    // Now "checkpoint 2 of lineage 2": an offer of lineage 1 does not fit.
    let (third, memory) = session(3, Some(offer(1, 0, 7)), 1).await;
    drop(next);
    assert!(
        matches!(memory, HeldPart::Digests { .. }),
        "another lineage's offer: {memory:?}"
    );
    // "Checkpoint 1 of lineage 3": an offer of its checkpoints 2..=5 does
    // not include it.
    let (fourth, memory) = session(4, Some(offer(3, 2, 5)), 0).await;
    drop(third);
    assert!(
        matches!(memory, HeldPart::Digests { .. }),
        "an offer without the checkpoint: {memory:?}"
    );
    // The fourth session took the label and committed nothing: even an
    // offer of lineage 3 finds none.
    let (_fifth, memory) = session(5, Some(offer(3, 0, 5)), 0).await;
    drop(fourth);
    assert!(
        matches!(memory, HeldPart::Digests { .. }),
        "a label taken by a session that committed nothing: {memory:?}"
    );
    standby.task.abort();
}
