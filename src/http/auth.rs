//! Who is calling: the key from `Authorization: Bearer …` or `x-api-key`,
//! checked against the tenancy room's keys; admin routes need the admin
//! scope; inference routes go through the key's rate limits, and every
//! response to them carries OpenAI's `x-ratelimit-*` headers.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::log::RequestLog;
use super::AppState;
use crate::tenancy::{Limited, RateState};

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Health probes: no key.
    Open,
    /// `/metrics`: a key only if the config says so.
    Metrics,
    /// `/admin/*`: an admin key.
    Admin,
    /// Model calls: a key, under its limits.
    Metered,
    /// Everything else (`/v1/models`, unknown paths): a key.
    Keyed,
}

/// Routes whose calls are metered and rate-limited.
pub const METERED: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/images/generations",
];

/// Sleep and wake (vLLM's paths), admin-only.
const SLEEP_ROUTES: [&str; 3] = ["/sleep", "/wake_up", "/is_sleeping"];

fn access(path: &str) -> Access {
    if path.starts_with("/health/") || path.starts_with("/v2/health/") {
        Access::Open
    } else if path == "/metrics" {
        Access::Metrics
    } else if path == "/admin" || path.starts_with("/admin/") || SLEEP_ROUTES.contains(&path) {
        Access::Admin
    } else if METERED.contains(&path) {
        Access::Metered
    } else {
        Access::Keyed
    }
}

/// The secret a request carries, if any.
fn secret(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?.trim();
        let (scheme, token) = v.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// OpenAI's reset format: `1s`, `6m0s`, `1h2m3s`, or `250ms`.
fn reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

fn rate_headers(resp: &mut Response, state: &RateState) {
    let h = resp.headers_mut();
    for (what, slot) in [("requests", state.requests), ("tokens", state.tokens)] {
        let Some((limit, remaining, until_full)) = slot else {
            continue;
        };
        for (name, value) in [
            ("limit", limit.to_string()),
            ("remaining", remaining.to_string()),
            ("reset", reset(until_full)),
        ] {
            if let (Ok(n), Ok(v)) = (
                axum::http::HeaderName::try_from(format!("x-ratelimit-{name}-{what}")),
                HeaderValue::from_str(&value),
            ) {
                h.insert(n, v);
            }
        }
    }
}

/// Middleware: authenticates, checks the scope, applies the key's limits.
pub async fn authorize(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let access = access(req.uri().path());
    let tenancy = &state.tenancy;
    if access == Access::Open || (access == Access::Metrics && !tenancy.metrics_need_key()) {
        return next.run(req).await;
    }
    let key = match tenancy.authenticate(secret(req.headers())) {
        Ok(k) => k,
        Err(denied) => return ApiError::from(denied).into_response(),
    };
    if let Some(log) = req.extensions().get::<RequestLog>() {
        log.key(key.clone());
    }
    if access == Access::Admin && !key.is_admin() {
        return ApiError::forbidden("this API key lacks the admin scope").into_response();
    }
    let rate = if access == Access::Metered {
        if let Err(e) = super::sleep::gate(&state).await {
            return e.into_response();
        }
        match tenancy.admit(&key) {
            Ok(rate) => Some(rate),
            Err(limited) => {
                let state = match &limited {
                    Limited::Requests { state, .. } | Limited::Tokens { state, .. } => {
                        Some(state.clone())
                    }
                    Limited::Quota { .. } => None,
                };
                let mut resp = ApiError::from(limited).into_response();
                if let Some(s) = state {
                    rate_headers(&mut resp, &s);
                }
                return resp;
            }
        }
    } else {
        None
    };
    req.extensions_mut().insert(key);
    let mut resp = next.run(req).await;
    if let Some(rate) = rate {
        rate_headers(&mut resp, &rate);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_either_header_and_resets_read_like_openais() {
        let mut h = HeaderMap::new();
        assert_eq!(secret(&h), None);
        h.insert("x-api-key", HeaderValue::from_static(" k1 "));
        assert_eq!(secret(&h), Some("k1"));
        h.insert("authorization", HeaderValue::from_static("Bearer k2"));
        assert_eq!(secret(&h), Some("k2"));
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(secret(&h), None, "a non-Bearer Authorization is no key");
        assert_eq!(reset(Duration::from_millis(250)), "250ms");
        assert_eq!(reset(Duration::from_millis(6500)), "7s");
        assert_eq!(reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(access("/health/ready"), Access::Open);
        assert_eq!(access("/admin/usage"), Access::Admin);
        assert_eq!(access("/v1/embeddings"), Access::Metered);
        assert_eq!(access("/v1/models"), Access::Keyed);
        assert_eq!(access("/wake_up"), Access::Admin);
        assert_eq!(access("/admin/routes/chat/promote"), Access::Admin);
        assert_eq!(access("/admin/reload"), Access::Admin);
    }
}
