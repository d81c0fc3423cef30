//! Dirty-page tracking: KVM's dirty log (with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`,
//! so reading the log and re-protecting pages are separate steps) merged
//! with the VMM's own bitmap of pages that devices wrote. A harvest returns
//! exactly the pages written since the previous harvest.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::memory::{GuestMemoryMmap, PAGE_SIZE};

// kvm-ioctls has no wrapper for this one.
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 failed: {0}")]
    EnableManualProtect(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_DIRTY_LOG of slot {slot} failed: {source}")]
    Get {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_CLEAR_DIRTY_LOG of slot {slot} failed: {source}")]
    Clear {
        slot: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory has no region at {0:#x} for slot {1}")]
    NoRegion(u64, u32),
}

/// One memory slot's geometry.
#[derive(Debug, Clone, Copy)]
struct Slot {
    slot: u32,
    base: u64,
    pages: u64,
}

/// The dirty log of a VM's RAM slots.
#[derive(Debug)]
pub struct DirtyLog {
    slots: Vec<Slot>,
    /// Whether KVM's manual protect mode is on (otherwise GET also clears).
    manual_protect: bool,
}

/// Pages dirtied since the previous harvest, one bitmap per slot (bit n of
/// word w is page `base/4096 + 64*w + n`).
#[derive(Debug, Clone, Default)]
pub struct DirtyPages {
    pub slots: Vec<(u64, Vec<u64>)>,
    /// Pages only the guest's CPUs dirtied, only the VMM dirtied, both.
    pub by_guest: u64,
    pub by_vmm: u64,
}

impl DirtyPages {
    pub fn count(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|(_, b)| b.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Guest physical page numbers, in ascending order.
    pub fn page_numbers(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.iter().flat_map(|(base, words)| {
            words.iter().enumerate().flat_map(move |(w, &word)| {
                (0..64)
                    .filter(move |bit| word & (1 << bit) != 0)
                    .map(move |bit| base / PAGE_SIZE as u64 + w as u64 * 64 + bit)
            })
        })
    }
}

impl DirtyLog {
    /// Turns on manual protect (before the slots are created, so the
    /// first harvest reports every page: the first checkpoint is a full
    /// copy). Slots are given as (slot, guest base, bytes).
    pub fn enable(vm: &VmFd, slots: &[(u32, u64, u64)]) -> Result<DirtyLog, DirtyLogError> {
        // The capability reports the set of flags it supports.
        let wanted = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
        let supported =
            vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
        let manual_protect = supported > 0 && (supported as u32) & wanted == wanted;
        if manual_protect {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = u64::from(wanted);
            vm.enable_cap(&cap)
                .map_err(DirtyLogError::EnableManualProtect)?;
        }
        Ok(DirtyLog {
            slots: slots
                .iter()
                .map(|&(slot, base, bytes)| Slot {
                    slot,
                    base,
                    pages: bytes / PAGE_SIZE as u64,
                })
                .collect(),
            manual_protect,
        })
    }

    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// Reads and re-arms the log, merges the VMM's bitmap, returns the set.
    pub fn harvest(&self, vm: &VmFd, mem: &GuestMemoryMmap) -> Result<DirtyPages, DirtyLogError> {
        let mut out = DirtyPages::default();
        for s in &self.slots {
            let bytes = s.pages as usize * PAGE_SIZE;
            let mut kvm_bits =
                vm.get_dirty_log(s.slot, bytes)
                    .map_err(|source| DirtyLogError::Get {
                        slot: s.slot,
                        source,
                    })?;
            if self.manual_protect {
                self.clear(vm, s, &mut kvm_bits)?;
            }
            let region = mem
                .find_region(GuestAddress(s.base))
                .ok_or(DirtyLogError::NoRegion(s.base, s.slot))?;
            debug_assert_eq!(region.len(), bytes as u64);
            let vmm_bits = region.get_mmap().bitmap().get_and_reset();
            for (i, word) in kvm_bits.iter_mut().enumerate() {
                let vmm = vmm_bits.get(i).copied().unwrap_or(0);
                out.by_guest += u64::from((*word & !vmm).count_ones());
                out.by_vmm += u64::from((vmm & !*word).count_ones());
                *word |= vmm;
            }
            out.slots.push((s.base, kvm_bits));
        }
        Ok(out)
    }

    /// Write-protects again the pages reported in `bits`.
    fn clear(&self, vm: &VmFd, s: &Slot, bits: &mut [u64]) -> Result<(), DirtyLogError> {
        let clear = kvm_clear_dirty_log {
            slot: s.slot,
            num_pages: s.pages as u32,
            first_page: 0,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bits.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `clear` points at a bitmap of at least `num_pages` bits
        // (KVM_GET_DIRTY_LOG sized it for this slot), alive for the call.
        let rc = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if rc < 0 {
            return Err(DirtyLogError::Clear {
                slot: s.slot,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_numbers_follow_the_bitmap() {
        let pages = DirtyPages {
            slots: vec![(0, vec![0b101, 1 << 63]), (0x10_0000, vec![1])],
            ..Default::default()
        };
        assert_eq!(pages.count(), 4);
        let numbers: Vec<u64> = pages.page_numbers().collect();
        assert_eq!(numbers, vec![0, 2, 127, 256]);
    }
}
