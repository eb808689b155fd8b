//! Matrix products with GGML-quantized weights, generic over the weight
//! block format: the weights stay quantized, each activation row is
//! quantized to Q8_1 (GGML's rounding), and dot products run on integers,
//! four activation rows at a time so each weight block is unpacked once.
//! A row's result is the same whichever rows share the call.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::q4_1::{quantize_q8_1, BlockQ8_1, BLOCK};

/// One weight row's dot product with one activation row.
pub type DotFn<B> = fn(&[B], &[BlockQ8_1]) -> f32;
/// One weight row's dot products with four activation rows; each equal,
/// bit for bit, to [`DotFn`]'s.
pub type Dot4Fn<B> = fn(&[B], [&[BlockQ8_1]; 4]) -> [f32; 4];
/// The pair, as picked for this CPU.
pub type Kernels<B> = (DotFn<B>, Dot4Fn<B>);

/// The dot-product variants this CPU can run, detected once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// The plain reference code.
    Reference,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// The same plus AVX-VNNI (unless `KINDLING_NO_VNNI` is set, for comparisons).
    Vnni,
}

pub(crate) fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            if is_x86_feature_detected!("avxvnni") && std::env::var_os("KINDLING_NO_VNNI").is_none()
            {
                return Isa::Vnni;
            }
            return Isa::Avx2;
        }
        Isa::Reference
    })
}

/// Picks a block format's kernels for [`isa`]: its module `avx2` must have
/// `dot`, `dot4`, `dot_vnni` and `dot4_vnni`; the reference functions are
/// `dot_reference` and `dot4_reference`.
macro_rules! pick_kernels {
    ($block:ty) => {{
        #[cfg(target_arch = "x86_64")]
        {
            fn dot_avx2(w: &[$block], x: &[BlockQ8_1]) -> f32 {
                // SAFETY: only picked when `isa` found AVX2, FMA and F16C.
                unsafe { avx2::dot(w, x) }
            }
            fn dot4_avx2(w: &[$block], x: [&[BlockQ8_1]; 4]) -> [f32; 4] {
                // SAFETY: as for `dot_avx2`.
                unsafe { avx2::dot4(w, x) }
            }
            fn dot_vnni(w: &[$block], x: &[BlockQ8_1]) -> f32 {
                // SAFETY: only picked when `isa` found AVX-VNNI too.
                unsafe { avx2::dot_vnni(w, x) }
            }
            fn dot4_vnni(w: &[$block], x: [&[BlockQ8_1]; 4]) -> [f32; 4] {
                // SAFETY: as for `dot_vnni`.
                unsafe { avx2::dot4_vnni(w, x) }
            }
            match $crate::quant::isa() {
                $crate::quant::Isa::Vnni => return (dot_vnni, dot4_vnni),
                $crate::quant::Isa::Avx2 => return (dot_avx2, dot4_avx2),
                $crate::quant::Isa::Reference => {}
            }
        }
        (dot_reference, dot4_reference)
    }};
}
pub(crate) use pick_kernels;

/// Sums the eight lanes of `acc` (the same order everywhere, so results
/// do not depend on which kernel variant ran).
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn hsum(acc: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let half = _mm_add_ps(_mm256_extractf128_ps::<1>(acc), _mm256_castps256_ps128(acc));
    let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)))
}

/// A GGML block of 32 quantized weights.
pub trait QuantBlock: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// The custom op's name.
    const NAME: &'static str;
    /// Bytes per block in GGML files.
    const BYTES: usize;
    /// Reads one block from its GGML bytes.
    fn parse(bytes: &[u8]) -> Self;
    /// The block's weights as f32.
    fn dequantize(&self) -> [f32; BLOCK];
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
        if !cols.is_multiple_of(BLOCK) {
            candle_core::bail!("{}: {cols} columns is not a multiple of {BLOCK}", B::NAME);
        }
        let expected = rows * cols / BLOCK * B::BYTES;
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
        self.blocks.iter().flat_map(B::dequantize).collect()
    }

    /// `x · Wᵀ` for f32 rows `x` (`[batch…, cols]` → `[batch…, rows]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    pub(crate) fn matmul(&self, x: &[f32], (dot, dot4): Kernels<B>) -> Vec<f32> {
        let kb = self.cols / BLOCK;
        let m = x.len() / self.cols;
        if m == 0 {
            return Vec::new();
        }
        let mut xq = vec![BlockQ8_1::default(); m * kb];
        xq.par_chunks_mut(kb)
            .zip(x.par_chunks_exact(self.cols))
            .with_min_len(8)
            .for_each(|(q, row)| quantize_q8_1(row, q));
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
