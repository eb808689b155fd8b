//! RMSNorm (fused with the residual add before it) and GroupNorm fused with
//! SiLU, as custom ops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{by_float_type, contiguous_of, rows_of, Float};

/// Normalizes each row of `x` (f32 values) into `out`.
fn rms_rows(x: &[f32], weight: &[f32], out: &mut [f32], eps: f32) {
    // The same arithmetic as candle's `rms_norm` (one running sum, then a
    // division by the root), so the two give the same bits.
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32;
    let root = (mean + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v / root * w;
    }
}

struct RmsNorm {
    eps: f32,
}

fn rms_norm_cpu<T: Float>(
    x: &CpuStorage,
    xl: &Layout,
    res: Option<(&CpuStorage, &Layout)>,
    w: &CpuStorage,
    wl: &Layout,
    eps: f32,
) -> Result<(CpuStorage, Shape)> {
    let op = "rms-norm";
    let (x, xs) = rows_of(T::cpu_storage_as_slice(x)?, xl, op)?;
    let (rows, hidden) = xl.shape().dims2()?;
    let weight = super::widen(contiguous_of(T::cpu_storage_as_slice(w)?, wl, op)?);
    if weight.len() != hidden {
        candle_core::bail!(
            "{op}: weight has {} values for rows of {hidden}",
            weight.len()
        );
    }
    let res = match res {
        Some((s, l)) => {
            if l.shape() != xl.shape() {
                candle_core::bail!(
                    "{op}: residual {:?} and x {:?} differ",
                    l.shape(),
                    xl.shape()
                );
            }
            Some(rows_of(T::cpu_storage_as_slice(s)?, l, op)?)
        }
        None => None,
    };
    let parts = if res.is_some() { 2 } else { 1 };
    let mut out = vec![T::zero(); parts * rows * hidden];
    let (sums, normed_out) = out.split_at_mut((parts - 1) * rows * hidden);
    // Rows in parallel, a few at a time: a prompt's rows are independent.
    let one_row =
        |r: usize, sum: &mut [T], normed_row: &mut [T], scratch: &mut (Vec<f32>, Vec<f32>)| {
            let (row, normed) = scratch;
            row.clear();
            let xr = &x[r * xs..r * xs + hidden];
            match res {
                Some((res, rs)) => {
                    for ((o, x), y) in sum.iter_mut().zip(xr).zip(&res[r * rs..r * rs + hidden]) {
                        // Rounded to T, as an unfused add would store it.
                        *o = T::from_f64(x.to_f64() + y.to_f64());
                        row.push(o.to_f64() as f32);
                    }
                }
                None => row.extend(xr.iter().map(|x| x.to_f64() as f32)),
            }
            normed.resize(hidden, 0.0);
            rms_rows(row, &weight, normed, eps);
            for (o, v) in normed_row.iter_mut().zip(normed.iter()) {
                *o = T::from_f64(f64::from(*v));
            }
        };
    let chunk = 16;
    let span = (chunk * hidden).max(1);
    if res.is_some() {
        sums.par_chunks_mut(span)
            .zip(normed_out.par_chunks_mut(span))
            .enumerate()
            .for_each_init(Default::default, |scratch, (c, (sum, normed))| {
                for (i, (s, n)) in sum
                    .chunks_mut(hidden)
                    .zip(normed.chunks_mut(hidden))
                    .enumerate()
                {
                    one_row(c * chunk + i, s, n, scratch);
                }
            });
    } else {
        normed_out.par_chunks_mut(span).enumerate().for_each_init(
            Default::default,
            |scratch, (c, normed)| {
                for (i, n) in normed.chunks_mut(hidden).enumerate() {
                    one_row(c * chunk + i, &mut [], n, scratch);
                }
            },
        );
    }
    let shape = if parts == 2 {
        Shape::from((2, rows, hidden))
    } else {
        Shape::from((rows, hidden))
    };
    Ok((T::to_cpu_storage_owned(out), shape))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_float_type!(
            x.dtype(),
            self.name(),
            rms_norm_cpu(x, xl, None, w, wl, self.eps)
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        by_float_type!(
            x.dtype(),
            self.name(),
            cuda::rms_norm(x, xl, None, w, wl, self.eps)
        )
    }
}

