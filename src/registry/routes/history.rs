//! The routes' saved state: every route changed at run time, the routes
//! each can roll back to, and the history of changes (who, when, from →
//! to), in one JSON file in the store, replaced atomically on each change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::config::RouteSpec;

/// History entries kept, oldest dropped first.
const MAX_HISTORY: usize = 10_000;

/// Where a route in effect came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// `[routes]` in the config file.
    Config,
    /// The admin API (or the guard acting on it).
    Admin,
}

/// One id's route as set, with what it replaced. `None` in `previous` is
/// the default route (all traffic to the newest version).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteState {
    /// The route.
    pub spec: RouteSpec,
    /// Where it came from.
    pub origin: Origin,
    /// Routes to roll back to, most recent last.
    #[serde(default)]
    pub previous: Vec<Option<RouteSpec>>,
}

/// One change to a route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Change {
    /// The model id.
    pub id: String,
    /// When, Unix milliseconds.
    pub at_ms: i64,
    /// When, RFC 3339.
    pub at: String,
    /// The API key's name, `guard`, or `anonymous` on an open daemon.
    pub actor: String,
    /// `set`, `promote`, `rollback`, `guard_rollback` or `reset`.
    pub action: String,
    /// The route before (`null`: the default route).
    pub from: Option<RouteSpec>,
    /// The route after (`null`: the default route).
    pub to: Option<RouteSpec>,
    /// Why, for automatic changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Change {
    /// A change made now.
    pub fn now(
        id: &str,
        actor: &str,
        action: &str,
        from: Option<RouteSpec>,
        to: Option<RouteSpec>,
    ) -> Self {
        let now = std::time::SystemTime::now();
        let at_ms = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Self {
            id: id.to_string(),
            at_ms,
            at: humantime::format_rfc3339_millis(now).to_string(),
            actor: actor.to_string(),
            action: action.to_string(),
            from,
            to,
            reason: None,
        }
    }
}

/// The file's contents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Saved {
    /// Routes set at run time, by id.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteState>,
    /// Changes, oldest first.
    #[serde(default)]
    pub history: Vec<Change>,
}

/// The file in the store.
pub struct SavedFile {
    path: Option<PathBuf>,
    /// Numbers the states handed to `save`.
    generation: AtomicU64,
    /// The newest state written, so a slow write never overwrites a newer.
    written: Arc<Mutex<u64>>,
}

impl SavedFile {
    /// `routes.json` in `store`; `None` keeps nothing on disk.
    pub fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            generation: AtomicU64::new(0),
            written: Arc::default(),
        }
    }

    /// What the file holds; a missing file is an empty state, an unreadable
    /// one is logged and set aside (renamed `.bad`) so the daemon starts.
    pub fn load(&self) -> Saved {
        let Some(path) = &self.path else {
            return Saved::default();
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Saved::default(),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the saved routes; starting from the config's");
                return Saved::default();
            }
        };
        match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => {
                let bad = path.with_extension("json.bad");
                let _ = std::fs::rename(path, &bad);
                tracing::warn!(file = %path.display(), moved_to = %bad.display(), error = %e, "saved routes unreadable; starting from the config's");
                Saved::default()
            }
        }
    }

    /// Replaces the file with `saved` (write, sync, rename), off the
    /// caller's thread when a runtime is there: changes are made on the
    /// request path (the guard), and a disk's sync must not hold it up.
    pub fn save(&self, saved: &mut Saved) {
        let Some(path) = self.path.clone() else {
            return;
        };
        if saved.history.len() > MAX_HISTORY {
            let cut = saved.history.len() - MAX_HISTORY;
            saved.history.drain(..cut);
        }
        let snapshot = saved.clone();
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let written = self.written.clone();
        let write = move || {
            let mut last = written.lock().unwrap_or_else(|e| e.into_inner());
            if generation <= *last {
                return;
            }
            if let Err(e) = write_atomic(&path, &snapshot) {
                tracing::error!(file = %path.display(), error = %e, "cannot save routes; the change holds until restart");
            }
            *last = generation;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(write)),
            Err(_) => write(),
        }
    }
}

fn write_atomic(path: &Path, saved: &Saved) -> std::io::Result<()> {
    use std::io::Write;
    let text = serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
