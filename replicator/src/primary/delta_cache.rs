//! The primary's delta cache: the content of each page as it last went to
//! the standby in this session, so that the next epoch can send the page
//! as a delta from it (see [`crate::protocol::delta`]) instead of whole.
//!
//! What makes a delta right is that the page it was made against is the
//! one the standby's replica holds when it applies it. The standby applies
//! epochs whole and in order, and a session that breaks takes its cache
//! with it (a cache lives in one session's epoch loop), so the cache holds
//! for each page what the epoch that last carried it gave the replica:
//! provided that every page an epoch carries goes through the cache. An
//! epoch sent without it (a switchover's final epoch) must be followed by
//! [`DeltaCache::clear`].
//!
//! The cache is bounded: past its size a page new to it pushes out the
//! page that came in first (a page written every epoch stays).
//!
//! It also keeps the last epoch's encoded checkpoint state, so that the
//! next epoch's can go as what changed since ([`DeltaCache::begin`]): the
//! standby holds that state once it assembled the epoch before.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use super::audit::DELTAS;
use crate::protocol::{
    Message, PageAudit, PageDeltaStager, PageStager, Picked, StagedPages, StateDelta, PAGE_SIZE,
};
use vmm::replication::PageSink;

/// The cache's size by default (`ftprotect --delta-cache-mib`).
pub const DEFAULT_DELTA_CACHE_MIB: u64 = 64;

/// What one epoch's pass over the cache gave.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeltaFigures {
    /// Pages sent as deltas.
    pub pages: u64,
    /// Bytes those deltas took (records included), against
    /// `pages * 4096` whole.
    pub bytes: u64,
    /// Of `pages`, those new to the cache sent as a delta from a page of
    /// zeros (mostly zeros: memory the guest just cleared).
    pub from_zero: u64,
}

pub struct DeltaCache {
    pages: HashMap<u64, Box<[u8]>>,
    /// Pages in the order they came in (the first to go when full).
    order: VecDeque<u64>,
    max_pages: usize,
    /// The state the last epoch carried.
    state: Option<Bytes>,
}

impl DeltaCache {
    /// A cache of `bytes` of pages; `None` for a size under one page
    /// (deltas off: every page goes whole).
    pub fn new(bytes: u64) -> Option<DeltaCache> {
        let max_pages = usize::try_from(bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX);
        (max_pages > 0).then(|| DeltaCache {
            pages: HashMap::new(),
            order: VecDeque::new(),
            max_pages,
            state: None,
        })
    }

    /// Forgets every page (the standby got pages that did not go through
    /// the cache).
    pub fn clear(&mut self) {
        self.pages.clear();
        self.order.clear();
        self.state = None;
    }

