//! `ftrelay`'s control socket: a Unix socket, its owner's only (mode
//! 0600), taking one [`Command`] per line and answering each with one line
//! (`ok ...` or `error: ...`).
//!
//! The socket is bound in a fresh private folder (0700) next to its path,
//! set to 0600 there, then hard-linked into place (as `ftvmm`'s control
//! socket): it is never reachable with the umask's mode, and nothing at
//! the path is replaced but a stale socket (one on which a connection is
//! refused).

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::command::Command;
use crate::relay::RelayHandle;

/// The longest command line taken.
const MAX_LINE: usize = 1024;
/// How long a client may take to send a line.
const LINE_WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the private folder {path} for the control socket")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind the control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot restrict the control socket {path} to its owner")]
    Permissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot put the control socket in place at {path}")]
    Install {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists and is not a stale socket; it is left alone")]
    InUse { path: PathBuf },
    #[error("cannot remove the stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to the control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the control socket {path} failed while a command was sent or answered")]
    Exchange {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A bound control socket; its file is removed when this is dropped.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    file_id: (u64, u64),
}

impl ControlSocket {
    /// Binds the control socket at `path` (see the module's documentation).
    pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let private = parent.join(format!(".ftrelay-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(|source| ControlError::CreateDir {
                path: private.clone(),
                source,
            })?;
        let staged = private.join("s");
        let bound = bind_staged(&staged, path);
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_dir(&private);
        bound
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves commands for `relay` until the task is dropped; each client
    /// in a task of its own.
    pub async fn serve(self, relay: RelayHandle) {
        info!(path = %self.path.display(), "control socket ready");
        loop {
            match self.listener.accept().await {
                Ok((client, _)) => {
                    tokio::spawn(serve_client(client, relay.clone()));
                }
                Err(error) => {
                    warn!(%error, "could not accept a control client");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn bind_staged(staged: &Path, path: &Path) -> Result<ControlSocket, ControlError> {
    let listener =
        std::os::unix::net::UnixListener::bind(staged).map_err(|source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    std::fs::set_permissions(staged, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Permissions {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let meta = std::fs::symlink_metadata(staged).map_err(|source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    // link(2) never replaces: a stale socket is removed first, once.
    for attempt in 0..2 {
        match std::fs::hard_link(staged, path) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt == 0 => {
                remove_if_stale(path)?
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(ControlError::InUse {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(ControlError::Install {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    let bind_err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    listener.set_nonblocking(true).map_err(bind_err)?;
    let listener = UnixListener::from_std(listener).map_err(bind_err)?;
    Ok(ControlSocket {
        listener,
        path: path.to_path_buf(),
        file_id: (meta.dev(), meta.ino()),
    })
}

/// Removes `path` if it is a socket nobody serves; an error otherwise.
fn remove_if_stale(path: &Path) -> Result<(), ControlError> {
    let in_use = || ControlError::InUse {
        path: path.to_path_buf(),
    };
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return Err(in_use());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "replacing a stale control socket");
            std::fs::remove_file(path).map_err(|source| ControlError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        _ => Err(in_use()),
    }
}

async fn serve_client(client: UnixStream, relay: RelayHandle) {
    let (read, mut write) = client.into_split();
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut lines).take(MAX_LINE as u64 + 1);
        let read = tokio::time::timeout(LINE_WITHIN, limited.read_line(&mut line)).await;
        let answer = match read {
            Ok(Ok(0)) | Err(_) => return,
            Ok(Err(error)) => {
                debug!(%error, "control client failed");
                return;
            }
            Ok(Ok(_)) if !line.ends_with('\n') && line.len() > MAX_LINE => {
                let _ = write
                    .write_all(format!("error: a command is at most {MAX_LINE} bytes\n").as_bytes())
                    .await;
                return;
            }
            Ok(Ok(_)) => answer(&line, &relay),
        };
        info!(command = line.trim(), %answer, "control command");
        if write
            .write_all(format!("{answer}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

fn answer(line: &str, relay: &RelayHandle) -> String {
    match Command::parse(line) {
        Ok(command) => match command.run(relay) {
            Ok(answer) => answer,
            Err(error) => format!("error: {error}"),
        },
        Err(error) => format!("error: {error}"),
    }
}

/// Sends one command to the control socket at `path`; its answer line.
pub async fn send_command(path: &Path, command: &str) -> Result<String, ControlError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let exchange = |source| ControlError::Exchange {
        path: path.to_path_buf(),
        source,
    };
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("{}\n", command.trim()).as_bytes())
        .await
        .map_err(exchange)?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(exchange)?;
    Ok(answer.trim_end().to_string())
}
