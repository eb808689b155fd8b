//! One structured log line per request: id, method, path, status, model,
//! token counts and latency. Streaming responses log when the stream ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;
use crate::metrics::{Metrics, RequestLabels};
use crate::tenancy::{Principal, Tenancy, UsageRecord};

tokio::task_local! {
    /// The id of the request being handled (or streamed) on this task.
    static REQUEST_ID: Arc<str>;
}

/// The id of the request being handled, where there is one: error bodies
/// name it, so a client's report can be matched to the server's log.
pub fn current_request_id() -> Option<Arc<str>> {
    REQUEST_ID.try_with(Arc::clone).ok()
}

/// A response body polled with its request's id in scope.
struct Scoped<S> {
    id: Arc<str>,
    inner: S,
}

impl<S: futures::Stream + Unpin> futures::Stream for Scoped<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        let this = &mut *self;
        REQUEST_ID.sync_scope(this.id.clone(), || {
            std::pin::Pin::new(&mut this.inner).poll_next(cx)
        })
    }
}

/// Client-chosen strings are cut to this many characters in the log.
const LOGGED_CHARS: usize = 128;

fn clip(s: &str) -> String {
    s.chars().take(LOGGED_CHARS).collect()
}

/// The route a path belongs to, for metric labels (ids left out, so the
/// label set stays small).
fn endpoint(path: &str) -> &'static str {
    const FIXED: [&str; 13] = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/images/generations",
        "/admin/usage",
        "/v1/models",
        "/metrics",
        "/admin/status",
        "/health/live",
        "/health/ready",
        "/v2/health/live",
        "/v2/health/ready",
        "/",
    ];
    if let Some(p) = FIXED.iter().find(|p| **p == path) {
        return p;
    }
    if path.starts_with("/v1/models/") {
        "/v1/models/{id}"
    } else if path.starts_with("/admin/routes") {
        "/admin/routes"
    } else if path == "/admin/reload" {
        "/admin/reload"
    } else if path.starts_with("/admin/models/") && path.ends_with("/load") {
        "/admin/models/{id}/load"
    } else if path.starts_with("/admin/models/") && path.ends_with("/unload") {
        "/admin/models/{id}/unload"
    } else {
        "unmatched"
    }
}

/// Marks a response whose log line is written later, by its body stream.
#[derive(Clone, Copy)]
pub struct Deferred;

#[derive(Default)]
struct Fields {
    model: Option<String>,
    /// The id and version that served it, once resolved.
    served: Option<(String, Option<String>)>,
    first_token: Option<Instant>,
    user: Option<String>,
    key: Option<Arc<Principal>>,
    prompt_tokens: usize,
    completion_tokens: usize,
    embedding_tokens: usize,
    images: usize,
    pixel_steps: f64,
    /// Arrival to the start of compute, and compute to the end.
    queue: Option<Duration>,
    compute_started: Option<Instant>,
    /// A streamed response: whether it reached its end, and the status of
    /// an error it ended with.
    stream: Option<(bool, Option<u16>)>,
}

struct Inner {
    id: String,
    method: String,
    path: String,
    started: Instant,
    status: Mutex<u16>,
    fields: Mutex<Fields>,
    done: AtomicBool,
    metrics: Arc<Metrics>,
    tenancy: Arc<Tenancy>,
    registry: Arc<crate::registry::Registry>,
}

/// A request's log record; handlers add the model and token counts.
#[derive(Clone)]
pub struct RequestLog(Arc<Inner>);

impl RequestLog {
    /// The request id (from `x-request-id`, or generated).
    pub fn id(&self) -> &str {
        &self.0.id
    }

    fn fields(&self) -> std::sync::MutexGuard<'_, Fields> {
        self.0.fields.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the request arrived.
    pub fn arrived(&self) -> Instant {
        self.0.started
    }

    /// Records the model the request is for.
    pub fn model(&self, model: &str) {
        self.fields().model = Some(clip(model));
    }

    /// Records the id and version that serve the request.
    pub fn served(&self, target: &crate::registry::Resolved) {
        self.fields().served = Some((target.id.clone(), target.version.clone()));
    }

