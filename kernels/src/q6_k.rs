//! GGML's Q6_K weights (the output projection and half the value and down
//! projections of a `Q4_K_M` file) and their dot products with Q8_K
//! activations.
//!
//! A 256-value super-block holds sixteen 16-value sub-blocks with signed
//! 8-bit scales: `w = d·scale·(q − 32)`, `q` in 0..=63. The sums are taken
//! as `Σ scale·q·x − 32·Σ scale·Σx`, exact integers (the `Σx` per 16
//! values come with the Q8_K blocks).

use half::f16;

use crate::kquant::{BlockQ8K, QK_K};
use crate::quant::{Isa, Kernels, QuantBlock, QuantMatrix};

/// Bytes per Q6_K block in GGML files: 128 bytes of low nibbles, 64 of high
/// bit pairs, 16 scales, an f16 super-scale.
pub const BLOCK_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

/// 256 weights in two halves of 128. In half `n`, for `l` < 32: value
/// `128n + l` is the low nibble of `ql[64n + l]`, `+ 32` the low nibble of
/// `ql[64n + 32 + l]`, `+ 64` and `+ 96` their high nibbles; the high bit
/// pairs of the four are bits 0–1, 2–3, 4–5 and 6–7 of `qh[32n + l]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ6K {
    /// Low 4 bits.
    pub ql: [u8; QK_K / 2],
    /// High 2 bits.
    pub qh: [u8; QK_K / 4],
    /// Sub-block scales.
    pub scales: [i8; QK_K / 16],
    /// Super-block scale (an f16 value).
    pub d: f32,
}

impl BlockQ6K {
    /// Value `i` (0..256) as an unsigned integer.
    pub(crate) fn q(&self, i: usize) -> u8 {
        let (n, l) = (i / 128, i % 128);
        let (k, l) = (l / 32, l % 32);
        let low = self.ql[64 * n + 32 * (k & 1) + l];
        let low = if k < 2 { low & 0x0F } else { low >> 4 };
        let high = (self.qh[32 * n + l] >> (2 * k)) & 3;
        low | (high << 4)
    }

    /// `32·Σ scale·Σx` over the sub-blocks.
    #[inline(always)]
    fn offset(&self, x: &BlockQ8K) -> i32 {
        let s: i32 = self
            .scales
            .iter()
            .zip(&x.bsums)
            .map(|(&sc, &b)| i32::from(sc) * i32::from(b))
            .sum();
        32 * s
    }
}

/// Σ w·x over matching blocks: the plain reference.
pub fn dot_reference(w: &[BlockQ6K], x: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let mut sumi = 0i32;
        for (s, &sc) in wb.scales.iter().enumerate() {
            let p: i32 = (16 * s..16 * s + 16)
                .map(|i| i32::from(wb.q(i)) * i32::from(xb.qs[i]))
                .sum();
            sumi += i32::from(sc) * p;
        }
        sum += xb.d * wb.d * (sumi - wb.offset(xb)) as f32;
    }
    sum
}

