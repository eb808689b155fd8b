//! The tiled products for Q4_K and Q6_K on CPUs with AVX-512 VNNI, the layout
//! [`super::tiled`] gives the 32-value formats, for GGML's 256-value
//! super-blocks. Eight weight rows are interleaved so one register holds
//! four values of each; per 32-value sub-block, eight `vpdpbusd` against
//! broadcast activation bytes give the eight rows' exact `Σ q·x`, which are
//! multiplied by the eight rows' sub-block scales and summed as integers
//! over the super-block — the integers llama.cpp and the row kernels sum —
//! before one float step per super-block; the minimums' term comes from
//! the activations' 16-value sums, also as integers. Up to eight activation
//! rows share each unpacked sub-block. Values keep their bits: Q4_K four,
//! Q6_K four plus a pair packed with three other sub-blocks' pairs (its
//! `−32` offset is `32·Σ scale·Σx`, from the same sums).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::tiled::product;
use crate::kquant::{BlockQ8K, QK_K};
use crate::q4_k::BlockQ4K;
use crate::q6_k::BlockQ6K;

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
    scales: Vec<[[u8; ROWS]; 8]>,
    /// Per tile super-block and sub-block: the 8 rows' minimums.
    mins: Vec<[[u8; ROWS]; 8]>,
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
                    w.scales[tb][j][lane] = block.h.scales[j];
                    w.mins[tb][j][lane] = block.h.mins[j];
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
        // SAFETY: this layout is built only where the CPU has AVX2, FMA,
        // AVX-512 (F, VL, BW) and VNNI.
        product::<BlockQ8K>(self.rows, self.cols, x, |t, xq, kb, out| unsafe {
            avx512::tile_q4_k(self, t, xq, kb, out)
        })
    }
}

/// Bytes of one Q6_K tile super-block's values (8 rows × 192).
const Q6_TILE_BYTES: usize = ROWS * 192;

/// A Q6_K weight matrix in the tiled layout.
#[derive(Debug, Clone)]
pub struct TiledQ6K {
    rows: usize,
    cols: usize,
    /// Per tile super-block, per quad `u` of sub-blocks (`4u..4u + 4`) and
    /// 4-value group `g`, three vectors of the 8 rows' 4 bytes: the low
    /// nibbles of sub-blocks `4u` (low) and `4u + 1` (high), those of
    /// `4u + 2` and `4u + 3`, and the four's high bit pairs (bits 0–1, 2–3,
    /// 4–5, 6–7).
    q: Vec<u8>,
    /// Per tile super-block and sub-block: the 8 rows' scales.
    scales: Vec<[[i8; ROWS]; 16]>,
    /// Per tile super-block: the 8 rows' super-scales.
    d: Vec<[f32; ROWS]>,
}

