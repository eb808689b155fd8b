//! Plumbing shared by the text endpoints: submitting to the engine, waiting
//! for the prompt to be accepted (so its errors get a proper status), then
//! either collecting every event or streaming them as server-sent events.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;

use super::error::ApiError;
use super::log::RequestLog;
use super::wire::{SamplingFields, Usage};
use crate::config::KeepAlive;
use crate::engine::{FinishReason, GenerateEvent, TokenLogprob, ToolCallEvent, ValidGenerate};
use crate::metrics::Metrics;
use crate::registry::{Lease, Registry};

type EventStream = Pin<Box<dyn Stream<Item = GenerateEvent> + Send>>;

/// A running generation: its events, and how many choices it will finish.
/// It holds the model's lease until it is dropped.
pub struct Generation {
    events: EventStream,
    /// Choices over all prompts.
    pub choices: usize,
    /// Token counts so far.
    pub usage: UsageCounter,
    /// How long the model's load took, when this request waited for it.
    pub cold_load: Option<Duration>,
    timing: Timing,
    log: RequestLog,
    _lease: Lease,
}

impl Drop for Generation {
    /// However the generation ends (finished, failed, or its client gone),
    /// the request's record gets the tokens generated so far.
    fn drop(&mut self) {
        let usage = self.usage.usage();
        self.log
            .tokens(usage.prompt_tokens, usage.completion_tokens);
    }
}

/// Records a generation's token metrics as its events pass: time to first
/// token, time between tokens of each choice, token counts. The metric
/// handles are looked up once per request, not per token.
struct Timing {
    arrived: Instant,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    first_seen: bool,
    last: Vec<Option<Instant>>,
    log: RequestLog,
}

impl Timing {
    fn new(job: &Job, metrics: &Metrics) -> Self {
        let label = Metrics::model(&job.model);
        Self {
            arrived: job.arrived,
            time_to_first_token: metrics.time_to_first_token.get_or_create(&label).clone(),
            inter_token_latency: metrics.inter_token_latency.get_or_create(&label).clone(),
            prompt_tokens: metrics.prompt_tokens.get_or_create(&label).clone(),
            generation_tokens: metrics.generation_tokens.get_or_create(&label).clone(),
            first_seen: false,
            last: vec![None; job.request.choices()],
            log: job.log.clone(),
        }
    }

    fn observe(&mut self, event: &GenerateEvent) {
        match event {
            GenerateEvent::Started { prompt_tokens } => {
                self.prompt_tokens.inc_by(*prompt_tokens as u64);
            }
            GenerateEvent::Delta { index, .. } | GenerateEvent::ToolCall { index, .. } => {
                let now = Instant::now();
                if !self.first_seen {
                    self.first_seen = true;
                    self.log.first_token(now);
                    self.time_to_first_token
                        .observe(now.duration_since(self.arrived).as_secs_f64());
                }
                if let Some(slot) = self.last.get_mut(*index) {
                    if let Some(prev) = slot.replace(now) {
                        self.inter_token_latency
                            .observe(now.duration_since(prev).as_secs_f64());
                    }
                }
            }
            GenerateEvent::Finished {
                completion_tokens, ..
            } => {
                self.generation_tokens.inc_by(*completion_tokens as u64);
            }
            GenerateEvent::Failed(_) | GenerateEvent::PrefixCached { .. } => {}
        }
    }
}

/// A generation request for a model, before the model is at hand.
pub struct Job {
    /// The model id.
    pub model: String,
    /// What to generate.
    pub request: ValidGenerate,
    /// The request's `keep_alive`, if it named one.
    pub keep_alive: Option<KeepAlive>,
    /// The parameter blamed for prompt errors (`messages` or `prompt`).
    pub param: &'static str,
    /// When the request arrived (for time to first token).
    pub arrived: Instant,
    /// The request's log record, which gets its usage.
    pub log: RequestLog,
}

/// Counts tokens as events pass: a choice's count is final when it
/// finishes; until then it is what its deltas have delivered (what a
/// client that leaves early is billed for).
#[derive(Debug, Default, Clone)]
pub struct UsageCounter {
    prompt: usize,
    cached: usize,
    /// Per choice: tokens so far, and whether the count is final.
    choices: Vec<(usize, bool)>,
}

