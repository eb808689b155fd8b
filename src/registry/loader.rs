//! The lifecycle's loader for real models: fetches weights (local file or
//! Hugging Face), estimates memory from the weight file's header, starts an
//! engine worker and measures what the load really took.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt};
use kindling_models::Footprint;

use super::download;
use super::lifecycle::{Loaded, Loader, Progress};
use super::memory;
use crate::config::{Config, EngineConfig, HubConfig, ModelManifest, WeightSource};
use crate::engine::{self, EngineError, EngineHandle, LoadSpec};

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
        LoadSpec {
            model: manifest.id.clone(),
            path,
            context_length: manifest.context_length,
            queue_size: self.engine.queue_size,
            stall_timeout: self.engine.stall_timeout,
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
                let gguf = files.iter().find(|f| f.ends_with(".gguf"))?;
                cache.repo(repo).get(gguf)
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
                if !path.is_file() {
                    return Err(failed(
                        id,
                        format!("weight file not found: {}", path.display()),
                    ));
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
                files
                    .iter()
                    .zip(paths)
                    .find(|(f, _)| f.ends_with(".gguf"))
                    .map(|(_, p)| p)
                    .ok_or_else(|| failed(id, "no .gguf among the downloaded files"))
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

    fn queue_depth(model: &EngineHandle) -> usize {
        model.queue_depth()
    }
}
