//! The lifecycle state machine of every model, behind one lock:
//! `cold → loading → warm ⇄ busy → draining → cold`, and `failed` after a
//! load error (retried with backoff). It accounts memory per device, evicts
//! idle models least recently used first, and unloads models whose
//! keep-alive ran out. How a model is fetched and loaded is the `Loader`'s.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Notify;

use crate::config::{KeepAlive, LifecycleConfig};
use crate::metrics::Metrics;
use crate::registry::RegistryError;

mod state;
pub use state::ModelState;

mod changes;
pub use changes::Refresh;
mod transitions;

/// Fetches, sizes and loads models for the lifecycle.
pub trait Loader: Send + Sync + 'static {
    /// A loaded model, cloned into each request's lease.
    type Model: Clone + Send + Sync + 'static;
    /// What `prepare` found, handed to `load`.
    type Plan: Send + 'static;
    /// Makes the weights available locally (downloading them if needed,
    /// reporting on `progress`) and estimates the model's memory in bytes.
    fn prepare(
        &self,
        id: &str,
        progress: Arc<Progress>,
    ) -> BoxFuture<'static, Result<(Self::Plan, u64), RegistryError>>;
    /// The model's estimate on `device` when it differs from the one
    /// `prepare` gave (a GPU holds weights in a narrower type).
    fn estimate_on(&self, plan: &Self::Plan, device: &str) -> Option<u64> {
        let _ = (plan, device);
        None
    }
    /// Loads the model onto `device`.
    fn load(
        &self,
        id: &str,
        plan: Self::Plan,
        device: &str,
    ) -> BoxFuture<'static, Result<Loaded<Self::Model>, RegistryError>>;
    /// The model's live batch figures.
    fn batch(model: &Self::Model) -> BatchSnapshot;
}

/// A resident model's queue, batch and KV cache, as its engine reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchSnapshot {
    /// Requests waiting for a place in the batch.
    pub waiting: usize,
    /// Sequences in the batch.
    pub running: usize,
    /// KV cache blocks in use.
    pub kv_blocks_used: usize,
    /// KV cache blocks in the pool.
    pub kv_blocks_total: usize,
    /// Prompt tokens computed since the model loaded.
    pub prompt_tokens: u64,
    /// Tokens generated since the model loaded.
    pub generated_tokens: u64,
    /// Tokens generated per second, over the last ten seconds.
    pub tokens_per_second: f64,
    /// Forward passes (batches) run since the model loaded.
    pub steps: u64,
    /// KV cache blocks holding a cached prompt prefix.
    pub prefix_cached_blocks: usize,
    /// Prompt tokens looked up in the prefix cache since the model loaded.
    pub prefix_queries: u64,
    /// Of those, tokens found (not computed again).
    pub prefix_hits: u64,
    /// Prompt-lookup draft tokens verified, and accepted, since load.
    pub drafts: (u64, u64),
}

/// A model the loader brought up.
pub struct Loaded<M> {
    /// The model.
    pub model: M,
    /// Its footprint as measured while loading, if the loader could measure it.
    pub measured: Option<u64>,
    /// Resolves once the model's memory is freed, after the last clone of
    /// `model` is dropped.
    pub stopped: BoxFuture<'static, ()>,
}

/// Download progress of a model's weights.
#[derive(Debug, Default)]
pub struct Progress {
    /// Whether a download is under way.
    pub active: AtomicBool,
    /// Bytes received.
    pub done: AtomicU64,
    /// Bytes expected.
    pub total: AtomicU64,
}

/// How a model may live.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The device it must go on (`None`: the one with the most free budget).
    pub device: Option<String>,
    /// Never evicted or expired.
    pub pin: bool,
    /// Keep-alive when a request names none.
    pub keep_alive: KeepAlive,
}

/// A device's memory budget.
#[derive(Debug, Clone)]
pub struct DeviceBudget {
    /// Bytes models may use.
    pub budget: u64,
    /// Bytes the device reports in all, if known.
    pub total: Option<u64>,
}

/// Why a model was unloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its keep-alive ran out.
    IdleExpired,
    /// Another model needed its memory.
    MemoryPressure,
    /// An operator asked.
    Admin,
    /// Its manifest changed what a load makes.
    Reload,
    /// Its manifest was removed.
    Removed,
}

impl Reason {
    fn name(self) -> &'static str {
        match self {
            Self::IdleExpired => "idle_expired",
            Self::MemoryPressure => "memory_pressure",
            Self::Admin => "admin",
            Self::Reload => "reload",
            Self::Removed => "removed",
        }
    }
}

