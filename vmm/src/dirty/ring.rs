//! Dirty pages from KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`, or its
//! `_ACQ_REL` form): each vCPU has a ring, shared with KVM through an mmap
//! of its fd, where KVM appends (slot, page offset) for every page the
//! vCPU dirties. A harvest walks each ring from where it last stopped,
//! marks the entries it took as collected, and asks KVM to re-protect
//! those pages (`KVM_RESET_DIRTY_RINGS`): its cost follows the pages
//! written, not the guest's memory.
//!
//! A vCPU whose ring is nearly full leaves `KVM_RUN` with
//! `KVM_EXIT_DIRTY_RING_FULL`; its thread moves the entries into the
//! ring's pending list ([`RingLog::ring_full`]) and runs on, and the next
//! harvest takes them from there.
//!
//! All the unsafe code of dirty tracking by ring is in [`RingMap`].

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVMIO, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

use super::Slot;
use crate::memory::PAGE_SIZE;

// kvm-ioctls has no dirty-ring API.
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// An entry KVM has filled and userspace has not collected yet.
const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// An entry userspace has collected; KVM re-protects its page on
/// `KVM_RESET_DIRTY_RINGS` and reuses it.
const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;

/// Entries per vCPU ring (16 bytes each: 256 KiB per vCPU). Sized so that
/// an epoch that fits the stop-time goal (under 5 ms stopped, with pages
/// staged at ~2,000 per ms: about 10,000 pages) never fills a ring: the
/// ring-full exit is then only taken by epochs already over budget. KVM
/// keeps 64 entries in reserve, and reports the largest ring it accepts
/// (65,536 entries on Linux), which caps this.
pub(super) const RING_ENTRIES: u32 = 16_384;

