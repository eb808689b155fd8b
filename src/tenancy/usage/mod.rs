//! Usage records (what each request used, for pay-per-use billing) and the
//! writer that commits them to the store in batches.
//!
//! Records are buffered and committed every `flush_interval` (one
//! transaction per batch), at once when a reader asks, and before the
//! daemon stops. A graceful stop loses nothing; a crash loses at most the
//! records of the last interval and of the requests still running.

mod store;

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use serde::Serialize;
use tokio::sync::oneshot;

pub use store::{open, Store, SCHEMA};

use crate::config::UsageTarget;

/// Most records held while the store is unreachable; older ones are
/// dropped (and logged) past this.
const MAX_BUFFERED: usize = 100_000;
/// Records committed in one transaction at most.
const BATCH: usize = 1_000;

/// What one request used.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UsageRecord {
    /// When it ended, Unix milliseconds.
    pub ts_ms: i64,
    /// The request id (also in the log and the response's `x-request-id`).
    pub request_id: String,
    /// The key's name.
    pub key: String,
    /// The model id.
    pub model: String,
    /// The model version, where versions exist.
    pub version: Option<String>,
    /// The route, e.g. `/v1/chat/completions`.
    pub endpoint: String,
    /// The HTTP status; 499 when the client left before the end.
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens served from a prefix cache (part of `prompt_tokens`).
    pub cached_tokens: u64,
    pub embedding_tokens: u64,
    pub images: u64,
    /// Width × height × steps ÷ 1e6, over all images.
    pub pixel_steps: f64,
    /// Seconds from the start of its compute to its end.
    pub compute_seconds: f64,
    /// Seconds from arrival to the start of its compute (model load included).
    pub queue_seconds: f64,
}

impl UsageRecord {
    /// Tokens charged against rate limits and quotas.
    pub fn billable_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens + self.embedding_tokens
    }
}

/// Columns a usage query may group by.
pub const GROUPS: [&str; 6] = ["key", "model", "version", "endpoint", "day", "status"];

/// A question for the store: totals over `[since, until)`, optionally
/// for one key or model, grouped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageQuery {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub key: Option<String>,
    pub model: Option<String>,
    /// Names from [`GROUPS`], in output order.
    pub group_by: Vec<String>,
}

