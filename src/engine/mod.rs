//! The engine room: one worker per loaded model, on its own OS thread,
//! running continuous batching. Callers submit a validated request and read
//! a stream of events; dropping the stream cancels the request.
//!
//! The worker admits waiting requests into the running batch at every step,
//! prefills prompts in chunks beside the sequences being decoded, and keeps
//! keys and values in a paged cache, so sequences join and leave at any step.

mod embed;
mod image;
mod scheduler;
mod sequence;
mod stats;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use embed::{EmbedInput, EmbedRequest, Embeddings};
pub use image::{ImageEvent, ImageRequest, ImageServing};
pub use stats::EngineStats;

use kindling_models::{ChatMessage, Footprint, SamplingParams};
use tokio::sync::{mpsc, oneshot};

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Raw text, tokenized as is.
    Text(String),
    /// Token ids, used as is.
    Tokens(Vec<u32>),
}

/// A validated generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The inputs: one for chat, one or more for text completions. Choice
    /// `i` of prompt `p` is numbered `p * n + i`.
    pub prompts: Vec<Prompt>,
    /// Most tokens to generate per choice, as the client asked; prompt plus
    /// this must fit the context. `None` = up to the context length.
    pub max_tokens: Option<usize>,
    /// A default limit for when the client named none; unlike `max_tokens`
    /// it shrinks to fit the context instead of failing the request.
    pub default_max_tokens: Option<usize>,
    /// Stop sequences; the output ends before the first one.
    pub stop: Vec<String>,
    /// Choices to generate from each prompt.
    pub n: usize,
    /// Sampling parameters of choice 0; choice `i` uses seed `seed + i`.
    pub sampling: SamplingParams,
    /// Prefix each choice's text with the prompt text (legacy completions `echo`).
    pub echo: bool,
    /// Keep generating past end-of-turn tokens (benchmarks, fixed-length tests).
    pub ignore_eos: bool,
    /// When the request must be done by; past it, it fails and frees its slot.
    pub deadline: Option<Instant>,
}

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-turn token or stop sequence.
    Stop,
    /// `max_tokens` or the context length reached.
    Length,
}

/// One alternative in a log-probability report.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenAlternative {
    /// The token's text (lossy where it is a partial UTF-8 sequence).
    pub token: String,
    /// Its raw bytes.
    pub bytes: Vec<u8>,
    /// Its log-probability.
    pub logprob: f32,
}

/// Log-probability of one generated token and its top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The generated token.
    pub chosen: TokenAlternative,
    /// The most likely tokens at that step.
    pub top: Vec<TokenAlternative>,
}

/// What a worker reports while it serves a request.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// Every prompt was accepted; generation begins.
    Started {
        /// Tokens in all prompts together.
        prompt_tokens: usize,
    },
    /// New text for one choice (may be empty when only log-probabilities are new).
    Delta {
        /// The choice.
        index: usize,
        /// The text.
        text: String,
        /// Log-probabilities of the tokens behind this text, when asked for.
        logprobs: Vec<TokenLogprob>,
    },
    /// A choice ended.
    Finished {
        /// The choice.
        index: usize,
        /// Why.
        reason: FinishReason,
        /// Tokens generated for it.
        completion_tokens: usize,
    },
    /// The request failed; no more events follow.
    Failed(EngineError),
}

/// The engine room's errors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The model's waiting queue is full.
    #[error("model `{model}` has {queue} requests waiting; try again shortly")]
    QueueFull {
        /// The model.
        model: String,
        /// The queue's capacity.
        queue: usize,
    },
    /// Prompt plus requested tokens exceed what a sequence may hold.
    #[error("this model's maximum context length is {context} tokens; the prompt has {prompt_tokens} tokens and {max_tokens} more were requested")]
    ContextLengthExceeded {
        /// The model's context length.
        context: usize,
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens requested (at least 1 when left open).
        max_tokens: usize,
    },
    /// The input itself is unusable (empty prompt, token id out of range, …).
    #[error("{message}")]
    InvalidInput {
        /// The request parameter at fault.
        param: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The model could not be loaded.
    #[error("model `{model}` failed to load: {reason}")]
    LoadFailed {
        /// The model.
        model: String,
        /// Why.
        reason: String,
        /// Seconds until the next attempt is allowed, if it is held back.
        retry_after: Option<u64>,
    },
    /// The model failed while computing.
    #[error("model computation failed: {0}")]
    Compute(String),
    /// Loading must wait: there is no room for the model yet.
    #[error("{message}")]
    NoRoom {
        /// Why, with the figures.
        message: String,
        /// Seconds after which a retry may succeed; `None` if it never will.
        retry_after: Option<u64>,
    },
    /// The request's deadline passed before it finished.
    #[error("the request did not finish within its {seconds:.1}s deadline")]
    DeadlineExceeded {
        /// The time it was given.
        seconds: f64,
    },
    /// The worker is gone (shutting down).
    #[error("model `{0}` is shutting down")]
    Stopped(String),
}