impl UsageCounter {
    fn choice(&mut self, index: usize) -> &mut (usize, bool) {
        if self.choices.len() <= index {
            self.choices.resize(index + 1, (0, false));
        }
        &mut self.choices[index]
    }

    fn observe(&mut self, event: &GenerateEvent) {
        match event {
            GenerateEvent::Started { prompt_tokens } => self.prompt += prompt_tokens,
            GenerateEvent::PrefixCached { tokens } => self.cached += tokens,
            GenerateEvent::Delta {
                index, produced, ..
            } => {
                let c = self.choice(*index);
                if !c.1 {
                    c.0 = c.0.max(*produced);
                }
            }
            GenerateEvent::Finished {
                index,
                completion_tokens,
                ..
            } => *self.choice(*index) = (*completion_tokens, true),
            GenerateEvent::Failed(_) | GenerateEvent::ToolCall { .. } => {}
        }
    }

    /// The totals.
    pub fn usage(&self) -> Usage {
        Usage::new(self.prompt, self.choices.iter().map(|c| c.0).sum()).with_cached(self.cached)
    }
}

impl Job {
    /// A job for `model`, with the request's validated `keep_alive` and its
    /// deadline (its `timeout`, else `default_timeout`, from arrival).
    pub fn new(
        model: &str,
        request: ValidGenerate,
        fields: &SamplingFields,
        param: &'static str,
        log: &RequestLog,
        default_timeout: Option<Duration>,
    ) -> Result<Self, ApiError> {
        let timeout = fields.timeout()?.or(default_timeout);
        let request = request
            .with_deadline(timeout.map(|t| log.arrived() + t))
            .with_tenant(log.key_name());
        Ok(Self {
            model: model.to_string(),
            request,
            keep_alive: fields.keep_alive()?,
            param,
            arrived: log.arrived(),
            log: log.clone(),
        })
    }
}

/// Gets the model (loading it if cold), submits the request, and waits
/// until the engine accepts its prompts, so that their errors (context
/// length, bad token ids…) get a proper status.
pub async fn start(registry: &Registry, job: Job) -> Result<Generation, ApiError> {
    let lease = registry.acquire(&job.model, job.keep_alive).await?;
    let timing = Timing::new(&job, registry.metrics());
    submit(lease, job.request, timing, job.log)
        .await
        .map_err(|e| e.param_or(job.param))
}

async fn submit(
    lease: Lease,
    request: ValidGenerate,
    mut timing: Timing,
    log: RequestLog,
) -> Result<Generation, ApiError> {
    let choices = request.choices();
    let mut rx = lease.submit(request)?;
    let mut usage = UsageCounter::default();
    match rx.recv().await {
        Some(event @ GenerateEvent::Started { .. }) => {
            log.compute_started(Instant::now());
            usage.observe(&event);
            timing.observe(&event);
        }
        Some(GenerateEvent::Failed(e)) => return Err(e.into()),
        Some(_) | None => {
            return Err(ApiError::internal_because(
                "the model worker stopped unexpectedly",
            ))
        }
    }
    Ok(Generation {
        events: Box::pin(rx),
        choices,
        usage,
        cold_load: lease.cold_load,
        timing,
        log,
        _lease: lease,
    })
}

/// One finished choice.
#[derive(Debug, Default)]
pub struct ChoiceOutput {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub tool_calls: Vec<ToolCallEvent>,
    pub finish_reason: Option<FinishReason>,
}

impl Generation {
    /// The next event, with usage counted. A stream that ends before every
    /// choice finished means the worker died.
    pub async fn next(&mut self) -> Option<GenerateEvent> {
        let event = self.events.next().await?;
        self.usage.observe(&event);
        self.timing.observe(&event);
        Some(event)
    }

