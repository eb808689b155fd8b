//! Attention for a tile of query rows at once: up to [`TILE_ROWS`] rows of
//! one sequence, and the query heads that share one key/value head, read
//! each block of keys and values once per tile instead of once per query —
//! from L1, where one query at a time streams them from L2.
//!
//! Each query's arithmetic is that of [`super::attend`] step for step: the
//! same dot products and reduction tree, the same soft cap, maximum and
//! exponentials over the same slice, the same in-order weighted sums. The
//! results are bit-identical, so a row still does not depend on the rows it
//! shares a call with.

use rayon::prelude::*;

use super::{simd, spans, CacheLayer, QueryRow, Scoring};

/// Rows of one sequence attended together.
const TILE_ROWS: usize = 8;

/// Whether the tiled path runs for head size `d` on this CPU (AVX2 and FMA).
pub(super) fn available(d: usize) -> bool {
    d > 0 && d.is_multiple_of(8) && simd::avx2()
}

/// [`super::paged_attention`] by tiles; the caller checked the shapes and
/// [`available`].
pub(super) fn paged_attention(
    q: &[f32],
    heads: usize,
    rows: &[QueryRow<'_>],
    cache: CacheLayer<'_>,
    scoring: Scoring,
) -> Vec<f32> {
    let layout = cache.layout;
    let d = layout.head_dim;
    if q.is_empty() {
        return Vec::new();
    }
    let (kv_heads, group) = (layout.kv_heads, heads / layout.kv_heads);
    let tiles: Vec<(usize, usize)> = tiles(rows).collect();
    // A few tiles of a few key/value heads (one sequence decoding) would
    // leave workers idle: then each group's query heads are split too.
    let want = 2 * rayon::current_num_threads().max(1);
    let pieces = want.div_ceil(tiles.len() * kv_heads).clamp(1, group);
    let per_piece = group.div_ceil(pieces);
    let tasks: Vec<Tile> = tiles
        .iter()
        .flat_map(|&(start, end)| {
            (0..kv_heads).flat_map(move |kv_head| {
                (0..group).step_by(per_piece).map(move |g| Tile {
                    q,
                    heads,
                    first_row: start,
                    rows: &rows[start..end],
                    kv_head,
                    first_head: kv_head * group + g,
                    count: per_piece.min(group - g),
                })
            })
        })
        .collect();
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(Vec::new, |scores, tile| tile.attend(cache, scoring, scores))
        .collect();
    let mut out = vec![0f32; q.len()];
    for (tile, part) in tasks.iter().zip(&parts) {
        let len = tile.count * d;
        for (i, src) in part.chunks_exact(len).enumerate() {
            let at = ((tile.first_row + i) * heads + tile.first_head) * d;
            out[at..at + len].copy_from_slice(src);
        }
    }
    out
}

/// Runs of consecutive rows that read the same blocks, at most
/// [`TILE_ROWS`] long: `(first, end)` row indices.
fn tiles<'a>(rows: &'a [QueryRow<'_>]) -> impl Iterator<Item = (usize, usize)> + 'a {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start == rows.len() {
            return None;
        }
        let blocks = rows[start].blocks;
        let end = (start + 1..rows.len())
            .take(TILE_ROWS - 1)
            .find(|&r| rows[r].blocks != blocks)
            .unwrap_or_else(|| rows.len().min(start + TILE_ROWS));
        let tile = (start, end);
        start = end;
        Some(tile)
    })
}

/// The rows of one tile and `count` query heads from `first_head`, all of
/// key/value head `kv_head`.
struct Tile<'a> {
    q: &'a [f32],
    heads: usize,
    first_row: usize,
    rows: &'a [QueryRow<'a>],
    kv_head: usize,
    first_head: usize,
    count: usize,
}

