//! One VM role's `ftprotect` process: its files, its command line, its
//! start, its status on the control socket, its stop.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use replicator::control::{self, ControlCommand, ControlRequest};
use replicator::status::{FtState, Role, Status};
use tokio::process::{Child, Command};

use super::engine_handle::EngineHandle;
use crate::config::{Config, SECRET_FILE};
use crate::model::VmDefinition;

/// How long a status request may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// An adopted process without a pidfd (a kernel older than 5.3) counts as
/// gone after this many status requests in a row went unanswered.
const ADOPTED_MISSES: u32 = 6;
/// How often a killed adopted process that is not gone yet is said to be
/// still there.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long a stop asked on the control socket may take before the
/// process is killed (a primary stops its guest, a standby leaves).
const STOP_GRACE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot make {path}: {source}")]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot copy the disk image {image} to {path}: {source}")]
    CopyImage {
        image: PathBuf,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
}

/// Where a VM's files are on this node.
#[derive(Debug, Clone)]
pub struct VmPaths {
    /// `<state dir>/vms/<name>`: disks and logs.
    pub dir: PathBuf,
    /// `<run dir>/<name>.sock`: the role's control socket.
    pub sock: PathBuf,
    pub log: PathBuf,
    pub console: PathBuf,
    pub secret: PathBuf,
    /// `<ram dir>/<name>.ram`: the guest's RAM, if kept in a file.
    pub ram: Option<PathBuf>,
}

impl VmPaths {
    pub fn new(config: &Config, state_dir: &Path, vm: &str) -> VmPaths {
        let dir = state_dir.join("vms").join(vm);
        VmPaths {
            sock: config.run_dir.join(format!("{vm}.sock")),
            log: dir.join("ftprotect.log"),
            console: dir.join("console.log"),
            secret: state_dir.join(SECRET_FILE),
            ram: (!config.ram_dir.as_os_str().is_empty())
                .then(|| config.ram_dir.join(format!("{vm}.ram"))),
            dir,
        }
    }

    pub fn disk(&self, index: usize) -> PathBuf {
        self.dir.join(format!("disk{index}.img"))
    }
}

/// The TAP of NIC `index` of the VM in A-link slot `slot`.
pub fn tap_name(slot: u16, index: usize) -> String {
    format!("ft{slot}n{index}")
}

