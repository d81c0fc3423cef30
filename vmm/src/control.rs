//! The control socket: a Unix socket on which a client (ftctl, a test, the FT
//! engine's tools) pauses, resumes, captures, harvests dirty pages and reads
//! status and counters. One JSON request line, one JSON response line per
//! connection.
//!
//! The socket is its owner's only (mode 0600) and never replaces anything
//! but a stale socket ([`socket`]); clients are served each in its own
//! thread, with bounds on their number, their requests' size and time
//! ([`server`]); captures and page lists go only into the capture folder
//! fixed at start-up, under names, never paths ([`captures`]).

pub mod captures;
pub mod server;
pub mod socket;

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::dirty::DirtyMethod;
use crate::metrics::CountersSnapshot;
use crate::snapshot::CaptureTimes;
use crate::vm::Vm;

pub use captures::CaptureDir;
pub use server::ControlServer;
pub use socket::BoundSocket;

/// Longest answer [`request`] reads.
pub const MAX_RESPONSE: usize = 1 << 20;
/// How long [`request`] waits to connect, to send, and for the answer (a
/// capture of a large guest takes a while).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    Status,
    Pause,
    Resume,
    /// Pause, capture state and memory into the capture folder's entry
    /// `name` (a folder: state.json, memory.bin), resume.
    Capture {
        name: String,
    },
    /// Pause, harvest the dirty set, resume; optionally write the page
    /// numbers (one per line) to the capture folder's entry `pages_file`.
    Harvest {
        pages_file: Option<String>,
    },
    Counters,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ControlResponse {
    Status {
        paused: bool,
        vcpus: u8,
        mem_mib: u64,
        uptime_ms: u64,
        manual_dirty_protect: bool,
        /// How dirty pages are tracked: `ring` or `bitmap`.
        dirty_tracking: DirtyMethod,
    },
    Paused {
        pause_us: u64,
    },
    Resumed,
    Captured {
        /// Where the capture went.
        dir: PathBuf,
        times: CaptureTimes,
    },
    Harvested {
        pages: u64,
        by_guest: u64,
        by_vmm: u64,
        harvest_us: u64,
        /// Where the page list went, if one was asked for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pages_file: Option<PathBuf>,
    },
    Counters {
        counters: CountersSnapshot,
    },
    Error {
        message: String,
    },
}

