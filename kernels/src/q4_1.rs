//! GGML's Q4_1 weights and Q8_1 activations, and their dot products (the
//! matrix product itself is in [`crate::quant`]).
//!
//! Blocks, activation quantization and the dot product follow GGML's
//! definitions (round half to even, `s = d * Σq` rounded once to f16), so
//! results track llama.cpp's on the same file. An AVX2/FMA dot product is
//! picked at run time; [`dot_reference`] is the plain version beside it.

use half::f16;

use crate::quant::{Kernels, QuantBlock, QuantMatrix};

/// Values per block.
pub const BLOCK: usize = 32;
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

/// 32 activations: `x[i] ≈ d * qs[i]`, with `s = d * Σ qs` for the Q4_1 minimum term.
/// `d` and `s` hold f16-rounded values, as GGML stores them.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8_1 {
    /// Scale (an f16 value).
    pub d: f32,
    /// `d * Σ qs` (an f16 value).
    pub s: f32,
    /// Quantized values.
    pub qs: [i8; BLOCK],
}

impl Default for BlockQ8_1 {
    fn default() -> Self {
        Self {
            d: 0.0,
            s: 0.0,
            qs: [0; BLOCK],
        }
    }
}

/// Quantizes `x` (a multiple of 32 long) to Q8_1 blocks, as GGML does;
/// with AVX2 when the CPU has it (the same results, bit for bit).
pub fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::isa() != crate::quant::Isa::Reference {
        // SAFETY: the AVX2/FMA/F16C kernels were selected, so the CPU has AVX2.
        unsafe { avx2::quantize(x, out) };
        return;
    }
    quantize_q8_1_reference(x, out);
}

/// The plain version of [`quantize_q8_1`].
pub fn quantize_q8_1_reference(x: &[f32], out: &mut [BlockQ8_1]) {
    for (chunk, block) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in block.qs.iter_mut().zip(chunk) {
            let r = (v * id).round_ties_even();
            *q = r as i8;
            sum += r as i32;
        }
        block.d = f16::from_f32(d).to_f32();
        block.s = f16::from_f32(d * sum as f32).to_f32();
    }
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
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ4_1, BlockQ8_1};
    use crate::quant::hsum;

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
        // SAFETY: `qs` is 16 bytes; unaligned load.
        let packed = unsafe { _mm_loadu_si128(wb.qs.as_ptr().cast()) };
        let nibbles = _mm256_insertf128_si256::<1>(
            _mm256_castsi128_si256(packed),
            _mm_srli_epi16::<4>(packed),
        );
        _mm256_and_si256(nibbles, _mm256_set1_epi8(0x0F))
    }

    /// The activations of a block.
    #[inline(always)]
    unsafe fn load(xb: &BlockQ8_1) -> __m256i {
        // SAFETY: `qs` is 32 bytes; unaligned load.
        unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) }
    }

    /// Sums of four u8 × i8 products per i32 lane: pairs → i16 (at most
    /// 2·15·127 for Q4_1, 2·128·127 for Q8_0's sign trick: no saturation) → i32.
    #[inline(always)]
    pub(crate) unsafe fn ints_avx2(qw: __m256i, qx: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(qw, qx), _mm256_set1_epi16(1))
    }

    /// The same sums in one VNNI instruction (exact: the same integers).
    #[target_feature(enable = "avx2,avxvnni")]
    #[inline]
    pub(crate) unsafe fn ints_vnni(qw: __m256i, qx: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), qw, qx)
    }

    /// Q8_1 quantization of 32-value blocks: the same operations as the
    /// scalar version (multiply, round half to even), eight lanes at a time.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize(x: &[f32], out: &mut [BlockQ8_1]) {
        let sign = _mm256_set1_ps(-0.0);
        for (chunk, block) in x.chunks_exact(32).zip(out.iter_mut()) {
            // SAFETY: `chunk` holds 32 floats; unaligned loads.
            let v: [__m256; 4] =
                std::array::from_fn(|i| unsafe { _mm256_loadu_ps(chunk.as_ptr().add(8 * i)) });
            let abs = v.map(|x| _mm256_andnot_ps(sign, x));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_extractf128_ps::<1>(m), _mm256_castps256_ps128(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            let q = v.map(|x| {
                _mm256_cvtps_epi32(_mm256_round_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(_mm256_mul_ps(x, id)))
            });
            let total =
                _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let t = _mm_add_epi32(
                _mm256_extracti128_si256::<1>(total),
                _mm256_castsi256_si128(total),
            );
            let t = _mm_add_epi32(t, _mm_shuffle_epi32::<0b01_00_11_10>(t));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32::<0b10_11_00_01>(t)));
            // i32 → i16 → i8 packs work per 128-bit lane; restore the order.
            let packed = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let ordered =
                _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            // SAFETY: `qs` is 32 bytes; unaligned store.
            unsafe { _mm256_storeu_si256(block.qs.as_mut_ptr().cast(), ordered) };
            block.d = half::f16::from_f32(d).to_f32();
            block.s = half::f16::from_f32(d * sum as f32).to_f32();
        }
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
    crate::quant::pick_kernels!(BlockQ4_1)
}

#[cfg(test)]
fn dot_fn() -> crate::quant::DotFn<BlockQ4_1> {
    kernels().0
}

/// Whether the SIMD dot product is in use (for logs and benchmarks).
pub fn simd_available() -> bool {
    crate::quant::isa() != crate::quant::Isa::Reference
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
