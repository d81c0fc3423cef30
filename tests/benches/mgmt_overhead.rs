//! The management plane's cost to a protected guest, in the lab: the
//! ledger VM at level FT runs a CPU-bound workload (SPIN, timed inside the
//! guest) while node a's `ftd` is (1) stopped (SIGSTOP on both nodes: the
//! engines run on alone), (2) running (its supervision polls each engine
//! every 0.5 s, the pair channel talks every second), (3) running and
//! answering 50 API clients that poll `GET /api/vms` and `GET
//! /api/vms/{name}` as fast as they can (from the outer host, whose two
//! cores also run both nodes: their cost is in the figure too). The ratios
//! are against (1), measured in the same run; each mode runs three times,
//! the order rotated, the median kept.
//!
//! `cargo bench -p ft-tests --bench mgmt_overhead` (about 4 minutes).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ft_tests::LabPair;
use ftd_client::model::VmView;
use guest_tools::ledger::LedgerClient;
use lab::ft_pair;
use lab::NodeId;

const WORK_MS: u64 = 4000;
const CLIENTS: usize = 50;

fn spin(client: &mut LedgerClient) -> f64 {
    let turns = client.workload(&format!("SPIN {WORK_MS}")).expect("spin");
    turns as f64 / (WORK_MS as f64 / 1000.0)
}

/// 50 API clients polling node a until `stop`; counts their requests.
fn pollers(
    lab: &LabPair,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..CLIENTS)
        .map(|i| {
            let api = ft_pair::api(lab.lab(), NodeId::A).expect("api");
            let (stop, count) = (stop.clone(), count.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let ok = if i % 2 == 0 {
                        api.vms::<Vec<VmView>>().is_ok()
                    } else {
                        api.vm::<VmView>(ft_pair::VM_NAME).is_ok()
                    };
                    if ok {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

fn main() {
    let lab = LabPair::start_alone("ftmgmt");
    ft_pair::protect(lab.lab(), NodeId::A, Default::default()).expect("protected");
    let mut client = lab.ledger_client();
    client.ping().expect("warm-up");
    let (mut stopped, mut idle, mut busy) = (Vec::new(), Vec::new(), Vec::new());
    let mut rate = Vec::new();
    let set_ftd = |running: bool| {
        let signal = if running { "CONT" } else { "STOP" };
        for node in NodeId::ALL {
            lab.sh(node, &format!("kill -{signal} $(pidof ftd)"));
        }
        // Let the pair channel settle (it drops after 3 s of silence).
        std::thread::sleep(Duration::from_secs(5));
    };
    // Three rounds, the order of the modes rotated each round.
    for round in 0..3 {
        for k in 0..3 {
            match (round + k) % 3 {
                0 => {
                    set_ftd(false);
                    stopped.push(spin(&mut client));
                    set_ftd(true);
                }
                1 => idle.push(spin(&mut client)),
                _ => {
                    let stop = Arc::new(AtomicBool::new(false));
                    let count = Arc::new(AtomicU64::new(0));
                    let threads = pollers(&lab, stop.clone(), count.clone());
                    std::thread::sleep(Duration::from_secs(1));
                    let t = Instant::now();
                    let before = count.load(Ordering::Relaxed);
                    busy.push(spin(&mut client));
                    rate.push(
                        (count.load(Ordering::Relaxed) - before) as f64 / t.elapsed().as_secs_f64(),
                    );
                    stop.store(true, Ordering::Relaxed);
                    for th in threads {
                        let _ = th.join();
                    }
                }
            }
        }
    }
    // The median of the three runs of each mode.
    let mean = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let base = mean(&stopped);
    println!("\nManagement plane cost to a protected guest (lab; CPU-bound SPIN, turns/s, median of three runs each, order rotated)");
    println!("{:<44} {:>14} {:>8}", "", "turns/s", "ratio");
    println!(
        "{:<44} {:>14.0} {:>8.2}",
        "ftd stopped (engines alone)", base, 1.0
    );
    println!(
        "{:<44} {:>14.0} {:>8.2}",
        "ftd running (supervision, pair channel)",
        mean(&idle),
        mean(&idle) / base
    );
    println!(
        "{:<44} {:>14.0} {:>8.2}   ({:.0} API requests/s answered)",
        format!("ftd running + {CLIENTS} API clients polling"),
        mean(&busy),
        mean(&busy) / base,
        mean(&rate)
    );
    println!("raw: stopped {stopped:?}, running {idle:?}, polled {busy:?}");
}
