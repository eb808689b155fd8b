//! Dense products for encoder models, `y = x · Wᵀ + b`, with the weights
//! packed once at load and an epilogue fused into the write-out (GELU, or a
//! residual add).
//!
//! On CPUs with AMX-BF16 the product runs on AMX tiles in split bf16: every
//! f32 operand is split into a bf16 high part and a bf16 remainder, and three
//! tile products (hi·hi + hi·lo + lo·hi, f32 accumulation) keep about 16
//! significant bits, close to f32's results. Elsewhere an f32 FMA kernel runs.
//! Either way a row's result depends only on that row: it is the same, bit for
//! bit, whichever rows share the call.

use rayon::prelude::*;

use crate::activation::gelu;

/// What happens to `x · Wᵀ + b` as it is written out.
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    /// Nothing more.
    None,
    /// The exact (erf) GELU.
    Gelu,
    /// Adds a `[rows, n]` residual.
    Residual(&'a [f32]),
}

impl Epilogue<'_> {
    #[inline(always)]
    fn apply(&self, value: f32, index: usize) -> f32 {
        match self {
            Self::None => value,
            Self::Gelu => gelu(value),
            Self::Residual(r) => value + r[index],
        }
    }
}

/// Which kernel family runs the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseIsa {
    /// AMX-BF16 tiles, split bf16 (x3).
    Amx,
    /// AVX-512F FMA.
    Avx512,
    /// AVX2 FMA.
    Avx2,
    /// Plain code.
    Reference,
}

/// The best kernel family this CPU (and OS) can run, detected once.
/// `KINDLING_NO_AMX` skips AMX, for comparisons.
pub fn dense_isa() -> DenseIsa {
    static ISA: std::sync::OnceLock<DenseIsa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("KINDLING_NO_AMX").is_none() && amx::enable() {
                return DenseIsa::Amx;
            }
            if is_x86_feature_detected!("avx512f") {
                return DenseIsa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return DenseIsa::Avx2;
            }
        }
        DenseIsa::Reference
    })
}

/// Columns per packed panel of the f32 kernels.
const PANEL: usize = 16;

enum Packed {
    /// `[n / 16][k / 32]` tiles of 16 pair-rows × 16 columns × 2, high and low parts.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Amx { hi: Vec<u16>, lo: Vec<u16> },
    /// `[n / 16][k][16]` panels (the last one zero-padded).
    F32(Vec<f32>),
}

/// A weight matrix `[n, k]` (row-major, as checkpoints store linear layers)
/// with its bias, packed for the kernel this CPU runs.
pub struct DenseMatrix {
    n: usize,
    k: usize,
    bias: Vec<f32>,
    isa: DenseIsa,
    packed: Packed,
}

/// Reusable conversion buffers for [`DenseMatrix::forward_into`].
#[derive(Default)]
pub struct DenseScratch {
    hi: Vec<u16>,
    lo: Vec<u16>,
}

/// Sets `v`'s length to `len`, filling only what it did not hold before (the
/// rest is about to be overwritten).
pub fn resize<T: Clone>(v: &mut Vec<T>, len: usize, fill: T) {
    if v.len() >= len {
        v.truncate(len);
    } else {
        v.resize(len, fill);
    }
}

/// Rounds to the nearest bf16, ties to even (finite inputs).
#[inline(always)]
fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16) as u16
}

#[inline(always)]
fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// `x` as bf16 high part and bf16 remainder.
#[inline(always)]
fn split(x: f32) -> (u16, u16) {
    let hi = to_bf16(x);
    (hi, to_bf16(x - from_bf16(hi)))
}

impl DenseMatrix {
    /// Packs `weight` (`[n, k]` row-major) and `bias` (`[n]`, zeros if absent).
    ///
    /// # Panics
    /// If the slices' lengths do not match `n` and `k` (a loader bug).
    pub fn new(weight: &[f32], bias: Option<&[f32]>, n: usize, k: usize) -> Self {
        Self::for_isa(weight, bias, n, k, dense_isa())
    }

