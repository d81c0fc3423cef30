//! `/api/vms`: define, show, start, stop, protect and delete VMs.

use axum::extract::{FromRequest, Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};

use super::events::QueryArgs;
use super::{ApiError, ApiState, Caller};
use crate::model::{ErrorBody, Level, VmCreate, VmView};

/// A JSON body whose rejection is an [`ApiError`] (a JSON error answer).
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct JsonBody<T>(pub T);

/// Every VM of the pair.
#[utoipa::path(get, path = "/api/vms", operation_id = "list_vms", tag = "vms",
    responses((status = 200, description = "The VMs, by name", body = [VmView]),
              (status = 401, description = "No or a wrong token", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(State(state): State<ApiState>) -> Result<Json<Vec<VmView>>, ApiError> {
    Ok(Json(state.manager.vms()?))
}

/// Define a VM (it is stopped until started).
#[utoipa::path(post, path = "/api/vms", operation_id = "create_vm", tag = "vms", request_body = VmCreate,
    responses((status = 201, description = "Defined", body = VmView),
              (status = 400, description = "Not JSON", body = ErrorBody),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 403, description = "A console user's session: only the administrator (the API token) may", body = ErrorBody),
              (status = 409, description = "The name is in use", body = ErrorBody),
              (status = 413, description = "The body is too large", body = ErrorBody),
              (status = 415, description = "Not sent as JSON", body = ErrorBody),
              (status = 422, description = "A field is wrong (named in `field`)", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<ApiState>,
    JsonBody(request): JsonBody<VmCreate>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    Ok((StatusCode::CREATED, Json(state.manager.create_vm(request)?)))
}

/// One VM.
#[utoipa::path(get, path = "/api/vms/{name}", operation_id = "show_vm", tag = "vms",
    params(("name" = String, Path, description = "The VM's name")),
    responses((status = 200, description = "The VM", body = VmView),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 404, description = "No such VM", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn show(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(state.manager.vm(&name)?))
}

/// Delete a stopped VM: its definition, and on each node its files (disks,
/// logs).
#[utoipa::path(delete, path = "/api/vms/{name}", operation_id = "delete_vm", tag = "vms",
    params(("name" = String, Path, description = "The VM's name")),
    responses((status = 204, description = "Deleted"),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 403, description = "A console user's session: only the administrator (the API token) may", body = ErrorBody),
              (status = 404, description = "No such VM", body = ErrorBody),
              (status = 409, description = "The VM is running", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.manager.delete_vm(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Start a VM on its preferred node; at level ft the peer starts its
/// standby.
#[utoipa::path(post, path = "/api/vms/{name}/start", operation_id = "start_vm", tag = "vms",
    params(("name" = String, Path, description = "The VM's name")),
    responses((status = 202, description = "Starting", body = VmView),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 404, description = "No such VM", body = ErrorBody),
              (status = 409, description = "It is running already", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn start(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(state.manager.start_vm(&name)?)))
}

/// Stop a VM on both nodes (no failover).
#[utoipa::path(post, path = "/api/vms/{name}/stop", operation_id = "stop_vm", tag = "vms",
    params(("name" = String, Path, description = "The VM's name")),
    responses((status = 202, description = "Stopping", body = VmView),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 404, description = "No such VM", body = ErrorBody),
              (status = 409, description = "It is not running", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn stop(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(state.manager.stop_vm(&name)?)))
}

/// Force a takeover the witness cannot grant: the VM's standby on this
/// node, which lost its primary and waits for the witness, takes over
/// without it. Only when the witness cannot answer and the other node is
/// surely down: forced while the other node runs the VM, it makes two
/// active copies. Audited; an alert says it was done.
#[utoipa::path(post, path = "/api/vms/{name}/takeover", operation_id = "force_takeover", tag = "vms",
    params(("name" = String, Path, description = "The VM's name")),
    responses((status = 202, description = "The standby here takes over", body = VmView),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 403, description = "A console user's session: only the administrator (the API token) may", body = ErrorBody),
              (status = 404, description = "No such VM", body = ErrorBody),
              (status = 409, description = "No standby here waits for the witness's grant", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn takeover(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(state.manager.force_takeover(&name).await?),
    ))
}

/// A planned switchover: the FT VM's primary role moves to its standby
/// with nothing lost (a final checkpoint with the guest stopped, then the
/// standby takes over at once, without a heartbeat timeout); the node that
/// ran the primary becomes its standby. Either node may be asked: the one
/// without the primary passes the request to the one with it over the
/// pair channel and gives its answer. Answers once the standby was told to
/// take over. An HA VM moves by live migration (memory copied while it
/// runs, at level ft for the move, then the switchover; the new primary
/// goes back to ha): that takes the copy's time, so the answer is 202 once
/// the engine took the request, and the events say when the VM moved.
#[utoipa::path(post, path = "/api/vms/{name}/switchover", operation_id = "switchover_vm", tag = "vms",
    params(("name" = String, Path, description = "The VM's name"), SwitchoverQuery),
    responses((status = 200, description = "Switched over: the standby's node runs the primary", body = VmView),
              (status = 202, description = "An HA VM's live migration began", body = VmView),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 404, description = "No such VM", body = ErrorBody),
              (status = 409, description = "Not possible now (not running, not protected, unprotected, a migration under way, the other node, which runs the primary, cannot be reached or runs an older daemon, the VM runs elsewhere than `from`), or called off (the VM runs on where it ran); the reason says which", body = ErrorBody),
              (status = 502, description = "Asked of the other node, which runs the primary: it failed (its store)", body = ErrorBody),
              (status = 504, description = "Asked of the other node, which runs the primary: no answer came (the pair channel went down, or too late); the move may have happened: see the VM's events before asking again", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn switchover(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    QueryArgs(query): QueryArgs<SwitchoverQuery>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    let (view, migration) = state
        .manager
        .move_asked(&name, query.from.as_deref(), &caller.0)
        .await?;
    let code = if migration {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(view)))
}

/// Where the VM is expected to run.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverQuery {
    /// The node the caller saw running the primary: if the VM runs
    /// elsewhere (it moved already, e.g. a request asked again after an
    /// unknown outcome), the switchover is refused instead of moving it
    /// back. `ftctl` and the console send it.
    pub from: Option<String>,
}

