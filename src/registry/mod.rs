//! The registry room: the model catalog and each model's lifecycle. Models
//! load on the first request that needs them (one shared load however many
//! requests wait), are charged against their device's memory budget, make
//! room by evicting idle models, and unload when their keep-alive runs out.

mod devices;
mod download;
mod evict;
pub mod lifecycle;
mod loader;
mod memory;
mod sleep;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use crate::config::{Config, GenerationDefaults, KeepAlive, ModelKind, ModelManifest};
use crate::engine::EngineError;
use crate::metrics::{gauge_value, Metrics};
pub use lifecycle::{DeviceSnapshot, ModelState, Snapshot};
use lifecycle::{Lifecycle, Policy};
pub use loader::EngineLoader;
pub use memory::tune_allocator;
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
    /// The model's id.
    pub id: String,
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

struct Entry {
    manifest: ModelManifest,
    created: u64,
}

/// The catalog of declared models and their lifecycle.
pub struct Registry {
    entries: BTreeMap<String, Entry>,
    loader: Arc<EngineLoader>,
    lifecycle: Lifecycle<Arc<EngineLoader>>,
    metrics: Arc<Metrics>,
    sleep: sleep::Sleep,
}

impl Registry {
    /// A registry of the models `config` declares; none is loaded.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        let entries: BTreeMap<String, Entry> = config
            .models
            .iter()
            .map(|(id, m)| {
                let created = std::fs::metadata(&m.source)
                    .and_then(|md| md.modified())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                let entry = Entry {
                    manifest: m.clone(),
                    created,
                };
                (id.clone(), entry)
            })
            .collect();
        let devices = devices::Devices::probe(config);
        let policies = config
            .models
            .iter()
            .map(|(id, m)| {
                let policy = Policy {
                    device: devices.pin(m),
                    pin: m.pin,
                    keep_alive: m.keep_alive.unwrap_or(config.lifecycle.keep_alive),
                };
                (id.clone(), policy)
            })
            .collect();
        let devices = devices.budgets;
        let loader = Arc::new(EngineLoader::new(config));
        let lifecycle = Lifecycle::new(
            loader.clone(),
            config.lifecycle.clone(),
            devices,
            policies,
            metrics.clone(),
        );
        Self {
            entries,
            loader,
            lifecycle,
            metrics,
            sleep: sleep::Sleep::default(),
        }
    }

    /// Background start-up work: estimates for models whose weights are
    /// already here, then the loads of models marked `preload`. The daemon
    /// serves meanwhile.
    pub fn start_background(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            for id in this.entries.keys() {
                if let Some(bytes) = this.loader.estimate_local(id).await {
                    this.lifecycle.note_estimate(id, bytes);
                }
            }
        });
        for (id, entry) in &self.entries {
            if entry.manifest.preload {
                let this = self.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    tracing::info!(model = %id, "preloading");
                    if let Err(e) = this.load(&id).await {
                        tracing::warn!(model = %id, error = %e, "preload failed");
                    }
                });
            }
        }
    }

    fn summary(&self, id: &str, entry: &Entry, state: Snapshot) -> ModelSummary {
        ModelSummary {
            id: id.to_string(),
            created: entry.created,
            owned_by: entry.manifest.owned_by.clone(),
            kind: entry.manifest.kind.name(),
            state,
        }
    }

    /// Every declared model, by id.
    pub fn list(&self) -> Vec<ModelSummary> {
        let mut states = self.lifecycle.snapshots();
        self.entries
            .iter()
            .filter_map(|(id, e)| Some(self.summary(id, e, states.remove(id)?)))
            .collect()
    }

    /// One model, if declared.
    pub fn describe(&self, id: &str) -> Option<ModelSummary> {
        let entry = self.entries.get(id)?;
        Some(self.summary(id, entry, self.lifecycle.snapshot(id)?))
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
        Ok(entry.manifest.defaults.clone())
    }

    /// Checks that `id` is an embedding model.
    pub fn check_embedding(&self, id: &str) -> Result<(), RegistryError> {
        let kind = self.entry(id)?.manifest.kind;
        if kind != ModelKind::Embedding {
            return Err(RegistryError::WrongKind {
                model: id.to_string(),
                kind: kind.name(),
                wanted: "embeddings",
            });
        }
        Ok(())
    }

    /// Checks that `id` is an image model.
    pub fn check_image(&self, id: &str) -> Result<(), RegistryError> {
        let kind = self.entry(id)?.manifest.kind;
        if kind != ModelKind::Image {
            return Err(RegistryError::WrongKind {
                model: id.to_string(),
                kind: kind.name(),
                wanted: "image generation",
            });
        }
        Ok(())
    }

    /// The image model a request without `model` goes to: the first one
    /// declared, by id.
    pub fn default_image_model(&self) -> Option<String> {
        self.entries
            .iter()
            .find(|(_, e)| e.manifest.kind == ModelKind::Image)
            .map(|(id, _)| id.clone())
    }

    fn entry(&self, id: &str) -> Result<&Entry, RegistryError> {
        self.entries
            .get(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))
    }

    /// The model for one request, loading it first if it is cold.
    /// `keep_alive` (from the request) applies after the request ends.
    pub async fn acquire(
        &self,
        id: &str,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Lease, RegistryError> {
        self.entry(id)?;
        self.lifecycle.acquire(id, keep_alive).await
    }

    /// Loads the model (if cold) and starts its keep-alive timer.
    pub async fn load(&self, id: &str) -> Result<ModelSummary, RegistryError> {
        drop(self.acquire(id, None).await?);
        self.describe(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))
    }

    /// Unloads the model, waiting up to `wait` for its memory to be freed
    /// (a busy model drains its in-flight requests first).
    pub async fn unload(&self, id: &str, wait: Duration) -> Result<ModelSummary, RegistryError> {
        self.entry(id)?;
        let stopped = self.lifecycle.unload(id)?;
        let _ = tokio::time::timeout(wait, stopped).await;
        self.describe(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))
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
    pub async fn pull(&self, id: &str) -> Result<std::path::PathBuf, RegistryError> {
        self.entry(id)?;
        self.loader.fetch(id, Arc::default(), true).await
    }

    /// Unloads every model (at shutdown); workers exit once their in-flight
    /// requests end.
    pub fn unload_all(&self) {
        self.lifecycle.unload_all();
    }

    /// The metrics, with the registry's gauges brought up to date.
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        let status = self.status();
        for d in &status.devices {
            let label = crate::metrics::DeviceLabel {
                device: d.name.clone(),
            };
            m.device_budget
                .get_or_create(&label)
                .set(gauge_value(d.budget));
            m.device_used.get_or_create(&label).set(gauge_value(d.used));
        }
        let mut resident = 0;
        for s in &status.models {
            let label = Metrics::model(&s.id);
            let st = &s.state;
            resident += i64::from(st.state.is_resident());
            for state in ModelState::ALL {
                let label = crate::metrics::ModelStateLabels {
                    model: s.id.clone(),
                    state: state.as_str().to_string(),
                };
                m.model_state
                    .get_or_create(&label)
                    .set(i64::from(state == st.state));
            }
            m.model_estimated
                .get_or_create(&label)
                .set(gauge_value(st.estimated_bytes.unwrap_or(0)));
            m.model_measured
                .get_or_create(&label)
                .set(gauge_value(st.measured_bytes.unwrap_or(0)));
            m.queue_depth
                .get_or_create(&label)
                .set(st.queue_depth as i64);
            m.in_flight.get_or_create(&label).set(st.in_flight as i64);
            let b = &st.batch;
            m.batch_running.get_or_create(&label).set(b.running as i64);
            m.batch_steps
                .get_or_create(&label)
                .set(gauge_value(b.steps));
            m.kv_blocks_used
                .get_or_create(&label)
                .set(b.kv_blocks_used as i64);
            m.kv_blocks_total
                .get_or_create(&label)
                .set(b.kv_blocks_total as i64);
            m.tokens_per_second
                .get_or_create(&label)
                .set(b.tokens_per_second);
            let name = Metrics::model_name(&s.id);
            m.vllm_waiting.get_or_create(&name).set(b.waiting as i64);
            m.vllm_running.get_or_create(&name).set(b.running as i64);
            let usage = if b.kv_blocks_total == 0 {
                0.0
            } else {
                b.kv_blocks_used as f64 / b.kv_blocks_total as f64
            };
            m.vllm_kv_usage.get_or_create(&name).set(usage);
        }
        m.resident_models.set(resident);
        m.process_resident
            .set(gauge_value(status.process_resident_bytes.unwrap_or(0)));
        m.render()
    }

    /// The shared metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}
