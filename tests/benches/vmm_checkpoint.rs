//! Benchmark: the stop-the-guest part of a checkpoint in ftvmm, in a lab node
//! (real kvm_amd), for 256 MiB and 1 GiB guests running a memory dirtier.
//! Prints pause + state capture + resume (no memory) p50/p99, the dirty
//! harvest time, and the copy time per dirty page next to a memcpy measured
//! in the same process.
//!
//! Run: `cargo bench -p ft-tests --bench vmm_checkpoint` (needs root, as the lab).

use std::time::Duration;

use ft_tests::guest::NodeGuest;
use ft_tests::{LabPair, NodeId};

fn main() {
    let rounds: u32 = std::env::var("FT_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let lab = LabPair::start_nodes("bench", &[NodeId::A]);
    println!(
        "{:>8} {:>6} | {:>21} | {:>17} | {:>17} | {:>9} | {:>13} | {:>10} | {:>5}",
        "guest",
        "vcpus",
        "pause+state+resume us",
        "harvest us",
        "copy us",
        "pages/rd",
        "copy ns/page",
        "memcpy ns",
        "ratio"
    );
    for mem_mib in [256u64, 1024] {
        let guest = NodeGuest::boot(
            &lab,
            NodeId::A,
            1,
            mem_mib,
            "ftguest.run=/bin/ft-dirtier,rate,--mib,64,--pages-per-sec,5000,--seconds,100000",
        );
        guest.wait_for_line(Duration::from_secs(120), |l| {
            l.contains("ftguest: init reached")
        });
        std::thread::sleep(Duration::from_secs(2));
        let answer = guest.ctl(&format!("bench --count {rounds} --interval-ms 10"));
        let r = &answer["report"];
        let p = |k: &str, q: &str| r[k][q].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>5} MiB {:>6} | p50 {:>6.0} p99 {:>6.0} | p50 {:>4.0} p99 {:>5.0} | p50 {:>4.0} p99 {:>5.0} | {:>9.1} | {:>13.0} | {:>10.0} | {:>5.1}",
            mem_mib,
            r["vcpus"],
            p("stop_without_memory", "p50_us"),
            p("stop_without_memory", "p99_us"),
            p("harvest", "p50_us"),
            p("harvest", "p99_us"),
            p("copy", "p50_us"),
            p("copy", "p99_us"),
            r["dirty_pages_mean"].as_f64().unwrap_or(f64::NAN),
            r["copy_ns_per_page"].as_f64().unwrap_or(f64::NAN),
            r["memcpy_ns_per_page"].as_f64().unwrap_or(f64::NAN),
            r["copy_ns_per_page"].as_f64().unwrap_or(f64::NAN) / r["memcpy_ns_per_page"].as_f64().unwrap_or(f64::NAN),
        );
        println!(
            "{:>15} | total stop p50 {:.0} us p99 {:.0} us, pause alone p50 {:.0} us, state capture p50 {:.0} us",
            "",
            p("stop_total", "p50_us"),
            p("stop_total", "p99_us"),
            p("pause", "p50_us"),
            p("state_capture", "p50_us"),
        );
        guest.kill();
    }
}
