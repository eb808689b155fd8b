//! The connection edge: accepting, timeouts, refusing oversized bodies
//! before they are read, and the drain.
//!
//! - Headers must arrive within the read timeout, and a body within the
//!   read timeout too (else 408); a body whose `Content-Length` is over
//!   `max_body_size` is refused with 413 before a byte of it is read, and
//!   the connection is closed.
//! - On shutdown the listener closes, idle keep-alive connections close at
//!   once, bodies still being uploaded are cut off with 503, and only
//!   requests being served are waited for, up to the grace period.
//! - Responses go out without Nagle's delay (`TCP_NODELAY`): a stream of
//!   small server-sent events must not wait for the client's ACKs.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use super::error::ApiError;
use super::AppState;

/// Whether the daemon is draining, shared by every handler.
#[derive(Clone)]
pub struct Drain(Arc<watch::Sender<bool>>);

impl Default for Drain {
    fn default() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }
}

impl Drain {
    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Begins the drain.
    pub fn begin(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once shutdown has begun.
    pub async fn begun(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }
}

/// Refuses a request whose declared body is over the limit before reading
/// it, and closes the connection (the client may already be sending it).
pub async fn refuse_oversized(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_size) {
        let mut resp = ApiError::too_large(state.max_body_size).into_response();
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    next.run(req).await
}

/// Reads a request body (through `read`) within the read timeout, giving
/// up at once if the drain begins: a stalled upload must not hold the
/// shutdown.
pub async fn read_body<T>(
    state: &AppState,
    read: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::select! {
        read = tokio::time::timeout(state.read_timeout, read) => match read {
            Ok(result) => result,
            Err(_) => Err(ApiError::body_timeout(state.read_timeout)),
        },
        () = state.drain.begun() => Err(ApiError::shutting_down()),
    }
}

/// Serves until `shutdown` resolves, then drains: no new connections, idle
/// ones closed at once, in-flight requests given up to `grace`.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let drain = state.drain.clone();
    let read_timeout = state.read_timeout;
    let app: Router = super::router(state);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(app.oneshot(req.map(Body::new)).await.into_response()) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drain.begin();
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "shutting down: no new connections, draining in-flight requests"
    );
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown grace period over; closing the remaining connections");
        }
    }
    Ok(())
}