    /// The message that begins an epoch of state `state`: what changed
    /// since the last epoch's state where that is under half of it, else
    /// the state whole. Every epoch sent with the cache goes through here.
    pub fn begin(&mut self, state: Bytes) -> Message {
        let delta = self
            .state
            .as_ref()
            .and_then(|old| StateDelta::encode(old, &state, state.len() / 2));
        self.state = Some(state.clone());
        match delta {
            Some(delta) => Message::EpochStateDelta(delta),
            None => Message::EpochBegin(state),
        }
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// `staged` (whole pages, as the capture stages them) with each page
    /// the cache holds sent as a delta where that is short, each page new
    /// to it that is mostly zeros as a delta from a page of zeros, the rest
    /// whole; the cache then holds every page as `staged` has it. A batch
    /// none of whose pages the cache held and none mostly zeros goes on as
    /// it is (no copy).
    /// Up to [`DELTAS`] pages sent as deltas, from address `pivot` on,
    /// join `audit` (`(audit, pivot)`).
    pub fn encode(
        &mut self,
        staged: StagedPages,
        (audit, pivot): (&mut PageAudit, u64),
    ) -> (StagedPages, DeltaFigures) {
        let StagedPages {
            batches,
            deltas: none,
            count,
        } = staged;
        assert!(
            none.is_empty(),
            "every page an epoch carries goes through the cache"
        );
        let mut kept = Vec::new();
        let mut whole = PageStager::default();
        let mut deltas = PageDeltaStager::default();
        let mut audited = 0;
        let mut sparse = Vec::new();
        for batch in batches {
            if batch
                .records()
                .all(|(gpa, _)| !self.pages.contains_key(&gpa))
            {
                sparse.clear();
                for (gpa, data) in batch.records() {
                    sparse.push(self.take_new(gpa, data, &mut deltas));
                }
                if !sparse.contains(&true) {
                    kept.push(batch);
                    continue;
                }
                for ((gpa, data), &from_zero) in batch.records().zip(&sparse) {
                    if !from_zero {
                        whole.page_buffer(gpa).extend_from_slice(data);
                    }
                }
                continue;
            }
            for (gpa, data) in batch.records() {
                let sent_as_delta = match self.pages.get_mut(&gpa) {
                    Some(old) => match deltas.add(gpa, old, data) {
                        // Unchanged (a hot page not written again): the
                        // cache holds it already.
                        Some(0) => true,
                        delta => {
                            old.copy_from_slice(data);
                            // Changed in most of its words: whole, unless
                            // it is mostly zeros now (memory the guest
                            // cleared for reuse).
                            delta.is_some() || deltas.add_from_zero(gpa, data).is_some()
                        }
                    },
                    None => self.take_new(gpa, data, &mut deltas),
                };
                if !sent_as_delta {
                    whole.page_buffer(gpa).extend_from_slice(data);
                } else if audited < DELTAS && gpa >= pivot && audit.add(gpa, Picked::Delta, data) {
                    audited += 1;
                }
            }
        }
        let figures = DeltaFigures {
            pages: deltas.count(),
            bytes: deltas.bytes(),
            from_zero: deltas.from_zero(),
        };
        let mut out = whole.finish();
        kept.append(&mut out.batches);
        out.batches = kept;
        out.deltas = deltas.finish();
        out.count = count;
        (out, figures)
    }

    /// Takes page `gpa`, new to the cache, in; returns whether it went to
    /// `deltas` as a delta from a page of zeros (mostly zeros), else it
    /// goes whole.
    fn take_new(&mut self, gpa: u64, data: &[u8], deltas: &mut PageDeltaStager) -> bool {
        self.insert(gpa, data);
        deltas.add_from_zero(gpa, data).is_some()
    }

    fn insert(&mut self, gpa: u64, data: &[u8]) {
        if self.pages.len() >= self.max_pages {
            if let Some(first) = self.order.pop_front() {
                self.pages.remove(&first);
            }
        }
        self.pages.insert(gpa, data.into());
        self.order.push_back(gpa);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{delta, DeltaBase};

    fn staged(pages: &[(u64, Vec<u8>)]) -> StagedPages {
        let mut stager = PageStager::default();
        for (gpa, data) in pages {
            stager.page_buffer(*gpa).extend_from_slice(data);
        }
        stager.finish()
    }

    /// What a replica holds after `staged` is applied to `replica`.
    fn apply(replica: &mut HashMap<u64, Vec<u8>>, staged: &StagedPages) {
        for batch in &staged.batches {
            for (gpa, data) in batch.records() {
                replica.insert(gpa, data.to_vec());
            }
        }
        for batch in &staged.deltas {
            for r in batch.records() {
                let page = match r.base {
                    DeltaBase::Replica => replica
                        .get_mut(&r.gpa)
                        .expect("a delta of a page the replica holds"),
                    DeltaBase::Zero => {
                        let page = replica.entry(r.gpa).or_default();
                        *page = vec![0; PAGE_SIZE];
                        page
                    }
                };
                delta::apply(page, r.delta).unwrap();
            }
        }
    }

    #[test]
    fn pages_seen_before_go_as_deltas_and_the_replica_follows() {
        let mut cache = DeltaCache::new(1 << 20).unwrap();
        let mut replica = HashMap::new();
        let mut memory: Vec<Vec<u8>> = (1..9u8).map(|n| vec![n; PAGE_SIZE]).collect();
        let all = |memory: &Vec<Vec<u8>>| -> Vec<(u64, Vec<u8>)> {
            memory
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u64 * 4096, p.clone()))
                .collect()
        };
        let (first, figures) = cache.encode(staged(&all(&memory)), (&mut PageAudit::default(), 0));
        assert_eq!(
            figures,
            DeltaFigures::default(),
            "nothing seen yet: all whole"
        );
        assert_eq!(first.count, 8);
        apply(&mut replica, &first);
        for round in 1..5u8 {
            memory[1][round as usize] = round;
            memory[5][100 + round as usize] = round;
            memory[7].fill(round.wrapping_mul(37));
            let dirty: Vec<_> = [1usize, 5, 7]
                .iter()
                .map(|&i| (i as u64 * 4096, memory[i].clone()))
                .collect();
            let mut audit = PageAudit::default();
            // Page 1's delta is below the pivot: only page 5's is audited.
            let (out, figures) = cache.encode(staged(&dirty), (&mut audit, 2 * 4096));
            assert_eq!(out.count, 3);
            let audited: Vec<_> = audit.records().iter().map(|r| (r.gpa, r.picked)).collect();
            assert_eq!(audited, [(5 * 4096, Picked::Delta)]);
            assert_eq!(figures.pages, 2, "pages 1 and 5 as deltas, 7 changed whole");
            assert!(figures.bytes < 64, "{} bytes", figures.bytes);
            assert_eq!(out.batches.iter().map(|b| b.len()).sum::<usize>(), 1);
            apply(&mut replica, &out);
            for r in audit.records() {
                assert_eq!(
                    crate::protocol::audit::page_sum(&replica[&r.gpa]),
                    r.sum,
                    "the audit sums the page as the replica holds it"
                );
            }
            for (i, page) in memory.iter().enumerate() {
                assert_eq!(
                    &replica[&(i as u64 * 4096)],
                    page,
                    "page {i} after round {round}"
                );
            }
        }
    }

