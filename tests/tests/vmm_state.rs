//! ftvmm's state capture, restore in a new process, and dirty tracking, with
//! a real guest under kvm_amd in a lab node.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ft_tests::guest::NodeGuest;
use ft_tests::{LabPair, NodeId};

/// The counter values on the console (a line may start with the shell's prompt).
fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.split_once("ft-counter ")?.1.trim().parse().ok())
        .collect()
}

/// Capture, kill the VMM, restore in a new process, many times over: the
/// guest's counter continues where the capture left it, never restarts.
#[test]
fn a_captured_guest_continues_in_a_new_process_every_time() {
    let loops: u32 = std::env::var("FT_RESTORE_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let lab = LabPair::start_nodes("e2e", &[NodeId::A]);
    let mut guest = NodeGuest::boot(&lab, NodeId::A, 1, 128, "ftguest.run=/bin/ft-counter");
    guest.wait_for_line(Duration::from_secs(90), |l| l.starts_with("ft-counter 5"));
    let mut restore_secs = Vec::new();
    for i in 0..loops {
        let before = *counts(&guest.console_text())
            .last()
            .expect("the counter runs");
        let captured = guest.ctl("capture /tmp/snap");
        guest.kill();
        let start = Instant::now();
        guest.restore("/tmp/snap");
        let first = guest.wait_for_line(Duration::from_secs(60), |l| !counts(l).is_empty());
        restore_secs.push(start.elapsed().as_secs_f64());
        // Let it count a little, then check the sequence.
        std::thread::sleep(Duration::from_millis(500));
        let after = counts(&guest.console_text());
        let first = counts(&first)[0];
        assert!(
            first >= before && first <= before + 20,
            "round {i}: counted {before} before the capture, {first} first after the restore"
        );
        assert!(
            after.windows(2).all(|w| w[1] == w[0] + 1),
            "round {i}: the count jumped or restarted after the restore: {after:?}"
        );
        eprintln!(
            "[e2e] round {i}: count {before} -> {first}, guest stopped {} ms for the capture",
            captured["times"]["stopped_us"].as_u64().unwrap_or(0) / 1000
        );
    }
    restore_secs.sort_by(f64::total_cmp);
    if let Some(median) = restore_secs.get(restore_secs.len() / 2) {
        eprintln!(
            "[e2e] {loops} restores, median {median:.2}s from restore command to first count"
        );
    }
}

/// A guest program writes a known set of pages: the harvest holds all of
/// them; a harvest of an idle guest right after holds almost nothing.
#[test]
fn the_dirty_harvest_holds_the_pages_the_guest_wrote() {
    const PAGES: usize = 512;
    let lab = LabPair::start_nodes("e2e", &[NodeId::A]);
    let guest = NodeGuest::boot(
        &lab,
        NodeId::A,
        1,
        256,
        &format!("ftguest.run=/bin/ft-dirtier,known-pages,--pages,{PAGES},--delay-secs,8"),
    );
    // The console shell's prompt may share the line: look for the marker.
    let line = guest.wait_for_line(Duration::from_secs(90), |l| {
        l.contains("ft-dirtier frames ")
    });
    let seen_at = Instant::now();
    let (_, list) = line.split_once("ft-dirtier frames ").expect("marker");
    let frames: BTreeSet<u64> = list
        .trim()
        .split(',')
        .map(|f| f.parse().expect("frame number"))
        .collect();
    assert_eq!(frames.len(), PAGES, "the guest's pages are distinct frames");

    // Everything before the writes goes into this first harvest.
    let first = guest.ctl("harvest");
    assert!(
        seen_at.elapsed() < Duration::from_secs(6),
        "the baseline harvest came too late to precede the guest's writes"
    );
    assert!(
        !guest.console_text().contains("ft-dirtier wrote")
            || seen_at.elapsed() < Duration::from_secs(8),
        "the guest wrote before the baseline harvest"
    );
    guest.wait_for_line(Duration::from_secs(30), |l| l.contains("ft-dirtier wrote"));
    let second = guest.ctl("harvest --pages-file /tmp/harvest.txt");
    let harvested: BTreeSet<u64> = lab
        .sh(NodeId::A, "cat /tmp/harvest.txt")
        .lines()
        .map(|l| l.parse().expect("page number"))
        .collect();
    let missing: Vec<&u64> = frames.difference(&harvested).collect();
    assert!(
        missing.is_empty(),
        "{} written pages missing from the harvest: {missing:?}",
        missing.len()
    );
    assert_eq!(harvested.len() as u64, second["pages"].as_u64().unwrap());

    std::thread::sleep(Duration::from_secs(1));
    let idle = guest.ctl("harvest");
    let idle_pages = idle["pages"].as_u64().unwrap();
    // An idle guest still runs its timer tick and scheduler: their data,
    // stacks and page tables are the few pages it keeps dirtying.
    assert!(
        idle_pages < PAGES as u64 / 2,
        "an idle guest dirtied {idle_pages} pages in a second"
    );
    eprintln!(
        "[e2e] dirty: baseline harvest {} pages (first harvest after boot: every page), \
         after writing {PAGES} pages: {} harvested ({} beyond the written set: the writer's \
         page tables and stack, kernel timer and scheduler data, console output), \
         idle second: {idle_pages}, harvest took {} us",
        first["pages"],
        harvested.len(),
        harvested.len() - PAGES,
        second["harvest_us"]
    );
    guest.kill();
}
