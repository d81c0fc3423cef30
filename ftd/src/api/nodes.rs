//! `/api/nodes`: the pair's two nodes, and their maintenance.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};

use super::{ApiError, ApiState, Caller};
use crate::model::{ErrorBody, NodeView};

/// The pair's nodes, this one first.
#[utoipa::path(get, path = "/api/nodes", operation_id = "list_nodes", tag = "nodes",
    responses((status = 200, description = "The nodes", body = [NodeView]),
              (status = 401, description = "No or a wrong token", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(State(state): State<ApiState>) -> Result<Json<Vec<NodeView>>, ApiError> {
    Ok(Json(state.manager.nodes()?))
}

/// One node.
#[utoipa::path(get, path = "/api/nodes/{name}", operation_id = "show_node", tag = "nodes",
    params(("name" = String, Path, description = "The node's name")),
    responses((status = 200, description = "The node", body = NodeView),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 404, description = "No such node", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    Ok(Json(state.manager.node(&name)?))
}

/// Take a node out of service: its FT VMs switch over to the peer and its
/// HA VMs migrate there (nothing lost), it starts no standby, and once no VM runs there it is `on`
/// maintenance (pulling or rebooting it affects no VM; the VMs run
/// unprotected on the peer). Answers at once; the node's `maintenance` and
/// `maintenance_waiting` show the progress.
#[utoipa::path(post, path = "/api/nodes/{name}/maintenance/enter", operation_id = "enter_maintenance", tag = "nodes",
    params(("name" = String, Path, description = "The node's name")),
    responses((status = 202, description = "Entering maintenance", body = NodeView),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 404, description = "No such node", body = ErrorBody),
              (status = 409, description = "Not possible now (the node is in maintenance already, its peer is down or in maintenance, an unprotected VM runs on it); the reason says which", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn enter_maintenance(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    let node = state.manager.enter_maintenance(&name, &caller.0)?;
    Ok((StatusCode::ACCEPTED, Json(node)))
}

/// Bring a node back into service: its standbys start (each VM is
/// protected again) and the VMs that prefer it switch back to it. Answers
/// at once; the node is `leaving` until every FT or HA VM is protected and where
/// it prefers to be, then `off`.
#[utoipa::path(post, path = "/api/nodes/{name}/maintenance/exit", operation_id = "exit_maintenance", tag = "nodes",
    params(("name" = String, Path, description = "The node's name")),
    responses((status = 202, description = "Leaving maintenance", body = NodeView),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 404, description = "No such node", body = ErrorBody),
              (status = 409, description = "The node is not in maintenance, or is leaving it already", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn exit_maintenance(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    let node = state.manager.exit_maintenance(&name, &caller.0)?;
    Ok((StatusCode::ACCEPTED, Json(node)))
}
