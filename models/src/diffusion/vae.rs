//! The VAE decoder (`AutoencoderKL`'s `post_quant_conv` and `decoder`) on
//! Kindling's blocks: latents to pixels.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::blocks::{Attention, Resnet, Upsample};
use super::config::VaeConfig;
use super::ops::{Conv, GroupNorm};
use crate::error::Result;

struct MidAttention {
    norm: GroupNorm,
    attention: Attention,
}

impl MidAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        // diffusers' names, or the legacy ones of older checkpoints.
        let names = if vb.contains_tensor("to_q.weight") || !vb.contains_tensor("query.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        Ok(Self {
            norm: GroupNorm::new(vb.pp("group_norm"), groups, channels, 1e-6)?,
            attention: Attention::named(vb, names, channels, None, 1, channels, true)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let x = self
            .norm
            .forward(xs, false)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let x = self.attention.forward(&x, None)?;
        let x = x.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((x + xs)?)
    }
}

struct UpLevel {
    resnets: Vec<Resnet>,
    up: Option<Upsample>,
}

/// The decoder half of an `AutoencoderKL`.
pub struct VaeDecoder {
    post_quant: Option<Conv>,
    conv_in: Conv,
    mid: (Resnet, MidAttention, Resnet),
    levels: Vec<UpLevel>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl VaeDecoder {
    /// Loads from the `vae/` weights.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let latent = cfg.latent_channels;
        let post_quant = cfg
            .use_post_quant_conv
            .then(|| Conv::new(vb.pp("post_quant_conv"), latent, latent, 1, 1, 0))
            .transpose()?;
        let d = vb.pp("decoder");
        let g = cfg.norm_num_groups;
        let channels: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let top = channels[0];
        let conv_in = Conv::new(d.pp("conv_in"), latent, top, 3, 1, 1)?;
        let m = d.pp("mid_block");
        let mid = (
            Resnet::new(m.pp("resnets.0"), top, top, None, g, 1e-6, 1.0)?,
            MidAttention::new(m.pp("attentions.0"), top, g)?,
            Resnet::new(m.pp("resnets.1"), top, top, None, g, 1e-6, 1.0)?,
        );
        let mut levels = Vec::new();
        let mut prev = top;
        for (i, &c) in channels.iter().enumerate() {
            let v = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let c_in = if j == 0 { prev } else { c };
                    Resnet::new(v.pp(format!("resnets.{j}")), c_in, c, None, g, 1e-6, 1.0)
                })
                .collect::<Result<_>>()?;
            let up = (i + 1 < channels.len())
                .then(|| Upsample::new(v.pp("upsamplers.0"), c))
                .transpose()?;
            levels.push(UpLevel { resnets, up });
            prev = c;
        }
        let bottom = cfg.block_out_channels[0];
        Ok(Self {
            post_quant,
            conv_in,
            mid,
            levels,
            norm_out: GroupNorm::new(d.pp("conv_norm_out"), g, bottom, 1e-6)?,
            conv_out: Conv::new(d.pp("conv_out"), bottom, cfg.out_channels, 3, 1, 1)?,
        })
    }

    /// Decodes scaled latents `[batch, latent, h, w]` to pixels in [-1, 1].
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = match &self.post_quant {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let mut x = self.conv_in.forward(&xs)?;
        x = self.mid.0.forward(&x, None)?;
        x = self.mid.1.forward(&x)?;
        x = self.mid.2.forward(&x, None)?;
        for level in &self.levels {
            for r in &level.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(up) = &level.up {
                x = up.forward(&x, None)?;
            }
        }
        let x = self.norm_out.forward(&x, true)?;
        self.conv_out.forward(&x)
    }
}
