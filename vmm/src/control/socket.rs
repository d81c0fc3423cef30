//! Putting a control socket in place without harm: the socket is its
//! owner's only from the moment it has a name, and nothing but a stale
//! socket (one nobody serves any more) is ever replaced.
//!
//! How (no process-wide state such as the umask is touched):
//!
//! 1. the socket is bound in a fresh private folder (mode 0700) next to its
//!    final path, and set to mode 0600 there: nobody else can reach it
//!    while its mode is still the umask's;
//! 2. it is hard-linked to its final path: `link(2)` never replaces what is
//!    there, so a file, a folder or a live server's socket that appears at
//!    the path at any moment is never removed;
//! 3. if the path is taken, what is there is looked at: a socket on which a
//!    connection is refused (`ECONNREFUSED`: its process is gone) is
//!    removed and the link tried again; anything else is an error and is
//!    left alone.
//!
//! The private folder goes at once; [`SocketFile`] removes the socket when
//! dropped, if the path still names it.
//!
//! The one window left: between the probe that found a stale socket and its
//! removal, another process could remove it too and put its own live socket
//! there, which would then be removed. Both would be servers started at the
//! same path at the same instant, which their operator must not do anyway.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

/// How often the path may change under [`bind`] before it gives up.
const INSTALL_ATTEMPTS: u32 = 4;

/// Everything that can fail while putting a socket in place, by operation.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{path} names no socket file (it has no file name)")]
    NoFileName { path: PathBuf },
    #[error("cannot create the folder {path} for a control socket")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind a control socket for {path}")]
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
    #[error("cannot inspect {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists and is not a socket; it is left alone")]
    NotASocket { path: PathBuf },
    #[error("a live process serves the socket {path}; it is left alone")]
    InUse { path: PathBuf },
    #[error("cannot tell whether a process serves the socket {path}; it is left alone")]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale socket {path}")]
    RemoveStale {
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
    #[error("{path} kept changing while the control socket was put in place")]
    Contended { path: PathBuf },
    #[error("cannot connect to the control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} accepted no connection within {timeout:?}")]
    ConnectTimeout { path: PathBuf, timeout: Duration },
}

/// A socket put in place by [`bind`]: the listener and its file.
#[derive(Debug)]
pub struct BoundSocket {
    pub listener: UnixListener,
    pub file: SocketFile,
}

/// The socket's file: removed when this is dropped, if its path still
/// names the same file (device and inode).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    file_id: (u64, u64),
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still names this socket.
    pub fn is_in_place(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.file_id)
            .unwrap_or(false)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.is_in_place() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

static BIND_ATTEMPT: AtomicU64 = AtomicU64::new(0);

