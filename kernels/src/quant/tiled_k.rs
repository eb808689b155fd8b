//! The tiled product for Q4_K on CPUs with AVX-512 VNNI, the layout
//! [`super::tiled`] gives the 32-value formats, for GGML's 256-value
//! super-blocks. Eight weight rows are interleaved so one register holds
//! four values of each; per 32-value sub-block, eight `vpdpbusd` against
//! broadcast activation bytes give the eight rows' exact `Σ q·x`, which are
//! multiplied by the eight rows' sub-block scales and summed as integers
//! over the super-block — the integers llama.cpp and the row kernels sum —
//! before one float step per super-block; the minimums' term comes from
//! the activations' 16-value sums, also as integers. Up to eight activation
//! rows share each unpacked sub-block. Values stay four bits.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kquant::{quantize_q8_k, BlockQ8K, QK_K};
use crate::q4_k::BlockQ4K;

/// Weight rows per tile.
const ROWS: usize = 8;
/// Bytes of one tile super-block's values (8 rows × 128).
const TILE_BYTES: usize = ROWS * QK_K / 2;

/// A Q4_K weight matrix in the tiled layout.
#[derive(Debug, Clone)]
pub struct TiledQ4K {
    rows: usize,
    cols: usize,
    /// Per tile super-block, per 32-byte chunk `c` (sub-blocks `2c` in the
    /// low nibbles, `2c + 1` in the high) and 4-byte group `g`: the 8 rows'
    /// 4 bytes, rows in order.
    q: Vec<u8>,
    /// Per tile super-block and sub-block: the 8 rows' scales.
    scales: Vec<[[i32; ROWS]; 8]>,
    /// Per tile super-block and sub-block: the 8 rows' minimums.
    mins: Vec<[[i32; ROWS]; 8]>,
    /// Per tile super-block: the 8 rows' super-scales and super-minimums.
    d: Vec<[f32; ROWS]>,
    dmin: Vec<[f32; ROWS]>,
}

