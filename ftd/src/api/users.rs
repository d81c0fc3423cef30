//! `/api/users`: the web console's users (a name and a password kept
//! hashed; the API token logs in as `admin`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::vms::JsonBody;
use super::{ApiError, ApiState};
use crate::model::{ErrorBody, UserPassword, UserView};

/// The console's users.
#[utoipa::path(get, path = "/api/users", operation_id = "list_users", tag = "console",
    responses((status = 200, description = "The users, by name", body = [UserView]),
              (status = 401, description = "No or a wrong token", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(State(state): State<ApiState>) -> Result<Json<Vec<UserView>>, ApiError> {
    Ok(Json(state.manager.users()?))
}

/// Make a console user, or give one a new password (both nodes learn it).
#[utoipa::path(put, path = "/api/users/{name}", operation_id = "set_user", tag = "console", request_body = UserPassword,
    params(("name" = String, Path, description = "1-32 lower-case letters, digits, '.', '_' or '-', a letter first")),
    responses((status = 200, description = "The user", body = UserView),
              (status = 400, description = "Not JSON", body = ErrorBody),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 403, description = "A console user's session: only the administrator (the API token) may", body = ErrorBody),
              (status = 415, description = "Not sent as JSON", body = ErrorBody),
              (status = 422, description = "A bad name or password", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn set(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<UserPassword>,
) -> Result<Json<UserView>, ApiError> {
    let manager = state.manager.clone();
    // Hashing takes tens of ms of CPU: off the async workers.
    let user =
        tokio::task::spawn_blocking(move || manager.set_user_password(&name, &body.password))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(user))
}

/// Delete a console user (their sessions end at their next request).
#[utoipa::path(delete, path = "/api/users/{name}", operation_id = "delete_user", tag = "console",
    params(("name" = String, Path, description = "The user's name")),
    responses((status = 204, description = "Deleted"),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 403, description = "A console user's session: only the administrator (the API token) may", body = ErrorBody),
              (status = 404, description = "No such user", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.manager.delete_user(&name)?;
    Ok(StatusCode::NO_CONTENT)
}
