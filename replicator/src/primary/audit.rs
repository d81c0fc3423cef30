//! The primary's side of the page audit ([`crate::protocol::audit`]):
//! which pages each epoch's audit names, summed while the guest is
//! stopped, so that the sums are of the checkpoint's instant.
//!
//! - Pages the epoch before carried and this one does not: a page the
//!   guest keeps writing whose write this epoch the dirty log missed
//!   shows there (the replica keeps the version of the epoch before).
//! - A few pages anywhere: drift anywhere else, found in time.
//! - Pages this epoch sends as deltas (summed from the staged copy when
//!   the delta is made): a delta made against another version than the
//!   replica's.

use vmm::vm::Vm;

use crate::protocol::{PageAudit, Picked, PAGE_SIZE};

/// Pages of each kind an epoch's audit names, at most.
const RECENT: usize = 16;
const RANDOM: usize = 4;
pub const DELTAS: usize = 16;

/// Picks and sums each epoch's audited pages.
pub struct AuditPicker {
    /// The pages the epoch before carried (ascending page numbers).
    last: Vec<u64>,
    rng: u64,
}

impl AuditPicker {
    pub fn new() -> AuditPicker {
        let mut seed = [0u8; 8];
        // A fixed seed if the system has no randomness to give: the audit
        // still works, it only picks the same way each session.
        let _ = getrandom::fill(&mut seed);
        AuditPicker {
            last: Vec::new(),
            rng: u64::from_le_bytes(seed) | 1,
        }
    }

    /// xorshift64*: cheap, and good enough to spread the picks.
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// An address from which the delta pages to audit are taken (so that
    /// not always the same low pages are).
    pub fn delta_pivot(&mut self, guest_bytes: u64) -> u64 {
        let pages = (guest_bytes / PAGE_SIZE as u64).max(1);
        (self.next() % pages) * PAGE_SIZE as u64
    }

    /// The audit of the checkpoint that carries the pages numbered
    /// `carried` (the harvest's, ascending), and how many of those pages
    /// the checkpoint before carried too; the guest must be stopped (its
    /// memory is read as the checkpoint has it). A page that cannot be
    /// read is left out.
    pub fn pick(&mut self, vm: &Vm, carried: Vec<u64>) -> (PageAudit, u64) {
        let mut audit = PageAudit::default();
        let mut page = vec![0u8; PAGE_SIZE];
        let recent = not_in(&self.last, &carried);
        let repeats = (self.last.len() - recent.len()) as u64;
        if !recent.is_empty() {
            // Spread over the candidates, from a random start.
            let step = recent.len().div_ceil(RECENT).max(1);
            let start = (self.next() % step as u64) as usize;
            for &n in recent.iter().skip(start).step_by(step).take(RECENT) {
                let gpa = n * PAGE_SIZE as u64;
                if vm.read_memory(gpa, &mut page).is_ok() {
                    audit.add(gpa, Picked::Recent, &page);
                }
            }
        }
        let pages = vm.guest_pages();
        for _ in 0..RANDOM {
            if pages == 0 {
                break;
            }
            let gpa = (self.next() % pages) * PAGE_SIZE as u64;
            if vm.read_memory(gpa, &mut page).is_ok() {
                audit.add(gpa, Picked::Random, &page);
            }
        }
        self.last = carried;
        (audit, repeats)
    }
}

impl Default for AuditPicker {
    fn default() -> Self {
        AuditPicker::new()
    }
}

/// The entries of `a` not in `b` (both ascending).
fn not_in(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut j = 0;
    for &x in a {
        while j < b.len() && b[j] < x {
            j += 1;
        }
        if j == b.len() || b[j] != x {
            out.push(x);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_of_the_epoch_before_not_in_this_one() {
        assert_eq!(not_in(&[1, 2, 3, 5, 8], &[2, 3, 4, 8, 9]), vec![1, 5]);
        assert_eq!(not_in(&[], &[1]), Vec::<u64>::new());
        assert_eq!(not_in(&[4, 6], &[]), vec![4, 6]);
    }

    #[test]
    fn delta_pivots_are_page_aligned_inside_memory() {
        let mut picker = AuditPicker::new();
        for _ in 0..1000 {
            let pivot = picker.delta_pivot(64 << 20);
            assert_eq!(pivot % PAGE_SIZE as u64, 0);
            assert!(pivot < 64 << 20);
        }
    }
}
