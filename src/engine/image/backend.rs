//! The image backend: step-synchronous batching for Stable Diffusion.
//! Requests that share a size, sampler and step count run together as a
//! group, one UNet call per denoising step for all their images (guidance
//! rows included); others wait for the next group. Each shell step is one
//! denoising step of the group, or one image's decode, so arrivals,
//! cancellations and deadlines are seen between them. Every image draws its
//! noise from its own seed on the host, so it comes out the same in any batch.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use kindling_models::diffusion::{
    latent_preview, EncodedPrompt, ImageJob, Pipeline, SamplerKind, Schedule,
};

use super::super::shell::{Backend, Step};
use super::super::{EngineError, EngineStats, LoadSpec};
use super::{ImageEvent, ImageJobMsg};

/// A loaded pipeline, its waiting requests and the group it is running.
pub(crate) struct ImageBackend {
    model: String,
    pipeline: Pipeline,
    max_batch: usize,
    stats: Arc<EngineStats>,
    waiting: VecDeque<ImageJobMsg>,
    group: Option<Group>,
}

/// Requests denoised together, and how far they have got.
struct Group {
    key: Key,
    schedule: Schedule,
    running: Vec<Running>,
    /// Denoising steps done.
    done: usize,
    /// Next image to decode once denoised: (request, image).
    decode: (usize, usize),
}

/// A request in the running group.
struct Running {
    job: ImageJobMsg,
    prompt: EncodedPrompt,
    images: Vec<ImageJob>,
    previews_sent: usize,
    failed: bool,
}

type Key = ((usize, usize), SamplerKind, usize);

fn key(job: &ImageJobMsg) -> Key {
    (job.size, job.sampler, job.steps)
}

impl ImageBackend {
    pub(super) fn new(
        spec: &LoadSpec,
        pipeline: Pipeline,
        max_batch: usize,
        stats: Arc<EngineStats>,
    ) -> Self {
        Self {
            model: spec.model.clone(),
            pipeline,
            max_batch,
            stats,
            waiting: VecDeque::new(),
            group: None,
        }
    }

    /// Takes the oldest job and every later one with its size, sampler and
    /// steps, while their images fit `max_batch` (the oldest always goes),
    /// and encodes their prompts.
    fn start_group(&mut self) -> Option<Group> {
        let want = key(self.waiting.front()?);
        let mut images = 0;
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for mut job in self.waiting.drain(..) {
            let n = job.request.n;
            if key(&job) == want && (taken.is_empty() || images + n <= self.max_batch) {
                images += n;
                job.ticket.leave();
                taken.push(job);
            } else {
                kept.push_back(job);
            }
        }
        self.waiting = kept;
        let ((width, height), sampler, steps) = want;
        let schedule = self.pipeline.schedule(sampler, steps);
        let len = self.pipeline.latent_len(width, height);
        let mut running = Vec::with_capacity(taken.len());
        for job in taken {
            let request = &job.request;
            let prompt = match self
                .pipeline
                .encode_prompt(&request.prompt, request.negative_prompt.as_deref())
            {
                Ok(p) => p,
                Err(e) => {
                    fail(&job, EngineError::Compute(e.to_string()));
                    continue;
                }
            };
            let images = (0..request.n)
                .map(|i| {
                    let seed = job.seed.wrapping_add(i as u64);
                    ImageJob::from_seed(seed, job.guidance, len, &schedule)
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
                failed: false,
            });
        }
        Some(Group {
            key: want,
            schedule,
            running,
            done: 0,
            decode: (0, 0),
        })
    }

