//! The lifecycle's loader for real models: fetches weights (local file or
//! Hugging Face), estimates memory from the weight file's header, starts an
//! engine worker and measures what the load really took.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt};
use kindling_models::Footprint;

use super::download;
use super::lifecycle::{BatchSnapshot, Loaded, Loader, Progress};
use super::memory;
use super::RegistryError;
use crate::config::{
    parse_size, Config, DeviceName, EngineConfig, HubConfig, ModelKind, ModelManifest, Precision,
    WeightFormat, WeightSource,
};
use crate::engine::{self, EngineHandle, ImageServing, LoadSpec, Target, Task};
use kindling_models::diffusion::SamplerKind;
use kindling_models::{gpu, DType};

/// Loads text models into engine workers.
pub struct EngineLoader {
    /// By instance name; replaced entry by entry when manifests reload.
    manifests: std::sync::RwLock<BTreeMap<String, ModelManifest>>,
    store: PathBuf,
    hub: HubConfig,
    engine: EngineConfig,
}

/// A model ready to load: its spec and its estimates.
pub struct Plan {
    spec: LoadSpec,
    footprint: Footprint,
    /// On a GPU, in the manifest's dtype (text and image models).
    gpu: Option<(DType, Footprint)>,
}

/// A model's float type on a GPU (default bf16).
fn gpu_dtype(manifest: &ModelManifest) -> DType {
    match manifest.dtype {
        Some(Precision::F16) => DType::F16,
        Some(Precision::F32) => DType::F32,
        Some(Precision::Bf16) | None => DType::BF16,
    }
}

fn failed(model: &str, reason: impl Into<String>) -> RegistryError {
    RegistryError::LoadFailed {
        model: model.to_string(),
        reason: reason.into(),
        retry_after: None,
    }
}

impl EngineLoader {
    /// A loader for the models `config` declares.
    pub fn new(config: &Config) -> Self {
        Self {
            manifests: std::sync::RwLock::new(config.models.clone()),
            store: config.store.clone(),
            hub: config.hub.clone(),
            engine: config.engine.clone(),
        }
    }

