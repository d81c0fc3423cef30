//! Helpers the link's tests share (configurations, a paired listener and
//! connector, frame encoding), and the tests of [`Link`] as a whole.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::*;
use crate::auth::PairSecret;
use crate::hello::{CpuFeatureSummary, Role};
use crate::seal::Protection;

pub(super) const SECRET: &[u8] = b"pair-secret-0123456789-abcdefgh";
/// Bounds every wait for an event that must happen.
pub(super) const WITHIN: Duration = Duration::from_secs(5);

/// `config` for a link in plaintext (tests of the plaintext framing and
/// handshake, and raw peers that speak it).
pub(super) fn plaintext(mut config: LinkConfig) -> LinkConfig {
    config.protection = crate::seal::Protection::Plaintext;
    config
}

pub(super) fn config(name: &str, role: Role, secret: &[u8]) -> LinkConfig {
    let hello = Hello::new(
        name,
        role,
        CpuFeatureSummary {
            name: "baseline-v1".into(),
            words: vec![0x0000_1fff, 0xdead_beef, 7],
        },
        "vm-sha256:0f0f",
    );
    let mut config = LinkConfig::new(PairSecret::new(secret.to_vec()).unwrap(), hello);
    config.heartbeat_interval = Duration::from_millis(50);
    config.heartbeat_timeout = Duration::from_millis(300);
    config
}

/// Pairs a listener with `accepting` and a connector with `connecting`;
/// returns both handshake results.
pub(super) async fn pair(
    accepting: LinkConfig,
    connecting: LinkConfig,
) -> (Result<Link, LinkError>, Result<Link, LinkError>) {
    let listener = LinkListener::bind("127.0.0.1:0", accepting).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::time::timeout(WITHIN, async {
        tokio::join!(listener.accept(), Link::connect(addr, &connecting))
    })
    .await
    .expect("handshake finished")
}

pub(super) fn encoded(frame: &Frame) -> BytesMut {
    let mut out = BytesMut::new();
    frame.encode(&mut out).unwrap();
    out
}

#[tokio::test]
async fn frames_round_trip_in_order() {
    for protection in [Protection::Sealed, Protection::Plaintext] {
        frames_round_trip_in_order_when(protection).await;
    }
}

