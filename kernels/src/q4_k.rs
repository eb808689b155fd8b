//! GGML's Q4_K weights (the bulk of a `Q4_K_M` file) and their dot products
//! with Q8_K activations.
//!
//! A 256-value super-block holds eight 32-value sub-blocks with 6-bit
//! scales and minimums: `w = d·scale·q − dmin·min`, `q` in 0..=15. The
//! integer sums are exact, as llama.cpp takes them against the same Q8_K
//! blocks. An AVX2 dot product is picked at run time; [`dot_reference`] is
//! the plain version beside it.

use crate::kquant::{
    dequantize_scale_min, dot_scale_min_reference, BlockQ8K, ScaleMin, ScaleMinBlock, QK_K,
    SCALE_BYTES,
};
use crate::quant::{Isa, Kernels, QuantBlock, QuantMatrix};

/// Bytes per Q4_K block in GGML files: f16 scale and minimum, 12 bytes of
/// packed scales, 128 bytes of nibbles.
pub const BLOCK_BYTES: usize = 4 + SCALE_BYTES + QK_K / 2;

/// 256 weights. `qs[32c + l]` holds value `64c + l` in its low nibble and
/// value `64c + 32 + l` in its high nibble.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ4K {
    /// Scales and minimums.
    pub h: ScaleMin,
    /// Packed 4-bit values.
    pub qs: [u8; QK_K / 2],
}

impl ScaleMinBlock for BlockQ4K {
    fn header(&self) -> &ScaleMin {
        &self.h
    }

    fn q(&self, i: usize) -> u8 {
        let (c, l) = (i / 64, i % 64);
        if l < 32 {
            self.qs[32 * c + l] & 0x0F
        } else {
            self.qs[32 * c + l - 32] >> 4
        }
    }
}

/// Σ w·x over matching blocks: the plain reference.
pub fn dot_reference(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    dot_scale_min_reference(w, x)
}

/// Four reference dot products.
pub fn dot4_reference(w: &[BlockQ4K], x: [&[BlockQ8K]; 4]) -> [f32; 4] {
    x.map(|row| dot_reference(w, row))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ4K, BlockQ8K};

    /// Sub-blocks `2j` and `2j + 1` as bytes 0..=15.
    #[inline(always)]
    unsafe fn unpack(wb: &BlockQ4K, j: usize) -> (__m256i, __m256i) {
        let m4 = _mm256_set1_epi8(0x0F);
        // SAFETY: 32 of the 128 bytes; unaligned load.
        let q = unsafe { _mm256_loadu_si256(wb.qs.as_ptr().add(32 * j).cast()) };
        (
            _mm256_and_si256(q, m4),
            _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4),
        )
    }

    crate::kquant::scale_min_variants!(BlockQ4K, unpack);
}

/// The dot products for `isa`.
///
/// # Safety
/// This CPU must run `isa` (as it does [`crate::quant::isa`], and every
/// variant the tests get from `quant::runnable`).
unsafe fn kernels_for(isa: Isa) -> Kernels<BlockQ4K> {
    crate::quant::pick_kernels!(BlockQ4K, isa)
}

impl QuantBlock for BlockQ4K {
    type Act = BlockQ8K;
    const NAME: &'static str = "q4_k-matmul";
    const BYTES: usize = BLOCK_BYTES;

    fn parse(b: &[u8]) -> Self {
        let mut qs = [0u8; QK_K / 2];
        qs.copy_from_slice(&b[4 + SCALE_BYTES..BLOCK_BYTES]);
        Self {
            h: ScaleMin::parse(b),
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

/// A Q4_K weight matrix.
pub type Q4KMatrix = QuantMatrix<BlockQ4K>;

#[cfg(test)]
mod tests;
