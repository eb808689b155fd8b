//! The embedding worker: dynamic batching. Concurrent requests' inputs are
//! packed into one encoder pass up to a token budget (packed end to end, so
//! no padding is computed), taking inputs from the waiting requests in turn
//! so that a large request never holds a small one back for long; results
//! are split back per request.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use kindling_models::EmbeddingModel;
use tokio::sync::oneshot;

use super::shell::{Backend, Jobs, Step, Ticket};
use super::{EngineError, EngineStats, LoadSpec};

/// One input to embed.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbedInput {
    /// Text, tokenized with the model's special tokens.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// A validated embeddings request.
#[derive(Debug, Clone)]
pub struct EmbedRequest {
    /// The inputs, in order.
    pub inputs: Vec<EmbedInput>,
    /// Cut texts longer than the model's limit (else they are refused).
    pub truncate: bool,
    /// Keep only the first `dimensions` values (re-normalized); `None` = all.
    pub dimensions: Option<usize>,
    /// When the request must be done by.
    pub deadline: Option<Instant>,
    /// The API key's name, for the fair queue.
    pub tenant: Option<Arc<str>>,
}

/// The result: one vector per input, in input order.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// The vectors.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens in all inputs together.
    pub prompt_tokens: usize,
    /// When its first input went into a batch (the end of its wait).
    pub started: Instant,
}

/// What the worker answers: the vectors, and when the first was started.
type Reply = oneshot::Sender<Result<(Vec<Vec<f32>>, Instant), EngineError>>;

pub(crate) struct EmbedJob {
    inputs: Vec<Vec<u32>>,
    deadline: Option<(Instant, f64)>,
    reply: Reply,
    ticket: Ticket,
}

/// What a handle keeps to check and tokenize a request before queueing it.
#[derive(Clone)]
pub(crate) struct Reach {
    model: Arc<EmbeddingModel>,
    dimensions: Arc<[usize]>,
}

