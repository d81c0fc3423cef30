//! The outer host's side of the business network: a bridge with an address
//! and one TAP per node (`ip` from iproute2; needs root).

use std::path::Path;
use std::process::Command;

/// Errors of host network set-up, one per step.
#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    #[error("the lab needs root on the outer host to create its bridge and TAP devices")]
    NotRoot,
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot run `ip` (install iproute2): {0}")]
    Spawn(#[source] std::io::Error),
}

fn ip(args: &[&str]) -> Result<(), HostNetError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(HostNetError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HostNetError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

pub fn require_root() -> Result<(), HostNetError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(HostNetError::NotRoot);
    }
    Ok(())
}

/// Creates (or keeps) bridge `name` with address `cidr`, up.
pub fn ensure_bridge(name: &str, cidr: &str) -> Result<(), HostNetError> {
    if !link_exists(name) {
        ip(&["link", "add", name, "type", "bridge"])?;
    }
    ip(&["addr", "replace", cidr, "dev", name])?;
    ip(&["link", "set", name, "up"])
}

/// Creates (or keeps) TAP `name`, enslaved to `bridge`, up.
pub fn ensure_tap(name: &str, bridge: &str) -> Result<(), HostNetError> {
    if !link_exists(name) {
        ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
    }
    ip(&["link", "set", name, "master", bridge])?;
    ip(&["link", "set", name, "up"])
}

/// Deletes link `name` if it exists.
pub fn delete_link(name: &str) -> Result<(), HostNetError> {
    if link_exists(name) {
        ip(&["link", "del", name])?;
    }
    Ok(())
}
