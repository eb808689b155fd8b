//! The Llama forward pass on a device (a CUDA GPU; the CPU too, for tests),
//! in the weights' float type (bf16, f16 or f32), built from the fused ops
//! of `kindling-kernels`:
//!
//! ```text
//! h = rms_norm(x)                                  (first layer only)
//! per layer:
//!   qkv = h · Wqkvᵀ (+ b)         one product for q, k and v
//!   (Qwen3: each query and key head RMS-normed)
//!   rope_in_place(qkv)            query and key heads, where they are
//!   cache_write(kv, qkv)          keys and values into their cache slots
//!   a = paged_attention(qkv, kv)  straight from the cache blocks
//!   (x, h) = add_rms_norm(a · Woᵀ, x)
//!   gu = h · Wgate|upᵀ            one product for gate and up
//!   (x, h) = add_rms_norm(silu_mul(gu) · Wdownᵀ, x)   (next layer's norm)
//! logits = h[last rows] · Wheadᵀ
//! ```
//!
//! Weights come from the memory-mapped files straight to the device, one
//! tensor at a time, and are converted there.

use candle_core::{DType, Device, Tensor};
use kindling_kernels::{
    add_rms_norm, cache_write, paged_decode_attention, rms_norm, rope_in_place, silu_mul,
    AttentionShape, RopeTables,
};

use super::weights::{Global, Part, Source};
use super::{BatchItem, LlamaConfig};
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, BLOCK_SIZE};

struct Block {
    attn_norm: Tensor,
    /// `[(heads + 2 kv_heads) · head_dim, hidden]`.
    qkv: Tensor,
    qkv_bias: Option<Tensor>,
    /// Qwen3's per-head query and key norms (`[head_dim]` each).
    qk_norm: Option<(Tensor, Tensor)>,
    o: Tensor,
    ffn_norm: Tensor,
    /// `[2 · intermediate, hidden]`: gate rows, then up rows.
    gate_up: Tensor,
    down: Tensor,
}

/// A Llama-family decoder whose weights and KV cache live on one device.
pub struct DeviceLlama {
    cfg: LlamaConfig,
    device: Device,
    dtype: DType,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    /// f32 `[positions, 2, head_dim / 2]`.
    rope: Tensor,
    shape: AttentionShape,
    max_positions: usize,
}

fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
}

