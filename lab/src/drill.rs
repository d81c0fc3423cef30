//! `ftctl lab drill --count N`: failover drills on the protected ledger VM.
//!
//! One ledger client (on the outer host, one TCP connection for the whole
//! drill) appends operations without pause. Each drill: wait until the
//! pair is protected, pull the primary node at a random moment, wait for
//! the standby to serve the next acknowledged operation (failover time:
//! pull -> that acknowledgement), check the ledger in the VM's memory and
//! read back from its disk against every acknowledged operation, bring the
//! pulled node back as the new standby and wait for re-protection. Prints
//! a table and writes a JSON report.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guest_tools::ledger::{verify, LedgerClient, LedgerError, Verdict};
use replicator::stats::percentile;
use replicator::status::{FtState, Role};
use serde::Serialize;

use crate::ft_pair::{self, FtPairError};
use crate::lab::{progress, Lab};
use crate::topology::NodeId;

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error(transparent)]
    Pair(#[from] FtPairError),
    #[error(transparent)]
    Lab(#[from] crate::lab::LabError),
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("the ledger client failed: {0}")]
    Client(String),
    #[error("drill {round}: no operation was acknowledged within {secs} s of the pull")]
    NoTakeover { round: u32, secs: u64 },
    #[error("writing the report {path}: {source}")]
    Report {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What one drill found.
#[derive(Debug, Clone, Serialize)]
pub struct DrillRound {
    pub round: u32,
    pub pulled: NodeId,
    pub promoted: NodeId,
    /// Protected run time before the pull.
    pub pull_after_ms: u64,
    /// Pull -> first acknowledged operation served by the promoted node.
    pub failover_ms: u64,
    /// Last epoch the standby had committed when it took over.
    pub committed_epoch: u64,
    pub acked_before_check: usize,
    pub memory: Verdict,
    pub disk: Verdict,
    /// Pulled node back -> pair protected again (its boot included).
    pub reprotect_ms: u64,
    /// The pulled node's boot (start -> its agent answers).
    pub node_boot_ms: u64,
    /// Node booted -> protected again, with no command from anyone: the
    /// daemons re-protect by themselves.
    pub boot_to_protected_ms: u64,
    /// The VM's generation after the round (bumped by each takeover).
    pub generation: u64,
    /// The API showed the promoted node as the VM's primary.
    pub placed_ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub lab: String,
    pub count: u32,
    pub seed: u64,
    pub rounds: Vec<DrillRound>,
    pub acked_total: usize,
    pub lost_total: usize,
    pub duplicated_total: usize,
    pub connection_survived: bool,
    pub failover_ms_p50: u64,
    pub failover_ms_p99: u64,
    pub failover_ms_max: u64,
    pub passed: bool,
}

/// The client's record: acknowledged ids with their times, the highest id
/// sent, and how it ended.
#[derive(Default)]
struct ClientLog {
    acked: Vec<(u64, Instant)>,
    sent_max: u64,
    error: Option<String>,
}

fn spawn_client(
    addr: std::net::SocketAddr,
    log: Arc<Mutex<ClientLog>>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, DrillError> {
    let mut client = LedgerClient::connect(addr, Duration::from_secs(90))?;
    Ok(std::thread::spawn(move || {
        let mut id = 0u64;
        while !stop.load(Ordering::Relaxed) {
            id += 1;
            log.lock().expect("client log").sent_max = id;
            match client.append(id) {
                Ok(_) => log
                    .lock()
                    .expect("client log")
                    .acked
                    .push((id, Instant::now())),
                Err(e) => {
                    log.lock().expect("client log").error = Some(e.to_string());
                    return;
                }
            }
        }
    }))
}

fn client_error(log: &Mutex<ClientLog>) -> Result<(), DrillError> {
    match &log.lock().expect("client log").error {
        Some(e) => Err(DrillError::Client(e.clone())),
        None => Ok(()),
    }
}

/// xorshift64: reproducible random pull moments from the seed.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Checks memory and disk of the running ledger against what was acked.
fn check_ledger(
    lab: &Lab,
    log: &Mutex<ClientLog>,
) -> Result<(usize, Verdict, Verdict), DrillError> {
    let acked: Vec<u64> = log
        .lock()
        .expect("client log")
        .acked
        .iter()
        .map(|&(id, _)| id)
        .collect();
    let mut checker = LedgerClient::connect(ft_pair::ledger_addr(lab), Duration::from_secs(60))?;
    let memory = checker.dump()?;
    let disk = checker.file()?;
    let sent_max = log.lock().expect("client log").sent_max;
    Ok((
        acked.len(),
        verify(&acked, sent_max, &memory),
        verify(&acked, sent_max, &disk),
    ))
}

/// Runs `count` drills on lab `lab` (brought up from scratch); writes the
/// report to `report_path`.
pub fn run(lab: &Lab, count: u32, report_path: &PathBuf) -> Result<DrillReport, DrillError> {
    lab.down()?;
    progress("drill: starting the lab pair");
    lab.up(&NodeId::ALL)?;
    let mut primary = NodeId::A;
    progress("drill: protecting the ledger VM (initial synchronisation)");
    ft_pair::protect(lab, primary, Default::default())?;
    ft_pair::wait_for(
        lab,
        primary.peer(),
        Role::Standby,
        FtState::StandingBy,
        Duration::from_secs(60),
    )?;
    let addr = ft_pair::ledger_addr(lab);
    let log = Arc::new(Mutex::new(ClientLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    // The ledger starts with the guest: retry the connection until it serves.
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        match spawn_client(addr, Arc::clone(&log), Arc::clone(&stop)) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                progress(format_args!("drill: ledger not serving yet ({e})"));
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    };
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut rng = seed;
    let mut rounds = Vec::new();
    let result = (|| -> Result<(), DrillError> {
        for round in 1..=count {
            let standby = primary.peer();
            let wait_ms = 1000 + next_random(&mut rng) % 3000;
            let protected_at = Instant::now();
            std::thread::sleep(Duration::from_millis(wait_ms));
            client_error(&log)?;
            let committed_epoch = ft_pair::status(lab, standby).map(|s| s.epoch).unwrap_or(0);
            let pulled_at = Instant::now();
            lab.pull(primary)?;
            let pull_after_ms = pulled_at.duration_since(protected_at).as_millis() as u64;
            let took_over = loop {
                let first = log
                    .lock()
                    .expect("client log")
                    .acked
                    .iter()
                    .find(|&&(_, at)| at >= pulled_at)
                    .map(|&(_, at)| at);
                if let Some(at) = first {
                    break at;
                }
                client_error(&log)?;
                if pulled_at.elapsed() > Duration::from_secs(60) {
                    return Err(DrillError::NoTakeover { round, secs: 60 });
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            let failover_ms = took_over.duration_since(pulled_at).as_millis() as u64;
            let (acked_before_check, memory, disk) = check_ledger(lab, &log)?;
            progress(format_args!(
                "drill {round}/{count}: pulled {primary} after {pull_after_ms} ms, {standby} served after {failover_ms} ms; \
                 {acked_before_check} acked, memory {}, disk {}",
                if memory.ok() { "ok" } else { "WRONG" },
                if disk.ok() { "ok" } else { "WRONG" }
            ));
            // The pulled node comes back; its daemon learns the new
            // placement from the peer's and starts the standby by itself.
            let back = Instant::now();
            let boots = lab.up(&[primary])?;
            let node_boot_ms = boots.first().map_or(0, |b| (b.boot_secs * 1000.0) as u64);
            let booted_at = Instant::now();
            ft_pair::wait_for(
                lab,
                standby,
                Role::Primary,
                FtState::Protected,
                Duration::from_secs(240),
            )?;
            let reprotect_ms = back.elapsed().as_millis() as u64;
            let boot_to_protected_ms = booted_at.elapsed().as_millis() as u64;
            let placement = ft_pair::vm(lab, standby)?;
            let generation = placement.as_ref().map_or(0, |v| v.generation);
            let placed_ok = placement.as_ref().is_some_and(|v| {
                v.primary_node.as_deref() == Some(ft_pair::node_name(standby).as_str())
            });
            let ok = memory.ok() && disk.ok() && placed_ok;
            rounds.push(DrillRound {
                round,
                pulled: primary,
                promoted: standby,
                pull_after_ms,
                failover_ms,
                committed_epoch,
                acked_before_check,
                memory,
                disk,
                reprotect_ms,
                node_boot_ms,
                boot_to_protected_ms,
                generation,
                placed_ok,
            });
            if !ok {
                break;
            }
            primary = standby;
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = client.join();
    let final_error = log.lock().expect("client log").error.clone();
    result?;
    let acked_total = log.lock().expect("client log").acked.len();
    let mut failovers: Vec<u64> = rounds.iter().map(|r| r.failover_ms).collect();
    let lost_total = rounds
        .iter()
        .map(|r| r.memory.lost.len() + r.disk.lost.len())
        .sum();
    let duplicated_total = rounds
        .iter()
        .map(|r| r.memory.duplicated.len() + r.disk.duplicated.len())
        .sum();
    let report = DrillReport {
        lab: lab.topo.name.clone(),
        count,
        seed,
        passed: rounds.len() == count as usize
            && rounds
                .iter()
                .all(|r| r.memory.ok() && r.disk.ok() && r.placed_ok)
            && final_error.is_none(),
        rounds,
        acked_total,
        lost_total,
        duplicated_total,
        connection_survived: final_error.is_none(),
        failover_ms_p50: percentile(&mut failovers, 50.0),
        failover_ms_p99: percentile(&mut failovers, 99.0),
        failover_ms_max: failovers.iter().copied().max().unwrap_or(0),
    };
    let json = serde_json::to_string_pretty(&report).expect("serialisable");
    std::fs::write(report_path, json).map_err(|source| DrillError::Report {
        path: report_path.clone(),
        source,
    })?;
    Ok(report)
}

/// The report as a table.
pub fn print_table(report: &DrillReport) {
    println!(
        "{:>5}  {:>6}  {:>8}  {:>8}  {:>11}  {:>7}  {:>7}  {:>7}  {:>12}  {:>17}",
        "drill",
        "pulled",
        "promoted",
        "epoch",
        "failover ms",
        "acked",
        "memory",
        "disk",
        "reprotect ms",
        "boot->protect ms"
    );
    for r in &report.rounds {
        let verdict = |v: &Verdict| if v.ok() { "ok" } else { "WRONG" };
        println!(
            "{:>5}  {:>6}  {:>8}  {:>8}  {:>11}  {:>7}  {:>7}  {:>7}  {:>12}  {:>17}",
            r.round,
            r.pulled.to_string(),
            r.promoted.to_string(),
            r.committed_epoch,
            r.failover_ms,
            r.acked_before_check,
            verdict(&r.memory),
            verdict(&r.disk),
            r.reprotect_ms,
            r.boot_to_protected_ms
        );
    }
    println!(
        "{} drills, {} operations acknowledged, {} lost, {} duplicated, client connection {}; \
         failover p50 {} ms, p99 {} ms, max {} ms: {}",
        report.rounds.len(),
        report.acked_total,
        report.lost_total,
        report.duplicated_total,
        if report.connection_survived {
            "survived every failover"
        } else {
            "BROKE"
        },
        report.failover_ms_p50,
        report.failover_ms_p99,
        report.failover_ms_max,
        if report.passed { "PASSED" } else { "FAILED" }
    );
}
