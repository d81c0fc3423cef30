//! The control socket: a Unix socket on which a client (ftctl, a test, the FT
//! engine's tools) pauses, resumes, captures to a directory, harvests dirty
//! pages and reads status and counters. One JSON request line, one JSON
//! response line per connection.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::metrics::CountersSnapshot;
use crate::snapshot::CaptureTimes;
use crate::vm::Vm;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    Status,
    Pause,
    Resume,
    /// Pause, capture state and memory into `dir`, resume.
    Capture {
        dir: PathBuf,
    },
    /// Pause, harvest the dirty set, resume; optionally write the page
    /// numbers (one per line) to `pages_file`.
    Harvest {
        pages_file: Option<PathBuf>,
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
    },
    Paused {
        pause_us: u64,
    },
    Resumed,
    Captured {
        times: CaptureTimes,
    },
    Harvested {
        pages: u64,
        by_guest: u64,
        by_vmm: u64,
        harvest_us: u64,
    },
    Counters {
        counters: CountersSnapshot,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach control socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed control message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("control socket closed without an answer")]
    Closed,
}

/// Serves the control socket at `path` in a background thread.
pub fn serve(path: &Path, vm: Arc<Vm>) -> Result<std::thread::JoinHandle<()>, ControlError> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    // One request at a time: a capture and a pause must not interleave.
    let serial = Arc::new(Mutex::new(()));
    Ok(std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _one = serial.lock().expect("control lock");
                let _ = handle(conn, &vm);
            }
        })?)
}

fn handle(conn: UnixStream, vm: &Vm) -> Result<(), ControlError> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let response = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(request) => execute(vm, request),
        Err(e) => ControlResponse::Error {
            message: format!("malformed request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    (&conn).write_all(&out)?;
    Ok(())
}

fn error(e: impl std::fmt::Display) -> ControlResponse {
    ControlResponse::Error {
        message: e.to_string(),
    }
}

/// Carries out one request on `vm`.
pub fn execute(vm: &Vm, request: ControlRequest) -> ControlResponse {
    match request {
        ControlRequest::Status => ControlResponse::Status {
            paused: vm.vcpus().is_paused(),
            vcpus: vm.config.vcpus,
            mem_mib: vm.config.mem_mib,
            uptime_ms: vm.started.elapsed().as_millis() as u64,
            manual_dirty_protect: vm.dirty_log.manual_protect(),
        },
        ControlRequest::Pause => ControlResponse::Paused {
            pause_us: vm.pause().as_micros() as u64,
        },
        ControlRequest::Resume => {
            vm.resume();
            ControlResponse::Resumed
        }
        ControlRequest::Capture { dir } => match vm.capture_to_dir(&dir) {
            Ok(times) => ControlResponse::Captured { times },
            Err(e) => error(e),
        },
        ControlRequest::Harvest { pages_file } => {
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
                    if let Some(path) = pages_file {
                        let text: String = pages.page_numbers().map(|p| format!("{p}\n")).collect();
                        if let Err(e) = std::fs::write(&path, text) {
                            return error(format!("writing {}: {e}", path.display()));
                        }
                    }
                    ControlResponse::Harvested {
                        pages: pages.count(),
                        by_guest: pages.by_guest,
                        by_vmm: pages.by_vmm,
                        harvest_us: took.as_micros() as u64,
                    }
                }
                Err(e) => error(e),
            }
        }
        ControlRequest::Counters => ControlResponse::Counters {
            counters: vm.counters.snapshot(),
        },
    }
}

/// Sends one request to the control socket at `path`.
pub fn request(path: &Path, request: &ControlRequest) -> Result<ControlResponse, ControlError> {
    let conn = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    (&conn).write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(conn).read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(ControlError::Closed);
    }
    Ok(serde_json::from_str(&answer)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r: ControlRequest = serde_json::from_str(r#"{"op":"capture","dir":"/tmp/x"}"#).unwrap();
        assert_eq!(
            r,
            ControlRequest::Capture {
                dir: "/tmp/x".into()
            }
        );
        let r: ControlRequest =
            serde_json::from_str(r#"{"op":"harvest","pages_file":null}"#).unwrap();
        assert_eq!(r, ControlRequest::Harvest { pages_file: None });
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"explode"}"#).is_err());
    }
}