impl Tile<'_> {
    /// The tile's outputs: `[rows][count][head_dim]`.
    /// `scores` is scratch, reused between the tiles of one worker.
    fn attend(&self, cache: CacheLayer<'_>, scoring: Scoring, scores: &mut Vec<f32>) -> Vec<f32> {
        let CacheLayer { k, v, layout } = cache;
        let (d, bs, count) = (layout.head_dim, layout.block_size, self.count);
        let ranges: Vec<(usize, usize)> = self
            .rows
            .iter()
            .map(|r| (scoring.first(r.seen), r.seen))
            .collect();
        let from = ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let to = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let width = to - from;
        let union = QueryRow {
            blocks: self.rows[0].blocks,
            seen: to,
        };
        scores.clear();
        scores.resize(self.rows.len() * count * width, 0.0);

        // The part of each block span that each row sees: (the offset of
        // its first key or value, the row, its first and end positions).
        let mut parts = Vec::new();
        let mut pos = from;
        for (block, slot, n) in spans(&union, bs, from) {
            let base = layout.offset(block, self.kv_head, slot);
            for (i, &(lo, hi)) in ranges.iter().enumerate() {
                let (lo, hi) = (lo.max(pos), hi.min(pos + n));
                if lo < hi {
                    parts.push((base + (lo - pos) * d, i, lo, hi));
                }
            }
            pos += n;
        }

        for &(at, i, lo, hi) in &parts {
            let keys = &k[at..at + (hi - lo) * d];
            let queries = self.queries(i, d);
            let out = &mut scores[i * count * width + (lo - from)..];
            for_query_chunks(count, |m, g| {
                score(
                    m,
                    &queries[g * d..],
                    keys,
                    d,
                    scoring.scale,
                    &mut out[g * width..],
                    width,
                );
            });
        }

        // Each row's scores become its weights `exp(s − max) · (1 / Σ)`,
        // the products the per-query sums form one key at a time.
        for (i, &(lo, hi)) in ranges.iter().enumerate() {
            for g in 0..count {
                let row = (i * count + g) * width;
                let s = &mut scores[row + lo - from..row + hi - from];
                scoring.cap(s);
                let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let inv = 1.0 / simd::exp_sum(s, max);
                s.iter_mut().for_each(|p| *p *= inv);
            }
        }

        let mut out = vec![0f32; self.rows.len() * count * d];
        for &(at, i, lo, hi) in &parts {
            let values = &v[at..at + (hi - lo) * d];
            let weights = &scores[i * count * width + (lo - from)..];
            let outs = &mut out[i * count * d..(i + 1) * count * d];
            for_query_chunks(count, |m, g| {
                weigh(
                    m,
                    values,
                    (&weights[g * width..], width),
                    &mut outs[g * d..],
                    d,
                );
            });
        }
        out
    }

    /// The tile's `count` queries of tile row `i`.
    fn queries(&self, i: usize, d: usize) -> &[f32] {
        let at = ((self.first_row + i) * self.heads + self.first_head) * d;
        &self.q[at..at + self.count * d]
    }
}

/// Calls `f(m, g)` for chunks of `m ≤ 3` queries starting at query `g`.
fn for_query_chunks(group: usize, mut f: impl FnMut(usize, usize)) {
    let mut g = 0;
    while g < group {
        let m = (group - g).min(3);
        f(m, g);
        g += m;
    }
}

/// Writes `scale · (query · key)` of `m ≤ 3` queries (rows of `d` in
/// `queries`) against each key of `keys` into `out`, query `j`'s from
/// `out[j · stride]`.
fn score(
    m: usize,
    queries: &[f32],
    keys: &[f32],
    d: usize,
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    let n = keys.len() / d;
    assert!(
        (1..=3).contains(&m)
            && d.is_multiple_of(8)
            && queries.len() >= m * d
            && out.len() >= (m - 1) * stride + n,
        "tiled attention: scores out of bounds"
    );
    let (q, k, o) = (queries.as_ptr(), keys.as_ptr(), out.as_mut_ptr());
    // SAFETY: AVX2 and FMA (`available`); the bounds were checked.
    unsafe {
        match m {
            1 => avx2::scores::<1>(q, k, n, d, scale, o, stride),
            2 => avx2::scores::<2>(q, k, n, d, scale, o, stride),
            _ => avx2::scores::<3>(q, k, n, d, scale, o, stride),
        }
    }
}

/// Adds `Σ_k weights_j[k] · values[k]` to row `j` of `outs` (rows of `d`)
/// for `m ≤ 3` queries, query `j`'s weights from `weights[j · stride]`.
fn weigh(m: usize, values: &[f32], (weights, stride): (&[f32], usize), outs: &mut [f32], d: usize) {
    let n = values.len() / d;
    assert!(
        (1..=3).contains(&m)
            && d.is_multiple_of(8)
            && weights.len() >= (m - 1) * stride + n
            && outs.len() >= m * d,
        "tiled attention: weighted sums out of bounds"
    );
    let (v, w, o) = (values.as_ptr(), weights.as_ptr(), outs.as_mut_ptr());
    // SAFETY: AVX2 and FMA (`available`); the bounds were checked.
    unsafe {
        match m {
            1 => avx2::weigh::<1>(v, n, d, (w, stride), o),
            2 => avx2::weigh::<2>(v, n, d, (w, stride), o),
            _ => avx2::weigh::<3>(v, n, d, (w, stride), o),
        }
    }
}

