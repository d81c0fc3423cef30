//! Declared CPU feature sets. A VM runs with a named set of CPUID feature
//! bits (KVM's supported set filtered through it); the set is recorded with
//! the VM's state, and a host that cannot provide every recorded bit refuses
//! to restore (or, later, to stand by for) the VM, saying which bits it lacks.

use kvm_bindings::CpuId;
use serde::{Deserialize, Serialize};

/// The feature words that decide what a guest may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureWords {
    /// Leaf 1 ECX and EDX.
    pub leaf1_ecx: u32,
    pub leaf1_edx: u32,
    /// Leaf 7 subleaf 0 EBX, ECX, EDX.
    pub leaf7_ebx: u32,
    pub leaf7_ecx: u32,
    pub leaf7_edx: u32,
    /// Leaf 0x8000_0001 ECX and EDX.
    pub ext1_ecx: u32,
    pub ext1_edx: u32,
}

impl FeatureWords {
    const ALL: FeatureWords = FeatureWords {
        leaf1_ecx: u32::MAX,
        leaf1_edx: u32::MAX,
        leaf7_ebx: u32::MAX,
        leaf7_ecx: u32::MAX,
        leaf7_edx: u32::MAX,
        ext1_ecx: u32::MAX,
        ext1_edx: u32::MAX,
    };

    fn words(&self) -> [(&'static str, u32); 7] {
        [
            ("leaf 1 ECX", self.leaf1_ecx),
            ("leaf 1 EDX", self.leaf1_edx),
            ("leaf 7 EBX", self.leaf7_ebx),
            ("leaf 7 ECX", self.leaf7_ecx),
            ("leaf 7 EDX", self.leaf7_edx),
            ("leaf 0x80000001 ECX", self.ext1_ecx),
            ("leaf 0x80000001 EDX", self.ext1_edx),
        ]
    }

    /// The bits of `self` that `available` lacks, as "word: bits" strings.
    pub fn missing_from(&self, available: &FeatureWords) -> Vec<String> {
        self.words()
            .iter()
            .zip(available.words())
            .filter_map(|(&(name, want), (_, have))| {
                let lacking = want & !have;
                (lacking != 0).then(|| format!("{name} bits {lacking:#010x}"))
            })
            .collect()
    }

    /// Reads the words out of a CPUID table (missing leaves read as 0).
    pub fn of(cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> FeatureWords {
        let find = |function: u32| {
            cpuid
                .iter()
                .find(|e| e.function == function && e.index == 0)
        };
        let (l1, l7, e1) = (find(1), find(7), find(0x8000_0001));
        FeatureWords {
            leaf1_ecx: l1.map_or(0, |e| e.ecx),
            leaf1_edx: l1.map_or(0, |e| e.edx),
            leaf7_ebx: l7.map_or(0, |e| e.ebx),
            leaf7_ecx: l7.map_or(0, |e| e.ecx),
            leaf7_edx: l7.map_or(0, |e| e.edx),
            ext1_ecx: e1.map_or(0, |e| e.ecx),
            ext1_edx: e1.map_or(0, |e| e.edx),
        }
    }

    /// Clears in `cpuid` every feature bit not in `self`.
    pub fn mask(&self, cpuid: &mut CpuId) {
        for e in cpuid.as_mut_slice() {
            match (e.function, e.index) {
                (1, _) => {
                    e.ecx &= self.leaf1_ecx;
                    e.edx &= self.leaf1_edx;
                }
                (7, 0) => {
                    e.ebx &= self.leaf7_ebx;
                    e.ecx &= self.leaf7_ecx;
                    e.edx &= self.leaf7_edx;
                }
                (0x8000_0001, _) => {
                    e.ecx &= self.ext1_ecx;
                    e.edx &= self.ext1_edx;
                }
                _ => {}
            }
        }
    }
}

/// The feature sets a VM can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureSet {
    /// Everything this host's KVM supports (fastest; ties the VM to hosts
    /// with at least the same features).
    Host,
    /// The x86-64-v2 level (SSE4.2, POPCNT, CX16, no AVX): runs on any x86
    /// server of the last decade, so a pair of unlike servers can protect it.
    #[value(name = "x86-64-v2")]
    #[serde(rename = "x86-64-v2")]
    X86_64V2,
}

impl std::fmt::Display for FeatureSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FeatureSet::Host => "host",
            FeatureSet::X86_64V2 => "x86-64-v2",
        })
    }
}

impl FeatureSet {
    pub fn words(self) -> FeatureWords {
        match self {
            FeatureSet::Host => FeatureWords::ALL,
            FeatureSet::X86_64V2 => FeatureWords {
                // SSE3, SSSE3, CX16, SSE4.1, SSE4.2, x2APIC, POPCNT (TSC
                // deadline and the hypervisor bit are added by the VMM).
                leaf1_ecx: (1 << 0)
                    | (1 << 9)
                    | (1 << 13)
                    | (1 << 19)
                    | (1 << 20)
                    | (1 << 21)
                    | (1 << 23),
                // FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA
                // CMOV PAT PSE36 CLFSH MMX FXSR SSE SSE2 HTT.
                leaf1_edx: 0x17cb_fbff & !(1 << 10) | (1 << 28),
                leaf7_ebx: 0,
                leaf7_ecx: 0,
                leaf7_edx: 0,
                // LAHF/SAHF in long mode.
                ext1_ecx: 1 << 0,
                // SYSCALL, NX, RDTSCP, LM.
                ext1_edx: (1 << 11) | (1 << 20) | (1 << 27) | (1 << 29),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn table(l1_ecx: u32, l7_ebx: u32) -> Vec<kvm_cpuid_entry2> {
        vec![
            kvm_cpuid_entry2 {
                function: 1,
                ecx: l1_ecx,
                edx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: l7_ebx,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn the_baseline_masks_avx_and_keeps_sse42() {
        const SSE42: u32 = 1 << 20;
        const AVX: u32 = 1 << 28;
        const AVX2: u32 = 1 << 5;
        let mut cpuid = CpuId::from_entries(&table(SSE42 | AVX, AVX2)).unwrap();
        FeatureSet::X86_64V2.words().mask(&mut cpuid);
        let words = FeatureWords::of(cpuid.as_slice());
        assert_eq!(words.leaf1_ecx, SSE42);
        assert_eq!(words.leaf7_ebx, 0);
        assert_ne!(words.leaf1_edx & (1 << 26), 0, "SSE2 kept");
        let mut host = CpuId::from_entries(&table(SSE42 | AVX, AVX2)).unwrap();
        FeatureSet::Host.words().mask(&mut host);
        assert_eq!(FeatureWords::of(host.as_slice()).leaf1_ecx, SSE42 | AVX);
    }

    #[test]
    fn a_host_lacking_a_recorded_bit_is_named() {
        let recorded = FeatureWords::of(&table(1 << 20 | 1 << 28, 1 << 5));
        let host = FeatureWords::of(&table(1 << 20, 0));
        let missing = recorded.missing_from(&host);
        assert_eq!(
            missing,
            vec!["leaf 1 ECX bits 0x10000000", "leaf 7 EBX bits 0x00000020"]
        );
        assert!(host.missing_from(&recorded).is_empty());
    }
}
