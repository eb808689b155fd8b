//! The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2/3, Phi-3, Gemma 2/3)
//! from GGUF or Hugging Face safetensors weights, with a batched forward
//! pass.
//!
//! The model holds only weights. Keys and values live in a paged
//! [`KvCache`] owned by the caller, and one forward pass runs any mix of
//! sequences: each brings its new tokens, its position and its block table,
//! so prompts being prefilled and sequences being decoded share one pass
//! and one read of the weights.

mod config;
mod device;
mod group;
mod variant;
mod weights;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use kindling_kernels::{paged_attention, QueryRow, RopeTables, Scoring};

pub use config::{LlamaConfig, RopeScaling};
pub use device::DeviceLlama;
use group::{Group, Projection};
pub use variant::{Activation, SlidingWindow, Variant};
pub(crate) use weights::index_files;
pub(crate) use weights::map_folder;
pub use weights::weight_files;
use weights::{Global, Linear, Part, Safetensors, Source, TokenTable};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::KvCache;

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(kindling_kernels::rms_norm(x, &self.weight, self.eps)?)
    }

    /// `(x + residual, norm(x + residual))`, in one parallel pass.
    fn add_forward(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(kindling_kernels::add_rms_norm(
            x,
            residual,
            &self.weight,
            self.eps,
        )?)
    }
}

struct Block {
    attn_norm: RmsNorm,
    /// Qwen3's per-head RMS norms of queries and keys (before rotation).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    /// Queries, keys and values.
    qkv: Group,
    o: Projection,
    /// Gemma's norm of the attention output.
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    /// Gemma's norm of the MLP output.
    post_ffn_norm: Option<RmsNorm>,
    /// The MLP's gate and up projections.
    gate_up: Group,
    down: Projection,
}

/// One sequence's share of a forward pass.
#[derive(Debug, Clone, Copy)]
pub struct BatchItem<'a> {
    /// New tokens, at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    /// Positions already in the cache for this sequence.
    pub start: usize,
    /// The sequence's blocks; they must hold `start + tokens.len()` positions.
    pub blocks: &'a [u32],
    /// How many of the last new tokens to return next-token logits after
    /// (0: none; 1: the last; more: speculative drafts being verified).
    pub logits: usize,
}

/// A Llama-family decoder.
pub struct Llama {
    cfg: LlamaConfig,
    embed: TokenTable,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RopeTables,
    /// Sliding-window layers' tables, where their base is their own.
    local_rope: Option<RopeTables>,
    max_positions: usize,
}

impl Llama {
    /// Loads a GGUF model, with rotary tables for `max_positions` positions
    /// (at most the trained context).
    pub fn from_gguf(gguf: &mut GgufFile, max_positions: usize) -> Result<Self> {
        let (cfg, inv_freq) = gguf_config(gguf)?;
        gguf.prefetch();
        let model = Self::build(cfg, gguf, max_positions, &inv_freq)?;
        gguf.release_pages();
        Ok(model)
    }

    /// Loads a Hugging Face model folder (`config.json` and safetensors).
    pub fn from_safetensors(dir: &Path, max_positions: usize) -> Result<Self> {
        let cfg = hf_config(dir)?;
        let inv_freq = cfg.inv_freq();
        let mut files = Safetensors::open(dir, cfg.variant.norm_offset)?;
        Self::build(cfg, &mut files, max_positions, &inv_freq)
    }

