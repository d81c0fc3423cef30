//! The control interface of a node's FT process: a Unix socket speaking
//! JSON lines, one request and one response per line.
//!
//! ```text
//! -> {"version":1,"command":"status"}
//! <- {"version":1,"ok":true,"status":{"version":1,"node":"node-a","role":"primary",...}}
//! -> {"version":1,"command":"stop"}
//! <- {"version":1,"ok":true}
//! -> {"version":2,"command":"status"}
//! <- {"version":1,"ok":false,"error":"unsupported control version 2 (this server speaks version 1)"}
//! ```
//!
//! The socket is put in place by [`vmm::control::socket::bind`]: its
//! owner's only (mode 0600, bound in a private folder and linked into
//! place, so it is never reachable by others), replacing nothing but a
//! stale socket. Each connection is served in its own task, at most
//! [`MAX_CLIENTS`] at once (one more is told it is busy), with a bound on a
//! request's size and on the wait for it. [`request`] is the blocking
//! client, with deadlines: a server that stopped answering makes it fail,
//! never hang.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, warn};

use crate::primary::SwitchoverRequest;
use vmm::control::socket::{self, SocketError, SocketFile};

use crate::status::{Status, StatusBoard};

/// The version of the control protocol this process speaks.
pub const CONTROL_VERSION: u32 = 1;
/// Longest request line the server reads (newline included).
pub const MAX_REQUEST: usize = 64 << 10;
/// Longest response line the client reads.
pub const MAX_RESPONSE: usize = 1 << 20;
/// How long the server waits for a (further) request on a connection.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; one more is answered "busy" and closed.
pub const MAX_CLIENTS: usize = 8;

/// What a client asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlCommand {
    /// The node's [`Status`].
    Status,
    /// Stop protecting and end the process: a primary stops its VM (the
    /// standby is told, so it does not take over), a standby leaves.
    Stop,
    /// A standby whose primary is lost and that waits for the witness's
    /// grant takes over without it (the operator's override, when the
    /// witness cannot answer and the other node is known to be down).
    /// Refused in any other state.
    Takeover,
    /// A protected primary digests its VM at its next checkpoint; the
    /// standby compares its replica with it after applying that epoch (the
    /// consistency oracle; the verdict is in the standby's status).
    Verify,
    /// A protected primary hands its VM to the standby at once (a planned
    /// switchover: final checkpoint, the standby takes over from it, this
    /// copy stops). The outcome is in the status: state `switched-over`,
    /// or `switchovers_called_off` counted with the reason in `message`.
    Switchover,
    /// A primary goes on at level FT (checkpoints), or HA (the disks
    /// mirrored), without a reboot: its session at the old level ends
    /// cleanly and a new one begins (`level_changes` counted; the level in
    /// the status). A standby follows its primary's plan: refused there.
    LevelFt,
    LevelHa,
}

impl ControlCommand {
    pub const ALL: [ControlCommand; 7] = [
        ControlCommand::Status,
        ControlCommand::Stop,
        ControlCommand::Takeover,
        ControlCommand::Verify,
        ControlCommand::Switchover,
        ControlCommand::LevelFt,
        ControlCommand::LevelHa,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ControlCommand::Status => "status",
            ControlCommand::Stop => "stop",
            ControlCommand::Takeover => "takeover",
            ControlCommand::Verify => "verify",
            ControlCommand::Switchover => "switchover",
            ControlCommand::LevelFt => "level_ft",
            ControlCommand::LevelHa => "level_ha",
        }
    }
}

/// What a request asks the process to do once it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    None,
    Stop,
    Takeover,
    Verify,
    Switchover,
    /// A switchover at level HA: a live migration.
    Migrate,
    Level(crate::level::Level),
}

/// One request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlRequest {
    pub version: u32,
    pub command: ControlCommand,
}

impl ControlRequest {
    /// A request in this process's protocol version.
    pub fn new(command: ControlCommand) -> ControlRequest {
        ControlRequest {
            version: CONTROL_VERSION,
            command,
        }
    }
}

