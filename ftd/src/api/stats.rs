//! `GET /api/vms/{name}/stats`: the VM's checkpointing figures once a
//! second, as server-sent events, for the console's live charts. The
//! figures are the counters of the engine running the VM's primary (this
//! node's, or the peer's as its last pair-channel report has them); a
//! reader derives rates from two samples. A stream a console session
//! opened ends with the session.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Extension;
use futures_util::stream::{self, Stream, StreamExt};

use super::{session_ended, ApiError, ApiState, ConsoleSession};
use crate::model::ErrorBody;

/// How often a sample is sent.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Live figures of a VM's checkpointing: an event `sample` (a
/// [`crate::model::VmSample`] as JSON) every second.
#[utoipa::path(get, path = "/api/vms/{name}/stats", operation_id = "stream_vm_stats", tag = "vms",
    params(("name" = String, Path, description = "The VM's name")),
    responses((status = 200, description = "Server-sent events `sample`, each a VmSample", content_type = "text/event-stream", body = String),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 404, description = "No such VM", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn stream_vm(
    State(state): State<ApiState>,
    session: Option<Extension<ConsoleSession>>,
    Path(name): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    state.manager.vm(&name)?;
    let manager = state.manager.clone();
    // Opened by a console session: it ends with the session.
    let ended = Box::pin(session_ended(state, session.map(|s| s.0)));
    // The state: the VM still to sample (none once it is gone), and
    // whether the next sample is the first (sent at once).
    let samples = stream::unfold(
        (manager, Some(name), true),
        |(manager, name, first)| async move {
            let name = name?;
            if !first {
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
            let (event, next) = match manager.vm_sample(&name) {
                Ok(sample) => match serde_json::to_string(&sample) {
                    Ok(data) => (SseEvent::default().event("sample").data(data), Some(name)),
                    Err(e) => (
                        SseEvent::default().event("error").data(e.to_string()),
                        Some(name),
                    ),
                },
                // Deleted meanwhile: said, and the stream ends.
                Err(e) => (SseEvent::default().event("gone").data(e.to_string()), None),
            };
            Some((Ok(event), (manager, next, false)))
        },
    )
    .take_until(ended);
    Ok(Sse::new(samples).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
