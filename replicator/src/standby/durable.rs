//! The standby's written maps in a session ([`crate::written`]): every
//! epoch's writes are noted in the replica disk's map before they are
//! applied (the primary clears its own bits once the epoch is
//! acknowledged, so until they are durable here, this map keeps them).
//! The first committed epoch, once synced, is the session's common point;
//! later, every [`SWEEP_EVERY`], the disks are synced on a thread of their
//! own and the extents noted before the sync (and not since the last
//! sweep) are cleared.

use std::time::Instant;

use tracing::{info, warn};
use vmm::replication::written_map::{mark, CommonId};

use super::replica_disk::{ReplicaDisk, ReplicaDiskError};
use crate::protocol::DiskRecord;
use crate::written::{common_to_hex, SWEEP_EVERY};

pub(super) struct Durable {
    /// The common point the primary named for this session.
    next_common: Option<CommonId>,
    named: bool,
    /// The maps name the session's common point.
    named_ok: bool,
    last_sweep: Instant,
    /// The clock at the last sweep.
    sweep_mark: u64,
    sweeping: Option<std::thread::JoinHandle<()>>,
    /// Set when the session ends: a sweep still syncing then writes
    /// nothing (a promoted VM opens the same maps anew, and a stale copy
    /// of the bits must not overwrite its own). Held while a sweep clears.
    ended: std::sync::Arc<std::sync::Mutex<bool>>,
}

impl Drop for Durable {
    fn drop(&mut self) {
        // Waits for a clear under way (microseconds), not for a sync.
        *self.ended.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }
}

impl Durable {
    pub(super) fn new(next_common: Option<CommonId>) -> Durable {
        Durable {
            next_common,
            named: false,
            named_ok: false,
            last_sweep: Instant::now(),
            sweep_mark: mark(),
            sweeping: None,
            ended: Default::default(),
        }
    }

    /// Notes an epoch's writes in the maps, before they are applied.
    pub(super) fn note(
        disks: &[ReplicaDisk],
        writes: &[DiskRecord],
    ) -> Result<(), ReplicaDiskError> {
        if writes.is_empty() {
            return Ok(());
        }
        // One sync per disk at most, none when every extent is set
        // already; off the async workers (it may wait for the disk).
        crate::workers::off_the_workers(|| {
            for (index, disk) in disks.iter().enumerate() {
                let of_disk: Vec<(u64, u64)> = writes
                    .iter()
                    .filter(|w| w.disk as usize == index)
                    .map(|w| (w.offset, w.data.len() as u64))
                    .collect();
                disk.map().note_all(&of_disk).map_err(|e| disk.map_err(e))?;
            }
            Ok(())
        })
    }

    /// An epoch was applied and committed.
    pub(super) fn committed(&mut self, disks: &[ReplicaDisk]) {
        if !self.named {
            self.named = true;
            self.sweep_mark = mark();
            self.last_sweep = Instant::now();
            let Some(common) = self.next_common else {
                return;
            };
            // The copy and the first epoch are durable, then the maps
            // name the common point (with nothing set: this disk is the
            // primary's as of that checkpoint).
            let named = crate::workers::off_the_workers(|| -> Result<(), ReplicaDiskError> {
                let now = mark();
                for disk in disks {
                    disk.sync()?;
                }
                for disk in disks {
                    disk.map()
                        .set_common(Some(common), now)
                        .map_err(|e| disk.map_err(e))?;
                }
                Ok(())
            });
            self.named_ok = named.is_ok();
            match named {
                Ok(()) => info!(
                    common = %common_to_hex(common),
                    "written maps: the replica holds the primary's disks; a new common point"
                ),
                Err(error) => {
                    warn!(%error, "written maps: the new common point could not be named (the next resynchronisation compares whole disks)")
                }
            }
            return;
        }
        // Maps that could not name the session's point keep every extent
        // set (they count from an older point).
        if !self.named_ok
            || self.last_sweep.elapsed() < SWEEP_EVERY
            || self.sweeping.as_ref().is_some_and(|t| !t.is_finished())
        {
            return;
        }
        let now = mark();
        let before = now.min(self.sweep_mark);
        self.sweep_mark = now;
        self.last_sweep = Instant::now();
        let handles: Result<Vec<_>, _> = disks
            .iter()
            .map(|d| {
                // The disk's lock goes with them: the sweep writes the
                // map after the replica may be gone.
                Ok((
                    d.sync_handle()?,
                    std::sync::Arc::clone(d.map()),
                    d.path.clone(),
                    d.lock().clone(),
                ))
            })
            .collect();
        let handles = match handles {
            Ok(h) => h,
            Err(error) => {
                let error: ReplicaDiskError = error;
                warn!(%error, "written maps: no sweep (the extents stay set)");
                return;
            }
        };
        let ended = std::sync::Arc::clone(&self.ended);
        let spawned = std::thread::Builder::new()
            .name("written-sweep".into())
            .spawn(move || {
                for (file, _, path, _) in &handles {
                    if let Err(error) = file.sync_data() {
                        warn!(path = %path.display(), %error, "written maps: syncing the replica failed; the extents stay set");
                        return;
                    }
                }
                let ended = ended.lock().unwrap_or_else(|e| e.into_inner());
                if *ended {
                    return;
                }
                for (_, map, _, _) in &handles {
                    if let Err(error) = map.forget_written_before(before) {
                        warn!(%error, "written maps: clearing durable extents failed (they stay set)");
                    }
                }
            });
        match spawned {
            Ok(thread) => self.sweeping = Some(thread),
            Err(error) => warn!(%error, "written maps: no sweep thread (the extents stay set)"),
        }
    }
}
