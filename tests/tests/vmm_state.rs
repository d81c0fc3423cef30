//! ftvmm's state capture, restore in a new process, and dirty tracking, with
//! a real guest under kvm_amd in a lab node.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ft_tests::guest::{NodeGuest, CAPTURE_DIR};
use ft_tests::{LabPair, NodeId};

/// The counter values on the console (a line may start with the shell's prompt).
fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.split_once("ft-counter ")?.1.trim().parse().ok())
        .collect()
}

/// Capture/kill/restore rounds of a test: `FT_RESTORE_LOOPS`, or 8 (the
/// suite's short run: each round costs 4-7 s on a lab node; a long run sets
/// more).
fn restore_loops() -> u32 {
    std::env::var("FT_RESTORE_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

/// Capture, kill the VMM, restore in a new process, many times over: the
/// guest's counter continues where the capture left it, never restarts.
#[test]
fn a_captured_guest_continues_in_a_new_process_every_time() {
    let loops = restore_loops();
    let lab = LabPair::start_nodes("e2e", &[NodeId::A]);
    let mut guest = NodeGuest::boot(&lab, NodeId::A, 1, 128, "ftguest.run=/bin/ft-counter");
    guest.wait_for_line(Duration::from_secs(90), |l| l.starts_with("ft-counter 5"));
    let mut restore_secs = Vec::new();
    for i in 0..loops {
        let before = *counts(&guest.console_text())
            .last()
            .expect("the counter runs");
        let captured = guest.ctl("capture snap");
        guest.kill();
        let start = Instant::now();
        guest.restore(&format!("{CAPTURE_DIR}/snap"));
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
    // The console shell's prompt may share the line, and the kernel may
    // print in the middle of it: look for the marker, kernel messages out.
    let list = guest.wait_for_marked_line(Duration::from_secs(90), "ft-dirtier frames ");
    let seen_at = Instant::now();
    let frames: BTreeSet<u64> = list
        .trim()
        .split(',')
        .map(|f| {
            f.parse()
                .unwrap_or_else(|e| panic!("frame number {f:?} in {list:?}: {e}"))
        })
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
    let second = guest.ctl("harvest --pages-file harvest.txt");
    let harvested: BTreeSet<u64> = lab
        .sh(NodeId::A, &format!("cat {CAPTURE_DIR}/harvest.txt"))
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

/// A guest counting over a TCP connection to the outer host and into a file
/// on its virtio disk is paused, captured, its VMM killed and restored in a
/// new process, many times: the connection stays open, the count arrives
/// without a gap, a repeat or a restart, and the disk holds every count.
#[test]
fn tcp_connection_and_disk_survive_capture_kill_restore() {
    use std::io::{BufRead, BufReader};
    use std::net::{SocketAddr, TcpListener};
    use std::sync::{Arc, Mutex};

    let loops = restore_loops();
    let lab = LabPair::start_nodes("e2e", &[NodeId::A]);
    let topo = &lab.lab().topo;
    let (host_ip, node_ip) = (topo.host_biz_ip(), topo.biz_ip(NodeId::A));
    let o = node_ip.octets();
    let guest_ip = format!("{}.{}.{}.100", o[0], o[1], o[2]);

    // The guest's NIC joins bridge br0, which holds the node's business NIC
    // from boot (images/node/rcS); ftvmm creates the TAP, a loop in the
    // node enslaves it whenever it appears (a restored VMM creates it again).
    assert!(
        lab.sh(NodeId::A, "ip -4 addr show br0")
            .contains(&node_ip.to_string()),
        "br0 does not hold the node's business address"
    );
    lab.sh(
        NodeId::A,
        "((while :; do ip link set tap0 master br0 up 2>/dev/null; sleep 0.2; done) >/dev/null 2>&1 &)",
    );
    let listener = TcpListener::bind(SocketAddr::new(host_ip.into(), 0)).expect("bind");
    let port = listener.local_addr().unwrap().port();
    let received: Arc<Mutex<(Vec<u64>, bool)>> = Arc::default();
    let sink = Arc::clone(&received);
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().expect("accept");
        for line in BufReader::new(conn).lines() {
            match line
                .ok()
                .and_then(|l| l.strip_prefix("count ")?.trim().parse().ok())
            {
                Some(n) => sink.lock().unwrap().0.push(n),
                None => break,
            }
        }
        sink.lock().unwrap().1 = true; // the connection ended
    });
    let last_received = || received.lock().unwrap().0.last().copied().unwrap_or(0);

    // vda: the script (raw, read-only); vdb: the data disk, on /data.
    let script = format!(
        "i=0\nwhile :; do\n  i=$((i+1))\n  echo \"count $i\" >> /data/counts; sync\n  echo \"count $i\"\n  \
         echo \"ft-count $i lines=$(wc -l < /data/counts)\" > /dev/console\n  sleep 0.2\ndone | nc {host_ip} {port}\n\
         echo ftest: nc exited > /dev/console\nexit 0\n"
    );
    lab.sh(
        NodeId::A,
        &format!(
            "cat > /data/script.img <<'FTEOF'\n{script}FTEOF\ntruncate -s 64K /data/script.img && \
             cp /images/guest-rootfs.ext4 /data/vm-data.ext4 && sync"
        ),
    );
    let mut guest = NodeGuest::boot_with(
        &lab,
        NodeId::A,
        1,
        128,
        &format!("ftguest.run=/bin/sh,/dev/vda ftguest.ip={guest_ip}/24"),
        "--disk /data/script.img,ro --disk /data/vm-data.ext4 --net tap=tap0,mac=52:54:00:12:34:56",
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while last_received() < 5 {
        assert!(
            Instant::now() < deadline,
            "no counts over TCP; console:\n{}",
            guest.console_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut gaps = Vec::new();
    for round in 0..loops {
        // Paused first, so nothing leaves the guest after the captured state.
        guest.ctl("pause");
        let captured = guest.ctl("capture snap");
        let before = last_received();
        guest.kill();
        let killed_at = Instant::now();
        guest.restore(&format!("{CAPTURE_DIR}/snap"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while last_received() <= before {
            assert!(
                Instant::now() < deadline,
                "round {round}: no count after {before} over TCP; console:\n{}",
                guest.console_text()
            );
            assert!(
                !received.lock().unwrap().1,
                "round {round}: the TCP connection closed"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        gaps.push(killed_at.elapsed().as_secs_f64());
        eprintln!(
            "[e2e] round {round}: count {before} -> {}, capture stopped the guest {} ms, \
             {:.2}s from kill to the next count on the host",
            last_received(),
            captured["times"]["stopped_us"].as_u64().unwrap_or(0) / 1000,
            gaps.last().unwrap()
        );
    }

    // Let the last restored guest run on for a while.
    let last_round_end = last_received();
    let deadline = Instant::now() + Duration::from_secs(60);
    while last_received() < last_round_end + 10 {
        assert!(
            Instant::now() < deadline,
            "the guest stopped counting after the last restore"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (counts, closed) = received.lock().unwrap().clone();
    assert!(!closed, "the TCP connection closed");
    assert_eq!(counts.first(), Some(&1));
    for w in counts.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "the count over TCP jumped or repeated: {} then {}",
            w[0],
            w[1]
        );
    }
    // The disk holds every count exactly once: the file's line count equals
    // the counter on the console lines the guest printed, before and after
    // every restore (all ftvmm generations' console logs).
    let console = lab.sh(NodeId::A, "cat /tmp/guest-*.console");
    let disk_checks: Vec<(u64, u64)> = console
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("ft-count ")?.1;
            let (n, lines) = rest.split_once(" lines=")?;
            Some((n.trim().parse().ok()?, lines.trim().parse().ok()?))
        })
        .collect();
    assert!(
        disk_checks.len() >= 10,
        "too few disk checks on the console:\n{console}"
    );
    for (n, lines) in &disk_checks {
        assert_eq!(n, lines, "count {n} but the disk file has {lines} lines");
    }
    gaps.sort_by(f64::total_cmp);
    eprintln!(
        "[e2e] {loops} capture/kill/restore rounds: {} counts over one TCP connection, disk consistent; \
         kill to next count median {:.2}s",
        counts.len(),
        gaps.get(gaps.len() / 2).copied().unwrap_or(f64::NAN)
    );
    guest.kill();
}

/// A VM records the CPU features it was given; a host that lacks one of
/// them refuses to continue it and names the missing bits.
#[test]
fn restore_refuses_a_host_without_the_vms_cpu_features() {
    let lab = LabPair::start_nodes("e2e", &[NodeId::A]);
    let guest = NodeGuest::boot(&lab, NodeId::A, 1, 128, "ftguest.run=/bin/ft-counter");
    guest.wait_for_line(Duration::from_secs(90), |l| !counts(l).is_empty());
    guest.ctl("pause");
    guest.ctl("capture snap");
    guest.kill();
    let snap = format!("{CAPTURE_DIR}/snap");

    // Pretend the VM was given AVX-512F (leaf 7 EBX bit 16), which the lab
    // node's CPU does not have. kvm_cpuid_entry2 is saved as its raw bytes:
    // function, index, flags, eax, ebx, ecx, edx (u32 each), padding.
    let mut state: serde_json::Value =
        serde_json::from_str(&lab.sh(NodeId::A, &format!("cat {snap}/state.json")))
            .expect("state.json");
    let mut patched = 0;
    for vcpu in state["vcpus"].as_array_mut().expect("vcpus") {
        for entry in vcpu["cpuid"].as_array_mut().expect("cpuid") {
            let bytes = entry.as_array_mut().expect("raw entry");
            let word = |b: &Vec<serde_json::Value>, at: usize| -> u32 {
                (0..4)
                    .map(|i| (b[at + i].as_u64().unwrap() as u32) << (8 * i))
                    .sum()
            };
            if word(bytes, 0) == 7 && word(bytes, 4) == 0 {
                let ebx = word(bytes, 16) | 1 << 16;
                for i in 0..4 {
                    bytes[16 + i] = serde_json::json!((ebx >> (8 * i)) & 0xff);
                }
                patched += 1;
            }
        }
    }
    assert!(patched > 0, "no CPUID leaf 7 in the saved state");
    lab.sh(
        NodeId::A,
        &format!("cat > {snap}/state.json <<'FTEOF'\n{state}\nFTEOF"),
    );
    let out = lab.exec(NodeId::A, &["ftvmm", "restore", &snap]);
    assert_eq!(
        out.code,
        Some(2),
        "restore did not refuse: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("lacks features") && out.stderr.contains("leaf 7 EBX bits 0x00010000"),
        "unclear refusal: {}",
        out.stderr
    );
    eprintln!("[e2e] refused as expected: {}", out.stderr.trim());
}
