//! Launchers for `kernels/cuda/attention.cu`, generic over the element type
//! (the ops dispatch on the storage's dtype).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, Shape};

use super::{CacheWrite, PagedAttention, Rope};
use crate::fused::cuda::{elementwise, int, kernel, launched, output, view, ATTENTION};

/// Rows, and the row stride, of a 2-D operand with contiguous rows.
fn rows(l: &Layout, op: &str) -> Result<(usize, usize)> {
    let (n, c) = l.shape().dims2()?;
    let s = l.stride();
    if c > 1 && s[1] != 1 {
        candle_core::bail!("{op}: rows must be contiguous (strides {s:?})");
    }
    Ok((n, if n > 1 { s[0] } else { c }))
}

fn check_u32(s: &CudaStorage, op: &str) -> Result<()> {
    if s.dtype() != DType::U32 {
        candle_core::bail!("{op}: expected u32 indices, got {:?}", s.dtype());
    }
    Ok(())
}

pub(super) fn rope<T: CudaDType + DeviceRepr>(
    op: &Rope,
    x: &mut CudaStorage,
    xl: &Layout,
    p: &CudaStorage,
    pl: &Layout,
    t: &CudaStorage,
    tl: &Layout,
) -> Result<()> {
    let (n, stride) = rows(xl, "rope")?;
    if op.rotated * op.head_dim > xl.dims()[1] || pl.shape().elem_count() != n {
        candle_core::bail!("rope: {:?} for {n} positions", xl.dims());
    }
    check_u32(p, "rope")?;
    let dev = x.device().clone();
    let func = kernel(&dev, ATTENTION, "rope", x.dtype())?;
    let stream = dev.cuda_stream();
    let pv = view::<u32>(p, pl)?;
    let tv = view::<f32>(t, tl)?;
    let mut xv = x.as_cuda_slice_mut::<T>()?.slice_mut(xl.start_offset()..);
    let args = [
        int(n, "rows")?,
        int(op.rotated, "heads")?,
        int(op.head_dim, "head_dim")?,
        int(stride, "stride")?,
        i32::from(op.interleaved),
    ];
    let mut b = stream.launch_builder(&func);
    b.arg(&mut xv).arg(&pv).arg(&tv);
    for a in &args {
        b.arg(a);
    }
    // SAFETY: rows × rotated heads of pairs, all inside x's layout.
    launched(unsafe { b.launch(elementwise(n * op.rotated * op.head_dim / 2)) }.map(|_| ()))
}

pub(super) fn cache_write<T: CudaDType + DeviceRepr>(
    op: &CacheWrite,
    cache: &mut CudaStorage,
    cl: &Layout,
    qkv: &CudaStorage,
    ql: &Layout,
    s: &CudaStorage,
    sl: &Layout,
) -> Result<()> {
    let sh = op.shape;
    let (n, stride) = rows(ql, "cache-write")?;
    let Some((c0, c1)) = cl.contiguous_offsets() else {
        candle_core::bail!("cache-write: the cache must be contiguous");
    };
    if ql.dims()[1] < sh.qkv_width() || sl.shape().elem_count() != n {
        candle_core::bail!(
            "cache-write: {:?} for {} slots",
            ql.dims(),
            sl.shape().elem_count()
        );
    }
    check_u32(s, "cache-write")?;
    let dev = cache.device().clone();
    let func = kernel(&dev, ATTENTION, "cache_write", cache.dtype())?;
    let stream = dev.cuda_stream();
    let qv = view::<T>(qkv, ql)?;
    let sv = view::<u32>(s, sl)?;
    let mut cv = cache.as_cuda_slice_mut::<T>()?.slice_mut(c0..c1);
    let args = [
        int(n, "rows")?,
        int(sh.heads, "heads")?,
        int(sh.kv_heads, "kv_heads")?,
        int(sh.head_dim, "head_dim")?,
        int(stride, "stride")?,
        int(sh.block_size, "block_size")?,
    ];
    let values_offset = ((c1 - c0) / 2) as u64;
    let mut b = stream.launch_builder(&func);
    b.arg(&mut cv).arg(&qv).arg(&sv);
    for a in &args {
        b.arg(a);
    }
    b.arg(&values_offset);
    // SAFETY: the engine hands out slots inside the cache's blocks.
    launched(unsafe { b.launch(elementwise(n * sh.kv_heads * sh.head_dim)) }.map(|_| ()))
}

pub(super) fn paged_attention<T: CudaDType + DeviceRepr>(
    op: &PagedAttention,
    qkv: &CudaStorage,
    ql: &Layout,
    cache: &CudaStorage,
    cl: &Layout,
    m: &CudaStorage,
    ml: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let sh = op.shape;
    let (n, stride) = rows(ql, "paged-attention")?;
    let (meta_rows, meta_stride) = ml.shape().dims2()?;
    let Some((c0, c1)) = cl.contiguous_offsets() else {
        candle_core::bail!("paged-attention: the cache must be contiguous");
    };
    if meta_rows != n || meta_stride < 2 {
        candle_core::bail!("paged-attention: {meta_rows} metadata rows for {n} rows");
    }
    check_u32(m, "paged-attention")?;
    let dev = qkv.device().clone();
    let width = sh.heads * sh.head_dim;
    let out = output::<T>(&dev, n * width)?;
    let func = kernel(&dev, ATTENTION, "paged_attention", qkv.dtype())?;
    let stream = dev.cuda_stream();
    let qv = view::<T>(qkv, ql)?;
    let cv = cache.as_cuda_slice::<T>()?.slice(c0..c1);
    let mv = view::<u32>(m, ml)?;
    let args = [
        int(sh.heads, "heads")?,
        int(sh.kv_heads, "kv_heads")?,
        int(sh.head_dim, "head_dim")?,
        int(stride, "stride")?,
        int(sh.block_size, "block_size")?,
        int(meta_stride, "meta_stride")?,
    ];
    let values_offset = ((c1 - c0) / 2) as u64;
    let cfg = LaunchConfig {
        grid_dim: (sh.heads as u32, n.max(1) as u32, 1),
        // 8 warps, as WARPS in attention.cu.
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(&func);
    b.arg(&out).arg(&qv).arg(&cv).arg(&mv);
    for a in &args {
        b.arg(a);
    }
    b.arg(&values_offset).arg(&op.scale);
    // SAFETY: one block per (head, row); block tables index the cache (the
    // engine checks them against its pool).
    launched(unsafe { b.launch(cfg) }.map(|_| ()))?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((n, width)),
    ))
}
