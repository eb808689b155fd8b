//! The tiled product for the 32-value formats (Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0) on CPUs with VNNI. Eight weight rows are interleaved so that one
//! 256-bit register holds four consecutive values of each of the eight
//! rows: one `vpdpbusd` against four broadcast activation bytes advances
//! eight dot products at once, and the scales of the eight rows sit in one
//! register, so the float work per block is shared by the eight rows
//! (rather than paid per row, as in [`super::QuantMatrix`]'s row kernels).
//!
//! The integer sums are the same as the row kernels' (exact `Σ q·x`, with
//! the offset formats' `o·Σ x` taken from the activations' exact sums), so
//! results differ from theirs only in the order of float additions.
//!
//! Weights are stored only in this layout where it is used: four bits per
//! value stay four bits (Q5's fifth bit stays one bit per value).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

use super::{ActBlock, BlockQ8_1, Isa, QuantBlock, BLOCK};

/// Weight rows per tile.
pub(crate) const ROWS: usize = 8;

/// How a format's values are laid out and combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout8 {
    /// Four bits per value (else eight, stored as `q + 128`).
    pub nibbles: bool,
    /// A fifth bit per value (Q5_0, Q5_1).
    pub high: bool,
    /// `w = d·q + m` (else `w = d·(q − offset)`).
    pub min: bool,
    /// The offset of the offset formats.
    pub offset: i32,
}

/// A 32-value block as the tiled layout takes it.
pub(crate) trait Tileable: QuantBlock<Act = BlockQ8_1> {
    const LAYOUT: Layout8;
    /// `(d, m)` (m: 0 for the offset formats).
    fn scales(&self) -> (f32, f32);
    /// Writes the 16 nibble bytes ([`super::nibble`] order), or for byte
    /// formats the 32 values as `q + 128`; returns how many.
    fn values(&self, out: &mut [u8; 32]) -> usize;
    /// The fifth bits (bit `i` for value `i`), for Q5.
    fn high_bits(&self) -> u32 {
        0
    }
}

/// A weight matrix in the tiled layout.
#[derive(Debug, Clone)]
pub struct TiledMatrix {
    layout: Layout8,
    name: &'static str,
    rows: usize,
    cols: usize,
    /// Per tile and block: the 8 rows' values, interleaved by 4-byte group.
    q: Vec<u8>,
    /// Per tile and block: the 8 rows' fifth bits (Q5), one u32 per row.
    h: Vec<u32>,
    /// Per tile and block: the 8 rows' scales, as the file's f16 bits (a
    /// decode step streams every weight, so the bytes saved are time saved).
    d: Vec<[u16; ROWS]>,
    /// Per tile and block: the 8 rows' minimums (min formats), f16 bits.
    m: Vec<[u16; ROWS]>,
}

/// Whether this CPU runs the tiled product, given the row kernels' `isa`.
pub(crate) fn available(isa: Isa) -> bool {
    isa == Isa::Vnni512
}

