//! The registry room: the model catalog and each model's lifecycle. Models
//! load on the first request that needs them (one shared load however many
//! requests wait), are charged against their device's memory budget, make
//! room by evicting idle models, and unload when their keep-alive runs out.

mod devices;
mod download;
mod evict;
mod export;
pub mod lifecycle;
mod loader;
mod memory;
mod reload;
mod rollout;
mod routes;
mod sleep;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use crate::config::{
    version_order, Config, GenerationDefaults, KeepAlive, ModelKind, ModelManifest,
};
use crate::engine::EngineError;
use crate::metrics::Metrics;
use lifecycle::Lifecycle;
pub use lifecycle::{DeviceSnapshot, ModelState, Snapshot};
pub use loader::EngineLoader;
pub use memory::tune_allocator;
pub use reload::{Refused, ReloadReport};
pub use routes::{Change, Comparison, Outcome, RouteView};
pub use sleep::{SleepLevel, SleepReport, WakeReport};

/// The registry room's errors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    /// No manifest declares this id.
    #[error("the model `{0}` does not exist")]
    NotFound(String),
    /// The model exists but is not served for this kind of request.
    #[error("the model `{model}` ({kind}) cannot serve {wanted}")]
    WrongKind {
        /// The model.
        model: String,
        /// What it is.
        kind: &'static str,
        /// What was asked of it.
        wanted: &'static str,
    },
    /// The model is loading; it can be unloaded once loaded.
    #[error("model `{0}` is loading; unload it once it has loaded")]
    Loading(String),
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
    /// Loading must wait: there is no room for the model yet.
    #[error("{message}")]
    NoRoom {
        /// Why, with the figures.
        message: String,
        /// Seconds after which a retry may succeed; `None` if it never will.
        retry_after: Option<u64>,
    },
    /// The engine refused or failed the request.
    #[error(transparent)]
    Engine(EngineError),
    /// A route that cannot be set.
    #[error("{0}")]
    BadRoute(String),
    /// The request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
}

impl From<EngineError> for RegistryError {
    /// A worker that failed to load is a failed load; anything else the
    /// engine says passes through.
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::LoadFailed {
                model,
                reason,
                retry_after,
            } => Self::LoadFailed {
                model,
                reason,
                retry_after,
            },
            other => Self::Engine(other),
        }
    }
}

/// What a request wants a text model for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// A model as `/v1/models` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSummary {
    /// The name clients use: the id, or `id@version`.
    pub id: String,
    /// The version this is, if the id has versions.
    pub version: Option<String>,
    /// For an id with versions, listed as itself: its versions, oldest
    /// first (its state is that of the version with the largest share).
    pub versions: Vec<String>,
    /// Unix time its manifest was written.
    pub created: u64,
    /// Owner shown to clients.
    pub owned_by: String,
    /// `chat` or `completion`.
    pub kind: &'static str,
    /// Its lifecycle state.
    pub state: Snapshot,
}

/// The daemon's accounting, for `/admin/status`.
#[derive(Debug, Clone)]
pub struct Status {
    /// Every device's budget and use.
    pub devices: Vec<DeviceSnapshot>,
    /// Every model.
    pub models: Vec<ModelSummary>,
    /// This process's resident memory, if known.
    pub process_resident_bytes: Option<u64>,
}

/// A model in use by one request; see [`lifecycle::Lease`].
pub type Lease = lifecycle::Lease<Arc<EngineLoader>>;

#[derive(Clone)]
struct Entry {
    manifest: ModelManifest,
    created: u64,
}

impl Entry {
    fn new(manifest: ModelManifest) -> Self {
        let created = std::fs::metadata(&manifest.source)
            .and_then(|md| md.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        Self { manifest, created }
    }
}

/// Where one request goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The model id.
    pub id: String,
    /// The version serving it, if the id has versions.
    pub version: Option<String>,
    /// The instance serving it: the id, or `id@version`.
    pub name: String,
    /// A version that gets a copy of the request (answer discarded), as
    /// `(version, instance name)`.
    pub shadow: Option<(String, String)>,
}

/// The catalog of declared models and their lifecycle.
pub struct Registry {
    /// By instance name (`id` or `id@version`).
    entries: RwLock<BTreeMap<String, Entry>>,
    loader: Arc<EngineLoader>,
    lifecycle: Lifecycle<Arc<EngineLoader>>,
    metrics: Arc<Metrics>,
    sleep: sleep::Sleep,
    routes: routes::Routes,
    devices: devices::Devices,
    source: reload::Source,
}

