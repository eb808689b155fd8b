//! The worker thread: loads one model, then serves its queue one request at
//! a time, streaming tokens back and stopping as soon as the client is gone.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use kindling_models::kv_cache::SequenceCache;
use kindling_models::{
    Detokenizer, Device, ModelError, Sampler, SamplingParams, StopMatcher, StopOutcome, TextModel,
    TokenLogprobs,
};
use tokio::sync::{mpsc, oneshot};

use super::{
    EngineError, FinishReason, GenerateEvent, GenerateRequest, Job, LoadSpec, LoadedInfo, Prompt,
    TokenAlternative, TokenLogprob,
};

/// Prompt tokens run per forward pass; between chunks the worker checks
/// whether the client is still there.
const PREFILL_CHUNK: usize = 512;

pub(super) fn run_worker(
    spec: LoadSpec,
    mut jobs: mpsc::Receiver<Job>,
    ready: oneshot::Sender<Result<LoadedInfo, EngineError>>,
) {
    let started = Instant::now();
    let model = match TextModel::load_gguf(&spec.path, spec.context_length, &Device::Cpu) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(EngineError::LoadFailed {
                model: spec.model.clone(),
                reason: e.to_string(),
            }));
            return;
        }
    };
    let info = LoadedInfo {
        context_length: model.max_positions(),
        weight_bytes: model.weight_bytes(),
    };
    tracing::info!(
        model = %spec.model,
        path = %spec.path.display(),
        context = info.context_length,
        weight_bytes = info.weight_bytes,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    if ready.send(Ok(info)).is_err() {
        return;
    }
    while let Some(job) = jobs.blocking_recv() {
        serve(&model, job);
    }
    tracing::info!(model = %spec.model, "model unloaded");
}

/// Why generation stopped early.
enum Halt {
    /// The client went away.
    Cancelled,
    /// Report this error to the client.
    Failed(EngineError),
}

impl From<ModelError> for Halt {
    fn from(e: ModelError) -> Self {
        Halt::Failed(EngineError::Compute(e.to_string()))
    }
}

fn serve(model: &TextModel, job: Job) {
    let Job { request, events } = job;
    if events.is_closed() {
        return; // The client left while the request waited.
    }
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| generate(model, &request, &events)));
    let error = match outcome {
        Ok(Ok(())) | Ok(Err(Halt::Cancelled)) => return,
        Ok(Err(Halt::Failed(e))) => e,
        Err(_) => {
            EngineError::Compute("internal error while generating (see the server log)".into())
        }
    };
    if let EngineError::Compute(msg) = &error {
        tracing::error!(error = %msg, "generation failed");
    }
    let _ = events.blocking_send(GenerateEvent::Failed(error));
}

fn emit(events: &mpsc::Sender<GenerateEvent>, event: GenerateEvent) -> Result<(), Halt> {
    events.blocking_send(event).map_err(|_| Halt::Cancelled)
}

fn invalid(param: &'static str, message: impl Into<String>) -> Halt {
    Halt::Failed(EngineError::InvalidInput {
        param,
        message: message.into(),
    })
}

