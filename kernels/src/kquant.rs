//! What GGML's K-quants share: 256-value super-blocks, the Q8_K activation
//! blocks their dot products take (one f32 scale per 256 values, with sums
//! per 16), and the packed 6-bit scales and minimums of Q4_K and Q5_K.
//!
//! The weight formats are in [`crate::q4_k`], [`crate::q5_k`] and
//! [`crate::q6_k`]; the matrix product is [`crate::quant::QuantMatrix`]'s.

use half::f16;

use crate::quant::ActBlock;

/// Values per super-block.
pub const QK_K: usize = 256;

/// 256 activations: `x[i] ≈ d * qs[i]`, and `bsums[j]` = Σ `qs[16j..16j + 16]`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8K {
    /// Scale.
    pub d: f32,
    /// Quantized values.
    pub qs: [i8; QK_K],
    /// Sums of 16 values each.
    pub bsums: [i16; QK_K / 16],
}

impl Default for BlockQ8K {
    fn default() -> Self {
        Self {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        }
    }
}

/// Quantizes `x` (a multiple of 256 long) to Q8_K blocks as GGML does: the
/// value of largest magnitude maps to −127, everything is scaled by the same
/// factor and rounded half to even (so llama.cpp's K-quant products see the
/// same integers).
pub fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
    for (chunk, block) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in chunk {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *block = BlockQ8K::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in block.qs.iter_mut().zip(chunk) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        for (s, qs) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *s = qs.iter().map(|&q| i16::from(q)).sum();
        }
        block.d = 1.0 / iscale;
    }
}

impl ActBlock for BlockQ8K {
    const VALUES: usize = QK_K;

    fn quantize(x: &[f32], out: &mut [Self]) {
        quantize_q8_k(x, out);
    }
}

/// Bytes of packed scales and minimums in Q4_K and Q5_K blocks.
pub const SCALE_BYTES: usize = 12;

/// The eight 6-bit scales and eight 6-bit minimums packed into 12 bytes
/// (GGML's `get_scale_min_k4`, for every sub-block at once).
pub fn unpack_scales(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let q = packed;
    let mut scales = [0u8; 8];
    let mut mins = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            scales[j] = q[j] & 63;
            mins[j] = q[j + 4] & 63;
        } else {
            scales[j] = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
            mins[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        }
    }
    (scales, mins)
}

/// The header Q4_K and Q5_K share: super-scale, super-minimum (as f32,
/// read from f16) and the unpacked 6-bit scales and minimums of the eight
/// 32-value sub-blocks. A weight is `d·scales[j]·q − dmin·mins[j]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleMin {
    /// Super-block scale.
    pub d: f32,
    /// Super-block minimum scale.
    pub dmin: f32,
    /// Sub-block scales.
    pub scales: [u8; 8],
    /// Sub-block minimums.
    pub mins: [u8; 8],
}

impl ScaleMin {
    /// Reads the first 16 bytes of a Q4_K or Q5_K block.
    pub fn parse(b: &[u8]) -> Self {
        let (scales, mins) = unpack_scales(&b[4..4 + SCALE_BYTES]);
        Self {
            d: f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
            dmin: f16::from_bits(u16::from_le_bytes([b[2], b[3]])).to_f32(),
            scales,
            mins,
        }
    }

    /// Σ mins[j] · Σ x over sub-block j, from the activations' 16-value sums.
    #[inline(always)]
    pub fn min_sum(&self, x: &BlockQ8K) -> i32 {
        (0..8)
            .map(|j| {
                i32::from(self.mins[j])
                    * (i32::from(x.bsums[2 * j]) + i32::from(x.bsums[2 * j + 1]))
            })
            .sum()
    }
}

/// A Q4_K or Q5_K block: the shared header and each value's integer.
pub(crate) trait ScaleMinBlock {
    /// The header.
    fn header(&self) -> &ScaleMin;
    /// Value `i` (0..256) as an unsigned integer.
    fn q(&self, i: usize) -> u8;
}

