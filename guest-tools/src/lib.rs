//! Programs that run inside FT guests (built static, installed in the guest
//! images by `images/guest-rootfs.sh`). Today: `ft-dirtier`, a memory dirtier
//! with a chosen rate for benchmarks. The ledger service and the guest agent
//! come with the issues that use them.

pub mod dirtier;
pub mod pagemap;
