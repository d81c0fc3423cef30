//! Dirty-page tracking: which guest pages were written since the previous
//! harvest. KVM reports the pages the guest's CPUs wrote, in one of two
//! ways, and the VMM's own bitmap (vm-memory's, see `memory.rs`) reports
//! the pages its devices wrote; a harvest merges both.
//!
//! - [`bitmap`]: `KVM_GET_DIRTY_LOG` (+ `KVM_CLEAR_DIRTY_LOG` with manual
//!   protect), one bit per page of every slot: a harvest costs in
//!   proportion to the guest's memory, however little was written.
//! - [`ring`]: `KVM_CAP_DIRTY_LOG_RING`, one ring of written pages per
//!   vCPU: a harvest costs in proportion to the pages written (issue 14).
//!
//! Which one a VM uses follows its configuration ([`DirtyTracking`]): by
//! default the bitmap for guests of up to [`AUTO_BITMAP_MAX_BYTES`] (its
//! hot pages save the guest write faults), the ring for larger ones. The
//! ring reports exactly the pages written; the bitmap, with hot pages, a
//! superset.

mod bitmap;
mod ring;
mod vmm_bitmap;

use std::fmt;
use std::sync::Arc;

use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestMemoryMmap, PAGE_SIZE};

pub use self::bitmap::HOT_HARVESTS;
use self::bitmap::{BitmapError, BitmapLog};
pub(crate) use self::ring::RingLog;
use self::ring::{RingError, RING_ENTRIES};
pub use self::vmm_bitmap::VmmBitmap;

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("dirty tracking with the dirty ring was asked for, but this KVM lacks KVM_CAP_DIRTY_LOG_RING")]
    NoRing,
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("guest memory has no region at {base:#x} for slot {slot}")]
    NoRegion { base: u64, slot: u32 },
}

/// Up to this much guest memory, [`DirtyTracking::Auto`] takes the bitmap
/// with hot pages (where KVM has manual protect): reading a bitmap of 4 GiB
/// (128 KiB) costs a harvest less than the write faults hot pages save the
/// guest (a few dozen per epoch, 1-2 us each on hardware, ~100 us nested).
/// Above it, the ring: a harvest that grows with the pages written only.
pub const AUTO_BITMAP_MAX_BYTES: u64 = 4 << 30;

/// Whether [`DirtyTracking::Auto`] takes the bitmap with hot pages at all
/// (else the ring, one `--dirty-tracking bitmap` from it). On: in the lab
/// it cuts the guest's write faults by about 40% and an fsync'd ledger
/// APPEND's time under FT by a fifth to a third (a ping's round trip by
/// 0-20%, within the noise). Lab drills with it failed 2 rounds in 38 in
/// one session (a false silence on the primary's node, cause not found),
/// then passed 60 in 60 once the first harvest's re-protection went in
/// chunks (`bitmap::CLEAR_WORDS_PER_CALL`); turn it off here should such
/// a round come back.
pub const AUTO_PREFERS_HOT_PAGES: bool = true;

/// How a VM's dirty pages are to be tracked (its configuration).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DirtyTracking {
    /// Up to [`AUTO_BITMAP_MAX_BYTES`] of guest memory, the bitmap with hot
    /// pages where KVM has manual protect ([`AUTO_PREFERS_HOT_PAGES`]);
    /// else the dirty ring where KVM has it; else the bitmap.
    #[default]
    Auto,
    /// KVM's dirty bitmap (`KVM_GET_DIRTY_LOG`), even where the ring exists;
    /// with manual protect, pages the guest keeps writing are left
    /// writable (hot).
    Bitmap,
    /// The dirty ring; the VM does not start without it.
    Ring,
}

impl DirtyTracking {
    /// Whether to take the bitmap before trying the ring, for a guest of
    /// `bytes`, on a KVM with manual protect or not.
    fn prefers_bitmap(self, bytes: u64, manual_protect: bool) -> bool {
        match self {
            DirtyTracking::Bitmap => true,
            DirtyTracking::Ring => false,
            // See `AUTO_PREFERS_HOT_PAGES` and `AUTO_BITMAP_MAX_BYTES`.
            DirtyTracking::Auto => {
                AUTO_PREFERS_HOT_PAGES && manual_protect && bytes <= AUTO_BITMAP_MAX_BYTES
            }
        }
    }
}

/// How a VM's dirty pages are tracked (what [`DirtyTracking`] came to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirtyMethod {
    Bitmap,
    Ring,
}

impl fmt::Display for DirtyMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DirtyMethod::Bitmap => "bitmap",
            DirtyMethod::Ring => "ring",
        })
    }
}

