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
use crate::config::{
    parse_size, Config, EngineConfig, HubConfig, ModelKind, ModelManifest, WeightFormat,
    WeightSource,
};
use crate::engine::{self, EngineError, EngineHandle, ImageServing, LoadSpec, Task};
use kindling_models::diffusion::SamplerKind;

/// Loads text models into engine workers.
pub struct EngineLoader {
    manifests: BTreeMap<String, ModelManifest>,
    store: PathBuf,
    hub: HubConfig,
    engine: EngineConfig,
}

/// A model ready to load: its spec and its estimate.
pub struct Plan {
    spec: LoadSpec,
    footprint: Footprint,
}

fn failed(model: &str, reason: impl Into<String>) -> EngineError {
    EngineError::LoadFailed {
        model: model.to_string(),
        reason: reason.into(),
        retry_after: None,
    }
}

impl EngineLoader {
    /// A loader for the models `config` declares.
    pub fn new(config: &Config) -> Self {
        Self {
            manifests: config.models.clone(),
            store: config.store.clone(),
            hub: config.hub.clone(),
            engine: config.engine.clone(),
        }
    }

    fn spec(&self, manifest: &ModelManifest, path: PathBuf) -> LoadSpec {
        let embedding = manifest.kind == ModelKind::Embedding;
        let image = &manifest.image;
        LoadSpec {
            model: manifest.id.clone(),
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
            max_sequences: self.engine.max_sequences,
            max_batch_tokens: if embedding {
                self.engine.embedding_batch_tokens
            } else {
                self.engine.max_batch_tokens
            },
            kv_cache_tokens: manifest
                .kv_cache_tokens
                .unwrap_or(self.engine.kv_cache_tokens),
        }
    }

    /// The weight file if it is already on this machine (no download).
    pub fn local_weights(&self, id: &str) -> Option<PathBuf> {
        let m = self.manifests.get(id)?;
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
        let manifest = self.manifests.get(id)?;
        let spec = self.spec(manifest, self.local_weights(id)?);
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
    ) -> Result<PathBuf, EngineError> {
        let manifest = self
            .manifests
            .get(id)
            .ok_or_else(|| failed(id, "no such model"))?;
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
    ) -> BoxFuture<'static, Result<(Plan, u64), EngineError>> {
        let this = self.clone();
        let id = id.to_string();
        async move {
            let path = this.fetch(&id, progress, false).await?;
            let manifest = this
                .manifests
                .get(&id)
                .ok_or_else(|| failed(&id, "no such model"))?;
            let spec = this.spec(manifest, path);
            let for_estimate = spec.clone();
            let footprint = tokio::task::spawn_blocking(move || engine::estimate(&for_estimate))
                .await
                .map_err(|e| failed(&id, format!("estimate task failed: {e}")))??;
            let total = footprint.total();
            Ok((Plan { spec, footprint }, total))
        }
        .boxed()
    }

    fn load(
        &self,
        _id: &str,
        plan: Plan,
    ) -> BoxFuture<'static, Result<Loaded<EngineHandle>, EngineError>> {
        async move {
            let before = memory::resident();
            let (handle, stopped) = engine::start(plan.spec).await?;
            // What the load left resident: weights and tables (temporary
            // buffers handed back first). The KV cache and activations grow
            // with requests, so their estimate stays reserved on top.
            memory::release_free_heap();
            let after = memory::resident();
            let measured = before
                .zip(after)
                .map(|(b, a)| a.saturating_sub(b) + plan.footprint.cache + plan.footprint.scratch);
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
        BatchSnapshot {
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
