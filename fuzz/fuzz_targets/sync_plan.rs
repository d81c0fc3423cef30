//! The synchronisation plan a `SyncBegin` carries (`SyncPlan`: memory size,
//! disk sizes, NICs; JSON), the first message a standby decodes from a
//! primary.
//!
//! Input: a payload. Checks: a plan that decodes has the supported version
//! and survives an encode/decode trip unchanged, alone and as a message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator::protocol::{Message, SyncPlan, SYNC_PLAN_VERSION};

fuzz_target!(|data: &[u8]| {
    let Ok(plan) = SyncPlan::from_payload(data) else {
        return;
    };
    assert_eq!(plan.version, SYNC_PLAN_VERSION);
    let again = SyncPlan::from_payload(&plan.to_payload()).expect("an encoded plan decodes");
    assert_eq!(again, plan);
    let message = Message::SyncBegin(Box::new(plan));
    let back = Message::from_frame(message.clone().into_frame(0, 1)).expect("decodes");
    assert_eq!(back.message, message);
});
