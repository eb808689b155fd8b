//! The engine room: one worker per loaded model, on its own OS thread.
//!
//! Every worker runs in the same shell ([`shell`]): a bounded queue whose
//! bound is the model's admission limit, a thread that parks whenever it
//! has nothing it can do, and one drain-and-unload path. What differs per
//! task is a small [`shell::Backend`]:
//!
//! - text ([`text`]): continuous batching over a paged KV cache, driven by
//!   the [`scheduler`] (admission, chunked prefill, preemption);
//! - embeddings ([`embed`]): dynamic batching of packed inputs;
//! - images ([`image`]): step-synchronous batching of denoising steps.
//!
//! Callers submit a validated request and read its events or result;
//! dropping them cancels the request.

mod embed;
mod error;
mod image;
mod request;
mod scheduler;
mod sequence;
mod shell;
mod spec;
mod stats;
mod text;

use std::sync::Arc;
use std::time::Duration;

pub use embed::{EmbedInput, EmbedRequest, Embeddings};
pub use error::EngineError;
pub use image::{ImageEvent, ImageRequest, ImageServing};
pub use request::{
    FinishReason, GenerateEvent, GenerateEvents, GenerateSpec, OutputConstraint, Prompt,
    TokenAlternative, TokenLogprob, ToolCallEvent, ToolChoice, ToolUse, ValidGenerate, MAX_CHOICES,
    MAX_STOP,
};
pub use spec::{estimate, LoadSpec, Target, Task};
pub use stats::EngineStats;

use shell::Jobs;
use tokio::sync::{mpsc, oneshot};

/// A cloneable way to reach a model's worker. The worker exits, and frees the
/// model, when the last handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    model: Arc<str>,
    worker: Worker,
    stats: Arc<EngineStats>,
}

/// The worker behind a handle: its queue, and what the handle checks
/// before queueing.
#[derive(Clone)]
enum Worker {
    Text {
        jobs: Jobs<text::TextJob>,
        stall_timeout: Duration,
    },
    Embedding {
        jobs: Jobs<embed::EmbedJob>,
        reach: embed::Reach,
    },
    Image {
        jobs: Jobs<image::ImageJobMsg>,
        limits: Arc<image::Limits>,
    },
}

impl EngineHandle {
    /// Requests waiting for a place in the batch.
    pub fn queue_depth(&self) -> usize {
        self.stats.waiting()
    }

    /// The worker's live figures (queue, batch, KV cache, throughput).
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Queues `request`; its events arrive on the returned stream.
    /// Dropping the stream cancels the request at the next step.
    pub fn submit(&self, request: ValidGenerate) -> Result<GenerateEvents, EngineError> {
        let Worker::Text {
            jobs,
            stall_timeout,
        } = &self.worker
        else {
            return Err(self.wrong_task("text generation"));
        };
        text::submit(jobs, *stall_timeout, request)
    }

    /// Embeds `request`'s inputs, batched with other requests'. Dropping the
    /// future cancels the request.
    pub async fn embed(&self, request: EmbedRequest) -> Result<Embeddings, EngineError> {
        let Worker::Embedding { jobs, reach } = &self.worker else {
            return Err(self.wrong_task("embeddings"));
        };
        reach.embed(jobs, request).await
    }

    /// Queues an image request; its events arrive on the returned
    /// receiver, which closes after the last image. Dropping the receiver
    /// cancels the request at the next step.
    pub fn generate_images(
        &self,
        request: ImageRequest,
    ) -> Result<mpsc::UnboundedReceiver<ImageEvent>, EngineError> {
        let Worker::Image { jobs, limits } = &self.worker else {
            return Err(self.wrong_task("image generation"));
        };
        image::submit(jobs, limits, request)
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
    let thread_spec = spec.clone();
    std::thread::Builder::new()
        .name(format!("model-{}", spec.model))
        .spawn(move || {
            run(&thread_spec, &worker_stats, ready_tx);
            let _ = stopped_tx.send(());
        })
        .map_err(|e| spec::load_failed(&spec, format!("cannot start worker thread: {e}")))?;
    let worker = ready_rx
        .await
        .map_err(|_| spec::load_failed(&spec, "the worker thread died while loading".into()))??;
    let handle = EngineHandle {
        model: Arc::from(spec.model.as_str()),
        worker,
        stats,
    };
    Ok((handle, stopped_rx))
}

/// The worker thread's body: the shell around the task's backend.
fn run(
    spec: &LoadSpec,
    stats: &Arc<EngineStats>,
    ready: oneshot::Sender<Result<Worker, EngineError>>,
) {
    let reply = move |worker: Result<Worker, EngineError>| ready.send(worker).is_ok();
    match &spec.task {
        Task::Text => shell::run(spec, stats, text::load, |r| {
            reply(r.map(|(jobs, ())| Worker::Text {
                jobs,
                stall_timeout: spec.stall_timeout,
            }))
        }),
        Task::Embedding { dimensions } => shell::run(
            spec,
            stats,
            |spec, stats| embed::load(spec, stats, dimensions),
            |r| reply(r.map(|(jobs, reach)| Worker::Embedding { jobs, reach })),
        ),
        Task::Image(serving) => shell::run(
            spec,
            stats,
            |spec, stats| image::load(spec, stats, serving),
            |r| reply(r.map(|(jobs, limits)| Worker::Image { jobs, limits })),
        ),
    }
}
