//! Matrix products with GGML-quantized weights, generic over the weight
//! block format: the weights stay quantized, each activation row is
//! quantized to Q8_1 (GGML's rounding), and dot products run on integers,
//! four activation rows at a time so each weight block is unpacked once.
//! A row's result is the same whichever rows share the call.
//!
//! The weight formats ([`crate::q4_1`], [`crate::q8_0`]) build on this
//! module: the Q8_1 activation blocks, the instruction-set pick and the
//! SIMD helpers their dot products share are here.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::cpu::{cpu_features, CpuFeatures};

/// Values per block (weights and activations alike).
pub const BLOCK: usize = 32;

/// 32 activations: `x[i] ≈ d * qs[i]`, with `s = d * Σ qs` for the Q4_1 minimum term.
/// `d` and `s` hold f16-rounded values, as GGML stores them.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8_1 {
    /// Scale (an f16 value).
    pub d: f32,
    /// `d * Σ qs` (an f16 value).
    pub s: f32,
    /// `Σ qs`, exactly.
    pub sum: i32,
    /// Quantized values.
    pub qs: [i8; BLOCK],
}

impl Default for BlockQ8_1 {
    fn default() -> Self {
        Self {
            d: 0.0,
            s: 0.0,
            sum: 0,
            qs: [0; BLOCK],
        }
    }
}

/// Quantizes `x` (a multiple of 32 long) to Q8_1 blocks, as GGML does;
/// with AVX2 when the CPU has it (the same results, bit for bit).
pub fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Reference {
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
        block.sum = sum;
    }
}

/// Value `i` (0..32) of a GGML 4-bit block: `q[j]` is the low nibble of
/// `qs[j]`, `q[j + 16]` its high nibble.
pub(crate) fn nibble(qs: &[u8; 16], i: usize) -> u8 {
    if i < 16 {
        qs[i] & 0x0F
    } else {
        qs[i - 16] >> 4
    }
}

/// One weight row's dot product with one activation row.
pub type DotFn<B> = fn(&[B], &[<B as QuantBlock>::Act]) -> f32;
/// One weight row's dot products with four activation rows; each equal,
/// bit for bit, to [`DotFn`]'s.
pub type Dot4Fn<B> = fn(&[B], [&[<B as QuantBlock>::Act]; 4]) -> [f32; 4];
/// The pair, as picked for this CPU.
pub type Kernels<B> = (DotFn<B>, Dot4Fn<B>);

/// The dot-product variants, from plainest to fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// The plain reference code.
    Reference,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// The same plus AVX-VNNI.
    Vnni,
    /// AVX2 + FMA + F16C plus AVX-512 VNNI on 256-bit registers (AVX-512 VL):
    /// the same instruction as AVX-VNNI, on CPUs that have only the AVX-512 form.
    Vnni512,
}

/// The variant in use: the fastest this CPU runs among those the
/// [`crate::cpu`] settings allow, picked once.
pub(crate) fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| detect(cpu_features()))
}

/// The fastest variant this CPU runs among those `allowed`.
pub(crate) fn detect(allowed: CpuFeatures) -> Isa {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        if allowed.vnni && is_x86_feature_detected!("avxvnni") {
            return Isa::Vnni;
        }
        if allowed.vnni
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
        {
            return Isa::Vnni512;
        }
        return Isa::Avx2;
    }
    let _ = allowed;
    Isa::Reference
}

/// Every variant this CPU runs, plainest first (for tests comparing them).
#[cfg(test)]
pub(crate) fn runnable() -> Vec<Isa> {
    let no_vnni = CpuFeatures {
        vnni: false,
        ..CpuFeatures::default()
    };
    let mut all = vec![Isa::Reference];
    if detect(no_vnni) == Isa::Avx2 {
        all.push(Isa::Avx2);
    }
    let all_allowed = detect(CpuFeatures::default());
    if matches!(all_allowed, Isa::Vnni | Isa::Vnni512) {
        all.push(all_allowed);
    }
    all
}

