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
use tokio::sync::{mpsc, oneshot};

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
}

/// The result: one vector per input, in input order.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// The vectors.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens in all inputs together.
    pub prompt_tokens: usize,
}

pub(crate) struct EmbedJob {
    inputs: Vec<Vec<u32>>,
    deadline: Option<(Instant, f64)>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>,
}

/// What the handle keeps to reach an embedding worker.
#[derive(Clone)]
pub(crate) struct EmbedWorker {
    pub(super) jobs: mpsc::UnboundedSender<EmbedJob>,
    pub(super) model: Arc<EmbeddingModel>,
    pub(super) dimensions: Arc<[usize]>,
}

fn invalid(message: impl Into<String>) -> EngineError {
    EngineError::InvalidInput {
        param: "input",
        message: message.into(),
    }
}

impl EmbedWorker {
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

    pub(super) async fn embed(
        &self,
        model_id: &str,
        stats: &Arc<EngineStats>,
        queue_size: usize,
        request: EmbedRequest,
    ) -> Result<Embeddings, EngineError> {
        self.check_dimensions(request.dimensions)?;
        let arrived = Instant::now();
        if !stats.try_enqueue(queue_size) {
            return Err(EngineError::QueueFull {
                model: model_id.to_string(),
                queue: queue_size,
            });
        }
        // Leaves the queue count right however this future ends.
        let mut queued = Queued(Some(stats.clone()));
        let model = self.model.clone();
        let deadline = request.deadline;
        let dimensions = request.dimensions;
        let inputs = tokio::task::spawn_blocking(move || Self::tokenize(&model, &request))
            .await
            .map_err(|e| EngineError::Compute(format!("tokenizer task failed: {e}")))??;
        let prompt_tokens = inputs.iter().map(Vec::len).sum();
        let (reply, rx) = oneshot::channel();
        let job = EmbedJob {
            inputs,
            deadline: deadline.map(|d| (d, d.saturating_duration_since(arrived).as_secs_f64())),
            reply,
        };
        if self.jobs.send(job).is_err() {
            return Err(EngineError::Stopped(model_id.to_string()));
        }
        // The worker takes the request off the waiting count from here on.
        queued.0 = None;
        let mut vectors = rx
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
        })
    }
}

/// Takes a request off the waiting count when dropped, unless disarmed.
struct Queued(Option<Arc<EngineStats>>);

impl Drop for Queued {
    fn drop(&mut self) {
        if let Some(stats) = self.0.take() {
            stats.dequeue();
        }
    }
}

/// A request in the worker: its inputs, how far it has got, its results.
struct Pending {
    job: EmbedJob,
    next: usize,
    results: Vec<Vec<f32>>,
    started: bool,
}

/// Loads the model, reports ready, then batches until the last handle is
/// dropped and every request has been answered.
pub(super) fn run(
    spec: LoadSpec,
    model: Arc<EmbeddingModel>,
    mut jobs: mpsc::UnboundedReceiver<EmbedJob>,
    stats: Arc<EngineStats>,
) {
    let budget = spec.max_batch_tokens.max(model.max_tokens());
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut open = true;
    loop {
        if pending.is_empty() {
            if !open {
                break;
            }
            match jobs.blocking_recv() {
                Some(job) => pending.push_back(Pending::new(job)),
                None => break,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => pending.push_back(Pending::new(job)),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        sweep(&mut pending, &stats);
        let batch = plan(&mut pending, budget, &stats);
        if batch.is_empty() {
            continue;
        }
        let inputs: Vec<&[u32]> = batch
            .iter()
            .map(|&(r, i)| pending[r].job.inputs[i].as_slice())
            .collect();
        let tokens: usize = inputs.iter().map(|i| i.len()).sum();
        stats.set_batch(pending.iter().filter(|p| p.started).count(), 0, 0);
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| model.embed(&inputs)));
        stats.record_step(tokens as u64, 0);
        match result {
            Ok(Ok(vectors)) => {
                for (&(r, i), v) in batch.iter().zip(vectors) {
                    pending[r].results[i] = v;
                }
            }
            Ok(Err(e)) => fail_batch(&mut pending, &batch, EngineError::Compute(e.to_string())),
            Err(_) => {
                tracing::error!(model = %spec.model, "the encoder panicked; failing its batch");
                fail_batch(
                    &mut pending,
                    &batch,
                    EngineError::Compute("the model failed on this batch".into()),
                );
            }
        }
        // Answer the requests whose inputs are all done.
        let mut kept = VecDeque::with_capacity(pending.len());
        for p in pending.drain(..) {
            if p.next == p.job.inputs.len() {
                let _ = p.job.reply.send(Ok(p.results));
            } else {
                kept.push_back(p);
            }
        }
        pending = kept;
        stats.set_batch(pending.iter().filter(|p| p.started).count(), 0, 0);
    }
    stats.set_batch(0, 0, 0);
    drop(model);
    tracing::info!(model = %spec.model, "model unloaded");
}

impl Pending {
    fn new(job: EmbedJob) -> Self {
        let results = vec![Vec::new(); job.inputs.len()];
        Self {
            job,
            next: 0,
            results,
            started: false,
        }
    }
}

/// Drops requests whose client went away and fails those past their deadline.
fn sweep(pending: &mut VecDeque<Pending>, stats: &EngineStats) {
    let now = Instant::now();
    let mut kept = VecDeque::with_capacity(pending.len());
    for p in pending.drain(..) {
        let gone = p.job.reply.is_closed();
        let expired = p.job.deadline.filter(|&(d, _)| now >= d);
        if !gone && expired.is_none() {
            kept.push_back(p);
            continue;
        }
        if !p.started {
            stats.dequeue();
        }
        if gone {
            tracing::info!("embedding request cancelled: the client went away");
        } else if let Some((_, seconds)) = expired {
            let _ = p
                .job
                .reply
                .send(Err(EngineError::DeadlineExceeded { seconds }));
        }
    }
    *pending = kept;
}

/// The next batch: `(request, input)` pairs, one input per request in turn
/// (in arrival order) until the token budget is full.
fn plan(
    pending: &mut VecDeque<Pending>,
    budget: usize,
    stats: &EngineStats,
) -> Vec<(usize, usize)> {
    let mut batch = Vec::new();
    let mut tokens = 0;
    'rounds: loop {
        let mut progress = false;
        for (r, p) in pending.iter_mut().enumerate() {
            let Some(input) = p.job.inputs.get(p.next) else {
                continue;
            };
            if tokens + input.len() > budget && !batch.is_empty() {
                break 'rounds;
            }
            tokens += input.len();
            batch.push((r, p.next));
            p.next += 1;
            progress = true;
            if !p.started {
                p.started = true;
                stats.dequeue();
            }
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
        if let Some(p) = pending.remove(r) {
            let _ = p.job.reply.send(Err(error.clone()));
        }
    }
}
