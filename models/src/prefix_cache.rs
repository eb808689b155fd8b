//! The prefix cache's index: which KV blocks hold which token prefixes.
//!
//! A full block is named by a hash chained over every token from the start
//! of the sequence up to its end, so two sequences share a block only when
//! everything before it matched too. Blocks stay named after their last
//! holder lets go: they wait, least recently used first, to be reused by a
//! later request with the same prefix or taken for new work when the pool
//! runs short. The hash keys are drawn per process, so nobody can compute
//! a chain that collides with another's prompt.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};

/// A block's name: its prefix's chained hash (128 bits from two keyed hashes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(u64, u64);

impl BlockHash {
    fn mix(self, salt: &str, keys: &(RandomState, RandomState)) -> Self {
        let one = |k: &RandomState| {
            let mut h = k.build_hasher();
            self.hash(&mut h);
            salt.hash(&mut h);
            h.finish()
        };
        Self(one(&keys.0), one(&keys.1))
    }
}

/// Which blocks hold which prefixes, and the order unused ones go in.
pub(crate) struct PrefixIndex {
    keys: (RandomState, RandomState),
    by_hash: HashMap<BlockHash, u32>,
    hash_of: HashMap<u32, BlockHash>,
    /// Named blocks no sequence holds, by when they were last released.
    idle: BTreeMap<u64, u32>,
    idle_since: HashMap<u32, u64>,
    clock: u64,
}

impl PrefixIndex {
    pub(crate) fn new() -> Self {
        Self {
            keys: (RandomState::new(), RandomState::new()),
            by_hash: HashMap::new(),
            hash_of: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: HashMap::new(),
            clock: 0,
        }
    }

    /// The name of the block holding `tokens` after the prefix named `parent`.
    pub(crate) fn chain(&self, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let one = |keys: &RandomState| {
            let mut h = keys.build_hasher();
            parent.hash(&mut h);
            tokens.hash(&mut h);
            h.finish()
        };
        BlockHash(one(&self.keys.0), one(&self.keys.1))
    }

    /// The root of the chains of sequences salted with `salt`.
    pub(crate) fn salt(&self, salt: &str) -> BlockHash {
        self.chain(None, &[]).mix(salt, &self.keys)
    }

    /// The block named `hash`, if one is.
    pub(crate) fn find(&self, hash: BlockHash) -> Option<u32> {
        self.by_hash.get(&hash).copied()
    }

    /// Names `block` `hash`, unless another block already holds that prefix
    /// or `block` has a name.
    pub(crate) fn name(&mut self, block: u32, hash: BlockHash) {
        if self.by_hash.contains_key(&hash) || self.hash_of.contains_key(&block) {
            return;
        }
        self.by_hash.insert(hash, block);
        self.hash_of.insert(block, hash);
    }

    /// Whether `block` is named.
    pub(crate) fn is_named(&self, block: u32) -> bool {
        self.hash_of.contains_key(&block)
    }

    /// A named block's last holder let go: it waits to be reused.
    pub(crate) fn park(&mut self, block: u32) {
        self.clock += 1;
        self.idle.insert(self.clock, block);
        self.idle_since.insert(block, self.clock);
    }

    /// A waiting block is held again.
    pub(crate) fn unpark(&mut self, block: u32) {
        if let Some(t) = self.idle_since.remove(&block) {
            self.idle.remove(&t);
        }
    }

    /// Takes the least recently used waiting block for new work, forgetting
    /// its name.
    pub(crate) fn evict(&mut self) -> Option<u32> {
        let (_, block) = self.idle.pop_first()?;
        self.idle_since.remove(&block);
        if let Some(hash) = self.hash_of.remove(&block) {
            self.by_hash.remove(&hash);
        }
        Some(block)
    }

    /// Named blocks no sequence holds.
    pub(crate) fn idle(&self) -> usize {
        self.idle.len()
    }

    /// Named blocks, held or not.
    pub(crate) fn named(&self) -> usize {
        self.hash_of.len()
    }

    /// Forgets every name (waiting blocks are returned for the free list).
    pub(crate) fn clear(&mut self) -> Vec<u32> {
        self.by_hash.clear();
        self.hash_of.clear();
        self.idle_since.clear();
        std::mem::take(&mut self.idle).into_values().collect()
    }
}
