//! Prometheus metrics shared by the rooms: each room records its own events
//! here; `GET /metrics` renders them in the OpenMetrics text format.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

mod versions;
pub use versions::{
    OutcomeLabel, RollbackLabels, RouteLabels, Traffic, VersionLabels, VersionMetrics,
    VersionOutcomeLabels, VersionTokenLabels,
};

/// `model` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    /// The model id.
    pub model: String,
}

/// `model`, `state` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelStateLabels {
    /// The model id.
    pub model: String,
    /// `cold`, `downloading`, `loading`, `warm`, `busy`, `draining` or `failed`.
    pub state: String,
}

/// `model`, `outcome` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoadLabels {
    /// The model id.
    pub model: String,
    /// `ok` or `failed`.
    pub outcome: String,
}

/// `model`, `reason` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvictionLabels {
    /// The model id.
    pub model: String,
    /// `idle_expired`, `memory_pressure` or `admin`.
    pub reason: String,
}

/// `endpoint`, `model`, `status` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route, e.g. `/v1/chat/completions`.
    pub endpoint: String,
    /// The model id (empty when none applies).
    pub model: String,
    /// The HTTP status code.
    pub status: String,
}

/// `key`, `model` labels: usage per API key (its name, never its secret).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageLabels {
    /// The key's name.
    pub key: String,
    /// The model id.
    pub model: String,
}

/// `key`, `reason` labels: requests refused by a limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// The key's name.
    pub key: String,
    /// `requests`, `tokens` or `quota`.
    pub reason: String,
}

/// `model_name` label, as vLLM names it (for autoscaler triggers written
/// against vLLM's metrics).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelNameLabel {
    /// The model id.
    pub model_name: String,
}

/// `device` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabel {
    /// The device name, e.g. `cpu`.
    pub device: String,
}

pub(crate) type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

pub(crate) fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

fn token_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

pub(crate) type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric Kindling exports.
pub struct Metrics {
    registry: Registry,
    render_lock: Mutex<()>,
    /// Per-version request signals, routes and reloads.
    pub versions: VersionMetrics,
    /// Model loads by outcome.
    pub loads: Family<LoadLabels, Counter>,
    /// Seconds each successful load took.
    pub load_seconds: Histograms<ModelLabel>,
    /// Unloads by reason.
    pub evictions: Family<EvictionLabels, Counter>,
    /// Finished HTTP requests.
    pub requests: Family<RequestLabels, Counter>,
    /// Seconds from a generation request's arrival to its first token.
    pub time_to_first_token: Histograms<ModelLabel>,
    /// Models whose weights are in memory (set when rendering).
    pub resident_models: Gauge,
    /// Each device's budget (set when rendering).
    pub device_budget: Family<DeviceLabel, Gauge>,
    /// Bytes charged against each device (set when rendering).
    pub device_used: Family<DeviceLabel, Gauge>,
    /// Each model's estimate (set when rendering).
    pub model_estimated: Family<ModelLabel, Gauge>,
    /// Each model's measured footprint (set when rendering).
    pub model_measured: Family<ModelLabel, Gauge>,
    /// Requests waiting in each model's queue (set when rendering).
    pub queue_depth: Family<ModelLabel, Gauge>,
    /// Requests holding each model (set when rendering).
    pub in_flight: Family<ModelLabel, Gauge>,
    /// Seconds between successive tokens of one choice.
    pub inter_token_latency: Histograms<ModelLabel>,
    /// Prompt tokens of requests that started.
    pub prompt_tokens: Family<ModelLabel, Counter>,
    /// Tokens generated, counted as choices finish.
    pub generation_tokens: Family<ModelLabel, Counter>,
    /// Sequences in each model's batch (set when rendering).
    pub batch_running: Family<ModelLabel, Gauge>,
    /// Forward passes run by each loaded model's worker.
    pub batch_steps: Family<ModelLabel, Gauge>,
    /// KV cache blocks in use per model (set when rendering).
    pub kv_blocks_used: Family<ModelLabel, Gauge>,
    /// KV cache blocks per model (set when rendering).
    pub kv_blocks_total: Family<ModelLabel, Gauge>,
    /// KV cache blocks holding a cached prompt prefix (set when rendering).
    pub prefix_cached_blocks: Family<ModelLabel, Gauge>,
    /// Share of looked-up prompt tokens found in the prefix cache since load.
    pub prefix_hit_rate: Family<ModelLabel, FloatGauge>,
    /// vLLM's names: prompt tokens looked up in the prefix cache, and found.
    pub vllm_prefix_queries: Family<ModelNameLabel, Gauge>,
    pub vllm_prefix_hits: Family<ModelNameLabel, Gauge>,
    /// Prompt-lookup draft tokens verified and accepted since load, and
    /// the accepted share (set when rendering).
    pub spec_drafted: Family<ModelLabel, Gauge>,
    pub spec_accepted: Family<ModelLabel, Gauge>,
    pub spec_acceptance_rate: Family<ModelLabel, FloatGauge>,
    /// vLLM's names for the draft and accepted token counts.
    pub vllm_spec_drafted: Family<ModelNameLabel, Gauge>,
    pub vllm_spec_accepted: Family<ModelNameLabel, Gauge>,
    /// 1 for each model's current lifecycle state, 0 for the others.
    pub model_state: Family<ModelStateLabels, Gauge>,
    /// Tokens generated per second over the last ten seconds (set when rendering).
    pub tokens_per_second: Family<ModelLabel, FloatGauge>,
    /// vLLM's name for requests waiting (set when rendering).
    pub vllm_waiting: Family<ModelNameLabel, Gauge>,
    /// vLLM's name for requests running (set when rendering).
    pub vllm_running: Family<ModelNameLabel, Gauge>,
    /// vLLM's name for the KV cache's used share, 0 to 1 (set when rendering).
    pub vllm_kv_usage: Family<ModelNameLabel, FloatGauge>,
    /// This process's resident memory (set when rendering).
    pub process_resident: Gauge,
    /// Requests metered, per key and model.
    pub key_requests: Family<UsageLabels, Counter>,
    /// Prompt and embedding tokens, per key and model.
    pub key_prompt_tokens: Family<UsageLabels, Counter>,
    /// Completion tokens, per key and model.
    pub key_completion_tokens: Family<UsageLabels, Counter>,
    /// Images made, per key and model.
    pub key_images: Family<UsageLabels, Counter>,
    /// Requests refused by a key's limits.
    pub rate_limited: Family<LimitLabels, Counter>,
    /// The level the replica sleeps at (0: awake).
    pub sleep_level: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered, all at zero.
    pub fn new() -> Self {
        Self::with_labels(&[])
    }

