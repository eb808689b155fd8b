//! The image worker: step-synchronous batching for Stable Diffusion.
//! Requests that share a size, sampler and step count run together, one
//! UNet call per step for all their images (guidance rows included);
//! others wait for the next group. Every image draws its noise from its
//! own seed on the host, so it comes out the same in any batch.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use kindling_models::diffusion::{latent_preview, EncodedPrompt, ImageJob, Pipeline, SamplerKind};
use tokio::sync::mpsc;

use super::{EngineError, EngineStats, LoadSpec};

/// An image model's defaults and limits, resolved against the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageServing {
    /// Steps when the request names none.
    pub steps: usize,
    /// Most steps a request may ask for.
    pub max_steps: usize,
    /// Guidance scale when the request names none.
    pub guidance_scale: f32,
    /// Sampler when the request names none (`None`: the pipeline's own).
    pub sampler: Option<SamplerKind>,
    /// Size when the request names none (`None`: native).
    pub size: Option<(usize, usize)>,
    /// Largest side (`None`: the native size).
    pub max_size: Option<usize>,
    /// Images per UNet call (guidance rows not counted).
    pub max_batch: usize,
}

/// A validated image request.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// Images to make; image `i` uses seed `seed + i`.
    pub n: usize,
    /// `None`: the model's default size.
    pub size: Option<(usize, usize)>,
    pub steps: Option<usize>,
    pub guidance_scale: Option<f32>,
    pub sampler: Option<SamplerKind>,
    /// `None`: a random seed (reported back).
    pub seed: Option<u64>,
    /// Low-cost previews to send while denoising, spread over the steps.
    pub previews: usize,
    pub deadline: Option<Instant>,
}

/// What the worker reports about a request.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageEvent {
    /// Denoising began, with the settings in force.
    Started {
        prompt_tokens: usize,
        seed: u64,
        steps: usize,
        sampler: &'static str,
        width: usize,
        height: usize,
    },
    /// Step `step` (1-based) of `steps` is done for every image.
    Progress { step: usize, steps: usize },
    /// A rough look at image `index` (latent resolution, no VAE).
    Preview {
        index: usize,
        step: usize,
        width: usize,
        height: usize,
        rgb: Vec<u8>,
    },
    /// Image `index` is done: RGB bytes, row-major.
    Image {
        index: usize,
        seed: u64,
        width: usize,
        height: usize,
        rgb: Vec<u8>,
    },
    /// The request failed; nothing follows.
    Failed(EngineError),
}

pub(crate) struct ImageJobMsg {
    request: ImageRequest,
    size: (usize, usize),
    steps: usize,
    guidance: f32,
    sampler: SamplerKind,
    seed: u64,
    deadline: Option<(Instant, f64)>,
    events: mpsc::UnboundedSender<ImageEvent>,
}

/// What the handle keeps to reach an image worker.
#[derive(Clone)]
pub(crate) struct ImageWorker {
    pub(super) jobs: mpsc::UnboundedSender<ImageJobMsg>,
    pub(super) limits: Arc<Limits>,
}

/// The serving settings with the pipeline's own figures filled in.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    serving: ImageServing,
    native: usize,
    multiple: usize,
    max_side: usize,
    default_sampler: SamplerKind,
}