/// A block format's kernels for `isa`, an expression of type [`Isa`] that
/// this CPU runs (use it inside an `unsafe fn` whose caller promises so):
/// the format's module `avx2` must have `dot`, `dot4`, `dot_vnni`,
/// `dot4_vnni`, `dot_vnni512` and `dot4_vnni512`; the reference functions are `dot_reference` and
/// `dot4_reference`.
macro_rules! pick_kernels {
    ($block:ty, $isa:expr) => {{
        type Act = <$block as $crate::quant::QuantBlock>::Act;
        #[cfg(target_arch = "x86_64")]
        {
            fn dot_avx2(w: &[$block], x: &[Act]) -> f32 {
                // SAFETY: only picked for an `isa` this CPU runs, so it has
                // AVX2, FMA and F16C.
                unsafe { avx2::dot(w, x) }
            }
            fn dot4_avx2(w: &[$block], x: [&[Act]; 4]) -> [f32; 4] {
                // SAFETY: as for `dot_avx2`.
                unsafe { avx2::dot4(w, x) }
            }
            fn dot_vnni(w: &[$block], x: &[Act]) -> f32 {
                // SAFETY: only picked for `Isa::Vnni`, so it has AVX-VNNI too.
                unsafe { avx2::dot_vnni(w, x) }
            }
            fn dot4_vnni(w: &[$block], x: [&[Act]; 4]) -> [f32; 4] {
                // SAFETY: as for `dot_vnni`.
                unsafe { avx2::dot4_vnni(w, x) }
            }
            fn dot_vnni512(w: &[$block], x: &[Act]) -> f32 {
                // SAFETY: only picked for `Isa::Vnni512`, so it has AVX-512
                // VNNI and VL too.
                unsafe { avx2::dot_vnni512(w, x) }
            }
            fn dot4_vnni512(w: &[$block], x: [&[Act]; 4]) -> [f32; 4] {
                // SAFETY: as for `dot_vnni512`.
                unsafe { avx2::dot4_vnni512(w, x) }
            }
            match $isa {
                $crate::quant::Isa::Vnni => return (dot_vnni, dot4_vnni),
                $crate::quant::Isa::Vnni512 => return (dot_vnni512, dot4_vnni512),
                $crate::quant::Isa::Avx2 => return (dot_avx2, dot4_avx2),
                $crate::quant::Isa::Reference => {}
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = $isa;
        (dot_reference, dot4_reference)
    }};
}
pub(crate) use pick_kernels;

/// SIMD pieces the weight formats' dot products share, and the AVX2 Q8_1
/// quantizer.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ8_1, BLOCK};

    /// Sums the eight lanes of `acc` (the same order everywhere, so results
    /// do not depend on which kernel variant ran).
    ///
    /// # Safety
    /// The CPU must support AVX.
    #[inline(always)]
    pub(crate) unsafe fn hsum(acc: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_extractf128_ps::<1>(acc), _mm256_castps256_ps128(acc));
        let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)))
    }

    /// The 32 values of a 4-bit block (`q[j]` in the low nibble of
    /// `qs[j]`, `q[j + 16]` in its high nibble, as in GGML's Q4_0 and
    /// Q4_1) as bytes 0..=15.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline(always)]
    pub(crate) unsafe fn unpack_nibbles(qs: &[u8; 16]) -> __m256i {
        // SAFETY: `qs` is 16 bytes; unaligned load.
        let packed = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
        let nibbles = _mm256_insertf128_si256::<1>(
            _mm256_castsi128_si256(packed),
            _mm_srli_epi16::<4>(packed),
        );
        _mm256_and_si256(nibbles, _mm256_set1_epi8(0x0F))
    }

    /// The 32 activations of a block.
    ///
    /// # Safety
    /// The CPU must support AVX.
    #[inline(always)]
    pub(crate) unsafe fn load_q8(xb: &super::BlockQ8_1) -> __m256i {
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

    /// The same instruction in its AVX-512 (VL) encoding.
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    #[inline]
    pub(crate) unsafe fn ints_vnni512(qw: __m256i, qx: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), qw, qx)
    }

    /// Q8_1 quantization of 32-value blocks: the same operations as the
    /// scalar version (multiply, round half to even), eight lanes at a time.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize(x: &[f32], out: &mut [BlockQ8_1]) {
        let sign = _mm256_set1_ps(-0.0);
        for (chunk, block) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
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
            block.sum = sum;
        }
    }
}

