//! Which KVM serves `/dev/kvm` on this host, and whether it can run stock guests.

use std::fmt;
use std::path::Path;

use kvm_ioctls::Kvm;
use serde::Serialize;

/// The KVM implementation behind `/dev/kvm`, as named by its kernel module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmFlavor {
    /// AMD SVM hardware virtualisation (`kvm_amd`).
    KvmAmd,
    /// Intel VMX hardware virtualisation (`kvm_intel`).
    KvmIntel,
    /// The PVM software hypervisor (`kvm_pvm`): it emulates ring 0 and cannot
    /// boot an unmodified Linux guest.
    KvmPvm,
    /// `/dev/kvm` exists but none of the known modules is loaded.
    Unknown,
}

impl KvmFlavor {
    /// Whether an unmodified guest kernel can run on this flavour.
    pub fn runs_stock_guests(self) -> bool {
        matches!(self, KvmFlavor::KvmAmd | KvmFlavor::KvmIntel)
    }
}

impl fmt::Display for KvmFlavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmFlavor::KvmAmd => "kvm_amd",
            KvmFlavor::KvmIntel => "kvm_intel",
            KvmFlavor::KvmPvm => "kvm_pvm",
            KvmFlavor::Unknown => "unknown",
        })
    }
}

/// Errors of the host check.
#[derive(Debug, thiserror::Error)]
pub enum KvmHostError {
    #[error("/dev/kvm does not exist: load kvm_amd or kvm_intel (is virtualisation enabled in firmware?)")]
    NoDevKvm,
    #[error("cannot open /dev/kvm: {0} (run as root or join the kvm group)")]
    OpenDevKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version is {0}, expected 12")]
    ApiVersion(i32),
}

/// What the start-up check found.
#[derive(Debug, Clone, Serialize)]
pub struct KvmHost {
    pub flavor: KvmFlavor,
    pub api_version: i32,
    pub max_vcpus: usize,
}

/// Detects the flavour from the loaded modules under `sys_module` (normally
/// `/sys/module`). PVM is checked first: it can be loaded beside `kvm_amd`
/// or `kvm_intel` and then serves `/dev/kvm`.
pub fn detect_flavor(sys_module: &Path) -> KvmFlavor {
    let loaded = |m: &str| sys_module.join(m).exists();
    if loaded("kvm_pvm") {
        KvmFlavor::KvmPvm
    } else if loaded("kvm_amd") {
        KvmFlavor::KvmAmd
    } else if loaded("kvm_intel") {
        KvmFlavor::KvmIntel
    } else {
        KvmFlavor::Unknown
    }
}

/// Opens `/dev/kvm` and says which KVM it is.
pub fn probe() -> Result<(Kvm, KvmHost), KvmHostError> {
    if !Path::new("/dev/kvm").exists() {
        return Err(KvmHostError::NoDevKvm);
    }
    let kvm = Kvm::new().map_err(KvmHostError::OpenDevKvm)?;
    let api_version = kvm.get_api_version();
    if api_version != 12 {
        return Err(KvmHostError::ApiVersion(api_version));
    }
    let host = KvmHost {
        flavor: detect_flavor(Path::new("/sys/module")),
        api_version,
        max_vcpus: kvm.get_max_vcpus(),
    };
    Ok((kvm, host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavor_follows_loaded_modules() {
        let dir = std::env::temp_dir().join(format!("kvmhost-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(detect_flavor(&dir), KvmFlavor::Unknown);
        std::fs::create_dir_all(dir.join("kvm_amd")).unwrap();
        assert_eq!(detect_flavor(&dir), KvmFlavor::KvmAmd);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(detect_flavor(&dir), KvmFlavor::KvmPvm);
        assert!(!KvmFlavor::KvmPvm.runs_stock_guests());
        assert!(KvmFlavor::KvmAmd.runs_stock_guests());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