/// One response line: `ok` tells which of `status` (for `status`) or
/// `error` (the reason of a refusal) is there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlResponse {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ControlResponse {
    pub fn status(status: Status) -> ControlResponse {
        ControlResponse {
            version: CONTROL_VERSION,
            ok: true,
            status: Some(status),
            error: None,
        }
    }

    /// Success without a payload (the answer to `stop`).
    pub fn done() -> ControlResponse {
        ControlResponse {
            version: CONTROL_VERSION,
            ok: true,
            status: None,
            error: None,
        }
    }

    pub fn refused(reason: impl Into<String>) -> ControlResponse {
        ControlResponse {
            version: CONTROL_VERSION,
            ok: false,
            status: None,
            error: Some(reason.into()),
        }
    }
}

/// Everything that can fail in this module, by operation.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot set up the control socket")]
    Listen(#[source] SocketError),
    #[error("cannot serve the control socket {path} from the I/O runtime")]
    Register {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the client's I/O runtime")]
    Runtime(#[source] io::Error),
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
    #[error("cannot connect to the control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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
    #[error("{path} did not answer within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("{path} closed the connection without answering")]
    NoAnswer { path: PathBuf },
    #[error("the answer from {path} is longer than {MAX_RESPONSE} bytes")]
    AnswerTooLong { path: PathBuf },
    #[error("malformed answer from {path}")]
    BadAnswer {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The answer to one request line (never fails: a bad request gets
/// `ok: false` with the reason), and what it asks for.
fn answer(line: &[u8], status: &StatusBoard) -> (ControlResponse, Action) {
    let value: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return (
                ControlResponse::refused(format!("malformed request: {e}")),
                Action::None,
            )
        }
    };
    let Some(fields) = value.as_object() else {
        return (
            ControlResponse::refused("malformed request: not a JSON object"),
            Action::None,
        );
    };
    match fields.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(CONTROL_VERSION) => {}
        Some(v) => {
            return (
                ControlResponse::refused(format!(
                    "unsupported control version {v} (this server speaks version {CONTROL_VERSION})"
                )),
                Action::None,
            )
        }
        None => {
            return (
                ControlResponse::refused(format!(
                    "request without a numeric \"version\" (this server speaks version {CONTROL_VERSION})"
                )),
                Action::None,
            )
        }
    }
    let known = || {
        ControlCommand::ALL
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let request: ControlRequest = match serde_json::from_value(value.clone()) {
        Ok(r) => r,
        Err(e) => {
            let reason = match fields.get("command") {
                Some(serde_json::Value::String(c)) => {
                    format!("unknown command {c:?} (known: {})", known())
                }
                None => format!("request without a \"command\" (known: {})", known()),
                Some(_) => format!("malformed request: {e}"),
            };
            return (ControlResponse::refused(reason), Action::None);
        }
    };
    match request.command {
        ControlCommand::Status => (ControlResponse::status(status.snapshot()), Action::None),
        ControlCommand::Stop => (ControlResponse::done(), Action::Stop),
        ControlCommand::Takeover => match status.snapshot().state {
            crate::status::FtState::Claiming => (ControlResponse::done(), Action::Takeover),
            state => (
                ControlResponse::refused(format!(
                    "no takeover to force: this process is {state}, not a standby claiming one \
                     (its primary lives, or it holds no replica)"
                )),
                Action::None,
            ),
        },
        ControlCommand::LevelFt | ControlCommand::LevelHa => {
            let to = if request.command == ControlCommand::LevelFt {
                crate::level::Level::Ft
            } else {
                crate::level::Level::Ha
            };
            let s = status.snapshot();
            match s.role {
                crate::status::Role::Primary => (ControlResponse::done(), Action::Level(to)),
                role => (
                    ControlResponse::refused(format!(
                        "no level change here: this process is a {role}; a standby follows \
                         its primary's plan (ask the primary's node)"
                    )),
                    Action::None,
                ),
            }
        }
        ControlCommand::Switchover => {
            let s = status.snapshot();
            match (s.role, s.state) {
                _ if s.migrating => (
                    ControlResponse::refused(
                        "a live migration of this VM is under way already".to_string(),
                    ),
                    Action::None,
                ),
                (crate::status::Role::Primary, crate::status::FtState::Protected)
                    if s.level == crate::level::Level::Ha =>
                {
                    (ControlResponse::done(), Action::Migrate)
                }
                (crate::status::Role::Primary, crate::status::FtState::Protected) => {
                    (ControlResponse::done(), Action::Switchover)
                }
                (role, state) => (
                    ControlResponse::refused(format!(
                        "no switchover: this process is a {role} {state}, not a protected \
                         primary (its standby must hold a committed checkpoint)"
                    )),
                    Action::None,
                ),
            }
        }
        ControlCommand::Verify => {
            let s = status.snapshot();
            match (s.role, s.state) {
                _ if s.level == crate::level::Level::Ha => (
                    ControlResponse::refused(
                        "no consistency check at level HA: the standby holds no memory to \
                         compare"
                            .to_string(),
                    ),
                    Action::None,
                ),
                (crate::status::Role::Primary, crate::status::FtState::Protected) => {
                    (ControlResponse::done(), Action::Verify)
                }
                (role, state) => (
                    ControlResponse::refused(format!(
                        "nothing to verify: this process is a {role} {state}, not a protected \
                         primary"
                    )),
                    Action::None,
                ),
            }
        }
    }
}

/// Reads one line of at most `limit` bytes (newline included). `Ok(None)`
/// at the end of the stream; `Err(InvalidData)` when the line is longer.
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    limit: usize,
) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = reader
        .take(limit as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
    }
    Ok(Some(line))
}

/// Serves one connection until the client closes it, stays silent for
/// [`REQUEST_TIMEOUT`] or sends something too long.
async fn serve_connection(
    stream: UnixStream,
    status: StatusBoard,
    stop: Arc<Notify>,
    hooks: Hooks,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let line = match tokio::time::timeout(REQUEST_TIMEOUT, read_line(&mut reader, MAX_REQUEST))
            .await
        {
            Err(_) => {
                debug!("control connection idle: closed");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(line))) => line,
            Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                let refusal =
                    ControlResponse::refused(format!("request longer than {MAX_REQUEST} bytes"));
                let _ = write_response(&mut write, &refusal).await;
                return;
            }
            Ok(Err(e)) => {
                debug!(error = %e, "control connection failed");
                return;
            }
        };
        let (response, action) = answer(&line, &status);
        if !response.ok {
            warn!(
                error = response.error.as_deref().unwrap_or(""),
                "control request refused"
            );
        }
        // Answer first: the process may end as soon as `stop` is notified.
        let written = write_response(&mut write, &response).await;
        match action {
            Action::Stop => {
                info!("stop asked on the control socket");
                stop.notify_one();
            }
            Action::Takeover => {
                warn!("takeover without the witness's grant forced on the control socket");
                hooks.takeover.notify_one();
            }
            Action::Verify => {
                info!("consistency check asked for the next checkpoint");
                hooks.verify.store(true, Ordering::SeqCst);
            }
            Action::Switchover => {
                info!("planned switchover asked on the control socket");
                hooks.switchover.ask();
            }
            Action::Migrate => {
                info!("live migration asked on the control socket: memory is copied at level FT, then the VM switches over");
                status.update(|s| s.migrating = true);
                hooks.switchover.ask_migration();
                hooks.relevel.ask(crate::level::Level::Ft);
            }
            Action::Level(to) => {
                info!(level = %to, "protection level change asked on the control socket");
                hooks.relevel.ask(to);
            }
            Action::None => {}
        }
        if written.is_err() {
            return;
        }
    }
}