/// One memory slot's geometry.
#[derive(Debug, Clone, Copy)]
struct Slot {
    slot: u32,
    base: u64,
    pages: u64,
}

impl Slot {
    fn first_page(&self) -> u64 {
        self.base / PAGE_SIZE as u64
    }
}

/// The dirty log of a VM's RAM slots, by whichever method it uses.
#[derive(Debug)]
pub struct DirtyLog {
    slots: Vec<Slot>,
    method: Method,
}

#[derive(Debug)]
enum Method {
    Bitmap(BitmapLog),
    Ring(Arc<RingLog>),
}

/// Pages dirtied since the previous harvest, as guest page numbers in
/// ascending order, each once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyPages {
    pages: Vec<u64>,
    /// Pages only the guest's CPUs dirtied, only the VMM dirtied (the rest
    /// both did).
    pub by_guest: u64,
    pub by_vmm: u64,
    /// How many of the pages were left writable, hot (reported again by
    /// the next harvest whether written or not; bitmap only).
    pub hot: u64,
    /// How many of the pages were written for certain: all but those that
    /// were hot since the harvest before (written again or not). A page
    /// both the guest and the VMM wrote may count twice: a bound, and 0
    /// only when nothing is known to have written memory.
    pub written: u64,
}

impl DirtyPages {
    /// Merges the pages the guest wrote with those the VMM wrote (each
    /// ascending, no repeats) and counts who wrote what.
    fn merge(guest: &[u64], vmm: &[u64]) -> DirtyPages {
        let mut pages = Vec::with_capacity(guest.len() + vmm.len());
        let (mut by_guest, mut by_vmm) = (0, 0);
        let (mut g, mut v) = (guest.iter().peekable(), vmm.iter().peekable());
        loop {
            let next = match (g.peek(), v.peek()) {
                (Some(&&a), Some(&&b)) if a == b => {
                    g.next();
                    v.next();
                    a
                }
                (Some(&&a), Some(&&b)) if a < b => {
                    by_guest += 1;
                    g.next();
                    a
                }
                (Some(_), Some(&&b)) => {
                    by_vmm += 1;
                    v.next();
                    b
                }
                (Some(&&a), None) => {
                    by_guest += 1;
                    g.next();
                    a
                }
                (None, Some(&&b)) => {
                    by_vmm += 1;
                    v.next();
                    b
                }
                (None, None) => break,
            };
            pages.push(next);
        }
        let written = pages.len() as u64;
        DirtyPages {
            pages,
            by_guest,
            by_vmm,
            hot: 0,
            written,
        }
    }

    pub fn count(&self) -> u64 {
        self.pages.len() as u64
    }

    /// Guest physical page numbers, in ascending order.
    pub fn page_numbers(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages.iter().copied()
    }
}

/// Appends the page numbers of the bits set in `words` (bit n of word w is
/// page `first_page + 64*w + n`), in ascending order; skips empty words.
fn push_set_bits(first_page: u64, words: &[u64], out: &mut Vec<u64>) {
    for (w, &word) in words.iter().enumerate() {
        let mut rest = word;
        while rest != 0 {
            let bit = u64::from(rest.trailing_zeros());
            out.push(first_page + w as u64 * 64 + bit);
            rest &= rest - 1;
        }
    }
}

/// Takes (and clears) the pages the VMM wrote in `s`, ascending.
fn take_vmm_pages(
    mem: &GuestMemoryMmap,
    s: &Slot,
    out: &mut Vec<u64>,
) -> Result<(), DirtyLogError> {
    let region = mem
        .find_region(GuestAddress(s.base))
        .ok_or(DirtyLogError::NoRegion {
            base: s.base,
            slot: s.slot,
        })?;
    debug_assert_eq!(region.len(), s.pages * PAGE_SIZE as u64);
    region.get_mmap().bitmap().take(s.first_page(), out);
    Ok(())
}

impl DirtyLog {
    /// Sets up dirty tracking on `vm` as `tracking` asks: before the slots
    /// and the vCPUs are created (KVM takes the ring only before the
    /// vCPUs; manual protect only before the slots, so the first harvest
    /// reports every page: the first checkpoint is a full copy). Slots are
    /// given as (slot, guest base, bytes).
    pub fn enable(
        vm: &VmFd,
        slots: &[(u32, u64, u64)],
        tracking: DirtyTracking,
    ) -> Result<DirtyLog, DirtyLogError> {
        Self::enable_sized(vm, slots, tracking, RING_ENTRIES, HOT_HARVESTS)
    }

