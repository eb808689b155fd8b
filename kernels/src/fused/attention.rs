//! A decoder layer's attention over the paged KV cache, on fused q|k|v rows
//! (`heads` query heads, then `kv_heads` key heads, then `kv_heads` value
//! heads per row; rows may be strided):
//!
//! - [`rope_in_place`] rotates the query and key heads where they are;
//! - [`cache_write`] copies each row's keys and values into its cache slot;
//! - [`paged_decode_attention`] attends each row over its sequence's blocks.
//!
//! The cache of one layer is one tensor `[2, blocks, kv_heads, block_size,
//! head_dim]`: keys, then values, in [`crate::PagedLayout`]'s order.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp3, DType, InplaceOp3, Layout, Result, Shape, Tensor, WithDType,
};

use super::{by_float_type, contiguous_of, rows_of, Float};
use crate::{PagedLayout, QueryRow};

/// The attention geometry of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Positions per cache block.
    pub block_size: usize,
}

impl AttentionShape {
    /// Elements of one fused q|k|v row.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    fn layout(&self) -> PagedLayout {
        PagedLayout {
            block_size: self.block_size,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }

    fn check(&self, op: &str) -> Result<()> {
        if self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
            || self.head_dim == 0
            || !self.head_dim.is_multiple_of(2)
            || self.head_dim > 256
            || self.block_size == 0
        {
            candle_core::bail!("{op}: unsupported attention shape {self:?}");
        }
        Ok(())
    }
}

fn u32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [u32]> {
    contiguous_of(s.as_slice::<u32>()?, l, op)
}

struct Rope {
    rotated: usize,
    head_dim: usize,
    interleaved: bool,
}

fn rotate(h: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x0, x1) = (h[a], h[b]);
        h[a] = x0 * cos[i] - x1 * sin[i];
        h[b] = x1 * cos[i] + x0 * sin[i];
    }
}

fn rope_cpu<T: Float>(
    op: &Rope,
    x: &mut CpuStorage,
    xl: &Layout,
    pos: &[u32],
    table: &[f32],
) -> Result<()> {
    let name = "rope";
    let (rows, width) = xl.shape().dims2()?;
    let stride = xl.stride();
    let rs = if rows > 1 { stride[0] } else { width };
    if (width > 1 && stride[1] != 1) || op.rotated * op.head_dim > width || pos.len() != rows {
        candle_core::bail!(
            "{name}: {rows} positions for x {:?} strides {stride:?}",
            xl.dims()
        );
    }
    let half = op.head_dim / 2;
    let data = T::slice_mut(x)?;
    let mut head = vec![0f32; op.head_dim];
    for (r, &p) in pos.iter().enumerate() {
        let at = p as usize * 2 * half;
        let Some(cs) = table.get(at..at + 2 * half) else {
            candle_core::bail!("{name}: position {p} is outside the table");
        };
        let (cos, sin) = cs.split_at(half);
        for h in 0..op.rotated {
            let start = xl.start_offset() + r * rs + h * op.head_dim;
            let dst = &mut data[start..start + op.head_dim];
            for (v, x) in head.iter_mut().zip(dst.iter()) {
                *v = x.to_f64() as f32;
            }
            rotate(&mut head, cos, sin, op.interleaved);
            for (x, v) in dst.iter_mut().zip(&head) {
                *x = T::from_f64(f64::from(*v));
            }
        }
    }
    Ok(())
}

impl InplaceOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        x: &mut CpuStorage,
        xl: &Layout,
        p: &CpuStorage,
        pl: &Layout,
        t: &CpuStorage,
        tl: &Layout,
    ) -> Result<()> {
        let pos = u32s(p, pl, "rope")?;
        let table = contiguous_of(t.as_slice::<f32>()?, tl, "rope")?;
        by_float_type!(x.dtype(), "rope", rope_cpu(self, x, xl, pos, table))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &mut candle_core::CudaStorage,
        xl: &Layout,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        t: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<()> {
        by_float_type!(x.dtype(), "rope", cuda::rope(self, x, xl, p, pl, t, tl))
    }
}

/// Rotates the first `rotated` heads (the query and key heads) of every
/// row of `qkv` in place, row `r` at `positions[r]` (u32 `[rows]`). `table`
/// is f32 `[positions, 2, head_dim / 2]` (cosines, then sines; see
/// [`crate::RopeTables::cos_sin`]). `interleaved`: pairs `(2i, 2i+1)`
/// (GGUF), else `(i, i + half)`.
pub fn rope_in_place(
    qkv: &Tensor,
    positions: &Tensor,
    table: &Tensor,
    rotated: usize,
    head_dim: usize,
    interleaved: bool,
) -> Result<()> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        candle_core::bail!("rope: head_dim {head_dim} must be even");
    }
    let op = Rope {
        rotated,
        head_dim,
        interleaved,
    };
    qkv.inplace_op3(&positions.contiguous()?, &table.contiguous()?, &op)
}

