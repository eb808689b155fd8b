//! Iteration-level scheduling over a paged KV cache.
//!
//! Every step builds one batch: first a token for each running sequence
//! that is decoding, then chunks of prompts being prefilled, up to the
//! step's token budget; then, if blocks and seats allow, waiting sequences
//! join in arrival order. When a decoding sequence needs a block and none is
//! free, the most recently admitted sequence is preempted: its blocks are
//! freed and it waits at the front of the queue to be recomputed, its
//! output state kept, so its text continues exactly where it stopped.
//! A decoding sequence with prompt lookup on may bring draft tokens along
//! with its next one (see [`lookup`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kindling_models::tokenizer::Tokenizer;
use kindling_models::{BatchItem, BlockTable, KvCache};

pub(super) use lookup::Drafter;

use super::sequence::{Choice, Events, Next, Readiness, EVENTS_PER_STEP};
use super::shell::Ticket;
use super::{EngineError, EngineStats, GenerateEvent};

mod failure;
mod fair;
mod lookup;
#[cfg(test)]
mod tests;

/// What the scheduler needs of a model: one batched forward pass over the
/// paged cache (a logits row for each item that asks for one), and the
/// tokenizer that turns samples into text. Tests drive it with a fake.
pub(super) trait StepModel {
    /// Runs `batch`, writing its keys and values into `cache`.
    fn forward(
        &self,
        batch: &[BatchItem<'_>],
        cache: &mut KvCache,
    ) -> kindling_models::Result<Vec<Vec<f32>>>;

    /// The model's tokenizer.
    fn tokenizer(&self) -> &Tokenizer;
}

/// Limits of one batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_sequences: usize,
    pub(super) max_batch_tokens: usize,
    /// Share seats and prompt budget fairly between tenants (API keys).
    pub(super) fair: bool,
}

/// One request: its events, its place in the queue until it starts, and
/// how many of its choices are still live.
pub(super) struct Request {
    pub(super) events: Events,
    pub(super) ticket: Ticket,
    pub(super) deadline: Option<(Instant, Duration)>,
    pub(super) prompt_tokens: usize,
    pub(super) live: usize,
    /// The API key it is charged to.
    pub(super) tenant: Option<Arc<str>>,
}

/// One sequence: prompt plus generated tokens, how many are in the cache,
/// its blocks, and its output state. Choices `1..n` of a prompt ride along
/// in `forks` until the prompt is prefilled, then split off sharing it.
pub(super) struct Sequence {
    pub(super) request: u64,
    pub(super) tokens: Vec<u32>,
    pub(super) computed: usize,
    pub(super) table: BlockTable,
    pub(super) choice: Choice,
    pub(super) forks: Vec<Choice>,
    /// Whether its prompt was looked up in the prefix cache (the first
    /// time it is admitted; a preempted sequence looks again, unreported).
    pub(super) looked_up: bool,
    /// Its prefix-cache salt: it shares cached blocks only with sequences
    /// of the same salt.
    pub(super) salt: Option<Arc<str>>,
    /// Its prompt-lookup drafting state.
    pub(super) drafter: lookup::Drafter,
}

impl Sequence {
    fn seats(&self) -> usize {
        1 + self.forks.len()
    }
}

pub(super) struct Scheduler {
    limits: Limits,
    kv: KvCache,
    stats: Arc<EngineStats>,
    requests: HashMap<u64, Request>,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    next_id: u64,
}

/// A running sequence's part of this step: tokens `start..end`, of which
/// the last `draft` are drafts (appended to its tokens for the pass).
struct Planned {
    seq: usize,
    start: usize,
    end: usize,
    draft: usize,
}

impl Scheduler {
    pub(super) fn new(limits: Limits, kv: KvCache, stats: Arc<EngineStats>) -> Self {
        stats.set_batch(0, 0, kv.total_blocks());
        Self {
            limits,
            kv,
            stats,
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
        }
    }

    /// Positions the cache holds in all.
    pub(super) fn kv_capacity(&self) -> usize {
        self.kv.total_blocks() * kindling_models::kv_cache::BLOCK_SIZE
    }

    pub(super) fn is_idle(&self) -> bool {
        self.requests.is_empty()
    }

    /// Queues a validated request's sequences, one per prompt.
    pub(super) fn enqueue(&mut self, request: Request, sequences: Vec<Sequence>) {
        let id = self.next_id;
        self.next_id += 1;
        self.requests.insert(id, request);
        self.waiting
            .extend(sequences.into_iter().map(|s| Sequence { request: id, ..s }));
    }

