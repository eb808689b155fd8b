//! The lifecycle state machine under paused tokio time, with a loader whose
//! models are plain values of a declared size (the engine's real loads are
//! covered by the integration tests).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use tokio::sync::oneshot;

use super::lifecycle::{DeviceBudget, Lifecycle, Loaded, Loader, Policy, Progress};
use crate::config::{KeepAlive, LifecycleConfig};
use crate::metrics::Metrics;
use crate::registry::RegistryError;

/// Signals its owner's loader when the last clone of a model is dropped.
struct Alive(Option<oneshot::Sender<()>>);

impl Drop for Alive {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[derive(Default)]
struct SizedLoader {
    sizes: BTreeMap<String, u64>,
    loads: Mutex<BTreeMap<String, usize>>,
    failing: Mutex<Vec<String>>,
    load_time: Duration,
}

impl SizedLoader {
    fn loads(&self, id: &str) -> usize {
        self.loads.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

impl Loader for Arc<SizedLoader> {
    type Model = Arc<Alive>;
    type Plan = String;

    fn prepare(
        &self,
        id: &str,
        _progress: Arc<Progress>,
    ) -> BoxFuture<'static, Result<(String, u64), RegistryError>> {
        let size = self.sizes[id];
        let id = id.to_string();
        async move { Ok((id, size)) }.boxed()
    }

    /// GPUs hold these models in half the bytes.
    fn estimate_on(&self, id: &String, device: &str) -> Option<u64> {
        device.starts_with("cuda:").then(|| self.sizes[id] / 2)
    }

    fn load(
        &self,
        _id: &str,
        id: String,
        device: &str,
    ) -> BoxFuture<'static, Result<Loaded<Arc<Alive>>, RegistryError>> {
        let this = self.clone();
        let measured = self.estimate_on(&id, device).unwrap_or(self.sizes[&id]);
        async move {
            *this.loads.lock().unwrap().entry(id.clone()).or_default() += 1;
            tokio::time::sleep(this.load_time).await;
            if this.failing.lock().unwrap().contains(&id) {
                return Err(RegistryError::LoadFailed {
                    model: id,
                    reason: "corrupt header".into(),
                    retry_after: None,
                });
            }
            let (tx, rx) = oneshot::channel();
            Ok(Loaded {
                model: Arc::new(Alive(Some(tx))),
                measured: Some(measured),
                stopped: rx.map(|_| ()).boxed(),
            })
        }
        .boxed()
    }

    fn batch(_: &Arc<Alive>) -> super::lifecycle::BatchSnapshot {
        Default::default()
    }
}

struct Fixture {
    life: Lifecycle<Arc<SizedLoader>>,
    loader: Arc<SizedLoader>,
    metrics: Arc<Metrics>,
}

const FIVE_MIN: Duration = Duration::from_secs(300);

fn fixture(budget: u64, models: &[(&str, u64, bool)]) -> Fixture {
    fixture_on(&[("cpu", budget)], models, &[])
}

/// Devices with budgets; `placed` pins models to devices.
fn fixture_on(
    budgets: &[(&str, u64)],
    models: &[(&str, u64, bool)],
    placed: &[(&str, &str)],
) -> Fixture {
    let loader = Arc::new(SizedLoader {
        sizes: models
            .iter()
            .map(|(id, s, _)| (id.to_string(), *s))
            .collect(),
        load_time: Duration::from_millis(100),
        ..Default::default()
    });
    let settings = LifecycleConfig {
        keep_alive: KeepAlive::For(FIVE_MIN),
        load_timeout: Duration::from_secs(30),
        retry_backoff: Duration::from_secs(5),
        max_retry_backoff: Duration::from_secs(60),
    };
    let devices = budgets
        .iter()
        .map(|(name, budget)| {
            let budget = DeviceBudget {
                budget: *budget,
                total: None,
            };
            (name.to_string(), budget)
        })
        .collect();
    let policies = models
        .iter()
        .map(|(id, _, pin)| {
            let device = placed
                .iter()
                .find(|(m, _)| m == id)
                .map(|(_, d)| d.to_string());
            let policy = Policy {
                device,
                pin: *pin,
                keep_alive: settings.keep_alive,
            };
            (id.to_string(), policy)
        })
        .collect();
    let metrics = Arc::new(Metrics::new());
    let life = Lifecycle::new(loader.clone(), settings, devices, policies, metrics.clone());
    Fixture {
        life,
        loader,
        metrics,
    }
}

impl Fixture {
    fn state(&self, id: &str) -> &'static str {
        self.life.snapshot(id).unwrap().state.as_str()
    }
}

/// Lets spawned tasks (timers, unload bookkeeping) run.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

async fn wait(d: Duration) {
    tokio::time::sleep(d).await;
    settle().await;
}

