//! Hyper-parameters of the Llama family, read from GGUF metadata or from a
//! Hugging Face `config.json` (Llama, SmolLM2, Mistral, Qwen2/3, Gemma 2/3).

use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

use super::variant::Variant;

/// How rotary frequencies are stretched for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear {
        /// The stretch.
        factor: f32,
    },
    /// Llama 3.1's band-wise scaling.
    Llama3 {
        /// Stretch of the low frequencies.
        factor: f32,
        /// Below this wavelength fraction frequencies are stretched fully.
        low_freq_factor: f32,
        /// Above this one they are kept.
        high_freq_factor: f32,
        /// The context the model was pre-trained on.
        original_context: f32,
    },
}

/// The `general.architecture` values read from GGUF files: Llama (and
/// Mistral, which llama.cpp writes as `llama`), Qwen2/2.5 (q/k/v biases),
/// Qwen3 (per-head q/k norms), Phi-3 (fused q/k/v and gate/up) and Gemma
/// 2 and 3 (see [`Variant`]).
pub const GGUF_ARCHITECTURES: [&str; 6] = ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"];

/// The `model_type` values read from Hugging Face folders.
const HF_MODEL_TYPES: [&str; 6] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
];

/// Hyper-parameters of a Llama-family model.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// Size of the token vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
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
    /// RoPE frequency scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Whether rotated pairs are adjacent (GGUF's permuted weights) rather
    /// than the two halves of a head (Hugging Face checkpoints).
    pub rope_interleaved: bool,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// The context length the model was trained for (for Mistral's
    /// sliding-window models, the window: positions beyond it are refused).
    pub trained_context: usize,
    /// Whether the output projection reuses the token-embedding table.
    pub tie_embeddings: bool,
    /// What the architecture does differently from Llama.
    pub variant: Variant,
}

impl LlamaConfig {
    /// Reads the `llama.*` metadata of `gguf`.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = gguf.string("general.architecture")?;
        if !GGUF_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture(format!(
                "{arch} (GGUF architectures: {})",
                GGUF_ARCHITECTURES.join(", ")
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = gguf.u32(&key("embedding_length"))? as usize;
        let heads = gguf.u32(&key("attention.head_count"))? as usize;
        let kv_heads = gguf
            .opt_u32(&key("attention.head_count_kv"))?
            .map_or(heads, |v| v as usize);
        // Qwen3 states its head size (which need not be width / heads).
        let head_dim = match gguf.opt_u32(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None => gguf
                .opt_u32(&key("rope.dimension_count"))?
                .map_or(hidden_size / heads.max(1), |v| v as usize),
        };
        let rope_theta = if gguf.has(&key("rope.freq_base")) {
            gguf.f32(&key("rope.freq_base"))?
        } else {
            10_000.0
        };
        let vocab_size = match gguf.opt_u32(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => gguf.strings("tokenizer.ggml.tokens")?.len(),
        };
        let rope_scaling = if gguf.has(&key("rope.scaling.type")) {
            match gguf.string(&key("rope.scaling.type"))?.as_str() {
                "none" => None,
                "linear" => Some(RopeScaling::Linear {
                    factor: gguf.f32(&key("rope.scaling.factor"))?,
                }),
                other => {
                    return Err(ModelError::Metadata {
                        key: key("rope.scaling.type"),
                        message: format!("rope scaling `{other}` is not supported"),
                    })
                }
            }
        } else {
            None
        };
        let layers = gguf.u32(&key("block_count"))? as usize;
        let cfg = Self {
            vocab_size,
            hidden_size,
            intermediate_size: gguf
                .opt_u32(&key("feed_forward_length"))?
                .map_or(4 * hidden_size, |v| v as usize),
            layers,
            heads,
            kv_heads,
            head_dim,
            rope_theta,
            rope_scaling,
            // llama.cpp's converter permutes Llama's q/k weights for adjacent
            // pairs; Qwen's and Phi-3's are stored as trained (NeoX-style halves).
            rope_interleaved: arch == "llama",
            rms_eps: f64::from(gguf.f32(&key("attention.layer_norm_rms_epsilon"))?),
            trained_context: gguf.u32(&key("context_length"))? as usize,
            tie_embeddings: !gguf.has_tensor("output.weight"),
            variant: Variant::from_gguf(gguf, &arch, layers, hidden_size, heads)?,
        };
        cfg.check(&key("attention.head_count_kv"))
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        let bad = |message: String| ModelError::Metadata {
            key: "config.json".into(),
            message,
        };
        let hf: HfConfig = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let model_type = hf.model_type.clone().unwrap_or_default();
        if !HF_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(ModelError::UnsupportedArchitecture(format!(
                "{model_type} (supported: {})",
                HF_MODEL_TYPES.join(", ")
            )));
        }
        let heads = hf.num_attention_heads;
        let mut trained_context = hf.max_position_embeddings;
        if model_type == "mistral" {
            if let Some(window) = hf.sliding_window {
                trained_context = trained_context.min(window);
            }
        }
        let cfg = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            layers: hf.num_hidden_layers,
            heads,
            kv_heads: hf.num_key_value_heads.unwrap_or(heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / heads.max(1)),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rope_scaling: hf
                .rope_scaling
                .as_ref()
                .map(parse_scaling)
                .transpose()
                .map_err(bad)?
                .flatten(),
            rope_interleaved: false,
            rms_eps: hf.rms_norm_eps,
            trained_context,
            tie_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            variant: Variant::from_hf_json(json, &model_type, hf.num_hidden_layers)?,
        };
        cfg.check("config.json")
    }

    fn check(self, key: &str) -> Result<Self> {
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        if h == 0 || kv == 0 || h % kv != 0 || d % 2 != 0 {
            return Err(ModelError::Metadata {
                key: key.into(),
                message: format!("{h} query heads cannot share {kv} key/value heads of dim {d}"),
            });
        }
        Ok(self)
    }

    /// The rotary frequencies of sliding-window layers, where they have a
    /// base of their own (unscaled).
    pub fn local_inv_freq(&self) -> Option<Vec<f32>> {
        let theta = self.variant.sliding.as_ref()?.rope_theta?;
        let local = Self {
            rope_theta: theta,
            rope_scaling: None,
            ..self.clone()
        };
        Some(local.inv_freq())
    }

    /// Inverse wavelengths of the rotary frequencies (`head_dim / 2`).
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim as f32;
        let base: Vec<f32> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f32 / d))
            .collect();
        match self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            }) => {
                let low_wavelen = original_context / low_freq_factor;
                let high_wavelen = original_context / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_context / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    sliding_window: Option<usize>,
}

