//! The lifecycle's transitions: load (prepare, reserve room, load), keep-alive
//! timers, unload and the release of memory.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use futures::future::FutureExt;

use super::{
    lock, unknown, Core, KeepAlive, Loaded, Loader, Phase, Progress, Reason, SharedLoad,
    SharedStop, Slot, State,
};
use crate::metrics::{EvictionLabels, LoadLabels, Metrics};
use crate::registry::evict::{choose_victims, Candidate};
use crate::registry::RegistryError;

impl<L: Loader> Core<L> {
    pub(super) fn release(self: &Arc<Self>, id: &str, keep_alive: Option<KeepAlive>) {
        let mut st = lock(&self.state);
        let Some(slot) = st.models.get_mut(id) else {
            return;
        };
        slot.in_flight = slot.in_flight.saturating_sub(1);
        slot.last_used = Some((Instant::now(), SystemTime::now()));
        slot.keep_alive = keep_alive.unwrap_or(slot.policy.keep_alive);
        if slot.idle() {
            self.arm_keep_alive(id, slot);
        }
        drop(st);
        // An idle model may be evicted by a load that is waiting for room.
        self.room.notify_waiters();
    }

    /// Starts the idle timer of a resident model with nothing in flight.
    pub(super) fn arm_keep_alive(self: &Arc<Self>, id: &str, slot: &mut Slot<L::Model>) {
        if slot.policy.pin || !slot.idle() {
            return;
        }
        slot.timer += 1;
        let generation = slot.timer;
        let ttl = match slot.keep_alive {
            KeepAlive::Forever => {
                slot.expires = None;
                return;
            }
            KeepAlive::For(d) if d.is_zero() => {
                self.begin_unload(id, slot, Reason::IdleExpired);
                return;
            }
            KeepAlive::For(d) => d,
        };
        slot.expires = Some(SystemTime::now() + ttl);
        let core = Arc::downgrade(self);
        let id = id.to_string();
        let deadline = tokio::time::Instant::now() + ttl;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep_until(deadline).await;
                if let Some(core) = core.upgrade() {
                    core.expire(&id, generation);
                }
            });
        }
    }

    fn expire(self: &Arc<Self>, id: &str, generation: u64) {
        let mut st = lock(&self.state);
        if let Some(slot) = st.models.get_mut(id) {
            if slot.timer == generation && slot.idle() && !slot.policy.pin {
                tracing::info!(model = id, keep_alive = %slot.keep_alive, "keep-alive expired");
                self.begin_unload(id, slot, Reason::IdleExpired);
            }
        }
    }

    /// Moves a resident model to draining; its memory is released once its
    /// worker has stopped.
    pub(super) fn begin_unload(
        self: &Arc<Self>,
        id: &str,
        slot: &mut Slot<L::Model>,
        reason: Reason,
    ) -> Option<SharedStop> {
        let Phase::Resident { stopped, .. } = &slot.phase else {
            return None;
        };
        let core = Arc::downgrade(self);
        let owned = id.to_string();
        let worker_stopped = stopped.clone();
        // Resolves once the worker has stopped and the memory is accounted
        // free; requests for the model wait on it before loading it again.
        let released = async move {
            worker_stopped.await;
            if let Some(core) = core.upgrade() {
                core.finish_unload(&owned);
            }
        }
        .boxed()
        .shared();
        // Dropping the registry's clone of the model lets its worker exit
        // once the in-flight requests release theirs.
        slot.phase = Phase::Draining(released.clone());
        slot.timer += 1;
        slot.expires = None;
        tracing::info!(
            model = id,
            reason = reason.name(),
            in_flight = slot.in_flight,
            "unloading model"
        );
        self.metrics
            .evictions
            .get_or_create(&EvictionLabels {
                model: id.to_string(),
                reason: reason.name().to_string(),
            })
            .inc();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(released.clone());
        }
        Some(released)
    }

    fn finish_unload(&self, id: &str) {
        let mut st = lock(&self.state);
        if let Some(slot) = st.models.get_mut(id) {
            if matches!(slot.phase, Phase::Draining(_)) {
                slot.phase = Phase::Cold;
                slot.charged = 0;
                slot.device = None;
                if slot.retired {
                    st.models.remove(id);
                }
            }
        }
        drop(st);
        crate::registry::memory::release_free_heap();
        tracing::info!(model = id, "model memory released");
        self.room.notify_waiters();
    }

    pub(super) fn start_load(self: &Arc<Self>, id: &str, slot: &mut Slot<L::Model>) -> SharedLoad {
        let core = self.clone();
        let owned = id.to_string();
        let task = tokio::spawn(async move { core.run_load(&owned).await });
        let model = id.to_string();
        let load = async move {
            task.await.unwrap_or_else(|e| {
                Err(RegistryError::LoadFailed {
                    model,
                    reason: format!("load task failed: {e}"),
                    retry_after: None,
                })
            })
        }
        .boxed()
        .shared();
        slot.phase = Phase::Loading(load.clone());
        load
    }

    async fn run_load(self: Arc<Self>, id: &str) -> Result<Duration, RegistryError> {
        let started = Instant::now();
        let progress = lock(&self.state)
            .models
            .get(id)
            .map(|s| s.progress.clone())
            .unwrap_or_default();
        tracing::info!(model = id, "loading model");
        let result = self.load_steps(id, progress.clone()).await;
        progress.active.store(false, Ordering::Relaxed);
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.metrics
            .loads
            .get_or_create(&LoadLabels {
                model: id.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        let mut st = lock(&self.state);
        let Some(slot) = st.models.get_mut(id) else {
            return Err(unknown(id));
        };
        match result {
            Ok(loaded) => {
                let took = started.elapsed();
                self.metrics
                    .load_seconds
                    .get_or_create(&Metrics::model(id))
                    .observe(took.as_secs_f64());
                if let Some(m) = loaded.measured {
                    slot.measured = Some(m);
                    slot.measured_on = slot.device.clone();
                    slot.charged = m;
                }
                slot.failures = 0;
                slot.phase = Phase::Resident {
                    model: loaded.model,
                    stopped: loaded.stopped.shared(),
                };
                tracing::info!(
                    model = id,
                    elapsed_ms = took.as_millis() as u64,
                    estimated_bytes = slot.estimate,
                    measured_bytes = slot.measured,
                    "model ready"
                );
                if slot.stale || slot.retired {
                    // Its manifest changed or went while it loaded.
                    slot.stale = false;
                    let reason = if slot.retired {
                        Reason::Removed
                    } else {
                        Reason::Reload
                    };
                    self.begin_unload(id, slot, reason);
                } else {
                    // Nobody may be waiting (every client left): start the timer.
                    self.arm_keep_alive(id, slot);
                }
                Ok(took)
            }
            Err(e) => {
                slot.charged = 0;
                slot.device = None;
                match &e {
                    // Not the model's fault: the next request tries afresh.
                    RegistryError::NoRoom { .. } => slot.phase = Phase::Cold,
                    _ => {
                        slot.failures += 1;
                        let backoff = self
                            .settings
                            .retry_backoff
                            .saturating_mul(1 << (slot.failures - 1).min(16))
                            .min(self.settings.max_retry_backoff);
                        slot.phase = Phase::Failed {
                            reason: e.to_string(),
                            retry_at: Instant::now() + backoff,
                        };
                        tracing::warn!(model = id, error = %e, retry_in_s = backoff.as_secs_f64(), "model load failed");
                    }
                }
                if slot.retired {
                    st.models.remove(id);
                }
                drop(st);
                self.room.notify_waiters();
                Err(e)
            }
        }
    }

    async fn load_steps(
        self: &Arc<Self>,
        id: &str,
        progress: Arc<Progress>,
    ) -> Result<Loaded<L::Model>, RegistryError> {
        let (plan, estimate) = self.loader.prepare(id, progress).await?;
        let (need, device) = {
            let mut st = lock(&self.state);
            let need_on = |device: &str| -> u64 {
                let slot = st.models.get(id);
                match slot.and_then(|s| {
                    s.measured
                        .filter(|_| s.measured_on.as_deref() == Some(device))
                }) {
                    Some(m) => m,
                    None => self.loader.estimate_on(&plan, device).unwrap_or(estimate),
                }
            };
            let (device, need) = self.place(&st, id, need_on);
            let slot = st.models.get_mut(id).ok_or_else(|| unknown(id))?;
            slot.estimate = Some(estimate);
            (need, device)
        };
        let Some(load_lock) = self.load_locks.get(&device) else {
            return Err(RegistryError::LoadFailed {
                model: id.to_string(),
                reason: format!("device `{device}` is not declared"),
                retry_after: None,
            });
        };
        let _one_load_per_device = load_lock.lock().await;
        self.reserve(id, &device, need).await?;
        self.loader.load(id, plan, &device).await
    }

    /// The model's device and its need there: the manifest's device, else
    /// the GPU with the most free budget that fits it, else the CPU if it
    /// fits, else the GPU (or the CPU) where evicting idle models could
    /// make room.
    fn place(
        &self,
        st: &State<L::Model>,
        id: &str,
        need_on: impl Fn(&str) -> u64,
    ) -> (String, u64) {
        if let Some(d) = st.models.get(id).and_then(|s| s.policy.device.clone()) {
            let need = need_on(&d);
            return (d, need);
        }
        struct Placement<'a> {
            name: &'a String,
            gpu: bool,
            need: u64,
            free: u64,
            budget: u64,
        }
        let options: Vec<Placement> = st
            .devices
            .iter()
            .map(|(name, d)| Placement {
                name,
                gpu: name != "cpu",
                need: need_on(name),
                free: d.budget.saturating_sub(st.used(name)),
                budget: d.budget,
            })
            .collect();
        let best = |fits: &dyn Fn(&Placement) -> bool| {
            options
                .iter()
                .filter(|o| fits(o))
                .max_by_key(|o| o.free)
                .map(|o| (o.name.clone(), o.need))
        };
        best(&|o| o.gpu && o.need <= o.free)
            .or_else(|| best(&|o| !o.gpu && o.need <= o.free))
            .or_else(|| best(&|o| o.gpu && o.need <= o.budget))
            .unwrap_or_else(|| ("cpu".to_string(), need_on("cpu")))
    }

    /// Charges `need` bytes to `device` for `id`, evicting idle models if
    /// that makes room, else waiting for room up to the load timeout.
    async fn reserve(
        self: &Arc<Self>,
        id: &str,
        device: &str,
        need: u64,
    ) -> Result<(), RegistryError> {
        let deadline = tokio::time::Instant::now() + self.settings.load_timeout;
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let stops = {
                let mut st = lock(&self.state);
                let budget = st.devices.get(device).map_or(0, |d| d.budget);
                if need > budget {
                    return Err(RegistryError::NoRoom {
                        message: format!(
                            "model `{id}` needs an estimated {need} bytes but device `{device}` has a budget of {budget} bytes; it can never fit (raise devices.{device}.budget or shorten its context_length)"
                        ),
                        retry_after: None,
                    });
                }
                let used = st.used(device);
                if used + need <= budget {
                    if let Some(slot) = st.models.get_mut(id) {
                        slot.charged = need;
                        slot.device = Some(device.to_string());
                    }
                    return Ok(());
                }
                let candidates: Vec<Candidate> = st
                    .models
                    .iter()
                    .filter(|(_, s)| {
                        s.device.as_deref() == Some(device) && s.idle() && !s.policy.pin
                    })
                    .map(|(id, s)| Candidate {
                        id: id.clone(),
                        bytes: s.charged,
                        last_used: s.last_used.map_or_else(Instant::now, |(i, _)| i),
                    })
                    .collect();
                match choose_victims(candidates, used + need - budget) {
                    Some(victims) => victims
                        .iter()
                        .filter_map(|v| {
                            let slot = st.models.get_mut(v)?;
                            self.begin_unload(v, slot, Reason::MemoryPressure)
                        })
                        .collect::<Vec<_>>(),
                    None => Vec::new(),
                }
            };
            let waited = if stops.is_empty() {
                tokio::time::timeout_at(deadline, notified).await.is_ok()
            } else {
                tokio::time::timeout_at(deadline, futures::future::join_all(stops))
                    .await
                    .is_ok()
            };
            if !waited {
                let st = lock(&self.state);
                let budget = st.devices.get(device).map_or(0, |d| d.budget);
                return Err(RegistryError::NoRoom {
                    message: format!(
                        "no room to load model `{id}` (needs {need} bytes): device `{device}` has {} of {budget} bytes in use by models that are busy or pinned",
                        st.used(device)
                    ),
                    retry_after: Some(5),
                });
            }
        }
    }
}