/// The reference rotation: a new f32 tensor from plain loops.
pub fn rope_reference(
    qkv: &Tensor,
    positions: &[u32],
    table: &[f32],
    rotated: usize,
    head_dim: usize,
    interleaved: bool,
) -> Result<Tensor> {
    let mut rows = qkv.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let half = head_dim / 2;
    for (row, &p) in rows.iter_mut().zip(positions) {
        let cs = &table[p as usize * 2 * half..(p as usize + 1) * 2 * half];
        for h in row.chunks_mut(head_dim).take(rotated) {
            rotate(h, &cs[..half], &cs[half..], interleaved);
        }
    }
    Tensor::new(rows, qkv.device())?.to_dtype(qkv.dtype())
}

struct CacheWrite {
    shape: AttentionShape,
}

fn cache_write_cpu<T: Float>(
    op: &CacheWrite,
    cache: &mut CpuStorage,
    cl: &Layout,
    qkv: &CpuStorage,
    ql: &Layout,
    slots: &[u32],
) -> Result<()> {
    let s = op.shape;
    let (rows, width) = ql.shape().dims2()?;
    let (src, rs) = rows_of(T::cpu_storage_as_slice(qkv)?, ql, "cache-write")?;
    let Some((c0, c1)) = cl.contiguous_offsets() else {
        candle_core::bail!("cache-write: the cache must be contiguous");
    };
    let half = (c1 - c0) / 2;
    if width < s.qkv_width() || slots.len() != rows {
        candle_core::bail!("cache-write: {rows} slots for qkv {:?}", ql.dims());
    }
    let layout = s.layout();
    let dst = &mut T::slice_mut(cache)?[c0..c1];
    let d = s.head_dim;
    for (r, &slot) in slots.iter().enumerate() {
        let (block, at) = (slot as usize / s.block_size, slot as usize % s.block_size);
        let row = &src[r * rs..r * rs + s.qkv_width()];
        for h in 0..s.kv_heads {
            let o = layout.offset(block as u32, h, at);
            if o + d > half {
                candle_core::bail!("cache-write: slot {slot} is outside the cache");
            }
            let k = &row[(s.heads + h) * d..(s.heads + h + 1) * d];
            let v = &row[(s.heads + s.kv_heads + h) * d..(s.heads + s.kv_heads + h + 1) * d];
            dst[o..o + d].copy_from_slice(k);
            dst[half + o..half + o + d].copy_from_slice(v);
        }
    }
    Ok(())
}

impl InplaceOp3 for CacheWrite {
    fn name(&self) -> &'static str {
        "cache-write"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        qkv: &CpuStorage,
        ql: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let slots = u32s(s, sl, "cache-write")?;
        by_float_type!(
            cache.dtype(),
            "cache-write",
            cache_write_cpu(self, cache, cl, qkv, ql, slots)
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cl: &Layout,
        qkv: &candle_core::CudaStorage,
        ql: &Layout,
        s: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        by_float_type!(
            cache.dtype(),
            "cache-write",
            cuda::cache_write(self, cache, cl, qkv, ql, s, sl)
        )
    }
}

/// Writes every row's key and value heads from `qkv` into `cache` (one
/// layer, `[2, blocks, kv_heads, block_size, head_dim]`) at `slots[r]` =
/// `block * block_size + position % block_size` (u32 `[rows]`).
pub fn cache_write(
    cache: &Tensor,
    qkv: &Tensor,
    slots: &Tensor,
    shape: AttentionShape,
) -> Result<()> {
    shape.check("cache-write")?;
    cache.inplace_op3(qkv, &slots.contiguous()?, &CacheWrite { shape })
}

/// The reference cache write: a new cache tensor from plain loops.
pub fn cache_write_reference(
    cache: &Tensor,
    qkv: &Tensor,
    slots: &[u32],
    shape: AttentionShape,
) -> Result<Tensor> {
    let dims = cache.dims().to_vec();
    let mut c = cache
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let half = c.len() / 2;
    let rows = qkv.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let d = shape.head_dim;
    for (row, &slot) in rows.iter().zip(slots) {
        let (block, at) = (
            slot as usize / shape.block_size,
            slot as usize % shape.block_size,
        );
        for h in 0..shape.kv_heads {
            let o = ((block * shape.kv_heads + h) * shape.block_size + at) * d;
            for i in 0..d {
                c[o + i] = row[(shape.heads + h) * d + i];
                c[half + o + i] = row[(shape.heads + shape.kv_heads + h) * d + i];
            }
        }
    }
    Tensor::from_vec(c, dims, cache.device())?.to_dtype(cache.dtype())
}

struct PagedAttention {
    shape: AttentionShape,
    scale: f32,
}