/// What a model is loaded for.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Text generation (continuous batching).
    Text,
    /// Embeddings (dynamic batching); `dimensions` lists the shorter
    /// widths the model allows (Matryoshka), besides its full one.
    Embedding {
        /// Allowed shorter widths.
        dimensions: Vec<usize>,
    },
    /// Image generation (step-synchronous batching).
    Image(ImageServing),
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// The CPU path (host memory, our CPU kernels).
    #[default]
    Cpu,
    /// A CUDA GPU, with weights, activations and KV cache in `dtype`.
    Cuda {
        /// The driver's device ordinal.
        ordinal: usize,
        /// bf16, f16 or f32.
        dtype: kindling_models::DType,
    },
}

/// Where and how to load a model.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The model's id, for logs and errors.
    pub model: String,
    /// What it serves.
    pub task: Task,
    /// The GGUF file, or the Hugging Face folder.
    pub path: PathBuf,
    /// Cap on positions per sequence (default: the trained context).
    pub context_length: Option<usize>,
    /// Requests that may wait for a place in the batch before new ones are refused.
    pub queue_size: usize,
    /// How long a client may leave its event buffer full before its request
    /// is cancelled; meanwhile its sequences sit out, the others run on.
    pub stall_timeout: Duration,
    /// Sequences per batch.
    pub max_sequences: usize,
    /// Tokens per forward pass: decode tokens plus prompt chunks (text);
    /// packed input tokens per encoder pass (embeddings).
    pub max_batch_tokens: usize,
    /// Positions the paged KV cache holds over all sequences (raised to at
    /// least one full context).
    pub kv_cache_tokens: usize,
    /// The device (text models; the others run on the CPU).
    pub target: Target,
}

impl LoadSpec {
    fn serving(&self) -> kindling_models::footprint::TextServing {
        kindling_models::footprint::TextServing {
            context_length: self.context_length,
            kv_cache_tokens: self.kv_cache_tokens,
            batch_tokens: self.max_batch_tokens,
            sequences: self.max_sequences,
            device_element_bytes: self.target.element_bytes(),
        }
    }
}

impl Target {
    /// The models room's placement: the CPU path, or the candle device for
    /// the GPU (which must be usable).
    fn placement(self) -> kindling_models::Result<kindling_models::Placement> {
        Ok(match self {
            Self::Cpu => kindling_models::Placement::Host,
            Self::Cuda { ordinal, dtype } => {
                let device = kindling_models::gpu::device(ordinal)
                    .map_err(kindling_models::ModelError::Device)?;
                kindling_models::Placement::Device(device, dtype)
            }
        })
    }

    /// Bytes per weight/activation element on a GPU; `None` on the CPU.
    fn element_bytes(self) -> Option<u64> {
        match self {
            Self::Cpu => None,
            Self::Cuda { dtype, .. } => Some(dtype.size_in_bytes() as u64),
        }
    }
}

/// Estimates the memory the model in `spec` will take once loaded and
/// serving: weights, the whole KV cache and one pass's activations.
pub fn estimate(spec: &LoadSpec) -> Result<Footprint, EngineError> {
    let estimate = match spec.task {
        Task::Text => kindling_models::footprint::estimate_text(&spec.path, spec.serving()),
        Task::Embedding { .. } => {
            kindling_models::footprint::estimate_embedding(&spec.path, spec.max_batch_tokens)
        }
        Task::Image(ref serving) => image_footprint(&spec.path, serving, spec.target),
    };
    estimate.map_err(|e| EngineError::LoadFailed {
        model: spec.model.clone(),
        reason: e.to_string(),
        retry_after: None,
    })
}

