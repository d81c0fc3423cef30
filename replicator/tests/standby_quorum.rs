//! The standby with a quorum witness (a real `ftwitness` service on
//! loopback; the test plays the primary on the A-link and at the witness):
//! - a lost A-link while the witness still hears the primary is no
//!   takeover, and once the primary went on alone the replica is dropped
//!   as stale (and the standby then refuses that older generation);
//! - a silent primary is taken over with the generation the witness grants;
//! - with the witness unreachable there is no takeover until it answers,
//!   or until the operator forces one;
//! - a primary of an older generation than the standby knows is refused;
//! - a primary that comes back with a new session ends the claim.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use replicator::quorum::WitnessConfig;
use replicator::status::FtState;
use witness::registry::Timing;
use witness::server::{Server, ServerConfig};
use witness::{Answer, Request, WitnessClient};

const VM: &str = "test-vm";

struct Witness {
    addr: String,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long the test witness waits for an owner's silence.
const SILENCE: Duration = Duration::from_millis(300);

async fn witness_at(listen: &str) -> Witness {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::bind(ServerConfig {
        listen: listen.into(),
        secret: pair_secret(),
        name: "witness".into(),
        timing: Timing {
            silence: SILENCE,
            startup_grace: Duration::ZERO,
        },
        database: dir.path().join("witness.sqlite"),
    })
    .await
    .unwrap();
    Witness {
        addr: server.local_addr().to_string(),
        task: tokio::spawn(server.serve()),
        _dir: dir,
    }
}

fn client(addr: &str, node: &str) -> Arc<WitnessClient> {
    Arc::new(WitnessClient::new(
        vec![addr.into()],
        pair_secret(),
        node,
        Duration::from_secs(2),
    ))
}

fn standby_witness(addr: &str) -> Option<WitnessConfig> {
    Some(WitnessConfig {
        client: client(addr, "test-standby"),
        vm: VM.into(),
    })
}

/// The primary's lease renewals, every 50 ms, until the handle is dropped.
struct Holding(tokio::task::JoinHandle<()>);

impl Drop for Holding {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn hold(primary: &Arc<WitnessClient>, generation: u64) -> Holding {
    let primary = Arc::clone(primary);
    Holding(tokio::spawn(async move {
        loop {
            let answer = primary
                .ask(&Request::Hold {
                    vm: VM.into(),
                    generation,
                })
                .await;
            assert!(matches!(answer, Ok(Answer::Held { .. })), "{answer:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_link_while_the_witness_hears_the_primary_is_no_takeover() {
    let witness = witness_at("127.0.0.1:0").await;
    let primary = client(&witness.addr, "test-primary");
    let holding = hold(&primary, 1);
    let standby = start_standby_with("quorum-heard", 1, standby_witness(&witness.addr)).await;
    let link = committed_primary(standby.addr).await;
    // The A-link closes (a FIN: the primary's socket, not its node).
    drop(link);
    until(&standby, "a claim the witness holds back", |s| {
        s.state == FtState::Claiming && s.counters.claims_refused >= 1
    })
    .await;
    assert!(
        !standby.task.is_finished(),
        "no takeover while the primary is heard"
    );
    // The primary goes on alone: the witness confirms it (generation 2).
    let confirmed = primary
        .ask(&Request::Confirm {
            vm: VM.into(),
            generation: 1,
        })
        .await
        .unwrap();
    assert!(
        matches!(confirmed, Answer::Confirmed { generation: 2, .. }),
        "{confirmed:?}"
    );
    drop(holding);
    let _holding = hold(&primary, 2);
    until(&standby, "the stale replica dropped", |s| {
        s.state == FtState::Waiting && s.message.as_deref().is_some_and(|m| m.contains("stale"))
    })
    .await;
    assert!(
        !standby.task.is_finished(),
        "a stale replica is never promoted"
    );
    // The standby now refuses the old generation and serves the new one.
    let mut old = primary_beginning(standby.addr, 1).await;
    let answer = tokio::time::timeout(WITHIN, old.recv()).await.unwrap();
    assert!(
        answer.is_err(),
        "a generation-1 session was served: {answer:?}"
    );
    until(&standby, "the generation-1 session refused", |s| {
        s.message
            .as_deref()
            .is_some_and(|m| m.contains("stale primary"))
    })
    .await;
    let mut current = synced_primary_of(standby.addr, 2).await;
    send(&current, &epoch_frames_of(1, 2, 0x33, b"two")).await;
    expect_ack(&mut current, 1).await;
    standby.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_primary_is_taken_over_with_the_granted_generation() {
    let witness = witness_at("127.0.0.1:0").await;
    let primary = client(&witness.addr, "test-primary");
    let holding = hold(&primary, 1);
    let standby = start_standby_with("quorum-silent", 1, standby_witness(&witness.addr)).await;
    let link = committed_primary(standby.addr).await;
    // The primary's node dies: the A-link and the witness hear nothing more.
    drop(holding);
    drop(primary);
    drop(link);
    let replica = taken_over(standby.task).await;
    assert_eq!((replica.epoch, replica.generation), (1, 2));
    assert_eq!(page5(&replica), 0x22);
    // The grant is the promoted copy's first lease (its output need not
    // wait for a renewal): half the witness's silence, from the claim.
    let lease = replica.granted_lease.expect("the grant carries a lease");
    assert_eq!(lease.length, SILENCE / 2);
    assert!(lease.until <= std::time::Instant::now() + lease.length);
    let shown = client(&witness.addr, "observer")
        .ask(&Request::Show)
        .await
        .unwrap();
    let Answer::Records { records, .. } = shown else {
        panic!("{shown:?}")
    };
    assert_eq!(
        (records[0].generation, records[0].owner.as_str()),
        (2, "test-standby")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_witness_there_is_no_takeover_until_it_answers() {
    // The witness's address is known but nothing listens there yet.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let standby = start_standby_with("quorum-away", 1, standby_witness(&addr)).await;
    let link = committed_primary(standby.addr).await;
    drop(link);
    until(&standby, "a claim without a witness", |s| {
        s.state == FtState::Claiming
            && s.message
                .as_deref()
                .is_some_and(|m| m.contains("cannot reach the witness"))
    })
    .await;
    assert!(!standby.task.is_finished(), "no takeover without a grant");
    let _witness = witness_at(&addr).await;
    let replica = taken_over(standby.task).await;
    assert_eq!((replica.epoch, replica.generation), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_of_an_older_generation_is_refused() {
    let standby = start_standby_with("stale-primary", 3, None).await;
    let mut stale = primary_beginning(standby.addr, 2).await;
    let answer = tokio::time::timeout(WITHIN, stale.recv()).await.unwrap();
    assert!(answer.is_err(), "a stale primary was served: {answer:?}");
    until(&standby, "the stale primary refused", |s| {
        s.state == FtState::Waiting
            && s.message
                .as_deref()
                .is_some_and(|m| m.contains("generation 2 was refused"))
    })
    .await;
    // Frames of another generation inside a session are refused too.
    let mut current = synced_primary_of(standby.addr, 3).await;
    send(&current, &epoch_frames_of(1, 3, 0x22, b"one")).await;
    expect_ack(&mut current, 1).await;
    // (The standby closes at the first foreign frame: later sends may fail.)
    for frame in epoch_frames_of(2, 2, 0x33, b"two") {
        if current.send(&frame).await.is_err() {
            break;
        }
    }
    let answer = tokio::time::timeout(WITHIN, current.recv()).await.unwrap();
    assert!(
        answer.is_err(),
        "a generation-2 epoch was acknowledged: {answer:?}"
    );
    until(&standby, "the foreign epoch refused", |s| {
        s.counters.epochs_rejected == 1 && s.counters.epochs_applied == 1
    })
    .await;
    assert!(
        !standby.task.is_finished(),
        "a refused epoch is no takeover"
    );
    standby.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_back_with_a_new_session_ends_the_claim() {
    let witness = witness_at("127.0.0.1:0").await;
    let primary = client(&witness.addr, "test-primary");
    let _holding = hold(&primary, 1);
    let standby = start_standby_with("quorum-back", 1, standby_witness(&witness.addr)).await;
    let link = committed_primary(standby.addr).await;
    drop(link);
    until(&standby, "a claim the witness holds back", |s| {
        s.state == FtState::Claiming
    })
    .await;
    let mut again = synced_primary(standby.addr).await;
    send(&again, &epoch_frames(1, 0x44, b"new")).await;
    expect_ack(&mut again, 1).await;
    let status = standby.status.snapshot();
    assert_eq!(status.state, FtState::StandingBy, "{status:?}");
    assert!(!standby.task.is_finished());
    standby.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_can_force_a_takeover_the_witness_cannot_grant() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let standby = start_standby_with("quorum-forced", 1, standby_witness(&addr)).await;
    let link = committed_primary(standby.addr).await;
    drop(link);
    until(&standby, "a claim without a witness", |s| {
        s.state == FtState::Claiming
    })
    .await;
    standby.force.notify_one();
    let replica = taken_over(standby.task).await;
    assert_eq!((replica.epoch, replica.generation), (1, 2));
    assert_eq!(
        replica.granted_lease, None,
        "a forced takeover has no lease"
    );
    let status = standby.status.snapshot();
    assert!(
        status
            .witness
            .as_deref()
            .is_some_and(|w| w.contains("forced by the operator")),
        "{status:?}"
    );
}
