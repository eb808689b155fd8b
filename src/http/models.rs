//! `GET /v1/models` and `GET /v1/models/{id}`: the OpenAI model objects,
//! extended with each model's lifecycle state and memory.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Extension, Path, State};
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::registry::{ModelState, ModelSummary, RegistryError};
use crate::tenancy::Principal;

fn unix(t: Option<SystemTime>) -> Option<f64> {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| (d.as_secs_f64() * 1e3).round() / 1e3)
}

/// Bytes received and expected while a model downloads.
#[derive(Serialize)]
pub struct DownloadObject {
    done_bytes: u64,
    total_bytes: u64,
}

#[derive(Serialize)]
pub struct ModelObject {
    id: String,
    object: &'static str,
    /// Extension: the version this is (`id@version` entries).
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    /// Extension: an id with versions, listed as itself (requests to it go
    /// through its route), names them, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    versions: Vec<String>,
    created: u64,
    owned_by: String,
    /// Extension: whether the weights are in memory now.
    loaded: bool,
    /// Where it is in its lifecycle.
    state: ModelState,
    /// `chat` or `completion`.
    kind: &'static str,
    device: Option<String>,
    estimated_bytes: Option<u64>,
    measured_bytes: Option<u64>,
    /// Unix time (seconds) the last request ended.
    last_used: Option<f64>,
    /// Keep-alive applied after the current requests (`"5m"`, `"forever"`).
    keep_alive: String,
    /// Unix time (seconds) it will be unloaded if no request comes.
    keep_alive_until: Option<f64>,
    pinned: bool,
    requests_in_flight: usize,
    queue_depth: usize,
    download: Option<DownloadObject>,
    /// Why the last load failed, while that failure holds.
    error: Option<String>,
}

impl From<ModelSummary> for ModelObject {
    fn from(m: ModelSummary) -> Self {
        let s = m.state;
        Self {
            id: m.id,
            object: "model",
            version: m.version,
            versions: m.versions,
            created: m.created,
            owned_by: m.owned_by,
            loaded: s.state.is_resident(),
            state: s.state,
            kind: m.kind,
            device: s.device,
            estimated_bytes: s.estimated_bytes,
            measured_bytes: s.measured_bytes,
            last_used: unix(s.last_used),
            keep_alive: s.keep_alive.to_string(),
            keep_alive_until: unix(s.expires_at),
            pinned: s.pinned,
            requests_in_flight: s.in_flight,
            queue_depth: s.queue_depth,
            download: s.download.map(|(done_bytes, total_bytes)| DownloadObject {
                done_bytes,
                total_bytes,
            }),
            error: s.error,
        }
    }
}

#[derive(Serialize)]
pub struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

/// Every declared model, loaded or not.
pub async fn list(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<Principal>>,
) -> Json<ModelList> {
    let data = state
        .registry
        .catalog()
        .into_iter()
        .filter(|m| key.may_use(&m.id))
        .map(ModelObject::from)
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}

/// One model; ids may contain `/`.
pub async fn get(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    // A model the key may not use is not there, as far as it can tell.
    let model = Some(&id)
        .filter(|id| key.may_use(id))
        .and_then(|id| state.registry.describe(id))
        .ok_or_else(|| ApiError::from(RegistryError::NotFound(id.clone())))?;
    Ok(Json(model.into()))
}