fn image_footprint(
    path: &std::path::Path,
    serving: &ImageServing,
    target: Target,
) -> kindling_models::Result<Footprint> {
    let native = || -> kindling_models::Result<usize> {
        let unet =
            kindling_models::diffusion::config::UNetConfig::read(&path.join("unet/config.json"))?;
        let vae =
            kindling_models::diffusion::config::VaeConfig::read(&path.join("vae/config.json"))?;
        Ok(unet.sample_size * vae.scale_factor())
    };
    let max_side = match serving.max_size {
        Some(m) => m,
        None => native()?,
    };
    kindling_models::footprint::estimate_image(
        path,
        kindling_models::footprint::ImageServing {
            max_side,
            max_batch: serving.max_batch,
            device_element_bytes: target.element_bytes(),
        },
    )
}

pub(crate) struct Job {
    request: GenerateRequest,
    events: sequence::Events,
}

/// A cloneable way to reach a model's worker. The worker exits, and frees the
/// model, when the last handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    model: Arc<str>,
    queue_size: usize,
    worker: Worker,
    stats: Arc<EngineStats>,
}

/// The worker behind a handle.
#[derive(Clone)]
enum Worker {
    Text {
        jobs: mpsc::UnboundedSender<Job>,
        stall_timeout: Duration,
    },
    Embedding(embed::EmbedWorker),
    Image(image::ImageWorker),
}

/// Events are buffered this deep per request before the worker waits for
/// the client to catch up.
const EVENT_BUFFER: usize = 256;

impl EngineHandle {
    /// Requests waiting for a place in the batch.
    pub fn queue_depth(&self) -> usize {
        self.stats.waiting()
    }

    /// The worker's live figures (queue, batch, KV cache, throughput).
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Queues `request`; its events arrive on the returned receiver.
    /// Dropping the receiver cancels the request at the next step.
    pub fn submit(
        &self,
        request: GenerateRequest,
    ) -> Result<mpsc::Receiver<GenerateEvent>, EngineError> {
        let Worker::Text {
            jobs,
            stall_timeout,
        } = &self.worker
        else {
            return Err(self.wrong_task("text generation"));
        };
        if !self.stats.try_enqueue(self.queue_size) {
            return Err(EngineError::QueueFull {
                model: self.model.to_string(),
                queue: self.queue_size,
            });
        }
        // Room for every choice's events of a few steps: a request only
        // takes part in a step when its client has room for that step.
        let choices = request.n * request.prompts.len();
        let (tx, rx) = mpsc::channel(EVENT_BUFFER.max(4 * sequence::EVENTS_PER_STEP * choices));
        let events = sequence::Events::new(tx, *stall_timeout);
        if jobs.send(Job { request, events }).is_err() {
            self.stats.dequeue();
            return Err(EngineError::Stopped(self.model.to_string()));
        }
        Ok(rx)
    }

    /// Embeds `request`'s inputs, batched with other requests'. Dropping the
    /// future cancels the request.
    pub async fn embed(&self, request: EmbedRequest) -> Result<Embeddings, EngineError> {
        let Worker::Embedding(worker) = &self.worker else {
            return Err(self.wrong_task("embeddings"));
        };
        worker
            .embed(&self.model, &self.stats, self.queue_size, request)
            .await
    }

    /// Queues an image request; its events arrive on the returned
    /// receiver, which closes after the last image. Dropping the receiver
    /// cancels the request at the next step.
    pub fn generate_images(
        &self,
        request: ImageRequest,
    ) -> Result<mpsc::UnboundedReceiver<ImageEvent>, EngineError> {
        let Worker::Image(worker) = &self.worker else {
            return Err(self.wrong_task("image generation"));
        };
        worker.generate(&self.model, &self.stats, self.queue_size, request)
    }

    fn wrong_task(&self, what: &str) -> EngineError {
        EngineError::InvalidInput {
            param: "model",
            message: format!("model `{}` does not serve {what}", self.model),
        }
    }
}

/// Resolves once a worker has exited and its model's memory is freed.
pub type Stopped = oneshot::Receiver<()>;

