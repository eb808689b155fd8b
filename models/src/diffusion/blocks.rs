//! The UNet's and VAE's building blocks, as diffusers defines them:
//! resnets, spatial transformers (self- and cross-attention, GEGLU), down-
//! and up-sampling. Convolutions and linear layers run on Kindling's dense
//! kernels ([`super::ops`]); norms, softmax and the attention products on
//! candle, per image.

use candle_core::{Module, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use super::ops::{geglu, Conv, GroupNorm, Linear};
use crate::error::Result;

/// `ResnetBlock2D`.
pub struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    time: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
    scale: f64,
}

impl Resnet {
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
        scale: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, c_in, eps)?,
            conv1: Conv::new(vb.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            time: temb
                .map(|t| Linear::new(vb.pp("time_emb_proj"), t, c_out, true))
                .transpose()?,
            norm2: GroupNorm::new(vb.pp("norm2"), groups, c_out, eps)?,
            conv2: Conv::new(vb.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            shortcut: (c_in != c_out)
                .then(|| Conv::new(vb.pp("conv_shortcut"), c_in, c_out, 1, 1, 0))
                .transpose()?,
            scale,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(xs, true)?)?;
        let h = match (&self.time, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(&candle_nn::ops::silu(t)?)?;
                h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward(&h, true)?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = (skip + h)?;
        Ok(if self.scale == 1.0 {
            out
        } else {
            (out / self.scale)?
        })
    }
}

/// Multi-head attention (`Attention` with `to_q`/`to_k`/`to_v`/`to_out.0`).
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    /// `context` is the key/value width for cross-attention (`None`: self).
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        context: Option<usize>,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        Self::named(
            vb,
            ["to_q", "to_k", "to_v", "to_out.0"],
            dim,
            context,
            heads,
            head_dim,
            qkv_bias,
        )
    }

    /// As `new`, with the four projections' weight names.
    pub fn named(
        vb: VarBuilder,
        names: [&str; 4],
        dim: usize,
        context: Option<usize>,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let ctx = context.unwrap_or(dim);
        Ok(Self {
            q: Linear::new(vb.pp(names[0]), dim, inner, qkv_bias)?,
            k: Linear::new(vb.pp(names[1]), ctx, inner, qkv_bias)?,
            v: Linear::new(vb.pp(names[2]), ctx, inner, qkv_bias)?,
            out: Linear::new(vb.pp(names[3]), inner, dim, true)?,
            heads,
        })
    }

    /// `xs` `[batch, tokens, dim]`, `context` `[batch, keys, ctx]` or self.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let ctx = context.unwrap_or(xs);
        let q = self.q.forward(xs)?;
        let k = self.k.forward(ctx)?;
        let v = self.v.forward(ctx)?;
        let inner = q.dim(2)?;
        let hd = inner / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            let n = t.dim(1)?;
            Ok(t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let scores = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, inner))?;
        self.out.forward(&ctx)
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    geglu: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        context: usize,
    ) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, head_dim, false)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, Some(context), heads, head_dim, false)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            geglu: Linear::new(vb.pp("ff.net.0.proj"), dim, 2 * inner, true)?,
            ff_out: Linear::new(vb.pp("ff.net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        let h = geglu(&self.geglu.forward(&self.norm3.forward(&xs)?)?)?;
        Ok((self.ff_out.forward(&h)? + xs)?)
    }
}

/// `Transformer2DModel`: norm, projection in, transformer blocks,
/// projection out, plus the input.
pub struct SpatialTransformer {
    norm: GroupNorm,
    /// 1×1 convolutions (a linear projection is one too).
    proj_in: Conv,
    blocks: Vec<TransformerBlock>,
    proj_out: Conv,
}

