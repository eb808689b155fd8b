//! Matrix products with GGML Q4_1 weights: the weights stay 4-bit, each
//! activation row is quantized to Q8_1, and dot products run on integers.
//!
//! Blocks, activation quantization and the dot product follow GGML's
//! definitions (round half to even, `s = d * Σq` rounded once to f16), so
//! results track llama.cpp's on the same file. An AVX2/FMA dot product is
//! picked at run time; [`dot_reference`] is the plain version beside it.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

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

/// Quantizes `x` (a multiple of 32 long) to Q8_1 blocks, as GGML does.
pub fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
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
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ4_1, BlockQ8_1};

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for (wb, xb) in w.iter().zip(x) {
            mins += wb.m.to_f32() * xb.s;
            let scale = _mm256_set1_ps(wb.d.to_f32() * xb.d);
            // SAFETY: `qs` are 16 and 32 bytes; unaligned loads.
            let packed = unsafe { _mm_loadu_si128(wb.qs.as_ptr().cast()) };
            let nibbles = _mm256_insertf128_si256::<1>(
                _mm256_castsi128_si256(packed),
                _mm_srli_epi16::<4>(packed),
            );
            let qw = _mm256_and_si256(nibbles, low);
            let qx = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
            // u8 × i8 pairs → i16 (at most 2·15·127, no saturation) → i32 → f32.
            let products = _mm256_madd_epi16(_mm256_maddubs_epi16(qw, qx), ones);
            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(products), acc);
        }
        let half = _mm_add_ps(_mm256_extractf128_ps::<1>(acc), _mm256_castps256_ps128(acc));
        let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
        let total = _mm_add_ss(quarter, _mm_movehdup_ps(quarter));
        _mm_cvtss_f32(total) + mins
    }
}

type DotFn = fn(&[BlockQ4_1], &[BlockQ8_1]) -> f32;

#[cfg(target_arch = "x86_64")]
fn dot_avx2(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
    // SAFETY: only selected by `dot_fn` after checking for AVX2 and FMA.
    unsafe { avx2::dot(w, x) }
}

/// The fastest dot product this CPU supports.
fn dot_fn() -> DotFn {
    static DOT: std::sync::OnceLock<DotFn> = std::sync::OnceLock::new();
    *DOT.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return dot_avx2;
        }
        dot_reference
    })
}

/// Whether the SIMD dot product is in use (for logs and benchmarks).
pub fn simd_available() -> bool {
    dot_fn() as usize != dot_reference as DotFn as usize
}

/// A Q4_1 weight matrix of `rows` outputs by `cols` inputs, in CPU memory.
#[derive(Debug, Clone)]
pub struct Q4_1Matrix {
    blocks: Vec<BlockQ4_1>,
    rows: usize,
    cols: usize,
}

/// Output columns per parallel task: enough work to amortize scheduling,
/// small enough to spread a 576-wide projection over a few threads.
const COLS_PER_TASK: usize = 64;

impl Q4_1Matrix {
    /// Reads GGML's Q4_1 bytes for a `rows × cols` matrix (row-major blocks).
    pub fn from_ggml_bytes(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        if cols % BLOCK != 0 {
            candle_core::bail!("q4_1: {cols} columns is not a multiple of {BLOCK}");
        }
        let expected = rows * cols / BLOCK * BLOCK_BYTES;
        if bytes.len() != expected {
            candle_core::bail!(
                "q4_1: {} bytes for a {rows}x{cols} matrix, expected {expected}",
                bytes.len()
            );
        }
        let half_at = |b: &[u8], i: usize| f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]]));
        let blocks = bytes
            .chunks_exact(BLOCK_BYTES)
            .map(|b| {
                let mut qs = [0u8; 16];
                qs.copy_from_slice(&b[4..]);
                BlockQ4_1 {
                    d: half_at(b, 0),
                    m: half_at(b, 2),
                    qs,
                }
            })
            .collect();
        Ok(Self { blocks, rows, cols })
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The weights as f32, `rows × cols` row-major (for references and tests).
    pub fn dequantize(&self) -> Vec<f32> {
        self.blocks
            .iter()
            .flat_map(|b| {
                let (d, m) = (b.d.to_f32(), b.m.to_f32());
                let lo = b.qs.map(|q| d * f32::from(q & 0x0F) + m);
                let hi = b.qs.map(|q| d * f32::from(q >> 4) + m);
                lo.into_iter().chain(hi)
            })
            .collect()
    }

    /// `x · Wᵀ` for f32 rows `x` (`[batch…, cols]` → `[batch…, rows]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    fn matmul(&self, x: &[f32], dot: DotFn) -> Vec<f32> {
        let kb = self.cols / BLOCK;
        let m = x.len() / self.cols;
        if m == 0 {
            return Vec::new();
        }
        let mut xq = vec![BlockQ8_1::default(); m * kb];
        for (row, q) in x.chunks_exact(self.cols).zip(xq.chunks_exact_mut(kb)) {
            quantize_q8_1(row, q);
        }
        // Column-major first, so each task owns a contiguous slice and reuses
        // one weight row across every input row.
        let mut by_col = vec![0f32; self.rows * m];
        by_col
            .par_chunks_mut(COLS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, out)| {
                for (j, col) in out.chunks_exact_mut(m).enumerate() {
                    let c = task * COLS_PER_TASK + j;
                    let w = &self.blocks[c * kb..(c + 1) * kb];
                    for (r, o) in col.iter_mut().enumerate() {
                        *o = dot(w, &xq[r * kb..(r + 1) * kb]);
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

impl CustomOp1 for Q4_1Matrix {
    fn name(&self) -> &'static str {
        "q4_1-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("q4_1-matmul: expected f32 input, got {:?}", storage.dtype());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("q4_1-matmul: input must be contiguous");
        };
        let mut dims = layout.shape().dims().to_vec();
        if dims.last() != Some(&self.cols) {
            candle_core::bail!(
                "q4_1-matmul: input {dims:?} does not end in {} columns",
                self.cols
            );
        }
        let out = self.matmul(&data[start..end], dot_fn());
        if let Some(last) = dims.last_mut() {
            *last = self.rows;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests;
