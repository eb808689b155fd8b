//! The worker shell every model runs in, whatever it serves.
//!
//! The shell owns the OS thread, the bounded job queue, readiness, the
//! drain and the unload. A model plugs in as a [`Backend`]: it takes jobs
//! into its hands (`admit`), does one unit of work at a time (`step`: a
//! forward pass, an encoder batch, a denoising step) and says when it has
//! nothing in hand (`is_idle`). Between steps the shell hands it whatever
//! arrived.
//!
//! The thread never sleeps on a timer to wait. With nothing in hand it
//! parks until a job arrives or the last handle is dropped; when a backend
//! can do nothing until a client reads, it parks until one does, a client
//! leaves, or the earliest deadline it named passes. Every one of those
//! events unparks the thread: queueing a job ([`Jobs::send`]), dropping the
//! last handle, and reading or dropping a text request's event stream.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::Thread;
use std::time::Instant;

use super::{EngineError, EngineStats, LoadSpec};

/// What a backend did in one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// It did some work (or changed its state); step again.
    Worked,
    /// Nothing can run until a client catches up, a job arrives, or the
    /// given instant passes (a deadline or a stall timeout).
    Wait(Option<Instant>),
}

/// A model as the shell drives it.
pub(super) trait Backend {
    /// A queued request, as the handle sends it.
    type Job: Send + 'static;

    /// Takes a newly queued job into the backend's hands. It may fail the
    /// job at once (the reply goes to its client).
    fn admit(&mut self, job: Self::Job);

    /// Runs one unit of work.
    fn step(&mut self) -> Step;

    /// Whether no job is in hand.
    fn is_idle(&self) -> bool;

    /// A step panicked: fail every job in hand and start clean.
    fn abort(&mut self);
}

/// A place in a model's waiting queue. The queue's bound is the model's
/// admission limit: a request takes a ticket before it is queued (or is
/// refused with 429), and gives it back when it starts running, when it
/// fails, or when it is dropped, wherever that happens.
pub(crate) struct Ticket(Option<(Arc<EngineStats>, Option<Arc<str>>)>);

impl Ticket {
    /// Takes one of `capacity` places counted in `stats`, if one is free
    /// (and, with `fair`, if `tenant` is within its share).
    pub(super) fn take(
        stats: &Arc<EngineStats>,
        capacity: usize,
        tenant: Option<Arc<str>>,
        fair: bool,
    ) -> Option<Self> {
        stats
            .try_enqueue(capacity, tenant.as_ref(), fair)
            .then(|| Self(Some((stats.clone(), tenant))))
    }

    /// The request has left the queue for the batch.
    pub(super) fn leave(&mut self) {
        if let Some((stats, tenant)) = self.0.take() {
            stats.dequeue(tenant.as_ref());
        }
    }

    /// Whether the request is still waiting.
    pub(super) fn is_waiting(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.leave();
    }
}

/// How to wake a worker thread.
#[derive(Clone, Debug)]
pub(crate) struct Wake(Thread);

impl Wake {
    /// The calling thread.
    pub(super) fn current() -> Self {
        Self(std::thread::current())
    }

    /// Wakes the worker if it is parked, or makes its next park return
    /// at once. Costs an atomic swap when it is not parked.
    pub(crate) fn wake(&self) {
        self.0.unpark();
    }
}

/// The sending half of a worker's queue, shared by every handle. Dropping
/// the last one wakes the worker, which finishes what it has and unloads.
pub(crate) struct Jobs<J>(Arc<Sender<J>>);

impl<J> Clone for Jobs<J> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

struct Sender<J> {
    tx: Option<std_mpsc::SyncSender<J>>,
    wake: Wake,
    stats: Arc<EngineStats>,
    capacity: usize,
    fair: bool,
    model: Arc<str>,
}

impl<J> Drop for Sender<J> {
    fn drop(&mut self) {
        // Disconnect first, so the woken worker sees the queue closed.
        drop(self.tx.take());
        self.wake.wake();
    }
}

impl<J> Jobs<J> {
    /// Takes a place in the queue for a request of `tenant`, or refuses
    /// with `QueueFull`.
    pub(super) fn ticket(&self, tenant: Option<Arc<str>>) -> Result<Ticket, EngineError> {
        let s = &self.0;
        Ticket::take(&s.stats, s.capacity, tenant, s.fair).ok_or_else(|| EngineError::QueueFull {
            model: s.model.to_string(),
            queue: s.capacity,
        })
    }

    /// Queues `job` (which carries its ticket) and wakes the worker.
    pub(super) fn send(&self, job: J) -> Result<(), EngineError> {
        let s = &self.0;
        let sent = match &s.tx {
            // Never full: a job holds a ticket while it is in the channel,
            // and there are no more tickets than places.
            Some(tx) => tx.try_send(job).map_err(|e| match e {
                std_mpsc::TrySendError::Full(_) => EngineError::QueueFull {
                    model: s.model.to_string(),
                    queue: s.capacity,
                },
                std_mpsc::TrySendError::Disconnected(_) => {
                    EngineError::Stopped(s.model.to_string())
                }
            }),
            None => Err(EngineError::Stopped(s.model.to_string())),
        };
        s.wake.wake();
        sent
    }

    /// How to wake this queue's worker.
    pub(super) fn waker(&self) -> &Wake {
        &self.0.wake
    }
}

