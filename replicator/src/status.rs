//! What a node's FT process tells the world: its role and protection state,
//! the last committed epoch and the counters a user would graph. Written as
//! JSON to a status file (atomically, a few times a second) and logged on
//! every change of state.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Recent samples of a duration, for percentiles.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    recent: VecDeque<u64>,
}

const SAMPLES_KEPT: usize = 4096;

impl Samples {
    pub fn push(&mut self, d: Duration) {
        if self.recent.len() == SAMPLES_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(d.as_micros() as u64);
    }

    /// The `p`-th percentile in microseconds (0 with no samples).
    pub fn percentile_us(&self, p: f64) -> u64 {
        percentile(self.recent.iter().copied().collect(), p)
    }
}

/// The `p`-th percentile (nearest rank) of `values`; 0 when empty.
pub fn percentile(mut values: Vec<u64>, p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// Counters of checkpointing (primary) and applying (standby).
#[derive(Debug, Default, Clone, Serialize)]
pub struct FtCounters {
    pub checkpoints: u64,
    pub stop_us_p50: u64,
    pub stop_us_p99: u64,
    pub stop_us_max: u64,
    pub interval_us_last: u64,
    pub dirty_pages_total: u64,
    pub dirty_pages_last: u64,
    pub disk_writes_total: u64,
    pub alink_bytes_sent: u64,
    /// From the end of sending an epoch to its acknowledgement.
    pub ack_us_p50: u64,
    pub ack_us_p99: u64,
    /// Checkpoints that came later than planned because the standby had
    /// not acknowledged the previous one (the primary is throttled).
    pub throttled: u64,
    pub output_frames_released: u64,
    pub output_frames_held_now: u64,
    pub epochs_applied: u64,
    pub epochs_rejected: u64,
    pub failovers: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SyncProgress {
    pub phase: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub node: String,
    /// "primary" or "standby".
    pub role: String,
    /// primary: "unprotected", "syncing", "protected";
    /// standby: "waiting", "syncing", "standing-by", "promoting".
    pub state: String,
    /// The last epoch the standby committed.
    pub epoch: u64,
    pub peer: Option<String>,
    /// Why the state last changed, when it was a failure.
    pub message: Option<String>,
    pub updated_unix_ms: u64,
    pub sync: Option<SyncProgress>,
    pub counters: FtCounters,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The shared status of this node's FT process.
#[derive(Clone)]
pub struct StatusBoard {
    inner: Arc<Mutex<Status>>,
    path: Option<PathBuf>,
}

impl StatusBoard {
    pub fn new(node: &str, role: &str, path: Option<PathBuf>) -> StatusBoard {
        StatusBoard {
            inner: Arc::new(Mutex::new(Status {
                node: node.to_string(),
                role: role.to_string(),
                state: "starting".into(),
                epoch: 0,
                peer: None,
                message: None,
                updated_unix_ms: unix_ms(),
                sync: None,
                counters: FtCounters::default(),
            })),
            path,
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut s = self.inner.lock().expect("status lock");
        f(&mut s);
    }

    /// Changes role/state (logged and written at once).
    pub fn set_state(&self, role: &str, state: &str, message: Option<String>) {
        self.update(|s| {
            s.role = role.to_string();
            s.state = state.to_string();
            s.message = message.clone();
            if state != "syncing" {
                s.sync = None;
            }
        });
        tracing::info!(
            role,
            state,
            message = message.as_deref().unwrap_or(""),
            "FT state"
        );
        self.write();
    }

    pub fn snapshot(&self) -> Status {
        self.inner.lock().expect("status lock").clone()
    }

    /// Writes the status file (temporary file + rename: readers never see
    /// half of it).
    pub fn write(&self) {
        let Some(path) = &self.path else { return };
        let mut status = self.snapshot();
        status.updated_unix_ms = unix_ms();
        let Ok(json) = serde_json::to_vec_pretty(&status) else {
            return;
        };
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, json)
            .and_then(|_| std::fs::rename(&tmp, path))
            .is_err()
        {
            tracing::warn!(path = %path.display(), "cannot write the status file");
        }
    }

    /// Writes the status file every `every` from a background thread.
    pub fn spawn_writer(&self, every: Duration) {
        let board = self.clone();
        std::thread::spawn(move || loop {
            board.write();
            std::thread::sleep(every);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentile(vec![], 50.0), 0);
        assert_eq!(percentile(vec![5], 99.0), 5);
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(v.clone(), 50.0), 50);
        assert_eq!(percentile(v.clone(), 99.0), 99);
        assert_eq!(percentile(v, 100.0), 100);
    }
}