type SharedLoad = Shared<BoxFuture<'static, Result<Duration, RegistryError>>>;
type SharedStop = Shared<BoxFuture<'static, ()>>;

enum Phase<M> {
    Cold,
    Loading(SharedLoad),
    Resident { model: M, stopped: SharedStop },
    Draining(SharedStop),
    Failed { reason: String, retry_at: Instant },
}

struct Slot<M> {
    policy: Policy,
    phase: Phase<M>,
    /// Leases held.
    in_flight: usize,
    /// Requests waiting on this model's load.
    pending: usize,
    keep_alive: KeepAlive,
    last_used: Option<(Instant, SystemTime)>,
    expires: Option<SystemTime>,
    timer: u64,
    device: Option<String>,
    charged: u64,
    estimate: Option<u64>,
    measured: Option<u64>,
    /// The device `measured` was taken on.
    measured_on: Option<String>,
    failures: u32,
    progress: Arc<Progress>,
    /// Its manifest is gone: it takes no new requests and leaves the
    /// catalog once unloaded.
    retired: bool,
    /// Its manifest changed while it loaded: unload once loaded, so the
    /// next request loads the new one.
    stale: bool,
}

impl<M> Slot<M> {
    fn new(policy: Policy) -> Self {
        Self {
            keep_alive: policy.keep_alive,
            policy,
            phase: Phase::Cold,
            in_flight: 0,
            pending: 0,
            last_used: None,
            expires: None,
            timer: 0,
            device: None,
            charged: 0,
            estimate: None,
            measured: None,
            measured_on: None,
            failures: 0,
            progress: Arc::default(),
            retired: false,
            stale: false,
        }
    }

    fn idle(&self) -> bool {
        matches!(self.phase, Phase::Resident { .. }) && self.in_flight == 0 && self.pending == 0
    }
}

struct State<M> {
    models: BTreeMap<String, Slot<M>>,
    devices: BTreeMap<String, DeviceBudget>,
}

impl<M> State<M> {
    fn used(&self, device: &str) -> u64 {
        self.models
            .values()
            .filter(|s| s.device.as_deref() == Some(device))
            .map(|s| s.charged)
            .sum()
    }
}

struct Core<L: Loader> {
    loader: L,
    settings: LifecycleConfig,
    state: Mutex<State<L::Model>>,
    /// Woken whenever memory may have come free or a model became idle.
    room: Notify,
    /// One load at a time per device, so measured footprints are not mixed up.
    load_locks: BTreeMap<String, tokio::sync::Mutex<()>>,
    metrics: Arc<Metrics>,
}

/// The lifecycle of every declared model.
pub struct Lifecycle<L: Loader> {
    core: Arc<Core<L>>,
}

/// A model in use by one request; dropping it ends the use, and the last
/// lease to go starts the model's keep-alive timer.
pub struct Lease<L: Loader> {
    core: Arc<Core<L>>,
    id: String,
    model: L::Model,
    keep_alive: Option<KeepAlive>,
    /// How long the load this request waited for took, if it waited.
    pub cold_load: Option<Duration>,
}

impl<L: Loader> std::ops::Deref for Lease<L> {
    type Target = L::Model;
    fn deref(&self) -> &L::Model {
        &self.model
    }
}

impl<L: Loader> Drop for Lease<L> {
    fn drop(&mut self) {
        self.core.release(&self.id, self.keep_alive);
    }
}

/// A model's state as users see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Where it is in its lifecycle.
    pub state: ModelState,
    /// The device it is on (or loading onto).
    pub device: Option<String>,
    /// Estimated bytes, once the weights' headers were read.
    pub estimated_bytes: Option<u64>,
    /// Measured bytes, once it has loaded.
    pub measured_bytes: Option<u64>,
    /// Bytes charged against its device now.
    pub charged_bytes: u64,
    /// When its last request ended.
    pub last_used: Option<SystemTime>,
    /// When it will be unloaded if no request comes.
    pub expires_at: Option<SystemTime>,
    /// Keep-alive that applies after its current requests.
    pub keep_alive: KeepAlive,
    /// Never evicted or expired.
    pub pinned: bool,
    /// Requests holding it.
    pub in_flight: usize,
    /// Requests waiting in its queue.
    pub queue_depth: usize,
    /// Its batch, while it is resident.
    pub batch: BatchSnapshot,
    /// `(done, total)` bytes while downloading.
    pub download: Option<(u64, u64)>,
    /// Why the last load failed, while that failure holds.
    pub error: Option<String>,
}

