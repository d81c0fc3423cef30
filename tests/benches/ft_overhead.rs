//! Benchmark in the lab: the ledger VM unprotected, then protected at level
//! FT (speculative with pipelined epochs, the default; speculative with one
//! epoch in flight; synchronous mode; every page and state sent whole, the
//! delta cache off) on the default sealed A-link, then
//! FT on a lab whose A-link runs in plaintext (what sealing costs, where AES
//! runs emulated under TCG), side by side. For each: checkpoints
//! per second, guest stop time per checkpoint p50/p99 (the engine's, over
//! its last 4096 checkpoints with the session's first ones, and the
//! stop-time histogram's bucket for the measure's own), dirty pages per epoch,
//! A-link bytes per second, round-trip latency to the guest (and what FT
//! adds), the latency of a ledger APPEND (written and fsync'd in the guest
//! before it answers), and the throughput of a CPU-bound (the median of
//! three runs) and of a memory-bound workload timed inside the guest, as
//! ratios to the same VM unprotected just before that column's protection
//! (the lab's own rate drifts over minutes), the guest's write
//! faults per second (what harvesting dirty pages costs it: under the
//! lab's nested TCG most of FT's overhead) and the share of the time its
//! vCPU waited for the node's one CPU while the engine worked.
//!
//! Run: `cargo bench -p ft-tests --bench ft_overhead` (needs the lab, about
//! 7 minutes). Nested virtualization under TCG: absolute figures are far
//! below hardware; the ratios are the point.

use std::time::{Duration, Instant};

use ft_tests::{ratio, LabPair};
use ftd_client::model::FtOptions;
use guest_tools::ledger::LedgerClient;
use lab::ft_pair;
use lab::NodeId;
use replicator::stats::percentile;
use replicator::status::{FtCounters, FtState, Role, STOP_BUCKETS_US};

const WORK_MS: u64 = 4000;
/// The CPU-bound loop runs this many times for `WORK_MS` / `SPIN_RUNS`
/// each; its figure is their median (a lab node's one CPU makes single
/// runs vary by a tenth and more).
const SPIN_RUNS: u64 = 3;
const DIRTY_MIB: usize = 32;
const PINGS: usize = 100;
const APPENDS: usize = 50;
/// Ledger ids, distinct across the runs of one bench.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

#[derive(Debug, Default, Clone)]
struct Figures {
    checkpoints_per_s: f64,
    stop_p50_us: u64,
    stop_p99_us: u64,
    /// The bucket bounds (µs) under which 50% and 99% of the measure's
    /// own stops fall (the percentiles above are the engine's over its
    /// last 4096 checkpoints, the session's first ones included).
    measured_stop_p50_bound_us: Option<u64>,
    measured_stop_p99_bound_us: Option<u64>,
    dirty_per_epoch: f64,
    /// Of the dirty pages, the share the epoch before carried too.
    repeat_share: f64,
    /// Of the dirty pages, the share left writable (hot).
    hot_share: f64,
    /// Of the dirty pages, the share sent as deltas, and their mean size.
    delta_share: f64,
    /// Of the dirty pages, the share sent as deltas from a zero page.
    zero_delta_share: f64,
    delta_bytes_per_page: f64,
    /// Of the checkpoints, the share whose state went as a delta.
    state_delta_share: f64,
    alink_mb_per_s: f64,
    rtt_p50_ms: f64,
    rtt_p99_ms: f64,
    append_p50_ms: f64,
    append_p99_ms: f64,
    cpu_turns_per_s: f64,
    mem_pages_per_s: f64,
    write_faults_per_s: f64,
    /// Of the measured time, the share the guest's vCPU was ready to run
    /// but waited for the CPU while the engine worked (a lab node has one).
    vcpu_waited_share: f64,
}

/// The primary's counters (zeros when it does not answer).
fn counters(lab: &LabPair) -> FtCounters {
    ft_pair::status(lab.lab(), NodeId::A)
        .map(|s| s.counters)
        .unwrap_or_default()
}