    /// The manifest a load of `name` uses now.
    fn manifest(&self, name: &str) -> Option<ModelManifest> {
        self.manifests
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Sets (or, with `None`, forgets) the manifest of `name`; loads
    /// started after this use it.
    pub fn set_manifest(&self, name: &str, manifest: Option<ModelManifest>) {
        let mut all = self.manifests.write().unwrap_or_else(|e| e.into_inner());
        match manifest {
            Some(m) => all.insert(name.to_string(), m),
            None => all.remove(name),
        };
    }

    fn spec(&self, manifest: &ModelManifest, path: PathBuf) -> LoadSpec {
        let embedding = manifest.kind == ModelKind::Embedding;
        let image = &manifest.image;
        LoadSpec {
            model: manifest.name(),
            task: match manifest.kind {
                ModelKind::Embedding => Task::Embedding {
                    dimensions: manifest.dimensions.clone(),
                },
                ModelKind::Image => Task::Image(ImageServing {
                    steps: image.steps.unwrap_or(20),
                    max_steps: image.max_steps.unwrap_or(150),
                    guidance_scale: image.guidance_scale.unwrap_or(7.5),
                    sampler: image.sampler.as_deref().and_then(SamplerKind::parse),
                    size: image.size.as_deref().and_then(parse_size),
                    max_size: image.max_size,
                    max_batch: self.engine.image_batch,
                }),
                ModelKind::Chat | ModelKind::Completion => Task::Text,
            },
            path,
            context_length: manifest.context_length,
            queue_size: self.engine.queue_size,
            stall_timeout: self.engine.stall_timeout,
            fair_share: self.engine.fair_share,
            prefix_caching: self.engine.prefix_caching,
            prefix_cache_shared: self.engine.prefix_cache_shared,
            max_sequences: self.engine.max_sequences,
            max_batch_tokens: if embedding {
                self.engine.embedding_batch_tokens
            } else {
                self.engine.max_batch_tokens
            },
            kv_cache_tokens: manifest
                .kv_cache_tokens
                .unwrap_or(self.engine.kv_cache_tokens),
            target: Target::Cpu,
            tool_format: manifest.tool_format,
        }
    }

    /// The weight file if it is already on this machine (no download).
    pub fn local_weights(&self, id: &str) -> Option<PathBuf> {
        let m = &self.manifest(id)?;
        match &m.weights {
            WeightSource::Local(p) => Some(p.clone()),
            WeightSource::Hub {
                repo,
                revision,
                files,
                ..
            } => {
                let cache = hf_hub::Cache::new(self.store.join("hub"));
                let repo = hf_hub::Repo::with_revision(
                    repo.clone(),
                    hf_hub::RepoType::Model,
                    revision.clone(),
                );
                let repo = cache.repo(repo);
                match m.format {
                    WeightFormat::Gguf => repo.get(files.iter().find(|f| f.ends_with(".gguf"))?),
                    WeightFormat::Safetensors => Some(
                        repo.get(m.format.folder_marker(m.kind))?
                            .parent()?
                            .to_path_buf(),
                    ),
                }
            }
        }
    }

    /// Estimates a model whose weights are already local (for display
    /// before its first load).
    pub async fn estimate_local(&self, id: &str) -> Option<u64> {
        let manifest = self.manifest(id)?;
        let spec = self.spec(&manifest, self.local_weights(id)?);
        tokio::task::spawn_blocking(move || engine::estimate(&spec).ok())
            .await
            .ok()
            .flatten()
            .map(|f| f.total())
    }

    /// Downloads the model's weights if they come from the Hub and are not
    /// in the store yet; returns the weight file.
    pub async fn fetch(
        &self,
        id: &str,
        progress: Arc<Progress>,
        show_bar: bool,
    ) -> Result<PathBuf, RegistryError> {
        let manifest = self
            .manifest(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
        match &manifest.weights {
            WeightSource::Local(path) => {
                let marker = manifest.format.folder_marker(manifest.kind);
                let found = match manifest.format {
                    WeightFormat::Gguf => path.is_file(),
                    WeightFormat::Safetensors => path.join(marker).is_file(),
                };
                if !found {
                    let what = match manifest.format {
                        WeightFormat::Gguf => "weight file".to_string(),
                        WeightFormat::Safetensors => format!("model folder (with {marker})"),
                    };
                    return Err(failed(id, format!("{what} not found: {}", path.display())));
                }
                Ok(path.clone())
            }
            WeightSource::Hub {
                repo,
                revision,
                files,
                sha256,
            } => {
                let req = download::Request {
                    model: id,
                    repo,
                    revision,
                    files,
                    sha256,
                };
                let paths = download::fetch(&self.hub, &self.store, req, progress, show_bar)
                    .await
                    .map_err(|e| failed(id, e))?;
                let wanted = manifest.format.folder_marker(manifest.kind);
                let path = files
                    .iter()
                    .zip(paths)
                    .find(|(f, _)| match manifest.format {
                        WeightFormat::Gguf => f.ends_with(wanted),
                        WeightFormat::Safetensors => f.as_str() == wanted,
                    })
                    .map(|(_, p)| p)
                    .ok_or_else(|| failed(id, format!("no {wanted} among the downloaded files")))?;
                Ok(match manifest.format {
                    WeightFormat::Gguf => path,
                    // The snapshot folder holds every file of the repo's revision.
                    WeightFormat::Safetensors => {
                        path.parent().map(Path::to_path_buf).unwrap_or(path)
                    }
                })
            }
        }
    }
}

impl Loader for Arc<EngineLoader> {
    type Model = EngineHandle;
    type Plan = Plan;

    fn prepare(
        &self,
        id: &str,
        progress: Arc<Progress>,
    ) -> BoxFuture<'static, Result<(Plan, u64), RegistryError>> {
        let this = self.clone();
        let id = id.to_string();
        async move {
            let path = this.fetch(&id, progress, false).await?;
            let manifest = this
                .manifest(&id)
                .ok_or_else(|| RegistryError::NotFound(id.clone()))?;
            let spec = this.spec(&manifest, path);
            // Text and image models run on GPUs; embeddings on the CPU.
            let gpu_capable = matches!(spec.task, Task::Text | Task::Image(_));
            let dtype = gpu_dtype(&manifest);
            let for_estimate = spec.clone();
            let (footprint, gpu) = tokio::task::spawn_blocking(move || {
                let cpu = engine::estimate(&for_estimate)?;
                let gpu = if gpu_capable {
                    let mut on_gpu = for_estimate;
                    on_gpu.target = Target::Cuda { ordinal: 0, dtype };
                    Some((dtype, engine::estimate(&on_gpu)?))
                } else {
                    None
                };
                Ok::<_, RegistryError>((cpu, gpu))
            })
            .await
            .map_err(|e| failed(&id, format!("estimate task failed: {e}")))??;
            let total = footprint.total();
            Ok((
                Plan {
                    spec,
                    footprint,
                    gpu,
                },
                total,
            ))
        }
        .boxed()
    }

    fn estimate_on(&self, plan: &Plan, device: &str) -> Option<u64> {
        match DeviceName::parse(device) {
            Some(DeviceName::Cuda(_)) => plan.gpu.map(|(_, f)| f.total()),
            _ => None,
        }
    }

    fn load(
        &self,
        id: &str,
        mut plan: Plan,
        device: &str,
    ) -> BoxFuture<'static, Result<Loaded<EngineHandle>, RegistryError>> {
        let gpu = match (DeviceName::parse(device), plan.gpu) {
            (Some(DeviceName::Cuda(ordinal)), Some((dtype, footprint))) => {
                plan.spec.target = Target::Cuda { ordinal, dtype };
                Some((ordinal, footprint))
            }
            (Some(DeviceName::Cuda(_)), None) => {
                let e = failed(id, format!("embedding models do not run on {device}"));
                return async move { Err(e) }.boxed();
            }
            _ => None,
        };
        let id = id.to_string();
        async move {
            let (handle, stopped, measured) = match gpu {
                Some((ordinal, footprint)) => {
                    load_on_gpu(&id, plan.spec, ordinal, footprint).await?
                }
                None => {
                    let before = memory::resident();
                    let (handle, stopped) = engine::start(plan.spec).await?;
                    // What the load left resident: weights and tables
                    // (temporary buffers handed back first). The KV cache
                    // and activations grow with requests, so their estimate
                    // stays reserved on top.
                    memory::release_free_heap();
                    let after = memory::resident();
                    let f = plan.footprint;
                    let measured = before
                        .zip(after)
                        .map(|(b, a)| a.saturating_sub(b) + f.cache + f.scratch);
                    (handle, stopped, measured)
                }
            };
            let stopped = async move {
                let _ = stopped.await;
            }
            .boxed();
            Ok(Loaded {
                model: handle,
                measured,
                stopped,
            })
        }
        .boxed()
    }