/// A block of quantized activations, matching a weight format's blocks
/// value for value.
pub trait ActBlock: Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// Values per block.
    const VALUES: usize;
    /// Quantizes `x` (a multiple of [`Self::VALUES`] long) into `out`.
    fn quantize(x: &[f32], out: &mut [Self]);
}

impl ActBlock for BlockQ8_1 {
    const VALUES: usize = BLOCK;

    fn quantize(x: &[f32], out: &mut [Self]) {
        quantize_q8_1(x, out);
    }
}

/// A GGML block of quantized weights (32 values, or 256 for the K-quants).
pub trait QuantBlock: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// The activation blocks the dot products take.
    type Act: ActBlock;
    /// The custom op's name.
    const NAME: &'static str;
    /// Bytes per block in GGML files.
    const BYTES: usize;
    /// Reads one block from its GGML bytes.
    fn parse(bytes: &[u8]) -> Self;
    /// Writes the block's weights as f32 into `out` (`Act::VALUES` long).
    fn dequantize(&self, out: &mut [f32]);
    /// The fastest dot products this CPU supports.
    fn kernels() -> Kernels<Self>;
}

/// A quantized weight matrix of `rows` outputs by `cols` inputs, in CPU memory.
#[derive(Debug, Clone)]
pub struct QuantMatrix<B> {
    pub(crate) blocks: Vec<B>,
    rows: usize,
    cols: usize,
}

/// Output columns per parallel task, at most: enough work to amortize
/// scheduling for a single activation row.
const MAX_COLS_PER_TASK: usize = 64;

/// Columns per task: at most [`MAX_COLS_PER_TASK`], and small enough that
/// every thread gets several tasks, so a narrow projection (192 outputs on
/// two threads, say) does not leave a thread idle at the end.
fn cols_per_task(rows: usize) -> usize {
    let tasks = 8 * rayon::current_num_threads().max(1);
    rows.div_ceil(tasks).clamp(4, MAX_COLS_PER_TASK)
}

impl<B: QuantBlock> QuantMatrix<B> {
    /// Reads GGML's bytes for a `rows × cols` matrix (row-major blocks).
    pub fn from_ggml_bytes(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let values = B::Act::VALUES;
        if !cols.is_multiple_of(values) {
            candle_core::bail!("{}: {cols} columns is not a multiple of {values}", B::NAME);
        }
        let expected = rows * cols / values * B::BYTES;
        if bytes.len() != expected {
            candle_core::bail!(
                "{}: {} bytes for a {rows}x{cols} matrix, expected {expected}",
                B::NAME,
                bytes.len()
            );
        }
        let blocks = bytes.chunks_exact(B::BYTES).map(B::parse).collect();
        Ok(Self { blocks, rows, cols })
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The weights as f32, `rows × cols` row-major (for references and tests).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (b, chunk) in self.blocks.iter().zip(out.chunks_exact_mut(B::Act::VALUES)) {
            b.dequantize(chunk);
        }
        out
    }

