//! The text backend: a model, its paged KV cache and the scheduler that
//! batches its requests (continuous batching with chunked prefill).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kindling_models::tokenizer::Tokenizer;
use kindling_models::tools::{Tool, ToolFormat};
use kindling_models::{BatchItem, Constraint, GrammarCompiler, KvCache, SamplingParams, TextModel};
use tokio::sync::mpsc;

use super::request::GenerateEvents;
use super::scheduler::{Drafter, Limits, Request, Scheduler, Sequence, StepModel};
use super::sequence::{Choice, ChoiceSpec, Events};
use super::shell::{Backend, Jobs, Step, Ticket};
use super::{EngineError, EngineStats, LoadSpec, Prompt, ToolChoice, ValidGenerate};

/// A queued text request.
pub(crate) struct TextJob {
    request: ValidGenerate,
    events: Events,
    ticket: Ticket,
}

/// Events are buffered this deep per request before the worker waits for
/// the client to catch up.
const EVENT_BUFFER: usize = 256;

/// Queues `request` on a text worker.
pub(super) fn submit(
    jobs: &Jobs<TextJob>,
    stall_timeout: Duration,
    request: ValidGenerate,
) -> Result<GenerateEvents, EngineError> {
    let ticket = jobs.ticket(request.tenant.clone())?;
    // Room for every choice's events of a few steps: a request only takes
    // part in a step when its client has room for that step.
    let depth = EVENT_BUFFER.max(4 * super::sequence::EVENTS_PER_STEP * request.choices());
    let (tx, rx) = mpsc::channel(depth);
    let job = TextJob {
        request,
        events: Events::new(tx, stall_timeout),
        ticket,
    };
    jobs.send(job)?;
    Ok(GenerateEvents::new(rx, jobs.waker().clone()))
}

