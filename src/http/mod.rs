//! The http room: routes, OpenAI wire types, validation, SSE, and the
//! mapping of errors to status codes. Knows nothing of tensors or threads.

mod admin;
mod auth;
mod chat;
mod chat_input;
mod completions;
mod edge;
mod embeddings;
pub mod error;
mod extract;
mod generation;
mod health;
mod images;
mod log;
mod models;
mod responses;
mod responses_out;
mod rollouts;
mod sleep;
mod usage;
mod versions;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::routing::{get, post};
use axum::Router;

use crate::config::SleepConfig;
use crate::registry::Registry;
use crate::tenancy::Tenancy;
use error::ApiError;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    /// The model registry.
    pub registry: Arc<Registry>,
    /// Keys, limits and usage.
    pub tenancy: Arc<Tenancy>,
    /// Largest accepted body, in bytes.
    pub max_body_size: u64,
    /// Set once shutdown begins.
    pub drain: edge::Drain,
    /// Time allowed for a request's headers, and for its body.
    pub read_timeout: Duration,
    /// Whether `/admin/*` is served.
    pub admin: bool,
    /// Deadline for generation requests that name no `timeout`.
    pub request_timeout: Option<Duration>,
    /// Origins allowed to call from a browser (CORS off when empty).
    pub cors_origins: Vec<String>,
    /// What a sleeping replica does with requests.
    pub sleep: SleepConfig,
}

impl AppState {
    /// New state around `registry` and `tenancy`.
    pub fn new(
        registry: Arc<Registry>,
        tenancy: Arc<Tenancy>,
        max_body_size: u64,
        admin: bool,
    ) -> Self {
        Self {
            registry,
            tenancy,
            max_body_size,
            drain: edge::Drain::default(),
            read_timeout: Duration::from_secs(30),
            admin,
            request_timeout: None,
            cors_origins: Vec::new(),
            sleep: SleepConfig::default(),
        }
    }

    /// Sets what a sleeping replica does with requests.
    pub fn with_sleep(mut self, sleep: SleepConfig) -> Self {
        self.sleep = sleep;
        self
    }

    /// Sets the origins browsers may call from.
    pub fn with_cors(mut self, origins: Vec<String>) -> Self {
        self.cors_origins = origins;
        self
    }

    /// Sets the deadline for requests that name no `timeout`.
    pub fn with_request_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the time allowed for a request's headers, and for its body.
    pub fn with_read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// Refuses new work once shutdown has begun.
    fn accepting(&self) -> Result<(), ApiError> {
        if self.drain.is_draining() {
            Err(ApiError::shutting_down())
        } else {
            Ok(())
        }
    }
}

/// A panic in a handler is a bug: log it, answer 500, keep serving.
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = what, "request handler panicked");
    axum::response::IntoResponse::into_response(ApiError::internal())
}

async fn no_route(req: Request) -> ApiError {
    ApiError::no_route(req.method().as_str(), req.uri().path())
}

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let limit = usize::try_from(state.max_body_size).unwrap_or(usize::MAX);
    let mut router = Router::new();
    if state.admin {
        router = router
            .route("/admin/models/{*action}", post(admin::model_action))
            .route("/admin/status", get(admin::status))
            .route("/admin/usage", get(usage::report))
            .route("/admin/routes", get(rollouts::list))
            .route(
                "/admin/routes/{*rest}",
                get(rollouts::read)
                    .delete(rollouts::read)
                    .put(rollouts::put)
                    .post(rollouts::post),
            )
            .route("/admin/reload", post(rollouts::reload))
            .route("/sleep", post(sleep::sleep))
            .route("/wake_up", post(sleep::wake_up))
            .route("/is_sleeping", get(sleep::is_sleeping));
    }
    let router = router
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/completions", post(completions::handle))
        .route("/v1/responses", post(responses::handle))
        .route("/v1/embeddings", post(embeddings::handle))
        .route("/v1/images/generations", post(images::handle))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*id}", get(models::get))
        .route("/metrics", get(admin::metrics))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/v2/health/live", get(health::live))
        .route("/v2/health/ready", get(health::ready))
        .fallback(no_route)
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            edge::refuse_oversized,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            log::log_requests,
        ));
    let router = match cors(&state.cors_origins) {
        Some(layer) => router.layer(layer),
        None => router,
    };
    router.with_state(state)
}

/// CORS for the configured origins; preflights are answered before auth.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| axum::http::HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods(Any)
            .allow_headers(Any)
            .expose_headers(Any)
            .max_age(Duration::from_secs(600)),
    )
}

pub use edge::serve;