/// The smallest ring KVM accepts: one page.
const MIN_RING_BYTES: u64 = PAGE_SIZE as u64;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("enabling {cap} with a ring of {bytes} bytes per vCPU failed: {source}")]
    Enable {
        cap: &'static str,
        bytes: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("duplicating the VM's fd for KVM_RESET_DIRTY_RINGS failed: {0}")]
    DupVmFd(#[source] std::io::Error),
    #[error("mapping the dirty ring of vCPU {vcpu} ({bytes} bytes) failed: {source}")]
    Map {
        vcpu: usize,
        bytes: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("the vCPUs' dirty rings are mapped already")]
    AlreadyAttached,
    #[error("the dirty ring of vCPU {0} is not mapped")]
    NoSuchRing(usize),
    #[error("KVM_RESET_DIRTY_RINGS failed: {0}")]
    Reset(#[source] std::io::Error),
    #[error("the dirty ring of vCPU {vcpu} names page {offset} of slot {slot:#x}, which this VM does not have")]
    BadEntry { vcpu: usize, slot: u32, offset: u64 },
}

/// The dirty rings of a VM.
#[derive(Debug)]
pub(crate) struct RingLog {
    /// The VM's fd (a duplicate, so vCPU threads can reset the rings).
    vm: File,
    entries: u32,
    slots: Vec<Slot>,
    rings: OnceLock<Vec<VcpuRing>>,
    /// The next harvest reports every page, as the bitmap does with
    /// `KVM_DIRTY_LOG_INITIALLY_SET`: set at the start (the first checkpoint
    /// is a full copy) and after a failed harvest (whose pages are lost).
    report_all: AtomicBool,
    /// Ring-full exits so far (all vCPUs).
    full_exits: AtomicU64,
}

/// One vCPU's ring and what was taken from it between harvests.
#[derive(Debug)]
struct VcpuRing {
    map: RingMap,
    state: Mutex<Cursor>,
}

#[derive(Debug)]
struct Cursor {
    /// The next entry to look at (free-running; the ring index is this
    /// modulo the ring's size).
    fetch: u32,
    /// Pages taken when the ring filled up, not harvested yet.
    pending: Vec<u64>,
    /// `pending` is sorted and rid of repeats when it grows to this.
    compact_at: usize,
}

impl RingLog {
    /// Enables the ring on `vm` (before any vCPU exists), with
    /// `entries` entries per vCPU or the most KVM allows. `None` when this
    /// KVM has no dirty ring.
    pub(super) fn enable(
        vm: &VmFd,
        slots: &[Slot],
        entries: u32,
    ) -> Result<Option<RingLog>, RingError> {
        // The ACQ_REL form is the same protocol with the ordering made
        // explicit (needed on weakly ordered hosts); on x86 both are had.
        let (cap, name) = [
            (
                KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
            ),
            (KVM_CAP_DIRTY_LOG_RING, "KVM_CAP_DIRTY_LOG_RING"),
        ]
        .into_iter()
        .find(|&(cap, _)| vm.check_extension_raw(libc::c_ulong::from(cap)) > 0)
        .map_or((0, ""), |found| found);
        if cap == 0 {
            return Ok(None);
        }
        // The capability's value is the largest ring in bytes.
        let max = vm.check_extension_raw(libc::c_ulong::from(cap)) as u64;
        let wanted = u64::from(entries) * std::mem::size_of::<kvm_dirty_gfn>() as u64;
        let bytes = prev_power_of_two(wanted.min(max));
        if bytes < MIN_RING_BYTES {
            return Ok(None);
        }
        let mut enable = kvm_enable_cap {
            cap,
            ..Default::default()
        };
        enable.args[0] = bytes;
        vm.enable_cap(&enable).map_err(|source| RingError::Enable {
            cap: name,
            bytes,
            source,
        })?;
        Ok(Some(RingLog {
            vm: RingMap::dup_vm_fd(vm)?,
            entries: (bytes / std::mem::size_of::<kvm_dirty_gfn>() as u64) as u32,
            slots: slots.to_vec(),
            rings: OnceLock::new(),
            report_all: AtomicBool::new(true),
            full_exits: AtomicU64::new(0),
        }))
    }

    /// Entries per vCPU ring.
    pub(crate) fn entries(&self) -> u32 {
        self.entries
    }

    /// Maps the ring of every vCPU (in vCPU order).
    pub(super) fn attach_vcpus(&self, vcpus: &[VcpuFd]) -> Result<(), RingError> {
        let rings = vcpus
            .iter()
            .enumerate()
            .map(|(index, fd)| {
                Ok(VcpuRing {
                    map: RingMap::new(fd, self.entries).map_err(|source| RingError::Map {
                        vcpu: index,
                        bytes: self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>(),
                        source,
                    })?,
                    state: Mutex::new(Cursor {
                        fetch: 0,
                        pending: Vec::new(),
                        compact_at: self.compact_floor(),
                    }),
                })
            })
            .collect::<Result<Vec<_>, RingError>>()?;
        self.rings
            .set(rings)
            .map_err(|_| RingError::AlreadyAttached)
    }

    /// How many times a vCPU found its ring full.
    pub(crate) fn full_exits(&self) -> u64 {
        self.full_exits.load(Ordering::Relaxed)
    }

    fn compact_floor(&self) -> usize {
        2 * self.entries as usize
    }

    fn rings(&self) -> &[VcpuRing] {
        self.rings.get().map_or(&[], Vec::as_slice)
    }

    /// Called by vCPU `vcpu`'s thread on `KVM_EXIT_DIRTY_RING_FULL`:
    /// moves its ring's entries to the pending list and has KVM recycle
    /// them, so the vCPU can run on.
    pub(crate) fn ring_full(&self, vcpu: usize) -> Result<(), RingError> {
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        let ring = self.rings().get(vcpu).ok_or(RingError::NoSuchRing(vcpu))?;
        {
            let mut cursor = lock(&ring.state);
            let mut taken = std::mem::take(&mut cursor.pending);
            let result = self.collect(vcpu, ring, &mut cursor, &mut taken);
            // A busy guest rewrites the same pages: keep one of each.
            if taken.len() >= cursor.compact_at {
                taken.sort_unstable();
                taken.dedup();
                cursor.compact_at = (2 * taken.len()).max(self.compact_floor());
            }
            cursor.pending = taken;
            if let Err(e) = result {
                self.report_all.store(true, Ordering::Release);
                return Err(e);
            }
        }
        self.reset()
    }

    /// The pages dirtied since the last harvest (ascending, each once);
    /// re-arms them.
    pub(super) fn harvest(&self) -> Result<Vec<u64>, RingError> {
        let mut pages = Vec::new();
        if let Err(e) = self.take_all(&mut pages) {
            // What was taken is dropped: the next harvest reports all.
            self.report_all.store(true, Ordering::Release);
            return Err(e);
        }
        if self.report_all.swap(false, Ordering::AcqRel) {
            return Ok(self
                .slots
                .iter()
                .flat_map(|s| s.first_page()..s.first_page() + s.pages)
                .collect());
        }
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }

    /// Takes the pending pages and every ring's entries, then resets.
    fn take_all(&self, out: &mut Vec<u64>) -> Result<(), RingError> {
        for (vcpu, ring) in self.rings().iter().enumerate() {
            let mut cursor = lock(&ring.state);
            out.append(&mut cursor.pending);
            cursor.compact_at = self.compact_floor();
            self.collect(vcpu, ring, &mut cursor, out)?;
        }
        self.reset()
    }

    /// Takes the entries KVM filled since the cursor, in ring order.
    fn collect(
        &self,
        vcpu: usize,
        ring: &VcpuRing,
        cursor: &mut Cursor,
        out: &mut Vec<u64>,
    ) -> Result<(), RingError> {
        // A ring holds at most `entries` uncollected entries.
        for _ in 0..self.entries {
            let Some((slot, offset)) = ring.map.take(cursor.fetch) else {
                break;
            };
            cursor.fetch = cursor.fetch.wrapping_add(1);
            out.push(self.page_of(slot, offset).ok_or(RingError::BadEntry {
                vcpu,
                slot,
                offset,
            })?);
        }
        Ok(())
    }

    /// The guest page number of a ring entry (its slot field holds the
    /// address space in the high 16 bits; RAM is in address space 0).
    fn page_of(&self, slot: u32, offset: u64) -> Option<u64> {
        self.slots
            .iter()
            .find(|s| s.slot == slot && offset < s.pages)
            .map(|s| s.first_page() + offset)
    }

    /// Has KVM re-protect the pages of the collected entries and reuse them.
    fn reset(&self) -> Result<(), RingError> {
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; `self.vm` is an
        // open VM fd.
        let rc = unsafe { ioctl(&self.vm, KVM_RESET_DIRTY_RINGS()) };
        if rc < 0 {
            return Err(RingError::Reset(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

fn lock(state: &Mutex<Cursor>) -> MutexGuard<'_, Cursor> {
    // A cursor is left consistent at every step: a panic elsewhere while
    // it was held does not make it wrong.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn prev_power_of_two(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        1 << (63 - n.leading_zeros())
    }
}

/// One vCPU's dirty ring, mapped from its fd: an array of `kvm_dirty_gfn`
/// that KVM and the VMM share.
#[derive(Debug)]
struct RingMap {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
}

// SAFETY: the mapping is plain shared memory, valid until `drop`; entries
// are only read and written through `take`, whose `&self` callers
// serialise on the ring's mutex, and with atomic accesses to the flags
// that KVM also accesses.
unsafe impl Send for RingMap {}
// SAFETY: as for `Send`.
unsafe impl Sync for RingMap {}

impl RingMap {
    /// Maps `vcpu`'s ring of `entries` entries (a power of two, as enabled
    /// on its VM).
    fn new(vcpu: &VcpuFd, entries: u32) -> std::io::Result<RingMap> {
        debug_assert!(entries.is_power_of_two());
        let bytes = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: a fresh shared mapping of the vCPU fd at the offset KVM
        // serves the ring at; no existing memory is touched, and the
        // result is checked before use.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                (KVM_DIRTY_LOG_PAGE_OFFSET as usize * PAGE_SIZE) as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(addr.cast()).ok_or_else(|| std::io::Error::other("mmap gave 0"))?;
        Ok(RingMap { base, entries })
    }

    /// A duplicate of `vm`'s fd, owned.
    fn dup_vm_fd(vm: &VmFd) -> Result<File, RingError> {
        // SAFETY: the fd is open for as long as `vm` is borrowed, which
        // outlasts this borrow; the duplicate is a new, owned fd.
        let fd = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
        Ok(File::from(
            fd.try_clone_to_owned().map_err(RingError::DupVmFd)?,
        ))
    }

    /// Takes entry `index` (modulo the ring size) if KVM has filled it:
    /// returns its (slot, page offset) and marks it collected.
    fn take(&self, index: u32) -> Option<(u32, u64)> {
        let i = (index & (self.entries - 1)) as usize;
        // SAFETY: `i` is below `entries`, so the entry is inside the
        // mapping, which lives as long as `self`.
        let entry = unsafe { self.base.as_ptr().add(i) };
        // SAFETY: `flags` is an aligned u32 inside the mapping; KVM and
        // this code access it only atomically (KVM with its
        // acquire/release helpers).
        let flags = unsafe { AtomicU32::from_ptr(ptr::addr_of_mut!((*entry).flags)) };
        // Acquire: KVM fills `slot` and `offset` before it publishes the
        // flag with release.
        if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
            return None;
        }
        // SAFETY: inside the mapping; KVM does not write a dirty entry
        // again until it is collected and reset.
        let (slot, offset) = unsafe {
            (
                ptr::read_volatile(ptr::addr_of!((*entry).slot)),
                ptr::read_volatile(ptr::addr_of!((*entry).offset)),
            )
        };
        // Release: the reads above are done before KVM may reuse the entry.
        flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
        Some((slot, offset))
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        let bytes = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the mapping `new` made; nothing refers to
        // it after `self` is gone.
        unsafe { libc::munmap(self.base.as_ptr().cast(), bytes) };
    }
}

#[cfg(test)]
mod unit_tests {
    use super::prev_power_of_two;

    #[test]
    fn ring_sizes_round_down_to_a_power_of_two() {
        assert_eq!(prev_power_of_two(0), 0);
        assert_eq!(prev_power_of_two(4096), 4096);
        assert_eq!(prev_power_of_two(1_048_576), 1_048_576);
        assert_eq!(prev_power_of_two(1_000_000), 524_288);
    }
}
