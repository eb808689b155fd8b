//! Attention over a paged KV cache: each query row reads its sequence's keys
//! and values straight from the cache blocks (no gather into a contiguous
//! copy), with the softmax fused into the pass.
//!
//! Cache layout, per layer: `[block][kv_head][slot][head_dim]`, so one head's
//! positions within a block are contiguous. Grouped-query attention maps
//! query head `h` to key/value head `h / (heads / kv_heads)`.

use rayon::prelude::*;

/// The shape of one layer of a paged cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedLayout {
    /// Positions per block.
    pub block_size: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
}

impl PagedLayout {
    /// Floats in one block of one layer (keys or values).
    pub fn block_len(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }

    /// Offset of `(block, kv_head, slot)` in a layer's keys or values.
    pub fn offset(&self, block: u32, kv_head: usize, slot: usize) -> usize {
        block as usize * self.block_len() + (kv_head * self.block_size + slot) * self.head_dim
    }
}

/// One query row: the blocks of its sequence and how many positions it sees
/// (its own position plus one: causal attention).
#[derive(Debug, Clone, Copy)]
pub struct QueryRow<'a> {
    /// The sequence's block table.
    pub blocks: &'a [u32],
    /// Positions attended: `0..seen`.
    pub seen: usize,
}

/// How attention scores are formed: `scale · (q · k)`, soft-capped as
/// Gemma 2 does (`cap · tanh(s / cap)`) where `softcap` is set, over the
/// last `window` positions only (a sliding-window layer) where that is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scoring {
    /// Multiplies each dot product.
    pub scale: f32,
    /// The soft cap of the scaled scores, if any.
    pub softcap: Option<f32>,
    /// Positions a query sees, its own included (`None`: all before it).
    pub window: Option<usize>,
}

impl Scoring {
    /// Plain scaled dot-product scores over every earlier position.
    pub fn scaled(scale: f32) -> Self {
        Self {
            scale,
            softcap: None,
            window: None,
        }
    }

    /// The first position a row that sees `0..seen` attends to.
    fn first(&self, seen: usize) -> usize {
        self.window.map_or(0, |w| seen.saturating_sub(w.max(1)))
    }

    fn cap(&self, scores: &mut [f32]) {
        if let Some(cap) = self.softcap {
            let inv = 1.0 / cap;
            for s in scores {
                *s = cap * (*s * inv).tanh();
            }
        }
    }
}

/// Scaled dot-product attention for `rows.len()` query rows.
///
/// `q` is `[rows, heads, head_dim]`; `k`/`v` are one layer of the cache.
/// Returns `[rows, heads, head_dim]`. Rows are independent: a row's result
/// does not depend on which other rows share the call.
///
/// # Panics
/// If the shapes disagree or a row sees more positions than its blocks hold.
pub fn paged_attention(
    q: &[f32],
    heads: usize,
    rows: &[QueryRow<'_>],
    k: &[f32],
    v: &[f32],
    layout: PagedLayout,
    scoring: Scoring,
) -> Vec<f32> {
    let d = layout.head_dim;
    check(q, heads, rows, layout);
    let cache = CacheLayer { k, v, layout };
    #[cfg(target_arch = "x86_64")]
    if tile::available(d) {
        return tile::paged_attention(q, heads, rows, cache, scoring);
    }
    by_query(q, heads, rows, cache, scoring)
}

/// [`paged_attention`] one query row and head at a time.
fn by_query(
    q: &[f32],
    heads: usize,
    rows: &[QueryRow<'_>],
    cache: CacheLayer<'_>,
    scoring: Scoring,
) -> Vec<f32> {
    let d = cache.layout.head_dim;
    let group = heads / cache.layout.kv_heads;
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(d)
        .with_min_len(4)
        .enumerate()
        .for_each_init(Vec::new, |scores, (i, o)| {
            let (row, head) = (i / heads, i % heads);
            let query = &q[i * d..(i + 1) * d];
            attend(query, &rows[row], head / group, cache, scoring, scores, o);
        });
    out
}

fn check(q: &[f32], heads: usize, rows: &[QueryRow<'_>], layout: PagedLayout) {
    assert!(
        heads.is_multiple_of(layout.kv_heads) && q.len() == rows.len() * heads * layout.head_dim,
        "paged attention: {} query values for {} rows of {heads} heads of {}",
        q.len(),
        rows.len(),
        layout.head_dim
    );
    for r in rows {
        assert!(
            r.seen >= 1 && r.seen <= r.blocks.len() * layout.block_size,
            "paged attention: a row sees {} positions but its {} blocks hold {}",
            r.seen,
            r.blocks.len(),
            r.blocks.len() * layout.block_size
        );
    }
}

/// One layer of the paged cache.
#[derive(Clone, Copy)]
struct CacheLayer<'a> {
    k: &'a [f32],
    v: &'a [f32],
    layout: PagedLayout,
}

/// The spans of a row's blocks it attends to: `(block, first slot, slots)`.
fn spans<'a>(
    row: &'a QueryRow<'_>,
    bs: usize,
    from: usize,
) -> impl Iterator<Item = (u32, usize, usize)> + 'a {
    row.blocks
        .iter()
        .enumerate()
        .filter_map(move |(b, &block)| {
            let (lo, hi) = (from.max(b * bs), row.seen.min((b + 1) * bs));
            (lo < hi).then(|| (block, lo - b * bs, hi - lo))
        })
}

