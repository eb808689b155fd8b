//! The CLIP text encoder of a Stable Diffusion pipeline
//! (`CLIPTextModel`, and SDXL's `CLIPTextModelWithProjection`), built from
//! its own `config.json` so any width or depth loads.

use candle_core::{Device, Module, Tensor};
use candle_nn::{
    embedding, layer_norm, linear, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder,
};

use super::config::{ClipActivation, ClipConfig};
use crate::error::Result;

struct Layer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// What one pass of the encoder gives.
pub struct ClipOutput {
    /// The last layer's states after the final layer norm.
    pub last: Tensor,
    /// The states entering the last layer (SDXL conditions on these).
    pub penultimate: Tensor,
    /// The end-of-text token's final state, projected when the model has a
    /// projection.
    pub pooled: Tensor,
}

/// A CLIP text transformer.
pub struct ClipTextEncoder {
    tokens: Embedding,
    positions: Embedding,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    projection: Option<Linear>,
    activation: ClipActivation,
    heads: usize,
    eos: Option<u32>,
}

impl ClipTextEncoder {
    /// Builds the encoder; weights may carry the `text_model.` prefix or not.
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let projection = match cfg.projection_dim {
            Some(p) if vb.contains_tensor("text_projection.weight") => Some(linear_no_bias(
                cfg.hidden_size,
                p,
                vb.pp("text_projection"),
            )?),
            _ => None,
        };
        let tm = if vb.contains_tensor("text_model.final_layer_norm.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let emb = tm.pp("embeddings");
        let tokens = embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?;
        let positions = embedding(cfg.max_positions, h, emb.pp("position_embedding"))?;
        let layers = (0..cfg.layers)
            .map(|i| {
                let l = tm.pp(format!("encoder.layers.{i}"));
                let a = l.pp("self_attn");
                Ok(Layer {
                    norm1: layer_norm(h, eps, l.pp("layer_norm1"))?,
                    q: linear(h, h, a.pp("q_proj"))?,
                    k: linear(h, h, a.pp("k_proj"))?,
                    v: linear(h, h, a.pp("v_proj"))?,
                    out: linear(h, h, a.pp("out_proj"))?,
                    norm2: layer_norm(h, eps, l.pp("layer_norm2"))?,
                    fc1: linear(h, cfg.intermediate_size, l.pp("mlp.fc1"))?,
                    fc2: linear(cfg.intermediate_size, h, l.pp("mlp.fc2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            tokens,
            positions,
            layers,
            final_norm: layer_norm(h, eps, tm.pp("final_layer_norm"))?,
            projection,
            activation: cfg.activation,
            heads: cfg.heads,
            eos: cfg.eos_token_id,
        })
    }

    /// Encodes token rows (batch, positions); every row is computed on its
    /// own, causally, so a prompt's states do not depend on its neighbours.
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device) -> Result<ClipOutput> {
        let rows = ids.len();
        let len = ids.first().map_or(0, Vec::len);
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let input = Tensor::from_vec(flat, (rows, len), device)?;
        let pos = Tensor::arange(0u32, len as u32, device)?;
        let mut xs = self
            .tokens
            .forward(&input)?
            .broadcast_add(&self.positions.forward(&pos)?)?;
        let mask = causal_mask(len, device)?.to_dtype(xs.dtype())?;
        let mut penultimate = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = xs.clone();
            }
            xs = self.layer(layer, &xs, &mask)?;
        }
        if self.layers.is_empty() {
            penultimate = xs.clone();
        }
        let last = self.final_norm.forward(&xs)?;
        // The end-of-text token as transformers finds it: the highest id for
        // old configs (`eos_token_id` 2), else the first `eos` (or position 0).
        let mut picks = Vec::with_capacity(rows);
        for (r, row) in ids.iter().enumerate() {
            let at = match self.eos {
                Some(e) if e != 2 => row.iter().position(|&t| t == e).unwrap_or(0),
                _ => {
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&t| t == max).unwrap_or(0)
                }
            };
            picks.push(last.get(r)?.get(at)?.unsqueeze(0)?);
        }
        let pooled = Tensor::cat(&picks, 0)?;
        let pooled = match &self.projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        Ok(ClipOutput {
            last,
            penultimate,
            pooled,
        })
    }

    fn layer(&self, l: &Layer, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, h) = xs.dims3()?;
        let hd = h / self.heads;
        let x = l.norm1.forward(xs)?;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split((l.q.forward(&x)? * (hd as f64).powf(-0.5))?)?;
        let k = split(l.k.forward(&x)?)?;
        let v = split(l.v.forward(&x)?)?;
        let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        let xs = (xs + l.out.forward(&ctx)?)?;
        let x = l.norm2.forward(&xs)?;
        let x = l.fc1.forward(&x)?;
        let x = match self.activation {
            ClipActivation::QuickGelu => (&x * candle_nn::ops::sigmoid(&(&x * 1.702)?)?)?,
            ClipActivation::Gelu => x.gelu_erf()?,
        };
        Ok((xs + l.fc2.forward(&x)?)?)
    }
}

fn causal_mask(len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (len, len), device)?)
}
