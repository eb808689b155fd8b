//! `POST /v1/chat/completions`.

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use kindling_models::ChatMessage;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::ApiJson;
use super::generation::{self, finish_name, Generation, Job, Meta, SseItem, Step};
use super::log::RequestLog;
use super::wire::{token_limit, SamplingFields, StreamOptions, Usage};
use super::AppState;
use crate::engine::{GenerateSpec, Prompt, TokenAlternative, TokenLogprob};
use crate::registry::Purpose;

/// The request body.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<MessageIn>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    pub response_format: Option<serde_json::Value>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// One input message.
#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// Message content: a string, or a list of parts of which we read the text ones.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One content part.
#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

const MAX_TOP_LOGPROBS: i64 = 20;

/// Features clients may send that this server does not implement: refuse
/// them rather than answer as if they were honoured.
fn unsupported(req: &ChatCompletionRequest) -> Result<(), ApiError> {
    let present = |v: &Option<serde_json::Value>| v.as_ref().is_some_and(|v| !v.is_null());
    if req
        .tools
        .as_ref()
        .is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::invalid("tools", "tool calling is not supported"));
    }
    if present(&req.tool_choice)
        && req.tool_choice.as_ref().and_then(|v| v.as_str()) != Some("none")
    {
        return Err(ApiError::invalid(
            "tool_choice",
            "tool calling is not supported",
        ));
    }
    let format = req
        .response_format
        .as_ref()
        .and_then(|f| f.get("type"))
        .and_then(|t| t.as_str());
    if present(&req.response_format) && format != Some("text") {
        return Err(ApiError::invalid(
            "response_format",
            "only `{\"type\": \"text\"}` is supported",
        ));
    }
    if req.stream_options.is_some() && !req.stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed with `stream: true`",
        ));
    }
    Ok(())
}

fn messages(input: &[MessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if input.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    input
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].role"),
                        format!("role `{other}` is not supported (system, developer, user, assistant are)"),
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!("content part of type `{kind}` is not supported by this model (text is)"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage { role: role.to_string(), content })
        })
        .collect()
}

