//! The tenancy room: who is calling (API keys), what they may do (scopes,
//! models), how much (rate limits, quotas), and what they used (usage
//! records and their store). Knows nothing of HTTP or of models.

mod clock;
pub mod keys;
mod limits;
pub mod usage;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

pub use clock::{day, now_ms, parse_time, rfc3339, Period};
pub use keys::{KeyEntry, KeyRing, KeysFile, NewKey};
pub use limits::{Limited, Limiter, RateState};
pub use usage::{Usage, UsageQuery, UsageRecord, UsageRow};

use crate::config::Config;
use crate::metrics::{Metrics, UsageLabels};

/// The name usage is recorded under when the daemon has no keys.
pub const ANONYMOUS: &str = "anonymous";

/// How often the keys file is checked for changes.
const KEYS_CHECK_EVERY: Duration = Duration::from_secs(1);

/// What a key may call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The OpenAI-compatible API.
    #[default]
    Inference,
    /// That, and `/admin/*`.
    Admin,
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "inference" => Ok(Self::Inference),
            "admin" => Ok(Self::Admin),
            other => Err(format!("scope `{other}`: expected `inference` or `admin`")),
        }
    }
}

/// A key's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KeyLimits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// Tokens per period.
    pub quota: Option<(u64, Period)>,
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// The key's name (never its secret).
    pub name: Arc<str>,
    /// What it may call.
    pub scope: Scope,
    /// Models it may use; all when `None`.
    pub models: Option<Vec<String>>,
    /// Its limits.
    pub limits: KeyLimits,
}

impl Principal {
    /// A key that may do everything, without limits.
    pub fn full_access(name: &str) -> Self {
        Self {
            name: Arc::from(name),
            scope: Scope::Admin,
            models: None,
            limits: KeyLimits::default(),
        }
    }

    fn from_entry(k: &KeyEntry) -> Self {
        Self {
            name: Arc::from(k.name.as_str()),
            scope: k.scope,
            models: k.models.clone(),
            limits: KeyLimits {
                rpm: k.rpm,
                tpm: k.tpm,
                quota: k.quota_tokens.zip(k.quota_period),
            },
        }
    }

    /// Whether the key may use model `id` (a version suffix `@v` counts as
    /// the model).
    pub fn may_use(&self, id: &str) -> bool {
        let base = id.split_once('@').map_or(id, |(m, _)| m);
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|allowed| allowed == id || allowed == base))
    }

    /// Whether the key may call the admin API.
    pub fn is_admin(&self) -> bool {
        self.scope == Scope::Admin
    }
}

/// Why a request was not let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// It carried no key.
    Missing,
    /// Its key is unknown or revoked.
    Unknown,
}

/// Keys, limits and usage, as the daemon runs them.
pub struct Tenancy {
    keys: KeyRing,
    enabled: bool,
    metrics_need_key: bool,
    limiter: Limiter,
    usage: Option<Usage>,
    metrics: Arc<Metrics>,
    anonymous: Arc<Principal>,
    quota_sync: Duration,
}

