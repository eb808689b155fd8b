//! GGML's Q4_1 weights and their dot products with Q8_1 activations (the
//! activation blocks and the matrix product itself are in [`crate::quant`]).
//!
//! Blocks and the dot product follow GGML's definitions, so results track
//! llama.cpp's on the same file. An AVX2/FMA dot product is picked at run
//! time; [`dot_reference`] is the plain version beside it.

use half::f16;

use crate::quant::{BlockQ8_1, Isa, Kernels, QuantBlock, QuantMatrix, BLOCK};

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
    let mut sum = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let mut sumi = 0i32;
        for j in 0..16 {
            let lo = i32::from(wb.qs[j] & 0x0F);
            let hi = i32::from(wb.qs[j] >> 4);
            sumi += lo * i32::from(xb.qs[j]) + hi * i32::from(xb.qs[j + 16]);
        }
        sum += wb.d.to_f32() * xb.d * sumi as f32 + wb.m.to_f32() * xb.s;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ4_1, BlockQ8_1};
    use crate::quant::avx2::{hsum, ints_avx2, ints_vnni, load_q8, unpack_nibbles};

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

    /// The activations of a block.
    #[inline(always)]
    unsafe fn load(xb: &BlockQ8_1) -> __m256i {
        unsafe { load_q8(xb) }
    }

    /// One weight row against one (`dot`) or four (`dot4`) activation
    /// rows; each weight block is unpacked once for the four. Every result
    /// equals the one-row result for that row, bit for bit (the same
    /// operations in the same order), and the VNNI variant equals the AVX2
    /// one (the same integer sums).
    macro_rules! dots {
        ($features:literal, $dot:ident, $dot4:ident, $ints:ident) => {
            /// # Safety
            /// The CPU must support the features named.
            #[target_feature(enable = $features)]
            pub unsafe fn $dot(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
                let mut acc = _mm256_setzero_ps();
                let mut mins = 0f32;
                for (wb, xb) in w.iter().zip(x) {
                    let (d, m) = unsafe { scales(wb) };
                    mins += m * xb.s;
                    let p = _mm256_cvtepi32_ps(unsafe { $ints(unpack(wb), load(xb)) });
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), p, acc);
                }
                unsafe { hsum(acc) + mins }
            }

            /// # Safety
            /// The CPU must support the features named.
            #[target_feature(enable = $features)]
            pub unsafe fn $dot4(w: &[BlockQ4_1], x: [&[BlockQ8_1]; 4]) -> [f32; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut mins = [0f32; 4];
                for (b, wb) in w.iter().enumerate() {
                    let (d, m) = unsafe { scales(wb) };
                    let qw = unsafe { unpack(wb) };
                    for r in 0..4 {
                        let xb = &x[r][b];
                        mins[r] += m * xb.s;
                        let p = _mm256_cvtepi32_ps(unsafe { $ints(qw, load(xb)) });
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), p, acc[r]);
                    }
                }
                let mut out = [0f32; 4];
                for r in 0..4 {
                    out[r] = unsafe { hsum(acc[r]) } + mins[r];
                }
                out
            }
        };
    }

    dots!("avx2,fma,f16c", dot, dot4, ints_avx2);
    dots!("avx2,fma,f16c,avxvnni", dot_vnni, dot4_vnni, ints_vnni);
}

/// Four reference dot products.
pub fn dot4_reference(w: &[BlockQ4_1], x: [&[BlockQ8_1]; 4]) -> [f32; 4] {
    x.map(|row| dot_reference(w, row))
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

#[cfg(test)]
fn dot_fn() -> crate::quant::DotFn<BlockQ4_1> {
    kernels().0
}

/// Whether the SIMD dot product is in use (for logs and benchmarks).
pub fn simd_available() -> bool {
    crate::quant::isa() != Isa::Reference
}

impl QuantBlock for BlockQ4_1 {
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

    fn dequantize(&self) -> [f32; BLOCK] {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        std::array::from_fn(|i| {
            let q = if i < 16 {
                self.qs[i] & 0x0F
            } else {
                self.qs[i - 16] >> 4
            };
            d * f32::from(q) + m
        })
    }

    fn kernels() -> Kernels<Self> {
        kernels()
    }
}

/// A Q4_1 weight matrix.
pub type Q4_1Matrix = QuantMatrix<BlockQ4_1>;

#[cfg(test)]
mod tests;
