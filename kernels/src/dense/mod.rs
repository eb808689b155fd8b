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
use crate::cpu::CpuFeatures;

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

/// The best kernel family this CPU (and OS) can run among those the
/// [`crate::cpu`] settings allow, detected once.
pub fn dense_isa() -> DenseIsa {
    static ISA: std::sync::OnceLock<DenseIsa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| detect(crate::cpu::cpu_features()))
}

/// The best kernel family this CPU runs among those `allowed` (asking the
/// OS for the AMX tile state when AMX is allowed and present).
fn detect(allowed: CpuFeatures) -> DenseIsa {
    #[cfg(target_arch = "x86_64")]
    {
        if allowed.amx && amx::enable() {
            return DenseIsa::Amx;
        }
        if is_x86_feature_detected!("avx512f") {
            return DenseIsa::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return DenseIsa::Avx2;
        }
    }
    let _ = allowed;
    DenseIsa::Reference
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
        #[target_feature(enable = "avx2,fma")]
        unsafe fn tile_avx2(x: &[f32], nrows: usize, k: usize, panel: &[f32]) -> Acc {
            f32_tile(x, nrows, k, panel, true)
        }
        fn avx2(x: &[f32], nrows: usize, k: usize, panel: &[f32]) -> Acc {
            // SAFETY: only picked when AVX2 and FMA were detected (every
            // AVX-512 or AMX CPU has them).
            unsafe { tile_avx2(x, nrows, k, panel) }
        }
        if isa != DenseIsa::Reference {
            return avx2;
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
mod avx512;

#[cfg(target_arch = "x86_64")]
mod amx;

#[cfg(test)]
mod tests;
