//! `POST /v1/chat/completions`.

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use serde::Serialize;

use super::chat_input::{self, ChatCompletionRequest};
use super::error::ApiError;
use super::extract::ApiJson;
use super::generation::{self, finish_name, Generation, Meta, SseItem, Step};
use super::log::RequestLog;
use super::wire::{token_limit, Usage};
use super::AppState;
use crate::engine::{OutputConstraint, TokenAlternative, TokenLogprob, ToolCallEvent};
use crate::registry::Purpose;

const MAX_TOP_LOGPROBS: i64 = 20;

/// The grammar the output must follow: `response_format` or a `guided_*`
/// extension, not both.
fn output_constraint(req: &ChatCompletionRequest) -> Result<Option<OutputConstraint>, ApiError> {
    if req.stream_options.is_some() && !req.stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed with `stream: true`",
        ));
    }
    match (
        chat_input::response_format(req.response_format.as_ref())?,
        req.guided.constraint()?,
    ) {
        (Some(_), Some(g)) => Err(ApiError::invalid(
            g.param,
            format!("`{}` cannot be combined with `response_format`", g.param),
        )),
        (a, b) => Ok(a.or(b)),
    }
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
    let constraint = output_constraint(&req)?;
    let tools = chat_input::tool_use(&req)?;
    log.user(req.sampling.user.as_deref());
    let messages = chat_input::messages(&req.messages)?;
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
    let job = chat_input::ChatSpec {
        messages,
        max_tokens,
        default_max_tokens: defaults.max_tokens.map(|m| m as usize),
        sampling,
        fields: &req.sampling,
        tools,
        constraint,
    }
    .job(&state, &target, "messages", &log)?;
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
                // OpenAI sends null content beside tool calls when there is no text.
                content: (!c.text.is_empty() || c.tool_calls.is_empty()).then_some(c.text),
                refusal: None,
                tool_calls: (!c.tool_calls.is_empty())
                    .then(|| c.tool_calls.iter().map(ToolCallOut::new).collect()),
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
                tool_calls: None,
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
                    tool_calls: None,
                },
                logprobs: step_meta.logprobs.then(|| Logprobs::new(&logprobs)),
                finish_reason: None,
            },
            Step::ToolCall { index, call } => return tool_call_chunks(&step_meta, index, &call),
            Step::Finished { index, reason } => ChunkChoice {
                index,
                delta: Delta {
                    role: None,
                    content: None,
                    tool_calls: None,
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
    content: Option<String>,
    refusal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<ToolCallOut>>,
}

/// A tool call in a response, or a piece of one in a stream: the first
/// chunk of a call carries its id, type and name, later ones add to its
/// arguments, as OpenAI streams them.
#[derive(Serialize)]
struct ToolCallOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionOut,
}

#[derive(Serialize)]
struct FunctionOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    arguments: String,
}

impl ToolCallOut {
    fn new(call: &ToolCallEvent) -> Self {
        Self {
            index: None,
            id: Some(call.id.clone()),
            kind: Some("function"),
            function: FunctionOut {
                name: Some(call.name.clone()),
                arguments: call.arguments.clone(),
            },
        }
    }
}

/// A call as two chunks: its head (id, type, name, empty arguments), then
/// its arguments.
fn tool_call_chunks(meta: &Meta, index: usize, call: &ToolCallEvent) -> SseItem {
    let head = ToolCallOut {
        index: Some(call.position),
        function: FunctionOut {
            name: Some(call.name.clone()),
            arguments: String::new(),
        },
        ..ToolCallOut::new(call)
    };
    let args = ToolCallOut {
        index: Some(call.position),
        id: None,
        kind: None,
        function: FunctionOut {
            name: None,
            arguments: call.arguments.clone(),
        },
    };
    let items = [head, args].map(|c| {
        let choice = ChunkChoice {
            index,
            delta: Delta {
                role: None,
                content: None,
                tool_calls: Some(vec![c]),
            },
            logprobs: None,
            finish_reason: None,
        };
        chunk(meta, vec![choice], None)
    });
    SseItem::concat(items)
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
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<ToolCallOut>>,
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