impl UsageQuery {
    /// Checks `group_by` names.
    pub fn check(&self) -> Result<(), String> {
        for g in &self.group_by {
            if !GROUPS.contains(&g.as_str()) {
                return Err(format!(
                    "cannot group by `{g}` (one of: {})",
                    GROUPS.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// One group's totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UsageRow {
    /// The group's values, by column name (`key`, `model`, …).
    #[serde(flatten)]
    pub group: std::collections::BTreeMap<String, String>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub embedding_tokens: u64,
    pub images: u64,
    pub pixel_steps: f64,
    pub compute_seconds: f64,
    pub queue_seconds: f64,
}

enum Msg {
    Record(Box<UsageRecord>),
    Flush(oneshot::Sender<Result<(), String>>),
    Query(UsageQuery, oneshot::Sender<Result<Vec<UsageRow>, String>>),
    Totals(i64, oneshot::Sender<Result<HashMap<String, u64>, String>>),
    Close(oneshot::Sender<Result<(), String>>),
}

/// The daemon's handle on its usage store: records go to a writer thread.
pub struct Usage {
    tx: mpsc::Sender<Msg>,
}

impl Usage {
    /// Starts the writer, which opens (and if needed creates) the store
    /// on its own thread (database clients may block).
    pub fn open(target: UsageTarget, flush_interval: Duration) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let (opened_tx, opened) = mpsc::channel();
        std::thread::Builder::new()
            .name("kindling-usage".into())
            .spawn(move || {
                let store = match open(&target) {
                    Ok(s) => Some(s),
                    // A database server may come up after the daemon:
                    // records wait in memory and the writer keeps trying.
                    Err(e) if matches!(target, UsageTarget::Postgres(_)) => {
                        tracing::error!(error = %format!("{e:#}"), "usage database unreachable; records are kept in memory until it answers");
                        None
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                let _ = opened_tx.send(Ok(()));
                Writer::new(store, target, flush_interval).run(rx);
            })?;
        opened
            .recv()
            .map_err(|_| anyhow!("the usage writer failed to start"))??;
        Ok(Self { tx })
    }

    /// Queues a record.
    pub fn push(&self, record: UsageRecord) {
        if self.tx.send(Msg::Record(Box::new(record))).is_err() {
            tracing::error!("usage writer stopped; a usage record was lost");
        }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Msg,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| anyhow!("the usage writer has stopped"))?;
        rx.await
            .map_err(|_| anyhow!("the usage writer has stopped"))?
            .map_err(|e| anyhow!(e))
    }

    /// Commits every queued record.
    pub async fn flush(&self) -> Result<()> {
        self.ask(Msg::Flush).await
    }

    /// Totals for `query`, after committing what is queued.
    pub async fn query(&self, query: UsageQuery) -> Result<Vec<UsageRow>> {
        self.ask(|r| Msg::Query(query, r)).await
    }

    /// Billable tokens per key since `since_ms`.
    pub async fn token_totals(&self, since_ms: i64) -> Result<HashMap<String, u64>> {
        self.ask(|r| Msg::Totals(since_ms, r)).await
    }

    /// Commits what is queued and stops the writer.
    pub async fn close(&self) -> Result<()> {
        self.ask(Msg::Close).await
    }
}

struct Writer {
    store: Option<Box<dyn Store>>,
    target: UsageTarget,
    buffer: Vec<UsageRecord>,
    every: Duration,
    next_flush: Instant,
    retry_at: Option<Instant>,
}

impl Writer {
    fn new(store: Option<Box<dyn Store>>, target: UsageTarget, every: Duration) -> Self {
        Self {
            store,
            target,
            buffer: Vec::new(),
            every,
            next_flush: Instant::now() + every,
            retry_at: None,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            let wait = self.next_flush.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Msg::Record(r)) => {
                    self.buffer.push(*r);
                    if self.buffer.len() > MAX_BUFFERED {
                        let over = self.buffer.len() - MAX_BUFFERED;
                        self.buffer.drain(..over);
                        tracing::error!(
                            dropped = over,
                            "usage store unreachable too long; oldest records dropped"
                        );
                    }
                    if self.buffer.len() >= BATCH {
                        let _ = self.flush();
                    }
                }
                Ok(Msg::Flush(reply)) => {
                    let _ = reply.send(self.flush());
                }
                Ok(Msg::Query(q, reply)) => {
                    let out = self.flush().and_then(|()| self.with_store(|s| s.query(&q)));
                    let _ = reply.send(out);
                }
                Ok(Msg::Totals(since, reply)) => {
                    let out = self
                        .flush()
                        .and_then(|()| self.with_store(|s| s.token_totals(since)));
                    let _ = reply.send(out);
                }
                Ok(Msg::Close(reply)) => {
                    let _ = reply.send(self.flush());
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.flush();
                    self.next_flush = Instant::now() + self.every;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.flush();
                    return;
                }
            }
        }
    }

    /// Runs `f` on the store, reconnecting first if it was lost.
    fn with_store<T>(&mut self, f: impl FnOnce(&mut dyn Store) -> Result<T>) -> Result<T, String> {
        if self.store.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return Err("the usage store is unreachable".into());
            }
            match open(&self.target) {
                Ok(s) => {
                    tracing::info!("usage store reconnected");
                    self.store = Some(s);
                    self.retry_at = None;
                }
                Err(e) => {
                    self.retry_at = Some(Instant::now() + Duration::from_secs(5));
                    return Err(format!("usage store unreachable: {e:#}"));
                }
            }
        }
        let store = self.store.as_deref_mut().ok_or("no store")?;
        f(store).map_err(|e| {
            // Drop the connection; the next call reconnects.
            self.store = None;
            format!("{e:#}")
        })
    }

    /// Commits the buffer in batches; on failure the records stay queued.
    fn flush(&mut self) -> Result<(), String> {
        while !self.buffer.is_empty() {
            let n = self.buffer.len().min(BATCH);
            let batch: Vec<UsageRecord> = self.buffer[..n].to_vec();
            match self.with_store(|s| s.insert(&batch)) {
                Ok(()) => {
                    self.buffer.drain(..n);
                }
                Err(e) => {
                    tracing::error!(error = %e, queued = self.buffer.len(), "usage records not committed; will retry");
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}
