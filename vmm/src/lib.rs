//! `ftvmm`: a rust-vmm based VMM that boots real Linux guests and that the
//! FT engine drives (pause, capture, dirty pages, restore).

pub mod boot;
pub mod control;
pub mod cpu;
pub mod devices;
pub mod dirty;
pub mod kvm_host;
pub mod layout;
pub mod memory;
pub mod metrics;
pub mod selftest;
pub mod snapshot;
pub mod staging;
pub mod vm;
pub mod vm_event;
pub mod vm_state;