fn prompt_ids(model: &TextModel, prompt: &Prompt) -> Result<Vec<u32>, Halt> {
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

fn generate(
    model: &TextModel,
    req: &GenerateRequest,
    events: &mpsc::Sender<GenerateEvent>,
) -> Result<(), Halt> {
    let ids = prompt_ids(model, &req.prompt)?;
    let context = model.max_positions();
    let room = context.saturating_sub(ids.len());
    let max_tokens = match req.max_tokens {
        Some(m) => m,
        None => req.default_max_tokens.map_or(room, |d| d.min(room)),
    }
    .max(1);
    if ids.len() + max_tokens > context {
        return Err(Halt::Failed(EngineError::ContextLengthExceeded {
            context,
            prompt_tokens: ids.len(),
            max_tokens,
        }));
    }
    emit(
        events,
        GenerateEvent::Started {
            prompt_tokens: ids.len(),
        },
    )?;

    let mut cache = model.new_cache();
    let mut logits = None;
    for chunk in ids.chunks(PREFILL_CHUNK) {
        if events.is_closed() {
            return Err(Halt::Cancelled);
        }
        logits = Some(model.forward(chunk, &mut cache)?);
    }
    let logits = logits.ok_or_else(|| invalid("prompt", "the prompt is empty"))?;
    let echo = if req.echo {
        model.tokenizer.decode(&ids)?
    } else {
        String::new()
    };
    // Choices share the prompt's prefill: each forks the cache; the last takes it.
    let mut shared = Some(cache);
    for index in 0..req.n {
        let cache = if index + 1 == req.n {
            shared
                .take()
                .ok_or_else(|| Halt::Failed(EngineError::Compute("prefill cache lost".into())))?
        } else {
            shared
                .as_ref()
                .map(SequenceCache::fork)
                .transpose()?
                .ok_or_else(|| Halt::Failed(EngineError::Compute("prefill cache lost".into())))?
        };
        let params = SamplingParams {
            seed: req.sampling.seed.wrapping_add(index as u64),
            ..req.sampling.clone()
        };
        emit_delta(events, index, echo.clone(), Vec::new())?;
        let choice = Choice {
            index,
            ids: &ids,
            max_tokens,
            params,
        };
        run_choice(model, req, choice, cache, logits.clone(), events)?;
    }
    Ok(())
}

struct Choice<'a> {
    index: usize,
    ids: &'a [u32],
    max_tokens: usize,
    params: SamplingParams,
}

/// Sends a delta unless it carries nothing.
fn emit_delta(
    events: &mpsc::Sender<GenerateEvent>,
    index: usize,
    text: String,
    logprobs: Vec<TokenLogprob>,
) -> Result<(), Halt> {
    if text.is_empty() && logprobs.is_empty() {
        return Ok(());
    }
    emit(
        events,
        GenerateEvent::Delta {
            index,
            text,
            logprobs,
        },
    )
}

fn run_choice(
    model: &TextModel,
    req: &GenerateRequest,
    choice: Choice<'_>,
    mut cache: SequenceCache,
    mut logits: Vec<f32>,
    events: &mpsc::Sender<GenerateEvent>,
) -> Result<(), Halt> {
    let tok = &model.tokenizer;
    let context = model.max_positions();
    let mut sampler = Sampler::new(choice.params, choice.ids, tok.vocab_size());
    let mut detok = Detokenizer::default();
    let mut stops = StopMatcher::new(&req.stop);
    let mut produced = 0;
    let finish = |reason, produced| GenerateEvent::Finished {
        index: choice.index,
        reason,
        completion_tokens: produced,
    };
    loop {
        if events.is_closed() {
            tracing::info!(
                choice = choice.index,
                generated = produced,
                "generation cancelled: the client went away"
            );
            return Err(Halt::Cancelled);
        }
        let sampled = sampler.sample(&logits);
        produced += 1;
        let logprobs: Vec<TokenLogprob> = sampled
            .logprobs
            .as_ref()
            .map(|lp| vec![token_logprob(model, sampled.token, lp)])
            .unwrap_or_default();
        if !req.ignore_eos && tok.is_end_of_generation(sampled.token) {
            emit_delta(events, choice.index, stops.flush(), logprobs)?;
            return emit(events, finish(FinishReason::Stop, produced));
        }
        let piece = detok.push(tok, sampled.token)?;
        match stops.push(&piece) {
            StopOutcome::Stopped(text) => {
                emit_delta(events, choice.index, text, logprobs)?;
                return emit(events, finish(FinishReason::Stop, produced));
            }
            StopOutcome::Continue(text) => emit_delta(events, choice.index, text, logprobs)?,
        }
        if produced >= choice.max_tokens || cache.len() >= context {
            emit_delta(events, choice.index, stops.flush(), Vec::new())?;
            return emit(events, finish(FinishReason::Length, produced));
        }
        logits = model.forward(&[sampled.token], &mut cache)?;
    }
}

fn token_logprob(model: &TextModel, token: u32, lp: &TokenLogprobs) -> TokenLogprob {
    let alt = |id: u32, logprob: f32| {
        let bytes = model.tokenizer.token_bytes(id).to_vec();
        TokenAlternative {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob,
        }
    };
    TokenLogprob {
        chosen: alt(token, lp.logprob),
        top: lp.top.iter().map(|&(id, l)| alt(id, l)).collect(),
    }
}
