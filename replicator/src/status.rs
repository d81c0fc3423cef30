//! What a node's FT process tells the world: its role and protection state,
//! the last committed epoch and the counters a user would graph. Written as
//! JSON to a status file (atomically, a few times a second) and logged on
//! every change of state.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use crate::stats::{percentile, Samples};

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
