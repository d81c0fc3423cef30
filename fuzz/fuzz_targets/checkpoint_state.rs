//! The checkpoint state an `EpochBegin` carries (`CheckpointState`: the
//! VM's vCPUs, interrupt controllers, devices; postcard), as the standby
//! decodes it once the epoch is complete.
//!
//! Input: a payload. Checks: a state that decodes has the supported
//! version, encodes, and its encoding decodes to a state that encodes the
//! same (the encoding is a fixed point: nothing is lost or made up on a
//! second trip).
#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator::protocol::{CheckpointState, CHECKPOINT_STATE_VERSION};

fuzz_target!(|data: &[u8]| {
    let Ok(state) = CheckpointState::from_payload(data) else {
        return;
    };
    assert_eq!(state.version, CHECKPOINT_STATE_VERSION);
    let encoded = state.to_payload().expect("a decoded state encodes");
    let again = CheckpointState::from_payload(&encoded).expect("an encoded state decodes");
    assert_eq!(
        again.to_payload().expect("encodes"),
        encoded,
        "a second trip differs"
    );
});
