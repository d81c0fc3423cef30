//! Why a running VM stops: what vCPUs and devices report to the VMM.

/// An event that ends the VM's run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest asked for a reset (i8042 reset line, triple fault).
    Reset,
    /// The guest powered off.
    Shutdown,
    /// A vCPU could not continue.
    VcpuFailed { index: u8, reason: String },
}
