//! Routes over model versions: per id, weights over its versions (sticky
//! by identity), an optional shadow version that gets mirrored copies, and
//! an optional guard that rolls a canary back by itself. Changes are
//! atomic (the next request sees them; requests already running keep the
//! version they started on), kept with a history, and saved in the store.

mod compare;
mod history;
mod pick;
mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;

use crate::config::{version_order, GuardSpec, RouteSpec, ShadowSpec};
use crate::metrics::{Metrics, Traffic};
use crate::metrics::{
    RollbackLabels, RouteLabels, VersionLabels, VersionOutcomeLabels, VersionTokenLabels,
};
pub use compare::Comparison;
pub use history::{Change, Origin};
use history::{RouteState, Saved, SavedFile};
pub use stats::Outcome;
use stats::Windows;

use super::RegistryError;

/// Comparison window when the route has no guard to take it from.
const DEFAULT_WINDOW: Duration = Duration::from_secs(300);
/// How long outcomes are kept at least.
const KEEP: Duration = Duration::from_secs(3600);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An id's route as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RouteView {
    /// The model id.
    pub id: String,
    /// Its versions, oldest first (natural order).
    pub versions: Vec<String>,
    /// The share each version gets now, in percent.
    pub weights: BTreeMap<String, f64>,
    /// The mirrored version, if any.
    pub shadow: Option<ShadowSpec>,
    /// The guard, if any.
    pub guard: Option<GuardSpec>,
    /// `default` (all to the newest), `config` or `admin`.
    pub origin: &'static str,
    /// Routes a rollback can go back to.
    pub rollbacks_available: usize,
}

/// The routes of every versioned id.
pub struct Routes {
    saved: Mutex<Saved>,
    windows: Mutex<Windows>,
    file: SavedFile,
    config: BTreeMap<String, RouteSpec>,
    metrics: Arc<Metrics>,
}

/// The version chosen for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Serves the request.
    pub version: String,
    /// Gets a copy whose answer is discarded.
    pub shadow: Option<String>,
}

impl Routes {
    /// Routes from the config, overridden by those saved in `file` (changed
    /// at run time, until reset).
    pub fn new(
        config: BTreeMap<String, RouteSpec>,
        file: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let file = SavedFile::new(file);
        let mut saved = file.load();
        // Routes saved as the config had them give way to the config's
        // routes now; those changed at run time stay until reset.
        saved.routes.retain(|_, s| s.origin == Origin::Admin);
        for (id, spec) in &config {
            saved
                .routes
                .entry(id.clone())
                .or_insert_with(|| RouteState {
                    spec: spec.clone(),
                    origin: Origin::Config,
                    previous: Vec::new(),
                });
        }
        Self {
            saved: Mutex::new(saved),
            windows: Mutex::default(),
            file,
            config,
            metrics,
        }
    }

    fn spec(&self, id: &str) -> Option<RouteSpec> {
        lock(&self.saved).routes.get(id).map(|s| s.spec.clone())
    }

    /// The weights in effect: the route's, over versions that exist, or all
    /// to the newest when it names none of them (or there is no route).
    /// In version order, oldest first, so the older of two equal shares is
    /// the baseline.
    fn weights(spec: Option<&RouteSpec>, versions: &[String]) -> Vec<(String, f64)> {
        let mut live: Vec<(String, f64)> = spec
            .map(|s| {
                s.weights
                    .iter()
                    .filter(|(v, _)| versions.contains(v))
                    .map(|(v, w)| (v.clone(), *w))
                    .collect()
            })
            .unwrap_or_default();
        live.sort_by(|a, b| version_order(&a.0, &b.0));
        if live.iter().any(|(_, w)| *w > 0.0) {
            return live;
        }
        versions
            .last()
            .map(|v| vec![(v.clone(), 100.0)])
            .unwrap_or_default()
    }

    /// The version for a request to `id` (versions oldest first), sticky
    /// for `identity`.
    pub fn choose(&self, id: &str, versions: &[String], identity: Option<&str>) -> Option<Choice> {
        let spec = self.spec(id);
        let weights = Self::weights(spec.as_ref(), versions);
        let version = pick::pick(id, &weights, identity)?.to_string();
        let shadow = spec
            .and_then(|s| s.shadow)
            .filter(|s| s.version != version && versions.contains(&s.version))
            .filter(|s| pick::in_share(id, s.percent, identity))
            .map(|s| s.version);
        Some(Choice { version, shadow })
    }