async fn frames_round_trip_in_order_when(protection: Protection) {
    let (mut a, mut b) = (
        config("node-a", Role::Primary, SECRET),
        config("node-b", Role::Standby, SECRET),
    );
    (a.protection, b.protection) = (protection, protection);
    let (accepted, connected) = pair(a, b).await;
    let (primary, mut standby) = (accepted.unwrap(), connected.unwrap());
    assert_eq!(
        (primary.protection(), standby.protection()),
        (protection, protection)
    );
    let frames: Vec<Frame> = (1..=50u64)
        .flat_map(|epoch| {
            [
                Frame::message(64, epoch, 1, vec![epoch as u8; 16]).unwrap(),
                Frame::message(65, epoch, 1, vec![epoch as u8; 70_000]).unwrap(),
                Frame::message(66, epoch, 1, Bytes::new()).unwrap(),
            ]
        })
        .collect();
    let sent = frames.clone();
    let sending = tokio::spawn(async move {
        for frame in &sent {
            primary.send(frame).await.unwrap();
        }
        primary
    });
    let mut got = Vec::new();
    for _ in 0..frames.len() {
        got.push(
            tokio::time::timeout(WITHIN, standby.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(got, frames);
    let primary = sending.await.unwrap();
    // And back.
    let ack = Frame::message(67, 50, 1, Bytes::new()).unwrap();
    standby.send(&ack).await.unwrap();
    let (_, mut primary_rx) = primary.split();
    assert_eq!(
        tokio::time::timeout(WITHIN, primary_rx.recv())
            .await
            .unwrap()
            .unwrap(),
        ack
    );
}

/// A TCP relay between `to` and whoever connects to the returned address,
/// keeping a copy of every byte either way.
async fn recording_relay(
    to: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let target = TcpStream::connect(to).await.unwrap();
        let (cr, cw) = client.into_split();
        let (tr, tw) = target.into_split();
        let copy = |mut from: tokio::net::tcp::OwnedReadHalf,
                    mut into: tokio::net::tcp::OwnedWriteHalf,
                    seen: Arc<std::sync::Mutex<Vec<u8>>>| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = from.read(&mut buf).await {
                if n == 0 || into.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        };
        let up = tokio::spawn(copy(cr, tw, Arc::clone(&record)));
        let down = tokio::spawn(copy(tr, cw, record));
        let _ = tokio::join!(up, down);
    });
    (addr, seen)
}

/// Issue 14: what a sealed link carries cannot be read off the wire (a
/// string "written in guest memory" and sent as a page frame, the peers'
/// node names from their Hellos), while a plaintext link shows both.
#[tokio::test]
async fn a_capture_of_a_sealed_link_does_not_contain_what_it_carries() {
    const GUEST: &[u8] = b"a known string the guest wrote in its memory";
    for protection in [Protection::Sealed, Protection::Plaintext] {
        let (mut a, mut b) = (
            config("node-sealed-a", Role::Primary, SECRET),
            config("node-sealed-b", Role::Standby, SECRET),
        );
        (a.protection, b.protection) = (protection, protection);
        let listener = LinkListener::bind("127.0.0.1:0", a).await.unwrap();
        let (relay, seen) = recording_relay(listener.local_addr().unwrap()).await;
        let (accepted, connected) = tokio::time::timeout(WITHIN, async {
            tokio::join!(listener.accept(), Link::connect(relay, &b))
        })
        .await
        .expect("handshake finished");
        let (mut accepted, connected) = (accepted.unwrap(), connected.unwrap());
        let mut page = vec![0u8; 4096];
        page[100..100 + GUEST.len()].copy_from_slice(GUEST);
        connected
            .send(&Frame::message(69, 3, 1, page).unwrap())
            .await
            .unwrap();
        let got = tokio::time::timeout(WITHIN, accepted.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got.payload[100..100 + GUEST.len()], GUEST);
        let wire = seen.lock().unwrap().clone();
        let shows = |what: &[u8]| wire.windows(what.len()).any(|w| w == what);
        let sealed = protection == Protection::Sealed;
        assert_eq!(shows(GUEST), !sealed, "{}: guest memory", protection.name());
        assert_eq!(
            shows(b"node-sealed-b"),
            !sealed,
            "{}: Hello",
            protection.name()
        );
    }
}

/// Both ends must protect the link the same way: a mismatch is refused
/// on both sides, and says what to do.
#[tokio::test]
async fn a_sealed_node_and_a_plaintext_node_refuse_to_pair_and_say_why() {
    for (accepting, connecting) in [
        (Protection::Sealed, Protection::Plaintext),
        (Protection::Plaintext, Protection::Sealed),
    ] {
        let (mut a, mut b) = (
            config("node-a", Role::Primary, SECRET),
            config("node-b", Role::Standby, SECRET),
        );
        (a.protection, b.protection) = (accepting, connecting);
        let (accepted, connected) = pair(a, b).await;
        for (side, result) in [("accepting", accepted), ("connecting", connected)] {
            let error = result.err().unwrap_or_else(|| panic!("{side}: paired"));
            let text = error.to_string();
            assert!(
                matches!(error, LinkError::ProtectionMismatch { .. })
                    || matches!(&error, LinkError::PeerRefused { reason, .. }
                        if reason.to_string().contains("set the same mode on both nodes")),
                "{side} ({} against {}): {text}",
                accepting.name(),
                connecting.name()
            );
        }
    }
}

/// A standby busy applying an epoch when its primary died reads bytes that
/// arrived before the death: while pulses arrive they count as heard when
/// they arrived, so the silence (and the primary's last arrival, from which
/// a promoted standby keeps what it overheard) is not put off by the
/// backlog. Without pulses, or once they stopped coming (a firewall, a
/// relay), they count when read: a receiver that fell behind may have held
/// its peer back, and nothing else shows that the peer lived.
#[tokio::test]
async fn bytes_count_as_heard_when_they_arrived_while_pulses_arrive() {
    for (pulses, pulses_stop) in [(true, false), (true, true), (false, false)] {
        let (mut a, mut b) = (
            config("node-a", Role::Primary, SECRET),
            config("node-b", Role::Standby, SECRET),
        );
        (a.pulses, b.pulses) = (pulses, pulses);
        let (accepted, connected) = pair(a, b).await;
        let (primary, mut standby) = (accepted.unwrap(), connected.unwrap());
        assert_eq!(standby.receiver.stamped.is_some(), pulses);
        // A first frame, and a moment for the kernel to switch its
        // receive stamps on (it may defer that to a work queue) and for
        // the first pulses to come.
        let warm = Frame::message(64, 1, 1, Bytes::new()).unwrap();
        primary.send(&warm).await.unwrap();
        assert_eq!(standby.recv().await.unwrap(), warm);
        tokio::time::sleep(Duration::from_millis(120)).await;
        if pulses_stop {
            // The primary's pulses stop; its connection goes on past the
            // silence timeout (300 ms).
            lock_pulses(&primary).take();
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        // Well within the receive window: all of it arrives at once.
        let frame = Frame::message(65, 1, 1, vec![7u8; 16_000]).unwrap();
        primary.send(&frame).await.unwrap();
        let sent = std::time::Instant::now();
        // The primary dies: no byte and no pulse after this.
        drop(primary);
        // The standby is busy elsewhere meanwhile, past the silence
        // timeout (300 ms).
        tokio::time::sleep(Duration::from_millis(450)).await;
        let got = tokio::time::timeout(WITHIN, standby.recv())
            .await
            .unwrap()
            .unwrap();
        let read = std::time::Instant::now();
        assert_eq!(got, frame);
        let heard = standby.liveness().last_arrival();
        if pulses && !pulses_stop {
            assert!(
                heard < sent + Duration::from_millis(100),
                "heard {:?} after the send, read {:?} after it",
                heard.saturating_duration_since(sent),
                read - sent
            );
        } else {
            assert!(
                heard + Duration::from_millis(100) > read,
                "without pulses (pulses {pulses}, stopped {pulses_stop}) bytes count when \
                 read: heard {:?} after the send, read {:?} after it",
                heard.saturating_duration_since(sent),
                read - sent
            );
        }
    }
}

fn lock_pulses(link: &Link) -> std::sync::MutexGuard<'_, Option<crate::pulse::Pulses>> {
    link.sender.pulses.lock().unwrap_or_else(|p| p.into_inner())
}

/// A session may judge its peer silent after longer than the link's
/// timeout for a while (a standby before its first committed epoch).
#[tokio::test]
async fn the_silence_timeout_can_be_lengthened() {
    let (accepted, connected) = pair(
        config("node-a", Role::Primary, SECRET),
        config("node-b", Role::Standby, SECRET),
    )
    .await;
    let (primary, mut standby) = (accepted.unwrap(), connected.unwrap());
    standby.set_silence_timeout(Duration::from_millis(900));
    // The primary falls silent (no pulses, no heartbeats) but stays
    // connected.
    lock_pulses(&primary).take();
    primary.sender.heartbeats.abort();
    let silent_from = std::time::Instant::now();
    let error = tokio::time::timeout(WITHIN, standby.recv())
        .await
        .unwrap()
        .unwrap_err();
    let after = silent_from.elapsed();
    assert!(matches!(error, LinkError::PeerSilent { .. }), "{error}");
    assert!(
        after > Duration::from_millis(800),
        "silent after {after:?}: the link's own 300 ms, not the 900 ms asked"
    );
}
