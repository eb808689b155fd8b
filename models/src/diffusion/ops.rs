//! Convolutions and linear layers of the SD UNet and VAE on Kindling's
//! dense kernels (AMX split-bf16 where the CPU has it, else AVX-512/AVX2
//! f32): weights are packed once at load, a convolution is an im2col (one
//! row per output pixel, gathered from NCHW) times the packed filters.
//! Every output row is computed on its own, so results do not depend on
//! how many images share the call.
//!
//! On a device (a CUDA GPU, or any weights other than f32 on the CPU) the
//! same layers run on candle's convolutions and products (cuBLAS) in the
//! weights' float type, with the fused GroupNorm+SiLU kernel.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use kindling_kernels::{DenseMatrix, DenseScratch, Epilogue};
use rayon::prelude::*;

use crate::error::Result;

/// Whether weights from `vb` run on our CPU kernels (f32 on the CPU) or
/// on the device path.
fn on_host(vb: &VarBuilder) -> bool {
    vb.device().is_cpu() && vb.dtype() == DType::F32
}

/// Where a layer's weights live and how it computes.
enum Weights {
    /// Packed for our CPU dense kernels.
    Host(DenseMatrix),
    /// Device tensors: `[n, k]` (convolutions `[c_out, c_in, k, k]`) and
    /// the bias `[n]`.
    Device {
        weight: Tensor,
        bias: Option<Tensor>,
    },
}

/// `xs · Wᵀ (+ b)` over the last dimension, on the device path.
fn device_linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = xs.broadcast_matmul(&weight.t()?)?;
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// A 2-D convolution (square kernel, same padding on every side).
pub struct Conv {
    weights: Weights,
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Conv {
    /// Loads `weight` `[c_out, c_in, k, k]` and `bias` from `vb`.
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((c_out, c_in, kernel, kernel), "weight")?;
        let bias = vb.get(c_out, "bias")?;
        let weights = if on_host(&vb) {
            let w: Vec<f32> = weight.flatten_all()?.to_vec1()?;
            let b: Vec<f32> = bias.to_vec1()?;
            Weights::Host(DenseMatrix::new(
                &w,
                Some(&b),
                c_out,
                c_in * kernel * kernel,
            ))
        } else {
            Weights::Device {
                weight,
                bias: Some(bias),
            }
        };
        Ok(Self {
            weights,
            c_in,
            c_out,
            kernel,
            stride,
            padding,
        })
    }

    /// A 1×1 convolution from a linear layer's `[c_out, c_in]` weights.
    pub fn from_linear(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        let weight = vb.get((c_out, c_in), "weight")?;
        let bias = vb.get(c_out, "bias")?;
        let weights = if on_host(&vb) {
            let w: Vec<f32> = weight.flatten_all()?.to_vec1()?;
            let b: Vec<f32> = bias.to_vec1()?;
            Weights::Host(DenseMatrix::new(&w, Some(&b), c_out, c_in))
        } else {
            Weights::Device {
                weight: weight.reshape((c_out, c_in, 1, 1))?,
                bias: Some(bias),
            }
        };
        Ok(Self {
            weights,
            c_in,
            c_out,
            kernel: 1,
            stride: 1,
            padding: 0,
        })
    }

