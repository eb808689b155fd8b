//! `[routes."<id>"]` in `kindling.toml`, and the same shape in the admin
//! API's `PUT /admin/routes/{id}`: how an id's traffic is split over its
//! versions, which version gets a mirrored share, and when a canary is
//! rolled back by itself.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ModelManifest;

/// One id's route.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Percent of the id's requests per version; they add up to 100.
    pub weights: BTreeMap<String, f64>,
    /// Mirror a share of the requests to a version whose answers are
    /// discarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSpec>,
    /// Roll back a canary that does worse than the baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardSpec>,
}

/// `shadow = { version = "v3", percent = 20 }`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSpec {
    /// The version the copies go to.
    pub version: String,
    /// Percent of the id's requests copied (default 100).
    #[serde(default = "hundred")]
    pub percent: f64,
}

fn hundred() -> f64 {
    100.0
}

/// `guard = { max_error_rate_increase = 0.05, max_ttft_ratio = 2.0, … }`:
/// over the last `window`, once a canary has `min_requests`, it is rolled
/// back when its error rate exceeds the baseline's by more than
/// `max_error_rate_increase`, or its p95 time to first token (or p95
/// latency) exceeds the baseline's times the ratio.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GuardSpec {
    /// Largest tolerated error-rate excess over the baseline (0.05 = five
    /// points).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate_increase: Option<f64>,
    /// Largest tolerated ratio of p95 time to first token, canary over
    /// baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ttft_ratio: Option<f64>,
    /// Largest tolerated ratio of p95 end-to-end latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_ratio: Option<f64>,
    /// The window the rates and percentiles are taken over (default 5m).
    #[serde(
        default = "default_window",
        serialize_with = "ser_duration",
        deserialize_with = "de_duration"
    )]
    pub window: Duration,
    /// Requests the canary must have served in the window before the guard
    /// judges it (default 20).
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
}

fn default_window() -> Duration {
    Duration::from_secs(300)
}

fn default_min_requests() -> u64 {
    20
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    super::units::duration::deserialize(d)
}

impl RouteSpec {
    /// Checks the numbers (which versions exist is the registry's to say).
    pub fn check(&self) -> Result<(), String> {
        if self.weights.is_empty() {
            return Err("weights: expected at least one version".into());
        }
        for (v, w) in &self.weights {
            if !w.is_finite() || *w < 0.0 || *w > 100.0 {
                return Err(format!(
                    "weights.{v}: expected a percent from 0 to 100, got {w}"
                ));
            }
        }
        let sum: f64 = self.weights.values().sum();
        if (sum - 100.0).abs() > 1e-6 {
            return Err(format!(
                "weights: expected percents adding up to 100, got {sum}"
            ));
        }
        if let Some(s) = &self.shadow {
            if !s.percent.is_finite() || s.percent <= 0.0 || s.percent > 100.0 {
                return Err(format!(
                    "shadow.percent: expected more than 0 and at most 100, got {}",
                    s.percent
                ));
            }
        }
        if let Some(g) = &self.guard {
            if g.max_error_rate_increase.is_none()
                && g.max_ttft_ratio.is_none()
                && g.max_latency_ratio.is_none()
            {
                return Err("guard: expected at least one of max_error_rate_increase, max_ttft_ratio, max_latency_ratio".into());
            }
            if let Some(x) = g
                .max_error_rate_increase
                .filter(|x| !x.is_finite() || !(0.0..=1.0).contains(x))
            {
                return Err(format!(
                    "guard.max_error_rate_increase: expected 0 to 1, got {x}"
                ));
            }
            for (name, r) in [
                ("max_ttft_ratio", g.max_ttft_ratio),
                ("max_latency_ratio", g.max_latency_ratio),
            ] {
                if let Some(r) = r.filter(|r| !r.is_finite() || *r < 1.0) {
                    return Err(format!("guard.{name}: expected at least 1, got {r}"));
                }
            }
            if g.min_requests == 0 {
                return Err("guard.min_requests: expected at least 1".into());
            }
            if g.window.is_zero() {
                return Err("guard.window: expected a duration like \"5m\"".into());
            }
        }
        Ok(())
    }
}

/// Checks `route` for `id` against the declared versions.
pub fn check_route(
    models: &BTreeMap<String, ModelManifest>,
    id: &str,
    route: &RouteSpec,
) -> std::result::Result<(), String> {
    route.check()?;
    let versions: Vec<&str> = models
        .values()
        .filter(|m| m.id == id)
        .filter_map(|m| m.version.as_deref())
        .collect();
    if versions.is_empty() {
        return Err(format!("weights: no manifest declares versions of `{id}`"));
    }
    let named = route
        .weights
        .keys()
        .map(|v| ("weights", v))
        .chain(route.shadow.iter().map(|s| ("shadow.version", &s.version)));
    for (field, v) in named {
        if !versions.contains(&v.as_str()) {
            return Err(format!(
                "{field}: `{id}` has no version `{v}` (known: {})",
                versions.join(", ")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_from_toml_and_json_and_are_checked() {
        let r: RouteSpec = toml::from_str(
            "weights = { v1 = 90, v2 = 10 }\nshadow = { version = \"v3\" }\nguard = { max_error_rate_increase = 0.05, window = \"2m\" }\n",
        )
        .unwrap();
        assert_eq!(r.weights["v1"], 90.0);
        assert_eq!(r.shadow.as_ref().unwrap().percent, 100.0);
        let g = r.guard.as_ref().unwrap();
        assert_eq!((g.window, g.min_requests), (Duration::from_secs(120), 20));
        r.check().unwrap();
        let json = serde_json::to_string(&r).unwrap();
        let back: RouteSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let bad = |j: &str| {
            serde_json::from_str::<RouteSpec>(j)
                .map_err(|e| e.to_string())
                .and_then(|r| r.check())
                .unwrap_err()
        };
        assert!(bad(r#"{"weights":{"v1":90}}"#).contains("adding up to 100"));
        assert!(bad(r#"{"weights":{"v1":-10,"v2":110}}"#).contains("weights.v1"));
        assert!(bad(r#"{"weights":{}}"#).contains("at least one"));
        assert!(bad(r#"{"weights":{"v1":100},"colour":1}"#).contains("colour"));
        assert!(bad(r#"{"weights":{"v1":100},"guard":{}}"#).contains("at least one of"));
        assert!(
            bad(r#"{"weights":{"v1":100},"guard":{"max_ttft_ratio":0.5}}"#)
                .contains("max_ttft_ratio")
        );
        assert!(
            bad(r#"{"weights":{"v1":100},"shadow":{"version":"v2","percent":0}}"#)
                .contains("shadow.percent")
        );
    }
}