/// KVM's count of write faults fixed on its fast path (`pf_fast`) on node
/// a, where the VM's primary runs: each harvest of the dirty pages
/// write-protects them again, so a protected guest takes a fault at its
/// first write to each; under the lab's nested TCG one costs it a few
/// hundred microseconds (1-2 on hardware). 0 when it cannot be read.
fn write_faults(lab: &LabPair) -> u64 {
    let script = "mount -t debugfs none /sys/kernel/debug 2>/dev/null; \
                  cat /sys/kernel/debug/kvm/pf_fast";
    lab.lab()
        .exec(NodeId::A, &["sh", "-c", script], Duration::from_secs(10))
        .ok()
        .and_then(|o| o.stdout.trim().parse().ok())
        .unwrap_or(0)
}

/// The bound of the stop-time bucket (µs) under which the share `p` of the
/// checkpoints between `before` and `after` fall; None above the last
/// bound, or with no checkpoint.
fn stop_bound(before: &FtCounters, after: &FtCounters, p: f64) -> Option<u64> {
    let counts: Vec<u64> = after
        .stop_us_buckets
        .iter()
        .enumerate()
        .map(|(i, n)| n.saturating_sub(before.stop_us_buckets.get(i).copied().unwrap_or(0)))
        .collect();
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let mut seen = 0;
    for (i, n) in counts.iter().enumerate() {
        seen += n;
        if seen as f64 >= p * total as f64 {
            return STOP_BUCKETS_US.get(i).copied();
        }
    }
    None
}

/// `after - before` of a counter, as a float.
fn delta(after: u64, before: u64) -> f64 {
    after.saturating_sub(before) as f64
}

/// The `p`-th percentile (nearest rank, on microseconds) in milliseconds.
fn percentile_ms(v: &[Duration], p: f64) -> f64 {
    let mut us: Vec<u64> = v.iter().map(|d| d.as_micros() as u64).collect();
    percentile(&mut us, p) as f64 / 1000.0
}

fn measure(lab: &LabPair, client: &mut LedgerClient) -> Figures {
    let before = counters(lab);
    let faults_before = write_faults(lab);
    let start = Instant::now();
    let rtts: Vec<Duration> = (0..PINGS).map(|_| client.ping().expect("ping")).collect();
    let appends: Vec<Duration> = (0..APPENDS)
        .map(|_| {
            let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let sent = Instant::now();
            client.append(id).expect("append");
            sent.elapsed()
        })
        .collect();
    let spin_ms = WORK_MS / SPIN_RUNS;
    let mut spins: Vec<f64> = (0..SPIN_RUNS)
        .map(|_| {
            let turns = client.workload(&format!("SPIN {spin_ms}")).expect("spin");
            turns as f64 / (spin_ms as f64 / 1000.0)
        })
        .collect();
    spins.sort_by(f64::total_cmp);
    let mem = client
        .workload(&format!("DIRTY {WORK_MS} {DIRTY_MIB}"))
        .expect("dirty");
    let secs = start.elapsed().as_secs_f64();
    let after = counters(lab);
    let faults = delta(write_faults(lab), faults_before);
    let checkpoints = delta(after.checkpoints, before.checkpoints);
    let dirty = delta(after.dirty_pages_total, before.dirty_pages_total);
    let delta_pages = delta(after.delta_pages_total, before.delta_pages_total);
    Figures {
        repeat_share: if dirty > 0.0 {
            delta(
                after.dirty_repeat_pages_total,
                before.dirty_repeat_pages_total,
            ) / dirty
        } else {
            0.0
        },
        hot_share: if dirty > 0.0 {
            delta(after.hot_pages_total, before.hot_pages_total) / dirty
        } else {
            0.0
        },
        delta_share: if dirty > 0.0 {
            delta_pages / dirty
        } else {
            0.0
        },
        zero_delta_share: if dirty > 0.0 {
            delta(after.zero_delta_pages_total, before.zero_delta_pages_total) / dirty
        } else {
            0.0
        },
        delta_bytes_per_page: if delta_pages > 0.0 {
            delta(after.delta_bytes_total, before.delta_bytes_total) / delta_pages
        } else {
            0.0
        },
        state_delta_share: if checkpoints > 0.0 {
            delta(after.state_deltas_total, before.state_deltas_total) / checkpoints
        } else {
            0.0
        },
        checkpoints_per_s: checkpoints / secs,
        stop_p50_us: after.stop_us_p50,
        stop_p99_us: after.stop_us_p99,
        measured_stop_p50_bound_us: stop_bound(&before, &after, 0.50),
        measured_stop_p99_bound_us: stop_bound(&before, &after, 0.99),
        dirty_per_epoch: if checkpoints > 0.0 {
            delta(after.dirty_pages_total, before.dirty_pages_total) / checkpoints
        } else {
            0.0
        },
        alink_mb_per_s: delta(after.alink_bytes_sent, before.alink_bytes_sent) / secs / 1e6,
        rtt_p50_ms: percentile_ms(&rtts, 50.0),
        rtt_p99_ms: percentile_ms(&rtts, 99.0),
        append_p50_ms: percentile_ms(&appends, 50.0),
        append_p99_ms: percentile_ms(&appends, 99.0),
        cpu_turns_per_s: spins[spins.len() / 2],
        mem_pages_per_s: mem as f64 / (WORK_MS as f64 / 1000.0),
        write_faults_per_s: faults / secs,
        vcpu_waited_share: delta(after.vcpu_waited_us_total, before.vcpu_waited_us_total)
            / (secs * 1e6),
    }
}

