//! The admin API (`/admin/*`, can be disabled in config) and `/metrics`.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::models::ModelObject;
use super::AppState;

/// How long an unload call waits for the model's memory to be freed
/// before answering (a busy model keeps draining after that).
const UNLOAD_WAIT: Duration = Duration::from_secs(10);

/// `POST /admin/models/{id}/load` and `POST /admin/models/{id}/unload`.
pub async fn model_action(
    State(state): State<AppState>,
    Path(rest): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    let Some((id, action)) = rest.rsplit_once('/') else {
        return Err(ApiError::no_route("POST", &format!("/admin/models/{rest}")));
    };
    let summary = match action {
        "load" => state.registry.load(id).await?,
        "unload" => state.registry.unload(id, UNLOAD_WAIT).await?,
        _ => return Err(ApiError::no_route("POST", &format!("/admin/models/{rest}"))),
    };
    Ok(Json(summary.into()))
}

#[derive(Serialize)]
struct DeviceObject {
    name: String,
    budget_bytes: u64,
    used_bytes: u64,
    free_bytes: u64,
    total_bytes: Option<u64>,
    /// GPUs: free memory as the driver reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    driver_free_bytes: Option<u64>,
}

#[derive(Serialize)]
struct StatusObject {
    devices: Vec<DeviceObject>,
    models_resident: Vec<String>,
    queue_depths: std::collections::BTreeMap<String, usize>,
    models: Vec<ModelObject>,
    process_resident_bytes: Option<u64>,
}

/// `GET /admin/status`: devices with budget/used/free, resident models,
/// queue depths, and every model's state.
pub async fn status(State(state): State<AppState>) -> Json<impl Serialize> {
    let s = state.registry.status();
    Json(StatusObject {
        devices: s
            .devices
            .into_iter()
            .map(|d| DeviceObject {
                free_bytes: d.budget.saturating_sub(d.used),
                name: d.name,
                budget_bytes: d.budget,
                used_bytes: d.used,
                total_bytes: d.total,
                driver_free_bytes: d.driver_free,
            })
            .collect(),
        models_resident: s
            .models
            .iter()
            .filter(|m| m.state.state.is_resident())
            .map(|m| m.id.clone())
            .collect(),
        queue_depths: s
            .models
            .iter()
            .map(|m| (m.id.clone(), m.state.queue_depth))
            .collect(),
        models: s.models.into_iter().map(ModelObject::from).collect(),
        process_resident_bytes: s.process_resident_bytes,
    })
}

/// `GET /metrics` in the Prometheus (OpenMetrics) text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.registry.render_metrics();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