impl Limits {
    /// Fills in the pipeline's figures and checks the manifest's defaults
    /// against its limits, so a bad default fails the load, not requests.
    pub(super) fn new(mut serving: ImageServing, pipeline: &Pipeline) -> Result<Self, String> {
        let factor = pipeline.latent_factor();
        let multiple = if factor.is_multiple_of(8) {
            factor
        } else {
            8 * factor / gcd(8, factor)
        };
        let native = pipeline.native_size();
        // No sampler can take more steps than the schedule has.
        serving.max_steps = serving.max_steps.min(pipeline.train_timesteps());
        let max_side = serving.max_size.unwrap_or(native);
        if serving.steps == 0 || serving.steps > serving.max_steps {
            return Err(format!(
                "[image] steps = {} is outside 1..={}",
                serving.steps, serving.max_steps
            ));
        }
        if let Some((w, h)) = serving.size {
            if [w, h]
                .iter()
                .any(|&s| s == 0 || !s.is_multiple_of(multiple) || s > max_side)
            {
                return Err(format!(
                    "[image] size = \"{w}x{h}\" must be multiples of {multiple} up to {max_side}"
                ));
            }
        }
        Ok(Self {
            max_side,
            default_sampler: serving
                .sampler
                .unwrap_or_else(|| pipeline.default_sampler()),
            serving,
            native,
            multiple,
        })
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn invalid(param: &'static str, message: String) -> EngineError {
    EngineError::InvalidInput { param, message }
}

impl ImageWorker {
    /// Checks the request against the model's limits, fills in defaults
    /// and queues it.
    pub(super) fn generate(
        &self,
        model_id: &str,
        stats: &Arc<EngineStats>,
        queue_size: usize,
        request: ImageRequest,
    ) -> Result<mpsc::UnboundedReceiver<ImageEvent>, EngineError> {
        let l = &self.limits;
        let (width, height) = request
            .size
            .or(l.serving.size)
            .unwrap_or((l.native, l.native));
        for side in [width, height] {
            if side == 0 || !side.is_multiple_of(l.multiple) {
                return Err(invalid(
                    "size",
                    format!(
                        "width and height must be positive multiples of {}; got {width}x{height}",
                        l.multiple
                    ),
                ));
            }
            if side > l.max_side {
                return Err(invalid(
                    "size",
                    format!(
                        "this model makes images up to {0}x{0}; got {width}x{height}",
                        l.max_side
                    ),
                ));
            }
        }
        let steps = request.steps.unwrap_or(l.serving.steps);
        if steps == 0 || steps > l.serving.max_steps {
            return Err(invalid(
                "steps",
                format!(
                    "steps must be between 1 and {}; got {steps}",
                    l.serving.max_steps
                ),
            ));
        }
        let guidance = request.guidance_scale.unwrap_or(l.serving.guidance_scale);
        let sampler = request.sampler.unwrap_or(l.default_sampler);
        let seed = request
            .seed
            .unwrap_or_else(|| u64::from(rand::random::<u32>()));
        if !stats.try_enqueue(queue_size) {
            return Err(EngineError::QueueFull {
                model: model_id.to_string(),
                queue: queue_size,
            });
        }
        let (events, rx) = mpsc::unbounded_channel();
        let arrived = Instant::now();
        let job = ImageJobMsg {
            deadline: request
                .deadline
                .map(|d| (d, d.saturating_duration_since(arrived).as_secs_f64())),
            request,
            size: (width, height),
            steps,
            guidance,
            sampler,
            seed,
            events,
        };
        if self.jobs.send(job).is_err() {
            stats.dequeue();
            return Err(EngineError::Stopped(model_id.to_string()));
        }
        Ok(rx)
    }
}

/// A request in the running group.
struct Running {
    job: ImageJobMsg,
    prompt: EncodedPrompt,
    images: Vec<ImageJob>,
    previews_sent: usize,
}

type Key = ((usize, usize), SamplerKind, usize);

fn key(job: &ImageJobMsg) -> Key {
    (job.size, job.sampler, job.steps)
}

/// Serves image requests until the last handle is dropped and the queue
/// is empty.
pub(super) fn run(
    spec: LoadSpec,
    pipeline: Arc<Pipeline>,
    max_batch: usize,
    mut jobs: mpsc::UnboundedReceiver<ImageJobMsg>,
    stats: Arc<EngineStats>,
) {
    let mut waiting: VecDeque<ImageJobMsg> = VecDeque::new();
    let mut open = true;
    loop {
        if waiting.is_empty() {
            if !open {
                break;
            }
            match jobs.blocking_recv() {
                Some(job) => waiting.push_back(job),
                None => break,
            }
        }
        open &= receive(&mut jobs, &mut waiting);
        sweep_waiting(&mut waiting, &stats);
        let group = take_group(&mut waiting, max_batch, &stats);
        if group.is_empty() {
            continue;
        }
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let queue = Queue {
                jobs: &mut jobs,
                waiting: &mut waiting,
                open: &mut open,
            };
            run_group(&spec, &pipeline, group, max_batch, queue, &stats)
        }));
        if result.is_err() {
            tracing::error!(model = %spec.model, "the image pipeline panicked; its group failed");
        }
        stats.set_batch(0, 0, 0);
    }
    stats.set_batch(0, 0, 0);
    drop(pipeline);
    super::unloaded(&spec);
}

