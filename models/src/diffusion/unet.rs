//! The conditional UNet of SD 1.x/2.x and SDXL: Kindling's down, mid and
//! up blocks ([`super::blocks`]) assembled from the folder's config, with
//! SDXL's `text_time` conditioning (pooled text embedding and size
//! numbers), which candle's own UNet leaves out.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};

use super::blocks::{DownBlock, Level, Resnet, SpatialTransformer, UpBlock};
use super::config::UNetConfig;
use super::ops::{Conv, GroupNorm};
use crate::error::Result;

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

struct Mid {
    first: Resnet,
    attention: SpatialTransformer,
    second: Resnet,
}

/// A `UNet2DConditionModel`.
pub struct UNet {
    conv_in: Conv,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    text_time: Option<TextTime>,
    down: Vec<DownBlock>,
    mid: Mid,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
    cfg: UNetConfig,
}

impl UNet {
    /// Builds the UNet from `unet/` weights.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let n = cfg.blocks.len();
        let first = cfg.blocks[0].channels;
        let last = cfg.blocks[n - 1];
        let temb = first * 4;
        let conv_in = Conv::new(vb.pp("conv_in"), cfg.in_channels, first, 3, 1, 1)?;
        let time_proj = Timesteps::new(first, cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), first, temb)?;
        let text_time = match cfg.text_time {
            Some(tt) => Some(TextTime {
                time_proj: Timesteps::new(tt.time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift),
                embedding: TimestepEmbedding::new(vb.pp("add_embedding"), tt.input_dim, temb)?,
            }),
            None => None,
        };
        let level = |i: usize, c_in: usize, layers: usize| {
            let b = cfg.blocks[i];
            Level {
                c_in,
                c_out: b.channels,
                layers,
                temb,
                groups: cfg.norm_num_groups,
                eps: cfg.norm_eps,
                attention: b.transformer_layers.map(|d| {
                    (
                        b.heads,
                        d,
                        cfg.cross_attention_dim,
                        cfg.use_linear_projection,
                    )
                }),
            }
        };
        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            let c_in = if i == 0 {
                first
            } else {
                cfg.blocks[i - 1].channels
            };
            let pad = (i + 1 < n).then_some(cfg.downsample_padding);
            down.push(DownBlock::new(
                vb.pp(format!("down_blocks.{i}")),
                level(i, c_in, cfg.layers_per_block),
                pad,
            )?);
        }
        let (g, e, s) = (
            cfg.norm_num_groups,
            cfg.norm_eps,
            cfg.mid_block_scale_factor,
        );
        let vm = vb.pp("mid_block");
        let mid = Mid {
            first: Resnet::new(
                vm.pp("resnets.0"),
                last.channels,
                last.channels,
                Some(temb),
                g,
                e,
                s,
            )?,
            attention: SpatialTransformer::new(
                vm.pp("attentions.0"),
                last.channels,
                last.heads,
                last.transformer_layers.unwrap_or(1),
                cfg.cross_attention_dim,
                cfg.use_linear_projection,
                g,
            )?,
            second: Resnet::new(
                vm.pp("resnets.1"),
                last.channels,
                last.channels,
                Some(temb),
                g,
                e,
                s,
            )?,
        };
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let b = n - 1 - i;
            let prev = if i > 0 {
                cfg.blocks[n - i].channels
            } else {
                last.channels
            };
            let skip_in = if b == 0 {
                first
            } else {
                cfg.blocks[b - 1].channels
            };
            up.push(UpBlock::new(
                vb.pp(format!("up_blocks.{i}")),
                level(b, skip_in, cfg.layers_per_block + 1),
                prev,
                i + 1 < n,
            )?);
        }
        let norm_out = GroupNorm::new(
            vb.pp("conv_norm_out"),
            cfg.norm_num_groups,
            first,
            cfg.norm_eps,
        )?;
        let conv_out = Conv::new(vb.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?;
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
        // Sinusoids in f32, as diffusers computes them, then the model's type.
        let t = (Tensor::ones(1, DType::F32, xs.device())? * timestep)?;
        let t = self.time_proj.forward(&t)?.to_dtype(xs.dtype())?;
        let emb = self.time_embedding.forward(&t)?;
        let mut emb = emb.broadcast_as((rows, emb.dim(1)?))?.contiguous()?;
        if let (Some(tt), Some(added)) = (&self.text_time, added) {
            let mut extra = Vec::with_capacity(rows);
            for r in 0..rows {
                let ids = added.time_ids.get(r)?;
                let times = tt.time_proj.forward(&ids)?.reshape((1, ()))?;
                let times = times.to_dtype(xs.dtype())?;
                let input = Tensor::cat(&[&added.text_embeds.narrow(0, r, 1)?, &times], 1)?;
                extra.push(tt.embedding.forward(&input)?);
            }
            emb = (emb + Tensor::cat(&extra, 0)?)?;
        }
        let xs = self.conv_in.forward(&xs)?;
        let mut skips = vec![xs.clone()];
        let mut xs = xs;
        for block in &self.down {
            let (out, states) = block.forward(&xs, &emb, context)?;
            skips.extend(states);
            xs = out;
        }
        let xs = self.mid.first.forward(&xs, Some(&emb))?;
        let xs = self.mid.attention.forward(&xs, context)?;
        let mut xs = self.mid.second.forward(&xs, Some(&emb))?;
        for (i, block) in self.up.iter().enumerate() {
            let take = self.cfg.layers_per_block + 1;
            let size = match skips.len().checked_sub(take + 1).and_then(|k| skips.get(k)) {
                Some(r) if i + 1 < n && odd_size => {
                    let (_, _, h, w) = r.dims4()?;
                    Some((h, w))
                }
                _ => None,
            };
            xs = block.forward(&xs, &mut skips, &emb, context, size)?;
        }
        let xs = self.norm_out.forward(&xs, true)?;
        self.conv_out.forward(&xs)
    }
}
