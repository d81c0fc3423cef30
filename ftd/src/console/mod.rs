//! The web console, served by `ftd` on its API address: pages for the
//! pair's nodes, VMs, alerts and the audit log, with live charts. It
//! speaks only the REST API, logged in by a session cookie
//! (`POST /api/session` with the API token).
//!
//! The console's own pages (`ftd/console/`) are built into the binary; its
//! third-party charting library (uPlot, from the npm registry) is read
//! from the configured `console_dir`, where `images/console-vendor.sh INSTALL_DIR`
//! installs it: nothing is downloaded when the page is used.

pub mod sessions;

use std::path::{Path, PathBuf};

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use crate::api::ApiState;

/// The console's pages, built in.
const INDEX_HTML: &str = include_str!("../../console/index.html");
const CONSOLE_JS: &str = include_str!("../../console/console.js");
const CONSOLE_CSS: &str = include_str!("../../console/console.css");

/// The third-party files the console loads from `console_dir/vendor`.
pub const VENDOR_FILES: &[(&str, &str)] = &[
    ("uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    ("uPlot.min.css", "text/css; charset=utf-8"),
];

/// What the pages may load: only from this origin (no inline script).
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; \
     frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The console's routes (no authentication: the pages hold no data; the
/// API they call does).
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route(
            "/console/",
            get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/console.js",
            get(|| async { page(CONSOLE_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/console.css",
            get(|| async { page(CONSOLE_CSS, "text/css; charset=utf-8") }),
        )
        .route("/console/vendor/{file}", get(vendor))
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    let mut response = (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    response
}

/// The path of vendor file `name` under `dir`, if it is one the console
/// knows.
pub fn vendor_path(dir: &Path, name: &str) -> Option<(PathBuf, &'static str)> {
    VENDOR_FILES
        .iter()
        .find(|(file, _)| *file == name)
        .map(|(file, content_type)| (dir.join("vendor").join(file), *content_type))
}

async fn vendor(State(state): State<ApiState>, UrlPath(name): UrlPath<String>) -> Response {
    let dir = state.manager.config().console_dir.clone();
    let Some((path, content_type)) = vendor_path(&dir, &name) else {
        return (StatusCode::NOT_FOUND, format!("no console file {name}\n")).into_response();
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, "max-age=3600"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            bytes,
        )
            .into_response(),
        Err(e) => (
            StatusCode::NOT_FOUND,
            format!(
                "the console's {name} is not installed at {} ({e}): run images/console-vendor.sh INSTALL_DIR \
                 (the lab images have it)\n",
                path.display()
            ),
        )
            .into_response(),
    }
}
