//! A change of a running VM's protection level (FT <-> HA) without a
//! reboot. The session at the old level ends cleanly: the epochs (or
//! mirror batches) in flight are acknowledged first, then the standby is
//! told `Stop` (no takeover; it drops what only the old level needs, the
//! replica's memory, and keeps its disks). A new session begins at once at
//! the new level; its initial copy compares what the standby kept, so the
//! disks move only where they differ. Until its first epoch the VM runs
//! unprotected, as during any resynchronisation.

use std::sync::Mutex;

use tokio::sync::Notify;

use crate::level::Level;

/// An operator's request for another level, shared by the control socket
/// and the primary.
#[derive(Debug, Default)]
pub struct LevelChange {
    asked: Mutex<Option<Level>>,
    wake: Notify,
}

impl LevelChange {
    /// Asks the primary to go on at `level` (the latest request wins).
    pub fn ask(&self, level: Level) {
        *self.asked.lock().unwrap_or_else(|e| e.into_inner()) = Some(level);
        self.wake.notify_one();
    }

    /// The level asked, if a request is pending (taken).
    pub(super) fn take(&self) -> Option<Level> {
        self.asked.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// The level asked, if a request is pending (not taken).
    pub(super) fn pending(&self) -> Option<Level> {
        *self.asked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves when a request may have arrived.
    pub(super) async fn asked(&self) {
        self.wake.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_level_asked_is_taken_once() {
        let change = LevelChange::default();
        assert_eq!(change.take(), None);
        change.ask(Level::Ha);
        change.ask(Level::Ft);
        assert_eq!(change.pending(), Some(Level::Ft));
        assert_eq!(change.take(), Some(Level::Ft));
        assert_eq!(change.pending(), None);
        assert_eq!(change.take(), None);
    }
}
