//! Each fault of the relay between two real, authenticated A-link ends on
//! loopback, and what the receiving end observes.
//!
//! On a plaintext link (the option for a dedicated cable) the link itself
//! catches what breaks a frame (a flipped byte anywhere, at once), a reset,
//! a FIN and silence; a frame dropped, duplicated or reordered whole passes
//! the link unnoticed (its frames carry no sequence number): the
//! replication protocol catches those (`replicator/tests/relay_faults.rs`);
//! and a frame rewritten by someone who knows the format (its CRCs
//! recomputed) passes as genuine.
//!
//! On a sealed link (the default, see `ft_link::seal`) each of those ends
//! the link at the receiving end: a record dropped, repeated, reordered,
//! rewritten or injected does not open.

use std::io;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fault_relay::{Direction, Fault, Relay};
use ft_link::seal::Protection;
use ft_link::{
    CpuFeatureSummary, Frame, FrameError, FrameKind, Hello, Link, LinkConfig, LinkError,
    LinkListener, PairSecret, Role,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bounds every wait for something that must happen.
const WITHIN: Duration = Duration::from_secs(10);
/// Message kinds the tests send (opaque to the link).
const FIRST: u8 = 64;
const SECOND: u8 = 65;
const THIRD: u8 = 66;

fn config(role: Role, heartbeat_timeout: Duration) -> LinkConfig {
    let hello = Hello::new(
        format!("relay-test-{role}"),
        role,
        CpuFeatureSummary {
            name: "x86-64-v2".into(),
            words: vec![1, 2, 3],
        },
        "relay-test-vm",
    );
    let secret = PairSecret::new(b"fault-relay-test-pair-secret-0123".to_vec()).unwrap();
    let mut c = LinkConfig::new(secret, hello).with_heartbeat_timeout(heartbeat_timeout);
    // Pulses (UDP, straight to the peer) would go around the TCP relay.
    c.pulses = false;
    // The relay sees each frame (a sealed link: `sealed_config`).
    c.protection = Protection::Plaintext;
    c
}

fn sealed_config(role: Role, heartbeat_timeout: Duration) -> LinkConfig {
    LinkConfig {
        protection: Protection::Sealed,
        ..config(role, heartbeat_timeout)
    }
}

/// A standby's listener and a relay to it.
async fn relayed(heartbeat_timeout: Duration) -> (Relay, LinkListener) {
    relayed_with(config(Role::Standby, heartbeat_timeout)).await
}

async fn relayed_with(standby: LinkConfig) -> (Relay, LinkListener) {
    let listener = LinkListener::bind("127.0.0.1:0", standby).await.unwrap();
    let relay = Relay::start("127.0.0.1:0", listener.local_addr().unwrap())
        .await
        .unwrap();
    (relay, listener)
}

/// A primary connected through `relay` and the standby's end: (primary,
/// standby).
async fn pair(relay: &Relay, listener: &LinkListener, heartbeat_timeout: Duration) -> (Link, Link) {
    pair_with(relay, listener, config(Role::Primary, heartbeat_timeout)).await
}

async fn pair_with(
    relay: &Relay,
    listener: &LinkListener,
    primary_config: LinkConfig,
) -> (Link, Link) {
    let (primary, standby) = tokio::time::timeout(WITHIN, async {
        tokio::join!(
            Link::connect(relay.local_addr(), &primary_config),
            listener.accept()
        )
    })
    .await
    .expect("handshake through the relay in time");
    (primary.expect("primary end"), standby.expect("standby end"))
}

fn message(code: u8, epoch: u64, len: usize) -> Frame {
    Frame::message(code, epoch, 1, vec![code; len]).unwrap()
}

async fn recv(link: &mut Link) -> Result<Frame, LinkError> {
    tokio::time::timeout(WITHIN, link.recv())
        .await
        .expect("recv returns in time")
}

fn is_reset(result: &Result<Frame, LinkError>) -> bool {
    matches!(
        result,
        Err(LinkError::Receive { source, .. }) if source.kind() == io::ErrorKind::ConnectionReset
    )
}

#[tokio::test]
async fn without_a_fault_every_byte_goes_on_unchanged() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = Relay::start("127.0.0.1:0", target.local_addr().unwrap())
        .await
        .unwrap();
    let frames = [
        Frame::new(FrameKind::Heartbeat, 0, Bytes::new()),
        message(FIRST, 1, 10),
        message(SECOND, 1, 70_000),
        message(THIRD, 2, 0),
    ];
    let mut stream = BytesMut::new();
    for f in &frames {
        f.encode(&mut stream).unwrap();
    }
    let mut client = TcpStream::connect(relay.local_addr()).await.unwrap();
    let (mut server, _) = target.accept().await.unwrap();
    // Frames written in pieces that cut headers and payloads anywhere.
    let sending = stream.clone();
    let writer = tokio::spawn(async move {
        let (mut at, mut piece) = (0, 1);
        while at < sending.len() {
            let end = (at + piece).min(sending.len());
            client.write_all(&sending[at..end]).await.unwrap();
            (at, piece) = (end, piece * 3 + 1);
        }
        // The other way: not A-link frames at all.
        let mut answer = Vec::new();
        client.shutdown().await.unwrap();
        client.read_to_end(&mut answer).await.unwrap();
        answer
    });
    let mut received = Vec::new();
    tokio::time::timeout(WITHIN, server.read_to_end(&mut received))
        .await
        .unwrap()
        .unwrap();
    assert!(received == stream[..], "the frames arrived changed");
    server.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    drop(server);
    let answer = tokio::time::timeout(WITHIN, writer).await.unwrap().unwrap();
    assert_eq!(answer, b"GET / HTTP/1.0\r\n\r\n");
    let counters = relay.handle().counters();
    assert_eq!(counters.up.frames, frames.len() as u64);
    assert_eq!(counters.up.bytes, stream.len() as u64);
    assert_eq!((counters.up.faults, counters.up.unframed_bytes), (0, 0));
    assert_eq!(
        (counters.down.frames, counters.down.unframed_bytes),
        (0, 18)
    );
    assert_eq!(counters.connections, 1);
}

