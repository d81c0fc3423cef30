//! The drill's ledger client: one TCP connection from the outer host for
//! the whole drill (at level HA, a new one after each reboot of the VM),
//! appending operations without pause; every acknowledged id is kept with
//! the time its acknowledgement came.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_tools::ledger::{verify, LedgerClient, Verdict};

use super::DrillError;
use crate::ft_pair;
use crate::lab::{progress, Lab};

/// The client's record: acknowledged ids with their times, the highest id
/// sent, and how it ended.
#[derive(Default)]
pub struct ClientLog {
    pub acked: Vec<(u64, Instant)>,
    pub sent_max: u64,
    pub error: Option<String>,
    /// Connections made again after one failed (level HA: the VM rebooted
    /// on the survivor).
    pub reconnects: u64,
}

/// Whether the client connects again when its connection fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Level FT: the connection must survive every failover.
    Never,
    /// Level HA: the VM reboots, its connections with it; the client
    /// connects again (each answer within [`HA_ANSWER_WITHIN`]) and goes
    /// on with the next id (the one in flight was never acknowledged).
    AfterReboot,
}

/// Level HA: how long an answer may take before the connection counts as
/// lost, and how long the ledger may stay away.
const HA_ANSWER_WITHIN: Duration = Duration::from_secs(2);
const HA_BACK_WITHIN: Duration = Duration::from_secs(300);

/// The running client.
pub struct Client {
    pub log: Arc<Mutex<ClientLog>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long the ledger VM may take to serve once protected. The lab
/// protects it once it serves ([`ft_pair::protect_at`]), so it serves at
/// once then; a guest that boots under FT (a VM started at level ft) took
/// over a minute on a slow TCG lab node (the standby falling behind pauses
/// the guest).
const SERVING_WITHIN: Duration = Duration::from_secs(180);

impl Client {
    /// Connects (retrying until the ledger serves, up to [`SERVING_WITHIN`]) and
    /// starts appending; connects again after a failure if `reconnect`
    /// says so.
    pub fn start_with(lab: &Lab, reconnect: Reconnect) -> Result<Client, DrillError> {
        let addr = ft_pair::ledger_addr(lab);
        let answer_within = match reconnect {
            Reconnect::Never => Duration::from_secs(90),
            Reconnect::AfterReboot => HA_ANSWER_WITHIN,
        };
        let deadline = Instant::now() + SERVING_WITHIN;
        let mut ledger = loop {
            match LedgerClient::connect(addr, answer_within) {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    progress(format_args!("drill: ledger not serving yet ({e})"));
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let log = Arc::new(Mutex::new(ClientLog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (writer, stopping) = (Arc::clone(&log), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut id = 0u64;
            while !stopping.load(Ordering::Relaxed) {
                id += 1;
                writer.lock().expect("client log").sent_max = id;
                match ledger.append(id) {
                    Ok(_) => writer
                        .lock()
                        .expect("client log")
                        .acked
                        .push((id, Instant::now())),
                    Err(e) if reconnect == Reconnect::AfterReboot => {
                        match connect_again(addr, &stopping) {
                            Some(again) => {
                                ledger = again;
                                writer.lock().expect("client log").reconnects += 1;
                            }
                            None if stopping.load(Ordering::Relaxed) => return,
                            None => {
                                writer.lock().expect("client log").error = Some(format!(
                                    "{e}; the ledger did not serve again within {} s",
                                    HA_BACK_WITHIN.as_secs()
                                ));
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        writer.lock().expect("client log").error = Some(e.to_string());
                        return;
                    }
                }
            }
        });
        Ok(Client {
            log,
            stop,
            thread: Some(thread),
        })
    }

    /// Connections made again so far.
    pub fn reconnects(&self) -> u64 {
        self.log.lock().expect("client log").reconnects
    }

    /// The client's error, if it failed.
    pub fn failed(&self) -> Result<(), DrillError> {
        match &self.log.lock().expect("client log").error {
            Some(e) => Err(DrillError::Client(e.clone())),
            None => Ok(()),
        }
    }

    /// When the first operation acknowledged after `since` was, waiting up
    /// to `within`.
    pub fn first_ack_after(
        &self,
        since: Instant,
        within: Duration,
        round: u32,
    ) -> Result<Instant, DrillError> {
        loop {
            let first = self
                .log
                .lock()
                .expect("client log")
                .acked
                .iter()
                .rev()
                .take_while(|&&(_, at)| at >= since)
                .last()
                .map(|&(_, at)| at);
            if let Some(at) = first {
                return Ok(at);
            }
            self.failed()?;
            if since.elapsed() > within {
                return Err(DrillError::NoTakeover {
                    round,
                    secs: within.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The client-visible pause around `from..=to`: the longest time
    /// between two consecutive acknowledgements where the later came at or
    /// after `from` and the earlier at or before `to` (the client appends
    /// without pause, so any other gap is one round trip).
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let log = self.log.lock().expect("client log");
        log.acked
            .windows(2)
            .filter(|w| w[1].1 >= from && w[0].1 <= to)
            .map(|w| w[1].1.duration_since(w[0].1))
            .max()
            .unwrap_or_default()
    }

    /// Checks memory and disk of the running ledger against what was
    /// acknowledged: (operations acknowledged, memory, disk).
    pub fn check(&self, lab: &Lab) -> Result<(usize, Verdict, Verdict), DrillError> {
        let acked: Vec<u64> = self
            .log
            .lock()
            .expect("client log")
            .acked
            .iter()
            .map(|&(id, _)| id)
            .collect();
        let mut checker =
            LedgerClient::connect(ft_pair::ledger_addr(lab), Duration::from_secs(60))?;
        let memory = checker.dump()?;
        let disk = checker.file()?;
        let sent_max = self.log.lock().expect("client log").sent_max;
        Ok((
            acked.len(),
            verify(&acked, sent_max, &memory),
            verify(&acked, sent_max, &disk),
        ))
    }

    /// Stops appending; how it ended (an error if the client failed).
    pub fn stop(&mut self) -> Option<String> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.log.lock().expect("client log").error.clone()
    }

    pub fn acked_total(&self) -> usize {
        self.log.lock().expect("client log").acked.len()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Level HA: connects to the ledger again, trying every 100 ms until it
/// serves (at most [`HA_BACK_WITHIN`]) or the client is stopped.
fn connect_again(addr: std::net::SocketAddr, stopping: &AtomicBool) -> Option<LedgerClient> {
    let deadline = Instant::now() + HA_BACK_WITHIN;
    while Instant::now() < deadline && !stopping.load(Ordering::Relaxed) {
        if let Ok(again) = LedgerClient::connect(addr, HA_ANSWER_WITHIN) {
            return Some(again);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}