async fn write_response(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &ControlResponse,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    line.push(b'\n');
    tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(&line))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// A bound control socket, ready to [`serve`](ControlServer::serve). The
/// socket file goes when it is dropped (with the future of `serve`), if
/// its path still names it.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    file: SocketFile,
    hooks: Hooks,
}

/// What requests hand the engine.
#[derive(Debug, Clone, Default)]
struct Hooks {
    /// Notified on a forced takeover.
    takeover: Arc<Notify>,
    /// Set by `verify`: the next checkpoint carries a digest.
    verify: Arc<AtomicBool>,
    /// Asked by `switchover`.
    switchover: Arc<SwitchoverRequest>,
    /// Asked by `level_ft` / `level_ha`.
    relevel: Arc<crate::primary::LevelChange>,
}

impl ControlServer {
    /// Creates the socket at `path` (and its folder) with
    /// [`vmm::control::socket::bind`]: mode 0600 from the start; a socket
    /// left at `path` by a process that is gone is replaced, anything else
    /// there (a file, a socket that a live process serves) is an error and
    /// is left alone. Must be called within a tokio runtime.
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        let socket::BoundSocket { listener, file } =
            socket::bind(path).map_err(ControlError::Listen)?;
        let register = |source| ControlError::Register {
            path: path.to_path_buf(),
            source,
        };
        listener.set_nonblocking(true).map_err(register)?;
        let listener = UnixListener::from_std(listener).map_err(register)?;
        Ok(ControlServer {
            listener,
            file,
            hooks: Hooks::default(),
        })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// What a forced takeover (`takeover`, accepted only while claiming)
    /// notifies.
    pub fn takeover(&self) -> Arc<Notify> {
        Arc::clone(&self.hooks.takeover)
    }

