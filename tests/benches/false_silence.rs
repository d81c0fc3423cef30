//! False silence under load, in the lab: the ledger VM at level FT with two
//! vCPUs (on lab nodes that have one CPU each) running the memory dirtier
//! (64 MiB, 5,000 pages/s) next to the ledger, protected from its start
//! (the initial synchronisation runs under that load), then the ledger
//! client appending without pause for FT_SOAK_SECS (default 600). Both
//! nodes live all along, so every session that ends because a peer fell
//! silent is a false silence, and every takeover a false takeover. Prints
//! the heartbeat timeout, the false-silence session ends on each side,
//! takeovers, resynchronisations, and the ledger check. FT_SOAK_PULSES=0
//! runs the same without pulses (silence judged on the connection alone),
//! for comparison.
//!
//! `cargo bench -p ft-tests --bench false_silence` (about 12 minutes).

use std::time::{Duration, Instant};

use ft_tests::LabPair;
use guest_tools::ledger::verify;
use lab::drill::watch::engine_status;
use lab::ft_pair::{self, LedgerLoad};
use lab::NodeId;
use replicator::status::{FtState, Role, Status};

const DIRTIER: &str = "/bin/ft-dirtier,rate,--mib,64,--pages-per-sec,5000,--seconds,100000";

/// What one node's engine showed over the run.
#[derive(Default, Debug)]
struct Seen {
    silence_ends_max: u64,
    failovers_max: u64,
    /// Times the role went (back) into syncing.
    syncs: u64,
    last_state: Option<FtState>,
    generation_first: Option<u64>,
    generation_max: u64,
    unanswered: u64,
}

impl Seen {
    fn observe(&mut self, status: Option<Status>) {
        let Some(s) = status else {
            self.unanswered += 1;
            return;
        };
        self.silence_ends_max = self.silence_ends_max.max(s.counters.silence_ends);
        self.failovers_max = self.failovers_max.max(s.counters.failovers);
        self.generation_max = self.generation_max.max(s.generation);
        if s.generation > 0 {
            self.generation_first.get_or_insert(s.generation);
        }
        if s.state == FtState::Syncing && self.last_state != Some(FtState::Syncing) {
            self.syncs += 1;
        }
        self.last_state = Some(s.state);
    }
}

fn main() {
    let soak = Duration::from_secs(
        std::env::var("FT_SOAK_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(600),
    );
    let pulses = std::env::var("FT_SOAK_PULSES").map_or(true, |v| v != "0");
    let lab = LabPair::start_alone("ftsoak");
    let load = LedgerLoad {
        vcpus: Some(2),
        also: Some(DIRTIER.into()),
    };
    let started = Instant::now();
    let ft = ftd_client::model::FtOptions {
        no_pulses: !pulses,
        ..Default::default()
    };
    ft_pair::define_and_start_with(lab.lab(), NodeId::A, "ft", ft, &load)
        .expect("ledger VM started");
    let mut seen = [Seen::default(), Seen::default()];
    // Watch from the start: the initial synchronisation runs under load.
    let protected_in = loop {
        for node in NodeId::ALL {
            seen[node.index() as usize].observe(engine_status(lab.lab(), node));
        }
        let a = engine_status(lab.lab(), NodeId::A);
        if a.as_ref()
            .is_some_and(|s| s.role == Role::Primary && s.state == FtState::Protected)
        {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "never protected; a: {a:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "[soak] protected {:.1} s after the start (2 vCPUs, dirtier running)",
        protected_in.as_secs_f64()
    );
    let mut client = lab.ledger_client();
    let mut acked = Vec::new();
    let mut sent_max = 0;
    let soak_start = Instant::now();
    let mut next_look = Instant::now();
    let mut next_print = Instant::now() + Duration::from_secs(60);
    let mut id = 0u64;
    while soak_start.elapsed() < soak {
        id += 1;
        sent_max = id;
        client.append(id).expect("append");
        acked.push(id);
        if Instant::now() >= next_look {
            for node in NodeId::ALL {
                seen[node.index() as usize].observe(engine_status(lab.lab(), node));
            }
            next_look = Instant::now() + Duration::from_secs(2);
            if Instant::now() >= next_print {
                next_print += Duration::from_secs(60);
                eprintln!(
                    "[soak] {:>4} s: {} acked; a {:?}, b {:?}",
                    soak_start.elapsed().as_secs(),
                    acked.len(),
                    seen[0].last_state,
                    seen[1].last_state
                );
            }
        }
    }
    for node in NodeId::ALL {
        seen[node.index() as usize].observe(engine_status(lab.lab(), node));
    }
    let memory = client.dump().expect("dump");
    let disk = client.file().expect("file");
    let (memory, disk) = (
        verify(&acked, sent_max, &memory),
        verify(&acked, sent_max, &disk),
    );
    let timeout = engine_status(lab.lab(), NodeId::A).map_or(0, |s| s.heartbeat_timeout_ms);
    let [a, b] = &seen;
    println!(
        "false silence, {} s protected with a 2-vCPU guest running ft-dirtier (5,000 pages/s) and the \
         ledger client ({} operations acknowledged), heartbeat timeout {timeout} ms, pulses {}:",
        soak.as_secs(),
        acked.len(),
        if pulses { "on" } else { "off" }
    );
    println!(
        "  session ends by silence: primary (a) {}, standby (b) {} (both nodes alive: every one is false)",
        a.silence_ends_max, b.silence_ends_max
    );
    println!(
        "  takeovers: {} (a's failovers {}, b's {}; generation {} -> {})",
        a.failovers_max + b.failovers_max,
        a.failovers_max,
        b.failovers_max,
        a.generation_first.unwrap_or(0),
        a.generation_max.max(b.generation_max)
    );
    println!(
        "  synchronisations: a {}, b {} (1 each is the initial one); initial protection took {:.1} s",
        a.syncs,
        b.syncs,
        protected_in.as_secs_f64()
    );
    println!(
        "  ledger: memory {}, disk {} (lost {}, duplicated {}); status samples unanswered: a {}, b {}",
        if memory.ok() { "ok" } else { "WRONG" },
        if disk.ok() { "ok" } else { "WRONG" },
        memory.lost.len() + disk.lost.len(),
        memory.duplicated.len() + disk.duplicated.len(),
        a.unanswered,
        b.unanswered
    );
}