/// Loads an embedding model; `dimensions` are the shorter widths it allows.
pub(super) fn load(
    spec: &LoadSpec,
    stats: &Arc<EngineStats>,
    dimensions: &[usize],
) -> Result<(EmbedBackend, Reach), EngineError> {
    let started = Instant::now();
    let model = EmbeddingModel::load(&spec.path)
        .map(Arc::new)
        .map_err(|e| super::spec::load_failed(spec, e.to_string()))?;
    tracing::info!(
        model = %spec.model,
        path = %spec.path.display(),
        dimensions = model.dimensions(),
        max_tokens = model.max_tokens(),
        max_batch_tokens = spec.max_batch_tokens,
        kernels = model.kernels(),
        weight_bytes = model.weight_bytes(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    let backend = EmbedBackend {
        budget: spec.max_batch_tokens.max(model.max_tokens()),
        model: model.clone(),
        pending: VecDeque::new(),
        stats: stats.clone(),
    };
    let reach = Reach {
        model,
        dimensions: dimensions.into(),
    };
    Ok((backend, reach))
}

fn invalid(message: impl Into<String>) -> EngineError {
    EngineError::InvalidInput {
        param: "input",
        message: message.into(),
    }
}

impl Reach {
    /// Checks `dimensions` against what the model allows.
    fn check_dimensions(&self, dimensions: Option<usize>) -> Result<(), EngineError> {
        let full = self.model.dimensions();
        match dimensions {
            None => Ok(()),
            Some(d) if d == full || self.dimensions.contains(&d) => Ok(()),
            Some(d) => Err(EngineError::InvalidInput {
                param: "dimensions",
                message: if self.dimensions.is_empty() {
                    format!("this model gives {full}-dimensional embeddings and cannot shorten them; got dimensions = {d}")
                } else {
                    format!(
                        "dimensions must be one of {:?} or {full}; got {d}",
                        self.dimensions
                    )
                },
            }),
        }
    }

    /// Token ids per input, every input checked before any is queued.
    fn tokenize(
        model: &EmbeddingModel,
        request: &EmbedRequest,
    ) -> Result<Vec<Vec<u32>>, EngineError> {
        let vocab = model.vocab_size();
        let limit = model.max_tokens();
        request
            .inputs
            .iter()
            .enumerate()
            .map(|(i, input)| {
                let ids = match input {
                    EmbedInput::Text(text) => model
                        .tokenize(text, request.truncate)
                        .map_err(|e| invalid(format!("input {i}: {e}")))?
                        .map_err(|t| {
                            invalid(format!(
                                "input {i} has {} tokens, over this model's limit of {}; send it shorter or leave `truncate` on",
                                t.tokens, t.limit
                            ))
                        })?,
                    EmbedInput::Tokens(ids) => {
                        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                            return Err(invalid(format!(
                                "input {i}: token id {bad} is outside the vocabulary of {vocab} tokens"
                            )));
                        }
                        if ids.len() > limit {
                            return Err(invalid(format!(
                                "input {i} has {} tokens, over this model's limit of {limit}",
                                ids.len()
                            )));
                        }
                        ids.clone()
                    }
                };
                if ids.is_empty() {
                    return Err(invalid(format!("input {i} is empty")));
                }
                Ok(ids)
            })
            .collect()
    }

    /// Checks and tokenizes `request` (off the async threads), queues it
    /// and waits for its vectors.
    pub(super) async fn embed(
        &self,
        jobs: &Jobs<EmbedJob>,
        request: EmbedRequest,
    ) -> Result<Embeddings, EngineError> {
        self.check_dimensions(request.dimensions)?;
        let arrived = Instant::now();
        // Held from here: however this future ends, the place goes back.
        let ticket = jobs.ticket(request.tenant.clone())?;
        let model = self.model.clone();
        let deadline = request.deadline;
        let dimensions = request.dimensions;
        let inputs = tokio::task::spawn_blocking(move || Self::tokenize(&model, &request))
            .await
            .map_err(|e| EngineError::Compute(format!("tokenizer task failed: {e}")))??;
        let prompt_tokens = inputs.iter().map(Vec::len).sum();
        let (reply, rx) = oneshot::channel();
        jobs.send(EmbedJob {
            inputs,
            deadline: deadline.map(|d| (d, d.saturating_duration_since(arrived).as_secs_f64())),
            reply,
            ticket,
        })?;
        let (mut vectors, started) = rx
            .await
            .map_err(|_| EngineError::Compute("the model worker stopped unexpectedly".into()))??;
        if let Some(d) = dimensions.filter(|&d| d < self.model.dimensions()) {
            for v in &mut vectors {
                v.truncate(d);
                if self.model.normalizes() {
                    kindling_models::embedding::normalize(v);
                }
            }
        }
        Ok(Embeddings {
            vectors,
            prompt_tokens,
            started,
        })
    }
}

/// A request in the worker: its inputs, how far it has got, its results.
struct Pending {
    inputs: Vec<Vec<u32>>,
    deadline: Option<(Instant, f64)>,
    ticket: Ticket,
    reply: Option<Reply>,
    next: usize,
    results: Vec<Vec<f32>>,
    started: Option<Instant>,
}

/// A loaded embedding model and the requests in its hands.
pub(super) struct EmbedBackend {
    model: Arc<EmbeddingModel>,
    budget: usize,
    pending: VecDeque<Pending>,
    stats: Arc<EngineStats>,
}

impl Backend for EmbedBackend {
    type Job = EmbedJob;

    fn admit(&mut self, job: EmbedJob) {
        self.pending.push_back(Pending::new(job));
    }

    /// Encodes one packed batch and answers the requests it completes.
    fn step(&mut self) -> Step {
        sweep(&mut self.pending);
        let batch = plan(&mut self.pending, self.budget);
        if batch.is_empty() {
            return Step::Worked;
        }
        let pending = &mut self.pending;
        let inputs: Vec<&[u32]> = batch
            .iter()
            .map(|&(r, i)| pending[r].inputs[i].as_slice())
            .collect();
        let tokens: usize = inputs.iter().map(|i| i.len()).sum();
        self.stats.set_batch(started(pending), 0, 0);
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.model.embed(&inputs)));
        self.stats.record_step(tokens as u64, 0);
        match result {
            Ok(Ok(vectors)) => {
                for (&(r, i), v) in batch.iter().zip(vectors) {
                    pending[r].results[i] = v;
                }
            }
            Ok(Err(e)) => fail_batch(pending, &batch, EngineError::Compute(e.to_string())),
            Err(_) => fail_batch(
                pending,
                &batch,
                EngineError::Compute("the encoder panicked on this batch".into()),
            ),
        }
        // Answer the requests whose inputs are all done.
        pending.retain_mut(|p| {
            let done = p.next == p.inputs.len();
            if done {
                let results = std::mem::take(&mut p.results);
                p.answer(Ok(results));
            }
            !done
        });
        self.stats.set_batch(started(pending), 0, 0);
        Step::Worked
    }

    fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    fn abort(&mut self) {
        for mut p in self.pending.drain(..) {
            p.answer(Err(EngineError::Compute(
                "the embedding worker failed".into(),
            )));
        }
    }
}

