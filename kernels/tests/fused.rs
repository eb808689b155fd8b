//! Every fused op against its reference on random inputs of several shapes
//! (odd sizes, one row and many), in f32, f16 and bf16: on the CPU always,
//! and on `cuda:0` when this build has CUDA and the machine a GPU (the
//! tests say when they skip it).

use candle_core::{DType, Device, IndexOp, Tensor};
use kindling_kernels::fused::{
    add_rms_norm_reference, cache_write_reference, group_norm_silu_reference,
    paged_decode_attention_reference, rms_norm_reference, rope_reference,
};
use kindling_kernels::{
    add_rms_norm, cache_write, gpu, group_norm_silu, paged_decode_attention, rms_norm,
    rope_in_place, silu_mul, silu_mul_reference, AttentionShape, RopeTables,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type R = candle_core::Result<()>;

/// The CPU, plus `cuda:0` where there is one.
fn devices() -> Vec<Device> {
    let mut out = vec![Device::Cpu];
    match gpu::device(0) {
        Ok(d) => out.push(d),
        Err(why) => skip_cuda("the CUDA kernels", &why),
    }
    out
}

#[path = "support/cuda.rs"]
mod cuda;
use cuda::skip_cuda;

const DTYPES: [(DType, f32); 3] = [(DType::F32, 1e-4), (DType::F16, 4e-3), (DType::BF16, 3e-2)];

fn random(shape: &[usize], scale: f32, rng: &mut StdRng) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Asserts `|got - want| <= tol * (1 + |want|)` elementwise.
fn close(got: &Tensor, want: &Tensor, tol: f32, what: &str) -> R {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let g = got
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let w = want
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let worst = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .fold(0f32, f32::max);
    assert!(worst <= tol, "{what}: worst relative error {worst} > {tol}");
    Ok(())
}

/// `t` in `dtype` on `dev`, and the same values (already rounded) in f32 on
/// the CPU for the reference.
fn place(t: &Tensor, dtype: DType, dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let rounded = t.to_dtype(dtype)?;
    // Copies: in-place ops must not write into the reference's storage.
    Ok((
        rounded.to_device(dev)?.copy()?,
        rounded.to_dtype(DType::F32)?.copy()?,
    ))
}

#[test]
fn rms_norm_and_residual_add() -> R {
    let mut rng = StdRng::seed_from_u64(1);
    for dev in devices() {
        for (rows, hidden) in [(1usize, 7usize), (5, 64), (3, 4097), (33, 1536)] {
            // x is a column slice of a wider tensor: strided rows.
            let wide = random(&[rows, hidden + 5], 3.0, &mut rng)?;
            let res = random(&[rows, hidden], 3.0, &mut rng)?;
            let w = random(&[hidden], 1.5, &mut rng)?;
            for (dtype, tol) in DTYPES {
                let what = format!("{dev:?} {dtype:?} {rows}x{hidden}");
                let (wd, wr) = place(&wide, dtype, &dev)?;
                let (x, xr) = (wd.narrow(1, 2, hidden)?, wr.narrow(1, 2, hidden)?);
                let (rd, rr) = place(&res, dtype, &dev)?;
                let (gd, gr) = place(&w, dtype, &dev)?;
                let got = rms_norm(&x, &gd, 1e-5)?;
                assert_eq!(got.dtype(), dtype);
                close(&got, &rms_norm_reference(&xr, &gr, 1e-5)?, tol, &what)?;
                let (sum, normed) = add_rms_norm(&x, &rd, &gd, 1e-5)?;
                // The reference adds in the storage dtype, as the op does.
                let (xs, rs) = (xr.to_dtype(dtype)?, rr.to_dtype(dtype)?);
                let (want_sum, want_norm) =
                    add_rms_norm_reference(&xs, &rs, &gr.to_dtype(dtype)?, 1e-5)?;
                close(&sum, &want_sum, tol, &format!("{what} sum"))?;
                close(&normed, &want_norm, tol, &format!("{what} normed"))?;
            }
        }
    }
    Ok(())
}

#[test]
fn silu_gate_on_fused_halves() -> R {
    let mut rng = StdRng::seed_from_u64(2);
    for dev in devices() {
        for (rows, cols) in [(1usize, 1usize), (1, 11_008), (7, 33), (64, 1536)] {
            let gate_up = random(&[rows, 2 * cols], 6.0, &mut rng)?;
            for (dtype, tol) in DTYPES {
                let (gu, gur) = place(&gate_up, dtype, &dev)?;
                let got = silu_mul(&gu.narrow(1, 0, cols)?, &gu.narrow(1, cols, cols)?)?;
                let want =
                    silu_mul_reference(&gur.narrow(1, 0, cols)?, &gur.narrow(1, cols, cols)?)?;
                close(
                    &got,
                    &want,
                    tol,
                    &format!("{dev:?} {dtype:?} {rows}x{cols}"),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn rotary_in_place_on_query_and_key_heads() -> R {
    let mut rng = StdRng::seed_from_u64(3);
    for dev in devices() {
        for (rows, heads, kv, hd) in [
            (1usize, 4usize, 2usize, 8usize),
            (5, 3, 1, 6),
            (9, 32, 8, 128),
        ] {
            let half = hd / 2;
            let inv: Vec<f32> = (0..half)
                .map(|i| 10_000f32.powf(-((2 * i) as f32) / hd as f32))
                .collect();
            let table = RopeTables::new(&inv, 300).cos_sin();
            let positions: Vec<u32> = (0..rows).map(|_| rng.random_range(0..300)).collect();
            let width = (heads + 2 * kv) * hd;
            let qkv = random(&[rows, width], 2.0, &mut rng)?;
            for interleaved in [false, true] {
                for (dtype, tol) in DTYPES {
                    let what = format!("{dev:?} {dtype:?} {rows}x{heads}/{kv}x{hd} {interleaved}");
                    let (x, xr) = place(&qkv, dtype, &dev)?;
                    let pos = Tensor::new(positions.as_slice(), &dev)?;
                    let t = Tensor::from_vec(table.clone(), (300, 2, half), &dev)?;
                    rope_in_place(&x, &pos, &t, heads + kv, hd, interleaved)?;
                    let want =
                        rope_reference(&xr, &positions, &table, heads + kv, hd, interleaved)?;
                    close(&x, &want, tol, &what)?;
                }
            }
        }
    }
    Ok(())
}

/// Random block tables: row `r` sees `seen[r]` positions in distinct blocks.
fn tables(seen: &[usize], block_size: usize, blocks: usize, rng: &mut StdRng) -> Vec<Vec<u32>> {
    let width = seen
        .iter()
        .map(|s| s.div_ceil(block_size))
        .max()
        .unwrap_or(1);
    let mut free: Vec<u32> = (0..blocks as u32).collect();
    seen.iter()
        .map(|&s| {
            let mut m = vec![s as u32];
            for _ in 0..s.div_ceil(block_size) {
                let i = rng.random_range(0..free.len());
                m.push(free.swap_remove(i));
            }
            m.resize(1 + width, 0);
            m
        })
        .collect()
}

#[test]
fn cache_write_then_paged_attention() -> R {
    let mut rng = StdRng::seed_from_u64(4);
    for dev in devices() {
        for (heads, kv, hd, bs, seen) in [
            (4usize, 2usize, 16usize, 16usize, vec![1usize]),
            (6, 6, 10, 16, vec![17, 3, 33, 1, 48]),
            (32, 8, 128, 16, vec![200, 5, 77, 16, 1, 64, 130, 2, 9]),
            (2, 1, 64, 8, vec![1000]),
        ] {
            let shape = AttentionShape {
                heads,
                kv_heads: kv,
                head_dim: hd,
                block_size: bs,
            };
            let blocks = seen.iter().map(|s| s.div_ceil(bs)).sum::<usize>() + 3;
            let meta = tables(&seen, bs, blocks, &mut rng);
            // The row's new token is its last position.
            let slots: Vec<u32> = meta
                .iter()
                .map(|m| {
                    let p = m[0] as usize - 1;
                    m[1 + p / bs] * bs as u32 + (p % bs) as u32
                })
                .collect();
            let cache = random(&[2, blocks, kv, bs, hd], 2.0, &mut rng)?;
            let qkv = random(&[seen.len(), shape.qkv_width()], 2.0, &mut rng)?;
            let flat: Vec<u32> = meta.iter().flatten().copied().collect();
            let scale = 1.0 / (hd as f32).sqrt();
            for (dtype, tol) in DTYPES {
                let what = format!("{dev:?} {dtype:?} {shape:?} rows {}", seen.len());
                let (c, cr) = place(&cache, dtype, &dev)?;
                let (q, qr) = place(&qkv, dtype, &dev)?;
                let s = Tensor::new(slots.as_slice(), &dev)?;
                cache_write(&c, &q, &s, shape)?;
                let want_cache = cache_write_reference(&cr, &qr, &slots, shape)?;
                close(&c, &want_cache, 0.0, &format!("{what} cache"))?;
                let m = Tensor::from_vec(flat.clone(), (seen.len(), meta[0].len()), &dev)?;
                let got = paged_decode_attention(&q, &c, &m, shape, scale)?;
                let want = paged_decode_attention_reference(&qr, &want_cache, &meta, shape, scale)?;
                close(&got, &want, tol, &what)?;
                // Rows are independent: the first row alone gives the same.
                let one = paged_decode_attention(&q.i(0..1)?, &c, &m.i(0..1)?, shape, scale)?;
                close(&one, &got.i(0..1)?, 0.0, &format!("{what} row alone"))?;
            }
        }
    }
    Ok(())
}

#[test]
fn attention_refuses_rows_beyond_their_blocks() -> R {
    let shape = AttentionShape {
        heads: 2,
        kv_heads: 1,
        head_dim: 8,
        block_size: 4,
    };
    let cache = Tensor::zeros((2, 2, 1, 4, 8), DType::F32, &Device::Cpu)?;
    let qkv = Tensor::zeros((1, shape.qkv_width()), DType::F32, &Device::Cpu)?;
    // 9 positions need 3 blocks; the table has 2.
    let meta = Tensor::new(&[[9u32, 0, 1]], &Device::Cpu)?;
    assert!(paged_decode_attention(&qkv, &cache, &meta, shape, 1.0).is_err());
    // A block id outside the cache.
    let meta = Tensor::new(&[[3u32, 5, 0]], &Device::Cpu)?;
    assert!(paged_decode_attention(&qkv, &cache, &meta, shape, 1.0).is_err());
    Ok(())
}

#[test]
fn group_norm_with_and_without_silu() -> R {
    let mut rng = StdRng::seed_from_u64(5);
    for dev in devices() {
        for (dims, groups) in [
            (vec![1usize, 32, 7, 5], 8usize),
            (vec![2, 64, 16, 16], 32),
            (vec![3, 6, 3, 3], 3),
            (vec![1, 320, 9, 13], 32),
        ] {
            let x = (random(&dims, 4.0, &mut rng)? + 1.5)?;
            let gamma = random(&[dims[1]], 2.0, &mut rng)?;
            let beta = random(&[dims[1]], 1.0, &mut rng)?;
            for silu in [true, false] {
                for (dtype, tol) in DTYPES {
                    let what = format!("{dev:?} {dtype:?} {dims:?}/{groups} silu {silu}");
                    let (xd, xr) = place(&x, dtype, &dev)?;
                    let (gd, gr) = place(&gamma, dtype, &dev)?;
                    let (bd, br) = place(&beta, dtype, &dev)?;
                    let got = group_norm_silu(&xd, &gd, &bd, groups, 1e-5, silu)?;
                    let want = group_norm_silu_reference(&xr, &gr, &br, groups, 1e-5, silu)?;
                    close(&got, &want, tol, &what)?;
                }
            }
        }
    }
    Ok(())
}
