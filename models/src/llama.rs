//! The Llama family (Llama 2/3, SmolLM2, Mistral) from GGUF weights.
//!
//! The model holds only weights; each sequence brings its own
//! [`SequenceCache`], so one model can serve many sequences.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Embedding;

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::{CacheShape, SequenceCache};

/// Hyper-parameters of a Llama-family model, read from GGUF metadata.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// Size of the token vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (fewer than `heads` under grouped-query attention).
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// The context length the model was trained for.
    pub trained_context: usize,
}

impl LlamaConfig {
    /// Reads the `llama.*` metadata of `gguf`.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = gguf.string("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture(arch));
        }
        let key = |k: &str| format!("llama.{k}");
        let hidden_size = gguf.u32(&key("embedding_length"))? as usize;
        let heads = gguf.u32(&key("attention.head_count"))? as usize;
        let kv_heads = gguf
            .opt_u32(&key("attention.head_count_kv"))?
            .map_or(heads, |v| v as usize);
        let head_dim = gguf
            .opt_u32(&key("rope.dimension_count"))?
            .map_or(hidden_size / heads.max(1), |v| v as usize);
        let rope_theta = if gguf.has(&key("rope.freq_base")) {
            gguf.f32(&key("rope.freq_base"))?
        } else {
            10_000.0
        };
        let vocab_size = match gguf.opt_u32(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => gguf.strings("tokenizer.ggml.tokens")?.len(),
        };
        let cfg = Self {
            vocab_size,
            hidden_size,
            layers: gguf.u32(&key("block_count"))? as usize,
            heads,
            kv_heads,
            head_dim,
            rope_theta,
            rms_eps: f64::from(gguf.f32(&key("attention.layer_norm_rms_epsilon"))?),
            trained_context: gguf.u32(&key("context_length"))? as usize,
        };
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || head_dim % 2 != 0 {
            return Err(ModelError::Metadata {
                key: key("attention.head_count_kv"),
                message: format!(
                    "{heads} query heads cannot share {kv_heads} key/value heads of dim {head_dim}"
                ),
            });
        }
        Ok(cfg)
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(gguf: &mut GgufFile, name: &str, eps: f64, device: &Device) -> Result<Self> {
        let weight = gguf.tensor(name, device)?.dequantize(device)?;
        Ok(Self {
            weight,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// A projection with quantized weights. Q4_1 on the CPU runs our kernel
/// (candle's Q4_1 dot product is scalar); other types run candle's.
enum Linear {
    Candle(QMatMul),
    Q4_1(kindling_kernels::Q4_1Matrix),
}

impl Linear {
    fn from_qtensor(q: QTensor) -> Result<Self> {
        if q.dtype() == GgmlDType::Q4_1 && q.device().is_cpu() {
            let (rows, cols) = q.shape().dims2()?;
            let bytes = q.data()?;
            return Ok(Self::Q4_1(kindling_kernels::Q4_1Matrix::from_ggml_bytes(
                &bytes, rows, cols,
            )?));
        }
        Ok(Self::Candle(QMatMul::from_qtensor(q)?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Candle(m) => m.forward(x)?,
            Self::Q4_1(m) => m.forward(x)?,
        })
    }
}

fn qmatmul(gguf: &mut GgufFile, name: &str, device: &Device) -> Result<Linear> {
    Linear::from_qtensor(gguf.tensor(name, device)?)
}

struct Block {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Block {
    fn load(gguf: &mut GgufFile, i: usize, cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let p = |s: &str| format!("blk.{i}.{s}.weight");
        Ok(Self {
            attn_norm: RmsNorm::load(gguf, &p("attn_norm"), cfg.rms_eps, device)?,
            q: qmatmul(gguf, &p("attn_q"), device)?,
            k: qmatmul(gguf, &p("attn_k"), device)?,
            v: qmatmul(gguf, &p("attn_v"), device)?,
            o: qmatmul(gguf, &p("attn_output"), device)?,
            ffn_norm: RmsNorm::load(gguf, &p("ffn_norm"), cfg.rms_eps, device)?,
            gate: qmatmul(gguf, &p("ffn_gate"), device)?,
            up: qmatmul(gguf, &p("ffn_up"), device)?,
            down: qmatmul(gguf, &p("ffn_down"), device)?,
        })
    }
}

/// Per-call inputs shared by every block: rotary tables for the new
/// positions and the causal mask.
struct StepInputs {
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
}

/// A Llama-family decoder with quantized weights.
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    max_positions: usize,
    device: Device,
}

impl Llama {
    /// Loads the weights of `gguf` onto `device`, with rotary tables for
    /// `max_positions` positions (at most the trained context).
    pub fn from_gguf(gguf: &mut GgufFile, max_positions: usize, device: &Device) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(gguf)?;
        let max_positions = max_positions.min(cfg.trained_context).max(1);
        let embed_q = gguf.tensor("token_embd.weight", device)?;
        let embed = Embedding::new(embed_q.dequantize(device)?, cfg.hidden_size);
        // Tied embeddings: models without `output.weight` reuse the input table.
        let lm_head = if gguf.has_tensor("output.weight") {
            qmatmul(gguf, "output.weight", device)?
        } else {
            Linear::from_qtensor(embed_q)?
        };
        let blocks = (0..cfg.layers)
            .map(|i| Block::load(gguf, i, &cfg, device))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(gguf, "output_norm.weight", cfg.rms_eps, device)?;
        let (cos, sin) = rotary_tables(&cfg, max_positions, device)?;
        Ok(Self {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            cos,
            sin,
            max_positions,
            device: device.clone(),
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

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> SequenceCache {
        let shape = CacheShape {
            layers: self.cfg.layers,
            kv_heads: self.cfg.kv_heads,
            head_dim: self.cfg.head_dim,
            max_positions: self.max_positions,
        };
        SequenceCache::new(shape, DType::F32, &self.device)
    }

    /// Runs `tokens` after the positions already in `cache`, appends their
    /// keys and values, and returns the logits (`[vocab]`, f32) of the last one.
    pub fn forward(&self, tokens: &[u32], cache: &mut SequenceCache) -> Result<Tensor> {
        let t = tokens.len();
        let pos = cache.len();
        if t == 0 || pos + t > self.max_positions {
            return Err(ModelError::Tensor {
                name: "input".into(),
                message: format!(
                    "{t} tokens after {pos} cached do not fit in {} positions",
                    self.max_positions
                ),
            });
        }
        cache.reserve(t)?;
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed.forward(&ids)?;
        let step = StepInputs {
            cos: self.cos.narrow(0, pos, t)?,
            sin: self.sin.narrow(0, pos, t)?,
            mask: (t > 1)
                .then(|| causal_mask(t, pos, &self.device))
                .transpose()?,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let h = block.attn_norm.forward(&x)?;
            let attn = self.attention(block, i, &h, &step, cache)?;
            x = (attn + &x)?;
            let h = block.ffn_norm.forward(&x)?;
            let gated =
                kindling_kernels::silu_mul(&block.gate.forward(&h)?, &block.up.forward(&h)?)?;
            x = (block.down.forward(&gated)? + &x)?;
        }
        cache.advance(t);
        let last = x.narrow(1, t - 1, 1)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        Ok(logits.flatten_all()?.to_dtype(DType::F32)?)
    }

    fn attention(
        &self,
        block: &Block,
        layer: usize,
        x: &Tensor,
        step: &StepInputs,
        cache: &SequenceCache,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        let heads = |m: &Linear, n: usize| -> Result<Tensor> {
            Ok(m.forward(x)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = candle_nn::rotary_emb::rope_i(&heads(&block.q, nh)?, &step.cos, &step.sin)?;
        let k = candle_nn::rotary_emb::rope_i(&heads(&block.k, nkv)?, &step.cos, &step.sin)?;
        let v = heads(&block.v, nkv)?;
        let (k, v) = cache.append(layer, &k, &v)?;
        let total = k.dim(2)?;
        // Grouped-query attention without copying K/V: fold the query heads
        // that share a key/value head into the row dimension.
        let group = nh / nkv;
        let q = q.reshape((b, nkv, group * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = match &step.mask {
            Some(mask) => scores
                .reshape((b, nkv, group, t, total))?
                .broadcast_add(mask)?
                .reshape((b, nkv, group * t, total))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = probs.matmul(&v.contiguous()?)?;
        let y = y
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        block.o.forward(&y)
    }
}

fn rotary_tables(cfg: &LlamaConfig, positions: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
        .collect();
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let pos = Tensor::arange(0u32, positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((positions, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// `[t, pos + t]`: new token `i` sees every cached position and new tokens up to `i`.
fn causal_mask(t: usize, pos: usize, device: &Device) -> Result<Tensor> {
    let total = pos + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (t, total), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_lets_each_token_see_the_past_only() {
        let m = causal_mask(2, 3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[0], vec![0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(m[1], vec![0.0; 5]);
    }
}