struct AddRmsNorm {
    eps: f32,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_float_type!(
            x.dtype(),
            self.name(),
            rms_norm_cpu(x, xl, Some((r, rl)), w, wl, self.eps)
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        by_float_type!(
            x.dtype(),
            self.name(),
            cuda::rms_norm(x, xl, Some((r, rl)), w, wl, self.eps)
        )
    }
}

/// RMSNorm of each row of `x` (`[rows, hidden]`, rows may be strided),
/// times `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    x.apply_op2_no_bwd(&weight.contiguous()?, &RmsNorm { eps })
}

/// `sum = x + residual` and `rms_norm(sum, weight)` in one pass. Returns
/// `(sum, normed)`, two halves of one buffer.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let both = x.apply_op3_no_bwd(residual, &weight.contiguous()?, &AddRmsNorm { eps })?;
    Ok((both.get(0)?, both.get(1)?))
}

/// The reference RMSNorm: stock candle ops in f32.
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.sqr()?.mean_keepdim(1)?;
    let y = x.broadcast_div(&(mean + f64::from(eps))?.sqrt()?)?;
    y.broadcast_mul(&weight.to_dtype(DType::F32)?)?
        .to_dtype(dtype)
}

/// The reference for [`add_rms_norm`]: an add in the tensors' dtype, then
/// [`rms_norm_reference`].
pub fn add_rms_norm_reference(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let sum = (x + residual)?;
    let normed = rms_norm_reference(&sum, weight, eps)?;
    Ok((sum, normed))
}

struct GroupNormSilu {
    groups: usize,
    eps: f32,
    silu: bool,
}

fn group_norm_cpu<T: Float>(
    op: &GroupNormSilu,
    x: &CpuStorage,
    xl: &Layout,
    g: &CpuStorage,
    gl: &Layout,
    b: &CpuStorage,
    bl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let name = "group-norm-silu";
    let (channels, plane) = group_shape(xl.dims(), op.groups)?;
    let x = super::widen(contiguous_of(T::cpu_storage_as_slice(x)?, xl, name)?);
    let gamma = super::widen(contiguous_of(T::cpu_storage_as_slice(g)?, gl, name)?);
    let beta = super::widen(contiguous_of(T::cpu_storage_as_slice(b)?, bl, name)?);
    if gamma.len() != channels || beta.len() != channels {
        candle_core::bail!(
            "{name}: {channels} channels but gamma/beta of {}/{}",
            gamma.len(),
            beta.len()
        );
    }
    let mut out = vec![0f32; x.len()];
    let p = crate::GroupNorm {
        channels,
        plane,
        groups: op.groups,
        gamma: &gamma,
        beta: &beta,
        eps: op.eps,
        silu: op.silu,
    };
    crate::group_norm(&x, &mut out, &p);
    Ok((
        T::to_cpu_storage_owned(super::narrow(&out)),
        xl.shape().clone(),
    ))
}

/// Channels and plane size of `[batch, channels, …]` in `groups` groups.
fn group_shape(dims: &[usize], groups: usize) -> Result<(usize, usize)> {
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group-norm-silu: {dims:?} does not split into {groups} groups");
    }
    Ok((dims[1], dims[2..].iter().product()))
}

impl CustomOp3 for GroupNormSilu {
    fn name(&self) -> &'static str {
        "group-norm-silu"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_float_type!(
            x.dtype(),
            self.name(),
            group_norm_cpu(self, x, xl, g, gl, b, bl)
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        by_float_type!(
            x.dtype(),
            self.name(),
            cuda::group_norm(self, x, xl, g, gl, b, bl)
        )
    }
}

/// GroupNorm over `x` (`[batch, channels, …]`, contiguous) with per-channel
/// `gamma` and `beta`, then SiLU when `silu`.
pub fn group_norm_silu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    let op = GroupNormSilu { groups, eps, silu };
    x.contiguous()?
        .apply_op3_no_bwd(&gamma.contiguous()?, &beta.contiguous()?, &op)
}

