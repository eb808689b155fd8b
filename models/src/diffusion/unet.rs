//! The conditional UNet of SD 1.x/2.x and SDXL: candle's down, mid and up
//! blocks, assembled from the folder's config, plus SDXL's `text_time`
//! conditioning (pooled text embedding and size numbers), which candle's
//! own UNet leaves out.

use candle_core::{Module, Tensor};
use candle_nn::{conv2d, group_norm, Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    CrossAttnDownBlock2D, CrossAttnDownBlock2DConfig, CrossAttnUpBlock2D, CrossAttnUpBlock2DConfig,
    DownBlock2D, DownBlock2DConfig, UNetMidBlock2DCrossAttn, UNetMidBlock2DCrossAttnConfig,
    UpBlock2D, UpBlock2DConfig,
};

use super::config::UNetConfig;
use crate::error::Result;

enum Down {
    Plain(DownBlock2D),
    Cross(CrossAttnDownBlock2D),
}

enum Up {
    Plain(UpBlock2D),
    Cross(CrossAttnUpBlock2D),
}

struct TextTime {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
}

/// SDXL's extra conditioning for each row of a batch.
pub struct AddedCond<'a> {
    /// Pooled text embeddings, (rows, width).
    pub text_embeds: &'a Tensor,
    /// Size numbers, (rows, 6): original h, w, crop top, left, target h, w.
    pub time_ids: &'a Tensor,
}

/// A `UNet2DConditionModel`.
pub struct UNet {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    text_time: Option<TextTime>,
    down: Vec<Down>,
    mid: UNetMidBlock2DCrossAttn,
    up: Vec<Up>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    cfg: UNetConfig,
}