    /// [`DirtyLog::enable`] with rings of `ring_entries` (a power of two;
    /// tests use small rings to fill them) and, with the bitmap, hot pages
    /// left writable for up to `hot_harvests` harvests (0: none; tests of
    /// exact sets use that).
    pub(crate) fn enable_sized(
        vm: &VmFd,
        slots: &[(u32, u64, u64)],
        tracking: DirtyTracking,
        ring_entries: u32,
        hot_harvests: u32,
    ) -> Result<DirtyLog, DirtyLogError> {
        let mut slots: Vec<Slot> = slots
            .iter()
            .map(|&(slot, base, bytes)| Slot {
                slot,
                base,
                pages: bytes / PAGE_SIZE as u64,
            })
            .collect();
        // Harvests walk the slots in this order and must yield ascending
        // page numbers.
        slots.sort_by_key(|s| s.base);
        let bytes: u64 = slots.iter().map(|s| s.pages * PAGE_SIZE as u64).sum();
        let ring = if tracking.prefers_bitmap(bytes, BitmapLog::has_manual_protect(vm)) {
            None
        } else {
            RingLog::enable(vm, &slots, ring_entries)?
        };
        let method = match (ring, tracking) {
            (Some(ring), _) => Method::Ring(Arc::new(ring)),
            (None, DirtyTracking::Ring) => return Err(DirtyLogError::NoRing),
            (None, _) => Method::Bitmap(BitmapLog::enable(vm, hot_harvests)?),
        };
        let log = DirtyLog { slots, method };
        tracing::info!(
            dirty_tracking = %log.method(),
            asked = ?tracking,
            ring_entries = log.ring().map(|r| r.entries()),
            manual_dirty_protect = log.manual_protect(),
            hot_harvests = log.hot_harvests(),
            "dirty page tracking"
        );
        Ok(log)
    }

    /// Maps the vCPUs' rings (ring method; nothing to do otherwise). Call
    /// once, with every vCPU of the VM, before they first run.
    pub fn attach_vcpus(&self, vcpus: &[VcpuFd]) -> Result<(), DirtyLogError> {
        if let Method::Ring(ring) = &self.method {
            ring.attach_vcpus(vcpus)?;
        }
        Ok(())
    }

    /// The rings, for the vCPU threads to empty when one fills up.
    pub(crate) fn ring(&self) -> Option<&Arc<RingLog>> {
        match &self.method {
            Method::Ring(ring) => Some(ring),
            Method::Bitmap(_) => None,
        }
    }

    /// How many times a vCPU found its ring full (0 with the bitmap).
    pub fn ring_full_exits(&self) -> u64 {
        self.ring().map_or(0, |r| r.full_exits())
    }

    pub fn method(&self) -> DirtyMethod {
        match self.method {
            Method::Bitmap(_) => DirtyMethod::Bitmap,
            Method::Ring(_) => DirtyMethod::Ring,
        }
    }

    /// Whether KVM's manual protect mode is on (bitmap method only).
    pub fn manual_protect(&self) -> bool {
        match &self.method {
            Method::Bitmap(log) => log.manual_protect(),
            Method::Ring(_) => false,
        }
    }

    /// How many harvests a page the guest keeps writing stays writable
    /// (bitmap with manual protect; 0 otherwise).
    pub fn hot_harvests(&self) -> u32 {
        match &self.method {
            Method::Bitmap(log) => log.hot_harvests(),
            Method::Ring(_) => 0,
        }
    }

    /// Takes the pages written since the previous harvest (by the guest's
    /// CPUs or the VMM) and re-arms tracking. Exact when the vCPUs are
    /// paused, but for hot pages (see [`DirtyLog::hot_harvests`]), which
    /// are reported whether written again or not.
    pub fn harvest(&self, vm: &VmFd, mem: &GuestMemoryMmap) -> Result<DirtyPages, DirtyLogError> {
        let mut guest = Vec::new();
        let (hot, guest_written) = match &self.method {
            Method::Bitmap(log) => log.harvest(vm, &self.slots, &mut guest)?,
            Method::Ring(ring) => {
                guest = ring.harvest()?;
                (0, guest.len() as u64)
            }
        };
        let mut vmm = Vec::new();
        for s in &self.slots {
            take_vmm_pages(mem, s, &mut vmm)?;
        }
        let written = guest_written + vmm.len() as u64;
        Ok(DirtyPages {
            hot,
            written,
            ..DirtyPages::merge(&guest, &vmm)
        })
    }
}

#[cfg(test)]
mod tests;
