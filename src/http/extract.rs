//! A JSON body extractor whose every rejection is an OpenAI-shaped error:
//! malformed JSON and wrong types are 400, an oversized body is 413, a body
//! that does not arrive within the read timeout is 408.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;

/// Like `axum::Json`, with errors clients can read.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let read = async {
            match axum::Json::<T>::from_request(req, state).await {
                Ok(axum::Json(v)) => Ok(Self(v)),
                Err(rejection) => Err(reject(rejection, state.max_body_size)),
            }
        };
        super::edge::read_body(state, read).await
    }
}

fn reject(rejection: JsonRejection, limit: u64) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::too_large(limit);
    }
    match rejection {
        JsonRejection::JsonDataError(e) => {
            // serde's message names the field and what it expected.
            ApiError::bad_request(format!("invalid request body: {}", source_text(&e)))
        }
        JsonRejection::JsonSyntaxError(e) => ApiError::bad_request(format!(
            "request body is not valid JSON: {}",
            source_text(&e)
        )),
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::bad_request("expected a JSON body with `Content-Type: application/json`")
        }
        other => ApiError::bad_request(format!("cannot read request body: {}", other.body_text())),
    }
}

fn source_text(e: &dyn std::error::Error) -> String {
    let mut inner: &dyn std::error::Error = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    inner.to_string()
}