/// The block's weights (for `QuantBlock::dequantize`).
pub(crate) fn dequantize_scale_min<B: ScaleMinBlock>(b: &B, out: &mut [f32]) {
    let h = b.header();
    for (i, o) in out.iter_mut().enumerate().take(QK_K) {
        let j = i / 32;
        let d = h.d * f32::from(h.scales[j]);
        let m = h.dmin * f32::from(h.mins[j]);
        *o = d * f32::from(b.q(i)) - m;
    }
}

/// Σ w·x over matching blocks of Q4_K or Q5_K: the plain reference.
pub(crate) fn dot_scale_min_reference<B: ScaleMinBlock>(w: &[B], x: &[BlockQ8K]) -> f32 {
    let (mut sum, mut sum_min) = (0f32, 0f32);
    for (wb, xb) in w.iter().zip(x) {
        let h = wb.header();
        let mut sumi = 0i32;
        for j in 0..8 {
            let p: i32 = (32 * j..32 * j + 32)
                .map(|i| i32::from(wb.q(i)) * i32::from(xb.qs[i]))
                .sum();
            sumi += i32::from(h.scales[j]) * p;
        }
        sum += xb.d * h.d * sumi as f32;
        sum_min += xb.d * h.dmin * h.min_sum(xb) as f32;
    }
    sum - sum_min
}

/// AVX2 dot products of Q4_K and Q5_K against Q8_K: `$unpack(wb, j)` gives
/// the 64 values of sub-blocks `2j` and `2j + 1` as bytes. Per super-block
/// the integer lanes hold Σ scales·q·x exactly and the minimums' term is an
/// exact integer too; the four-row variant gives the one-row bits.
#[cfg(target_arch = "x86_64")]
macro_rules! scale_min_dots {
    ($block:ty, $features:literal, $dot:ident, $dot4:ident, $unpack:ident) => {
        /// # Safety
        /// The CPU must support the features named.
        #[target_feature(enable = $features)]
        pub unsafe fn $dot(w: &[$block], x: &[BlockQ8K]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            let mut acc_min = 0f32;
            for (wb, xb) in w.iter().zip(x) {
                let h = &wb.h;
                let mut sumi = _mm256_setzero_si256();
                for j in 0..4 {
                    let (lo, hi) = unsafe { $unpack(wb, j) };
                    let sl = _mm256_set1_epi16(i16::from(h.scales[2 * j]));
                    let sh = _mm256_set1_epi16(i16::from(h.scales[2 * j + 1]));
                    // SAFETY: 64 of the 256 activations; unaligned loads.
                    let xl = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().add(64 * j).cast()) };
                    let xh = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().add(64 * j + 32).cast()) };
                    let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), sl);
                    let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), sh);
                    sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
                }
                acc = _mm256_fmadd_ps(_mm256_set1_ps(xb.d * h.d), _mm256_cvtepi32_ps(sumi), acc);
                acc_min += xb.d * h.dmin * h.min_sum(xb) as f32;
            }
            unsafe { hsum(acc) - acc_min }
        }

        /// # Safety
        /// The CPU must support the features named.
        #[target_feature(enable = $features)]
        pub unsafe fn $dot4(w: &[$block], x: [&[BlockQ8K]; 4]) -> [f32; 4] {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut acc_min = [0f32; 4];
            for (b, wb) in w.iter().enumerate() {
                let h = &wb.h;
                let mut sumi = [_mm256_setzero_si256(); 4];
                for j in 0..4 {
                    let (lo, hi) = unsafe { $unpack(wb, j) };
                    let sl = _mm256_set1_epi16(i16::from(h.scales[2 * j]));
                    let sh = _mm256_set1_epi16(i16::from(h.scales[2 * j + 1]));
                    for r in 0..4 {
                        let q = x[r][b].qs.as_ptr();
                        // SAFETY: as in the one-row version.
                        let xl = unsafe { _mm256_loadu_si256(q.add(64 * j).cast()) };
                        let xh = unsafe { _mm256_loadu_si256(q.add(64 * j + 32).cast()) };
                        let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), sl);
                        let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), sh);
                        sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(pl, ph));
                    }
                }
                for r in 0..4 {
                    let xb = &x[r][b];
                    acc[r] = _mm256_fmadd_ps(
                        _mm256_set1_ps(xb.d * h.d),
                        _mm256_cvtepi32_ps(sumi[r]),
                        acc[r],
                    );
                    acc_min[r] += xb.d * h.dmin * h.min_sum(xb) as f32;
                }
            }
            std::array::from_fn(|r| unsafe { hsum(acc[r]) - acc_min[r] })
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use scale_min_dots;