fn parse_scaling(v: &serde_json::Value) -> std::result::Result<Option<RopeScaling>, String> {
    if v.is_null() {
        return Ok(None);
    }
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| -> std::result::Result<f32, String> {
        v.get(k)
            .and_then(serde_json::Value::as_f64)
            .map(|x| x as f32)
            .ok_or_else(|| format!("rope_scaling.{k} is missing"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_context: num("original_max_position_embeddings")?,
        })),
        other => Err(format!(
            "rope scaling `{other}` is not supported (linear and llama3 are)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_style_config_reads_gqa_and_tied_embeddings() {
        let cfg = LlamaConfig::from_hf_json(
            r#"{"model_type":"qwen2","vocab_size":100,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":2,
            "rms_norm_eps":1e-6,"rope_theta":1000000.0,"max_position_embeddings":4096,
            "tie_word_embeddings":true,"sliding_window":4096,"rope_scaling":null}"#,
        )
        .unwrap();
        assert_eq!(
            (cfg.head_dim, cfg.kv_heads, cfg.tie_embeddings),
            (8, 2, true)
        );
        assert!(!cfg.rope_interleaved);
    }

    #[test]
    fn unknown_families_and_scalings_are_refused() {
        let base = r#""vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"rms_norm_eps":1e-5,"max_position_embeddings":64"#;
        let gpt = format!(r#"{{"model_type":"gpt2",{base}}}"#);
        assert!(matches!(
            LlamaConfig::from_hf_json(&gpt),
            Err(ModelError::UnsupportedArchitecture(_))
        ));
        let yarn = format!(
            r#"{{"model_type":"llama","rope_scaling":{{"rope_type":"yarn","factor":4}},{base}}}"#
        );
        assert!(LlamaConfig::from_hf_json(&yarn).is_err());
        let mistral = format!(r#"{{"model_type":"mistral","sliding_window":32,{base}}}"#);
        assert_eq!(
            LlamaConfig::from_hf_json(&mistral).unwrap().trained_context,
            32
        );
    }

    #[test]
    fn llama3_scaling_keeps_high_and_stretches_low_frequencies() {
        let mut cfg = LlamaConfig::from_hf_json(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":128,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":1,"rms_norm_eps":1e-5,
            "max_position_embeddings":131072,"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        )
        .unwrap();
        let scaled = cfg.inv_freq();
        cfg.rope_scaling = None;
        let plain = cfg.inv_freq();
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12);
    }
}
