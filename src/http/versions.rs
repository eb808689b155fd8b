//! Model versions on the request path: which version serves a request
//! (`id@version` exactly, an id through its route, sticky for the key and
//! the `user` field or `X-Session-Id`), and the mirrored copy a route's
//! shadow version gets, whose answer is discarded.

use std::sync::Arc;
use std::time::Instant;

use axum::http::{HeaderMap, StatusCode};

use super::error::ApiError;
use super::log::RequestLog;
use super::AppState;
use crate::config::KeepAlive;
use crate::engine::{EmbedRequest, GenerateEvent, ValidGenerate};
use crate::metrics::Traffic;
use crate::registry::{Outcome, Registry, Resolved};
use crate::tenancy::Principal;

/// The header naming the version that served a response.
pub const VERSION_HEADER: &str = "x-kindling-model-version";
/// The header that makes a session sticky to one version.
const SESSION_HEADER: &str = "x-session-id";

/// Resolves the request's `model` to the instance that serves it, after
/// checking the key may use it; the log records the id and version (the
/// response's `X-Kindling-Model-Version`, the usage record).
pub fn resolve(
    state: &AppState,
    log: &RequestLog,
    key: &Principal,
    model: &str,
    user: Option<&str>,
    headers: &HeaderMap,
) -> Result<Resolved, ApiError> {
    log.model(model);
    ApiError::check_model(key, model)?;
    let session = headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .or(user.filter(|u| !u.is_empty()));
    // The key is part of the identity: two tenants' "alice" are two people.
    let identity = session.map(|s| format!("{}\u{0}{s}", key.name));
    let resolved = state.registry.resolve(model, identity.as_deref())?;
    log.served(&resolved);
    Ok(resolved)
}

fn failed(e: impl Into<ApiError>) -> Outcome {
    let status = e.into().status;
    let error = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
    Outcome {
        error,
        client_error: !error,
        ..Outcome::default()
    }
}

/// Runs `copy` for the route's shadow version in the background, if the
/// route picked one, and records how it went (latency from its start).
fn mirror<F, Fut>(registry: &Arc<Registry>, target: &Resolved, copy: F)
where
    F: FnOnce(Arc<Registry>, String, Instant) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let Some((version, name)) = target.shadow.clone() else {
        return;
    };
    let registry = registry.clone();
    let id = target.id.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let mut outcome = copy(registry.clone(), name, started).await;
        outcome.latency = started.elapsed();
        registry.observe(&id, &version, Traffic::Shadow, &outcome);
    });
}

/// Mirrors a generation to the shadow version, if the route picked one:
/// it runs like any request (same prompt, sampling, tenant and deadline);
/// its events are counted and dropped.
pub fn shadow_generation(
    registry: &Arc<Registry>,
    target: &Resolved,
    request: &ValidGenerate,
    keep_alive: Option<KeepAlive>,
) {
    let request = request.clone();
    mirror(
        registry,
        target,
        move |registry, name, started| async move {
            let lease = match registry.acquire(&name, keep_alive).await {
                Ok(l) => l,
                Err(e) => return failed(e),
            };
            let mut events = match lease.submit(request) {
                Ok(events) => events,
                Err(e) => return failed(e),
            };
            let mut o = Outcome::default();
            while let Some(event) = events.recv().await {
                match event {
                    GenerateEvent::Started { prompt_tokens } => {
                        o.prompt_tokens += prompt_tokens as u64;
                    }
                    GenerateEvent::Delta { .. } | GenerateEvent::ToolCall { .. }
                        if o.ttft.is_none() =>
                    {
                        o.ttft = Some(started.elapsed());
                    }
                    GenerateEvent::Finished {
                        completion_tokens, ..
                    } => o.completion_tokens += completion_tokens as u64,
                    GenerateEvent::Failed(e) => return failed(e),
                    GenerateEvent::Delta { .. }
                    | GenerateEvent::ToolCall { .. }
                    | GenerateEvent::PrefixCached { .. } => {}
                }
            }
            o
        },
    );
}

/// Mirrors an embeddings request to the shadow version, if any.
pub fn shadow_embedding(
    registry: &Arc<Registry>,
    target: &Resolved,
    request: &EmbedRequest,
    keep_alive: Option<KeepAlive>,
) {
    let request = request.clone();
    mirror(registry, target, move |registry, name, _| async move {
        match registry.acquire(&name, keep_alive).await {
            Err(e) => failed(e),
            Ok(lease) => match lease.embed(request).await {
                Err(e) => failed(e),
                Ok(r) => Outcome {
                    embedding_tokens: r.prompt_tokens as u64,
                    ..Outcome::default()
                },
            },
        }
    });
}
