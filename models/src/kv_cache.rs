//! The paged KV cache: one pool of fixed-size blocks per loaded model,
//! shared by every sequence. A sequence owns a [`BlockTable`] naming its
//! blocks in order, so sequences join and leave at any step without moving
//! anyone else's keys and values.
//!
//! Blocks are reference-counted: `n > 1` choices fork a prompt's table and
//! share its full blocks; the partly filled last block is copied, so a write
//! never lands in a shared block.

use candle_core::{DType, Device, IndexOp, Tensor};
use kindling_kernels::PagedLayout;

use crate::error::{ModelError, Result};
use crate::prefix_cache::{BlockHash, PrefixIndex};

/// The shape of the cache a model needs per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Number of transformer layers.
    pub layers: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
}

impl CacheShape {
    /// Bytes of keys and values one position takes across all layers (f32).
    pub fn bytes_per_position(&self) -> usize {
        self.bytes_per_position_in(DType::F32)
    }

    /// The same, for a cache holding `dtype`.
    pub fn bytes_per_position_in(&self, dtype: DType) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * dtype.size_in_bytes()
    }
}

/// Positions per block.
pub const BLOCK_SIZE: usize = 16;

/// The blocks of one sequence, in position order.
#[derive(Debug, Default)]
pub struct BlockTable {
    blocks: Vec<u32>,
    /// The prefix names of the leading full blocks, once computed.
    hashes: Vec<BlockHash>,
    /// What the first block's name is chained to: a salt's name, so that
    /// only sequences with the same salt share blocks.
    root: Option<BlockHash>,
}

impl BlockTable {
    /// The block ids.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Positions the blocks can hold.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * BLOCK_SIZE
    }
}

/// Where the blocks live.
enum Store {
    /// f32 in host memory, for the CPU kernels.
    Host {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    },
    /// One tensor per layer on a device, `[2, blocks, kv_heads,
    /// block_size, head_dim]` (keys, then values), in the model's dtype.
    Device(Vec<Tensor>),
}

/// A pool of key/value blocks for every layer of one model.
pub struct KvCache {
    shape: CacheShape,
    layout: PagedLayout,
    store: Store,
    refs: Vec<u32>,
    free: Vec<u32>,
    /// The prefix cache, when on.
    prefix: Option<PrefixIndex>,
}

impl KvCache {
    /// A pool of `blocks` blocks. The memory is zero-filled on demand by the
    /// OS, so untouched blocks cost address space, not resident memory.
    pub fn new(shape: CacheShape, blocks: usize) -> Self {
        let layout = Self::layout_for(&shape);
        let len = blocks * layout.block_len();
        let store = Store::Host {
            keys: (0..shape.layers).map(|_| vec![0f32; len]).collect(),
            values: (0..shape.layers).map(|_| vec![0f32; len]).collect(),
        };
        Self::with_store(shape, layout, store, blocks)
    }

