//! `GET /admin/routes/{id}/compare`: each candidate's figures next to the
//! baseline's over a window, and what the route's guard would say now.

use std::time::Duration;

use serde::Serialize;

use super::stats::Figures;
use super::{baseline, judge_version, lock, Routes, DEFAULT_WINDOW};
use crate::config::GuardSpec;
use crate::metrics::Traffic;

/// A canary's figures against the baseline's.
#[derive(Debug, Clone, Serialize)]
pub struct VersionComparison {
    /// The version.
    pub version: String,
    /// Its share of the traffic, percent.
    pub weight: f64,
    /// Its figures.
    pub figures: Figures,
    /// Error rate minus the baseline's.
    pub error_rate_delta: f64,
    /// p95 time to first token over the baseline's.
    pub ttft_p95_ratio: Option<f64>,
    /// p95 latency over the baseline's.
    pub latency_p95_ratio: Option<f64>,
}

/// `GET /admin/routes/{id}/compare`.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The model id.
    pub id: String,
    /// The window the figures cover.
    pub window_seconds: f64,
    /// The version with the largest share.
    pub baseline: VersionComparison,
    /// The other versions with a share.
    pub candidates: Vec<VersionComparison>,
    /// The mirrored version's figures (its answers were discarded).
    pub shadow: Option<VersionComparison>,
    /// The guard, and what it would say now.
    pub guard: Option<GuardSpec>,
    /// Why the guard would trip on a candidate now, if it would.
    pub verdict: Option<String>,
}

fn ratio(c: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (c, b) {
        (Some(c), Some(b)) if b > 0.0 => Some(c / b),
        _ => None,
    }
}

impl Routes {
    /// Canary against baseline over `window` (default: the guard's, or 5m).
    pub fn compare(&self, id: &str, versions: &[String], window: Option<Duration>) -> Comparison {
        let spec = self.spec(id);
        let guard = spec.as_ref().and_then(|s| s.guard.clone());
        let window = window
            .or(guard.as_ref().map(|g| g.window))
            .unwrap_or(DEFAULT_WINDOW);
        let weights = Self::weights(spec.as_ref(), versions);
        let base = baseline(&weights)
            .map(|(v, w)| (v.clone(), *w))
            .unwrap_or_default();
        let w = lock(&self.windows);
        let base_figures = w.figures(id, &base.0, Traffic::Primary, window);
        let against = |version: &str, weight: f64, figures: Figures| VersionComparison {
            version: version.to_string(),
            weight,
            error_rate_delta: figures.error_rate - base_figures.error_rate,
            ttft_p95_ratio: ratio(figures.ttft_p95, base_figures.ttft_p95),
            latency_p95_ratio: ratio(figures.latency_p95, base_figures.latency_p95),
            figures,
        };
        let candidates = weights
            .iter()
            .filter(|(v, _)| *v != base.0)
            .map(|(v, wt)| against(v, *wt, w.figures(id, v, Traffic::Primary, window)))
            .collect();
        let shadow = spec.as_ref().and_then(|s| s.shadow.as_ref()).map(|s| {
            against(
                &s.version,
                0.0,
                w.figures(id, &s.version, Traffic::Shadow, window),
            )
        });
        let verdict = spec.as_ref().and_then(|s| {
            weights
                .iter()
                .filter(|(v, wt)| *v != base.0 && *wt > 0.0)
                .find_map(|(v, _)| {
                    judge_version(&w, id, s, &weights, v).map(|r| format!("version `{v}`: {r}"))
                })
        });
        let baseline = against(&base.0, base.1, base_figures.clone());
        Comparison {
            id: id.to_string(),
            window_seconds: window.as_secs_f64(),
            baseline,
            candidates,
            shadow,
            guard,
            verdict,
        }
    }
}
