//! Liveness and readiness probes (also under KServe's `/v2/health/*`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;

/// 200 while the process serves HTTP at all.
pub async fn live() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 while new requests are accepted; 503 once shutdown has begun, so
/// load balancers stop sending traffic while in-flight requests drain, and
/// 503 while asleep, so routers steer to replicas that are awake.
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.drain.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "draining" })),
        )
    } else if let Some(level) = state.registry.sleep_level() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "sleeping", "level": level.number() })),
        )
    } else {
        (StatusCode::OK, Json(json!({ "status": "ready" })))
    }
}