/// The reference for [`group_norm_silu`]: stock candle ops in f32.
pub fn group_norm_silu_reference(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let dims = x.dims().to_vec();
    let (channels, _) = group_shape(&dims, groups)?;
    let x = x.to_dtype(DType::F32)?.reshape((dims[0], groups, ()))?;
    let mean = x.mean_keepdim(2)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let y = centred.broadcast_div(&(var + f64::from(eps))?.sqrt()?)?;
    let mut affine = vec![1usize; dims.len()];
    affine[1] = channels;
    let y = y.reshape(dims.as_slice())?;
    let y = y
        .broadcast_mul(&gamma.to_dtype(DType::F32)?.reshape(affine.as_slice())?)?
        .broadcast_add(&beta.to_dtype(DType::F32)?.reshape(affine.as_slice())?)?;
    let y = if silu { y.silu()? } else { y };
    y.to_dtype(dtype)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CudaStorage, Layout, Result, Shape};

    use crate::fused::cuda::{int, kernel, launched, output, row_threads, view, NORM};

    fn row_stride(l: &Layout, op: &str) -> Result<usize> {
        let (n, c) = l.shape().dims2()?;
        let s = l.stride();
        if c > 1 && s[1] != 1 {
            candle_core::bail!("{op}: rows must be contiguous (strides {s:?})");
        }
        Ok(if n > 1 { s[0] } else { c })
    }

    pub(super) fn rms_norm<T: CudaDType + DeviceRepr>(
        x: &CudaStorage,
        xl: &Layout,
        res: Option<(&CudaStorage, &Layout)>,
        w: &CudaStorage,
        wl: &Layout,
        eps: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let op = "rms-norm";
        let dev = x.device().clone();
        let (rows, hidden) = xl.shape().dims2()?;
        let parts = if res.is_some() { 2 } else { 1 };
        let out = output::<T>(&dev, parts * rows * hidden)?;
        let func = kernel(&dev, NORM, "rms_norm", x.dtype())?;
        let stream = dev.cuda_stream();
        let xv = view::<T>(x, xl)?;
        let wv = view::<T>(w, wl)?;
        let rv = res.map(|(s, l)| view::<T>(s, l)).transpose()?;
        let args = [
            int(rows, "rows")?,
            int(hidden, "hidden")?,
            int(row_stride(xl, op)?, "stride")?,
            int(res.map_or(Ok(0), |(_, l)| row_stride(l, op))?, "stride")?,
        ];
        let cfg = LaunchConfig {
            grid_dim: (rows.max(1) as u32, 1, 1),
            block_dim: (row_threads(hidden), 1, 1),
            shared_mem_bytes: 0,
        };
        let null = 0u64;
        let mut b = stream.launch_builder(&func);
        b.arg(&xv);
        match &rv {
            Some(r) => b.arg(r),
            None => b.arg(&null),
        };
        b.arg(&wv).arg(&out);
        for a in &args {
            b.arg(a);
        }
        b.arg(&eps);
        // SAFETY: the kernel reads `rows` rows at the given strides and
        // writes `parts * rows * hidden` elements of `out`.
        launched(unsafe { b.launch(cfg) }.map(|_| ()))?;
        let shape = if parts == 2 {
            Shape::from((2, rows, hidden))
        } else {
            Shape::from((rows, hidden))
        };
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }

    pub(super) fn group_norm<T: CudaDType + DeviceRepr>(
        op: &super::GroupNormSilu,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (channels, plane) = super::group_shape(xl.dims(), op.groups)?;
        let dev = x.device().clone();
        let n = xl.shape().elem_count();
        let units = n / (channels / op.groups * plane).max(1);
        let out = output::<T>(&dev, n)?;
        let func = kernel(&dev, NORM, "group_norm", x.dtype())?;
        let stream = dev.cuda_stream();
        let (xv, gv, bv) = (view::<T>(x, xl)?, view::<T>(g, gl)?, view::<T>(b, bl)?);
        let args = [
            int(channels, "channels")?,
            int(plane, "plane")?,
            int(op.groups, "groups")?,
        ];
        let silu = i32::from(op.silu);
        let cfg = LaunchConfig {
            grid_dim: (units.max(1) as u32, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = stream.launch_builder(&func);
        l.arg(&xv).arg(&gv).arg(&bv).arg(&out);
        for a in &args {
            l.arg(a);
        }
        l.arg(&op.eps).arg(&silu);
        // SAFETY: one block per (image, group), each within `n` elements.
        launched(unsafe { l.launch(cfg) }.map(|_| ()))?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), xl.shape().clone()))
    }
}