/// A flipped bit anywhere in a frame, header fields included, is refused
/// by the receiving link at once, never waited on: the header's own check
/// (issue 9, defect 4) catches a flipped length before it is believed.
#[tokio::test]
async fn a_flipped_byte_anywhere_in_a_frame_is_refused_at_once() {
    // A long heartbeat timeout: a receiver left waiting would show.
    let timeout = Duration::from_secs(5);
    let (relay, listener) = relayed(timeout).await;
    let frame = message(FIRST, 7, 100);
    let header_check = |e: &FrameError| matches!(e, FrameError::HeaderChecksum { .. });
    #[allow(clippy::type_complexity)]
    let cases: [(&str, usize, u8, fn(&FrameError) -> bool); 12] = [
        ("magic", 0, 0x01, |e| matches!(e, FrameError::BadMagic(_))),
        ("version", 2, 0x01, |e| matches!(e, FrameError::Version(3))),
        ("kind", 3, 0x01, header_check),
        ("payload crc", 4, 0x01, header_check),
        ("epoch", 8, 0x01, header_check),
        ("generation", 16, 0x01, header_check),
        ("length, low byte", 24, 0x01, header_check),
        ("length, high byte (+16 MiB)", 27, 0x01, header_check),
        ("length, top bit (+2 GiB)", 27, 0x80, header_check),
        ("header check", 28, 0x01, header_check),
        ("payload", 32 + 50, 0x10, |e| {
            matches!(e, FrameError::Checksum { epoch: 7, .. })
        }),
        ("last payload byte", 131, 0x80, |e| {
            matches!(e, FrameError::Checksum { epoch: 7, .. })
        }),
    ];
    for (n, (field, offset, mask, expected)) in cases.into_iter().enumerate() {
        let (primary, mut standby) = pair(&relay, &listener, timeout).await;
        relay
            .handle()
            .inject_on(
                Direction::Up,
                Fault::FlipByte { offset, mask },
                FrameKind::Message(FIRST),
            )
            .unwrap();
        let sent = Instant::now();
        primary.send(&frame).await.unwrap();
        let refused = recv(&mut standby).await;
        let elapsed = sent.elapsed();
        match &refused {
            Err(LinkError::Corrupt { source, .. }) if expected(source) => {}
            other => panic!("{field} (byte {offset} ^ {mask:#04x}): {other:?}"),
        }
        assert!(
            elapsed < Duration::from_secs(1),
            "{field}: refused only after {elapsed:?}"
        );
        assert_eq!(relay.handle().counters().up.faults, n as u64 + 1);
    }
    assert_eq!(relay.handle().counters().up.pending, 0);
}

