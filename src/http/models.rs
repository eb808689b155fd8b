//! `GET /v1/models` and `GET /v1/models/{id}`.

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::registry::{ModelSummary, RegistryError};

#[derive(Serialize)]
pub struct ModelObject {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: String,
    /// Extension: whether the weights are in memory now.
    loaded: bool,
}

impl From<ModelSummary> for ModelObject {
    fn from(m: ModelSummary) -> Self {
        Self {
            id: m.id,
            object: "model",
            created: m.created,
            owned_by: m.owned_by,
            loaded: m.loaded,
        }
    }
}

#[derive(Serialize)]
pub struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

/// Every declared model, loaded or not.
pub async fn list(State(state): State<AppState>) -> Json<ModelList> {
    let data = state
        .registry
        .list()
        .into_iter()
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
    Path(id): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    let model = state
        .registry
        .describe(&id)
        .ok_or_else(|| ApiError::from(RegistryError::NotFound(id.clone())))?;
    Ok(Json(model.into()))
}
