//! GGML's Q4_0 weights and their dot products with 8-bit activations.
//!
//! A Q4_0 weight is `d · (q − 8)`. Against a Q8_1 activation block the dot
//! product is `d · d_x · Σ (q − 8)·x`, and the integer sum is taken exactly,
//! as `Σ q·x − 8 · Σ x` (llama.cpp sums the same integers against its Q8_0
//! blocks, whose scale is the same f16 value), so results track llama.cpp's
//! on the same file. An AVX2/FMA dot product (with an AVX-VNNI variant) is
//! picked at run time; [`dot_reference`] is the plain version beside it.

use half::f16;

use crate::quant::dots::offset_reference;
use crate::quant::{nibble, BlockQ8_1, Isa, Kernels, QuantBlock, QuantMatrix, BLOCK};

/// Bytes per Q4_0 block in GGML files: f16 scale, 16 nibble pairs.
pub const BLOCK_BYTES: usize = 18;

/// 32 weights: `w[i] = d * (q[i] - 8)`, with `q[j]` in the low nibble of
/// `qs[j]` and `q[j + 16]` in its high nibble.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: f16,
    /// Packed 4-bit values.
    pub qs: [u8; 16],
}

/// Σ w·x over matching blocks: the plain reference.
pub fn dot_reference(w: &[BlockQ4_0], x: &[BlockQ8_1]) -> f32 {
    offset_reference(w, x, |b| b.d.to_f32(), |b, i| nibble(&b.qs, i), 8)
}

/// Four reference dot products.
pub fn dot4_reference(w: &[BlockQ4_0], x: [&[BlockQ8_1]; 4]) -> [f32; 4] {
    x.map(|row| dot_reference(w, row))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ4_0, BlockQ8_1};
    use crate::quant::avx2::unpack_nibbles;

    /// The 32 weights of a block as bytes 0..=15.
    #[inline(always)]
    unsafe fn unpack(wb: &BlockQ4_0) -> __m256i {
        unsafe { unpack_nibbles(&wb.qs) }
    }

    #[inline(always)]
    unsafe fn scale(wb: &BlockQ4_0) -> f32 {
        wb.d.to_f32()
    }

    crate::quant::dots::offset_variants!(BlockQ4_0, unpack, scale, 3);
}

/// The fastest dot products this CPU supports.
fn kernels() -> Kernels<BlockQ4_0> {
    // SAFETY: `isa` is detected on this CPU.
    unsafe { kernels_for(crate::quant::isa()) }
}

/// The dot products for `isa`.
///
/// # Safety
/// This CPU must run `isa` (as it does [`crate::quant::isa`], and every
/// variant the tests get from `quant::runnable`).
unsafe fn kernels_for(isa: Isa) -> Kernels<BlockQ4_0> {
    crate::quant::pick_kernels!(BlockQ4_0, isa)
}

impl QuantBlock for BlockQ4_0 {
    type Act = BlockQ8_1;
    const NAME: &'static str = "q4_0-matmul";
    const BYTES: usize = BLOCK_BYTES;

    fn parse(b: &[u8]) -> Self {
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[2..BLOCK_BYTES]);
        Self {
            d: f16::from_bits(u16::from_le_bytes([b[0], b[1]])),
            qs,
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (i, o) in out.iter_mut().enumerate().take(BLOCK) {
            *o = d * (f32::from(nibble(&self.qs, i)) - 8.0);
        }
    }

    fn kernels() -> Kernels<Self> {
        kernels()
    }
}

/// A Q4_0 weight matrix.
pub type Q4_0Matrix = QuantMatrix<BlockQ4_0>;

#[cfg(target_arch = "x86_64")]
impl crate::quant::tiled::Tileable for BlockQ4_0 {
    const LAYOUT: crate::quant::tiled::Layout8 = crate::quant::tiled::Layout8 {
        nibbles: true,
        high: false,
        min: false,
        offset: 8,
    };

    fn scales(&self) -> (f32, f32) {
        (self.d.to_f32(), 0.0)
    }

    fn values(&self, out: &mut [u8; 32]) -> usize {
        out[..16].copy_from_slice(&self.qs);
        16
    }
}

#[cfg(test)]
mod tests;
