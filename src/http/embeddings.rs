//! `POST /v1/embeddings` in the OpenAI shape: `input` as a string, a list
//! of strings, a list of token ids or a list of such lists;
//! `encoding_format` `float` or `base64`; `dimensions` where the model
//! allows it. Extensions: `truncate` (default true: texts longer than the
//! model's limit are cut, as sentence-transformers does; false refuses
//! them), `keep_alive`, `timeout`.

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use super::extract::ApiJson;
use super::log::RequestLog;
use super::wire::LifetimeFields;
use super::AppState;
use crate::engine::{EmbedInput, EmbedRequest};

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// The request body.
#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: Value,
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
    /// End-user id; recorded in the request log.
    pub user: Option<String>,
    pub truncate: Option<bool>,
    #[serde(flatten)]
    pub lifetime: LifetimeFields,
}

#[derive(Debug, Serialize)]
struct EmbeddingResponse {
    object: &'static str,
    data: Vec<EmbeddingData>,
    model: String,
    usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
struct EmbeddingData {
    object: &'static str,
    index: usize,
    embedding: Encoded,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Encoded {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
struct EmbeddingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

fn bad_input(message: impl Into<String>) -> ApiError {
    ApiError::invalid("input", message)
}

/// A token id: a non-negative integer below 2^32.
fn token(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|t| u32::try_from(t).ok())
}

/// `input` as the API allows it, every form checked.
pub fn inputs(input: Value) -> Result<Vec<EmbedInput>, ApiError> {
    let expected = "`input` must be a string, a list of strings, a list of token ids, or a list of token-id lists";
    let inputs = match input {
        Value::String(s) => vec![EmbedInput::Text(s)],
        Value::Array(items) => {
            if items.is_empty() {
                return Err(bad_input("`input` must not be an empty list"));
            }
            if items.iter().all(Value::is_string) {
                items
                    .into_iter()
                    .map(|v| match v {
                        Value::String(s) => EmbedInput::Text(s),
                        _ => unreachable!("checked to be strings"),
                    })
                    .collect()
            } else if items.iter().all(Value::is_number) {
                let ids: Option<Vec<u32>> = items.iter().map(token).collect();
                let ids = ids.ok_or_else(|| {
                    bad_input("token ids must be integers between 0 and 4294967295")
                })?;
                vec![EmbedInput::Tokens(ids)]
            } else if items.iter().all(Value::is_array) {
                let mut lists = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let Some(list) = item.as_array() else {
                        return Err(bad_input(expected));
                    };
                    let ids: Option<Vec<u32>> = list.iter().map(token).collect();
                    let ids = ids.ok_or_else(|| {
                        bad_input(format!(
                            "input {i}: token ids must be integers between 0 and 4294967295"
                        ))
                    })?;
                    lists.push(EmbedInput::Tokens(ids));
                }
                lists
            } else {
                return Err(bad_input(expected));
            }
        }
        _ => return Err(bad_input(expected)),
    };
    if inputs.len() > MAX_INPUTS {
        return Err(bad_input(format!(
            "at most {MAX_INPUTS} inputs per request, got {}",
            inputs.len()
        )));
    }
    for (i, input) in inputs.iter().enumerate() {
        let empty = match input {
            EmbedInput::Text(s) => s.is_empty(),
            EmbedInput::Tokens(t) => t.is_empty(),
        };
        if empty {
            return Err(bad_input(format!("input {i} is empty")));
        }
    }
    Ok(inputs)
}

/// Little-endian f32 bytes in base64, as OpenAI's clients decode them.
fn base64_of(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The handler.
pub async fn handle(
    State(state): State<AppState>,
    Extension(log): Extension<RequestLog>,
    Extension(key): Extension<std::sync::Arc<crate::tenancy::Principal>>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<EmbeddingRequest>,
) -> Result<Response, ApiError> {
    state.accepting()?;
    let user = req.user.as_deref();
    let target = super::versions::resolve(&state, &log, &key, &req.model, user, &headers)?;
    log.user(req.user.as_deref());
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`encoding_format` must be `float` or `base64`, got `{other}`"),
            ))
        }
    };
    let dimensions = match req.dimensions {
        None => None,
        Some(d) if d >= 1 => Some(usize::try_from(d).unwrap_or(usize::MAX)),
        Some(d) => {
            return Err(ApiError::invalid(
                "dimensions",
                format!("`dimensions` must be at least 1, got {d}"),
            ))
        }
    };
    let inputs = inputs(req.input)?;
    let timeout = req.lifetime.timeout()?.or(state.request_timeout);
    let keep_alive = req.lifetime.keep_alive()?;
    state.registry.check_embedding(&target.name)?;
    let request = EmbedRequest {
        inputs,
        truncate: req.truncate.unwrap_or(true),
        dimensions,
        deadline: timeout.map(|t| log.arrived() + t),
        tenant: log.key_name(),
    };
    super::versions::shadow_embedding(&state.registry, &target, &request, keep_alive);
    let lease = state.registry.acquire(&target.name, keep_alive).await?;
    let result = lease.embed(request).await?;
    state
        .registry
        .metrics()
        .prompt_tokens
        .get_or_create(&crate::metrics::Metrics::model(&target.name))
        .inc_by(result.prompt_tokens as u64);
    log.embedding_tokens(result.prompt_tokens);
    log.compute_started(result.started);
    let data = result
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| EmbeddingData {
            object: "embedding",
            index,
            embedding: if base64 {
                Encoded::Base64(base64_of(&v))
            } else {
                Encoded::Float(v)
            },
        })
        .collect();
    let body = EmbeddingResponse {
        object: "list",
        data,
        model: target.name,
        usage: EmbeddingUsage {
            prompt_tokens: result.prompt_tokens,
            total_tokens: result.prompt_tokens,
        },
    };
    Ok(Json(body).into_response())
}
