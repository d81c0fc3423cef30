//! The REST API (HTTP/JSON) on the management address.
//!
//! - Everything under `/api` but `/api/openapi.json` and `/api/health`
//!   needs `Authorization: Bearer <token>` (the token file `ftd` made at
//!   its first start); `/metrics` is open, like a node exporter's.
//! - Every mutating request (POST, PUT, PATCH, DELETE) goes into the audit
//!   log: who, what, when, the status answered and what came of it,
//!   refusals included.
//! - Errors are JSON ([`crate::model::ErrorBody`]); bodies over
//!   [`MAX_BODY`] get a 413; nothing a client sends gets a 5xx.

mod error;
mod events;
mod nodes;
mod openapi;
mod pair;
mod session;
mod stats;
mod users;
mod vms;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

pub use error::ApiError;
pub use openapi::openapi_json;

use crate::console::sessions::{session_cookie, Sessions};
use crate::manager::Manager;
use crate::metrics::Metrics;
use crate::model::ErrorBody;

/// Largest request body the API reads.
pub const MAX_BODY: usize = 64 << 10;
/// Largest error body the audit log reads back from a response.
const MAX_AUDITED_BODY: usize = 64 << 10;

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    pub manager: Manager,
    pub metrics: Arc<Metrics>,
    token: Arc<String>,
    /// The web console's login sessions.
    sessions: Arc<Sessions>,
    /// Password hashes (argon2: 19 MiB and tens of ms each) running at
    /// once; a login beyond them is refused (429), so that a flood of
    /// logins cannot take the node's memory and CPU.
    hashing: Arc<tokio::sync::Semaphore>,
}

/// Most password hashes at once.
pub const MAX_HASHING: usize = 2;

/// Who made a request, as the audit log names them (set by the
/// authentication, read by handlers and the audit log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub String);

/// The console session a request came with (none for the bearer token):
/// a stream it opens ends with the session ([`session_ended`]).
#[derive(Debug, Clone)]
pub struct ConsoleSession(pub String);

/// How often a stream opened by a console session looks whether the
/// session still is.
const SESSION_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Resolves once `session` is over: logged out, expired, or its user
/// deleted or given a new password (never, for a request made with the
/// token). A stream opened with the session ends then.
pub(crate) async fn session_ended(state: ApiState, session: Option<ConsoleSession>) {
    let Some(ConsoleSession(id)) = session else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(SESSION_CHECK_EVERY).await;
        let live = state
            .sessions
            .peek(&id)
            .is_some_and(|s| s.by_token || user_unchanged(&state, &s));
        if !live {
            return;
        }
    }
}

impl ApiState {
    pub fn new(manager: Manager, metrics: Arc<Metrics>, token: String) -> ApiState {
        ApiState {
            manager,
            metrics,
            token: Arc::new(token),
            sessions: Arc::new(Sessions::default()),
            hashing: Arc::new(tokio::sync::Semaphore::new(MAX_HASHING)),
        }
    }
}

/// The whole API.
pub fn router(state: ApiState) -> Router {
    let authenticated = Router::new()
        .route("/api/nodes", get(nodes::list))
        .route("/api/nodes/{name}", get(nodes::show))
        .route(
            "/api/nodes/{name}/maintenance/enter",
            post(nodes::enter_maintenance),
        )
        .route(
            "/api/nodes/{name}/maintenance/exit",
            post(nodes::exit_maintenance),
        )
        .route("/api/vms", get(vms::list).post(vms::create))
        .route("/api/vms/{name}", get(vms::show).delete(vms::delete))
        .route("/api/vms/{name}/start", post(vms::start))
        .route("/api/vms/{name}/stop", post(vms::stop))
        .route("/api/vms/{name}/protect", post(vms::protect))
        .route("/api/vms/{name}/unprotect", post(vms::unprotect))
        .route("/api/vms/{name}/takeover", post(vms::takeover))
        .route("/api/vms/{name}/switchover", post(vms::switchover))
        .route("/api/vms/{name}/engine", get(vms::engine))
        .route("/api/events", get(events::list))
        .route("/api/events/stream", get(events::stream))
        .route("/api/audit", get(events::audit))
        .route("/api/pair", get(pair::show))
        .route("/api/pair/peer", post(pair::set_peer))
        .route("/api/vms/{name}/stats", get(stats::stream_vm))
        .route("/api/session", axum::routing::delete(session::log_out))
        .route("/api/users", get(users::list))
        .route(
            "/api/users/{name}",
            axum::routing::put(users::set).delete(users::delete),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(authenticated)
        .route("/api/session", post(session::log_in).get(session::show))
        .merge(crate::console::router())
        .route("/api/openapi.json", get(openapi::serve))
        .route("/api/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), audit))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, state: ApiState) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
}

/// `GET /api/health`: the daemon answers.
#[utoipa::path(get, path = "/api/health", operation_id = "health", tag = "node",
    responses((status = 200, description = "The daemon answers", body = String)))]
