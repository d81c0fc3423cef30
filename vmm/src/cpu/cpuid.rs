//! The CPUID a guest sees: KVM's supported set, with per-vCPU topology and
//! the hypervisor bit. The resulting table is recorded with the VM so that a
//! restore (or a standby) can check it runs with the same features.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use super::features::FeatureWords;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
/// KVM emulates the TSC-deadline LAPIC timer; with it the guest needs no
/// LAPIC timer calibration (which fails on slow or noisy hosts and leaves
/// the guest with "lapic is not functional").
const ECX_TSC_DEADLINE_TIMER: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Supported(#[source] kvm_ioctls::Error),
}

/// KVM's supported CPUID (the base every vCPU's table is derived from).
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)
}

/// Whether KVM emulates the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER).
pub fn tsc_deadline_supported(kvm: &Kvm) -> bool {
    kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer)
}

/// Bits the VMM adds on top of the declared feature set (KVM provides them
/// whatever the host CPU): hypervisor present, TSC-deadline timer, HTT.
pub const SYNTHETIC_LEAF1_ECX: u32 = ECX_HYPERVISOR | ECX_TSC_DEADLINE_TIMER;
pub const SYNTHETIC_LEAF1_EDX: u32 = EDX_HTT;

/// The feature words this host can give a guest: KVM's supported set plus
/// the bits the VMM adds itself.
pub fn host_features(base: &CpuId) -> FeatureWords {
    let mut words = FeatureWords::of(base.as_slice());
    words.leaf1_ecx |= SYNTHETIC_LEAF1_ECX;
    words.leaf1_edx |= SYNTHETIC_LEAF1_EDX;
    words
}

/// The table for vCPU `index` of `count`: KVM's supported set filtered
/// through the declared `features`, with topology and the VMM's own bits.
pub fn for_vcpu(
    base: &CpuId,
    features: &FeatureWords,
    index: u8,
    count: u8,
    tsc_deadline: bool,
) -> CpuId {
    let mut cpuid = base.clone();
    features.mask(&mut cpuid);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE_TIMER;
                }
                if count > 1 {
                    entry.edx |= EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => entry.edx = u32::from(index),
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn topology_and_hypervisor_bit_are_per_vcpu() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_1234,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 9,
                ..Default::default()
            },
        ];
        let base = CpuId::from_entries(&entries).unwrap();
        let all = super::super::features::FeatureSet::Host.words();
        let c = for_vcpu(&base, &all, 3, 4, true);
        let leaf1 = c.as_slice()[0];
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x1234);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.ecx & ECX_TSC_DEADLINE_TIMER, 0);
        assert_eq!(
            for_vcpu(&base, &all, 0, 1, false).as_slice()[0].ecx & ECX_TSC_DEADLINE_TIMER,
            0
        );
        assert_eq!(c.as_slice()[1].edx, 3);
    }
}