mod avx2 {
    use std::arch::x86_64::*;

    /// The scores of `M` queries against `n` keys, two keys at a time so
    /// the `2·M` sums and the `M` query chunks stay in the sixteen AVX2
    /// registers; each reduced as [`super::simd::avx2::scores`] reduces it.
    ///
    /// # Safety
    /// AVX2 and FMA; `q` holds `M` rows of `d` (a multiple of 8), `k` `n`
    /// rows of `d`, and `o` `M` rows of `n` scores `stride` apart.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores<const M: usize>(
        q: *const f32,
        k: *const f32,
        n: usize,
        d: usize,
        scale: f32,
        o: *mut f32,
        stride: usize,
    ) {
        let mut i = 0;
        while i + 2 <= n {
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            for c in (0..d).step_by(8) {
                // SAFETY: `c + 8 <= d`; keys `i`, `i + 1` and each query
                // are in bounds.
                let (k0, k1) = unsafe {
                    (
                        _mm256_loadu_ps(k.add(i * d + c)),
                        _mm256_loadu_ps(k.add((i + 1) * d + c)),
                    )
                };
                for (m, a) in acc.iter_mut().enumerate() {
                    let qc = unsafe { _mm256_loadu_ps(q.add(m * d + c)) };
                    a[0] = _mm256_fmadd_ps(qc, k0, a[0]);
                    a[1] = _mm256_fmadd_ps(qc, k1, a[1]);
                }
            }
            for (m, a) in acc.iter().enumerate() {
                // Lanes 0 and 1 of the low half and 4 and 5 of the high:
                // ((s0 + s1) + (s2 + s3)) per key, as the four-key case.
                let h = _mm256_hadd_ps(a[0], a[1]);
                let h = _mm256_hadd_ps(h, h);
                let two = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
                let two = _mm_mul_ps(two, _mm_set1_ps(scale));
                // SAFETY: scores `i`, `i + 1` of query `m` are in `o`.
                unsafe { _mm_storel_epi64(o.add(m * stride + i).cast(), _mm_castps_si128(two)) };
            }
            i += 2;
        }
        if i < n {
            for m in 0..M {
                let mut acc = _mm256_setzero_ps();
                for c in (0..d).step_by(8) {
                    // SAFETY: as above.
                    let (qc, kc) = unsafe {
                        (
                            _mm256_loadu_ps(q.add(m * d + c)),
                            _mm256_loadu_ps(k.add(i * d + c)),
                        )
                    };
                    acc = _mm256_fmadd_ps(qc, kc, acc);
                }
                let h = _mm256_hadd_ps(acc, acc);
                let h = _mm256_hadd_ps(h, h);
                let one = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
                // SAFETY: score `i` of query `m` is in `o`.
                unsafe { *o.add(m * stride + i) = _mm_cvtss_f32(one) * scale };
            }
        }
    }

    /// `M` queries' weighted sums of `n` value rows, sixteen lanes at a
    /// time, each lane summed in key order as
    /// [`super::simd::avx2::accumulate`] sums it. `w` holds the weights,
    /// already multiplied by their query's scale.
    ///
    /// # Safety
    /// AVX2 and FMA; `v` holds `n` rows of `d` (a multiple of 8), `w` `M`
    /// rows of `n` weights `stride` apart, and `o` `M` rows of `d`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weigh<const M: usize>(
        v: *const f32,
        n: usize,
        d: usize,
        w: (*const f32, usize),
        o: *mut f32,
    ) {
        let mut c = 0;
        while c + 16 <= d {
            // SAFETY: lanes `c..c + 16` are in each row.
            unsafe { lanes::<M, 2>(v.add(c), n, d, w, o.add(c)) };
            c += 16;
        }
        if c < d {
            // SAFETY: lanes `c..c + 8` are in each row.
            unsafe { lanes::<M, 1>(v.add(c), n, d, w, o.add(c)) };
        }
    }

    /// [`weigh`] for the `8·L` lanes from `v` and `o`, held in registers
    /// over all keys.
    ///
    /// # Safety
    /// As for [`weigh`], with `8·L` lanes from `v` and `o` in each row.
    #[inline(always)]
    unsafe fn lanes<const M: usize, const L: usize>(
        v: *const f32,
        n: usize,
        d: usize,
        (w, stride): (*const f32, usize),
        o: *mut f32,
    ) {
        let mut acc = [[_mm256_setzero_ps(); L]; M];
        for (m, a) in acc.iter_mut().enumerate() {
            for (j, a) in a.iter_mut().enumerate() {
                // SAFETY: lanes `8·j..8·j + 8` of row `m` are in `o`.
                *a = unsafe { _mm256_loadu_ps(o.add(m * d + 8 * j)) };
            }
        }
        for key in 0..n {
            let mut x = [_mm256_setzero_ps(); L];
            for (j, x) in x.iter_mut().enumerate() {
                // SAFETY: row `key` is in `v`.
                *x = unsafe { _mm256_loadu_ps(v.add(key * d + 8 * j)) };
            }
            for (m, a) in acc.iter_mut().enumerate() {
                // SAFETY: weight `key` of query `m` is in `w`.
                let wm = unsafe { _mm256_broadcast_ss(&*w.add(m * stride + key)) };
                for (a, x) in a.iter_mut().zip(&x) {
                    *a = _mm256_fmadd_ps(wm, *x, *a);
                }
            }
        }
        for (m, a) in acc.iter().enumerate() {
            for (j, a) in a.iter().enumerate() {
                // SAFETY: as above.
                unsafe { _mm256_storeu_ps(o.add(m * d + 8 * j), *a) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::super::tests::random_cache;
    use super::super::{by_query, PagedLayout};
    use super::*;

    #[test]
    fn tiles_match_one_query_at_a_time_bit_for_bit() {
        if !simd::avx2() {
            eprintln!("no AVX2 and FMA: only the per-query path runs here");
            return;
        }
        let mut rng = StdRng::seed_from_u64(11);
        // Groups of 1 to 7 query heads, head sizes with and without a
        // 32-lane remainder, blocks of one position and of many.
        for (heads, kv_heads, d, bs) in [
            (9, 3, 64, 16),
            (4, 4, 8, 1),
            (8, 2, 72, 5),
            (14, 2, 128, 16),
            (4, 2, 40, 3),
            (5, 1, 16, 7),
        ] {
            let layout = PagedLayout {
                block_size: bs,
                kv_heads,
                head_dim: d,
            };
            let (k, v, ids) = random_cache(&mut rng, layout, 48);
            let (a, b) = ids.split_at(ids.len() / 2);
            // A prompt of 19 rows (tiles of 8, 8 and 3), a decode row of
            // another sequence, then a chunk of the first one further on.
            let mut rows: Vec<QueryRow> =
                (1..=19).map(|s| QueryRow { blocks: a, seen: s }).collect();
            rows.push(QueryRow {
                blocks: b,
                seen: 2 * bs + 3,
            });
            rows.extend((0..5).map(|i| QueryRow {
                blocks: a,
                seen: 4 * bs + i,
            }));
            let q: Vec<f32> = (0..rows.len() * heads * d)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let cache = CacheLayer {
                k: &k,
                v: &v,
                layout,
            };
            for scoring in [
                Scoring::scaled(0.125),
                Scoring {
                    scale: 0.3,
                    softcap: Some(1.0),
                    window: Some(6),
                },
                Scoring {
                    scale: 0.2,
                    softcap: None,
                    window: Some(bs + 1),
                },
            ] {
                let tiled = paged_attention(&q, heads, &rows, cache, scoring);
                let alone = by_query(&q, heads, &rows, cache, scoring);
                assert!(
                    tiled
                        .iter()
                        .zip(&alone)
                        .all(|(t, a)| t.to_bits() == a.to_bits()),
                    "{heads}/{kv_heads}x{d} bs {bs} {scoring:?}"
                );
            }
        }
    }

    #[test]
    fn tiles_are_runs_of_one_sequence_at_most_eight_long() {
        let (a, b) = ([1u32, 2], [3u32]);
        let mut rows: Vec<QueryRow> = (1..=10)
            .map(|s| QueryRow {
                blocks: &a,
                seen: s,
            })
            .collect();
        rows.push(QueryRow {
            blocks: &b,
            seen: 1,
        });
        rows.push(QueryRow {
            blocks: &a,
            seen: 11,
        });
        let got: Vec<_> = tiles(&rows).collect();
        assert_eq!(got, [(0, 8), (8, 10), (10, 11), (11, 12)]);
    }
}