impl Registry {
    /// A registry of the models `config` declares; none is loaded.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        let entries: BTreeMap<String, Entry> = config
            .models
            .iter()
            .map(|(name, m)| (name.clone(), Entry::new(m.clone())))
            .collect();
        let devices = devices::Devices::probe(config);
        let source = reload::Source::new(config);
        let policies = config
            .models
            .iter()
            .map(|(name, m)| (name.clone(), source.policy(&devices, m)))
            .collect();
        let loader = Arc::new(EngineLoader::new(config));
        let lifecycle = Lifecycle::new(
            loader.clone(),
            config.lifecycle.clone(),
            devices.budgets.clone(),
            policies,
            metrics.clone(),
        );
        let routes = routes::Routes::new(
            config.routes.clone(),
            Some(config.routes_state.clone()),
            metrics.clone(),
        );
        Self {
            entries: RwLock::new(entries),
            loader,
            lifecycle,
            metrics,
            sleep: sleep::Sleep::default(),
            routes,
            devices,
            source,
        }
    }

    fn entries(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The versions of `id`, oldest first (natural order); empty for an
    /// id without versions.
    pub fn versions(&self, id: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .entries()
            .values()
            .filter(|e| e.manifest.id == id)
            .filter_map(|e| e.manifest.version.clone())
            .collect();
        v.sort_by(|a, b| version_order(a, b));
        v
    }

    /// Where a request for `model` goes: `id@version` exactly; an id with
    /// versions through its route (sticky for `identity`); an id without
    /// versions to itself.
    pub fn resolve(&self, model: &str, identity: Option<&str>) -> Result<Resolved, RegistryError> {
        if let Some(entry) = self.entries().get(model) {
            return Ok(Resolved {
                id: entry.manifest.id.clone(),
                version: entry.manifest.version.clone(),
                name: model.to_string(),
                shadow: None,
            });
        }
        let versions = self.versions(model);
        let choice = self
            .routes
            .choose(model, &versions, identity)
            .ok_or_else(|| RegistryError::NotFound(model.to_string()))?;
        Ok(Resolved {
            id: model.to_string(),
            name: format!("{model}@{}", choice.version),
            shadow: choice.shadow.map(|v| (v.clone(), format!("{model}@{v}"))),
            version: Some(choice.version),
        })
    }

    /// The instance an operator means by `model`: itself, or for an id
    /// with versions the version with the largest share.
    fn instance(&self, model: &str) -> Result<String, RegistryError> {
        if self.entries().contains_key(model) {
            return Ok(model.to_string());
        }
        let versions = self.versions(model);
        self.routes
            .baseline(model, &versions)
            .map(|v| format!("{model}@{v}"))
            .ok_or_else(|| RegistryError::NotFound(model.to_string()))
    }

    /// Background start-up work: estimates for models whose weights are
    /// already here, then the loads of models marked `preload`. The daemon
    /// serves meanwhile.
    pub fn start_background(self: &Arc<Self>) {
        let names: Vec<String> = self.entries().keys().cloned().collect();
        self.warm_up(names);
    }

    /// Estimates (and preloads, where asked) the models `names`.
    fn warm_up(self: &Arc<Self>, names: Vec<String>) {
        let this = self.clone();
        let estimate = names.clone();
        tokio::spawn(async move {
            for id in estimate {
                if let Some(bytes) = this.loader.estimate_local(&id).await {
                    this.lifecycle.note_estimate(&id, bytes);
                }
            }
        });
        for id in names {
            if !self.entry(&id).is_ok_and(|e| e.manifest.preload) {
                continue;
            }
            let this = self.clone();
            tokio::spawn(async move {
                tracing::info!(model = %id, "preloading");
                if let Err(e) = this.load(&id).await {
                    tracing::warn!(model = %id, error = %e, "preload failed");
                }
            });
        }
    }

    fn summary(&self, id: &str, entry: &Entry, state: Snapshot) -> ModelSummary {
        ModelSummary {
            id: id.to_string(),
            version: entry.manifest.version.clone(),
            versions: Vec::new(),
            created: entry.created,
            owned_by: entry.manifest.owned_by.clone(),
            kind: entry.manifest.kind.name(),
            state,
        }
    }

    /// Every model instance, by name (`id` or `id@version`).
    pub fn list(&self) -> Vec<ModelSummary> {
        let mut states = self.lifecycle.snapshots();
        self.entries()
            .iter()
            .filter_map(|(id, e)| Some(self.summary(id, e, states.remove(id)?)))
            .collect()
    }

    /// What `/v1/models` lists: every instance, and each id with versions
    /// as itself (the name that goes through its route).
    pub fn catalog(&self) -> Vec<ModelSummary> {
        let mut all = self.list();
        let ids: std::collections::BTreeSet<String> = all
            .iter()
            .filter(|m| m.version.is_some())
            .filter_map(|m| m.id.split_once('@').map(|(id, _)| id.to_string()))
            .collect();
        all.extend(ids.iter().filter_map(|id| self.describe(id)));
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// One model, if declared: an instance, or an id with versions (shown
    /// with the state of the version with the largest share).
    pub fn describe(&self, id: &str) -> Option<ModelSummary> {
        if let Some(entry) = self.entries().get(id) {
            return Some(self.summary(id, entry, self.lifecycle.snapshot(id)?));
        }
        let name = self.instance(id).ok()?;
        let entry = self.entry(&name).ok()?;
        let mut summary = self.summary(id, &entry, self.lifecycle.snapshot(&name)?);
        summary.version = None;
        summary.versions = self.versions(id);
        Some(summary)
    }

    /// Whether the model is loaded and serving (a request would not wait
    /// for a load).
    pub fn is_resident(&self, id: &str) -> bool {
        self.lifecycle
            .snapshot(id)
            .is_some_and(|s| matches!(s.state, ModelState::Warm | ModelState::Busy))
    }

    /// The sampling defaults of a text model that can serve `purpose`.
    pub fn text_defaults(
        &self,
        id: &str,
        purpose: Purpose,
    ) -> Result<GenerationDefaults, RegistryError> {
        let entry = self.entry(id)?;
        let kind = entry.manifest.kind;
        let wanted = match purpose {
            Purpose::Chat => "chat completions",
            Purpose::Completion => "text completions",
        };
        let serves = match purpose {
            Purpose::Chat => kind == ModelKind::Chat,
            Purpose::Completion => matches!(kind, ModelKind::Chat | ModelKind::Completion),
        };
        if !serves {
            return Err(RegistryError::WrongKind {
                model: id.to_string(),
                kind: kind.name(),
                wanted,
            });
        }
        Ok(entry.manifest.defaults)
    }

    fn check_kind(
        &self,
        id: &str,
        want: ModelKind,
        wanted: &'static str,
    ) -> Result<(), RegistryError> {
        let kind = self.entry(id)?.manifest.kind;
        if kind != want {
            return Err(RegistryError::WrongKind {
                model: id.to_string(),
                kind: kind.name(),
                wanted,
            });
        }
        Ok(())
    }

    /// Checks that `id` is an embedding model.
    pub fn check_embedding(&self, id: &str) -> Result<(), RegistryError> {
        self.check_kind(id, ModelKind::Embedding, "embeddings")
    }

    /// Checks that `id` is an image model.
    pub fn check_image(&self, id: &str) -> Result<(), RegistryError> {
        self.check_kind(id, ModelKind::Image, "image generation")
    }

    /// The image model a request without `model` goes to: the first one
    /// declared, by id.
    pub fn default_image_model(&self) -> Option<String> {
        self.entries()
            .values()
            .find(|e| e.manifest.kind == ModelKind::Image)
            .map(|e| e.manifest.id.clone())
    }

    fn entry(&self, id: &str) -> Result<Entry, RegistryError> {
        self.entries()
            .get(id)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))
    }

    /// The model for one request, loading it first if it is cold.
    /// `keep_alive` (from the request) applies after the request ends.
    pub async fn acquire(
        &self,
        id: &str,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Lease, RegistryError> {
        if !self.entries().contains_key(id) {
            return Err(RegistryError::NotFound(id.to_string()));
        }
        self.lifecycle.acquire(id, keep_alive).await
    }

    /// Loads the model (if cold) and starts its keep-alive timer; an id
    /// with versions loads the version with the largest share.
    pub async fn load(&self, model: &str) -> Result<ModelSummary, RegistryError> {
        let id = self.instance(model)?;
        drop(self.acquire(&id, None).await?);
        self.describe(model)
            .ok_or_else(|| RegistryError::NotFound(model.to_string()))
    }

    /// Unloads the model, waiting up to `wait` for its memory to be freed
    /// (a busy model drains its in-flight requests first); an id with
    /// versions unloads them all.
    pub async fn unload(&self, model: &str, wait: Duration) -> Result<ModelSummary, RegistryError> {
        let names = if self.entries().contains_key(model) {
            vec![model.to_string()]
        } else {
            let versions = self.versions(model);
            if versions.is_empty() {
                return Err(RegistryError::NotFound(model.to_string()));
            }
            versions.iter().map(|v| format!("{model}@{v}")).collect()
        };
        let mut stops = Vec::new();
        for id in &names {
            stops.push(self.lifecycle.unload(id)?);
        }
        let _ = tokio::time::timeout(wait, futures::future::join_all(stops)).await;
        self.describe(model)
            .ok_or_else(|| RegistryError::NotFound(model.to_string()))
    }

    /// Devices, models and memory, for `/admin/status`.
    pub fn status(&self) -> Status {
        let mut devices = self.lifecycle.devices();
        for d in &mut devices {
            if let Some(crate::config::DeviceName::Cuda(n)) =
                crate::config::DeviceName::parse(&d.name)
            {
                d.driver_free = kindling_models::gpu::memory(n).ok().map(|m| m.free);
            }
        }
        Status {
            devices,
            models: self.list(),
            process_resident_bytes: memory::resident(),
        }
    }

    /// Downloads a model's weights ahead of time, with a progress bar on
    /// the terminal (`kindling pull`); returns the weight file.
    pub async fn pull(&self, model: &str) -> Result<std::path::PathBuf, RegistryError> {
        let id = &self.instance(model)?;
        self.loader.fetch(id, Arc::default(), true).await
    }

    /// Unloads every model (at shutdown); workers exit once their in-flight
    /// requests end.
    pub fn unload_all(&self) {
        self.lifecycle.unload_all();
    }

    /// The shared metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}