/// Starts a worker thread that loads the model described by `spec`, and
/// resolves once it is ready to serve (or failed to load). The worker runs
/// until the last handle is dropped and its queue is empty; `Stopped`
/// resolves after it has freed the model.
pub async fn start(spec: LoadSpec) -> Result<(EngineHandle, Stopped), EngineError> {
    let stats = Arc::new(EngineStats::default());
    let worker_stats = stats.clone();
    let (ready_tx, ready_rx) = oneshot::channel::<Result<Worker, EngineError>>();
    let (stopped_tx, stopped_rx) = oneshot::channel();
    let name = format!("model-{}", spec.model);
    let model: Arc<str> = Arc::from(spec.model.as_str());
    let queue_size = spec.queue_size;
    let thread_spec = spec.clone();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            run(thread_spec, ready_tx, worker_stats);
            let _ = stopped_tx.send(());
        })
        .map_err(|e| EngineError::LoadFailed {
            model: spec.model.clone(),
            reason: format!("cannot start worker thread: {e}"),
            retry_after: None,
        })?;
    let worker = ready_rx.await.map_err(|_| EngineError::LoadFailed {
        model: spec.model.clone(),
        reason: "the worker thread died while loading".into(),
        retry_after: None,
    })??;
    let handle = EngineHandle {
        model,
        queue_size,
        worker,
        stats,
    };
    Ok((handle, stopped_rx))
}

/// Logs that a worker has dropped its model. On a GPU the device's stream
/// is drained first: frees are ordered on it, and only then does the memory
/// go back to the driver, whose free figure the line reports.
pub(crate) fn unloaded(spec: &LoadSpec) {
    match spec.target {
        Target::Cpu => tracing::info!(model = %spec.model, "model unloaded"),
        Target::Cuda { ordinal, .. } => {
            if let Ok(device) = kindling_models::gpu::device(ordinal) {
                let _ = device.synchronize();
            }
            let free = kindling_models::gpu::memory(ordinal).map_or(0, |m| m.free);
            tracing::info!(
                model = %spec.model,
                device = %format!("cuda:{ordinal}"),
                free_bytes = free,
                "model unloaded"
            );
        }
    }
}

fn load_failed(spec: &LoadSpec, reason: String) -> EngineError {
    EngineError::LoadFailed {
        model: spec.model.clone(),
        reason,
        retry_after: None,
    }
}

/// The worker thread's body: loads the model, hands back how to reach it,
/// and serves until the last handle is gone.
fn run(
    spec: LoadSpec,
    ready: oneshot::Sender<Result<Worker, EngineError>>,
    stats: Arc<EngineStats>,
) {
    match spec.task.clone() {
        Task::Text => {
            let (jobs, rx) = mpsc::unbounded_channel();
            let worker = Worker::Text {
                jobs,
                stall_timeout: spec.stall_timeout,
            };
            let on_ready =
                |result: Result<(), EngineError>| ready.send(result.map(|()| worker)).is_ok();
            worker::run_worker(spec, rx, on_ready, stats);
        }
        Task::Embedding { dimensions } => {
            let started = Instant::now();
            let model = match kindling_models::EmbeddingModel::load(&spec.path) {
                Ok(m) => Arc::new(m),
                Err(e) => {
                    let _ = ready.send(Err(load_failed(&spec, e.to_string())));
                    return;
                }
            };
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
            let (jobs, rx) = mpsc::unbounded_channel();
            let worker = Worker::Embedding(embed::EmbedWorker {
                jobs,
                model: model.clone(),
                dimensions: dimensions.into(),
            });
            if ready.send(Ok(worker)).is_err() {
                return;
            }
            embed::run(spec, model, rx, stats);
        }
        Task::Image(serving) => {
            let started = Instant::now();
            let loaded = spec.target.placement().and_then(|p| match p {
                kindling_models::Placement::Host => kindling_models::diffusion::Pipeline::load(
                    &spec.path,
                    &kindling_models::Device::Cpu,
                ),
                kindling_models::Placement::Device(d, dtype) => {
                    kindling_models::diffusion::Pipeline::load_as(&spec.path, &d, dtype)
                }
            });
            let pipeline = match loaded {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    let _ = ready.send(Err(load_failed(&spec, e.to_string())));
                    return;
                }
            };
            tracing::info!(
                model = %spec.model,
                path = %spec.path.display(),
                pipeline = pipeline.class_name(),
                device = ?spec.target,
                native_size = pipeline.native_size(),
                max_batch = serving.max_batch,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "model loaded"
            );
            let (jobs, rx) = mpsc::unbounded_channel();
            let max_batch = serving.max_batch.max(1);
            let limits = match image::Limits::new(serving, &pipeline) {
                Ok(l) => l,
                Err(reason) => {
                    let _ = ready.send(Err(load_failed(&spec, reason)));
                    return;
                }
            };
            let worker = Worker::Image(image::ImageWorker {
                jobs,
                limits: Arc::new(limits),
            });
            if ready.send(Ok(worker)).is_err() {
                return;
            }
            image::run(spec, pipeline, max_batch, rx, stats);
        }
    }
}