impl TiledMatrix {
    /// Interleaves `blocks` (`rows × cols/32`, row-major); rows past the end
    /// of the last tile are zeros.
    pub(crate) fn new<B: Tileable>(blocks: &[B], rows: usize, cols: usize) -> Self {
        let layout = B::LAYOUT;
        let kb = cols / BLOCK;
        let tiles = rows.div_ceil(ROWS);
        let qbytes = if layout.nibbles { 16 } else { 32 };
        let mut q = vec![0u8; tiles * kb * qbytes * ROWS];
        let mut h = vec![0u32; if layout.high { tiles * kb * ROWS } else { 0 }];
        let mut d = vec![[0u16; ROWS]; tiles * kb];
        let mut m = vec![[0u16; ROWS]; if layout.min { tiles * kb } else { 0 }];
        for r in 0..rows {
            let (t, j) = (r / ROWS, r % ROWS);
            for b in 0..kb {
                let block = &blocks[r * kb + b];
                let tb = t * kb + b;
                let (ds, ms) = block.scales();
                // The file's scales are f16, so these round trips are exact.
                d[tb][j] = f16::from_f32(ds).to_bits();
                if layout.min {
                    m[tb][j] = f16::from_f32(ms).to_bits();
                }
                if layout.high {
                    h[tb * ROWS + j] = block.high_bits();
                }
                // Group g of the tile block: 4 bytes per row, rows in order.
                let mut values = [0u8; 32];
                let n = block.values(&mut values);
                let base = tb * qbytes * ROWS;
                for (g, four) in values[..n].chunks_exact(4).enumerate() {
                    let at = base + g * 4 * ROWS + 4 * j;
                    q[at..at + 4].copy_from_slice(four);
                }
            }
        }
        Self {
            layout,
            name: B::NAME,
            rows,
            cols,
            q,
            h,
            d,
            m,
        }
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
        // SAFETY: `available` held when this matrix was made, so the CPU has
        // AVX2, FMA, AVX-512 (F, VL, BW) and VNNI.
        product::<BlockQ8_1>(self.rows, self.cols, x, |t, xq, kb, out| unsafe {
            avx512::tile(self, t, xq, kb, out)
        })
    }
}

