//! Weights from the Hugging Face Hub, through the `hf-hub` crate, into the
//! model store (in the Hub's cache layout under `<store>/hub`). A file only
//! appears under its snapshot path once it is complete and verified; a
//! failed or interrupted download leaves at most a `.sync.part` file that
//! no load trusts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hf_hub::api::tokio::{ApiBuilder, Progress as HubProgress};
use hf_hub::{Cache, Repo, RepoType};
use sha2::{Digest, Sha256};

use super::lifecycle::Progress;
use crate::config::HubConfig;

/// What to fetch.
pub struct Request<'a> {
    /// The model, for logs.
    pub model: &'a str,
    /// `owner/name`.
    pub repo: &'a str,
    /// Branch, tag or commit.
    pub revision: &'a str,
    /// Files to fetch.
    pub files: &'a [String],
    /// Expected SHA-256 per file, where the manifest gives one.
    pub sha256: &'a std::collections::BTreeMap<String, String>,
}

/// Reports progress to the registry and, every tenth of a file, to the log.
/// hf-hub clones it for each chunk it fetches, so its counters are shared.
#[derive(Clone)]
struct Reporter {
    model: String,
    file: String,
    shared: Arc<Progress>,
    size: u64,
    received: Arc<AtomicU64>,
    logged_tenths: Arc<AtomicU64>,
    bar: Option<indicatif::ProgressBar>,
}

impl HubProgress for Reporter {
    async fn init(&mut self, size: usize, filename: &str) {
        self.size = size as u64;
        self.file = filename.to_string();
        self.shared.total.fetch_add(size as u64, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_length(size as u64);
            bar.set_message(filename.to_string());
        }
        tracing::info!(model = %self.model, file = filename, bytes = size, "downloading");
    }

    async fn update(&mut self, size: usize) {
        let received = self.received.fetch_add(size as u64, Ordering::Relaxed) + size as u64;
        self.shared.done.fetch_add(size as u64, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(size as u64);
        }
        let tenths = (received * 10).checked_div(self.size).unwrap_or(0);
        if self.logged_tenths.fetch_max(tenths, Ordering::Relaxed) < tenths {
            tracing::info!(
                model = %self.model,
                file = %self.file,
                done = received,
                total = self.size,
                "download progress {}%",
                tenths * 10
            );
        }
    }

    async fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Fetches every file of `req` that the store lacks, verifies what it
/// downloaded, and returns each file's local path, in order.
pub async fn fetch(
    hub: &HubConfig,
    store: &Path,
    req: Request<'_>,
    progress: Arc<Progress>,
    show_bar: bool,
) -> Result<Vec<PathBuf>, String> {
    let cache = Cache::new(store.join("hub"));
    let mut builder = ApiBuilder::from_cache(cache.clone())
        .with_progress(false)
        .with_token(hub.token.clone());
    if let Some(endpoint) = &hub.endpoint {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    let api = builder
        .build()
        .map_err(|e| format!("cannot start the Hub client: {e}"))?;
    let repo = Repo::with_revision(
        req.repo.to_string(),
        RepoType::Model,
        req.revision.to_string(),
    );
    let local = cache.repo(repo.clone());
    let remote = api.repo(repo);
    progress.done.store(0, Ordering::Relaxed);
    progress.total.store(0, Ordering::Relaxed);
    let mut paths = Vec::with_capacity(req.files.len());
    for file in req.files {
        if let Some(path) = local.get(file) {
            paths.push(path);
            continue;
        }
        progress.active.store(true, Ordering::Relaxed);
        let reporter = Reporter {
            model: req.model.to_string(),
            file: file.clone(),
            shared: progress.clone(),
            size: 0,
            received: Arc::default(),
            logged_tenths: Arc::default(),
            bar: show_bar.then(|| {
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar
            }),
        };
        let path = remote
            .download_with_progress(file, reporter)
            .await
            .map_err(|e| {
                format!(
                    "downloading `{file}` from `{}`@{}: {e}",
                    req.repo, req.revision
                )
            })?;
        verify(&path, req.sha256.get(file).map(String::as_str))
            .await
            .map_err(|e| format!("`{file}` from `{}`: {e}", req.repo))?;
        tracing::info!(model = req.model, file = %file, path = %path.display(), "downloaded and verified");
        paths.push(path);
    }
    Ok(paths)
}

/// Checks a downloaded file's SHA-256 against the manifest's sum, or against
/// the blob's name when the Hub named it by its SHA-256 (LFS files). A
/// mismatch removes the file so that no later load trusts it.
async fn verify(path: &Path, expected: Option<&str>) -> Result<(), String> {
    let blob = std::fs::canonicalize(path)
        .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
    let blob_name = blob
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let is_sha256 = |s: &str| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit());
    let expected = match expected {
        Some(e) => e.to_string(),
        None if is_sha256(blob_name) => blob_name.to_ascii_lowercase(),
        None => return Ok(()),
    };
    let hashed = blob.clone();
    let actual = tokio::task::spawn_blocking(move || sha256_file(&hashed))
        .await
        .map_err(|e| format!("checksum task failed: {e}"))?
        .map_err(|e| format!("cannot read {}: {e}", blob.display()))?;
    if actual != expected {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(&blob);
        return Err(format!(
            "checksum mismatch (expected sha256 {expected}, got {actual}); the file was removed"
        ));
    }
    Ok(())
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
