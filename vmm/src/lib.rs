//! `ftvmm`: a rust-vmm based VMM.
//!
//! Today it holds what the lab needs to prove a node can run guests: the
//! start-up check that says which KVM a host has ([`kvm_host`]) and a tiny
//! ring-0 guest that exercises `KVM_RUN` ([`selftest`]). The VMM proper
//! (Linux boot, devices, state capture, dirty tracking) comes with its issue.

pub mod guest_ram;
pub mod kvm_host;
pub mod selftest;
