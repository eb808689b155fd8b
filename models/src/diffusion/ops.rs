//! Convolutions and linear layers of the SD UNet and VAE on Kindling's
//! dense kernels (AMX split-bf16 where the CPU has it, else AVX-512/AVX2
//! f32): weights are packed once at load, a convolution is an im2col (one
//! row per output pixel, gathered from NCHW) times the packed filters.
//! Every output row is computed on its own, so results do not depend on
//! how many images share the call.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use kindling_kernels::{DenseMatrix, DenseScratch, Epilogue};
use rayon::prelude::*;

use crate::error::Result;

/// A 2-D convolution (square kernel, same padding on every side).
pub struct Conv {
    dense: DenseMatrix,
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
        let w: Vec<f32> = vb
            .get((c_out, c_in, kernel, kernel), "weight")?
            .flatten_all()?
            .to_vec1()?;
        let b: Vec<f32> = vb.get(c_out, "bias")?.to_vec1()?;
        Ok(Self {
            dense: DenseMatrix::new(&w, Some(&b), c_out, c_in * kernel * kernel),
            c_in,
            c_out,
            kernel,
            stride,
            padding,
        })
    }

    /// A 1×1 convolution from a linear layer's `[c_out, c_in]` weights.
    pub fn from_linear(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        let w: Vec<f32> = vb.get((c_out, c_in), "weight")?.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = vb.get(c_out, "bias")?.to_vec1()?;
        Ok(Self {
            dense: DenseMatrix::new(&w, Some(&b), c_out, c_in),
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
        let rows = rows.contiguous()?;
        let y = {
            let (storage, layout) = rows.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                return Err(candle_core::Error::Msg("convolutions run on the CPU".into()).into());
            };
            let x = &cpu.as_slice::<f32>()?[layout.start_offset()..][..b * pixels * self.c_in];
            self.dense.forward(x, b * pixels, Epilogue::None)
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
            let Scratch { cols, y, dense } = &mut *scratch;
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
                self.dense
                    .forward_into(cols, rows, Epilogue::None, y, dense);
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
    dense: DenseMatrix,
    n: usize,
}

impl Linear {
    /// Loads `weight` `[n, k]` and, if `bias`, `bias` `[n]` from `vb`.
    pub fn new(vb: VarBuilder, k: usize, n: usize, bias: bool) -> Result<Self> {
        let w: Vec<f32> = vb.get((n, k), "weight")?.flatten_all()?.to_vec1()?;
        let b: Option<Vec<f32>> = if bias {
            Some(vb.get(n, "bias")?.to_vec1()?)
        } else {
            None
        };
        Ok(Self {
            dense: DenseMatrix::new(&w, b.as_deref(), n, k),
            n,
        })
    }

    /// `xs · Wᵀ + b` for `xs` `[…, k]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut dims = xs.dims().to_vec();
        let k = dims.pop().unwrap_or(0);
        let rows = dims.iter().product();
        debug_assert_eq!(k, self.dense.k());
        let xs = xs.contiguous()?;
        let y = {
            let (storage, layout) = xs.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                return Err(candle_core::Error::Msg("linear layers run on the CPU".into()).into());
            };
            let x = &cpu.as_slice::<f32>()?[layout.start_offset()..][..rows * k];
            self.dense.forward(x, rows, Epilogue::None)
        };
        dims.push(self.n);
        Ok(Tensor::from_vec(y, dims, xs.device())?)
    }
}

/// Group normalization over NCHW, optionally fused with SiLU.
pub struct GroupNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    groups: usize,
    eps: f32,
}

impl GroupNorm {
    /// Loads `weight` and `bias` `[channels]` from `vb`.
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            gamma: vb.get(channels, "weight")?.to_vec1()?,
            beta: vb.get(channels, "bias")?.to_vec1()?,
            groups,
            eps: eps as f32,
        })
    }

    /// Normalizes `xs` `[batch, channels, h, w]`, then SiLU when `silu`.
    pub fn forward(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let (_, c, h, w) = xs.dims4()?;
        let xs = xs.contiguous()?;
        let mut out = vec![0f32; xs.elem_count()];
        {
            let (storage, layout) = xs.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                return Err(candle_core::Error::Msg("group norm runs on the CPU".into()).into());
            };
            let x = &cpu.as_slice::<f32>()?[layout.start_offset()..][..out.len()];
            kindling_kernels::group_norm(
                x,
                &mut out,
                c,
                h * w,
                self.groups,
                &self.gamma,
                &self.beta,
                self.eps,
                silu,
            );
        }
        Ok(Tensor::from_vec(out, xs.dims(), xs.device())?)
    }
}