/// A device's accounting.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSnapshot {
    /// Its name.
    pub name: String,
    /// Bytes models may use.
    pub budget: u64,
    /// Bytes charged to models.
    pub used: u64,
    /// Bytes the device reports in all, if known.
    pub total: Option<u64>,
    /// Bytes the GPU's driver reports free now (all processes counted).
    pub driver_free: Option<u64>,
}

fn lock<M>(m: &Mutex<State<M>>) -> MutexGuard<'_, State<M>> {
    // Every update leaves the state consistent before it can panic, so a
    // poisoned lock is still sound to use.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn retry_secs(at: Instant) -> u64 {
    at.saturating_duration_since(Instant::now())
        .as_secs_f64()
        .ceil()
        .max(1.0) as u64
}

impl<L: Loader> Lifecycle<L> {
    /// A lifecycle over `models` placed on `devices`; all start cold.
    pub fn new(
        loader: L,
        settings: LifecycleConfig,
        devices: BTreeMap<String, DeviceBudget>,
        models: BTreeMap<String, Policy>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let models = models
            .into_iter()
            .map(|(id, policy)| (id, Slot::new(policy)))
            .collect();
        let load_locks = devices
            .keys()
            .map(|d| (d.clone(), Default::default()))
            .collect();
        let core = Core {
            loader,
            settings,
            state: Mutex::new(State { models, devices }),
            room: Notify::new(),
            load_locks,
            metrics,
        };
        Self {
            core: Arc::new(core),
        }
    }

    /// The model, loading it first if needed; waits while it loads or
    /// drains. `keep_alive` (from the request) applies once it ends.
    pub async fn acquire(
        &self,
        id: &str,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Lease<L>, RegistryError> {
        let core = &self.core;
        let mut cold_load = None;
        let mut waiting = None::<Pending<L>>;
        loop {
            let wait = {
                let mut st = lock(&core.state);
                let slot = st.models.get_mut(id).ok_or_else(|| unknown(id))?;
                if slot.retired {
                    return Err(RegistryError::NotFound(id.to_string()));
                }
                match &slot.phase {
                    Phase::Resident { model, .. } => {
                        let model = model.clone();
                        slot.in_flight += 1;
                        slot.timer += 1;
                        slot.expires = None;
                        if let Some(p) = waiting.take() {
                            p.claim(slot);
                        }
                        return Ok(Lease {
                            core: core.clone(),
                            id: id.to_string(),
                            model,
                            keep_alive,
                            cold_load,
                        });
                    }
                    Phase::Loading(load) => Wait::Load(load.clone()),
                    Phase::Draining(stop) => Wait::Stop(stop.clone()),
                    Phase::Failed { reason, retry_at } if *retry_at > Instant::now() => {
                        return Err(RegistryError::LoadFailed {
                            model: id.to_string(),
                            reason: format!("{reason} (the next attempt is held back)"),
                            retry_after: Some(retry_secs(*retry_at)),
                        });
                    }
                    Phase::Cold | Phase::Failed { .. } => Wait::Load(core.start_load(id, slot)),
                }
            };
            match wait {
                Wait::Load(load) => {
                    if waiting.is_none() {
                        waiting = Some(Pending::new(core, id));
                    }
                    cold_load = Some(load.await?);
                }
                Wait::Stop(stop) => stop.await,
            }
        }
    }

    /// Unloads the model now (reason `admin`): at once if idle, after its
    /// in-flight requests otherwise. Resolves when its memory is freed.
    pub fn unload(&self, id: &str) -> Result<BoxFuture<'static, ()>, super::RegistryError> {
        let core = &self.core;
        let mut st = lock(&core.state);
        let slot = st
            .models
            .get_mut(id)
            .ok_or_else(|| super::RegistryError::NotFound(id.to_string()))?;
        let stop = match &slot.phase {
            Phase::Loading(_) => return Err(super::RegistryError::Loading(id.to_string())),
            Phase::Failed { .. } => {
                // An operator's unload also clears a failure's backoff.
                slot.phase = Phase::Cold;
                slot.failures = 0;
                None
            }
            Phase::Draining(stop) => Some(stop.clone()),
            Phase::Resident { .. } => core.begin_unload(id, slot, Reason::Admin),
            Phase::Cold => None,
        };
        Ok(match stop {
            Some(s) => s.boxed(),
            None => futures::future::ready(()).boxed(),
        })
    }