/// One query head's attention over the positions its row sees.
fn attend(
    query: &[f32],
    row: &QueryRow<'_>,
    kv_head: usize,
    cache: CacheLayer<'_>,
    scoring: Scoring,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let CacheLayer { k, v, layout } = cache;
    let (d, bs) = (layout.head_dim, layout.block_size);
    let from = scoring.first(row.seen);
    scores.clear();
    for (block, slot, n) in spans(row, bs, from) {
        let base = layout.offset(block, kv_head, slot);
        simd::scores(query, &k[base..base + n * d], d, scoring.scale, scores);
    }
    scoring.cap(scores);
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let total = simd::exp_sum(scores, max);
    let inv = 1.0 / total;
    out.fill(0.0);
    let mut done = 0;
    for (block, slot, n) in spans(row, bs, from) {
        let base = layout.offset(block, kv_head, slot);
        simd::accumulate(&v[base..base + n * d], &scores[done..done + n], inv, out);
        done += n;
    }
}

/// A dot product with eight independent accumulators, so the compiler can
/// keep them in one SIMD register (the portable path).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

mod simd;
#[cfg(target_arch = "x86_64")]
mod tile;

/// The plain reference: gathers each row's keys and values into contiguous
/// tensors and runs candle's stock matmul and softmax.
pub fn paged_attention_reference(
    q: &[f32],
    heads: usize,
    rows: &[QueryRow<'_>],
    k: &[f32],
    v: &[f32],
    layout: PagedLayout,
    scoring: Scoring,
) -> candle_core::Result<Vec<f32>> {
    use candle_core::{Device, Tensor};
    let d = layout.head_dim;
    let group = heads / layout.kv_heads;
    let mut out = Vec::with_capacity(q.len());
    for (r, row) in rows.iter().enumerate() {
        for h in 0..heads {
            let from = scoring.first(row.seen);
            let seen = row.seen - from;
            let gather = |src: &[f32]| -> Vec<f32> {
                (from..row.seen)
                    .flat_map(|p| {
                        let at = layout.offset(
                            row.blocks[p / layout.block_size],
                            h / group,
                            p % layout.block_size,
                        );
                        src[at..at + d].to_vec()
                    })
                    .collect()
            };
            let keys = Tensor::from_vec(gather(k), (seen, d), &Device::Cpu)?;
            let values = Tensor::from_vec(gather(v), (seen, d), &Device::Cpu)?;
            let at = (r * heads + h) * d;
            let query = Tensor::from_slice(&q[at..at + d], (1, d), &Device::Cpu)?;
            let mut scores = (query.matmul(&keys.t()?)? * f64::from(scoring.scale))?;
            if let Some(cap) = scoring.softcap {
                scores = ((scores / f64::from(cap))?.tanh()? * f64::from(cap))?;
            }
            let probs = candle_core::Tensor::exp(&scores.broadcast_sub(&scores.max_keepdim(1)?)?)?;
            let probs = probs.broadcast_div(&probs.sum_keepdim(1)?)?;
            out.extend(probs.matmul(&values)?.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Random keys and values for `blocks` blocks of `layout`, and the
    /// block ids in a random order.
    pub(super) fn random_cache(
        rng: &mut StdRng,
        layout: PagedLayout,
        blocks: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
        let len = blocks * layout.block_len();
        let k = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
        let v = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut ids: Vec<u32> = (0..blocks as u32).collect();
        ids.shuffle(rng);
        (k, v, ids)
    }

    #[test]
    fn matches_the_reference_on_scattered_blocks() {
        let mut rng = StdRng::seed_from_u64(3);
        for (heads, kv_heads, d, bs) in [(1, 1, 8, 1), (9, 3, 64, 16), (4, 2, 10, 5), (6, 6, 7, 4)]
        {
            let layout = PagedLayout {
                block_size: bs,
                kv_heads,
                head_dim: d,
            };
            let (k, v, ids) = random_cache(&mut rng, layout, 40);
            let (a, b) = ids.split_at(ids.len() / 2);
            // Rows of two sequences at various positions, including a row
            // that ends exactly on a block boundary and the very first.
            let seen = [1, bs, bs + 1, 3 * bs - 1, a.len() * bs];
            let mut rows: Vec<QueryRow> = seen
                .iter()
                .map(|&s| QueryRow { blocks: a, seen: s })
                .collect();
            rows.push(QueryRow { blocks: b, seen: 2 });
            let q: Vec<f32> = (0..rows.len() * heads * d)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let scale = 1.0 / (d as f32).sqrt();
            // Plain, soft-capped (tight enough to bite), and windows that
            // end inside a block, on a boundary, and cover everything.
            let capped = |softcap, window| Scoring {
                scale,
                softcap,
                window,
            };
            for scoring in [
                Scoring::scaled(scale),
                capped(Some(0.5), None),
                capped(None, Some(3)),
                capped(None, Some(bs)),
                capped(Some(2.0), Some(2 * bs + 1)),
                capped(None, Some(10_000)),
            ] {
                let got = paged_attention(&q, heads, &rows, &k, &v, layout, scoring);
                let want =
                    paged_attention_reference(&q, heads, &rows, &k, &v, layout, scoring).unwrap();
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-5,
                        "{heads}/{kv_heads}x{d} bs {bs} {scoring:?}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        let mut rng = StdRng::seed_from_u64(4);
        let layout = PagedLayout {
            block_size: 4,
            kv_heads: 2,
            head_dim: 16,
        };
        let len = 10 * layout.block_len();
        let k: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
        let v: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
        let blocks = [7u32, 2, 5];
        let rows: Vec<QueryRow> = (1..=12)
            .map(|s| QueryRow {
                blocks: &blocks,
                seen: s,
            })
            .collect();
        let q: Vec<f32> = (0..rows.len() * 4 * 16)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let scoring = Scoring {
            scale: 0.25,
            softcap: Some(3.0),
            window: Some(5),
        };
        let all = paged_attention(&q, 4, &rows, &k, &v, layout, scoring);
        for (r, row) in rows.iter().enumerate() {
            let alone = paged_attention(
                &q[r * 64..(r + 1) * 64],
                4,
                &[*row],
                &k,
                &v,
                layout,
                scoring,
            );
            assert_eq!(alone, all[r * 64..(r + 1) * 64]);
        }
    }
}
