//! The inner loops of [`super::paged_attention`]: the scores of one query
//! against a block of keys, the softmax numerators with their sum, and the
//! weighted sum of values. With AVX2 and FMA, four keys are scored at once
//! (one horizontal reduction for the four), `exp` runs eight lanes at a
//! time, and the output is summed 32 lanes at a time in registers over all
//! of a block's values; elsewhere, and for head sizes that are not a
//! multiple of 8, the portable loops run. Either way a row's result does not
//! depend on the other rows of the call. Where AVX2 runs, attention itself
//! goes by tiles ([`super::tile`]); these AVX2 loops are the arithmetic the
//! tiles are held to, bit for bit, in its tests.

/// Appends `scale · (query · key)` for each key of `keys` (`d` values each).
pub(super) fn scores(query: &[f32], keys: &[f32], d: usize, scale: f32, out: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && avx2() {
        // SAFETY: AVX2 and FMA were detected.
        unsafe { avx2::scores(query, keys, d, scale, out) };
        return;
    }
    out.extend(
        keys.chunks_exact(d)
            .map(|key| super::dot(query, key) * scale),
    );
}

/// Adds `Σ_k (probs[k] · scale) · values[k]` to `out` (`d` values per key).
pub(super) fn accumulate(values: &[f32], probs: &[f32], scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if out.len().is_multiple_of(8) && avx2() {
        // SAFETY: AVX2 and FMA were detected.
        unsafe { avx2::accumulate(values, probs, scale, out) };
        return;
    }
    accumulate_portable(values, probs, scale, out);
}

/// The portable [`accumulate`].
pub(super) fn accumulate_portable(values: &[f32], probs: &[f32], scale: f32, out: &mut [f32]) {
    for (value, &p) in values.chunks_exact(out.len()).zip(probs) {
        let w = p * scale;
        for (o, &x) in out.iter_mut().zip(value) {
            *o += w * x;
        }
    }
}

/// Replaces each score `s` by `exp(s − max)`; returns their sum.
pub(super) fn exp_sum(scores: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { avx2::exp_sum(scores, max) };
    }
    exp_sum_portable(scores, max)
}

/// The portable [`exp_sum`].
pub(super) fn exp_sum_portable(scores: &mut [f32], max: f32) -> f32 {
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    total
}

