//! `/api/events`: the event log (alerts flagged) and its live stream.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::{Extension, Json};
use futures_util::stream::{Stream, StreamExt};
use serde::Deserialize;
use tokio_stream::wrappers::BroadcastStream;
use utoipa::IntoParams;

use super::{session_ended, ApiError, ApiState, ConsoleSession};
use crate::model::{ErrorBody, Event};
use crate::store::EventFilter;

/// Most events one request returns.
pub const MAX_EVENTS: usize = 1000;

/// A query string whose rejection is an [`ApiError`].
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct QueryArgs<T>(pub T);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Only this VM's events.
    vm: Option<String>,
    /// Only alerts.
    #[serde(default)]
    alerts: bool,
    /// Only events after this id.
    after: Option<u64>,
    /// At most this many (newest), 1-1000; default 100.
    limit: Option<usize>,
}

/// The event log, oldest first.
#[utoipa::path(get, path = "/api/events", operation_id = "list_events", tag = "events", params(EventQuery),
    responses((status = 200, description = "Events", body = [Event]),
              (status = 400, description = "A bad query", body = ErrorBody),
              (status = 401, description = "No or a wrong token", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<ApiState>,
    QueryArgs(query): QueryArgs<EventQuery>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_EVENTS {
        return Err(ApiError::BadRequest(format!(
            "limit {limit} is not in 1..={MAX_EVENTS}"
        )));
    }
    Ok(Json(state.manager.events(&EventFilter {
        vm: query.vm,
        alerts_only: query.alerts,
        after: query.after,
        limit,
    })?))
}

/// Events as they happen (server-sent events, each an [`Event`] as JSON,
/// its id as the SSE id).
#[utoipa::path(get, path = "/api/events/stream", operation_id = "stream_events", tag = "events",
    responses((status = 200, description = "A text/event-stream of events", content_type = "text/event-stream", body = Event),
              (status = 401, description = "No or a wrong token", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn stream(
    State(state): State<ApiState>,
    session: Option<Extension<ConsoleSession>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    // Opened by a console session: it ends with the session.
    let ended = Box::pin(session_ended(state.clone(), session.map(|s| s.0)));
    let events = BroadcastStream::new(state.manager.subscribe())
        .filter_map(|item| async move {
            match item {
                Ok(event) => {
                    let data = serde_json::to_string(&event).ok()?;
                    Some(Ok(SseEvent::default()
                        .id(event.id.to_string())
                        .event(if event.alert { "alert" } else { "event" })
                        .data(data)))
                }
                // A slow reader missed some: say so; it can read them from
                // /api/events?after=<last id>.
                Err(_) => Some(Ok(SseEvent::default()
                    .event("lagged")
                    .data("events were missed; read /api/events?after=<last id>"))),
            }
        })
        .take_until(ended);
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// At most this many (newest), 1-1000; default 100.
    limit: Option<usize>,
}

/// The audit log, both nodes': every mutating request to either node's API
/// (and `GET /api/pair`), and what a daemon did on someone's behalf, in the
/// order this node learned of them.
#[utoipa::path(get, path = "/api/audit", operation_id = "list_audit", tag = "events", params(AuditQuery),
    responses((status = 200, description = "Audit entries", body = [crate::model::AuditEntry]),
              (status = 400, description = "A bad query", body = ErrorBody),
              (status = 401, description = "No or a wrong token", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn audit(
    State(state): State<ApiState>,
    QueryArgs(query): QueryArgs<AuditQuery>,
) -> Result<Json<Vec<crate::model::AuditEntry>>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_EVENTS {
        return Err(ApiError::BadRequest(format!(
            "limit {limit} is not in 1..={MAX_EVENTS}"
        )));
    }
    Ok(Json(state.manager.store().audit(limit)?))
}