/// The ledger VM unprotected, then protected with the options `ft`, and
/// the A-link protection the engine reported.
fn run_mode(lab: &LabPair, ft: FtOptions) -> (Figures, Figures, String) {
    // Through node a's API: the VM afresh, unprotected first.
    ft_pair::define_and_start(lab.lab(), NodeId::A, "unprotected", ft).expect("started");
    ft_pair::wait_for(
        lab.lab(),
        NodeId::A,
        Role::Primary,
        FtState::Unprotected,
        Duration::from_secs(60),
    )
    .expect("unprotected");
    let mut client = lab.ledger_client();
    client.ping().expect("warm-up");
    let unprotected = measure(lab, &mut client);
    // Protect it: node b's daemon starts the standby.
    ft_pair::api(lab.lab(), NodeId::A)
        .expect("api")
        .protect_vm::<ftd_client::model::VmView>(ft_pair::VM_NAME, "ft")
        .expect("protect");
    ft_pair::wait_for(
        lab.lab(),
        NodeId::A,
        Role::Primary,
        FtState::Protected,
        Duration::from_secs(180),
    )
    .expect("protected");
    std::thread::sleep(Duration::from_secs(2));
    let status = ft_pair::status(lab.lab(), NodeId::A).expect("status");
    let alink = status.alink.unwrap_or_default();
    eprintln!(
        "[bench] A-link: {alink}; dirty pages from KVM's {}",
        status.dirty_tracking.as_deref().unwrap_or("(not reported)")
    );
    let protected = measure(lab, &mut client);
    (unprotected, protected, alink)
}

