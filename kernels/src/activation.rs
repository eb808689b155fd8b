//! Element-wise functions written so the compiler vectorizes them: `exp`
//! and the exact (erf) GELU without calls into libm.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// `e^x` to within a few ulps over `[-87.3, 88]` (clamped outside it).
/// Plain arithmetic only (no libm, no rounding instructions), so it
/// vectorizes at any SIMD width.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor to degree 7 on |r| ≤ ln2/2: error below 1e-8 relative.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    // `n` is within [-126, 127]: 2^n straight from its exponent bits.
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The error function to within a few f32 ulps: `x·P(x²)/Q(x²)` on
/// `[-4, 4]` (erf is ±1 to f32 precision beyond), a rational minimax fit of
/// the kind XLA and Eigen use. No `exp`, one division, plain multiplies
/// and adds (the same results with or without FMA): it vectorizes well.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = -2.726_142_3e-10_f32;
    let p = p * x2 + 2.770_681_4e-8;
    let p = p * x2 - 2.101_024e-6;
    let p = p * x2 - 5.692_506_4e-5;
    let p = p * x2 - 7.349_906e-4;
    let p = p * x2 - 2.954_600_1e-3;
    let p = p * x2 - 1.609_603_3e-2;
    let q = -1.456_607_2e-5_f32;
    let q = q * x2 - 2.133_740_6e-4;
    let q = q * x2 - 1.682_827e-3;
    let q = q * x2 - 7.373_329e-3;
    let q = q * x2 - 1.426_474e-2;
    x * p / q
}

/// GELU with the exact erf form, `x/2 · (1 + erf(x/√2))` (BERT's "gelu").
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Layer normalization of each `width`-long row of `x`, in place.
///
/// # Panics
/// If `gamma`/`beta` are not `width` long or `x` is not whole rows.
pub fn layer_norm(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let width = gamma.len();
    assert_eq!(beta.len(), width, "beta is not as wide as gamma");
    assert_eq!(x.len() % width.max(1), 0, "input is not whole rows");
    use rayon::prelude::*;
    x.par_chunks_mut(width.max(1)).for_each(|row| {
        let mean = sum(row) / width as f32;
        let mut var = 0.0f32;
        let mut lanes = [0.0f32; 16];
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                let d = v - mean;
                *l += d * d;
            }
        }
        for &v in chunks.remainder() {
            var += (v - mean) * (v - mean);
        }
        var += lanes.iter().sum::<f32>();
        let inv = 1.0 / (var / width as f32 + eps).sqrt();
        for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = (*v - mean) * inv * g + b;
        }
    });
}

/// Sum in 16 lanes (vectorizes; the order is fixed by the length alone).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    let mut s = lanes.iter().sum::<f32>();
    for &v in chunks.remainder() {
        s += v;
    }
    s
}

/// `Σ a·b` in 16 lanes (vectorizes; the order is fixed by the length alone).
#[inline(always)]
pub fn sum_products(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((l, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *l += x * y;
        }
    }
    let mut s = lanes.iter().sum::<f32>();
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(exp(-200.0), 0.0_f32.max(exp(-200.0)));
        assert!(exp(-200.0) < 1e-37);
    }

    #[test]
    fn gelu_matches_the_erf_form() {
        // erf from f64 via its series-free identity with libm's erfc is not in
        // std; compare against a high-precision Taylor/continued evaluation.
        fn erf64(x: f64) -> f64 {
            // Abramowitz & Stegun 7.1.28-free: Maclaurin series, converges for |x| < 3.
            if x.abs() > 3.0 {
                return x.signum() * (1.0 - erfc_cf(x.abs()));
            }
            let mut term = x;
            let mut s = x;
            let mut n = 0.0;
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                s += term / (2.0 * n + 1.0);
            }
            s * 2.0 / std::f64::consts::PI.sqrt()
        }
        fn erfc_cf(x: f64) -> f64 {
            // Continued fraction (Lentz), accurate for x ≥ 3.
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (x + f);
            }
            (-x * x).exp() / (std::f64::consts::PI.sqrt() * (x + f))
        }
        let mut x = -10.0f32;
        while x < 10.0 {
            let want = 0.5 * f64::from(x) * (1.0 + erf64(f64::from(x) / 2f64.sqrt()));
            let got = f64::from(gelu(x));
            assert!(
                (got - want).abs() < 2e-6 * (1.0 + want.abs()),
                "gelu({x}) = {got}, want {want}"
            );
            x += 0.013;
        }
    }

    #[test]
    fn layer_norm_normalizes() {
        let mut x: Vec<f32> = (0..2 * 37)
            .map(|i| (i as f32 * 0.37).sin() * 3.0 + 1.0)
            .collect();
        let gamma = vec![1.0; 37];
        let beta = vec![0.0; 37];
        layer_norm(&mut x, &gamma, &beta, 1e-12);
        for row in x.chunks(37) {
            let mean: f32 = row.iter().sum::<f32>() / 37.0;
            let var: f32 = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 37.0;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4,
                "{mean} {var}"
            );
        }
    }
}