/// [`scale_min_dots`] for every x86 variant, as
/// [`crate::quant::pick_kernels`] wants them (the integer work is `maddubs`
/// and `madd` in all three: the VNNI instruction would need a scale multiply
/// after it).
#[cfg(target_arch = "x86_64")]
macro_rules! scale_min_variants {
    ($block:ty, $unpack:ident) => {
        use crate::kquant::scale_min_dots;
        use crate::quant::avx2::hsum;
        scale_min_dots!($block, "avx2,fma", dot, dot4, $unpack);
        scale_min_dots!($block, "avx2,fma,avxvnni", dot_vnni, dot4_vnni, $unpack);
        scale_min_dots!(
            $block,
            "avx2,fma,avx512vnni,avx512vl",
            dot_vnni512,
            dot4_vnni512,
            $unpack
        );
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use scale_min_variants;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_k_quantization_follows_ggml() {
        let mut x: Vec<f32> = (0..QK_K).map(|i| (i as f32 - 100.0) * 0.01).collect();
        x[7] = -2.0; // the largest magnitude, negative
        let mut q = [BlockQ8K::default()];
        quantize_q8_k(&x, &mut q);
        // iscale = -127 / -2 = 63.5
        assert_eq!(q[0].d, 1.0 / 63.5);
        assert_eq!(q[0].qs[7], -127);
        assert_eq!(q[0].qs[0], -64); // -1.0 * 63.5 = -63.5, half to even
        assert_eq!(q[0].qs[102], 1); // 0.02 * 63.5 = 1.27
        for j in 0..16 {
            let s: i16 = q[0].qs[16 * j..16 * j + 16]
                .iter()
                .map(|&v| i16::from(v))
                .sum();
            assert_eq!(q[0].bsums[j], s);
        }
        // The positive extreme maps to −127, its opposite clamps to 127.
        let mut y = vec![0f32; QK_K];
        y[0] = 1.0;
        y[1] = -1.0;
        quantize_q8_k(&y, &mut q);
        assert_eq!((q[0].qs[0], q[0].qs[1]), (-127, 127));
        quantize_q8_k(&[0f32; QK_K], &mut q);
        assert_eq!(q[0], BlockQ8K::default());
    }

    #[test]
    fn scales_unpack_as_ggml_packs_them() {
        // Pack known 6-bit values the way GGML's quantizer does.
        let scales: [u8; 8] = [1, 63, 17, 40, 5, 33, 62, 9];
        let mins: [u8; 8] = [0, 12, 63, 7, 48, 2, 31, 60];
        let mut p = [0u8; SCALE_BYTES];
        for j in 0..8 {
            if j < 4 {
                p[j] = scales[j];
                p[j + 4] = mins[j];
            } else {
                p[j + 4] = (scales[j] & 0x0F) | ((mins[j] & 0x0F) << 4);
                p[j - 4] |= (scales[j] >> 4) << 6;
                p[j] |= (mins[j] >> 4) << 6;
            }
        }
        assert_eq!(unpack_scales(&p), (scales, mins));
    }
}