#[cfg(target_arch = "x86_64")]
pub(super) fn avx2() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2 and FMA; `d` is a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores(query: &[f32], keys: &[f32], d: usize, scale: f32, out: &mut Vec<f32>) {
        let n = keys.len() / d;
        let q = query.as_ptr();
        let mut i = 0;
        while i + 4 <= n {
            let k = unsafe { keys.as_ptr().add(i * d) };
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in (0..d).step_by(8) {
                // SAFETY: `c + 8 <= d`, and keys `i..i + 4` are in `keys`.
                let qc = unsafe { _mm256_loadu_ps(q.add(c)) };
                for (j, a) in acc.iter_mut().enumerate() {
                    let kc = unsafe { _mm256_loadu_ps(k.add(j * d + c)) };
                    *a = _mm256_fmadd_ps(qc, kc, *a);
                }
            }
            // Four horizontal sums at once: [s0, s1, s2, s3].
            let h01 = _mm256_hadd_ps(acc[0], acc[1]);
            let h23 = _mm256_hadd_ps(acc[2], acc[3]);
            let h = _mm256_hadd_ps(h01, h23);
            let four = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let mut s = [0f32; 4];
            // SAFETY: four floats.
            unsafe { _mm_storeu_ps(s.as_mut_ptr(), _mm_mul_ps(four, _mm_set1_ps(scale))) };
            out.extend_from_slice(&s);
            i += 4;
        }
        for j in i..n {
            let k = unsafe { keys.as_ptr().add(j * d) };
            let mut acc = _mm256_setzero_ps();
            for c in (0..d).step_by(8) {
                // SAFETY: as above.
                let (qc, kc) = unsafe { (_mm256_loadu_ps(q.add(c)), _mm256_loadu_ps(k.add(c))) };
                acc = _mm256_fmadd_ps(qc, kc, acc);
            }
            // The same reduction order as the four-key case, for lane 0.
            let h = _mm256_hadd_ps(acc, acc);
            let h = _mm256_hadd_ps(h, h);
            let one = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            out.push(_mm_cvtss_f32(one) * scale);
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `out.len()` is a multiple of 8 and
    /// `values` holds `probs.len()` rows of `out.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn accumulate(values: &[f32], probs: &[f32], scale: f32, out: &mut [f32]) {
        let d = out.len();
        let n = probs.len().min(values.len() / d);
        let v = values.as_ptr();
        let o = out.as_mut_ptr();
        // 32 output lanes stay in four registers while every value row of
        // the block is added in, in order; then 8 at a time.
        let mut c = 0;
        while c + 32 <= d {
            // SAFETY: lanes `c..c + 32` are in `out` and in each row.
            unsafe {
                let (mut a0, mut a1) = (_mm256_loadu_ps(o.add(c)), _mm256_loadu_ps(o.add(c + 8)));
                let (mut a2, mut a3) = (
                    _mm256_loadu_ps(o.add(c + 16)),
                    _mm256_loadu_ps(o.add(c + 24)),
                );
                for (k, &p) in probs.iter().enumerate().take(n) {
                    let w = _mm256_set1_ps(p * scale);
                    let row = v.add(k * d + c);
                    a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row), a0);
                    a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(8)), a1);
                    a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(16)), a2);
                    a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(24)), a3);
                }
                _mm256_storeu_ps(o.add(c), a0);
                _mm256_storeu_ps(o.add(c + 8), a1);
                _mm256_storeu_ps(o.add(c + 16), a2);
                _mm256_storeu_ps(o.add(c + 24), a3);
            }
            c += 32;
        }
        while c < d {
            // SAFETY: lanes `c..c + 8` are in `out` and in each row.
            unsafe {
                let mut a0 = _mm256_loadu_ps(o.add(c));
                for (k, &p) in probs.iter().enumerate().take(n) {
                    let w = _mm256_set1_ps(p * scale);
                    a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v.add(k * d + c)), a0);
                }
                _mm256_storeu_ps(o.add(c), a0);
            }
            c += 8;
        }
    }

    /// `exp(x)` for eight lanes, `x ≤ 0` (Cephes' single-precision method:
    /// a degree-6 polynomial on the remainder after powers of two; within
    /// 2 ulp of the correctly rounded value; below −87 the result is 0).
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.0));
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let fx = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(
            p,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(fx),
            _mm256_set1_epi32(127),
        ));
        let y = _mm256_mul_ps(p, _mm256_castsi256_ps(pow2));
        _mm256_andnot_ps(tiny, y)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sum(scores: &mut [f32], max: f32) -> f32 {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = scores.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: eight floats.
            let x = unsafe { _mm256_loadu_ps(c.as_ptr()) };
            let e = unsafe { exp8(_mm256_sub_ps(x, m)) };
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), e) };
            acc = _mm256_add_ps(acc, e);
        }
        let mut total = unsafe { crate::quant::avx2::hsum(acc) };
        let rest = chunks.into_remainder();
        let mut tail = [f32::NEG_INFINITY; 8];
        tail[..rest.len()].copy_from_slice(rest);
        // SAFETY: eight floats; −∞ lanes give 0.
        let e = unsafe { exp8(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), m)) };
        unsafe { _mm256_storeu_ps(tail.as_mut_ptr(), e) };
        rest.copy_from_slice(&tail[..rest.len()]);
        total += tail[..rest.len()].iter().sum::<f32>();
        total
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_exp_is_within_two_ulp_and_zero_far_below() {
        if !avx2() {
            eprintln!("no AVX2: the portable path is the only one");
            return;
        }
        let mut rng = StdRng::seed_from_u64(5);
        let mut xs: Vec<f32> = (0..4099).map(|_| rng.random_range(-90.0f32..0.0)).collect();
        xs.extend([0.0, -1e-30, -0.5, -86.9, -87.1, -200.0, f32::NEG_INFINITY]);
        let mut got = xs.clone();
        // SAFETY: AVX2 and FMA were detected.
        let total = unsafe { avx2::exp_sum(&mut got, 0.0) };
        let mut want = xs.clone();
        let want_total = exp_sum_portable(&mut want, 0.0);
        for ((g, w), x) in got.iter().zip(&want).zip(&xs) {
            if *x < -87.0 {
                assert!(*g == 0.0 && *w < 1.7e-38, "exp({x}) = {g}");
            } else {
                let ulp = (w.to_bits() as i64 - g.to_bits() as i64).abs();
                assert!(ulp <= 2, "exp({x}): {g} vs {w} ({ulp} ulp)");
            }
        }
        assert!((total - want_total).abs() <= 1e-5 * want_total);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_weighted_sums_match_the_portable_loop() {
        if !avx2() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(7);
        for d in [8, 40, 64, 128, 256] {
            for n in [1, 5, 16] {
                let values: Vec<f32> = (0..n * d).map(|_| rng.random_range(-2.0..2.0)).collect();
                let probs: Vec<f32> = (0..n).map(|_| rng.random_range(0.0..1.0)).collect();
                let start: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                let (mut got, mut want) = (start.clone(), start);
                // SAFETY: AVX2 and FMA were detected; d is a multiple of 8.
                unsafe { avx2::accumulate(&values, &probs, 0.5, &mut got) };
                accumulate_portable(&values, &probs, 0.5, &mut want);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "d {d} n {n}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_scores_match_the_portable_dot() {
        if !avx2() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(6);
        let d = 64;
        let query: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
        for n in [1, 3, 4, 7, 16] {
            let keys: Vec<f32> = (0..n * d).map(|_| rng.random_range(-2.0..2.0)).collect();
            let mut got = Vec::new();
            // SAFETY: AVX2 and FMA were detected.
            unsafe { avx2::scores(&query, &keys, d, 0.125, &mut got) };
            for (g, key) in got.iter().zip(keys.chunks_exact(d)) {
                let want = super::super::dot(&query, key) * 0.125;
                assert!(
                    (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{g} vs {want}"
                );
            }
        }
    }
}
