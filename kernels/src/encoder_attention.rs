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
    let mut ctx = Vec::new();
    encoder_attention_into(qkv, sequences, heads, head_dim, &mut ctx);
    ctx
}

/// As [`encoder_attention`], into `ctx` (resized; every element written).
///
/// # Panics
/// As `encoder_attention`.
pub fn encoder_attention_into(
    qkv: &[f32],
    sequences: &[(usize, usize)],
    heads: usize,
    head_dim: usize,
    ctx: &mut Vec<f32>,
) {
    let hidden = heads * head_dim;
    assert_eq!(qkv.len() % (3 * hidden), 0, "qkv is not whole rows");
    let tokens = qkv.len() / (3 * hidden);
    assert!(
        sequences.iter().all(|&(s, l)| s + l <= tokens),
        "a sequence lies outside the batch"
    );
    // Rows outside every sequence stay zero.
    ctx.clear();
    ctx.resize(tokens * hidden, 0.0);
    let out = SendPtr(ctx.as_mut_ptr());
    let scale = 1.0 / (head_dim as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..sequences.len())
        .flat_map(|s| (0..heads).map(move |h| (s, h)))
        .collect();
    let head = Head {
        qkv,
        hidden,
        head_dim,
        scale,
        out,
    };
    let run = pick_head_kernel(head_dim);
    tasks.par_iter().for_each(|&(s, h)| {
        let (start, len) = sequences[s];
        run(&head, start, len, h);
    });
}

/// What every (sequence, head) task reads and where it writes.
struct Head<'a> {
    qkv: &'a [f32],
    hidden: usize,
    head_dim: usize,
    scale: f32,
    out: SendPtr,
}

