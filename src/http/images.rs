//! `POST /v1/images/generations` in the OpenAI shape: `prompt`, `n`,
//! `size`, `response_format` (`b64_json`; `url` is refused), `output_format`
//! (`png`, `jpeg`, `webp`), `output_compression`, `stream` with
//! `partial_images`. Extensions: `negative_prompt`, `steps`,
//! `guidance_scale`, `seed` (image `i` gets `seed + i`; `-1` or none picks
//! one), `sampler`, `keep_alive`, `timeout`. Streaming sends progress after
//! every step, low-cost previews, then each finished image.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use kindling_models::diffusion::{encode_image, ImageFormat, SamplerKind};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::extract::ApiJson;
use super::generation::{sse_response, SseItem};
use super::log::RequestLog;
use super::wire::LifetimeFields;
use super::AppState;
use crate::config::parse_size;
use crate::engine::{ImageEvent, ImageRequest};

/// Most images per request (OpenAI's limit).
pub const MAX_IMAGES: i64 = 10;
/// Most previews a streaming request may ask for (OpenAI's limit).
pub const MAX_PARTIAL_IMAGES: i64 = 3;

/// The request body.
#[derive(Debug, Deserialize)]
pub struct ImagesRequest {
    pub model: Option<String>,
    pub prompt: Value,
    pub n: Option<i64>,
    pub size: Option<String>,
    pub response_format: Option<String>,
    pub output_format: Option<String>,
    pub output_compression: Option<i64>,
    /// Accepted for compatibility and ignored: the step count is what
    /// sets quality here, and there is no moderation model.
    #[allow(dead_code)]
    pub quality: Option<String>,
    #[allow(dead_code)]
    pub style: Option<String>,
    pub background: Option<String>,
    #[allow(dead_code)]
    pub moderation: Option<String>,
    pub user: Option<String>,
    pub stream: Option<bool>,
    pub partial_images: Option<i64>,
    pub negative_prompt: Option<String>,
    pub steps: Option<i64>,
    pub guidance_scale: Option<f64>,
    pub seed: Option<i64>,
    pub sampler: Option<String>,
    #[serde(flatten)]
    pub lifetime: LifetimeFields,
}

#[derive(Debug, Serialize)]
struct ImagesResponse {
    created: u64,
    data: Vec<ImageData>,
    output_format: &'static str,
    size: String,
    usage: Usage,
}

