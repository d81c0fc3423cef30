//! The CPU features this host gives a guest of a declared feature set, as
//! the words two nodes compare before they pair (a VM may only be
//! protected across nodes that both provide every feature it was given).

use super::ReplicationError;
use crate::cpu::cpuid;
use crate::cpu::features::FeatureSet;

/// The feature words `set` gives a guest on this host: leaf 1 ECX/EDX,
/// leaf 7 EBX/ECX/EDX, extended leaf 1 ECX/EDX.
pub fn offered_cpu_features(set: FeatureSet) -> Result<Vec<u32>, ReplicationError> {
    let (kvm, _) = crate::kvm_host::probe().map_err(|e| ReplicationError::Host(e.to_string()))?;
    let base = cpuid::supported(&kvm).map_err(|e| ReplicationError::Host(e.to_string()))?;
    let host = cpuid::host_features(&base);
    let want = set.words();
    Ok(vec![
        host.leaf1_ecx & want.leaf1_ecx,
        host.leaf1_edx & want.leaf1_edx,
        host.leaf7_ebx & want.leaf7_ebx,
        host.leaf7_ecx & want.leaf7_ecx,
        host.leaf7_edx & want.leaf7_edx,
        host.ext1_ecx & want.ext1_ecx,
        host.ext1_edx & want.ext1_edx,
    ])
}