/// What the standby's end delivers of FIRST, SECOND, THIRD (sent in that
/// order) when `fault` hits the next frame of kind `on`.
async fn delivered_with(fault: Fault, on: u8) -> Vec<u8> {
    let timeout = Duration::from_secs(2);
    let (relay, listener) = relayed(timeout).await;
    let (primary, mut standby) = pair(&relay, &listener, timeout).await;
    relay
        .handle()
        .inject_on(Direction::Up, fault, FrameKind::Message(on))
        .unwrap();
    for code in [FIRST, SECOND, THIRD] {
        primary.send(&message(code, 1, 40)).await.unwrap();
    }
    let mut got = Vec::new();
    while !got.contains(&THIRD) {
        let frame = recv(&mut standby).await.expect("the link goes on");
        let FrameKind::Message(code) = frame.kind else {
            panic!("{frame:?}")
        };
        got.push(code);
    }
    // Nothing more arrives.
    let more = tokio::time::timeout(Duration::from_millis(200), standby.recv()).await;
    assert!(more.is_err(), "more arrived: {more:?}");
    let counters = relay.handle().counters();
    assert_eq!((counters.up.faults, counters.up.pending), (1, 0));
    got
}

#[tokio::test]
async fn a_dropped_frame_passes_the_link_unnoticed() {
    let got = delivered_with(Fault::Drop, SECOND).await;
    assert_eq!(got, [FIRST, THIRD]);
}

#[tokio::test]
async fn a_duplicated_frame_is_delivered_twice_by_the_link() {
    let got = delivered_with(Fault::Duplicate, SECOND).await;
    assert_eq!(got, [FIRST, SECOND, SECOND, THIRD]);
}

#[tokio::test]
async fn reordered_frames_are_delivered_swapped_by_the_link() {
    let got = delivered_with(Fault::Reorder, FIRST).await;
    assert_eq!(got, [SECOND, FIRST, THIRD]);
}