#[derive(Debug, Serialize)]
struct ImageData {
    b64_json: String,
    /// The seed that reproduces this image (extension).
    seed: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Usage {
    input_tokens: usize,
    output_tokens: usize,
    total_tokens: usize,
    input_tokens_details: Value,
}

impl Usage {
    fn new(tokens: usize) -> Self {
        Self {
            input_tokens: tokens,
            output_tokens: 0,
            total_tokens: tokens,
            input_tokens_details: json!({"text_tokens": tokens, "image_tokens": 0}),
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How the client wants its images written.
#[derive(Debug, Clone, Copy)]
struct Output {
    format: ImageFormat,
    quality: u8,
}

/// The request's parameters checked one by one; each failure names its
/// parameter.
fn parse(req: &ImagesRequest) -> Result<(ImageRequest, Output, bool), ApiError> {
    let prompt = match &req.prompt {
        Value::String(s) if !s.trim().is_empty() => s.clone(),
        Value::String(_) => return Err(ApiError::invalid("prompt", "`prompt` must not be empty")),
        _ => return Err(ApiError::invalid("prompt", "`prompt` must be a string")),
    };
    let n = req.n.unwrap_or(1);
    if !(1..=MAX_IMAGES).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be between 1 and {MAX_IMAGES}, got {n}"),
        ));
    }
    let size = match req.size.as_deref() {
        None | Some("auto") => None,
        Some(s) => Some(parse_size(s).ok_or_else(|| {
            ApiError::invalid(
                "size",
                format!("`size` must be `WIDTHxHEIGHT` (like `512x512`) or `auto`, got `{s}`"),
            )
        })?),
    };
    match req.response_format.as_deref() {
        None | Some("b64_json") => {}
        Some("url") => {
            return Err(ApiError::invalid(
                "response_format",
                "`response_format: url` is not supported: Kindling returns images inline; use `b64_json`",
            ))
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "response_format",
                format!("`response_format` must be `b64_json`, got `{other}`"),
            ))
        }
    }
    let format = match req.output_format.as_deref() {
        None => ImageFormat::Png,
        Some(f) => ImageFormat::parse(f).ok_or_else(|| {
            ApiError::invalid(
                "output_format",
                format!("`output_format` must be `png`, `jpeg` or `webp`, got `{f}`"),
            )
        })?,
    };
    let quality = req.output_compression.unwrap_or(100);
    if !(0..=100).contains(&quality) {
        return Err(ApiError::invalid(
            "output_compression",
            format!("`output_compression` must be between 0 and 100, got {quality}"),
        ));
    }
    if req.background.as_deref() == Some("transparent") {
        return Err(ApiError::invalid(
            "background",
            "transparent backgrounds are not supported",
        ));
    }
    let stream = req.stream.unwrap_or(false);
    let previews = req.partial_images.unwrap_or(0);
    if !(0..=MAX_PARTIAL_IMAGES).contains(&previews) {
        return Err(ApiError::invalid(
            "partial_images",
            format!("`partial_images` must be between 0 and {MAX_PARTIAL_IMAGES}, got {previews}"),
        ));
    }
    let steps = match req.steps {
        None => None,
        Some(s) if s >= 1 => Some(usize::try_from(s).unwrap_or(usize::MAX)),
        Some(s) => {
            return Err(ApiError::invalid(
                "steps",
                format!("`steps` must be at least 1, got {s}"),
            ))
        }
    };
    let guidance_scale = match req.guidance_scale {
        None => None,
        Some(g) if (0.0..=50.0).contains(&g) => Some(g as f32),
        Some(g) => {
            return Err(ApiError::invalid(
                "guidance_scale",
                format!("`guidance_scale` must be between 0 and 50, got {g}"),
            ))
        }
    };
    let seed = match req.seed {
        None | Some(-1) => None,
        Some(s) if s >= 0 => Some(s as u64),
        Some(s) => {
            return Err(ApiError::invalid(
                "seed",
                format!("`seed` must be at least 0 (or -1 for random), got {s}"),
            ))
        }
    };
    let sampler = match req.sampler.as_deref() {
        None => None,
        Some(name) => Some(SamplerKind::parse(name).ok_or_else(|| {
            ApiError::invalid(
                "sampler",
                format!(
                    "unknown sampler `{name}`; expected one of {}",
                    SamplerKind::NAMES.join(", ")
                ),
            )
        })?),
    };
    let request = ImageRequest {
        prompt,
        negative_prompt: req.negative_prompt.clone().filter(|p| !p.is_empty()),
        n: n as usize,
        size,
        steps,
        guidance_scale,
        sampler,
        seed,
        previews: if stream { previews as usize } else { 0 },
        deadline: None,
        tenant: None,
    };
    Ok((
        request,
        Output {
            format,
            quality: quality as u8,
        },
        stream,
    ))
}

