//! How long the standby may take to acknowledge an epoch (at level HA, a
//! batch of disk writes) once it was sent: [`PrimaryConfig::ack_deadline`],
//! and longer for the first epoch, which the standby acknowledges only
//! once the whole initial copy is on its disks.
//!
//! [`PrimaryConfig::ack_deadline`]: super::PrimaryConfig::ack_deadline

use std::time::Duration;

/// The first epoch's deadline is at least this much longer than the
/// others': the standby syncs the copy's last writes and names the common
/// point in its written maps (a few syncs of each disk).
pub(super) const FIRST_EPOCH_GRACE: Duration = Duration::from_secs(30);

/// The slowest rate at which a standby's disks are assumed to take what
/// the copy left in its page cache before the first epoch's sync. A
/// standby of this version hands the copy to writeback as it comes (on a
/// disk at least as fast as the A-link little is left); one of an older
/// version leaves it to the kernel. A standby dropped for a slower disk
/// kept its replica: the next session sends only what differs, and its
/// first epoch has less to wait for.
pub(super) const FLUSH_FLOOR_BYTES_PER_SEC: u64 = 16 << 20;

/// The deadline of `epoch`'s acknowledgement, `copied` the bytes the
/// session's initial copy wrote to the standby's disks (memory is not
/// synced). Before, the first epoch had none: a standby whose disk hung
/// in that sync held the guest's output (at level HA, its disk writes)
/// for as long as it hung.
pub(super) fn ack_deadline(deadline: Duration, epoch: u64, copied: u64) -> Duration {
    if epoch > 1 {
        return deadline;
    }
    let flush = Duration::from_secs(copied / FLUSH_FLOOR_BYTES_PER_SEC);
    deadline + flush.max(FIRST_EPOCH_GRACE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_epoch_has_a_longer_deadline_that_grows_with_the_copy() {
        let deadline = Duration::from_secs(5);
        assert_eq!(ack_deadline(deadline, 2, 1 << 40), deadline);
        assert_eq!(ack_deadline(deadline, 1, 0), deadline + FIRST_EPOCH_GRACE);
        // 8 GiB at 16 MiB/s: 512 s.
        assert_eq!(
            ack_deadline(deadline, 1, 8 << 30),
            deadline + Duration::from_secs(512)
        );
    }
}
