//! `/api/nodes`: the pair's two nodes.

use axum::extract::{Path, State};
use axum::Json;

use super::{ApiError, ApiState};
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
