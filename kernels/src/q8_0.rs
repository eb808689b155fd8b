//! GGML's Q8_0 weights (one f16 scale, 32 signed bytes) against Q8_1
//! activations: tied output projections are usually stored this way, and
//! they are the widest matrix of a small model.

use half::f16;

use crate::quant::{BlockQ8_1, Isa, Kernels, QuantBlock, QuantMatrix, BLOCK};

/// Bytes per Q8_0 block in GGML files.
pub const BLOCK_BYTES: usize = 34;

/// 32 weights: `w[i] = d * qs[i]`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Quantized values.
    pub qs: [i8; BLOCK],
}

/// Σ w·x over matching blocks: the plain reference.
pub fn dot_reference(w: &[BlockQ8_0], x: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let sumi: i32 = wb
            .qs
            .iter()
            .zip(&xb.qs)
            .map(|(&a, &b)| i32::from(a) * i32::from(b))
            .sum();
        sum += wb.d.to_f32() * xb.d * sumi as f32;
    }
    sum
}

/// Four reference dot products.
pub fn dot4_reference(w: &[BlockQ8_0], x: [&[BlockQ8_1]; 4]) -> [f32; 4] {
    x.map(|row| dot_reference(w, row))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ8_0, BlockQ8_1};
    use crate::quant::avx2::hsum;

    #[inline(always)]
    unsafe fn scale(wb: &BlockQ8_0) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(wb.d.to_bits()))))
    }

    /// One weight row against one or four activation rows; i8 × i8 goes
    /// through the unsigned-by-signed multiply as |w| × (x · sign w). The
    /// four-row and VNNI variants give the one-row AVX2 results, bit for bit.
    macro_rules! dots {
        ($features:literal, $dot:ident, $dot4:ident, $ints:path) => {
            /// # Safety
            /// The CPU must support the features named.
            #[target_feature(enable = $features)]
            pub unsafe fn $dot(w: &[BlockQ8_0], x: &[BlockQ8_1]) -> f32 {
                let mut acc = _mm256_setzero_ps();
                for (wb, xb) in w.iter().zip(x) {
                    // SAFETY: `qs` are 32 bytes; unaligned loads.
                    let qw = unsafe { _mm256_loadu_si256(wb.qs.as_ptr().cast()) };
                    let qx = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
                    let ints = unsafe { $ints(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw)) };
                    let d = unsafe { scale(wb) };
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(ints), acc);
                }
                unsafe { hsum(acc) }
            }

            /// # Safety
            /// The CPU must support the features named.
            #[target_feature(enable = $features)]
            pub unsafe fn $dot4(w: &[BlockQ8_0], x: [&[BlockQ8_1]; 4]) -> [f32; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                for (b, wb) in w.iter().enumerate() {
                    // SAFETY: `qs` is 32 bytes; unaligned load.
                    let qw = unsafe { _mm256_loadu_si256(wb.qs.as_ptr().cast()) };
                    let abs = _mm256_sign_epi8(qw, qw);
                    let d = unsafe { scale(wb) };
                    for r in 0..4 {
                        let xb = &x[r][b];
                        // SAFETY: as above.
                        let qx = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
                        let ints = unsafe { $ints(abs, _mm256_sign_epi8(qx, qw)) };
                        acc[r] = _mm256_fmadd_ps(
                            _mm256_set1_ps(d * xb.d),
                            _mm256_cvtepi32_ps(ints),
                            acc[r],
                        );
                    }
                }
                acc.map(|a| unsafe { hsum(a) })
            }
        };
    }

    dots!("avx2,fma,f16c", dot, dot4, crate::quant::avx2::ints_avx2);
    dots!(
        "avx2,fma,f16c,avxvnni",
        dot_vnni,
        dot4_vnni,
        crate::quant::avx2::ints_vnni
    );
    dots!(
        "avx2,fma,f16c,avx512vnni,avx512vl",
        dot_vnni512,
        dot4_vnni512,
        crate::quant::avx2::ints_vnni512
    );
}

impl QuantBlock for BlockQ8_0 {
    type Act = BlockQ8_1;
    const NAME: &'static str = "q8_0-matmul";
    const BYTES: usize = BLOCK_BYTES;

    fn parse(b: &[u8]) -> Self {
        Self {
            d: f16::from_bits(u16::from_le_bytes([b[0], b[1]])),
            qs: std::array::from_fn(|i| b[2 + i] as i8),
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = d * f32::from(q);
        }
    }