    /// `x · Wᵀ` for f32 rows `x` (`[batch…, cols]` → `[batch…, rows]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    pub(crate) fn matmul(&self, x: &[f32], (dot, dot4): Kernels<B>) -> Vec<f32> {
        let kb = self.cols / B::Act::VALUES;
        let m = x.len() / self.cols;
        if m == 0 {
            return Vec::new();
        }
        let mut xq = vec![B::Act::default(); m * kb];
        xq.par_chunks_mut(kb)
            .zip(x.par_chunks_exact(self.cols))
            .with_min_len(8)
            .for_each(|(q, row)| B::Act::quantize(row, q));
        let xrow = |r: usize| &xq[r * kb..(r + 1) * kb];
        // Column-major first, so each task owns a contiguous slice and reuses
        // one weight row across every input row, four rows at a time.
        let mut by_col = vec![0f32; self.rows * m];
        let per_task = cols_per_task(self.rows);
        by_col
            .par_chunks_mut(per_task * m)
            .enumerate()
            .for_each(|(task, out)| {
                for (j, col) in out.chunks_exact_mut(m).enumerate() {
                    let c = task * per_task + j;
                    let w = &self.blocks[c * kb..(c + 1) * kb];
                    let mut r = 0;
                    while r + 4 <= m {
                        let four = dot4(w, [xrow(r), xrow(r + 1), xrow(r + 2), xrow(r + 3)]);
                        col[r..r + 4].copy_from_slice(&four);
                        r += 4;
                    }
                    for (i, o) in col.iter_mut().enumerate().skip(r) {
                        *o = dot(w, xrow(i));
                    }
                }
            });
        if m == 1 {
            return by_col;
        }
        let mut out = vec![0f32; m * self.rows];
        for (c, col) in by_col.chunks_exact(m).enumerate() {
            for (r, v) in col.iter().enumerate() {
                out[r * self.rows + c] = *v;
            }
        }
        out
    }
}

/// A quantized weight matrix of a format picked at run time.
pub trait QuantLinear: Send + Sync + std::fmt::Debug {
    /// `x · Wᵀ` for f32 rows `x` (`[batch…, cols]` → `[batch…, rows]`).
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// `(rows, cols)`.
    fn dims(&self) -> (usize, usize);
}

impl<B: QuantBlock> QuantLinear for QuantMatrix<B> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        QuantMatrix::forward(self, x)
    }

    fn dims(&self) -> (usize, usize) {
        QuantMatrix::dims(self)
    }
}

impl<B: QuantBlock> CustomOp1 for QuantMatrix<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{}: expected f32 input, got {:?}", B::NAME, storage.dtype());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: input must be contiguous", B::NAME);
        };
        let mut dims = layout.shape().dims().to_vec();
        if dims.last() != Some(&self.cols) {
            candle_core::bail!(
                "{}: input {dims:?} does not end in {} columns",
                B::NAME,
                self.cols
            );
        }
        let out = self.matmul(&data[start..end], B::kernels());
        if let Some(last) = dims.last_mut() {
            *last = self.rows;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// The tiled products' passes over `m` activation rows: `$pass!(N, r0)`
/// for rows `r0..r0 + N`, eight at a time, then four, two, one (`N` a
/// literal, so each pass keeps its sums in registers).
#[cfg(target_arch = "x86_64")]
macro_rules! row_passes {
    ($m:expr, $pass:ident) => {{
        let m = $m;
        let mut r0 = 0;
        while r0 + 8 <= m {
            $pass!(8, r0);
            r0 += 8;
        }
        if r0 + 4 <= m {
            $pass!(4, r0);
            r0 += 4;
        }
        if r0 + 2 <= m {
            $pass!(2, r0);
            r0 += 2;
        }
        if r0 < m {
            $pass!(1, r0);
        }
    }};
}

pub(crate) mod dots;
mod read;
pub use read::{dequantize_ggml, dequantizes, from_ggml};
#[cfg(target_arch = "x86_64")]
pub mod tiled;
#[cfg(target_arch = "x86_64")]
pub mod tiled_k;

#[cfg(test)]
pub(crate) mod check;
#[cfg(test)]
mod tests;