impl TiledQ4K {
    /// Interleaves `blocks` (`rows × cols/256`, row-major); rows past the
    /// end of the last tile are zeros.
    pub(crate) fn new(blocks: &[BlockQ4K], rows: usize, cols: usize) -> Self {
        let kb = cols / QK_K;
        let n = rows.div_ceil(ROWS) * kb;
        let mut w = Self {
            rows,
            cols,
            q: vec![0; n * TILE_BYTES],
            scales: vec![[[0; ROWS]; 8]; n],
            mins: vec![[[0; ROWS]; 8]; n],
            d: vec![[0.0; ROWS]; n],
            dmin: vec![[0.0; ROWS]; n],
        };
        for r in 0..rows {
            let (t, lane) = (r / ROWS, r % ROWS);
            for b in 0..kb {
                let block = &blocks[r * kb + b];
                let tb = t * kb + b;
                w.d[tb][lane] = block.h.d;
                w.dmin[tb][lane] = block.h.dmin;
                for j in 0..8 {
                    w.scales[tb][j][lane] = i32::from(block.h.scales[j]);
                    w.mins[tb][j][lane] = i32::from(block.h.mins[j]);
                }
                for (cg, four) in block.qs.chunks_exact(4).enumerate() {
                    let at = tb * TILE_BYTES + cg * 4 * ROWS + 4 * lane;
                    w.q[at..at + 4].copy_from_slice(four);
                }
            }
        }
        w
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// `x · Wᵀ` for f32 rows `x` (`[batch…, cols]` → `[batch…, rows]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    pub(crate) fn matmul(&self, x: &[f32]) -> Vec<f32> {
        let kb = self.cols / QK_K;
        let m = x.len() / self.cols;
        if m == 0 {
            return Vec::new();
        }
        let mut xq = vec![BlockQ8K::default(); m * kb];
        xq.par_chunks_mut(kb)
            .zip(x.par_chunks_exact(self.cols))
            .for_each(|(q, row)| quantize_q8_k(row, q));
        let tiles = self.rows.div_ceil(ROWS);
        let mut by_tile = vec![0f32; tiles * m * ROWS];
        let per_task = (tiles / (8 * rayon::current_num_threads().max(1))).clamp(1, 8);
        by_tile
            .par_chunks_mut(per_task * m * ROWS)
            .enumerate()
            .for_each(|(task, out)| {
                for (k, tile_out) in out.chunks_exact_mut(m * ROWS).enumerate() {
                    // SAFETY: this layout is built only where the CPU has
                    // AVX2, FMA, AVX-512 (F, VL, BW) and VNNI.
                    unsafe { avx512::tile(self, task * per_task + k, &xq, kb, tile_out) };
                }
            });
        let mut out = vec![0f32; m * self.rows];
        for (t, tile) in by_tile.chunks_exact(m * ROWS).enumerate() {
            let width = ROWS.min(self.rows - t * ROWS);
            for (r, eight) in tile.chunks_exact(ROWS).enumerate() {
                let at = r * self.rows + t * ROWS;
                out[at..at + width].copy_from_slice(&eight[..width]);
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{BlockQ8K, TiledQ4K, ROWS, TILE_BYTES};

    /// Σ q·x over sub-block `j` for the 8 rows (`v`: its 8 value vectors).
    #[inline(always)]
    unsafe fn ints(v: &[__m256i; 8], xb: &BlockQ8K, j: usize) -> __m256i {
        let (mut a, mut b) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for g in (0..8).step_by(2) {
            // SAFETY: 8 of the 256 activation bytes.
            let (x0, x1) = unsafe {
                let p = xb.qs.as_ptr().add(32 * j + 4 * g);
                (
                    std::ptr::read_unaligned(p.cast::<i32>()),
                    std::ptr::read_unaligned(p.add(4).cast::<i32>()),
                )
            };
            a = _mm256_dpbusd_epi32(a, v[g], _mm256_set1_epi32(x0));
            b = _mm256_dpbusd_epi32(b, v[g + 1], _mm256_set1_epi32(x1));
        }
        _mm256_add_epi32(a, b)
    }

    /// Activation rows `r0..r0 + N` against tile `t`.
    #[inline(always)]
    unsafe fn rows<const N: usize>(
        w: &TiledQ4K,
        t: usize,
        xq: &[BlockQ8K],
        kb: usize,
        r0: usize,
        out: &mut [f32],
    ) {
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); N];
        for b in 0..kb {
            let tb = t * kb + b;
            let mut sumi = [_mm256_setzero_si256(); N];
            for c in 0..4 {
                // SAFETY: 256 bytes of the tile super-block's 1024.
                let base = unsafe { w.q.as_ptr().add(tb * TILE_BYTES + c * 32 * ROWS) };
                for half in 0..2 {
                    let j = 2 * c + half;
                    let mut v = [_mm256_setzero_si256(); 8];
                    for (g, vg) in v.iter_mut().enumerate() {
                        // SAFETY: group `g` of the chunk; unaligned load.
                        let p = unsafe { _mm256_loadu_si256(base.add(32 * g).cast()) };
                        *vg = if half == 0 {
                            _mm256_and_si256(p, m4)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(p), m4)
                        };
                    }
                    // SAFETY: an entry per tile super-block and sub-block.
                    let sc = unsafe { _mm256_loadu_si256(w.scales[tb][j].as_ptr().cast()) };
                    // Unrolled by hand so the sums stay in registers (a
                    // closure would not inherit the target features).
                    macro_rules! each_row {
                        ($($r:literal)*) => {$(
                            if $r < N {
                                let xb = &xq[(r0 + $r) * kb + b];
                                let p = unsafe { ints(&v, xb, j) };
                                sumi[$r] = _mm256_add_epi32(sumi[$r], _mm256_mullo_epi32(p, sc));
                            }
                        )*};
                    }
                    each_row!(0 1 2 3 4 5 6 7);
                }
            }
            // SAFETY: an entry per tile super-block.
            let (d, dmin) = unsafe {
                (
                    _mm256_loadu_ps(w.d[tb].as_ptr()),
                    _mm256_loadu_ps(w.dmin[tb].as_ptr()),
                )
            };
            for (r, (a, s)) in acc.iter_mut().zip(&sumi).enumerate() {
                let xb = &xq[(r0 + r) * kb + b];
                let mut msum = _mm256_setzero_si256();
                for j in 0..8 {
                    let bs = i32::from(xb.bsums[2 * j]) + i32::from(xb.bsums[2 * j + 1]);
                    // SAFETY: an entry per tile super-block and sub-block.
                    let mins = unsafe { _mm256_loadu_si256(w.mins[tb][j].as_ptr().cast()) };
                    msum = _mm256_add_epi32(msum, _mm256_mullo_epi32(mins, _mm256_set1_epi32(bs)));
                }
                let xd = _mm256_set1_ps(xb.d);
                *a = _mm256_fmadd_ps(_mm256_mul_ps(d, xd), _mm256_cvtepi32_ps(*s), *a);
                *a = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, xd), _mm256_cvtepi32_ps(msum), *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: `out` holds 8 floats per activation row.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add((r0 + r) * ROWS), *a) };
        }
    }

    /// Tile `t` against every activation row, eight rows per pass, then
    /// four, two, one: `out[r][j]` = row `r` · weight row `8t + j`.
    ///
    /// # Safety
    /// The CPU must support the features named.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile(w: &TiledQ4K, t: usize, xq: &[BlockQ8K], kb: usize, out: &mut [f32]) {
        let m = xq.len() / kb;
        let mut r0 = 0;
        while r0 + 8 <= m {
            unsafe { rows::<8>(w, t, xq, kb, r0, out) };
            r0 += 8;
        }
        if r0 + 4 <= m {
            unsafe { rows::<4>(w, t, xq, kb, r0, out) };
            r0 += 4;
        }
        if r0 + 2 <= m {
            unsafe { rows::<2>(w, t, xq, kb, r0, out) };
            r0 += 2;
        }
        if r0 < m {
            unsafe { rows::<1>(w, t, xq, kb, r0, out) };
        }
    }
}