    /// Convolves `xs` `[batch, c_in, h, w]` to `[batch, c_out, h', w']`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, false)
    }

    /// As `forward`, but returns pixel rows, `[batch, h'·w', c_out]` (the
    /// token layout of a spatial transformer).
    pub fn forward_rows(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, true)
    }

    /// A 1×1 convolution of pixel rows `[batch, h·w, c_in]` back to
    /// `[batch, c_out, h, w]`.
    pub fn forward_from_rows(&self, rows: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, pixels, _) = rows.dims3()?;
        debug_assert!(self.kernel == 1 && pixels == h * w);
        let dense = match &self.weights {
            Weights::Host(d) => d,
            Weights::Device { weight, bias } => {
                let weight = weight.reshape((self.c_out, self.c_in))?;
                let y = device_linear(rows, &weight, bias.as_ref())?;
                return Ok(y.transpose(1, 2)?.reshape((b, self.c_out, h, w))?);
            }
        };
        let rows = rows.contiguous()?;
        let y = {
            let (storage, layout) = rows.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                return Err(candle_core::Error::Msg("convolutions run on the CPU".into()).into());
            };
            let x = &cpu.as_slice::<f32>()?[layout.start_offset()..][..b * pixels * self.c_in];
            dense.forward(x, b * pixels, Epilogue::None)
        };
        let n = self.c_out;
        let mut out = vec![0f32; b * n * pixels];
        out.par_chunks_mut(pixels)
            .enumerate()
            .for_each(|(plane, dst)| {
                let (img, ch) = (plane / n, plane % n);
                let src = &y[img * pixels * n..(img + 1) * pixels * n];
                for (pix, v) in dst.iter_mut().enumerate() {
                    *v = src[pix * n + ch];
                }
            });
        Ok(Tensor::from_vec(out, (b, n, h, w), rows.device())?)
    }

    /// Output pixels go through in chunks, so the im2col rows of a chunk
    /// stay small and their buffers are reused.
    fn run(&self, xs: &Tensor, rows_out: bool) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        debug_assert_eq!(c, self.c_in);
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let dense = match &self.weights {
            Weights::Host(d) => d,
            Weights::Device { weight, bias } => {
                let mut y = xs.conv2d(weight, p, s, 1, 1)?;
                if let Some(bias) = bias {
                    y = y.broadcast_add(&bias.reshape((1, self.c_out, 1, 1))?)?;
                }
                if rows_out {
                    y = y.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
                }
                return Ok(y);
            }
        };
        let oh = (h + 2 * p - k) / s + 1;
        let ow = (w + 2 * p - k) / s + 1;
        let xs = xs.contiguous()?;
        let (storage, layout) = xs.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(candle_core::Error::Msg("convolutions run on the CPU".into()).into());
        };
        let x = &cpu.as_slice::<f32>()?[layout.start_offset()..];
        let kk = c * k * k;
        let pixels = oh * ow;
        let n = self.c_out;
        let total = b * pixels;
        // About 4 MB of im2col rows per chunk, whole output lines.
        let lines = ((1 << 20) / (kk * ow).max(1)).max(1);
        let chunk = lines * ow;
        let mut out = vec![0f32; b * n * pixels];
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            let Scratch {
                cols,
                y,
                dense: scratch_dense,
            } = &mut *scratch;
            let mut start = 0;
            while start < total {
                let rows = chunk.min(total - start);
                kindling_kernels::dense::resize(cols, rows * kk, 0.0);
                cols.par_chunks_mut(kk).enumerate().for_each(|(r, row)| {
                    let global = start + r;
                    let (img, pix) = (global / pixels, global % pixels);
                    let (oy, ox) = (pix / ow, pix % ow);
                    let plane = &x[img * c * h * w..(img + 1) * c * h * w];
                    // Whole kernel rows inside the image copy as slices.
                    let x0 = (ox * s) as isize - p as isize;
                    let inside = x0 >= 0 && x0 as usize + k <= w;
                    for ch in 0..c {
                        for ky in 0..k {
                            let at = (ch * k + ky) * k;
                            let iy = (oy * s + ky) as isize - p as isize;
                            if iy < 0 || iy >= h as isize {
                                row[at..at + k].fill(0.0);
                                continue;
                            }
                            let line = ch * h * w + iy as usize * w;
                            if inside {
                                let from = line + x0 as usize;
                                row[at..at + k].copy_from_slice(&plane[from..from + k]);
                                continue;
                            }
                            for kx in 0..k {
                                let ix = x0 + kx as isize;
                                row[at + kx] = if ix >= 0 && ix < w as isize {
                                    plane[line + ix as usize]
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                });
                dense.forward_into(cols, rows, Epilogue::None, y, scratch_dense);
                if rows_out {
                    out[start * n..(start + rows) * n].copy_from_slice(y);
                    start += rows;
                    continue;
                }
                // Pixel-major rows back to NCHW.
                for (r, yrow) in y.chunks(n).enumerate() {
                    let global = start + r;
                    let (img, pix) = (global / pixels, global % pixels);
                    let base = img * n * pixels + pix;
                    for (ch, &v) in yrow.iter().enumerate() {
                        out[base + ch * pixels] = v;
                    }
                }
                start += rows;
            }
        });
        if rows_out {
            return Ok(Tensor::from_vec(out, (b, pixels, n), xs.device())?);
        }
        Ok(Tensor::from_vec(out, (b, n, oh, ow), xs.device())?)
    }
}

