//! `[auth]` and `[usage]` in `kindling.toml`: who may call the daemon, and
//! where the record of what they used is kept.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Deserialize;

use super::units::duration;

/// `[auth]`: API keys. With no keys anywhere (no keys file, no
/// `--api-key`), the daemon is open and refuses to listen beyond loopback
/// unless told `--insecure-public`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The managed keys file (`kindling keys …` edits it), relative to the
    /// config file. Changes are picked up while the daemon runs.
    pub keys_file: Option<PathBuf>,
    /// Whether `/metrics` needs a key (any scope). Open by default, as
    /// Prometheus scrapers expect.
    pub metrics_need_key: bool,
    /// Keys given on the command line or in `KINDLING_API_KEY`: full
    /// access, named `api-key-1`, `api-key-2`, … in usage records.
    #[serde(skip)]
    pub api_keys: Vec<String>,
}

impl AuthConfig {
    /// Whether any key is configured (so every request must carry one).
    pub fn enabled(&self) -> bool {
        self.keys_file.is_some() || !self.api_keys.is_empty()
    }
}

/// `[usage]`: metering. One record per inference request, written in
/// batches to SQLite (in the store, by default) or PostgreSQL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Keep usage records at all.
    pub enabled: bool,
    /// `postgres://user@host:port/db`: write to PostgreSQL instead of the
    /// SQLite file (for replicas that lose their disk when scaled to zero).
    pub database_url: Option<String>,
    /// The SQLite file, relative to the config file (default
    /// `<store>/usage.sqlite`).
    pub path: Option<PathBuf>,
    /// How often buffered records are committed (`"1s"`): a crash loses at
    /// most this much; a graceful stop loses nothing.
    #[serde(with = "duration")]
    pub flush_interval: Duration,
    /// How often per-key quota counters are refreshed from the store (so
    /// replicas sharing one PostgreSQL see each other's use).
    #[serde(with = "duration")]
    pub quota_sync_interval: Duration,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            database_url: None,
            path: None,
            flush_interval: Duration::from_secs(1),
            quota_sync_interval: Duration::from_secs(30),
        }
    }
}

/// Where usage records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageTarget {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL.
    Postgres(String),
}

impl UsageConfig {
    /// Resolves paths against the config file's folder and checks the URL.
    pub(super) fn resolve(&mut self, file: &Path, base: &Path, store: &Path) -> Result<()> {
        if let Some(p) = &self.path {
            self.path = Some(base.join(p));
        }
        if let Some(url) = &self.database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                bail!(
                    "{}: usage.database_url: expected a `postgres://…` URL",
                    file.display()
                );
            }
        }
        if self.path.is_none() {
            self.path = Some(store.join("usage.sqlite"));
        }
        if self.flush_interval.is_zero() || self.quota_sync_interval.is_zero() {
            bail!(
                "{}: usage.flush_interval and usage.quota_sync_interval must be above 0",
                file.display()
            );
        }
        Ok(())
    }

    /// The store records go to (`None` when metering is off).
    pub fn target(&self) -> Option<UsageTarget> {
        if !self.enabled {
            return None;
        }
        match (&self.database_url, &self.path) {
            (Some(url), _) => Some(UsageTarget::Postgres(url.clone())),
            (None, Some(p)) => Some(UsageTarget::Sqlite(p.clone())),
            (None, None) => None,
        }
    }
}