/// `addrs` with the VM's slot added to each port.
fn slot_addresses(addrs: &[SocketAddr], slot: u16) -> String {
    addrs
        .iter()
        .map(|a| SocketAddr::new(a.ip(), a.port().saturating_add(slot)).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The engine's command line for `role` of `vm` (the process's
/// plumbing, its log and group, aside).
fn engine_command(
    config: &Config,
    vm: &VmDefinition,
    generation: u64,
    role: Role,
    paths: &VmPaths,
) -> Command {
    let mut cmd = Command::new(&config.ftprotect);
    cmd.arg(match role {
        Role::Primary => "run",
        Role::Standby => "standby",
    });
    cmd.args(["--vm-name", &vm.name, "--node", &config.node.name]);
    cmd.arg("--secret-file").arg(&paths.secret);
    if let Some(peer) = &config.peer {
        cmd.args(["--peer", &slot_addresses(&peer.alink, vm.slot)]);
        if !config.witness.is_empty() {
            cmd.args(["--witness", &config.witness.join(",")]);
            // Its level may change to ft or ha while it runs: the engine
            // then takes the witness's lease when the standby connects.
            if !vm.level.has_standby() {
                cmd.arg("--lease-when-protected");
            }
        }
    }
    cmd.args(["--generation", &generation.to_string()]);
    if vm.level == crate::model::Level::Ha {
        cmd.args(["--level", "ha"]);
    }
    cmd.args(["--bridge", &config.bridge]);
    cmd.arg("--control-sock").arg(&paths.sock);
    cmd.arg("--serial-log").arg(&paths.console);
    if let Some(ram) = &paths.ram {
        cmd.arg("--ram-file").arg(ram);
    }
    let ft = &vm.ft;
    let heartbeat = ft
        .heartbeat_timeout_ms
        .unwrap_or(config.heartbeat_timeout_ms);
    cmd.args(["--heartbeat-timeout-ms", &heartbeat.to_string()]);
    if let Some(min) = ft.min_interval_ms {
        cmd.args(["--min-interval-ms", &min.to_string()]);
    }
    if let Some(max) = ft.max_interval_ms {
        cmd.args(["--max-interval-ms", &max.to_string()]);
    }
    if ft.synchronous {
        cmd.arg("--synchronous");
    }
    if let Some(n) = ft.epochs_in_flight {
        cmd.args(["--epochs-in-flight", &n.to_string()]);
    }
    if ft.no_pulses {
        cmd.arg("--no-pulses");
    }
    if let Some(ms) = ft.ack_deadline_ms {
        cmd.args(["--ack-deadline-ms", &ms.to_string()]);
    }
    if let Some(mib) = ft.delta_cache_mib {
        cmd.args(["--delta-cache-mib", &mib.to_string()]);
    }
    if config.alink_plaintext {
        cmd.arg("--alink-plaintext");
    }
    // A standby passes it on to the primary it becomes at a takeover.
    cmd.args(["--copy-compression", &config.copy_compression.to_string()]);
    match role {
        Role::Primary => {
            cmd.args(["--kernel", &vm.kernel]);
            if let Some(initrd) = &vm.initrd {
                cmd.args(["--initrd", initrd]);
            }
            cmd.args(["--cmdline", &vm.cmdline]);
            cmd.args(["--vcpus", &vm.vcpus.to_string()]);
            cmd.args(["--mem-mib", &vm.memory_mib.to_string()]);
            for i in 0..vm.disks.len() {
                cmd.arg("--disk").arg(paths.disk(i));
            }
            for (i, mac) in vm.nics.iter().enumerate() {
                cmd.args(["--net", &format!("tap={},mac={mac}", tap_name(vm.slot, i))]);
            }
        }
        Role::Standby => {
            cmd.args(["--listen", &slot_addresses(&config.node.alink, vm.slot)]);
            for i in 0..vm.disks.len() {
                cmd.arg("--disk").arg(paths.disk(i));
            }
            for i in 0..vm.nics.len() {
                cmd.args(["--tap", &tap_name(vm.slot, i)]);
            }
        }
    }
    cmd
}

/// What a poll saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub status: Option<Status>,
    pub exit: Option<Exit>,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    pub code: Option<i32>,
    /// The last FT state it reported.
    pub last_state: Option<FtState>,
    pub last_message: Option<String>,
    /// The tail of its log.
    pub log_tail: String,
}

impl Exit {
    pub fn describe(&self) -> String {
        let code = match self.code {
            Some(c) => format!("exit code {c}"),
            None => "no exit code".to_string(),
        };
        let mut out = code;
        if let Some(m) = &self.last_message {
            out.push_str(&format!("; {m}"));
        }
        if !self.log_tail.is_empty() {
            out.push_str(&format!("; log: {}", self.log_tail));
        }
        out
    }
}

pub struct Process {
    pub role: Role,
    child: Option<Child>,
    /// An adopted process: a handle on it, when the kernel gives one.
    adopted: Option<EngineHandle>,
    paths: VmPaths,
    last: Option<Status>,
    misses: u32,
    /// The protection level this process was last asked to go on at (not
    /// asked again while it changes).
    pub level_asked: Option<replicator::level::Level>,
    /// Its engine said a live migration was under way, last it was read.
    pub was_migrating: bool,
    /// Said already: this primary runs a standby session without the
    /// pair's witness ([`super::unwitnessed`]).
    pub said_unwitnessed: bool,
}

impl Process {
    /// Prepares the VM's files and starts its role.
    pub async fn start(
        config: &Config,
        vm: &VmDefinition,
        generation: u64,
        role: Role,
        paths: VmPaths,
    ) -> Result<Process, ProcessError> {
        for dir in [&paths.dir, &config.run_dir] {
            std::fs::create_dir_all(dir).map_err(|source| ProcessError::Prepare {
                path: dir.clone(),
                source,
            })?;
        }
        if role == Role::Primary {
            prepare_disks(vm, &paths).await?;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log)
            .map_err(|source| ProcessError::Prepare {
                path: paths.log.clone(),
                source,
            })?;
        let log2 = log.try_clone().map_err(|source| ProcessError::Prepare {
            path: paths.log.clone(),
            source,
        })?;
        let mut cmd = engine_command(config, vm, generation, role, &paths);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            // Its own process group: a signal to ftd (Ctrl-C, a restart)
            // does not reach the VMs.
            .process_group(0)
            .kill_on_drop(false);
        tracing::info!(vm = %vm.name, ?role, command = ?cmd.as_std(), "starting a VM role");
        let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            program: config.ftprotect.clone(),
            source,
        })?;
        Ok(Process {
            role,
            child: Some(child),
            adopted: None,
            paths,
            last: None,
            misses: 0,
            level_asked: None,
            was_migrating: false,
            said_unwitnessed: false,
        })
    }

    /// A process a previous `ftd` started, found answering on its socket.
    pub async fn adopt(vm: &str, paths: VmPaths) -> Option<Process> {
        let (status, pid) = status_answered_by(&paths.sock, ()).await?;
        if matches!(status.state, FtState::Stopped | FtState::Failed) {
            return None;
        }
        let opened = pid.map(EngineHandle::open);
        let ended = match &opened {
            Some(Ok(handle)) => handle.ended().unwrap_or(false),
            Some(Err(e)) => e.process_gone(),
            None => false,
        };
        if ended {
            tracing::info!(
                vm,
                ?pid,
                "the VM role's process ended before it was adopted"
            );
            return None;
        }
        let adopted = match opened {
            Some(Ok(handle)) => {
                // The pid was read before the handle was made. Pids are
                // handed out in turn up to pid_max before any is used
                // again, so the handle is on the process that answered;
                // unless another process answers the socket now.
                match status_answered_by(&paths.sock, ()).await {
                    Some((_, again)) if again != pid => {
                        tracing::warn!(vm, ?pid, ?again, "another process answers the control socket now: no handle on it, it counts as gone when it stops answering");
                        None
                    }
                    // That process, or no answer yet (a busy engine): it lives.
                    _ => Some(handle),
                }
            }
            Some(Err(e)) => {
                tracing::warn!(vm, error = %e, "no handle on the adopted process: it counts as gone when it stops answering");
                None
            }
            None => {
                tracing::warn!(vm, "the control socket did not name its process: it counts as gone when it stops answering");
                None
            }
        };
        tracing::info!(vm, role = ?status.role, ?pid, "adopting a running VM role");
        Some(Process {
            role: status.role,
            child: None,
            adopted,
            paths,
            last: Some(status),
            misses: 0,
            level_asked: None,
            was_migrating: false,
            said_unwitnessed: false,
        })
    }

    /// The status last read.
    pub fn last_status(&self) -> Option<&Status> {
        self.last.as_ref()
    }

    /// Reads the status; notices an exit.
    pub async fn poll(&mut self) -> Seen {
        let status = status(&self.paths.sock).await;
        if let Some(s) = &status {
            self.last = Some(s.clone());
            self.misses = 0;
        } else {
            self.misses += 1;
        }
        let exit = match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(code)) => Some(code.code()),
                Ok(None) => None,
                Err(_) => Some(None),
            },
            None => match self.adopted.as_ref().map(EngineHandle::ended) {
                Some(Ok(ended)) => ended.then_some(None),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "cannot look at an adopted VM role's process");
                    (self.misses >= ADOPTED_MISSES).then_some(None)
                }
                None => (self.misses >= ADOPTED_MISSES).then_some(None),
            },
        };
        Seen {
            status,
            exit: exit.map(|code| self.exit(code)),
        }
    }

    fn exit(&self, code: Option<i32>) -> Exit {
        Exit {
            code,
            last_state: self.last.as_ref().map(|s| s.state),
            last_message: self.last.as_ref().and_then(|s| s.message.clone()),
            log_tail: log_tail(&self.paths.log),
        }
    }

    /// Asks the process to stop (a primary stops its guest and tells the
    /// standby not to take over); kills it if it does not within
    /// [`STOP_GRACE`].
    pub async fn stop(&mut self) -> Option<Exit> {
        let sock = self.paths.sock.clone();
        let asked = tokio::task::spawn_blocking(move || {
            control::request(
                &sock,
                &ControlRequest::new(ControlCommand::Stop),
                STATUS_TIMEOUT,
            )
        })
        .await;
        let asked = matches!(asked, Ok(Ok(ref r)) if r.ok);
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        loop {
            let seen = self.poll().await;
            if seen.exit.is_some() {
                return seen.exit;
            }
            if !asked || tokio::time::Instant::now() >= deadline {
                self.kill().await;
                return Some(self.exit(None));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops at once (the VM is no longer defined).
    /// Asks the engine to go on at another protection level (a primary:
    /// FT <-> HA without a reboot); the answer's refusal, if any.
    pub async fn ask_level(&self, level: replicator::level::Level) -> Result<(), String> {
        let command = match level {
            replicator::level::Level::Ha => ControlCommand::LevelHa,
            replicator::level::Level::Ft => ControlCommand::LevelFt,
        };
        let sock = self.paths.sock.clone();
        let asked = tokio::task::spawn_blocking(move || {
            control::request(&sock, &ControlRequest::new(command), STATUS_TIMEOUT)
        })
        .await;
        match asked {
            Ok(Ok(r)) if r.ok => Ok(()),
            Ok(Ok(r)) => Err(r.error.unwrap_or_else(|| "refused".into())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    pub async fn stop_now(&mut self) {
        self.kill().await;
    }

    /// Kills the process and waits for it to be gone.
    async fn kill(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill().await;
            return;
        }
        match &self.adopted {
            Some(handle) => {
                if let Err(e) = handle.kill() {
                    tracing::warn!(error = %e, "cannot kill an adopted VM role's process");
                    return;
                }
                // As for a child: gone before the next role may start (one
                // stuck in the kernel is waited for, and said so).
                loop {
                    match handle.wait_ended(KILL_WAIT).await {
                        Ok(true) => break,
                        Ok(false) => tracing::warn!(
                            pid = handle.pid(),
                            "an adopted VM role's process is still there after SIGKILL: waiting for it"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot tell whether an adopted VM role's process is gone");
                            break;
                        }
                    }
                }
            }
            None => {
                // Adopted, with no handle on it (an old kernel): ask it to
                // stop instead.
                let sock = self.paths.sock.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    control::request(
                        &sock,
                        &ControlRequest::new(ControlCommand::Stop),
                        STATUS_TIMEOUT,
                    )
                })
                .await;
            }
        }
    }
}

/// The status the engine serving `sock` gives now (none: no engine
/// there, or it did not answer within a second).
async fn status(sock: &Path) -> Option<Status> {
    status_answered_by(sock, ()).await.map(|(status, _)| status)
}

/// [`status`], `held` kept until the request to the engine has ended, even
/// when the caller stops waiting for it first (a limit on the requests an
/// engine is asked at once: a permit).
pub(crate) async fn status_holding<T: Send + 'static>(sock: &Path, held: T) -> Option<Status> {
    status_answered_by(sock, held)
        .await
        .map(|(status, _)| status)
}

/// The status on `sock`, and the pid of the process that answered (when
/// the kernel names it); `held` is dropped when the request has ended.
async fn status_answered_by<T: Send + 'static>(
    sock: &Path,
    held: T,
) -> Option<(Status, Option<u32>)> {
    if !sock.exists() {
        return None;
    }
    let sock = sock.to_path_buf();
    let (answer, pid) = tokio::task::spawn_blocking(move || {
        let answered = control::request_answered_by(
            &sock,
            &ControlRequest::new(ControlCommand::Status),
            STATUS_TIMEOUT,
        );
        drop(held);
        answered
    })
    .await
    .ok()?
    .ok()?;
    Some((answer.status?, pid))
}

