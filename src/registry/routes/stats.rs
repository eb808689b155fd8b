//! Recent outcomes per version, kept over a sliding window: what the
//! canary comparison shows and what a route's guard judges.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::config::GuardSpec;
use crate::metrics::Traffic;

/// Samples kept per version and traffic, at most.
const MAX_SAMPLES: usize = 20_000;

/// How one request to a version went.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The server's fault (5xx, or a stream that ended in an error).
    pub error: bool,
    /// The client's mistake (4xx but 429): counted, but never held against
    /// the version.
    pub client_error: bool,
    /// The client left before the end: its latency counts, as no error.
    pub cancelled: bool,
    /// Arrival to first token (text generation).
    pub ttft: Option<Duration>,
    /// Arrival to the end of the response.
    pub latency: Duration,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Embedding input tokens.
    pub embedding_tokens: u64,
}

struct Sample {
    at: Instant,
    error: bool,
    ttft: Option<f64>,
    latency: f64,
}

/// A version's figures over a window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Figures {
    /// Requests judged (client errors left out).
    pub requests: usize,
    /// Of which the server failed.
    pub errors: usize,
    /// `errors / requests` (0 without requests).
    pub error_rate: f64,
    /// Time to first token, seconds.
    pub ttft_p50: Option<f64>,
    /// Time to first token, seconds.
    pub ttft_p95: Option<f64>,
    /// End-to-end latency, seconds.
    pub latency_p50: Option<f64>,
    /// End-to-end latency, seconds.
    pub latency_p95: Option<f64>,
}

fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Sliding windows of outcomes, by (id, version, traffic).
#[derive(Default)]
pub struct Windows {
    samples: HashMap<(String, String, Traffic), VecDeque<Sample>>,
}

impl Windows {
    /// Records an outcome; drops samples older than `keep`.
    pub fn record(
        &mut self,
        id: &str,
        version: &str,
        traffic: Traffic,
        o: &Outcome,
        keep: Duration,
    ) {
        if o.client_error {
            return;
        }
        let q = self
            .samples
            .entry((id.to_string(), version.to_string(), traffic))
            .or_default();
        let now = Instant::now();
        while q
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.at) > keep)
            || q.len() >= MAX_SAMPLES
        {
            q.pop_front();
        }
        q.push_back(Sample {
            at: now,
            error: o.error,
            ttft: o.ttft.map(|d| d.as_secs_f64()),
            latency: o.latency.as_secs_f64(),
        });
    }

    /// A version's figures over the last `window`.
    pub fn figures(&self, id: &str, version: &str, traffic: Traffic, window: Duration) -> Figures {
        let now = Instant::now();
        let recent: Vec<&Sample> = self
            .samples
            .get(&(id.to_string(), version.to_string(), traffic))
            .map(|q| {
                q.iter()
                    .filter(|s| now.saturating_duration_since(s.at) <= window)
                    .collect()
            })
            .unwrap_or_default();
        let errors = recent.iter().filter(|s| s.error).count();
        let mut ttft: Vec<f64> = recent.iter().filter_map(|s| s.ttft).collect();
        ttft.sort_by(f64::total_cmp);
        let mut latency: Vec<f64> = recent.iter().map(|s| s.latency).collect();
        latency.sort_by(f64::total_cmp);
        Figures {
            requests: recent.len(),
            errors,
            error_rate: if recent.is_empty() {
                0.0
            } else {
                errors as f64 / recent.len() as f64
            },
            ttft_p50: quantile(&ttft, 0.5),
            ttft_p95: quantile(&ttft, 0.95),
            latency_p50: quantile(&latency, 0.5),
            latency_p95: quantile(&latency, 0.95),
        }
    }

    /// Forgets a version (a rollback starts its record afresh).
    pub fn forget(&mut self, id: &str, version: &str) {
        self.samples
            .retain(|(i, v, _), _| !(i == id && v == version));
    }
}

/// Why a guard trips on `canary` against `baseline`, if it does.
pub fn judge(guard: &GuardSpec, canary: &Figures, baseline: &Figures) -> Option<String> {
    if (canary.requests as u64) < guard.min_requests {
        return None;
    }
    if let Some(max) = guard.max_error_rate_increase {
        if canary.error_rate > baseline.error_rate + max {
            return Some(format!(
                "error rate {:.1}% over {} requests, baseline {:.1}% (+{:.1} points allowed)",
                canary.error_rate * 100.0,
                canary.requests,
                baseline.error_rate * 100.0,
                max * 100.0
            ));
        }
    }
    let ratios = [
        (
            "p95 time to first token",
            guard.max_ttft_ratio,
            canary.ttft_p95,
            baseline.ttft_p95,
        ),
        (
            "p95 latency",
            guard.max_latency_ratio,
            canary.latency_p95,
            baseline.latency_p95,
        ),
    ];
    for (what, max, c, b) in ratios {
        if let (Some(max), Some(c), Some(b)) = (max, c, b) {
            if b > 0.0 && c > b * max {
                return Some(format!(
                    "{what} {:.3}s is {:.2}x the baseline's {:.3}s (at most {max}x allowed)",
                    c,
                    c / b,
                    b
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(error: bool, ttft_ms: u64) -> Outcome {
        Outcome {
            error,
            ttft: Some(Duration::from_millis(ttft_ms)),
            latency: Duration::from_millis(ttft_ms * 2),
            ..Outcome::default()
        }
    }

    #[test]
    fn figures_and_the_guard() {
        let mut w = Windows::default();
        let keep = Duration::from_secs(60);
        for i in 0..40 {
            w.record("m", "v1", Traffic::Primary, &outcome(i == 0, 100), keep);
        }
        for i in 0..10 {
            w.record(
                "m",
                "v2",
                Traffic::Primary,
                &outcome(i < 3, 100 + i * 100),
                keep,
            );
        }
        let client = Outcome {
            client_error: true,
            ..Outcome::default()
        };
        w.record("m", "v2", Traffic::Primary, &client, keep);
        let window = Duration::from_secs(60);
        let base = w.figures("m", "v1", Traffic::Primary, window);
        let canary = w.figures("m", "v2", Traffic::Primary, window);
        assert_eq!((base.requests, base.errors), (40, 1));
        assert_eq!((canary.requests, canary.errors), (10, 3));
        assert_eq!(canary.ttft_p50, Some(0.5));
        assert_eq!(canary.ttft_p95, Some(1.0));
        let guard = |rate, ttft, min| GuardSpec {
            max_error_rate_increase: rate,
            max_ttft_ratio: ttft,
            max_latency_ratio: None,
            window,
            min_requests: min,
        };
        assert!(judge(&guard(Some(0.1), None, 10), &canary, &base)
            .unwrap()
            .contains("error rate 30.0%"));
        assert_eq!(judge(&guard(Some(0.3), None, 10), &canary, &base), None);
        assert_eq!(
            judge(&guard(Some(0.1), None, 11), &canary, &base),
            None,
            "too few requests"
        );
        assert!(judge(&guard(None, Some(5.0), 5), &canary, &base)
            .unwrap()
            .contains("time to first token"));
        assert_eq!(judge(&guard(None, Some(20.0), 5), &canary, &base), None);
        w.forget("m", "v2");
        assert_eq!(w.figures("m", "v2", Traffic::Primary, window).requests, 0);
    }
}
