//! Dirty pages from KVM's dirty bitmap: `KVM_GET_DIRTY_LOG` per slot, with
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` so reading the log and
//! re-protecting the pages are separate steps (`KVM_CLEAR_DIRTY_LOG`).
//! Every harvest reads one bit per page of every slot, so its cost grows
//! with the guest's memory; the fallback where KVM has no dirty ring.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use super::{push_set_bits, Slot};
use crate::memory::PAGE_SIZE;

// kvm-ioctls has no wrapper for this one.
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
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
}

/// KVM's dirty bitmap of a VM.
#[derive(Debug)]
pub(super) struct BitmapLog {
    /// Whether KVM's manual protect mode is on (otherwise GET also clears).
    manual_protect: bool,
}

impl BitmapLog {
    /// Turns on manual protect with every page initially dirty, where KVM
    /// has it (before the slots are created).
    pub(super) fn enable(vm: &VmFd) -> Result<BitmapLog, BitmapError> {
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
                .map_err(BitmapError::EnableManualProtect)?;
        }
        Ok(BitmapLog { manual_protect })
    }

    pub(super) fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// Reads and re-arms the log of every slot; appends the dirty pages
    /// (ascending, as `slots` are).
    pub(super) fn harvest(
        &self,
        vm: &VmFd,
        slots: &[Slot],
        out: &mut Vec<u64>,
    ) -> Result<(), BitmapError> {
        for s in slots {
            let bytes = s.pages as usize * PAGE_SIZE;
            let mut bits = vm
                .get_dirty_log(s.slot, bytes)
                .map_err(|source| BitmapError::Get {
                    slot: s.slot,
                    source,
                })?;
            if self.manual_protect {
                clear(vm, s, &mut bits)?;
            }
            push_set_bits(s.first_page(), &bits, out);
        }
        Ok(())
    }
}

/// Write-protects again the pages reported in `bits`.
fn clear(vm: &VmFd, s: &Slot, bits: &mut [u64]) -> Result<(), BitmapError> {
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
        return Err(BitmapError::Clear {
            slot: s.slot,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