impl TiledQ6K {
    /// Interleaves `blocks` (`rows × cols/256`, row-major).
    pub(crate) fn new(blocks: &[BlockQ6K], rows: usize, cols: usize) -> Self {
        let kb = cols / QK_K;
        let n = rows.div_ceil(ROWS) * kb;
        let mut w = Self {
            rows,
            cols,
            q: vec![0; n * Q6_TILE_BYTES],
            scales: vec![[[0; ROWS]; 16]; n],
            d: vec![[0.0; ROWS]; n],
        };
        for r in 0..rows {
            let (t, lane) = (r / ROWS, r % ROWS);
            for b in 0..kb {
                let block = &blocks[r * kb + b];
                let tb = t * kb + b;
                w.d[tb][lane] = block.d;
                for j in 0..16 {
                    w.scales[tb][j][lane] = block.scales[j];
                }
                for u in 0..4 {
                    for g in 0..4 {
                        let base = tb * Q6_TILE_BYTES + (u * 4 + g) * 3 * 32 + 4 * lane;
                        for k in 0..4 {
                            let v = |s: usize| block.q(16 * (4 * u + s) + 4 * g + k);
                            w.q[base + k] = (v(0) & 0x0F) | ((v(1) & 0x0F) << 4);
                            w.q[base + 32 + k] = (v(2) & 0x0F) | ((v(3) & 0x0F) << 4);
                            w.q[base + 64 + k] = (v(0) >> 4)
                                | ((v(1) >> 4) << 2)
                                | ((v(2) >> 4) << 4)
                                | ((v(3) >> 4) << 6);
                        }
                    }
                }
            }
        }
        w
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub(crate) fn matmul(&self, x: &[f32]) -> Vec<f32> {
        // SAFETY: as for Q4_K.
        product::<BlockQ8K>(self.rows, self.cols, x, |t, xq, kb, out| unsafe {
            avx512::tile_q6_k(self, t, xq, kb, out)
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{BlockQ8K, TiledQ4K, TiledQ6K, Q6_TILE_BYTES, ROWS, TILE_BYTES};

    /// Eight bytes as eight i32 lanes.
    #[inline(always)]
    pub(super) unsafe fn widen(b: &[u8; 8]) -> __m256i {
        // SAFETY: eight bytes.
        _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(b.as_ptr().cast()) })
    }

    /// Σ q·x for the 8 rows over `4G` values: `v` holds their `G` value
    /// vectors, the activations start at byte `at` of `xb`.
    #[inline(always)]
    unsafe fn ints<const G: usize>(v: &[__m256i; G], xb: &BlockQ8K, at: usize) -> __m256i {
        let (mut a, mut b) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for g in (0..G).step_by(2) {
            // SAFETY: 8 of the 256 activation bytes.
            let (x0, x1) = unsafe {
                let p = xb.qs.as_ptr().add(at + 4 * g);
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
                    let sc = unsafe { widen(&w.scales[tb][j]) };
                    // Unrolled by hand so the sums stay in registers (a
                    // closure would not inherit the target features).
                    macro_rules! each_row {
                        ($($r:literal)*) => {$(
                            if $r < N {
                                let xb = &xq[(r0 + $r) * kb + b];
                                let p = unsafe { ints(&v, xb, 32 * j) };
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
                    let mins = unsafe { widen(&w.mins[tb][j]) };
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
    pub(super) unsafe fn tile_q4_k(
        w: &TiledQ4K,
        t: usize,
        xq: &[BlockQ8K],
        kb: usize,
        out: &mut [f32],
    ) {
        macro_rules! pass {
            ($n:literal, $r0:expr) => {
                unsafe { rows::<$n>(w, t, xq, kb, $r0, out) }
            };
        }
        row_passes!(xq.len() / kb, pass);
    }

    /// Sub-block `4u + S` of the Q6_K tile super-block at `base`: its four
    /// 4-value groups of the 8 rows, as bytes 0..=63.
    #[inline(always)]
    unsafe fn q6_values<const S: usize>(base: *const u8) -> [__m256i; 4] {
        let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
        let mut v = [_mm256_setzero_si256(); 4];
        for (g, vg) in v.iter_mut().enumerate() {
            // SAFETY: three 32-byte vectors per group; unaligned loads.
            let (l, h) = unsafe {
                let at = base.add(g * 96);
                (
                    _mm256_loadu_si256(at.add(32 * (S / 2)).cast()),
                    _mm256_loadu_si256(at.add(64).cast()),
                )
            };
            let low = if S.is_multiple_of(2) {
                _mm256_and_si256(l, m4)
            } else {
                _mm256_and_si256(_mm256_srli_epi16::<4>(l), m4)
            };
            let pair = match S {
                0 => _mm256_and_si256(h, m2),
                1 => _mm256_and_si256(_mm256_srli_epi16::<2>(h), m2),
                2 => _mm256_and_si256(_mm256_srli_epi16::<4>(h), m2),
                _ => _mm256_and_si256(_mm256_srli_epi16::<6>(h), m2),
            };
            *vg = _mm256_or_si256(low, _mm256_slli_epi16::<4>(pair));
        }
        v
    }

    /// Activation rows `r0..r0 + N` against Q6_K tile `t`.
    #[inline(always)]
    unsafe fn rows_q6<const N: usize>(
        w: &TiledQ6K,
        t: usize,
        xq: &[BlockQ8K],
        kb: usize,
        r0: usize,
        out: &mut [f32],
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        for b in 0..kb {
            let tb = t * kb + b;
            let mut sumi = [_mm256_setzero_si256(); N];
            for u in 0..4 {
                // SAFETY: the quad's 384 bytes of the tile super-block.
                let base = unsafe { w.q.as_ptr().add(tb * Q6_TILE_BYTES + u * 4 * 96) };
                macro_rules! sub_block {
                    ($s:literal) => {{
                        let j = 4 * u + $s;
                        let v = unsafe { q6_values::<$s>(base) };
                        // SAFETY: an entry per tile super-block and sub-block.
                        let sc = unsafe { widen_signed(&w.scales[tb][j]) };
                        // `N` is a constant: the loop unrolls and the sums
                        // stay in registers.
                        for (r, s) in sumi.iter_mut().enumerate() {
                            let xb = &xq[(r0 + r) * kb + b];
                            let p = unsafe { ints(&v, xb, 16 * j) };
                            *s = _mm256_add_epi32(*s, _mm256_mullo_epi32(p, sc));
                        }
                    }};
                }
                sub_block!(0);
                sub_block!(1);
                sub_block!(2);
                sub_block!(3);
            }
            // SAFETY: an entry per tile super-block.
            let d = unsafe { _mm256_loadu_ps(w.d[tb].as_ptr()) };
            for (r, (a, s)) in acc.iter_mut().zip(&sumi).enumerate() {
                let xb = &xq[(r0 + r) * kb + b];
                let mut off = _mm256_setzero_si256();
                for j in 0..16 {
                    // SAFETY: an entry per tile super-block and sub-block.
                    let sc = unsafe { widen_signed(&w.scales[tb][j]) };
                    let bs = _mm256_set1_epi32(i32::from(xb.bsums[j]));
                    off = _mm256_add_epi32(off, _mm256_mullo_epi32(sc, bs));
                }
                let total = _mm256_sub_epi32(*s, _mm256_slli_epi32::<5>(off));
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(xb.d));
                *a = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(total), *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: `out` holds 8 floats per activation row.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add((r0 + r) * ROWS), *a) };
        }
    }

    /// Eight signed bytes as eight i32 lanes.
    #[inline(always)]
    unsafe fn widen_signed(b: &[i8; 8]) -> __m256i {
        // SAFETY: eight bytes.
        _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(b.as_ptr().cast()) })
    }

    /// Q6_K tile `t` against every activation row.
    ///
    /// # Safety
    /// The CPU must support the features named.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_q6_k(
        w: &TiledQ6K,
        t: usize,
        xq: &[BlockQ8K],
        kb: usize,
        out: &mut [f32],
    ) {
        macro_rules! pass {
            ($n:literal, $r0:expr) => {
                unsafe { rows_q6::<$n>(w, t, xq, kb, $r0, out) }
            };
        }
        row_passes!(xq.len() / kb, pass);
    }
}

impl CustomOp1 for TiledQ4K {
    fn name(&self) -> &'static str {
        "q4_k-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        apply(self.name(), self.rows, self.cols, storage, layout, |x| {
            self.matmul(x)
        })
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

impl CustomOp1 for TiledQ6K {
    fn name(&self) -> &'static str {
        "q6_k-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        apply(self.name(), self.rows, self.cols, storage, layout, |x| {
            self.matmul(x)
        })
    }
}

impl super::QuantLinear for TiledQ6K {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    fn dims(&self) -> (usize, usize) {
        TiledQ6K::dims(self)
    }
}

/// A custom op's CPU body: checks `x` ends in `cols`, runs `matmul`.
fn apply(
    name: &str,
    rows: usize,
    cols: usize,
    storage: &CpuStorage,
    layout: &Layout,
    matmul: impl Fn(&[f32]) -> Vec<f32>,
) -> Result<(CpuStorage, Shape)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{name}: expected f32 input, got {:?}", storage.dtype());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{name}: input must be contiguous");
    };
    let mut dims = layout.shape().dims().to_vec();
    if dims.last() != Some(&cols) {
        candle_core::bail!("{name}: input {dims:?} does not end in {cols} columns");
    }
    let out = matmul(&data[start..end]);
    if let Some(last) = dims.last_mut() {
        *last = rows;
    }
    Ok((CpuStorage::F32(out), Shape::from(dims)))
}

#[cfg(test)]
mod tests;
