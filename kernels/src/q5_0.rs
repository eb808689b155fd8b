//! GGML's Q5_0 weights and their dot products with 8-bit activations.
//! llama.cpp's quantizer writes them where a K-quant does not fit: the
//! tensors of a `Q4_K_M` file whose rows are not a multiple of 256 values.
//!
//! A weight is `d·(q − 16)`, `q` in 0..=31: four bits in `qs` as in Q4_0
//! and the fifth in `qh`. The integer sums are exact (`Σ q·x − 16·Σ x`),
//! as llama.cpp takes them against its Q8_0 blocks of the same scale.

use half::f16;

use crate::quant::dots::offset_reference;
use crate::quant::{nibble, BlockQ8_1, Isa, Kernels, QuantBlock, QuantMatrix, BLOCK};

/// Bytes per Q5_0 block in GGML files: f16 scale, 32 high bits, 16 nibble pairs.
pub const BLOCK_BYTES: usize = 22;

/// 32 weights: value `i` is [`nibble`]`(qs, i)` plus bit `i` of `qh` as 16.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ5_0 {
    /// Scale (an f16 value).
    pub d: f32,
    /// High bits.
    pub qh: u32,
    /// Packed low 4 bits.
    pub qs: [u8; 16],
}

impl BlockQ5_0 {
    fn q(&self, i: usize) -> u8 {
        nibble(&self.qs, i) | ((((self.qh >> i) & 1) as u8) << 4)
    }
}

/// Σ w·x over matching blocks: the plain reference.
pub fn dot_reference(w: &[BlockQ5_0], x: &[BlockQ8_1]) -> f32 {
    offset_reference(w, x, |b| b.d, BlockQ5_0::q, 16)
}

/// Four reference dot products.
pub fn dot4_reference(w: &[BlockQ5_0], x: [&[BlockQ8_1]; 4]) -> [f32; 4] {
    x.map(|row| dot_reference(w, row))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ5_0, BlockQ8_1};
    use crate::quant::dots::unpack_5bit;

    #[inline(always)]
    unsafe fn unpack(wb: &BlockQ5_0) -> __m256i {
        unsafe { unpack_5bit(&wb.qs, wb.qh) }
    }

    #[inline(always)]
    unsafe fn scale(wb: &BlockQ5_0) -> f32 {
        wb.d
    }

    crate::quant::dots::offset_variants!(BlockQ5_0, unpack, scale, 4);
}

/// The dot products for `isa`.
///
/// # Safety
/// This CPU must run `isa` (as it does [`crate::quant::isa`], and every
/// variant the tests get from `quant::runnable`).
unsafe fn kernels_for(isa: Isa) -> Kernels<BlockQ5_0> {
    crate::quant::pick_kernels!(BlockQ5_0, isa)
}

impl QuantBlock for BlockQ5_0 {
    type Act = BlockQ8_1;
    const NAME: &'static str = "q5_0-matmul";
    const BYTES: usize = BLOCK_BYTES;

    fn parse(b: &[u8]) -> Self {
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[6..BLOCK_BYTES]);
        Self {
            d: f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
            qh: u32::from_le_bytes([b[2], b[3], b[4], b[5]]),
            qs,
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate().take(BLOCK) {
            *o = self.d * (f32::from(self.q(i)) - 16.0);
        }
    }

    fn kernels() -> Kernels<Self> {
        // SAFETY: `isa` is detected on this CPU.
        unsafe { kernels_for(crate::quant::isa()) }
    }
}

/// A Q5_0 weight matrix.
pub type Q5_0Matrix = QuantMatrix<BlockQ5_0>;

#[cfg(target_arch = "x86_64")]
impl crate::quant::tiled::Tileable for BlockQ5_0 {
    const LAYOUT: crate::quant::tiled::Layout8 = crate::quant::tiled::Layout8 {
        nibbles: true,
        high: true,
        min: false,
        offset: 16,
    };

    fn scales(&self) -> (f32, f32) {
        (self.d, 0.0)
    }

    fn values(&self, out: &mut [u8; 32]) -> usize {
        out[..16].copy_from_slice(&self.qs);
        16
    }

    fn high_bits(&self) -> u32 {
        self.qh
    }
}

#[cfg(test)]
mod tests;