impl CustomOp1 for TiledQ4K {
    fn name(&self) -> &'static str {
        "q4_k-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("q4_k-matmul: expected f32 input, got {:?}", storage.dtype());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("q4_k-matmul: input must be contiguous");
        };
        let mut dims = layout.shape().dims().to_vec();
        if dims.last() != Some(&self.cols) {
            candle_core::bail!(
                "q4_k-matmul: input {dims:?} does not end in {} columns",
                self.cols
            );
        }
        let out = self.matmul(&data[start..end]);
        if let Some(last) = dims.last_mut() {
            *last = self.rows;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

impl super::QuantLinear for TiledQ4K {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        TiledQ4K::forward(self, x)
    }

    fn dims(&self) -> (usize, usize) {
        TiledQ4K::dims(self)
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::quant::check::{put_f16, random_bytes, random_rows};
    use crate::quant::QuantBlock;

    /// The tiled product equals the row kernels' up to the order of float
    /// additions, for every pass width and a part-empty last tile.
    #[test]
    fn tiled_q4_k_matches_the_row_kernels() {
        if !super::super::tiled::available(super::super::isa()) {
            eprintln!("q4_k: this CPU does not run the tiled product");
            return;
        }
        let mut rng = StdRng::seed_from_u64(41);
        for (rows, cols) in [(19, 512), (64, 768)] {
            let w = random_bytes::<BlockQ4K>(rows, cols, &mut rng, |b, rng| {
                put_f16(b, 0, rng, 0.001..0.01);
                put_f16(b, 2, rng, 0.001..0.01);
            });
            let tiled = TiledQ4K::new(&w.blocks, rows, cols);
            for m in [1, 2, 3, 4, 7, 8, 9, 17] {
                let x = random_rows(m, cols, &mut rng);
                let want = w.matmul(&x, BlockQ4K::kernels());
                let got = tiled.matmul(&x);
                assert_eq!(got.len(), want.len());
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "{rows}x{cols} m={m} [{i}]: tiled {a}, rows {b}"
                    );
                }
            }
        }
    }
}