impl SpatialTransformer {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        depth: usize,
        context: usize,
        linear: bool,
        groups: usize,
    ) -> Result<Self> {
        let proj = |name: &str| -> Result<Conv> {
            if linear {
                Conv::from_linear(vb.pp(name), channels, channels)
            } else {
                Conv::new(vb.pp(name), channels, channels, 1, 1, 0)
            }
        };
        let head_dim = channels / heads;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), groups, channels, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..depth)
                .map(|i| {
                    TransformerBlock::new(
                        vb.pp(format!("transformer_blocks.{i}")),
                        channels,
                        heads,
                        head_dim,
                        context,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let x = self.norm.forward(xs, false)?;
        let mut x = self.proj_in.forward_rows(&x)?;
        for block in &self.blocks {
            x = block.forward(&x, context)?;
        }
        Ok((self.proj_out.forward_from_rows(&x, h, w)? + xs)?)
    }
}

/// One level of the UNet going down: resnets (with spatial transformers
/// when it has attention), then a stride-2 convolution unless last.
pub struct DownBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<SpatialTransformer>,
    down: Option<Conv>,
}

/// The shape of a UNet level.
#[derive(Debug, Clone, Copy)]
pub struct Level {
    pub c_in: usize,
    pub c_out: usize,
    pub layers: usize,
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    /// `(heads, transformer layers, context width, linear projection)`.
    pub attention: Option<(usize, usize, usize, bool)>,
}

impl Level {
    /// Layer `i` of the level: a resnet from `c_in` channels, and the
    /// spatial transformer after it when the level has attention.
    fn layer(
        &self,
        vb: &VarBuilder,
        i: usize,
        c_in: usize,
    ) -> Result<(Resnet, Option<SpatialTransformer>)> {
        let resnet = Resnet::new(
            vb.pp(format!("resnets.{i}")),
            c_in,
            self.c_out,
            Some(self.temb),
            self.groups,
            self.eps,
            1.0,
        )?;
        let attention = self
            .attention
            .map(|(heads, depth, ctx, linear)| {
                SpatialTransformer::new(
                    vb.pp(format!("attentions.{i}")),
                    self.c_out,
                    heads,
                    depth,
                    ctx,
                    linear,
                    self.groups,
                )
            })
            .transpose()?;
        Ok((resnet, attention))
    }
}

impl DownBlock {
    pub fn new(vb: VarBuilder, l: Level, downsample: Option<usize>) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..l.layers {
            let c_in = if i == 0 { l.c_in } else { l.c_out };
            let (resnet, attention) = l.layer(&vb, i, c_in)?;
            resnets.push(resnet);
            attentions.extend(attention);
        }
        let down = downsample
            .map(|pad| Conv::new(vb.pp("downsamplers.0.conv"), l.c_out, l.c_out, 3, 2, pad))
            .transpose()?;
        Ok(Self {
            resnets,
            attentions,
            down,
        })
    }

    /// Returns the output and the states the up path concatenates.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = xs.clone();
        let mut states = Vec::new();
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
            states.push(x.clone());
        }
        if let Some(down) = &self.down {
            x = down.forward(&x)?;
            states.push(x.clone());
        }
        Ok((x, states))
    }
}

/// Nearest-neighbour ×2 (or to `size`) and a 3×3 convolution.
pub struct Upsample {
    conv: Conv,
}

impl Upsample {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv::new(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&xs.upsample_nearest2d(th, tw)?)
    }
}

/// One level of the UNet going up: each resnet takes the running state
/// concatenated with a saved down-path state.
pub struct UpBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<SpatialTransformer>,
    up: Option<Upsample>,
}

impl UpBlock {
    /// `prev` is the width coming from below, `l.c_in` the width of the
    /// matching down level's input.
    pub fn new(vb: VarBuilder, l: Level, prev: usize, upsample: bool) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..l.layers {
            let skip = if i + 1 == l.layers { l.c_in } else { l.c_out };
            let c_in = if i == 0 { prev } else { l.c_out };
            let (resnet, attention) = l.layer(&vb, i, c_in + skip)?;
            resnets.push(resnet);
            attentions.extend(attention);
        }
        let up = upsample
            .then(|| Upsample::new(vb.pp("upsamplers.0"), l.c_out))
            .transpose()?;
        Ok(Self {
            resnets,
            attentions,
            up,
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut x = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("UNet skip states ran out".into()))?;
            x = resnet.forward(&Tensor::cat(&[&x, &skip], 1)?, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
        }
        match &self.up {
            Some(up) => up.forward(&x, size),
            None => Ok(x),
        }
    }
}