/// Moves newly arrived jobs into the queue; false once every handle is gone.
fn receive(
    jobs: &mut mpsc::UnboundedReceiver<ImageJobMsg>,
    waiting: &mut VecDeque<ImageJobMsg>,
) -> bool {
    loop {
        match jobs.try_recv() {
            Ok(job) => waiting.push_back(job),
            Err(mpsc::error::TryRecvError::Empty) => return true,
            Err(mpsc::error::TryRecvError::Disconnected) => return false,
        }
    }
}

/// Why a job should stop now, if it should.
fn stop_reason(job: &ImageJobMsg, now: Instant) -> Option<Option<EngineError>> {
    if job.events.is_closed() {
        tracing::info!("image request cancelled: the client went away");
        return Some(None);
    }
    match job.deadline {
        Some((d, seconds)) if now >= d => Some(Some(EngineError::DeadlineExceeded { seconds })),
        _ => None,
    }
}

fn sweep_waiting(waiting: &mut VecDeque<ImageJobMsg>, stats: &EngineStats) {
    let now = Instant::now();
    waiting.retain(|job| match stop_reason(job, now) {
        None => true,
        Some(error) => {
            stats.dequeue();
            if let Some(e) = error {
                let _ = job.events.send(ImageEvent::Failed(e));
            }
            false
        }
    });
}

/// The oldest job and every later one with its size, sampler and steps,
/// while their images fit `max_batch` (the oldest always goes).
fn take_group(
    waiting: &mut VecDeque<ImageJobMsg>,
    max_batch: usize,
    stats: &EngineStats,
) -> Vec<ImageJobMsg> {
    let Some(first) = waiting.front() else {
        return Vec::new();
    };
    let want = key(first);
    let mut images = 0;
    let mut group = Vec::new();
    let mut kept = VecDeque::with_capacity(waiting.len());
    for job in waiting.drain(..) {
        let n = job.request.n;
        if key(&job) == want && (group.is_empty() || images + n <= max_batch) {
            images += n;
            stats.dequeue();
            group.push(job);
        } else {
            kept.push_back(job);
        }
    }
    *waiting = kept;
    group
}

/// The worker's intake, kept moving while a group runs.
struct Queue<'a> {
    jobs: &'a mut mpsc::UnboundedReceiver<ImageJobMsg>,
    waiting: &'a mut VecDeque<ImageJobMsg>,
    open: &'a mut bool,
}

