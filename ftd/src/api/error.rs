//! Every error the API answers: a status and an [`ErrorBody`] saying what
//! is wrong. Bad requests get a 4xx, never a 5xx; a 5xx means the node
//! itself failed (its database), and says how.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::manager::ManagerError;
use crate::model::{ErrorBody, FieldError};
use crate::pair::forward::ForwardError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{}: {}", .0.field, .0.reason)]
    InvalidField(FieldError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    TooManyRequests(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unavailable(String),
    /// The other node, asked on the caller's behalf, failed.
    #[error("{0}")]
    BadGateway(String),
    /// The other node, asked on the caller's behalf, gave no answer: the
    /// outcome is unknown.
    #[error("{0}")]
    GatewayTimeout(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidField(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidField(_) => "invalid_field",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::TooManyRequests(_) => "too_many_requests",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::BadGateway(_) => "bad_gateway",
            ApiError::GatewayTimeout(_) => "outcome_unknown",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.code().to_string(),
            message: self.to_string(),
            field: match self {
                ApiError::InvalidField(f) => Some(f.field.clone()),
                _ => None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::error!(error = %self, "API request failed");
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        if matches!(self, ApiError::Unauthorized(_)) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if self.status().is_client_error() {
            // A request refused may not have had its body read to the end
            // (a 413, a 415 or a 401 is decided before it is): such a
            // connection cannot carry another request. Saying so on every
            // refusal keeps a client from reusing it (a pooled client's
            // next request otherwise raced the close and failed with "peer
            // disconnected", after a 413 and after a 415).
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        let text = rejection.body_text();
        match rejection {
            JsonRejection::JsonDataError(_) => ApiError::InvalidField(FieldError {
                field: data_error_field(&text),
                reason: text,
            }),
            JsonRejection::JsonSyntaxError(_) => ApiError::BadRequest(text),
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
                "send the body as JSON (Content-Type: application/json)".into(),
            ),
            JsonRejection::BytesRejection(_) if rejection_is_too_large(rejection.status()) => {
                ApiError::PayloadTooLarge(format!(
                    "the body is larger than {} bytes",
                    super::MAX_BODY
                ))
            }
            _ => ApiError::BadRequest(text),
        }
    }
}

fn rejection_is_too_large(status: StatusCode) -> bool {
    status == StatusCode::PAYLOAD_TOO_LARGE
}

/// serde_json names the field in "... at line 1 column 9" messages only
/// by position; pull out a field named in backticks when there is one.
fn data_error_field(text: &str) -> String {
    text.split('`').nth(1).unwrap_or("body").to_string()
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        ApiError::BadRequest(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::BadRequest(rejection.body_text())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NameInUse(_) => ApiError::Conflict(e.to_string()),
            StoreError::NoSuchVm(_) => ApiError::NotFound(e.to_string()),
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> ApiError {
        match e {
            ManagerError::Store(e) => e.into(),
            ManagerError::Invalid(f) => ApiError::InvalidField(f),
            ManagerError::NoSuchNode(_) => ApiError::NotFound(e.to_string()),
            ManagerError::Running(_)
            | ManagerError::NotRunning(_)
            | ManagerError::NoPeer(_)
            | ManagerError::NoTakeover(_)
            | ManagerError::NoSwitchover(_)
            | ManagerError::SwitchoverFailed(_)
            | ManagerError::Forward(ForwardError::ChannelDown { .. })
            | ManagerError::Forward(ForwardError::PeerTooOld { .. })
            | ManagerError::PeerRefused { .. }
            | ManagerError::NoMaintenance(_) => ApiError::Conflict(e.to_string()),
            ManagerError::Forward(ForwardError::Late { .. })
            | ManagerError::Forward(ForwardError::Unanswered { .. }) => {
                ApiError::GatewayTimeout(e.to_string())
            }
            ManagerError::PeerNotFound { .. } => ApiError::NotFound(e.to_string()),
            ManagerError::PeerFailed { .. } => ApiError::BadGateway(e.to_string()),
            ManagerError::NoSuchUser(_) => ApiError::NotFound(e.to_string()),
            ManagerError::Password(_) => ApiError::Internal(e.to_string()),
        }
    }
}