#[tokio::test]
async fn a_reset_gives_both_ends_a_connection_reset() {
    let timeout = Duration::from_secs(2);
    let (relay, listener) = relayed(timeout).await;
    let (mut primary, mut standby) = pair(&relay, &listener, timeout).await;
    relay
        .handle()
        .inject(Direction::Both, Fault::Reset)
        .unwrap();
    let (at_standby, at_primary) = (recv(&mut standby).await, recv(&mut primary).await);
    assert!(is_reset(&at_standby), "standby: {at_standby:?}");
    assert!(is_reset(&at_primary), "primary: {at_primary:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(relay.handle().counters().open, 0);
}

/// A reset right after a chosen frame: the receiver gets that frame, then
/// the reset (nothing after it).
#[tokio::test]
async fn a_reset_after_a_chosen_frame_comes_right_after_it() {
    let timeout = Duration::from_secs(2);
    let (relay, listener) = relayed(timeout).await;
    let (primary, mut standby) = pair(&relay, &listener, timeout).await;
    relay
        .handle()
        .inject_on(Direction::Up, Fault::Reset, FrameKind::Message(SECOND))
        .unwrap();
    for code in [FIRST, SECOND, THIRD] {
        let _ = primary.send(&message(code, 1, 40)).await;
    }
    assert_eq!(recv(&mut standby).await.unwrap().kind.code(), FIRST);
    assert_eq!(recv(&mut standby).await.unwrap().kind.code(), SECOND);
    let after = recv(&mut standby).await;
    assert!(is_reset(&after), "{after:?}");
}

/// A FIN towards the standby: it reads the end of the stream (a closed
/// link, not a truncated frame), closes in turn, and the primary reads
/// the end too. Frames sent after the FIN never arrive.
#[tokio::test]
async fn a_fin_gives_the_receiver_a_closed_link() {
    let timeout = Duration::from_secs(2);
    let (relay, listener) = relayed(timeout).await;
    let (mut primary, mut standby) = pair(&relay, &listener, timeout).await;
    let before = relay.handle().counters().up.frames;
    relay.handle().inject(Direction::Up, Fault::Fin).unwrap();
    let _ = primary.send(&message(FIRST, 1, 40)).await;
    let at_standby = recv(&mut standby).await;
    assert!(
        matches!(at_standby, Err(LinkError::PeerClosed { .. })),
        "standby: {at_standby:?}"
    );
    let at_primary = recv(&mut primary).await;
    assert!(
        matches!(at_primary, Err(LinkError::PeerClosed { .. })),
        "primary: {at_primary:?}"
    );
    assert_eq!(relay.handle().counters().up.frames, before);
}

/// Both ways stalled (an unplugged cable, no FIN, no RST): each end
/// declares the other silent after its heartbeat timeout.
#[tokio::test]
async fn a_stall_makes_both_ends_declare_the_peer_silent_after_the_timeout() {
    let timeout = Duration::from_millis(400);
    let (relay, listener) = relayed(timeout).await;
    let (mut primary, mut standby) = pair(&relay, &listener, timeout).await;
    relay
        .handle()
        .inject(Direction::Both, Fault::Stall)
        .unwrap();
    let stalled = Instant::now();
    let (at_standby, at_primary) = tokio::join!(recv(&mut standby), recv(&mut primary));
    let elapsed = stalled.elapsed();
    for (end, result) in [("standby", at_standby), ("primary", at_primary)] {
        match result {
            Err(LinkError::PeerSilent { after, .. }) => {
                assert!(after >= timeout, "{end}: {after:?}")
            }
            other => panic!("{end}: {other:?}"),
        }
    }
    // The last heartbeat came at most an interval (80 ms) before the stall.
    assert!(
        elapsed >= timeout - Duration::from_millis(100),
        "silent after {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(2), "silent after {elapsed:?}");
    let counters = relay.handle().counters();
    assert!(counters.up.stalled && counters.down.stalled);
    assert_eq!(counters.open, 1, "the connection is held open");
}

/// A stall shorter than the heartbeat timeout is survived, and what was
/// sent meanwhile arrives on resume.
#[tokio::test]
async fn a_stall_shorter_than_the_timeout_is_survived() {
    let timeout = Duration::from_millis(600);
    let (relay, listener) = relayed(timeout).await;
    let (primary, mut standby) = pair(&relay, &listener, timeout).await;
    relay.handle().inject(Direction::Up, Fault::Stall).unwrap();
    primary.send(&message(FIRST, 1, 40)).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(200), standby.recv()).await;
    assert!(early.is_err(), "arrived during the stall: {early:?}");
    relay.handle().inject(Direction::Up, Fault::Resume).unwrap();
    assert_eq!(recv(&mut standby).await.unwrap(), message(FIRST, 1, 40));
}

/// A delay adds at least itself to a round trip, each way, order kept.
#[tokio::test]
async fn a_delay_adds_at_least_itself_to_a_round_trip() {
    let timeout = Duration::from_secs(2);
    let (relay, listener) = relayed(timeout).await;
    let (mut primary, mut standby) = pair(&relay, &listener, timeout).await;
    let (up, down) = (Duration::from_millis(120), Duration::from_millis(60));
    relay
        .handle()
        .inject(Direction::Up, Fault::Delay(up))
        .unwrap();
    relay
        .handle()
        .inject(Direction::Down, Fault::Delay(down))
        .unwrap();
    let sent = Instant::now();
    for epoch in 1..=20 {
        primary.send(&message(FIRST, epoch, 100)).await.unwrap();
    }
    for epoch in 1..=20 {
        let frame = recv(&mut standby).await.unwrap();
        assert_eq!(frame.epoch, epoch, "order kept");
        if epoch == 1 {
            assert!(sent.elapsed() >= up, "arrived after {:?}", sent.elapsed());
        }
    }
    standby.send(&message(THIRD, 20, 0)).await.unwrap();
    let answer = recv(&mut primary).await.unwrap();
    assert_eq!(answer.kind.code(), THIRD);
    let round_trip = sent.elapsed();
    assert!(round_trip >= up + down, "round trip {round_trip:?}");
    let counters = relay.handle().counters();
    assert_eq!((counters.up.delay, counters.down.delay), (up, down));
}

/// A plaintext link delivers a frame rewritten by someone who knows the
/// frame format (a page's byte changed, both CRCs recomputed) as genuine:
/// what the sealed link's tests below refuse.
#[tokio::test]
async fn a_plaintext_link_delivers_a_rewritten_frame_as_genuine() {
    let timeout = Duration::from_secs(5);
    let (relay, listener) = relayed(timeout).await;
    let (primary, mut standby) = pair(&relay, &listener, timeout).await;
    relay
        .handle()
        .inject_on(
            Direction::Up,
            Fault::Rewrite {
                offset: 32 + 10,
                mask: 0xff,
            },
            FrameKind::Message(FIRST),
        )
        .unwrap();
    primary.send(&message(FIRST, 1, 40)).await.unwrap();
    let got = recv(&mut standby).await.expect("delivered");
    assert_eq!(
        got.payload[10],
        FIRST ^ 0xff,
        "the rewrite reached the standby"
    );
}

/// A sealed primary and standby through the relay, the relay told to
/// apply `fault` to the next record the primary sends after the
/// handshake; what the standby's end returns for three messages.
async fn sealed_outcome(fault: Fault) -> Result<Vec<u8>, LinkError> {
    // Heartbeats rarely (a timeout of 10 s: one each 2 s), so that the
    // next record is the first message's.
    let timeout = Duration::from_secs(10);
    let (relay, listener) = relayed_with(sealed_config(Role::Standby, timeout)).await;
    let (primary, mut standby) =
        pair_with(&relay, &listener, sealed_config(Role::Primary, timeout)).await;
    assert_eq!(
        (primary.protection(), standby.protection()),
        (Protection::Sealed, Protection::Sealed)
    );
    relay
        .handle()
        .inject_on(Direction::Up, fault, FrameKind::Sealed)
        .unwrap();
    for code in [FIRST, SECOND, THIRD] {
        primary.send(&message(code, 1, 40)).await.unwrap();
    }
    let mut got = Vec::new();
    while !got.contains(&THIRD) {
        let frame = recv(&mut standby).await?;
        let FrameKind::Message(code) = frame.kind else {
            panic!("{frame:?}")
        };
        got.push(code);
    }
    Ok(got)
}

fn assert_refused(fault: &str, outcome: Result<Vec<u8>, LinkError>, what: fn(&LinkError) -> bool) {
    match outcome {
        Err(error) if what(&error) => {}
        other => panic!("{fault} on a sealed link: {other:?}"),
    }
}

fn unopened(error: &LinkError) -> bool {
    matches!(
        error,
        LinkError::Unsealed {
            source: ft_link::seal::SealError::Open { .. },
            ..
        }
    )
}

/// Issue 14: on a sealed link a record dropped, repeated, reordered or
/// rewritten (CRCs recomputed) does not open, and a plaintext frame put in
/// the stream (here: a record's kind byte rewritten to `Ack`, CRCs
/// recomputed: a forged acknowledgement) is refused as not sealed.
#[tokio::test]
async fn a_sealed_link_refuses_records_dropped_repeated_reordered_rewritten_or_injected() {
    assert_refused("drop", sealed_outcome(Fault::Drop).await, unopened);
    assert_refused(
        "duplicate",
        sealed_outcome(Fault::Duplicate).await,
        unopened,
    );
    assert_refused("reorder", sealed_outcome(Fault::Reorder).await, unopened);
    assert_refused(
        "rewrite",
        sealed_outcome(Fault::Rewrite {
            offset: 32 + 20,
            mask: 0x01,
        })
        .await,
        unopened,
    );
    let to_ack = FrameKind::Sealed.code() ^ 72;
    assert_refused(
        "forged Ack",
        sealed_outcome(Fault::Rewrite {
            offset: 3,
            mask: to_ack,
        })
        .await,
        |e| {
            matches!(
                e,
                LinkError::NotSealed {
                    kind: FrameKind::Message(72),
                    ..
                }
            )
        },
    );
}
