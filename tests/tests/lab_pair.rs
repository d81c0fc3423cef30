//! The lab pair itself: both nodes up, the A-link and the business network
//! carry data, a pulled node is gone while its peer keeps answering, and a
//! cut link stops traffic until it is healed.

use std::time::Duration;

use ft_tests::{LabPair, LinkId, NodeId};

#[test]
fn links_carry_data_and_a_pulled_node_is_gone_while_its_peer_answers() {
    let lab = LabPair::start("e2e");

    // Node a to node b over the A-link, and back the other way.
    let ab = lab
        .send_over_alink(NodeId::A, NodeId::B, 4 << 20, 30)
        .expect("a -> b");
    assert_eq!(ab.bytes, 4 << 20);
    let ba = lab
        .send_over_alink(NodeId::B, NodeId::A, 1 << 20, 30)
        .expect("b -> a");
    assert_eq!(ba.bytes, 1 << 20);
    eprintln!("[e2e] A-link a->b: {:.1} MB/s", ab.mbytes_per_sec);

    // The outer host to each node over the business network.
    for node in NodeId::ALL {
        let r = lab
            .send_over_biz(node, 2 << 20, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("host -> {node} over the business network: {e}"));
        assert_eq!(r.bytes, 2 << 20);
        eprintln!(
            "[e2e] business network host->{node}: {:.1} MB/s",
            r.mbytes_per_sec
        );
    }

    // The nodes have their own disks: a file written on a is not on b.
    lab.sh(NodeId::A, "echo from-a > /data/owner && sync");
    assert_eq!(lab.sh(NodeId::A, "cat /data/owner"), "from-a\n");
    assert_eq!(
        lab.sh(NodeId::B, "cat /data/owner 2>/dev/null || echo none"),
        "none\n"
    );

    lab.pull(NodeId::B);
    assert!(
        !lab.is_running(NodeId::B),
        "node b's QEMU still runs after the pull"
    );
    assert!(
        lab.send_over_biz(NodeId::B, 1000, Duration::from_secs(2))
            .is_err(),
        "node b still answers on the business network after the pull"
    );
    assert!(
        lab.send_over_alink(NodeId::A, NodeId::B, 1000, 3).is_err(),
        "node b still answers on the A-link after the pull"
    );
    assert!(lab
        .lab()
        .exec(NodeId::B, &["true"], Duration::from_secs(5))
        .is_err());

    // Node a keeps answering on every path.
    assert_eq!(lab.sh(NodeId::A, "echo alive"), "alive\n");
    lab.send_over_biz(NodeId::A, 1 << 20, Duration::from_secs(30))
        .expect("node a over the business network after b was pulled");
    assert_eq!(lab.sh(NodeId::A, "cat /data/owner"), "from-a\n");
}

#[test]
fn a_cut_alink_carries_nothing_until_healed() {
    let lab = LabPair::start("e2e");
    lab.send_over_alink(NodeId::A, NodeId::B, 1 << 16, 30)
        .expect("before the cut");

    lab.set_link(LinkId::Alink, false);
    let cut = lab.send_over_alink(NodeId::A, NodeId::B, 1 << 16, 3);
    assert!(cut.is_err(), "data crossed a cut A-link: {cut:?}");
    // The business network is another link and still works.
    lab.send_over_biz(NodeId::B, 1 << 16, Duration::from_secs(30))
        .expect("business network while the A-link is cut");

    lab.set_link(LinkId::Alink, true);
    // A node whose neighbour lookups failed during the cut answers "no
    // route to host" until its next lookup succeeds: the healed link must
    // carry data again within a bounded time.
    let healed = std::time::Instant::now();
    loop {
        match lab.send_over_alink(NodeId::A, NodeId::B, 1 << 16, 30) {
            Ok(_) => break,
            Err(e) if healed.elapsed() < Duration::from_secs(30) => {
                eprintln!("[e2e] not yet after the heal: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("nothing crossed the healed A-link within 30 s: {e}"),
        }
    }
}