/// Four reference dot products.
pub fn dot4_reference(w: &[BlockQ6K], x: [&[BlockQ8K]; 4]) -> [f32; 4] {
    x.map(|row| dot_reference(w, row))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ6K, BlockQ8K};
    use crate::quant::avx2::hsum;

    /// Half `n` of the block: four 32-value quarters as bytes 0..=63, and
    /// each quarter's two scales as i16 lanes (the first 16 values' scale in
    /// the low 128 bits).
    #[inline(always)]
    unsafe fn unpack(wb: &BlockQ6K, n: usize) -> ([__m256i; 4], [__m256i; 4]) {
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(3);
        // SAFETY: 64 of the 128 low-nibble bytes and 32 of the 64 high-bit
        // bytes; unaligned loads.
        let (l0, l1, qh) = unsafe {
            (
                _mm256_loadu_si256(wb.ql.as_ptr().add(64 * n).cast()),
                _mm256_loadu_si256(wb.ql.as_ptr().add(64 * n + 32).cast()),
                _mm256_loadu_si256(wb.qh.as_ptr().add(32 * n).cast()),
            )
        };
        // 16-bit shifts, then per-byte masks: each byte keeps its own bits.
        // (No closures: they would not inherit the caller's target features.)
        let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m2));
        let h2 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2));
        let h4 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m2));
        let h6 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m2));
        let q = [
            _mm256_or_si256(_mm256_and_si256(l0, m4), h0),
            _mm256_or_si256(_mm256_and_si256(l1, m4), h2),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4), h4),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4), h6),
        ];
        let sc = &wb.scales[8 * n..8 * n + 8];
        let mut scales = [_mm256_setzero_si256(); 4];
        for (k, s) in scales.iter_mut().enumerate() {
            *s = _mm256_set_m128i(
                _mm_set1_epi16(i16::from(sc[2 * k + 1])),
                _mm_set1_epi16(i16::from(sc[2 * k])),
            );
        }
        (q, scales)
    }

    /// Σ scale·q·x over quarter `k` of half `n`, in eight i32 lanes.
    #[inline(always)]
    unsafe fn quarter(q: __m256i, scale: __m256i, x: &BlockQ8K, n: usize, k: usize) -> __m256i {
        // SAFETY: 32 of the 256 activations; unaligned load.
        let qx = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(128 * n + 32 * k).cast()) };
        _mm256_madd_epi16(_mm256_maddubs_epi16(q, qx), scale)
    }

    /// The lanes' exact total minus the `q − 32` offset, as f32 lanes.
    #[inline(always)]
    unsafe fn finish(sumi: __m256i, wb: &BlockQ6K, xb: &BlockQ8K) -> __m256 {
        let fixed = _mm256_sub_epi32(sumi, _mm256_setr_epi32(wb.offset(xb), 0, 0, 0, 0, 0, 0, 0));
        _mm256_cvtepi32_ps(fixed)
    }

    macro_rules! dots {
        ($features:literal, $dot:ident, $dot4:ident) => {
            /// # Safety
            /// The CPU must support the features named.
            #[target_feature(enable = $features)]
            pub unsafe fn $dot(w: &[BlockQ6K], x: &[BlockQ8K]) -> f32 {
                let mut acc = _mm256_setzero_ps();
                for (wb, xb) in w.iter().zip(x) {
                    let mut sumi = _mm256_setzero_si256();
                    for n in 0..2 {
                        let (q, sc) = unsafe { unpack(wb, n) };
                        for k in 0..4 {
                            let p = unsafe { quarter(q[k], sc[k], xb, n, k) };
                            sumi = _mm256_add_epi32(sumi, p);
                        }
                    }
                    let p = unsafe { finish(sumi, wb, xb) };
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(xb.d * wb.d), p, acc);
                }
                unsafe { hsum(acc) }
            }

            /// # Safety
            /// The CPU must support the features named.
            #[target_feature(enable = $features)]
            pub unsafe fn $dot4(w: &[BlockQ6K], x: [&[BlockQ8K]; 4]) -> [f32; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                for (b, wb) in w.iter().enumerate() {
                    let mut sumi = [_mm256_setzero_si256(); 4];
                    for n in 0..2 {
                        let (q, sc) = unsafe { unpack(wb, n) };
                        for k in 0..4 {
                            for r in 0..4 {
                                let p = unsafe { quarter(q[k], sc[k], &x[r][b], n, k) };
                                sumi[r] = _mm256_add_epi32(sumi[r], p);
                            }
                        }
                    }
                    for r in 0..4 {
                        let xb = &x[r][b];
                        let p = unsafe { finish(sumi[r], wb, xb) };
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(xb.d * wb.d), p, acc[r]);
                    }
                }
                acc.map(|a| unsafe { hsum(a) })
            }
        };
    }

    dots!("avx2,fma", dot, dot4);
    dots!("avx2,fma,avxvnni", dot_vnni, dot4_vnni);
    dots!("avx2,fma,avx512vnni,avx512vl", dot_vnni512, dot4_vnni512);
}

/// The dot products for `isa`.
///
/// # Safety
/// This CPU must run `isa` (as it does [`crate::quant::isa`], and every
/// variant the tests get from `quant::runnable`).
unsafe fn kernels_for(isa: Isa) -> Kernels<BlockQ6K> {
    crate::quant::pick_kernels!(BlockQ6K, isa)
}

impl QuantBlock for BlockQ6K {
    type Act = BlockQ8K;
    const NAME: &'static str = "q6_k-matmul";
    const BYTES: usize = BLOCK_BYTES;

    fn parse(b: &[u8]) -> Self {
        let mut ql = [0u8; QK_K / 2];
        ql.copy_from_slice(&b[..QK_K / 2]);
        let mut qh = [0u8; QK_K / 4];
        qh.copy_from_slice(&b[QK_K / 2..QK_K / 2 + QK_K / 4]);
        let at = QK_K / 2 + QK_K / 4;
        Self {
            ql,
            qh,
            scales: std::array::from_fn(|i| b[at + i] as i8),
            d: f16::from_bits(u16::from_le_bytes([b[BLOCK_BYTES - 2], b[BLOCK_BYTES - 1]]))
                .to_f32(),
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate().take(QK_K) {
            let scale = self.d * f32::from(self.scales[i / 16]);
            *o = scale * (f32::from(self.q(i)) - 32.0);
        }
    }

    fn kernels() -> Kernels<Self> {
        // SAFETY: `isa` is detected on this CPU.
        unsafe { kernels_for(crate::quant::isa()) }
    }
}

/// A Q6_K weight matrix.
pub type Q6KMatrix = QuantMatrix<BlockQ6K>;

#[cfg(test)]
mod tests;
