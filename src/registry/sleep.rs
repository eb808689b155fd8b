//! Sleep and wake: a replica parks without stopping. Its models are
//! unloaded and it answers not ready, so routers and autoscalers steer
//! away; `wake_up` loads back what was resident.
//!
//! Level 1 releases device memory but keeps each model's weight files in
//! host memory (mapped and paged in, locked where the limits allow), so a
//! wake reads no disk. Level 2 releases everything, the weight files' pages
//! in the system's cache included, so a wake is a cold load.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use super::{memory, ModelState, Registry, RegistryError};

/// How deeply a replica sleeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SleepLevel {
    /// Device memory released, weights kept in host memory.
    KeepWeights = 1,
    /// Everything released.
    ReleaseAll = 2,
}

impl SleepLevel {
    /// The level numbered `n` (vLLM's numbering: 1 or 2).
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            1 => Some(Self::KeepWeights),
            2 => Some(Self::ReleaseAll),
            _ => None,
        }
    }

    /// 1 or 2.
    pub fn number(self) -> u8 {
        self as u8
    }
}

/// What `sleep` did.
#[derive(Debug, Clone)]
pub struct SleepReport {
    /// The level now in force.
    pub level: SleepLevel,
    /// Models unloaded (to be loaded again on wake).
    pub models: Vec<String>,
    /// Bytes of weight files kept in host memory (level 1).
    pub held_bytes: u64,
    /// Models still draining when the wait ran out (they unload when their
    /// last request ends).
    pub still_draining: Vec<String>,
}

/// What `wake_up` did.
#[derive(Debug, Clone)]
pub struct WakeReport {
    /// Whether the replica was asleep at all.
    pub was_asleep: bool,
    /// Models loaded again.
    pub models: Vec<String>,
    /// Models whose load failed (they load again on their next request).
    pub failed: Vec<(String, String)>,
    /// Time spent loading.
    pub elapsed: Duration,
}

/// A weight file kept in host memory while asleep.
struct Held {
    _map: memmap2::Mmap,
    bytes: u64,
}

impl Held {
    /// Maps `path` and pages all of it in.
    fn new(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        // SAFETY: the store's weight files are written once (to a temporary
        // name, then renamed) and never modified in place, so the mapping's
        // contents do not change under us.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        let _ = map.advise(memmap2::Advice::WillNeed);
        // Locked pages stay through memory pressure; without the rights
        // (RLIMIT_MEMLOCK) they are kept resident by use alone.
        if map.lock().is_err() {
            let mut x = 0u8;
            for i in (0..map.len()).step_by(4096) {
                x ^= map[i];
            }
            std::hint::black_box(x);
        }
        Ok(Self {
            bytes: map.len() as u64,
            _map: map,
        })
    }
}

