//! The worker thread: loads one model, then serves its queue one request at
//! a time, streaming tokens back and stopping as soon as the client is gone.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use kindling_models::kv_cache::SequenceCache;
use kindling_models::{
    Detokenizer, Device, ModelError, Sampler, SamplingParams, StopMatcher, StopOutcome, TextModel,
    TokenLogprobs,
};
use tokio::sync::{mpsc, oneshot};

use super::{
    EngineError, FinishReason, GenerateEvent, GenerateRequest, Job, LoadSpec, Prompt,
    TokenAlternative, TokenLogprob,
};

/// Prompt tokens run per forward pass; between chunks the worker checks
/// whether the client is still there.
pub(super) const PREFILL_CHUNK: usize = 512;

pub(super) fn run_worker(
    spec: LoadSpec,
    mut jobs: mpsc::Receiver<Job>,
    ready: oneshot::Sender<Result<(), EngineError>>,
) {
    let started = Instant::now();
    let model = match TextModel::load_gguf(&spec.path, spec.context_length, &Device::Cpu) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(EngineError::LoadFailed {
                model: spec.model.clone(),
                reason: e.to_string(),
                retry_after: None,
            }));
            return;
        }
    };
    tracing::info!(
        model = %spec.model,
        path = %spec.path.display(),
        context = model.max_positions(),
        weight_bytes = model.weight_bytes(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    if ready.send(Ok(())).is_err() {
        return;
    }
    while let Some(job) = jobs.blocking_recv() {
        serve(&model, job);
    }
    drop(model);
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
    let _ = events.send(GenerateEvent::Failed(error));
}

/// Where a request's events go, and how long to wait for a client that has
/// stopped reading before giving up on it.
pub(crate) struct Events {
    tx: mpsc::Sender<GenerateEvent>,
    stall_timeout: Duration,
}

impl Events {
    pub(crate) fn new(tx: mpsc::Sender<GenerateEvent>, stall_timeout: Duration) -> Self {
        Self { tx, stall_timeout }
    }

    /// Whether the client went away.
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Sends `event`, waiting while the client's buffer is full, at most the
    /// stall timeout: a client that keeps the connection but stops reading
    /// must not hold the model's worker.
    fn send(&self, event: GenerateEvent) -> Result<(), Halt> {
        let mut event = event;
        let mut stalled_since = None;
        loop {
            match self.tx.try_send(event) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(Halt::Cancelled),
                Err(mpsc::error::TrySendError::Full(back)) => {
                    let since = *stalled_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.stall_timeout {
                        tracing::warn!("generation cancelled: the client stopped reading");
                        return Err(Halt::Cancelled);
                    }
                    event = back;
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    /// Sends a delta unless it carries nothing.
    fn delta(&self, index: usize, text: String, logprobs: Vec<TokenLogprob>) -> Result<(), Halt> {
        if text.is_empty() && logprobs.is_empty() {
            return Ok(());
        }
        self.send(GenerateEvent::Delta {
            index,
            text,
            logprobs,
        })
    }
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

fn generate(model: &TextModel, req: &GenerateRequest, events: &Events) -> Result<(), Halt> {
    // Every prompt is checked before any output, so a bad one fails the
    // whole request with a proper status.
    let context = model.max_positions();
    let mut prompts = Vec::with_capacity(req.prompts.len());
    for prompt in &req.prompts {
        let ids = prompt_ids(model, prompt)?;
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
        prompts.push((ids, max_tokens));
    }
    let prompt_tokens = prompts.iter().map(|(ids, _)| ids.len()).sum();
    events.send(GenerateEvent::Started { prompt_tokens })?;
    for (p, (ids, max_tokens)) in prompts.iter().enumerate() {
        generate_prompt(model, req, p * req.n, ids, *max_tokens, events)?;
    }
    Ok(())
}

/// Prefills one prompt, then runs its `n` choices, numbered from `first`.
fn generate_prompt(
    model: &TextModel,
    req: &GenerateRequest,
    first: usize,
    ids: &[u32],
    max_tokens: usize,
    events: &Events,
) -> Result<(), Halt> {
    let mut cache = model.new_cache();
    let mut logits = Vec::new();
    for chunk in ids.chunks(PREFILL_CHUNK) {
        if events.is_closed() {
            return Err(Halt::Cancelled);
        }
        logits = model.forward(chunk, &mut cache)?;
    }
    let echo = if req.echo {
        model.tokenizer.decode(ids)?
    } else {
        String::new()
    };
    // Choices share the prompt's prefill: each forks the cache; the last takes it.
    let mut shared = Some(cache);
    for i in 0..req.n {
        let cache = match shared.take() {
            Some(c) if i + 1 < req.n => {
                let fork = c.fork()?;
                shared = Some(c);
                fork
            }
            Some(c) => c,
            None => {
                return Err(Halt::Failed(EngineError::Compute(
                    "prefill cache lost".into(),
                )))
            }
        };
        let params = SamplingParams {
            seed: req.sampling.seed.wrapping_add(i as u64),
            ..req.sampling.clone()
        };
        let index = first + i;
        events.delta(index, echo.clone(), Vec::new())?;
        let choice = Choice {
            index,
            ids,
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

fn run_choice(
    model: &TextModel,
    req: &GenerateRequest,
    choice: Choice<'_>,
    mut cache: SequenceCache,
    mut logits: Vec<f32>,
    events: &Events,
) -> Result<(), Halt> {
    let tok = &model.tokenizer;
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
            // The end-of-turn token is not part of the text, nor of its log-probabilities.
            events.delta(choice.index, stops.flush(), Vec::new())?;
            return events.send(finish(FinishReason::Stop, produced));
        }
        let piece = detok.push(tok, sampled.token)?;
        match stops.push(&piece) {
            StopOutcome::Stopped(text) => {
                events.delta(choice.index, text, logprobs)?;
                return events.send(finish(FinishReason::Stop, produced));
            }
            StopOutcome::Continue(text) => events.delta(choice.index, text, logprobs)?,
        }
        if produced >= choice.max_tokens {
            events.delta(choice.index, stops.flush(), Vec::new())?;
            return events.send(finish(FinishReason::Length, produced));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(i: usize) -> GenerateEvent {
        GenerateEvent::Delta {
            index: i,
            text: "x".into(),
            logprobs: Vec::new(),
        }
    }

    #[test]
    fn a_client_that_stops_reading_is_given_up_on() {
        let (tx, mut rx) = mpsc::channel(2);
        let events = Events::new(tx, Duration::from_millis(50));
        assert!(events.send(delta(0)).is_ok());
        assert!(events.send(delta(1)).is_ok());
        // The buffer is full and nobody reads: the send gives up, it does not block.
        let started = Instant::now();
        assert!(matches!(events.send(delta(2)), Err(Halt::Cancelled)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        // A reader that frees room in time lets the send through.
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            let got = rx.blocking_recv();
            (got, rx) // keep the channel open
        });
        assert!(events.send(delta(3)).is_ok());
        let (got, _rx) = reader.join().unwrap();
        assert!(got.is_some());
    }

    #[test]
    fn a_client_that_left_cancels_at_once() {
        let (tx, rx) = mpsc::channel(2);
        let events = Events::new(tx, Duration::from_secs(60));
        drop(rx);
        assert!(events.is_closed());
        assert!(matches!(events.send(delta(0)), Err(Halt::Cancelled)));
        assert!(matches!(
            events.delta(0, "x".into(), Vec::new()),
            Err(Halt::Cancelled)
        ));
    }
}
