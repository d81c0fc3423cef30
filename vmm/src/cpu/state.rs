//! The complete state of one vCPU, captured while it is paused and restored
//! into a fresh vCPU (same or another process). Plain serde data; the KVM
//! structs serialise as their raw bytes (kvm-bindings' `serde` feature).
//!
//! Save and restore orders follow what KVM needs: CPUID before anything
//! that depends on it, MP state before registers, LAPIC before MSRs (the
//! TSC deadline MSR needs the LAPIC), vCPU events last.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

pub const VCPU_STATE_VERSION: u32 = 1;

/// MSRs KVM lists but that cannot be saved and restored as plain values.
const MSR_SKIP: &[u32] = &[
    0x0000_0049, // IA32_PRED_CMD: write-only
    0x0000_010b, // IA32_FLUSH_CMD: write-only
];

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {index}: {what} failed: {source}")]
    Kvm {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM restored only {set} of {wanted} MSRs (first refused: {first:#x})")]
    PartialMsrs {
        index: u8,
        set: usize,
        wanted: usize,
        first: u32,
    },
    #[error("vCPU state version {found} is not supported (this ftvmm reads version {VCPU_STATE_VERSION})")]
    Version { found: u32 },
    #[error("vCPU {index}: saved CPUID or MSR list is larger than KVM accepts")]
    TooManyEntries { index: u8 },
    #[error("KVM_GET_MSR_INDEX_LIST failed: {0}")]
    MsrIndexList(#[source] kvm_ioctls::Error),
}

/// Everything a vCPU is.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub version: u32,
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    /// TSC frequency in kHz (0 if KVM does not report it).
    pub tsc_khz: u32,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("index", &self.index)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .field("tsc_khz", &self.tsc_khz)
            .finish_non_exhaustive()
    }
}

/// The MSRs that this host's KVM lets us read, found once per VM by trying
/// each one KVM lists (some listed MSRs fail on some CPUs).
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VcpuStateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(VcpuStateError::MsrIndexList)?;
    let mut usable = Vec::new();
    for &index in list.as_slice() {
        if MSR_SKIP.contains(&index) {
            continue;
        }
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .expect("one MSR fits");
        if matches!(vcpu.get_msrs(&mut one), Ok(1)) {
            usable.push(index);
        }
    }
    Ok(usable)
}

fn kvm(index: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm {
        index,
        what,
        source,
    }
}

/// Captures vCPU `index`, whose TSC runs at `tsc_khz` (as KVM told when
/// the vCPU started; 0 for unknown). The vCPU must not be running.
pub fn capture(
    vcpu: &VcpuFd,
    index: u8,
    cpuid: &CpuId,
    msr_indices: &[u32],
    tsc_khz: u32,
) -> Result<VcpuState, VcpuStateError> {
    let mp_state = vcpu
        .get_mp_state()
        .map_err(kvm(index, "KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm(index, "KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm(index, "KVM_GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(kvm(index, "KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm(index, "KVM_GET_XCRS"))?;
    let debug_regs = vcpu
        .get_debug_regs()
        .map_err(kvm(index, "KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm(index, "KVM_GET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&i| kvm_msr_entry {
            index: i,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).expect("MSR list fits a kvm_msrs");
    let read = vcpu
        .get_msrs(&mut msrs)
        .map_err(kvm(index, "KVM_GET_MSRS"))?;
    if read != entries.len() {
        return Err(VcpuStateError::PartialMsrs {
            index,
            set: read,
            wanted: entries.len(),
            first: entries[read].index,
        });
    }
    let events = vcpu
        .get_vcpu_events()
        .map_err(kvm(index, "KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        version: VCPU_STATE_VERSION,
        index,
        cpuid: cpuid.as_slice().to_vec(),
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs: msrs.as_slice().to_vec(),
        events,
        tsc_khz,
    })
}

const MSR_IA32_TSC: u32 = 0x10;

/// Moves the saved TSC forward by `gap` (the real time between capture and
/// restore), so the guest's TSC keeps pace with wall-clock time.
pub fn advance_tsc(state: &mut VcpuState, gap: std::time::Duration) {
    if state.tsc_khz == 0 {
        return;
    }
    let ticks = (gap.as_nanos() * u128::from(state.tsc_khz) / 1_000_000) as u64;
    for msr in state.msrs.iter_mut().filter(|m| m.index == MSR_IA32_TSC) {
        msr.data = msr.data.wrapping_add(ticks);
    }
}

/// Restores `state` into a freshly created vCPU.
pub fn restore(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    if state.version != VCPU_STATE_VERSION {
        return Err(VcpuStateError::Version {
            found: state.version,
        });
    }
    let index = state.index;
    if state.tsc_khz != 0 {
        // Scaling may be unsupported; the guest then sees the host's rate,
        // which is the same on the same host.
        let _ = vcpu.set_tsc_khz(state.tsc_khz);
    }
    let cpuid =
        CpuId::from_entries(&state.cpuid).map_err(|_| VcpuStateError::TooManyEntries { index })?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm(index, "KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(kvm(index, "KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs)
        .map_err(kvm(index, "KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(kvm(index, "KVM_SET_SREGS"))?;
    // SAFETY: the xsave area was captured by KVM_GET_XSAVE on a vCPU with
    // the same CPUID, so its size matches what KVM_SET_XSAVE reads.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(kvm(index, "KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs)
        .map_err(kvm(index, "KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debug_regs)
        .map_err(kvm(index, "KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic)
        .map_err(kvm(index, "KVM_SET_LAPIC"))?;
    let msrs =
        Msrs::from_entries(&state.msrs).map_err(|_| VcpuStateError::TooManyEntries { index })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm(index, "KVM_SET_MSRS"))?;
    let wanted = state.msrs.len();
    if set != wanted {
        return Err(VcpuStateError::PartialMsrs {
            index,
            set,
            wanted,
            first: state.msrs[set].index,
        });
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(kvm(index, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}
