//! The witness service over real TCP on loopback: its rules as the nodes
//! meet them, its records across a restart, and bad input.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ft_link::{Frame, Link, LinkConfig, LinkListener, PairSecret};
use witness::protocol::{client_hello, witness_hello, REQUEST_CODE};
use witness::registry::Timing;
use witness::server::{Server, ServerConfig};
use witness::{Answer, Request, WitnessClient, WitnessError};

const SILENCE: Duration = Duration::from_millis(300);

/// A claim's grant of `generation`: the new owner's first lease, half the
/// silence.
fn granted_with_lease(generation: u64) -> Answer {
    Answer::Granted {
        generation,
        lease_ms: SILENCE.as_millis() as u64 / 2,
    }
}

fn secret() -> PairSecret {
    PairSecret::new(b"witness-test-secret-0123456789".to_vec()).unwrap()
}

async fn start(dir: &Path, grace: Duration) -> (String, tokio::task::JoinHandle<()>) {
    let server = Server::bind(ServerConfig {
        listen: "127.0.0.1:0".into(),
        secret: secret(),
        name: "witness".into(),
        timing: Timing {
            silence: SILENCE,
            startup_grace: grace,
        },
        database: dir.join("witness.sqlite"),
    })
    .await
    .unwrap();
    let addr = server.local_addr().to_string();
    (addr, tokio::spawn(server.serve()))
}

fn client(addr: &str, node: &str) -> WitnessClient {
    WitnessClient::new(vec![addr.into()], secret(), node, Duration::from_secs(3))
}

fn hold(vm: &str, generation: u64) -> Request {
    Request::Hold {
        vm: vm.into(),
        generation,
    }
}

fn claim(vm: &str, generation: u64) -> Request {
    Request::Claim {
        vm: vm.into(),
        generation,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_refused_while_the_primary_is_heard_and_granted_after_its_silence() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, server) = start(dir.path(), Duration::ZERO).await;
    let primary = client(&addr, "a");
    let standby = client(&addr, "b");
    assert!(matches!(
        primary.ask(&hold("db", 1)).await.unwrap(),
        Answer::Held {
            generation: 1,
            lease_ms: 150
        }
    ));
    // The primary renews every 50 ms for 1.5 s; the standby claims meanwhile.
    let renewing = async {
        for _ in 0..30 {
            primary.ask(&hold("db", 1)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let claiming = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        standby.ask(&claim("db", 1)).await.unwrap()
    };
    let ((), answer) = tokio::join!(renewing, claiming);
    assert!(
        matches!(answer, Answer::OwnerHeard { ref owner, .. } if owner == "a"),
        "a claim over a heard primary must be refused, got {answer:?}"
    );
    // The primary falls silent (its process is gone: the connection closes).
    let last_heard = Instant::now();
    drop(primary);
    let answer = loop {
        match standby.ask(&claim("db", 1)).await.unwrap() {
            Answer::OwnerHeard { .. } => continue,
            other => break other,
        }
    };
    let waited = last_heard.elapsed();
    assert_eq!(
        answer,
        granted_with_lease(2),
        "a claim's grant is the new owner's first lease (half the silence)"
    );
    assert!(
        waited >= SILENCE - Duration::from_millis(60),
        "granted {waited:?} after the owner's last hold: a close is not a death, the silence must pass"
    );
    // The old primary, back, is told its generation is over.
    let old = client(&addr, "a");
    assert_eq!(
        old.ask(&hold("db", 1)).await.unwrap(),
        Answer::Superseded {
            generation: 2,
            owner: "b".into()
        }
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_and_a_claim_race_and_exactly_one_wins() {
    for round in 0..10u64 {
        let dir = tempfile::tempdir().unwrap();
        let (addr, server) = start(dir.path(), Duration::ZERO).await;
        let primary = client(&addr, "a");
        let standby = client(&addr, "b");
        primary.ask(&hold("db", 1)).await.unwrap();
        // Both lose the A-link; the primary stays heard by the witness for a
        // random part of the silence before it confirms.
        tokio::time::sleep(Duration::from_millis(round * 40)).await;
        let confirm = Request::Confirm {
            vm: "db".into(),
            generation: 1,
        };
        let claim = claim("db", 1);
        let (confirm, granted) = tokio::join!(primary.ask(&confirm), standby.ask(&claim));
        let confirm = confirm.unwrap();
        let granted = granted.unwrap();
        let primary_won = matches!(confirm, Answer::Confirmed { generation: 2, .. });
        let standby_won = matches!(granted, Answer::Granted { generation: 2, .. });
        assert!(
            primary_won != standby_won,
            "round {round}: exactly one may run on: {confirm:?} / {granted:?}"
        );
        server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_a_restart_and_no_claim_is_granted_in_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, server) = start(dir.path(), Duration::ZERO).await;
    client(&addr, "a").ask(&hold("db", 7)).await.unwrap();
    server.abort();
    let _ = server.await;
    let (addr, server) = start(dir.path(), Duration::from_secs(1)).await;
    let standby = client(&addr, "b");
    let started = Instant::now();
    let mut told_why = false;
    let answer = loop {
        match standby.ask(&claim("db", 7)).await.unwrap() {
            Answer::OwnerHeard { .. } => continue,
            Answer::Refused { reason } if reason.contains("started moments ago") => {
                told_why = true;
                continue;
            }
            other => break other,
        }
    };
    assert!(
        matches!(answer, Answer::Granted { generation: 8, lease_ms } if lease_ms > 0),
        "{answer:?}"
    );
    assert!(told_why, "a claim in the grace is told why it waits");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "granted {:?} after a restart: the owners' reconnection grace was skipped",
        started.elapsed()
    );
    let Answer::Records { records, .. } = standby.ask(&Request::Show).await.unwrap() else {
        panic!("show answers records");
    };
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].generation, records[0].owner.as_str()), (8, "b"));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_or_a_malformed_request_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, server) = start(dir.path(), Duration::ZERO).await;
    let intruder = WitnessClient::new(
        vec![addr.clone()],
        PairSecret::new(b"not-the-pair-secret-at-all-000".to_vec()).unwrap(),
        "a",
        Duration::from_secs(2),
    );
    let refused = intruder.ask(&hold("db", 99)).await;
    assert!(
        matches!(refused, Err(WitnessError::Unreachable(ref e)) if e.contains("uthentication")),
        "{refused:?}"
    );
    // A node that sends garbage is answered with a refusal and changes nothing.
    let config = LinkConfig::new(secret(), client_hello("a"));
    let mut link = Link::connect(addr.as_str(), &config).await.unwrap();
    let garbage = Frame::message(REQUEST_CODE, 0, 0, Bytes::from_static(b"{\"op\":")).unwrap();
    link.send(&garbage).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(2), link.recv())
        .await
        .unwrap()
        .unwrap();
    let (_, answer) = Answer::from_frame(&answer).unwrap();
    assert!(matches!(answer, Answer::Refused { .. }), "{answer:?}");
    let Answer::Records { records, .. } = client(&addr, "b").ask(&Request::Show).await.unwrap()
    else {
        panic!("show answers records");
    };
    assert!(records.is_empty(), "{records:?}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_claim_does_not_hold_up_another_nodes_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, server) = start(dir.path(), Duration::ZERO).await;
    let primary = client(&addr, "a");
    primary.ask(&hold("db", 1)).await.unwrap();
    let standby = client(&addr, "b");
    let claiming = tokio::spawn(async move { standby.ask(&claim("db", 1)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The claim is held open while the primary is heard (then granted once
    // it falls silent); the primary's hold is answered meanwhile.
    primary.ask(&hold("db", 1)).await.unwrap();
    assert!(
        !claiming.is_finished(),
        "the claim should still be waiting: the hold was answered behind it"
    );
    let answer = claiming.await.unwrap().unwrap();
    assert_eq!(
        answer,
        granted_with_lease(2),
        "a claim's grant is the new owner's first lease (half the silence)"
    );
    server.abort();
}

/// A witness that completes the handshake and then never answers; counts
/// the connections it accepted.
async fn mute_witness() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let config = LinkConfig::new(secret(), witness_hello("mute"));
    let listener = LinkListener::bind("127.0.0.1:0", config).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&accepted);
    let task = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok(link) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            open.push(link);
        }
    });
    (addr, accepted, task)
}

