//! GGML's Q5_K weights (the bulk of a `Q5_K_M` file) and their dot products
//! with Q8_K activations: Q4_K's layout plus a fifth bit per value, so `q`
//! runs 0..=31. Integer sums are exact, as in [`crate::q4_k`].

use crate::kquant::{
    dequantize_scale_min, dot_scale_min_reference, BlockQ8K, ScaleMin, ScaleMinBlock, QK_K,
    SCALE_BYTES,
};
use crate::quant::{Isa, Kernels, QuantBlock, QuantMatrix};

/// Bytes per Q5_K block in GGML files: f16 scale and minimum, 12 bytes of
/// packed scales, 32 bytes of high bits, 128 bytes of nibbles.
pub const BLOCK_BYTES: usize = 4 + SCALE_BYTES + QK_K / 8 + QK_K / 2;

/// 256 weights. Value `64c + l` (`l` < 32) is the low nibble of
/// `qs[32c + l]` plus bit `2c` of `qh[l]` as 16; value `64c + 32 + l` the
/// high nibble plus bit `2c + 1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ5K {
    /// Scales and minimums.
    pub h: ScaleMin,
    /// High bits.
    pub qh: [u8; QK_K / 8],
    /// Packed low 4 bits.
    pub qs: [u8; QK_K / 2],
}

impl ScaleMinBlock for BlockQ5K {
    fn header(&self) -> &ScaleMin {
        &self.h
    }

    fn q(&self, i: usize) -> u8 {
        let (c, l) = (i / 64, i % 64);
        let (low, bit) = if l < 32 {
            (self.qs[32 * c + l] & 0x0F, (self.qh[l] >> (2 * c)) & 1)
        } else {
            (
                self.qs[32 * c + l - 32] >> 4,
                (self.qh[l - 32] >> (2 * c + 1)) & 1,
            )
        };
        low | (bit << 4)
    }
}

/// Σ w·x over matching blocks: the plain reference.
pub fn dot_reference(w: &[BlockQ5K], x: &[BlockQ8K]) -> f32 {
    dot_scale_min_reference(w, x)
}

/// Four reference dot products.
pub fn dot4_reference(w: &[BlockQ5K], x: [&[BlockQ8K]; 4]) -> [f32; 4] {
    x.map(|row| dot_reference(w, row))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ5K, BlockQ8K};

    /// Sub-blocks `2j` and `2j + 1` as bytes 0..=31.
    #[inline(always)]
    unsafe fn unpack(wb: &BlockQ5K, j: usize) -> (__m256i, __m256i) {
        let m4 = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        // SAFETY: 32 of the 128 bytes, and all 32 high-bit bytes; unaligned loads.
        let q = unsafe { _mm256_loadu_si256(wb.qs.as_ptr().add(32 * j).cast()) };
        let qh = unsafe { _mm256_loadu_si256(wb.qh.as_ptr().cast()) };
        // 16-bit shifts by at most 7, then a per-byte mask: each byte keeps
        // its own bit.
        let hl = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32)), one);
        let hh = _mm256_and_si256(
            _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32 + 1)),
            one,
        );
        (
            _mm256_or_si256(_mm256_and_si256(q, m4), _mm256_slli_epi16::<4>(hl)),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4),
                _mm256_slli_epi16::<4>(hh),
            ),
        )
    }

    crate::kquant::scale_min_variants!(BlockQ5K, unpack);
}

/// The dot products for `isa`.
///
/// # Safety
/// This CPU must run `isa` (as it does [`crate::quant::isa`], and every
/// variant the tests get from `quant::runnable`).
unsafe fn kernels_for(isa: Isa) -> Kernels<BlockQ5K> {
    crate::quant::pick_kernels!(BlockQ5K, isa)
}

impl QuantBlock for BlockQ5K {
    type Act = BlockQ8K;
    const NAME: &'static str = "q5_k-matmul";
    const BYTES: usize = BLOCK_BYTES;

    fn parse(b: &[u8]) -> Self {
        let at = 4 + SCALE_BYTES;
        let mut qh = [0u8; QK_K / 8];
        qh.copy_from_slice(&b[at..at + QK_K / 8]);
        let mut qs = [0u8; QK_K / 2];
        qs.copy_from_slice(&b[at + QK_K / 8..BLOCK_BYTES]);
        Self {
            h: ScaleMin::parse(b),
            qh,
            qs,
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        dequantize_scale_min(self, out);
    }

    fn kernels() -> Kernels<Self> {
        // SAFETY: `isa` is detected on this CPU.
        unsafe { kernels_for(crate::quant::isa()) }
    }
}

/// A Q5_K weight matrix.
pub type Q5KMatrix = QuantMatrix<BlockQ5K>;

#[cfg(test)]
mod tests;
