//! `[engine]` in `kindling.toml`: batching, queues and caches of every
//! model's worker.

use std::time::Duration;

use serde::Deserialize;

use super::units::duration;

/// `[engine]` in `kindling.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Requests that may wait per model before new ones get 429.
    pub queue_size: usize,
    /// How long a streaming client may stop reading (its buffer full, the
    /// connection open) before its request is cancelled (`"30s"`).
    #[serde(with = "duration")]
    pub stall_timeout: Duration,
    /// Sequences per batch (all choices of all running requests).
    pub max_sequences: usize,
    /// Tokens per forward pass: one per decoding sequence plus prompt
    /// chunks; long prompts are prefilled over several steps.
    pub max_batch_tokens: usize,
    /// Positions the paged KV cache holds per model, over all sequences
    /// (at least one full context). Charged to the device budget.
    pub kv_cache_tokens: usize,
    /// Deadline for requests that name no `timeout` (`"2m"`); none by default.
    #[serde(with = "duration::optional")]
    pub request_timeout: Option<Duration>,
    /// Tokens per encoder pass of an embedding model: concurrent requests'
    /// inputs are packed together up to this (at least one longest input).
    pub embedding_batch_tokens: usize,
    /// Images per UNet call of an image model: concurrent compatible
    /// requests (same size, sampler and steps) run together up to this.
    pub image_batch: usize,
    /// Share each model's batch and queue fairly between API keys: while
    /// others wait, no key holds more than its share of sequences.
    pub fair_share: bool,
    /// Keep the KV blocks of whole prompt prefixes after a request ends and
    /// reuse them for later requests that start the same way (same model
    /// instance only). They live in the KV cache's own blocks, so they take
    /// no memory beyond `kv_cache_tokens`, and are given up, least recently
    /// used first, when new work needs the room.
    pub prefix_caching: bool,
    /// Let requests of different API keys reuse each other's cached
    /// prefixes (a common system prompt is then computed once for all).
    /// `false` keeps each key's cached blocks to itself, so no key can tell
    /// from its time to first token what another key has sent.
    pub prefix_cache_shared: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_size: 64,
            stall_timeout: Duration::from_secs(30),
            max_sequences: 32,
            max_batch_tokens: 256,
            kv_cache_tokens: 16384,
            request_timeout: None,
            embedding_batch_tokens: 2048,
            image_batch: 4,
            fair_share: true,
            prefix_caching: true,
            prefix_cache_shared: true,
        }
    }
}
