//! Benchmark in the lab: level HA against the same VM unprotected, in one
//! run. The ledger VM's guest writes its data disk:
//! - latency: 4 KiB writes, each `pwrite` + `fdatasync` (a write completes
//!   to an HA guest once both nodes have it: the mirror's round trip and
//!   the standby's `fdatasync` are in every one);
//! - throughput: 4 MiB written sequentially in 1 MiB writes, then
//!   `fdatasync`;
//!
//! both timed inside the guest, as ratios to unprotected. Then the rate of
//! the initial synchronisation that protects the VM at level HA (8 MiB of
//! data the guest wrote while unprotected, to a new mirror; the bytes it
//! brought to the mirror, before the A-link's compression) as a ratio to
//! the A-link's own throughput (plain TCP between the nodes over the
//! A-link, measured in the same run).
//!
//! Run: `cargo bench -p ft-tests --bench ha_overhead` (needs the lab,
//! about 4 minutes). Nested virtualization under TCG: absolute figures are
//! far below hardware; the ratios are the point.

use std::time::{Duration, Instant};

use ft_tests::{ratio, LabPair};
use guest_tools::ledger::LedgerClient;
use lab::ft_pair;
use lab::NodeId;
use replicator::status::{FtState, Role};

const LATENCY_WRITES: u64 = 300;
const SEQUENTIAL_MIB: u64 = 4;
/// Data the guest keeps on its disk for the initial copy to move.
const KEPT_MIB: u64 = 8;
/// What the A-link's throughput is measured with.
const ALINK_PROBE_MIB: u64 = 64;

#[derive(Debug, Clone, Copy)]
struct Figures {
    write_p50_us: u64,
    write_p99_us: u64,
    sequential_mb_per_s: f64,
}

fn measure(client: &mut LedgerClient) -> Figures {
    let lat = client
        .workload_figures(&format!("DISKLAT {LATENCY_WRITES}"))
        .expect("DISKLAT");
    let seq = client
        .workload_figures(&format!("DISKSEQ {SEQUENTIAL_MIB}"))
        .expect("DISKSEQ");
    Figures {
        write_p50_us: lat[0],
        write_p99_us: lat[1],
        sequential_mb_per_s: seq[0] as f64 / seq[1].max(1) as f64,
    }
}

/// Plain TCP from node a to node b over the A-link (busybox nc): MB/s.
/// The sender's `nc -w 1` waits a second after its input ends; that second
/// is taken off.
fn alink_throughput(lab: &LabPair) -> f64 {
    let b = lab.lab().topo.alink_ip(NodeId::B);
    lab.exec(
        NodeId::B,
        &[
            "sh",
            "-c",
            "(sleep 120 | nc -l -p 5099 | wc -c > /tmp/alink-probe) >/dev/null 2>&1 & echo ok",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    let sent = lab.exec(
        NodeId::A,
        &[
            "sh",
            "-c",
            &format!(
                "dd if=/dev/zero bs=1M count={ALINK_PROBE_MIB} 2>/dev/null | nc -w 1 {b} 5099"
            ),
        ],
    );
    let secs = start.elapsed().as_secs_f64() - 1.0;
    std::thread::sleep(Duration::from_millis(500));
    let got = lab.exec(NodeId::B, &["cat", "/tmp/alink-probe"]);
    let bytes: u64 = got.stdout.trim().parse().unwrap_or(0);
    assert_eq!(
        bytes,
        ALINK_PROBE_MIB << 20,
        "the A-link probe did not arrive whole (sender said {sent:?})"
    );
    bytes as f64 / 1e6 / secs
}

fn wait(lab: &LabPair, state: FtState) -> replicator::status::Status {
    ft_pair::wait_for(
        lab.lab(),
        NodeId::A,
        Role::Primary,
        state,
        Duration::from_secs(240),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn main() {
    let lab = LabPair::start_alone("ftbenchha");
    let alink_mb_per_s = alink_throughput(&lab);
    eprintln!("[bench] A-link plain TCP: {alink_mb_per_s:.1} MB/s");
    // Unprotected first.
    ft_pair::define_and_start(lab.lab(), NodeId::A, "unprotected", Default::default())
        .expect("started");
    wait(&lab, FtState::Unprotected);
    let mut client = lab.ledger_client();
    let unprotected = measure(&mut client);
    client
        .workload_figures(&format!("DISKSEQ {KEPT_MIB} keep"))
        .expect("data kept for the copy");
    drop(client);
    // The same VM at level HA: stopped, its level set, started again; node
    // b's daemon starts the mirror and the disk is copied to it.
    let api = ft_pair::api(lab.lab(), NodeId::A).expect("api");
    api.stop_vm::<ftd_client::model::VmView>(ft_pair::VM_NAME)
        .expect("stop");
    api.protect_vm::<ftd_client::model::VmView>(ft_pair::VM_NAME, "ha")
        .expect("protect at ha");
    let start = Instant::now();
    loop {
        match api.start_vm::<ftd_client::model::VmView>(ft_pair::VM_NAME) {
            Ok(_) => break,
            // Still stopping.
            Err(e) if start.elapsed() < Duration::from_secs(60) => {
                eprintln!("[bench] start: {e}");
                std::thread::sleep(Duration::from_millis(500))
            }
            Err(e) => panic!("start at ha: {e}"),
        }
    }
    let protected = wait(&lab, FtState::Protected);
    assert_eq!(protected.level, replicator::level::Level::Ha);
    let sync_bytes = protected.counters.sync_sent_bytes_last;
    // What the copy brought to the standby's disk (the copy is compressed
    // on the A-link: its rate is what it moved, not what it sent).
    let sync_copied = protected.counters.sync_uncompressed_bytes_last;
    let sync_ms = protected.counters.sync_ms_last;
    let mut client = lab.ledger_client();
    let ha = measure(&mut client);
    let after = ft_pair::status(lab.lab(), NodeId::A).expect("status");
    drop(lab);
    let sync_mb_per_s = sync_copied as f64 / 1e6 / (sync_ms.max(1) as f64 / 1e3);
    println!(
        "\nHA overhead in the lab (nested KVM under TCG; ledger VM {} MiB, 16 MiB data disk)",
        ft_pair::GUEST_MEM_MIB
    );
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "", "unprotected", "HA", "ratio"
    );
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "4 KiB write + fdatasync p50 us",
        unprotected.write_p50_us,
        ha.write_p50_us,
        ratio(ha.write_p50_us as f64, unprotected.write_p50_us as f64)
    );
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "4 KiB write + fdatasync p99 us",
        unprotected.write_p99_us,
        ha.write_p99_us,
        ratio(ha.write_p99_us as f64, unprotected.write_p99_us as f64)
    );
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>8}",
        "sequential write MB/s (1 MiB writes, fsync)",
        unprotected.sequential_mb_per_s,
        ha.sequential_mb_per_s,
        ratio(ha.sequential_mb_per_s, unprotected.sequential_mb_per_s)
    );
    println!(
        "initial synchronisation at level HA: {:.2} MB copied ({:.2} MB sent, compressed) in {} ms \
         = {:.1} MB/s; the A-link's plain TCP: {:.1} MB/s; ratio {}",
        sync_copied as f64 / 1e6,
        sync_bytes as f64 / 1e6,
        sync_ms,
        sync_mb_per_s,
        alink_mb_per_s,
        ratio(sync_mb_per_s, alink_mb_per_s)
    );
    println!(
        "mirror batches acknowledged: {}, acknowledgement p50 {} us, p99 {} us",
        after.counters.checkpoints, after.counters.ack_us_p50, after.counters.ack_us_p99
    );
}
