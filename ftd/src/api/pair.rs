//! `/api/pair`: what a joining node needs (`ftd join`), and taking the
//! joining node as this node's peer.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::vms::JsonBody;
use super::{ApiError, ApiState};
use crate::config::{Config, NodeAddresses, SECRET_FILE};
use crate::model::{ErrorBody, PairInfo, Severity};

/// This node's addresses and the pair secret, for `ftd join` on the other
/// node (audited: it carries the secret).
#[utoipa::path(get, path = "/api/pair", operation_id = "show_pair", tag = "nodes",
    responses((status = 200, description = "What a joining node needs", body = PairInfo),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 403, description = "A console user's session: only the administrator (the API token) may", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(State(state): State<ApiState>) -> Result<Json<PairInfo>, ApiError> {
    let manager = &state.manager;
    let config = manager.config();
    let secret = crate::secrets::read(&manager.state_dir().join(SECRET_FILE))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(PairInfo {
        node: config.node.clone(),
        peer: config.peer.clone(),
        pair_secret: secret,
        bridge: config.bridge.clone(),
        heartbeat_timeout_ms: config.heartbeat_timeout_ms,
        witness: config.witness.clone(),
        alink_plaintext: config.alink_plaintext,
    }))
}

/// Take `node` as this node's peer: the configuration is written and the
/// daemon restarts itself to apply it (the VMs' roles keep running).
#[utoipa::path(post, path = "/api/pair/peer", operation_id = "set_pair_peer", tag = "nodes", request_body = NodeAddresses,
    responses((status = 202, description = "Taken; the daemon restarts", body = NodeAddresses),
              (status = 400, description = "Not JSON", body = ErrorBody),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 403, description = "A console user's session: only the administrator (the API token) may", body = ErrorBody),
              (status = 409, description = "This node has another peer", body = ErrorBody),
              (status = 415, description = "Not sent as JSON", body = ErrorBody),
              (status = 422, description = "A field is wrong", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_peer(
    State(state): State<ApiState>,
    JsonBody(peer): JsonBody<NodeAddresses>,
) -> Result<(StatusCode, Json<NodeAddresses>), ApiError> {
    let manager = &state.manager;
    crate::model::check_node_name(&peer.name).map_err(|reason| {
        ApiError::InvalidField(crate::model::FieldError {
            field: "name".into(),
            reason,
        })
    })?;
    if peer.name == manager.node_name() {
        return Err(ApiError::InvalidField(crate::model::FieldError {
            field: "name".into(),
            reason: format!("{:?} is this node's own name", peer.name),
        }));
    }
    let mut config =
        Config::load(manager.state_dir()).map_err(|e| ApiError::Internal(e.to_string()))?;
    match &config.peer {
        Some(existing) if *existing == peer => return Ok((StatusCode::ACCEPTED, Json(peer))),
        Some(existing) => {
            return Err(ApiError::Conflict(format!(
                "this node's peer is {} already",
                existing.name
            )))
        }
        None => {}
    }
    config.peer = Some(peer.clone());
    config
        .save(manager.state_dir())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    manager.record(
        Severity::Info,
        false,
        "pair",
        None,
        &format!(
            "node {} joined the pair; the daemon restarts to apply it",
            peer.name
        ),
    );
    manager.restart_soon();
    Ok((StatusCode::ACCEPTED, Json(peer)))
}
