//! The registry room: the model catalog and each model's load state.
//! A model is loaded by the first request that needs it; concurrent requests
//! for a model that is loading wait on that same load.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::UNIX_EPOCH;

use futures::future::{BoxFuture, FutureExt, Shared};

use crate::config::{Config, EngineConfig, GenerationDefaults, ModelKind, ModelManifest};
use crate::engine::{self, EngineError, EngineHandle, LoadSpec};

/// The registry room's errors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    /// No manifest declares this id.
    #[error("the model `{0}` does not exist")]
    NotFound(String),
    /// The model exists but is not served for this kind of request.
    #[error("the model `{model}` is a {kind} model and cannot serve {wanted}")]
    WrongKind {
        /// The model.
        model: String,
        /// What it is.
        kind: &'static str,
        /// What was asked of it.
        wanted: &'static str,
    },
    /// Loading or reaching the model failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
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
    /// Whether its weights are in memory now.
    pub loaded: bool,
}

type SharedLoad = Shared<BoxFuture<'static, Result<EngineHandle, EngineError>>>;

enum Slot {
    Cold,
    Loading(SharedLoad),
    Ready(EngineHandle),
}

struct Entry {
    manifest: ModelManifest,
    created: u64,
    slot: Mutex<Slot>,
}

impl Entry {
    fn slot(&self) -> MutexGuard<'_, Slot> {
        // A panic while holding this lock cannot leave the slot half-written:
        // every write is a single assignment, so a poisoned lock is still sound.
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The catalog of declared models and their state.
pub struct Registry {
    entries: BTreeMap<String, Arc<Entry>>,
    engine: EngineConfig,
}

impl Registry {
    /// A registry of the models `config` declares; none is loaded.
    pub fn new(config: &Config) -> Self {
        let entries = config
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
                    slot: Mutex::new(Slot::Cold),
                };
                (id.clone(), Arc::new(entry))
            })
            .collect();
        Self {
            entries,
            engine: config.engine.clone(),
        }
    }

    fn summary(entry: &Entry) -> ModelSummary {
        ModelSummary {
            id: entry.manifest.id.clone(),
            created: entry.created,
            owned_by: entry.manifest.owned_by.clone(),
            loaded: matches!(*entry.slot(), Slot::Ready(_)),
        }
    }

    /// Every declared model, by id.
    pub fn list(&self) -> Vec<ModelSummary> {
        self.entries.values().map(|e| Self::summary(e)).collect()
    }

    /// One model, if declared.
    pub fn describe(&self, id: &str) -> Option<ModelSummary> {
        self.entries.get(id).map(|e| Self::summary(e))
    }

    /// The sampling defaults of a text model that can serve `purpose`.
    pub fn text_defaults(
        &self,
        id: &str,
        purpose: Purpose,
    ) -> Result<GenerationDefaults, RegistryError> {
        let entry = self.entry(id)?;
        if purpose == Purpose::Chat && entry.manifest.kind != ModelKind::Chat {
            return Err(RegistryError::WrongKind {
                model: id.to_string(),
                kind: "completion",
                wanted: "chat completions",
            });
        }
        Ok(entry.manifest.defaults.clone())
    }

    fn entry(&self, id: &str) -> Result<&Arc<Entry>, RegistryError> {
        self.entries
            .get(id)
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))
    }

    /// A handle to the model's worker, loading the model first if it is cold.
    pub async fn acquire(&self, id: &str) -> Result<EngineHandle, RegistryError> {
        let entry = self.entry(id)?;
        let load = {
            let mut slot = entry.slot();
            match &*slot {
                Slot::Ready(handle) => return Ok(handle.clone()),
                Slot::Loading(load) => load.clone(),
                Slot::Cold => {
                    let load = self.start_load(&entry.manifest);
                    *slot = Slot::Loading(load.clone());
                    load
                }
            }
        };
        let result = load.clone().await;
        let mut slot = entry.slot();
        // Only the load this request waited on may settle the slot: a newer
        // load (after a failure or an unload) must not be overwritten.
        if matches!(&*slot, Slot::Loading(current) if current.ptr_eq(&load)) {
            *slot = match &result {
                Ok(handle) => Slot::Ready(handle.clone()),
                // Left cold: the next request tries again.
                Err(_) => Slot::Cold,
            };
        }
        Ok(result?)
    }

    fn start_load(&self, manifest: &ModelManifest) -> SharedLoad {
        let spec = LoadSpec {
            model: manifest.id.clone(),
            path: manifest.weights.path.clone(),
            context_length: manifest.context_length,
            queue_size: self.engine.queue_size,
            stall_timeout: self.engine.stall_timeout,
        };
        let model = manifest.id.clone();
        tracing::info!(model = %model, "loading model");
        // The load runs as its own task, so it completes even if every
        // request waiting for it goes away.
        let task = tokio::spawn(engine::start(spec));
        async move {
            task.await.unwrap_or_else(|e| {
                Err(EngineError::LoadFailed {
                    model,
                    reason: format!("load task failed: {e}"),
                })
            })
        }
        .boxed()
        .shared()
    }

    /// Drops every loaded model's handle; workers exit once their in-flight
    /// requests release theirs.
    pub fn unload_all(&self) {
        for entry in self.entries.values() {
            *entry.slot() = Slot::Cold;
        }
    }
}