/// The handler.
pub async fn handle(
    State(state): State<AppState>,
    Extension(log): Extension<RequestLog>,
    Extension(key): Extension<std::sync::Arc<crate::tenancy::Principal>>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    state.accepting()?;
    let user = req.sampling.user.as_deref();
    let target = super::versions::resolve(&state, &log, &key, &req.model, user, &headers)?;
    unsupported(&req)?;
    log.user(req.sampling.user.as_deref());
    let messages = messages(&req.messages)?;
    let top_logprobs = match (req.logprobs, req.top_logprobs) {
        (_, Some(k)) if !(0..=MAX_TOP_LOGPROBS).contains(&k) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` requires `logprobs: true`",
            ))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let max_tokens = match token_limit("max_completion_tokens", req.max_completion_tokens)? {
        Some(m) => Some(m),
        None => token_limit("max_tokens", req.max_tokens)?,
    };
    let defaults = state.registry.text_defaults(&target.name, Purpose::Chat)?;
    let sampling = req.sampling.validate(&defaults, top_logprobs)?;
    let request = GenerateSpec {
        prompts: vec![Prompt::Chat(messages)],
        max_tokens,
        default_max_tokens: defaults.max_tokens.map(|m| m as usize),
        stop: sampling.stop,
        n: sampling.n,
        sampling: sampling.params,
        echo: false,
        ignore_eos: req.sampling.ignore_eos,
        min_tokens: sampling.min_tokens,
    }
    .validate()?;
    let job = Job::new(
        &target.name,
        request,
        &req.sampling,
        "messages",
        &log,
        state.request_timeout,
    )?;
    super::versions::shadow_generation(&state.registry, &target, &job.request, job.keep_alive);
    let meta = Meta::new("chatcmpl", &log, &target.name, req.logprobs);
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        let render = move |gen| stream(gen, meta, include_usage);
        return generation::stream_response(&state.registry, job, log, render).await;
    }
    let gen = generation::start(&state.registry, job).await?;
    let cold_load = gen.cold_load;
    let (choices, usage) = gen.collect().await?;
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| Choice {
            index,
            message: MessageOut {
                role: "assistant",
                content: c.text,
                refusal: None,
            },
            logprobs: meta.logprobs.then(|| Logprobs::new(&c.logprobs)),
            finish_reason: c.finish_reason.map(finish_name),
        })
        .collect();
    let body = ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        choices,
        usage,
    };
    let mut resp = Json(body).into_response();
    generation::mark_cold(&mut resp, cold_load);
    Ok(resp)
}

fn chunk(meta: &Meta, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> SseItem {
    SseItem::chunk(&ChatCompletionChunk {
        id: &meta.id,
        object: "chat.completion.chunk",
        created: meta.created,
        model: &meta.model,
        choices,
        usage,
    })
}

fn stream(gen: Generation, meta: Meta, include_usage: bool) -> impl Stream<Item = SseItem> {
    // The first chunk of each choice carries the assistant role.
    let roles: Vec<SseItem> = (0..gen.choices)
        .map(|index| {
            let delta = Delta {
                role: Some("assistant"),
                content: Some(String::new()),
            };
            chunk(
                &meta,
                vec![ChunkChoice {
                    index,
                    delta,
                    logprobs: None,
                    finish_reason: None,
                }],
                None,
            )
        })
        .collect();
    let step_meta = meta.clone();
    let render = move |step| {
        let choice = match step {
            Step::Delta {
                index,
                text,
                logprobs,
            } => ChunkChoice {
                index,
                delta: Delta {
                    role: None,
                    content: Some(text),
                },
                logprobs: step_meta.logprobs.then(|| Logprobs::new(&logprobs)),
                finish_reason: None,
            },
            Step::Finished { index, reason } => ChunkChoice {
                index,
                delta: Delta {
                    role: None,
                    content: None,
                },
                logprobs: None,
                finish_reason: Some(finish_name(reason)),
            },
        };
        chunk(&step_meta, vec![choice], None)
    };
    let usage = move |usage| chunk(&meta, Vec::new(), Some(usage));
    futures::stream::iter(roles).chain(generation::sse_events(gen, include_usage, render, usage))
}

#[derive(Serialize)]
struct ChatCompletion {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    choices: Vec<Choice>,
    usage: Usage,
}

#[derive(Serialize)]
struct Choice {
    index: usize,
    message: MessageOut,
    logprobs: Option<Logprobs>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct MessageOut {
    role: &'static str,
    content: String,
    refusal: Option<String>,
}

#[derive(Serialize)]
struct ChatCompletionChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct ChunkChoice {
    index: usize,
    delta: Delta,
    logprobs: Option<Logprobs>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
}

#[derive(Serialize)]
struct Logprobs {
    content: Vec<LogprobEntry>,
    refusal: Option<Vec<LogprobEntry>>,
}

#[derive(Serialize)]
struct LogprobEntry {
    token: String,
    logprob: f32,
    bytes: Vec<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<Vec<LogprobEntry>>,
}

impl LogprobEntry {
    fn new(alt: &TokenAlternative, top: Option<&[TokenAlternative]>) -> Self {
        Self {
            token: alt.token.clone(),
            logprob: alt.logprob,
            bytes: alt.bytes.clone(),
            top_logprobs: top.map(|t| t.iter().map(|a| Self::new(a, None)).collect()),
        }
    }
}

impl Logprobs {
    fn new(tokens: &[TokenLogprob]) -> Self {
        Self {
            content: tokens
                .iter()
                .map(|t| LogprobEntry::new(&t.chosen, Some(&t.top)))
                .collect(),
            refusal: None,
        }
    }
}
