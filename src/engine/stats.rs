//! Live figures of one model's worker, shared with the rest of the daemon
//! without locks on the hot path: queue and batch sizes, KV cache blocks,
//! token counts and recent throughput.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    steps: AtomicU64,
    recent: Mutex<VecDeque<(Instant, u64)>>,
}

impl EngineStats {
    /// Takes a place in the waiting queue unless `capacity` are taken.
    pub(super) fn try_enqueue(&self, capacity: usize) -> bool {
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < capacity).then_some(w + 1)
            })
            .is_ok()
    }

    /// Gives a place in the waiting queue back.
    pub(super) fn dequeue(&self) {
        let _ = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1));
    }

    pub(super) fn set_batch(&self, running: usize, kv_used: usize, kv_total: usize) {
        self.running.store(running, Ordering::Release);
        self.kv_used.store(kv_used, Ordering::Release);
        self.kv_total.store(kv_total, Ordering::Release);
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
        assert!(s.try_enqueue(2));
        assert!(s.try_enqueue(2));
        assert!(!s.try_enqueue(2));
        s.dequeue();
        assert!(s.try_enqueue(2));
        assert_eq!(s.waiting(), 2);
    }
}
