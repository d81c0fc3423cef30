//! The drill's ledger client: one TCP connection from the outer host for
//! the whole drill, appending operations without pause; every
//! acknowledged id is kept with the time its acknowledgement came.

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
}

/// The running client.
pub struct Client {
    pub log: Arc<Mutex<ClientLog>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    /// Connects (retrying until the ledger serves, up to a minute) and
    /// starts appending.
    pub fn start(lab: &Lab) -> Result<Client, DrillError> {
        let addr = ft_pair::ledger_addr(lab);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut ledger = loop {
            match LedgerClient::connect(addr, Duration::from_secs(90)) {
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