    /// A pool of `blocks` blocks on `device`, holding `dtype` (allocated,
    /// and zeroed, now).
    pub fn on_device(
        shape: CacheShape,
        blocks: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let layout = Self::layout_for(&shape);
        let layers = (0..shape.layers)
            .map(|_| {
                Tensor::zeros(
                    (2, blocks, shape.kv_heads, BLOCK_SIZE, shape.head_dim),
                    dtype,
                    device,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self::with_store(
            shape,
            layout,
            Store::Device(layers),
            blocks,
        ))
    }

    fn layout_for(shape: &CacheShape) -> PagedLayout {
        PagedLayout {
            block_size: BLOCK_SIZE,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
        }
    }

    fn with_store(shape: CacheShape, layout: PagedLayout, store: Store, blocks: usize) -> Self {
        Self {
            shape,
            layout,
            store,
            refs: vec![0; blocks],
            // Popped from the end: hand out low ids first.
            free: (0..blocks as u32).rev().collect(),
            prefix: None,
        }
    }

    /// Turns prefix caching on or off. Off, cached blocks go back to the
    /// free list at once.
    pub fn set_prefix_caching(&mut self, on: bool) {
        match (on, &mut self.prefix) {
            (true, None) => self.prefix = Some(PrefixIndex::new()),
            (false, Some(index)) => {
                let idle = index.clear();
                self.free.extend(idle);
                self.prefix = None;
            }
            _ => {}
        }
    }

    /// Whether prefix caching is on.
    pub fn prefix_caching(&self) -> bool {
        self.prefix.is_some()
    }

    /// Blocks that hold a named prefix (held by a sequence or waiting for reuse).
    pub fn cached_blocks(&self) -> usize {
        self.prefix.as_ref().map_or(0, PrefixIndex::named)
    }

    /// A block for new work: a free one, else the least recently used
    /// cached one.
    fn take_block(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => self.prefix.as_mut()?.evict()?,
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Starts a sequence of `tokens` on the cached blocks that already hold
    /// its longest cached prefix of whole blocks (leaving at least one token
    /// to compute, whose logits the sequence needs). With a `salt`, only
    /// blocks named under the same salt are found, and the sequence's own
    /// blocks are named under it. Returns the table and the positions it holds.
    pub fn lookup(&mut self, tokens: &[u32], salt: Option<&str>) -> (BlockTable, usize) {
        let mut table = BlockTable::default();
        let Some(index) = self.prefix.as_mut() else {
            return (table, 0);
        };
        table.root = salt.map(|s| index.salt(s));
        let full = tokens.len().saturating_sub(1) / BLOCK_SIZE;
        for chunk in tokens.chunks_exact(BLOCK_SIZE).take(full) {
            let hash = index.chain(table.hashes.last().copied().or(table.root), chunk);
            let Some(block) = index.find(hash) else {
                break;
            };
            let r = &mut self.refs[block as usize];
            if *r == 0 {
                index.unpark(block);
            }
            *r += 1;
            table.blocks.push(block);
            table.hashes.push(hash);
        }
        let held = table.blocks.len() * BLOCK_SIZE;
        (table, held)
    }

    /// Names the full blocks of `table` among its first `computed`
    /// positions of `tokens`, so later sequences can reuse them.
    pub fn register(&mut self, table: &mut BlockTable, tokens: &[u32], computed: usize) {
        let Some(index) = self.prefix.as_mut() else {
            return;
        };
        let full = (computed.min(tokens.len()) / BLOCK_SIZE).min(table.blocks.len());
        while table.hashes.len() < full {
            let i = table.hashes.len();
            let hash = index.chain(
                table.hashes.last().copied().or(table.root),
                &tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE],
            );
            index.name(table.blocks[i], hash);
            table.hashes.push(hash);
        }
    }

    /// The per-layer tensors of a device pool.
    pub fn device_layers(&self) -> Result<&[Tensor]> {
        match &self.store {
            Store::Device(layers) => Ok(layers),
            Store::Host { .. } => Err(host_only("a device model was given a host cache")),
        }
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(positions: usize) -> usize {
        positions.div_ceil(BLOCK_SIZE)
    }

    /// Bytes of one block across all layers.
    pub fn bytes_per_block(shape: &CacheShape) -> usize {
        BLOCK_SIZE * shape.bytes_per_position()
    }

    /// The layout of one layer.
    pub fn layout(&self) -> PagedLayout {
        self.layout
    }

    /// The model shape this pool was made for.
    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks no sequence holds (cached ones included: they are given up
    /// when needed).
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.prefix.as_ref().map_or(0, PrefixIndex::idle)
    }

    /// Grows `table` to hold `positions` positions. Returns `false`, and
    /// changes nothing, if the pool lacks the blocks.
    pub fn grow(&mut self, table: &mut BlockTable, positions: usize) -> bool {
        let need = Self::blocks_for(positions).saturating_sub(table.blocks.len());
        if need > self.free_blocks() {
            return false;
        }
        for _ in 0..need {
            if let Some(b) = self.take_block() {
                table.blocks.push(b);
            }
        }
        true
    }

    /// Returns `table`'s blocks to the pool (shared blocks once their last
    /// holder lets go) and empties it.
    pub fn release(&mut self, table: &mut BlockTable) {
        table.hashes.clear();
        for b in table.blocks.drain(..) {
            let r = &mut self.refs[b as usize];
            *r = r.saturating_sub(1);
            if *r == 0 {
                match self.prefix.as_mut().filter(|p| p.is_named(b)) {
                    Some(index) => index.park(b),
                    None => self.free.push(b),
                }
            }
        }
    }

    /// A table for a copy of the sequence in `table` holding `len`
    /// positions: full blocks are shared, a partly filled last block is
    /// copied. `None` if no block is free for the copy.
    pub fn fork(&mut self, table: &BlockTable, len: usize) -> Option<BlockTable> {
        let full = len / BLOCK_SIZE;
        let partial = !len.is_multiple_of(BLOCK_SIZE);
        if partial && self.free_blocks() == 0 {
            return None;
        }
        let mut blocks = table.blocks[..full.min(table.blocks.len())].to_vec();
        let hashes = table.hashes[..full.min(table.hashes.len())].to_vec();
        if partial {
            let src = table.blocks[full];
            let dst = self.take_block()?;
            if self.copy_block(src, dst).is_err() {
                self.refs[dst as usize] = 0;
                self.free.push(dst);
                return None;
            }
            blocks.push(dst);
        }
        for &b in &blocks[..full.min(table.blocks.len())] {
            self.refs[b as usize] += 1;
        }
        Some(BlockTable {
            blocks,
            hashes,
            root: table.root,
        })
    }

    /// Copies block `src` to block `dst` in every layer.
    fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        match &mut self.store {
            Store::Host { keys, values } => {
                let n = self.layout.block_len();
                let (s, d) = (src as usize * n, dst as usize * n);
                for layer in keys.iter_mut().chain(values.iter_mut()) {
                    layer.copy_within(s..s + n, d);
                }
            }
            Store::Device(layers) => {
                let (s, d) = (src as usize, dst as usize);
                for layer in layers {
                    let block = layer.i((.., s..s + 1))?.contiguous()?;
                    layer.slice_set(&block, 1, d)?;
                }
            }
        }
        Ok(())
    }

    /// Writes keys and values (`[rows, kv_heads * head_dim]`) of `layer`:
    /// row `r` goes to position `positions[r]` of `tables[r]`.
    pub fn write(
        &mut self,
        layer: usize,
        tables: &[&[u32]],
        positions: &[usize],
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let d = self.layout.head_dim;
        let row_len = self.layout.kv_heads * d;
        if k.len() != positions.len() * row_len
            || v.len() != k.len()
            || tables.len() != positions.len()
        {
            return Err(ModelError::Tensor {
                name: "kv".into(),
                message: format!(
                    "{} values for {} rows of {row_len}",
                    k.len(),
                    positions.len()
                ),
            });
        }
        let Store::Host { keys, values } = &mut self.store else {
            return Err(host_only("host writes into a device cache"));
        };
        let (keys, values) = (&mut keys[layer], &mut values[layer]);
        for (r, (&p, table)) in positions.iter().zip(tables).enumerate() {
            let Some(&block) = table.get(p / BLOCK_SIZE) else {
                return Err(ModelError::Tensor {
                    name: "kv".into(),
                    message: format!(
                        "position {p} is beyond the sequence's {} blocks",
                        table.len()
                    ),
                });
            };
            for h in 0..self.layout.kv_heads {
                let at = self.layout.offset(block, h, p % BLOCK_SIZE);
                let from = r * row_len + h * d;
                keys[at..at + d].copy_from_slice(&k[from..from + d]);
                values[at..at + d].copy_from_slice(&v[from..from + d]);
            }
        }
        Ok(())
    }

    /// Keys and values of `layer`, for attention (empty for a device pool).
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        match &self.store {
            Store::Host { keys, values } => (&keys[layer], &values[layer]),
            Store::Device(_) => (&[], &[]),
        }
    }
}

fn host_only(what: &str) -> ModelError {
    ModelError::Tensor {
        name: "kv".into(),
        message: what.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: usize) -> KvCache {
        KvCache::new(
            CacheShape {
                layers: 2,
                kv_heads: 1,
                head_dim: 2,
            },
            blocks,
        )
    }

    #[test]
    fn grow_is_all_or_nothing_and_release_returns_blocks() {
        let mut kv = pool(3);
        let mut a = BlockTable::default();
        assert!(kv.grow(&mut a, BLOCK_SIZE + 1));
        assert_eq!((a.blocks().len(), kv.free_blocks()), (2, 1));
        let mut b = BlockTable::default();
        assert!(!kv.grow(&mut b, 2 * BLOCK_SIZE));
        assert_eq!((b.blocks().len(), kv.free_blocks()), (0, 1));
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 3);
        assert!(kv.grow(&mut b, 3 * BLOCK_SIZE));
    }

