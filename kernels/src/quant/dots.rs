//! The dot products of the 32-value formats against Q8_1 activations,
//! written once: offset formats (`w = d·(q − o)`: Q4_0, Q5_0) and minimum
//! formats (`w = d·q + m`: Q4_1, Q5_1). Each format supplies how to read a
//! value (for the references) or unpack a block (for the SIMD variants).

use super::BlockQ8_1;

/// Σ w·x for an offset format: `d·d_x·(Σ q·x − o·Σ x)`, exact integers per block.
pub(crate) fn offset_reference<B>(
    w: &[B],
    x: &[BlockQ8_1],
    d: impl Fn(&B) -> f32,
    q: impl Fn(&B, usize) -> u8,
    offset: i32,
) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let sumi: i32 = (0..32)
            .map(|i| (i32::from(q(wb, i)) - offset) * i32::from(xb.qs[i]))
            .sum();
        sum += d(wb) * xb.d * sumi as f32;
    }
    sum
}

/// Σ w·x for a minimum format: `d·d_x·Σ q·x + m·s_x`.
pub(crate) fn min_reference<B>(
    w: &[B],
    x: &[BlockQ8_1],
    dm: impl Fn(&B) -> (f32, f32),
    q: impl Fn(&B, usize) -> u8,
) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let sumi: i32 = (0..32)
            .map(|i| i32::from(q(wb, i)) * i32::from(xb.qs[i]))
            .sum();
        let (d, m) = dm(wb);
        sum += d * xb.d * sumi as f32 + m * xb.s;
    }
    sum
}

/// AVX2 dot products of an offset format: `$unpack(wb)` gives the block's
/// 32 values as bytes, `$scale(wb)` its scale, and the offset is
/// `1 << $shift`. Per block the integer lanes hold `Σ q·x − o·Σ x`
/// exactly (the offset term from the activations' exact sum, in lane 0),
/// so every variant gives the same bits, one row or four.
#[cfg(target_arch = "x86_64")]
macro_rules! offset_dots {
    ($block:ty, $features:literal, $dot:ident, $dot4:ident, $ints:ident, $unpack:ident, $scale:ident, $shift:literal) => {
        /// # Safety
        /// The CPU must support the features named.
        #[target_feature(enable = $features)]
        pub unsafe fn $dot(w: &[$block], x: &[BlockQ8_1]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for (wb, xb) in w.iter().zip(x) {
                let qx = unsafe { load_q8(xb) };
                let p = unsafe { $ints($unpack(wb), qx) };
                let off = _mm256_setr_epi32(xb.sum << $shift, 0, 0, 0, 0, 0, 0, 0);
                let p = _mm256_cvtepi32_ps(_mm256_sub_epi32(p, off));
                let d = unsafe { $scale(wb) } * xb.d;
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d), p, acc);
            }
            unsafe { hsum(acc) }
        }

        /// # Safety
        /// The CPU must support the features named.
        #[target_feature(enable = $features)]
        pub unsafe fn $dot4(w: &[$block], x: [&[BlockQ8_1]; 4]) -> [f32; 4] {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (b, wb) in w.iter().enumerate() {
                let qw = unsafe { $unpack(wb) };
                let dw = unsafe { $scale(wb) };
                for r in 0..4 {
                    let xb = &x[r][b];
                    let qx = unsafe { load_q8(xb) };
                    let p = unsafe { $ints(qw, qx) };
                    let off = _mm256_setr_epi32(xb.sum << $shift, 0, 0, 0, 0, 0, 0, 0);
                    let p = _mm256_cvtepi32_ps(_mm256_sub_epi32(p, off));
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xb.d), p, acc[r]);
                }
            }
            acc.map(|a| unsafe { hsum(a) })
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use offset_dots;