impl DeviceLlama {
    pub(super) fn build(
        cfg: LlamaConfig,
        src: &mut dyn Source,
        max_positions: usize,
        inv_freq: &[f32],
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(ModelError::UnsupportedArchitecture(format!(
                "{dtype:?} weights and activations (use bf16, f16 or f32)"
            )));
        }
        if cfg.variant != super::Variant::default() {
            return Err(ModelError::UnsupportedArchitecture(
                "Gemma's soft caps, sliding windows and extra norms on a GPU: \
                 serve this model on the CPU"
                    .into(),
            ));
        }
        let load = |src: &mut dyn Source, name: &str| src.on_device(name, device, dtype);
        let output = src.global_name(Global::Output);
        let tied = cfg.tie_embeddings || !src.contains(output);
        let name = src.global_name(Global::Embedding);
        let embed = load(src, name)?;
        let lm_head = if tied {
            embed.clone()
        } else {
            load(src, output)?
        };
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let part = |src: &mut dyn Source, p: Part| {
                let name = src.block_name(i, p, false);
                load(src, &name)
            };
            // Phi-3 stores q, k and v as one matrix, and gate and up as
            // one (gate rows first): the layouts this path uses anyway.
            let qkv = if src.contains(&src.block_name(i, Part::Qkv, false)) {
                part(src, Part::Qkv)?
            } else {
                Tensor::cat(
                    &[
                        part(src, Part::Q)?,
                        part(src, Part::K)?,
                        part(src, Part::V)?,
                    ],
                    0,
                )?
            };
            let gate_up = if src.contains(&src.block_name(i, Part::Gate, false)) {
                Tensor::cat(&[part(src, Part::Gate)?, part(src, Part::Up)?], 0)?
            } else {
                part(src, Part::Up)?
            };
            let qk_norm = if src.contains(&src.block_name(i, Part::QNorm, false)) {
                Some((part(src, Part::QNorm)?, part(src, Part::KNorm)?))
            } else {
                None
            };
            let biases: Vec<String> = [Part::Q, Part::K, Part::V]
                .iter()
                .map(|&p| src.block_name(i, p, true))
                .collect();
            let qkv_bias = if biases.iter().all(|b| src.contains(b)) {
                let b: Result<Vec<Tensor>> = biases.iter().map(|b| load(src, b)).collect();
                Some(Tensor::cat(&b?, 0)?)
            } else {
                None
            };
            blocks.push(Block {
                attn_norm: part(src, Part::AttnNorm)?,
                qkv,
                qkv_bias,
                qk_norm,
                o: part(src, Part::O)?,
                ffn_norm: part(src, Part::FfnNorm)?,
                gate_up,
                down: part(src, Part::Down)?,
            });
        }
        let name = src.global_name(Global::OutputNorm);
        let norm = load(src, name)?;
        let half = inv_freq.len();
        let rope = Tensor::from_vec(
            RopeTables::new(inv_freq, max_positions).cos_sin(),
            (max_positions, 2, half),
            device,
        )?;
        let shape = AttentionShape {
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            block_size: BLOCK_SIZE,
        };
        Ok(Self {
            cfg,
            device: device.clone(),
            dtype,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            shape,
            max_positions,
        })
    }

    /// `qkv` with each query head RMS-normed by `qn` and each key head by
    /// `kn` (Qwen3, before rotation).
    fn norm_heads(&self, qkv: &Tensor, qn: &Tensor, kn: &Tensor) -> Result<Tensor> {
        let (rows, _) = qkv.dims2()?;
        let (h, kv, d) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        let eps = self.cfg.rms_eps as f32;
        let heads = |from: usize, n: usize, w: &Tensor| -> Result<Tensor> {
            let part = qkv.narrow(1, from * d, n * d)?.contiguous()?;
            Ok(rms_norm(&part.reshape((rows * n, d))?, w, eps)?.reshape((rows, n * d))?)
        };
        let v = qkv.narrow(1, (h + kv) * d, kv * d)?;
        Ok(Tensor::cat(&[heads(0, h, qn)?, heads(h, kv, kn)?, v], 1)?)
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Positions a sequence may hold.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The float type of weights, activations and cache.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs every item's new tokens in one pass (see [`super::Llama::forward`]).
    pub fn forward(&self, batch: &[BatchItem<'_>], cache: &mut KvCache) -> Result<Vec<Vec<f32>>> {
        let inputs = Inputs::new(batch, self.max_positions)?;
        if inputs.ids.is_empty() {
            return Ok(Vec::new());
        }
        let layers = cache.device_layers()?;
        if layers.len() != self.blocks.len() {
            return Err(ModelError::Tensor {
                name: "kv".into(),
                message: format!(
                    "a cache of {} layers for {}",
                    layers.len(),
                    self.blocks.len()
                ),
            });
        }
        let rows = inputs.ids.len();
        let dev = &self.device;
        let ids = Tensor::from_vec(inputs.ids, rows, dev)?;
        let positions = Tensor::from_vec(inputs.positions, rows, dev)?;
        let slots = Tensor::from_vec(inputs.slots, rows, dev)?;
        let width = inputs.meta.len() / rows;
        let meta = Tensor::from_vec(inputs.meta, (rows, width), dev)?;
        let eps = self.cfg.rms_eps as f32;
        let scale = 1.0 / (self.cfg.head_dim as f32).sqrt();
        let rotated = self.cfg.heads + self.cfg.kv_heads;
        let mut x = self.embed.index_select(&ids, 0)?;
        let first_norm = self.blocks.first().map_or(&self.norm, |b| &b.attn_norm);
        let mut h = rms_norm(&x, first_norm, eps)?;
        for (i, (block, kv)) in self.blocks.iter().zip(layers).enumerate() {
            let mut qkv = linear(&h, &block.qkv)?;
            if let Some(b) = &block.qkv_bias {
                qkv = qkv.broadcast_add(b)?;
            }
            if let Some((qn, kn)) = &block.qk_norm {
                qkv = self.norm_heads(&qkv, qn, kn)?;
            }
            rope_in_place(
                &qkv,
                &positions,
                &self.rope,
                rotated,
                self.cfg.head_dim,
                self.cfg.rope_interleaved,
            )?;
            cache_write(kv, &qkv, &slots, self.shape)?;
            let attn = paged_decode_attention(&qkv, kv, &meta, self.shape, scale)?;
            (x, h) = add_rms_norm(&linear(&attn, &block.o)?, &x, &block.ffn_norm, eps)?;
            let gu = linear(&h, &block.gate_up)?;
            let inter = self.cfg.intermediate_size;
            let gated = silu_mul(&gu.narrow(1, 0, inter)?, &gu.narrow(1, inter, inter)?)?;
            let next = self.blocks.get(i + 1).map_or(&self.norm, |b| &b.attn_norm);
            (x, h) = add_rms_norm(&linear(&gated, &block.down)?, &x, next, eps)?;
        }
        if inputs.wanted.is_empty() {
            return Ok(Vec::new());
        }
        let n = inputs.wanted.len();
        let last = h.index_select(&Tensor::from_vec(inputs.wanted, n, dev)?, 0)?;
        let logits = linear(&last, &self.lm_head)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2()?)
    }
}

/// A pass's per-row inputs, flattened for the device.
struct Inputs {
    ids: Vec<u32>,
    positions: Vec<u32>,
    /// Cache slot of each row's new key and value.
    slots: Vec<u32>,
    /// Per row: positions seen, then the block table (padded).
    meta: Vec<u32>,
    wanted: Vec<u32>,
}

impl Inputs {
    fn new(batch: &[BatchItem<'_>], max_positions: usize) -> Result<Self> {
        let width = 1 + batch.iter().map(|b| b.blocks.len()).max().unwrap_or(0);
        let total: usize = batch.iter().map(|b| b.tokens.len()).sum();
        let mut out = Self {
            ids: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            slots: Vec::with_capacity(total),
            meta: Vec::with_capacity(total * width),
            wanted: Vec::new(),
        };
        for item in batch {
            let (t, end) = (item.tokens.len(), item.start + item.tokens.len());
            if t == 0 || end > max_positions || end > item.blocks.len() * BLOCK_SIZE {
                return Err(ModelError::Tensor {
                    name: "input".into(),
                    message: format!(
                        "{t} tokens after {} do not fit in {max_positions} positions or {} cache blocks",
                        item.start,
                        item.blocks.len()
                    ),
                });
            }
            for (i, &id) in item.tokens.iter().enumerate() {
                let p = item.start + i;
                out.ids.push(id);
                out.positions.push(p as u32);
                let block = item.blocks[p / BLOCK_SIZE];
                out.slots
                    .push(block * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32);
                out.meta.push(p as u32 + 1);
                out.meta.extend_from_slice(item.blocks);
                out.meta
                    .resize(out.meta.len() + width - 1 - item.blocks.len(), 0);
            }
            let rows = item.logits.min(item.tokens.len());
            let n = out.ids.len();
            out.wanted.extend((n - rows..n).map(|r| r as u32));
        }
        Ok(out)
    }
}
