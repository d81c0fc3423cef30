//! The lab's quorum witness: `ftwitness` on the outer host, listening on
//! the business network's host address (the third machine of a real
//! installation). Started by `ftctl lab up`, stopped by `ftctl lab down`;
//! `ftctl lab witness stop|start` for drills that take it away.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::topology::Topology;

#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("cannot start the lab's witness {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the lab's witness did not listen on {addr} within {within:?}; its log {log}:\n{tail}"
    )]
    NotListening {
        addr: String,
        within: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("lab witness file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How long the witness may take to listen.
const START_WITHIN: Duration = Duration::from_secs(10);

/// The witness's pid, if it runs (a zombie does not).
pub fn running_pid(topo: &Topology) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(topo.witness_pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let state_dir = topo.witness_dir();
    let ours = cmdline
        .split(|&b| b == 0)
        .any(|arg| arg == state_dir.as_os_str().as_encoded_bytes());
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit(')')
        .next()
        .is_some_and(|rest| rest.trim_start().starts_with('Z'));
    (ours && !zombie).then_some(pid)
}

/// Starts the witness unless it runs; returns its pid.
pub fn start(topo: &Topology, bin_dir: &Path) -> Result<u32, WitnessError> {
    if let Some(pid) = running_pid(topo) {
        return Ok(pid);
    }
    let file_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WitnessError::File { path, source }
    };
    let dir = topo.witness_dir();
    std::fs::create_dir_all(&dir).map_err(file_err(&dir))?;
    let log_path = topo.witness_log();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(file_err(&log_path))?;
    let log2 = log.try_clone().map_err(file_err(&log_path))?;
    let binary = bin_dir.join("ftwitness");
    let addr = topo.witness_addr().to_string();
    let mut child = Command::new(&binary)
        .args(["serve", "--listen", &addr, "--secret-file"])
        .arg(topo.pair_secret_file())
        .arg("--state-dir")
        .arg(&dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: it outlives the `ftctl` that started it.
        .process_group(0)
        .spawn()
        .map_err(|source| WitnessError::Spawn {
            binary: binary.clone(),
            source,
        })?;
    let pid = child.id();
    let pid_file = topo.witness_pid_file();
    std::fs::write(&pid_file, pid.to_string()).map_err(file_err(&pid_file))?;
    let started = Instant::now();
    while std::net::TcpStream::connect_timeout(&topo.witness_addr(), Duration::from_millis(200))
        .is_err()
    {
        let exited = child.try_wait().ok().flatten().is_some();
        if started.elapsed() > START_WITHIN || exited {
            return Err(WitnessError::NotListening {
                addr,
                within: START_WITHIN,
                log: log_path.clone(),
                tail: crate::lab::tail(&log_path, 20),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(pid)
}

/// Stops the witness (SIGTERM, then SIGKILL); true if it ran.
pub fn stop(topo: &Topology) -> bool {
    let Some(pid) = running_pid(topo) else {
        return false;
    };
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        // SAFETY: kill(2) on the pid from our pid file, checked to be this
        // lab's witness; no memory-safety preconditions.
        unsafe {
            libc::kill(pid as libc::pid_t, signal);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while running_pid(topo).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if running_pid(topo).is_none() {
            break;
        }
    }
    true
}