impl StepModel for TextModel {
    fn forward(
        &self,
        batch: &[BatchItem<'_>],
        cache: &mut KvCache,
    ) -> kindling_models::Result<Vec<Vec<f32>>> {
        TextModel::forward(self, batch, cache)
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// A loaded text model and its scheduler.
pub(super) struct TextBackend {
    model: TextModel,
    scheduler: Scheduler,
    /// How the model writes tool calls.
    tool_format: ToolFormat,
    /// Compiles output grammars; built on the first request that needs one.
    grammar: Option<GrammarCompiler>,
    /// Cached prompt blocks are shared only between requests of one API key.
    per_key: bool,
}

/// Loads the model where `spec.target` says, with a KV cache that holds at
/// least one sequence at the full context.
pub(super) fn load(
    spec: &LoadSpec,
    stats: &Arc<EngineStats>,
) -> Result<(TextBackend, ()), EngineError> {
    let started = Instant::now();
    let loaded = spec.target.placement().and_then(|placement| {
        let model = TextModel::load_on(&spec.path, spec.context_length, &placement)?;
        let positions = spec.kv_cache_tokens.max(model.max_positions());
        let mut kv = model.new_cache(KvCache::blocks_for(positions))?;
        kv.set_prefix_caching(spec.prefix_caching);
        Ok((model, kv, positions))
    });
    let (model, kv, positions) =
        loaded.map_err(|e| super::spec::load_failed(spec, e.to_string()))?;
    let elapsed = started.elapsed();
    let limits = Limits {
        max_sequences: spec.max_sequences.max(1),
        max_batch_tokens: spec.max_batch_tokens.max(spec.max_sequences).max(1),
        fair: spec.fair_share,
    };
    tracing::info!(
        model = %spec.model,
        path = %spec.path.display(),
        context = model.max_positions(),
        kv_cache_tokens = positions,
        max_sequences = limits.max_sequences,
        max_batch_tokens = limits.max_batch_tokens,
        weight_bytes = model.weight_bytes(),
        device = %model.placement(),
        elapsed_ms = elapsed.as_millis() as u64,
        load_gb_per_s = format!("{:.2}", model.weight_bytes() as f64 / elapsed.as_secs_f64().max(1e-9) / 1e9),
        "model loaded"
    );
    let scheduler = Scheduler::new(limits, kv, stats.clone());
    let tool_format = spec.tool_format.unwrap_or_else(|| model.tool_format());
    let backend = TextBackend {
        model,
        scheduler,
        tool_format,
        grammar: None,
        per_key: !spec.prefix_cache_shared,
    };
    Ok((backend, ()))
}

impl Backend for TextBackend {
    type Job = TextJob;

    fn admit(&mut self, job: TextJob) {
        intake(self, job);
    }

    fn step(&mut self) -> Step {
        if self.scheduler.step(&self.model) {
            Step::Worked
        } else {
            Step::Wait(self.scheduler.next_timeout())
        }
    }

    fn is_idle(&self) -> bool {
        self.scheduler.is_idle()
    }

    fn abort(&mut self) {
        self.scheduler.fail_all();
    }
}

/// Validates a new request against the loaded model and queues its
/// sequences, or fails it at once.
fn intake(backend: &mut TextBackend, job: TextJob) {
    let TextJob {
        request,
        mut events,
        ticket,
    } = job;
    if events.is_closed() {
        return;
    }
    let scheduler = &mut backend.scheduler;
    let outcome = constraint(
        &backend.model,
        &mut backend.grammar,
        backend.tool_format,
        &request,
    )
    .and_then(|c| {
        sequences(
            &backend.model,
            backend.tool_format,
            &request,
            c,
            scheduler.kv_capacity(),
            backend.per_key,
        )
    });
    match outcome {
        Ok((sequences, prompt_tokens)) => {
            let now = Instant::now();
            let req = Request {
                events,
                ticket,
                deadline: request
                    .deadline
                    .map(|d| (d, d.saturating_duration_since(now))),
                prompt_tokens,
                live: request.choices(),
                tenant: request.tenant.clone(),
            };
            scheduler.enqueue(req, sequences);
        }
        Err(e) => events.fail(e),
    }
}

fn invalid(param: &'static str, message: impl Into<String>) -> EngineError {
    EngineError::InvalidInput {
        param,
        message: message.into(),
    }
}

/// The grammar every choice's output must match, compiled: the request's
/// own (`response_format` and the like), or one that forces a valid tool
/// call when `tool_choice` asks for one.
fn constraint(
    model: &TextModel,
    compiler: &mut Option<GrammarCompiler>,
    format: ToolFormat,
    request: &ValidGenerate,
) -> Result<Option<Constraint>, EngineError> {
    let req = &request.spec;
    let (grammar, param) = match (&req.constraint, &req.tools) {
        (Some(c), _) => (c.grammar.clone(), c.param),
        (None, Some(t)) if matches!(t.choice, ToolChoice::Required | ToolChoice::Named(_)) => {
            let (tools, parallel): (Vec<Tool>, bool) = match &t.choice {
                ToolChoice::Named(name) => (
                    t.tools
                        .iter()
                        .filter(|f| &f.name == name)
                        .cloned()
                        .collect(),
                    false,
                ),
                _ => (t.tools.clone(), t.parallel),
            };
            let tok = &model.tokenizer;
            let grammar = format.forced_grammar(&tools, parallel, |s| tok.control_id(s));
            (grammar, "tools")
        }
        _ => return Ok(None),
    };
    if compiler.is_none() {
        let started = Instant::now();
        let built = GrammarCompiler::new(&model.tokenizer)
            .map_err(|e| EngineError::Compute(format!("building the grammar tables: {e}")))?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "grammar tables built"
        );
        *compiler = Some(built);
    }
    let Some(compiler) = compiler.as_ref() else {
        return Ok(None);
    };
    let started = Instant::now();
    let compiled = compiler
        .compile(&grammar)
        .map_err(|e| invalid(param, e.to_string()))?;
    tracing::debug!(
        param,
        elapsed_us = started.elapsed().as_micros() as u64,
        "grammar compiled"
    );
    Ok(Some(compiled))
}

fn prompt_ids(
    model: &TextModel,
    format: ToolFormat,
    prompt: &Prompt,
    tools: &[Tool],
) -> Result<Vec<u32>, EngineError> {
    let tok = &model.tokenizer;
    let ids = match prompt {
        Prompt::Chat(messages) => {
            let text = model
                .render_chat_with_tools(messages, tools, format)
                .map_err(|e| invalid("messages", e.to_string()))?;
            tok.encode(&text)
                .map_err(|e| invalid("messages", e.to_string()))?
        }
        Prompt::Text(text) => tok
            .encode(text)
            .map_err(|e| invalid("prompt", e.to_string()))?,
        Prompt::Tokens(ids) => {
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= tok.vocab_size()) {
                return Err(invalid(
                    "prompt",
                    format!(
                        "token id {bad} is outside the vocabulary of {} tokens",
                        tok.vocab_size()
                    ),
                ));
            }
            ids.clone()
        }
    };
    if ids.is_empty() {
        let param = if matches!(prompt, Prompt::Chat(_)) {
            "messages"
        } else {
            "prompt"
        };
        return Err(invalid(param, "the prompt is empty"));
    }
    Ok(ids)
}

/// One sequence per prompt, carrying its `n` choices; every prompt is
/// checked before any is queued, so a bad one fails the whole request.
/// The prefix-cache salt of `request`: its `cache_salt`, under its API
/// key's name when cached blocks are kept per key.
fn cache_salt(request: &ValidGenerate, per_key: bool) -> Option<Arc<str>> {
    let key = request.tenant.as_deref().filter(|_| per_key);
    match (key, request.spec.cache_salt.as_deref()) {
        (None, None) => None,
        (Some(k), None) => Some(Arc::from(format!("key:{k}"))),
        (None, Some(s)) => Some(Arc::from(format!("salt:{s}"))),
        (Some(k), Some(s)) => Some(Arc::from(format!("key:{k}\0salt:{s}"))),
    }
}

fn sequences(
    model: &TextModel,
    format: ToolFormat,
    request: &ValidGenerate,
    constraint: Option<Constraint>,
    kv_capacity: usize,
    per_key: bool,
) -> Result<(Vec<Sequence>, usize), EngineError> {
    let req = &request.spec;
    let tools = req.tools.as_ref().map_or(&[][..], |t| &t.tools[..]);
    let salt = cache_salt(request, per_key);
    let context = model.max_positions().min(kv_capacity);
    let vocab = model.tokenizer.vocab_size();
    let mut out = Vec::with_capacity(req.prompts.len());
    let mut prompt_tokens = 0;
    if let Some((bad, _)) = req
        .sampling
        .logit_bias
        .iter()
        .find(|(id, _)| *id as usize >= vocab)
    {
        return Err(invalid(
            "logit_bias",
            format!("token id {bad} is outside the vocabulary of {vocab} tokens"),
        ));
    }
    for (p, prompt) in req.prompts.iter().enumerate() {
        let ids = prompt_ids(model, format, prompt, tools)?;
        let room = context.saturating_sub(ids.len());
        let max_tokens = match req.max_tokens {
            Some(m) => m,
            None => req.default_max_tokens.map_or(room, |d| d.min(room)),
        }
        .max(1);
        if ids.len() + max_tokens > context {
            return Err(EngineError::ContextLengthExceeded {
                context,
                prompt_tokens: ids.len(),
                max_tokens,
            });
        }
        let echo = req
            .echo
            .then(|| model.tokenizer.decode(&ids))
            .transpose()
            .map_err(|e| invalid("prompt", e.to_string()))?;
        let mut choices = (0..req.n).map(|i| {
            let spec = ChoiceSpec {
                index: p * req.n + i,
                prompt: &ids,
                max_tokens,
                params: SamplingParams {
                    seed: req.sampling.seed.wrapping_add(i as u64),
                    ..req.sampling.clone()
                },
                stop: &req.stop,
                ignore_eos: req.ignore_eos,
                min_tokens: req.min_tokens,
                echo: echo.clone(),
                constraint: constraint.as_ref().map(Constraint::fork),
                tools: req
                    .tools
                    .as_ref()
                    .filter(|t| t.choice != ToolChoice::None)
                    .map(|_| format),
            };
            Choice::new(spec, vocab)
        });
        let Some(first) = choices.next() else {
            return Err(invalid("n", "at least one choice is needed"));
        };
        let forks = choices.collect();
        prompt_tokens += ids.len();
        out.push(Sequence {
            request: 0,
            tokens: ids,
            computed: 0,
            table: Default::default(),
            choice: first,
            forks,
            looked_up: false,
            salt: salt.clone(),
            drafter: Drafter::new(req.prompt_lookup),
        });
    }
    Ok((out, prompt_tokens))
}
