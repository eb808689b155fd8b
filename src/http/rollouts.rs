//! The rollout admin API: routes over model versions (show, set, promote,
//! roll back, reset, history, canary comparison) and manifest reloads.
//! Ids may contain `/`, so the id is the path up to a known action.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::ApiJson;
use super::AppState;
use crate::config::RouteSpec;
use crate::tenancy::Principal;

const ACTIONS: [&str; 4] = ["promote", "rollback", "history", "compare"];

/// `GET /admin/routes`: every id with versions, and its route.
pub async fn list(State(state): State<AppState>) -> Response {
    Json(serde_json::json!({ "object": "list", "data": state.registry.routes() })).into_response()
}

/// `?window=5m` on the comparison.
#[derive(Deserialize)]
pub struct CompareQuery {
    window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteBody {
    version: Option<String>,
}

/// Splits `{id}` or `{id}/{action}` (an id that exists wins).
fn split<'a>(state: &AppState, rest: &'a str) -> (&'a str, Option<&'a str>) {
    let known =
        |id: &str| !state.registry.versions(id).is_empty() || state.registry.describe(id).is_some();
    match rest.rsplit_once('/') {
        Some((id, action)) if ACTIONS.contains(&action) && !known(rest) => (id, Some(action)),
        _ => (rest, None),
    }
}

/// `GET|DELETE /admin/routes/{id}`, `GET /admin/routes/{id}/history`,
/// `GET /admin/routes/{id}/compare`.
pub async fn read(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<Principal>>,
    method: Method,
    Path(rest): Path<String>,
    Query(q): Query<CompareQuery>,
) -> Result<Response, ApiError> {
    let registry = &state.registry;
    Ok(match (method, split(&state, &rest)) {
        (Method::GET, (id, None)) => Json(registry.route(id)?).into_response(),
        (Method::DELETE, (id, None)) => Json(registry.reset_route(id, &key.name)?).into_response(),
        (Method::GET, (id, Some("history"))) => {
            let data = registry.route_history(Some(id))?;
            Json(serde_json::json!({ "object": "list", "data": data })).into_response()
        }
        (Method::GET, (id, Some("compare"))) => {
            let window = match q.window.as_deref() {
                None => None,
                Some(w) => Some(humantime::parse_duration(w).map_err(|e| {
                    ApiError::invalid(
                        "window",
                        format!("`window`: expected a duration like \"5m\": {e}"),
                    )
                })?),
            };
            Json(registry.compare(id, window)?).into_response()
        }
        (m, _) => {
            return Err(ApiError::no_route(
                m.as_str(),
                &format!("/admin/routes/{rest}"),
            ))
        }
    })
}

/// `PUT /admin/routes/{id}` with `{"weights": {…}, "shadow": …, "guard": …}`.
pub async fn put(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<Principal>>,
    Path(rest): Path<String>,
    ApiJson(spec): ApiJson<RouteSpec>,
) -> Result<Response, ApiError> {
    match split(&state, &rest) {
        (id, None) => Ok(Json(state.registry.set_route(id, spec, &key.name)?).into_response()),
        _ => Err(ApiError::no_route("PUT", &format!("/admin/routes/{rest}"))),
    }
}

/// `POST /admin/routes/{id}/promote` (optionally `{"version": "…"}`) and
/// `POST /admin/routes/{id}/rollback`.
pub async fn post(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<Principal>>,
    Path(rest): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let registry = &state.registry;
    let view = match split(&state, &rest) {
        (id, Some("promote")) => {
            let body: PromoteBody = if body.iter().all(u8::is_ascii_whitespace) {
                PromoteBody { version: None }
            } else {
                serde_json::from_slice(&body)
                    .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?
            };
            registry.promote(id, body.version, &key.name)?
        }
        (id, Some("rollback")) => registry.rollback(id, &key.name)?,
        _ => return Err(ApiError::no_route("POST", &format!("/admin/routes/{rest}"))),
    };
    Ok(Json(view).into_response())
}

/// `POST /admin/reload`: reads the manifest folder again.
pub async fn reload(State(state): State<AppState>) -> Response {
    Json(state.registry.reload().await).into_response()
}