    /// Every metric registered, all at zero, each series carrying the
    /// constant `labels` (where the replica runs: service, revision, pod).
    pub fn with_labels(labels: &[(String, String)]) -> Self {
        let mut r = Registry::with_labels(
            labels
                .iter()
                .map(|(k, v)| (k.clone().into(), v.clone().into())),
        );
        let hist = || Histograms::new_with_constructor(latency_histogram as fn() -> Histogram);
        let m = Self {
            loads: Family::default(),
            load_seconds: hist(),
            evictions: Family::default(),
            requests: Family::default(),
            time_to_first_token: hist(),
            resident_models: Gauge::default(),
            device_budget: Family::default(),
            device_used: Family::default(),
            model_estimated: Family::default(),
            model_measured: Family::default(),
            queue_depth: Family::default(),
            in_flight: Family::default(),
            inter_token_latency: Histograms::new_with_constructor(
                token_latency_histogram as fn() -> Histogram,
            ),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            batch_running: Family::default(),
            batch_steps: Family::default(),
            kv_blocks_used: Family::default(),
            kv_blocks_total: Family::default(),
            prefix_cached_blocks: Family::default(),
            prefix_hit_rate: Family::default(),
            vllm_prefix_queries: Family::default(),
            vllm_prefix_hits: Family::default(),
            spec_drafted: Family::default(),
            spec_accepted: Family::default(),
            spec_acceptance_rate: Family::default(),
            vllm_spec_drafted: Family::default(),
            vllm_spec_accepted: Family::default(),
            model_state: Family::default(),
            tokens_per_second: Family::default(),
            vllm_waiting: Family::default(),
            vllm_running: Family::default(),
            vllm_kv_usage: Family::default(),
            process_resident: Gauge::default(),
            key_requests: Family::default(),
            key_prompt_tokens: Family::default(),
            key_completion_tokens: Family::default(),
            key_images: Family::default(),
            rate_limited: Family::default(),
            sleep_level: Gauge::default(),
            versions: VersionMetrics::default(),
            registry: Registry::default(),
            render_lock: Mutex::new(()),
        };
        r.register(
            "kindling_model_loads",
            "Model loads, by outcome",
            m.loads.clone(),
        );
        r.register(
            "kindling_model_load_duration_seconds",
            "Time to load a model, from the first request to ready",
            m.load_seconds.clone(),
        );
        r.register(
            "kindling_model_evictions",
            "Models unloaded, by reason (idle_expired, memory_pressure, admin)",
            m.evictions.clone(),
        );
        r.register(
            "kindling_requests",
            "HTTP requests, by endpoint, model and status",
            m.requests.clone(),
        );
        r.register(
            "kindling_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first token",
            m.time_to_first_token.clone(),
        );
        r.register(
            "kindling_models_resident",
            "Models whose weights are in memory",
            m.resident_models.clone(),
        );
        r.register(
            "kindling_device_memory_budget_bytes",
            "Memory models may use, per device",
            m.device_budget.clone(),
        );
        r.register(
            "kindling_device_memory_used_bytes",
            "Memory charged to models, per device",
            m.device_used.clone(),
        );
        r.register(
            "kindling_model_memory_estimated_bytes",
            "A model's memory estimate from its weight files' headers",
            m.model_estimated.clone(),
        );
        r.register(
            "kindling_model_memory_measured_bytes",
            "A model's footprint measured when it last loaded",
            m.model_measured.clone(),
        );
        r.register(
            "kindling_model_queue_depth",
            "Requests waiting in a model's queue",
            m.queue_depth.clone(),
        );
        r.register(
            "kindling_model_requests_in_flight",
            "Requests holding a model",
            m.in_flight.clone(),
        );
        r.register(
            "kindling_inter_token_latency_seconds",
            "Time between successive tokens of one choice",
            m.inter_token_latency.clone(),
        );
        r.register(
            "kindling_prompt_tokens",
            "Prompt tokens of generation requests that started",
            m.prompt_tokens.clone(),
        );
        r.register(
            "kindling_generation_tokens",
            "Tokens generated (counted as choices finish)",
            m.generation_tokens.clone(),
        );
        r.register(
            "kindling_batch_running_sequences",
            "Sequences in a model's running batch (embeddings: requests in progress)",
            m.batch_running.clone(),
        );
        r.register(
            "kindling_batch_steps",
            "Forward passes (batches) a loaded model's worker has run",
            m.batch_steps.clone(),
        );
        r.register(
            "kindling_model_state",
            "1 for each model's current lifecycle state, 0 for the others",
            m.model_state.clone(),
        );
        r.register(
            "kindling_kv_cache_blocks_used",
            "KV cache blocks in use",
            m.kv_blocks_used.clone(),
        );
        r.register(
            "kindling_kv_cache_blocks",
            "KV cache blocks in a model's pool",
            m.kv_blocks_total.clone(),
        );
        r.register(
            "kindling_prefix_cache_blocks",
            "KV cache blocks holding a cached prompt prefix (reused by requests that start the same way)",
            m.prefix_cached_blocks.clone(),
        );
        r.register(
            "kindling_prefix_cache_hit_rate",
            "Share of prompt tokens found in the prefix cache since the model loaded, 0 to 1",
            m.prefix_hit_rate.clone(),
        );
        r.register(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (vLLM's name)",
            m.vllm_prefix_queries.clone(),
        );
        r.register(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache (vLLM's name)",
            m.vllm_prefix_hits.clone(),
        );
        r.register(
            "kindling_spec_draft_tokens",
            "Prompt-lookup draft tokens verified since the model loaded",
            m.spec_drafted.clone(),
        );
        r.register(
            "kindling_spec_accepted_tokens",
            "Prompt-lookup draft tokens accepted (matching the model's own choice) since the model loaded",
            m.spec_accepted.clone(),
        );
        r.register(
            "kindling_spec_acceptance_rate",
            "Share of prompt-lookup draft tokens accepted since the model loaded, 0 to 1",
            m.spec_acceptance_rate.clone(),
        );
        r.register(
            "vllm:spec_decode_num_draft_tokens",
            "Draft tokens verified (vLLM's name)",
            m.vllm_spec_drafted.clone(),
        );
        r.register(
            "vllm:spec_decode_num_accepted_tokens",
            "Draft tokens accepted (vLLM's name)",
            m.vllm_spec_accepted.clone(),
        );
        r.register(
            "kindling_generation_tokens_per_second",
            "Tokens generated per second, averaged over the last ten seconds",
            m.tokens_per_second.clone(),
        );
        r.register(
            "vllm:num_requests_waiting",
            "Requests waiting for a place in the batch (vLLM's name)",
            m.vllm_waiting.clone(),
        );
        r.register(
            "vllm:num_requests_running",
            "Sequences in the running batch (vLLM's name)",
            m.vllm_running.clone(),
        );
        r.register(
            "vllm:kv_cache_usage_perc",
            "Share of the KV cache in use, 0 to 1 (vLLM's name)",
            m.vllm_kv_usage.clone(),
        );
        r.register(
            "kindling_process_resident_memory_bytes",
            "Resident memory of the daemon",
            m.process_resident.clone(),
        );
        r.register(
            "kindling_key_requests",
            "Requests metered, per API key name and model",
            m.key_requests.clone(),
        );
        r.register(
            "kindling_key_prompt_tokens",
            "Prompt and embedding tokens, per API key name and model",
            m.key_prompt_tokens.clone(),
        );
        r.register(
            "kindling_key_completion_tokens",
            "Completion tokens, per API key name and model",
            m.key_completion_tokens.clone(),
        );
        r.register(
            "kindling_key_images",
            "Images made, per API key name and model",
            m.key_images.clone(),
        );
        r.register(
            "kindling_rate_limited",
            "Requests refused by a key's limits, by reason (requests, tokens, quota)",
            m.rate_limited.clone(),
        );
        r.register(
            "kindling_sleep_level",
            "The level this replica sleeps at after POST /sleep (0: awake)",
            m.sleep_level.clone(),
        );
        m.versions.register(&mut r);
        Self { registry: r, ..m }
    }

    /// The `model_name` label for `model`.
    pub fn model_name(model: &str) -> ModelNameLabel {
        ModelNameLabel {
            model_name: model.to_string(),
        }
    }

    /// The model label for `model`.
    pub fn model(model: &str) -> ModelLabel {
        ModelLabel {
            model: model.to_string(),
        }
    }

    /// Drops the gauges of a model that left the catalog, `states` being
    /// its lifecycle states' names (its counters and histograms stay: they
    /// are history).
    pub fn forget_model(&self, model: &str, states: &[&str]) {
        let label = Self::model(model);
        for family in [
            &self.model_estimated,
            &self.model_measured,
            &self.queue_depth,
            &self.in_flight,
            &self.batch_running,
            &self.batch_steps,
            &self.kv_blocks_used,
            &self.kv_blocks_total,
            &self.prefix_cached_blocks,
            &self.spec_drafted,
            &self.spec_accepted,
        ] {
            family.remove(&label);
        }
        self.tokens_per_second.remove(&label);
        self.prefix_hit_rate.remove(&label);
        self.spec_acceptance_rate.remove(&label);
        for state in states {
            self.model_state.remove(&ModelStateLabels {
                model: model.to_string(),
                state: state.to_string(),
            });
        }
        let name = Self::model_name(model);
        self.vllm_waiting.remove(&name);
        self.vllm_running.remove(&name);
        self.vllm_kv_usage.remove(&name);
        self.vllm_prefix_queries.remove(&name);
        self.vllm_prefix_hits.remove(&name);
        self.vllm_spec_drafted.remove(&name);
        self.vllm_spec_accepted.remove(&name);
    }

    /// All metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let _one_at_a_time = self.render_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot render metrics");
        }
        out
    }
}

/// Saturating conversion for gauges.
pub fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_names_and_labels() {
        let m = Metrics::new();
        m.loads
            .get_or_create(&LoadLabels {
                model: "a".into(),
                outcome: "ok".into(),
            })
            .inc();
        m.load_seconds
            .get_or_create(&Metrics::model("a"))
            .observe(0.5);
        let text = m.render();
        assert!(
            text.contains("kindling_model_loads_total{model=\"a\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kindling_model_load_duration_seconds_count{model=\"a\"} 1"),
            "{text}"
        );
    }
}