#[tokio::test(start_paused = true)]
async fn keep_alive_runs_from_the_end_of_the_last_request() {
    let f = fixture(1000, &[("a", 100, false)]);
    let first = f.life.acquire("a", None).await.unwrap();
    let second = f.life.acquire("a", None).await.unwrap();
    assert_eq!(f.state("a"), "busy");
    drop(first);
    wait(FIVE_MIN * 2).await;
    assert_eq!(f.state("a"), "busy", "a request is still in flight");
    drop(second);
    settle().await;
    assert_eq!(f.state("a"), "warm");
    assert!(f.life.snapshot("a").unwrap().expires_at.is_some());
    wait(FIVE_MIN - Duration::from_secs(1)).await;
    assert_eq!(f.state("a"), "warm");
    wait(Duration::from_secs(2)).await;
    assert_eq!(f.state("a"), "cold");
    assert_eq!(f.life.devices()[0].used, 0);
    assert!(f.metrics.render().contains("reason=\"idle_expired\"} 1"));
}

#[tokio::test(start_paused = true)]
async fn a_new_request_restarts_the_timer() {
    let f = fixture(1000, &[("a", 100, false)]);
    drop(f.life.acquire("a", None).await.unwrap());
    wait(Duration::from_secs(200)).await;
    drop(f.life.acquire("a", None).await.unwrap());
    wait(Duration::from_secs(200)).await;
    assert_eq!(f.state("a"), "warm", "the first timer was cancelled");
    wait(Duration::from_secs(101)).await;
    assert_eq!(f.state("a"), "cold");
    assert_eq!(f.loader.loads("a"), 1);
}

