//! The quorum witness as the engine sees it: which witness, and the VM's
//! name there. The primary keeps a lease and confirms before going on
//! alone (`primary/lease.rs`); the standby claims before taking over
//! (`standby/claim.rs`). Without a witness the pair's own policy holds:
//! the standby takes over when the primary falls silent on every path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use witness::WitnessClient;

/// A lease the witness gave with its grant of a takeover: the promoted
/// copy's output may leave until `until` (the request's sending plus the
/// lease) without waiting for its first renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantedLease {
    pub until: Instant,
    pub length: Duration,
}

impl GrantedLease {
    /// The lease of a grant asked at `sent` (none for `lease_ms` 0).
    pub fn from_grant(sent: Instant, lease_ms: u64) -> Option<GrantedLease> {
        (lease_ms > 0).then(|| {
            let length = Duration::from_millis(lease_ms);
            GrantedLease {
                until: sent + length,
                length,
            }
        })
    }
}

/// The witness and the name of the VM there.
#[derive(Clone)]
pub struct WitnessConfig {
    pub client: Arc<WitnessClient>,
    pub vm: String,
}

impl std::fmt::Debug for WitnessConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessConfig")
            .field("addrs", &self.client.addrs())
            .field("vm", &self.vm)
            .finish()
    }
}
