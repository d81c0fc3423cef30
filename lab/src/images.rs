//! The images the lab boots, built (or found in the cache) by `images/build.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Errors of the image build.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    #[error("cannot run {script}: {source}")]
    Spawn {
        script: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image build failed ({status}); its log is above")]
    Failed { status: std::process::ExitStatus },
    #[error("image build printed no path for {0}")]
    Missing(&'static str),
    #[error("image {path} is missing: run `ftctl images build`")]
    Gone { path: PathBuf },
}

/// Paths of the built artifacts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Images {
    pub guest_vmlinux: PathBuf,
    pub guest_bzimage: PathBuf,
    pub guest_initramfs: PathBuf,
    pub guest_rootfs: PathBuf,
    pub node_kernel: PathBuf,
    pub node_initramfs: PathBuf,
    pub node_images_disk: PathBuf,
    pub static_bin_dir: PathBuf,
}

impl Images {
    /// Parses the `KEY=PATH` lines that `build.sh` prints.
    pub fn parse(manifest: &str) -> Result<Self, ImagesError> {
        let get = |key: &'static str| {
            manifest
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(PathBuf::from)
                .ok_or(ImagesError::Missing(key))
        };
        Ok(Images {
            guest_vmlinux: get("GUEST_VMLINUX")?,
            guest_bzimage: get("GUEST_BZIMAGE")?,
            guest_initramfs: get("GUEST_INITRAMFS")?,
            guest_rootfs: get("GUEST_ROOTFS")?,
            node_kernel: get("NODE_KERNEL")?,
            node_initramfs: get("NODE_INITRAMFS")?,
            node_images_disk: get("NODE_IMAGES_DISK")?,
            static_bin_dir: get("STATIC_BIN_DIR")?,
        })
    }

    /// Checks that the node's files are still there (the cache may be wiped).
    pub fn check(&self) -> Result<(), ImagesError> {
        for path in [
            &self.node_kernel,
            &self.node_initramfs,
            &self.node_images_disk,
        ] {
            if !path.exists() {
                return Err(ImagesError::Gone { path: path.clone() });
            }
        }
        Ok(())
    }
}

/// The repository this binary was built from (where `images/` lives);
/// `FTVM_REPO` overrides it.
pub fn repo_dir() -> PathBuf {
    std::env::var_os("FTVM_REPO").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
        PathBuf::from,
    )
}

/// Builds what is missing (progress on stderr) and returns the images and the
/// time the build took.
pub fn build() -> Result<(Images, Duration), ImagesError> {
    let script = repo_dir().join("images/build.sh");
    let start = Instant::now();
    let output = Command::new(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| ImagesError::Spawn {
            script: script.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(ImagesError::Failed {
            status: output.status,
        });
    }
    let images = Images::parse(&String::from_utf8_lossy(&output.stdout))?;
    Ok((images, start.elapsed()))
}

/// The images, built at most once by this process: [`build`] the first
/// time, then what it found (checked still there). A test binary or a
/// drill starts many labs; the cache check alone (hashing the static
/// binaries' and images' inputs) took 4-6 s a lab. `None` for the time
/// when it was built earlier.
pub fn build_once() -> Result<(Images, Option<Duration>), ImagesError> {
    static BUILT: std::sync::Mutex<Option<Images>> = std::sync::Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(images) = built.as_ref().filter(|i| i.check().is_ok()) {
        return Ok((images.clone(), None));
    }
    let (images, took) = build()?;
    *built = Some(images.clone());
    Ok((images, Some(took)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_parses_and_names_what_is_missing() {
        let text = "GUEST_VMLINUX=/c/vmlinux\nGUEST_BZIMAGE=/c/bz\nGUEST_INITRAMFS=/c/i\nGUEST_ROOTFS=/c/r\n\
                    NODE_KERNEL=/c/k\nNODE_INITRAMFS=/c/ni\nNODE_IMAGES_DISK=/c/d\nSTATIC_BIN_DIR=/c/bin\n";
        let images = Images::parse(text).unwrap();
        assert_eq!(images.node_kernel, PathBuf::from("/c/k"));
        let partial = text.replace("NODE_KERNEL=/c/k\n", "");
        assert!(matches!(
            Images::parse(&partial),
            Err(ImagesError::Missing("NODE_KERNEL"))
        ));
        assert!(matches!(images.check(), Err(ImagesError::Gone { .. })));
    }
}