    /// Records when the first token was sent (kept once).
    pub fn first_token(&self, at: Instant) {
        self.fields().first_token.get_or_insert(at);
    }

    /// The version that serves the request, once resolved.
    fn version(&self) -> Option<String> {
        self.fields().served.as_ref().and_then(|(_, v)| v.clone())
    }

    /// Records the end-user id the client sent.
    pub fn user(&self, user: Option<&str>) {
        self.fields().user = user.map(clip);
    }

    /// Records the key the request came with.
    pub fn key(&self, key: Arc<Principal>) {
        self.fields().key = Some(key);
    }

    /// The key's name, for fair sharing between keys (none on an open
    /// daemon, where there is one caller to share with).
    pub fn key_name(&self) -> Option<Arc<str>> {
        self.fields()
            .key
            .as_ref()
            .map(|k| k.name.clone())
            .filter(|n| &**n != crate::tenancy::ANONYMOUS)
    }

    /// Records token counts.
    pub fn tokens(&self, prompt: usize, completion: usize) {
        let mut f = self.fields();
        f.prompt_tokens = prompt;
        f.completion_tokens = completion;
    }

    /// Records the tokens an embeddings request encoded.
    pub fn embedding_tokens(&self, tokens: usize) {
        self.fields().embedding_tokens = tokens;
    }

    /// Records images made and their pixel-steps (width × height × steps ÷ 1e6).
    pub fn images(&self, images: usize, pixel_steps: f64) {
        let mut f = self.fields();
        f.images = images;
        f.pixel_steps = pixel_steps;
    }

    /// Records that the request's compute began at `at`.
    pub fn compute_started(&self, at: Instant) {
        let mut f = self.fields();
        f.queue = Some(at.saturating_duration_since(self.0.started));
        f.compute_started = Some(at);
    }

    /// Marks the response as a stream, which has not reached its end yet.
    pub fn streaming(&self) {
        self.fields().stream = Some((false, None));
    }

    /// The stream reached its end; `error` is the status of the error it
    /// ended with, if it did.
    pub fn stream_ended(&self, error: Option<u16>) {
        self.fields().stream = Some((true, error));
    }

    /// The usage record of a metered request, if this is one.
    fn usage(&self, f: &Fields, status: u16) -> Option<(Arc<Principal>, UsageRecord)> {
        // Requests turned away before naming a model used nothing.
        let key = f.key.clone()?;
        let (model, version) = match &f.served {
            Some((id, version)) => (id.clone(), version.clone()),
            None => (f.model.clone()?, None),
        };
        let endpoint = super::auth::METERED.iter().find(|p| **p == self.0.path)?;
        let compute = f.compute_started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let record = UsageRecord {
            ts_ms: crate::tenancy::now_ms(),
            request_id: self.0.id.clone(),
            key: key.name.to_string(),
            model,
            version,
            endpoint: endpoint.to_string(),
            status,
            prompt_tokens: f.prompt_tokens as u64,
            completion_tokens: f.completion_tokens as u64,
            cached_tokens: 0,
            embedding_tokens: f.embedding_tokens as u64,
            images: f.images as u64,
            pixel_steps: f.pixel_steps,
            compute_seconds: compute,
            queue_seconds: f
                .queue
                .unwrap_or_else(|| self.0.started.elapsed())
                .as_secs_f64(),
        };
        Some((key, record))
    }

