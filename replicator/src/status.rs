//! What a node's FT process tells the world: its role and protection state,
//! the last committed epoch and the counters a user would graph. Served on
//! the control socket ([`crate::control`]) and logged on every change of
//! state.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// This node's role in the pair (serialized "primary" / "standby").
pub use ft_link::Role;

pub use crate::stats::{percentile, Samples};

/// The version of the [`Status`] format; bumped when a field changes
/// meaning or disappears (new fields may appear without a bump).
pub const STATUS_VERSION: u32 = 1;

/// Where a node's FT process stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FtState {
    /// The process has just started.
    Starting,
    /// Primary: the VM runs without a standby.
    Unprotected,
    /// Primary or standby: the initial synchronisation is under way.
    Syncing,
    /// Primary: checkpoints are committed on the standby.
    Protected,
    /// Standby: waiting for a primary.
    Waiting,
    /// Standby: applying the primary's checkpoints.
    StandingBy,
    /// Standby: the primary is lost; asking the witness for the next
    /// generation before taking over.
    Claiming,
    /// Standby: the primary is lost, the replica is being resumed.
    Promoting,
    /// Primary: neither the standby nor the witness can be reached; the
    /// guest is paused and its output held until one answers.
    Fenced,
    /// Primary: the witness says another node runs the VM at a newer
    /// generation; this copy stopped and its held output was dropped.
    Superseded,
    /// Primary: a planned switchover handed the VM to the standby (its
    /// final epoch acknowledged); this copy stopped, the process ends.
    SwitchedOver,
    /// The guest stopped; the process ends.
    Stopped,
    /// Something failed that the process cannot go on from.
    Failed,
}

impl FtState {
    pub const fn as_str(self) -> &'static str {
        match self {
            FtState::Starting => "starting",
            FtState::Unprotected => "unprotected",
            FtState::Syncing => "syncing",
            FtState::Protected => "protected",
            FtState::Waiting => "waiting",
            FtState::StandingBy => "standing-by",
            FtState::Claiming => "claiming",
            FtState::Promoting => "promoting",
            FtState::Fenced => "fenced",
            FtState::Superseded => "superseded",
            FtState::SwitchedOver => "switched-over",
            FtState::Stopped => "stopped",
            FtState::Failed => "failed",
        }
    }
}

impl FtCounters {
    /// Counts one checkpoint's guest stop in the histogram.
    pub fn observe_stop(&mut self, stop_us: u64) {
        if self.stop_us_buckets.len() != STOP_BUCKETS_US.len() + 1 {
            self.stop_us_buckets = vec![0; STOP_BUCKETS_US.len() + 1];
        }
        let i = STOP_BUCKETS_US
            .iter()
            .position(|&bound| stop_us <= bound)
            .unwrap_or(STOP_BUCKETS_US.len());
        self.stop_us_buckets[i] += 1;
        self.stop_us_sum += stop_us;
    }
}