/// Denoises a group step by step, `max_batch` images per UNet call (a
/// request with more images than that takes several calls per step), then
/// decodes and sends each image.
fn run_group(
    spec: &LoadSpec,
    pipeline: &Pipeline,
    group: Vec<ImageJobMsg>,
    max_batch: usize,
    queue: Queue<'_>,
    stats: &EngineStats,
) {
    let ((width, height), sampler, steps) = key(&group[0]);
    let schedule = pipeline.schedule(sampler, steps);
    let len = pipeline.latent_len(width, height);
    let mut running: Vec<Running> = Vec::with_capacity(group.len());
    for job in group {
        let prompt = match pipeline
            .encode_prompt(&job.request.prompt, job.request.negative_prompt.as_deref())
        {
            Ok(p) => p,
            Err(e) => {
                let _ = job
                    .events
                    .send(ImageEvent::Failed(EngineError::Compute(e.to_string())));
                continue;
            }
        };
        let images = (0..job.request.n)
            .map(|i| {
                ImageJob::from_seed(
                    job.seed.wrapping_add(i as u64),
                    job.guidance,
                    len,
                    &schedule,
                )
            })
            .collect();
        let _ = job.events.send(ImageEvent::Started {
            prompt_tokens: prompt.tokens,
            seed: job.seed,
            steps,
            sampler: sampler.name(),
            width,
            height,
        });
        running.push(Running {
            job,
            prompt,
            images,
            previews_sent: 0,
        });
    }
    for i in 0..steps {
        // Waiting requests get their deadlines and cancellations now, not
        // when this group ends.
        *queue.open &= receive(queue.jobs, queue.waiting);
        sweep_waiting(queue.waiting, stats);
        let now = Instant::now();
        running.retain(|r| match stop_reason(&r.job, now) {
            None => true,
            Some(error) => {
                if let Some(e) = error {
                    let _ = r.job.events.send(ImageEvent::Failed(e));
                }
                false
            }
        });
        if running.is_empty() {
            return;
        }
        let images: usize = running.iter().map(|r| r.images.len()).sum();
        stats.set_batch(images, 0, 0);
        let mut batch: Vec<(&EncodedPrompt, &mut ImageJob)> = Vec::with_capacity(images);
        for r in running.iter_mut() {
            let Running { prompt, images, .. } = r;
            for im in images.iter_mut() {
                batch.push((&*prompt, im));
            }
        }
        let mut done = Ok(());
        for chunk in batch.chunks_mut(max_batch.max(1)) {
            done = pipeline.step(&schedule, i, chunk, width, height);
            stats.record_step(0, 0);
            if done.is_err() {
                break;
            }
        }
        if let Err(e) = done {
            tracing::error!(model = %spec.model, error = %e, "denoising step failed");
            for r in &running {
                let _ = r
                    .job
                    .events
                    .send(ImageEvent::Failed(EngineError::Compute(e.to_string())));
            }
            return;
        }
        for r in &mut running {
            let _ = r
                .job
                .events
                .send(ImageEvent::Progress { step: i + 1, steps });
            send_previews(r, pipeline, i, steps, width, height);
        }
    }
    for r in running {
        for (index, image) in r.images.iter().enumerate() {
            *queue.open &= receive(queue.jobs, queue.waiting);
            sweep_waiting(queue.waiting, stats);
            if let Some(error) = stop_reason(&r.job, Instant::now()) {
                if let Some(e) = error {
                    let _ = r.job.events.send(ImageEvent::Failed(e));
                }
                break;
            }
            match pipeline.decode(&image.latents, width, height) {
                Ok(rgb) => {
                    let _ = r.job.events.send(ImageEvent::Image {
                        index,
                        seed: r.job.seed.wrapping_add(index as u64),
                        width,
                        height,
                        rgb,
                    });
                }
                Err(e) => {
                    let _ = r
                        .job
                        .events
                        .send(ImageEvent::Failed(EngineError::Compute(e.to_string())));
                    break;
                }
            }
        }
    }
}

/// Sends the request's previews due after step `i`: `previews` of them,
/// spread evenly, the last one before the final step.
fn send_previews(
    r: &mut Running,
    pipeline: &Pipeline,
    i: usize,
    steps: usize,
    width: usize,
    height: usize,
) {
    let wanted = r.job.request.previews.min(steps.saturating_sub(1));
    if r.previews_sent >= wanted {
        return;
    }
    let due = (r.previews_sent + 1) * steps / (wanted + 1);
    if i + 1 < due.max(1) {
        return;
    }
    r.previews_sent += 1;
    let f = pipeline.latent_factor();
    let (w, h) = (width / f, height / f);
    let channels = r
        .images
        .first()
        .map_or(0, |im| im.latents.len() / (w * h).max(1));
    for (index, image) in r.images.iter().enumerate() {
        let _ = r.job.events.send(ImageEvent::Preview {
            index,
            step: i + 1,
            width: w,
            height: h,
            rgb: latent_preview(&image.latents, channels, w, h),
        });
    }
}
