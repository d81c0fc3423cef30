//! Why a running VM stops: what vCPUs and devices report to the VMM.

use std::fmt;

/// An event that ends the VM's run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest reset ([`ResetCause`] says how).
    Reset(ResetCause),
    /// The guest powered off.
    Shutdown,
    /// A vCPU could not continue.
    VcpuFailed { index: u8, reason: String },
}

/// How a guest came to reset: one that asked (a reboot, or a kernel
/// panic with `panic=N`) or one whose CPU could not go on (a triple
/// fault). Told apart for whoever reads why a VM stopped: the first is the
/// guest's own doing and its console says why; the second is too when the
/// guest reboots that way (Linux's `reboot=t`), and else leaves nothing on
/// the console (and on AMD, KVM resets the vCPU's registers at it, so
/// they say nothing either).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetCause {
    /// Command 0xFE to the keyboard controller: Linux's `reboot=k` way to
    /// reboot, which a panic with `panic=N` takes too.
    KeyboardController,
    /// A triple fault (`KVM_EXIT_SHUTDOWN`) on this vCPU: it met an
    /// exception it could not deliver.
    TripleFault { vcpu: u8 },
    /// The guest asked KVM for a reset on this vCPU (a reset system
    /// event; on x86, Hyper-V's reset register).
    SystemEvent { vcpu: u8 },
}

impl fmt::Display for VmEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmEvent::Reset(cause) => write!(f, "reset {cause}"),
            VmEvent::Shutdown => write!(f, "powered off"),
            VmEvent::VcpuFailed { index, reason } => write!(f, "vCPU {index} failed: {reason}"),
        }
    }
}

impl fmt::Display for ResetCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetCause::KeyboardController => write!(
                f,
                "through the keyboard controller: the guest rebooted, or panicked with \
                 panic=N (its console says which)"
            ),
            ResetCause::TripleFault { vcpu } => write!(
                f,
                "by a triple fault on vCPU {vcpu}: a guest rebooting with reboot=t ends so; \
                 otherwise its CPU met an exception it could not deliver"
            ),
            ResetCause::SystemEvent { vcpu } => {
                write!(
                    f,
                    "asked of KVM by the guest on vCPU {vcpu} (a reset system event)"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_says_how_it_came() {
        let said = |cause| VmEvent::Reset(cause).to_string();
        assert!(said(ResetCause::KeyboardController)
            .starts_with("reset through the keyboard controller: the guest rebooted"));
        assert!(said(ResetCause::TripleFault { vcpu: 1 })
            .starts_with("reset by a triple fault on vCPU 1:"));
        assert_eq!(
            said(ResetCause::SystemEvent { vcpu: 0 }),
            "reset asked of KVM by the guest on vCPU 0 (a reset system event)"
        );
    }
}
