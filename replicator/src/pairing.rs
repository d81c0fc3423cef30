//! What this node brings to the A-link handshake: the pair secret (read
//! from a file), its name and role, the CPU features it can give the VM
//! (the declared feature set as this host provides it, so two hosts that
//! differ inside the set refuse to pair) and the VM's name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ft_link::{CpuFeatureSummary, Hello, LinkConfig, PairSecret, Role};
use vmm::config::FeatureSet;
use vmm::replication::offered_cpu_features;

#[derive(Debug, thiserror::Error)]
pub enum PairingError {
    #[error("cannot read the pair secret {path}: {source}")]
    ReadSecret {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pair secret in {path} is not usable: {source}")]
    BadSecret {
        path: PathBuf,
        #[source]
        source: ft_link::AuthError,
    },
    #[error("probing this host's KVM for its CPU features failed: {0}")]
    Host(String),
}

/// The feature words `set` gives a guest on this host.
pub fn cpu_summary(set: FeatureSet) -> Result<CpuFeatureSummary, PairingError> {
    Ok(CpuFeatureSummary {
        name: set.to_string(),
        words: offered_cpu_features(set).map_err(|e| PairingError::Host(e.to_string()))?,
    })
}

/// Reads the pair secret (surrounding whitespace is not part of it).
pub fn read_secret(path: &Path) -> Result<PairSecret, PairingError> {
    let text = std::fs::read(path).map_err(|source| PairingError::ReadSecret {
        path: path.to_path_buf(),
        source,
    })?;
    let trimmed = text.trim_ascii().to_vec();
    PairSecret::new(trimmed).map_err(|source| PairingError::BadSecret {
        path: path.to_path_buf(),
        source,
    })
}

/// The link configuration of this node.
pub fn link_config(
    secret: PairSecret,
    node: &str,
    role: Role,
    cpu: CpuFeatureSummary,
    vm_name: &str,
    heartbeat_timeout: Duration,
) -> LinkConfig {
    LinkConfig::new(secret, Hello::new(node, role, cpu, vm_name))
        .with_heartbeat_timeout(heartbeat_timeout)
}