    /// As [`DenseMatrix::new`], packed for `isa` (which this CPU must run;
    /// for comparisons between kernels).
    ///
    /// # Panics
    /// As `new`.
    pub fn for_isa(
        weight: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        k: usize,
        mut isa: DenseIsa,
    ) -> Self {
        assert_eq!(weight.len(), n * k, "weight is not [{n}, {k}]");
        let bias = bias.map_or_else(|| vec![0.0; n], <[f32]>::to_vec);
        assert_eq!(bias.len(), n, "bias is not [{n}]");
        if isa == DenseIsa::Amx && (!n.is_multiple_of(32) || !k.is_multiple_of(32)) {
            isa = if cfg!(target_arch = "x86_64") && is_avx512() {
                DenseIsa::Avx512
            } else {
                DenseIsa::Reference
            };
        }
        let packed = if isa == DenseIsa::Amx {
            let kb = k / 32;
            let mut hi = vec![0u16; n * k];
            let mut lo = vec![0u16; n * k];
            for nb in 0..n / 16 {
                for b in 0..kb {
                    let tile = (nb * kb + b) * 512;
                    for r in 0..16 {
                        for c in 0..16 {
                            for p in 0..2 {
                                let (h, l) = split(weight[(nb * 16 + c) * k + b * 32 + 2 * r + p]);
                                let at = tile + r * 32 + c * 2 + p;
                                hi[at] = h;
                                lo[at] = l;
                            }
                        }
                    }
                }
            }
            Packed::Amx { hi, lo }
        } else {
            let panels = n.div_ceil(PANEL);
            let mut w = vec![0.0f32; panels * k * PANEL];
            for col in 0..n {
                let (p, c) = (col / PANEL, col % PANEL);
                for i in 0..k {
                    w[(p * k + i) * PANEL + c] = weight[col * k + i];
                }
            }
            Packed::F32(w)
        };
        Self {
            n,
            k,
            bias,
            isa,
            packed,
        }
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input columns.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The kernel family this matrix was packed for.
    pub fn isa(&self) -> DenseIsa {
        self.isa
    }

    /// Bytes the packed weights take.
    pub fn bytes(&self) -> usize {
        let w = match &self.packed {
            Packed::Amx { hi, lo } => 2 * (hi.len() + lo.len()),
            Packed::F32(w) => 4 * w.len(),
        };
        w + 4 * self.bias.len()
    }

    /// `x` (`[rows, k]`) times the weights, plus the bias, through `epilogue`:
    /// `[rows, n]`.
    ///
    /// # Panics
    /// If `x` is not `rows × k`, or a residual not `rows × n`.
    pub fn forward(&self, x: &[f32], rows: usize, epilogue: Epilogue<'_>) -> Vec<f32> {
        let mut out = Vec::new();
        self.forward_into(x, rows, epilogue, &mut out, &mut DenseScratch::default());
        out
    }

    /// As [`DenseMatrix::forward`], into `out` (resized to `[rows, n]`,
    /// every element overwritten), with conversion buffers from `scratch`:
    /// repeated calls reuse their memory.
    ///
    /// # Panics
    /// As `forward`.
    pub fn forward_into(
        &self,
        x: &[f32],
        rows: usize,
        epilogue: Epilogue<'_>,
        out: &mut Vec<f32>,
        scratch: &mut DenseScratch,
    ) {
        assert_eq!(x.len(), rows * self.k, "input is not [{rows}, {}]", self.k);
        if let Epilogue::Residual(r) = epilogue {
            assert_eq!(
                r.len(),
                rows * self.n,
                "residual is not [{rows}, {}]",
                self.n
            );
        }
        resize(out, rows * self.n, 0.0);
        if rows == 0 {
            return;
        }
        match &self.packed {
            #[cfg(target_arch = "x86_64")]
            Packed::Amx { hi, lo } => amx::forward(self, (hi, lo), x, rows, epilogue, out, scratch),
            #[cfg(not(target_arch = "x86_64"))]
            Packed::Amx { .. } => unreachable!("AMX is only picked on x86_64"),
            #[cfg(target_arch = "x86_64")]
            Packed::F32(w) if self.isa == DenseIsa::Avx512 => {
                avx512::forward(self, w, x, rows, epilogue, out)
            }
            Packed::F32(w) => self.forward_f32(w, x, rows, epilogue, out),
        }
    }

    fn forward_f32(
        &self,
        w: &[f32],
        x: &[f32],
        rows: usize,
        epilogue: Epilogue<'_>,
        out: &mut [f32],
    ) {
        let (n, k) = (self.n, self.k);
        let panels = n.div_ceil(PANEL);
        let row_blocks = rows.div_ceil(ROWS);
        // Split columns too when there are few rows, so both cores work.
        let groups = (4 * rayon::current_num_threads())
            .div_ceil(row_blocks)
            .clamp(1, panels);
        let per_group = panels.div_ceil(groups);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let kernel = f32_kernel(self.isa);
        (0..row_blocks * groups).into_par_iter().for_each(|unit| {
            let (rb, g) = (unit / groups, unit % groups);
            let r0 = rb * ROWS;
            let nrows = ROWS.min(rows - r0);
            for p in g * per_group..((g + 1) * per_group).min(panels) {
                let panel = &w[p * k * PANEL..(p + 1) * k * PANEL];
                let acc = kernel(&x[r0 * k..(r0 + nrows) * k], nrows, k, panel);
                for (r, acc_row) in acc.iter().enumerate().take(nrows) {
                    for (c, &v) in acc_row.iter().enumerate() {
                        let col = p * PANEL + c;
                        if col < n {
                            let at = (r0 + r) * n + col;
                            let v = epilogue.apply(v + self.bias[col], at);
                            // SAFETY: units write disjoint (row block, panel) rectangles.
                            unsafe { out_ptr.write(at, v) };
                        }
                    }
                }
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
fn is_avx512() -> bool {
    is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn is_avx512() -> bool {
    false
}

/// Rows per f32 micro-tile.
const ROWS: usize = 4;

type Acc = [[f32; PANEL]; ROWS];
type F32Kernel = fn(&[f32], usize, usize, &[f32]) -> Acc;

/// `x` rows (`nrows ≤ 4`, each `k` long) times one `[k][16]` panel. Every
/// output accumulates over `k` in order with one fused multiply-add per
/// step, so a row's result does not depend on the rows beside it.
#[inline(always)]
fn f32_tile(x: &[f32], nrows: usize, k: usize, panel: &[f32], fma: bool) -> Acc {
    let mut acc = [[0.0f32; PANEL]; ROWS];
    for i in 0..k {
        let w = &panel[i * PANEL..(i + 1) * PANEL];
        for r in 0..ROWS {
            // Rows past `nrows` compute on a copy of row 0; they are dropped.
            let a = x[(if r < nrows { r } else { 0 }) * k + i];
            for c in 0..PANEL {
                acc[r][c] = if fma {
                    a.mul_add(w[c], acc[r][c])
                } else {
                    acc[r][c] + a * w[c]
                };
            }
        }
    }
    acc
}

fn f32_kernel(isa: DenseIsa) -> F32Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn tile_avx512(x: &[f32], nrows: usize, k: usize, panel: &[f32]) -> Acc {
            f32_tile(x, nrows, k, panel, true)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn tile_avx2(x: &[f32], nrows: usize, k: usize, panel: &[f32]) -> Acc {
            f32_tile(x, nrows, k, panel, true)
        }
        fn avx512(x: &[f32], nrows: usize, k: usize, panel: &[f32]) -> Acc {
            // SAFETY: only picked when AVX-512F and FMA were detected.
            unsafe { tile_avx512(x, nrows, k, panel) }
        }
        fn avx2(x: &[f32], nrows: usize, k: usize, panel: &[f32]) -> Acc {
            // SAFETY: only picked when AVX2 and FMA were detected.
            unsafe { tile_avx2(x, nrows, k, panel) }
        }
        match isa {
            // AMX matrices of odd sizes fall back here; AVX-512 is there too.
            DenseIsa::Avx512 | DenseIsa::Amx => return avx512,
            DenseIsa::Avx2 => return avx2,
            DenseIsa::Reference => {}
        }
    }
    let _ = isa;
    |x, nrows, k, panel| f32_tile(x, nrows, k, panel, false)
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: every task writes a disjoint set of elements (see the callers).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// # Safety
    /// `at` is in bounds and no other task writes it.
    #[inline(always)]
    pub(crate) unsafe fn write(self, at: usize, v: f32) {
        // SAFETY: the caller's promise.
        unsafe { *self.0.add(at) = v }
    }

    /// # Safety
    /// `at..at + len` is in bounds and no other task touches it meanwhile.
    #[inline(always)]
    pub(crate) unsafe fn slice<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}

/// Writes 16 finished values: `acc + bias`, through the epilogue (`at` is
/// the first one's index in the output, for a residual).
#[inline(always)]
fn write_row(dst: &mut [f32], acc: &[f32], bias: &[f32], epilogue: Epilogue<'_>, at: usize) {
    match epilogue {
        Epilogue::None => {
            for j in 0..16 {
                dst[j] = acc[j] + bias[j];
            }
        }
        Epilogue::Gelu => {
            for j in 0..16 {
                dst[j] = gelu(acc[j] + bias[j]);
            }
        }
        Epilogue::Residual(r) => {
            let r = &r[at..at + 16];
            for j in 0..16 {
                dst[j] = acc[j] + bias[j] + r[j];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 f32 path: 8 rows × 32 columns (two 16-wide panels) per
    //! micro-tile, sixteen accumulators; each output accumulates over `k` in
    //! order with one FMA per step, as the portable path does.

    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{f32_kernel, write_row, DenseMatrix, Epilogue, SendPtr, PANEL};

    const ROWS: usize = 8;

    pub(super) fn forward(
        m: &DenseMatrix,
        w: &[f32],
        x: &[f32],
        rows: usize,
        epilogue: Epilogue<'_>,
        out: &mut [f32],
    ) {
        let k = m.k;
        let panels = m.n.div_ceil(PANEL);
        let pairs = panels / 2;
        let row_blocks = rows.div_ceil(ROWS);
        let groups = (4 * rayon::current_num_threads())
            .div_ceil(row_blocks)
            .clamp(1, pairs.max(1));
        let per_group = pairs.div_ceil(groups);
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..row_blocks * groups).into_par_iter().for_each(|unit| {
            let (rb, g) = (unit / groups, unit % groups);
            let r0 = rb * ROWS;
            let nrows = ROWS.min(rows - r0);
            let xs = &x[r0 * k..(r0 + nrows) * k];
            for pair in g * per_group..((g + 1) * per_group).min(pairs) {
                let p = 2 * pair;
                let mut acc = [[0.0f32; 32]; ROWS];
                // SAFETY: AVX-512F was detected (the matrix was packed for it);
                // panels `p` and `p + 1` exist.
                unsafe {
                    tile(
                        xs,
                        nrows,
                        k,
                        &w[p * k * PANEL..(p + 2) * k * PANEL],
                        &mut acc,
                    )
                };
                write(m, &acc, r0, nrows, p * PANEL, 32, epilogue, out_ptr);
            }
            // An odd last panel: the portable tile, 4 rows at a time.
            if panels % 2 == 1 && g == groups - 1 {
                let p = panels - 1;
                let kernel = f32_kernel(super::DenseIsa::Avx2);
                for r in (0..nrows).step_by(4) {
                    let n4 = 4.min(nrows - r);
                    let acc = kernel(
                        &xs[r * k..(r + n4) * k],
                        n4,
                        k,
                        &w[p * k * PANEL..(p + 1) * k * PANEL],
                    );
                    let acc: Vec<[f32; 32]> = acc
                        .iter()
                        .map(|row| {
                            let mut wide = [0.0f32; 32];
                            wide[..PANEL].copy_from_slice(row);
                            wide
                        })
                        .collect();
                    write(m, &acc, r0 + r, n4, p * PANEL, PANEL, epilogue, out_ptr);
                }
            }
        });
    }

    /// Writes `acc`'s first `nrows` rows, `width` columns from `col0` (those
    /// inside the matrix), through bias and epilogue.
    #[allow(clippy::too_many_arguments)]
    fn write(
        m: &DenseMatrix,
        acc: &[[f32; 32]],
        r0: usize,
        nrows: usize,
        col0: usize,
        width: usize,
        epilogue: Epilogue<'_>,
        out: SendPtr,
    ) {
        for (r, acc_row) in acc.iter().enumerate().take(nrows) {
            for c0 in (0..width).step_by(16) {
                let col = col0 + c0;
                let at = (r0 + r) * m.n + col;
                let valid = 16.min(m.n.saturating_sub(col));
                if valid == 16 {
                    // SAFETY: units write disjoint (row block, panel) rectangles.
                    let dst = unsafe { out.slice(at, 16) };
                    write_row(
                        dst,
                        &acc_row[c0..c0 + 16],
                        &m.bias[col..col + 16],
                        epilogue,
                        at,
                    );
                } else {
                    for j in 0..valid {
                        let v = epilogue.apply(acc_row[c0 + j] + m.bias[col + j], at + j);
                        // SAFETY: as above.
                        unsafe { out.write(at + j, v) };
                    }
                }
            }
        }
    }

    /// `xs` rows (`nrows ≤ 8`) times two adjacent panels (`[2][k][16]`).
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn tile(
        xs: &[f32],
        nrows: usize,
        k: usize,
        panels: &[f32],
        acc: &mut [[f32; 32]; ROWS],
    ) {
        let mut a0 = [_mm512_setzero_ps(); ROWS];
        let mut a1 = [_mm512_setzero_ps(); ROWS];
        // Rows past `nrows` read row 0 again; their results are dropped.
        let row_ptr: [*const f32; ROWS] =
            std::array::from_fn(|r| xs[(if r < nrows { r } else { 0 }) * k..].as_ptr());
        let (w0, w1) = (panels.as_ptr(), panels[k * 16..].as_ptr());
        for i in 0..k {
            // SAFETY: `i < k` stays inside both panels and every row.
            unsafe {
                let v0 = _mm512_loadu_ps(w0.add(i * 16));
                let v1 = _mm512_loadu_ps(w1.add(i * 16));
                for r in 0..ROWS {
                    let a = _mm512_set1_ps(*row_ptr[r].add(i));
                    a0[r] = _mm512_fmadd_ps(a, v0, a0[r]);
                    a1[r] = _mm512_fmadd_ps(a, v1, a1[r]);
                }
            }
        }
        for r in 0..ROWS {
            // SAFETY: each row of `acc` holds 32 floats.
            unsafe {
                _mm512_storeu_ps(acc[r].as_mut_ptr(), a0[r]);
                _mm512_storeu_ps(acc[r][16..].as_mut_ptr(), a1[r]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    //! The AMX path: tiles of 16 rows × 64 bytes; a micro-tile is 32 rows ×
    //! 32 columns (tmm0–3 accumulate, tmm4–5 hold activations, tmm6–7 weights).

    use std::arch::asm;

    use rayon::prelude::*;

    use super::{
        from_bf16, resize, to_bf16, write_row, DenseMatrix, DenseScratch, Epilogue, SendPtr,
    };

    /// Whether the CPU has AMX-TILE and AMX-BF16 and the kernel lets this
    /// process use the tile data (asked once).
    pub(super) fn enable() -> bool {
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let tile = leaf7.edx & (1 << 24) != 0;
        let bf16 = leaf7.edx & (1 << 22) != 0;
        if !(tile && bf16) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes which state
        // components the process may use.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    /// Palette 1, eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    const CONFIG: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        TileConfig(c)
    };

    pub(super) fn forward(
        m: &DenseMatrix,
        (w_hi, w_lo): (&[u16], &[u16]),
        x: &[f32],
        rows: usize,
        epilogue: Epilogue<'_>,
        out: &mut [f32],
        scratch: &mut DenseScratch,
    ) {
        let (n, k) = (m.n, m.k);
        // Activations split into bf16 parts, rows padded to whole micro-tiles
        // (the padding zeroed; its products are computed and dropped).
        let padded = rows.div_ceil(32) * 32;
        let DenseScratch { hi: a_hi, lo: a_lo } = scratch;
        resize(a_hi, padded * k, 0);
        resize(a_lo, padded * k, 0);
        a_hi[rows * k..].fill(0);
        a_lo[rows * k..].fill(0);
        // Tile-major: each 16 × 32 tile of the activations is 1 KiB of
        // contiguous memory (tile (r, b) at `(r · k/32 + b) · 512`), so
        // tile loads read whole cache lines in order.
        a_hi.par_chunks_mut(16 * k)
            .zip(a_lo.par_chunks_mut(16 * k))
            .zip(x.par_chunks(16 * k))
            // SAFETY: AMX machines have AVX-512 (F, BW, VL).
            .for_each(|((h, l), x)| unsafe { split_tile_rows(h, l, x, k) });
        let row_blocks = padded / 32;
        let col_blocks = n / 32;
        // Units of up to 8 row blocks × a run of column blocks. Within a unit
        // the column block is the outer loop, so its weights (48 KiB for
        // k = 384) stay in cache across the row blocks, whose activations
        // stay in L2.
        let row_groups = row_blocks.div_ceil(8);
        let groups = (4 * rayon::current_num_threads())
            .div_ceil(row_groups)
            .clamp(1, col_blocks);
        let per_group = col_blocks.div_ceil(groups);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let job = Job {
            m,
            a_hi,
            a_lo,
            w_hi,
            w_lo,
            rows,
            groups,
            per_group,
            row_blocks,
            col_blocks,
            epilogue,
            out: out_ptr,
        };
        (0..row_groups * groups).into_par_iter().for_each(|unit| {
            // SAFETY: AMX machines have AVX-512 (F, BW, VL) and FMA.
            unsafe { run_unit(&job, unit) }
        });
    }

    struct Job<'a> {
        m: &'a DenseMatrix,
        a_hi: &'a [u16],
        a_lo: &'a [u16],
        w_hi: &'a [u16],
        w_lo: &'a [u16],
        rows: usize,
        groups: usize,
        per_group: usize,
        row_blocks: usize,
        col_blocks: usize,
        epilogue: Epilogue<'a>,
        out: SendPtr,
    }

    /// Splits up to 16 rows of `x` into the tile-major high and low parts.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn split_tile_rows(h: &mut [u16], l: &mut [u16], x: &[f32], k: usize) {
        for (rr, row) in x.chunks(k).enumerate() {
            for b in 0..k / 32 {
                let at = (b * 16 + rr) * 32;
                let (h, l) = (&mut h[at..at + 32], &mut l[at..at + 32]);
                let src = &row[b * 32..b * 32 + 32];
                for i in 0..32 {
                    h[i] = to_bf16(src[i]);
                    l[i] = to_bf16(src[i] - from_bf16(h[i]));
                }
            }
        }
    }

    /// One unit: a run of column blocks × up to 8 row blocks, with the
    /// epilogue vectorized for AVX-512.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    unsafe fn run_unit(job: &Job<'_>, unit: usize) {
        let (m, rows, groups, per_group) = (job.m, job.rows, job.groups, job.per_group);
        let (row_blocks, col_blocks) = (job.row_blocks, job.col_blocks);
        let (a_hi, a_lo, w_hi, w_lo) = (job.a_hi, job.a_lo, job.w_hi, job.w_lo);
        let (epilogue, out_ptr) = (job.epilogue, job.out);
        let (n, k) = (m.n, m.k);
        let kb = k / 32;
        {
            let (rg, g) = (unit / groups, unit % groups);
            let mut c = [[0.0f32; 256]; 4];
            // SAFETY: `enable` granted the tile state; the config is valid.
            unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
            for cb in g * per_group..((g + 1) * per_group).min(col_blocks) {
                for rb in rg * 8..(rg * 8 + 8).min(row_blocks) {
                    let a0 = rb * 32 * k;
                    let w0 = cb * 2 * kb * 512;
                    // SAFETY: every tile read stays inside `a_*` (padded rows)
                    // and `w_*` (whole tiles); `c` holds four 1 KiB tiles.
                    unsafe {
                        micro_tile(
                            a_hi.as_ptr().add(a0),
                            a_lo.as_ptr().add(a0),
                            w_hi.as_ptr().add(w0),
                            w_lo.as_ptr().add(w0),
                            k,
                            kb,
                            &mut c,
                        );
                    }
                    for (t, tile) in c.iter().enumerate() {
                        let (tr, tc) = (t / 2, t % 2);
                        let col = cb * 32 + tc * 16;
                        let bias = &m.bias[col..col + 16];
                        for r in 0..16 {
                            let row = rb * 32 + tr * 16 + r;
                            if row >= rows {
                                break;
                            }
                            let at = row * n + col;
                            // SAFETY: units write disjoint (row, column) rectangles;
                            // `at..at + 16` is inside row `row` of `out`.
                            let dst = unsafe { out_ptr.slice(at, 16) };
                            write_row(dst, &tile[r * 16..r * 16 + 16], bias, epilogue, at);
                        }
                    }
                }
            }
            // SAFETY: hands the tile state back (smaller context switches).
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// One 32 × 32 micro-tile over all of `k`: `c[2·r + j]` is rows
    /// `16r..16r+16` × columns `16j..16j+16`.
    ///
    /// # Safety
    /// Tiles configured; `a_*` point at 32 rows of `k` bf16; `w_*` at two
    /// column blocks of `kb` tiles each.
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro_tile(
        a_hi: *const u16,
        a_lo: *const u16,
        w_hi: *const u16,
        w_lo: *const u16,
        k: usize,
        kb: usize,
        c: &mut [[f32; 256]; 4],
    ) {
        let stride_a = 64usize;
        let stride_w = 64usize;
        let next_block = kb * 512;
        // SAFETY (all blocks): the caller's promise on the pointers.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            for b in 0..kb {
                let ah0 = a_hi.add(b * 512);
                let ah1 = ah0.add(16 * k);
                let al0 = a_lo.add(b * 512);
                let al1 = al0.add(16 * k);
                let wh0 = w_hi.add(b * 512);
                let wh1 = wh0.add(next_block);
                let wl0 = w_lo.add(b * 512);
                let wl1 = wl0.add(next_block);
                asm!(
                    // Ordered so that each reload targets a tile whose
                    // last reader was issued a few products earlier (tile
                    // registers are not renamed).
                    "tileloadd tmm4, [{ah0} + {sa}*1]",
                    "tileloadd tmm6, [{wh0} + {sw}*1]",
                    "tileloadd tmm5, [{ah1} + {sa}*1]",
                    "tileloadd tmm7, [{wh1} + {sw}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tileloadd tmm6, [{wl0} + {sw}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "tileloadd tmm7, [{wl1} + {sw}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tileloadd tmm6, [{wh0} + {sw}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "tileloadd tmm4, [{al0} + {sa}*1]",
                    "tileloadd tmm7, [{wh1} + {sw}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm5, [{al1} + {sa}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    ah0 = in(reg) ah0,
                    ah1 = in(reg) ah1,
                    al0 = in(reg) al0,
                    al1 = in(reg) al1,
                    wh0 = in(reg) wh0,
                    wh1 = in(reg) wh1,
                    wl0 = in(reg) wl0,
                    wl1 = in(reg) wl1,
                    sa = in(reg) stride_a,
                    sw = in(reg) stride_w,
                    options(nostack, readonly)
                );
            }
            let s = 64usize;
            asm!(
                "tilestored [{c0} + {s}*1], tmm0",
                "tilestored [{c1} + {s}*1], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c3} + {s}*1], tmm3",
                c0 = in(reg) c[0].as_mut_ptr(),
                c1 = in(reg) c[1].as_mut_ptr(),
                c2 = in(reg) c[2].as_mut_ptr(),
                c3 = in(reg) c[3].as_mut_ptr(),
                s = in(reg) s,
                options(nostack)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn reference(w: &[f32], b: &[f32], x: &[f32], rows: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0.0f64; rows * n];
        for r in 0..rows {
            for c in 0..n {
                let dot: f64 = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(w[c * k + i]))
                    .sum();
                out[r * n + c] = dot + f64::from(b[c]);
            }
        }
        out
    }

    fn isas() -> Vec<DenseIsa> {
        let mut isas = vec![DenseIsa::Reference];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && dense_isa() != DenseIsa::Avx2
        {
            isas.push(DenseIsa::Avx2);
        }
        match dense_isa() {
            DenseIsa::Amx => isas.extend([DenseIsa::Avx512, DenseIsa::Amx]),
            DenseIsa::Avx512 => isas.push(DenseIsa::Avx512),
            DenseIsa::Avx2 => isas.push(DenseIsa::Avx2),
            DenseIsa::Reference => {}
        }
        isas
    }

    #[test]
    fn products_match_the_reference_on_odd_shapes() {
        for (rows, n, k) in [
            (1, 32, 32),
            (7, 64, 96),
            (33, 96, 64),
            (70, 32, 384),
            (5, 17, 13),
            (9, 48, 40),
        ] {
            let w = random(n * k, 1);
            let b = random(n, 2);
            let x = random(rows * k, 3);
            let want = reference(&w, &b, &x, rows, n, k);
            for isa in isas() {
                let m = DenseMatrix::for_isa(&w, Some(&b), n, k, isa);
                let got = m.forward(&x, rows, Epilogue::None);
                for (g, w) in got.iter().zip(&want) {
                    let err = (f64::from(*g) - w).abs();
                    assert!(
                        err < 2e-5 * (k as f64).sqrt(),
                        "{isa:?} {rows}x{n}x{k}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn epilogues_apply_after_the_bias() {
        let (rows, n, k) = (3, 32, 64);
        let (w, b, x, res) = (
            random(n * k, 4),
            random(n, 5),
            random(rows * k, 6),
            random(rows * n, 7),
        );
        let m = DenseMatrix::new(&w, Some(&b), n, k);
        let plain = m.forward(&x, rows, Epilogue::None);
        let gelu_out = m.forward(&x, rows, Epilogue::Gelu);
        let added = m.forward(&x, rows, Epilogue::Residual(&res));
        for i in 0..rows * n {
            assert_eq!(gelu_out[i], gelu(plain[i]));
            assert_eq!(added[i], plain[i] + res[i]);
        }
    }

    #[test]
    fn a_row_is_the_same_alone_and_in_any_batch() {
        let (n, k) = (80, 384);
        let w = random(n * k, 8);
        let x = random(77 * k, 9);
        for isa in isas() {
            let m = DenseMatrix::for_isa(&w, None, n, k, isa);
            let all = m.forward(&x, 77, Epilogue::None);
            for (r, rows) in [(0, 1), (40, 1), (76, 1), (3, 5), (30, 40)] {
                let part = m.forward(&x[r * k..(r + rows) * k], rows, Epilogue::None);
                assert_eq!(
                    part,
                    all[r * n..(r + rows) * n],
                    "{isa:?} rows {r}..{}",
                    r + rows
                );
            }
        }
    }
}
