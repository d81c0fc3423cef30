//! Dirty pages from KVM's dirty bitmap: `KVM_GET_DIRTY_LOG` per slot, with
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` so reading the log and
//! re-protecting the pages are separate steps (`KVM_CLEAR_DIRTY_LOG`).
//! Every harvest reads one bit per page of every slot, so its cost grows
//! with the guest's memory; the fallback where KVM has no dirty ring.
//!
//! With manual protect, a page the guest writes in two harvests in a row
//! is left writable (its bit is not cleared, so every harvest reports it)
//! for up to [`HOT_HARVESTS`] harvests: the guest does not take a write
//! fault for it at each epoch. Kernel stacks, timer and scheduler data are
//! written at every epoch; under nested virtualisation each fault is two
//! world switches. A harvest then reports a superset of the pages written:
//! a hot page that was not written again is copied for nothing (and goes
//! as an empty delta). The hot pages of one word in every
//! [`HOT_HARVESTS`] are re-protected at each harvest, so a page that has
//! gone cold stops being reported, and one still hot becomes hot again
//! after its next write.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use std::sync::Mutex;

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

/// What manual protect is turned on with.
const MANUAL_PROTECT_FLAGS: u32 = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;

/// Words a harvest looks at together to skip those with no page.
const SKIP_WORDS: usize = 8;

/// How many harvests a hot page stays writable at most (the default).
pub const HOT_HARVESTS: u32 = 16;

/// KVM's dirty bitmap of a VM.
#[derive(Debug)]
pub(super) struct BitmapLog {
    /// Whether KVM's manual protect mode is on (otherwise GET also clears).
    manual_protect: bool,
    /// How many harvests a hot page stays writable at most; 0 re-protects
    /// every reported page at each harvest (the log is then exact).
    hot_harvests: u32,
    hot: Mutex<HotPages>,
}

/// The pages left writable, by slot (in the order of the harvest's slots).
#[derive(Debug, Default)]
struct HotPages {
    harvests: u64,
    slots: Vec<SlotBits>,
}

/// One slot's bits, a word per 64 pages.
#[derive(Debug, Default)]
struct SlotBits {
    /// What the previous harvest reported.
    reported: Vec<u64>,
    /// Pages left writable (their bits still set in KVM's log).
    hot: Vec<u64>,
    /// Scratch: the pages this harvest re-protects.
    clear: Vec<u64>,
}

impl SlotBits {
    /// Chooses, from the pages `now` reports, those to re-protect (left in
    /// `self.clear`) and those to leave writable, at harvest `harvest`,
    /// and appends the reported pages (numbered from `first_page`) to
    /// `out`. One pass, skipping runs of words with no page and none
    /// reported before (most of them) without a store: returns the words
    /// that have pages to protect, and how many pages stay hot.
    fn choose(
        &mut self,
        now: &[u64],
        harvest: u64,
        hot_harvests: u32,
        (first_page, out): (u64, &mut Vec<u64>),
    ) -> Chosen {
        let words = now.len();
        for v in [&mut self.reported, &mut self.hot, &mut self.clear] {
            v.resize(words, 0);
        }
        let period = hot_harvests as usize;
        // The words whose turn it is to retire their hot pages: those at
        // `retiring`, `retiring + period`, ...
        let retiring = if period == 0 {
            0
        } else {
            (harvest % u64::from(hot_harvests)) as usize
        };
        let mut chosen = Chosen::default();
        for run in (0..words).step_by(SKIP_WORDS) {
            let end = (run + SKIP_WORDS).min(words);
            // A hot page is a reported one (`hot` is within `reported`),
            // and `clear` is all 0 between harvests: a run where neither
            // the log nor the last harvest has a page has nothing to do.
            if now[run..end]
                .iter()
                .chain(&self.reported[run..end])
                .all(|&w| w == 0)
            {
                continue;
            }
            for (w, &now) in now.iter().enumerate().take(end).skip(run) {
                let was_hot = self.hot[w];
                let keep = if now == 0 || period == 0 || w % period == retiring {
                    // Nothing reported, this word's turn to retire its hot
                    // pages, or no pages are kept at all.
                    0
                } else {
                    // Still hot, or written in this harvest and the one
                    // before.
                    (was_hot | (now & self.reported[w])) & now
                };
                let clear = now & !keep;
                self.clear[w] = clear;
                self.hot[w] = keep;
                // The first harvest reports every page (KVM's log starts
                // all set): none of them was written twice.
                self.reported[w] = if harvest == 0 { 0 } else { now };
                if clear != 0 {
                    chosen.clear = Some(chosen.clear.map_or((w, w), |(first, _)| (first, w)));
                }
                chosen.hot += u64::from(keep.count_ones());
                chosen.written += u64::from((now & !was_hot).count_ones());
                push_set_bits(first_page + w as u64 * 64, &[now], out);
            }
        }
        chosen
    }
}

/// What [`SlotBits::choose`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Chosen {
    /// The first and the last word with pages to protect again.
    clear: Option<(usize, usize)>,
    /// How many pages stay writable.
    hot: u64,
    /// How many reported pages were protected since the last harvest, so
    /// written for certain (the others were hot: written or not).
    written: u64,
}

impl BitmapLog {
    /// Turns on manual protect with every page initially dirty, where KVM
    /// has it (before the slots are created).
    pub(super) fn enable(vm: &VmFd, hot_harvests: u32) -> Result<BitmapLog, BitmapError> {
        let manual_protect = Self::has_manual_protect(vm);
        if manual_protect {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = u64::from(MANUAL_PROTECT_FLAGS);
            vm.enable_cap(&cap)
                .map_err(BitmapError::EnableManualProtect)?;
        }
        Ok(BitmapLog {
            manual_protect,
            hot_harvests: if manual_protect { hot_harvests } else { 0 },
            hot: Mutex::new(HotPages::default()),
        })
    }

    /// Whether this KVM has manual protect with every page initially
    /// dirty (the capability reports the set of flags it supports).
    pub(super) fn has_manual_protect(vm: &VmFd) -> bool {
        let supported =
            vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
        supported > 0 && (supported as u32) & MANUAL_PROTECT_FLAGS == MANUAL_PROTECT_FLAGS
    }

    /// How many harvests a hot page stays writable at most (0: none is).
    pub(super) fn hot_harvests(&self) -> u32 {
        self.hot_harvests
    }

    pub(super) fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// Reads and re-arms the log of every slot; appends the dirty pages
    /// (ascending, as `slots` are). Returns how many of them it left
    /// writable (hot), and how many were written for certain (the others
    /// were hot before: writable, so written again or not).
    pub(super) fn harvest(
        &self,
        vm: &VmFd,
        slots: &[Slot],
        out: &mut Vec<u64>,
    ) -> Result<(u64, u64), BitmapError> {
        let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
        let harvest = hot.harvests;
        hot.harvests += 1;
        hot.slots.resize_with(slots.len(), SlotBits::default);
        let (mut hot_pages, mut written) = (0, 0);
        for (s, bits) in slots.iter().zip(hot.slots.iter_mut()) {
            let bytes = s.pages as usize * PAGE_SIZE;
            let now = vm
                .get_dirty_log(s.slot, bytes)
                .map_err(|source| BitmapError::Get {
                    slot: s.slot,
                    source,
                })?;
            if self.manual_protect {
                let chosen = bits.choose(&now, harvest, self.hot_harvests, (s.first_page(), out));
                if let Some((first, last)) = chosen.clear {
                    clear(vm, s, &mut bits.clear, (first, last))?;
                    bits.clear[first..=last].fill(0);
                }
                hot_pages += chosen.hot;
                written += chosen.written;
            } else {
                let before = out.len();
                push_set_bits(s.first_page(), &now, out);
                written += (out.len() - before) as u64;
            }
        }
        Ok((hot_pages, written))
    }
}

/// At most this many words (64 pages each: 16 MiB of guest) are
/// re-protected in one `KVM_CLEAR_DIRTY_LOG`. KVM holds its MMU lock for
/// the whole of a call, without yielding the CPU: on one CPU, a call over
/// a whole large guest (the first harvest, every page reported) would
/// keep the A-link's heartbeat thread off it long enough to look like a
/// silence. Between calls the scheduler may run it.
const CLEAR_WORDS_PER_CALL: usize = 64;

/// A re-protection slower than this is logged.
const SLOW_CLEAR: std::time::Duration = std::time::Duration::from_millis(20);

/// Write-protects again the pages set in `bits` (a word per 64 pages of
/// the slot) from word `first` to word `last`, [`CLEAR_WORDS_PER_CALL`]
/// words a call.
fn clear(
    vm: &VmFd,
    s: &Slot,
    bits: &mut [u64],
    (first, last): (usize, usize),
) -> Result<(), BitmapError> {
    let started = std::time::Instant::now();
    let mut calls = 0u32;
    let mut word = first;
    while word <= last {
        let end = (word + CLEAR_WORDS_PER_CALL - 1).min(last);
        if bits[word..=end].iter().any(|&w| w != 0) {
            clear_span(vm, s, bits, (word, end))?;
            calls += 1;
        }
        word = end + 1;
    }
    let took = started.elapsed();
    if took > SLOW_CLEAR {
        tracing::info!(
            slot = s.slot,
            words = last + 1 - first,
            calls,
            took_ms = took.as_millis() as u64,
            "re-protecting dirty pages took long"
        );
    }
    Ok(())
}

/// One `KVM_CLEAR_DIRTY_LOG`: the pages set in words `first..=last`.
fn clear_span(
    vm: &VmFd,
    s: &Slot,
    bits: &mut [u64],
    (first, last): (usize, usize),
) -> Result<(), BitmapError> {
    let first_page = first as u64 * 64;
    // KVM takes a multiple of 64 pages, or a span to the slot's end.
    let end_page = ((last as u64 + 1) * 64).min(s.pages);
    let words = &mut bits[first..=last];
    let clear = kvm_clear_dirty_log {
        slot: s.slot,
        num_pages: (end_page - first_page) as u32,
        first_page,
        __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: words.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `clear` points at `words`, one bit for each of its
    // `num_pages` pages (a word per 64, rounded up), alive for the call.
    let rc = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if rc < 0 {
        return Err(BitmapError::Clear {
            slot: s.slot,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What KVM's log holds at each harvest: the pages written since the
    /// last clear, and the pages left writable (never cleared).
    struct Kvm {
        bits: Vec<u64>,
        /// What the last harvest protected again.
        cleared: Vec<u64>,
    }

    impl Kvm {
        fn new(words: usize) -> Kvm {
            Kvm {
                bits: vec![0; words],
                cleared: Vec::new(),
            }
        }

        fn harvest(&mut self, slot: &mut SlotBits, written: u64, harvest: u64, hot: u32) -> u64 {
            self.bits[1] |= written;
            let now = self.bits.clone();
            let mut reported = Vec::new();
            let chosen = slot.choose(&now, harvest, hot, (0, &mut reported));
            let mut expected = Vec::new();
            push_set_bits(0, &now, &mut expected);
            assert_eq!(reported, expected, "every page KVM reported, in order");
            let (first, last) = chosen.clear.unwrap_or((1, 0));
            for (w, (bit, clear)) in self.bits.iter_mut().zip(&slot.clear).enumerate() {
                assert!(
                    *clear == 0 || (first..=last).contains(&w),
                    "a word to protect outside the span"
                );
                *bit &= !clear;
            }
            self.cleared = slot.clear.clone();
            slot.clear.fill(0);
            assert_eq!(chosen.hot, slot.hot_pages());
            now[1]
        }
    }

    impl SlotBits {
        fn hot_pages(&self) -> u64 {
            self.hot.iter().map(|w| u64::from(w.count_ones())).sum()
        }
    }

    #[test]
    fn without_hot_pages_every_reported_page_is_protected_again() {
        let mut slot = SlotBits::default();
        let mut kvm = Kvm::new(4);
        for harvest in 0..6 {
            assert_eq!(kvm.harvest(&mut slot, 0b11, harvest, 0), 0b11);
            assert_eq!(kvm.cleared[1], 0b11);
            assert_eq!(slot.hot_pages(), 0);
        }
        assert_eq!(kvm.harvest(&mut slot, 0, 6, 0), 0, "exact: nothing written");
    }

    #[test]
    fn a_page_written_twice_in_a_row_stays_writable_until_its_word_retires() {
        const HOT: u32 = 4;
        let mut slot = SlotBits::default();
        let mut kvm = Kvm::new(4);
        // Word 1 retires at harvests 1, 5, 9, ...
        assert_eq!(kvm.harvest(&mut slot, 0b1, 2, HOT), 0b1);
        assert_eq!(kvm.cleared[1], 0b1, "written once: protected again");
        assert_eq!(kvm.harvest(&mut slot, 0b11, 3, HOT), 0b11);
        assert_eq!(
            kvm.cleared[1], 0b10,
            "page 0 written twice in a row: left writable"
        );
        assert_eq!(slot.hot_pages(), 1);
        // Not written again: still reported (its bit stays set) until word
        // 1's turn to retire.
        assert_eq!(kvm.harvest(&mut slot, 0, 4, HOT), 0b1);
        assert_eq!(kvm.cleared[1], 0);
        assert_eq!(kvm.harvest(&mut slot, 0, 5, HOT), 0b1);
        assert_eq!(kvm.cleared[1], 0b1, "retired");
        assert_eq!(slot.hot_pages(), 0);
        assert_eq!(
            kvm.harvest(&mut slot, 0, 6, HOT),
            0,
            "gone cold: not reported"
        );
        // Written again twice: hot again.
        kvm.harvest(&mut slot, 0b1, 7, HOT);
        kvm.harvest(&mut slot, 0b1, 8, HOT);
        assert_eq!(slot.hot_pages(), 1);
        // A retired page that is written right after its retirement comes
        // back at once (it was reported at the retiring harvest).
        assert_eq!(kvm.harvest(&mut slot, 0b1, 9, HOT), 0b1);
        assert_eq!(slot.hot_pages(), 0);
        assert_eq!(kvm.harvest(&mut slot, 0b1, 10, HOT), 0b1);
        assert_eq!(slot.hot_pages(), 1);
    }

    #[test]
    fn a_hot_page_is_never_left_out_of_a_harvest() {
        const HOT: u32 = 3;
        let mut slot = SlotBits::default();
        let mut kvm = Kvm::new(2);
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for harvest in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let written = x & 0xffff;
            let reported = kvm.harvest(&mut slot, written, harvest, HOT);
            assert_eq!(reported & written, written, "harvest {harvest}");
            assert_eq!(slot.hot[1] & !reported, 0);
        }
    }

    /// The skipping pass chooses exactly what a plain pass over every word
    /// chooses, over many harvests of a 40-word slot written at random.
    #[test]
    fn skipping_empty_runs_chooses_what_a_plain_pass_chooses() {
        const WORDS: usize = 40;
        const HOT: u32 = 5;
        let mut slot = SlotBits::default();
        let mut kvm = vec![0u64; WORDS];
        let (mut hot, mut reported) = (vec![0u64; WORDS], vec![0u64; WORDS]);
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for harvest in 0..400 {
            // A few words written, some of them the same again and again.
            for _ in 0..next() % 6 {
                let w = (next() % 3) as usize * 13 + (next() % 2) as usize;
                kvm[w] |= 1 << (next() % 64);
            }
            if harvest == 0 {
                kvm.fill(u64::MAX);
            }
            let now = kvm.clone();
            let hot_before = hot.clone();
            let mut out = Vec::new();
            let chosen = slot.choose(&now, harvest, HOT, (4096, &mut out));
            let mut expected = Vec::new();
            push_set_bits(4096, &now, &mut expected);
            assert_eq!(out, expected, "harvest {harvest}: the reported pages");
            // The plain pass.
            let mut hot_count = 0;
            for w in 0..WORDS {
                let keep = if w as u64 % u64::from(HOT) == harvest % u64::from(HOT) {
                    0
                } else {
                    (hot[w] | (now[w] & reported[w])) & now[w]
                };
                assert_eq!(slot.clear[w], now[w] & !keep, "harvest {harvest} word {w}");
                assert_eq!(slot.hot[w], keep, "harvest {harvest} word {w}");
                hot[w] = keep;
                reported[w] = if harvest == 0 { 0 } else { now[w] };
                hot_count += u64::from(keep.count_ones());
                let in_span = chosen.clear.is_some_and(|(a, b)| (a..=b).contains(&w));
                assert!(slot.clear[w] == 0 || in_span, "harvest {harvest} word {w}");
                kvm[w] &= !slot.clear[w];
            }
            assert_eq!(chosen.hot, hot_count, "harvest {harvest}");
            let written: u64 = now
                .iter()
                .zip(&hot_before)
                .map(|(n, h)| u64::from((n & !h).count_ones()))
                .sum();
            assert_eq!(
                chosen.written, written,
                "harvest {harvest}: written for certain"
            );
            slot.clear.fill(0);
        }
    }
}
