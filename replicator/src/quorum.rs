//! The quorum witness as the engine sees it: which witness, and the VM's
//! name there. The primary keeps a lease and confirms before going on
//! alone (`primary/lease.rs`); the standby claims before taking over
//! (`standby/claim.rs`). Without a witness the pair's own policy holds:
//! the standby takes over when the primary falls silent on every path.

use std::sync::Arc;

use witness::WitnessClient;

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