/// Binds a listening socket at `path`, mode 0600, creating its folder if
/// needed. A stale socket at `path` is replaced; anything else there (a
/// file, a folder, a link, a socket a live process serves) is an error and
/// stays untouched. See the module's documentation for how.
pub fn bind(path: &Path) -> Result<BoundSocket, SocketError> {
    if path.file_name().is_none() {
        return Err(SocketError::NoFileName {
            path: path.to_path_buf(),
        });
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|source| SocketError::CreateDir {
        path: parent.clone(),
        source,
    })?;
    // Short names: a socket's whole path must fit in 108 bytes.
    let private = parent.join(format!(
        ".sock-{}-{}",
        std::process::id(),
        BIND_ATTEMPT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|source| SocketError::CreateDir {
            path: private.clone(),
            source,
        })?;
    let staged = private.join("s");
    let bound = bind_staged(&staged, path);
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound
}

fn bind_staged(staged: &Path, path: &Path) -> Result<BoundSocket, SocketError> {
    let listener = UnixListener::bind(staged).map_err(|source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(staged, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        SocketError::Permissions {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let meta = std::fs::symlink_metadata(staged).map_err(|source| SocketError::Inspect {
        path: staged.to_path_buf(),
        source,
    })?;
    install(staged, path)?;
    Ok(BoundSocket {
        listener,
        file: SocketFile {
            path: path.to_path_buf(),
            file_id: (meta.dev(), meta.ino()),
        },
    })
}

/// Links `staged` at `path`, replacing only a stale socket.
fn install(staged: &Path, path: &Path) -> Result<(), SocketError> {
    for _ in 0..INSTALL_ATTEMPTS {
        match std::fs::hard_link(staged, path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => remove_if_stale(path)?,
            Err(source) => {
                return Err(SocketError::Install {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    Err(SocketError::Contended {
        path: path.to_path_buf(),
    })
}

/// Removes what is at `path` if it is a socket that refuses connections;
/// an error for anything else.
fn remove_if_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Inspect {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match try_connect(path) {
        // A live server takes the connection (even a stopped one: the
        // kernel queues it) or has a full backlog.
        Ok(_) => Err(SocketError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(SocketError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            tracing::info!(path = %path.display(), "replacing a stale socket whose process is gone");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(SocketError::RemoveStale {
                    path: path.to_path_buf(),
                    source,
                }),
            }
        }
        // Gone meanwhile: the link is tried again.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SocketError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// One non-blocking connection attempt: `Err(WouldBlock)` when the
/// server's backlog is full, `ECONNREFUSED` when nobody listens. Never
/// waits (a blocking connect to a full backlog waits as long as the server
/// does not accept).
fn try_connect(path: &Path) -> io::Result<UnixStream> {
    let address = SockAddr::unix(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&address)?;
    socket.set_nonblocking(false)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

/// Connects to the socket at `path`, retrying while the server's backlog is
/// full, for at most `timeout`.
pub fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, SocketError> {
    let deadline = Instant::now() + timeout;
    loop {
        match try_connect(path) {
            Ok(stream) => return Ok(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(SocketError::ConnectTimeout {
                    path: path.to_path_buf(),
                    timeout,
                })
            }
            Err(source) => {
                return Err(SocketError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn left_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_regular_file_or_folder_at_the_path_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vm.sock");
        std::fs::write(&file, b"keep me").unwrap();
        let e = bind(&file).unwrap_err();
        assert!(matches!(e, SocketError::NotASocket { .. }), "{e:?}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let folder = dir.path().join("folder.sock");
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("inside"), b"x").unwrap();
        let e = bind(&folder).unwrap_err();
        assert!(matches!(e, SocketError::NotASocket { .. }), "{e:?}");
        assert!(folder.join("inside").exists());
        // A symbolic link (even to a stale socket) is not followed.
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&stale, &link).unwrap();
        let e = bind(&link).unwrap_err();
        assert!(matches!(e, SocketError::NotASocket { .. }), "{e:?}");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        // No private bind folder left behind.
        assert_eq!(
            left_in(dir.path()),
            ["folder.sock", "link.sock", "stale.sock", "vm.sock"]
        );
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        let live = UnixListener::bind(&path).unwrap();
        let e = bind(&path).unwrap_err();
        assert!(matches!(e, SocketError::InUse { .. }), "{e:?}");
        // Still the live server's socket: a connection reaches it.
        let _client = UnixStream::connect(&path).unwrap();
        live.set_nonblocking(true).unwrap();
        assert!(live.accept().is_ok(), "the live server lost its socket");
        drop(live);
        // Now stale: replaced, and served by the new listener.
        let bound = bind(&path).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        bound.listener.set_nonblocking(true).unwrap();
        assert!(bound.listener.accept().is_ok());
        assert_eq!(bound.file.path(), path);
        assert_eq!(left_in(dir.path()), ["vm.sock"]);
        // Dropping the file removes the socket it made, and only it.
        drop(bound.file);
        assert!(!path.exists());
    }

    #[test]
    fn the_socket_is_its_owners_only() {
        let dir = tempfile::tempdir().unwrap();
        // In an existing folder, and in one that does not exist yet.
        for path in [dir.path().join("vm.sock"), dir.path().join("run/vm.sock")] {
            let bound = bind(&path).unwrap();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert!(meta.file_type().is_socket());
            assert_eq!(
                meta.permissions().mode() & 0o7777,
                0o600,
                "{}: mode {:o}",
                path.display(),
                meta.permissions().mode()
            );
            drop(bound);
        }
    }

    #[test]
    fn a_socket_replaced_by_someone_else_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        let bound = bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"theirs").unwrap();
        drop(bound);
        assert_eq!(std::fs::read(&path).unwrap(), b"theirs");
    }

    #[test]
    fn connect_gives_up_on_a_full_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stuck.sock");
        // Listening, never accepting (like a stopped process): fill its
        // short backlog, then a connection can only time out.
        let stuck = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        stuck.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        stuck.listen(1).unwrap();
        let mut held = Vec::new();
        let timeout = Duration::from_millis(200);
        let start = Instant::now();
        let e = loop {
            match connect(&path, timeout) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 100, "the backlog never filled");
        };
        assert!(
            matches!(e, SocketError::ConnectTimeout { .. }),
            "{e:?} after {} connections",
            held.len()
        );
        assert!(start.elapsed() < Duration::from_secs(10));
        // And bind takes it for a live server's.
        assert!(matches!(bind(&path), Err(SocketError::InUse { .. })));
    }
}