    /// Writes the line now (once).
    fn finish(&self, note: &str) {
        if self.0.done.swap(true, Ordering::SeqCst) {
            return;
        }
        let f = self.fields();
        // 499: the client closed the connection before a response was sent.
        let status = match (
            *self.0.status.lock().unwrap_or_else(|e| e.into_inner()),
            f.stream,
        ) {
            (0, _) | (_, Some((false, _))) => 499,
            (_, Some((true, Some(error)))) => error,
            (s, _) => s,
        };
        if let Some((key, record)) = self.usage(&f, status) {
            self.0.tenancy.record(&key, record);
        }
        if let Some((id, Some(version))) = &f.served {
            // A full queue is the version's capacity, not the client's fault.
            let outcome = crate::registry::Outcome {
                error: status >= 500 || status == 429,
                client_error: (400..500).contains(&status) && status != 429 && status != 499,
                cancelled: status == 499,
                ttft: f
                    .first_token
                    .map(|t| t.saturating_duration_since(self.0.started)),
                latency: self.0.started.elapsed(),
                prompt_tokens: f.prompt_tokens as u64,
                completion_tokens: f.completion_tokens as u64,
                embedding_tokens: f.embedding_tokens as u64,
            };
            let traffic = crate::metrics::Traffic::Primary;
            self.0.registry.observe(id, version, traffic, &outcome);
        }
        let latency_ms = self.0.started.elapsed().as_secs_f64() * 1e3;
        self.0
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint(&self.0.path).to_string(),
                model: f.model.clone().unwrap_or_default(),
                status: status.to_string(),
            })
            .inc();
        let quiet = self.0.path.starts_with("/health") || self.0.path.starts_with("/v2/health");
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    request_id = %self.0.id,
                    method = %self.0.method,
                    path = %self.0.path,
                    status,
                    model = f.model.as_deref().unwrap_or("-"),
                    user = f.user.as_deref().unwrap_or("-"),
                    prompt_tokens = f.prompt_tokens,
                    completion_tokens = f.completion_tokens,
                    latency_ms = format_args!("{latency_ms:.1}"),
                    "{note}"
                )
            };
        }
        if quiet {
            line!(debug);
        } else {
            line!(info);
        }
    }

    /// A guard that writes the line when dropped: at the end of a stream,
    /// or when the client disconnects mid-stream.
    pub fn finish_on_drop(&self) -> FinishOnDrop {
        FinishOnDrop {
            log: self.clone(),
            note: "request (stream ended)",
            armed: true,
        }
    }
}

/// See [`RequestLog::finish_on_drop`].
pub struct FinishOnDrop {
    log: RequestLog,
    note: &'static str,
    armed: bool,
}

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.log.finish(self.note);
        }
    }
}

/// Middleware: assigns the request id, lets handlers fill in the record,
/// and logs the line (or leaves it to a streaming body).
pub async fn log_requests(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_string);
    let log = RequestLog(Arc::new(Inner {
        id: id.clone(),
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        started: Instant::now(),
        status: Mutex::new(0),
        fields: Mutex::new(Fields::default()),
        done: AtomicBool::new(false),
        metrics: state.registry.metrics().clone(),
        tenancy: state.tenancy.clone(),
        registry: state.registry.clone(),
    }));
    req.extensions_mut().insert(log.clone());
    // Written if the client disconnects before the handler answers.
    let mut abandoned = FinishOnDrop {
        log: log.clone(),
        note: "request (client disconnected)",
        armed: true,
    };
    let scope: Arc<str> = Arc::from(id.as_str());
    // Every line logged while handling the request names it (the JSON log
    // format shows the span's fields).
    let span = tracing::info_span!("request", request_id = %id);
    let mut resp = REQUEST_ID
        .scope(
            scope.clone(),
            tracing::Instrument::instrument(next.run(req), span),
        )
        .await;
    abandoned.armed = false;
    let status: StatusCode = resp.status();
    *log.0.status.lock().unwrap_or_else(|e| e.into_inner()) = status.as_u16();
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    if let Some(v) = log.version().and_then(|v| HeaderValue::from_str(&v).ok()) {
        resp.headers_mut()
            .insert(super::versions::VERSION_HEADER, v);
    }
    if resp.extensions().get::<Deferred>().is_none() {
        log.finish("request");
        return resp;
    }
    // A stream: its errors are made while it is polled, later.
    let (parts, body) = resp.into_parts();
    let inner = body.into_data_stream();
    Response::from_parts(parts, Body::from_stream(Scoped { id: scope, inner }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineError;
    use crate::http::error::ApiError;

    #[tokio::test]
    async fn a_failure_inside_the_daemon_shows_the_request_id_not_the_detail() {
        let e = REQUEST_ID
            .scope(Arc::from("req-42"), async {
                ApiError::from(EngineError::Compute("shape mismatch in matmul".into()))
            })
            .await;
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.message, "internal error (request id req-42)");
        assert_eq!(ApiError::internal().message, "internal error");
    }
}
