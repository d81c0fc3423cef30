//! A tiny ring-0 guest that proves `KVM_RUN` works on a host: it sums
//! `1..=n` in a loop in real mode (CPL 0), writes the 32-bit result to an I/O
//! port and halts. The host checks the exits and the result, and times the
//! loop so a report can say how fast ring-0 guest code runs here.

use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use serde::Serialize;

use crate::kvm_host::{self, KvmHost, KvmHostError};
use crate::memory::{self, GuestRam, MemoryError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Guest physical address the code is loaded at (and the initial RIP).
pub(crate) const CODE_GPA: u64 = 0x1000;
/// Size of the test guest's RAM (the VMM's smallest).
const RAM_MIB: u64 = 16;
/// The port the guest reports its result on.
pub const RESULT_PORT: u16 = 0xe9;
/// Upper bound on exits before the run is declared runaway.
const MAX_EXITS: usize = 64;

/// Errors of the self-test, one per step that can fail.
#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    #[error("KVM host check failed: {0}")]
    Host(#[from] KvmHostError),
    #[error("creating the VM failed: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("guest RAM: {0}")]
    GuestRam(#[from] MemoryError),
    #[error("loading the test code failed: {0}")]
    LoadCode(#[from] vm_memory::GuestMemoryError),
    #[error("registering guest RAM with KVM failed: {0}")]
    SetMemoryRegion(#[source] kvm_ioctls::Error),
    #[error("creating vCPU 0 failed: {0}")]
    CreateVcpu(#[source] kvm_ioctls::Error),
    #[error("setting vCPU registers failed: {0}")]
    SetRegisters(#[source] kvm_ioctls::Error),
    #[error("KVM_RUN failed after {exits} exits: {source}")]
    Run {
        exits: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the guest stopped with an unexpected exit: {0}")]
    UnexpectedExit(String),
    #[error("the guest made {0} exits without halting")]
    Runaway(usize),
}

/// What one self-test run saw.
#[derive(Debug, Clone, Serialize)]
pub struct SelftestReport {
    pub host: KvmHost,
    pub iterations: u32,
    pub expected: u32,
    pub reported: Option<u32>,
    pub halted: bool,
    pub exits: usize,
    pub run_time_us: u64,
    pub ns_per_iteration: f64,
    pub passed: bool,
}

/// Real-mode code: `mov ecx, n; xor eax, eax; l: add eax, ecx; dec ecx;
/// jnz l; mov dx, RESULT_PORT; out dx, eax; hlt`.
pub fn guest_code(iterations: u32) -> Vec<u8> {
    let mut code = vec![0x66, 0xb9];
    code.extend_from_slice(&iterations.to_le_bytes());
    code.extend_from_slice(&[
        0x66, 0x31, 0xc0, // xor eax, eax
        0x66, 0x01, 0xc8, // l: add eax, ecx
        0x66, 0x49, // dec ecx
        0x75, 0xf9, // jnz l
        0xba, // mov dx, imm16
    ]);
    code.extend_from_slice(&RESULT_PORT.to_le_bytes());
    code.extend_from_slice(&[
        0x66, 0xef, // out dx, eax
        0xf4, // hlt
    ]);
    code
}

/// The sum the guest must report: `1 + 2 + ... + n` modulo 2^32.
pub fn expected_sum(iterations: u32) -> u32 {
    let n = u64::from(iterations);
    (n * (n + 1) / 2) as u32
}

/// A one-vCPU real-mode VM about to run code at [`CODE_GPA`]; fields drop
/// in order, so the VM is gone before the RAM it maps is unmapped.
pub(crate) struct RealModeVm {
    vcpu: VcpuFd,
    _vm: VmFd,
    _ram: GuestRam,
}

impl RealModeVm {
    /// The vCPU (for a runner) and what must outlive it: drop the VM
    /// before the RAM.
    #[cfg(test)]
    pub(crate) fn into_parts(self) -> (VcpuFd, VmFd, GuestRam) {
        (self.vcpu, self._vm, self._ram)
    }
}

/// Builds a VM of 16 MiB whose one vCPU starts in real mode at `code`.
pub(crate) fn real_mode_vm(
    kvm: &kvm_ioctls::Kvm,
    code: &[u8],
) -> Result<RealModeVm, SelftestError> {
    let vm = kvm.create_vm().map_err(SelftestError::CreateVm)?;
    let ram = memory::create(RAM_MIB)?;
    ram.memory.write_slice(code, GuestAddress(CODE_GPA))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: ram.size,
        userspace_addr: ram.memory.get_host_address(GuestAddress(0))? as u64,
        flags: 0,
    };
    // SAFETY: the region describes `ram`, a live mapping of exactly
    // `memory_size` bytes that outlives the VM (RealModeVm drops the VM
    // first; a caller that takes it apart keeps the RAM past the VM).
    unsafe { vm.set_user_memory_region(region) }.map_err(SelftestError::SetMemoryRegion)?;
    let vcpu = vm.create_vcpu(0).map_err(SelftestError::CreateVcpu)?;
    start_at_code(&vcpu)?;
    Ok(RealModeVm {
        vcpu,
        _vm: vm,
        _ram: ram,
    })
}

/// Points a fresh vCPU at [`CODE_GPA`] in real mode (code segment 0).
pub(crate) fn start_at_code(vcpu: &VcpuFd) -> Result<(), SelftestError> {
    let mut sregs = vcpu.get_sregs().map_err(SelftestError::SetRegisters)?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(SelftestError::SetRegisters)?;
    let mut regs = vcpu.get_regs().map_err(SelftestError::SetRegisters)?;
    regs.rip = CODE_GPA;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).map_err(SelftestError::SetRegisters)
}

/// Runs the self-test guest with `iterations` loop turns.
pub fn run(iterations: u32) -> Result<SelftestReport, SelftestError> {
    let (kvm, host) = kvm_host::probe()?;
    let mut vm = real_mode_vm(&kvm, &guest_code(iterations))?;
    let mut reported = None;
    let mut halted = false;
    let mut exits = 0;
    let mut run_time = Duration::ZERO;
    while !halted {
        if exits >= MAX_EXITS {
            return Err(SelftestError::Runaway(exits));
        }
        let start = Instant::now();
        let exit = vm
            .vcpu
            .run()
            .map_err(|source| SelftestError::Run { exits, source })?;
        run_time += start.elapsed();
        exits += 1;
        match exit {
            VcpuExit::IoOut(RESULT_PORT, data) if data.len() == 4 => {
                reported = Some(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
            }
            VcpuExit::Hlt => halted = true,
            other => return Err(SelftestError::UnexpectedExit(format!("{other:?}"))),
        }
    }
    let expected = expected_sum(iterations);
    Ok(SelftestReport {
        host,
        iterations,
        expected,
        reported,
        halted,
        exits,
        run_time_us: run_time.as_micros() as u64,
        ns_per_iteration: run_time.as_nanos() as f64 / f64::from(iterations.max(1)),
        passed: halted && reported == Some(expected),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_sum_wraps_like_the_guest() {
        assert_eq!(expected_sum(4), 10);
        let n: u32 = 100_000;
        let wrapped = (1..=n).fold(0u32, |acc, k| acc.wrapping_add(k));
        assert_eq!(expected_sum(n), wrapped);
    }

    #[test]
    fn guest_code_ends_with_out_and_hlt_and_jumps_back_to_the_add() {
        let code = guest_code(7);
        assert_eq!(&code[2..6], &7u32.to_le_bytes());
        assert_eq!(&code[code.len() - 3..], &[0x66, 0xef, 0xf4]);
        // The jnz displacement lands on the `add eax, ecx` at offset 9.
        let jnz = code.iter().position(|&b| b == 0x75).unwrap();
        let target = jnz as i64 + 2 + i64::from(code[jnz + 1] as i8);
        assert_eq!(target, 9);
        assert_eq!(&code[9..12], &[0x66, 0x01, 0xc8]);
    }

    /// Runs the guest on this host's /dev/kvm (hardware KVM or PVM: both
    /// run this real-mode code). Without /dev/kvm the error must say so.
    #[test]
    fn the_guest_runs_on_this_hosts_kvm_or_the_error_is_clear() {
        match run(10_000) {
            Ok(report) => {
                assert!(report.halted);
                assert_eq!(report.reported, Some(expected_sum(10_000)));
                assert!(report.passed);
            }
            Err(SelftestError::Host(KvmHostError::NoDevKvm)) => {
                assert!(!std::path::Path::new("/dev/kvm").exists());
            }
            Err(e) => panic!("self-test failed on this host: {e}"),
        }
    }
}
