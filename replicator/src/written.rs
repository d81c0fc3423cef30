//! Resynchronisation by written maps (DRBD's quick-sync bitmap and
//! activity log): each node keeps, per disk, a [`WrittenMap`] of the
//! extents its disk may hold differently from the last point both copies
//! matched (the common point, a random id both maps carry). A node sets an
//! extent durably before it writes there: the primary for its guest's
//! writes, the standby for an epoch it applies. The primary clears extents
//! whose writes the standby acknowledged ([`crate::primary`]); the standby
//! clears them once its disks are synced ([`crate::standby`]).
//!
//! When the two meet again and their maps name the same common point, the
//! chunks outside the extents either map names are the same on both: the
//! standby digests only the chunks inside them, and the primary reads and
//! compares only those. A map that names another common point (or none: a
//! new disk, a copy that was under way, a damaged map) gets the whole-disk
//! comparison ([`crate::content`]) and the log says why.
//!
//! The session's first epoch, once durable on the standby, is the new
//! common point ([`crate::protocol::SyncPlan::next_common`]): each side
//! names it in its map on its own, and only a pair of maps that both did
//! is trusted.

use std::sync::Arc;
use std::time::Duration;

pub use vmm::replication::written_map::Extents;
use vmm::replication::written_map::{CommonId, WrittenMap, EXTENT_BYTES};

use crate::content::DISK_CHUNK;
use crate::protocol::WrittenPlan;

/// How often a node clears the extents not written since its last sweep
/// and held by the other copy: an extent written often stays set (no
/// durable write of the map each time it is written again).
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Content chunks per extent of the map.
pub const CHUNKS_PER_EXTENT: u64 = EXTENT_BYTES / DISK_CHUNK as u64;

/// A fresh common point.
pub fn random_common() -> Result<CommonId, getrandom::Error> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id)?;
    Ok(id)
}

/// As 32 hex digits.
pub fn common_to_hex(id: CommonId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The common point of 32 hex digits (`None` for anything else).
pub fn common_from_hex(hex: &str) -> Option<CommonId> {
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}

/// What the plan says of a disk's map.
pub fn plan_of(map: &WrittenMap) -> WrittenPlan {
    WrittenPlan {
        common: map.common().map(common_to_hex),
        extents: map
            .written()
            .into_iter()
            .map(|r| (r.start, r.end))
            .collect(),
    }
}

/// The extents of a plan's map, if they are well formed: ranges in order,
/// not empty, not overlapping, inside a disk of `extents` extents.
pub fn plan_extents(plan: &WrittenPlan, extents: u64) -> Option<Vec<Extents>> {
    let mut end = 0;
    let mut out = Vec::with_capacity(plan.extents.len());
    for &(start, stop) in &plan.extents {
        if start < end || stop <= start || stop > extents {
            return None;
        }
        end = stop;
        out.push(start..stop);
    }
    Some(out)
}

/// The extents in `a` or `b` (each in order), in order and merged.
pub fn union(a: &[Extents], b: &[Extents]) -> Vec<Extents> {
    let mut all: Vec<Extents> = a.iter().chain(b).cloned().collect();
    all.sort_by_key(|r| r.start);
    let mut out: Vec<Extents> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The content chunks (of a disk of `disk_bytes`) that `extents` cover.
pub fn chunks_of(extents: &[Extents], disk_bytes: u64) -> Vec<std::ops::Range<u64>> {
    let chunks = crate::content::disk_chunks(disk_bytes);
    extents
        .iter()
        .map(|r| (r.start * CHUNKS_PER_EXTENT).min(chunks)..(r.end * CHUNKS_PER_EXTENT).min(chunks))
        .filter(|r| !r.is_empty())
        .collect()
}

/// Why a kept disk is compared whole instead of by the written maps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotByMap {
    #[error("the primary keeps no written map of it")]
    NoPrimaryMap,
    #[error("this node's written map names no common point (new, or a copy was under way)")]
    NoCommonHere,
    #[error("the primary's written map names no common point")]
    NoCommonThere,
    #[error("the written maps name different common points (here {here}, the primary {there})")]
    Different { here: String, there: String },
    #[error("the primary's written map in the plan is malformed")]
    Malformed,
}

/// Why a kept disk is compared whole instead of by the maps, if it is.
pub fn why_not_by_map(own: Option<CommonId>, primary: Option<&WrittenPlan>) -> Option<NotByMap> {
    let Some(primary) = primary else {
        return Some(NotByMap::NoPrimaryMap);
    };
    let Some(own) = own else {
        return Some(NotByMap::NoCommonHere);
    };
    match primary.common.as_deref().and_then(common_from_hex) {
        None => Some(NotByMap::NoCommonThere),
        Some(theirs) if theirs != own => Some(NotByMap::Different {
            here: common_to_hex(own),
            there: common_to_hex(theirs),
        }),
        Some(_) => None,
    }
}

/// The maps of a VM's disks, in device order (`None`: a disk without one).
pub type Maps = Vec<Option<Arc<WrittenMap>>>;

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // ranges of extents
mod tests {
    use super::*;

    #[test]
    fn a_common_point_round_trips_through_hex() {
        let id = random_common().unwrap();
        assert_eq!(common_from_hex(&common_to_hex(id)), Some(id));
        assert_eq!(common_from_hex("00"), None);
        assert_eq!(common_from_hex(&format!("+f{}", "00".repeat(15))), None);
        assert_eq!(common_from_hex(&"g0".repeat(16)), None);
    }

    #[test]
    fn union_merges_and_plans_are_checked() {
        assert_eq!(
            union(&[0..2, 8..9], &[1..4, 9..10, 20..21]),
            vec![0..4, 8..10, 20..21]
        );
        assert_eq!(union(&[], &[]), Vec::<Extents>::new());
        let plan = |e: Vec<(u64, u64)>| WrittenPlan {
            common: None,
            extents: e,
        };
        assert_eq!(
            plan_extents(&plan(vec![(0, 2), (3, 4)]), 4),
            Some(vec![0..2, 3..4])
        );
        assert_eq!(
            plan_extents(&plan(vec![(3, 4), (0, 2)]), 4),
            None,
            "out of order"
        );
        assert_eq!(plan_extents(&plan(vec![(0, 0)]), 4), None, "empty");
        assert_eq!(plan_extents(&plan(vec![(0, 5)]), 4), None, "past the disk");
    }

    #[test]
    fn extents_cover_their_chunks_up_to_the_disks_end() {
        let disk = 2 * EXTENT_BYTES + 3 * DISK_CHUNK as u64;
        assert_eq!(
            chunks_of(&[1..3], disk),
            vec![CHUNKS_PER_EXTENT..2 * CHUNKS_PER_EXTENT + 3]
        );
    }

    #[test]
    fn only_maps_of_the_same_common_point_are_trusted() {
        let plan = |c: Option<CommonId>| WrittenPlan {
            common: c.map(common_to_hex),
            extents: vec![],
        };
        assert_eq!(
            why_not_by_map(Some([1; 16]), Some(&plan(Some([1; 16])))),
            None
        );
        for (own, theirs) in [
            (Some([1; 16]), Some(plan(Some([2; 16])))),
            (None, Some(plan(Some([1; 16])))),
            (Some([1; 16]), Some(plan(None))),
            (Some([1; 16]), None),
        ] {
            assert!(why_not_by_map(own, theirs.as_ref()).is_some());
        }
    }
}
