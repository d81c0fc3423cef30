//! Where the control socket's requests may write: one folder fixed when
//! ftvmm starts (`--capture-dir`, by default `<socket>.captures`), owned by
//! ftvmm's user and closed to others. A request names a capture or a page
//! list inside it by a simple name, never by a path.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The longest name a request may give.
pub const MAX_NAME: usize = 64;

/// Everything that can fail with the capture folder, by operation.
#[derive(Debug, thiserror::Error)]
pub enum CaptureDirError {
    #[error("cannot create the capture folder {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot inspect the capture folder {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the capture folder {path} is not a folder (a link or a file); it is left alone")]
    NotAFolder { path: PathBuf },
    #[error("the capture folder {path} belongs to uid {owner}, not to this process's (uid {uid})")]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
    #[error("others may write in the capture folder {path} (mode {mode:o}); chmod go-w it")]
    OpenToOthers { path: PathBuf, mode: u32 },
    #[error(
        "{name:?} is not a capture name: {why} (a name is 1 to {MAX_NAME} letters, digits, \
         '.', '_' or '-', not starting with '.'; it names an entry of the capture folder)"
    )]
    BadName { name: String, why: &'static str },
}

/// The folder that captures and page lists go into.
#[derive(Debug, Clone)]
pub struct CaptureDir {
    root: PathBuf,
}

impl CaptureDir {
    /// The default folder for a control socket at `socket`:
    /// `<socket>.captures` beside it.
    pub fn default_for(socket: &Path) -> PathBuf {
        let mut path = socket.as_os_str().to_owned();
        path.push(".captures");
        PathBuf::from(path)
    }

    /// Opens the folder at `path`, creating it (mode 0700) if needed. An
    /// existing one must be a real folder (not a link), this process's
    /// user's, and closed to others' writes: it is where requests write.
    pub fn open(path: &Path) -> Result<CaptureDir, CaptureDirError> {
        match std::fs::DirBuilder::new()
            .recursive(false)
            .mode(0o700)
            .create(path)
        {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Its parent is missing: make the parents, then it.
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)
                    .map_err(|source| CaptureDirError::Create {
                        path: path.to_path_buf(),
                        source,
                    })?;
            }
            Err(source) => {
                return Err(CaptureDirError::Create {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let meta = std::fs::symlink_metadata(path).map_err(|source| CaptureDirError::Inspect {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.file_type().is_dir() {
            return Err(CaptureDirError::NotAFolder {
                path: path.to_path_buf(),
            });
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if meta.uid() != uid {
            return Err(CaptureDirError::NotOwned {
                path: path.to_path_buf(),
                owner: meta.uid(),
                uid,
            });
        }
        if meta.mode() & 0o022 != 0 {
            return Err(CaptureDirError::OpenToOthers {
                path: path.to_path_buf(),
                mode: meta.mode() & 0o7777,
            });
        }
        Ok(CaptureDir {
            root: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The path of the entry `name` (a capture folder or a page list), if
    /// `name` is a simple name: never outside the folder.
    pub fn entry(&self, name: &str) -> Result<PathBuf, CaptureDirError> {
        check_name(name)?;
        Ok(self.root.join(name))
    }
}

fn check_name(name: &str) -> Result<(), CaptureDirError> {
    let bad = |why| {
        Err(CaptureDirError::BadName {
            name: name.chars().take(2 * MAX_NAME).collect(),
            why,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME {
        return bad("it is too long");
    }
    if name.contains('/') {
        return bad("it holds a '/'");
    }
    if name.starts_with('.') {
        return bad("it starts with '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return bad("it holds a character other than letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn only_simple_names_inside_the_folder_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let captures = CaptureDir::open(&dir.path().join("captures")).unwrap();
        for name in [
            "../x",
            "/etc/x",
            "a/b",
            "",
            ".",
            "..",
            ".hidden",
            "snap\0",
            "snap\n",
            "sn ap",
            "/",
            &"x".repeat(MAX_NAME + 1),
        ] {
            let e = captures.entry(name).unwrap_err();
            assert!(matches!(e, CaptureDirError::BadName { .. }), "{name:?}");
        }
        for name in [
            "snap",
            "snap-2.epoch_7",
            "harvest.txt",
            &"x".repeat(MAX_NAME),
        ] {
            assert_eq!(
                captures.entry(name).unwrap(),
                dir.path().join("captures").join(name)
            );
        }
    }

    #[test]
    fn the_folder_is_made_private_and_a_loose_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/captures");
        let captures = CaptureDir::open(&path).unwrap();
        assert_eq!(captures.path(), path);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        // Opened again (a restored ftvmm's): fine.
        CaptureDir::open(&path).unwrap();
        // Writable by others: refused, left as it is.
        let loose = dir.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            CaptureDir::open(&loose),
            Err(CaptureDirError::OpenToOthers { .. })
        ));
        // A link or a file: refused.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(
            CaptureDir::open(&link),
            Err(CaptureDirError::NotAFolder { .. })
        ));
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            CaptureDir::open(&file),
            Err(CaptureDirError::NotAFolder { .. })
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
        assert_eq!(
            CaptureDir::default_for(Path::new("/run/ftvmm/vm.sock")),
            Path::new("/run/ftvmm/vm.sock.captures")
        );
    }
}
