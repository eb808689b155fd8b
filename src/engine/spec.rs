//! What to load, where, and with which serving limits; the memory it will
//! take once loaded.

use std::path::PathBuf;
use std::time::Duration;

use kindling_models::Footprint;

use super::{EngineError, ImageServing};

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
    /// Share the batch and the queue fairly between API keys.
    pub fair_share: bool,
    /// Keep and reuse the KV blocks of prompt prefixes (text models).
    pub prefix_caching: bool,
    /// Share cached prefixes between API keys (else each key finds only its own).
    pub prefix_cache_shared: bool,
    /// How the model writes tool calls; `None` reads it from the chat template.
    pub tool_format: Option<kindling_models::tools::ToolFormat>,
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
    pub(super) fn placement(self) -> kindling_models::Result<kindling_models::Placement> {
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

/// Logs that a worker has dropped its model. On a GPU the device's stream
/// is drained first: frees are ordered on it, and only then does the memory
/// go back to the driver, whose free figure the line reports.
pub(super) fn unloaded(spec: &LoadSpec) {
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

pub(super) fn load_failed(spec: &LoadSpec, reason: String) -> EngineError {
    EngineError::LoadFailed {
        model: spec.model.clone(),
        reason,
        retry_after: None,
    }
}