    /// Unloads every resident model (at shutdown).
    pub fn unload_all(&self) {
        let mut st = lock(&self.core.state);
        for (id, slot) in st.models.iter_mut() {
            if matches!(slot.phase, Phase::Resident { .. }) {
                self.core.begin_unload(id, slot, Reason::Admin);
            }
        }
    }

    /// Records an estimate made ahead of any load (shown to users).
    pub fn note_estimate(&self, id: &str, bytes: u64) {
        if let Some(slot) = lock(&self.core.state).models.get_mut(id) {
            slot.estimate = Some(bytes);
        }
    }

    /// One model's state.
    pub fn snapshot(&self, id: &str) -> Option<Snapshot> {
        lock(&self.core.state).models.get(id).map(snapshot::<L>)
    }

    /// Every model's state, by id.
    pub fn snapshots(&self) -> BTreeMap<String, Snapshot> {
        let st = lock(&self.core.state);
        st.models
            .iter()
            .map(|(id, s)| (id.clone(), snapshot::<L>(s)))
            .collect()
    }

    /// Every device's accounting.
    pub fn devices(&self) -> Vec<DeviceSnapshot> {
        let st = lock(&self.core.state);
        st.devices
            .iter()
            .map(|(name, d)| DeviceSnapshot {
                name: name.clone(),
                budget: d.budget,
                used: st.used(name),
                total: d.total,
                driver_free: None,
            })
            .collect()
    }
}

/// The model is not (or no longer) in the catalog: its manifest was
/// removed while the request was on its way.
fn unknown(id: &str) -> RegistryError {
    RegistryError::NotFound(id.to_string())
}

fn snapshot<L: Loader>(s: &Slot<L::Model>) -> Snapshot {
    let downloading = s.progress.active.load(Ordering::Relaxed);
    let state = match &s.phase {
        Phase::Cold => ModelState::Cold,
        Phase::Loading(_) if downloading => ModelState::Downloading,
        Phase::Loading(_) => ModelState::Loading,
        Phase::Resident { .. } if s.in_flight > 0 => ModelState::Busy,
        Phase::Resident { .. } => ModelState::Warm,
        Phase::Draining(_) => ModelState::Draining,
        Phase::Failed { .. } => ModelState::Failed,
    };
    let batch = match &s.phase {
        Phase::Resident { model, .. } => L::batch(model),
        _ => BatchSnapshot::default(),
    };
    Snapshot {
        state,
        device: s.device.clone(),
        estimated_bytes: s.estimate,
        measured_bytes: s.measured,
        charged_bytes: s.charged,
        last_used: s.last_used.map(|(_, t)| t),
        expires_at: s.expires,
        keep_alive: s.keep_alive,
        pinned: s.policy.pin,
        in_flight: s.in_flight,
        queue_depth: batch.waiting,
        batch,
        download: downloading.then(|| {
            (
                s.progress.done.load(Ordering::Relaxed),
                s.progress.total.load(Ordering::Relaxed),
            )
        }),
        error: match &s.phase {
            Phase::Failed { reason, .. } => Some(reason.clone()),
            _ => None,
        },
    }
}

enum Wait {
    Load(SharedLoad),
    Stop(SharedStop),
}

/// A request waiting on a load: counted so the model is not expired or
/// evicted between the load ending and the request taking its lease.
struct Pending<L: Loader> {
    core: Weak<Core<L>>,
    id: String,
    claimed: bool,
}

impl<L: Loader> Pending<L> {
    fn new(core: &Arc<Core<L>>, id: &str) -> Self {
        if let Some(slot) = lock(&core.state).models.get_mut(id) {
            slot.pending += 1;
        }
        Self {
            core: Arc::downgrade(core),
            id: id.to_string(),
            claimed: false,
        }
    }

    /// Turns the wait into a lease, under the lock the caller holds.
    fn claim(mut self, slot: &mut Slot<L::Model>) {
        slot.pending = slot.pending.saturating_sub(1);
        self.claimed = true;
    }
}

impl<L: Loader> Drop for Pending<L> {
    fn drop(&mut self) {
        if self.claimed {
            return;
        }
        // The request gave up (failed load, or the client left).
        if let Some(core) = self.core.upgrade() {
            let mut st = lock(&core.state);
            if let Some(slot) = st.models.get_mut(&self.id) {
                slot.pending = slot.pending.saturating_sub(1);
                if slot.idle() {
                    core.arm_keep_alive(&self.id, slot);
                }
            }
            drop(st);
            core.room.notify_waiters();
        }
    }
}
