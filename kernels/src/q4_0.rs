//! GGML's Q4_0 weights and their dot products with 8-bit activations.
//!
//! A Q4_0 weight is `d · (q − 8)`. Against a Q8_1 activation block the dot
//! product is `d · d_x · Σ (q − 8)·x`, and the integer sum is taken exactly,
//! as `Σ q·x − 8 · Σ x` (llama.cpp sums the same integers against its Q8_0
//! blocks, whose scale is the same f16 value), so results track llama.cpp's
//! on the same file. An AVX2/FMA dot product (with an AVX-VNNI variant) is
//! picked at run time; [`dot_reference`] is the plain version beside it.

use half::f16;

use crate::quant::{BlockQ8_1, Isa, Kernels, QuantBlock, QuantMatrix, BLOCK};

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
    let mut sum = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let mut sumi = 0i32;
        for j in 0..16 {
            let lo = i32::from(wb.qs[j] & 0x0F) - 8;
            let hi = i32::from(wb.qs[j] >> 4) - 8;
            sumi += lo * i32::from(xb.qs[j]) + hi * i32::from(xb.qs[j + 16]);
        }
        sum += wb.d.to_f32() * xb.d * sumi as f32;
    }
    sum
}

/// Four reference dot products.
pub fn dot4_reference(w: &[BlockQ4_0], x: [&[BlockQ8_1]; 4]) -> [f32; 4] {
    x.map(|row| dot_reference(w, row))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ4_0, BlockQ8_1};
    use crate::quant::avx2::{hsum, ints_avx2, ints_vnni, load_q8, unpack_nibbles};

    /// The 32 weights of a block as bytes 0..=15.
    #[inline(always)]
    unsafe fn unpack(wb: &BlockQ4_0) -> __m256i {
        unsafe { unpack_nibbles(&wb.qs) }
    }

    /// The activations of a block.
    #[inline(always)]
    unsafe fn load(xb: &BlockQ8_1) -> __m256i {
        unsafe { load_q8(xb) }
    }

    /// One weight row against one (`dot`) or four (`dot4`) activation
    /// rows. Per block the integer lanes hold `Σ q·x − 8·Σ x` exactly, so
    /// every variant gives the same bits, one row or four.
    macro_rules! dots {
        ($features:literal, $dot:ident, $dot4:ident, $ints:ident) => {
            /// # Safety
            /// The CPU must support the features named.
            #[target_feature(enable = $features)]
            pub unsafe fn $dot(w: &[BlockQ4_0], x: &[BlockQ8_1]) -> f32 {
                let ones = _mm256_set1_epi8(1);
                let mut acc = _mm256_setzero_ps();
                for (wb, xb) in w.iter().zip(x) {
                    let qx = unsafe { load(xb) };
                    let p = unsafe { $ints(unpack(wb), qx) };
                    let s = unsafe { $ints(ones, qx) };
                    let p = _mm256_cvtepi32_ps(_mm256_sub_epi32(p, _mm256_slli_epi32::<3>(s)));
                    let d = wb.d.to_f32() * xb.d;
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), p, acc);
                }
                unsafe { hsum(acc) }
            }

            /// # Safety
            /// The CPU must support the features named.
            #[target_feature(enable = $features)]
            pub unsafe fn $dot4(w: &[BlockQ4_0], x: [&[BlockQ8_1]; 4]) -> [f32; 4] {
                let ones = _mm256_set1_epi8(1);
                let mut acc = [_mm256_setzero_ps(); 4];
                for (b, wb) in w.iter().enumerate() {
                    let qw = unsafe { unpack(wb) };
                    let dw = wb.d.to_f32();
                    for r in 0..4 {
                        let xb = &x[r][b];
                        let qx = unsafe { load(xb) };
                        let p = unsafe { $ints(qw, qx) };
                        let s = unsafe { $ints(ones, qx) };
                        let p = _mm256_cvtepi32_ps(_mm256_sub_epi32(p, _mm256_slli_epi32::<3>(s)));
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xb.d), p, acc[r]);
                    }
                }
                acc.map(|a| unsafe { hsum(a) })
            }
        };
    }

    dots!("avx2,fma,f16c", dot, dot4, ints_avx2);
    dots!("avx2,fma,f16c,avxvnni", dot_vnni, dot4_vnni, ints_vnni);
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

    fn dequantize(&self) -> [f32; BLOCK] {
        let d = self.d.to_f32();
        std::array::from_fn(|i| {
            let q = if i < 16 {
                self.qs[i] & 0x0F
            } else {
                self.qs[i - 16] >> 4
            };
            d * (f32::from(q) - 8.0)
        })
    }

    fn kernels() -> Kernels<Self> {
        kernels()
    }
}

/// A Q4_0 weight matrix.
pub type Q4_0Matrix = QuantMatrix<BlockQ4_0>;

#[cfg(test)]
mod tests;