    /// One denoising step for every image of the group, `max_batch` images
    /// per UNet call (a request with more images takes several calls).
    fn denoise(&self, group: &mut Group) {
        let ((width, height), _, steps) = group.key;
        let i = group.done;
        let live = || group.running.iter().filter(|r| !r.failed);
        let images: usize = live().map(|r| r.images.len()).sum();
        self.stats.set_batch(images, 0, 0);
        let mut batch: Vec<(&EncodedPrompt, &mut ImageJob)> = Vec::with_capacity(images);
        for r in group.running.iter_mut().filter(|r| !r.failed) {
            let Running { prompt, images, .. } = r;
            for im in images.iter_mut() {
                batch.push((&*prompt, im));
            }
        }
        let mut done = Ok(());
        for chunk in batch.chunks_mut(self.max_batch) {
            done = self.pipeline.step(&group.schedule, i, chunk, width, height);
            self.stats.record_step(0, 0);
            if done.is_err() {
                break;
            }
        }
        if let Err(e) = done {
            tracing::error!(model = %self.model, error = %e, "denoising step failed");
            for r in group.running.iter_mut().filter(|r| !r.failed) {
                fail(&r.job, EngineError::Compute(e.to_string()));
                r.failed = true;
            }
            return;
        }
        group.done += 1;
        for r in group.running.iter_mut().filter(|r| !r.failed) {
            let _ = r
                .job
                .events
                .send(ImageEvent::Progress { step: i + 1, steps });
            send_previews(r, &self.pipeline, i, steps, (width, height));
        }
    }

    /// Decodes the group's next image and sends it. Returns false once
    /// every image is out.
    fn decode_next(&self, group: &mut Group) -> bool {
        let ((width, height), ..) = group.key;
        let (r, index) = group.decode;
        let Some(req) = group.running.get_mut(r) else {
            return false;
        };
        let Some(image) = req.images.get(index).filter(|_| !req.failed) else {
            group.decode = (r + 1, 0);
            return true;
        };
        group.decode = (r, index + 1);
        match self.pipeline.decode(&image.latents, width, height) {
            Ok(rgb) => {
                let _ = req.job.events.send(ImageEvent::Image {
                    index,
                    seed: req.job.seed.wrapping_add(index as u64),
                    width,
                    height,
                    rgb,
                });
            }
            Err(e) => {
                fail(&req.job, EngineError::Compute(e.to_string()));
                req.failed = true;
            }
        }
        true
    }
}

impl Backend for ImageBackend {
    type Job = ImageJobMsg;

    fn admit(&mut self, job: ImageJobMsg) {
        self.waiting.push_back(job);
    }

    fn step(&mut self) -> Step {
        let now = Instant::now();
        // Waiting requests get their deadlines and cancellations now, not
        // when the running group ends.
        self.waiting.retain(|job| keep(job, now));
        let mut group = match self.group.take() {
            Some(g) => g,
            None => match self.start_group() {
                Some(g) => g,
                None => return Step::Worked,
            },
        };
        for r in group.running.iter_mut().filter(|r| !r.failed) {
            r.failed = !keep(&r.job, now);
        }
        let (.., steps) = group.key;
        let more = group.running.iter().any(|r| !r.failed)
            && if group.done < steps {
                self.denoise(&mut group);
                true
            } else {
                self.decode_next(&mut group)
            };
        if more {
            self.group = Some(group);
        } else {
            self.stats.set_batch(0, 0, 0);
        }
        Step::Worked
    }

    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.group.is_none()
    }

    fn abort(&mut self) {
        let error = EngineError::Compute("the image pipeline failed".into());
        if let Some(group) = self.group.take() {
            for r in &group.running {
                fail(&r.job, error.clone());
            }
        }
        self.stats.set_batch(0, 0, 0);
    }
}

fn fail(job: &ImageJobMsg, error: EngineError) {
    let _ = job.events.send(ImageEvent::Failed(error));
}

/// Whether a job goes on: not if its client left (nothing to say) or its
/// deadline passed (it is told so).
fn keep(job: &ImageJobMsg, now: Instant) -> bool {
    if job.events.is_closed() {
        tracing::info!("image request cancelled: the client went away");
        return false;
    }
    match job.deadline {
        Some((d, seconds)) if now >= d => {
            fail(job, EngineError::DeadlineExceeded { seconds });
            false
        }
        _ => true,
    }
}

/// Sends the request's previews due after step `i`: `previews` of them,
/// spread evenly, the last one before the final step.
fn send_previews(
    r: &mut Running,
    pipeline: &Pipeline,
    i: usize,
    steps: usize,
    (width, height): (usize, usize),
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