/// [`offset_dots`] for every x86 variant: `dot`/`dot4` (AVX2),
/// `dot_vnni`/`dot4_vnni` (AVX-VNNI), `dot_vnni512`/`dot4_vnni512`
/// (AVX-512 VNNI), as [`crate::quant::pick_kernels`] wants them.
#[cfg(target_arch = "x86_64")]
macro_rules! offset_variants {
    ($block:ty, $unpack:ident, $scale:ident, $shift:literal) => {
        use crate::quant::avx2::{hsum, ints_avx2, ints_vnni, ints_vnni512, load_q8};
        use crate::quant::dots::offset_dots;
        offset_dots!(
            $block,
            "avx2,fma,f16c",
            dot,
            dot4,
            ints_avx2,
            $unpack,
            $scale,
            $shift
        );
        offset_dots!(
            $block,
            "avx2,fma,f16c,avxvnni",
            dot_vnni,
            dot4_vnni,
            ints_vnni,
            $unpack,
            $scale,
            $shift
        );
        offset_dots!(
            $block,
            "avx2,fma,f16c,avx512vnni,avx512vl",
            dot_vnni512,
            dot4_vnni512,
            ints_vnni512,
            $unpack,
            $scale,
            $shift
        );
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use offset_variants;

/// AVX2 dot products of a minimum format: `$unpack(wb)` gives the block's
/// 32 values as bytes, `$scales(wb)` its `(d, m)`. Every result equals the
/// one-row result for that row, bit for bit, and the VNNI variant equals
/// the AVX2 one (the same integer sums).
#[cfg(target_arch = "x86_64")]
macro_rules! min_dots {
    ($block:ty, $features:literal, $dot:ident, $dot4:ident, $ints:ident, $unpack:ident, $scales:ident) => {
        /// # Safety
        /// The CPU must support the features named.
        #[target_feature(enable = $features)]
        pub unsafe fn $dot(w: &[$block], x: &[BlockQ8_1]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            let mut mins = 0f32;
            for (wb, xb) in w.iter().zip(x) {
                let (d, m) = unsafe { $scales(wb) };
                mins += m * xb.s;
                let p = _mm256_cvtepi32_ps(unsafe { $ints($unpack(wb), load_q8(xb)) });
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), p, acc);
            }
            unsafe { hsum(acc) + mins }
        }

        /// # Safety
        /// The CPU must support the features named.
        #[target_feature(enable = $features)]
        pub unsafe fn $dot4(w: &[$block], x: [&[BlockQ8_1]; 4]) -> [f32; 4] {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut mins = [0f32; 4];
            for (b, wb) in w.iter().enumerate() {
                let (d, m) = unsafe { $scales(wb) };
                let qw = unsafe { $unpack(wb) };
                for r in 0..4 {
                    let xb = &x[r][b];
                    mins[r] += m * xb.s;
                    let p = _mm256_cvtepi32_ps(unsafe { $ints(qw, load_q8(xb)) });
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), p, acc[r]);
                }
            }
            std::array::from_fn(|r| unsafe { hsum(acc[r]) } + mins[r])
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use min_dots;

/// [`min_dots`] for every x86 variant (as [`offset_variants`]).
#[cfg(target_arch = "x86_64")]
macro_rules! min_variants {
    ($block:ty, $unpack:ident, $scales:ident) => {
        use crate::quant::avx2::{hsum, ints_avx2, ints_vnni, ints_vnni512, load_q8};
        use crate::quant::dots::min_dots;
        min_dots!(
            $block,
            "avx2,fma,f16c",
            dot,
            dot4,
            ints_avx2,
            $unpack,
            $scales
        );
        min_dots!(
            $block,
            "avx2,fma,f16c,avxvnni",
            dot_vnni,
            dot4_vnni,
            ints_vnni,
            $unpack,
            $scales
        );
        min_dots!(
            $block,
            "avx2,fma,f16c,avx512vnni,avx512vl",
            dot_vnni512,
            dot4_vnni512,
            ints_vnni512,
            $unpack,
            $scales
        );
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use min_variants;

/// The 32 values of a 5-bit block: `qs` as [`super::avx2::unpack_nibbles`]
/// reads them, plus bit `i` of `qh` as 16 for value `i`.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn unpack_5bit(qs: &[u8; 16], qh: u32) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // Byte i takes byte i / 8 of `qh`, then tests bit i % 8.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    let high = _mm256_and_si256(set, _mm256_set1_epi8(0x10));
    // SAFETY: the caller's CPU has AVX2.
    _mm256_or_si256(unsafe { super::avx2::unpack_nibbles(qs) }, high)
}