/// `x · Wᵀ` for a tiled matrix of `rows × cols`: the activations quantized
/// to `A` blocks, then `tile(t, xq, kb, out)` per tile, in parallel, each
/// writing `[row][8]` for its eight weight rows; then reordered.
pub(crate) fn product<A: ActBlock>(
    rows: usize,
    cols: usize,
    x: &[f32],
    tile: impl Fn(usize, &[A], usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let kb = cols / A::VALUES;
    let m = x.len() / cols;
    if m == 0 {
        return Vec::new();
    }
    let mut xq = vec![A::default(); m * kb];
    xq.par_chunks_mut(kb)
        .zip(x.par_chunks_exact(cols))
        .with_min_len(8)
        .for_each(|(q, row)| A::quantize(row, q));
    let tiles = rows.div_ceil(ROWS);
    let mut by_tile = vec![0f32; tiles * m * ROWS];
    let per_task = (tiles / (8 * rayon::current_num_threads().max(1))).clamp(1, 8);
    by_tile
        .par_chunks_mut(per_task * m * ROWS)
        .enumerate()
        .for_each(|(task, out)| {
            for (k, tile_out) in out.chunks_exact_mut(m * ROWS).enumerate() {
                tile(task * per_task + k, &xq, kb, tile_out);
            }
        });
    // Reordered to `[row][rows]` by output row, in parallel, straight into
    // the result's unwritten memory (no zeroing first).
    let mut out: Vec<f32> = Vec::with_capacity(m * rows);
    out.spare_capacity_mut()[..m * rows]
        .par_chunks_mut(rows)
        .with_min_len(8)
        .enumerate()
        .for_each(|(r, dst)| {
            for (t, dst) in dst.chunks_mut(ROWS).enumerate() {
                let src = &by_tile[(t * m + r) * ROWS..];
                for (d, &s) in dst.iter_mut().zip(src) {
                    d.write(s);
                }
            }
        });
    // SAFETY: every one of the `m · rows` values was written above: row
    // `r`'s chunk `t` holds the `min(8, rows − 8t)` values of tile `t`.
    unsafe { out.set_len(m * rows) };
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{BlockQ8_1, TiledMatrix, ROWS};

    /// The 8 value vectors of tile block `tb`: vector `g` holds values
    /// `4g..4g + 4` of each of the 8 rows, as unsigned bytes.
    #[inline(always)]
    unsafe fn unpack<const NIBBLES: bool, const HIGH: bool>(
        w: &TiledMatrix,
        tb: usize,
    ) -> [__m256i; 8] {
        // (Loops rather than closures: a closure would not inherit the
        // caller's target features.)
        let mut v = [_mm256_setzero_si256(); 8];
        if !NIBBLES {
            let base = unsafe { w.q.as_ptr().add(tb * 32 * ROWS) };
            for (g, vg) in v.iter_mut().enumerate() {
                // SAFETY: 256 bytes per tile block; unaligned loads.
                *vg = unsafe { _mm256_loadu_si256(base.add(32 * g).cast()) };
            }
            return v;
        }
        let m4 = _mm256_set1_epi8(0x0F);
        let base = unsafe { w.q.as_ptr().add(tb * 16 * ROWS) };
        for g in 0..4 {
            // SAFETY: 128 bytes per tile block; unaligned loads.
            let packed = unsafe { _mm256_loadu_si256(base.add(32 * g).cast()) };
            v[g] = _mm256_and_si256(packed, m4);
            v[g + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), m4);
        }
        if HIGH {
            // SAFETY: 8 u32 per tile block.
            let hv = unsafe { _mm256_loadu_si256(w.h.as_ptr().add(tb * ROWS).cast()) };
            let sixteen = _mm256_set1_epi8(0x10);
            for (g, vg) in v.iter_mut().enumerate() {
                // Bits 4g..4g + 4 of each row's u32, one per byte.
                let byte = (g / 2) as i8;
                // Within each 128-bit half, u32 lane L reads byte 4L + g/2.
                let lanes = _mm256_setr_epi32(
                    0,
                    0x0404_0404,
                    0x0808_0808,
                    0x0c0c_0c0c,
                    0,
                    0x0404_0404,
                    0x0808_0808,
                    0x0c0c_0c0c,
                );
                let pick = _mm256_add_epi8(lanes, _mm256_set1_epi8(byte));
                let shift = if g % 2 == 0 { 0 } else { 4 };
                let bits = _mm256_set1_epi32(0x0804_0201 << shift);
                let spread = _mm256_shuffle_epi8(hv, pick);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bits), bits);
                *vg = _mm256_or_si256(*vg, _mm256_and_si256(set, sixteen));
            }
        }
        v
    }

    /// Σ over the 32 values of one block of 8 rows against one activation
    /// block: exact integers, one lane per row.
    #[inline(always)]
    unsafe fn ints<const CHAINS: usize>(v: &[__m256i; 8], xb: &BlockQ8_1) -> __m256i {
        // One row alone runs `CHAINS` independent sums, so consecutive
        // instructions need not wait on each other; with several rows the
        // rows' sums interleave instead.
        let mut acc = [_mm256_setzero_si256(); CHAINS];
        for (g, vg) in v.iter().enumerate() {
            // SAFETY: 4 of the 32 activation bytes.
            let four = unsafe { std::ptr::read_unaligned(xb.qs.as_ptr().add(4 * g).cast::<i32>()) };
            acc[g % CHAINS] = _mm256_dpbusd_epi32(acc[g % CHAINS], *vg, _mm256_set1_epi32(four));
        }
        let mut sum = acc[0];
        for a in &acc[1..] {
            sum = _mm256_add_epi32(sum, *a);
        }
        sum
    }

    /// One activation block against one tile block, added to `acc`.
    #[inline(always)]
    unsafe fn step<const MIN: bool, const CHAINS: usize>(
        acc: __m256,
        v: &[__m256i; 8],
        (d, mins): (__m256, __m256),
        xb: &BlockQ8_1,
        offset: i32,
    ) -> __m256 {
        let mut ints = if CHAINS == 1 {
            unsafe { ints::<1>(v, xb) }
        } else {
            unsafe { ints::<4>(v, xb) }
        };
        if !MIN {
            ints = _mm256_sub_epi32(ints, _mm256_set1_epi32(offset * xb.sum));
        }
        let scale = _mm256_mul_ps(d, _mm256_set1_ps(xb.d));
        let acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(ints), acc);
        if MIN {
            return _mm256_fmadd_ps(mins, _mm256_set1_ps(xb.s), acc);
        }
        acc
    }

    /// Activation rows `r0..r0 + N` against tile `t` (`N` a constant, so
    /// the accumulators stay in registers).
    #[inline(always)]
    unsafe fn rows<const N: usize, const NIBBLES: bool, const HIGH: bool, const MIN: bool>(
        w: &TiledMatrix,
        t: usize,
        xq: &[BlockQ8_1],
        kb: usize,
        r0: usize,
        out: &mut [f32],
    ) {
        let offset = w.layout.offset;
        let mut acc = [_mm256_setzero_ps(); N];
        for b in 0..kb {
            let tb = t * kb + b;
            let v = unsafe { unpack::<NIBBLES, HIGH>(w, tb) };
            // SAFETY: `d` (and `m` for min formats) has 8 f16 per tile block.
            let d = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(w.d[tb].as_ptr().cast()) });
            let mins = if MIN {
                _mm256_cvtph_ps(unsafe { _mm_loadu_si128(w.m[tb].as_ptr().cast()) })
            } else {
                _mm256_setzero_ps()
            };
            // Unrolled by hand (`N` is a constant, so the tests fold away):
            // the accumulators stay in registers. (A closure here would not
            // inherit the caller's target features.)
            macro_rules! each_row {
                ($($r:literal)*) => {$(
                    if $r < N {
                        let xb = &xq[(r0 + $r) * kb + b];
                        acc[$r] = unsafe {
                            if N == 1 {
                                step::<MIN, 4>(acc[$r], &v, (d, mins), xb, offset)
                            } else {
                                step::<MIN, 1>(acc[$r], &v, (d, mins), xb, offset)
                            }
                        };
                    }
                )*};
            }
            each_row!(0 1 2 3 4 5 6 7);
        }
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: `out` holds 8 floats per activation row.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add((r0 + r) * ROWS), *a) };
        }
    }

    /// Every activation row against tile `t`, eight rows per pass, then
    /// four, two, one.
    #[inline(always)]
    unsafe fn tile_for<const NIBBLES: bool, const HIGH: bool, const MIN: bool>(
        w: &TiledMatrix,
        t: usize,
        xq: &[BlockQ8_1],
        kb: usize,
        out: &mut [f32],
    ) {
        macro_rules! pass {
            ($n:literal, $r0:expr) => {
                unsafe { rows::<$n, NIBBLES, HIGH, MIN>(w, t, xq, kb, $r0, out) }
            };
        }
        row_passes!(xq.len() / kb, pass);
    }

    /// Tile `t` against every activation row: `out[r][j]` = row `r` · weight
    /// row `8t + j`.
    ///
    /// # Safety
    /// The CPU must support the features named.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile(
        w: &TiledMatrix,
        t: usize,
        xq: &[BlockQ8_1],
        kb: usize,
        out: &mut [f32],
    ) {
        let l = w.layout;
        unsafe {
            match (l.nibbles, l.high, l.min) {
                (true, false, false) => tile_for::<true, false, false>(w, t, xq, kb, out),
                (true, false, true) => tile_for::<true, false, true>(w, t, xq, kb, out),
                (true, true, false) => tile_for::<true, true, false>(w, t, xq, kb, out),
                (true, true, true) => tile_for::<true, true, true>(w, t, xq, kb, out),
                (false, _, _) => tile_for::<false, false, false>(w, t, xq, kb, out),
            }
        }
    }
}

impl CustomOp1 for TiledMatrix {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!(
                "{}: expected f32 input, got {:?}",
                self.name,
                storage.dtype()
            );
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: input must be contiguous", self.name);
        };
        let mut dims = layout.shape().dims().to_vec();
        if dims.last() != Some(&self.cols) {
            candle_core::bail!(
                "{}: input {dims:?} does not end in {} columns",
                self.name,
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

impl super::QuantLinear for TiledMatrix {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        TiledMatrix::forward(self, x)
    }

    fn dims(&self) -> (usize, usize) {
        TiledMatrix::dims(self)
    }
}
