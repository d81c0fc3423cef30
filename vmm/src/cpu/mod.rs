//! vCPUs: their boot state, CPUID, and the threads that run them.

pub mod boot_regs;
pub mod cpuid;
pub mod features;
pub mod runner;
pub mod schedstat;
pub mod state;