/// Asks the kernel to drop `path`'s pages from its cache.
fn forget(path: &Path) {
    #[cfg(target_os = "linux")]
    if let Ok(file) = std::fs::File::open(path) {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fadvise only reads the descriptor, which lives
        // until the end of this block.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

/// Every regular file at or under `path`.
fn files_under(path: &Path) -> Vec<PathBuf> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    if meta.is_file() {
        return vec![path.to_path_buf()];
    }
    let Ok(dir) = std::fs::read_dir(path) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = dir
        .filter_map(Result::ok)
        .flat_map(|e| files_under(&e.path()))
        .collect();
    out.sort();
    out
}

/// The state of a sleeping replica.
struct Asleep {
    level: SleepLevel,
    models: Vec<String>,
    held: Vec<Held>,
    files: Vec<PathBuf>,
}

/// Sleep state: the level (0 awake) for the request path's quick check,
/// and the details behind a lock that also orders sleep and wake calls.
#[derive(Default)]
pub(super) struct Sleep {
    level: AtomicU8,
    asleep: tokio::sync::Mutex<Option<Asleep>>,
}

impl Registry {
    /// The level the replica sleeps at, or `None` while awake.
    pub fn sleep_level(&self) -> Option<SleepLevel> {
        SleepLevel::from_number(self.sleep.level.load(Ordering::Acquire))
    }

    /// Puts the replica to sleep: from now on it is not ready; models
    /// unload once their in-flight requests end (waiting up to `drain`).
    /// Sleeping again at level 2 after level 1 lets go of the kept weights.
    pub async fn sleep(&self, level: SleepLevel, drain: Duration) -> SleepReport {
        let mut asleep = self.sleep.asleep.lock().await;
        let prev = self.sleep.level.swap(level.number(), Ordering::AcqRel);
        self.metrics.sleep_level.set(i64::from(level.number()));
        let mut state = asleep.take().unwrap_or_else(|| Asleep {
            level,
            models: Vec::new(),
            held: Vec::new(),
            files: Vec::new(),
        });
        if prev == 0 {
            state.models = self
                .list()
                .into_iter()
                .filter(|m| {
                    m.state.state != ModelState::Cold && m.state.state != ModelState::Failed
                })
                .map(|m| m.id)
                .collect();
            state.files = state
                .models
                .iter()
                .filter_map(|id| self.loader.local_weights(id))
                .flat_map(|p| files_under(&p))
                .collect();
            if level == SleepLevel::KeepWeights {
                let files = state.files.clone();
                state.held = tokio::task::spawn_blocking(move || {
                    files.iter().filter_map(|f| Held::new(f).ok()).collect()
                })
                .await
                .unwrap_or_default();
            }
        }
        let still_draining = self.unload_everything(drain).await;
        if level == SleepLevel::ReleaseAll {
            state.held.clear();
            let files = state.files.clone();
            let _ = tokio::task::spawn_blocking(move || files.iter().for_each(|f| forget(f))).await;
        }
        memory::release_free_heap();
        state.level = level;
        let report = SleepReport {
            level,
            models: state.models.clone(),
            held_bytes: state.held.iter().map(|h| h.bytes).sum(),
            still_draining,
        };
        tracing::info!(
            level = level.number(),
            models = ?report.models,
            held_bytes = report.held_bytes,
            "asleep"
        );
        *asleep = Some(state);
        report
    }

    /// Unloads every model, retrying those caught loading, until all are
    /// cold or `drain` runs out; returns those still draining.
    async fn unload_everything(&self, drain: Duration) -> Vec<String> {
        let deadline = Instant::now() + drain;
        loop {
            let busy: Vec<String> = self
                .list()
                .into_iter()
                .filter(|m| {
                    m.state.state.is_resident()
                        || matches!(
                            m.state.state,
                            ModelState::Loading | ModelState::Downloading | ModelState::Draining
                        )
                })
                .map(|m| m.id)
                .collect();
            if busy.is_empty() {
                return busy;
            }
            let mut stops = Vec::new();
            for id in &busy {
                match self.lifecycle.unload(id) {
                    Ok(stop) => stops.push(stop),
                    Err(RegistryError::Loading(_)) => {}
                    Err(e) => tracing::warn!(model = %id, error = %e, "cannot unload for sleep"),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return busy;
            }
            let pause = left.min(Duration::from_millis(100));
            let _ = tokio::time::timeout(left, async {
                futures::future::join_all(stops).await;
                tokio::time::sleep(pause).await;
            })
            .await;
        }
    }

    /// Wakes the replica: loads back the models resident when it went to
    /// sleep, then answers ready again. Waking an awake replica does
    /// nothing; concurrent calls wait for the one wake.
    pub async fn wake_up(&self) -> WakeReport {
        let started = Instant::now();
        let mut asleep = self.sleep.asleep.lock().await;
        let Some(state) = asleep.take() else {
            return WakeReport {
                was_asleep: false,
                models: Vec::new(),
                failed: Vec::new(),
                elapsed: Duration::ZERO,
            };
        };
        let loads = state.models.iter().map(|id| async move {
            (id.clone(), self.load(id).await.err().map(|e| e.to_string()))
        });
        let mut report = WakeReport {
            was_asleep: true,
            models: Vec::new(),
            failed: Vec::new(),
            elapsed: Duration::ZERO,
        };
        for (id, err) in futures::future::join_all(loads).await {
            match err {
                None => report.models.push(id),
                Some(e) => report.failed.push((id, e)),
            }
        }
        // The weights are in the models now: the kept pages can go.
        drop(state);
        self.sleep.level.store(0, Ordering::Release);
        self.metrics.sleep_level.set(0);
        report.elapsed = started.elapsed();
        tracing::info!(
            models = ?report.models,
            failed = report.failed.len(),
            seconds = report.elapsed.as_secs_f64(),
            "awake"
        );
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_files_are_paged_in_and_listed_recursively() {
        let dir = std::env::temp_dir().join(format!("kindling-sleep-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.bin"), vec![7u8; 3 * 4096 + 5]).unwrap();
        std::fs::write(dir.join("sub/b.json"), b"{}").unwrap();
        let files = files_under(&dir);
        assert_eq!(files, [dir.join("a.bin"), dir.join("sub/b.json")]);
        let held = Held::new(&files[0]).unwrap();
        assert_eq!(held.bytes, 3 * 4096 + 5);
        forget(&files[0]);
        assert!(files_under(&dir.join("missing")).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(SleepLevel::from_number(2), Some(SleepLevel::ReleaseAll));
        assert_eq!(SleepLevel::from_number(3), None);
    }
}
