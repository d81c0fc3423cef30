//! The primary's written maps in a session ([`crate::written`]): the
//! session's first acknowledged epoch makes them name the new common point
//! (keeping only the extents written since that epoch's checkpoint), and
//! later acknowledgements clear, every [`SWEEP_EVERY`], the extents not
//! written since the last sweep nor since the acknowledged checkpoint. A
//! write is noted before it is recorded (under the record's lock), and
//! every checkpoint and mirror batch takes a [`mark`] before it takes the
//! writes: an extent noted before an acknowledged epoch's mark was
//! written only in epochs up to it, which the standby holds (and notes in
//! its own map until they are durable).

use std::time::Instant;

use tracing::{info, warn};
use vmm::replication::written_map::{mark, CommonId};

use crate::written::{common_to_hex, plan_of, Maps, SWEEP_EVERY};

pub(super) struct Forgetter {
    maps: Maps,
    /// The common point of this session.
    common: CommonId,
    /// The maps were told to name it (the first epoch was acknowledged).
    named: bool,
    /// ... and all of them did.
    named_ok: bool,
    last_sweep: Instant,
    /// The clock at the last sweep.
    sweep_mark: u64,
}

impl Forgetter {
    pub(super) fn new(maps: Maps, common: CommonId) -> Forgetter {
        Forgetter {
            maps,
            common,
            named: false,
            named_ok: false,
            last_sweep: Instant::now(),
            sweep_mark: mark(),
        }
    }

    /// The session's maps, per disk.
    pub(super) fn maps(&self) -> &Maps {
        &self.maps
    }

    /// What the plan says of each disk's map, and the next common point.
    pub(super) fn plan(&self) -> (Vec<Option<crate::protocol::WrittenPlan>>, String) {
        let plans = self
            .maps
            .iter()
            .map(|m| m.as_deref().map(plan_of))
            .collect();
        (plans, common_to_hex(self.common))
    }

    /// The epoch whose writes were taken after `epoch_mark` is
    /// acknowledged.
    pub(super) fn acked(&mut self, epoch_mark: u64) {
        if !self.named {
            self.named = true;
            self.named_ok = true;
            for map in self.maps.iter().flatten() {
                match map.set_common(Some(self.common), epoch_mark) {
                    Ok(()) => info!(
                        map = %map.path().display(),
                        common = %common_to_hex(self.common),
                        written_extents = map.written_count(),
                        "written map: the standby holds this disk; a new common point"
                    ),
                    // The map then names no common point: the next
                    // resynchronisation compares the whole disk.
                    Err(error) => {
                        self.named_ok = false;
                        warn!(%error, "written map: the new common point could not be named")
                    }
                }
            }
            self.swept();
            return;
        }
        // A map that could not name the point keeps every extent set.
        if !self.named_ok || self.last_sweep.elapsed() < SWEEP_EVERY {
            return;
        }
        let before = epoch_mark.min(self.sweep_mark);
        for map in self.maps.iter().flatten() {
            if let Err(error) = map.forget_written_before(before) {
                warn!(%error, "written map: clearing held extents failed (they stay set)");
            }
        }
        self.swept();
    }

    fn swept(&mut self) {
        self.sweep_mark = mark();
        self.last_sweep = Instant::now();
    }
}
