//! Helpers the link's tests share (configurations, a paired listener and
//! connector, frame encoding), and the tests of [`Link`] as a whole.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::*;
use crate::auth::PairSecret;
use crate::hello::{CpuFeatureSummary, Role};

pub(super) const SECRET: &[u8] = b"pair-secret-0123456789-abcdefgh";
/// Bounds every wait for an event that must happen.
pub(super) const WITHIN: Duration = Duration::from_secs(5);

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
    let (accepted, connected) = pair(
        config("node-a", Role::Primary, SECRET),
        config("node-b", Role::Standby, SECRET),
    )
    .await;
    let (primary, mut standby) = (accepted.unwrap(), connected.unwrap());
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
