//! GGML's Q4_1 weights and their dot products with Q8_1 activations (the
//! activation blocks and the matrix product itself are in [`crate::quant`]).
//!
//! Blocks and the dot product follow GGML's definitions, so results track
//! llama.cpp's on the same file. An AVX2/FMA dot product is picked at run
//! time; [`dot_reference`] is the plain version beside it.

use half::f16;

use crate::quant::dots::min_reference;
use crate::quant::{nibble, BlockQ8_1, Isa, Kernels, QuantBlock, QuantMatrix, BLOCK};

/// Bytes per Q4_1 block in GGML files: f16 scale, f16 minimum, 16 nibble pairs.
pub const BLOCK_BYTES: usize = 20;

/// 32 weights: `w[i] = d * q[i] + m`, with `q[j]` in the low nibble of
/// `qs[j]` and `q[j + 16]` in its high nibble.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Minimum.
    pub m: f16,
    /// Packed 4-bit values.
    pub qs: [u8; 16],
}

/// Σ w·x over matching blocks: the plain reference.
pub fn dot_reference(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
    min_reference(
        w,
        x,
        |b| (b.d.to_f32(), b.m.to_f32()),
        |b, i| nibble(&b.qs, i),
    )
}

/// Four reference dot products.
pub fn dot4_reference(w: &[BlockQ4_1], x: [&[BlockQ8_1]; 4]) -> [f32; 4] {
    x.map(|row| dot_reference(w, row))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ4_1, BlockQ8_1};
    use crate::quant::avx2::unpack_nibbles;

    /// `[d, m]` of a weight block as f32, with F16C.
    #[inline(always)]
    unsafe fn scales(wb: &BlockQ4_1) -> (f32, f32) {
        // SAFETY: `d` and `m` are adjacent f16s at the start of the block.
        let bits = unsafe { std::ptr::read_unaligned(std::ptr::from_ref(wb).cast::<i32>()) };
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
        (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
    }

    /// The 32 weights of a block as bytes 0..=15.
    #[inline(always)]
    unsafe fn unpack(wb: &BlockQ4_1) -> __m256i {
        unsafe { unpack_nibbles(&wb.qs) }
    }

    crate::quant::dots::min_variants!(BlockQ4_1, unpack, scales);
}

/// The fastest dot products this CPU supports.
fn kernels() -> Kernels<BlockQ4_1> {
    // SAFETY: `isa` is detected on this CPU.
    unsafe { kernels_for(crate::quant::isa()) }
}

/// The dot products for `isa`.
///
/// # Safety
/// This CPU must run `isa` (as it does [`crate::quant::isa`], and every
/// variant the tests get from `quant::runnable`).
unsafe fn kernels_for(isa: Isa) -> Kernels<BlockQ4_1> {
    crate::quant::pick_kernels!(BlockQ4_1, isa)
}

impl QuantBlock for BlockQ4_1 {
    type Act = BlockQ8_1;
    const NAME: &'static str = "q4_1-matmul";
    const BYTES: usize = BLOCK_BYTES;

    fn parse(b: &[u8]) -> Self {
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[4..BLOCK_BYTES]);
        Self {
            d: f16::from_bits(u16::from_le_bytes([b[0], b[1]])),
            m: f16::from_bits(u16::from_le_bytes([b[2], b[3]])),
            qs,
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for (i, o) in out.iter_mut().enumerate().take(BLOCK) {
            *o = d * f32::from(nibble(&self.qs, i)) + m;
        }
    }

    fn kernels() -> Kernels<Self> {
        kernels()
    }
}

/// A Q4_1 weight matrix.
pub type Q4_1Matrix = QuantMatrix<BlockQ4_1>;

#[cfg(target_arch = "x86_64")]
impl crate::quant::tiled::Tileable for BlockQ4_1 {
    const LAYOUT: crate::quant::tiled::Layout8 = crate::quant::tiled::Layout8 {
        nibbles: true,
        high: false,
        min: true,
        offset: 0,
    };

    fn scales(&self) -> (f32, f32) {
        (self.d.to_f32(), self.m.to_f32())
    }

    fn values(&self, out: &mut [u8; 32]) -> usize {
        out[..16].copy_from_slice(&self.qs);
        16
    }
}

#[cfg(test)]
mod tests;
