//! `[sleep]` in `kindling.toml`: what a sleeping replica does with requests.

use std::time::Duration;

use serde::Deserialize;

use super::units::duration;

/// `[sleep]`: `POST /sleep` parks a replica (its models unloaded, readiness
/// off) without stopping it; `POST /wake_up` brings it back.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SleepConfig {
    /// Whether a model request that arrives while asleep wakes the replica
    /// (and is served once awake). If not, it gets 503 with `Retry-After`.
    pub wake_on_request: bool,
    /// The `Retry-After` given to requests refused while asleep.
    #[serde(with = "duration")]
    pub retry_after: Duration,
    /// How long `/sleep` waits for in-flight requests to finish before it
    /// unloads their models.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
}

impl Default for SleepConfig {
    fn default() -> Self {
        Self {
            wake_on_request: false,
            retry_after: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
        }
    }
}