/// Which level `protect` sets.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProtectQuery {
    /// `ft` (the default) or `ha`.
    pub level: Option<String>,
}

/// Protect a VM at level ft (a running VM gets its standby), or at level
/// ha with `?level=ha` (its disks mirrored). A running VM changes level
/// without a reboot.
#[utoipa::path(post, path = "/api/vms/{name}/protect", operation_id = "protect_vm", tag = "vms",
    params(("name" = String, Path, description = "The VM's name"), ProtectQuery),
    responses((status = 200, description = "The VM at the level asked", body = VmView),
              (status = 400, description = "A level other than ft or ha", body = ErrorBody),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 404, description = "No such VM", body = ErrorBody),
              (status = 409, description = "This node has no peer", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn protect(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    QueryArgs(query): QueryArgs<ProtectQuery>,
) -> Result<Json<VmView>, ApiError> {
    let level = match query.level.as_deref() {
        None | Some("ft") => Level::Ft,
        Some("ha") => Level::Ha,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "level {other:?}: protect takes ft or ha (unprotect runs a VM unprotected)"
            )))
        }
    };
    Ok(Json(state.manager.set_level(&name, level)?))
}

/// Run a VM unprotected (a running VM's standby stops).
#[utoipa::path(post, path = "/api/vms/{name}/unprotect", operation_id = "unprotect_vm", tag = "vms",
    params(("name" = String, Path, description = "The VM's name")),
    responses((status = 200, description = "Level unprotected", body = VmView),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 404, description = "No such VM", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn unprotect(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(state.manager.set_level(&name, Level::Unprotected)?))
}

/// The FT engine's own status of the VM's role on this node (counters,
/// sync progress; the replicator's status format, version 1).
///
/// Asked of the engine when the request comes; the daemon's last poll of
/// it when the engine does not answer within a second, or while two other
/// requests are asking that engine.
#[utoipa::path(get, path = "/api/vms/{name}/engine", operation_id = "vm_engine_status", tag = "vms",
    params(("name" = String, Path, description = "The VM's name")),
    responses((status = 200, description = "The engine's status", body = Object),
              (status = 401, description = "No or a wrong token", body = ErrorBody),
              (status = 404, description = "No such VM, or no role of it runs on this node", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn engine(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<replicator::status::Status>, ApiError> {
    state.manager.vm(&name)?;
    state
        .manager
        .engine_status(&name)
        .await
        .map(Json)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no role of VM {name} runs on {} (or it has not reported yet)",
                state.manager.node_name()
            ))
        })
}