type HeadFn = fn(&Head<'_>, usize, usize, usize);

/// The task body: AVX-512 register blocks when the CPU has them and the
/// head width is a multiple of 16, else the plain loops (compiled for AVX2
/// when present).
fn pick_head_kernel(head_dim: usize) -> HeadFn {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(head: &Head<'_>, start: usize, len: usize, h: usize) {
            one_head(head, start, len, h);
        }
        if head_dim.is_multiple_of(16)
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
        {
            // SAFETY: the features were detected; the width is whole vectors.
            return |head, start, len, h| unsafe { avx512::one_head(head, start, len, h) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected.
            return |head, start, len, h| unsafe { avx2(head, start, len, h) };
        }
    }
    let _ = head_dim;
    one_head
}

/// Head `h` of the sequence at rows `start..start + len`, gathered: keys
/// transposed (`[head_dim][key_stride]`), values (`[len][head_dim]`) and
/// queries scaled by 1/√head_dim (`[query_rows][head_dim]`); padding is zero.
fn gather(
    head: &Head<'_>,
    start: usize,
    len: usize,
    h: usize,
    key_stride: usize,
    query_rows: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (hidden, d) = (head.hidden, head.head_dim);
    let mut keys_t = vec![0.0f32; d * key_stride];
    let mut values = vec![0.0f32; len * d];
    let mut queries = vec![0.0f32; query_rows * d];
    for i in 0..len {
        let r = &head.qkv[(start + i) * 3 * hidden..(start + i + 1) * 3 * hidden];
        for (c, &k) in r[hidden + h * d..hidden + (h + 1) * d].iter().enumerate() {
            keys_t[c * key_stride + i] = k;
        }
        values[i * d..(i + 1) * d]
            .copy_from_slice(&r[2 * hidden + h * d..2 * hidden + (h + 1) * d]);
        for (q, &x) in queries[i * d..(i + 1) * d]
            .iter_mut()
            .zip(&r[h * d..(h + 1) * d])
        {
            *q = x * head.scale;
        }
    }
    (keys_t, values, queries)
}

/// Attention of head `h` of the sequence at rows `start..start + len`.
/// Keys are transposed so scores for all keys come from one multiply-add
/// per dimension across the keys; the softmax's exponentials and sums are
/// separate passes so they vectorize.
#[inline(always)]
fn one_head(head: &Head<'_>, start: usize, len: usize, h: usize) {
    let (hidden, d, out) = (head.hidden, head.head_dim, head.out);
    let (keys_t, values, queries) = gather(head, start, len, h, len, len);
    let mut scores = vec![0.0f32; len];
    let mut acc = vec![0.0f32; d];
    for i in 0..len {
        let q = &queries[i * d..(i + 1) * d];
        scores.fill(0.0);
        for (c, &qc) in q.iter().enumerate() {
            for (s, &k) in scores.iter_mut().zip(&keys_t[c * len..(c + 1) * len]) {
                *s += qc * k;
            }
        }
        let max = scores
            .iter()
            .fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m });
        for s in scores.iter_mut() {
            *s = exp(*s - max);
        }
        let total = crate::activation::sum(&scores);
        acc.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            for (a, &v) in acc.iter_mut().zip(&values[j * d..(j + 1) * d]) {
                *a += p * v;
            }
        }
        let inv = 1.0 / total;
        let base = (start + i) * hidden + h * d;
        for (c, &a) in acc.iter().enumerate() {
            // SAFETY: (sequence, head) tasks write disjoint row slices.
            unsafe { out.write(base + c, a * inv) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! Four queries at a time: their scores against sixteen keys accumulate
    //! in four registers (keys transposed, one load per four multiply-adds),
    //! and their weighted values in four registers per sixteen dimensions.

    use std::arch::x86_64::*;

    use super::{gather, Head};
    use crate::activation::{exp, sum};

    const QB: usize = 4;

    /// # Safety
    /// AVX-512 F/BW/VL present; `head.head_dim` a multiple of 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub(super) unsafe fn one_head(head: &Head<'_>, start: usize, len: usize, h: usize) {
        let (hidden, d, out) = (head.hidden, head.head_dim, head.out);
        let lp = len.div_ceil(16) * 16;
        let qp = len.div_ceil(QB) * QB;
        let (keys_t, values, queries) = gather(head, start, len, h, lp, qp);
        let mut scores = vec![0.0f32; QB * lp];
        let kp = keys_t.as_ptr();
        let qptr = queries.as_ptr();
        let vp = values.as_ptr();
        for i0 in (0..len).step_by(QB) {
            for j0 in (0..lp).step_by(16) {
                // SAFETY (all pointer arithmetic below): indices stay inside
                // the padded buffers sized above.
                unsafe {
                    let mut acc = [_mm512_setzero_ps(); QB];
                    for c in 0..d {
                        let k = _mm512_loadu_ps(kp.add(c * lp + j0));
                        for (r, a) in acc.iter_mut().enumerate() {
                            let q = _mm512_set1_ps(*qptr.add((i0 + r) * d + c));
                            *a = _mm512_fmadd_ps(q, k, *a);
                        }
                    }
                    for (r, a) in acc.iter().enumerate() {
                        _mm512_storeu_ps(scores.as_mut_ptr().add(r * lp + j0), *a);
                    }
                }
            }
            let mut inv = [0.0f32; QB];
            for (r, inv_r) in inv.iter_mut().enumerate() {
                let s = &mut scores[r * lp..r * lp + len];
                let max = s
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
                for x in s.iter_mut() {
                    *x = exp(*x - max);
                }
                *inv_r = 1.0 / sum(s);
            }
            for c0 in (0..d).step_by(16) {
                // SAFETY: as above.
                unsafe {
                    let mut acc = [_mm512_setzero_ps(); QB];
                    for j in 0..len {
                        let v = _mm512_loadu_ps(vp.add(j * d + c0));
                        for (r, a) in acc.iter_mut().enumerate() {
                            let p = _mm512_set1_ps(scores[r * lp + j]);
                            *a = _mm512_fmadd_ps(p, v, *a);
                        }
                    }
                    for (r, a) in acc.iter().enumerate() {
                        let i = i0 + r;
                        if i >= len {
                            break;
                        }
                        let scaled = _mm512_mul_ps(*a, _mm512_set1_ps(inv[r]));
                        let mut lanes = [0.0f32; 16];
                        _mm512_storeu_ps(lanes.as_mut_ptr(), scaled);
                        let base = (start + i) * hidden + h * d + c0;
                        for (c, &x) in lanes.iter().enumerate() {
                            // SAFETY: (sequence, head) tasks write disjoint row slices.
                            out.write(base + c, x);
                        }
                    }
                }
            }
        }
    }
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
        // Head widths off and on the 16-lane blocks; lengths off the 4-query
        // and 16-key blocks.
        for (heads, head_dim) in [(3, 20), (2, 32), (2, 64)] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let lens = [1usize, 5, 33, 2, 17];
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
                assert!((g - w).abs() < 1e-5, "d={head_dim}: {g} vs {w}");
            }
            // Each sequence alone gives the same bits.
            let hidden = heads * head_dim;
            for &(s, l) in &seqs {
                let alone = encoder_attention(
                    &qkv[s * 3 * hidden..(s + l) * 3 * hidden],
                    &[(0, l)],
                    heads,
                    head_dim,
                );
                assert_eq!(alone, got[s * hidden..(s + l) * hidden], "d={head_dim}");
            }
        }
    }
}
