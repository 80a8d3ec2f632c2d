//! The API's one error type and the extractors that turn bad input into it.

use std::time::Duration;

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cluster::node::ClusterError;
use crate::state::{DomainError, ErrorCode};

/// Largest request body the API accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Sent as `Retry-After` (seconds) when set.
    retry_after_secs: Option<u64>,
}

/// Every error answer: `{"error":{"code":"...","message":"..."}}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable: `not_found`, `invalid_argument`,
    /// `already_exists`, `unauthenticated`, `forbidden`, `unavailable`, ...
    pub code: String,
    /// What was wrong and how to fix it, in words.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// 429: the caller sent too many requests of this kind; `Retry-After`
    /// says when to try again.
    pub fn rate_limited(message: impl Into<String>, retry_after_secs: u64) -> Self {
        let mut error = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
        error.retry_after_secs = Some(retry_after_secs.max(1));
        error
    }

    /// 400: the request names or says something impossible.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    /// 400: the request itself is malformed (body, query, headers).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 404 for a project that does not exist or that the caller has no
    /// role in: the two are never told apart.
    pub fn project_not_found(name: &str) -> Self {
        Self::not_found(format!("project {name:?} does not exist"))
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        )
    }

    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "already_exists", message)
    }

    /// 409: the object is not in a state that allows this yet.
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "failed_precondition", message)
    }

    /// 421: the request must be made through another node's API.
    pub fn wrong_node(message: impl Into<String>) -> Self {
        Self::new(StatusCode::MISDIRECTED_REQUEST, "wrong_node", message)
    }

    /// A websocket route reached without the upgrade (the status is the
    /// one the upgrade's refusal chose).
    pub fn upgrade_required(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, "upgrade_required", message)
    }

    /// 413 for a request body over [`MAX_BODY_BYTES`].
    pub fn body_too_large() -> Self {
        Self::too_large(format!(
            "request body is larger than {MAX_BODY_BYTES} bytes"
        ))
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// 507: this node has not the room the request needs.
    pub fn insufficient_storage(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            message,
        )
    }

    pub fn import_failed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "import_failed", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn not_ready(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message)
    }

    pub fn unconfigured(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unconfigured", message)
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
    }

    pub(crate) fn internal(error: &(dyn std::error::Error + 'static)) -> Self {
        let request_id = crate::cluster::join::random_hex(8);
        tracing::error!(request_id, error = %crate::error_chain(error), "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error (request id {request_id}); the agent's log has the details"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_client_error() {
            tracing::debug!(code = self.code, message = %self.message, "request refused");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        response
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        let status = match e.code {
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::AlreadyExists => StatusCode::CONFLICT,
            ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorCode::TokenInvalid | ErrorCode::TokenExpired | ErrorCode::TokenUsed => {
                StatusCode::FORBIDDEN
            }
            ErrorCode::FailedPrecondition => StatusCode::CONFLICT,
            ErrorCode::QuotaExceeded => StatusCode::CONFLICT,
            ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        };
        Self::new(status, e.code.as_str(), e.message)
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Domain(d) => d.into(),
            ClusterError::NoLeader { .. }
            | ClusterError::NoQuorum
            | ClusterError::NotLeader { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                crate::error_chain(&e),
            ),
            ClusterError::Unconfirmed { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
            ClusterError::Peer(_) | ClusterError::Leader { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!(
                    "{}; the outcome is unknown, retry the request",
                    crate::error_chain(&e)
                ),
            ),
            ClusterError::Refused { message } => {
                Self::new(StatusCode::FORBIDDEN, "forbidden", message)
            }
            ClusterError::Membership { .. } => {
                Self::new(StatusCode::CONFLICT, "failed_precondition", e.to_string())
            }
            other => Self::internal(&other),
        }
    }
}

impl From<crate::state::ReadError> for ApiError {
    fn from(e: crate::state::ReadError) -> Self {
        Self::internal(&e)
    }
}

/// `Json` whose rejections use the API's error body.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let value = match Json::<serde_json::Value>::from_request(req, state).await {
            Ok(Json(value)) => value,
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::body_too_large())
            }
            Err(rejection) => {
                return Err(ApiError::new(
                    // A missing content type stays 415; everything else is 400.
                    match rejection.status() {
                        StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        _ => StatusCode::BAD_REQUEST,
                    },
                    "invalid_request",
                    rejection.body_text(),
                ));
            }
        };
        // serde reads a struct from an array too; every request body of this
        // API is an object, so anything else is refused.
        if !value.is_object() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request body must be a JSON object",
            ));
        }
        serde_json::from_value(value).map(ApiJson).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("the request body does not fit this route: {e}"),
            )
        })
    }
}

/// `Query` whose rejections use the API's error body.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| ApiQuery(value))
            .map_err(|rejection| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    rejection.body_text(),
                )
            })
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
