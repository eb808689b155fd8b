//! GGML's Q5_1 weights and their dot products with Q8_1 activations.
//! llama.cpp's quantizer writes them for the tensors of a `Q5_K_M` file
//! whose rows are not a multiple of 256 values.
//!
//! A weight is `d·q + m`, `q` in 0..=31: four bits in `qs` as in Q4_1 and
//! the fifth in `qh`.

use half::f16;

use crate::quant::dots::min_reference;
use crate::quant::{nibble, BlockQ8_1, Isa, Kernels, QuantBlock, QuantMatrix, BLOCK};

/// Bytes per Q5_1 block in GGML files: f16 scale and minimum, 32 high
/// bits, 16 nibble pairs.
pub const BLOCK_BYTES: usize = 24;

/// 32 weights: value `i` is [`nibble`]`(qs, i)` plus bit `i` of `qh` as 16.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockQ5_1 {
    /// Scale (an f16 value).
    pub d: f32,
    /// Minimum (an f16 value).
    pub m: f32,
    /// High bits.
    pub qh: u32,
    /// Packed low 4 bits.
    pub qs: [u8; 16],
}

impl BlockQ5_1 {
    fn q(&self, i: usize) -> u8 {
        nibble(&self.qs, i) | ((((self.qh >> i) & 1) as u8) << 4)
    }
}

/// Σ w·x over matching blocks: the plain reference.
pub fn dot_reference(w: &[BlockQ5_1], x: &[BlockQ8_1]) -> f32 {
    min_reference(w, x, |b| (b.d, b.m), BlockQ5_1::q)
}

/// Four reference dot products.
pub fn dot4_reference(w: &[BlockQ5_1], x: [&[BlockQ8_1]; 4]) -> [f32; 4] {
    x.map(|row| dot_reference(w, row))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ5_1, BlockQ8_1};
    use crate::quant::dots::unpack_5bit;

    #[inline(always)]
    unsafe fn unpack(wb: &BlockQ5_1) -> __m256i {
        unsafe { unpack_5bit(&wb.qs, wb.qh) }
    }

    #[inline(always)]
    unsafe fn scales(wb: &BlockQ5_1) -> (f32, f32) {
        (wb.d, wb.m)
    }

    crate::quant::dots::min_variants!(BlockQ5_1, unpack, scales);
}

/// The dot products for `isa`.
///
/// # Safety
/// This CPU must run `isa` (as it does [`crate::quant::isa`], and every
/// variant the tests get from `quant::runnable`).
unsafe fn kernels_for(isa: Isa) -> Kernels<BlockQ5_1> {
    crate::quant::pick_kernels!(BlockQ5_1, isa)
}

impl QuantBlock for BlockQ5_1 {
    type Act = BlockQ8_1;
    const NAME: &'static str = "q5_1-matmul";
    const BYTES: usize = BLOCK_BYTES;

    fn parse(b: &[u8]) -> Self {
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[8..BLOCK_BYTES]);
        Self {
            d: f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
            m: f16::from_bits(u16::from_le_bytes([b[2], b[3]])).to_f32(),
            qh: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            qs,
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate().take(BLOCK) {
            *o = self.d * f32::from(self.q(i)) + self.m;
        }
    }

    fn kernels() -> Kernels<Self> {
        // SAFETY: `isa` is detected on this CPU.
        unsafe { kernels_for(crate::quant::isa()) }
    }
}

/// A Q5_1 weight matrix.
pub type Q5_1Matrix = QuantMatrix<BlockQ5_1>;

#[cfg(target_arch = "x86_64")]
impl crate::quant::tiled::Tileable for BlockQ5_1 {
    const LAYOUT: crate::quant::tiled::Layout8 = crate::quant::tiled::Layout8 {
        nibbles: true,
        high: true,
        min: true,
        offset: 0,
    };

    fn scales(&self) -> (f32, f32) {
        (self.d, self.m)
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