    #[test]
    fn fork_shares_full_blocks_and_copies_the_partial_one() {
        let mut kv = pool(4);
        let mut a = BlockTable::default();
        let len = BLOCK_SIZE + 3;
        assert!(kv.grow(&mut a, len));
        let positions: Vec<usize> = (0..len).collect();
        let vals: Vec<f32> = (0..len * 2).map(|x| x as f32).collect();
        let tables = vec![a.blocks(); len];
        for layer in 0..2 {
            kv.write(layer, &tables, &positions, &vals, &vals).unwrap();
        }
        let mut b = kv.fork(&a, len).unwrap();
        assert_eq!(b.blocks()[0], a.blocks()[0]);
        assert_ne!(b.blocks()[1], a.blocks()[1]);
        let (k, _) = kv.layer(1);
        let at = |t: &BlockTable, p: usize| {
            kv.layout()
                .offset(t.blocks()[p / BLOCK_SIZE], 0, p % BLOCK_SIZE)
        };
        assert_eq!(k[at(&b, len - 1)], k[at(&a, len - 1)]);
        // The shared block survives one holder's release.
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 4 - 2);
        kv.release(&mut b);
        assert_eq!(kv.free_blocks(), 4);
    }

    #[test]
    fn released_prefixes_are_found_again_until_their_blocks_are_needed() {
        let mut kv = pool(4);
        kv.set_prefix_caching(true);
        let tokens: Vec<u32> = (0..2 * BLOCK_SIZE as u32 + 5).collect();
        let (mut a, held) = kv.lookup(&tokens, None);
        assert_eq!(held, 0);
        assert!(kv.grow(&mut a, tokens.len()));
        kv.register(&mut a, &tokens, tokens.len());
        assert_eq!(kv.cached_blocks(), 2, "only full blocks are named");
        let first = a.blocks()[..2].to_vec();
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 4, "cached blocks still count as free");
        // The same prefix finds both blocks; a different first block finds none.
        let (mut b, held) = kv.lookup(&tokens, None);
        assert_eq!((held, b.blocks()), (2 * BLOCK_SIZE, &first[..]));
        let mut other = tokens.clone();
        other[0] = 99;
        assert_eq!(kv.lookup(&other, None).1, 0);
        // Under a salt, nothing named without it is found.
        let (mut salted, held) = kv.lookup(&tokens, Some("tenant-a"));
        assert_eq!(held, 0);
        kv.release(&mut salted);
        // A prompt of exactly two blocks reuses one: its last token must be computed.
        let (mut c, held) = kv.lookup(&tokens[..2 * BLOCK_SIZE], None);
        assert_eq!(held, BLOCK_SIZE);
        kv.release(&mut b);
        kv.release(&mut c);
        // New work takes the free block first, then the least recently used cached one.
        let mut d = BlockTable::default();
        assert!(kv.grow(&mut d, 4 * BLOCK_SIZE));
        assert_eq!(kv.cached_blocks(), 0);
        assert_eq!(kv.lookup(&tokens, None).1, 0);
        kv.release(&mut d);
        kv.set_prefix_caching(false);
        assert_eq!(kv.free_blocks(), 4);
    }
}