    /// Runs to the end and returns every choice.
    pub async fn collect(mut self) -> Result<(Vec<ChoiceOutput>, Usage), ApiError> {
        let mut out: Vec<ChoiceOutput> =
            (0..self.choices).map(|_| ChoiceOutput::default()).collect();
        while let Some(event) = self.next().await {
            match event {
                GenerateEvent::Delta {
                    index,
                    text,
                    logprobs,
                    ..
                } => {
                    if let Some(c) = out.get_mut(index) {
                        c.text.push_str(&text);
                        c.logprobs.extend(logprobs);
                    }
                }
                GenerateEvent::ToolCall { index, call } => {
                    if let Some(c) = out.get_mut(index) {
                        c.tool_calls.push(call);
                    }
                }
                GenerateEvent::Finished { index, reason, .. } => {
                    if let Some(c) = out.get_mut(index) {
                        c.finish_reason = Some(reason);
                    }
                }
                GenerateEvent::Failed(e) => return Err(e.into()),
                GenerateEvent::Started { .. } | GenerateEvent::PrefixCached { .. } => {}
            }
        }
        if out.iter().any(|c| c.finish_reason.is_none()) {
            return Err(ApiError::internal_because("generation ended early"));
        }
        Ok((out, self.usage.usage()))
    }
}

/// Identity of a response, shared by its chunks.
#[derive(Clone)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    /// Whether the client asked for log-probabilities.
    pub logprobs: bool,
}

impl Meta {
    /// `id` is `prefix-<request id>`; `created` is now.
    pub fn new(prefix: &str, log: &RequestLog, model: &str, logprobs: bool) -> Self {
        Self {
            id: format!("{prefix}-{}", log.id()),
            created: super::wire::unix_now(),
            model: model.to_string(),
            logprobs,
        }
    }
}

/// What an endpoint renders as one streamed chunk.
pub enum Step {
    /// New text (and log-probabilities) for a choice.
    Delta {
        index: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// A choice made a tool call.
    ToolCall { index: usize, call: ToolCallEvent },
    /// A choice ended.
    Finished { index: usize, reason: FinishReason },
}

/// Streams a generation: each step rendered by `chunk`, a failure as an
/// error event, and at the end, if asked, the usage rendered by `usage`.
pub fn sse_events<C, U>(
    mut gen: Generation,
    include_usage: bool,
    mut chunk: C,
    usage: U,
) -> impl Stream<Item = SseItem>
where
    C: FnMut(Step) -> SseItem,
    U: FnOnce(Usage) -> SseItem,
{
    async_stream::stream! {
        let mut unfinished = gen.choices;
        while let Some(event) = gen.next().await {
            match event {
                GenerateEvent::Delta { index, text, logprobs, .. } => yield chunk(Step::Delta { index, text, logprobs }),
                GenerateEvent::ToolCall { index, call } => yield chunk(Step::ToolCall { index, call }),
                GenerateEvent::Finished { index, reason, .. } => {
                    unfinished = unfinished.saturating_sub(1);
                    yield chunk(Step::Finished { index, reason });
                }
                GenerateEvent::Failed(e) => {
                    yield SseItem::Error(e.into());
                    return;
                }
                GenerateEvent::Started { .. } | GenerateEvent::PrefixCached { .. } => {}
            }
        }
        if unfinished > 0 {
            yield SseItem::Error(ApiError::internal_because("generation ended early"));
            return;
        }
        let totals = gen.usage.usage();
        if include_usage {
            yield usage(totals);
        }
    }
}

/// The wire name of a finish reason.
pub fn finish_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
    }
}

/// One SSE payload.
pub enum SseItem {
    /// A chunk, serialized as JSON.
    Chunk(String),
    /// Several chunks in a row (a tool call's head and arguments).
    Chunks(Vec<String>),
    /// A comment line (`: …`), which clients ignore; keeps the connection
    /// alive while a cold model loads.
    Comment(String),
    /// A failure after the stream started: an error object, then the end.
    Error(ApiError),
}

impl SseItem {
    /// A chunk from any serializable value.
    pub fn chunk<T: Serialize>(value: &T) -> Self {
        match serde_json::to_string(value) {
            Ok(v) => SseItem::Chunk(v),
            Err(e) => SseItem::Error(ApiError::internal_because(e)),
        }
    }

    /// Chunks sent one after the other; the first failure instead, if any.
    pub fn concat(items: impl IntoIterator<Item = SseItem>) -> Self {
        let mut out = Vec::new();
        for item in items {
            match item {
                SseItem::Chunk(c) => out.push(c),
                SseItem::Chunks(cs) => out.extend(cs),
                SseItem::Comment(_) => {}
                SseItem::Error(e) => return SseItem::Error(e),
            }
        }
        SseItem::Chunks(out)
    }
}

