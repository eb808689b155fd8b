//! Bidirectional attention for encoders over packed sequences: the batch's
//! tokens lie end to end (no padding), each sequence attends only to itself.

use rayon::prelude::*;

use crate::activation::exp;
use crate::dense::SendPtr;

/// Attention of every sequence in `qkv` (`[tokens, 3·heads·head_dim]`, each
/// row `q | k | v`); `sequences` gives each one's `(first row, length)`.
/// Returns the context, `[tokens, heads·head_dim]`. Each (sequence, head)
/// is computed on its own, so results do not depend on the batch.
///
/// # Panics
/// If `qkv` is not whole rows or a sequence lies outside it.
pub fn encoder_attention(
    qkv: &[f32],
    sequences: &[(usize, usize)],
    heads: usize,
    head_dim: usize,
) -> Vec<f32> {
    let hidden = heads * head_dim;
    assert_eq!(qkv.len() % (3 * hidden), 0, "qkv is not whole rows");
    let tokens = qkv.len() / (3 * hidden);
    assert!(
        sequences.iter().all(|&(s, l)| s + l <= tokens),
        "a sequence lies outside the batch"
    );
    let mut ctx = vec![0.0f32; tokens * hidden];
    let out = SendPtr(ctx.as_mut_ptr());
    let scale = 1.0 / (head_dim as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..sequences.len())
        .flat_map(|s| (0..heads).map(move |h| (s, h)))
        .collect();
    tasks.par_iter().for_each(|&(s, h)| {
        let (start, len) = sequences[s];
        let row = |i: usize| &qkv[(start + i) * 3 * hidden..(start + i + 1) * 3 * hidden];
        let mut keys = Vec::with_capacity(len * head_dim);
        let mut values = Vec::with_capacity(len * head_dim);
        for i in 0..len {
            let r = row(i);
            keys.extend_from_slice(&r[hidden + h * head_dim..hidden + (h + 1) * head_dim]);
            values
                .extend_from_slice(&r[2 * hidden + h * head_dim..2 * hidden + (h + 1) * head_dim]);
        }
        let mut scores = vec![0.0f32; len];
        let mut acc = vec![0.0f32; head_dim];
        for i in 0..len {
            let q = &row(i)[h * head_dim..(h + 1) * head_dim];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                let k = &keys[j * head_dim..(j + 1) * head_dim];
                *s = crate::activation::sum_products(q, k) * scale;
                max = max.max(*s);
            }
            let mut total = 0.0f32;
            for s in scores.iter_mut() {
                *s = exp(*s - max);
                total += *s;
            }
            acc.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let v = &values[j * head_dim..(j + 1) * head_dim];
                for (a, &v) in acc.iter_mut().zip(v) {
                    *a += p * v;
                }
            }
            let inv = 1.0 / total;
            let base = (start + i) * hidden + h * head_dim;
            for (d, &a) in acc.iter().enumerate() {
                // SAFETY: (sequence, head) tasks write disjoint row slices.
                unsafe { out.write(base + d, a * inv) };
            }
        }
    });
    ctx
}

/// The textbook computation, for tests: softmax(q·kᵀ/√d)·v in f64.
pub fn encoder_attention_reference(
    qkv: &[f32],
    sequences: &[(usize, usize)],
    heads: usize,
    head_dim: usize,
) -> Vec<f32> {
    let hidden = heads * head_dim;
    let tokens = qkv.len() / (3 * hidden);
    let mut ctx = vec![0.0f32; tokens * hidden];
    let at = |t: usize, part: usize, h: usize, d: usize| {
        f64::from(qkv[t * 3 * hidden + part * hidden + h * head_dim + d])
    };
    for &(start, len) in sequences {
        for h in 0..heads {
            for i in 0..len {
                let scores: Vec<f64> = (0..len)
                    .map(|j| {
                        (0..head_dim)
                            .map(|d| at(start + i, 0, h, d) * at(start + j, 1, h, d))
                            .sum::<f64>()
                            / (head_dim as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for d in 0..head_dim {
                    let v: f64 = (0..len).map(|j| e[j] * at(start + j, 2, h, d)).sum();
                    ctx[(start + i) * hidden + h * head_dim + d] = (v / total) as f32;
                }
            }
        }
    }
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_the_reference_and_ignores_neighbours() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (heads, head_dim) = (3, 20);
        let lens = [1usize, 5, 33, 2];
        let tokens: usize = lens.iter().sum();
        let qkv: Vec<f32> = (0..tokens * 3 * heads * head_dim)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let mut seqs = Vec::new();
        let mut start = 0;
        for &l in &lens {
            seqs.push((start, l));
            start += l;
        }
        let got = encoder_attention(&qkv, &seqs, heads, head_dim);
        let want = encoder_attention_reference(&qkv, &seqs, heads, head_dim);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        // The third sequence alone gives the same bits.
        let hidden3 = 3 * heads * head_dim;
        let (s, l) = seqs[2];
        let alone = encoder_attention(
            &qkv[s * hidden3..(s + l) * hidden3],
            &[(0, l)],
            heads,
            head_dim,
        );
        let hidden = heads * head_dim;
        assert_eq!(alone, got[s * hidden..(s + l) * hidden]);
    }
}
