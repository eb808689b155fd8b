//! The image worker: step-synchronous batching for Stable Diffusion.
//! Requests that share a size, sampler and step count run together, one
//! UNet call per step for all their images (guidance rows included);
//! others wait for the next group. Every image draws its noise from its
//! own seed on the host, so it comes out the same in any batch.

mod backend;

use std::sync::Arc;
use std::time::Instant;

use kindling_models::diffusion::{Pipeline, SamplerKind};
use tokio::sync::mpsc;

use super::shell::{Jobs, Ticket};
use super::{EngineError, EngineStats, LoadSpec};
pub(super) use backend::ImageBackend;

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
    /// The API key's name, for the fair queue.
    pub tenant: Option<Arc<str>>,
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
    ticket: Ticket,
}

/// Loads an image pipeline where `spec.target` says and resolves its
/// limits (a bad default in the manifest fails the load, not requests).
pub(super) fn load(
    spec: &LoadSpec,
    stats: &Arc<EngineStats>,
    serving: &ImageServing,
) -> Result<(ImageBackend, Arc<Limits>), EngineError> {
    let started = Instant::now();
    let loaded = spec.target.placement().and_then(|p| match p {
        kindling_models::Placement::Host => {
            Pipeline::load(&spec.path, &kindling_models::Device::Cpu)
        }
        kindling_models::Placement::Device(d, dtype) => Pipeline::load_as(&spec.path, &d, dtype),
    });
    let pipeline = loaded.map_err(|e| super::spec::load_failed(spec, e.to_string()))?;
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
    let limits = Limits::new(serving.clone(), &pipeline)
        .map_err(|reason| super::spec::load_failed(spec, reason))?;
    let backend = ImageBackend::new(spec, pipeline, serving.max_batch.max(1), stats.clone());
    Ok((backend, Arc::new(limits)))
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

/// Checks the request against the model's limits, fills in defaults and
/// queues it.
pub(super) fn submit(
    jobs: &Jobs<ImageJobMsg>,
    l: &Limits,
    request: ImageRequest,
) -> Result<mpsc::UnboundedReceiver<ImageEvent>, EngineError> {
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
    let ticket = jobs.ticket(request.tenant.clone())?;
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
        ticket,
    };
    jobs.send(job)?;
    Ok(rx)
}
