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
unsafe fn tile(xs: &[f32], nrows: usize, k: usize, panels: &[f32], acc: &mut [[f32; 32]; ROWS]) {
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
