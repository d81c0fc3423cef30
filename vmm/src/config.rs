//! What a VM is made of, as plain data: the description `Vm::boot` takes
//! and the events a running VM reports. Parsed from the command line by
//! `ftvmm` and `ftprotect` alike.

pub use crate::boot::BootSource;
pub use crate::cpu::features::FeatureSet;
pub use crate::devices::virtio::block::DiskConfig;
pub use crate::devices::virtio::net::NetConfig;
pub use crate::dirty::{DirtyMethod, DirtyTracking};
pub use crate::vm::{SerialSink, VmConfig};
pub use crate::vm_event::{ResetCause, VmEvent};
