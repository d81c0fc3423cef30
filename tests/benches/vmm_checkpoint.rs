//! Benchmark: the stop-the-guest part of a checkpoint, measured on the
//! primary's own code (`ftprotect bench`: `primary::checkpoint::capture`,
//! the production page stager, no standby), in a lab node (real kvm_amd):
//! idle guests of 128 MiB and 1 GiB (does the stop time grow with the
//! guest's memory? issue 14's goal: the larger at most 1.2 times the
//! smaller), with dirty pages from KVM's dirty ring and then from its
//! bitmap (the fallback) in the same run, then 256 MiB and 1 GiB guests
//! running a memory dirtier (ring; at 256 MiB the bitmap too).
//! Prints pause + state capture p50/p99, the harvest + staging time, and
//! its cost per dirty page next to a memcpy measured in the same process.
//!
//! Run: `cargo bench -p ft-tests --bench vmm_checkpoint` (needs root, as the lab).

use std::time::Duration;

use ft_tests::{LabPair, NodeId};

fn main() {
    let rounds: u32 = std::env::var("FT_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let lab = LabPair::start_alone_configured("bench", &[NodeId::A], |_| {});
    println!(
        "{:>23} | {:>21} | {:>21} | {:>9} | {:>7} | {:>13} | {:>10} | {:>5}",
        "guest",
        "pause+state us",
        "harvest+stage us",
        "pages/rd",
        "hot/rd",
        "stage ns/page",
        "memcpy ns",
        "ratio"
    );
    let idle = "/bin/sleep,100000";
    let dirtier = "/bin/ft-dirtier,rate,--mib,64,--pages-per-sec,5000,--seconds,100000";
    let mut idle_stop_p50 = Vec::new();
    for (mem_mib, run, tracking) in [
        (128u64, idle, "ring"),
        (1024, idle, "ring"),
        (128, idle, "bitmap"),
        (1024, idle, "bitmap"),
        (256, dirtier, "ring"),
        (256, dirtier, "bitmap"),
        (1024, dirtier, "ring"),
    ] {
        let load = if run == idle { "idle" } else { "dirtier" };
        let script = format!(
            "ftprotect bench --kernel /images/vmlinux --initrd /images/guest-initramfs.cpio.gz \
             --mem-mib {mem_mib} --serial-log /tmp/bench-{mem_mib}.log --count {rounds} \
             --interval-ms 10 --dirty-tracking {tracking} --cmdline 'console=ttyS0 reboot=k panic=1 quiet \
             ftguest.run={run}'"
        );
        let out = lab
            .lab()
            .exec(NodeId::A, &["sh", "-c", &script], Duration::from_secs(600))
            .expect("ftprotect bench runs");
        assert!(out.success(), "ftprotect bench failed: {}", out.stderr);
        let r: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("a JSON report");
        let p = |k: &str, q: &str| r[k][q].as_f64().unwrap_or(f64::NAN);
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>4} MiB {load:<7} {tracking:<6} | p50 {:>6.0} p99 {:>7.0} | p50 {:>6.0} p99 {:>7.0} | {:>9.1} | {:>7.1} | {:>13.0} | {:>10.0} | {:>5.2}",
            mem_mib,
            p("stop_without_memory", "p50_us"),
            p("stop_without_memory", "p99_us"),
            p("pages", "p50_us"),
            p("pages", "p99_us"),
            f("dirty_pages_mean"),
            f("hot_pages_mean"),
            f("pages_ns_per_page"),
            f("memcpy_ns_per_page"),
            f("pages_ns_per_page") / f("memcpy_ns_per_page"),
        );
        println!(
            "{:>23} | total stop p50 {:.0} us p99 {:.0} us, pause alone p50 {:.0} us, state capture p50 {:.0} us",
            "",
            p("stop_total", "p50_us"),
            p("stop_total", "p99_us"),
            p("pause", "p50_us"),
            p("state_capture", "p50_us"),
        );
        if run == idle {
            idle_stop_p50.push((tracking, mem_mib, p("stop_total", "p50_us")));
        }
    }
    for pair in idle_stop_p50.chunks(2) {
        if let [(tracking, small, a), (_, large, b)] = pair {
            println!(
                "idle guests, {tracking}: total stop p50 {large} MiB / {small} MiB = {:.2} \
                 (goal: at most 1.2)",
                b / a
            );
        }
    }
}