/// Waits (up to 10 s) until `accepted` reaches `want`; its value then.
async fn accepted_reaches(accepted: &AtomicUsize, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    while accepted.load(Ordering::SeqCst) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    accepted.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_given_up_by_its_caller_leaves_the_next_ask_a_new_connection() {
    let (addr, accepted, witness) = mute_witness().await;
    let node = WitnessClient::new(vec![addr], secret(), "a", Duration::from_secs(30));
    // Connected first, so that the caller's bound below covers only the
    // wait for the answer.
    node.connect().await.unwrap();
    assert_eq!(accepted_reaches(&accepted, 1).await, 1);
    // The caller's own bound (as the primary's fenced re-ask has) gives up
    // long before the client's answer time.
    let given_up = tokio::time::timeout(Duration::from_millis(200), node.ask(&hold("db", 1))).await;
    assert!(given_up.is_err(), "a mute witness answered: {given_up:?}");
    // The next request must not wait out the 30 s answer time on the
    // connection that already failed to answer: it opens a new one.
    node.connect().await.unwrap();
    assert_eq!(
        accepted_reaches(&accepted, 2).await,
        2,
        "the next request reused the connection its predecessor gave up on"
    );
    // A claim given up is different: a slow answer to a claim is normal, so
    // its connection is kept.
    let claim_given_up =
        tokio::time::timeout(Duration::from_millis(200), node.ask(&claim("db", 1))).await;
    assert!(claim_given_up.is_err());
    node.connect().await.unwrap();
    // A new connection would have been accepted by the time a hold on it
    // was; the mute witness never answers, so the hold is given up too.
    let _ = tokio::time::timeout(Duration::from_millis(200), node.ask(&hold("db", 1))).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a given-up claim must keep its connection"
    );
    witness.abort();
}