#[tokio::test(start_paused = true)]
async fn per_request_keep_alive_zero_and_forever() {
    let f = fixture(1000, &[("a", 100, false)]);
    let zero = KeepAlive::For(Duration::ZERO);
    drop(f.life.acquire("a", Some(zero)).await.unwrap());
    settle().await;
    assert_eq!(f.state("a"), "cold", "keep_alive 0 unloads at once");
    drop(f.life.acquire("a", Some(KeepAlive::Forever)).await.unwrap());
    wait(Duration::from_secs(86_400)).await;
    assert_eq!(f.state("a"), "warm", "keep_alive -1 never expires");
    let short = KeepAlive::For(Duration::from_secs(30));
    drop(f.life.acquire("a", Some(short)).await.unwrap());
    wait(Duration::from_secs(31)).await;
    assert_eq!(f.state("a"), "cold");
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_share_one_load() {
    let f = fixture(1000, &[("a", 100, false)]);
    let leases = futures::future::join_all((0..20).map(|_| f.life.acquire("a", None))).await;
    assert!(leases.iter().all(|l| l.is_ok()));
    assert_eq!(f.loader.loads("a"), 1);
    assert!(leases
        .iter()
        .all(|l| l.as_ref().unwrap().cold_load.is_some()));
    assert_eq!(f.life.snapshot("a").unwrap().in_flight, 20);
}

#[tokio::test(start_paused = true)]
async fn pressure_evicts_the_least_recently_used_idle_model() {
    let f = fixture(
        250,
        &[("a", 100, false), ("b", 100, false), ("c", 100, false)],
    );
    drop(f.life.acquire("a", None).await.unwrap());
    wait(Duration::from_secs(1)).await;
    drop(f.life.acquire("b", None).await.unwrap());
    let c = f.life.acquire("c", None).await.unwrap();
    assert_eq!(
        (f.state("a"), f.state("b"), f.state("c")),
        ("cold", "warm", "busy")
    );
    assert_eq!(f.life.devices()[0].used, 200);
    drop(c);
    assert!(f
        .metrics
        .render()
        .contains("kindling_model_evictions_total{model=\"a\",reason=\"memory_pressure\"} 1"));
}

#[tokio::test(start_paused = true)]
async fn busy_and_pinned_models_are_never_evicted() {
    let f = fixture(
        250,
        &[
            ("pinned", 100, true),
            ("busy", 100, false),
            ("c", 100, false),
        ],
    );
    drop(f.life.acquire("pinned", None).await.unwrap());
    let busy = f.life.acquire("busy", None).await.unwrap();
    let err = f.life.acquire("c", None).await.err().unwrap();
    match err {
        RegistryError::NoRoom { retry_after, .. } => assert!(retry_after.is_some()),
        other => panic!("expected NoRoom, got {other:?}"),
    }
    assert_eq!((f.state("pinned"), f.state("busy")), ("warm", "busy"));
    assert_eq!(f.state("c"), "cold", "a timeout is not a model failure");
    // Once the busy model's request ends, a waiting load evicts it.
    let life = &f.life;
    let waiting = async { life.acquire("c", None).await };
    let release = async {
        wait(Duration::from_secs(3)).await;
        drop(busy);
    };
    let (c, ()) = tokio::join!(waiting, release);
    assert!(c.is_ok());
    assert_eq!((f.state("pinned"), f.state("busy")), ("warm", "cold"));
    // A pinned model never expires either.
    wait(Duration::from_secs(86_400)).await;
    assert_eq!(f.state("pinned"), "warm");
}

#[tokio::test(start_paused = true)]
async fn a_model_that_can_never_fit_fails_at_once() {
    let f = fixture(250, &[("huge", 1000, false)]);
    match f.life.acquire("huge", None).await.err().unwrap() {
        RegistryError::NoRoom {
            message,
            retry_after: None,
        } => assert!(
            message.contains("1000") && message.contains("250"),
            "{message}"
        ),
        other => panic!("expected NoRoom, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn failed_loads_are_retried_with_backoff() {
    let f = fixture(1000, &[("bad", 100, false), ("good", 100, false)]);
    f.loader.failing.lock().unwrap().push("bad".into());
    let both = futures::future::join_all((0..3).map(|_| f.life.acquire("bad", None))).await;
    assert!(both.iter().all(
        |r| matches!(r, Err(RegistryError::LoadFailed { reason, .. }) if reason.contains("corrupt"))
    ));
    assert_eq!(f.loader.loads("bad"), 1);
    assert_eq!(f.state("bad"), "failed");
    // Held back: no new attempt, a Retry-After instead.
    match f.life.acquire("bad", None).await.err().unwrap() {
        RegistryError::LoadFailed { retry_after, .. } => assert_eq!(retry_after, Some(5)),
        other => panic!("{other:?}"),
    }
    assert_eq!(f.loader.loads("bad"), 1);
    assert!(
        f.life.acquire("good", None).await.is_ok(),
        "others keep serving"
    );
    wait(Duration::from_secs(6)).await;
    assert!(f.life.acquire("bad", None).await.is_err());
    assert_eq!(f.loader.loads("bad"), 2);
    // The second failure doubles the wait.
    match f.life.acquire("bad", None).await.err().unwrap() {
        RegistryError::LoadFailed { retry_after, .. } => assert_eq!(retry_after, Some(10)),
        other => panic!("{other:?}"),
    }
    f.loader.failing.lock().unwrap().clear();
    wait(Duration::from_secs(11)).await;
    assert!(f.life.acquire("bad", None).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn admin_unload_drains_a_busy_model() {
    let f = fixture(1000, &[("a", 100, false)]);
    let lease = f.life.acquire("a", None).await.unwrap();
    let stopped = f.life.unload("a").unwrap();
    settle().await;
    assert_eq!(f.state("a"), "draining");
    drop(lease);
    stopped.await;
    assert_eq!(f.state("a"), "cold");
    // The next request loads it again.
    assert!(f.life.acquire("a", None).await.is_ok());
    assert_eq!(f.loader.loads("a"), 2);
}

#[tokio::test(start_paused = true)]
async fn models_go_to_the_gpu_with_the_most_free_budget_that_fits() {
    let f = fixture_on(
        &[("cpu", 10_000), ("cuda:0", 300), ("cuda:1", 500)],
        &[
            ("a", 400, false),
            ("b", 400, false),
            ("c", 400, false),
            ("d", 2000, false),
            ("e", 100, false),
        ],
        &[("e", "cpu")],
    );
    let device = |id: &str| f.life.snapshot(id).unwrap().device.unwrap();
    let _a = f.life.acquire("a", None).await.unwrap();
    assert_eq!(device("a"), "cuda:1");
    assert_eq!(f.life.snapshot("a").unwrap().charged_bytes, 200);
    let _b = f.life.acquire("b", None).await.unwrap();
    let _c = f.life.acquire("c", None).await.unwrap();
    // 300 free on each GPU after a; b takes one, c the other.
    let mut gpus = vec![device("b"), device("c")];
    gpus.sort();
    assert_eq!(gpus, ["cuda:0", "cuda:1"]);
    // No GPU has room for d's 1000 (all busy): the CPU does.
    let _d = f.life.acquire("d", None).await.unwrap();
    assert_eq!(device("d"), "cpu");
    assert_eq!(f.life.snapshot("d").unwrap().charged_bytes, 2000);
    // A model pinned to the CPU stays there.
    let _e = f.life.acquire("e", None).await.unwrap();
    assert_eq!(device("e"), "cpu");
    let used: BTreeMap<String, u64> = f
        .life
        .devices()
        .into_iter()
        .map(|d| (d.name, d.used))
        .collect();
    assert_eq!(used["cpu"], 2100);
    assert_eq!(used["cuda:0"] + used["cuda:1"], 600);
}
