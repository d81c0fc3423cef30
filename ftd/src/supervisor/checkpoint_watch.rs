//! A standby whose checkpoints stopped: at level FT a healthy primary
//! sends one at least every longest interval, busy guest or idle, and the
//! standby commits it, so a standby standing by at the same epoch for
//! [`STALLED_AFTER`] means either the primary's engine no longer
//! checkpoints (its A-link may still carry heartbeats, which have a thread
//! of their own, so no takeover comes, while the guest's output stays
//! held or the guest paused) or this standby cannot commit what it is sent
//! (its disk hangs, say). Said once, on the standby's node, and its end
//! too.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use replicator::level::Level;
use replicator::status::{FtState, Role, Status};

/// How long a standby's epoch may stand still at level FT before it is
/// said (or three heartbeat timeouts, if longer): far past any interval,
/// a first epoch's durable copy (the standby is still syncing then) or a
/// slow standby's (its epochs come slowly, but come).
pub(super) const STALLED_AFTER: Duration = Duration::from_secs(30);

/// What changed for a VM's standby.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Change {
    /// No checkpoint since `epoch`, for `for_s` seconds.
    Stalled { epoch: u64, for_s: u64 },
    /// Checkpoints come again (the last at `epoch`).
    Resumed { epoch: u64 },
    /// A standby said stalled left standing-by (`now`: its state): a
    /// session's end, a takeover or a level change says the rest.
    Left { now: FtState },
}

#[derive(Debug)]
struct Seen {
    epoch: u64,
    since: Instant,
    said: bool,
}

/// The last epoch each VM's standby stood at, and since when.
#[derive(Debug, Default)]
pub(super) struct CheckpointWatch(HashMap<String, Seen>);

impl CheckpointWatch {
    /// Takes `status` of `vm`'s role on this node at `now`; returns what
    /// is to be said. Only a standby standing by at level FT is watched;
    /// any other state forgets the VM (a takeover, a new session, a level
    /// change say themselves; a new standby process starts waiting or
    /// syncing, so an ended one's time is never carried over).
    pub(super) fn observe(&mut self, vm: &str, status: &Status, now: Instant) -> Option<Change> {
        let watched = status.role == Role::Standby
            && status.state == FtState::StandingBy
            && status.level == Level::Ft;
        if !watched {
            let said = self.0.remove(vm).is_some_and(|seen| seen.said);
            return said.then_some(Change::Left { now: status.state });
        }
        let seen = self.0.entry(vm.to_string()).or_insert(Seen {
            epoch: status.epoch,
            since: now,
            said: false,
        });
        if seen.epoch != status.epoch {
            let resumed = std::mem::take(&mut seen.said);
            seen.epoch = status.epoch;
            seen.since = now;
            return resumed.then_some(Change::Resumed {
                epoch: status.epoch,
            });
        }
        // A primary not heard for the heartbeat timeout ends the session
        // (the standby claims or waits): past three of them, it is heard.
        let bound = STALLED_AFTER.max(Duration::from_millis(
            status.heartbeat_timeout_ms.saturating_mul(3),
        ));
        let still = now.saturating_duration_since(seen.since);
        if !seen.said && still >= bound {
            seen.said = true;
            return Some(Change::Stalled {
                epoch: seen.epoch,
                for_s: still.as_secs(),
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standby(epoch: u64) -> Status {
        let mut s = replicator::status::StatusBoard::new("node-b", Role::Standby).snapshot();
        s.state = FtState::StandingBy;
        s.epoch = epoch;
        s
    }

    #[test]
    fn a_standby_whose_epoch_stands_still_is_said_once_and_its_end_too() {
        let mut watch = CheckpointWatch::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(watch.observe("vm1", &standby(10), at(0)), None);
        // Epochs moving: nothing to say, however long it runs.
        assert_eq!(watch.observe("vm1", &standby(11), at(20)), None);
        assert_eq!(watch.observe("vm1", &standby(12), at(45)), None);
        // The same epoch for less than the bound, then for the bound.
        assert_eq!(watch.observe("vm1", &standby(12), at(74)), None);
        assert_eq!(
            watch.observe("vm1", &standby(12), at(75)),
            Some(Change::Stalled {
                epoch: 12,
                for_s: 30
            })
        );
        // Said once.
        assert_eq!(watch.observe("vm1", &standby(12), at(200)), None);
        // Another VM is watched apart.
        assert_eq!(watch.observe("vm2", &standby(12), at(200)), None);
        // Checkpoints come again: said, once.
        assert_eq!(
            watch.observe("vm1", &standby(13), at(201)),
            Some(Change::Resumed { epoch: 13 })
        );
        assert_eq!(watch.observe("vm1", &standby(14), at(202)), None);
        // And may stall again.
        assert_eq!(
            watch.observe("vm1", &standby(14), at(232)),
            Some(Change::Stalled {
                epoch: 14,
                for_s: 30
            })
        );
    }

    #[test]
    fn only_a_standby_standing_by_at_level_ft_is_watched() {
        let mut watch = CheckpointWatch::default();
        let t0 = Instant::now();
        let later = t0 + STALLED_AFTER * 2;
        // A primary, a standby still syncing, an HA standby (its epochs
        // are disk writes: an idle guest sends none): never said.
        let mut primary = standby(5);
        primary.role = Role::Primary;
        primary.state = FtState::Protected;
        let mut syncing = standby(0);
        syncing.state = FtState::Syncing;
        let mut ha = standby(5);
        ha.level = Level::Ha;
        for status in [&primary, &syncing, &ha] {
            assert_eq!(watch.observe("vm1", status, t0), None);
            assert_eq!(watch.observe("vm1", status, later), None, "{status:?}");
        }
        // Leaving standing-by forgets the time: standing by again starts
        // it anew.
        assert_eq!(watch.observe("vm1", &standby(5), t0), None);
        assert_eq!(watch.observe("vm1", &syncing, t0), None);
        assert_eq!(watch.observe("vm1", &standby(5), later), None);
        assert!(watch
            .observe("vm1", &standby(5), later + STALLED_AFTER)
            .is_some());
        // Said stalled, then no longer standing by: its end is said once.
        let mut claiming = standby(5);
        claiming.state = FtState::Claiming;
        assert_eq!(
            watch.observe("vm1", &claiming, later + STALLED_AFTER),
            Some(Change::Left {
                now: FtState::Claiming
            })
        );
        assert_eq!(watch.observe("vm1", &claiming, later + STALLED_AFTER), None);
        // A long heartbeat timeout: three of them pass first.
        let mut patient = standby(7);
        patient.heartbeat_timeout_ms = 20_000;
        assert_eq!(watch.observe("vm3", &patient, t0), None);
        assert_eq!(
            watch.observe("vm3", &patient, t0 + Duration::from_secs(59)),
            None
        );
        assert!(watch
            .observe("vm3", &patient, t0 + Duration::from_secs(60))
            .is_some());
    }
}