fn attention_cpu<T: Float>(
    op: &PagedAttention,
    qkv: &CpuStorage,
    ql: &Layout,
    cache: &CpuStorage,
    cl: &Layout,
    meta: &[u32],
    meta_stride: usize,
) -> Result<(CpuStorage, Shape)> {
    let s = op.shape;
    let name = "paged-attention";
    let (rows, _) = ql.shape().dims2()?;
    let (src, rs) = rows_of(T::cpu_storage_as_slice(qkv)?, ql, name)?;
    let cache = super::widen(contiguous_of(T::cpu_storage_as_slice(cache)?, cl, name)?);
    let (keys, values) = cache.split_at(cache.len() / 2);
    let q_len = s.heads * s.head_dim;
    let mut q = Vec::with_capacity(rows * q_len);
    for r in 0..rows {
        q.extend(
            src[r * rs..r * rs + q_len]
                .iter()
                .map(|v| v.to_f64() as f32),
        );
    }
    let query_rows = query_rows(meta, meta_stride, rows, s, keys.len())?;
    let scoring = crate::Scoring::scaled(op.scale);
    let out = crate::paged_attention(&q, s.heads, &query_rows, keys, values, s.layout(), scoring);
    Ok((
        T::to_cpu_storage_owned(super::narrow(&out)),
        Shape::from((rows, q_len)),
    ))
}

/// The query rows a metadata tensor describes, checked against the cache.
fn query_rows(
    meta: &[u32],
    stride: usize,
    rows: usize,
    s: AttentionShape,
    half_len: usize,
) -> Result<Vec<QueryRow<'_>>> {
    let blocks_in_cache = half_len / s.layout().block_len().max(1);
    (0..rows)
        .map(|r| {
            let m = &meta[r * stride..(r + 1) * stride];
            let seen = m[0] as usize;
            let blocks = &m[1..];
            if seen == 0
                || seen.div_ceil(s.block_size) > blocks.len()
                || blocks[..seen.div_ceil(s.block_size)]
                    .iter()
                    .any(|&b| b as usize >= blocks_in_cache)
            {
                candle_core::bail!(
                    "paged-attention: row {r} sees {seen} positions beyond its blocks"
                );
            }
            Ok(QueryRow { blocks, seen })
        })
        .collect()
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        ql: &Layout,
        cache: &CpuStorage,
        cl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, stride) = ml.shape().dims2()?;
        let meta = u32s(m, ml, self.name())?;
        if rows != ql.shape().dims2()?.0 || stride < 2 {
            candle_core::bail!(
                "paged-attention: metadata {:?} for {:?}",
                ml.dims(),
                ql.dims()
            );
        }
        by_float_type!(
            qkv.dtype(),
            self.name(),
            attention_cpu(self, qkv, ql, cache, cl, meta, stride)
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &candle_core::CudaStorage,
        ql: &Layout,
        cache: &candle_core::CudaStorage,
        cl: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        by_float_type!(
            qkv.dtype(),
            self.name(),
            cuda::paged_attention(self, qkv, ql, cache, cl, m, ml)
        )
    }
}

/// Attention of every row's query heads over its sequence's cached keys
/// and values. `meta` is u32 `[rows, 1 + max_blocks]`: the positions the
/// row sees (its own position + 1), then its block table. Returns
/// `[rows, heads * head_dim]`. Keys and values must already be written
/// ([`cache_write`]) and queries rotated ([`rope_in_place`]).
pub fn paged_decode_attention(
    qkv: &Tensor,
    cache: &Tensor,
    meta: &Tensor,
    shape: AttentionShape,
    scale: f32,
) -> Result<Tensor> {
    shape.check("paged-attention")?;
    let op = PagedAttention { shape, scale };
    qkv.apply_op3_no_bwd(&cache.contiguous()?, &meta.contiguous()?, &op)
}

/// The reference attention: each row's keys and values gathered from the
/// cache by plain loops, softmax in f64.
pub fn paged_decode_attention_reference(
    qkv: &Tensor,
    cache: &Tensor,
    meta: &[Vec<u32>],
    shape: AttentionShape,
    scale: f32,
) -> Result<Tensor> {
    let rows = qkv.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let c = cache
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let half = c.len() / 2;
    let (d, group) = (shape.head_dim, shape.heads / shape.kv_heads);
    let mut out = Vec::with_capacity(rows.len() * shape.heads * d);
    for (row, m) in rows.iter().zip(meta) {
        let seen = m[0] as usize;
        for h in 0..shape.heads {
            let q = &row[h * d..(h + 1) * d];
            let at = |p: usize| {
                let block = m[1 + p / shape.block_size] as usize;
                ((block * shape.kv_heads + h / group) * shape.block_size + p % shape.block_size) * d
            };
            let scores: Vec<f64> = (0..seen)
                .map(|p| {
                    let k = &c[at(p)..at(p) + d];
                    q.iter().zip(k).map(|(a, b)| f64::from(a * b)).sum::<f64>() * f64::from(scale)
                })
                .collect();
            let top = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
            let total: f64 = weights.iter().sum();
            for i in 0..d {
                let y: f64 = (0..seen)
                    .map(|p| weights[p] * f64::from(c[half + at(p) + i]))
                    .sum();
                out.push(<f32 as WithDType>::from_f64(y / total));
            }
        }
    }
    Tensor::from_vec(out, (rows.len(), shape.heads * d), qkv.device())?.to_dtype(qkv.dtype())
}

#[cfg(feature = "cuda")]
#[path = "attention_cuda.rs"]
mod cuda;