    /// What `verify` sets (a primary digests its next checkpoint).
    pub fn verify(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.hooks.verify)
    }

    /// What `switchover` asks (a protected primary hands its VM over).
    /// What `level_ft` / `level_ha` ask (a primary changes its level).
    pub fn relevel(&self) -> Arc<crate::primary::LevelChange> {
        Arc::clone(&self.hooks.relevel)
    }

    pub fn switchover(&self) -> Arc<SwitchoverRequest> {
        Arc::clone(&self.hooks.switchover)
    }

    /// Serves connections (each in its own task, at most [`MAX_CLIENTS`]
    /// at once) for as long as the future is polled: `status` answers
    /// `status`, `stop` is notified (once the answer is written) on
    /// `stop`. The socket file is removed when the future is dropped.
    pub async fn serve(self, status: StatusBoard, stop: Arc<Notify>) {
        info!(path = %self.path().display(), "control socket ready");
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => match Arc::clone(&slots).try_acquire_owned() {
                    Ok(slot) => {
                        let (status, stop) = (status.clone(), Arc::clone(&stop));
                        let hooks = self.hooks.clone();
                        tokio::spawn(async move {
                            serve_connection(stream, status, stop, hooks).await;
                            drop(slot);
                        });
                    }
                    Err(_) => {
                        warn!(
                            max_clients = MAX_CLIENTS,
                            "control socket: a client refused, too many at once"
                        );
                        let (_, mut write) = stream.into_split();
                        let busy = ControlResponse::refused(format!(
                            "busy: {MAX_CLIENTS} clients are being served, try again"
                        ));
                        let _ = tokio::time::timeout(
                            Duration::from_millis(100),
                            write_response(&mut write, &busy),
                        )
                        .await;
                    }
                },
                Err(e) => {
                    // Out of descriptors, most likely: wait, do not spin.
                    warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Sends `req` to the control socket at `path` and returns the answer
/// (which may be a refusal: see [`ControlResponse::ok`]). Connecting,
/// sending and receiving each must finish within `timeout`. Blocking; may
/// be called from anywhere, inside an async runtime too (it runs its own
/// in a helper thread).
pub fn request(
    path: &Path,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<ControlResponse, ControlError> {
    request_answered_by(path, req, timeout).map(|(answer, _)| answer)
}

/// As [`request`], with the id of the process that serves the socket,
/// when the kernel tells it (`SO_PEERCRED`: the process that made the
/// socket listen; an engine makes its own and passes it to no other). A
/// supervisor that did not start the engine (adopted it) knows it by this.
pub fn request_answered_by(
    path: &Path,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<(ControlResponse, Option<u32>), ControlError> {
    let mut line = serde_json::to_vec(req).map_err(ControlError::Encode)?;
    line.push(b'\n');
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(ControlError::Runtime)?;
                runtime.block_on(exchange(path, &line, timeout))
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

async fn exchange(
    path: &Path,
    line: &[u8],
    timeout: Duration,
) -> Result<(ControlResponse, Option<u32>), ControlError> {
    let timed_out = || ControlError::Timeout {
        path: path.to_path_buf(),
        timeout,
    };
    let stream = tokio::time::timeout(timeout, connect(path))
        .await
        .map_err(|_| timed_out())??;
    let pid = stream
        .peer_cred()
        .ok()
        .and_then(|cred| cred.pid())
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|&pid| pid > 0);
    let (read, mut write) = stream.into_split();
    tokio::time::timeout(timeout, write.write_all(line))
        .await
        .map_err(|_| timed_out())?
        .map_err(|source| ControlError::Send {
            path: path.to_path_buf(),
            source,
        })?;
    let mut reader = BufReader::new(read);
    let answer = tokio::time::timeout(timeout, read_line(&mut reader, MAX_RESPONSE))
        .await
        .map_err(|_| timed_out())?;
    let answer = match answer {
        Ok(Some(a)) => a,
        Ok(None) => {
            return Err(ControlError::NoAnswer {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(ControlError::AnswerTooLong {
                path: path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(ControlError::Receive {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let answer = serde_json::from_slice(&answer).map_err(|source| ControlError::BadAnswer {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((answer, pid))
}

/// Connects, retrying while the server's backlog is full (a non-blocking
/// connect says EAGAIN then); the caller bounds the whole.
async fn connect(path: &Path) -> Result<UnixStream, ControlError> {
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(source) => {
                return Err(ControlError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_takeover_is_forced_only_on_a_standby_that_claims_one() {
        let board = StatusBoard::new("n1", crate::status::Role::Standby);
        let line = br#"{"version":1,"command":"takeover"}"#;
        board.set_state(
            crate::status::Role::Standby,
            crate::status::FtState::StandingBy,
            None,
        );
        let (response, action) = answer(line, &board);
        assert!(!response.ok, "{response:?}");
        assert!(response.error.unwrap().contains("standing-by"));
        assert_eq!(action, Action::None);
        board.set_state(
            crate::status::Role::Standby,
            crate::status::FtState::Claiming,
            None,
        );
        let (response, action) = answer(line, &board);
        assert!(response.ok, "{response:?}");
        assert_eq!(action, Action::Takeover);
    }

    #[test]
    fn a_switchover_is_taken_only_by_a_protected_primary() {
        let line = br#"{"version":1,"command":"switchover"}"#;
        let board = StatusBoard::new("n1", Role::Primary);
        for (role, state) in [
            (Role::Primary, FtState::Unprotected),
            (Role::Primary, FtState::Syncing),
            (Role::Standby, FtState::StandingBy),
        ] {
            board.set_state(role, state, None);
            let (response, action) = answer(line, &board);
            assert!(!response.ok, "{role} {state}: {response:?}");
            assert!(response.error.unwrap().contains(state.as_str()));
            assert_eq!(action, Action::None);
        }
        board.set_state(Role::Primary, FtState::Protected, None);
        let (response, action) = answer(line, &board);
        assert!(response.ok, "{response:?}");
        assert_eq!(action, Action::Switchover);
        // At level HA a switchover is a live migration; one at a time.
        board.update(|s| s.level = crate::level::Level::Ha);
        let (response, action) = answer(line, &board);
        assert!(response.ok, "{response:?}");
        assert_eq!(action, Action::Migrate);
        board.update(|s| s.migrating = true);
        let (response, action) = answer(line, &board);
        assert!(response.error.unwrap().contains("under way"));
        assert_eq!(action, Action::None);
    }

    /// A level change is taken by a primary in any state (an unprotected
    /// one protects at the new level once its standby answers), never by a
    /// standby, which follows its primary's plan.
    #[test]
    fn a_level_change_is_taken_by_a_primary_only() {
        let board = StatusBoard::new("n1", Role::Primary);
        for (line, level) in [
            (
                &br#"{"version":1,"command":"level_ha"}"#[..],
                crate::level::Level::Ha,
            ),
            (
                &br#"{"version":1,"command":"level_ft"}"#[..],
                crate::level::Level::Ft,
            ),
        ] {
            board.set_state(Role::Primary, FtState::Unprotected, None);
            let (response, action) = answer(line, &board);
            assert!(response.ok, "{response:?}");
            assert_eq!(action, Action::Level(level));
            board.set_state(Role::Standby, FtState::StandingBy, None);
            let (response, action) = answer(line, &board);
            assert!(response
                .error
                .unwrap()
                .contains("follows its primary's plan"));
            assert_eq!(action, Action::None);
        }
    }
    use std::io::{BufRead, Write};
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    use super::*;
    use crate::status::{FtState, Role};

    /// A fresh folder under the system's temporary folder, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "ftctl-test-{name}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    struct Served {
        runtime: tokio::runtime::Runtime,
        board: StatusBoard,
        stop: Arc<Notify>,
        path: PathBuf,
        _dir: TempDir,
    }

    /// A server on a real socket (in a folder that does not exist yet).
    fn served(name: &str) -> Served {
        let dir = TempDir::new(name);
        let path = dir.0.join("run/ftprotect.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let board = StatusBoard::new("node-t", Role::Primary);
        let stop = Arc::new(Notify::new());
        let server = {
            let _guard = runtime.enter();
            ControlServer::bind(&path).unwrap()
        };
        runtime.spawn(server.serve(board.clone(), Arc::clone(&stop)));
        Served {
            runtime,
            board,
            stop,
            path,
            _dir: dir,
        }
    }

    /// Sends raw bytes, returns the parsed answer line.
    fn raw(path: &Path, bytes: &[u8]) -> ControlResponse {
        let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // A refused client may find the connection closed before it wrote:
        // the answer is there all the same.
        let _ = s.write_all(bytes);
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    const WITHIN: Duration = Duration::from_secs(5);

    #[test]
    fn status_round_trips_on_an_owner_only_socket() {
        let s = served("status");
        s.board
            .set_state(Role::Primary, FtState::Protected, Some("fine".into()));
        s.board.update(|st| {
            st.epoch = 17;
            st.counters.checkpoints = 16;
        });
        let mode = std::fs::metadata(&s.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
        assert!(std::fs::metadata(&s.path).unwrap().file_type().is_socket());
        let (r, pid) = request_answered_by(
            &s.path,
            &ControlRequest::new(ControlCommand::Status),
            WITHIN,
        )
        .unwrap();
        assert!(r.ok, "{r:?}");
        // The server runs in this process: the kernel names it.
        assert_eq!(pid, Some(std::process::id()));
        assert_eq!(r.version, CONTROL_VERSION);
        let st = r.status.expect("status");
        assert_eq!(st, s.board.snapshot());
        assert_eq!(
            (st.role, st.state, st.epoch),
            (Role::Primary, FtState::Protected, 17)
        );
        assert_eq!(st.counters.checkpoints, 16);
        // The wire format is the documented one.
        let json = serde_json::to_value(ControlRequest::new(ControlCommand::Status)).unwrap();
        assert_eq!(json, serde_json::json!({"version": 1, "command": "status"}));
        // Several requests on one connection.
        let mut c = std::os::unix::net::UnixStream::connect(&s.path).unwrap();
        c.write_all(
            b"{\"version\":1,\"command\":\"status\"}\n{\"version\":1,\"command\":\"status\"}\n",
        )
        .unwrap();
        let lines: Vec<String> = std::io::BufReader::new(c)
            .lines()
            .take(2)
            .map(Result::unwrap)
            .collect();
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.contains("\"ok\":true")), "{lines:?}");
        assert!(!s.stop_notified_within(Duration::from_millis(50)));
    }

    impl Served {
        fn stop_notified_within(&self, t: Duration) -> bool {
            self.runtime
                .block_on(async { tokio::time::timeout(t, self.stop.notified()).await })
                .is_ok()
        }
    }

    #[test]
    fn stop_answers_then_notifies() {
        let s = served("stop");
        assert!(!s.stop_notified_within(Duration::from_millis(50)));
        let r = request(&s.path, &ControlRequest::new(ControlCommand::Stop), WITHIN).unwrap();
        assert_eq!(r, ControlResponse::done());
        assert!(s.stop_notified_within(WITHIN));
    }

    #[test]
    fn bad_requests_get_a_reason_not_a_crash() {
        let s = served("bad");
        let cases: [(&[u8], &str); 7] = [
            (b"not json\n", "malformed request"),
            (b"[1,2]\n", "not a JSON object"),
            (
                b"{\"version\":1,\"command\":\"reboot\"}\n",
                "unknown command \"reboot\"",
            ),
            (b"{\"version\":1}\n", "without a \"command\""),
            (b"{\"version\":1,\"command\":7}\n", "malformed request"),
            (
                b"{\"version\":2,\"command\":\"status\"}\n",
                "unsupported control version 2",
            ),
            (b"{\"command\":\"stop\"}\n", "without a numeric \"version\""),
        ];
        for (bytes, reason) in cases {
            let r = raw(&s.path, bytes);
            assert!(!r.ok, "{r:?}");
            assert!(r.status.is_none());
            let error = r.error.expect("a reason");
            assert!(error.contains(reason), "{error:?} lacks {reason:?}");
        }
        let mut huge = vec![b' '; MAX_REQUEST + 10];
        huge.push(b'\n');
        let r = raw(&s.path, &huge);
        assert!(!r.ok);
        assert!(r.error.unwrap().contains("longer than"));
        // None of it stopped anything, and the server still serves.
        assert!(!s.stop_notified_within(Duration::from_millis(50)));
        let r = request(
            &s.path,
            &ControlRequest::new(ControlCommand::Status),
            WITHIN,
        )
        .unwrap();
        assert!(r.ok);
    }

    #[test]
    fn a_stalled_server_makes_the_client_time_out() {
        let dir = TempDir::new("stalled");
        let path = dir.0.join("stalled.sock");
        // Bound and listening (the kernel completes connections) but never
        // accepting nor answering, like a SIGSTOPped ftprotect.
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let timeout = Duration::from_millis(300);
        let start = Instant::now();
        let e = request(&path, &ControlRequest::new(ControlCommand::Status), timeout).unwrap_err();
        let took = start.elapsed();
        assert!(matches!(e, ControlError::Timeout { .. }), "{e:?}");
        assert!(took >= timeout && took < timeout * 5, "took {took:?}");
        // Bind refuses to take the socket of a live server over.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        assert!(matches!(
            ControlServer::bind(&path),
            Err(ControlError::Listen(SocketError::InUse { .. }))
        ));
    }

    #[test]
    fn no_server_is_a_connect_error() {
        let dir = TempDir::new("none");
        let e = request(
            &dir.0.join("absent.sock"),
            &ControlRequest::new(ControlCommand::Status),
            WITHIN,
        )
        .unwrap_err();
        assert!(matches!(e, ControlError::Connect { .. }), "{e:?}");
    }

    #[test]
    fn bind_replaces_a_stale_socket_but_not_a_file() {
        let dir = TempDir::new("stale");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let file = dir.0.join("plain");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(
            ControlServer::bind(&file),
            Err(ControlError::Listen(SocketError::NotASocket { .. }))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let stale = dir.0.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let server = ControlServer::bind(&stale).unwrap();
        assert_eq!(server.path(), stale);
        // Dropping the serving future removes the socket it made.
        let serving = runtime.spawn(server.serve(
            StatusBoard::new("n", Role::Standby),
            Arc::new(Notify::new()),
        ));
        serving.abort();
        let _ = runtime.block_on(serving);
        assert!(!stale.exists());
        // Nothing left behind from the private bind folders.
        let left: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("plain")]);
    }

    #[test]
    fn clients_beyond_the_bound_are_told_to_wait() {
        let s = served("busy");
        let silent: Vec<std::os::unix::net::UnixStream> = (0..MAX_CLIENTS)
            .map(|_| std::os::unix::net::UnixStream::connect(&s.path).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let r = raw(&s.path, b"{\"version\":1,\"command\":\"status\"}\n");
        assert!(!r.ok, "{r:?}");
        assert!(r.error.unwrap().starts_with("busy"));
        // Their places come back when they leave.
        drop(silent);
        let deadline = Instant::now() + WITHIN;
        loop {
            let r = raw(&s.path, b"{\"version\":1,\"command\":\"status\"}\n");
            if r.ok {
                break;
            }
            assert!(Instant::now() < deadline, "still refused: {r:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