    fn build(
        cfg: LlamaConfig,
        src: &mut dyn Source,
        max_positions: usize,
        inv_freq: &[f32],
    ) -> Result<Self> {
        let max_positions = max_positions.min(cfg.trained_context).max(1);
        let output = src.global_name(Global::Output);
        let tied = cfg.tie_embeddings || !src.contains(output);
        let (table, tied_head) = src.embedding(tied)?;
        let lm_head = match tied_head {
            Some(head) => head,
            None => src.linear(output)?,
        };
        let eps = cfg.rms_eps as f32;
        let norm = |src: &mut dyn Source, name: String| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: src.norm(&name)?,
                eps,
            })
        };
        let opt_norm = |src: &mut dyn Source, name: String| -> Result<Option<RmsNorm>> {
            src.contains(&name).then(|| norm(src, name)).transpose()
        };
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let fused_qkv = src.block_name(i, Part::Qkv, false);
            let qkv = if src.contains(&fused_qkv) {
                // Phi-3: one projection, whose rows are q's, k's and v's.
                let (q_rows, kv_rows) = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
                Group::stored_fused(src, &fused_qkv, &[q_rows, kv_rows, kv_rows])?
            } else {
                Group::load(src, i, &[Part::Q, Part::K, Part::V])?
            };
            let o = Projection::load(src, i, Part::O)?;
            let gate_up = if src.contains(&src.block_name(i, Part::Gate, false)) {
                Group::load(src, i, &[Part::Gate, Part::Up])?
            } else {
                // Phi-3: the up projection holds the gate's rows, then the up's.
                let ff = cfg.intermediate_size;
                let name = src.block_name(i, Part::Up, false);
                Group::stored_fused(src, &name, &[ff, ff])?
            };
            let down = Projection::load(src, i, Part::Down)?;
            let names = (
                src.block_name(i, Part::AttnNorm, false),
                src.block_name(i, Part::FfnNorm, false),
            );
            let qk_names = (
                src.block_name(i, Part::QNorm, false),
                src.block_name(i, Part::KNorm, false),
            );
            let qk_norm = if src.contains(&qk_names.0) {
                Some((norm(src, qk_names.0)?, norm(src, qk_names.1)?))
            } else {
                None
            };
            let post_names = (
                src.block_name(i, Part::PostAttnNorm, false),
                src.block_name(i, Part::PostFfnNorm, false),
            );
            let post_attn_norm = opt_norm(src, post_names.0)?;
            let post_ffn_norm = opt_norm(src, post_names.1)?;
            blocks.push(Block {
                attn_norm: norm(src, names.0)?,
                qk_norm,
                qkv,
                o,
                post_attn_norm,
                ffn_norm: norm(src, names.1)?,
                post_ffn_norm,
                gate_up,
                down,
            });
        }
        let name = src.global_name(Global::OutputNorm).to_string();
        let final_norm = norm(src, name)?;
        Ok(Self {
            embed: table,
            rope: RopeTables::new(inv_freq, max_positions),
            local_rope: cfg
                .local_inv_freq()
                .map(|f| RopeTables::new(&f, max_positions)),
            cfg,
            blocks,
            norm: final_norm,
            lm_head,
            max_positions,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Positions a sequence may hold (prompt and generated tokens together).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Runs every item's new tokens in one pass, writes their keys and
    /// values into `cache`, and returns next-token logits (f32, `vocab`
    /// long) for the items that ask for them, in order.
    pub fn forward(&self, batch: &[BatchItem<'_>], cache: &mut KvCache) -> Result<Vec<Vec<f32>>> {
        let total: usize = batch.iter().map(|b| b.tokens.len()).sum();
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut tables = Vec::with_capacity(total);
        let mut rows = Vec::with_capacity(total);
        let mut wanted = Vec::new();
        for item in batch {
            let (t, end) = (item.tokens.len(), item.start + item.tokens.len());
            if t == 0
                || end > self.max_positions
                || end > item.blocks.len() * cache.layout().block_size
            {
                return Err(ModelError::Tensor {
                    name: "input".into(),
                    message: format!(
                        "{t} tokens after {} do not fit in {} positions or {} cache blocks",
                        item.start,
                        self.max_positions,
                        item.blocks.len()
                    ),
                });
            }
            for (i, &id) in item.tokens.iter().enumerate() {
                ids.push(id);
                positions.push(item.start + i);
                tables.push(item.blocks);
                rows.push(QueryRow {
                    blocks: item.blocks,
                    seen: item.start + i + 1,
                });
            }
            let rows = item.logits.min(t);
            wanted.extend((ids.len() - rows..ids.len()).map(|r| r as u32));
        }
        if total == 0 {
            return Ok(Vec::new());
        }
        let variant = &self.cfg.variant;
        let mut x = self.embed.lookup(&ids)?;
        if let Some(s) = variant.embed_scale {
            x = (x * f64::from(s))?;
        }
        let step = Step {
            positions: &positions,
            tables: &tables,
            rows: &rows,
        };
        let post = |norm: &Option<RmsNorm>, y: Tensor| match norm {
            Some(n) => n.forward(&y),
            None => Ok(y),
        };
        // Each residual add is fused with the norm that follows it (the
        // next block's, or the final one), so no pass over the rows is a
        // separate elementwise op.
        let mut h = match self.blocks.first() {
            Some(first) => first.attn_norm.forward(&x)?,
            None => self.norm.forward(&x)?,
        };
        for (layer, block) in self.blocks.iter().enumerate() {
            let attn = self.attention(block, layer, &h, &step, cache)?;
            (x, h) = block
                .ffn_norm
                .add_forward(&post(&block.post_attn_norm, attn)?, &x)?;
            let [gate, up] = <[Tensor; 2]>::try_from(block.gate_up.forward(&h)?)
                .map_err(|_| parts_error("gate/up"))?;
            let gated = match variant.activation {
                Activation::Silu => kindling_kernels::silu_mul(&gate, &up)?,
                Activation::GeluTanh => (gate.gelu()? * up)?,
            };
            let next = match self.blocks.get(layer + 1) {
                Some(b) => &b.attn_norm,
                None => &self.norm,
            };
            let ffn = post(&block.post_ffn_norm, block.down.forward(&gated)?)?;
            (x, h) = next.add_forward(&ffn, &x)?;
        }
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let n = wanted.len();
        let last = h.index_select(&Tensor::from_vec(wanted, n, &Device::Cpu)?, 0)?;
        let logits = self.lm_head.forward(&last)?;
        let mut logits: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        if let Some(cap) = variant.final_softcap {
            for l in logits.iter_mut().flatten() {
                *l = cap * (*l / cap).tanh();
            }
        }
        Ok(logits)
    }

    fn attention(
        &self,
        block: &Block,
        layer: usize,
        x: &Tensor,
        step: &Step<'_>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (nh, hd) = (self.cfg.heads, self.cfg.head_dim);
        // Each head's vector, RMS-normed where the model has q/k norms.
        let rows = |y: Tensor, norm: Option<&RmsNorm>| -> Result<Vec<f32>> {
            let y = match norm {
                Some(n) => n.forward(&y.reshape(((), hd))?)?,
                None => y,
            };
            Ok(y.flatten_all()?.to_vec1::<f32>()?)
        };
        let interleaved = self.cfg.rope_interleaved;
        let (qn, kn) = match &block.qk_norm {
            Some((qn, kn)) => (Some(qn), Some(kn)),
            None => (None, None),
        };
        let [q, k, v] =
            <[Tensor; 3]>::try_from(block.qkv.forward(x)?).map_err(|_| parts_error("q/k/v"))?;
        let mut q = rows(q, qn)?;
        let mut k = rows(k, kn)?;
        let v = rows(v, None)?;
        let variant = &self.cfg.variant;
        let window = variant
            .sliding
            .as_ref()
            .filter(|s| s.slides(layer))
            .map(|s| s.window);
        let rope = match (&self.local_rope, window) {
            (Some(local), Some(_)) => local,
            _ => &self.rope,
        };
        rope.apply(&mut q, step.positions, interleaved);
        rope.apply(&mut k, step.positions, interleaved);
        cache.write(layer, step.tables, step.positions, &k, &v)?;
        let (keys, values) = cache.layer(layer);
        let scoring = Scoring {
            scale: variant
                .query_scale
                .unwrap_or_else(|| 1.0 / (hd as f32).sqrt()),
            softcap: variant.attn_softcap,
            window,
        };
        let y = paged_attention(&q, nh, step.rows, keys, values, cache.layout(), scoring);
        let y = Tensor::from_vec(y, (step.positions.len(), nh * hd), &Device::Cpu)?;
        block.o.forward(&y)
    }
}

impl DeviceLlama {
    /// Loads a GGUF model onto `device` as `dtype` (quantized weights are
    /// expanded).
    pub fn from_gguf(
        gguf: &mut GgufFile,
        max_positions: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let (cfg, inv_freq) = gguf_config(gguf)?;
        let max_positions = max_positions.min(cfg.trained_context).max(1);
        Self::build(cfg, gguf, max_positions, &inv_freq, device, dtype)
    }

    /// Loads a Hugging Face model folder onto `device` as `dtype`.
    pub fn from_safetensors(
        dir: &Path,
        max_positions: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let cfg = hf_config(dir)?;
        let inv_freq = cfg.inv_freq();
        let max_positions = max_positions.min(cfg.trained_context).max(1);
        let mut files = Safetensors::open(dir, cfg.variant.norm_offset)?;
        Self::build(cfg, &mut files, max_positions, &inv_freq, device, dtype)
    }
}

/// A GGUF model's configuration and rotary frequencies. Llama 3.1 GGUFs
/// carry their rope scaling as per-frequency divisors.
fn gguf_config(gguf: &mut GgufFile) -> Result<(LlamaConfig, Vec<f32>)> {
    let cfg = LlamaConfig::from_gguf(gguf)?;
    if gguf.has_tensor("rope_factors_long.weight") {
        return Err(ModelError::UnsupportedArchitecture(
            "LongRoPE (Phi-3 128k and Phi-3.5 files: rope_factors_long/short)".into(),
        ));
    }
    let mut inv_freq = cfg.inv_freq();
    if gguf.has_tensor("rope_freqs.weight") {
        let factors = gguf.dense("rope_freqs.weight")?.to_vec1::<f32>()?;
        for (f, d) in inv_freq.iter_mut().zip(factors) {
            *f /= d;
        }
    }
    Ok((cfg, inv_freq))
}

/// A Hugging Face folder's `config.json`.
fn hf_config(dir: &Path) -> Result<LlamaConfig> {
    let path = dir.join("config.json");
    let json = std::fs::read_to_string(&path).map_err(|source| ModelError::Io { path, source })?;
    LlamaConfig::from_hf_json(&json)
}

/// A projection group that gave other than the parts its block expects.
fn parts_error(what: &str) -> ModelError {
    ModelError::Tensor {
        name: what.into(),
        message: "the projection group has another number of parts".into(),
    }
}

/// Per-token inputs shared by every layer of one pass.
struct Step<'a> {
    positions: &'a [usize],
    tables: &'a [&'a [u32]],
    rows: &'a [QueryRow<'a>],
}