/// The last lines of a log, on one line.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// Makes the primary's disk files that do not exist yet: a copy of the
/// image or an empty sparse file. Existing files are the VM's disks and
/// are kept.
async fn prepare_disks(vm: &VmDefinition, paths: &VmPaths) -> Result<(), ProcessError> {
    for (i, disk) in vm.disks.iter().enumerate() {
        let path = paths.disk(i);
        if path.exists() {
            continue;
        }
        let tmp = path.with_extension("img.new");
        match (&disk.image, disk.size_mib) {
            (Some(image), _) => {
                let image = PathBuf::from(image);
                let (from, to) = (image.clone(), tmp.clone());
                let copied = tokio::task::spawn_blocking(move || std::fs::copy(from, to))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                copied.map_err(|source| ProcessError::CopyImage {
                    image,
                    path: path.clone(),
                    source,
                })?;
            }
            (None, size) => {
                let size = size.unwrap_or(1) << 20;
                let file = std::fs::File::create(&tmp).and_then(|f| f.set_len(size).map(|_| f));
                file.map_err(|source| ProcessError::Prepare {
                    path: path.clone(),
                    source,
                })?;
            }
        }
        // The copy is on disk before its name is (a power cut must not
        // leave a disk that looks made but holds nothing).
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| crate::secrets::sync_dir(&paths.dir))
            .map_err(|source| ProcessError::Prepare {
                path: path.clone(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::sync::Arc;

    use replicator::control::ControlServer;
    use replicator::status::StatusBoard;

    /// Set for a copy of this test binary that serves a control socket.
    const SERVE_ENV: &str = "FTD_TEST_ENGINE_SOCKET";

    /// Not a test: the body of an engine stand-in, in its own process (this
    /// test binary run again with [`SERVE_ENV`] set). It serves a real
    /// control socket as a standing-by standby and exits 0 when asked to
    /// stop, as `ftprotect` does. Run plainly, it returns at once.
    #[test]
    fn engine_stand_in() {
        let Some(path) = std::env::var_os(SERVE_ENV) else {
            return;
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let board = StatusBoard::new("node-t", Role::Standby);
            board.set_state(Role::Standby, FtState::StandingBy, None);
            let stop = Arc::new(tokio::sync::Notify::new());
            let server = ControlServer::bind(Path::new(&path)).unwrap();
            let serving = tokio::spawn(server.serve(board, Arc::clone(&stop)));
            // Or after two minutes: a test killed midway leaves nothing.
            tokio::select! {
                () = stop.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(120)) => {}
            }
            // The answer to the stop goes out first.
            tokio::time::sleep(Duration::from_millis(100)).await;
            serving.abort();
        });
        std::process::exit(0);
    }

    /// A child killed when the test ends, passed or not (a stopped one
    /// would hold the test run's output open).
    struct Killed(std::process::Child);

    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Whether process `pid` is stopped (by a signal), as /proc tells.
    fn stopped(pid: u32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // After the command's name in parentheses: " T ".
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
    }

    /// An engine stand-in this test started, as a previous `ftd` would
    /// have, and the paths of its VM.
    fn engine(dir: &Path) -> (Killed, VmPaths) {
        let sock = dir.join("vm.sock");
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "supervisor::process::tests::engine_stand_in"])
            .args(["--nocapture", "--test-threads", "1"])
            .env(SERVE_ENV, &sock)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let paths = VmPaths {
            dir: dir.to_path_buf(),
            sock,
            log: dir.join("ftprotect.log"),
            console: dir.join("console.log"),
            secret: dir.join("secret"),
            ram: None,
        };
        (Killed(child), paths)
    }

    async fn adopted(vm: &str, paths: &VmPaths) -> Process {
        for _ in 0..200 {
            if let Some(p) = Process::adopt(vm, paths.clone()).await {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the engine stand-in never answered on {:?}", paths.sock);
    }

    #[tokio::test]
    async fn an_adopted_engine_that_stops_answering_is_not_gone_until_it_is_and_a_stop_waits_for_it(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, paths) = engine(dir.path());
        let child = &mut child.0;
        let mut process = adopted("vm-a", &paths).await;
        assert_eq!(process.role, Role::Standby);
        let pid = process.adopted.as_ref().map(EngineHandle::pid);
        assert_eq!(pid, Some(child.id()), "the handle names the engine");

        // Frozen: it answers nothing, yet it runs (and holds its disks).
        // SAFETY: kill with the pid of our own child, not waited for yet.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) }, 0);
        let asked = std::time::Instant::now();
        while !stopped(child.id()) {
            assert!(
                asked.elapsed() < Duration::from_secs(10),
                "SIGSTOP not taken"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for poll in 1..=ADOPTED_MISSES + 1 {
            let seen = process.poll().await;
            assert!(seen.status.is_none());
            assert!(
                seen.exit.is_none(),
                "poll {poll}: an engine that is still there counted as gone"
            );
        }
        assert!(child.try_wait().unwrap().is_none());

        // A stop it cannot answer ends with it killed, and returns only
        // once it is gone.
        let exit = process.stop().await;
        assert!(exit.is_some());
        let status = child.try_wait().unwrap().expect("gone when stop returned");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[tokio::test]
    async fn an_adopted_engine_asked_to_stop_is_seen_gone_when_it_has_exited() {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, paths) = engine(dir.path());
        let child = &mut child.0;
        let mut process = adopted("vm-b", &paths).await;
        let seen = process.poll().await;
        assert!(seen.exit.is_none() && seen.status.is_some(), "{seen:?}");
        let exit = process.stop().await;
        assert_eq!(exit.and_then(|e| e.last_state), Some(FtState::StandingBy));
        let status = child.try_wait().unwrap().expect("gone when stop returned");
        assert_eq!(status.code(), Some(0), "it stopped by itself: {status:?}");
    }

    /// The arguments of `command` as strings.
    fn args(command: &Command) -> Vec<String> {
        command
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// `flag`'s value in `args`, if the flag is there.
    fn value_of<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
        let at = args.iter().position(|a| a == flag)?;
        args.get(at + 1).map(String::as_str)
    }

    /// A VM's `ft` options reach its engine on both roles (the
    /// acknowledgement deadline was an ftprotect flag alone).
    #[test]
    fn the_vms_ft_options_reach_its_engine() {
        let config = crate::fixtures::pair_config();
        let mut vm = crate::fixtures::definition("vm1");
        let paths = VmPaths::new(&config, Path::new("/var/lib/ftvm"), "vm1");
        for role in [Role::Primary, Role::Standby] {
            let plain = args(&engine_command(&config, &vm, 3, role, &paths));
            assert_eq!(value_of(&plain, "--ack-deadline-ms"), None, "{plain:?}");
            assert_eq!(value_of(&plain, "--delta-cache-mib"), None, "{plain:?}");
            assert_eq!(value_of(&plain, "--generation"), Some("3"));
        }
        vm.ft.ack_deadline_ms = Some(3000);
        vm.ft.epochs_in_flight = Some(2);
        vm.ft.delta_cache_mib = Some(0);
        for role in [Role::Primary, Role::Standby] {
            let set = args(&engine_command(&config, &vm, 3, role, &paths));
            assert_eq!(value_of(&set, "--ack-deadline-ms"), Some("3000"), "{set:?}");
            assert_eq!(value_of(&set, "--epochs-in-flight"), Some("2"), "{set:?}");
            // A standby passes it on to the primary it becomes.
            assert_eq!(value_of(&set, "--delta-cache-mib"), Some("0"), "{set:?}");
        }
    }

    /// A VM started unprotected gets the pair's witness too, to take its
    /// lease once a standby connects: its level may change to ft or ha
    /// while it runs, and a protected copy without the witness's lease
    /// could run beside a standby the witness let take over (two active
    /// copies). A VM started protected holds its lease from the start.
    #[test]
    fn every_primary_gets_the_witness_and_one_started_unprotected_leases_once_protected() {
        let mut config = crate::fixtures::pair_config();
        config.witness = vec!["10.0.0.9:7300".into()];
        let mut vm = crate::fixtures::definition("vm1");
        let paths = VmPaths::new(&config, Path::new("/var/lib/ftvm"), "vm1");
        for (level, deferred) in [
            (crate::model::Level::Ft, false),
            (crate::model::Level::Ha, false),
            (crate::model::Level::Unprotected, true),
        ] {
            vm.level = level;
            let args = args(&engine_command(&config, &vm, 3, Role::Primary, &paths));
            assert_eq!(
                value_of(&args, "--witness"),
                Some("10.0.0.9:7300"),
                "{level:?}: {args:?}"
            );
            assert_eq!(
                args.iter().any(|a| a == "--lease-when-protected"),
                deferred,
                "{level:?}: {args:?}"
            );
        }
        config.witness.clear();
        let args = args(&engine_command(&config, &vm, 3, Role::Primary, &paths));
        assert!(
            !args
                .iter()
                .any(|a| a.contains("witness") || a == "--lease-when-protected"),
            "no witness configured: {args:?}"
        );
    }
}