fn main() {
    let lab = LabPair::start_alone("ftbench");
    let (unprotected, ft, sealed) = run_mode(&lab, FtOptions::default());
    assert!(
        sealed.starts_with("sealed"),
        "the lab's A-link is {sealed:?}"
    );
    let one_in_flight = FtOptions {
        epochs_in_flight: Some(1),
        ..Default::default()
    };
    let (one_base, one, _) = run_mode(&lab, one_in_flight);
    let synchronous = FtOptions {
        synchronous: true,
        ..Default::default()
    };
    let (sync_base, sync, _) = run_mode(&lab, synchronous);
    let deltas_off = FtOptions {
        delta_cache_mib: Some(0),
        ..Default::default()
    };
    let (whole_base, whole, _) = run_mode(&lab, deltas_off);
    drop(lab);
    let plain_lab = LabPair::start_alone_configured("ftbench", &NodeId::ALL, |topo| {
        topo.alink_plaintext = true
    });
    let (plain_base, plaintext, plain) = run_mode(&plain_lab, FtOptions::default());
    assert!(
        plain.starts_with("plaintext"),
        "the lab set up with a plaintext A-link runs it {plain:?}"
    );
    drop(plain_lab);
    println!(
        "\nFT overhead in the lab (nested KVM under TCG; guest 1 vCPU, {} MiB)",
        ft_pair::GUEST_MEM_MIB
    );
    println!(
        "{:<34} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14}",
        "",
        "unprotected",
        "FT",
        "FT 1 in flight",
        "FT synchronous",
        "FT deltas off",
        "FT plaintext"
    );
    // Each FT column against the unprotected VM measured just before it
    // was protected (the same run of the guest; the first column's is the
    // unprotected one): minutes apart the lab's rate drifts.
    let bases = [
        &unprotected,
        &unprotected,
        &one_base,
        &sync_base,
        &whole_base,
        &plain_base,
    ];
    let columns = [&unprotected, &ft, &one, &sync, &whole, &plaintext];
    let row_against_base = |name: &str, f: &dyn Fn(&Figures, &Figures) -> String| {
        let cells: Vec<String> = columns
            .iter()
            .zip(bases.iter())
            .map(|(x, base)| format!("{:>14}", f(x, base)))
            .collect();
        println!("{:<34} {}", name, cells.join(" "));
    };
    let row = |name: &str, f: &dyn Fn(&Figures) -> String| row_against_base(name, &|x, _| f(x));
    row("checkpoints per second", &|x| {
        format!("{:.1}", x.checkpoints_per_s)
    });
    row("guest stop per checkpoint p50 us", &|x| {
        x.stop_p50_us.to_string()
    });
    row("guest stop per checkpoint p99 us", &|x| {
        x.stop_p99_us.to_string()
    });
    let bound = |b: Option<u64>| b.map_or("-".to_string(), |us| format!("<= {us}"));
    row("  measure's own stops p50 us (bucket)", &|x| {
        bound(x.measured_stop_p50_bound_us)
    });
    row("  measure's own stops p99 us (bucket)", &|x| {
        bound(x.measured_stop_p99_bound_us)
    });
    row("dirty pages per epoch", &|x| {
        format!("{:.0}", x.dirty_per_epoch)
    });
    row(
        "dirty in the epoch before too, hot included (share)",
        &|x| format!("{:.2}", x.repeat_share),
    );
    row("left writable, hot (share)", &|x| {
        format!("{:.2}", x.hot_share)
    });
    row("pages sent as deltas (share)", &|x| {
        format!("{:.2}", x.delta_share)
    });
    row("pages sent as deltas from zeros (share)", &|x| {
        format!("{:.2}", x.zero_delta_share)
    });
    row("bytes per delta (4096 whole)", &|x| {
        format!("{:.0}", x.delta_bytes_per_page)
    });
    row("states sent as deltas (share)", &|x| {
        format!("{:.2}", x.state_delta_share)
    });
    row("A-link MB/s", &|x| format!("{:.2}", x.alink_mb_per_s));
    row("round trip p50 ms", &|x| format!("{:.2}", x.rtt_p50_ms));
    row("round trip p99 ms", &|x| format!("{:.2}", x.rtt_p99_ms));
    row_against_base("added round trip p50 ms", &|x, base| {
        format!("{:.2}", x.rtt_p50_ms - base.rtt_p50_ms)
    });
    row("APPEND (fsync'd) p50 ms", &|x| {
        format!("{:.2}", x.append_p50_ms)
    });
    row("APPEND (fsync'd) p99 ms", &|x| {
        format!("{:.2}", x.append_p99_ms)
    });
    row_against_base("added APPEND p50 ms", &|x, base| {
        format!("{:.2}", x.append_p50_ms - base.append_p50_ms)
    });
    row(
        &format!("CPU-bound loop turns/s (median of {SPIN_RUNS})"),
        &|x| format!("{:.3e}", x.cpu_turns_per_s),
    );
    row_against_base("  unprotected, just before", &|_, base| {
        format!("{:.3e}", base.cpu_turns_per_s)
    });
    row_against_base("CPU-bound ratio to unprotected", &|x, base| {
        ratio(x.cpu_turns_per_s, base.cpu_turns_per_s)
    });
    row("memory-bound pages/s", &|x| {
        format!("{:.0}", x.mem_pages_per_s)
    });
    row_against_base("memory-bound ratio to unprotected", &|x, base| {
        ratio(x.mem_pages_per_s, base.mem_pages_per_s)
    });
    row("guest write faults/s (KVM pf_fast)", &|x| {
        format!("{:.0}", x.write_faults_per_s)
    });
    row("vCPU waited for the engine (share of time)", &|x| {
        format!("{:.3}", x.vcpu_waited_share)
    });
    println!(
        "QEMU COLO (Debian's 7.2) in the same kind of lab (DESIGN.md: two TCG nodes, idle \
         256 MiB guest, 100 ms checkpoint delay): guest stopped 64 ms p50 per checkpoint; \
         FT here: {:.1} ms p50",
        ft.stop_p50_us as f64 / 1000.0
    );
}
