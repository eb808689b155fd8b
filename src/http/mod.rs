//! The http room: routes, OpenAI wire types, validation, SSE, and the
//! mapping of errors to status codes. Knows nothing of tensors or threads.

mod admin;
mod chat;
mod completions;
mod embeddings;
pub mod error;
mod extract;
mod generation;
mod health;
mod images;
mod log;
mod models;
mod wire;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::registry::Registry;
use error::ApiError;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    /// The model registry.
    pub registry: Arc<Registry>,
    /// Largest accepted body, in bytes.
    pub max_body_size: u64,
    /// Set once shutdown begins.
    pub draining: Arc<AtomicBool>,
    /// Whether `/admin/*` is served.
    pub admin: bool,
    /// Deadline for generation requests that name no `timeout`.
    pub request_timeout: Option<std::time::Duration>,
}

impl AppState {
    /// New state around `registry`.
    pub fn new(registry: Arc<Registry>, max_body_size: u64, admin: bool) -> Self {
        Self {
            registry,
            max_body_size,
            draining: Arc::new(AtomicBool::new(false)),
            admin,
            request_timeout: None,
        }
    }

    /// Sets the deadline for requests that name no `timeout`.
    pub fn with_request_timeout(mut self, timeout: Option<std::time::Duration>) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Refuses new work once shutdown has begun.
    fn accepting(&self) -> Result<(), ApiError> {
        if self.draining.load(Ordering::SeqCst) {
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
            .route("/admin/status", get(admin::status));
    }
    router
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/completions", post(completions::handle))
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
            log::log_requests,
        ))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then stops accepting connections, lets
/// in-flight requests finish for up to `grace`, and returns.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let draining = state.draining.clone();
    let (begun_tx, begun_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        draining.store(true, Ordering::SeqCst);
        tracing::info!(
            grace_s = grace.as_secs_f64(),
            "shutting down: no new connections, draining in-flight requests"
        );
        let _ = begun_tx.send(());
    };
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(signal);
    let deadline = async move {
        if begun_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result,
        () = deadline => {
            tracing::warn!("shutdown grace period over; closing the remaining connections");
            Ok(())
        }
    }
}
