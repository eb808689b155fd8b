//! Fair share between tenants (API keys): while others wait, no tenant
//! holds more than its share of the batch's seats.
//!
//! A tenant's share is the batch's seats divided by the tenants that are
//! running or waiting. Waiting sequences are admitted fewest-seats-first;
//! prompt chunks are budgeted in the same order; and when a tenant below
//! its share waits while the batch is full, the newest sequence of the
//! tenant furthest over its share is preempted (recomputed later, its text
//! unchanged) to make room. Without fair share the queue is first come,
//! first served.

use std::collections::HashMap;
use std::sync::Arc;

use kindling_models::KvCache;

use super::{Scheduler, Sequence};

type Tenant = Option<Arc<str>>;

impl Scheduler {
    fn tenant_of(&self, s: &Sequence) -> Tenant {
        self.requests.get(&s.request).and_then(|r| r.tenant.clone())
    }

    /// Seats each tenant holds in the batch.
    pub(super) fn seats_by_tenant(&self) -> HashMap<Tenant, usize> {
        let mut seats = HashMap::new();
        for s in &self.running {
            *seats.entry(self.tenant_of(s)).or_default() += s.seats();
        }
        seats
    }

    /// The tenants running or waiting, and each one's share of the seats.
    fn share(&self) -> usize {
        let mut tenants: Vec<Tenant> = Vec::new();
        for s in self.running.iter().chain(&self.waiting) {
            let t = self.tenant_of(s);
            if !tenants.contains(&t) {
                tenants.push(t);
            }
        }
        (self.limits.max_sequences / tenants.len().max(1)).max(1)
    }

    /// Whether waiting sequence `i`'s tenant holds fewer seats than its share.
    pub(super) fn below_share(&self, i: usize) -> bool {
        let Some(s) = self.waiting.get(i) else {
            return false;
        };
        let tenant = self.tenant_of(s);
        let held: usize = self
            .running
            .iter()
            .filter(|r| self.tenant_of(r) == tenant)
            .map(Sequence::seats)
            .sum();
        held < self.share()
    }

    /// Index in the queue of the sequence to admit next: the front, or
    /// with fair share the first of the tenant holding the fewest seats.
    pub(super) fn next_waiting(&self) -> Option<usize> {
        if !self.limits.fair || self.waiting.len() < 2 {
            return (!self.waiting.is_empty()).then_some(0);
        }
        let seats = self.seats_by_tenant();
        self.waiting
            .iter()
            .enumerate()
            .min_by_key(|(i, s)| {
                let held = seats.get(&self.tenant_of(s)).copied().unwrap_or(0);
                (held, *i)
            })
            .map(|(i, _)| i)
    }

    /// Running sequences in the order their prompt chunks get the step's
    /// budget.
    pub(super) fn prefill_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        if self.limits.fair {
            let seats = self.seats_by_tenant();
            // Stable: arrival order within a tenant, and among equals.
            order.sort_by_key(|&i| {
                seats
                    .get(&self.tenant_of(&self.running[i]))
                    .copied()
                    .unwrap_or(0)
            });
        }
        order
    }

    /// Makes room for a waiting tenant below its share by preempting the
    /// newest sequences of tenants over theirs.
    pub(super) fn rebalance(&mut self) {
        if !self.limits.fair || self.waiting.is_empty() {
            return;
        }
        // Each round preempts one sequence; a batch has at most this many.
        for _ in 0..self.limits.max_sequences {
            let seats = self.seats_by_tenant();
            let share = self.share();
            let Some(next) = self.next_waiting() else {
                return;
            };
            let candidate = &self.waiting[next];
            let tenant = self.tenant_of(candidate);
            let held = seats.get(&tenant).copied().unwrap_or(0);
            if held >= share {
                return;
            }
            let used: usize = seats.values().sum();
            let blocks = KvCache::blocks_for(candidate.tokens.len()) + candidate.forks.len();
            let fits = used + candidate.seats() <= self.limits.max_sequences
                && blocks <= self.kv.free_blocks();
            if fits {
                return;
            }
            // The tenant furthest over its share gives up its newest sequence.
            let Some((over, _)) = seats
                .iter()
                .filter(|(t, &n)| **t != tenant && n > share)
                .max_by_key(|(_, &n)| n)
            else {
                return;
            };
            let over = over.clone();
            let Some(victim) = self.running.iter().rposition(|s| self.tenant_of(s) == over) else {
                return;
            };
            self.preempt(victim, "its tenant is over its share while another waits");
        }
    }
}