fn started(pending: &VecDeque<Pending>) -> usize {
    pending.iter().filter(|p| !p.ticket.is_waiting()).count()
}

impl Pending {
    fn new(job: EmbedJob) -> Self {
        let results = vec![Vec::new(); job.inputs.len()];
        Self {
            inputs: job.inputs,
            deadline: job.deadline,
            ticket: job.ticket,
            reply: Some(job.reply),
            next: 0,
            results,
            started: None,
        }
    }

    fn answer(&mut self, result: Result<Vec<Vec<f32>>, EngineError>) {
        let started = self.started.unwrap_or_else(Instant::now);
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result.map(|v| (v, started)));
        }
    }
}

/// Drops requests whose client went away and fails those past their deadline.
fn sweep(pending: &mut VecDeque<Pending>) {
    let now = Instant::now();
    pending.retain_mut(|p| {
        let gone = p.reply.as_ref().is_none_or(|r| r.is_closed());
        let expired = p.deadline.filter(|&(d, _)| now >= d);
        if gone {
            tracing::info!("embedding request cancelled: the client went away");
        } else if let Some((_, seconds)) = expired {
            p.answer(Err(EngineError::DeadlineExceeded { seconds }));
        }
        !gone && expired.is_none()
    });
}

/// The next batch: `(request, input)` pairs, one input per request in turn
/// (in arrival order) until the token budget is full.
fn plan(pending: &mut VecDeque<Pending>, budget: usize) -> Vec<(usize, usize)> {
    let mut batch = Vec::new();
    let mut tokens = 0;
    'rounds: loop {
        let mut progress = false;
        for (r, p) in pending.iter_mut().enumerate() {
            let Some(input) = p.inputs.get(p.next) else {
                continue;
            };
            if tokens + input.len() > budget && !batch.is_empty() {
                break 'rounds;
            }
            tokens += input.len();
            batch.push((r, p.next));
            p.next += 1;
            progress = true;
            p.ticket.leave();
            p.started.get_or_insert_with(Instant::now);
        }
        if !progress {
            break;
        }
    }
    batch
}

fn fail_batch(pending: &mut VecDeque<Pending>, batch: &[(usize, usize)], error: EngineError) {
    let mut failed: Vec<usize> = batch.iter().map(|&(r, _)| r).collect();
    failed.sort_unstable();
    failed.dedup();
    for &r in failed.iter().rev() {
        if let Some(mut p) = pending.remove(r) {
            p.answer(Err(error.clone()));
        }
    }
}
