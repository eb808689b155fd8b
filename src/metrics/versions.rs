//! Signals per model version, for comparing a canary with its baseline:
//! requests by outcome, time to first token, latency and tokens, each
//! labelled by id and version and by whether the traffic was served or
//! mirrored; plus route weights, rollbacks and manifest reloads.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{latency_histogram, FloatGauge, Histograms};

/// Whether a request was served to its client or mirrored to a shadow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Traffic {
    /// Routed and answered.
    Primary,
    /// A copy whose answer was discarded.
    Shadow,
}

impl Traffic {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Shadow => "shadow",
        }
    }
}

/// `model`, `version`, `traffic` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    /// The model id.
    pub model: String,
    /// The version.
    pub version: String,
    /// `primary` or `shadow`.
    pub traffic: String,
}

/// `model`, `version`, `traffic`, `outcome` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionOutcomeLabels {
    /// The model id.
    pub model: String,
    /// The version.
    pub version: String,
    /// `primary` or `shadow`.
    pub traffic: String,
    /// `ok`, `error` (the server's fault) or `client_error`.
    pub outcome: String,
}

/// `model`, `version`, `kind` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionTokenLabels {
    /// The model id.
    pub model: String,
    /// The version.
    pub version: String,
    /// `prompt`, `completion` or `embedding`.
    pub kind: String,
}

/// `model`, `version` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The model id.
    pub model: String,
    /// The version.
    pub version: String,
}

/// `model`, `trigger` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RollbackLabels {
    /// The model id.
    pub model: String,
    /// `guard` (automatic) or `admin`.
    pub trigger: String,
}

/// `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok` or `refused`.
    pub outcome: String,
}

/// The version families.
#[derive(Clone)]
pub struct VersionMetrics {
    /// Requests per version, by outcome.
    pub requests: Family<VersionOutcomeLabels, Counter>,
    /// Time to first token per version.
    pub time_to_first_token: Histograms<VersionLabels>,
    /// End-to-end request latency per version.
    pub latency: Histograms<VersionLabels>,
    /// Tokens per version and kind (served traffic).
    pub tokens: Family<VersionTokenLabels, Counter>,
    /// Each version's share of its id's traffic, in percent.
    pub route_weight: Family<RouteLabels, FloatGauge>,
    /// Rollbacks, by trigger.
    pub rollbacks: Family<RollbackLabels, Counter>,
    /// Manifest files read by a reload, by outcome.
    pub manifest_reloads: Family<OutcomeLabel, Counter>,
}

impl Default for VersionMetrics {
    fn default() -> Self {
        let hist = || Histograms::new_with_constructor(latency_histogram as fn() -> Histogram);
        Self {
            requests: Family::default(),
            time_to_first_token: hist(),
            latency: hist(),
            tokens: Family::default(),
            route_weight: Family::default(),
            rollbacks: Family::default(),
            manifest_reloads: Family::default(),
        }
    }
}

impl VersionMetrics {
    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "kindling_version_requests",
            "Requests per model version, by traffic (primary, shadow) and outcome (ok, error, client_error)",
            self.requests.clone(),
        );
        r.register(
            "kindling_version_time_to_first_token_seconds",
            "Time to first token per model version and traffic",
            self.time_to_first_token.clone(),
        );
        r.register(
            "kindling_version_request_duration_seconds",
            "End-to-end request latency per model version and traffic",
            self.latency.clone(),
        );
        r.register(
            "kindling_version_tokens",
            "Tokens of served requests per model version, by kind (prompt, completion, embedding)",
            self.tokens.clone(),
        );
        r.register(
            "kindling_route_weight_percent",
            "Each version's share of its model id's requests",
            self.route_weight.clone(),
        );
        r.register(
            "kindling_route_rollbacks",
            "Route rollbacks, by trigger (guard: automatic, admin)",
            self.rollbacks.clone(),
        );
        r.register(
            "kindling_manifest_reloads",
            "Manifest files read by reloads, by outcome (ok, refused)",
            self.manifest_reloads.clone(),
        );
    }
}
