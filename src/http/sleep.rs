//! Sleep and wake over HTTP, as vLLM names them: `POST /sleep?level=1|2`,
//! `POST /wake_up`, `GET /is_sleeping` (admin scope). While asleep the
//! replica answers readiness 503, and a model request either wakes it or
//! gets 503 with `Retry-After`, as `[sleep] wake_on_request` says.

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::registry::SleepLevel;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepParams {
    level: Option<String>,
}

/// `POST /sleep`: unloads every model (after its in-flight requests, up
/// to `[sleep] drain_timeout`) and turns readiness off.
pub async fn sleep(
    State(state): State<AppState>,
    params: Result<Query<SleepParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::invalid("level", e.body_text()))?;
    let level = match params.level.as_deref() {
        None => SleepLevel::KeepWeights,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .and_then(SleepLevel::from_number)
            .ok_or_else(|| {
                ApiError::invalid("level", format!("level must be 1 or 2, got `{l}`"))
            })?,
    };
    let report = state.registry.sleep(level, state.sleep.drain_timeout).await;
    Ok(Json(json!({
        "is_sleeping": true,
        "level": report.level.number(),
        "models": report.models,
        "host_memory_bytes": report.held_bytes,
        "still_draining": report.still_draining,
    })))
}

/// `POST /wake_up`: loads back the models that were resident and turns
/// readiness on again.
pub async fn wake_up(State(state): State<AppState>) -> Json<Value> {
    let report = state.registry.wake_up().await;
    let failed: serde_json::Map<String, Value> = report
        .failed
        .into_iter()
        .map(|(id, e)| (id, Value::String(e)))
        .collect();
    Json(json!({
        "is_sleeping": false,
        "was_sleeping": report.was_asleep,
        "models": report.models,
        "failed": failed,
        "seconds": report.elapsed.as_secs_f64(),
    }))
}

/// `GET /is_sleeping`.
pub async fn is_sleeping(State(state): State<AppState>) -> Json<Value> {
    let level = state.registry.sleep_level();
    Json(json!({
        "is_sleeping": level.is_some(),
        "level": level.map_or(0, SleepLevel::number),
    }))
}

/// Before a model request: while asleep, wake (if configured) or refuse.
pub async fn gate(state: &AppState) -> Result<(), ApiError> {
    if state.registry.sleep_level().is_none() {
        return Ok(());
    }
    if state.sleep.wake_on_request {
        tracing::info!("a request wakes the replica");
        state.registry.wake_up().await;
        return Ok(());
    }
    Err(ApiError::asleep(state.sleep.retry_after))
}