/// `a · gelu(gate)` over rows `[…, 2·inner]` split into `a | gate`
/// (diffusers' GEGLU), with Kindling's erf.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let mut dims = h.dims().to_vec();
    let two = dims.pop().unwrap_or(0);
    let inner = two / 2;
    if !(h.device().is_cpu() && h.dtype() == DType::F32) {
        let last = dims.len();
        let (a, gate) = (h.narrow(last, 0, inner)?, h.narrow(last, inner, inner)?);
        return Ok((a * gate.gelu_erf()?)?);
    }
    let h = h.contiguous()?;
    let (storage, layout) = h.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg("GEGLU runs on the CPU".into()).into());
    };
    let x = &cpu.as_slice::<f32>()?[layout.start_offset()..][..h.elem_count()];
    let mut out = vec![0f32; x.len() / 2];
    out.par_chunks_mut(inner)
        .zip(x.par_chunks(two))
        .for_each(|(o, row)| {
            let (a, gate) = row.split_at(inner);
            for ((o, &a), &g) in o.iter_mut().zip(a).zip(gate) {
                *o = a * kindling_kernels::activation::gelu(g);
            }
        });
    dims.push(inner);
    Ok(Tensor::from_vec(out, dims, h.device())?)
}

#[derive(Default)]
struct Scratch {
    cols: Vec<f32>,
    y: Vec<f32>,
    dense: DenseScratch,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// A linear layer over the last dimension.
pub struct Linear {
    weights: Weights,
    n: usize,
}

impl Linear {
    /// Loads `weight` `[n, k]` and, if `bias`, `bias` `[n]` from `vb`.
    pub fn new(vb: VarBuilder, k: usize, n: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((n, k), "weight")?;
        let bias = if bias { Some(vb.get(n, "bias")?) } else { None };
        let weights = if on_host(&vb) {
            let w: Vec<f32> = weight.flatten_all()?.to_vec1()?;
            let b: Option<Vec<f32>> = bias.map(|b| b.to_vec1()).transpose()?;
            Weights::Host(DenseMatrix::new(&w, b.as_deref(), n, k))
        } else {
            Weights::Device { weight, bias }
        };
        Ok(Self { weights, n })
    }

    /// `xs · Wᵀ + b` for `xs` `[…, k]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dense = match &self.weights {
            Weights::Host(d) => d,
            Weights::Device { weight, bias } => return device_linear(xs, weight, bias.as_ref()),
        };
        let mut dims = xs.dims().to_vec();
        let k = dims.pop().unwrap_or(0);
        let rows = dims.iter().product();
        debug_assert_eq!(k, dense.k());
        let xs = xs.contiguous()?;
        let y = {
            let (storage, layout) = xs.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                return Err(candle_core::Error::Msg("linear layers run on the CPU".into()).into());
            };
            let x = &cpu.as_slice::<f32>()?[layout.start_offset()..][..rows * k];
            dense.forward(x, rows, Epilogue::None)
        };
        dims.push(self.n);
        Ok(Tensor::from_vec(y, dims, xs.device())?)
    }
}

/// Group normalization over NCHW, optionally fused with SiLU.
pub struct GroupNorm {
    gamma: Tensor,
    beta: Tensor,
    host: Option<(Vec<f32>, Vec<f32>)>,
    groups: usize,
    eps: f32,
}

impl GroupNorm {
    /// Loads `weight` and `bias` `[channels]` from `vb`.
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        let (gamma, beta) = (vb.get(channels, "weight")?, vb.get(channels, "bias")?);
        let host = if on_host(&vb) {
            Some((gamma.to_vec1()?, beta.to_vec1()?))
        } else {
            None
        };
        Ok(Self {
            gamma,
            beta,
            host,
            groups,
            eps: eps as f32,
        })
    }

    /// Normalizes `xs` `[batch, channels, h, w]`, then SiLU when `silu`.
    pub fn forward(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let Some((gamma, beta)) = &self.host else {
            let (g, b) = (&self.gamma, &self.beta);
            return Ok(kindling_kernels::group_norm_silu(
                xs,
                g,
                b,
                self.groups,
                self.eps,
                silu,
            )?);
        };
        let (_, c, h, w) = xs.dims4()?;
        let xs = xs.contiguous()?;
        let mut out = vec![0f32; xs.elem_count()];
        {
            let (storage, layout) = xs.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                return Err(candle_core::Error::Msg("group norm runs on the CPU".into()).into());
            };
            let x = &cpu.as_slice::<f32>()?[layout.start_offset()..][..out.len()];
            let p = kindling_kernels::GroupNorm {
                channels: c,
                plane: h * w,
                groups: self.groups,
                gamma,
                beta,
                eps: self.eps,
                silu,
            };
            kindling_kernels::group_norm(x, &mut out, &p);
        }
        Ok(Tensor::from_vec(out, xs.dims(), xs.device())?)
    }
}