    #[test]
    fn new_mostly_zero_pages_go_from_a_zero_page_and_the_replica_follows() {
        let mut cache = DeltaCache::new(1 << 20).unwrap();
        // The replica holds other contents than the guest's new pages.
        let mut replica: HashMap<u64, Vec<u8>> = (0..6u64)
            .map(|i| (i * 4096, vec![0xee; PAGE_SIZE]))
            .collect();
        let mut cleared = vec![0u8; PAGE_SIZE];
        cleared[64] = 1;
        let dense = vec![5u8; PAGE_SIZE];
        // A batch of new pages only, some mostly zeros; then one with a
        // page the cache holds and a new mostly-zero one.
        let first = [
            (0, cleared.clone()),
            (4096, dense.clone()),
            (8192, vec![0; PAGE_SIZE]),
        ];
        let (out, figures) = cache.encode(staged(&first), (&mut PageAudit::default(), 0));
        assert_eq!((figures.pages, figures.from_zero), (2, 2));
        assert_eq!(out.batches.iter().map(|b| b.len()).sum::<usize>(), 1);
        apply(&mut replica, &out);
        let mut written = dense.clone();
        written[0] = 6;
        let second = [(4096, written.clone()), (12288, cleared.clone())];
        let (out, figures) = cache.encode(staged(&second), (&mut PageAudit::default(), 0));
        assert_eq!((figures.pages, figures.from_zero), (2, 1));
        assert!(out.batches.is_empty(), "nothing whole");
        apply(&mut replica, &out);
        assert_eq!(replica[&0], cleared);
        assert_eq!(replica[&4096], written);
        assert_eq!(replica[&8192], vec![0; PAGE_SIZE]);
        assert_eq!(replica[&12288], cleared);
        // A page the cache holds, cleared by the guest: a delta from the
        // replica's version would be long, one from zeros is not.
        let (out, figures) = cache.encode(
            staged(&[(4096, cleared.clone())]),
            (&mut PageAudit::default(), 0),
        );
        assert_eq!((figures.pages, figures.from_zero), (1, 1));
        apply(&mut replica, &out);
        assert_eq!(replica[&4096], cleared);
        // A batch of new dense pages goes on whole, as it came.
        let (out, figures) = cache.encode(
            staged(&[(16384, dense.clone()), (20480, dense)]),
            (&mut PageAudit::default(), 0),
        );
        assert_eq!(figures, DeltaFigures::default());
        assert_eq!(out.batches.len(), 1);
    }

    #[test]
    fn a_full_cache_pushes_out_its_oldest_page_and_a_cleared_one_starts_over() {
        let mut cache = DeltaCache::new(2 * PAGE_SIZE as u64).unwrap();
        let page = vec![1u8; PAGE_SIZE];
        cache.encode(
            staged(&[(0, page.clone()), (4096, page.clone())]),
            (&mut PageAudit::default(), 0),
        );
        cache.encode(
            staged(&[(8192, page.clone())]),
            (&mut PageAudit::default(), 0),
        );
        assert_eq!(cache.len(), 2);
        let (_, figures) =
            cache.encode(staged(&[(0, page.clone())]), (&mut PageAudit::default(), 0));
        assert_eq!(figures.pages, 0, "page 0 was pushed out: whole");
        let (_, figures) = cache.encode(
            staged(&[(8192, page.clone())]),
            (&mut PageAudit::default(), 0),
        );
        assert_eq!(figures.pages, 1, "page 8192 stayed: a delta (empty)");
        cache.clear();
        assert!(cache.is_empty());
        let (_, figures) = cache.encode(staged(&[(8192, page)]), (&mut PageAudit::default(), 0));
        assert_eq!(figures.pages, 0);
        assert!(
            DeltaCache::new(PAGE_SIZE as u64 - 1).is_none(),
            "under a page: off"
        );
    }

    #[test]
    fn a_state_goes_whole_first_and_after_a_clear_and_as_a_delta_between() {
        let mut cache = DeltaCache::new(1 << 20).unwrap();
        let is_delta = |m: &Message| matches!(m, Message::EpochStateDelta(_));
        let mut state = vec![3u8; 6000];
        assert!(!is_delta(&cache.begin(Bytes::from(state.clone()))));
        state[10] = 4;
        let second = cache.begin(Bytes::from(state.clone()));
        assert!(is_delta(&second));
        let Message::EpochStateDelta(d) = second else {
            unreachable!()
        };
        assert_eq!(
            d.apply(&vec![3u8; 6000]).unwrap(),
            Bytes::from(state.clone())
        );
        cache.clear();
        assert!(!is_delta(&cache.begin(Bytes::from(state.clone()))));
        // Changed in most of its words: whole.
        assert!(!is_delta(&cache.begin(Bytes::from(vec![9u8; 6000]))));
    }
}