    fn batch(model: &EngineHandle) -> BatchSnapshot {
        let s = model.stats();
        let (kv_blocks_used, kv_blocks_total) = s.kv_blocks();
        let (prefix_queries, prefix_hits) = s.prefix_cache();
        BatchSnapshot {
            prefix_cached_blocks: s.cached_blocks(),
            prefix_queries,
            prefix_hits,
            drafts: s.drafts(),
            waiting: s.waiting(),
            running: s.running(),
            kv_blocks_used,
            kv_blocks_total,
            prompt_tokens: s.prompt_tokens(),
            generated_tokens: s.generated_tokens(),
            tokens_per_second: s.tokens_per_second(),
            steps: s.steps(),
        }
    }
}

/// Loads a model onto `cuda:ordinal`, measuring what it took from the
/// driver's free memory (weights, and a text model's KV cache, allocated at
/// load; one pass's activations stay reserved on top).
async fn load_on_gpu(
    id: &str,
    spec: LoadSpec,
    ordinal: usize,
    footprint: Footprint,
) -> Result<(EngineHandle, engine::Stopped, Option<u64>), RegistryError> {
    let free = || gpu::memory(ordinal).map(|m| m.free).ok();
    let before = free();
    let (handle, stopped) = engine::start(spec).await?;
    let after = free();
    let measured = before
        .zip(after)
        .map(|(b, a)| b.saturating_sub(a) + footprint.scratch);
    tracing::info!(
        model = %id,
        device = %format!("cuda:{ordinal}"),
        free_before_bytes = before.unwrap_or(0),
        free_after_bytes = after.unwrap_or(0),
        estimated_bytes = footprint.total(),
        "GPU memory taken by the load"
    );
    Ok((handle, stopped, measured))
}
