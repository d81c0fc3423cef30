//! Which troubles of each VM's standby have been said, so that each is
//! said once, until the VM is protected again: a refusal (its own fault,
//! a full disk, say) and a drop (it hung) are told apart, so a standby
//! that refused and then hung raises both.

use std::collections::HashSet;

/// What went wrong with a VM's standby, as the primary's counters show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Trouble {
    /// The standby refused to hold the replica.
    Refused,
    /// The primary dropped the standby: it did not take or acknowledge
    /// what it was sent in time.
    Dropped,
}

#[derive(Debug, Default)]
pub(super) struct StandbyAlerts(HashSet<(String, Trouble)>);

impl StandbyAlerts {
    /// True when `trouble` is new for `vm` since it was last protected
    /// (then it is to be said).
    pub(super) fn raise(&mut self, vm: &str, trouble: Trouble) -> bool {
        self.0.insert((vm.to_string(), trouble))
    }

    /// The VM is protected again: true when a trouble had been said (then
    /// its end is to be said too).
    pub(super) fn protected(&mut self, vm: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|(v, _)| v != vm);
        self.0.len() != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_trouble_is_said_once_until_the_vm_is_protected_again() {
        let mut alerts = StandbyAlerts::default();
        assert!(!alerts.protected("vm1"), "nothing was said");
        assert!(alerts.raise("vm1", Trouble::Refused));
        assert!(!alerts.raise("vm1", Trouble::Refused), "said once");
        // A drop after a refusal is a new trouble, and another VM's own.
        assert!(alerts.raise("vm1", Trouble::Dropped));
        assert!(alerts.raise("vm2", Trouble::Dropped));
        assert!(alerts.protected("vm1"));
        assert!(!alerts.protected("vm1"));
        assert!(alerts.raise("vm1", Trouble::Refused), "said again");
        assert!(
            !alerts.raise("vm2", Trouble::Dropped),
            "vm2 still unprotected"
        );
    }
}