/// Loads a model with `load` on the calling (worker) thread, reports the
/// outcome through `ready`, then serves until the last handle is dropped
/// and nothing is left in hand, and unloads.
pub(super) fn run<B: Backend, R>(
    spec: &LoadSpec,
    stats: &Arc<EngineStats>,
    load: impl FnOnce(&LoadSpec, &Arc<EngineStats>) -> Result<(B, R), EngineError>,
    ready: impl FnOnce(Result<(Jobs<B::Job>, R), EngineError>) -> bool,
) {
    let loaded =
        std::panic::catch_unwind(AssertUnwindSafe(|| load(spec, stats))).unwrap_or_else(|_| {
            tracing::error!(model = %spec.model, "loading panicked");
            Err(EngineError::LoadFailed {
                model: spec.model.clone(),
                reason: "internal error while loading (see the server log)".into(),
                retry_after: None,
            })
        });
    let (backend, reach) = match loaded {
        Ok(l) => l,
        Err(e) => {
            ready(Err(e));
            return;
        }
    };
    let capacity = spec.queue_size.max(1);
    let (tx, rx) = std_mpsc::sync_channel(capacity);
    let jobs = Jobs(Arc::new(Sender {
        tx: Some(tx),
        wake: Wake::current(),
        stats: stats.clone(),
        capacity,
        fair: spec.fair_share,
        model: Arc::from(spec.model.as_str()),
    }));
    if ready(Ok((jobs, reach))) {
        serve(&spec.model, backend, &rx);
    } else {
        drop(backend);
    }
    stats.set_batch(0, 0, 0);
    super::spec::unloaded(spec);
}

/// The loop: hand over arrivals, step, park when there is nothing to do.
fn serve<B: Backend>(model: &str, mut backend: B, jobs: &std_mpsc::Receiver<B::Job>) {
    let mut open = true;
    loop {
        while open {
            match jobs.try_recv() {
                Ok(job) => backend.admit(job),
                Err(std_mpsc::TryRecvError::Empty) => break,
                Err(std_mpsc::TryRecvError::Disconnected) => open = false,
            }
        }
        if backend.is_idle() {
            if !open {
                return;
            }
            std::thread::park();
            continue;
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| backend.step())) {
            Ok(Step::Worked) => {}
            Ok(Step::Wait(None)) => std::thread::park(),
            Ok(Step::Wait(Some(until))) => {
                let now = Instant::now();
                if until > now {
                    std::thread::park_timeout(until - now);
                }
            }
            Err(_) => {
                tracing::error!(model, "a model step panicked; failing the requests in hand");
                backend.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Counts its steps; each job is a number of steps to run, or a step
    /// that panics (`0`).
    struct Counter {
        left: Vec<usize>,
        steps: Arc<std::sync::atomic::AtomicUsize>,
        aborted: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Backend for Counter {
        type Job = (usize, Ticket);
        fn admit(&mut self, (n, mut ticket): Self::Job) {
            ticket.leave();
            self.left.push(n);
        }
        fn step(&mut self) -> Step {
            self.steps.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.left.contains(&0) {
                panic!("a bug in a step");
            }
            for n in &mut self.left {
                *n -= 1;
            }
            self.left.retain(|&n| n > 0);
            Step::Worked
        }
        fn is_idle(&self) -> bool {
            self.left.is_empty()
        }
        fn abort(&mut self) {
            self.aborted
                .fetch_add(self.left.len(), std::sync::atomic::Ordering::SeqCst);
            self.left.clear();
        }
    }

    fn spec() -> LoadSpec {
        LoadSpec {
            model: "m".into(),
            task: super::super::Task::Text,
            path: Default::default(),
            context_length: None,
            queue_size: 2,
            stall_timeout: Duration::from_secs(1),
            max_sequences: 1,
            max_batch_tokens: 1,
            kv_cache_tokens: 1,
            target: Default::default(),
            fair_share: true,
            prefix_caching: true,
            prefix_cache_shared: true,
            tool_format: None,
        }
    }

    #[test]
    fn the_shell_admits_steps_survives_a_panic_and_exits_with_its_last_handle() {
        let steps = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let aborted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stats = Arc::new(EngineStats::default());
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let backend = Counter {
            left: Vec::new(),
            steps: steps.clone(),
            aborted: aborted.clone(),
        };
        let thread_stats = stats.clone();
        let worker = std::thread::spawn(move || {
            run(
                &spec(),
                &thread_stats,
                |_, _| Ok((backend, ())),
                |r| ready_tx.send(r.map(|(jobs, ())| jobs)).is_ok(),
            )
        });
        let jobs: Jobs<(usize, Ticket)> = ready_rx.recv().unwrap().unwrap();
        // Two places: a third request waiting at once is refused.
        let (a, b) = (jobs.ticket(None).unwrap(), jobs.ticket(None).unwrap());
        assert!(matches!(
            jobs.ticket(None),
            Err(EngineError::QueueFull { queue: 2, .. })
        ));
        jobs.send((3, a)).unwrap();
        jobs.send((0, b)).unwrap();
        let t0 = Instant::now();
        while aborted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the panic was not caught"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(stats.waiting(), 0, "tickets came back");
        // The worker is parked with nothing in hand, yet serves the next job.
        let c = jobs.ticket(None).unwrap();
        jobs.send((2, c)).unwrap();
        drop(jobs);
        worker.join().unwrap();
        assert!(steps.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    }
}