impl UNet {
    /// Builds the UNet from `unet/` weights.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let n = cfg.blocks.len();
        let first = cfg.blocks[0].channels;
        let last = cfg.blocks[n - 1];
        let temb = first * 4;
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = conv2d(cfg.in_channels, first, 3, pad1, vb.pp("conv_in"))?;
        let time_proj = Timesteps::new(first, cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), first, temb)?;
        let text_time = match cfg.text_time {
            Some(tt) => Some(TextTime {
                time_proj: Timesteps::new(tt.time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift),
                embedding: TimestepEmbedding::new(vb.pp("add_embedding"), tt.input_dim, temb)?,
            }),
            None => None,
        };
        let mut down = Vec::with_capacity(n);
        for (i, block) in cfg.blocks.iter().enumerate() {
            let input = if i == 0 {
                first
            } else {
                cfg.blocks[i - 1].channels
            };
            let plain = DownBlock2DConfig {
                num_layers: cfg.layers_per_block,
                resnet_eps: cfg.norm_eps,
                resnet_groups: cfg.norm_num_groups,
                add_downsample: i + 1 < n,
                downsample_padding: cfg.downsample_padding,
                ..Default::default()
            };
            let vb = vb.pp(format!("down_blocks.{i}"));
            down.push(match block.transformer_layers {
                Some(layers) => {
                    let c = CrossAttnDownBlock2DConfig {
                        downblock: plain,
                        attn_num_head_channels: block.heads,
                        cross_attention_dim: cfg.cross_attention_dim,
                        sliced_attention_size: None,
                        use_linear_projection: cfg.use_linear_projection,
                        transformer_layers_per_block: layers,
                    };
                    Down::Cross(CrossAttnDownBlock2D::new(
                        vb,
                        input,
                        block.channels,
                        Some(temb),
                        false,
                        c,
                    )?)
                }
                None => Down::Plain(DownBlock2D::new(
                    vb,
                    input,
                    block.channels,
                    Some(temb),
                    plain,
                )?),
            });
        }
        let mid_cfg = UNetMidBlock2DCrossAttnConfig {
            resnet_eps: cfg.norm_eps,
            output_scale_factor: cfg.mid_block_scale_factor,
            cross_attn_dim: cfg.cross_attention_dim,
            attn_num_head_channels: last.heads,
            resnet_groups: Some(cfg.norm_num_groups),
            use_linear_projection: cfg.use_linear_projection,
            transformer_layers_per_block: last.transformer_layers.unwrap_or(1),
            ..Default::default()
        };
        let mid = UNetMidBlock2DCrossAttn::new(
            vb.pp("mid_block"),
            last.channels,
            Some(temb),
            false,
            mid_cfg,
        )?;
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let block = cfg.blocks[n - 1 - i];
            let prev = if i > 0 {
                cfg.blocks[n - i].channels
            } else {
                last.channels
            };
            let input = cfg.blocks[if i == n - 1 { 0 } else { n - i - 2 }].channels;
            let plain = UpBlock2DConfig {
                num_layers: cfg.layers_per_block + 1,
                resnet_eps: cfg.norm_eps,
                resnet_groups: cfg.norm_num_groups,
                add_upsample: i + 1 < n,
                ..Default::default()
            };
            let vb = vb.pp(format!("up_blocks.{i}"));
            up.push(match block.transformer_layers {
                Some(layers) => {
                    let c = CrossAttnUpBlock2DConfig {
                        upblock: plain,
                        attn_num_head_channels: block.heads,
                        cross_attention_dim: cfg.cross_attention_dim,
                        sliced_attention_size: None,
                        use_linear_projection: cfg.use_linear_projection,
                        transformer_layers_per_block: layers,
                    };
                    Up::Cross(CrossAttnUpBlock2D::new(
                        vb,
                        input,
                        prev,
                        block.channels,
                        Some(temb),
                        false,
                        c,
                    )?)
                }
                None => Up::Plain(UpBlock2D::new(
                    vb,
                    input,
                    prev,
                    block.channels,
                    Some(temb),
                    plain,
                )?),
            });
        }
        let norm_out = group_norm(
            cfg.norm_num_groups,
            first,
            cfg.norm_eps,
            vb.pp("conv_norm_out"),
        )?;
        let conv_out = conv2d(first, cfg.out_channels, 3, pad1, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            text_time,
            down,
            mid,
            up,
            norm_out,
            conv_out,
            cfg: cfg.clone(),
        })
    }

    /// Predicts noise (or v) for a batch at one timestep. `context` is the
    /// text conditioning, (rows, tokens, cross_attention_dim); `added` is
    /// required for SDXL and ignored otherwise.
    pub fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<AddedCond<'_>>,
    ) -> Result<Tensor> {
        let (rows, _, height, width) = xs.dims4()?;
        let n = self.cfg.blocks.len();
        let factor = 1usize << (n - 1);
        let odd_size = height % factor != 0 || width % factor != 0;
        let xs = if self.cfg.center_input_sample {
            ((xs * 2.0)? - 1.0)?
        } else {
            xs.clone()
        };
        // Every row shares the timestep: embed it once, for one row, so no
        // row's value depends on how many rows there are (small matrix
        // products take other code paths as their row count changes).
        let t = (Tensor::ones(1, xs.dtype(), xs.device())? * timestep)?;
        let emb = self.time_embedding.forward(&self.time_proj.forward(&t)?)?;
        let mut emb = emb.broadcast_as((rows, emb.dim(1)?))?.contiguous()?;
        if let (Some(tt), Some(added)) = (&self.text_time, added) {
            let mut extra = Vec::with_capacity(rows);
            for r in 0..rows {
                let ids = added.time_ids.get(r)?;
                let times = tt.time_proj.forward(&ids)?.reshape((1, ()))?;
                let input = Tensor::cat(&[&added.text_embeds.narrow(0, r, 1)?, &times], 1)?;
                extra.push(tt.embedding.forward(&input)?);
            }
            emb = (emb + Tensor::cat(&extra, 0)?)?;
        }
        let xs = self.conv_in.forward(&xs)?;
        let mut residuals = vec![xs.clone()];
        let mut xs = xs;
        for block in &self.down {
            let (out, res) = match block {
                Down::Plain(b) => b.forward(&xs, Some(&emb))?,
                Down::Cross(b) => b.forward(&xs, Some(&emb), Some(context))?,
            };
            residuals.extend(res);
            xs = out;
        }
        let mut xs = self.mid.forward(&xs, Some(&emb), Some(context))?;
        for (i, block) in self.up.iter().enumerate() {
            let take = self.cfg.layers_per_block + 1;
            let res = residuals.split_off(residuals.len().saturating_sub(take));
            let size = match residuals.last() {
                Some(r) if i + 1 < n && odd_size => {
                    let (_, _, h, w) = r.dims4()?;
                    Some((h, w))
                }
                _ => None,
            };
            xs = match block {
                Up::Plain(b) => b.forward(&xs, &res, Some(&emb), size)?,
                Up::Cross(b) => b.forward(&xs, &res, Some(&emb), size, Some(context))?,
            };
        }
        let xs = candle_nn::ops::silu(&self.norm_out.forward(&xs)?)?;
        Ok(self.conv_out.forward(&xs)?)
    }
}