#[derive(Serialize)]
struct ErrorEvent<'a> {
    error: super::error::Detail<'a>,
}

/// A `text/event-stream` response: each item as `data: {json}`, then
/// `data: [DONE]`. The request's log line is written when the stream ends
/// or the client goes away.
pub fn sse_response<S>(items: S, log: RequestLog) -> Response
where
    S: Stream<Item = SseItem> + Send + 'static,
{
    log.streaming();
    let stream = async_stream::stream! {
        // Dropped last: the items (and the generation in them) first.
        let _finish = log.finish_on_drop();
        let mut items = std::pin::pin!(items);
        while let Some(item) = items.next().await {
            match item {
                SseItem::Chunk(v) => yield Ok::<_, Infallible>(Event::default().data(v)),
                SseItem::Chunks(vs) => {
                    for v in vs {
                        yield Ok(Event::default().data(v));
                    }
                }
                SseItem::Comment(c) => yield Ok(Event::default().comment(c)),
                SseItem::Error(e) => {
                    log.stream_ended(Some(e.status.as_u16()));
                    let body = serde_json::json!(ErrorEvent { error: e.detail() });
                    yield Ok(Event::default().data(body.to_string()));
                    return;
                }
            }
        }
        log.stream_ended(None);
        yield Ok(Event::default().data("[DONE]"));
    };
    let mut resp = Sse::new(stream).into_response();
    resp.extensions_mut().insert(super::log::Deferred);
    resp
}

/// Seconds between SSE comments while a streaming request waits for its
/// model to load.
const LOADING_COMMENT_EVERY: Duration = Duration::from_secs(2);

/// Header on responses that waited for their model to load.
const COLD_START: &str = "x-kindling-cold-start";
/// How long that load took, in milliseconds.
const LOAD_MS: &str = "x-kindling-load-ms";

/// Marks a response served from a cold load, with how long the load took.
pub fn mark_cold(resp: &mut Response, load: Option<Duration>) {
    if let Some(took) = load {
        let headers = resp.headers_mut();
        headers.insert(COLD_START, axum::http::HeaderValue::from_static("true"));
        headers.insert(
            LOAD_MS,
            axum::http::HeaderValue::from(took.as_millis() as u64),
        );
    }
}

/// Answers a streaming request; `render` turns the generation into
/// chunks. A warm model's errors before the first
/// token get a proper status; a cold model's response starts at once (its
/// headers say it is cold) and carries SSE comments while the model loads,
/// then the stream, or an error event if the load fails.
pub async fn stream_response<F, S>(
    registry: &Arc<Registry>,
    job: Job,
    log: RequestLog,
    render: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(Generation) -> S + Send + 'static,
    S: Stream<Item = SseItem> + Send + 'static,
{
    if registry.is_resident(&job.model) {
        let gen = start(registry, job).await?;
        let load = gen.cold_load;
        let mut resp = sse_response(render(gen), log);
        mark_cold(&mut resp, load);
        return Ok(resp);
    }
    let registry = registry.clone();
    let items = async_stream::stream! {
        let param = job.param;
        let timing = Timing::new(&job, registry.metrics());
        let acquire = registry.acquire(&job.model, job.keep_alive);
        tokio::pin!(acquire);
        let mut tick = tokio::time::interval(LOADING_COMMENT_EVERY);
        let lease = loop {
            tokio::select! {
                lease = &mut acquire => break lease,
                _ = tick.tick() => yield SseItem::Comment(format!("loading model {}", job.model)),
            }
        };
        let lease = match lease {
            Ok(lease) => lease,
            Err(e) => {
                yield SseItem::Error(e.into());
                return;
            }
        };
        if let Some(took) = lease.cold_load {
            yield SseItem::Comment(format!("model loaded in {} ms", took.as_millis()));
        }
        let gen = match submit(lease, job.request, timing, job.log).await {
            Ok(gen) => gen,
            Err(e) => {
                yield SseItem::Error(e.param_or(param));
                return;
            }
        };
        for await item in render(gen) {
            yield item;
        }
    };
    let mut resp = sse_response(items, log);
    resp.headers_mut()
        .insert(COLD_START, axum::http::HeaderValue::from_static("true"));
    Ok(resp)
}