/// Everything that can fail in this module, by operation.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot serve the control socket")]
    Serve(#[from] server::ServeError),
    #[error("cannot reach ftvmm")]
    Connect(#[source] socket::SocketError),
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
    #[error("cannot send the request to {path}")]
    Send {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the answer from {path}")]
    Receive {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} closed the connection without answering")]
    Closed { path: PathBuf },
    #[error("the answer from {path} is longer than {MAX_RESPONSE} bytes")]
    AnswerTooLong { path: PathBuf },
    #[error("malformed answer from {path}")]
    BadAnswer {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Serves `vm`'s control socket, bound beforehand with [`socket::bind`],
/// captures going into `captures`. One request is carried out at a time
/// (a capture and a pause must not interleave); reading requests and
/// writing answers is not serialised, so a slow client delays nobody.
pub fn serve(
    socket: BoundSocket,
    captures: CaptureDir,
    vm: Arc<Vm>,
) -> Result<ControlServer, ControlError> {
    let serial = Mutex::new(());
    Ok(ControlServer::start(socket, move |request| {
        let _one = serial.lock().unwrap_or_else(PoisonError::into_inner);
        execute(&vm, &captures, request)
    })?)
}

fn error(e: impl std::fmt::Display) -> ControlResponse {
    ControlResponse::Error {
        message: e.to_string(),
    }
}

/// The answer to an error with its causes.
fn error_chain(e: &dyn std::error::Error) -> ControlResponse {
    error(crate::error_chain(e))
}

/// Carries out one request on `vm`; captures go into `captures`.
pub fn execute(vm: &Vm, captures: &CaptureDir, request: ControlRequest) -> ControlResponse {
    match request {
        ControlRequest::Status => ControlResponse::Status {
            paused: vm.vcpus().is_paused(),
            vcpus: vm.config.vcpus,
            mem_mib: vm.config.mem_mib,
            uptime_ms: vm.started.elapsed().as_millis() as u64,
            manual_dirty_protect: vm.dirty_log.manual_protect(),
            dirty_tracking: vm.dirty_log.method(),
        },
        ControlRequest::Pause => ControlResponse::Paused {
            pause_us: vm.pause().as_micros() as u64,
        },
        ControlRequest::Resume => {
            vm.resume();
            ControlResponse::Resumed
        }
        ControlRequest::Capture { name } => {
            let dir = match captures.entry(&name) {
                Ok(dir) => dir,
                Err(e) => return error_chain(&e),
            };
            match vm.capture_to_dir(&dir) {
                Ok(times) => ControlResponse::Captured { dir, times },
                Err(e) => error_chain(&e),
            }
        }
        ControlRequest::Harvest { pages_file } => {
            // Checked before the harvest: a refused request takes nothing.
            let pages_file = match pages_file.map(|name| captures.entry(&name)).transpose() {
                Ok(p) => p,
                Err(e) => return error_chain(&e),
            };
            let was_paused = vm.vcpus().is_paused();
            vm.pause();
            let start = Instant::now();
            let harvested = vm.harvest_dirty();
            let took = start.elapsed();
            if !was_paused {
                vm.resume();
            }
            match harvested {
                Ok(pages) => {
                    if let Some(path) = &pages_file {
                        let text: String = pages.page_numbers().map(|p| format!("{p}\n")).collect();
                        if let Err(e) = std::fs::write(path, text) {
                            return error(format!("writing {}: {e}", path.display()));
                        }
                    }
                    ControlResponse::Harvested {
                        pages: pages.count(),
                        by_guest: pages.by_guest,
                        by_vmm: pages.by_vmm,
                        harvest_us: took.as_micros() as u64,
                        pages_file,
                    }
                }
                Err(e) => error_chain(&e),
            }
        }
        ControlRequest::Counters => ControlResponse::Counters {
            counters: CountersSnapshot {
                dirty_ring_full_exits: vm.dirty_log.ring_full_exits(),
                ..vm.counters.snapshot()
            },
        },
    }
}

/// Sends one request to the control socket at `path` and returns the
/// answer (which may be [`ControlResponse::Error`]). Connecting, sending
/// and receiving each must finish within [`ANSWER_TIMEOUT`].
pub fn request(path: &Path, request: &ControlRequest) -> Result<ControlResponse, ControlError> {
    request_within(path, request, ANSWER_TIMEOUT)
}

/// [`request`] with another timeout.
pub fn request_within(
    path: &Path,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<ControlResponse, ControlError> {
    let mut line = serde_json::to_vec(request).map_err(ControlError::Encode)?;
    line.push(b'\n');
    let conn = socket::connect(path, timeout).map_err(ControlError::Connect)?;
    let send = |source| ControlError::Send {
        path: path.to_path_buf(),
        source,
    };
    conn.set_write_timeout(Some(timeout)).map_err(send)?;
    // A server that refuses (busy) may close before the request is
    // written: its answer is read all the same, and the failed write only
    // reported if there is none.
    let sent = (&conn).write_all(&line);
    let receive = |source| ControlError::Receive {
        path: path.to_path_buf(),
        source,
    };
    conn.set_read_timeout(Some(timeout)).map_err(receive)?;
    let mut answer = Vec::new();
    (&conn)
        .take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut answer)
        .or_else(|e| if sent.is_err() { Ok(0) } else { Err(e) })
        .map_err(receive)?;
    if answer.len() > MAX_RESPONSE {
        return Err(ControlError::AnswerTooLong {
            path: path.to_path_buf(),
        });
    }
    let answer = match answer.iter().position(|&b| b == b'\n') {
        Some(end) => &answer[..end],
        None => &answer[..],
    };
    if answer.is_empty() {
        sent.map_err(send)?;
        return Err(ControlError::Closed {
            path: path.to_path_buf(),
        });
    }
    serde_json::from_slice(answer).map_err(|source| ControlError::BadAnswer {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r: ControlRequest = serde_json::from_str(r#"{"op":"capture","name":"snap"}"#).unwrap();
        assert_eq!(
            r,
            ControlRequest::Capture {
                name: "snap".into()
            }
        );
        let r: ControlRequest =
            serde_json::from_str(r#"{"op":"harvest","pages_file":null}"#).unwrap();
        assert_eq!(r, ControlRequest::Harvest { pages_file: None });
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"explode"}"#).is_err());
        // The old form, a path chosen by the client, is not understood.
        assert!(
            serde_json::from_str::<ControlRequest>(r#"{"op":"capture","dir":"/tmp/x"}"#).is_err()
        );
    }
}
