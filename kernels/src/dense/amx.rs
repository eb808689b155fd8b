//! The AMX path: tiles of 16 rows × 64 bytes; a micro-tile is 32 rows ×
//! 32 columns (tmm0–3 accumulate, tmm4–5 hold activations, tmm6–7 weights).

use std::arch::asm;

use rayon::prelude::*;

use super::{from_bf16, resize, to_bf16, write_row, DenseMatrix, DenseScratch, Epilogue, SendPtr};

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
    // Whole padding tile rows here; the padding rows of a partial tile row
    // in `split_tile_rows`.
    let whole = rows.div_ceil(16) * 16 * k;
    a_hi[whole..].fill(0);
    a_lo[whole..].fill(0);
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

/// Splits up to 16 rows of `x` into the tile-major high and low parts of
/// one tile row; the tile row's remaining rows are zeroed.
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
    for rr in x.len() / k..16 {
        for b in 0..k / 32 {
            let at = (b * 16 + rr) * 32;
            h[at..at + 32].fill(0);
            l[at..at + 32].fill(0);
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