impl fmt::Display for FtState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Upper bounds (µs) of the buckets of [`FtCounters::stop_us_buckets`];
/// a last bucket counts what is above them all.
pub const STOP_BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// Counters of checkpointing (primary) and applying (standby). Each field
/// missing from a status (an older engine's, or one relayed by an older
/// daemon) reads as zero.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FtCounters {
    pub checkpoints: u64,
    pub stop_us_p50: u64,
    pub stop_us_p99: u64,
    pub stop_us_max: u64,
    /// Checkpoints by guest stop time: entry i counts those that stopped
    /// the guest more than `STOP_BUCKETS_US[i-1]` and at most
    /// `STOP_BUCKETS_US[i]` µs; the last entry those above every bound.
    #[serde(default)]
    pub stop_us_buckets: Vec<u64>,
    /// The sum of all guest stop times (µs).
    #[serde(default)]
    pub stop_us_sum: u64,
    /// The interval planned after the last checkpoint, from its resume, by
    /// its cost to the guest (its stop, and the vCPUs' wait for the
    /// engine per checkpoint of late) and `max` from the checkpoint's
    /// start (output that waits brings the next checkpoint forward to
    /// `min` after it).
    pub interval_us_last: u64,
    /// How long the guest's vCPUs (on average) were ready to run but
    /// waited for a CPU while the rest of the engine's process (the
    /// engine, the VM's device threads) ran, summed over the epochs
    /// (primary): what the guest loses beyond its stops where they share
    /// too few cores.
    #[serde(default)]
    pub vcpu_waited_us_total: u64,
    pub dirty_pages_total: u64,
    pub dirty_pages_last: u64,
    /// Of the dirty pages, those the epoch before carried too (primary):
    /// the hot pages (below), which go with every epoch whether written or
    /// not, and pages the guest writes at every checkpoint, each a write
    /// fault per epoch once its page is protected again.
    #[serde(default)]
    pub dirty_repeat_pages_total: u64,
    /// Of the dirty pages, those the harvest left writable: hot pages (the
    /// guest wrote them in two epochs in a row), which take no write fault
    /// in the next epoch and go with it whether written or not (dirty
    /// bitmap only; 0 with the dirty ring).
    #[serde(default)]
    pub hot_pages_total: u64,
    #[serde(default)]
    pub hot_pages_last: u64,
    pub disk_writes_total: u64,
    pub alink_bytes_sent: u64,
    /// Bytes the primary's initial synchronisations sent (the copy that
    /// protects the VM again after a standby returns), the last one and
    /// in all.
    #[serde(default)]
    pub sync_sent_bytes_last: u64,
    #[serde(default)]
    pub sync_sent_bytes_total: u64,
    /// What the last initial synchronisation's memory and disk frames
    /// held before compression (`sync_sent_bytes_last` is what went on
    /// the A-link).
    #[serde(default)]
    pub sync_uncompressed_bytes_last: u64,
    /// Disk bytes the last initial synchronisation did not even read:
    /// the same on both nodes by the written maps ([`crate::written`]).
    #[serde(default)]
    pub sync_disk_unread_bytes_last: u64,
    /// Guest memory the last initial synchronisation did not read: the
    /// standby's RAM was labelled with a checkpoint this primary could
    /// bring forward by the pages written since ([`crate::memory_point`]).
    #[serde(default)]
    pub sync_memory_unread_bytes_last: u64,
    /// How long the last initial synchronisation's disk reads waited for
    /// the guest's writes (it yields half the disk to a writing guest).
    #[serde(default)]
    pub sync_yielded_ms_last: u64,
    /// How long the last initial synchronisation took: from its plan to
    /// the standby's acknowledgement of the first epoch, when it holds the
    /// whole copy (its rate: `sync_sent_bytes_last` over this).
    #[serde(default)]
    pub sync_ms_last: u64,
    /// Changes of the protection level while the VM ran (FT <-> HA).
    #[serde(default)]
    pub level_changes: u64,
    /// From the end of sending an epoch to its acknowledgement.
    pub ack_us_p50: u64,
    pub ack_us_p99: u64,
    /// Checkpoints that came later than planned because the standby had
    /// not acknowledged the previous one (the primary is throttled).
    pub throttled: u64,
    pub output_frames_released: u64,
    pub output_frames_held_now: u64,
    pub epochs_applied: u64,
    pub epochs_rejected: u64,
    pub failovers: u64,
    /// Planned switchovers: on a primary, the VM handed to the standby; on
    /// a promoted standby, the VM taken over from its primary that way.
    #[serde(default)]
    pub switchovers: u64,
    /// Switchovers asked of a primary that it called off (the witness
    /// could not release the VM); the reason is in `message`.
    #[serde(default)]
    pub switchovers_called_off: u64,
    /// Times the primary fenced itself (standby and witness unreachable).
    #[serde(default)]
    pub fences: u64,
    /// Claims the witness answered with "the primary is still heard".
    #[serde(default)]
    pub claims_refused: u64,
    /// Sessions that ended because the peer fell silent (neither a byte
    /// nor a pulse for the heartbeat timeout). Between two live nodes each
    /// one is a false silence.
    #[serde(default)]
    pub silence_ends: u64,
    /// Sessions the standby refused for a fault of its own (no space for
    /// the replica's disks, a failing disk); the reason is in `message`.
    #[serde(default)]
    pub standby_refusals: u64,
    /// Sessions the primary ended because the standby did not acknowledge
    /// an epoch within the deadline or stopped reading the A-link (its disk
    /// or host hangs): the VM went on unprotected instead of waiting for it.
    #[serde(default)]
    pub standby_drops: u64,
    /// Times the guest was paused while an acknowledgement was awaited:
    /// it ran too long past the checkpoint, or its disk writes since then
    /// passed the budget (the standby or the A-link falls behind).
    #[serde(default)]
    pub behind_pauses: u64,
    /// Milliseconds the guest spent in those pauses.
    #[serde(default)]
    pub behind_paused_ms: u64,
    /// Epochs sent and not yet acknowledged, now and at most so far.
    #[serde(default)]
    pub epochs_in_flight_now: u64,
    #[serde(default)]
    pub epochs_in_flight_max: u64,
    /// Bytes of the epochs in flight: what the A-link and the standby
    /// have yet to get through.
    #[serde(default)]
    pub epoch_backlog_bytes_now: u64,
    /// The rate the A-link and the standby get epochs through (each
    /// epoch's bytes over the time from when it could be served to its
    /// acknowledgement, smoothed); 0 until one is measured.
    #[serde(default)]
    pub epoch_service_bytes_per_s: u64,
    /// Dirty pages sent as deltas from the replica's version (the rest of
    /// `dirty_pages_total` went whole), and the bytes those deltas took
    /// (against 4096 per page whole); counted like `dirty_pages_total`,
    /// when the epoch is acknowledged.
    #[serde(default)]
    pub delta_pages_total: u64,
    #[serde(default)]
    pub delta_bytes_total: u64,
    /// Of `delta_pages_total`, pages new to the delta cache sent as a
    /// delta from a page of zeros (mostly zeros: memory the guest just
    /// cleared).
    #[serde(default)]
    pub zero_delta_pages_total: u64,
    /// Epochs whose checkpoint state went as what changed since the
    /// epoch before's (`EpochStateDelta`), not whole.
    #[serde(default)]
    pub state_deltas_total: u64,
    /// Consistency checks the standby made (`verify`), and those that found
    /// the replica different from the primary (must stay 0).
    #[serde(default)]
    pub oracle_checks: u64,
    #[serde(default)]
    pub oracle_mismatches: u64,
    /// Pages the standby checked against the primary's page audit of
    /// each epoch, and epochs refused because a page differed (must stay
    /// 0: each is a replica that drifted from its primary).
    #[serde(default)]
    pub audit_pages_total: u64,
    #[serde(default)]
    pub audit_mismatches: u64,
    /// Frames the guest received that the primary forwarded to the
    /// standby, and copies it dropped because the A-link fell behind.
    #[serde(default)]
    pub inbound_forwarded: u64,
    #[serde(default)]
    pub inbound_dropped: u64,
    /// Frames a promoted replica was given that its checkpoint had not
    /// received (the guest's peers did not have to send them again).
    #[serde(default)]
    pub inbound_replayed: u64,
    /// Of those, frames this node received itself while standing by
    /// (sent to the guest after the primary was lost, flooded here by the
    /// switch).
    #[serde(default)]
    pub inbound_overheard: u64,
}

