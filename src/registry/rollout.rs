//! The registry's side of rollouts: routes of ids with versions, checked
//! against the versions the catalog holds now.

use std::time::Duration;

use super::routes::{Change, Comparison, Outcome, RouteView};
use super::{Registry, RegistryError};
use crate::config::RouteSpec;
use crate::metrics::Traffic;

impl Registry {
    fn versions_of(&self, id: &str) -> Result<Vec<String>, RegistryError> {
        let versions = self.versions(id);
        if versions.is_empty() {
            return Err(if self.entries().contains_key(id) {
                RegistryError::BadRoute(format!(
                    "`{id}` has no versions to route between: give its manifests a `version`"
                ))
            } else {
                RegistryError::NotFound(id.to_string())
            });
        }
        Ok(versions)
    }

    /// Every id with versions, and its route.
    pub fn routes(&self) -> Vec<RouteView> {
        let ids: std::collections::BTreeSet<String> = self
            .entries()
            .values()
            .filter(|e| e.manifest.version.is_some())
            .map(|e| e.manifest.id.clone())
            .collect();
        ids.iter()
            .map(|id| self.routes.view(id, &self.versions(id)))
            .collect()
    }

    /// One id's route.
    pub fn route(&self, id: &str) -> Result<RouteView, RegistryError> {
        Ok(self.routes.view(id, &self.versions_of(id)?))
    }

    /// Sets an id's route; `actor` is recorded in its history.
    pub fn set_route(
        &self,
        id: &str,
        spec: RouteSpec,
        actor: &str,
    ) -> Result<RouteView, RegistryError> {
        self.routes.set(id, &self.versions_of(id)?, spec, actor)
    }

    /// Sends all of an id's traffic to `version` (default: the candidate).
    pub fn promote(
        &self,
        id: &str,
        version: Option<String>,
        actor: &str,
    ) -> Result<RouteView, RegistryError> {
        self.routes
            .promote(id, &self.versions_of(id)?, version, actor)
    }

    /// Puts back the route before the last change.
    pub fn rollback(&self, id: &str, actor: &str) -> Result<RouteView, RegistryError> {
        self.routes.rollback(id, &self.versions_of(id)?, actor)
    }

    /// Back to the config's route (or the default).
    pub fn reset_route(&self, id: &str, actor: &str) -> Result<RouteView, RegistryError> {
        Ok(self.routes.reset(id, &self.versions_of(id)?, actor))
    }

    /// An id's route history (every id's with `None`).
    pub fn route_history(&self, id: Option<&str>) -> Result<Vec<Change>, RegistryError> {
        if let Some(id) = id {
            self.versions_of(id)?;
        }
        Ok(self.routes.history(id))
    }

    /// Canary against baseline.
    pub fn compare(&self, id: &str, window: Option<Duration>) -> Result<Comparison, RegistryError> {
        Ok(self.routes.compare(id, &self.versions_of(id)?, window))
    }

    /// Records how a request to a version went (and lets its route's guard
    /// judge it).
    pub fn observe(&self, id: &str, version: &str, traffic: Traffic, outcome: &Outcome) {
        self.routes
            .observe(id, version, &self.versions(id), traffic, outcome);
    }

    /// Brings the route weight gauges up to date.
    pub(super) fn export_routes(&self) {
        for view in self.routes() {
            self.routes.export_weights(&view.id, &view.versions);
        }
    }
}
