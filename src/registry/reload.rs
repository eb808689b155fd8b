//! Hot reload of the model manifests: the folder is read again (when a
//! file changes, on SIGHUP, or on `POST /admin/reload`) and the catalog
//! follows it without a restart. A new manifest's model appears; an edited
//! one serves its new settings (at once for sampling defaults and keep-
//! alive, on its next load for anything a load makes, while the loaded
//! instance drains); a removed one takes no new requests, drains and
//! unloads. A manifest that fails validation is refused with the reason
//! logged and reported, and the one it replaced keeps serving.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::devices::Devices;
use super::lifecycle::{Policy, Refresh};
use super::{Entry, Registry};
use crate::config::{
    check_model_device, conflict, scan_manifests, Config, DeviceConfig, KeepAlive, ModelManifest,
};
use crate::metrics::OutcomeLabel;

/// What a reload reads, and the settings a manifest is checked against.
pub struct Source {
    config_path: PathBuf,
    dir: PathBuf,
    store: PathBuf,
    devices: BTreeMap<String, DeviceConfig>,
    keep_alive: KeepAlive,
    /// One reload at a time.
    running: tokio::sync::Mutex<()>,
}

impl Source {
    /// The manifest folder and settings of `config`.
    pub fn new(config: &Config) -> Self {
        Self {
            config_path: config.path.clone(),
            dir: config.manifests.clone(),
            store: config.store.clone(),
            devices: config.devices.clone(),
            keep_alive: config.lifecycle.keep_alive,
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// How a model of `m` lives.
    pub fn policy(&self, devices: &Devices, m: &ModelManifest) -> Policy {
        Policy {
            device: devices.pin(m),
            pin: m.pin,
            keep_alive: m.keep_alive.unwrap_or(self.keep_alive),
        }
    }

    /// A fingerprint of the folder (names, sizes, modification times), to
    /// notice changes cheaply.
    pub fn fingerprint(&self) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .map(|p| {
                // Follows links, as ConfigMap volumes swap them.
                let md = std::fs::metadata(&p).ok();
                let len = md.as_ref().map_or(0, |m| m.len());
                let modified = md.and_then(|m| m.modified().ok());
                (p, len, modified)
            })
            .collect();
        out.sort();
        out
    }
}

/// A manifest file a reload refused.
#[derive(Debug, Clone, Serialize)]
pub struct Refused {
    /// The file.
    pub file: PathBuf,
    /// Why.
    pub reason: String,
    /// The instance that keeps serving from the file's previous version.
    pub kept: Option<String>,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadReport {
    /// Models that appeared.
    pub added: Vec<String>,
    /// Models whose manifest changed and that load afresh.
    pub reloaded: Vec<String>,
    /// Models whose serving settings changed (no reload needed).
    pub updated: Vec<String>,
    /// Models that went away.
    pub removed: Vec<String>,
    /// Files refused, with why.
    pub refused: Vec<Refused>,
}

impl ReloadReport {
    /// Whether anything changed or was refused.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.reloaded.is_empty()
            && self.updated.is_empty()
            && self.removed.is_empty()
            && self.refused.is_empty()
    }
}

impl Registry {
    /// Reads the manifest folder again and applies what changed.
    pub async fn reload(self: &Arc<Self>) -> ReloadReport {
        let _one = self.source.running.lock().await;
        let src = &self.source;
        let (dir, store) = (src.dir.clone(), src.store.clone());
        let scanned = tokio::task::spawn_blocking(move || scan_manifests(&dir, &store)).await;
        let scanned = match scanned {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "manifest reload failed; nothing changed"
                );
                return ReloadReport {
                    refused: vec![Refused {
                        file: src.dir.clone(),
                        reason: format!("{e:#}"),
                        kept: None,
                    }],
                    ..ReloadReport::default()
                };
            }
            Err(e) => {
                tracing::error!(error = %e, "manifest reload task failed");
                return ReloadReport::default();
            }
        };
        let current: BTreeMap<String, ModelManifest> = self
            .entries()
            .iter()
            .map(|(name, e)| (name.clone(), e.manifest.clone()))
            .collect();
        let by_file: BTreeMap<PathBuf, String> = current
            .iter()
            .map(|(name, m)| (m.source.clone(), name.clone()))
            .collect();
        let mut report = ReloadReport::default();
        let mut next: BTreeMap<String, ModelManifest> = BTreeMap::new();
        // Files that keep serving the name they serve claim it first (a
        // broken one keeps its old manifest), so a newcomer, or an edit
        // that takes another file's name, is the one refused.
        let (known, new): (Vec<_>, Vec<_>) = scanned.into_iter().partition(|(f, m)| {
            by_file
                .get(f)
                .is_some_and(|served| m.as_ref().map_or(true, |m| m.name() == *served))
        });
        for (file, parsed) in known.into_iter().chain(new) {
            let kept = by_file.get(&file).and_then(|n| current.get(n));
            let checked = parsed.map_err(|e| format!("{e:#}")).and_then(|m| {
                check_model_device(&src.config_path, &src.devices, &m)
                    .map_err(|e| format!("{e:#}"))?;
                match conflict(&next, &m) {
                    Some(why) => Err(why),
                    None => Ok(m),
                }
            });
            match checked {
                Ok(m) => {
                    next.insert(m.name(), m);
                }
                Err(reason) => {
                    let kept = kept.filter(|k| conflict(&next, k).is_none()).cloned();
                    tracing::warn!(
                        file = %file.display(),
                        reason = %reason,
                        kept = kept.as_ref().map(|k| k.name()).as_deref().unwrap_or("-"),
                        "manifest refused; the previous one (if any) keeps serving"
                    );
                    report.refused.push(Refused {
                        file: file.clone(),
                        reason,
                        kept: kept.as_ref().map(|k| k.name()),
                    });
                    if let Some(k) = kept {
                        next.insert(k.name(), k);
                    }
                }
            }
        }
        self.apply(current, next, &mut report);
        let m = &self.metrics.versions.manifest_reloads;
        let refused = report.refused.len() as u64;
        m.get_or_create(&OutcomeLabel {
            outcome: "refused".into(),
        })
        .inc_by(refused);
        if !report.is_empty() {
            tracing::info!(
                added = ?report.added,
                reloaded = ?report.reloaded,
                updated = ?report.updated,
                removed = ?report.removed,
                refused = report.refused.len(),
                "manifests reloaded"
            );
        }
        report
    }

    fn apply(
        self: &Arc<Self>,
        current: BTreeMap<String, ModelManifest>,
        next: BTreeMap<String, ModelManifest>,
        report: &mut ReloadReport,
    ) {
        let ok = self
            .metrics
            .versions
            .manifest_reloads
            .get_or_create(&OutcomeLabel {
                outcome: "ok".into(),
            })
            .clone();
        for (name, m) in &next {
            let policy = self.source.policy(&self.devices, m);
            match current.get(name) {
                None => {
                    // The slot first, so a request that finds the entry finds it.
                    self.loader.set_manifest(name, Some(m.clone()));
                    self.lifecycle.add(name, policy);
                    self.write_entry(name, Some(m.clone()));
                    report.added.push(name.clone());
                    ok.inc();
                }
                Some(old) if old != m => {
                    let refresh = if old.needs_reload(m) {
                        report.reloaded.push(name.clone());
                        Refresh::Reload
                    } else {
                        report.updated.push(name.clone());
                        Refresh::Policy
                    };
                    self.loader.set_manifest(name, Some(m.clone()));
                    self.write_entry(name, Some(m.clone()));
                    self.lifecycle.update(name, policy, refresh);
                    ok.inc();
                }
                Some(_) => {}
            }
        }
        for name in current.keys().filter(|n| !next.contains_key(*n)) {
            // Gone from the catalog first, so no new request finds it.
            self.write_entry(name, None);
            self.lifecycle.remove(name);
            self.loader.set_manifest(name, None);
            let states = super::ModelState::ALL.map(|s| s.as_str());
            self.metrics.forget_model(name, &states);
            report.removed.push(name.clone());
        }
        if !report.added.is_empty() {
            self.warm_up(report.added.clone());
        }
    }

    fn write_entry(&self, name: &str, manifest: Option<ModelManifest>) {
        let mut all = self.entries.write().unwrap_or_else(|e| e.into_inner());
        match manifest {
            Some(m) => all.insert(name.to_string(), Entry::new(m)),
            None => all.remove(name),
        };
    }

    /// Reloads whenever the manifest folder changes, checking every
    /// `interval` (the folder's names, sizes and modification times; this
    /// also sees Kubernetes ConfigMap volumes, which swap a link).
    pub fn watch_manifests(self: &Arc<Self>, interval: Duration) {
        let this = Arc::downgrade(self);
        let mut seen = self.source.fingerprint();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(registry) = this.upgrade() else {
                    return;
                };
                let now = registry.source.fingerprint();
                if now != seen {
                    seen = now;
                    registry.reload().await;
                }
            }
        });
    }

    /// The manifest folder.
    pub fn manifest_dir(&self) -> &Path {
        &self.source.dir
    }
}