    /// Runs one step. Returns whether any work was done.
    pub(super) fn step(&mut self, model: &impl StepModel) -> bool {
        let skip = self.sweep(Instant::now());
        let plan = self.plan(&skip);
        if plan.is_empty() {
            return false;
        }
        // Split each sequence into what the pass reads and its output state,
        // so the next-token masks of constrained choices are computed on
        // another thread while the forward pass runs.
        let (views, mut choices): (Vec<_>, Vec<_>) = self
            .running
            .iter_mut()
            .map(|s| ((&s.tokens[..], s.table.blocks()), Some(&mut s.choice)))
            .unzip();
        let items: Vec<BatchItem<'_>> = plan
            .iter()
            .map(|p| {
                let (tokens, blocks) = views[p.seq];
                BatchItem {
                    tokens: &tokens[p.start..p.end],
                    start: p.start,
                    blocks,
                    logits: if p.end == tokens.len() {
                        1 + p.draft
                    } else {
                        0
                    },
                }
            })
            .collect();
        let masked: Vec<&mut Choice> = plan
            .iter()
            .filter(|p| p.end == views[p.seq].0.len())
            .filter_map(|p| choices[p.seq].take())
            .filter(|c| c.is_constrained())
            .collect();
        let kv = &mut self.kv;
        let mut forward =
            || std::panic::catch_unwind(AssertUnwindSafe(|| model.forward(&items, kv)));
        let outcome = if masked.is_empty() {
            forward()
        } else {
            std::thread::scope(|scope| {
                scope.spawn(move || masked.into_iter().for_each(Choice::prepare_mask));
                forward()
            })
        };
        drop(items);
        let logits = match outcome {
            Ok(Ok(logits)) => logits,
            Ok(Err(e)) => return self.fail_batch(&plan, e.to_string()),
            Err(_) => return self.fail_batch(&plan, "the forward pass panicked".into()),
        };
        self.commit(model, &plan, logits);
        true
    }

    /// Drops requests whose client left or stalled for too long, fails
    /// those past their deadline, and returns those to sit this step out.
    fn sweep(&mut self, now: Instant) -> HashSet<u64> {
        let mut skip = HashSet::new();
        let mut gone = Vec::new();
        for (&id, req) in &mut self.requests {
            if let Some((deadline, given)) = req.deadline {
                if now >= deadline {
                    req.events.fail(EngineError::DeadlineExceeded {
                        seconds: given.as_secs_f64(),
                    });
                    gone.push(id);
                    continue;
                }
            }
            match req.events.readiness(req.live * EVENTS_PER_STEP, now) {
                Readiness::Ready => {}
                Readiness::Behind => {
                    skip.insert(id);
                }
                Readiness::Gone => {
                    if req.events.is_closed() {
                        tracing::info!(request = id, "generation cancelled: the client went away");
                    }
                    gone.push(id);
                }
            }
        }
        for id in gone {
            self.remove(id);
        }
        skip
    }

    /// Ends request `id`: its sequences leave the batch and the queue and
    /// their blocks go back to the pool.
    fn remove(&mut self, id: u64) {
        // Its ticket, if it never started, goes back with it.
        if self.requests.remove(&id).is_none() {
            return;
        }
        let kv = &mut self.kv;
        let mut keep = |s: &mut Sequence| {
            if s.request == id {
                kv.release(&mut s.table);
            }
            s.request != id
        };
        self.running.retain_mut(&mut keep);
        self.waiting.retain_mut(&mut keep);
        self.publish();
    }

