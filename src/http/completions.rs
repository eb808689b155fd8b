//! `POST /v1/completions` (the legacy text-completion API).

use std::collections::BTreeMap;

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::ApiJson;
use super::generation::{self, finish_name, Generation, Job, Meta, SseItem, Step};
use super::log::RequestLog;
use super::wire::{token_limit, SamplingFields, StreamOptions, Usage};
use super::AppState;
use crate::engine::{GenerateSpec, Prompt, TokenLogprob};
use crate::registry::Purpose;

/// The request body.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptIn,
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    #[serde(flatten)]
    pub guided: super::chat_input::GuidedFields,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `prompt`: a string, a list of strings, token ids, or a list of token-id lists.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// OpenAI's default for this endpoint.
const DEFAULT_MAX_TOKENS: usize = 16;
const MAX_LOGPROBS: i64 = 5;
const MAX_PROMPTS: usize = 64;

fn prompts(p: PromptIn) -> Result<Vec<Prompt>, ApiError> {
    let prompts: Vec<Prompt> = match p {
        PromptIn::Text(t) => vec![Prompt::Text(t)],
        PromptIn::Texts(v) => v.into_iter().map(Prompt::Text).collect(),
        PromptIn::Tokens(ids) => vec![Prompt::Tokens(ids)],
        PromptIn::TokenLists(v) => v.into_iter().map(Prompt::Tokens).collect(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "`prompt` must not be an empty list",
        ));
    }
    if prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "at most {MAX_PROMPTS} prompts per request, got {}",
                prompts.len()
            ),
        ));
    }
    Ok(prompts)
}

/// The handler.
pub async fn handle(
    State(state): State<AppState>,
    Extension(log): Extension<RequestLog>,
    Extension(key): Extension<std::sync::Arc<crate::tenancy::Principal>>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    state.accepting()?;
    let user = req.sampling.user.as_deref();
    let target = super::versions::resolve(&state, &log, &key, &req.model, user, &headers)?;
    if req.stream_options.is_some() && !req.stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed with `stream: true`",
        ));
    }
    log.user(req.sampling.user.as_deref());
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "suffix",
            "`suffix` (fill-in-the-middle) is not supported",
        ));
    }
    let top_logprobs = match req.logprobs {
        Some(k) if !(0..=MAX_LOGPROBS).contains(&k) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be between 0 and {MAX_LOGPROBS}, got {k}"),
            ))
        }
        k => k.map(|k| k as usize),
    };
    if req.echo && top_logprobs.is_some() {
        return Err(ApiError::invalid(
            "echo",
            "`echo` with `logprobs` (prompt log-probabilities) is not supported",
        ));
    }
    let max_tokens = token_limit("max_tokens", req.max_tokens)?;
    let defaults = state
        .registry
        .text_defaults(&target.name, Purpose::Completion)?;
    let sampling = req.sampling.validate(&defaults, top_logprobs)?;
    if req.best_of.is_some_and(|b| b != sampling.n as i64) {
        return Err(ApiError::invalid(
            "best_of",
            "`best_of` is not supported unless equal to `n`",
        ));
    }
    let constraint = req.guided.constraint()?;
    let prompts = prompts(req.prompt)?;
    let request = GenerateSpec {
        prompts,
        max_tokens,
        // OpenAI's default for this endpoint (the manifest's `max_tokens`
        // default is for chat); it shrinks to fit the context.
        default_max_tokens: Some(DEFAULT_MAX_TOKENS),
        stop: sampling.stop,
        n: sampling.n,
        sampling: sampling.params,
        echo: req.echo,
        ignore_eos: req.sampling.ignore_eos,
        min_tokens: sampling.min_tokens,
        tools: None,
        constraint,
        cache_salt: req.sampling.cache_salt.clone(),
        prompt_lookup: sampling.prompt_lookup,
    }
    .validate()?;
    let job = Job::new(
        &target.name,
        request,
        &req.sampling,
        "prompt",
        &log,
        state.request_timeout,
    )?;
    super::versions::shadow_generation(&state.registry, &target, &job.request, job.keep_alive);
    let meta = Meta::new("cmpl", &log, &target.name, top_logprobs.is_some());
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
            logprobs: meta.logprobs.then(|| Logprobs::new(&c.logprobs, 0)),
            text: c.text,
            finish_reason: c.finish_reason.map(finish_name),
        })
        .collect();
    let body = Completion {
        id: &meta.id,
        object: "text_completion",
        created: meta.created,
        model: &meta.model,
        choices,
        usage: Some(usage),
    };
    let mut resp = Json(body).into_response();
    generation::mark_cold(&mut resp, cold_load);
    Ok(resp)
}

fn stream(gen: Generation, meta: Meta, include_usage: bool) -> impl Stream<Item = SseItem> {
    let chunk = |meta: &Meta, choices: Vec<Choice>, usage: Option<Usage>| {
        SseItem::chunk(&Completion {
            id: &meta.id,
            object: "text_completion",
            created: meta.created,
            model: &meta.model,
            choices,
            usage,
        })
    };
    // Text offsets continue across chunks, per choice.
    let mut offsets = vec![0usize; gen.choices];
    let step_meta = meta.clone();
    let render = move |step| {
        let choice = match step {
            Step::Delta {
                index,
                text,
                logprobs,
            } => {
                let start = offsets.get(index).copied().unwrap_or(0);
                let logprobs = step_meta.logprobs.then(|| Logprobs::new(&logprobs, start));
                if let Some(o) = offsets.get_mut(index) {
                    *o += text.len();
                }
                Choice {
                    index,
                    text,
                    logprobs,
                    finish_reason: None,
                }
            }
            Step::Finished { index, reason } => Choice {
                index,
                text: String::new(),
                logprobs: None,
                finish_reason: Some(finish_name(reason)),
            },
            // Text completions offer no tools, so no calls come back.
            Step::ToolCall { index, .. } => Choice {
                index,
                text: String::new(),
                logprobs: None,
                finish_reason: None,
            },
        };
        chunk(&step_meta, vec![choice], None)
    };
    let usage = move |usage| chunk(&meta, Vec::new(), Some(usage));
    generation::sse_events(gen, include_usage, render, usage)
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<Choice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct Choice {
    index: usize,
    text: String,
    logprobs: Option<Logprobs>,
    finish_reason: Option<&'static str>,
}

/// The legacy log-probability layout: parallel arrays.
#[derive(Serialize)]
struct Logprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<BTreeMap<String, f32>>,
    text_offset: Vec<usize>,
}

impl Logprobs {
    fn new(tokens: &[TokenLogprob], start: usize) -> Self {
        let mut offset = start;
        let mut out = Self {
            tokens: vec![],
            token_logprobs: vec![],
            top_logprobs: vec![],
            text_offset: vec![],
        };
        for t in tokens {
            out.tokens.push(t.chosen.token.clone());
            out.token_logprobs.push(t.chosen.logprob);
            out.top_logprobs
                .push(t.top.iter().map(|a| (a.token.clone(), a.logprob)).collect());
            out.text_offset.push(offset);
            offset += t.chosen.bytes.len();
        }
        out
    }
}
