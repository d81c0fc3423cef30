//! `ftvmm`: a rust-vmm based VMM that boots real Linux guests and that the
//! FT engine drives (pause, capture, dirty pages, restore).
//!
//! The public surface: [`vm::Vm`] (boot, restore, pause, capture), its
//! description in [`config`], captured state as plain data in
//! [`snapshot`], and the FT engine's edge in [`replication`]. `ftvmm`'s own
//! control socket is [`control`]; [`kvm_host`] and [`selftest`] say what
//! KVM a host has. Everything else is the VMM's inside.

mod boot;
pub mod config;
pub mod control;
mod cpu;
mod devices;
mod dirty;
mod file_lock;
pub mod kvm_host;
mod layout;
mod memory;
mod metrics;
pub mod replication;
pub mod selftest;
pub mod snapshot;
pub mod vm;
mod vm_event;
mod vm_state;

/// `e` with its causes, joined by ": " (for a message that says all of
/// why, on one line).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
