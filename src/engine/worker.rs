//! The worker thread: loads one model, then runs the scheduler, taking new
//! requests in between steps, until the last handle is gone and every
//! request has finished.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kindling_models::{KvCache, SamplingParams, TextModel};
use tokio::sync::mpsc;

use super::scheduler::{Limits, Request, Scheduler, Sequence};
use super::sequence::{Choice, ChoiceSpec};
use super::{EngineError, EngineStats, GenerateRequest, Job, LoadSpec, Prompt};

pub(super) fn run_worker(
    spec: LoadSpec,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    ready: impl FnOnce(Result<(), EngineError>) -> bool,
    stats: Arc<EngineStats>,
) {
    let started = Instant::now();
    // The pool holds at least one sequence at the full context.
    let loaded = load(&spec).and_then(|model| {
        let positions = spec.kv_cache_tokens.max(model.max_positions());
        let kv = model.new_cache(KvCache::blocks_for(positions))?;
        Ok((model, kv, positions))
    });
    let (model, kv, positions) = match loaded {
        Ok(m) => m,
        Err(e) => {
            ready(Err(EngineError::LoadFailed {
                model: spec.model.clone(),
                reason: e.to_string(),
                retry_after: None,
            }));
            return;
        }
    };
    let elapsed = started.elapsed();
    let limits = Limits {
        max_sequences: spec.max_sequences.max(1),
        max_batch_tokens: spec.max_batch_tokens.max(spec.max_sequences).max(1),
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
    if !ready(Ok(())) {
        return;
    }
    let mut scheduler = Scheduler::new(limits, kv, stats);
    let mut open = true;
    loop {
        if scheduler.is_idle() {
            if !open {
                break;
            }
            match jobs.blocking_recv() {
                Some(job) => intake(&model, &mut scheduler, job),
                None => break,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => intake(&model, &mut scheduler, job),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !scheduler.step(&model) && !scheduler.is_idle() {
            // Everyone is waiting on a slow client: do not spin.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    drop(scheduler);
    drop(model);
    super::unloaded(&spec);
}

/// Loads the model where `spec.target` says.
fn load(spec: &LoadSpec) -> kindling_models::Result<TextModel> {
    TextModel::load_on(&spec.path, spec.context_length, &spec.target.placement()?)
}

/// Validates a new request and queues its sequences, or fails it at once.
fn intake(model: &TextModel, scheduler: &mut Scheduler, job: Job) {
    let Job {
        request,
        mut events,
    } = job;
    if events.is_closed() {
        scheduler.stats().dequeue();
        return;
    }
    match sequences(model, &request, scheduler.kv_capacity()) {
        Ok((sequences, prompt_tokens)) => {
            let now = Instant::now();
            let req = Request {
                events,
                deadline: request
                    .deadline
                    .map(|d| (d, d.saturating_duration_since(now))),
                prompt_tokens,
                live: request.n * request.prompts.len(),
                started: false,
            };
            scheduler.enqueue(req, sequences);
        }
        Err(e) => {
            scheduler.stats().dequeue();
            events.fail(e);
        }
    }
}

fn invalid(param: &'static str, message: impl Into<String>) -> EngineError {
    EngineError::InvalidInput {
        param,
        message: message.into(),
    }
}

fn prompt_ids(model: &TextModel, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
    let tok = &model.tokenizer;
    let ids = match prompt {
        Prompt::Chat(messages) => {
            let text = model
                .render_chat(messages)
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
fn sequences(
    model: &TextModel,
    req: &GenerateRequest,
    kv_capacity: usize,
) -> Result<(Vec<Sequence>, usize), EngineError> {
    let context = model.max_positions().min(kv_capacity);
    let vocab = model.tokenizer.vocab_size();
    let mut out = Vec::with_capacity(req.prompts.len());
    let mut prompt_tokens = 0;
    for (p, prompt) in req.prompts.iter().enumerate() {
        let ids = prompt_ids(model, prompt)?;
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
                echo: echo.clone(),
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
        });
    }
    Ok((out, prompt_tokens))
}
