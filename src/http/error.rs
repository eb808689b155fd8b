//! Every error a client can see, in the OpenAI shape
//! (`{"error": {"message", "type", "param", "code"}}`), and the one place
//! where errors of the rooms below become HTTP status codes.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::engine::EngineError;
use crate::registry::RegistryError;
use crate::tenancy::{Denied, Limited};

/// An error response.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI `type`.
    pub kind: &'static str,
    /// Human-readable message.
    pub message: String,
    /// The request parameter at fault.
    pub param: Option<String>,
    /// Machine-readable code.
    pub code: Option<&'static str>,
    /// Seconds to wait before retrying (sets `Retry-After`).
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

/// The inner object of an error body; also sent as an SSE event when a
/// stream fails after it started.
#[derive(Serialize)]
pub struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: a parameter has a bad value.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message).param(param)
    }

    /// 400: the request is malformed as a whole.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 404 for a path no route serves.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no route for {method} {path}"),
        )
        .code("not_found")
    }

    /// 405 for a known path with another method.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method not allowed on this path",
        )
        .code("method_not_allowed")
    }

    /// 413: the body is over the configured limit.
    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body is larger than the limit of {limit} bytes"),
        )
        .code("request_too_large")
    }

    /// 408: the body did not arrive in time.
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {}s",
                limit.as_secs_f64()
            ),
        )
        .code("request_timeout")
    }

    /// 500: a bug or a failure inside the daemon. The client gets the
    /// request id, the details stay in the server log under it.
    pub fn internal() -> Self {
        let message = match super::log::current_request_id() {
            Some(id) => format!("internal error (request id {id})"),
            None => "internal error".to_string(),
        };
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message).code("internal_error")
    }

    /// 500 for a failure inside the daemon: `detail` goes to the log under
    /// the request id, the client gets [`ApiError::internal`].
    pub fn internal_because(detail: impl std::fmt::Display) -> Self {
        tracing::error!(
            request_id = super::log::current_request_id().as_deref().unwrap_or("-"),
            error = %detail,
            "internal error"
        );
        Self::internal()
    }

    /// 503: the daemon is shutting down.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
        )
        .code("shutting_down")
        .retry(1)
    }

    /// 503: the replica sleeps (`POST /sleep`) and wakes only on
    /// `POST /wake_up`.
    pub fn asleep(retry_after: std::time::Duration) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "this replica is asleep; try another replica or again later",
        )
        .code("sleeping")
        .retry(retry_after.as_secs().max(1))
    }

    /// 503: a store the request needs does not answer; the detail goes to
    /// the log under the request id.
    pub fn unavailable_because(what: &str, detail: impl std::fmt::Display) -> Self {
        tracing::error!(
            request_id = super::log::current_request_id().as_deref().unwrap_or("-"),
            error = %detail,
            "{what} unavailable"
        );
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!("{what} is unavailable; try again shortly"),
        )
        .code("service_unavailable")
        .retry(5)
    }

    /// 403: the key may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message).code("permission_denied")
    }

    /// 403 unless `key` may use `model`.
    pub fn check_model(key: &crate::tenancy::Principal, model: &str) -> Result<(), Self> {
        if key.may_use(model) {
            Ok(())
        } else {
            Err(
                Self::forbidden(format!("this API key may not use model `{model}`"))
                    .param("model")
                    .code("model_not_allowed"),
            )
        }
    }

    /// Sets the parameter at fault.
    pub fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// Names the parameter at fault for a client error that names none.
    pub fn param_or(mut self, param: &str) -> Self {
        if self.param.is_none() && self.status == StatusCode::BAD_REQUEST {
            self.param = Some(param.to_string());
        }
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn retry(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The inner error object.
    pub fn detail(&self) -> Detail<'_> {
        Detail {
            message: &self.message,
            kind: self.kind,
            param: self.param.as_deref(),
            code: self.code,
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::QueueFull { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
                    .code("rate_limit_exceeded")
                    .retry(1)
            }
            EngineError::ContextLengthExceeded { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
                    .code("context_length_exceeded")
            }
            EngineError::InvalidInput { param, .. } => Self::invalid(param, message),
            // A worker that failed to load is the registry's failed load.
            e @ EngineError::LoadFailed { .. } => RegistryError::from(e).into(),
            EngineError::DeadlineExceeded { .. } => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", message)
                    .param("timeout")
                    .code("deadline_exceeded")
            }
            EngineError::Stopped(_) => Self::shutting_down(),
            EngineError::Compute(detail) => Self::internal_because(detail),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let message = e.to_string();
        match e {
            RegistryError::NotFound(_) => {
                Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
                    .param("model")
                    .code("model_not_found")
            }
            RegistryError::WrongKind { .. } => {
                Self::invalid("model", message).code("model_not_supported")
            }
            RegistryError::Loading(_) => {
                Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
                    .code("model_loading")
                    .retry(1)
            }
            RegistryError::LoadFailed { retry_after, .. } => {
                let e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                    .code("model_load_failed");
                Self {
                    retry_after: Some(retry_after.unwrap_or(1)),
                    ..e
                }
            }
            RegistryError::NoRoom { retry_after, .. } => {
                let e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                    .code("insufficient_memory");
                Self { retry_after, ..e }
            }
            RegistryError::Engine(e) => e.into(),
            RegistryError::BadRoute(_) => Self::invalid("route", message).code("invalid_route"),
            RegistryError::Conflict(_) => {
                Self::new(StatusCode::CONFLICT, "invalid_request_error", message).code("conflict")
            }
        }
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        let message = match d {
            Denied::Missing => {
                "missing API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`)"
            }
            Denied::Unknown => "invalid API key",
        };
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .code("invalid_api_key")
    }
}

/// Whole seconds, rounded up, as `Retry-After` wants.
fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl From<Limited> for ApiError {
    fn from(l: Limited) -> Self {
        let limited = |what: &str, retry_after| {
            Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "rate limit reached for {what} per minute on this API key; retry in {}s",
                    ceil_secs(retry_after)
                ),
            )
            .code("rate_limit_exceeded")
            .retry(ceil_secs(retry_after).max(1))
        };
        match l {
            Limited::Requests { retry_after, .. } => limited("requests", retry_after),
            Limited::Tokens { retry_after, .. } => limited("tokens", retry_after),
            Limited::Quota {
                quota,
                period,
                retry_after,
            } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                format!(
                    "this API key has used its quota of {quota} tokens for the {}",
                    match period {
                        crate::tenancy::Period::Day => "day",
                        crate::tenancy::Period::Month => "month",
                    }
                ),
            )
            .code("insufficient_quota")
            .retry(ceil_secs(retry_after).max(1)),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), code = ?self.code, "{}", self.message);
        }
        let mut resp = (
            self.status,
            Json(Body {
                error: self.detail(),
            }),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