/// Encodes one image off the async runtime, as base64.
async fn encode(
    rgb: Vec<u8>,
    width: usize,
    height: usize,
    output: Output,
) -> Result<String, ApiError> {
    let bytes = tokio::task::spawn_blocking(move || {
        encode_image(&rgb, width, height, output.format, output.quality)
    })
    .await
    .map_err(|e| ApiError::internal_because(format!("encoder task failed: {e}")))?
    .map_err(ApiError::internal_because)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The handler.
pub async fn handle(
    State(state): State<AppState>,
    Extension(log): Extension<RequestLog>,
    Extension(key): Extension<std::sync::Arc<crate::tenancy::Principal>>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<ImagesRequest>,
) -> Result<Response, ApiError> {
    state.accepting()?;
    log.user(req.user.as_deref());
    let requested = match req.model.clone() {
        Some(m) => m,
        None => state
            .registry
            .default_image_model()
            .ok_or_else(|| ApiError::invalid("model", "no image model is configured"))?,
    };
    let user = req.user.as_deref();
    let target = super::versions::resolve(&state, &log, &key, &requested, user, &headers)?;
    state.registry.check_image(&target.name)?;
    let model = target.name;
    let (mut request, output, stream) = parse(&req)?;
    let timeout = req.lifetime.timeout()?.or(state.request_timeout);
    let keep_alive = req.lifetime.keep_alive()?;
    request.deadline = timeout.map(|t| log.arrived() + t);
    request.tenant = log.key_name();
    let n = request.n;
    let lease = state.registry.acquire(&model, keep_alive).await?;
    let cold = lease.cold_load;
    let mut rx = lease.generate_images(request)?;
    let metrics = state.registry.metrics().clone();
    let model_label = crate::metrics::Metrics::model(&model);
    if stream {
        let stream_log = log.clone();
        let items = async_stream::stream! {
            let log = stream_log;
            let _lease = lease;
            let mut sizes = String::new();
            let mut usage = Usage::new(0);
            let mut partial = 0usize;
            let mut completed = 0usize;
            let mut step_count = 0usize;
            let mut pixel_steps = 0.0;
            while let Some(event) = rx.recv().await {
                match event {
                    ImageEvent::Started { prompt_tokens, width, height, steps, .. } => {
                        log.compute_started(std::time::Instant::now());
                        step_count = steps;
                        sizes = format!("{width}x{height}");
                        usage = Usage::new(prompt_tokens);
                        metrics.prompt_tokens.get_or_create(&model_label).inc_by(prompt_tokens as u64);
                        log.tokens(prompt_tokens, 0);
                    }
                    ImageEvent::Progress { step, steps } => {
                        yield SseItem::chunk(&json!({"type": "image_generation.progress", "created_at": now(), "step": step, "steps": steps}));
                    }
                    ImageEvent::Preview { index, step, width, height, rgb } => {
                        let png = Output { format: ImageFormat::Png, quality: 100 };
                        match encode(rgb, width, height, png).await {
                            Ok(b64) => yield SseItem::chunk(&json!({
                                "type": "image_generation.partial_image", "created_at": now(),
                                "b64_json": b64, "partial_image_index": partial, "image_index": index,
                                "step": step, "size": format!("{width}x{height}"), "output_format": "png",
                            })),
                            Err(e) => { yield SseItem::Error(e); return; }
                        }
                        partial += 1;
                    }
                    ImageEvent::Image { index, seed, width, height, rgb } => {
                        match encode(rgb, width, height, output).await {
                            Ok(b64) => {
                                completed += 1;
                                pixel_steps += pixel_steps_of(width, height, step_count);
                                log.images(completed, pixel_steps);
                                yield SseItem::chunk(&json!({
                                "type": "image_generation.completed", "created_at": now(),
                                "b64_json": b64, "image_index": index, "seed": seed,
                                "size": sizes, "output_format": output.format.name(), "usage": usage,
                                }))
                            }
                            Err(e) => { yield SseItem::Error(e); return; }
                        }
                    }
                    ImageEvent::Failed(e) => { yield SseItem::Error(e.into()); return; }
                }
            }
            if completed < n {
                yield SseItem::Error(ApiError::internal_because("image generation ended early"));
            }
        };
        let mut resp = sse_response(items, log);
        super::generation::mark_cold(&mut resp, cold);
        return Ok(resp);
    }
    let collected = collect(&mut rx, n, &log).await?;
    drop(lease);
    let pixel_steps = collected
        .images
        .iter()
        .map(|(_, w, h, _)| pixel_steps_of(*w, *h, collected.steps))
        .sum();
    log.images(collected.images.len(), pixel_steps);
    metrics
        .prompt_tokens
        .get_or_create(&model_label)
        .inc_by(collected.tokens as u64);
    log.tokens(collected.tokens, 0);
    let mut data = Vec::with_capacity(collected.images.len());
    for (seed, width, height, rgb) in collected.images {
        data.push(ImageData {
            b64_json: encode(rgb, width, height, output).await?,
            seed,
        });
    }
    let mut resp = Json(ImagesResponse {
        created: now(),
        data,
        output_format: output.format.name(),
        size: collected.size,
        usage: Usage::new(collected.tokens),
    })
    .into_response();
    super::generation::mark_cold(&mut resp, cold);
    Ok(resp)
}

/// What an image costs in the usage record: megapixels × steps.
fn pixel_steps_of(width: usize, height: usize, steps: usize) -> f64 {
    (width * height * steps) as f64 / 1e6
}

struct Collected {
    tokens: usize,
    steps: usize,
    size: String,
    images: Vec<(u64, usize, usize, Vec<u8>)>,
}

/// Waits for all `n` images of a request.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<ImageEvent>,
    n: usize,
    log: &RequestLog,
) -> Result<Collected, ApiError> {
    let mut out = Collected {
        tokens: 0,
        steps: 0,
        size: String::new(),
        images: Vec::new(),
    };
    while let Some(event) = rx.recv().await {
        match event {
            ImageEvent::Started {
                prompt_tokens,
                width,
                height,
                steps,
                ..
            } => {
                log.compute_started(std::time::Instant::now());
                out.steps = steps;
                out.tokens = prompt_tokens;
                out.size = format!("{width}x{height}");
            }
            ImageEvent::Image {
                index,
                seed,
                width,
                height,
                rgb,
            } => {
                if out.images.len() <= index {
                    out.images.resize_with(index + 1, || (0, 0, 0, Vec::new()));
                }
                out.images[index] = (seed, width, height, rgb);
            }
            ImageEvent::Failed(e) => return Err(e.into()),
            ImageEvent::Progress { .. } | ImageEvent::Preview { .. } => {}
        }
    }
    if out.images.len() != n || out.images.iter().any(|(_, w, _, _)| *w == 0) {
        return Err(ApiError::internal_because("image generation ended early"));
    }
    Ok(out)
}
