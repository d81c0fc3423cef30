//! `/api/session`: the web console's login. The API token (the same one
//! `Authorization: Bearer` carries), or a console user's name and password
//! (`/api/users`), opens a session whose id travels in
//! an HttpOnly, SameSite=Strict cookie; every API endpoint then accepts
//! the cookie instead of the header. A request that changes something
//! must also carry `X-Ftd-Console: 1` (a page of another site cannot send
//! it without the API's consent), so a session cannot be used by a
//! forged cross-site request.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::vms::JsonBody;
use super::{ApiError, ApiState, Caller};

use crate::console::sessions::{came_over_https, clear_cookie, session_cookie, set_cookie};
use crate::model::{ErrorBody, SessionLogin, SessionView};

/// The role of a session opened with the API token or (not) a user's
/// password: see [`super::administrator_only`].
fn role_of(by_token: bool) -> &'static str {
    if by_token {
        "administrator"
    } else {
        "operator"
    }
}

/// How long a wrong token or password makes its sender wait (a guess
/// costs time).
const WRONG_LOGIN_PAUSE: Duration = Duration::from_millis(300);

/// Log in with the API token, or with a console user's name and
/// password: opens a console session (cookie `ftd_session`).
#[utoipa::path(post, path = "/api/session", operation_id = "log_in", tag = "console", request_body = SessionLogin,
    responses((status = 200, description = "Logged in; the session cookie is set", body = SessionView),
              (status = 400, description = "Not JSON", body = ErrorBody),
              (status = 401, description = "A wrong token, or a wrong user or password", body = ErrorBody),
              (status = 415, description = "Not sent as JSON", body = ErrorBody),
              (status = 422, description = "Neither a token nor a user and password, or both", body = ErrorBody),
              (status = 429, description = "Too many logins at once", body = ErrorBody)))]
pub async fn log_in(
    State(state): State<ApiState>,
    axum::extract::ConnectInfo(client): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    JsonBody(login): JsonBody<SessionLogin>,
) -> Result<Response, ApiError> {
    let (user, by_token, user_revision) = match (login.token, login.user, login.password) {
        (Some(token), None, None) => {
            if !super::same_secret(token.trim().as_bytes(), state.token.as_bytes()) {
                tokio::time::sleep(WRONG_LOGIN_PAUSE).await;
                return Err(ApiError::Unauthorized(
                    "the token is not this node's API token (the api-token file)".into(),
                ));
            }
            (crate::users::TOKEN_USER.to_string(), true, 0)
        }
        (None, Some(user), Some(password)) => {
            let Ok(_permit) = state.hashing.clone().try_acquire_owned() else {
                return Err(ApiError::TooManyRequests(
                    "too many logins at once: try again in a moment".into(),
                ));
            };
            let manager = state.manager.clone();
            let name = user.clone();
            // Hashing takes tens of ms of CPU: off the async workers.
            let revision =
                tokio::task::spawn_blocking(move || manager.user_login(&name, &password))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))??;
            let Some(revision) = revision else {
                tokio::time::sleep(WRONG_LOGIN_PAUSE).await;
                return Err(ApiError::Unauthorized(
                    "no such user, or a wrong password".into(),
                ));
            };
            (user, false, revision)
        }
        _ => {
            return Err(ApiError::InvalidField(crate::model::FieldError {
                field: "token".into(),
                reason: "give the API token, or a user and a password".into(),
            }))
        }
    };
    let id = state
        .sessions
        .open(&user, by_token, user_revision)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let session = state
        .sessions
        .touch(&id)
        .ok_or_else(|| ApiError::Internal("the new session is gone".into()))?;
    let view = SessionView {
        logged_in: true,
        user: user.clone(),
        node: state.manager.node_name().to_string(),
        expires_in_s: session.ends_in(Instant::now()).as_secs(),
        role: role_of(by_token).into(),
    };
    let mut response = (
        [(
            header::SET_COOKIE,
            set_cookie(&id, came_over_https(&headers)),
        )],
        Json(view),
    )
        .into_response();
    response
        .extensions_mut()
        .insert(Caller(format!("{user}@{} (console login)", client.ip())));
    Ok(response)
}

/// Whether the request carries a live console session (or the API
/// token): the console asks on load, and shows its login page if not.
#[utoipa::path(get, path = "/api/session", operation_id = "show_session", tag = "console",
    responses((status = 200, description = "The session, or logged_in false", body = SessionView)))]
pub async fn show(State(state): State<ApiState>, headers: HeaderMap) -> Json<SessionView> {
    let node = state.manager.node_name().to_string();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .is_some_and(|t| super::same_secret(t.trim().as_bytes(), state.token.as_bytes()));
    // The token wins over a cookie, as it does for every other request.
    let session = session_cookie(&headers)
        .filter(|_| !bearer)
        .and_then(|id| state.sessions.touch(&id))
        .filter(|s| s.by_token || super::user_unchanged(&state, s));
    Json(match session {
        Some(s) => SessionView {
            logged_in: true,
            user: s.user.clone(),
            node,
            expires_in_s: s.ends_in(Instant::now()).as_secs(),
            role: role_of(s.by_token).into(),
        },
        None => SessionView {
            logged_in: bearer,
            user: if bearer {
                "admin".into()
            } else {
                String::new()
            },
            node,
            expires_in_s: 0,
            role: if bearer {
                role_of(true).into()
            } else {
                String::new()
            },
        },
    })
}

/// Log out: the session ends and its cookie is removed.
#[utoipa::path(delete, path = "/api/session", operation_id = "log_out", tag = "console",
    responses((status = 204, description = "Logged out"),
              (status = 401, description = "No session", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn log_out(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(id) = session_cookie(&headers) {
        state.sessions.close(&id);
    }
    (
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, clear_cookie())],
    )
        .into_response()
}