    fn kernels() -> Kernels<Self> {
        // SAFETY: `isa` is detected on this CPU.
        unsafe { kernels_for(crate::quant::isa()) }
    }
}

/// The dot products for `isa`.
///
/// # Safety
/// This CPU must run `isa` (as it does [`crate::quant::isa`], and every
/// variant the tests get from `quant::runnable`).
unsafe fn kernels_for(isa: Isa) -> Kernels<BlockQ8_0> {
    crate::quant::pick_kernels!(BlockQ8_0, isa)
}

/// A Q8_0 weight matrix.
pub type Q8_0Matrix = QuantMatrix<BlockQ8_0>;

#[cfg(target_arch = "x86_64")]
impl crate::quant::tiled::Tileable for BlockQ8_0 {
    const LAYOUT: crate::quant::tiled::Layout8 = crate::quant::tiled::Layout8 {
        nibbles: false,
        high: false,
        min: false,
        offset: 128,
    };

    fn scales(&self) -> (f32, f32) {
        (self.d.to_f32(), 0.0)
    }

    fn values(&self) -> Vec<u8> {
        self.qs.iter().map(|&q| (q as u8) ^ 0x80).collect()
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::quant::{quantize_q8_1, runnable};

    fn random(rows: usize, cols: usize, rng: &mut StdRng) -> Q8_0Matrix {
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            bytes.extend_from_slice(&f16::from_f32(rng.random_range(0.001f32..0.05)).to_le_bytes());
            // Include -128, the value whose absolute value needs all 8 bits.
            bytes.extend((0..BLOCK).map(|i| if i == 3 { 0x80 } else { rng.random::<u8>() }));
        }
        Q8_0Matrix::from_ggml_bytes(&bytes, rows, cols).unwrap()
    }

    #[test]
    fn simd_dots_match_the_reference_and_each_other() {
        let mut rng = StdRng::seed_from_u64(21);
        let cols = 576;
        let w = random(3, cols, &mut rng);
        let xs: Vec<Vec<BlockQ8_1>> = (0..4)
            .map(|_| {
                let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-3.0..3.0)).collect();
                let mut q = vec![BlockQ8_1::default(); cols / BLOCK];
                quantize_q8_1(&x, &mut q);
                q
            })
            .collect();
        let row = &w.blocks[..cols / BLOCK];
        let four = |(_, dot4): Kernels<BlockQ8_0>| dot4(row, [&xs[0], &xs[1], &xs[2], &xs[3]]);
        // Every variant this CPU runs, whatever the settings pick.
        let mut simd: Option<[f32; 4]> = None;
        for isa in runnable() {
            // SAFETY: `runnable` lists only variants this CPU runs.
            let kernels = unsafe { kernels_for(isa) };
            let got = four(kernels);
            for (r, x) in xs.iter().enumerate() {
                let want = dot_reference(row, x);
                let one = kernels.0(row, x);
                assert!((one - want).abs() <= 1e-4 * want.abs().max(1.0), "{isa:?}");
                assert_eq!(got[r], one, "{isa:?} row {r}");
            }
            if isa != Isa::Reference {
                assert_eq!(*simd.get_or_insert(got), got, "{isa:?}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tiled_layout_matches_the_row_kernels() {
        let mut rng = StdRng::seed_from_u64(34);
        let w = random(37, 576, &mut rng);
        crate::quant::check::tiled_matches_rows(&w, &mut rng);
    }

    #[test]
    fn matmul_matches_the_dequantized_product() {
        let mut rng = StdRng::seed_from_u64(22);
        let (rows, cols, m) = (37, 64, 6);
        let w = random(rows, cols, &mut rng);
        let x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        let got = w.matmul(&x, BlockQ8_0::kernels());
        let dense = w.dequantize();
        for r in 0..m {
            for c in 0..rows {
                let terms = (0..cols).map(|k| x[r * cols + k] * dense[c * cols + k]);
                let want: f32 = terms.clone().sum();
                // Activations are rounded to 8 bits: the error scales with
                // the terms, not with their (possibly cancelling) sum.
                let size: f32 = terms.map(f32::abs).sum();
                let g = got[r * rows + c];
                assert!(
                    (g - want).abs() <= 0.01 * size,
                    "{r},{c}: {g} vs {want} (terms {size})"
                );
            }
        }
    }
}
