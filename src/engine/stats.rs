//! Live figures of one model's worker, shared with the rest of the daemon
//! without locks on the hot path: queue and batch sizes, KV cache blocks,
//! token counts and recent throughput.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Throughput is averaged over this window.
const WINDOW: Duration = Duration::from_secs(10);

/// A worker's figures.
#[derive(Debug, Default)]
pub struct EngineStats {
    waiting: AtomicUsize,
    running: AtomicUsize,
    kv_used: AtomicUsize,
    kv_total: AtomicUsize,
    kv_cached: AtomicUsize,
    prefix_queries: AtomicU64,
    prefix_hits: AtomicU64,
    drafted: AtomicU64,
    accepted: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    steps: AtomicU64,
    recent: Mutex<VecDeque<(Instant, u64)>>,
    /// Waiting requests per key, for the fair queue.
    by_tenant: Mutex<HashMap<Arc<str>, usize>>,
}

impl EngineStats {
    /// Takes a place in the waiting queue unless `capacity` are taken, or
    /// (with `fair`) unless `tenant` holds its share: a quarter of the
    /// queue is kept for keys that are not waiting yet, the rest is split
    /// between the keys that are.
    pub(super) fn try_enqueue(
        &self,
        capacity: usize,
        tenant: Option<&Arc<str>>,
        fair: bool,
    ) -> bool {
        let mut by_tenant = self.by_tenant.lock().unwrap_or_else(|e| e.into_inner());
        if self.waiting.load(Ordering::Acquire) >= capacity {
            return false;
        }
        if let Some(t) = tenant {
            let held = by_tenant.get(t).copied().unwrap_or(0);
            let active = by_tenant.len() + usize::from(held == 0);
            let share = ((capacity - capacity / 4) / active.max(1)).max(1);
            if fair && held >= share {
                return false;
            }
            *by_tenant.entry(t.clone()).or_default() += 1;
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Gives a place in the waiting queue back.
    pub(super) fn dequeue(&self, tenant: Option<&Arc<str>>) {
        let mut by_tenant = self.by_tenant.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = tenant {
            if let Some(n) = by_tenant.get_mut(t) {
                *n -= 1;
                if *n == 0 {
                    by_tenant.remove(t);
                }
            }
        }
        let _ = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1));
    }

    pub(super) fn set_batch(&self, running: usize, kv_used: usize, kv_total: usize) {
        self.running.store(running, Ordering::Release);
        self.kv_used.store(kv_used, Ordering::Release);
        self.kv_total.store(kv_total, Ordering::Release);
    }

    /// Records a prompt of `tokens` looked up in the prefix cache, `hits` of them found.
    pub(super) fn record_prefix_lookup(&self, tokens: u64, hits: u64) {
        self.prefix_queries.fetch_add(tokens, Ordering::AcqRel);
        self.prefix_hits.fetch_add(hits, Ordering::AcqRel);
    }

    /// Records `drafted` prompt-lookup drafts verified, `accepted` of them kept.
    pub(super) fn record_drafts(&self, drafted: u64, accepted: u64) {
        self.drafted.fetch_add(drafted, Ordering::AcqRel);
        self.accepted.fetch_add(accepted, Ordering::AcqRel);
    }

    /// Prompt-lookup draft tokens verified, and those accepted, since load.
    pub fn drafts(&self) -> (u64, u64) {
        (
            self.drafted.load(Ordering::Acquire),
            self.accepted.load(Ordering::Acquire),
        )
    }

    pub(super) fn set_cached_blocks(&self, blocks: usize) {
        self.kv_cached.store(blocks, Ordering::Release);
    }

    /// Prompt tokens looked up in the prefix cache, and those found, since load.
    pub fn prefix_cache(&self) -> (u64, u64) {
        (
            self.prefix_queries.load(Ordering::Acquire),
            self.prefix_hits.load(Ordering::Acquire),
        )
    }

    /// KV blocks that hold a cached prefix.
    pub fn cached_blocks(&self) -> usize {
        self.kv_cached.load(Ordering::Acquire)
    }

    /// Records one forward pass.
    pub(super) fn record_step(&self, prompt_tokens: u64, generated: u64) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(generated, Ordering::Relaxed);
        if generated > 0 {
            if let Ok(mut recent) = self.recent.lock() {
                let now = Instant::now();
                recent.push_back((now, generated));
                while recent
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW)
                {
                    recent.pop_front();
                }
            }
        }
    }

    /// Requests waiting for a place in the batch.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Sequences in the batch.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// KV cache blocks in use and in the pool.
    pub fn kv_blocks(&self) -> (usize, usize) {
        (
            self.kv_used.load(Ordering::Acquire),
            self.kv_total.load(Ordering::Acquire),
        )
    }

    /// Share of the KV cache in use, 0 to 1.
    pub fn kv_usage(&self) -> f64 {
        let (used, total) = self.kv_blocks();
        if total == 0 {
            0.0
        } else {
            used as f64 / total as f64
        }
    }

    /// Prompt tokens computed so far (recomputation after preemption included).
    pub fn prompt_tokens(&self) -> u64 {
        self.prompt_tokens.load(Ordering::Relaxed)
    }

    /// Tokens generated so far.
    pub fn generated_tokens(&self) -> u64 {
        self.generated_tokens.load(Ordering::Relaxed)
    }

    /// Forward passes run so far.
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }

    /// Tokens generated per second over the last ten seconds.
    pub fn tokens_per_second(&self) -> f64 {
        let Ok(recent) = self.recent.lock() else {
            return 0.0;
        };
        let now = Instant::now();
        let total: u64 = recent
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= WINDOW)
            .map(|(_, n)| n)
            .sum();
        total as f64 / WINDOW.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_refuses_past_capacity_and_frees_places() {
        let s = EngineStats::default();
        assert!(s.try_enqueue(2, None, true));
        assert!(s.try_enqueue(2, None, true));
        assert!(!s.try_enqueue(2, None, true));
        s.dequeue(None);
        assert!(s.try_enqueue(2, None, true));
        assert_eq!(s.waiting(), 2);
    }

    #[test]
    fn one_key_cannot_fill_the_queue_when_sharing_fairly() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let s = EngineStats::default();
        // A quarter of 8 stays free for keys not yet waiting.
        for _ in 0..6 {
            assert!(s.try_enqueue(8, Some(&a), true));
        }
        assert!(!s.try_enqueue(8, Some(&a), true));
        assert!(s.try_enqueue(8, Some(&b), true));
        assert!(s.try_enqueue(8, Some(&b), true));
        assert!(!s.try_enqueue(8, Some(&b), true), "the queue is full");
        s.dequeue(Some(&a));
        assert!(
            !s.try_enqueue(8, Some(&a), true),
            "a is over its share of two keys"
        );
        assert!(s.try_enqueue(8, Some(&b), true));
        // Without fair share, only the total counts.
        let s = EngineStats::default();
        for _ in 0..8 {
            assert!(s.try_enqueue(8, Some(&a), false));
        }
    }
}