#[cfg(test)]
mod histogram_tests {
    use super::*;

    #[test]
    fn stops_land_in_their_buckets() {
        let mut c = FtCounters::default();
        for us in [50, 100, 101, 2_000_000] {
            c.observe_stop(us);
        }
        assert_eq!(c.stop_us_buckets.len(), STOP_BUCKETS_US.len() + 1);
        assert_eq!(c.stop_us_buckets[0], 2);
        assert_eq!(c.stop_us_buckets[1], 1);
        assert_eq!(*c.stop_us_buckets.last().unwrap(), 1);
        assert_eq!(c.stop_us_sum, 2_000_251);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncProgress {
    pub phase: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes of the VM gone through per second so far (compared or sent).
    #[serde(default)]
    pub rate_bytes_per_s: u64,
    /// At that rate, seconds until the copy is through (none before a
    /// rate is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
}

/// Where the last takeover on this node spent its time (ms), from the
/// promoted engine's own clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeoverTimes {
    /// When the promoted guest started running.
    pub at_unix_ms: u64,
    /// The committed epoch it resumed from (level FT), or the mirror's.
    pub epoch: u64,
    /// A planned switchover (else the primary was lost, or handed its VM
    /// over).
    pub switchover: bool,
    /// From the primary's last bytes heard (on any path) to its loss
    /// being declared: the silence, or with a backup path the watch of it
    /// (none where the primary ended the session itself: a switchover, a
    /// handover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_ms: Option<u64>,
    /// From the session's end (the loss declared, a switchover, a
    /// handover) to the takeover being decided: the witness's grant; about
    /// 0 without a witness.
    pub claim_ms: u64,
    /// From then to the promoted guest running: the restore (or boot),
    /// the TAPs up, the announcement and handed-over output.
    pub promote_ms: u64,
    /// Of `promote_ms`, the VM's restore (level FT: its TAPs up and the
    /// overheard frames taken included) or boot (level HA).
    pub restore_ms: u64,
    /// From the primary's last bytes heard to the promoted guest running
    /// (with `detect_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// [`STATUS_VERSION`] of the process that made it.
    pub version: u32,
    pub node: String,
    pub role: Role,
    pub state: FtState,
    /// The last epoch the standby committed.
    pub epoch: u64,
    pub peer: Option<String>,
    /// Why the state last changed, when it was a failure.
    pub message: Option<String>,
    /// When the status last changed.
    pub updated_unix_ms: u64,
    /// When the state last changed (its own clock).
    #[serde(default)]
    pub state_since_unix_ms: u64,
    pub sync: Option<SyncProgress>,
    pub counters: FtCounters,
    /// The generation of the active copy this process runs or replicates.
    #[serde(default)]
    pub generation: u64,
    /// Where this process stands with the quorum witness (none: no
    /// witness is configured, the split-brain policy is the pair's own).
    #[serde(default)]
    pub witness: Option<String>,
    /// How the A-link of the current (or last) session is protected:
    /// sealed, or plaintext by the operator's choice (`--alink-plaintext`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alink: Option<String>,
    /// Primary: how the guest's dirty pages are found at each checkpoint:
    /// `ring` (KVM's dirty ring: the cost follows the pages written) or
    /// `bitmap` (the fallback: the cost grows with the guest's memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_tracking: Option<String>,
    /// The silence after which the peer is declared lost (ms).
    #[serde(default)]
    pub heartbeat_timeout_ms: u64,
    /// Standby: the last consistency check's verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oracle: Option<crate::oracle::Verdict>,
    /// The protection level: `ft` (checkpoints) or `ha` (the disks
    /// mirrored; epochs are batches of disk writes, no memory).
    #[serde(default)]
    pub level: crate::level::Level,
    /// Primary: a live migration of this HA VM to its standby is under
    /// way (the level is FT while memory is copied and the VM switches
    /// over; the new primary goes back to HA).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub migrating: bool,
    /// The last takeover this engine process made (a promoted standby;
    /// an engine started afresh has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_takeover: Option<TakeoverTimes>,
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The shared status of this node's FT process.
#[derive(Clone)]
pub struct StatusBoard {
    inner: Arc<Mutex<Status>>,
}

impl StatusBoard {
    pub fn new(node: &str, role: Role) -> StatusBoard {
        StatusBoard {
            inner: Arc::new(Mutex::new(Status {
                version: STATUS_VERSION,
                node: node.to_string(),
                role,
                state: FtState::Starting,
                epoch: 0,
                peer: None,
                message: None,
                updated_unix_ms: unix_ms(),
                state_since_unix_ms: unix_ms(),
                sync: None,
                counters: FtCounters::default(),
                generation: 0,
                witness: None,
                alink: None,
                dirty_tracking: None,
                heartbeat_timeout_ms: 0,
                level: crate::level::Level::Ft,
                migrating: false,
                oracle: None,
                last_takeover: None,
            })),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut s = self.inner.lock().expect("status lock");
        f(&mut s);
        s.updated_unix_ms = unix_ms();
    }

    /// Changes role/state (logged at once).
    pub fn set_state(&self, role: Role, state: FtState, message: Option<String>) {
        self.update(|s| {
            if (s.role, s.state) != (role, state) {
                s.state_since_unix_ms = unix_ms();
            }
            s.role = role;
            s.state = state;
            s.message = message.clone();
            if state != FtState::Syncing {
                s.sync = None;
            }
        });
        tracing::info!(
            %role,
            %state,
            message = message.as_deref().unwrap_or(""),
            "FT state"
        );
    }

    pub fn snapshot(&self) -> Status {
        self.inner.lock().expect("status lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_strings_of_the_status_format() {
        let all = [
            (FtState::Starting, "starting"),
            (FtState::Unprotected, "unprotected"),
            (FtState::Syncing, "syncing"),
            (FtState::Protected, "protected"),
            (FtState::Waiting, "waiting"),
            (FtState::StandingBy, "standing-by"),
            (FtState::Claiming, "claiming"),
            (FtState::Promoting, "promoting"),
            (FtState::Fenced, "fenced"),
            (FtState::Superseded, "superseded"),
            (FtState::SwitchedOver, "switched-over"),
            (FtState::Stopped, "stopped"),
            (FtState::Failed, "failed"),
        ];
        for (state, name) in all {
            assert_eq!(state.to_string(), name);
            assert_eq!(serde_json::to_value(state).unwrap(), name);
            assert_eq!(
                serde_json::from_value::<FtState>(name.into()).unwrap(),
                state
            );
        }
        assert_eq!(serde_json::to_value(Role::Standby).unwrap(), "standby");
        assert_eq!(Role::Primary.to_string(), "primary");
        assert!(serde_json::from_value::<FtState>("standing_by".into()).is_err());
    }

    #[test]
    fn set_state_changes_role_state_and_clears_sync() {
        let board = StatusBoard::new("n1", Role::Standby);
        let s = board.snapshot();
        assert_eq!(
            (s.version, s.role, s.state),
            (STATUS_VERSION, Role::Standby, FtState::Starting)
        );
        board.set_state(Role::Standby, FtState::Syncing, None);
        board.update(|s| {
            s.sync = Some(SyncProgress {
                phase: "memory".into(),
                done_bytes: 1,
                total_bytes: 2,
                rate_bytes_per_s: 1,
                eta_s: Some(1),
            })
        });
        assert!(board.snapshot().sync.is_some());
        board.set_state(Role::Primary, FtState::Failed, Some("why".into()));
        let s = board.snapshot();
        assert_eq!((s.role, s.state), (Role::Primary, FtState::Failed));
        assert_eq!(s.message.as_deref(), Some("why"));
        assert!(s.sync.is_none());
    }

    #[test]
    fn status_round_trips_through_json() {
        let board = StatusBoard::new("n1", Role::Primary);
        board.set_state(Role::Primary, FtState::Protected, None);
        board.update(|s| {
            s.epoch = 42;
            s.counters.checkpoints = 7;
        });
        let s = board.snapshot();
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["state"], "protected");
        assert_eq!(json["role"], "primary");
        assert_eq!(json["version"], STATUS_VERSION);
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }
}