impl Tenancy {
    /// Reads the keys and opens the usage store.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Self> {
        let keys = KeyRing::new(config.auth.api_keys.clone(), config.auth.keys_file.clone())?;
        let usage = match config.usage.target() {
            Some(target) => Some(Usage::open(target, config.usage.flush_interval)?),
            None => None,
        };
        Ok(Self {
            keys,
            enabled: config.auth.enabled(),
            metrics_need_key: config.auth.metrics_need_key,
            limiter: Limiter::default(),
            usage,
            metrics,
            anonymous: Arc::new(Principal::full_access(ANONYMOUS)),
            quota_sync: config.usage.quota_sync_interval,
        })
    }

    /// Whether requests need a key.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether `/metrics` needs a key.
    pub fn metrics_need_key(&self) -> bool {
        self.enabled && self.metrics_need_key
    }

    /// The key `secret` belongs to. With no keys configured, everyone is
    /// the anonymous full-access principal.
    pub fn authenticate(&self, secret: Option<&str>) -> Result<Arc<Principal>, Denied> {
        if !self.enabled {
            return Ok(self.anonymous.clone());
        }
        let secret = secret.ok_or(Denied::Missing)?;
        self.keys.find(secret).ok_or(Denied::Unknown)
    }

    /// Lets one request in under `key`'s limits.
    pub fn admit(&self, key: &Principal) -> Result<RateState, Limited> {
        let outcome = self.limiter.admit(key);
        if let Err(why) = &outcome {
            let reason = match why {
                Limited::Requests { .. } => "requests",
                Limited::Tokens { .. } => "tokens",
                Limited::Quota { .. } => "quota",
            };
            self.metrics
                .rate_limited
                .get_or_create(&crate::metrics::LimitLabels {
                    key: key.name.to_string(),
                    reason: reason.to_string(),
                })
                .inc();
        }
        outcome
    }

    /// Records a finished (or cancelled) request: charges its tokens to
    /// the key, counts it in `/metrics`, and queues it for the store.
    pub fn record(&self, key: &Principal, record: UsageRecord) {
        self.limiter.charge(key, record.billable_tokens());
        let labels = UsageLabels {
            key: record.key.clone(),
            model: record.model.clone(),
        };
        let m = &self.metrics;
        m.key_requests.get_or_create(&labels).inc();
        m.key_prompt_tokens
            .get_or_create(&labels)
            .inc_by(record.prompt_tokens + record.embedding_tokens);
        m.key_completion_tokens
            .get_or_create(&labels)
            .inc_by(record.completion_tokens);
        m.key_images.get_or_create(&labels).inc_by(record.images);
        if let Some(usage) = &self.usage {
            usage.push(record);
        }
    }

    /// The usage store, when metering is on.
    pub fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref()
    }

    /// Commits every buffered record (before a stop, or scale to zero).
    pub async fn flush(&self) {
        if let Some(usage) = &self.usage {
            if let Err(e) = usage.flush().await {
                tracing::error!(error = %e, "usage records not flushed");
            }
        }
    }

    /// Re-reads the keys file when it changes, and keeps quota counters in
    /// step with the store.
    pub fn start_background(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEYS_CHECK_EVERY);
            let mut resident = 0;
            loop {
                tick.tick().await;
                let Some(t) = me.upgrade() else { return };
                if t.keys.file().is_some() {
                    let t2 = t.clone();
                    let _ = tokio::task::spawn_blocking(move || t2.keys.refresh()).await;
                }
                // Scaled to zero: commit what the last requests used now,
                // as the replica may be stopped next.
                let now = t.metrics.resident_models.get();
                if resident > 0 && now == 0 {
                    t.flush().await;
                }
                resident = now;
            }
        });
        let me = Arc::downgrade(self);
        let every = self.quota_sync;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(t) = me.upgrade() else { return };
                t.sync_quotas().await;
            }
        });
    }

    /// Raises each quota-limited key's period count to the store's total.
    async fn sync_quotas(&self) {
        let Some(usage) = &self.usage else { return };
        let keys = self.keys.principals();
        for period in [Period::Day, Period::Month] {
            let limited: Vec<_> = keys
                .iter()
                .filter(|k| k.limits.quota.is_some_and(|(_, p)| p == period))
                .collect();
            if limited.is_empty() {
                continue;
            }
            let since = period.bounds(now_ms()).0;
            match usage.token_totals(since).await {
                Ok(totals) => {
                    for k in limited {
                        if let Some(&used) = totals.get(&*k.name) {
                            self.limiter.sync_quota(k, used);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "quota counters not refreshed from the usage store")
                }
            }
        }
    }

    /// Flushes and closes the store (at exit).
    pub async fn close(&self) {
        if let Some(usage) = &self.usage {
            if let Err(e) = usage.close().await {
                tracing::error!(error = %e, "usage store not closed cleanly");
            }
        }
    }
}