async fn health() -> &'static str {
    "ok\n"
}

/// `GET /metrics`: Prometheus exposition.
/// OpenMetrics to a client that asks for it (Prometheus does), the
/// classic text format (0.0.4) to everyone else (curl, promtool).
async fn metrics(State(state): State<ApiState>, headers: axum::http::HeaderMap) -> Response {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    match state.metrics.render(&state.manager) {
        Ok(text) if openmetrics => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::metrics::classic_text(&text),
        )
            .into_response(),
        Err(e) => ApiError::Internal(format!("cannot render the metrics: {e}")).into_response(),
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no API endpoint at {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> Response {
    let body = ErrorBody {
        error: "method_not_allowed".into(),
        message: format!("{method} is not served at {}", uri.path()),
        field: None,
    };
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

/// Compares in time independent of where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The header a console session's changes must carry (a page of another
/// site cannot send it: a forged cross-site request is refused).
pub const CONSOLE_HEADER: &str = "x-ftd-console";

async fn authenticate(
    State(state): State<ApiState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    // Who a refused session is (the audit log names who tried).
    let mut refused_caller = None;
    let verdict = match given {
        Some(v) => match v.strip_prefix("Bearer ") {
            Some(token) if same_secret(token.trim().as_bytes(), state.token.as_bytes()) => {
                Ok(Caller(admin(client)))
            }
            Some(_) => Err(ApiError::Unauthorized(
                "the bearer token is not this node's".into(),
            )),
            None => Err(ApiError::Unauthorized(
                "the Authorization header is not a bearer token".into(),
            )),
        },
        None => match session_cookie(request.headers()) {
            None => Err(ApiError::Unauthorized(
                "this endpoint needs Authorization: Bearer <token> (the node's api-token file) \
                 or a console session"
                    .into(),
            )),
            Some(id) => match state.sessions.touch(&id) {
                None => Err(ApiError::Unauthorized(
                    "the console session ended (idle, or too old): log in again".into(),
                )),
                Some(session) if !session.by_token && !user_unchanged(&state, &session) => {
                    state.sessions.close(&id);
                    Err(ApiError::Unauthorized(format!(
                        "console user {} was deleted or given a new password: the session ended",
                        session.user
                    )))
                }
                Some(session) if !session.by_token && administrator_only(&request) => {
                    refused_caller = Some(session_caller(&session.user, client));
                    Err(ApiError::Forbidden(format!(
                        "console user {} is an operator: the pair secret, the console's \
                         users, VM definitions and forced takeovers are for the administrator \
                         (the API token)",
                        session.user
                    )))
                }
                Some(session) if mutating(&request) && !from_console(&request) => {
                    refused_caller = Some(session_caller(&session.user, client));
                    Err(ApiError::Forbidden(format!(
                        "a change made with a console session must carry the header \
                         {CONSOLE_HEADER}: 1 (a cross-site request is refused)"
                    )))
                }
                Some(session) => Ok(session_caller(&session.user, client)),
            },
        },
    };
    let console_session = match (&verdict, given) {
        (Ok(_), None) => session_cookie(request.headers()).map(ConsoleSession),
        _ => None,
    };
    match verdict {
        Ok(caller) => {
            if let Some(session) = console_session {
                request.extensions_mut().insert(session);
            }
            request.extensions_mut().insert(caller.clone());
            let mut response = next.run(request).await;
            response.extensions_mut().insert(caller);
            response
        }
        Err(refusal) => {
            let mut response = refusal.into_response();
            if let Some(caller) = refused_caller {
                response.extensions_mut().insert(caller);
            }
            response
        }
    }
}

/// The audit log's name of a console session's user.
fn session_caller(user: &str, client: SocketAddr) -> Caller {
    Caller(format!("{user}@{} (console)", client.ip()))
}

/// Whether the session's user still exists with the password it logged
/// in with (a deleted user's sessions, and those opened before a new
/// password, end at their next request).
pub(super) fn user_unchanged(
    state: &ApiState,
    session: &crate::console::sessions::Session,
) -> bool {
    state
        .manager
        .store()
        .user(&session.user)
        .is_ok_and(|u| u.is_some_and(|u| u.revision == session.user_revision))
}

/// What only the API token's holder (the administrator) may do: read the
/// pair secret or pair the node; make, change or delete console users;
/// define or delete a VM (a definition names files on the host, which the
/// daemon reads as root); force a takeover (which can make two active
/// copies). A console user is an operator: everything else (running,
/// protecting and moving the VMs, maintenance, the logs). Decided on the
/// route that matched, not on the raw path.
pub(super) fn administrator_only(request: &Request) -> bool {
    let Some(route) = request.extensions().get::<MatchedPath>() else {
        return true;
    };
    let method = request.method();
    match route.as_str() {
        "/api/pair" | "/api/pair/peer" | "/api/users/{name}" => true,
        "/api/vms" => method == Method::POST,
        "/api/vms/{name}" => method == Method::DELETE,
        "/api/vms/{name}/takeover" => true,
        _ => false,
    }
}

fn mutating(request: &Request) -> bool {
    !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    )
}

fn from_console(request: &Request) -> bool {
    request
        .headers()
        .get(CONSOLE_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1")
}

/// The audit log's name of an authenticated client.
pub(crate) fn admin(client: SocketAddr) -> String {
    format!("admin@{}", client.ip())
}

/// Writes every mutating request to the audit log with its outcome.
async fn audit(
    State(state): State<ApiState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    // The pair information carries the secret: its reads are audited too.
    let audited = mutating(&request) || request.uri().path() == "/api/pair";
    if !audited {
        return next.run(request).await;
    }
    let authorized = request.headers().contains_key(header::AUTHORIZATION);
    // With the query: it can say what was asked (`protect?level=ha`).
    let action = match request.uri().path_and_query() {
        Some(pq) => format!("{} {pq}", request.method()),
        None => format!("{} {}", request.method(), request.uri().path()),
    };
    let response = next.run(request).await;
    let status = response.status();
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_AUDITED_BODY)
        .await
        .unwrap_or_default();
    let result = if status.is_success() {
        "ok".to_string()
    } else {
        serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.message)
            .unwrap_or_else(|_| status.to_string())
    };
    let who = match (parts.extensions.get::<Caller>(), authorized, status) {
        (Some(caller), _, _) => caller.0.clone(),
        (None, true, StatusCode::UNAUTHORIZED) => format!("bad-token@{}", client.ip()),
        (None, true, _) => admin(client),
        (None, false, _) => format!("anonymous@{}", client.ip()),
    };
    if let Err(e) = state
        .manager
        .store()
        .add_audit(&who, &action, status.as_u16(), &result)
    {
        tracing::error!(error = %e, %action, "cannot write the audit log");
    }
    tracing::info!(%who, %action, status = status.as_u16(), %result, "audit");
    Response::from_parts(parts, Body::from(bytes))
}