    fn plan(&mut self, skip: &HashSet<u64>) -> Vec<Planned> {
        self.rebalance();
        let mut plan = Vec::new();
        let mut budget = self.limits.max_batch_tokens;
        let mut preempted = false;
        // Decoding sequences first: one token each, growing into a new block
        // when they cross one, preempting the newest sequences if needed.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &self.running[i];
            if skip.contains(&s.request) || s.tokens.len() - s.computed != 1 {
                i += 1;
                continue;
            }
            let need = s.computed + 1;
            let room = budget.min(s.choice.remaining()).saturating_sub(1);
            let want = self.running[i].drafter.budget().min(room);
            let s = &self.running[i];
            let draft = lookup::draft(&s.tokens, want).to_vec();
            // Drafts never take the blocks other sequences' next tokens need.
            let extra =
                KvCache::blocks_for(need + draft.len()).saturating_sub(s.table.blocks().len());
            let spare = self.kv.free_blocks().saturating_sub(self.running.len());
            if !draft.is_empty() && extra <= spare && self.grow(i, need + draft.len()) {
                let k = draft.len();
                self.running[i].tokens.extend(draft);
                plan.push(Planned {
                    seq: i,
                    start: need - 1,
                    end: need + k,
                    draft: k,
                });
                budget -= 1 + k;
                i += 1;
            } else if self.grow(i, need) {
                plan.push(Planned {
                    seq: i,
                    start: need - 1,
                    end: need,
                    draft: 0,
                });
                budget -= 1;
                i += 1;
            } else {
                preempted = true;
                if !self.preempt_after(i, need) {
                    // Nothing newer to take blocks from: this one waits.
                    self.preempt(i, "out of KV cache blocks");
                }
            }
        }
        // Sharing fairly, a tenant below its share joins before the prompt
        // chunks of those at or over theirs take the step's budget.
        let joined = self.running.len();
        if self.limits.fair && !preempted {
            self.admit(&mut plan, &mut budget, true);
        }
        // Then prompt chunks of admitted sequences (their blocks are held),
        // the tenants with the fewest seats first when sharing fairly.
        for i in self.prefill_order() {
            if i >= joined {
                // Just admitted: its first chunk is planned already.
                continue;
            }
            let s = &self.running[i];
            let remaining = s.tokens.len() - s.computed;
            if budget == 0 {
                break;
            }
            // A decoding sequence's drafts make it look like a prompt.
            let drafting = plan.iter().any(|p| p.seq == i && p.draft > 0);
            if remaining > 1 && !drafting && !skip.contains(&s.request) {
                let n = remaining.min(budget);
                plan.push(Planned {
                    seq: i,
                    start: s.computed,
                    end: s.computed + n,
                    draft: 0,
                });
                budget -= n;
            }
        }
        if !preempted {
            self.admit(&mut plan, &mut budget, false);
        }
        self.publish();
        plan
    }

    /// Makes sequence `i`'s table hold `positions` positions.
    fn grow(&mut self, i: usize, positions: usize) -> bool {
        let s = &mut self.running[i];
        s.table.capacity() >= positions || self.kv.grow(&mut s.table, positions)
    }

    /// Preempts sequences admitted after `i`, newest first, until `i` can
    /// grow to `positions`. Returns whether it could.
    fn preempt_after(&mut self, i: usize, positions: usize) -> bool {
        while self.running.len() > i + 1 {
            self.preempt(self.running.len() - 1, "out of KV cache blocks");
            if self.grow(i, positions) {
                return true;
            }
        }
        false
    }

    fn preempt(&mut self, i: usize, why: &str) {
        let mut s = self.running.remove(i);
        tracing::debug!(
            request = s.request,
            tokens = s.tokens.len(),
            "sequence preempted: {why}"
        );
        self.kv.release(&mut s.table);
        s.computed = 0;
        self.waiting.push_front(s);
    }

    /// Admits waiting sequences, in order, while seats, blocks and the
    /// token budget allow.
    /// With `below_share`, only sequences of tenants below their fair share.
    fn admit(&mut self, plan: &mut Vec<Planned>, budget: &mut usize, below_share: bool) {
        let mut seats: usize = self.running.iter().map(Sequence::seats).sum();
        while *budget > 0 {
            let Some(next) = self.next_waiting() else {
                break;
            };
            if below_share && !self.below_share(next) {
                break;
            }
            if seats + self.waiting[next].seats() > self.limits.max_sequences {
                break;
            }
            let Some(mut s) = self.waiting.remove(next) else {
                break;
            };
            // Start on the cached blocks of its longest cached prefix.
            let mut cached = 0;
            if s.computed == 0 && s.table.blocks().is_empty() {
                (s.table, cached) = self.kv.lookup(&s.tokens, s.salt.as_deref());
                s.computed = cached;
            }
            // A fork copies at most one partly filled block.
            let blocks =
                KvCache::blocks_for(s.tokens.len()) - s.table.blocks().len() + s.forks.len();
            if blocks > self.kv.free_blocks() || !self.kv.grow(&mut s.table, s.tokens.len()) {
                self.kv.release(&mut s.table);
                s.computed = 0;
                self.waiting.insert(next, s);
                break;
            }
            seats += s.seats();
            let first_look = !std::mem::replace(&mut s.looked_up, true);
            if let Some(req) = self.requests.get_mut(&s.request) {
                if req.ticket.is_waiting() {
                    req.ticket.leave();
                    let _ = req.events.send(GenerateEvent::Started {
                        prompt_tokens: req.prompt_tokens,
                    });
                }
                if first_look && self.kv.prefix_caching() {
                    self.stats
                        .record_prefix_lookup(s.tokens.len() as u64, cached as u64);
                    if cached > 0 {
                        let _ = req
                            .events
                            .send(GenerateEvent::PrefixCached { tokens: cached });
                    }
                }
            }
            let n = (s.tokens.len() - s.computed).min(*budget);
            plan.push(Planned {
                seq: self.running.len(),
                start: s.computed,
                end: s.computed + n,
                draft: 0,
            });
            *budget -= n;
            self.running.push(s);
        }
    }

    fn commit(&mut self, model: &impl StepModel, plan: &[Planned], logits: Vec<Vec<f32>>) {
        let mut logits = logits.into_iter();
        let mut finished = vec![false; self.running.len()];
        let mut spawned = Vec::new();
        let mut gone = HashSet::new();
        let (mut prompt_tokens, mut generated) = (0u64, 0u64);
        let (mut drafted, mut accepted) = (0u64, 0u64);
        for p in plan {
            let s = &mut self.running[p.seq];
            if p.draft > 0 {
                let drafts = s.tokens.split_off(s.tokens.len() - p.draft);
                s.computed = p.start + 1;
                let rows: Vec<Vec<f32>> = logits.by_ref().take(1 + p.draft).collect();
                let Some(req) = self.requests.get_mut(&s.request) else {
                    continue;
                };
                let v = Self::verify(model, s, &rows, &drafts, &mut req.events, &mut generated);
                s.drafter.record(p.draft, v.accepted);
                self.kv.register(&mut s.table, &s.tokens, s.computed);
                (drafted, accepted) = (drafted + p.draft as u64, accepted + v.accepted as u64);
                finished[p.seq] = v.finished;
                Self::settle(req, s.request, v.finished, &mut gone);
                continue;
            }
            s.computed = p.end;
            self.kv.register(&mut s.table, &s.tokens, s.computed);
            if p.end - p.start > 1 || s.choice.produced() == 0 {
                prompt_tokens += (p.end - p.start) as u64;
            }
            if p.end < s.tokens.len() {
                continue;
            }
            let Some(row) = logits.next() else {
                break;
            };
            let Some(req) = self.requests.get_mut(&s.request) else {
                continue;
            };
            // The prompt is in: choices 1..n split off, sharing its blocks.
            for choice in std::mem::take(&mut s.forks) {
                let mut child = Sequence {
                    request: s.request,
                    tokens: s.tokens.clone(),
                    computed: s.computed,
                    table: BlockTable::default(),
                    choice,
                    forks: Vec::new(),
                    looked_up: true,
                    salt: s.salt.clone(),
                    drafter: s.drafter,
                };
                match self.kv.fork(&s.table, s.computed) {
                    Some(table) => {
                        child.table = table;
                        if Self::advance(model, &mut child, &row, &mut req.events, &mut generated) {
                            req.live -= 1;
                        } else {
                            spawned.push(child);
                        }
                    }
                    None => {
                        // No block for the copy: it recomputes the prompt later.
                        child.computed = 0;
                        self.waiting.push_front(child);
                    }
                }
            }
            finished[p.seq] = Self::advance(model, s, &row, &mut req.events, &mut generated);
            Self::settle(req, s.request, finished[p.seq], &mut gone);
        }
        let kv = &mut self.kv;
        let mut index = 0;
        self.running.retain_mut(|s| {
            let done = finished.get(index).copied().unwrap_or(false);
            index += 1;
            if done {
                kv.release(&mut s.table);
            }
            !done
        });
        self.running.extend(spawned);
        let done: Vec<u64> = self
            .requests
            .iter()
            .filter(|(id, r)| r.live == 0 || gone.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            self.remove(id);
        }
        self.stats.record_step(prompt_tokens, generated);
        if drafted > 0 {
            self.stats.record_drafts(drafted, accepted);
        }
        self.publish();
    }

    /// Counts a finished choice off its request and notes a request whose
    /// client left (once).
    fn settle(req: &mut Request, id: u64, finished: bool, gone: &mut HashSet<u64>) {
        if finished {
            req.live -= 1;
        }
        if req.events.is_closed() && gone.insert(id) {
            tracing::info!(request = id, "generation cancelled: the client went away");
        }
    }

    /// Samples `s`'s next token from `row`. Returns whether it finished
    /// (or its client left).
    fn advance(
        model: &impl StepModel,
        s: &mut Sequence,
        row: &[f32],
        events: &mut Events,
        generated: &mut u64,
    ) -> bool {
        match s.choice.accept(model.tokenizer(), row, events) {
            Ok(Next::Continue(token)) => {
                *generated += 1;
                s.tokens.push(token);
                false
            }
            Ok(Next::Done) => {
                *generated += 1;
                true
            }
            Err(_) => true,
        }
    }

    /// When the scheduler must look again although no client has read:
    /// the earliest deadline or stall timeout of a request in hand.
    pub(super) fn next_timeout(&self) -> Option<Instant> {
        self.requests
            .values()
            .flat_map(|r| [r.deadline.map(|(d, _)| d), r.events.stall_expiry()])
            .flatten()
            .min()
    }

    fn publish(&self) {
        let used = self.kv.total_blocks() - self.kv.free_blocks();
        self.stats
            .set_batch(self.running.len(), used, self.kv.total_blocks());
        self.stats.set_cached_blocks(self.kv.cached_blocks());
    }
}