    /// The version with the largest share now (the older on a tie).
    pub fn baseline(&self, id: &str, versions: &[String]) -> Option<String> {
        let weights = Self::weights(self.spec(id).as_ref(), versions);
        baseline(&weights).map(|(v, _)| v.clone())
    }

    /// The route of `id` as shown to operators.
    pub fn view(&self, id: &str, versions: &[String]) -> RouteView {
        let saved = lock(&self.saved);
        let state = saved.routes.get(id);
        let spec = state.map(|s| &s.spec);
        RouteView {
            id: id.to_string(),
            versions: versions.to_vec(),
            weights: Self::weights(spec, versions).into_iter().collect(),
            shadow: spec.and_then(|s| s.shadow.clone()),
            guard: spec.and_then(|s| s.guard.clone()),
            origin: match state.map(|s| s.origin) {
                None => "default",
                Some(Origin::Config) => "config",
                Some(Origin::Admin) => "admin",
            },
            rollbacks_available: state.map_or(0, |s| s.previous.len()),
        }
    }

    fn check(id: &str, spec: &RouteSpec, versions: &[String]) -> Result<(), RegistryError> {
        spec.check().map_err(RegistryError::BadRoute)?;
        let named = spec
            .weights
            .keys()
            .map(|v| ("weights", v))
            .chain(spec.shadow.iter().map(|s| ("shadow.version", &s.version)));
        for (field, v) in named {
            if !versions.contains(v) {
                return Err(RegistryError::BadRoute(format!(
                    "{field}: `{id}` has no version `{v}` (known: {})",
                    versions.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Applies a change under the lock: records it, saves, and returns the
    /// new view.
    fn apply(
        &self,
        mut saved: MutexGuard<'_, Saved>,
        id: &str,
        to: Option<RouteState>,
        change: Change,
    ) {
        match to {
            Some(s) => saved.routes.insert(id.to_string(), s),
            None => saved.routes.remove(id),
        };
        tracing::info!(
            model = id,
            actor = %change.actor,
            action = %change.action,
            from = %serde_json::to_string(&change.from).unwrap_or_default(),
            to = %serde_json::to_string(&change.to).unwrap_or_default(),
            reason = change.reason.as_deref().unwrap_or("-"),
            "route changed"
        );
        // A version given traffic again is judged afresh, not on the
        // record that got it rolled back.
        let had = |spec: &Option<RouteSpec>, v: &str| {
            spec.as_ref()
                .and_then(|s| s.weights.get(v))
                .is_some_and(|w| *w > 0.0)
        };
        if let Some(to) = &change.to {
            let mut w = lock(&self.windows);
            for v in to
                .weights
                .keys()
                .filter(|v| had(&change.to, v) && !had(&change.from, v))
            {
                w.forget(id, v);
            }
        }
        saved.history.push(change);
        self.file.save(&mut saved);
    }

    /// `PUT /admin/routes/{id}`.
    pub fn set(
        &self,
        id: &str,
        versions: &[String],
        spec: RouteSpec,
        actor: &str,
    ) -> Result<RouteView, RegistryError> {
        self.replace(id, versions, spec, actor, "set")
    }

    fn replace(
        &self,
        id: &str,
        versions: &[String],
        spec: RouteSpec,
        actor: &str,
        action: &str,
    ) -> Result<RouteView, RegistryError> {
        Self::check(id, &spec, versions)?;
        let saved = lock(&self.saved);
        let before = saved.routes.get(id).cloned();
        let from = before.as_ref().map(|s| s.spec.clone());
        let mut previous = before.map(|s| s.previous).unwrap_or_default();
        push_previous(&mut previous, from.clone());
        let change = Change::now(id, actor, action, from, Some(spec.clone()));
        let state = RouteState {
            spec,
            origin: Origin::Admin,
            previous,
        };
        self.apply(saved, id, Some(state), change);
        Ok(self.view(id, versions))
    }

    /// `POST /admin/routes/{id}/promote`: `version` (default: the candidate,
    /// the version with a share other than the baseline's, else the newest)
    /// gets all the traffic.
    pub fn promote(
        &self,
        id: &str,
        versions: &[String],
        version: Option<String>,
        actor: &str,
    ) -> Result<RouteView, RegistryError> {
        let spec = self.spec(id);
        let weights = Self::weights(spec.as_ref(), versions);
        let baseline = baseline(&weights).map(|(v, _)| v.clone());
        let candidate = match version {
            Some(v) => v,
            None => weights
                .iter()
                .filter(|(v, w)| *w > 0.0 && Some(v) != baseline.as_ref())
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(v, _)| v.clone())
                .or_else(|| versions.last().cloned())
                .ok_or_else(|| RegistryError::NotFound(id.to_string()))?,
        };
        let mut next = spec.unwrap_or_else(|| RouteSpec {
            weights: BTreeMap::new(),
            shadow: None,
            guard: None,
        });
        // Versions gone since the route was set leave it.
        next.weights.retain(|v, _| versions.contains(v));
        for w in next.weights.values_mut() {
            *w = 0.0;
        }
        next.weights.insert(candidate.clone(), 100.0);
        if next
            .shadow
            .as_ref()
            .is_some_and(|s| s.version == candidate || !versions.contains(&s.version))
        {
            next.shadow = None;
        }
        self.replace(id, versions, next, actor, "promote")
    }

    /// `POST /admin/routes/{id}/rollback`: back to the route before the
    /// last change.
    pub fn rollback(
        &self,
        id: &str,
        versions: &[String],
        actor: &str,
    ) -> Result<RouteView, RegistryError> {
        let saved = lock(&self.saved);
        let Some(mut state) = saved.routes.get(id).cloned() else {
            return Err(RegistryError::Conflict(format!(
                "the route of `{id}` has no earlier route to roll back to"
            )));
        };
        let Some(back) = state.previous.pop() else {
            return Err(RegistryError::Conflict(format!(
                "the route of `{id}` has no earlier route to roll back to"
            )));
        };
        let change = Change::now(
            id,
            actor,
            "rollback",
            Some(state.spec.clone()),
            back.clone(),
        );
        let to = back.map(|spec| RouteState {
            spec,
            origin: Origin::Admin,
            previous: state.previous,
        });
        self.apply(saved, id, to, change);
        self.metrics
            .versions
            .rollbacks
            .get_or_create(&RollbackLabels {
                model: id.to_string(),
                trigger: "admin".into(),
            })
            .inc();
        Ok(self.view(id, versions))
    }

    /// `DELETE /admin/routes/{id}`: back to the config's route (the run-time
    /// route can be rolled back to), or to the default route.
    pub fn reset(&self, id: &str, versions: &[String], actor: &str) -> RouteView {
        let saved = lock(&self.saved);
        let before = saved.routes.get(id).cloned();
        let from = before.as_ref().map(|s| s.spec.clone());
        let mut previous = before.map(|s| s.previous).unwrap_or_default();
        push_previous(&mut previous, from.clone());
        let to = self.config.get(id).cloned();
        let change = Change::now(id, actor, "reset", from, to.clone());
        // The default route follows the newest version; it keeps nothing
        // to roll back to (the history still shows what it replaced).
        let state = to.map(|spec| RouteState {
            spec,
            origin: Origin::Config,
            previous,
        });
        self.apply(saved, id, state, change);
        self.view(id, versions)
    }

    /// Changes to `id`'s route (every id's when `None`), oldest first.
    pub fn history(&self, id: Option<&str>) -> Vec<Change> {
        lock(&self.saved)
            .history
            .iter()
            .filter(|c| id.is_none_or(|id| c.id == id))
            .cloned()
            .collect()
    }

    /// Records how a request to `id@version` went, and lets the route's
    /// guard judge a canary.
    pub fn observe(
        &self,
        id: &str,
        version: &str,
        versions: &[String],
        traffic: Traffic,
        o: &Outcome,
    ) {
        let m = &self.metrics.versions;
        let labels = VersionLabels {
            model: id.to_string(),
            version: version.to_string(),
            traffic: traffic.as_str().to_string(),
        };
        let outcome = if o.client_error {
            "client_error"
        } else if o.error {
            "error"
        } else if o.cancelled {
            "cancelled"
        } else {
            "ok"
        };
        m.requests
            .get_or_create(&VersionOutcomeLabels {
                model: id.to_string(),
                version: version.to_string(),
                traffic: labels.traffic.clone(),
                outcome: outcome.to_string(),
            })
            .inc();
        if let Some(t) = o.ttft {
            m.time_to_first_token
                .get_or_create(&labels)
                .observe(t.as_secs_f64());
        }
        m.latency
            .get_or_create(&labels)
            .observe(o.latency.as_secs_f64());
        if traffic == Traffic::Primary {
            for (kind, n) in [
                ("prompt", o.prompt_tokens),
                ("completion", o.completion_tokens),
                ("embedding", o.embedding_tokens),
            ] {
                if n > 0 {
                    m.tokens
                        .get_or_create(&VersionTokenLabels {
                            model: id.to_string(),
                            version: version.to_string(),
                            kind: kind.to_string(),
                        })
                        .inc_by(n);
                }
            }
        }
        let spec = self.spec(id);
        let keep = spec
            .as_ref()
            .and_then(|s| s.guard.as_ref())
            .map_or(KEEP, |g| g.window.max(KEEP));
        let verdict = {
            let mut w = lock(&self.windows);
            w.record(id, version, traffic, o, keep);
            match (&spec, traffic) {
                (Some(spec), Traffic::Primary) => {
                    judge_version(&w, id, spec, &Self::weights(Some(spec), versions), version)
                }
                _ => None,
            }
        };
        if let Some(reason) = verdict {
            self.trip(id, version, versions, reason);
        }
    }

    /// The guard tripped on `version`: its share goes to the baseline.
    fn trip(&self, id: &str, version: &str, versions: &[String], reason: String) {
        let saved = lock(&self.saved);
        let Some(mut state) = saved.routes.get(id).cloned() else {
            return;
        };
        // Over the versions that exist: the baseline is one that serves.
        let weights = Self::weights(Some(&state.spec), versions);
        let Some((base, _)) = baseline(&weights).cloned() else {
            return;
        };
        let share = weights
            .iter()
            .find(|(v, _)| v == version)
            .map_or(0.0, |(_, w)| *w);
        if share <= 0.0 || base == version {
            return; // Already rolled back by a concurrent request.
        }
        let from = state.spec.clone();
        let mut to = from.clone();
        to.weights.insert(version.to_string(), 0.0);
        *to.weights.entry(base.clone()).or_insert(0.0) += share;
        push_previous(&mut state.previous, Some(from.clone()));
        state.spec = to.clone();
        state.origin = Origin::Admin;
        let mut change = Change::now(id, "guard", "guard_rollback", Some(from), Some(to));
        change.reason = Some(format!("version `{version}`: {reason}"));
        tracing::warn!(model = id, version, reason = %reason, baseline = %base, "guard tripped: rolling the canary back");
        self.apply(saved, id, Some(state), change);
        self.metrics
            .versions
            .rollbacks
            .get_or_create(&RollbackLabels {
                model: id.to_string(),
                trigger: "guard".into(),
            })
            .inc();
    }

    /// Sets the weight gauges of `id`.
    pub fn export_weights(&self, id: &str, versions: &[String]) {
        let spec = self.spec(id);
        let weights = Self::weights(spec.as_ref(), versions);
        for v in versions {
            let share = weights
                .iter()
                .find(|(x, _)| x == v)
                .map_or(0.0, |(_, w)| *w);
            self.metrics
                .versions
                .route_weight
                .get_or_create(&RouteLabels {
                    model: id.to_string(),
                    version: v.clone(),
                })
                .set(share);
        }
    }
}

/// The version with the largest share (the older on a tie).
fn baseline(weights: &[(String, f64)]) -> Option<&(String, f64)> {
    weights.iter().rev().max_by(|a, b| a.1.total_cmp(&b.1))
}

/// What the guard of `spec` says of `version`, if it is a canary among
/// `weights` (the live ones: versions that exist).
fn judge_version(
    w: &Windows,
    id: &str,
    spec: &RouteSpec,
    weights: &[(String, f64)],
    version: &str,
) -> Option<String> {
    let guard = spec.guard.as_ref()?;
    let (base, _) = baseline(weights)?;
    let share = weights
        .iter()
        .find(|(v, _)| v == version)
        .map_or(0.0, |(_, w)| *w);
    if base == version || share <= 0.0 {
        return None;
    }
    let canary = w.figures(id, version, Traffic::Primary, guard.window);
    let baseline = w.figures(id, base, Traffic::Primary, guard.window);
    stats::judge(guard, &canary, &baseline)
}

/// Routes kept to roll back to, at most.
const MAX_PREVIOUS: usize = 100;

fn push_previous(previous: &mut Vec<Option<RouteSpec>>, route: Option<RouteSpec>) {
    previous.push(route);
    if previous.len() > MAX_PREVIOUS {
        previous.remove(0);
    }
}

#[cfg(test)]
mod tests;
