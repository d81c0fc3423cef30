//! Forwarding what the guest receives: every frame delivered to the guest
//! after the first checkpoint is copied by its NIC and sent to the standby
//! at once, beside the epochs (an `Inbound` message, not part of any
//! epoch). Each checkpoint says how many frames per NIC it holds, so a
//! standby that takes over knows which of the frames it got are not in
//! its replica and delivers those to the promoted guest: a request the
//! primary's guest received after its last checkpoint is answered at once
//! instead of after the client's retransmission timer (0.2-1.4 s). A
//! frame that cannot be forwarded is only a frame the peer sends again.
//!
//! Forwarding never ends a session: the epochs do, where they stand (a
//! guest they keep stopped, for a synchronous epoch or a switchover's
//! hand-over, runs again or is handed over). A failed send stops the
//! forwarding; the link's failure reaches the epochs through their own
//! sends and acknowledgements.

use std::sync::Arc;

use ft_link::LinkSender;
use tokio::sync::Notify;
use vmm::vm::Vm;

use super::{send_all, PrimaryError};
use crate::protocol::{inbound_payloads, Message};
use crate::status::StatusBoard;

/// Sends the guest's received frames to the standby as they are
/// delivered, until sending fails; then waits for the session's end.
pub(super) async fn forward(
    vm: &Vm,
    tx: &LinkSender,
    generation: u64,
    status: &StatusBoard,
) -> std::convert::Infallible {
    let ready = Arc::new(Notify::new());
    let wake = Arc::clone(&ready);
    vm.input().on_recorded(Arc::new(move || wake.notify_one()));
    loop {
        ready.notified().await;
        let frames = vm.input().take();
        let count = frames.len() as u64;
        let messages: Vec<_> = inbound_payloads(frames)
            .into_iter()
            .map(|batch| Message::Inbound(batch).into_frame(0, generation))
            .collect();
        if let Err(error) = send_all(tx, &messages, status).await {
            stopped(&error);
            return std::future::pending().await;
        }
        let dropped = vm.input().dropped();
        status.update(|s| {
            s.counters.inbound_forwarded += count;
            s.counters.inbound_dropped = dropped;
        });
    }
}

/// Forwarding stopped for the rest of the session after `error`.
fn stopped(error: &PrimaryError) {
    tracing::warn!(
        %error,
        "the guest's received frames are no longer forwarded to the standby this session"
    );
}
